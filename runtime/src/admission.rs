//! Module admission: decide, before anything runs, whether a module can live as a mobile agent.
//!
//! An agent can be snapshotted only if all its mutable state is linear memory plus mutable
//! globals. So we refuse what would hide state elsewhere or make memory non-portable (shared
//! memory, memory64, several memories, code that writes tables, a start function that would run
//! again on every restore) and what the host cannot link (unknown imports, another ABI version).
//! On success we return the facts the snapshot code needs: the mutable globals and the
//! module's initial memory image.

pub use crate::globals::GlobalKind;
use crate::snapshot::{InitialImage, PAGE_SIZE};
use agent_abi::{ABI_SECTION, ABI_VERSION, IMPORT_MODULE, MIN_ABI_VERSION, export, import};
use wasmparser::{DataKind, Operator, Parser, Payload, TypeRef, ValType, Validator};

/// The WASI preview 1 import module, linked so `std` works inside agents.
pub const WASI_MODULE: &str = "wasi_snapshot_preview1";

/// Size of a Wasm page.
pub const WASM_PAGE: u64 = 64 << 10;

/// Why a module was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionError {
    /// The bytes are not a valid WebAssembly module.
    #[error("not a valid WebAssembly module: {0}")]
    Invalid(String),
    /// A component or other non-core binary.
    #[error("not a core WebAssembly module (components are not supported)")]
    NotACoreModule,
    /// The module has no ABI section: it was not built with agent-sdk.
    #[error(
        "not an agent: the module has no `{ABI_SECTION}` section, which `agent_sdk::agent!(entry)` adds: call it once in the crate's lib.rs with the agent's async entry function, then `agent build CRATE_DIR`"
    )]
    NotAnAgent,
    /// The module was built for another ABI version.
    #[error(
        "agent ABI version mismatch: the module was built for v{module}, this host runs v{} to v{host}; rebuild it with a matching agent-sdk",
        agent_abi::MIN_ABI_VERSION
    )]
    AbiMismatch {
        /// Version in the module.
        module: u32,
        /// Version of this host.
        host: u32,
    },
    /// A required export is missing.
    #[error(
        "missing export `{0}`: agents export agent_start, agent_poll and memory (use `agent_sdk::agent!`)"
    )]
    MissingExport(&'static str),
    /// The module imports something the host does not offer.
    #[error("imports `{module}::{name}`, which this host does not offer")]
    UnknownImport {
        /// Import module.
        module: String,
        /// Import name.
        name: String,
    },
    /// Shared memory (threads): state could change under a snapshot.
    #[error("uses shared memory (threads), which cannot be snapshotted")]
    SharedMemory,
    /// 64-bit memory.
    #[error("uses 64-bit memory (memory64), which this runtime does not support")]
    Memory64,
    /// More than one memory.
    #[error("defines {0} memories; agents have exactly one")]
    MemoryCount(usize),
    /// A mutable global of a type whose value cannot be carried in an image.
    #[error("global {index} is a mutable {ty}, which cannot be snapshotted")]
    UnsupportedGlobal {
        /// Global index.
        index: u32,
        /// Its type.
        ty: String,
    },
    /// Code that changes a table: the table would have to travel with the agent.
    #[error("function {func} uses `{op}`, which writes a table; tables must stay as instantiated")]
    WritesTable {
        /// Function index.
        func: u32,
        /// The instruction.
        op: &'static str,
    },
    /// A start function runs at every instantiation, so it would run again at every restore.
    #[error("has a start function, which would run again on every restore")]
    StartFunction,
    /// A data segment whose place is not a plain `i32.const`.
    #[error("data segment {0} has an offset other than a plain `i32.const`")]
    DataOffset(u32),
    /// The host could not link the module's imports.
    #[error("cannot link the module: {0}")]
    Link(String),
    /// wasmtime failed to compile the module.
    #[error("compilation failed: {0}")]
    Compile(String),
}

