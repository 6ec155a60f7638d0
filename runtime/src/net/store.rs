//! A host's durable store: redb for records and small images, content-addressed files for
//! modules and large images.
//!
//! Files are written to a temporary name, fsynced and renamed before the record that names
//! them is committed, so a record never points at a missing or torn file. A small image is
//! committed in the same transaction as the record that names it.
//!
//! Writes are grouped ([`super::batch`]): the writes of many agents hopping at once are
//! applied in one transaction with one commit and one disk sync, instead of queueing for a
//! transaction each. A caller returns only once its write is durable, except for the few
//! writes a crash may lose because the restart repairs them ([`HostStore::forward`],
//! [`HostStore::remove_report`]): those do not wait for the disk, and
//! [`HostStore::sync_lazy`] bounds how long they stay unsynced. The commit of an
//! arriving agent and the abort of an in-doubt transfer are decided in one redb transaction
//! each, so a transfer is either committed or aborted, never both.
//!
//! The call journal records each service call an agent made here, with its answer: an agent
//! that re-runs from its last stored image after a crash gets the recorded answers, so each
//! call takes effect once. Its rows are also the site's record of visits.

use super::batch::{Batcher, Durable};
use super::messages::{HopInfo, LaunchEvent, StatusReply, TransferStatus};
use crate::context::AgentId;
use crate::image::AgentImage;
use crate::modules::{ModuleHash, TEMPORARY, publish, write_durably, write_synced};
use agent_abi::{CallError, HopError};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

const TRANSFERS: TableDefinition<&[u8], u8> = TableDefinition::new("transfers");
const AGENTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("agents");
const HOME: TableDefinition<&[u8], &[u8]> = TableDefinition::new("home");
/// The hops of agents launched here, in the order written: n → (agent, hop). Apart from their
/// status, so that a hop costs the home one row, not a rewrite of all the hops before it; in
/// the order written, so that the hops a batch stores share a page or two (keyed by agent,
/// each went to its agent's own page). Read only when the host starts.
const HOME_HOP_LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("home_hop_log");
/// The same, keyed (agent, seq), as the release before wrote them: read, no longer written.
const HOME_HOPS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("home_hops");
const CALLS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("calls");
const OUTBOX: TableDefinition<&[u8], &[u8]> = TableDefinition::new("outbox");
const IMAGES: TableDefinition<&str, &[u8]> = TableDefinition::new("images");

/// Images up to this size live in the database; larger ones are files.
pub(crate) const INLINE_IMAGE: usize = 1 << 20;

/// Images at least this large are named by the digest their header claims; smaller ones by
/// hashing their bytes, which is quicker than reading the header.
const NAMED_BY_CLAIM: usize = 64 << 10;

/// Bytes of the database file redb may keep cached in memory.
const STORE_CACHE: usize = 16 << 20;

const COMMITTED: u8 = 1;
const ABORTED: u8 = 2;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("database: {0}")]
    Db(String),
    /// A file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The transfer was aborted earlier (a query answered "aborted").
    #[error("the transfer was aborted")]
    Aborted,
}

fn db_err<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Db(e.to_string())
}

/// Where an agent this host knows of is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentRecord {
    /// It lives here; `image` is its last stored safe point.
    Resident {
        /// Hop sequence number.
        seq: u64,
        /// Image file name.
        image: String,
        /// How to go on from the image after a restart.
        resume: Resume,
    },
    /// It is leaving for `to` at hop `seq`: whether it left is the destination's to say.
    /// `image` is the departure image, to resume from if the transfer was aborted.
    Departing {
        /// Hop sequence number of the hop under way.
        seq: u64,
        /// Destination site.
        to: String,
        /// Image file name.
        image: String,
    },
    /// It left for `to` at hop `seq`: a forwarding pointer.
    Forwarded {
        /// Hop sequence number of the hop that moved it away.
        seq: u64,
        /// Where it went.
        to: String,
    },
}

impl AgentRecord {
    /// The image file the record names, if any.
    pub fn image(&self) -> Option<&str> {
        match self {
            AgentRecord::Resident { image, .. } | AgentRecord::Departing { image, .. } => {
                Some(image)
            }
            AgentRecord::Forwarded { .. } => None,
        }
    }
}

/// How a resident agent goes on from its stored image when its host starts again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Resume {
    /// Poll it: it was just launched (no operation pending).
    Poll,
    /// Handle its pending operation: a shutdown parked it at a safe point.
    Handle,
    /// Its hop here succeeded: it arrived with this image.
    Arrived,
    /// Its hop away failed with this error: it stays here.
    HopFailed(HopError),
    /// It sleeps until `until_ms` (milliseconds since the Unix epoch); its sleep is already
    /// completed in the image, so at that time it is polled. Its home and hop count are here
    /// so that a kill can report its end without reading the image.
    Wake {
        /// When it is due.
        until_ms: u64,
        /// Its home host.
        home: String,
        /// Hops it made so far.
        hops: u64,
        /// Its owner, counted against the owner's quota of parked agents (empty in records
        /// from before it was stored).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        owner: String,
    },
}

/// One service call in the journal: a visit of an agent to this site.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallEntry {
    /// The agent's hop sequence number when it called.
    pub seq: u64,
    /// The service.
    pub service: String,
    /// BLAKE3 of the request, to notice an agent that does not replay the same calls.
    #[serde(with = "serde_bytes")]
    pub request: [u8; 32],
    /// The answer; dropped once the agent left or ended (it can no longer replay).
    pub answer: Option<Result<serde_bytes::ByteBuf, CallError>>,
}

/// An event on its way to an agent's home host, kept until the home acknowledged it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingReport {
    /// The home host.
    pub home: String,
    /// The agent.
    pub agent: AgentId,
    /// What happened.
    pub event: LaunchEvent,
}

/// The key of a pending report: the hash of its contents, so keeping it twice keeps one.
pub type ReportKey = [u8; 32];

/// How often a host makes the commits that did not wait for the disk durable.
pub const LAZY_SYNC: std::time::Duration = std::time::Duration::from_secs(1);

/// The durable state of one host.
pub struct HostStore {
    db: Database,
    dir: PathBuf,
    /// The group commit; its jobs are given the store's directory.
    batch: Batcher<Path>,
    /// The key of the next row of [`HOME_HOP_LOG`].
    next_hop: Arc<AtomicU64>,
}

