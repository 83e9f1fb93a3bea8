//! `wa-footprint`: measures what the real WhatsApp link costs per session.
//!
//! Starts the loopback peer in this process, starts the botvisor binary given by
//! `--binary` (built with `--features test-peer`) on a fresh data dir, and reads the
//! botvisor process from outside only (`/proc/<pid>/status`, `/proc/<pid>/fd`,
//! `/proc/<pid>/smaps`) at each phase:
//!
//! 1. idle, before any session;
//! 2. `--sessions N` sessions pairing (each create must answer 201 with a code);
//! 3. the same N sessions paired and idle online (stop all, seed `pn` into each store,
//!    start all, wait for `onlineSessions == N`, then `--settle` seconds, 80 by default:
//!    an idle store closes its files after 30 s);
//! 4. after stopping all of them.
//!
//! Descriptors are counted for every phase, the stopped ones too (after pairing and after
//! the mass stop), with those still open on `sessions/*` (a stopped session holds none).
//!
//! Every loop is bounded in count and time; the child is killed on every exit path
//! (`botvisor_wa_peer::harness`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use botvisor_wa_peer::harness::{
    check, exit_on_error, fan_out, raise_nofile, seed_paired_file, start_botvisor, DirGuard,
};
use botvisor_wa_peer::Peer;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "wa-footprint",
    about = "Per-session RSS and fds of botvisor's real WhatsApp link, against the loopback peer"
)]
struct Args {
    /// The botvisor binary (built with --features test-peer, e.g. --profile peer-bench).
    #[arg(long)]
    binary: PathBuf,
    /// How many sessions.
    #[arg(long, default_value_t = 200)]
    sessions: usize,
    /// Concurrent HTTP clients for create / stop / start.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Seconds to let things settle once all sessions are online: a key store closes its
    /// connection 30-40 s after its last use and the link trims freed memory every 30 s,
    /// so the default measures the idle state (10 s measures stores still open).
    #[arg(long, default_value_t = 80)]
    settle: u64,
    /// Seconds to keep botvisor running after the last phase (to look at it: gdb, smaps).
    #[arg(long, default_value_t = 0)]
    linger: u64,
    /// Extra environment for botvisor, KEY=VALUE (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// A label for the summary line.
    #[arg(long, default_value = "default")]
    label: String,
    /// After the online measurement, also run `PRAGMA wal_checkpoint(TRUNCATE)` on every
    /// store from outside and measure again.
    #[arg(long)]
    checkpoint: bool,
    /// Print a /proc/<pid>/smaps breakdown (heap / anon / file / shm / stack) per phase.
    #[arg(long)]
    smaps: bool,
    /// Keep the data dir (its path is printed) instead of removing it.
    #[arg(long)]
    keep_dir: bool,
}

#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    rss_kib: u64,
    anon_kib: u64,
    file_kib: u64,
    shmem_kib: u64,
    fds: u64,
    /// Descriptors open on files under `sessions/` (the sessions' stores).
    store_fds: u64,
    threads: u64,
}

fn sample(pid: u32) -> Result<Sample, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("cannot read /proc/{pid}/status: {e}"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let links: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map_err(|e| format!("cannot list /proc/{pid}/fd: {e}"))?
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .collect();
    let fds = links.len() as u64;
    let store_fds = links
        .iter()
        .filter(|l| l.to_string_lossy().contains("/sessions/"))
        .count() as u64;
    Ok(Sample {
        rss_kib: field("VmRSS:"),
        anon_kib: field("RssAnon:"),
        file_kib: field("RssFile:"),
        shmem_kib: field("RssShmem:"),
        fds,
        store_fds,
        threads: field("Threads:"),
    })
}

