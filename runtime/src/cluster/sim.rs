//! A cluster of [`Cluster`]s in virtual time: messages take a millisecond or two, timers fire
//! when due, nothing runs in real time. The `cluster` bench measures with it how fast a
//! join and a failure become known to every host, what the gossip costs, and how evenly
//! placement spreads agents; unit tests check the same on fewer hosts.

use super::load::{Facts, Load};
use super::wire::HostId;
use super::{Cluster, Output, settings};
use agent_abi::Place;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::net::SocketAddr;
use std::time::Duration;

enum Event {
    Deliver {
        to: usize,
        data: bytes::Bytes,
    },
    Timer {
        host: usize,
        timer: foca::Timer<HostId>,
    },
    Tick {
        host: usize,
    },
}

/// A simulated cluster.
pub struct Sim {
    hosts: Vec<Option<Cluster>>,
    index: BTreeMap<String, usize>,
    /// Agents running on each host (placement's effect).
    pub agents: Vec<u32>,
    /// Virtual time, µs.
    now: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: BTreeMap<u64, Event>,
    seq: u64,
    /// Which hosts each host has up.
    views: Vec<Vec<bool>>,
    /// Per host: how many hosts have it up.
    seen_up: Vec<u32>,
    /// Bytes sent by all hosts.
    pub bytes: u64,
    /// The largest message sent.
    pub largest: usize,
    rng: SmallRng,
    expected: u32,
}

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 4433))
}

impl Sim {
    /// An empty simulation sized for about `expected` hosts.
    pub fn new(expected: u32, seed: u64) -> Sim {
        Sim {
            hosts: Vec::new(),
            index: BTreeMap::new(),
            agents: Vec::new(),
            now: 0,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            seq: 0,
            views: Vec::new(),
            seen_up: Vec::new(),
            bytes: 0,
            largest: 0,
            rng: SmallRng::seed_from_u64(seed),
            expected,
        }
    }

    /// Virtual time.
    pub fn now(&self) -> Duration {
        Duration::from_micros(self.now)
    }

    fn at(&mut self, delay_us: u64, event: Event) {
        self.seq += 1;
        self.queue.push(Reverse((self.now + delay_us, self.seq)));
        self.events.insert(self.seq, event);
    }

    /// Starts a host that joins through host `seed` (none: the first); its index.
    pub fn start(&mut self, seed: Option<usize>) -> usize {
        let i = self.hosts.len();
        let me = HostId {
            name: format!("h{i}").into(),
            addr: addr(i),
            start: 1,
        };
        let facts = Facts {
            arch: "x86_64".into(),
            cores: 2,
            services: vec![],
        };
        let mut cluster = Cluster::new(
            me.clone(),
            facts,
            settings(self.expected),
            self.rng.random(),
        );
        if let Some(seed) = seed {
            let to = HostId {
                name: format!("h{seed}").into(),
                addr: addr(seed),
                start: 0,
            };
            let _ = cluster.join(to);
        }
        self.index.insert(me.name.to_string(), i);
        self.hosts.push(Some(cluster));
        self.agents.push(0);
        self.seen_up.push(0);
        for view in &mut self.views {
            view.push(false);
        }
        self.views.push(vec![false; self.hosts.len()]);
        for view in &mut self.views {
            view.resize(self.hosts.len(), false);
        }
        self.after(i);
        let jitter = self.rng.random_range(0..1_000_000);
        self.at(jitter, Event::Tick { host: i });
        i
    }

    /// Stops host `i` without a word, as a crash does.
    pub fn kill(&mut self, i: usize) {
        self.hosts[i] = None;
    }

    /// How many live hosts (other than `i`) have host `i` up.
    pub fn seen_up(&self, i: usize) -> u32 {
        self.seen_up[i]
    }

    /// Live hosts.
    pub fn live(&self) -> u32 {
        self.hosts.iter().filter(|h| h.is_some()).count() as u32
    }

    /// How many live hosts other than `i` still have host `i` up.
    pub fn seen_up_by_live(&self, i: usize) -> u32 {
        (0..self.hosts.len())
            .filter(|&o| o != i && self.hosts[o].is_some() && self.views[o][i])
            .count() as u32
    }

    /// Places one agent launched on host `from`, as `place` says; where it went.
    pub fn place(&mut self, from: usize, place: &Place) -> Option<usize> {
        let now_ms = self.now / 1000;
        let chosen = self.hosts[from].as_mut()?.choose(place, now_ms)?;
        let to = *self.index.get(&chosen)?;
        self.agents[to] += 1;
        Some(to)
    }

