//! End-to-end tests, compiled into one binary to save link time.

// The tests' helper functions are not `#[test]`s, so clippy's allowance for tests misses
// them; an unexpected error in them is a failing test all the same.
#![allow(clippy::unwrap_used)]

mod cli;
mod clone_faults;
mod clones;
mod cluster;
mod drain;
mod emit;
mod faults;
mod hostile;
mod hosts;
mod limits;
mod mail_faults;
mod messages;
mod metrics;
mod migration;
mod mtls;
mod network;
mod restore;
mod returns;
mod rogue;
mod sleep;
mod users;