/// Rss (KiB) by kind of mapping, from /proc/<pid>/smaps.
fn smaps_breakdown(pid: u32) -> Vec<(String, u64, u64)> {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return Vec::new();
    };
    let mut kinds: Vec<(String, u64, u64)> = Vec::new(); // (kind, rss KiB, mappings)
    let mut current = String::new();
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            let name = line.split_whitespace().nth(5).unwrap_or("");
            current = if name.is_empty() {
                "anon (no name)".into()
            } else if name == "[heap]" {
                "[heap] (brk)".into()
            } else if name.starts_with("[stack") {
                "[stack]".into()
            } else if name.ends_with("-shm") {
                "file: sessions/*.db-shm".into()
            } else if name.ends_with(".db") || name.ends_with("-wal") {
                "file: *.db / *-wal".into()
            } else if name.starts_with('/') {
                format!(
                    "file: {}",
                    Path::new(name)
                        .file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                )
            } else {
                name.to_string()
            };
            match kinds.iter_mut().find(|k| k.0 == current) {
                Some(k) => k.2 += 1,
                None => kinds.push((current.clone(), 0, 1)),
            }
        } else if let Some(rest) = line.strip_prefix("Rss:") {
            let kib: u64 = rest
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            if let Some(k) = kinds.iter_mut().find(|k| k.0 == current) {
                k.1 += kib;
            }
        }
    }
    kinds.sort_by_key(|k| std::cmp::Reverse(k.1));
    kinds
}

fn print_smaps(pid: u32, phase: &str) {
    println!("  smaps ({phase}):");
    for (kind, rss, maps) in smaps_breakdown(pid).iter().take(8) {
        println!("    {rss:>9} KiB  {maps:>6} maps  {kind}");
    }
}

fn show(phase: &str, s: &Sample) {
    println!(
        "{phase:<28} RSS {:>9} KiB (anon {:>9}, file {:>6}, shmem {:>6})  fds {:>5} (on sessions/ {:>5})  threads {:>4}",
        s.rss_kib, s.anon_kib, s.file_kib, s.shmem_kib, s.fds, s.store_fds, s.threads
    );
}

fn per_session(phase: &str, base: &Sample, now: &Sample, n: usize) -> (f64, f64) {
    let n = n.max(1) as f64;
    let rss = (now.rss_kib as f64 - base.rss_kib as f64) / n;
    let fds = (now.fds as f64 - base.fds as f64) / n;
    println!("  {phase}: {rss:.1} KiB RSS and {fds:.2} fds per session");
    (rss, fds)
}

fn id_of(i: usize) -> String {
    format!("fp{i:05}")
}

/// Session `i`'s account.
fn phone_of(i: usize) -> String {
    format!("1555{i:07}")
}

fn main() {
    let args = Args::parse();
    raise_nofile();
    exit_on_error("wa-footprint", || run(&args));
}

