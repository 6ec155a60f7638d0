//! Instrumentation: make an agent's hidden state readable by the host.
//!
//! wasmtime lets a host read only exported globals, but the state we must snapshot includes
//! non-exported ones such as `__stack_pointer`. So, like wasmtime's pre-initializer, we copy every
//! section unchanged and rebuild only the export section with extra exports for each mutable
//! global and the memory. Nothing is renumbered, so the code is untouched.

use crate::admission::{AdmissionError, ModuleFacts};
use wasm_encoder::{ExportKind, ExportSection, RawSection};
use wasmparser::{ExternalKind, Parser, Payload};

/// Export name under which the instrumented module exposes its memory.
pub const MEMORY_EXPORT: &str = "__agent_memory";

/// Export name under which the instrumented module exposes mutable global `index`.
pub fn global_export(index: u32) -> String {
    format!("__agent_global_{index}")
}

/// Returns the module with exports added for its memory and every mutable global.
///
/// # Errors
/// [`AdmissionError::Invalid`] for a module the parser rejects (admission ran first, so this
/// only happens on inputs admission did not see).
pub fn instrument(wasm: &[u8], facts: &ModuleFacts) -> Result<Vec<u8>, AdmissionError> {
    let invalid =
        |e: wasmparser::BinaryReaderError| AdmissionError::Invalid(e.message().to_string());
    let mut module = wasm_encoder::Module::new();
    for payload in Parser::new(0).parse_all(wasm) {
        let payload = payload.map_err(invalid)?;
        match &payload {
            Payload::ExportSection(reader) => {
                let mut exports = ExportSection::new();
                for export in reader.clone() {
                    let export = export.map_err(invalid)?;
                    exports.export(export.name, export_kind(export.kind), export.index);
                }
                for (index, _) in &facts.globals {
                    exports.export(&global_export(*index), ExportKind::Global, *index);
                }
                exports.export(MEMORY_EXPORT, ExportKind::Memory, 0);
                module.section(&exports);
            }
            other => {
                if let Some((id, range)) = other.as_section() {
                    module.section(&RawSection {
                        id,
                        data: &wasm[range],
                    });
                }
            }
        }
    }
    Ok(module.finish())
}

fn export_kind(kind: ExternalKind) -> ExportKind {
    match kind {
        ExternalKind::Func | ExternalKind::FuncExact => ExportKind::Func,
        ExternalKind::Table => ExportKind::Table,
        ExternalKind::Memory => ExportKind::Memory,
        ExternalKind::Global => ExportKind::Global,
        ExternalKind::Tag => ExportKind::Tag,
    }
}
