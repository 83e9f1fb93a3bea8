//! Test harness: starts the real `botvisor` binary on 127.0.0.1 with a temp data dir and
//! talks HTTP/1.1 to it over real sockets (a tiny client, so tests can also send
//! malformed requests).
//!
//! Each server's stderr (its log) goes to `server.log` in its data dir, appended across
//! restarts on the same dir; it is printed only when the test fails.
#![allow(dead_code)]

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A real PostgreSQL started for the tests (the WhatsApp key store's tests).
pub mod pg;

/// A running server process.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    /// Where this server's stderr goes (shared by every server started on `data_dir`).
    pub log: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

/// `BOTVISOR_TEST_ENGINE=postgres`: servers started by [`Server`] keep their rows in
/// PostgreSQL (a database of their own per data dir, on the harness's [`pg`] server)
/// instead of `<data-dir>/botvisor.db`. The same test files then serve both engines.
pub fn test_engine_is_postgres() -> bool {
    std::env::var("BOTVISOR_TEST_ENGINE").is_ok_and(|v| v.trim() == "postgres")
}

/// Where the harness keeps the PostgreSQL URL of a data dir's database.
const DATABASE_URL_FILE: &str = "test-database-url";

/// The `--database-url` a server on `dir` gets: none on SQLite; on PostgreSQL, the data
/// dir's own database (made on first use, the same one for every restart on `dir`).
pub fn database_url_for(dir: &Path) -> Option<String> {
    if !test_engine_is_postgres() {
        return None;
    }
    let file = dir.join(DATABASE_URL_FILE);
    if let Ok(url) = std::fs::read_to_string(&file) {
        return Some(url);
    }
    let server = pg::shared().unwrap_or_else(|e| {
        panic!("BOTVISOR_TEST_ENGINE=postgres, but PostgreSQL cannot start: {e}")
    });
    let url = server
        .fresh_database_url("srv")
        .unwrap_or_else(|e| panic!("cannot create a test database: {e}"));
    // (A dir that does not exist yet, or is not writable, gets a database per start.)
    let _ = std::fs::write(&file, &url);
    Some(url)
}

/// Rows as the server committed them, read through a connection of the test's own:
/// `sqlite` on `<dir>/botvisor.db`, or, under `BOTVISOR_TEST_ENGINE=postgres`, `postgres`
/// (the same query on the `bv_` tables) on the dir's database. Columns as text; `None`
/// is NULL.
pub fn committed_rows(dir: &Path, sqlite: &str, postgres: &str) -> Vec<Vec<Option<String>>> {
    if let Some(url) = database_url_for(dir) {
        let server = pg::shared().expect("PostgreSQL runs");
        return server
            .rows(&url, postgres)
            .unwrap_or_else(|e| panic!("{postgres}: {e}"));
    }
    let c = rusqlite::Connection::open_with_flags(
        dir.join("botvisor.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    let mut stmt = c.prepare(sqlite).unwrap();
    let n = stmt.column_count();
    let rows = stmt
        .query_map([], |r| {
            (0..n)
                .map(|i| {
                    Ok(match r.get_ref(i)? {
                        rusqlite::types::ValueRef::Null => None,
                        rusqlite::types::ValueRef::Integer(v) => Some(v.to_string()),
                        rusqlite::types::ValueRef::Real(v) => Some(v.to_string()),
                        rusqlite::types::ValueRef::Text(t) | rusqlite::types::ValueRef::Blob(t) => {
                            Some(String::from_utf8_lossy(t).into_owned())
                        }
                    })
                })
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .unwrap()
        .collect::<rusqlite::Result<Vec<_>>>()
        .unwrap();
    rows
}

/// The name of the server log in a data dir.
pub const SERVER_LOG: &str = "server.log";

/// True when an environment flag is on: set, non-empty, and not `0` or `false`.
pub fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| {
        let v = v.trim();
        !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false")
    })
}

/// For a test that cannot run here (a missing tool or build): fails when the run must
/// not skip anything (`CI` or `BOTVISOR_REQUIRE_EXAMPLES` set, as in CI), otherwise
/// prints `SKIPPED` and why. The caller returns right after.
pub fn skip_unless_required(test: &str, reason: &str) {
    skip_unless_required_by(test, reason, &["CI", "BOTVISOR_REQUIRE_EXAMPLES"]);
}

/// [`skip_unless_required`] for a test that needs something of the machine rather than
/// of the build (root, loop devices, a high descriptor limit): only the given variables
/// make it strict, which `.ci/run` sets after checking the machine can run it.
#[allow(dead_code)]
pub fn skip_unless_required_by(test: &str, reason: &str, vars: &[&str]) {
    let strict: Vec<&str> = vars.iter().copied().filter(|v| env_flag(v)).collect();
    assert!(
        strict.is_empty(),
        "{test} cannot run: {reason} (not skipped because {} is set)",
        strict.join(" and ")
    );
    // Straight to stderr, not eprintln!: libtest would capture that and show it only
    // with --nocapture, and a skip should be seen.
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {reason}");
}

/// The server binary: this build's, or `BOTVISOR_TEST_BIN` (a long soak runs a copy, so
/// rebuilding meanwhile does not swap the server under it).
pub fn botvisor_bin() -> PathBuf {
    std::env::var_os("BOTVISOR_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_botvisor")))
}

/// `botvisor serve --link sim --bind 127.0.0.1 --port PORT <extra> --data-dir DIR`, with
/// the environment that could change it removed.
#[allow(dead_code)]
pub fn serve_command(dir: &Path, port: &str, extra: &[&str]) -> Command {
    serve_command_via(&[], &botvisor_bin(), dir, port, extra)
}

/// [`serve_command`] for the binary `bin`, run through `wrapper` when it is not empty
/// (e.g. `runuser -u nobody --`).
#[allow(dead_code)]
pub fn serve_command_via(
    wrapper: &[&str],
    bin: &Path,
    dir: &Path,
    port: &str,
    extra: &[&str],
) -> Command {
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    cmd.args([
        "serve",
        "--link",
        "sim",
        "--bind",
        "127.0.0.1",
        "--port",
        port,
    ])
    .args(extra)
    .arg("--data-dir")
    .arg(dir)
    .env_remove("DATABASE_URL")
    .env_remove("API_KEY");
    if let Some(url) = database_url_for(dir).filter(|_| !extra.contains(&"--database-url")) {
        cmd.args(["--database-url", &url]);
    }
    cmd
}

/// A start-up refusal: `serve` exited 1 with one `botvisor: error:` line on stderr; the
/// line.
#[allow(dead_code)]
pub fn refusal_line(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("botvisor: error:"))
        .collect();
    assert_eq!(lines.len(), 1, "one error line: {err}");
    lines[0].to_string()
}

