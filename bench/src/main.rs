//! botvisor-bench: the fleet benchmark. Runs a real `botvisor` binary with the simulated
//! link and measures it from outside only: `/proc/<pid>/{status,fd,stat,limits}`, the HTTP
//! API (including each session's event log) and `wrk`. Compares the read path with a
//! Node.js baseline (`bench/baseline-node`: the `http` module, and Express) serving the
//! same records. Not a test: it asserts nothing, it measures; it prints a Markdown summary.
//!
//! ```text
//! cargo build --release -p botvisor --bin botvisor && cargo build --release -p botvisor-bench
//! target/release/botvisor-bench --sessions 1000 --crashes 200
//! ```
//!
//! Every child process (servers, Node, wrk) is killed when the bench ends, also on errors
//! and panics (a Drop guard, and PR_SET_PDEATHSIG should the bench itself be killed).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::Value;

mod inbound;
mod nodes;

/// Measures botvisor with the simulated link, and a Node.js baseline on the read path.
#[derive(Parser, Debug)]
#[command(name = "botvisor-bench")]
struct Args {
    /// Sessions to create.
    #[arg(long, default_value_t = 1000)]
    sessions: usize,
    /// Sessions to crash (injected panics) to time crash -> reconnect begun.
    #[arg(long, default_value_t = 100)]
    crashes: usize,
    /// Concurrent HTTP clients for the creates.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// The botvisor binary [default: `botvisor` next to this one].
    #[arg(long)]
    binary: Option<PathBuf>,
    /// Extra argument for the server restarted after kill -9; repeatable, passed through
    /// as given (e.g. `--server-arg=--boot-interval --server-arg=0s`).
    #[arg(long = "server-arg", value_name = "ARG", allow_hyphen_values = true)]
    server_args: Vec<String>,
    /// `--database-url` of every server on the main data dir (e.g. a PostgreSQL
    /// `postgres://user@127.0.0.1:5432/db`, which must be empty) [default: the data dir's
    /// SQLite file].
    #[arg(long)]
    database_url: Option<String>,
    /// PID of the PostgreSQL postmaster behind `--database-url`: its CPU (with its
    /// backends') is measured beside botvisor's in the idle window.
    #[arg(long)]
    database_pid: Option<u32>,
    /// Simulated link: delay from pairing code to "paired".
    #[arg(long, default_value = "200ms")]
    pair_delay: String,
    /// Open-files hard limit for the "sessions one process can hold" run; 0 skips it.
    #[arg(long, default_value_t = 20_000)]
    fd_cap: u64,
    /// Window of the idle-CPU measurement, seconds (1-60).
    #[arg(long, default_value_t = 5)]
    idle_window: u64,
    /// Duration of each wrk run, seconds (1-120).
    #[arg(long, default_value_t = 10)]
    wrk_duration: u64,
    /// wrk threads.
    #[arg(long, default_value_t = 2)]
    wrk_threads: u32,
    /// wrk connections.
    #[arg(long, default_value_t = 64)]
    wrk_connections: u32,
    /// Warm-up before each wrk target, seconds (0-30; JIT for Node, caches for all).
    #[arg(long, default_value_t = 2)]
    wrk_warmup: u64,
    /// Skip the load section (wrk).
    #[arg(long)]
    no_load: bool,
    /// Skip the Node.js baseline.
    #[arg(long)]
    no_node: bool,
    /// Directory of the Node.js baseline [default: bench/baseline-node of this source tree].
    #[arg(long)]
    baseline_dir: Option<PathBuf>,
    /// Upper bound on any wait for sessions to come online, seconds.
    #[arg(long, default_value_t = 600)]
    max_wait: u64,
    /// Seconds of the inbound burst (sim inbound to signed webhooks); 0 skips it.
    #[arg(long, default_value_t = 0)]
    inbound_burst: u64,
    /// Sessions of the inbound burst.
    #[arg(long, default_value_t = 100)]
    inbound_sessions: usize,
    /// Concurrent HTTP clients of the inbound burst.
    #[arg(long, default_value_t = 16)]
    inbound_clients: usize,
    /// `--webhook-backlog-max` of the inbound burst's server.
    #[arg(long, default_value_t = 100_000)]
    inbound_backlog_max: u64,
    /// Run the inbound burst only (no fleet phases).
    #[arg(long)]
    only_inbound: bool,
    /// Seconds of each half of the send burst (direct sends, then queued ones; the inbound
    /// burst's sessions and clients); 0 skips it.
    #[arg(long, default_value_t = 0)]
    send_burst: u64,
    /// Run N nodes on the PostgreSQL of --database-url (empty) instead of the fleet
    /// phases: memory per node, forwarding, failover after kill -9, drain (issue 23).
    #[arg(long, default_value_t = 0)]
    nodes: usize,
}

// ---------------------------------------------------------------------------------------
// Child processes.

/// Pids of the children not yet reaped, and the work directory: what the signal thread
/// cleans up when the bench is interrupted (Drop guards do not run on a signal).
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());
static WORK_DIR: Mutex<Option<PathBuf>> = Mutex::new(None);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        set
    }
}

/// Blocks SIGINT/SIGTERM/SIGHUP in every thread (call first in main) and handles them on
/// one thread: kill the children, remove the work directory, exit 130.
fn install_signal_thread() {
    let set = stop_signals();
    // SAFETY: changes this thread's signal mask; threads spawned later inherit it.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    std::thread::spawn(move || {
        let mut sig: libc::c_int = 0;
        // SAFETY: waits for one of the blocked signals.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            return;
        }
        eprintln!("\n[bench] signal {sig}: stopping every child and leaving");
        for pid in lock(&CHILDREN).iter() {
            // SAFETY: the pid is a child of ours not yet reaped (removed when reaped).
            unsafe {
                libc::kill(*pid as libc::pid_t, libc::SIGKILL);
            }
        }
        if let Some(dir) = lock(&WORK_DIR).as_ref() {
            let _ = std::fs::remove_dir_all(dir);
        }
        std::process::exit(130);
    });
}

/// A child process, killed (SIGKILL) and reaped when dropped unless it already exited.
struct Proc {
    name: String,
    child: Child,
    exited: Option<ExitStatus>,
}

impl Proc {
    fn new(name: impl Into<String>, child: Child) -> Proc {
        lock(&CHILDREN).push(child.id());
        Proc {
            name: name.into(),
            child,
            exited: None,
        }
    }

