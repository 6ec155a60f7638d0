//! The agents on a host: running ones, with their flags (for kill and shutdown), and parked
//! ones, of which only an alarm is in memory. Both are counted per owner, for the quotas a
//! host sets each user; one lock over all of it, so an agent is always in exactly one place
//! and a kill finds it there.

use crate::context::AgentId;
use crate::state::AgentFlags;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::task::AbortHandle;

/// How many agents one owner has here.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Running (or sleeping in memory).
    pub running: usize,
    /// Parked asleep.
    pub parked: usize,
}

/// Where a kill found an agent.
pub enum Found {
    /// Running: its kill flag is set, it ends at its next epoch tick or operation.
    Running,
    /// Parked: taken out, with its alarm, for the caller to end.
    Parked(AbortHandle),
    /// Not here.
    Absent,
}

/// Running and parked agents, by id and by owner.
#[derive(Default)]
pub struct Residents {
    inner: Mutex<Inner>,
    /// Notified whenever the count of running agents (places held included) goes down.
    freed: tokio::sync::Notify,
}

#[derive(Default)]
struct Inner {
    running: HashMap<AgentId, (Arc<AgentFlags>, Arc<str>)>,
    /// Places held for agents being launched or arriving ([`Reserved`]), counted as running.
    reserved: usize,
    parked: HashMap<AgentId, (AbortHandle, Arc<str>)>,
    owners: HashMap<Arc<str>, Counts>,
}

impl Inner {
    fn owner(&mut self, owner: &str) -> (Arc<str>, &mut Counts) {
        let key = match self.owners.get_key_value(owner) {
            Some((key, _)) => key.clone(),
            None => Arc::from(owner),
        };
        let counts = self.owners.entry(key.clone()).or_default();
        (key, counts)
    }

    fn counted(&mut self, owner: &Arc<str>, change: impl FnOnce(&mut Counts)) {
        if let Some(counts) = self.owners.get_mut(owner) {
            change(counts);
            if *counts == Counts::default() {
                self.owners.remove(owner);
            }
        }
    }

    fn remove_running(&mut self, id: &AgentId) -> Option<Arc<AgentFlags>> {
        let (flags, owner) = self.running.remove(id)?;
        self.counted(&owner, |c| c.running -= 1);
        Some(flags)
    }

    fn remove_parked(&mut self, id: &AgentId) -> Option<(AbortHandle, Arc<str>)> {
        let (alarm, owner) = self.parked.remove(id)?;
        self.counted(&owner, |c| c.parked -= 1);
        Some((alarm, owner))
    }

    fn insert_running(&mut self, id: AgentId, owner: &str, flags: Arc<AgentFlags>) {
        self.remove_running(&id);
        let (owner, counts) = self.owner(owner);
        counts.running += 1;
        self.running.insert(id, (flags, owner));
    }

    fn insert_parked(&mut self, id: AgentId, owner: &str, alarm: AbortHandle) {
        if let Some((old, _)) = self.remove_parked(&id) {
            old.abort();
        }
        let (owner, counts) = self.owner(owner);
        counts.parked += 1;
        self.parked.insert(id, (alarm, owner));
    }
}

/// Why there is no place for one more agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Full {
    /// The host runs this many, its most.
    Host(usize),
    /// The owner runs this many, its most.
    Owner(usize),
}

/// A place held for an agent being launched or arriving, from the check that it may run here
/// until it is enrolled (or given up): checks made meanwhile count it.
pub struct Reserved<'a> {
    residents: &'a Residents,
    owner: Arc<str>,
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        let mut inner = self.residents.lock();
        inner.reserved -= 1;
        inner.counted(&self.owner, |c| c.running -= 1);
        drop(inner);
        self.residents.freed.notify_waiters();
    }
}

