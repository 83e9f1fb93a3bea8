//! botvisor-bench: runs the real `botvisor` binary with the simulated link and prints
//! footprint and recovery figures, as an HTTP client sees them. Not a test: it asserts
//! nothing, it measures.
//!
//! ```text
//! cargo build --release && target/release/botvisor-bench --sessions 1000 --crashes 200
//! ```

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::Value;

/// Measures botvisor with the simulated link.
#[derive(Parser)]
struct Args {
    /// Sessions to create.
    #[arg(long, default_value_t = 500)]
    sessions: usize,
    /// Injected panics to time the crash -> online path.
    #[arg(long, default_value_t = 100)]
    crashes: usize,
    /// Concurrent HTTP clients for the creates.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// The botvisor binary [default: next to this one].
    #[arg(long)]
    binary: Option<PathBuf>,
}

struct Server {
    child: Child,
    base: String,
}

fn spawn(bin: &Path, data: &Path) -> (Server, Duration) {
    let started = Instant::now();
    let mut child = Command::new(bin)
        .args([
            "serve",
            "--link",
            "sim",
            "--bind",
            "127.0.0.1",
            "--port",
            "0",
            "--data-dir",
        ])
        .arg(data)
        .args([
            "--sim-pair-delay",
            "200ms",
            "--backoff-initial",
            "10ms",
            "--backoff-jitter",
            "0",
        ])
        .args(["--restart-max", "100000", "--create-timeout", "60s"])
        .env("RUST_LOG", "error")
        .env("RUST_BACKTRACE", "0")
        .stderr(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start botvisor");
    let out = child.stdout.take().expect("stdout");
    let mut line = String::new();
    let mut reader = BufReader::new(out);
    while reader.read_line(&mut line).unwrap_or(0) > 0 {
        if let Some(addr) = line.trim().strip_prefix("botvisor listening on ") {
            let base = addr.to_string();
            std::thread::spawn(move || for _ in reader.lines() {});
            return (Server { child, base }, started.elapsed());
        }
        line.clear();
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("botvisor did not start");
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

fn get(a: &ureq::Agent, url: &str) -> Value {
    let mut r = a.get(url).call().expect("GET");
    serde_json::from_str(&r.body_mut().read_to_string().expect("body")).expect("JSON")
}

fn post(a: &ureq::Agent, url: &str, body: &str) -> u16 {
    let r = a
        .post(url)
        .header("Content-Type", "application/json")
        .send(body)
        .expect("POST");
    r.status().as_u16()
}

/// (RSS in KiB, open descriptors) of a process.
fn footprint(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    (rss, fds)
}

fn wait_online(a: &ureq::Agent, base: &str, n: usize) {
    while get(a, &format!("{base}/api/stats"))["onlineSessions"].as_u64() != Some(n as u64) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pct(sorted: &[Duration], p: f64) -> String {
    if sorted.is_empty() {
        return "-".into();
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    format!("{:.2} ms", sorted[i].as_secs_f64() * 1000.0)
}

fn main() {
    let args = Args::parse();
    let bin = args.binary.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .expect("own path")
            .with_file_name("botvisor")
    });
    let data = std::env::temp_dir().join(format!("botvisor-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let n = args.sessions;
    println!(
        "botvisor-bench: {} sessions, {} crashes, {} clients, binary {}",
        n,
        args.crashes,
        args.clients,
        bin.display()
    );

    let (mut server, start_time) = spawn(&bin, &data);
    let a = agent();
    std::thread::sleep(Duration::from_millis(300));
    let (rss0, fds0) = footprint(server.child.id());
    println!(
        "start to listening            {:.1} ms",
        start_time.as_secs_f64() * 1000.0
    );
    println!(
        "idle                          RSS {} KiB, {} fds",
        rss0, fds0
    );

    // Creates, from several clients at once.
    let t0 = Instant::now();
    let per = n.div_ceil(args.clients.max(1));
    let mut latencies: Vec<Duration> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..args.clients.max(1))
            .map(|c| {
                let base = server.base.clone();
                scope.spawn(move || {
                    let a = agent();
                    let mut lat = Vec::new();
                    for i in (c * per)..((c + 1) * per).min(n) {
                        let body =
                            format!(r#"{{"userId":"bench_{i}","phoneNumber":"1555{i:07}"}}"#);
                        let t = Instant::now();
                        let status = post(&a, &format!("{base}/api/sessions"), &body);
                        assert_eq!(status, 201, "create bench_{i}");
                        lat.push(t.elapsed());
                    }
                    lat
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("client"))
            .collect()
    });
    let create_all = t0.elapsed();
    wait_online(&a, &server.base, n);
    let online_all = t0.elapsed();
    latencies.sort();
    let (rss1, fds1) = footprint(server.child.id());
    println!(
        "create (until first code)     p50 {}, p99 {}, max {}; {:.0} creates/s",
        pct(&latencies, 0.5),
        pct(&latencies, 0.99),
        pct(&latencies, 1.0),
        n as f64 / create_all.as_secs_f64()
    );
    println!(
        "all {n} online after          {:.2} s (sim pairing delay 200 ms)",
        online_all.as_secs_f64()
    );
    println!(
        "{n} sessions online           RSS {} KiB (+{:.1} KiB/session), {} fds (+{:.2}/session)",
        rss1,
        rss1.saturating_sub(rss0) as f64 / n as f64,
        fds1,
        fds1.saturating_sub(fds0) as f64 / n as f64
    );

    // Crash -> restarted -> online, as an HTTP client sees it.
    let mut recover = Vec::new();
    for i in 0..args.crashes.min(n) {
        let id = format!("bench_{i}");
        let before = get(&a, &format!("{}/api/sessions/{id}", server.base))["restarts"]
            .as_u64()
            .unwrap_or(0);
        let t = Instant::now();
        let status = post(
            &a,
            &format!("{}/api/sim/{id}/fault", server.base),
            r#"{"kind":"panic"}"#,
        );
        assert_eq!(status, 200);
        loop {
            let v = get(&a, &format!("{}/api/sessions/{id}", server.base));
            if v["restarts"].as_u64().unwrap_or(0) > before && v["state"] == "online" {
                break;
            }
        }
        recover.push(t.elapsed());
    }
    recover.sort();
    println!(
        "panic -> online (backoff 10 ms) p50 {}, p99 {}, max {} over {} crashes",
        pct(&recover, 0.5),
        pct(&recover, 0.99),
        pct(&recover, 1.0),
        recover.len()
    );

    // kill -9, then a boot that resumes every session.
    let _ = server.child.kill();
    let _ = server.child.wait();
    let t = Instant::now();
    let (mut server, _) = spawn(&bin, &data);
    let a = agent();
    wait_online(&a, &server.base, n);
    let (rss2, fds2) = footprint(server.child.id());
    println!(
        "kill -9, boot, all {n} online  {:.2} s; RSS {} KiB, {} fds",
        t.elapsed().as_secs_f64(),
        rss2,
        fds2
    );

    // Graceful stop of everything.
    let t = Instant::now();
    // SAFETY: sends SIGTERM to our own child.
    unsafe {
        libc::kill(server.child.id() as i32, libc::SIGTERM);
    }
    let status = server.child.wait().expect("wait");
    println!(
        "SIGTERM -> exit ({status})      {:.2} s",
        t.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&data);
}
