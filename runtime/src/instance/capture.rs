//! Capturing an agent at a safe point: its memory's changed pages and its mutable globals.

use super::AgentInstance;
use crate::admission::GlobalKind;
use crate::image::{AgentImage, GlobalValue};
use crate::instrument::global_export;
use crate::snapshot::{PageMap, PageRun};
use crate::state::AgentState;
use wasmtime::{Instance, Store, Val};

impl AgentInstance {
    /// Captures the agent at its current safe point.
    ///
    /// Call only between [`Self::poll`]s, when the Wasm stack is empty.
    pub fn capture(&mut self) -> AgentImage {
        let mut image = self.capture_in_place();
        let runs = std::mem::take(&mut image.pages.runs);
        image.pages = PageMap::gather(self.memory(), runs);
        image
    }

    /// Captures the agent as [`Self::capture`] does, but leaves its pages where they lie: the
    /// image's page map holds their runs and no data. They are read from [`Self::memory`],
    /// which stays as it is until the agent runs again.
    pub fn capture_in_place(&mut self) -> AgentImage {
        let (runs, resident) = self.changed();
        self.captured = Some((runs.clone(), resident));
        let pages = PageMap {
            runs,
            data: bytes::Bytes::new(),
        };
        let globals = read_globals(&self.instance, &mut self.store, &self.module.facts.globals);
        AgentImage {
            module: self.module.hash,
            memory_bytes: self.memory.data_size(&self.store) as u64,
            globals,
            pages,
            context: self.store.data().context.clone(),
        }
    }

    /// The runs of pages of the memory that differ from the module's initial memory, and the
    /// bytes of the pages ever touched (all of them where the kernel does not say).
    pub(super) fn changed(&self) -> (Vec<PageRun>, u64) {
        let memory = self.memory();
        let touched = crate::touched::pages(memory);
        let resident = touched.as_ref().map_or(memory.len() as u64, |t| {
            t.iter().filter(|&&t| t).count() as u64 * crate::snapshot::PAGE_SIZE as u64
        });
        let initial = &self.module.facts.initial;
        (
            PageMap::changed_runs_touched(memory, initial, touched),
            resident,
        )
    }
}

/// The values of the module's mutable globals (`kinds`) in `instance`.
pub(super) fn read_globals(
    instance: &Instance,
    store: &mut Store<AgentState>,
    kinds: &[(u32, GlobalKind)],
) -> Vec<GlobalValue> {
    let mut globals = Vec::with_capacity(kinds.len());
    for (index, kind) in kinds {
        let bits = match instance
            .get_global(&mut *store, &global_export(*index))
            .map(|g| g.get(&mut *store))
        {
            Some(Val::I32(v)) => u64::from(v as u32),
            Some(Val::I64(v)) => v as u64,
            Some(Val::F32(v)) => u64::from(v),
            Some(Val::F64(v)) => v,
            _ => 0, // admission guarantees every mutable global is exported with its kind
        };
        globals.push(GlobalValue {
            index: *index,
            kind: *kind,
            bits,
        });
    }
    globals
}