    fn reaped(&mut self, status: Option<ExitStatus>) {
        self.exited = status;
        let pid = self.child.id();
        lock(&CHILDREN).retain(|p| *p != pid);
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, sig: libc::c_int) {
        if self.exited.is_none() {
            // SAFETY: sends a signal to our own, not yet reaped, child.
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, sig);
            }
        }
    }

    /// Waits up to `limit` for the child to exit.
    fn wait_timeout(&mut self, limit: Duration) -> Option<ExitStatus> {
        if self.exited.is_some() {
            return self.exited;
        }
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.reaped(Some(status));
                return self.exited;
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn kill9(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let status = self.child.wait().ok();
            self.reaped(status);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited.is_none() {
            if !matches!(self.child.try_wait(), Ok(Some(_))) {
                let _ = self.child.kill();
            }
            let _ = self.child.wait();
            self.reaped(None);
            eprintln!("[bench] stopped {} (pid {})", self.name, self.child.id());
        }
    }
}

/// Removes a directory when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Open-files limit applied in the child before exec.
#[derive(Clone, Copy)]
enum Nofile {
    /// soft = hard = this (the fd-cap run).
    Exact(u64),
    /// As high as we are allowed (root may raise the hard limit), so the main runs are not
    /// capped by the bench's own shell.
    Raise,
}

fn fs_nr_open() -> u64 {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20)
}

/// The child dies with the bench (PR_SET_PDEATHSIG), and gets the open-files limit.
fn prepare(cmd: &mut Command, nofile: Option<Nofile>) {
    let raise_to = fs_nr_open().min(1 << 20);
    let signals = stop_signals();
    // SAFETY: the closure only makes async-signal-safe calls (prctl, pthread_sigmask,
    // getrlimit, setrlimit) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            // The bench blocks these for its signal thread; the child must not inherit that.
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &signals, std::ptr::null_mut());
            match nofile {
                Some(Nofile::Exact(n)) => {
                    let lim = libc::rlimit {
                        rlim_cur: n as libc::rlim_t,
                        rlim_max: n as libc::rlim_t,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Some(Nofile::Raise) => {
                    let mut lim = libc::rlimit {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
                        let want = (raise_to as libc::rlim_t).max(lim.rlim_max);
                        let up = libc::rlimit {
                            rlim_cur: want,
                            rlim_max: want,
                        };
                        // Not root: keep what we have (the server lifts soft to hard).
                        let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &up);
                    }
                }
                None => {}
            }
            Ok(())
        });
    }
}

/// Reads the child's stdout until a line yields `Some(addr)`, then keeps draining it.
fn wait_ready(
    child: &mut Child,
    limit: Duration,
    parse: fn(&str) -> Option<String>,
) -> Result<String, String> {
    let out = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(out);
        let mut line = String::new();
        let mut sent = false;
        while reader.read_line(&mut line).unwrap_or(0) > 0 {
            if !sent {
                if let Some(addr) = parse(line.trim()) {
                    let _ = tx.send(addr);
                    sent = true;
                }
            }
            line.clear();
        }
    });
    rx.recv_timeout(limit).map_err(|e| match e {
        mpsc::RecvTimeoutError::Timeout => format!("no ready line within {limit:?}"),
        mpsc::RecvTimeoutError::Disconnected => "exited before it was ready".to_string(),
    })
}

/// The `error:` line of a server's complaint, else its first line.
fn first_error_line(e: &str) -> String {
    e.lines()
        .find(|l| l.trim_start().starts_with("error"))
        .or_else(|| e.lines().next())
        .unwrap_or("")
        .trim()
        .to_string()
}

