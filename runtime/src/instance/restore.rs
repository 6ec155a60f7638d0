//! Restoring an agent from an image into an instance holding its module's initial memory:
//! a kept or fresh one, or one made ready while the image was still on the way.

use super::{AgentError, AgentInstance};
use crate::admission::{GlobalKind, WASM_PAGE};
use crate::context::AgentContext;
use crate::image::{AgentImage, GlobalValue, ImageError};
use crate::instrument::global_export;
use crate::limits::Limits;
use crate::modules::AgentModule;
use crate::services::Site;
use crate::snapshot::{PageMap, PageRun, PagesError};
use crate::state::AgentState;
use std::sync::Arc;
use wasmtime::{Instance, Store, Val};

impl AgentInstance {
    /// Restores an agent from `image` into an instance of `module` on `site`: one an agent
    /// of it left ([`AgentInstance::retire`]) with no more memory than the image, or a
    /// fresh one.
    ///
    /// The instance holds the module's initial memory; the image's pages and globals are
    /// written over it. No initializer runs.
    ///
    /// # Errors
    /// [`AgentError::Image`] when the image does not fit the module; limit errors when its
    /// memory exceeds `limits`.
    pub async fn restore(
        module: Arc<AgentModule>,
        site: Arc<Site>,
        image: AgentImage,
        limits: &Limits,
    ) -> Result<AgentInstance, AgentError> {
        if image.module != module.hash {
            return Err(ImageError::WrongModule {
                image: image.module.to_string(),
                module: module.hash.to_string(),
            }
            .into());
        }
        check_globals(&image.globals, &module.facts.globals)?;
        let (context, bytes) = (image.context.clone(), image.memory_bytes);
        let agent = AgentInstance::kept_or_fresh(module, site, context, limits, bytes).await?;
        agent.fill(image, false)
    }

    /// A fresh instance of `module` for an agent arriving with `memory_bytes` of memory, of
    /// which the pages of `runs` will be written: made, grown and mapped while its image is
    /// still on the way, so that restoring it ([`AgentInstance::restore_into`]) only copies.
    /// Mapping fresh memory is most of a large restore (see [`crate::prefault`]). `context`
    /// stands in for the image's until then. Mapped ahead on a thread of its own, the memory
    /// is ready before most of a large image has come, and the writes of the pages as they
    /// arrive do not slow the transfer.
    ///
    /// # Errors
    /// As [`AgentInstance::restore`], for the sizes given.
    pub async fn prepare(
        module: Arc<AgentModule>,
        site: Arc<Site>,
        context: AgentContext,
        memory_bytes: u64,
        runs: Vec<PageRun>,
        limits: &Limits,
    ) -> Result<AgentInstance, AgentError> {
        let mut agent = AgentInstance::instantiate(module, site, context, limits).await?;
        agent.grow_to(memory_bytes)?;
        PageMap::check(&runs, agent.memory.data_size(&agent.store) as u64)
            .map_err(ImageError::BadPages)?;
        // Mapping blocks for as long as the kernel takes: off the async workers.
        let mapped = tokio::task::spawn_blocking(move || {
            let memory = agent.memory.data_mut(&mut agent.store);
            for run in &runs {
                if let Some(region) = memory.get_mut(run.bytes()) {
                    crate::prefault::write(region);
                }
            }
            agent
        });
        mapped
            .await
            .map_err(|e| AgentError::Instantiate(format!("mapping its memory: {e}")))
    }

    /// Restores an agent from `image` into `prepared`, an instance [`AgentInstance::prepare`]
    /// made of the same module that nothing has run in since.
    ///
    /// # Errors
    /// As [`AgentInstance::restore`].
    pub fn restore_into(
        prepared: AgentInstance,
        image: AgentImage,
    ) -> Result<AgentInstance, AgentError> {
        AgentInstance::restore_prepared(prepared, image, false)
    }

