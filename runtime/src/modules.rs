//! The code segment: admitted agent modules, content-addressed by BLAKE3 and compiled once.
//!
//! Admission hashes the bytes, inspects them ([`crate::admission`]), instruments them, and
//! compiles them. Compiled code is cached in memory and, when the cache has a directory, on
//! disk, so a restarted host loads machine code instead of compiling again. Only the module
//! ever travels between hosts, never compiled code: each host compiles for its own CPU.

use crate::admission::{self, AdmissionError, ModuleFacts};
use crate::recycle::{Budget, Idle, Shell};
use crate::state::AgentState;
use crate::{host_abi, instrument};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use wasmtime::{Engine, InstancePre, Linker, Module};

/// BLAKE3 hash of a module's bytes: its identity everywhere.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ModuleHash(#[serde(with = "serde_bytes")] pub [u8; 32]);

impl ModuleHash {
    /// The hash of `wasm`.
    pub fn of(wasm: &[u8]) -> ModuleHash {
        ModuleHash(*blake3::hash(wasm).as_bytes())
    }
}

impl fmt::Display for ModuleHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for ModuleHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ModuleHash({self})")
    }
}

/// An admitted, compiled agent module, ready to instantiate.
pub struct AgentModule {
    /// Hash of the original module bytes.
    pub hash: ModuleHash,
    /// Size of the original module in bytes.
    pub size: usize,
    /// What admission learned (globals, initial memory image).
    pub facts: ModuleFacts,
    /// Pre-linked for fast instantiation.
    pub(crate) pre: InstancePre<AgentState>,
    /// Instances of this module whose agents left, reset for the next ones.
    pub(crate) idle: Idle<Shell>,
}

impl AgentModule {
    /// How many instances of this module, left by agents that hopped away, wait for the next
    /// agents of it ([`crate::recycle`]).
    pub fn idle_instances(&self) -> usize {
        self.idle.len()
    }
}

impl fmt::Debug for AgentModule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentModule")
            .field("hash", &self.hash)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// How modules were made ready, for tests and reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Modules compiled by Cranelift.
    pub compiled: u64,
    /// Modules loaded from compiled code on disk.
    pub loaded_from_disk: u64,
    /// Admissions answered from memory.
    pub hits: u64,
}

/// Admitted modules of one host.
pub struct ModuleCache {
    engine: Engine,
    linker: Linker<AgentState>,
    dir: Option<PathBuf>,
    modules: Mutex<HashMap<ModuleHash, Arc<AgentModule>>>,
    /// Held while a module is admitted, so that many agents of one new module arriving at
    /// once compile it once: the others wait and find it in `modules`.
    admitting: Mutex<()>,
    compiled: AtomicU64,
    loaded: AtomicU64,
    hits: AtomicU64,
    /// Memory the instances kept by all modules may hold ([`crate::recycle`]).
    idle_budget: Arc<Budget>,
}