/// An error on one line: its first line, and the server's `error:` line if any.
fn brief(e: &str) -> String {
    let first = e.lines().next().unwrap_or("").trim();
    let err = first_error_line(e);
    if err == first {
        first.to_string()
    } else {
        format!("{first} {err}")
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

struct ServerSpec<'a> {
    /// `--database-url`, when not the data dir's SQLite file.
    database_url: Option<&'a str>,
    bin: &'a Path,
    data: &'a Path,
    pair_delay: &'a str,
    nofile: Nofile,
    extra: &'a [String],
    log: PathBuf,
}

/// The flags every botvisor run gets.
fn base_server_args(data: &Path, pair_delay: &str) -> Vec<String> {
    [
        "serve",
        "--link",
        "sim",
        "--bind",
        "127.0.0.1",
        "--port",
        "0",
        "--data-dir",
        &data.display().to_string(),
        "--sim-pair-delay",
        pair_delay,
        // Restart at once after a crash: the crash figure is the supervisor's own
        // latency, not a backoff delay (--backoff-initial must be <= --backoff-max).
        "--backoff-initial",
        "0s",
        "--backoff-jitter",
        "0",
        "--restart-max",
        "100000",
        "--create-timeout",
        "60s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

struct Server {
    proc: Proc,
    base: String,
    args: Vec<String>,
    /// Spawn to the "listening" line.
    ready_after: Duration,
    spawned: Instant,
}

fn spawn_server(spec: &ServerSpec) -> Result<Server, String> {
    let mut args = base_server_args(spec.data, spec.pair_delay);
    if let Some(url) = spec.database_url {
        args.extend(["--database-url".to_string(), url.to_string()]);
    }
    args.extend(spec.extra.iter().cloned());
    let log = std::fs::File::create(&spec.log).map_err(|e| format!("server log: {e}"))?;
    let mut cmd = Command::new(spec.bin);
    cmd.args(&args)
        .env("RUST_LOG", "error")
        .env("RUST_BACKTRACE", "0")
        .env_remove("API_KEY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    prepare(&mut cmd, Some(spec.nofile));
    let spawned = Instant::now();
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", spec.bin.display()))?;
    let mut proc = Proc::new("botvisor", child);
    let parse = |l: &str| l.strip_prefix("botvisor listening on ").map(str::to_string);
    match wait_ready(&mut proc.child, Duration::from_secs(120), parse) {
        Ok(base) => Ok(Server {
            proc,
            base,
            args,
            ready_after: spawned.elapsed(),
            spawned,
        }),
        Err(e) => {
            proc.kill9();
            Err(format!(
                "botvisor {e} (args: {}); its stderr ends:\n{}",
                args.join(" "),
                tail(&spec.log, 15)
            ))
        }
    }
}

// ---------------------------------------------------------------------------------------
// HTTP.

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .build()
        .into()
}

/// (status, body) of a GET.
fn get_raw(a: &ureq::Agent, url: &str) -> Result<(u16, String), String> {
    let mut r = a.get(url).call().map_err(|e| format!("GET {url}: {e}"))?;
    let status = r.status().as_u16();
    let body = r
        .body_mut()
        .with_config()
        .limit(1 << 30)
        .read_to_string()
        .map_err(|e| format!("GET {url}: body: {e}"))?;
    Ok((status, body))
}

fn get_json(a: &ureq::Agent, url: &str) -> Result<Value, String> {
    let (_, body) = get_raw(a, url)?;
    serde_json::from_str(&body).map_err(|e| format!("GET {url}: not JSON: {e}"))
}

fn post(a: &ureq::Agent, url: &str, body: &str) -> Result<(u16, String), String> {
    let mut r = a
        .post(url)
        .header("Content-Type", "application/json")
        .send(body)
        .map_err(|e| format!("POST {url}: {e}"))?;
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap_or_default();
    Ok((status, text))
}

fn message_of(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| body.chars().take(200).collect())
}

/// Polls `/api/stats` until `onlineSessions >= n`; the time it took, or None at `limit`.
fn wait_online(
    a: &ureq::Agent,
    base: &str,
    n: usize,
    since: Instant,
    limit: Duration,
) -> Option<Duration> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(v) = get_json(a, &format!("{base}/api/stats")) {
            if v["onlineSessions"].as_u64().unwrap_or(0) >= n as u64 {
                return Some(since.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn online_limit(args: &Args, n: usize) -> Duration {
    Duration::from_secs(30 + n as u64 / 50).min(Duration::from_secs(args.max_wait.max(1)))
}

// ---------------------------------------------------------------------------------------
// /proc.

#[derive(Clone, Copy, Default)]
struct Footprint {
    rss_kib: u64,
    fds: usize,
    threads: u64,
}

fn footprint(pid: u32) -> Footprint {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    Footprint {
        rss_kib: field("VmRSS:"),
        fds,
        threads: field("Threads:"),
    }
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // After "pid (comm)": state is field 3, utime 14, stime 15 (1-based).
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) as f64 / hz
}

fn open_files_limit(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .map(|l| {
            let v: Vec<&str> = l.split_whitespace().collect();
            format!(
                "soft {} / hard {}",
                v.get(3).unwrap_or(&"?"),
                v.get(4).unwrap_or(&"?")
            )
        })
        .unwrap_or_else(|| "?".into())
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|k| format!(", {:.1} GiB RAM", k as f64 / 1048576.0))
        .unwrap_or_default();
    format!("nproc {nproc}, {model}, Linux {kernel}{mem}")
}

// ---------------------------------------------------------------------------------------
// Figures.

fn pct(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

fn ms(v: Option<f64>) -> String {
    match v {
        Some(v) if v >= 100.0 => format!("{v:.0} ms"),
        Some(v) if v >= 10.0 => format!("{v:.1} ms"),
        Some(v) => format!("{v:.2} ms"),
        None => "-".into(),
    }
}

fn secs(d: Option<Duration>) -> String {
    match d {
        Some(d) if d < Duration::from_secs(1) => format!("{:.0} ms", d.as_secs_f64() * 1e3),
        Some(d) => format!("{:.2} s", d.as_secs_f64()),
        None => "timed out".into(),
    }
}

fn kib(v: f64) -> String {
    if v >= 1024.0 {
        format!("{:.1} MiB", v / 1024.0)
    } else {
        format!("{v:.1} KiB")
    }
}

/// Milliseconds since the epoch of `YYYY-MM-DDTHH:MM:SS.mmmZ`.
fn parse_iso_ms(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let frac = s.get(19..)?.trim_end_matches('Z');
    let milli = match frac.strip_prefix('.') {
        Some(f) if !f.is_empty() => {
            let digits: String = f.chars().take(3).collect();
            digits.parse::<i64>().ok()? * 10i64.pow(3 - digits.len() as u32)
        }
        _ => 0,
    };
    // Days from civil (Howard Hinnant).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some(((days * 24 + h) * 60 + mi) * 60_000 + se * 1000 + milli)
}

/// From an event log (newest first): ms from the newest `from` event to the next `to`.
fn span_after(events: &[Value], from: &str, to: &str) -> Option<f64> {
    let j = events.iter().position(|e| e["state"] == from)?;
    let t0 = parse_iso_ms(events[j]["at"].as_str()?)?;
    let next = events[..j].iter().rev().find(|e| e["state"] == to)?;
    let t1 = parse_iso_ms(next["at"].as_str()?)?;
    Some((t1 - t0) as f64)
}

// ---------------------------------------------------------------------------------------
// Creates.

struct Creates {
    created: usize,
    /// Indices i of the `bench_i` sessions created, sorted (a refusal can leave a gap).
    ids: Vec<usize>,
    latencies_ms: Vec<f64>,
    elapsed: Duration,
    /// The first refusal: (session index, status, message).
    refused: Option<(usize, u16, String)>,
}

/// Creates `bench_0..n` from `clients` threads; stops at the first non-201.
fn create_sessions(base: &str, n: usize, clients: usize) -> Creates {
    let clients = clients.clamp(1, 256);
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let refused: Mutex<Option<(usize, u16, String)>> = Mutex::new(None);
    let t0 = Instant::now();
    let done: Vec<(usize, f64)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                let (next, stop, refused) = (&next, &stop, &refused);
                scope.spawn(move || {
                    let a = agent(Duration::from_secs(90));
                    let mut lat = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            break;
                        }
                        let body =
                            format!(r#"{{"userId":"bench_{i}","phoneNumber":"1555{i:07}"}}"#);
                        let t = Instant::now();
                        let answer = post(&a, &format!("{base}/api/sessions"), &body);
                        let took = t.elapsed().as_secs_f64() * 1e3;
                        match answer {
                            Ok((201, _)) => lat.push((i, took)),
                            other => {
                                stop.store(true, Ordering::Relaxed);
                                let (status, msg) = match other {
                                    Ok((s, b)) => (s, message_of(&b)),
                                    Err(e) => (0, e),
                                };
                                let mut r = refused.lock().unwrap_or_else(|p| p.into_inner());
                                if r.as_ref().is_none_or(|(j, _, _)| i < *j) {
                                    *r = Some((i, status, msg));
                                }
                                break;
                            }
                        }
                    }
                    lat
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let elapsed = t0.elapsed();
    let mut ids: Vec<usize> = done.iter().map(|d| d.0).collect();
    ids.sort_unstable();
    let mut latencies_ms: Vec<f64> = done.iter().map(|d| d.1).collect();
    latencies_ms.sort_by(f64::total_cmp);
    Creates {
        created: latencies_ms.len(),
        ids,
        latencies_ms,
        elapsed,
        refused: refused.into_inner().unwrap_or_else(|p| p.into_inner()),
    }
}

// ---------------------------------------------------------------------------------------
// Load (wrk) and the Node baseline.

fn have(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn version_of(cmd: &str, arg: &str) -> String {
    Command::new(cmd)
        .arg(arg)
        .output()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).to_string();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_default()
}

/// Reads a child's pipe to its end on a thread of its own.
fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_string(&mut s);
        }
        s
    })
}

/// Runs a command with a time bound; (exit status, stdout, stderr).
fn run_bounded(
    mut cmd: Command,
    name: &str,
    limit: Duration,
) -> Result<(ExitStatus, String, String), String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    prepare(&mut cmd, None);
    let child = cmd.spawn().map_err(|e| format!("cannot run {name}: {e}"))?;
    let mut p = Proc::new(name, child);
    let t_out = drain(p.child.stdout.take());
    let t_err = drain(p.child.stderr.take());
    let status = p.wait_timeout(limit);
    if status.is_none() {
        p.kill9();
    }
    let stdout = t_out.join().unwrap_or_default();
    let stderr = t_err.join().unwrap_or_default();
    match status {
        Some(s) => Ok((s, stdout, stderr)),
        None => Err(format!("{name} did not finish within {limit:?}; killed")),
    }
}

