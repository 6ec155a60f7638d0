//! What a host lets each user take: connections, bytes arriving, agents running and parked,
//! and launches per second. A request over a quota is refused with the quota's name, so that
//! one user cannot take a host from the others.

use super::budget::Budget;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Concurrent streams a user's connection may open; a host's may open [`HOST_STREAMS`]. A
/// launch's stream stays open while the launcher follows its agent.
pub const USER_STREAMS: u32 = 256;

/// Concurrent streams a peer host's connection may open.
pub const HOST_STREAMS: u32 = 1024;

/// Bytes a user's connection may send ahead of what the host has read (QUIC's connection
/// flow-control window): what a user's refused or stalled streams can leave in the
/// connection's buffers. A host's connection gets [`HOST_WINDOW`], for images.
pub const USER_WINDOW: u32 = 16 << 20;

/// Bytes a peer host's connection may send ahead of what the host has read.
pub const HOST_WINDOW: u32 = 128 << 20;

/// The limits a host sets each user.
#[derive(Clone, Debug, PartialEq)]
pub struct UserLimits {
    /// Connections open at once.
    pub connections: usize,
    /// Bytes of requests arriving at once, over all the user's connections.
    pub inflight: u64,
    /// Agents running here at once.
    pub running: usize,
    /// Agents parked asleep here.
    pub parked: usize,
    /// Launches per second, on average; as many may come in one burst.
    pub launches_per_sec: f64,
    /// Bytes of messages the mailboxes of the user's agents launched here may hold.
    pub mail: u64,
    /// Live agents launched from this host (clones included), wherever they run.
    pub agents: usize,
}

impl UserLimits {
    /// Defaults for a host that runs `max_agents` at once and takes modules of `max_module`
    /// bytes: a user may run three quarters of the agents, so that others still get in.
    pub fn for_host(max_agents: usize, max_module: u64) -> UserLimits {
        UserLimits {
            connections: 32,
            inflight: max_module + 2 * super::wire::MAX_MESSAGE as u64,
            running: (max_agents * 3 / 4).max(1),
            parked: 10_000,
            launches_per_sec: 100.0,
            mail: 256 << 20,
            agents: max_agents.saturating_mul(4).max(1),
        }
    }
}

/// Why a user's request is refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OverQuota {
    /// Too many connections.
    #[error(
        "user {user} already has {open} connections to this host, the most a user may have (user_connections)"
    )]
    Connections {
        /// The user.
        user: String,
        /// Open now.
        open: usize,
    },
    /// Launching faster than allowed.
    #[error(
        "user {user} launches faster than {rate} agents a second, the most this host allows (user_launches_per_sec); try again shortly"
    )]
    LaunchRate {
        /// The user.
        user: String,
        /// The rate allowed.
        rate: f64,
    },
    /// Too many agents running.
    #[error(
        "user {user} already runs {running} agents on {site}, the most a user may (user_max_agents)"
    )]
    Running {
        /// The user.
        user: String,
        /// The site.
        site: String,
        /// Running now.
        running: usize,
    },
    /// The host runs as many agents as it may.
    #[error(
        "{site} is full: {running} agents running, the most it runs (max_agents); try again later or elsewhere"
    )]
    HostFull {
        /// The site.
        site: String,
        /// Running now.
        running: usize,
    },
}

/// Each user's connections, byte budget and launch allowance.
pub struct Quotas {
    limits: UserLimits,
    users: Mutex<HashMap<String, User>>,
}

struct User {
    connections: usize,
    inflight: Arc<Budget>,
    /// Launches that may be made now without waiting, and when that was last worked out.
    allowance: f64,
    counted_at: Instant,
}

/// A user's connection, counted until dropped.
pub struct Connection {
    quotas: Arc<Quotas>,
    user: String,
    /// The user's budget of bytes arriving.
    pub inflight: Arc<Budget>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        if let Ok(mut users) = self.quotas.users.lock()
            && let Some(user) = users.get_mut(&self.user)
        {
            user.connections -= 1;
        }
    }
}