/// What admission learned about a module.
#[derive(Clone, Debug)]
pub struct ModuleFacts {
    /// Defined mutable globals: (global index, type).
    pub globals: Vec<(u32, GlobalKind)>,
    /// Whether the memory is exported under [`export::MEMORY`].
    pub memory_exported: bool,
    /// The memory right after instantiation: data segments applied, the rest zero.
    pub initial: InitialImage,
    /// Its size in bytes.
    pub memory_bytes: u64,
    /// Whether it has passive data segments. `data.drop` empties one for good in an
    /// instance: an instance an agent of this module ran in is not reused for another.
    pub passive_data: bool,
}

/// Inspects a module and refuses what cannot be an agent.
///
/// # Errors
/// The first [`AdmissionError`] found.
pub fn inspect(wasm: &[u8]) -> Result<ModuleFacts, AdmissionError> {
    Validator::new()
        .validate_all(wasm)
        .map_err(|e| AdmissionError::Invalid(e.message().to_string()))?;
    let mut sections = Sections::default();
    for payload in Parser::new(0).parse_all(wasm) {
        sections.read(payload.map_err(invalid)?)?;
    }
    sections.facts()
}

/// A module that wasmparser read but found malformed.
fn invalid(e: wasmparser::BinaryReaderError) -> AdmissionError {
    AdmissionError::Invalid(e.message().to_string())
}

/// What the sections of a module say, gathered as they are read; each section is refused as
/// soon as it shows state that could not travel.
#[derive(Default)]
struct Sections {
    abi: Option<u32>,
    exports: Vec<(String, wasmparser::ExternalKind)>,
    memories: Vec<wasmparser::MemoryType>,
    globals: Vec<(u32, GlobalKind)>,
    imported_funcs: u32,
    defined_funcs: u32,
    /// Active data segments: (offset, bytes).
    segments: Vec<(u64, Vec<u8>)>,
    passive_data: bool,
}

impl Sections {
    /// Takes in one section of the module.
    fn read(&mut self, payload: Payload<'_>) -> Result<(), AdmissionError> {
        match payload {
            Payload::Version {
                encoding: wasmparser::Encoding::Component,
                ..
            } => return Err(AdmissionError::NotACoreModule),
            Payload::ImportSection(reader) => self.imports(reader)?,
            Payload::MemorySection(reader) => {
                for memory in reader {
                    self.memories.push(memory.map_err(invalid)?);
                }
            }
            Payload::GlobalSection(reader) => self.globals(reader)?,
            Payload::ExportSection(reader) => {
                for export in reader {
                    let export = export.map_err(invalid)?;
                    self.exports.push((export.name.to_string(), export.kind));
                }
            }
            Payload::StartSection { .. } => return Err(AdmissionError::StartFunction),
            Payload::DataSection(reader) => self.data(reader)?,
            Payload::CodeSectionEntry(body) => self.code(body)?,
            Payload::CustomSection(section) if section.name() == ABI_SECTION => {
                let version = <[u8; 4]>::try_from(section.data())
                    .map(u32::from_le_bytes)
                    .unwrap_or(u32::MAX);
                self.abi = Some(version);
            }
            _ => {}
        }
        Ok(())
    }

    /// Refuses imports the host does not offer: they could not be linked on any host.
    fn imports(
        &mut self,
        reader: wasmparser::ImportSectionReader<'_>,
    ) -> Result<(), AdmissionError> {
        for import in reader.into_imports() {
            let import = import.map_err(invalid)?;
            let offered = match (import.module, import.ty) {
                (IMPORT_MODULE, TypeRef::Func(_)) => import::ALL.contains(&import.name),
                (WASI_MODULE, TypeRef::Func(_)) => true, // the linker checks names and types
                _ => false,
            };
            if !offered {
                return Err(AdmissionError::UnknownImport {
                    module: import.module.to_string(),
                    name: import.name.to_string(),
                });
            }
            self.imported_funcs += 1;
        }
        Ok(())
    }