struct NodeServer {
    proc: Proc,
    base: String,
}

fn spawn_node(dir: &Path, mode: &str, data: &Path, log: &Path) -> Result<NodeServer, String> {
    let log_file = std::fs::File::create(log).map_err(|e| e.to_string())?;
    let mut cmd = Command::new("node");
    cmd.current_dir(dir)
        .arg("server.js")
        .arg(mode)
        .arg("0")
        .arg(data)
        .env("NODE_ENV", "production")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file);
    prepare(&mut cmd, None);
    let child = cmd.spawn().map_err(|e| format!("cannot start node: {e}"))?;
    let mut proc = Proc::new(format!("node {mode}"), child);
    let parse = |l: &str| {
        l.strip_prefix("baseline-node ")
            .and_then(|r| r.split_once(" listening on "))
            .map(|(_, r)| r.split_whitespace().next().unwrap_or("").to_string())
    };
    match wait_ready(&mut proc.child, Duration::from_secs(60), parse) {
        Ok(base) => Ok(NodeServer { proc, base }),
        Err(e) => {
            proc.kill9();
            Err(format!(
                "node {mode} {e}; its stderr ends:\n{}",
                tail(log, 10)
            ))
        }
    }
}

#[derive(Clone, Default)]
struct WrkResult {
    rps: f64,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    requests: u64,
    non2xx: u64,
    socket_errors: String,
    /// Server CPU during the run, % of one core.
    server_cpu: f64,
}

fn wrk_time_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (v, unit) = s.split_at(split);
    let v: f64 = v.parse().ok()?;
    Some(match unit {
        "us" => v / 1e3,
        "ms" => v,
        "s" => v * 1e3,
        "m" => v * 60e3,
        "h" => v * 3600e3,
        _ => return None,
    })
}

fn parse_wrk(out: &str) -> WrkResult {
    let mut r = WrkResult::default();
    for line in out.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            r.rps = v.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = t.strip_prefix("50%") {
            r.p50_ms = wrk_time_ms(v);
        } else if let Some(v) = t.strip_prefix("99%") {
            r.p99_ms = wrk_time_ms(v);
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            r.non2xx = v.trim().parse().unwrap_or(0);
        } else if let Some(v) = t.strip_prefix("Socket errors:") {
            r.socket_errors = v.trim().to_string();
        } else if t.contains(" requests in ") {
            r.requests = t
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        }
    }
    r
}

struct WrkPlan<'a> {
    threads: u32,
    connections: u32,
    duration: u64,
    warmup: u64,
    script: &'a Path,
}

/// One wrk run; `script` picks the path, else `path` is fixed.
fn wrk(plan: &WrkPlan, base: &str, path: Option<&str>, pid: u32) -> Result<WrkResult, String> {
    let run = |secs: u64, latency: bool| {
        let mut cmd = Command::new("wrk");
        cmd.arg(format!("-t{}", plan.threads))
            .arg(format!("-c{}", plan.connections))
            .arg(format!("-d{secs}s"));
        if latency {
            cmd.arg("--latency");
        }
        match path {
            Some(p) => {
                cmd.arg(format!("{base}{p}"));
            }
            None => {
                cmd.arg("-s").arg(plan.script).arg(format!("{base}/"));
            }
        }
        run_bounded(cmd, "wrk", Duration::from_secs(secs + 30))
    };
    if plan.warmup > 0 {
        run(plan.warmup, false)?;
    }
    let cpu0 = cpu_seconds(pid);
    let t0 = Instant::now();
    let (status, out, err) = run(plan.duration, true)?;
    let cpu = (cpu_seconds(pid) - cpu0) / t0.elapsed().as_secs_f64() * 100.0;
    if !status.success() {
        return Err(format!("wrk failed ({status}): {}", err.trim()));
    }
    let mut r = parse_wrk(&out);
    r.server_cpu = cpu;
    Ok(r)
}

/// Compares two bodies: "identical" or where they first differ.
fn compare(a: &str, b: &str) -> String {
    if a == b {
        return format!("identical ({} bytes)", a.len());
    }
    let at = a
        .bytes()
        .zip(b.bytes())
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()));
    let from = at.saturating_sub(30);
    let show = |s: &str| {
        s.get(from..(at + 40).min(s.len()))
            .unwrap_or("")
            .to_string()
    };
    format!(
        "DIFFER at byte {at}: botvisor …{}… vs …{}…",
        show(a),
        show(b)
    )
}

// ---------------------------------------------------------------------------------------
// The run.

/// Collected figures for the summary.
#[derive(Default)]
struct Report {
    rows: Vec<(String, String)>,
    reads: Vec<(String, BTreeMap<String, WrkResult>)>,
    notes: Vec<String>,
}

impl Report {
    fn row(&mut self, k: impl Into<String>, v: impl Into<String>) {
        let (k, v) = (k.into(), v.into());
        println!("  {k}: {v}");
        self.rows.push((k, v));
    }
    fn note(&mut self, s: impl Into<String>) {
        let s = s.into().replace('\n', " / ");
        println!("  note: {s}");
        self.notes.push(s);
    }
}

const TARGETS: [&str; 3] = ["botvisor", "Node http", "Express"];

fn main() {
    install_signal_thread();
    let args = Args::parse();
    let mut report = Report::default();
    let header = header(&args);
    let result = run(&args, &mut report);
    if let Err(e) = &result {
        println!("\nbench stopped early: {e}");
        report
            .notes
            .push(format!("bench stopped early: {}", brief(e)));
    }
    println!("\n{}", summary(&header, &report));
    if result.is_err() {
        std::process::exit(1);
    }
}

fn bin_path(args: &Args) -> PathBuf {
    args.binary.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .map(|p| p.with_file_name("botvisor"))
            .unwrap_or_else(|_| PathBuf::from("botvisor"))
    })
}

fn header(args: &Args) -> String {
    let bin = bin_path(args);
    format!(
        "Machine: {}\n\nbotvisor: `{}` ({}), `--link sim`, {} sessions, {} create clients, {} crashes, rows in {}",
        machine(),
        bin.display(),
        version_of(&bin.display().to_string(), "--version"),
        args.sessions,
        args.clients,
        args.crashes,
        match &args.database_url {
            Some(url) if url.starts_with("postgres") => "PostgreSQL",
            Some(_) => "SQLite (--database-url)",
            None => "SQLite (the data dir's botvisor.db)",
        }
    )
}

