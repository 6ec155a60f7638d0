//! The host's side of membership ([`crate::cluster`]): carries the protocol's messages
//! between hosts on their mutually authenticated QUIC connections, fires its timers, tells
//! it this host's load each second, and teaches the peers' address book the hosts it finds.
//!
//! A message counts only from the host its certificate names: a host cannot speak for
//! another in the protocol (what it says *about* others is another matter: see
//! docs/cluster.md).

use crate::cluster::load::{Facts, Load};
use crate::cluster::wire::{self, HostId, MAX_MESSAGE};
use crate::cluster::{Cluster, HostView, Output, settings};
use crate::net::certs::{Identity, Role};
use crate::net::host::Host;
use crate::net::messages::{Refusal, Reply, Request};
use agent_abi::Place;
use foca::Timer;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How often a host measures its load (and tells it, when it moved).
pub const LOAD_PERIOD: Duration = Duration::from_secs(1);

/// How often a host that is alone asks its seeds in again.
pub const REJOIN_PERIOD: Duration = Duration::from_secs(5);

/// The cluster as one host sees it, and the timers it asked for.
pub struct Membership {
    cluster: Mutex<Cluster>,
    epoch: Instant,
    timers: mpsc::UnboundedSender<Timer<HostId>>,
    due: Mutex<Option<mpsc::UnboundedReceiver<Timer<HostId>>>>,
    cpu: Mutex<CpuClock>,
}

impl Membership {
    /// This host, `me`, alone until it joins.
    pub fn new(me: HostId, facts: Facts) -> Membership {
        let (timers, due) = mpsc::unbounded_channel();
        let seed = me.start ^ u64::from(std::process::id());
        // Sized for a hundred hosts: how long suspicion lasts and how often news is repeated
        // grow with the logarithm of the size, so being off by tens changes little.
        let cluster = Cluster::new(me, facts, settings(100), seed);
        Membership {
            cluster: Mutex::new(cluster),
            epoch: Instant::now(),
            timers,
            due: Mutex::new(Some(due)),
            cpu: Mutex::new(CpuClock::now()),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether no other host is up.
    pub fn alone(&self) -> bool {
        self.cluster.lock().is_ok_and(|c| c.alone())
    }

    /// Every host known, this one first.
    pub fn hosts(&self) -> Vec<HostView> {
        let now = self.now_ms();
        self.cluster
            .lock()
            .map(|c| c.hosts(now))
            .unwrap_or_default()
    }

    /// Where an agent here asking for `place` goes.
    pub fn choose(&self, place: &Place) -> Option<String> {
        let now = self.now_ms();
        self.cluster.lock().ok()?.choose(place, now)
    }

    /// The lowest load (agents per core) of the other hosts that take agents, and this
    /// host's cores.
    pub fn lightest(&self) -> (Option<f64>, u32) {
        let now = self.now_ms();
        self.cluster
            .lock()
            .map(|c| (c.lightest(now), c.cores()))
            .unwrap_or((None, 1))
    }

    /// Whether `name` is this host or up.
    pub fn is_up(&self, name: &str) -> bool {
        self.cluster.lock().is_ok_and(|c| c.is_up(name))
    }
}

/// The process's CPU time at an instant, to measure its use since.
struct CpuClock {
    at: Instant,
    cpu: Duration,
}

impl CpuClock {
    fn now() -> CpuClock {
        CpuClock {
            at: Instant::now(),
            cpu: process_cpu(),
        }
    }
}

fn process_cpu() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is always valid.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Memory the machine has available, in MiB (0 where the system does not say).
fn free_mib() -> u64 {
    let Ok(info) = std::fs::read_to_string("/proc/meminfo") else {
        return 0;
    };
    info.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib >> 10)
}

/// What this host is.
pub fn facts(host_services: Vec<String>) -> Facts {
    Facts {
        arch: std::env::consts::ARCH.to_string(),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        services: host_services,
    }
}

impl Host {
    /// Asks the seeds and static peers to let this host in, then runs the protocol's timers
    /// and tells its load, until the host stops.
    pub(in crate::net) async fn run_membership(self: Arc<Self>) {
        let Some(mut due) = self.membership.due.lock().ok().and_then(|mut d| d.take()) else {
            return;
        };
        self.join_seeds().await;
        let mut load = tokio::time::interval(LOAD_PERIOD);
        let mut rejoin = tokio::time::interval(REJOIN_PERIOD);
        loop {
            tokio::select! {
                () = self.stopping.cancelled() => return,
                Some(timer) = due.recv() => {
                    let outputs = self.membership.cluster.lock().map(|mut c| {
                        if let Err(e) = c.timer(timer) {
                            tracing::debug!("membership timer: {e}");
                        }
                        c.outputs()
                    });
                    self.carry(outputs.unwrap_or_default());
                }
                _ = load.tick() => {
                    self.tell_load();
                    self.balance();
                }
                _ = rejoin.tick() => {
                    // A host that knows nobody (its seeds were down when it started, or
                    // everyone declared it down) asks them again.
                    if self.membership.alone() {
                        self.join_seeds().await;
                    }
                }
            }
        }
    }