/// Runs blocking store work without stalling the async runtime: on a multi-threaded tokio
/// runtime the worker hands its other tasks on while this one waits for the disk.
pub(crate) fn blocking<T>(work: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

fn transfer_key(agent: &AgentId, seq: u64) -> [u8; 24] {
    let mut key = [0u8; 24];
    key[..16].copy_from_slice(&agent.0);
    key[16..].copy_from_slice(&seq.to_be_bytes());
    key
}

fn call_key(agent: &AgentId, index: u64) -> [u8; 24] {
    transfer_key(agent, index)
}

fn cbor<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    // Encoding into a Vec cannot fail for these plain data types.
    let _ = ciborium::into_writer(value, &mut out);
    out
}

fn uncbor<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    ciborium::de::from_reader_with_recursion_limit(bytes, 32).map_err(db_err)
}

impl HostStore {
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
        // The records are small and read rarely; redb's default cache (1 GiB) would only make
        // a host's memory grow with the number of agents that ever passed through it.
        let db = Database::builder()
            .set_cache_size(STORE_CACHE)
            .create(dir.join("host.redb"))
            .map_err(db_err)?;
        let txn = db.begin_write().map_err(db_err)?;
        txn.open_table(TRANSFERS).map_err(db_err)?;
        txn.open_table(AGENTS).map_err(db_err)?;
        txn.open_table(HOME).map_err(db_err)?;
        txn.open_table(HOME_HOPS).map_err(db_err)?;
        let next_hop = match txn.open_table(HOME_HOP_LOG).map_err(db_err)?.last() {
            Ok(Some((n, _))) => n.value().saturating_add(1),
            Ok(None) => 0,
            Err(e) => return Err(db_err(e)),
        };
        txn.open_table(CALLS).map_err(db_err)?;
        txn.open_table(OUTBOX).map_err(db_err)?;
        txn.open_table(IMAGES).map_err(db_err)?;
        txn.commit().map_err(db_err)?;
        Ok(HostStore {
            db,
            dir: dir.to_path_buf(),
            batch: Batcher::default(),
            next_hop: Arc::new(AtomicU64::new(next_hop)),
        })
    }

    /// Applies `work` in the next batch of writes and returns once its commit is durable.
    /// `work` is given the store's directory, and may run again if another write of its
    /// batch failed (see [`Batcher::write`]).
    fn write<T: Send + 'static>(
        &self,
        work: impl FnMut(&Path, &WriteTransaction) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        blocking(|| (self.batch).write(&self.dir, &self.db, Durable::Now, work))
    }

    /// Like [`HostStore::write`], but returns once committed, without waiting for the disk:
    /// the next durable commit, whoever makes it, covers it, and a crash before then loses
    /// it. For records a restart rebuilds, or that are safe to repeat.
    fn write_lazily<T: Send + 'static>(
        &self,
        work: impl FnMut(&Path, &WriteTransaction) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        blocking(|| (self.batch).write(&self.dir, &self.db, Durable::Later, work))
    }

    /// Applies `work` as [`HostStore::write`] does, waiting as a task (see
    /// [`Batcher::write_async`]).
    async fn write_async<T: Send + 'static>(
        &self,
        work: impl FnMut(&Path, &WriteTransaction) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        (self.batch)
            .write_async(&self.dir, &self.db, Durable::Now, work)
            .await
    }

    /// Applies `work` as [`HostStore::write_lazily`] does, waiting as a task.
    async fn write_lazily_async<T: Send + 'static>(
        &self,
        work: impl FnMut(&Path, &WriteTransaction) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        (self.batch)
            .write_async(&self.dir, &self.db, Durable::Later, work)
            .await
    }

    /// Makes commits that did not wait for the disk durable, if there are any: the host calls
    /// it every [`LAZY_SYNC`], so a crash loses at most that much of them even when no other
    /// write comes to cover them.
    ///
    /// # Errors
    /// When the database fails.
    pub fn sync_lazy(&self) -> Result<(), StoreError> {
        if self.batch.take_lazy() {
            self.sync()?;
        }
        Ok(())
    }

    /// Makes every commit made so far durable: an empty durable write, which joins the next
    /// batch like any other.
    fn sync(&self) -> Result<(), StoreError> {
        self.write(|_, _| Ok(()))
    }

    /// [`HostStore::sync`], waiting as a task.
    async fn sync_async(&self) -> Result<(), StoreError> {
        self.write_async(|_, _| Ok(())).await
    }

    fn module_path(&self, hash: &ModuleHash) -> PathBuf {
        self.dir.join("modules").join(format!("{hash}.wasm"))
    }

    /// Keeps a module's bytes (named by their hash).
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn put_module(&self, hash: &ModuleHash, bytes: &[u8]) -> Result<(), StoreError> {
        let path = self.module_path(hash);
        if path.exists() {
            return Ok(());
        }
        write_durably(&path, bytes).map_err(|source| StoreError::Io { path, source })
    }

    /// Whether a module's bytes are kept here.
    pub fn has_module(&self, hash: &ModuleHash) -> bool {
        self.module_path(hash).exists()
    }

    /// A module's bytes, if kept here.
    pub fn module(&self, hash: &ModuleHash) -> Option<Vec<u8>> {
        std::fs::read(self.module_path(hash)).ok()
    }

    /// Makes an image ready to be named by a record: a large image is written to a file and
    /// synced now, outside any transaction, so that other writers need not wait for it and
    /// an arriving image can be written while it is checked. A small one goes in the
    /// transaction that names it. `image` is its bytes in parts read one after the other (as
    /// [`crate::image::Encoded::parts`]), the header whole in the first.
    ///
    /// # Errors
    /// When the file cannot be written.
    pub fn stage_image(&self, image: &[&[u8]]) -> Result<Staged, StoreError> {
        // An image that stands alone is named by the digest its header claims: a staged
        // arrival is published only once decoding has checked that digest. A small one is
        // hashed instead: that costs less than decoding its header (context and trace
        // included), and every hop stores two.
        let claimed = (total(image) >= NAMED_BY_CLAIM)
            .then(|| {
                image
                    .first()
                    .and_then(|head| AgentImage::claimed_digest(head))
            })
            .flatten();
        let hash = claimed.unwrap_or_else(|| {
            let mut hasher = blake3::Hasher::new();
            for part in image {
                hasher.update(part);
            }
            *hasher.finalize().as_bytes()
        });
        let name = format!("{}.img", blake3::Hash::from(hash).to_hex());
        let file = match total(image) <= INLINE_IMAGE {
            true => None,
            false => {
                let dir = self.dir.join("images");
                Some(
                    write_synced(&dir, image)
                        .map_err(|source| StoreError::Io { path: dir, source })?,
                )
            }
        };
        Ok(Staged { name, file })
    }

    /// Gives a staged image its name: a file is renamed (durably) before the record naming it
    /// commits, so a record never names a missing file.
    /// On failure the staged file goes with `staged`.
    fn publish(&self, mut staged: Staged) -> Result<String, StoreError> {
        if let Some(tmp) = &staged.file {
            let path = self.dir.join("images").join(&staged.name);
            publish(tmp, &path).map_err(|source| StoreError::Io { path, source })?;
            staged.file = None;
        }
        Ok(std::mem::take(&mut staged.name))
    }

    /// Reads an image.
    ///
    /// # Errors
    /// When it is neither in the database nor a readable file.
    pub fn image(&self, name: &str) -> Result<Vec<u8>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(IMAGES).map_err(db_err)?;
        if let Some(bytes) = table.get(name).map_err(db_err)? {
            return Ok(bytes.value().to_vec());
        }
        let path = self.dir.join("images").join(name);
        std::fs::read(&path).map_err(|source| StoreError::Io { path, source })
    }

    /// What this host decided about the transfer (agent, seq), if anything.
    ///
    /// # Errors
    /// When the database fails.
    pub fn transfer(
        &self,
        agent: &AgentId,
        seq: u64,
    ) -> Result<Option<TransferStatus>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(TRANSFERS).map_err(db_err)?;
        let value = table
            .get(transfer_key(agent, seq).as_slice())
            .map_err(db_err)?
            .map(|v| v.value());
        Ok(value.map(|v| {
            if v == COMMITTED {
                TransferStatus::Committed
            } else {
                TransferStatus::Aborted
            }
        }))
    }

    /// The commit point of a hop: records that this host owns the agent, with its image.
    ///
    /// # Errors
    /// [`StoreError::Aborted`] if a query aborted this transfer first.
    pub fn commit_arrival(
        &self,
        agent: &AgentId,
        seq: u64,
        image: &[u8],
        staged: Option<Staged>,
    ) -> Result<(), StoreError> {
        unlink(self.write(self.arrival(agent, seq, image, staged)?)?);
        Ok(())
    }

    /// [`HostStore::commit_arrival`], waiting as a task.
    ///
    /// # Errors
    /// As [`HostStore::commit_arrival`].
    pub async fn commit_arrival_async(
        &self,
        agent: &AgentId,
        seq: u64,
        image: &[u8],
        staged: Option<Staged>,
    ) -> Result<(), StoreError> {
        // A file image is written, or renamed with its directory synced, off the workers.
        let arrival = match image.len() > INLINE_IMAGE {
            true => blocking(|| self.arrival(agent, seq, image, staged))?,
            false => self.arrival(agent, seq, image, staged)?,
        };
        unlink_off_workers(self.write_async(arrival).await?);
        Ok(())
    }

    /// The write of an arrival, its image (staged unless `staged` holds it) published.
    fn arrival(
        &self,
        agent: &AgentId,
        seq: u64,
        image: &[u8],
        staged: Option<Staged>,
    ) -> Result<
        impl FnMut(&Path, &WriteTransaction) -> Result<Stale, StoreError> + Send + use<>,
        StoreError,
    > {
        let staged = match staged {
            Some(staged) => staged,
            None => self.stage_image(&[image])?,
        };
        let name = self.publish(staged)?;
        let (agent, inline) = (*agent, inline(&[image]));
        let record = AgentRecord::Resident {
            seq,
            image: name.clone(),
            resume: Resume::Arrived,
        };
        Ok(move |dir: &Path, txn: &WriteTransaction| {
            put_inline(txn, &name, inline.as_deref())?;
            let mut transfers = txn.open_table(TRANSFERS).map_err(db_err)?;
            let key = transfer_key(&agent, seq);
            let previous = transfers
                .get(key.as_slice())
                .map_err(db_err)?
                .map(|v| v.value());
            match previous {
                Some(ABORTED) => return Err(StoreError::Aborted),
                Some(_) => {} // a repeated commit of the same transfer
                None => {
                    transfers
                        .insert(key.as_slice(), COMMITTED)
                        .map_err(db_err)?;
                }
            }
            drop(transfers);
            set_agent_in(dir, txn, &agent, &record)
        })
    }

    /// Answers a query about (agent, seq): committed, or aborted from now on.
    ///
    /// # Errors
    /// When the database fails.
    pub fn resolve_transfer(
        &self,
        agent: &AgentId,
        seq: u64,
    ) -> Result<TransferStatus, StoreError> {
        let key = transfer_key(agent, seq);
        self.write(move |_, txn| {
            let mut transfers = txn.open_table(TRANSFERS).map_err(db_err)?;
            let previous = transfers
                .get(key.as_slice())
                .map_err(db_err)?
                .map(|v| v.value());
            match previous {
                Some(COMMITTED) => Ok(TransferStatus::Committed),
                _ => {
                    transfers.insert(key.as_slice(), ABORTED).map_err(db_err)?;
                    Ok(TransferStatus::Aborted)
                }
            }
        })
    }

    /// Sets an agent's record.
    ///
    /// # Errors
    /// When the database fails.
    pub fn set_agent(&self, agent: &AgentId, record: &AgentRecord) -> Result<(), StoreError> {
        let (agent, record) = (*agent, record.clone());
        unlink(self.write(move |dir, txn| set_agent_in(dir, txn, &agent, &record))?);
        Ok(())
    }

    /// Records that an agent left for good (its destination's commit is durable) with
    /// `record`, and keeps `report` for its home, in one transaction that does not wait for
    /// the disk. A crash before the next sync loses both: the departure record is back, and
    /// the restart asks the destination and reports again (a home keeps one report of a hop).
    ///
    /// # Errors
    /// When the database fails.
    pub fn forward(
        &self,
        agent: &AgentId,
        record: &AgentRecord,
        report: Option<&PendingReport>,
    ) -> Result<(), StoreError> {
        let stale = self.write_lazily(forwarding(agent, record, report))?;
        if stale.is_some() {
            // The departure record names that file until the commit is durable.
            self.sync()?;
        }
        unlink(stale);
        Ok(())
    }

    /// [`HostStore::forward`], waiting as a task.
    ///
    /// # Errors
    /// As [`HostStore::forward`].
    pub async fn forward_async(
        &self,
        agent: &AgentId,
        record: &AgentRecord,
        report: Option<&PendingReport>,
    ) -> Result<(), StoreError> {
        let stale = (self.write_lazily_async(forwarding(agent, record, report))).await?;
        if stale.is_some() {
            self.sync_async().await?;
        }
        unlink_off_workers(stale);
        Ok(())
    }

    /// [`HostStore::forward_async`] for an agent launched here, with no report: its home
    /// record, as `latest` yields it ([`HostStore::put_home_latest`]), goes in the same write,
    /// which waits for the disk as a home record's does. Yields the tag that came with it.
    ///
    /// # Errors
    /// When the database fails: neither is stored.
    pub async fn forward_home_async<T: Send + 'static>(
        &self,
        agent: &AgentId,
        record: &AgentRecord,
        latest: impl Fn() -> Option<(HomeWrite, T)> + Send + 'static,
    ) -> Result<Option<T>, StoreError> {
        let (mut forward, mut home) = (
            forwarding(agent, record, None),
            home_latest(latest, self.next_hop.clone()),
        );
        let both =
            move |dir: &Path, txn: &WriteTransaction| Ok((forward(dir, txn)?, home(dir, txn)?));
        let (stale, tag) = self.write_async(both).await?;
        unlink_off_workers(stale);
        Ok(tag)
    }

    /// Stores `image` (its bytes in parts, as [`HostStore::stage_image`] takes them) durably,
    /// then the record `make` builds around its file name; returns that name.
    ///
    /// # Errors
    /// When the file or the database fails.
    pub fn keep_agent(
        &self,
        agent: &AgentId,
        image: &[&[u8]],
        make: impl FnOnce(String) -> AgentRecord,
    ) -> Result<String, StoreError> {
        let (name, inline) = self.stage_kept(image)?;
        let record = make(name.clone());
        unlink(self.write(keeping(*agent, name.clone(), inline, record))?);
        Ok(name)
    }

    /// [`HostStore::keep_agent`], waiting as a task. An image too large to be kept in the
    /// database is written to its file off the async workers.
    ///
    /// # Errors
    /// As [`HostStore::keep_agent`].
    pub async fn keep_agent_async(
        &self,
        agent: &AgentId,
        image: &[&[u8]],
        make: impl FnOnce(String) -> AgentRecord,
    ) -> Result<String, StoreError> {
        let (name, inline) = match total(image) > INLINE_IMAGE {
            true => blocking(|| self.stage_kept(image))?,
            false => self.stage_kept(image)?,
        };
        let record = make(name.clone());
        unlink_off_workers(
            self.write_async(keeping(*agent, name.clone(), inline, record))
                .await?,
        );
        Ok(name)
    }

    /// Stages and publishes a kept agent's image: its name, and its bytes when the database
    /// keeps them.
    fn stage_kept(&self, image: &[&[u8]]) -> Result<(String, Option<Vec<u8>>), StoreError> {
        Ok((self.publish(self.stage_image(image)?)?, inline(image)))
    }

    /// Forgets an agent that ended here.
    ///
    /// # Errors
    /// When the database fails.
    pub fn remove_agent(&self, agent: &AgentId) -> Result<(), StoreError> {
        unlink(self.write(removing(*agent))?);
        Ok(())
    }

    /// [`HostStore::remove_agent`], waiting as a task.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn remove_agent_async(&self, agent: &AgentId) -> Result<(), StoreError> {
        unlink_off_workers(self.write_async(removing(*agent)).await?);
        Ok(())
    }

    /// An agent's record.
    ///
    /// # Errors
    /// When the database fails or the record does not decode.
    pub fn agent(&self, agent: &AgentId) -> Result<Option<AgentRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(AGENTS).map_err(db_err)?;
        let value = table.get(agent.0.as_slice()).map_err(db_err)?;
        value.map(|v| uncbor(v.value())).transpose()
    }

    /// Every agent that lives here or is leaving (to resume after a restart).
    ///
    /// # Errors
    /// When the database fails.
    pub fn residents(&self) -> Result<Vec<(AgentId, AgentRecord)>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(AGENTS).map_err(db_err)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(db_err)? {
            let (k, v) = entry.map_err(db_err)?;
            let Ok(id) = <[u8; 16]>::try_from(k.value()) else {
                continue;
            };
            let record: AgentRecord = uncbor(v.value())?;
            if !matches!(record, AgentRecord::Forwarded { .. }) {
                out.push((AgentId(id), record));
            }
        }
        Ok(out)
    }

    /// The journal's entry for call `index` of `agent`, if it made that call here.
    ///
    /// # Errors
    /// When the database fails or the entry does not decode.
    pub fn call(&self, agent: &AgentId, index: u64) -> Result<Option<CallEntry>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(CALLS).map_err(db_err)?;
        let value = table
            .get(call_key(agent, index).as_slice())
            .map_err(db_err)?;
        value.map(|v| uncbor(v.value())).transpose()
    }

    /// Records call `index` of `agent` with its answer, before the agent sees the answer.
    ///
    /// # Errors
    /// When the database fails.
    pub fn put_call(
        &self,
        agent: &AgentId,
        index: u64,
        entry: &CallEntry,
    ) -> Result<(), StoreError> {
        let (key, entry) = (call_key(agent, index), cbor(entry));
        self.write(move |_, txn| {
            txn.open_table(CALLS)
                .map_err(db_err)?
                .insert(key.as_slice(), entry.as_slice())
                .map_err(db_err)?;
            Ok(())
        })
    }

    /// Every call agents made here, in (agent, call index) order: the site's visits.
    ///
    /// # Errors
    /// When the database fails or an entry does not decode.
    pub fn visits(&self) -> Result<Vec<(AgentId, u64, CallEntry)>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(CALLS).map_err(db_err)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(db_err)? {
            let (k, v) = entry.map_err(db_err)?;
            let key = k.value();
            let (Ok(id), Ok(index)) = (
                <[u8; 16]>::try_from(&key[..16.min(key.len())]),
                <[u8; 8]>::try_from(&key[16.min(key.len())..]),
            ) else {
                continue;
            };
            out.push((AgentId(id), u64::from_be_bytes(index), uncbor(v.value())?));
        }
        Ok(out)
    }

    /// Keeps a report until [`HostStore::remove_report`]; returns its key.
    ///
    /// # Errors
    /// When the database fails.
    pub fn put_report(&self, report: &PendingReport) -> Result<ReportKey, StoreError> {
        self.write(reporting(report))
    }

    /// [`HostStore::put_report`], waiting as a task.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn put_report_async(&self, report: &PendingReport) -> Result<ReportKey, StoreError> {
        self.write_async(reporting(report)).await
    }

    /// Forgets a report the home acknowledged, without waiting for the disk: a crash before
    /// the next sync only makes it sent again, and the home keeps one of each.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn remove_report(&self, key: &ReportKey) -> Result<(), StoreError> {
        let key = *key;
        self.write_lazily_async(move |_, txn| {
            txn.open_table(OUTBOX)
                .map_err(db_err)?
                .remove(key.as_slice())
                .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    /// Reports not yet acknowledged by their home hosts.
    ///
    /// # Errors
    /// When the database fails or a report does not decode.
    pub fn reports(&self) -> Result<Vec<(ReportKey, PendingReport)>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let table = txn.open_table(OUTBOX).map_err(db_err)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(db_err)? {
            let (k, v) = entry.map_err(db_err)?;
            let Ok(key) = ReportKey::try_from(k.value()) else {
                continue;
            };
            out.push((key, uncbor(v.value())?));
        }
        Ok(out)
    }

    /// Saves the home record of an agent launched here.
    ///
    /// # Errors
    /// When the database fails.
    pub fn put_home(&self, status: &StatusReply) -> Result<(), StoreError> {
        self.write(homing(status))
    }

    /// [`HostStore::put_home`], waiting as a task.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn put_home_async(&self, status: &StatusReply) -> Result<(), StoreError> {
        self.write_async(homing(status)).await
    }

    /// Saves the home record `latest` yields inside the write transaction (nothing if it
    /// yields none), and returns the tag that came with it. `latest` may be called more than
    /// once (see [`HostStore::write`]); the last call's record is stored.
    ///
    /// # Errors
    /// When the database fails.
    pub fn put_home_latest<T: Send + 'static>(
        &self,
        latest: impl Fn() -> Option<(HomeWrite, T)> + Send + 'static,
    ) -> Result<Option<T>, StoreError> {
        self.write(home_latest(latest, self.next_hop.clone()))
    }

    /// [`HostStore::put_home_latest`], waiting as a task.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn put_home_latest_async<T: Send + 'static>(
        &self,
        latest: impl Fn() -> Option<(HomeWrite, T)> + Send + 'static,
    ) -> Result<Option<T>, StoreError> {
        self.write_async(home_latest(latest, self.next_hop.clone()))
            .await
    }

    /// Home records of agents launched here, with the hops stored apart from them.
    ///
    /// # Errors
    /// When the database fails.
    pub fn homes(&self) -> Result<Vec<StoredHome>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let mut logged: HashMap<AgentId, Vec<HopInfo>> = HashMap::new();
        for entry in txn
            .open_table(HOME_HOP_LOG)
            .map_err(db_err)?
            .iter()
            .map_err(db_err)?
        {
            let (_, v) = entry.map_err(db_err)?;
            let (agent, hop): (AgentId, HopInfo) = uncbor(v.value())?;
            logged.entry(agent).or_default().push(hop);
        }
        let table = txn.open_table(HOME).map_err(db_err)?;
        let keyed = txn.open_table(HOME_HOPS).map_err(db_err)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(db_err)? {
            let (_, v) = entry.map_err(db_err)?;
            let mut row: HomeRow = uncbor(v.value())?;
            // Rows written before the hops were kept apart hold them themselves.
            let inline = row.status.hops.iter().map(|h| h.seq).collect();
            let agent = row.status.agent;
            let (first, last) = (transfer_key(&agent, 0), transfer_key(&agent, u64::MAX));
            for hop in (keyed.range(first.as_slice()..=last.as_slice())).map_err(db_err)? {
                let (_, v) = hop.map_err(db_err)?;
                row.status.hops.push(uncbor(v.value())?);
            }
            row.status
                .hops
                .extend(logged.remove(&agent).unwrap_or_default());
            row.status.hops.sort_by_key(|h| h.seq);
            row.status.hops.dedup_by_key(|h| h.seq);
            out.push(StoredHome { row, inline });
        }
        Ok(out)
    }
}