/// What the phases of a run share.
struct Ctx<'a> {
    args: &'a Args,
    bin: PathBuf,
    work: &'a Path,
    /// Data dir of the main runs (the first server and its restart after kill -9).
    data: PathBuf,
    /// Sessions to create (`--sessions`, at least 1).
    n: usize,
    /// For the polls and fault injections between the phases.
    api: ureq::Agent,
}

impl Ctx<'_> {
    /// A server of the main runs: their data dir, the open-files limit raised.
    fn main_server<'s>(&'s self, extra: &'s [String], log: &str) -> ServerSpec<'s> {
        ServerSpec {
            database_url: self.args.database_url.as_deref(),
            bin: &self.bin,
            data: &self.data,
            pair_delay: &self.args.pair_delay,
            nofile: Nofile::Raise,
            extra,
            log: self.work.join(log),
        }
    }
}

fn run(args: &Args, report: &mut Report) -> Result<(), String> {
    let bin = bin_path(args);
    if !bin.exists() {
        return Err(format!(
            "no botvisor binary at {} (build it: cargo build --release -p botvisor --bin botvisor, or pass --binary)",
            bin.display()
        ));
    }
    let work = TempDir(std::env::temp_dir().join(format!("botvisor-bench-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&work.0);
    std::fs::create_dir_all(&work.0).map_err(|e| format!("temp dir: {e}"))?;
    *lock(&WORK_DIR) = Some(work.0.clone());
    println!("botvisor-bench: {}", header(args).replace("\n\n", "\n"));
    println!("work dir {}", work.0.display());
    let (wrk_ok, baseline) = check_tools(args, report);
    let ctx = Ctx {
        args,
        bin,
        work: &work.0,
        data: work.0.join("data"),
        n: args.sessions.max(1),
        api: agent(Duration::from_secs(30)),
    };

    if args.nodes > 0 {
        return nodes::run(&ctx, report, args.nodes.max(2));
    }

    if args.only_inbound {
        if args.send_burst > 0 {
            inbound::send_burst(&ctx, report)?;
        }
        if args.inbound_burst == 0 {
            return Ok(());
        }
        return inbound::inbound_burst(&ctx, report);
    }

    // ---- 1. Footprint, creates, idle CPU.
    println!("\n== footprint and creates");
    let mut server = spawn_server(&ctx.main_server(&[], "server-1.log"))?;
    let pid = server.proc.pid();
    println!("  server args: {}", server.args.join(" "));
    let idle = idle_footprint(report, &server);
    let c = creates(&ctx, report, &server.base)?;
    let held = c.created;
    sessions_footprint(report, pid, idle, held);
    idle_cpu(args, report, pid, held);
    commit_latency(&ctx, report, &server.base);

    // ---- 2. Reads under load.
    if wrk_ok {
        println!("\n== reads under load (wrk)");
        if let Err(e) = load(&ctx, report, &server, &c.ids, baseline.as_deref()) {
            report.note(format!("load section failed: {e}"));
        }
    }

    // ---- 3. Crash -> reconnect begun.
    crashes(&ctx, report, &server.base, &c.ids);

    // ---- 4. kill -9 and a boot that resumes every session.
    println!("\n== kill -9, restart");
    server.proc.kill9();
    drop(server);
    let server = kill9_restart(&ctx, report, held)?;

    // ---- 5. SIGTERM.
    sigterm(report, server, held);

    // ---- 6. How many sessions one process holds with an fd limit.
    if args.fd_cap > 0 {
        open_files_cap(&ctx, report)?;
    }

    // ---- 7. Inbound burst to signed webhooks.
    if args.send_burst > 0 {
        inbound::send_burst(&ctx, report)?;
    }
    if args.inbound_burst > 0 {
        inbound::inbound_burst(&ctx, report)?;
    }
    Ok(())
}

/// Tools, checked up front (and npm ci outside any measurement): whether wrk runs, and the
/// Node baseline's directory when the baseline runs too.
fn check_tools(args: &Args, report: &mut Report) -> (bool, Option<PathBuf>) {
    let wrk_ok = !args.no_load && have("wrk");
    if !args.no_load && !wrk_ok {
        report.note("wrk not found: load section skipped (install it: apt-get install wrk)");
    }
    let baseline_dir = args
        .baseline_dir
        .clone()
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("baseline-node"));
    let node_ok = wrk_ok && !args.no_node && node_ready(&baseline_dir, report);
    (wrk_ok, node_ok.then_some(baseline_dir))
}

/// The fresh server with no sessions: its open-files limit, start to listening, RSS, fds.
fn idle_footprint(report: &mut Report, server: &Server) -> Footprint {
    let pid = server.proc.pid();
    report.row("open-files limit of the main runs", open_files_limit(pid));
    report.row(
        "start to listening (empty data dir)",
        secs(Some(server.ready_after)),
    );
    std::thread::sleep(Duration::from_millis(500));
    let idle = footprint(pid);
    report.row("idle RSS, no sessions", kib(idle.rss_kib as f64));
    report.row("idle fds, no sessions", idle.fds.to_string());
    idle
}

/// The creates: creates/s, create latency, and the first create to all of them online.
fn creates(ctx: &Ctx, report: &mut Report, base: &str) -> Result<Creates, String> {
    let (args, n) = (ctx.args, ctx.n);
    let c = create_sessions(base, n, args.clients);
    let held = c.created;
    report.row(
        format!("creates/s ({} clients)", args.clients.clamp(1, 256)),
        format!("{:.0}", held as f64 / c.elapsed.as_secs_f64()),
    );
    report.row(
        "create latency p50 / p99 (POST until 201)",
        p50_p99(&c.latencies_ms),
    );
    if let Some((i, status, msg)) = &c.refused {
        report.note(format!(
            "main run: create bench_{i} answered {status} ({msg}); continuing with {held} sessions \
             (to hold all {n}, raise the hard open-files limit the bench runs under: ulimit -Hn, \
             which needs CAP_SYS_RESOURCE)"
        ));
    }
    if held == 0 {
        return Err("no session could be created".into());
    }
    let since = Instant::now() - c.elapsed;
    let online = wait_online(&ctx.api, base, held, since, online_limit(args, held));
    report.row(
        format!(
            "all {held} online, from the first create (pairing {})",
            args.pair_delay
        ),
        secs(online),
    );
    Ok(c)
}

/// RSS, fds and threads with `held` idle online sessions, against the `idle` server.
fn sessions_footprint(report: &mut Report, pid: u32, idle: Footprint, held: usize) {
    std::thread::sleep(Duration::from_secs(1));
    let full = footprint(pid);
    report.row(
        format!("RSS with {held} idle online sessions"),
        kib(full.rss_kib as f64),
    );
    report.row(
        "RSS per idle session",
        kib(full.rss_kib.saturating_sub(idle.rss_kib) as f64 / held as f64),
    );
    report.row(format!("fds with {held} sessions"), full.fds.to_string());
    report.row(
        "fds per idle session",
        format!(
            "{:.2}",
            full.fds.saturating_sub(idle.fds) as f64 / held as f64
        ),
    );
    report.row(
        "threads, idle / with sessions",
        format!("{} / {}", idle.threads, full.threads),
    );
}

/// Server CPU over `--idle-window` with `held` idle online sessions (and the database's,
/// with `--database-pid`).
fn idle_cpu(args: &Args, report: &mut Report, pid: u32, held: usize) {
    let window = Duration::from_secs(args.idle_window.clamp(1, 60));
    let cpu0 = cpu_seconds(pid);
    let db0 = args.database_pid.map(tree_cpu_seconds);
    let t = Instant::now();
    std::thread::sleep(window);
    let elapsed = t.elapsed().as_secs_f64();
    let idle_cpu = (cpu_seconds(pid) - cpu0) / elapsed * 100.0;
    report.row(
        format!(
            "idle CPU, {held} online sessions, {} s window",
            window.as_secs()
        ),
        format!("{idle_cpu:.2} % of one core"),
    );
    if let (Some(db), Some(db0)) = (args.database_pid, db0) {
        let used = (tree_cpu_seconds(db) - db0) / elapsed * 100.0;
        report.row(
            "idle CPU of the database server (postmaster and its children), same window",
            format!("{used:.2} % of one core"),
        );
    }
}

/// CPU seconds of a process and its direct children alive now (a PostgreSQL postmaster
/// and its backends; a backend that ended within the window is not counted).
fn tree_cpu_seconds(pid: u32) -> f64 {
    let mut total = cpu_seconds(pid);
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        // Fields after the ")" of the command: state, ppid, ...
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            total += cpu_seconds(child);
        }
    }
    total
}

