//! Deployment: the systemd unit verifies, READY=1 reaches systemd's notify socket once the
//! API answers (and STOPPING=1 at shutdown), the Dockerfile has the structure operators
//! rely on (no base image can be pulled here, so it is checked, not built), and
//! `botvisor health` tells a live server from a dead one.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::Server;

fn repo(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

#[test]
fn the_systemd_unit_verifies_and_is_hardened() {
    let unit = repo("deploy/botvisor.service");
    for line in [
        "Type=notify",
        "StateDirectory=botvisor",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "LimitNOFILE=65536",
        "KillSignal=SIGTERM",
    ] {
        assert!(unit.lines().any(|l| l.trim() == line), "missing {line}");
    }
    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            b"SKIPPED systemd-analyze verify: systemd is not installed here; to run it: apt-get install systemd\n",
        );
        return;
    };
    assert!(out.status.success());
    // The unit names the installed binary; point it at this build for the check.
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("botvisor.service");
    std::fs::write(
        &local,
        unit.replace("/usr/local/bin/botvisor", env!("CARGO_BIN_EXE_botvisor")),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&local)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {text}");
    assert!(
        !text.contains("botvisor.service:"),
        "warnings about the unit: {text}"
    );
}

#[test]
fn ready_reaches_the_notify_socket_once_the_api_answers() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut s = Server::start_with_env(&[], &[("NOTIFY_SOCKET", socket_path.to_str().unwrap())]);
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).expect("READY=1 within 30 s");
    let message = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(message.lines().any(|l| l == "READY=1"), "{message:?}");
    // By then the API answers.
    assert_eq!(s.get("/readyz").status, 200);
    assert_eq!(s.terminate(), Some(0));
    let n = socket.recv(&mut buf).expect("STOPPING=1 at shutdown");
    let message = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(message.lines().any(|l| l == "STOPPING=1"), "{message:?}");
}

#[test]
fn the_dockerfile_builds_release_runs_unprivileged_and_checks_health() {
    let file = repo("Dockerfile");
    let instructions: Vec<&str> = file
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let froms = instructions
        .iter()
        .filter(|l| l.starts_with("FROM "))
        .count();
    assert!(froms >= 2, "multi-stage: {froms} FROM");
    let has = |prefix: &str| instructions.iter().any(|l| l.starts_with(prefix));
    assert!(has("USER botvisor"), "runs as a non-root user");
    assert!(has("VOLUME [\"/data\"]"));
    assert!(has("EXPOSE 8000"));
    assert!(has("STOPSIGNAL SIGTERM"));
    assert!(has("HEALTHCHECK "));
    assert!(file.contains("\"health\", \"--url\", \"http://127.0.0.1:8000/healthz\""));
    assert!(has("ENTRYPOINT [\"/usr/local/bin/botvisor\"]"));
    assert!(file.contains("cargo build --release --locked --bin botvisor"));
    assert!(
        !file.contains("test-peer\n") && !file.contains("--features test-peer"),
        "never the test peer"
    );
    let ignore = repo(".dockerignore");
    assert!(
        ignore.lines().any(|l| l == "target/"),
        "the build context skips target/"
    );
    // The health command the HEALTHCHECK runs exists with that flag.
    let help = Command::new(env!("CARGO_BIN_EXE_botvisor"))
        .args(["health", "--help"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("--url"));
}

#[test]
fn the_health_command_tells_a_live_server_from_a_dead_one() {
    let s = Server::start(&[]);
    let url = format!("http://{}/healthz", s.addr);
    let run = |url: &str| {
        Command::new(env!("CARGO_BIN_EXE_botvisor"))
            .args(["health", "--url", url])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .unwrap()
    };
    assert_eq!(run(&url).status.code(), Some(0));
    let missing = run(&format!("http://{}/nope", s.addr));
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("answered 404"));
    let addr = s.addr;
    drop(s);
    let dead = run(&format!("http://{addr}/healthz"));
    assert_eq!(dead.status.code(), Some(1));
}