impl Quotas {
    /// Quotas of `limits` for every user.
    pub fn new(limits: UserLimits) -> Arc<Quotas> {
        Arc::new(Quotas {
            limits,
            users: Mutex::default(),
        })
    }

    /// The limits.
    pub fn limits(&self) -> &UserLimits {
        &self.limits
    }

    fn with_user<T>(&self, name: &str, f: impl FnOnce(&mut User) -> T) -> T {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let user = users.entry(name.to_string()).or_insert_with(|| User {
            connections: 0,
            inflight: Budget::new(format!("user {name}"), self.limits.inflight),
            allowance: self.limits.launches_per_sec.max(1.0),
            counted_at: Instant::now(),
        });
        f(user)
    }

    /// Counts a new connection of `user`.
    ///
    /// # Errors
    /// [`OverQuota::Connections`] when the user has as many as allowed.
    pub fn connect(self: &Arc<Self>, user: &str) -> Result<Connection, OverQuota> {
        let most = self.limits.connections;
        let inflight = self.with_user(user, |u| {
            if u.connections >= most {
                return Err(OverQuota::Connections {
                    user: user.to_string(),
                    open: u.connections,
                });
            }
            u.connections += 1;
            Ok(u.inflight.clone())
        })?;
        Ok(Connection {
            quotas: self.clone(),
            user: user.to_string(),
            inflight,
        })
    }

    /// Takes one launch from `user`'s allowance, which refills at the launch rate.
    ///
    /// # Errors
    /// [`OverQuota::LaunchRate`] when none is left.
    pub fn launch(&self, user: &str) -> Result<(), OverQuota> {
        let rate = self.limits.launches_per_sec;
        self.with_user(user, |u| {
            let now = Instant::now();
            let refill = now.duration_since(u.counted_at).as_secs_f64() * rate;
            u.allowance = (u.allowance + refill).min(rate.max(1.0));
            u.counted_at = now;
            if u.allowance < 1.0 {
                return Err(OverQuota::LaunchRate {
                    user: user.to_string(),
                    rate,
                });
            }
            u.allowance -= 1.0;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> UserLimits {
        UserLimits {
            connections: 2,
            launches_per_sec: 3.0,
            ..UserLimits::for_host(8, 1 << 20)
        }
    }

    #[test]
    fn a_user_gets_as_many_connections_as_allowed_and_another_once_one_closes() {
        let quotas = Quotas::new(limits());
        let a = quotas.connect("alice");
        let b = quotas.connect("alice");
        assert!(a.is_ok() && b.is_ok());
        assert!(matches!(
            quotas.connect("alice"),
            Err(OverQuota::Connections { open: 2, .. })
        ));
        assert!(quotas.connect("bob").is_ok(), "another user is not limited");
        drop(a);
        assert!(quotas.connect("alice").is_ok());
    }

    #[test]
    fn a_users_connections_share_one_byte_budget() {
        let quotas = Quotas::new(limits());
        let (a, b) = (quotas.connect("alice"), quotas.connect("alice"));
        let (Ok(a), Ok(b)) = (a, b) else {
            panic!("two connections are allowed")
        };
        assert!(Arc::ptr_eq(&a.inflight, &b.inflight));
    }

    #[test]
    fn launches_past_the_burst_are_refused_naming_the_quota() {
        let quotas = Quotas::new(limits());
        for _ in 0..3 {
            assert!(quotas.launch("alice").is_ok());
        }
        let refused = quotas.launch("alice");
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.to_string().contains("user_launches_per_sec")),
            "{refused:?}"
        );
        assert!(quotas.launch("bob").is_ok());
    }

    #[test]
    fn defaults_leave_room_for_other_users() {
        let limits = UserLimits::for_host(1000, 64 << 20);
        assert_eq!(limits.running, 750);
        assert!(limits.inflight > 64 << 20);
        assert_eq!(UserLimits::for_host(1, 0).running, 1);
    }
}