    /// Notes the mutable globals, which an image carries; refuses those it cannot carry.
    fn globals(
        &mut self,
        reader: wasmparser::GlobalSectionReader<'_>,
    ) -> Result<(), AdmissionError> {
        for (index, global) in reader.into_iter().enumerate() {
            let ty = global.map_err(invalid)?.ty;
            if !ty.mutable {
                continue;
            }
            let kind = match ty.content_type {
                ValType::I32 => GlobalKind::I32,
                ValType::I64 => GlobalKind::I64,
                ValType::F32 => GlobalKind::F32,
                ValType::F64 => GlobalKind::F64,
                other => {
                    return Err(AdmissionError::UnsupportedGlobal {
                        index: index as u32,
                        ty: other.to_string(),
                    });
                }
            };
            self.globals.push((index as u32, kind));
        }
        Ok(())
    }

    /// Notes the data segments, which make the initial memory; refuses offsets it cannot place.
    fn data(&mut self, reader: wasmparser::DataSectionReader<'_>) -> Result<(), AdmissionError> {
        for (index, data) in reader.into_iter().enumerate() {
            let data = data.map_err(invalid)?;
            self.passive_data |= matches!(data.kind, DataKind::Passive);
            if let DataKind::Active { offset_expr, .. } = data.kind {
                // Only `i32.const N` alone: an extended constant expression such as
                // `i32.const 0 i32.const 65536 i32.add` would otherwise be read as 0.
                let mut ops = offset_expr.get_operators_reader();
                let offset = match (ops.read().map_err(invalid)?, ops.read()) {
                    (Operator::I32Const { value }, Ok(Operator::End)) => u64::from(value as u32),
                    _ => return Err(AdmissionError::DataOffset(index as u32)),
                };
                self.segments.push((offset, data.data.to_vec()));
            }
        }
        Ok(())
    }

    /// Refuses a function that writes a table: the table would have to travel with the agent.
    fn code(&mut self, body: wasmparser::FunctionBody<'_>) -> Result<(), AdmissionError> {
        let func = self.imported_funcs + self.defined_funcs;
        self.defined_funcs += 1;
        let mut ops = body.get_operators_reader().map_err(invalid)?;
        while !ops.eof() {
            if let Some(op) = table_write(&ops.read().map_err(invalid)?) {
                return Err(AdmissionError::WritesTable { func, op });
            }
        }
        Ok(())
    }

    /// What the whole module says, once every section has been read.
    fn facts(self) -> Result<ModuleFacts, AdmissionError> {
        let abi = self.abi_version()?;
        let memory = self.memory()?;
        let exported = |name: &str, kind| self.exports.iter().any(|(n, k)| n == name && *k == kind);
        // ABI 2 agents tell the host where their checkpoint flag is.
        let flag = (abi >= 2).then_some(export::CHECKPOINT_FLAG);
        for name in [export::START, export::POLL].into_iter().chain(flag) {
            if !exported(name, wasmparser::ExternalKind::Func) {
                return Err(AdmissionError::MissingExport(name));
            }
        }
        let memory_exported = exported(export::MEMORY, wasmparser::ExternalKind::Memory);
        let memory_bytes = memory.initial.saturating_mul(WASM_PAGE);
        Ok(ModuleFacts {
            initial: initial_memory(self.segments, memory_bytes)?,
            globals: self.globals,
            memory_exported,
            memory_bytes,
            passive_data: self.passive_data,
        })
    }

    /// The ABI version the module was built for, if this host runs it.
    fn abi_version(&self) -> Result<u32, AdmissionError> {
        match self.abi {
            None => Err(AdmissionError::NotAnAgent),
            Some(v) if !(MIN_ABI_VERSION..=ABI_VERSION).contains(&v) => {
                Err(AdmissionError::AbiMismatch {
                    module: v,
                    host: ABI_VERSION,
                })
            }
            Some(v) => Ok(v),
        }
    }

    /// The module's one memory, if an image can carry it.
    fn memory(&self) -> Result<wasmparser::MemoryType, AdmissionError> {
        let memory = match self.memories.as_slice() {
            [memory] => *memory,
            other => return Err(AdmissionError::MemoryCount(other.len())),
        };
        if memory.shared {
            return Err(AdmissionError::SharedMemory);
        }
        if memory.memory64 {
            return Err(AdmissionError::Memory64);
        }
        Ok(memory)
    }
}

