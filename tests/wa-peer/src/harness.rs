//! What the real-link benchmarks (`wa-footprint`, `wa-throughput`) share: botvisor run as
//! a child process on a fresh data dir against this crate's peer, a small HTTP client for
//! its API, and bounded loops over sessions.
//!
//! The child is killed on every exit path (a guard's `Drop`, plus `PR_SET_PDEATHSIG`
//! should the benchmark itself be killed); the data dir is removed unless kept.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The botvisor child: killed and reaped when dropped, whatever the exit path.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A data dir, removed when dropped unless kept.
pub struct DirGuard {
    /// The directory.
    pub path: PathBuf,
    /// Keep it (its path is printed) instead of removing it.
    pub keep: bool,
}

impl DirGuard {
    /// A fresh directory under the temp dir, named after `prefix`, this process and now.
    pub fn fresh(prefix: &str, keep: bool) -> Result<DirGuard, String> {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!("{prefix}-{}-{stamp}", std::process::id()));
        std::fs::create_dir_all(&path).map_err(|e| format!("cannot create the data dir: {e}"))?;
        Ok(DirGuard { path, keep })
    }
}

impl Drop for DirGuard {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("data dir kept: {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// botvisor's HTTP API.
pub struct Api {
    agent: ureq::Agent,
    base: String,
}

impl Api {
    /// A client for the server at `addr` (`host:port`).
    pub fn new(addr: &str) -> Api {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        Api {
            agent,
            base: format!("http://{addr}"),
        }
    }

    /// `method path` with an optional JSON body: the status and the body (JSON, or the
    /// text as a JSON string).
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
    ) -> Result<(u16, Value), String> {
        let url = format!("{}{path}", self.base);
        let result = match (method, body) {
            ("GET", _) => self.agent.get(&url).call(),
            (_, Some(b)) => self
                .agent
                .post(&url)
                .header("content-type", "application/json")
                .send(b.as_str()),
            (_, None) => self.agent.post(&url).send_empty(),
        };
        let mut resp = result.map_err(|e| format!("{method} {path}: {e}"))?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| format!("{method} {path}: reading the body: {e}"))?;
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, v))
    }

    /// The sum of a Prometheus counter's samples (every label set) in `GET /metrics`.
    pub fn metric_sum(&self, name: &str) -> Result<f64, String> {
        let (status, v) = self.call("GET", "/metrics", None)?;
        let text = v.as_str().ok_or_else(|| format!("/metrics: {status}"))?;
        Ok(text
            .lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    /// Polls `GET /api/stats` until `pred` holds on it, for at most `limit`.
    pub fn wait_stats(
        &self,
        limit: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value, String> {
        let deadline = Instant::now() + limit;
        loop {
            let (_, v) = self.call("GET", "/api/stats", None)?;
            if pred(&v) {
                return Ok(v);
            }
            if Instant::now() > deadline {
                return Err(format!("{what}: not reached within {limit:?}; stats: {v}"));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// A running botvisor on the real link, pointed at the peer.
pub struct Botvisor {
    /// The child process.
    pub child: ChildGuard,
    /// Its pid.
    pub pid: u32,
    /// Its `host:port`.
    pub addr: String,
    /// Its API.
    pub api: Api,
}

/// Starts `binary serve --link whatsapp --wa-url <peer_url>` on `data_dir` (its stderr
/// in `data_dir/botvisor.log`), with `extra` flags and `env`, and waits (30 s at most)
/// until it says where it listens.
pub fn start_botvisor(
    binary: &Path,
    peer_url: &str,
    data_dir: &Path,
    extra: &[String],
    env: &[String],
) -> Result<Botvisor, String> {
    let log_path = data_dir.join("botvisor.log");
    let log =
        std::fs::File::create(&log_path).map_err(|e| format!("cannot create the log: {e}"))?;
    let mut cmd = Command::new(binary);
    cmd.args([
        "serve",
        "--link",
        "whatsapp",
        "--wa-url",
        peer_url,
        "--bind",
        "127.0.0.1",
        "--port",
        "0",
        "--data-dir",
    ])
    .arg(data_dir)
    .args(["--create-timeout", "20s"])
    .args(extra)
    .env_remove("API_KEY")
    .env_remove("DATABASE_URL")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(log);
    for kv in env {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("--env {kv}: expected KEY=VALUE"))?;
        cmd.env(k, v);
    }
    // Should this process die without unwinding, the kernel kills the child too.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = ChildGuard(
        cmd.spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?,
    );
    let pid = child.0.id();
    let stdout = child.0.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("botvisor listening on http://") {
                let _ = tx.send(addr.trim().to_string());
            }
        }
    });
    let addr = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(a) => a,
        Err(_) => {
            let mut text = String::new();
            let _ = std::fs::File::open(&log_path).and_then(|mut f| f.read_to_string(&mut text));
            return Err(format!(
                "botvisor did not start within 30 s; its log:\n{text}"
            ));
        }
    };
    let api = Api::new(&addr);
    Ok(Botvisor {
        child,
        pid,
        addr,
        api,
    })
}

/// Marks the stopped session whose key file is `db` as paired: its device gets the phone
/// JID `pn` and the name `push_name`, as a phone's pair-success would have stored them.
pub fn seed_paired_file(db: &Path, pn: &str, push_name: &str) -> Result<(), String> {
    let c = rusqlite::Connection::open(db).map_err(|e| format!("{}: {e}", db.display()))?;
    c.busy_timeout(Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    let changed = c
        .execute("UPDATE device SET pn = ?1, push_name = ?2", [pn, push_name])
        .map_err(|e| format!("{}: {e}", db.display()))?;
    (changed == 1)
        .then_some(())
        .ok_or_else(|| format!("{}: {changed} device rows", db.display()))
}

/// Runs `f(i)` for i in 0..n on `workers` threads; returns the failures' messages.
pub fn fan_out(
    n: usize,
    workers: usize,
    f: impl Fn(usize) -> Result<(), String> + Sync,
) -> Vec<String> {
    let next = AtomicUsize::new(0);
    let failures = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..workers.clamp(1, 64) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= n {
                    break;
                }
                if let Err(e) = f(i) {
                    if let Ok(mut v) = failures.lock() {
                        v.push(e);
                    }
                }
            });
        }
    });
    failures.into_inner().unwrap_or_default()
}

/// `Err` naming `what`, how many failed and the first failure, when any did.
pub fn check(what: &str, failures: Vec<String>) -> Result<(), String> {
    if failures.is_empty() {
        return Ok(());
    }
    Err(format!(
        "{what}: {} failed, first: {}",
        failures.len(),
        failures[0]
    ))
}

/// Raises this process's open-files limit to its hard limit (the peer holds one socket
/// per session here).
pub fn raise_nofile() {
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Runs `main`, printing `name: error: ...` and exiting 1 on an error.
pub fn exit_on_error(name: &str, main: impl FnOnce() -> Result<(), String>) {
    if let Err(e) = main() {
        eprintln!("{name}: error: {e}");
        std::process::exit(1);
    }
}

/// Polls `pred` every 50 ms for at most `limit`.
pub fn wait(limit: Duration, what: &str, mut pred: impl FnMut() -> bool) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    while !pred() {
        if Instant::now() > deadline {
            return Err(format!("{what}: not within {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