/// Why a module cache could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The host functions could not be linked.
    #[error("cannot link the host functions: {0}")]
    Link(#[source] wasmtime::Error),
    /// The directory of compiled code could not be created.
    #[error("cannot create {}: {source}", path.display())]
    Dir {
        /// The directory.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
}

impl ModuleCache {
    /// A cache for `engine`, keeping compiled code under `dir` when given.
    ///
    /// # Errors
    /// When the host functions cannot be linked or `dir` cannot be created.
    pub fn new(engine: &Engine, dir: Option<PathBuf>) -> Result<ModuleCache, CacheError> {
        let mut linker = Linker::new(engine);
        let wasi =
            wasmtime_wasi::p1::add_to_linker_async(&mut linker, |s: &mut AgentState| &mut s.wasi);
        wasi.map_err(CacheError::Link)?;
        host_abi::add_to_linker(&mut linker).map_err(CacheError::Link)?;
        if let Some(dir) = &dir {
            std::fs::create_dir_all(dir).map_err(|source| CacheError::Dir {
                path: dir.clone(),
                source,
            })?;
        }
        Ok(ModuleCache {
            engine: engine.clone(),
            linker,
            dir,
            modules: Mutex::default(),
            admitting: Mutex::default(),
            compiled: AtomicU64::new(0),
            loaded: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            idle_budget: Budget::new(crate::recycle::BUDGET, crate::recycle::MAX_KEPT),
        })
    }

    /// Bytes and instances kept for the next agents of their modules.
    pub fn kept(&self) -> (u64, u64) {
        let (bytes, count) = self.idle_budget.left();
        (
            crate::recycle::BUDGET.saturating_sub(bytes),
            crate::recycle::MAX_KEPT.saturating_sub(count),
        )
    }

    /// Drops the instances kept for the agents of each module that have waited
    /// [`crate::recycle::KEEP_FOR`] for one.
    pub fn expire_idle(&self) {
        let modules: Vec<Arc<AgentModule>> = match self.modules.lock() {
            Ok(modules) => modules.values().cloned().collect(),
            Err(_) => return,
        };
        for module in modules {
            module.idle.expire(crate::recycle::KEEP_FOR);
        }
    }

    /// The engine modules are compiled for.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// An admitted module by hash.
    pub fn get(&self, hash: &ModuleHash) -> Option<Arc<AgentModule>> {
        self.modules.lock().ok()?.get(hash).cloned()
    }

    /// Counters of how admissions were served.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            compiled: self.compiled.load(Ordering::Relaxed),
            loaded_from_disk: self.loaded.load(Ordering::Relaxed),
            hits: self.hits.load(Ordering::Relaxed),
        }
    }

    /// Admits a module: inspect, instrument, compile (or load compiled code), link.
    ///
    /// # Errors
    /// [`AdmissionError`] saying why the module cannot run as an agent here.
    pub fn admit(&self, wasm: &[u8]) -> Result<Arc<AgentModule>, AdmissionError> {
        let hash = ModuleHash::of(wasm);
        if let Some(module) = self.get(&hash) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(module);
        }
        let _admitting = self.admitting.lock();
        if let Some(module) = self.get(&hash) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(module);
        }
        let facts = admission::inspect(wasm)?;
        let module = match self.load_compiled(&hash) {
            Some(module) => {
                self.loaded.fetch_add(1, Ordering::Relaxed);
                module
            }
            None => {
                let instrumented = instrument::instrument(wasm, &facts)?;
                let module = Module::new(&self.engine, &instrumented)
                    .map_err(|e| AdmissionError::Compile(format!("{e:#}")))?;
                self.compiled.fetch_add(1, Ordering::Relaxed);
                self.store_compiled(&hash, &module);
                module
            }
        };
        let pre = self
            .linker
            .instantiate_pre(&module)
            .map_err(|e| AdmissionError::Link(format!("{e:#}")))?;
        let admitted = Arc::new(AgentModule {
            hash,
            size: wasm.len(),
            facts,
            pre,
            idle: Idle::new(self.idle_budget.clone()),
        });
        if let Ok(mut modules) = self.modules.lock() {
            modules.insert(hash, admitted.clone());
        }
        Ok(admitted)
    }

    fn compiled_path(&self, hash: &ModuleHash) -> Option<PathBuf> {
        // Compiled code is only valid for the same wasmtime build and settings.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut h);
        Some(
            self.dir
                .as_ref()?
                .join(format!("{hash}-{:016x}.cwasm", h.finish())),
        )
    }

    /// Loads compiled code written by [`Self::store_compiled`]; `None` means compile instead.
    fn load_compiled(&self, hash: &ModuleHash) -> Option<Module> {
        let path = self.compiled_path(hash)?;
        let bytes = std::fs::read(&path).ok()?;
        // The file starts with the BLAKE3 of the rest, so a torn or altered file is never
        // handed to wasmtime, which must trust compiled code.
        let (check, code) = bytes.split_at_checked(32)?;
        if check != blake3::hash(code).as_bytes() {
            tracing::warn!(path = %path.display(), "compiled module fails its check; compiling again");
            return None;
        }
        // SAFETY: `code` is what `Module::serialize` wrote for this engine configuration (the
        // file name carries the compatibility hash) and its checksum matches.
        match unsafe { Module::deserialize(&self.engine, code) } {
            Ok(module) => Some(module),
            Err(e) => {
                tracing::warn!(path = %path.display(), "cannot load compiled module ({e}); compiling again");
                None
            }
        }
    }

    /// Writes compiled code durably: temp file, fsync, rename. Failure only costs a recompile.
    fn store_compiled(&self, hash: &ModuleHash, module: &Module) {
        let Some(path) = self.compiled_path(hash) else {
            return;
        };
        let result = module
            .serialize()
            .map_err(std::io::Error::other)
            .and_then(|code| {
                let mut bytes = blake3::hash(&code).as_bytes().to_vec();
                bytes.extend_from_slice(&code);
                write_durably(&path, &bytes)
            });
        if let Err(e) = result {
            tracing::warn!(path = %path.display(), "cannot keep compiled module: {e}");
        }
    }
}

/// Writes `bytes` to `path` atomically: a reader sees the old file or the whole new one.
pub fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = synced_temporary(dir, &[bytes])?;
    tmp.persist(path).map_err(|e| e.error)?;
    sync_dir(dir);
    Ok(())
}

/// Writes `bytes` to a new file of a temporary name (starting [`TEMPORARY`]) in `dir` and
/// syncs it; yields its path. [`publish`] gives it its name.
pub fn write_synced(dir: &Path, parts: &[&[u8]]) -> std::io::Result<PathBuf> {
    synced_temporary(dir, parts)?
        .into_temp_path()
        .keep()
        .map_err(|e| e.error)
}

/// Renames a file [`write_synced`] wrote to `path` and makes the rename durable.
pub fn publish(tmp: &Path, path: &Path) -> std::io::Result<()> {
    std::fs::rename(tmp, path)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")));
    Ok(())
}

/// How the names of temporary files start: what a crash leaves of them is removed at start.
pub const TEMPORARY: &str = ".tmp-";

/// A new file of a temporary name in `dir` holding `parts`, synced; removed if dropped.
fn synced_temporary(dir: &Path, parts: &[&[u8]]) -> std::io::Result<tempfile::NamedTempFile> {
    let mut tmp = tempfile::Builder::new()
        .prefix(TEMPORARY)
        .tempfile_in(dir)?;
    let path = tmp.path().to_path_buf();
    crate::direct::write_parts(&path, tmp.as_file_mut(), parts)?;
    tmp.as_file().sync_all()?;
    Ok(tmp)
}

/// Makes the names in `dir` durable; a failure only loses the name on a crash.
fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}
