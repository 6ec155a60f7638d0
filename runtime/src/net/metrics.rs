//! What a host counts for its operators' monitoring, served as Prometheus text on
//! `/metrics` (`agent-host serve --metrics ADDR`). Each host has a registry of its own, so
//! several hosts in one process (as in tests) keep their figures apart.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::time::Duration;

/// One label: how a hop, an admission or a connection went, or why it was refused.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// The outcome.
    pub outcome: String,
}

/// One label: which agents a gauge counts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AgentsIn {
    /// running, parked.
    pub state: String,
}

type ByOutcome = Family<Outcome, Counter>;

/// Seconds, from 50 µs to about 3 minutes, each bucket 2.5 times the last.
pub(crate) fn seconds() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        50e-6, 2.5, 17,
    ))
}

/// A host's figures.
pub struct Metrics {
    /// Filled once at construction; encoding only reads it.
    registry: Registry,
    hops_out: ByOutcome,
    hops_in: ByOutcome,
    freeze: Histogram,
    commit: Histogram,
    image_bytes: Counter,
    module_bytes: Counter,
    agents: Family<AgentsIn, Gauge>,
    launches: ByOutcome,
    store_commit: Histogram,
    connections: ByOutcome,
    messages: Counter,
    clones: Counter,
}

impl Metrics {
    /// A host's metrics, all zero, registered under `agent_host_*`; `store_commit` is the
    /// store's own record of its commits.
    pub fn new(store_commit: Histogram) -> Metrics {
        let mut registry = Registry::with_prefix("agent_host");
        let mut metrics = Metrics {
            registry: Registry::default(),
            hops_out: ByOutcome::default(),
            hops_in: ByOutcome::default(),
            freeze: seconds(),
            commit: seconds(),
            image_bytes: Counter::default(),
            module_bytes: Counter::default(),
            agents: Family::default(),
            launches: ByOutcome::default(),
            store_commit,
            connections: ByOutcome::default(),
            messages: Counter::default(),
            clones: Counter::default(),
        };
        let m = &metrics;
        registry.register(
            "hops_out",
            "Hops of agents leaving this host, by outcome",
            m.hops_out.clone(),
        );
        registry.register(
            "hops_in",
            "Hops of agents arriving at this host, by outcome",
            m.hops_in.clone(),
        );
        registry.register(
            "freeze_seconds",
            "Time an agent leaving here was stopped, from its capture to its resumption there",
            m.freeze.clone(),
        );
        registry.register(
            "commit_seconds",
            "Time from an agent's capture here to its destination's commit",
            m.commit.clone(),
        );
        registry.register(
            "image_bytes_sent",
            "Bytes of agent images sent to other hosts",
            m.image_bytes.clone(),
        );
        registry.register(
            "module_bytes_sent",
            "Bytes of modules sent to other hosts with agents",
            m.module_bytes.clone(),
        );
        registry.register(
            "agents",
            "Agents on this host: running (in memory) or parked (stored, asleep or waiting)",
            m.agents.clone(),
        );
        registry.register(
            "launches",
            "Launches of agents by users, by outcome",
            m.launches.clone(),
        );
        registry.register(
            "store_commit_seconds",
            "Time of one durable write (a group commit) of the host's store",
            m.store_commit.clone(),
        );
        registry.register(
            "connections",
            "Connections from users and hosts, by outcome of the handshake",
            m.connections.clone(),
        );
        registry.register(
            "messages",
            "Messages taken for the agents whose home this host is",
            m.messages.clone(),
        );
        registry.register(
            "clones",
            "Children made by agents running here",
            m.clones.clone(),
        );
        metrics.registry = registry;
        metrics
    }

    fn label(outcome: &str) -> Outcome {
        Outcome {
            outcome: outcome.to_string(),
        }
    }

    /// A hop from here ended: `committed` with its freeze, commit time and bytes, or not.
    pub fn hop_out(&self, outcome: &str, sent: Option<(Duration, Duration, u64, u64)>) {
        self.hops_out.get_or_create(&Self::label(outcome)).inc();
        if let Some((freeze, commit, image, module)) = sent {
            self.freeze.observe(freeze.as_secs_f64());
            self.commit.observe(commit.as_secs_f64());
            self.image_bytes.inc_by(image);
            self.module_bytes.inc_by(module);
        }
    }

    /// A hop to here ended.
    pub fn hop_in(&self, outcome: &str) {
        self.hops_in.get_or_create(&Self::label(outcome)).inc();
    }

    /// A user's launch was taken or refused.
    pub fn launch(&self, outcome: &str) {
        self.launches.get_or_create(&Self::label(outcome)).inc();
    }

    /// A connection's handshake ended: `accepted`, or why not.
    pub fn connection(&self, outcome: &str) {
        self.connections.get_or_create(&Self::label(outcome)).inc();
    }

    /// A message was taken for an agent.
    pub fn message(&self) {
        self.messages.inc();
    }

    /// A child was made.
    pub fn clone_made(&self) {
        self.clones.inc();
    }

    /// The agents here now.
    pub fn agents(&self, running: usize, parked: usize) {
        for (state, n) in [("running", running), ("parked", parked)] {
            let label = AgentsIn {
                state: state.to_string(),
            };
            self.agents
                .get_or_create(&label)
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// Everything, as Prometheus (OpenMetrics) text.
    pub fn text(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_read_back_as_prometheus_text() {
        let m = Metrics::new(seconds());
        let ms = Duration::from_millis(1);
        m.hop_out("committed", Some((ms, 2 * ms, 1000, 20)));
        m.hop_out("refused", None);
        m.hop_in("committed");
        m.agents(3, 1);
        let text = m.text();
        for line in [
            "agent_host_hops_out_total{outcome=\"committed\"} 1",
            "agent_host_hops_out_total{outcome=\"refused\"} 1",
            "agent_host_hops_in_total{outcome=\"committed\"} 1",
            "agent_host_freeze_seconds_count 1",
            "agent_host_image_bytes_sent_total 1000",
            "agent_host_agents{state=\"running\"} 3",
        ] {
            assert!(text.contains(line), "no `{line}` in:\n{text}");
        }
    }
}