impl Residents {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every change under the lock is a few map operations that cannot panic halfway.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds a place for one more agent of `owner`, if the host runs fewer than `most` and
    /// the owner fewer than `most_each` (places held count as running).
    ///
    /// # Errors
    /// [`Full`] says which limit is reached.
    pub fn reserve(
        &self,
        owner: &str,
        most: usize,
        most_each: usize,
    ) -> Result<Reserved<'_>, Full> {
        let mut inner = self.lock();
        let running = inner.running.len() + inner.reserved;
        if running >= most {
            return Err(Full::Host(running));
        }
        let (owner, counts) = inner.owner(owner);
        if counts.running >= most_each {
            let running = counts.running;
            inner.counted(&owner, |_| {});
            return Err(Full::Owner(running));
        }
        counts.running += 1;
        inner.reserved += 1;
        Ok(Reserved {
            residents: self,
            owner,
        })
    }

    /// The owner of a parked agent.
    pub fn parked_owner(&self, id: &AgentId) -> Option<Arc<str>> {
        self.lock().parked.get(id).map(|(_, owner)| owner.clone())
    }

    /// Counts `id` as running for `owner`.
    pub fn enroll(&self, id: AgentId, owner: &str, flags: Arc<AgentFlags>) {
        self.lock().insert_running(id, owner, flags);
    }

    /// Stops counting `id` as running; whether it was.
    pub fn forget(&self, id: &AgentId) -> bool {
        let forgot = self.lock().remove_running(id).is_some();
        self.freed.notify_waiters();
        forgot
    }

    /// Waits until `enough` holds of the count of running agents (places held included),
    /// checked again whenever that count goes down.
    ///
    /// # Cancel safety
    /// Cancel safe: it holds nothing.
    pub async fn until_running(&self, enough: impl Fn(usize) -> bool) {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before the count is read, so that a change in between wakes it.
            freed.as_mut().enable();
            if enough(self.running()) {
                return;
            }
            freed.await;
        }
    }

    /// Moves a running agent to the parked ones, with the alarm `alarm` makes (made under the
    /// lock: it may ring at once). `false`, and nothing changes, if it was killed meanwhile.
    pub fn park(
        &self,
        id: AgentId,
        flags: &AgentFlags,
        owner: &str,
        alarm: impl FnOnce() -> AbortHandle,
    ) -> bool {
        let mut inner = self.lock();
        if flags.kill.load(Ordering::SeqCst) {
            return false;
        }
        inner.remove_running(&id);
        inner.insert_parked(id, owner, alarm());
        drop(inner);
        self.freed.notify_waiters();
        true
    }

    /// Counts a stored sleeping agent as parked, with its alarm (made under the lock).
    pub fn set_alarm(&self, id: AgentId, owner: &str, alarm: impl FnOnce() -> AbortHandle) {
        let mut inner = self.lock();
        inner.insert_parked(id, owner, alarm());
    }

    /// Moves a parked agent to the running ones, with `flags`; its owner, or `None` if it
    /// was not parked (a kill took it first).
    pub fn wake(&self, id: AgentId, flags: Arc<AgentFlags>) -> Option<Arc<str>> {
        let mut inner = self.lock();
        let (_, owner) = inner.remove_parked(&id)?;
        inner.insert_running(id, &owner, flags);
        Some(owner)
    }

    /// Finds `id` for a kill: a running agent's kill flag is set, a parked one is taken out.
    pub fn kill(&self, id: &AgentId) -> Found {
        let mut inner = self.lock();
        if let Some((flags, _)) = inner.running.get(id) {
            flags.kill();
            return Found::Running;
        }
        match inner.remove_parked(id) {
            Some((alarm, _)) => Found::Parked(alarm),
            None => Found::Absent,
        }
    }

    /// The flags of every running agent.
    pub fn running_flags(&self) -> Vec<Arc<AgentFlags>> {
        self.lock()
            .running
            .values()
            .map(|(f, _)| f.clone())
            .collect()
    }

    /// How many agents run here, places held for those coming included.
    pub fn running(&self) -> usize {
        let inner = self.lock();
        inner.running.len() + inner.reserved
    }

    /// The agents parked here.
    pub fn parked_ids(&self) -> Vec<AgentId> {
        self.lock().parked.keys().copied().collect()
    }

    /// How many agents are parked here.
    pub fn parked(&self) -> usize {
        self.lock().parked.len()
    }

    /// How many agents `owner` has here.
    pub fn counts(&self, owner: &str) -> Counts {
        self.lock().owners.get(owner).copied().unwrap_or_default()
    }

    /// Cancels every alarm: the parked agents stay stored for the next start.
    pub fn stop_alarms(&self) {
        let mut inner = self.lock();
        let ids: Vec<AgentId> = inner.parked.keys().copied().collect();
        for id in ids {
            if let Some((alarm, _)) = inner.remove_parked(&id) {
                alarm.abort();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn alarm() -> AbortHandle {
        tokio::spawn(std::future::pending::<()>()).abort_handle()
    }

    #[tokio::test]
    async fn a_wait_for_room_ends_when_a_place_is_given_up_or_an_agent_stops() {
        let residents = Arc::new(Residents::default());
        let place = residents.reserve("alice", 1, 1).unwrap();
        let waiting = {
            let residents = residents.clone();
            tokio::spawn(async move { residents.until_running(|n| n < 1).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(place);
        // A guard against a hang, not a measurement: the wait ends at once.
        tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the place given up wakes the wait")
            .unwrap();
        let id = AgentId::random();
        residents.enroll(id, "alice", Arc::default());
        let waiting = {
            let residents = residents.clone();
            tokio::spawn(async move { residents.until_running(|n| n == 0).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        residents.forget(&id);
        tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the agent that stopped wakes the wait")
            .unwrap();
    }

    #[tokio::test]
    async fn an_agent_is_counted_once_for_its_owner_wherever_it_is() {
        let residents = Residents::default();
        let (a, b) = (AgentId::random(), AgentId::random());
        let flags = Arc::<AgentFlags>::default();
        residents.enroll(a, "alice", flags.clone());
        residents.enroll(b, "alice", Arc::default());
        residents.enroll(a, "alice", flags.clone());
        assert_eq!(
            residents.counts("alice"),
            Counts {
                running: 2,
                parked: 0
            }
        );
        assert!(residents.park(a, &flags, "alice", alarm));
        assert_eq!(
            residents.counts("alice"),
            Counts {
                running: 1,
                parked: 1
            }
        );
        assert_eq!(residents.running(), 1);
        assert_eq!(residents.wake(a, flags.clone()).as_deref(), Some("alice"));
        assert!(residents.wake(a, flags.clone()).is_none());
        assert!(residents.forget(&a) && residents.forget(&b));
        assert_eq!(residents.counts("alice"), Counts::default());
        assert_eq!(residents.counts("bob"), Counts::default());
    }

    #[test]
    fn a_place_held_counts_until_given_up_and_limits_host_and_owner() {
        let residents = Residents::default();
        let a = residents.reserve("alice", 3, 2);
        let b = residents.reserve("alice", 3, 2);
        assert!(a.is_ok() && b.is_ok());
        assert_eq!(residents.reserve("alice", 3, 2).err(), Some(Full::Owner(2)));
        let c = residents.reserve("bob", 3, 2);
        assert!(c.is_ok());
        assert_eq!(residents.reserve("bob", 3, 2).err(), Some(Full::Host(3)));
        assert_eq!(residents.running(), 3);
        drop((a, b, c));
        assert_eq!(residents.running(), 0);
        assert_eq!(residents.counts("alice"), Counts::default());
        assert_eq!(residents.counts("carol"), Counts::default());
    }

    #[tokio::test]
    async fn a_killed_agent_is_neither_parked_nor_parked_again() {
        let residents = Residents::default();
        let id = AgentId::random();
        let flags = Arc::<AgentFlags>::default();
        residents.enroll(id, "alice", flags.clone());
        assert!(matches!(residents.kill(&id), Found::Running));
        assert!(!residents.park(id, &flags, "alice", alarm));
        assert_eq!(
            residents.counts("alice").running,
            1,
            "still running until it ends"
        );
        assert!(residents.forget(&id));
        assert_eq!(residents.counts("alice"), Counts::default());
        residents.set_alarm(id, "bob", alarm);
        assert!(matches!(residents.kill(&id), Found::Parked(_)));
        assert!(matches!(residents.kill(&id), Found::Absent));
        assert_eq!(residents.counts("bob"), Counts::default());
    }
}