    /// Announces this host to each seed (`--join`) and static peer.
    async fn join_seeds(self: &Arc<Self>) {
        let mut seeds: Vec<HostId> = (self.config.peers.iter())
            .map(|(name, addr)| HostId {
                name: name.as_str().into(),
                addr: *addr,
                start: 0,
            })
            .collect();
        for join in &self.config.join {
            let (name, addr) = match &join.name {
                Some(name) => (name.clone(), join.addr),
                None => match self.peers.learn_name(join.addr).await {
                    Ok(name) => (name, join.addr),
                    Err(e) => {
                        tracing::warn!(seed = %join.addr, "cannot join through it: {e}");
                        continue;
                    }
                },
            };
            if name == self.config.name {
                continue;
            }
            self.peers.learn(&name, addr);
            seeds.push(HostId {
                name: name.into(),
                addr,
                start: 0,
            });
        }
        let outputs = self.membership.cluster.lock().map(|mut c| {
            for seed in seeds {
                if let Err(e) = c.join(seed) {
                    tracing::warn!("cannot join: {e}");
                }
            }
            c.outputs()
        });
        self.carry(outputs.unwrap_or_default());
    }

    pub(in crate::net) fn tell_load(self: &Arc<Self>) {
        let cpu_permille = match self.membership.cpu.lock() {
            Ok(mut clock) => {
                let now = CpuClock::now();
                let wall = now.at.duration_since(clock.at).as_secs_f64().max(1e-3);
                let used = now.cpu.saturating_sub(clock.cpu).as_secs_f64();
                *clock = now;
                (used / wall * 1000.0) as u32
            }
            Err(_) => 0,
        };
        let load = Load {
            running: self.residents.running() as u32,
            runnable: self.executor.queued() as u32,
            cpu_permille,
            free_mib: free_mib(),
            parked: self.residents.parked() as u32,
            draining: self.draining(),
        };
        if let Ok(mut cluster) = self.membership.cluster.lock() {
            cluster.tell_load(load);
        }
    }

    /// A membership message from `peer`, whose connection comes from `remote`.
    pub(in crate::net) fn gossip_in(
        self: &Arc<Self>,
        peer: &Identity,
        remote: SocketAddr,
        data: &[u8],
    ) -> Reply<()> {
        if peer.role != Role::Host {
            return Err(Refusal::OnlyHosts("gossip".into()));
        }
        if data.len() > MAX_MESSAGE {
            return Err(Refusal::BadGossip(format!(
                "{} bytes, over {MAX_MESSAGE}",
                data.len()
            )));
        }
        let sender = wire::sender(data).map_err(|e| Refusal::BadGossip(e.to_string()))?;
        if *sender.name != *peer.name {
            return Err(Refusal::BadGossip(format!(
                "signed as {} by host {}",
                sender.name, peer.name
            )));
        }
        // The address it came from is where it is reached: the one it declares may be a
        // wildcard it listens on.
        self.peers.learn(&peer.name, remote);
        let now = self.membership.now_ms();
        let outputs = self.membership.cluster.lock().map(|mut c| {
            let taken = c.receive(data, now);
            (taken, c.outputs())
        });
        let Ok((taken, outputs)) = outputs else {
            return Ok(());
        };
        self.carry(outputs);
        taken.map_err(|e| Refusal::BadGossip(e.to_string()))
    }

    /// Carries out what the protocol asked for.
    fn carry(self: &Arc<Self>, outputs: Vec<Output>) {
        for output in outputs {
            match output {
                Output::Send { to, data } => {
                    if !to.addr.ip().is_unspecified() {
                        self.peers.learn_if_unknown(&to.name, to.addr);
                    }
                    let host = self.clone();
                    tokio::spawn(async move {
                        let request = Request::Gossip {
                            data: serde_bytes::ByteBuf::from(data.to_vec()),
                        };
                        let sent = host
                            .peers
                            .ask_quietly::<Reply<()>>(&to.name, &request)
                            .await;
                        match sent {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => tracing::debug!(peer = %to.name, "gossip refused: {e}"),
                            Err(e) => tracing::debug!(peer = %to.name, "gossip not sent: {e}"),
                        }
                    });
                }
                Output::Timer { after, timer } => {
                    let timers = self.membership.timers.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(after).await;
                        let _ = timers.send(timer);
                    });
                }
                Output::Up(id) => {
                    if !id.addr.ip().is_unspecified() {
                        self.peers.learn_if_unknown(&id.name, id.addr);
                    }
                    tracing::info!(host = %id.name, addr = %id.addr, "host up");
                }
                Output::Down(id) => tracing::warn!(host = %id.name, "host down"),
                Output::Restarted(id) => {
                    // A connection to its earlier run would only time out.
                    tracing::info!(host = %id.name, "host restarted");
                    self.peers.forget_connection(&id.name);
                }
            }
        }
    }
}
