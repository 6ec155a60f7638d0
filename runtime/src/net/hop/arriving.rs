//! The instance of a large arriving agent, made ready and written while its image travels.
//!
//! A large image takes a while to arrive. Meanwhile its instance is made (memory grown and
//! mapped) and, when its body is raw (the pages as they are), each piece of pages is written
//! into that memory once it has come: restoring the agent after the last byte then sets only
//! its globals and context instead of copying the whole memory (BENCHMARKS.md). Nothing of
//! it runs until the whole image is decoded and checked against the offer; an image that
//! fails that is dropped with its instance.

use crate::image::Layout;
use crate::instance::AgentInstance;
use crate::net::host::RestoreError;
use crate::snapshot::PageRun;

/// An instance being made ready for an arriving agent.
pub type Preparing = tokio::task::JoinHandle<Result<AgentInstance, RestoreError>>;

/// An arriving agent's instance and how much of its body is written into it.
pub struct Arriving {
    layout: Layout,
    preparing: Option<Preparing>,
    ready: Option<AgentInstance>,
    /// Bytes of the body written into `ready`.
    written: usize,
    /// When the header came, for the phase log.
    since: std::time::Instant,
}

impl Arriving {
    /// The instance `preparing` makes for an image whose header says `layout`.
    pub fn new(layout: Layout, preparing: Preparing) -> Arriving {
        Arriving {
            layout,
            preparing: Some(preparing),
            ready: None,
            written: 0,
            since: std::time::Instant::now(),
        }
    }

    /// Writes what has come of a raw body into the instance, if it is ready; `arrived` is
    /// the image's bytes so far. Never waits for the instance.
    pub async fn keep_up(&mut self, arrived: &[u8]) {
        if self.preparing.as_ref().is_some_and(|p| p.is_finished()) {
            self.take_ready().await;
        }
        self.write(arrived);
    }

    /// Waits for the instance and writes the rest of a raw body into it; `image` is the
    /// image's bytes. Yields the instance, and the runs whose pages it holds when the body
    /// was written into it. `None` when making the instance failed.
    pub async fn finish(mut self, image: &[u8]) -> Option<(AgentInstance, Option<Vec<PageRun>>)> {
        self.take_ready().await;
        self.write(image);
        let written = self.layout.raw.then_some(self.layout.runs);
        self.ready.map(|agent| (agent, written))
    }

    async fn take_ready(&mut self) {
        if let Some(preparing) = self.preparing.take() {
            self.ready = preparing.await.ok().and_then(Result::ok);
            let (us, ready) = (
                self.since.elapsed().as_micros() as u64,
                self.ready.is_some(),
            );
            tracing::debug!(us, ready, "hop in: instance made ready, from the header");
        }
    }

    fn write(&mut self, arrived: &[u8]) {
        let (Some(agent), true) = (&mut self.ready, self.layout.raw) else {
            return;
        };
        let body = arrived.get(self.layout.body_at..).unwrap_or_default();
        if let Some(part) = body.get(self.written..).filter(|p| !p.is_empty()) {
            agent.write_pages(&self.layout.runs, self.written, part);
            self.written = body.len();
        }
    }
}