/// Runs `serve` on `dir` to its end (for start-up refusals): its output.
#[allow(dead_code)]
pub fn serve_once(dir: &Path) -> std::process::Output {
    serve_command(dir, "0", &[]).output().expect("run botvisor")
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    /// Asserts the spec's error shape and returns the message.
    pub fn error(&self, status: u16) -> String {
        assert_eq!(self.status, status, "{}", self.body);
        let v = self.json();
        assert_eq!(v["success"], Value::Bool(false), "{}", self.body);
        v["message"].as_str().expect("message").to_string()
    }
}

/// Flags that keep the simulated link fast in tests.
pub const FAST: &[&str] = &[
    "--link",
    "sim",
    "--sim-pair-delay",
    "300ms",
    "--backoff-initial",
    "50ms",
    "--backoff-max",
    "200ms",
    "--shutdown-timeout",
    "1s",
    "--call-timeout",
    "1s",
    "--watchdog-interval",
    "300ms",
];

impl Server {
    /// Starts a server on a fresh temp data dir with `FAST` plus `extra` flags.
    pub fn start(extra: &[&str]) -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut s = Server::start_in(&dir, extra);
        s._tmp = Some(tmp);
        s
    }

    /// Starts a server on an existing data dir (for restarts).
    pub fn start_in(dir: &Path, extra: &[&str]) -> Server {
        Server::launch(&botvisor_bin(), dir, extra)
    }

    /// Starts another build of botvisor (e.g. the release binary) on a fresh temp dir.
    pub fn start_with_binary(bin: &Path, extra: &[&str]) -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut s = Server::launch(bin, &dir, extra);
        s._tmp = Some(tmp);
        s
    }

    /// Starts a server on a fresh temp data dir with extra environment variables (they
    /// override the harness's own, e.g. `RUST_LOG`).
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Server {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut s = Server::launch_env(&botvisor_bin(), &dir, extra, env);
        s._tmp = Some(tmp);
        s
    }

    fn launch(bin: &Path, dir: &Path, extra: &[&str]) -> Server {
        Server::launch_env(bin, dir, extra, &[])
    }

    fn launch_env(bin: &Path, dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let mut args: Vec<&str> = vec!["serve", "--bind", "127.0.0.1", "--port", "0", "--data-dir"];
        let dir_s = dir.to_str().unwrap().to_string();
        args.push(&dir_s);
        // `extra` overrides the fast defaults (clap refuses a flag given twice).
        for pair in FAST.chunks(2) {
            if !extra.contains(&pair[0]) {
                args.extend_from_slice(pair);
            }
        }
        args.extend_from_slice(extra);
        let database_url = database_url_for(dir);
        if let Some(url) = &database_url {
            if !extra.contains(&"--database-url") {
                args.extend_from_slice(&["--database-url", url]);
            }
        }
        let log = dir.join(SERVER_LOG);
        let mut log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
        let _ = writeln!(log_file, "==== {} {}", bin.display(), args.join(" "));
        let mut child = Command::new(bin)
            .args(&args)
            .env_remove("API_KEY")
            .env_remove("PORT")
            .env_remove("DATABASE_URL")
            .env_remove("BOTVISOR_LINK")
            .env("RUST_LOG", "warn")
            .env("RUST_BACKTRACE", "0")
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .spawn()
            .expect("spawn botvisor");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("botvisor listening on http://") {
                    let _ = tx.send(addr.parse::<SocketAddr>().unwrap());
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "server did not report its address; its log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        };
        Server {
            child,
            addr,
            data_dir: dir.to_path_buf(),
            log,
            _tmp: None,
        }
    }

    /// Sends raw bytes and reads the answer (the connection is closed after one request).
    pub fn raw(&self, request: &[u8]) -> Resp {
        let mut s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let _ = s.write_all(request);
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        parse_response(&buf)
    }

    /// `GET path`'s status, headers and body as bytes (a body sent with Content-Length:
    /// media, which [`Resp::body`] would mangle as text).
    pub fn get_bytes(&self, path: &str) -> (u16, Vec<(String, String)>, Vec<u8>) {
        let mut s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let _ = write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.addr
        );
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        let end = buf
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("an HTTP head");
        let head = parse_response(&buf[..end + 4]);
        (head.status, head.headers, buf[end + 4..].to_vec())
    }

    /// A request with optional JSON body and extra headers.
    pub fn req(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Resp {
        let mut r = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
            self.addr
        );
        for (k, v) in headers {
            r.push_str(&format!("{k}: {v}\r\n"));
        }
        match body {
            Some(b) => {
                if !headers
                    .iter()
                    .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
                {
                    r.push_str("Content-Type: application/json\r\n");
                }
                r.push_str(&format!("Content-Length: {}\r\n\r\n{b}", b.len()));
            }
            None => r.push_str("\r\n"),
        }
        self.raw(r.as_bytes())
    }

    pub fn get(&self, path: &str) -> Resp {
        self.req("GET", path, None, &[])
    }

    pub fn post(&self, path: &str, body: Option<&str>) -> Resp {
        self.req("POST", path, body, &[])
    }

    pub fn delete(&self, path: &str) -> Resp {
        self.req("DELETE", path, None, &[])
    }

    pub fn create(&self, user_id: &str, phone: &str) -> Resp {
        self.post(
            "/api/sessions",
            Some(&format!(
                r#"{{"userId":"{user_id}","phoneNumber":"{phone}"}}"#
            )),
        )
    }

    pub fn fault(&self, user_id: &str, kind: &str) -> Resp {
        self.post(
            &format!("/api/sim/{user_id}/fault"),
            Some(&format!(r#"{{"kind":"{kind}"}}"#)),
        )
    }

    pub fn session(&self, user_id: &str) -> Value {
        self.get(&format!("/api/sessions/{user_id}")).json()
    }

    /// Polls a session until `pred` holds (panics with the last answer after `secs`).
    pub fn wait_for(&self, user_id: &str, secs: u64, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let v = self.session(user_id);
            if pred(&v) {
                return v;
            }
            if Instant::now() > deadline {
                panic!("condition never held for {user_id}: {v}");
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn wait_state(&self, user_id: &str, state: &str) -> Value {
        self.wait_for(user_id, 20, |v| v["state"] == state)
    }

    /// The session's event log, newest first (`GET /api/sessions/:id/events`).
    pub fn events(&self, user_id: &str) -> Vec<Value> {
        let r = self.get(&format!("/api/sessions/{user_id}/events"));
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["events"].as_array().expect("events").clone()
    }

    /// The recorded states, newest first, once the newest is `newest` (or after 5 s): the
    /// view shows a state once it is queued, the event log once its group commit lands.
    pub fn states_once_newest_is(&self, user_id: &str, newest: &str) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let states: Vec<String> = self
                .events(user_id)
                .iter()
                .map(|e| e["state"].as_str().unwrap_or_default().to_string())
                .collect();
            if states.first().map(String::as_str) == Some(newest) || Instant::now() > deadline {
                return states;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The states recorded after the newest event in state `terminal` (oldest first);
    /// panics if there is none.
    pub fn states_after(&self, user_id: &str, terminal: &str) -> Vec<String> {
        let events = self.events(user_id);
        let newest = events
            .iter()
            .position(|e| e["state"] == terminal)
            .unwrap_or_else(|| panic!("{user_id} has no {terminal} event: {events:?}"));
        events[..newest]
            .iter()
            .rev()
            .map(|e| e["state"].as_str().unwrap_or("?").to_string())
            .collect()
    }

    /// Proof that the server's timers have run well past `--backoff-max` (200 ms in
    /// `FAST`), instead of a sleep: creates session `id`, hangs it, and waits until the
    /// watchdog has restarted it (`restarts == 1`, back `online`). The watchdog's ping
    /// gives up only after `--call-timeout` (1 s in `FAST`), so by then at least that long
    /// has passed on the server's clock since this call began, and the supervisor, which
    /// handles its messages in order, has handled every restart that fell due before.
    /// Needs the watchdog (`--watchdog-interval`) and a restart budget of at least 1.
    pub fn timer_probe(&self, id: &str) {
        let began = Instant::now();
        assert_eq!(self.create(id, "1234567899").status, 201, "probe {id}");
        self.wait_state(id, "online");
        assert_eq!(self.fault(id, "hang").status, 200, "probe {id}");
        let v = self.wait_for(id, 20, |v| v["state"] == "online" && v["restarts"] == 1);
        assert!(
            v["lastError"]
                .as_str()
                .unwrap_or_default()
                .contains("did not answer the watchdog's check"),
            "the probe must have been restarted by the watchdog: {v}"
        );
        assert!(
            began.elapsed() >= Duration::from_secs(1),
            "the probe came back too soon to prove anything ({:?})",
            began.elapsed()
        );
    }

    /// What the server process has open (its `/proc/<pid>/fd` links).
    #[allow(dead_code)]
    pub fn open_files(&self) -> Vec<String> {
        let dir = format!("/proc/{}/fd", self.child.id());
        std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot list {dir}: {e}"))
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .map(|p| p.display().to_string())
            .collect()
    }

    /// SIGKILL, no cleanup.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                panic!("server did not exit after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A script that runs botvisor under a hard open-files limit it cannot raise.
pub fn limited_binary(dir: &Path, limit: u32) -> PathBuf {
    let wrapper = dir.join("botvisor-limited");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nulimit -n {limit}\nexec {} \"$@\"\n",
            env!("CARGO_BIN_EXE_botvisor")
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    wrapper
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            dump_log_once(&self.log);
        }
    }
}

/// Prints a server log to stderr, once per file (servers restarted on one data dir share
/// it, and each of their drops would print it).
fn dump_log_once(log: &Path) {
    static PRINTED: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);
    let mut printed = PRINTED.lock().unwrap_or_else(|e| e.into_inner());
    if !printed
        .get_or_insert_with(HashSet::new)
        .insert(log.to_path_buf())
    {
        return;
    }
    let text = std::fs::read_to_string(log)
        .unwrap_or_else(|e| format!("(cannot read {}: {e})\n", log.display()));
    eprintln!(
        "---- server log {} ----\n{text}---- end of server log ----",
        log.display()
    );
}

fn parse_response(buf: &[u8]) -> Resp {
    let text = String::from_utf8_lossy(buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Resp {
        status,
        headers,
        body,
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

/// One HTTP/1.1 request off `reader`: its headers (lower-case names) and body; `None` at
/// the end of the stream.
pub fn read_request(
    reader: &mut impl BufRead,
) -> Option<(std::collections::HashMap<String, String>, Vec<u8>)> {
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return None;
    }
    let mut headers = std::collections::HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 {
            return None;
        }
        if h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    Some((headers, body))
}

/// JSON bodies a receiver got.
pub type Received = std::sync::Arc<Mutex<Vec<Value>>>;

/// A webhook receiver on 127.0.0.1 that answers 200 to every POST and keeps each JSON
/// body; returns its URL.
/// The webhook `got` received about message `message_id` (waits up to 10 s).
pub fn event_for(got: &Received, message_id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = got
            .lock()
            .unwrap()
            .iter()
            .find(|v| v["data"]["messageId"] == message_id)
            .cloned();
        if let Some(v) = found {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "no webhook for message {message_id}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn json_receiver() -> (String, Received) {
    json_receiver_while(Arc::new(AtomicBool::new(true)))
}

/// As [`json_receiver`], answering 500 (and keeping nothing) while `up` is false.
pub fn json_receiver_while(up: Arc<AtomicBool>) -> (String, Received) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let got = Received::default();
    let g = got.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let (g, up) = (g.clone(), up.clone());
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                while let Some((_, body)) = read_request(&mut reader) {
                    if !up.load(Ordering::SeqCst) {
                        let _ = write!(conn, "HTTP/1.1 500 Down\r\nContent-Length: 0\r\n\r\n");
                        continue;
                    }
                    if let Ok(v) = serde_json::from_slice(&body) {
                        g.lock().unwrap().push(v);
                    }
                    let _ = write!(conn, "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
                }
            });
        }
    });
    (url, got)
}

