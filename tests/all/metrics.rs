//! `agent-host serve --metrics ADDR`: each host's Prometheus page counts what it did.

use agent_e2e::{Cluster, example_path, json};
use std::io::{Read, Write};
use std::time::Duration;

fn free_port() -> u16 {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    socket.local_addr().unwrap().port()
}

/// The page at `/metrics` of the host whose metrics are on `port`, once it answers.
fn scrape(port: u16) -> String {
    for _ in 0..100 {
        if let Ok(mut conn) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let ask = "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
            conn.write_all(ask.as_bytes()).unwrap();
            let mut page = String::new();
            conn.read_to_string(&mut page).unwrap();
            assert!(page.starts_with("HTTP/1.1 200"), "{page}");
            return page;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("nothing serves metrics on port {port}");
}

/// The value of the sample named `name` (labels included), if the page has it.
fn value(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn metrics_count_the_hops_launches_and_connections_of_each_host() {
    let (port_a, port_b) = (free_port(), free_port());
    let (a, b) = (format!("127.0.0.1:{port_a}"), format!("127.0.0.1:{port_b}"));
    let flags_a: &[&str] = &["--metrics", &a];
    let flags_b: &[&str] = &["--metrics", &b];
    let up: &[&str] = &[];
    let cluster = Cluster::start(
        &["siteA", "siteB", "siteC"],
        &[("siteA", flags_a), ("siteB", flags_b), ("siteC", up)],
    );
    let before = scrape(port_a);
    let committed_out = "agent_host_hops_out_total{outcome=\"committed\"}";
    assert_eq!(value(&before, committed_out), None, "{before}");

    // siteA -> siteB, a hop from siteB to a site nobody knows, siteB -> siteC -> siteA.
    let search = example_path("search");
    let launch = [
        "launch",
        &search,
        "--hop",
        "siteB,atlantis,siteC,siteA",
        "--arg",
        "query=host",
        "--json",
    ];
    let out = cluster.agent(&launch, "siteA", "alice");
    assert_eq!(json(&out)["ok"], true, "{out:?}");

    let page = scrape(port_a);
    let is = |page: &str, name: &str| value(page, name).unwrap_or(-1.0);
    assert_eq!(is(&page, committed_out), 1.0, "{page}");
    assert_eq!(
        is(&page, "agent_host_hops_in_total{outcome=\"committed\"}"),
        1.0,
        "{page}"
    );
    assert_eq!(
        is(&page, "agent_host_launches_total{outcome=\"launched\"}"),
        1.0,
        "{page}"
    );
    assert_eq!(is(&page, "agent_host_freeze_seconds_count"), 1.0, "{page}");
    assert!(
        is(&page, "agent_host_image_bytes_sent_total") > 0.0,
        "{page}"
    );
    assert!(
        is(&page, "agent_host_store_commit_seconds_count") > 0.0,
        "{page}"
    );
    assert!(
        is(&page, "agent_host_connections_total{outcome=\"accepted\"}") >= 1.0,
        "{page}"
    );
    assert_eq!(
        is(&page, "agent_host_agents{state=\"running\"}"),
        0.0,
        "{page}"
    );

    let page = scrape(port_b);
    assert_eq!(is(&page, committed_out), 1.0, "{page}");
    assert_eq!(
        is(&page, "agent_host_hops_out_total{outcome=\"unknown_site\"}"),
        1.0,
        "{page}"
    );
    assert_eq!(
        is(&page, "agent_host_hops_in_total{outcome=\"committed\"}"),
        1.0,
        "{page}"
    );
    // siteC had not the module: siteB sent it.
    assert!(
        is(&page, "agent_host_module_bytes_sent_total") > 0.0,
        "{page}"
    );
}