fn run(args: &Args) -> Result<(), String> {
    let n = args.sessions;
    let peer = Peer::start();
    let dir = DirGuard::fresh("wa-footprint", args.keep_dir)?;
    let url = peer.url();
    let bv = start_botvisor(&args.binary, &url, &dir.path, &[], &args.env)?;
    let (pid, addr, api) = (bv.pid, bv.addr.clone(), &bv.api);
    println!(
        "botvisor pid {pid} at {addr}; peer {url}; {n} sessions, {} clients; label {}; env {:?}",
        args.concurrency, args.label, args.env
    );

    // 1. Idle.
    std::thread::sleep(Duration::from_secs(2));
    let idle = sample(pid)?;
    show("idle", &idle);
    if args.smaps {
        print_smaps(pid, "idle");
    }

    // 2. N sessions pairing.
    let t0 = Instant::now();
    let failures = fan_out(n, args.concurrency, |i| {
        let body = format!(
            r#"{{"userId":"{}","phoneNumber":"{}"}}"#,
            id_of(i),
            phone_of(i)
        );
        let (status, v) = api.call("POST", "/api/sessions", Some(body))?;
        if status != 201 || v["pairingCode"].as_str().is_none() {
            return Err(format!("create {}: {status} {v}", id_of(i)));
        }
        Ok(())
    });
    let create_secs = t0.elapsed().as_secs_f64();
    check("create", failures)?;
    let rate = n as f64 / create_secs.max(1e-9);
    println!("created {n} sessions in {create_secs:.1} s ({rate:.1} creates/s)");
    std::thread::sleep(Duration::from_secs(3));
    let pairing = sample(pid)?;
    show("pairing", &pairing);
    let (pair_rss, pair_fds) = per_session("pairing", &idle, &pairing, n);
    if args.smaps {
        print_smaps(pid, "pairing");
    }

    // 3. The same sessions paired and idle online.
    let failures = fan_out(n, args.concurrency, |i| {
        let (status, v) = api.call("POST", &format!("/api/sessions/{}/stop", id_of(i)), None)?;
        (status == 200)
            .then_some(())
            .ok_or_else(|| format!("stop {}: {status} {v}", id_of(i)))
    });
    check("stop", failures)?;
    // A stop answers once the session's tasks are aborted; they are dropped at their
    // next poll.
    std::thread::sleep(Duration::from_secs(2));
    let stopped_pairing = sample(pid)?;
    show("stopped (after pairing)", &stopped_pairing);
    let (_, stopped_pairing_fds) =
        per_session("stopped (after pairing)", &idle, &stopped_pairing, n);
    let failures = fan_out(n, args.concurrency, |i| {
        seed_paired_file(
            &dir.path.join(format!("sessions/{}.db", id_of(i))),
            // Each session its own account: the peer, like WhatsApp, keeps one socket per
            // device and kicks the older one of two.
            &format!("{}:7@s.whatsapp.net", phone_of(i)),
            &format!("Footprint {i}"),
        )
    });
    check("seed", failures)?;
    let t1 = Instant::now();
    let failures = fan_out(n, args.concurrency, |i| {
        let (status, v) = api.call("POST", &format!("/api/sessions/{}/start", id_of(i)), None)?;
        (status == 200)
            .then_some(())
            .ok_or_else(|| format!("start {}: {status} {v}", id_of(i)))
    });
    check("start", failures)?;
    let limit = Duration::from_secs(60 + n as u64 / 5);
    api.wait_stats(limit, "all online", |v| {
        v["onlineSessions"].as_u64() == Some(n as u64)
    })?;
    println!(
        "all {n} online {:.1} s after the first start; peer logins {}",
        t1.elapsed().as_secs_f64(),
        peer.stats().logins
    );
    let settle_end = Instant::now() + Duration::from_secs(args.settle);
    while Instant::now() < settle_end {
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, stats) = api.call("GET", "/api/stats", None)?;
    if stats["onlineSessions"].as_u64() != Some(n as u64) {
        return Err(format!("sessions left online while settling: {stats}"));
    }
    let online = sample(pid)?;
    show("paired idle online", &online);
    let (on_rss, on_fds) = per_session("paired idle online", &idle, &online, n);
    if args.smaps {
        print_smaps(pid, "paired idle online");
    }
    let wal_kib = wal_bytes(&dir.path) / 1024;
    println!("  -wal files total {wal_kib} KiB");
    if args.checkpoint {
        let failures = fan_out(n, args.concurrency, |i| {
            let db = dir.path.join(format!("sessions/{}.db", id_of(i)));
            let c = rusqlite::Connection::open(&db).map_err(|e| e.to_string())?;
            c.busy_timeout(Duration::from_secs(10))
                .map_err(|e| e.to_string())?;
            c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                .map_err(|e| format!("{}: {e}", db.display()))
        });
        check("checkpoint", failures)?;
        std::thread::sleep(Duration::from_secs(3));
        let ck = sample(pid)?;
        show("online, after checkpoint", &ck);
        per_session("online, after checkpoint", &idle, &ck, n);
        println!("  -wal files total {} KiB", wal_bytes(&dir.path) / 1024);
    }

    // 4. Mass stop: does the memory come back?
    let failures = fan_out(n, args.concurrency, |i| {
        let (status, v) = api.call("POST", &format!("/api/sessions/{}/stop", id_of(i)), None)?;
        (status == 200)
            .then_some(())
            .ok_or_else(|| format!("stop {}: {status} {v}", id_of(i)))
    });
    check("mass stop", failures)?;
    api.wait_stats(Duration::from_secs(60), "none online", |v| {
        v["onlineSessions"].as_u64() == Some(0)
    })?;
    std::thread::sleep(Duration::from_secs(5));
    let after = sample(pid)?;
    show("after mass stop", &after);
    let (_, stopped_fds) = per_session("after mass stop", &idle, &after, n);
    let kept = after.rss_kib as f64 - idle.rss_kib as f64;
    let peak = online.rss_kib as f64 - idle.rss_kib as f64;
    println!(
        "  after mass stop: {kept:.0} KiB above idle ({:.0}% of the online growth kept)",
        if peak > 0.0 { 100.0 * kept / peak } else { 0.0 }
    );
    if args.smaps {
        print_smaps(pid, "after mass stop");
    }
    // Again once botvisor's late trim has run (12 s after its first, itself 1 s after the
    // last stop: once tokio's idle blocking threads have exited).
    std::thread::sleep(Duration::from_secs(11));
    let later = sample(pid)?;
    show("16 s after mass stop", &later);
    let kept_later = later.rss_kib as f64 - idle.rss_kib as f64;
    let kept_anon = later.anon_kib as f64 - idle.anon_kib as f64;
    let peak_anon = online.anon_kib as f64 - idle.anon_kib as f64;
    let pct = |part: f64, whole: f64| {
        if whole > 0.0 {
            100.0 * part / whole
        } else {
            0.0
        }
    };
    // What stays is of two kinds: anonymous memory the process holds (heaps, stacks) and
    // file-backed pages, clean and shared with the page cache: the binary's code the real
    // link paged in once, which the kernel takes back under pressure and the next
    // sessions use again.
    let kept_file = kept_later - kept_anon;
    println!(
        "  16 s after mass stop: {kept_later:.0} KiB above idle ({:.0}% of the online growth kept; anonymous memory alone: {:.1}%, {kept_anon:.0} KiB, {:.1} KiB per stopped session; file-backed {kept_file:.0} KiB)",
        pct(kept_later, peak),
        pct(kept_anon, peak_anon),
        kept_anon / n as f64
    );
    if args.smaps {
        print_smaps(pid, "16 s after mass stop");
    }
    println!(
        "SUMMARY label={} n={n} idle_rss_kib={} idle_fds={} create_per_s={rate:.1} pairing_kib={pair_rss:.1} pairing_fds={pair_fds:.2} stopped_pairing_fds={stopped_pairing_fds:.2} online_kib={on_rss:.1} online_fds={on_fds:.2} online_rss_kib={} stopped_rss_kib={} stopped_above_idle_kib={kept:.0} kept_pct={:.0} later_kept_pct={:.0} later_kept_anon_pct={:.1} later_kept_anon_kib={kept_anon:.0} later_kept_file_kib={kept_file:.0} stopped_fds={stopped_fds:.2} stopped_store_fds={}",
        args.label,
        idle.rss_kib,
        idle.fds,
        online.rss_kib,
        after.rss_kib,
        pct(kept, peak),
        pct(kept_later, peak),
        pct(kept_anon, peak_anon),
        after.store_fds
    );
    if args.linger > 0 {
        println!("lingering {} s; botvisor pid {pid}", args.linger);
        std::thread::sleep(Duration::from_secs(args.linger));
    }
    drop(bv);
    Ok(())
}

fn wal_bytes(data_dir: &Path) -> u64 {
    std::fs::read_dir(data_dir.join("sessions"))
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with("-wal"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}