/// A CA and a certificate for 127.0.0.1 signed by it, made with the `openssl` command;
/// `None` if it is not installed. Returns (ca.pem, leaf.pem, leaf.key) paths.
pub fn test_pki(
    dir: &std::path::Path,
) -> Option<(std::path::PathBuf, std::path::PathBuf, std::path::PathBuf)> {
    let run = |args: &[&str]| {
        std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .map(|o| {
                assert!(
                    o.status.success(),
                    "openssl {args:?}: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
            })
            .is_ok()
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let ca: Vec<&str> = ["req", "-x509"]
        .into_iter()
        .chain(ec)
        .chain([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=botvisor-test-ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ])
        .collect();
    if !run(&ca) {
        return None;
    }
    let csr: Vec<&str> = ["req"]
        .into_iter()
        .chain(ec)
        .chain([
            "-keyout",
            "leaf.key",
            "-out",
            "leaf.csr",
            "-subj",
            "/CN=127.0.0.1",
        ])
        .collect();
    assert!(run(&csr));
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    assert!(run(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "leaf.pem",
        "-days",
        "2",
        "-extfile",
        "leaf.ext",
    ]));
    Some((
        dir.join("ca.pem"),
        dir.join("leaf.pem"),
        dir.join("leaf.key"),
    ))
}

/// Makes a session's store look paired (as after pair-success): its device row gets the
/// account's phone number and push name. The peer cannot play the phone's side of
/// pairing, so this is how the paired paths are reached.
/// The next companion device number a seeded session logs in as (10 to 99: WhatsApp's
/// binary JIDs carry a device in one byte, and companions are small numbers). Each seed
/// gets its own: the peer, like WhatsApp, keeps one socket per device, so sessions
/// paired to the same phone must be different devices of it.
fn next_device() -> u16 {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    10 + NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 90
}

#[allow(dead_code)]
pub fn seed_paired(s: &Server, id: &str, name: &str) {
    seed_paired_as(s, id, name, next_device());
}

/// [`seed_paired`] as device `device` of the account (two sessions seeded as the same
/// device are one device logging in twice).
#[allow(dead_code)]
pub fn seed_paired_as(s: &Server, id: &str, name: &str, device: u16) {
    if test_engine_is_postgres() {
        let url = database_url_for(&s.data_dir).expect("a PostgreSQL database");
        return seed_paired_in_database_as(&url, id, name, device);
    }
    let db = s.data_dir.join(format!("sessions/{id}.db"));
    let c = rusqlite::Connection::open(db).unwrap();
    let n = c
        .execute(
            "UPDATE device SET pn = ?1, push_name = ?2",
            [
                format!("15551234567:{device}@s.whatsapp.net"),
                name.to_string(),
            ],
        )
        .unwrap();
    assert_eq!(n, 1, "the store has one device row");
}

/// [`seed_paired`] for keys in PostgreSQL (`--keys database`) at `url`.
#[allow(dead_code)]
pub fn seed_paired_in_database(url: &str, id: &str, name: &str) {
    seed_paired_in_database_as(url, id, name, next_device());
}

/// [`seed_paired_in_database`] as device `device`.
#[allow(dead_code)]
pub fn seed_paired_in_database_as(url: &str, id: &str, name: &str, device: u16) {
    let pg = pg::shared().expect("PostgreSQL runs");
    let out = pg
        .psql(
            url,
            &format!(
                "UPDATE wa_device SET pn = '15551234567:{}@s.whatsapp.net', push_name = '{}' \
                 WHERE session_id = '{id}' RETURNING 1",
                device,
                name.replace('\'', "''")
            ),
        )
        .unwrap();
    assert_eq!(out, "1", "the store has one device row for {id}");
}

/// A server of the real link pointed at the loopback peer at `peer_url`, on `dir`, with
/// its keys in PostgreSQL when the run keeps everything there; `extra` flags besides.
#[allow(dead_code)]
pub fn start_real_link(peer_url: &str, dir: &Path, extra: &[&str]) -> Server {
    let mut args = vec![
        "--link",
        "whatsapp",
        "--wa-url",
        peer_url,
        "--create-timeout",
        "20s",
    ];
    if test_engine_is_postgres() {
        args.extend_from_slice(&["--keys", "database"]);
    }
    args.extend_from_slice(extra);
    Server::start_in(dir, &args)
}

/// Creates session `id` (phone 15551234567) on a real-link server, makes its store look
/// paired ([`seed_paired`]) and starts it again: it logs in straight to online.
#[allow(dead_code)]
pub fn paired_online(s: &Server, id: &str, name: &str) {
    assert_eq!(s.create(id, "15551234567").status, 201);
    assert_eq!(
        s.post(&format!("/api/sessions/{id}/stop"), None).status,
        200
    );
    seed_paired(s, id, name);
    assert_eq!(
        s.post(&format!("/api/sessions/{id}/start"), None).status,
        200
    );
    s.wait_state(id, "online");
}

/// An open `GET /api/events` stream.
pub struct EventStream {
    conn: TcpStream,
    pub buf: String,
}

impl EventStream {
    pub fn open(s: &Server, headers: &[(&str, &str)]) -> EventStream {
        let mut conn = TcpStream::connect(s.addr).unwrap();
        conn.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut req = "GET /api/events HTTP/1.1\r\nHost: x\r\n".to_string();
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        conn.write_all(req.as_bytes()).unwrap();
        EventStream {
            conn,
            buf: String::new(),
        }
    }

    /// Reads until `pred` holds on what came so far, or `secs` pass.
    pub fn until(&mut self, secs: u64, pred: impl Fn(&str) -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut chunk = [0u8; 8192];
        while !pred(&self.buf) {
            if Instant::now() > deadline {
                return false;
            }
            match self.conn.read(&mut chunk) {
                Ok(0) => return pred(&self.buf),
                Ok(n) => self.buf.push_str(&String::from_utf8_lossy(&chunk[..n])),
                Err(_) => {}
            }
        }
        true
    }

    /// `(id, event, data)` of every complete event so far.
    pub fn events(&self) -> Vec<(u64, String, String)> {
        let mut out = Vec::new();
        let mut id = None;
        let mut kind = String::new();
        for line in self.buf.lines() {
            if let Some(v) = line.strip_prefix("id: ") {
                id = v.trim().parse().ok();
            } else if let Some(v) = line.strip_prefix("event: ") {
                kind = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("data: ") {
                if let Some(i) = id.take() {
                    out.push((i, kind.clone(), v.to_string()));
                }
            }
        }
        out
    }
}
