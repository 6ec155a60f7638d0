//! End-to-end tests, compiled into one binary to save link time.

mod cli;
mod faults;
mod hostile;
mod hosts;
mod limits;
mod migration;
mod mtls;
mod network;
mod restore;
mod returns;
mod rogue;
mod sleep;
mod users;
