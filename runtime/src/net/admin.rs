//! The host's admin address, apart from the agents' port (`agent-host serve --metrics ADDR`):
//! `/metrics` in the Prometheus text format, for the monitoring operators already run.

use crate::net::host::Host;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use std::sync::Arc;

/// Serves `host`'s admin pages on `listener` until the host stops.
///
/// # Errors
/// When the listener fails.
pub async fn serve(host: Arc<Host>, listener: tokio::net::TcpListener) -> std::io::Result<()> {
    let stopping = host.stopping.clone();
    let app = axum::Router::new()
        .route("/metrics", get(metrics))
        .with_state(host);
    axum::serve(listener, app)
        .with_graceful_shutdown(stopping.cancelled_owned())
        .await
}

async fn metrics(State(host): State<Arc<Host>>) -> impl IntoResponse {
    let kind = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    ([(header::CONTENT_TYPE, kind)], host.metrics_text())
}