/// Group-commit latency, p50 and p99, from the server's own histogram
/// (`botvisor_store_commit_duration_seconds` on `/metrics`, interpolated within buckets)
/// over everything so far (the creates, pairing, coming online).
fn commit_latency(ctx: &Ctx, report: &mut Report, base: &str) {
    let Ok((200, text)) = get_raw(&ctx.api, &format!("{base}/metrics")) else {
        report.note("commit latency: /metrics did not answer");
        return;
    };
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("botvisor_store_commit_duration_seconds_bucket{le=\"")
        else {
            continue;
        };
        let Some((le, count)) = rest.split_once("\"} ") else {
            continue;
        };
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap_or(f64::NAN)
        };
        if let Ok(count) = count.trim().parse::<f64>() {
            buckets.push((le, count));
        }
    }
    let total = buckets.last().map_or(0.0, |b| b.1);
    if total == 0.0 {
        report.note("commit latency: no commits counted on /metrics");
        return;
    }
    let quantile = |q: f64| -> String {
        let want = q * total;
        let mut lower = (0.0, 0.0);
        for &(le, count) in &buckets {
            if count >= want {
                if le.is_infinite() {
                    return format!("> {:.1} ms", lower.0 * 1000.0);
                }
                let span = (count - lower.1).max(1.0);
                let at = lower.0 + (le - lower.0) * (want - lower.1) / span;
                return format!("{:.2} ms", at * 1000.0);
            }
            lower = (le, count);
        }
        "?".into()
    };
    report.row(
        format!("group commit, p50 / p99 ({total} commits, from /metrics)"),
        format!("{} / {}", quantile(0.5), quantile(0.99)),
    );
}

/// "p50 / p99" of sorted milliseconds.
fn p50_p99(sorted: &[f64]) -> String {
    format!("{} / {}", ms(pct(sorted, 0.5)), ms(pct(sorted, 0.99)))
}

/// Crash -> reconnect begun: injected panics in the first `--crashes` of the `ids` (all
/// online), timed from each session's event log.
fn crashes(ctx: &Ctx, report: &mut Report, base: &str, ids: &[usize]) {
    println!("\n== crashes");
    let held = ids.len();
    let k = ctx.args.crashes.min(held);
    let faults_failed = inject_panics(&ctx.api, base, &ids[..k]);
    let back = wait_online(
        &ctx.api,
        base,
        held,
        Instant::now(),
        online_limit(ctx.args, k),
    );
    if back.is_none() {
        report.note("not every crashed session came back online in time");
    }
    let (to_connecting, to_online) = restart_spans(&ctx.api, base, &ids[..k]);
    report.row(
        format!(
            "crash → reconnect begun, p50 / p99 ({} of {k} crashes; event log, ms resolution)",
            to_connecting.len()
        ),
        p50_p99(&to_connecting),
    );
    report.row(
        "crash → online again, p50 / p99 (event log)",
        p50_p99(&to_online),
    );
    if faults_failed > 0 {
        report.note(format!(
            "{faults_failed} of {k} fault injections were not answered 200"
        ));
    }
}

/// Makes each of `ids` panic (sim fault); how many injections were not answered 200.
fn inject_panics(a: &ureq::Agent, base: &str, ids: &[usize]) -> usize {
    let mut faults_failed = 0;
    for &i in ids {
        match post(
            a,
            &format!("{base}/api/sim/bench_{i}/fault"),
            r#"{"kind":"panic"}"#,
        ) {
            Ok((200, _)) => {}
            _ => faults_failed += 1,
        }
    }
    faults_failed
}

/// From the event logs of `ids`: ms from the last restart to connecting, and to online,
/// each sorted.
fn restart_spans(a: &ureq::Agent, base: &str, ids: &[usize]) -> (Vec<f64>, Vec<f64>) {
    let (mut to_connecting, mut to_online) = (Vec::new(), Vec::new());
    for &i in ids {
        let Ok(v) = get_json(a, &format!("{base}/api/sessions/bench_{i}/events")) else {
            continue;
        };
        let events = v["events"].as_array().cloned().unwrap_or_default();
        if let Some(d) = span_after(&events, "restarting", "connecting") {
            to_connecting.push(d);
        }
        if let Some(d) = span_after(&events, "restarting", "online") {
            to_online.push(d);
        }
    }
    to_connecting.sort_by(f64::total_cmp);
    to_online.sort_by(f64::total_cmp);
    (to_connecting, to_online)
}