/// A home record as [`HostStore::homes`] reads it back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredHome {
    /// The record, with every hop stored of its agent.
    pub row: HomeRow,
    /// The hops (by seq) that only the record's row holds, as rows from before hops were
    /// stored apart do: to be stored apart with the agent's next write.
    pub inline: Vec<u64>,
}

/// A home's stored record of one agent launched there: its status, and an end that came
/// before the reports of all its hops and is held back until they do (kept here so that the
/// home can acknowledge it, and a restart still holds it). Stored as the status's own
/// fields plus `held_end`, so records from before `held_end` read as they are.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HomeRow {
    /// What `status` answers.
    #[serde(flatten)]
    pub status: StatusReply,
    /// The held end, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_end: Option<LaunchEvent>,
}

/// A write of a home record ([`HostStore::put_home_latest`]): the row, and hops to store apart
/// from it. Reading the record back ([`HostStore::homes`]) gives the row's hops and all those
/// stored apart, so the row need not hold the hops stored before.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HomeWrite {
    /// The row.
    pub row: HomeRow,
    /// Hops to store apart. One stored twice (two writes of the agent's status raced) is read
    /// back once.
    pub hops: Vec<HopInfo>,
}

/// An image written ahead of the record that will name it ([`HostStore::stage_image`]). A
/// large one is a synced file under a temporary name, removed if it is dropped unnamed.
#[derive(Debug)]
pub struct Staged {
    name: String,
    file: Option<PathBuf>,
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(tmp) = self.file.take() {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// The write of [`HostStore::forward`].
fn forwarding(
    agent: &AgentId,
    record: &AgentRecord,
    report: Option<&PendingReport>,
) -> impl FnMut(&Path, &WriteTransaction) -> Result<Stale, StoreError> + Send + use<> {
    let report = report.map(report_row);
    let (agent, record) = (*agent, record.clone());
    move |dir, txn| {
        if let Some((key, bytes)) = &report {
            txn.open_table(OUTBOX)
                .map_err(db_err)?
                .insert(key.as_slice(), bytes.as_slice())
                .map_err(db_err)?;
        }
        set_agent_in(dir, txn, &agent, &record)
    }
}

/// The write of [`HostStore::keep_agent`].
fn keeping(
    agent: AgentId,
    name: String,
    inline: Option<Vec<u8>>,
    record: AgentRecord,
) -> impl FnMut(&Path, &WriteTransaction) -> Result<Stale, StoreError> + Send + 'static {
    move |dir, txn| {
        put_inline(txn, &name, inline.as_deref())?;
        set_agent_in(dir, txn, &agent, &record)
    }
}

/// The write of [`HostStore::put_home_latest`].
fn home_latest<T>(
    latest: impl Fn() -> Option<(HomeWrite, T)> + Send + 'static,
    next_hop: Arc<AtomicU64>,
) -> impl FnMut(&Path, &WriteTransaction) -> Result<Option<T>, StoreError> + Send + 'static {
    move |_, txn| {
        let Some((HomeWrite { row, hops }, tag)) = latest() else {
            return Ok(None);
        };
        let agent = row.status.agent;
        txn.open_table(HOME)
            .map_err(db_err)?
            .insert(agent.0.as_slice(), cbor(&row).as_slice())
            .map_err(db_err)?;
        if !hops.is_empty() {
            let mut table = txn.open_table(HOME_HOP_LOG).map_err(db_err)?;
            for hop in &hops {
                // A key drawn by a transaction that is then dropped is never used: a gap.
                let n = next_hop.fetch_add(1, Ordering::Relaxed);
                table
                    .insert(n, cbor(&(agent, hop)).as_slice())
                    .map_err(db_err)?;
            }
        }
        Ok(Some(tag))
    }
}