    fn after(&mut self, i: usize) {
        let Some(host) = self.hosts[i].as_mut() else {
            return;
        };
        for out in host.outputs() {
            match out {
                Output::Send { to, data } => {
                    self.bytes += data.len() as u64;
                    self.largest = self.largest.max(data.len());
                    if let Some(&to) = self.index.get(&*to.name) {
                        let delay = self.rng.random_range(500..2_000);
                        self.at(delay, Event::Deliver { to, data });
                    }
                }
                Output::Timer { after, timer } => {
                    self.at(after.as_micros() as u64, Event::Timer { host: i, timer });
                }
                Output::Up(id) | Output::Down(id) if *id.name == *format!("h{i}") => {}
                Output::Up(id) => self.view(i, &id.name, true),
                Output::Down(id) => self.view(i, &id.name, false),
                Output::Restarted(_) => {}
            }
        }
    }

    fn view(&mut self, observer: usize, subject: &str, up: bool) {
        let Some(&s) = self.index.get(subject) else {
            return;
        };
        if self.views[observer][s] != up {
            self.views[observer][s] = up;
            match up {
                true => self.seen_up[s] += 1,
                false => self.seen_up[s] -= 1,
            }
        }
    }

    /// Runs until virtual time `until`.
    pub fn run_until(&mut self, until: Duration) {
        let until = until.as_micros() as u64;
        while let Some(&Reverse((t, seq))) = self.queue.peek() {
            if t > until {
                break;
            }
            self.queue.pop();
            self.now = t;
            let Some(event) = self.events.remove(&seq) else {
                continue;
            };
            let now_ms = t / 1000;
            let host = match event {
                Event::Deliver { to, data } => {
                    if let Some(h) = self.hosts[to].as_mut() {
                        let _ = h.receive(&data, now_ms);
                    }
                    to
                }
                Event::Timer { host, timer } => {
                    if let Some(h) = self.hosts[host].as_mut() {
                        let _ = h.timer(timer);
                    }
                    host
                }
                Event::Tick { host } => {
                    let load = Load {
                        running: self.agents[host],
                        ..Load::default()
                    };
                    if let Some(h) = self.hosts[host].as_mut() {
                        h.tell_load(load);
                        self.at(1_000_000, Event::Tick { host });
                    }
                    host
                }
            };
            self.after(host);
        }
        self.now = until;
    }

    /// Runs in steps of `step` until `done` holds or `limit` passed; the time it took.
    pub fn run_while(
        &mut self,
        step: Duration,
        limit: Duration,
        mut done: impl FnMut(&Sim) -> bool,
    ) -> Option<Duration> {
        let start = self.now();
        while self.now() - start <= limit {
            if done(self) {
                return Some(self.now() - start);
            }
            let next = self.now() + step;
            self.run_until(next);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifty_hosts_learn_of_a_join_and_a_failure_and_spread_a_skewed_launch() {
        let n = 50;
        let mut sim = Sim::new(n, 7);
        sim.start(None);
        for _ in 1..n {
            let seed = 0;
            sim.start(Some(seed));
        }
        let all = |sim: &Sim| (0..n as usize).all(|i| sim.seen_up(i) == n - 1);
        let formed = sim.run_while(Duration::from_millis(100), Duration::from_secs(60), all);
        assert!(
            formed.is_some(),
            "50 hosts did not all see each other in 60 s"
        );
        assert!(sim.largest <= super::super::wire::MAX_MESSAGE);

        let late = sim.start(Some(3));
        let joined = sim.run_while(Duration::from_millis(100), Duration::from_secs(30), |s| {
            s.seen_up(late) == n
        });
        assert!(joined.is_some(), "a join was not known by all within 30 s");

        sim.kill(5);
        let known = sim.run_while(Duration::from_millis(100), Duration::from_secs(60), |s| {
            s.seen_up_by_live(5) == 0
        });
        assert!(
            known.is_some(),
            "a failure was not known by all within 60 s"
        );

        // Agents launched on one host spread, and none goes to the dead one.
        for _ in 0..200 {
            assert_ne!(sim.place(0, &Place::least_loaded()), Some(5));
            let next = sim.now() + Duration::from_millis(20);
            sim.run_until(next);
        }
        assert_eq!(sim.agents[5], 0);
        let max = *sim.agents.iter().max().unwrap_or(&0);
        assert!(
            max <= 10,
            "placement piled {max} agents on one host: {:?}",
            sim.agents
        );
    }
}
