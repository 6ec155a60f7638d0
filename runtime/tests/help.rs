//! The `agent` binary explains itself. (Also makes `cargo test --workspace` build the binary
//! that the end-to-end tests in `tests/` run.)

use std::process::Command;

#[test]
fn help_names_every_command_and_flag() {
    let out = Command::new(env!("CARGO_BIN_EXE_agent"))
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains("build") && text.contains("run"), "{text}");
    let out = Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(["run", "--help"])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--sites",
        "--data",
        "--arg",
        "--migrate-every-safe-point",
        "--json",
        "--max-memory-mib",
        "--cpu-budget",
    ] {
        assert!(
            text.contains(flag),
            "`agent run --help` lacks {flag}:\n{text}"
        );
    }
}

#[test]
fn a_missing_module_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(["run", "/nonexistent/agent.wasm", "--sites", "a"])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("cannot read /nonexistent/agent.wasm"),
        "{text}"
    );
}
