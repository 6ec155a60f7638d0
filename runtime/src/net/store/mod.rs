//! A host's durable store: redb for records and small images, content-addressed files for
//! modules and large images.
//!
//! - `schema`: the tables, their keys and how rows are encoded;
//! - `agents`, `transfers`, `calls`, `reports`, `home`, `mail`: the records, each with its row type,
//!   its writes and its reads;
//! - `blobs`: modules and images, as files or inline in the database;
//! - `batch`: the group commit every write goes through.
//!
//! Writes are `async`: each is queued for the next group commit (`batch`), so that the
//! writes of many agents hopping at once share one transaction and one disk sync, and the
//! caller waits as a task. A write returns once it is durable, except for the few a crash may
//! lose because the restart repairs them ([`HostStore::forward`],
//! [`HostStore::remove_report`]): those do not wait for the disk, and
//! [`HostStore::sync_lazy`] bounds how long they stay unsynced. Reads are plain calls: a redb
//! read transaction never waits for a writer.

mod agents;
mod batch;
mod blobs;
mod calls;
mod error;
mod home;
mod mail;
mod reports;
mod schema;
mod transfers;

pub use agents::{AgentRecord, Resume};
pub use batch::BatchError;
pub(crate) use batch::blocking;
use batch::{Batcher, Durable};
pub(crate) use blobs::INLINE_IMAGE;
pub use blobs::Staged;
pub use calls::CallEntry;
pub use error::StoreError;
pub use home::{HomeRow, HomeWrite, StoredHome};
pub use mail::mail_size;
pub use reports::{PendingReport, ReportKey};

use crate::modules::TEMPORARY;
use redb::{Database, WriteTransaction};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

/// How often a host makes the commits that did not wait for the disk durable.
pub const LAZY_SYNC: std::time::Duration = std::time::Duration::from_secs(1);

/// The durable state of one host.
pub struct HostStore {
    db: Database,
    dir: PathBuf,
    /// The group commit; its jobs are given the store's directory.
    batch: Batcher<Path>,
    /// The key of the next row of the home's hop log.
    next_hop: Arc<AtomicU64>,
}

impl HostStore {
    /// How long the store's durable commits took, for the host's metrics.
    pub(crate) fn commit_durations(&self) -> prometheus_client::metrics::histogram::Histogram {
        self.batch.durations()
    }

    /// Opens (or creates) the store under `dir`.
    ///
    /// # Errors
    /// When the directory or database cannot be opened.
    pub fn open(dir: &Path) -> Result<HostStore, StoreError> {
        for sub in ["images", "modules"] {
            let path = dir.join(sub);
            if let Err(source) = std::fs::create_dir_all(&path) {
                return Err(StoreError::Io { path, source });
            }
            // Files a crash left half written or staged: no record names them.
            for entry in std::fs::read_dir(&path).into_iter().flatten().flatten() {
                if entry.file_name().to_string_lossy().starts_with(TEMPORARY) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        let (db, next_hop) = schema::open(dir)?;
        Ok(HostStore {
            db,
            dir: dir.to_path_buf(),
            batch: Batcher::default(),
            next_hop: Arc::new(AtomicU64::new(next_hop)),
        })
    }

    /// Makes commits that did not wait for the disk durable, if there are any: the host calls
    /// it every [`LAZY_SYNC`], so a crash loses at most that much of them even when no other
    /// write comes to cover them.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn sync_lazy(&self) -> Result<(), StoreError> {
        if self.batch.take_lazy() {
            self.sync().await?;
        }
        Ok(())
    }

    /// Applies `work` in the next batch of writes and returns once its commit is durable.
    /// `work` is given the store's directory, and may run again if another write of its
    /// batch failed (see [`Batcher::write`]).
    async fn write<T: Send + 'static>(
        &self,
        work: impl FnMut(&Path, &WriteTransaction) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        (self.batch)
            .write(&self.dir, &self.db, Durable::Now, work)
            .await
    }

    /// Like [`HostStore::write`], but returns once committed, without waiting for the disk:
    /// the next durable commit, whoever makes it, covers it, and a crash before then loses
    /// it. For records a restart rebuilds, or that are safe to repeat.
    async fn write_lazily<T: Send + 'static>(
        &self,
        work: impl FnMut(&Path, &WriteTransaction) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        (self.batch)
            .write(&self.dir, &self.db, Durable::Later, work)
            .await
    }

    /// Makes every commit made so far durable: an empty durable write, which joins the next
    /// batch like any other.
    async fn sync(&self) -> Result<(), StoreError> {
        self.write(|_, _| Ok(())).await
    }
}

#[cfg(test)]
mod tests;
