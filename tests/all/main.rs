//! End-to-end tests, compiled into one binary to save link time.

mod cli;
mod limits;
mod migration;
mod restore;
