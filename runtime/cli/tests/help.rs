//! The `agent` binary explains itself. (Also makes `cargo test --workspace` build the binary
//! that the end-to-end tests in `tests/` run.)

use std::process::Command;

#[test]
fn help_names_every_command_and_flag() {
    let out = Command::new(env!("CARGO_BIN_EXE_agent"))
        .arg("--help")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains("build") && text.contains("run"), "{text}");
    let out = Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(["run", "--help"])
        .output()
        .unwrap();
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
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("cannot read /nonexistent/agent.wasm"),
        "{text}"
    );
}

#[test]
fn agent_host_help_names_serve_and_certs() {
    let out = Command::new(env!("CARGO_BIN_EXE_agent-host"))
        .arg("--help")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains("serve") && text.contains("certs"), "{text}");
    let out = Command::new(env!("CARGO_BIN_EXE_agent-host"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--config",
        "--name",
        "--listen",
        "--data-dir",
        "--certs",
        "--peer",
        "--corpus",
    ] {
        assert!(
            text.contains(flag),
            "`agent-host serve --help` lacks {flag}:\n{text}"
        );
    }
}

#[test]
fn user_commands_are_listed_and_bad_ids_explained() {
    let out = Command::new(env!("CARGO_BIN_EXE_agent"))
        .arg("--help")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["launch", "status", "list", "kill", "demo"] {
        assert!(text.contains(cmd), "`agent --help` lacks {cmd}:\n{text}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(["status", "xyz"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("`xyz` is not an agent id (32 hex digits)")
    );
}

#[test]
fn a_missing_user_certificate_says_how_to_make_one() {
    let dir = std::env::temp_dir().join(format!("agent-help-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(["list", "--user", "carol", "--certs"])
        .arg(&dir)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("no user certificate for carol in")
            && text.contains("agent-host certs issue --dir DIR --user carol"),
        "{text}"
    );
}