/// The boot after kill -9 that resumes every session: to listening, to the API answering,
/// to all `held` sessions online, and the footprint after.
fn kill9_restart(ctx: &Ctx, report: &mut Report, held: usize) -> Result<Server, String> {
    let server = restart_server(ctx, report)?;
    println!("  server args: {}", server.args.join(" "));
    let api = api_answers(&server);
    report.row(
        "kill -9 → restarted server listening",
        secs(Some(server.ready_after)),
    );
    report.row("kill -9 → API answers (GET /api/stats 200)", secs(api));
    let all = wait_online(
        &ctx.api,
        &server.base,
        held,
        server.spawned,
        online_limit(ctx.args, held),
    );
    report.row(format!("kill -9 → all {held} sessions online"), secs(all));
    let after = footprint(server.proc.pid());
    report.row(
        "RSS / fds after the reboot",
        format!("{} / {}", kib(after.rss_kib as f64), after.fds),
    );
    Ok(server)
}

/// Starts the server again on the main data dir with `--server-arg`; without them should
/// this server reject them.
fn restart_server(ctx: &Ctx, report: &mut Report) -> Result<Server, String> {
    let extra = &ctx.args.server_args;
    match spawn_server(&ctx.main_server(extra, "server-2.log")) {
        Ok(s) => {
            report.row(
                "extra args of the restart after kill -9 (--server-arg)",
                if extra.is_empty() {
                    "(none)".to_string()
                } else {
                    format!("`{}`", extra.join(" "))
                },
            );
            Ok(s)
        }
        Err(e) if !extra.is_empty() => {
            report.row(
                "extra args of the restart after kill -9 (--server-arg)",
                format!("(none: this server rejected `{}`)", extra.join(" ")),
            );
            report.note(format!(
                "the restart with --server-arg `{}` failed ({}); restarted without them instead",
                extra.join(" "),
                first_error_line(&e)
            ));
            spawn_server(&ctx.main_server(&[], "server-2b.log"))
        }
        Err(e) => Err(e),
    }
}

/// Spawn to the first `GET /api/stats` answered 200, or None after 120 s.
fn api_answers(server: &Server) -> Option<Duration> {
    let poll = agent(Duration::from_secs(2));
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if matches!(
            get_raw(&poll, &format!("{}/api/stats", server.base)),
            Ok((200, _))
        ) {
            return Some(server.spawned.elapsed());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

/// SIGTERM with `held` sessions to exit (killed after 120 s).
fn sigterm(report: &mut Report, mut server: Server, held: usize) {
    println!("\n== SIGTERM");
    let t = Instant::now();
    server.proc.signal(libc::SIGTERM);
    let status = server.proc.wait_timeout(Duration::from_secs(120));
    report.row(
        format!("SIGTERM with {held} sessions → exit"),
        match status {
            Some(s) => format!(
                "{} (exit code {})",
                secs(Some(t.elapsed())),
                s.code().map_or_else(|| format!("{s}"), |c| c.to_string())
            ),
            None => "did not exit within 120 s (killed)".into(),
        },
    );
}

/// How many sessions one process holds with RLIMIT_NOFILE at `--fd-cap`.
fn open_files_cap(ctx: &Ctx, report: &mut Report) -> Result<(), String> {
    let (args, n) = (ctx.args, ctx.n);
    println!("\n== open-files limit {}", args.fd_cap);
    let data3 = ctx.work.join("data-fdcap");
    let spec3 = ServerSpec {
        // (Its own data dir, on SQLite: the main run's database holds the main sessions.)
        database_url: None,
        bin: &ctx.bin,
        data: &data3,
        pair_delay: &args.pair_delay,
        nofile: Nofile::Exact(args.fd_cap),
        extra: &[],
        log: ctx.work.join("server-3.log"),
    };
    let server = spawn_server(&spec3)?;
    println!(
        "  open-files limit: {}",
        open_files_limit(server.proc.pid())
    );
    let c = create_sessions(&server.base, n, args.clients);
    let fp = footprint(server.proc.pid());
    report.row(
        format!(
            "sessions held with RLIMIT_NOFILE {} (tried {n})",
            args.fd_cap
        ),
        match &c.refused {
            Some((_, status, msg)) => format!(
                "{} created, then {status}: \"{msg}\" ({} fds open)",
                c.created, fp.fds
            ),
            None => format!(
                "all {} created, no refusal ({} fds open)",
                c.created, fp.fds
            ),
        },
    );
    Ok(())
}

/// True when the Node baseline can run (installs it with `npm ci` if needed).
fn node_ready(dir: &Path, report: &mut Report) -> bool {
    if !have("node") || !have("npm") {
        report.note("node/npm not found: Node.js baseline skipped");
        return false;
    }
    if !dir.join("server.js").exists() {
        report.note(format!(
            "no {}: Node.js baseline skipped",
            dir.join("server.js").display()
        ));
        return false;
    }
    if !dir.join("node_modules").exists() {
        println!("installing the Node baseline: npm ci in {}", dir.display());
        let mut cmd = Command::new("npm");
        cmd.current_dir(dir).args(["ci", "--no-audit", "--no-fund"]);
        match run_bounded(cmd, "npm ci", Duration::from_secs(300)) {
            Ok((s, _, _)) if s.success() => {}
            Ok((s, _, err)) => {
                report.note(format!(
                    "npm ci failed ({s}): {}; Node baseline skipped",
                    err.trim()
                ));
                return false;
            }
            Err(e) => {
                report.note(format!("{e}; Node baseline skipped"));
                return false;
            }
        }
    }
    true
}

/// Reads under load: wrk on botvisor and, if `baseline` is given, on the Node baselines
/// serving the same records.
fn load(
    ctx: &Ctx,
    report: &mut Report,
    server: &Server,
    ids: &[usize],
    baseline: Option<&Path>,
) -> Result<(), String> {
    let a = agent(Duration::from_secs(60));
    let script = write_wrk_script(ctx.work, ids)?;
    let plan = wrk_plan(ctx.args, &script);
    println!(
        "  wrk -t{} -c{} -d{}s --latency (after a {} s warm-up per target)",
        plan.threads, plan.connections, plan.duration, plan.warmup
    );

    // The same records for the baseline: botvisor's own list.
    let (status, list) = get_raw(&a, &format!("{}/api/sessions", server.base))?;
    if status != 200 {
        return Err(format!("GET /api/sessions answered {status}"));
    }
    let data_file = ctx.work.join("sessions.json");
    std::fs::write(&data_file, &list).map_err(|e| e.to_string())?;

    let nodes = match baseline {
        Some(dir) => start_node_baselines(dir, ctx.work, &data_file, report),
        None => Vec::new(),
    };
    compare_bodies(&a, server, &nodes, ids, report)?;

    let mut targets: Vec<(&str, &str, u32)> = vec![("botvisor", &server.base, server.proc.pid())];
    for (name, node) in &nodes {
        targets.push((name, &node.base, node.proc.pid()));
    }
    read_load_per_target(&plan, &targets, report);
    report.note(format!(
        "reads: wrk -t{} -c{} -d{}s --latency on the same machine as the server (wrk and server share the {} cores); \
         Node is one thread, botvisor a tokio runtime on every core",
        plan.threads,
        plan.connections,
        plan.duration,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    ));
    Ok(())
}

/// The wrk script that GETs a random one of the sessions `ids`.
fn write_wrk_script(work: &Path, ids: &[usize]) -> Result<PathBuf, String> {
    let held = ids.len();
    let list: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    let script = work.join("random-session.lua");
    std::fs::write(
        &script,
        format!(
            "-- GET /api/sessions/bench_<random> among the {held} sessions created\n\
             local ids = {{{}}}\n\
             local n = #ids\n\
             local id = 0\n\
             function setup(thread) thread:set(\"id\", id); id = id + 1 end\n\
             function init(args) math.randomseed(os.time() + id * 7919) end\n\
             function request() return wrk.format(\"GET\", \"/api/sessions/bench_\" .. ids[math.random(1, n)]) end\n",
            list.join(",")
        ),
    )
    .map_err(|e| e.to_string())?;
    Ok(script)
}

fn wrk_plan<'a>(args: &Args, script: &'a Path) -> WrkPlan<'a> {
    WrkPlan {
        threads: args.wrk_threads.clamp(1, 64),
        connections: args
            .wrk_connections
            .clamp(1, 10_000)
            .max(args.wrk_threads.clamp(1, 64)),
        duration: args.wrk_duration.clamp(1, 120),
        warmup: args.wrk_warmup.min(30),
        script,
    }
}

