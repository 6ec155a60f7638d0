//! The mutable globals of an agent: with its linear memory, all the state an image carries.

use serde::{Deserialize, Serialize};

/// Type of a mutable global, as carried in an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GlobalKind {
    /// `i32`
    I32,
    /// `i64`
    I64,
    /// `f32`, carried as bits.
    F32,
    /// `f64`, carried as bits.
    F64,
}

/// The value of one mutable global.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GlobalValue {
    /// Global index in the module.
    pub index: u32,
    /// Its type.
    pub kind: GlobalKind,
    /// Its value's bits (floats keep their exact bit pattern, NaN payloads included).
    pub bits: u64,
}