/// An image file no durable record names once the transaction that dropped it is durable.
type Stale = Option<PathBuf>;

/// Length of an image given in parts.
fn total(image: &[&[u8]]) -> usize {
    image.iter().map(|part| part.len()).sum()
}

/// The write that forgets `agent`, which ended here: its record, its image and the answers
/// to its calls.
fn removing(
    agent: AgentId,
) -> impl FnMut(&Path, &WriteTransaction) -> Result<Stale, StoreError> + Send + 'static {
    move |dir, txn| {
        let old = txn
            .open_table(AGENTS)
            .map_err(db_err)?
            .remove(agent.0.as_slice())
            .map_err(db_err)?
            .map(|v| uncbor::<AgentRecord>(v.value()))
            .transpose()?;
        let stale = drop_old_image(dir, txn, old, None)?;
        forget_answers(txn, &agent)?;
        Ok(stale)
    }
}

/// The write that saves `status` as the home record of its agent, with no held end.
fn homing(
    status: &StatusReply,
) -> impl FnMut(&Path, &WriteTransaction) -> Result<(), StoreError> + Send + 'static {
    let row = HomeRow {
        status: status.clone(),
        held_end: None,
    };
    let (agent, row) = (status.agent, cbor(&row));
    move |_, txn| {
        txn.open_table(HOME)
            .map_err(db_err)?
            .insert(agent.0.as_slice(), row.as_slice())
            .map_err(db_err)?;
        Ok(())
    }
}