/// The Node http and Express baselines serving `data_file`; those that fail to start are
/// noted and left out.
fn start_node_baselines(
    dir: &Path,
    work: &Path,
    data_file: &Path,
    report: &mut Report,
) -> Vec<(&'static str, NodeServer)> {
    println!(
        "  {}",
        version_of("node", "--version").replace('v', "node v")
    );
    let mut nodes = Vec::new();
    for (name, mode) in [("Node http", "http"), ("Express", "express")] {
        match spawn_node(dir, mode, data_file, &work.join(format!("node-{mode}.log"))) {
            Ok(s) => nodes.push((name, s)),
            Err(e) => report.note(format!("{name} baseline did not start: {e}")),
        }
    }
    nodes
}

/// Same bytes? (botvisor is idle, so its answers should equal the snapshot.) Also each
/// baseline's RSS with the records loaded.
fn compare_bodies(
    a: &ureq::Agent,
    server: &Server,
    nodes: &[(&str, NodeServer)],
    ids: &[usize],
    report: &mut Report,
) -> Result<(), String> {
    let held = ids.len();
    let first = format!("/api/sessions/bench_{}", ids[0]);
    let probe = [first.as_str(), "/api/stats", "/api/sessions"];
    for (name, node) in nodes {
        for p in probe {
            let ours = get_raw(a, &format!("{}{p}", server.base)).map(|r| r.1)?;
            let theirs = get_raw(a, &format!("{}{p}", node.base)).map(|r| r.1)?;
            println!("  {name} GET {p}: {}", compare(&ours, &theirs));
            if ours != theirs {
                report.note(format!("{name} GET {p} body: {}", compare(&ours, &theirs)));
            }
        }
        let fp = footprint(node.proc.pid());
        println!(
            "  {name}: RSS {} with {held} sessions loaded",
            kib(fp.rss_kib as f64)
        );
    }
    Ok(())
}

/// wrk on each route for each target (name, base URL, pid), into `report.reads`.
fn read_load_per_target(plan: &WrkPlan, targets: &[(&str, &str, u32)], report: &mut Report) {
    let routes = [
        ("GET /api/sessions/:id (random id)", None),
        ("GET /api/stats", Some("/api/stats")),
    ];
    for (route, path) in routes {
        let mut row = BTreeMap::new();
        for (name, base, pid) in targets {
            match wrk(plan, base, path, *pid) {
                Ok(r) => {
                    print_wrk(route, name, &r, report);
                    row.insert(name.to_string(), r);
                }
                Err(e) => report.note(format!("wrk {name} {route}: {e}")),
            }
        }
        report.reads.push((route.to_string(), row));
    }
}

/// One wrk result's line, and a note when any request failed.
fn print_wrk(route: &str, name: &str, r: &WrkResult, report: &mut Report) {
    println!(
        "  {route:<34} {name:<10} {:>9.0} req/s  p50 {:>9}  p99 {:>9}  server CPU {:>4.0} %  ({} requests, non-2xx {}{})",
        r.rps,
        ms(r.p50_ms),
        ms(r.p99_ms),
        r.server_cpu,
        r.requests,
        r.non2xx,
        if r.socket_errors.is_empty() {
            String::new()
        } else {
            format!(", socket errors: {}", r.socket_errors)
        }
    );
    if r.non2xx > 0 || !r.socket_errors.is_empty() {
        report.note(format!(
            "{name} {route}: {} non-2xx, socket errors: {}",
            r.non2xx,
            if r.socket_errors.is_empty() {
                "none"
            } else {
                &r.socket_errors
            }
        ));
    }
}

fn summary(header: &str, r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "## botvisor-bench results\n\n{header}\n");
    let _ = writeln!(s, "| Figure | Value |\n| --- | --- |");
    for (k, v) in &r.rows {
        let _ = writeln!(s, "| {k} | {v} |");
    }
    if !r.reads.is_empty() {
        let _ = writeln!(
            s,
            "\n| Reads under load | botvisor req/s | p50 | p99 | Node http req/s | p50 | p99 | Express req/s | p50 | p99 | botvisor / Node http | botvisor / Express |"
        );
        let _ = writeln!(s, "| --- |{}", " ---: |".repeat(11));
        for (route, row) in &r.reads {
            let _ = write!(s, "| {route} |");
            for t in TARGETS {
                match row.get(t) {
                    Some(w) => {
                        let _ = write!(s, " {:.0} | {} | {} |", w.rps, ms(w.p50_ms), ms(w.p99_ms));
                    }
                    None => s.push_str(" - | - | - |"),
                }
            }
            let ratio = |other: &str| match (row.get("botvisor"), row.get(other)) {
                (Some(b), Some(o)) if o.rps > 0.0 => format!("{:.2}×", b.rps / o.rps),
                _ => "-".into(),
            };
            let _ = writeln!(s, " {} | {} |", ratio("Node http"), ratio("Express"));
        }
        let _ = writeln!(s, "\nServer CPU during each run (% of one core):");
        for (route, row) in &r.reads {
            let cpu: Vec<String> = TARGETS
                .iter()
                .filter_map(|t| row.get(*t).map(|w| format!("{t} {:.0} %", w.server_cpu)))
                .collect();
            let _ = writeln!(s, "- {route}: {}", cpu.join(", "));
        }
    }
    if !r.notes.is_empty() {
        let _ = writeln!(s, "\nNotes:");
        for n in &r.notes {
            let _ = writeln!(s, "- {n}");
        }
    }
    s
}
