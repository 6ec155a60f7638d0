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

/// `certs issue --out DIR` leaves DIR ready for `serve` (the CA's certificate copied, never
/// its key); and `serve` names the file that is missing.
#[test]
fn issued_certificates_are_ready_to_serve_and_a_missing_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, host) = (dir.path().join("ca"), dir.path().join("host"));
    let host_cmd = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_agent-host"))
            .args(args)
            .output()
            .unwrap()
    };
    let ca_arg = ca.to_str().unwrap();
    let host_arg = host.to_str().unwrap();
    assert!(
        host_cmd(&["certs", "init", "--dir", ca_arg])
            .status
            .success()
    );
    let issued = host_cmd(&[
        "certs", "issue", "--dir", ca_arg, "--host", "siteA", "--out", host_arg,
    ]);
    assert!(issued.status.success(), "{issued:?}");
    assert!(host.join("ca.crt").is_file());
    assert!(!host.join("ca.key").exists());
    // Another CA's certificate into the same directory would not verify there: refused.
    let other = dir.path().join("other-ca");
    let other_arg = other.to_str().unwrap();
    assert!(
        host_cmd(&["certs", "init", "--dir", other_arg])
            .status
            .success()
    );
    let mixed = host_cmd(&[
        "certs", "issue", "--dir", other_arg, "--host", "siteC", "--out", host_arg,
    ]);
    assert_eq!(mixed.status.code(), Some(2), "{mixed:?}");
    assert!(String::from_utf8_lossy(&mixed.stderr).contains("another CA's certificate"));
    assert!(!host.join("host-siteC.crt").exists());

    let data = dir.path().join("data");
    let serve = |name: &str| {
        let out = host_cmd(&[
            "serve",
            "--name",
            name,
            "--listen",
            "127.0.0.1:0",
            "--certs",
            host_arg,
            "--data-dir",
            data.to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let text = serve("siteB");
    assert!(
        text.contains("no host certificate for siteB")
            && text.contains("host-siteB.crt is missing"),
        "{text}"
    );
    std::fs::remove_file(host.join("ca.crt")).unwrap();
    let text = serve("siteA");
    assert!(text.contains("ca.crt is missing"), "{text}");
}

/// An address where nothing listens fails as fast as hosts give up on each other, with a
/// hint at what to check, rather than after QUIC's 30 s idle timeout.
#[test]
fn a_host_address_where_nothing_listens_fails_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().to_str().unwrap();
    for args in [
        &["certs", "init", "--dir", certs][..],
        &["certs", "issue", "--dir", certs, "--user", "dana"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_agent-host"))
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    // A UDP port bound but never read: nothing will answer there.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let host = format!("siteA@{}", silent.local_addr().unwrap());
    let out = Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(["list", "--host", &host, "--certs", certs])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("no answer from siteA@") && text.contains("within 3s: check that"),
        "{text}"
    );
}