/// The write that keeps `report` in the outbox; yields its key.
fn reporting(
    report: &PendingReport,
) -> impl FnMut(&Path, &WriteTransaction) -> Result<ReportKey, StoreError> + Send + 'static {
    let (key, bytes) = report_row(report);
    move |_, txn| {
        txn.open_table(OUTBOX)
            .map_err(db_err)?
            .insert(key.as_slice(), bytes.as_slice())
            .map_err(db_err)?;
        Ok(key)
    }
}

/// Deletes a stale image file; failing only leaves a file behind.
fn unlink(stale: Stale) {
    if let Some(path) = stale {
        let _ = std::fs::remove_file(path);
    }
}

/// [`unlink`] for a caller on an async worker: freeing a large file's blocks takes a while.
fn unlink_off_workers(stale: Stale) {
    if stale.is_some() {
        blocking(|| unlink(stale));
    }
}

/// A report's row in the outbox: its key (the hash of its encoding) and its encoding.
fn report_row(report: &PendingReport) -> (ReportKey, Vec<u8>) {
    let bytes = cbor(report);
    (*blake3::hash(&bytes).as_bytes(), bytes)
}

/// The bytes of an image kept in the database (a small one), or `None` for a file.
fn inline(image: &[&[u8]]) -> Option<Vec<u8>> {
    (total(image) <= INLINE_IMAGE).then(|| image.concat())
}