    /// Restores an agent from `image` into `prepared` as [`AgentInstance::restore_into`]
    /// does, but for its pages: [`AgentInstance::write_pages`] wrote them already, from the
    /// body `image` was decoded from, laid out by the same runs.
    ///
    /// # Errors
    /// As [`AgentInstance::restore`].
    pub fn restore_written(
        prepared: AgentInstance,
        image: AgentImage,
    ) -> Result<AgentInstance, AgentError> {
        AgentInstance::restore_prepared(prepared, image, true)
    }

    /// Writes `part`, the bytes at `from..` of a raw image body laying out the pages of
    /// `runs`, into the memory of this instance made by [`AgentInstance::prepare`] with the
    /// same runs: a large image is written as it arrives.
    pub fn write_pages(&mut self, runs: &[PageRun], from: usize, part: &[u8]) {
        self.captured = None;
        PageMap::write_part(runs, from, part, self.memory.data_mut(&mut self.store));
    }

    fn restore_prepared(
        mut prepared: AgentInstance,
        image: AgentImage,
        written: bool,
    ) -> Result<AgentInstance, AgentError> {
        if image.module != prepared.module.hash {
            return Err(ImageError::WrongModule {
                image: image.module.to_string(),
                module: prepared.module.hash.to_string(),
            }
            .into());
        }
        check_globals(&image.globals, &prepared.module.facts.globals)?;
        // The CPU instantiating took counts against the agent, as it does in a restore.
        let spent = prepared.context().cpu_used_us;
        *prepared.context_mut() = image.context.clone();
        prepared.context_mut().cpu_used_us += spent;
        prepared.fill(image, written)
    }

    /// Grows memory to `memory_bytes`, which must be at least its size.
    fn grow_to(&mut self, memory_bytes: u64) -> Result<(), AgentError> {
        let current = self.memory.data_size(&self.store) as u64;
        if memory_bytes < current {
            return Err(ImageError::BadPages(PagesError::SmallerThanInitial {
                memory: memory_bytes,
                initial: current,
            })
            .into());
        }
        if memory_bytes > current {
            self.memory
                .grow(&mut self.store, (memory_bytes - current) / WASM_PAGE)
                .map_err(|e| self.classify(e))?;
        }
        Ok(())
    }

    /// Writes the pages (unless `written` already) and globals of `image` over this fresh
    /// (or prepared) instance.
    fn fill(mut self, image: AgentImage, written: bool) -> Result<AgentInstance, AgentError> {
        let AgentImage {
            memory_bytes,
            globals,
            pages,
            ..
        } = image;
        self.grow_to(memory_bytes)?;
        // Checked again here: this instance's memory, not the header, bounds the writes.
        PageMap::check(&pages.runs, self.memory.data_size(&self.store) as u64)
            .map_err(ImageError::BadPages)?;
        self.captured = None;
        if !written {
            pages.apply(self.memory.data_mut(&mut self.store));
        }
        write_globals(&self.instance, &mut self.store, &globals)?;
        self.at_safe_point = true;
        Ok(self)
    }
}

/// Sets the mutable globals of `instance` to `globals`.
pub(super) fn write_globals(
    instance: &Instance,
    store: &mut Store<AgentState>,
    globals: &[GlobalValue],
) -> Result<(), AgentError> {
    for g in globals {
        let global = instance
            .get_global(&mut *store, &global_export(g.index))
            .ok_or_else(|| AgentError::Abi(format!("global {} is not exported", g.index)))?;
        let value = match g.kind {
            GlobalKind::I32 => Val::I32(g.bits as u32 as i32),
            GlobalKind::I64 => Val::I64(g.bits as i64),
            GlobalKind::F32 => Val::F32(g.bits as u32),
            GlobalKind::F64 => Val::F64(g.bits),
        };
        global
            .set(&mut *store, value)
            .map_err(|e| AgentError::Abi(format!("global {}: {e}", g.index)))?;
    }
    Ok(())
}

fn check_globals(image: &[GlobalValue], module: &[(u32, GlobalKind)]) -> Result<(), ImageError> {
    let found: Vec<(u32, GlobalKind)> = image.iter().map(|g| (g.index, g.kind)).collect();
    if found != module {
        return Err(ImageError::GlobalsMismatch(format!(
            "image has {found:?}, module has {module:?}"
        )));
    }
    Ok(())
}