/// The memory of `memory_bytes` right after instantiation, with the active data `segments`
/// written into it.
fn initial_memory(
    segments: Vec<(u64, Vec<u8>)>,
    memory_bytes: u64,
) -> Result<InitialImage, AdmissionError> {
    let mut initial = InitialImage::default();
    for (offset, bytes) in segments {
        // Validation cannot check this; wasmtime would fail at instantiation.
        if offset + bytes.len() as u64 > memory_bytes {
            return Err(AdmissionError::Invalid(format!(
                "data segment at offset {offset} of {} bytes lies outside the initial memory",
                bytes.len()
            )));
        }
        initial.write(offset, &bytes);
    }
    debug_assert_eq!(PAGE_SIZE as u64 * 16, WASM_PAGE);
    Ok(initial)
}

/// The name of `op` if it writes a table.
fn table_write(op: &Operator<'_>) -> Option<&'static str> {
    Some(match op {
        Operator::TableSet { .. } => "table.set",
        Operator::TableGrow { .. } => "table.grow",
        Operator::TableFill { .. } => "table.fill",
        Operator::TableCopy { .. } => "table.copy",
        Operator::TableInit { .. } => "table.init",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal agent module in text form, with `items` added and the given ABI section.
    fn agent(items: &str, abi: &str) -> Vec<u8> {
        let text = format!(
            r#"(module
                (import "agent_v1" "submit" (func (param i32 i32) (result i32)))
                {items}
                (global $sp (mut i32) (i32.const 1024))
                (global (mut i64) (i64.const -1))
                (global i32 (i32.const 5))
                (func (export "agent_start"))
                (func (export "agent_poll") (result i32) i32.const 1)
                {abi})"#
        );
        wat::parse_str(&text).unwrap_or_else(|e| panic!("bad test module: {e}\n{text}"))
    }

    const ABI: &str = r#"(@custom "agent-abi" "\01\00\00\00")"#;
    const MEMORY: &str = r#"(memory (export "memory") 2) (data (i32.const 65530) "hello, world")"#;

    fn refused(items: &str, abi: &str) -> AdmissionError {
        match inspect(&agent(items, abi)) {
            Ok(_) => panic!("module with {items} / {abi} was admitted"),
            Err(e) => e,
        }
    }

    #[test]
    fn admits_an_agent_and_learns_its_state() {
        let facts = inspect(&agent(MEMORY, ABI)).unwrap();
        assert_eq!(
            facts.globals,
            vec![(0, GlobalKind::I32), (1, GlobalKind::I64)]
        );
        assert!(facts.memory_exported);
        assert!(!facts.passive_data);
        let passive = format!(r#"{MEMORY} (data "not placed")"#);
        let facts_passive = inspect(&agent(&passive, ABI)).unwrap();
        assert!(facts_passive.passive_data);
        assert_eq!(facts_passive.initial, facts.initial);
        let mut expected = InitialImage::default();
        expected.write(65530, b"hello, world");
        assert_eq!(facts.initial, expected);
        assert_eq!(facts.memory_bytes, 2 * WASM_PAGE);
    }

    #[test]
    fn instrumentation_exports_globals_and_memory_without_renumbering() {
        let wasm = agent(MEMORY, ABI);
        let facts = inspect(&wasm).unwrap();
        let out = crate::instrument::instrument(&wasm, &facts).unwrap();
        let again = inspect(&out).unwrap_or_else(|e| panic!("instrumented module refused: {e}"));
        assert_eq!(again.globals, facts.globals);
        let mut exports = Vec::new();
        for payload in Parser::new(0).parse_all(&out) {
            if let Ok(Payload::ExportSection(reader)) = payload {
                exports = reader
                    .into_iter()
                    .filter_map(Result::ok)
                    .map(|e| (e.name.to_string(), e.index))
                    .collect();
            }
        }
        for wanted in [
            ("__agent_global_0", 0),
            ("__agent_global_1", 1),
            ("__agent_memory", 0),
            ("agent_poll", 2),
        ] {
            assert!(
                exports.contains(&(wanted.0.to_string(), wanted.1)),
                "{wanted:?} missing from {exports:?}"
            );
        }
    }

    #[test]
    fn refuses_what_is_not_an_agent_for_this_host() {
        assert!(matches!(
            inspect(b"\0asm\x01\0\0\0garbage"),
            Err(AdmissionError::Invalid(_))
        ));
        assert_eq!(refused(MEMORY, ""), AdmissionError::NotAnAgent);
        assert_eq!(
            refused(
                MEMORY,
                &format!(
                    r#"(@custom "agent-abi" "\{:02x}\00\00\00")"#,
                    ABI_VERSION + 1
                )
            ),
            AdmissionError::AbiMismatch {
                module: ABI_VERSION + 1,
                host: ABI_VERSION
            }
        );
        // ABI 2 agents tell the host where their checkpoint flag is.
        assert_eq!(
            refused(MEMORY, r#"(@custom "agent-abi" "\02\00\00\00")"#),
            AdmissionError::MissingExport(export::CHECKPOINT_FLAG)
        );
    }

    #[test]
    fn refuses_imports_the_host_does_not_offer() {
        assert_eq!(
            refused(&format!(r#"(import "env" "open" (func)) {MEMORY}"#), ABI),
            AdmissionError::UnknownImport {
                module: "env".into(),
                name: "open".into()
            }
        );
        assert_eq!(
            refused(
                &format!(r#"(import "agent_v1" "teleport" (func)) {MEMORY}"#),
                ABI
            ),
            AdmissionError::UnknownImport {
                module: "agent_v1".into(),
                name: "teleport".into()
            }
        );
        assert_eq!(
            refused(r#"(import "env" "memory" (memory 1))"#, ABI),
            AdmissionError::UnknownImport {
                module: "env".into(),
                name: "memory".into()
            }
        );
    }

    #[test]
    fn refuses_memory_an_image_cannot_carry() {
        assert_eq!(
            refused(r#"(memory 1 1 shared)"#, ABI),
            AdmissionError::SharedMemory
        );
        assert_eq!(refused(r#"(memory i64 1)"#, ABI), AdmissionError::Memory64);
        assert_eq!(
            refused(r#"(memory 1) (memory 1)"#, ABI),
            AdmissionError::MemoryCount(2)
        );
        assert_eq!(refused("", ABI), AdmissionError::MemoryCount(0));
    }

    #[test]
    fn refuses_state_outside_memory_and_mutable_globals() {
        assert_eq!(
            refused(
                &format!("{MEMORY} (global (mut v128) (v128.const i64x2 0 0))"),
                ABI
            ),
            AdmissionError::UnsupportedGlobal {
                index: 0,
                ty: "v128".into()
            }
        );
        assert_eq!(
            refused(
                &format!(
                    "{MEMORY} (table 1 funcref) (func (drop (table.grow (ref.null func) (i32.const 1))))"
                ),
                ABI
            ),
            AdmissionError::WritesTable {
                func: 1,
                op: "table.grow"
            }
        );
        assert_eq!(
            refused(
                &format!(
                    "{MEMORY} (table 1 funcref) (func (table.set (i32.const 0) (ref.null func)))"
                ),
                ABI
            ),
            AdmissionError::WritesTable {
                func: 1,
                op: "table.set"
            }
        );
        assert_eq!(
            refused(&format!("{MEMORY} (func $s) (start $s)"), ABI),
            AdmissionError::StartFunction
        );
    }

    #[test]
    fn refuses_data_it_cannot_place() {
        assert_eq!(
            refused(
                r#"(memory 1) (global $base i32 (i32.const 8)) (data (global.get $base) "x")"#,
                ABI
            ),
            AdmissionError::DataOffset(0)
        );
        // Valid Wasm (extended constant expressions), but not an offset admission can place.
        assert_eq!(
            refused(
                r#"(memory 2) (data (i32.add (i32.const 0) (i32.const 65536)) "x")"#,
                ABI
            ),
            AdmissionError::DataOffset(0)
        );
    }

    #[test]
    fn refuses_missing_entry_points() {
        let text =
            format!(r#"(module (memory (export "memory") 1) (func (export "agent_start")) {ABI})"#);
        let wasm = wat::parse_str(&text).unwrap();
        assert_eq!(
            inspect(&wasm).err(),
            Some(AdmissionError::MissingExport(export::POLL))
        );
    }
}