/// Keeps a small image under `name` in `txn` (see [`inline`]).
fn put_inline(txn: &WriteTransaction, name: &str, inline: Option<&[u8]>) -> Result<(), StoreError> {
    if let Some(image) = inline {
        txn.open_table(IMAGES)
            .map_err(db_err)?
            .insert(name, image)
            .map_err(db_err)?;
    }
    Ok(())
}

/// Drops an image no record names any more: in `txn`, or, for a file under `dir`, returns
/// its path to unlink once `txn` is durable (a crash before then keeps the old record, which
/// still needs the file).
fn remove_image(dir: &Path, txn: &WriteTransaction, name: &str) -> Result<Stale, StoreError> {
    let inline = txn
        .open_table(IMAGES)
        .map_err(db_err)?
        .remove(name)
        .map_err(db_err)?
        .is_some();
    Ok((!inline).then(|| dir.join("images").join(name)))
}

/// Drops the image of the record `old` unless `new` names it too.
fn drop_old_image(
    dir: &Path,
    txn: &WriteTransaction,
    old: Option<AgentRecord>,
    new: Option<&AgentRecord>,
) -> Result<Stale, StoreError> {
    match old.as_ref().and_then(AgentRecord::image) {
        Some(old) if new.and_then(AgentRecord::image) != Some(old) => remove_image(dir, txn, old),
        _ => Ok(None),
    }
}

/// Sets an agent's record in `txn`; yields the image file it no longer needs.
fn set_agent_in(
    dir: &Path,
    txn: &WriteTransaction,
    agent: &AgentId,
    record: &AgentRecord,
) -> Result<Stale, StoreError> {
    let old = txn
        .open_table(AGENTS)
        .map_err(db_err)?
        .insert(agent.0.as_slice(), cbor(record).as_slice())
        .map_err(db_err)?
        .map(|v| uncbor::<AgentRecord>(v.value()))
        .transpose()?;
    let stale = drop_old_image(dir, txn, old, Some(record))?;
    if matches!(record, AgentRecord::Forwarded { .. }) {
        forget_answers(txn, agent)?;
    }
    Ok(stale)
}

/// Drops the answers recorded for `agent` (it left or ended), keeping its visits.
fn forget_answers(txn: &WriteTransaction, agent: &AgentId) -> Result<(), StoreError> {
    let (start, end) = (call_key(agent, 0), call_key(agent, u64::MAX));
    let mut table = txn.open_table(CALLS).map_err(db_err)?;
    let mut updates = Vec::new();
    for entry in table
        .range(start.as_slice()..=end.as_slice())
        .map_err(db_err)?
    {
        let (k, v) = entry.map_err(db_err)?;
        let mut call: CallEntry = uncbor(v.value())?;
        if call.answer.take().is_some() {
            updates.push((k.value().to_vec(), call));
        }
    }
    for (key, call) in updates {
        table
            .insert(key.as_slice(), cbor(&call).as_slice())
            .map_err(db_err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transfer_is_committed_or_aborted_never_both() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = HostStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let agent = AgentId([5; 16]);
        assert_eq!(store.transfer(&agent, 1).ok().flatten(), None);
        store
            .commit_arrival(&agent, 1, b"image one", None)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            store.resolve_transfer(&agent, 1).ok(),
            Some(TransferStatus::Committed)
        );
        store
            .commit_arrival(&agent, 1, b"image one", None)
            .unwrap_or_else(|e| panic!("repeated commit: {e}"));

        assert_eq!(
            store.resolve_transfer(&agent, 2).ok(),
            Some(TransferStatus::Aborted)
        );
        assert!(matches!(
            store.commit_arrival(&agent, 2, b"late image", None),
            Err(StoreError::Aborted)
        ));
        assert_eq!(
            store.transfer(&agent, 2).ok().flatten(),
            Some(TransferStatus::Aborted)
        );
    }

    fn home_status(n: u64) -> StatusReply {
        StatusReply {
            agent: AgentId([9; 16]),
            owner: "alice".into(),
            site: format!("site{n}"),
            state: "running".into(),
            hops: Vec::new(),
            result: None,
            error: None,
            sleeping: None,
        }
    }

    #[test]
    fn a_held_end_is_kept_with_the_home_status_and_old_records_read_without_one() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let end = LaunchEvent::Finished {
            site: "siteC".into(),
            hops: 2,
            outcome: Ok(vec![0xf5]),
        };
        let held = HomeRow {
            status: home_status(1),
            held_end: Some(end),
        };
        {
            let store = HostStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
            let row = HomeWrite {
                row: held.clone(),
                hops: Vec::new(),
            };
            store
                .put_home_latest(move || Some((row.clone(), ())))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let store = HostStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(rows(&store), [held]);

        // A record stored as a bare status, as hosts did before.
        let old = home_status(2);
        store
            .write(move |_, txn| {
                txn.open_table(HOME)
                    .map_err(db_err)?
                    .insert([9u8; 16].as_slice(), cbor(&old).as_slice())
                    .map_err(db_err)?;
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{e}"));
        let read = HomeRow {
            status: home_status(2),
            held_end: None,
        };
        assert_eq!(rows(&store), [read]);
    }

    /// The home records stored, without what [`HostStore::homes`] tells of their hops.
    fn rows(store: &HostStore) -> Vec<HomeRow> {
        let homes = store.homes().unwrap_or_else(|e| panic!("{e}"));
        homes.into_iter().map(|home| home.row).collect()
    }

    /// Rows of the hop log, counted.
    fn logged(store: &HostStore) -> usize {
        use redb::ReadableTableMetadata;
        let txn = store.db.begin_read().unwrap_or_else(|e| panic!("{e}"));
        let table = txn
            .open_table(HOME_HOP_LOG)
            .unwrap_or_else(|e| panic!("{e}"));
        table.len().unwrap_or_else(|e| panic!("{e}")) as usize
    }

    /// A record reads back with every hop of its agent: those its row holds (rows from before
    /// hops were stored apart), those keyed by agent (the release before), and those logged;
    /// only the first are to be stored apart again.
    #[test]
    fn a_home_record_reads_back_with_the_hops_stored_apart_from_it() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let hop = |seq: u64| HopInfo {
            seq,
            from: "siteA".into(),
            to: "siteB".into(),
            image_bytes: 4000 + seq,
            freeze_us: seq,
            ..HopInfo::default()
        };
        let mut old = home_status(1);
        old.hops = vec![hop(1)];
        let write = |status: StatusReply, hops: Vec<HopInfo>| {
            let write = HomeWrite {
                row: HomeRow {
                    status,
                    held_end: None,
                },
                hops,
            };
            move || Some((write.clone(), ()))
        };
        let agent = old.agent;
        {
            let store = HostStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
            (store.put_home_latest(write(old.clone(), Vec::new())))
                .unwrap_or_else(|e| panic!("{e}"));
            // Hop 2 as the release before stored it, keyed by agent.
            (store.write(move |_, txn| {
                let mut table = txn.open_table(HOME_HOPS).map_err(db_err)?;
                let key = transfer_key(&agent, 2);
                table
                    .insert(key.as_slice(), cbor(&hop(2)).as_slice())
                    .map_err(db_err)?;
                Ok(())
            }))
            .unwrap_or_else(|e| panic!("{e}"));
            let read = store.homes().unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(read.len(), 1);
            assert_eq!(
                read[0].inline,
                [1],
                "the row's own hop is to be stored apart"
            );
            let mut want = old.clone();
            want.hops = vec![hop(1), hop(2)];
            assert_eq!(read[0].row.status, want);
            for (status, hops) in [
                (home_status(2), vec![hop(1), hop(3)]),
                (home_status(3), vec![hop(4)]),
            ] {
                (store.put_home_latest(write(status, hops))).unwrap_or_else(|e| panic!("{e}"));
            }
        }
        let store = HostStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let mut want = home_status(3);
        want.hops = vec![hop(1), hop(2), hop(3), hop(4)];
        let read = store.homes().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read.len(), 1);
        assert_eq!(read[0].row.status, want);
        assert!(read[0].inline.is_empty(), "{:?}", read[0].inline);
        // The log goes on after the last key the store held.
        assert_eq!(logged(&store), 3);
        (store.put_home_latest(write(home_status(4), vec![hop(5)])))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(logged(&store), 4);
        assert_eq!(rows(&store)[0].status.hops.len(), 5);
    }

    #[test]
    fn home_writes_racing_each_other_leave_the_latest_status() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = HostStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        // The status in memory, changed by each writer before it stores whatever is latest.
        let latest = std::sync::Arc::new(std::sync::Mutex::new(0u64));
        let status = |n: u64| HomeRow {
            status: home_status(n),
            held_end: None,
        };
        let write = move |n: u64| HomeWrite {
            row: status(n),
            hops: Vec::new(),
        };
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..50 {
                        *latest.lock().unwrap_or_else(|e| panic!("{e}")) += 1;
                        let latest = latest.clone();
                        store
                            .put_home_latest(move || {
                                let n = *latest.lock().ok()?;
                                Some((write(n), n))
                            })
                            .unwrap_or_else(|e| panic!("{e}"));
                    }
                });
            }
        });
        assert_eq!(rows(&store), [status(200)]);
    }

    #[test]
    fn a_forward_keeps_its_report_and_removes_a_departure_file_only_once_durable() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let agent = AgentId([7; 16]);
        let large = vec![7u8; INLINE_IMAGE + 1];
        let report = PendingReport {
            home: "siteA".into(),
            agent,
            event: LaunchEvent::HopFailed {
                site: "siteB".into(),
                error: "test".into(),
            },
        };
        {
            let store = HostStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
            store
                .keep_agent(&agent, &[&large], |image| AgentRecord::Departing {
                    seq: 3,
                    to: "siteC".into(),
                    image,
                })
                .unwrap_or_else(|e| panic!("{e}"));
            let forwarded = AgentRecord::Forwarded {
                seq: 3,
                to: "siteC".into(),
            };
            store
                .forward(&agent, &forwarded, Some(&report))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        // Reopened (a clean close syncs, so this shows what was committed, not what a crash
        // keeps; the fault test `source-after-forward` crashes for real): the pointer and the
        // report are there, the departure's file is gone.
        let store = HostStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let images = std::fs::read_dir(dir.path().join("images")).map(Iterator::count);
        assert_eq!(images.ok(), Some(0));
        assert_eq!(
            store.agent(&agent).ok().flatten(),
            Some(AgentRecord::Forwarded {
                seq: 3,
                to: "siteC".into()
            })
        );
        let reports = store.reports().unwrap_or_default();
        assert_eq!(
            reports.iter().map(|(_, r)| r).collect::<Vec<_>>(),
            [&report]
        );
        // Acknowledged: gone at once; the next lazy sync makes it so on disk.
        let runtime = tokio::runtime::Builder::new_current_thread().build();
        let runtime = runtime.unwrap_or_else(|e| panic!("{e}"));
        (runtime.block_on(store.remove_report(&reports[0].0))).unwrap_or_else(|e| panic!("{e}"));
        assert!(store.reports().unwrap_or_default().is_empty());
        assert!(store.batch.lazy_pending());
        store.sync_lazy().unwrap_or_else(|e| panic!("{e}"));
        assert!(!store.batch.lazy_pending());
        drop(store);
        let store = HostStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        assert!(store.reports().unwrap_or_default().is_empty());
    }

    #[test]
    fn concurrent_writes_all_commit_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        {
            let store =
                std::sync::Arc::new(HostStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}")));
            let writers: Vec<_> = (0..8u8)
                .map(|w| {
                    let store = store.clone();
                    std::thread::spawn(move || {
                        for index in 0..25 {
                            let entry = CallEntry {
                                seq: 1,
                                service: "corpus".into(),
                                request: [w; 32],
                                answer: None,
                            };
                            store.put_call(&AgentId([w; 16]), index, &entry)?;
                        }
                        Ok::<(), StoreError>(())
                    })
                })
                .collect();
            for writer in writers {
                let written = writer.join().unwrap_or_else(|_| panic!("writer panicked"));
                assert!(written.is_ok(), "{written:?}");
            }
        }
        let store = HostStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(store.visits().unwrap_or_default().len(), 8 * 25);
    }

    #[test]
    fn records_and_images_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let agent = AgentId([6; 16]);
        {
            let store = HostStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
            store
                .commit_arrival(&agent, 4, b"the image", None)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let store = HostStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let residents = store.residents().unwrap_or_default();
        let Some((id, AgentRecord::Resident { seq, image, .. })) = residents.first().cloned()
        else {
            panic!("no resident after reopen: {residents:?}");
        };
        assert_eq!((id, seq), (agent, 4));
        assert_eq!(store.image(&image).ok().as_deref(), Some(&b"the image"[..]));
        store
            .set_agent(
                &agent,
                &AgentRecord::Forwarded {
                    seq: 5,
                    to: "b".into(),
                },
            )
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            store.image(&image).is_err(),
            "the image of an agent that left is deleted"
        );
        assert!(store.residents().unwrap_or_default().is_empty());
    }

    #[test]
    fn a_staged_image_is_a_file_only_once_committed_and_leftovers_go_at_open() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let images = dir.path().join("images");
        let files = || {
            let mut names: Vec<String> = std::fs::read_dir(&images)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        let big = vec![7u8; INLINE_IMAGE + 1];
        let agent = AgentId([8; 16]);
        {
            let store = HostStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
            let dropped = store.stage_image(&[&big]).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(files().len(), 1, "a large image is written when staged");
            drop(dropped);
            assert!(
                files().is_empty(),
                "an image dropped unnamed leaves no file"
            );

            let staged = store.stage_image(&[&big]).unwrap_or_else(|e| panic!("{e}"));
            store
                .commit_arrival(&agent, 1, &big, Some(staged))
                .unwrap_or_else(|e| panic!("{e}"));
            let image = match store.agent(&agent) {
                Ok(Some(AgentRecord::Resident { image, .. })) => image,
                other => panic!("not resident: {other:?}"),
            };
            assert_eq!(files(), vec![image.clone()]);
            assert_eq!(store.image(&image).ok(), Some(big.clone()));
            // What a crash between writing and naming a file leaves.
            let left = store.stage_image(&[&big]).unwrap_or_else(|e| panic!("{e}"));
            std::mem::forget(left);
            assert_eq!(files().len(), 2);
        }
        let store = HostStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let residents = store.residents().unwrap_or_default();
        assert_eq!(residents.len(), 1);
        let named = residents
            .first()
            .and_then(|(_, r)| r.image())
            .map(String::from);
        assert_eq!(
            files(),
            named.into_iter().collect::<Vec<_>>(),
            "the leftover is gone"
        );
    }

    #[test]
    fn an_image_file_is_named_by_the_digest_its_header_claims() {
        use crate::snapshot::{PAGE_SIZE, PageMap, PageRun};
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let store = HostStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let pages = (INLINE_IMAGE / PAGE_SIZE + 2) as u32;
        let image = AgentImage {
            module: ModuleHash([3; 32]),
            memory_bytes: u64::from(pages).next_multiple_of(16) * PAGE_SIZE as u64,
            globals: Vec::new(),
            pages: PageMap {
                runs: vec![PageRun {
                    start: 0,
                    count: pages,
                }],
                data: crate::net::host::incompressible(pages as usize * PAGE_SIZE).into(),
            },
            context: crate::context::AgentContext::new("h", "o", Vec::new(), Default::default()),
        };
        let bytes = (image
            .encode(Default::default())
            .unwrap_or_else(|e| panic!("{e}")))
        .to_vec();
        assert!(bytes.len() > INLINE_IMAGE, "large enough for a file");
        let staged = store
            .stage_image(&[&bytes])
            .unwrap_or_else(|e| panic!("{e}"));
        let digest = blake3::Hash::from(image.digest()).to_hex();
        assert_eq!(staged.name, format!("{digest}.img"));
        // Given in the parts it was encoded in, it is the same file under the same name.
        let parts = image
            .encode(Default::default())
            .unwrap_or_else(|e| panic!("{e}"));
        let again = store
            .stage_image(&parts.parts())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(again.name, staged.name);
        let written = |s: &Staged| s.file.as_ref().and_then(|f| std::fs::read(f).ok());
        assert_eq!(written(&again), Some(bytes.clone()));
        assert_eq!(written(&again), written(&staged));
        let junk: [&[u8]; 2] = [b"not an ", b"image"];
        let other = store.stage_image(&junk).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            other.name,
            format!("{}.img", blake3::hash(b"not an image").to_hex())
        );
    }
}
