//! A crash storm: 1,000 simulated sessions all panicking at once, three times in a row,
//! while a client reads without pause. Reads never fail and stay fast, each session
//! follows its own restart budget, and afterwards the supervisor, the read view and the
//! database agree exactly (`GET /api/audit`). Sizes from `BOTVISOR_STORM_SESSIONS`.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Server;

fn sessions() -> usize {
    std::env::var("BOTVISOR_STORM_SESSIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000)
}

/// Runs `f(i)` for `0..n` on `threads` threads.
fn in_parallel(n: usize, threads: usize, f: impl Fn(usize) + Sync) {
    std::thread::scope(|scope| {
        for t in 0..threads {
            let f = &f;
            scope.spawn(move || {
                for i in (t..n).step_by(threads) {
                    f(i);
                }
            });
        }
    });
}

fn wait_online(s: &Server, n: usize, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let stats = s.get("/api/stats").json();
        if stats["onlineSessions"].as_u64() == Some(n as u64) {
            return;
        }
        assert!(Instant::now() < deadline, "not all online: {stats}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One keep-alive HTTP connection (a new connection per read would measure connects and
/// run out of ports).
struct KeepAlive {
    addr: std::net::SocketAddr,
    conn: Option<std::io::BufReader<std::net::TcpStream>>,
}

impl KeepAlive {
    fn new(addr: std::net::SocketAddr) -> KeepAlive {
        KeepAlive { addr, conn: None }
    }

    /// The status of `GET path`, or 0 when the connection failed (retried once).
    fn get_status(&mut self, path: &str) -> u16 {
        for _ in 0..2 {
            match self.try_get(path) {
                Ok(status) => return status,
                Err(_) => self.conn = None,
            }
        }
        0
    }

    fn try_get(&mut self, path: &str) -> std::io::Result<u16> {
        use std::io::{BufRead, Read, Write};
        if self.conn.is_none() {
            let c = std::net::TcpStream::connect(self.addr)?;
            c.set_read_timeout(Some(Duration::from_secs(30)))?;
            c.set_nodelay(true)?;
            self.conn = Some(std::io::BufReader::new(c));
        }
        let conn = self.conn.as_mut().unwrap();
        conn.get_mut()
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())?;
        let mut line = String::new();
        conn.read_line(&mut line)?;
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut length = 0usize;
        loop {
            line.clear();
            if conn.read_line(&mut line)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            if line == "\r\n" {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; length];
        conn.read_exact(&mut body)?;
        Ok(status)
    }
}

/// Reads without pause until stopped: (latencies, failures).
struct Reader {
    stop: Arc<AtomicBool>,
    latencies: Arc<Mutex<Vec<Duration>>>,
    failures: Arc<Mutex<Vec<String>>>,
}

impl Reader {
    fn start(s: &Server, n: usize) -> (Reader, std::thread::JoinHandle<()>) {
        let r = Reader {
            stop: Arc::new(AtomicBool::new(false)),
            latencies: Arc::new(Mutex::new(Vec::new())),
            failures: Arc::new(Mutex::new(Vec::new())),
        };
        let (stop, lat, fail) = (r.stop.clone(), r.latencies.clone(), r.failures.clone());
        let addr = s.addr;
        let handle = std::thread::spawn(move || {
            let mut probe = KeepAlive::new(addr);
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let path = if i.is_multiple_of(2) {
                    format!("/api/sessions/s{}", (i / 2) % n)
                } else {
                    "/api/stats".to_string()
                };
                let t = Instant::now();
                let status = probe.get_status(&path);
                lat.lock().unwrap().push(t.elapsed());
                if status != 200 {
                    fail.lock().unwrap().push(format!("GET {path}: {status}"));
                }
                i += 1;
            }
        });
        (r, handle)
    }

    /// p99 of what was read since the last call, and resets.
    fn p99(&self) -> (Duration, usize) {
        let mut l = std::mem::take(&mut *self.latencies.lock().unwrap());
        l.sort();
        let n = l.len();
        (l.get(n * 99 / 100).copied().unwrap_or_default(), n)
    }
}

#[test]
fn a_crash_storm_keeps_reads_up_budgets_apart_and_ends_consistent() {
    let n = sessions();
    let s = Server::start(&[
        "--restart-max",
        "3",
        "--restart-window",
        "10m",
        "--backoff-initial",
        "10ms",
        "--backoff-max",
        "100ms",
        "--sim-pair-delay",
        "200ms",
    ]);
    in_parallel(n, 8, |i| {
        let r = s.create(&format!("s{i}"), "1234567890");
        assert_eq!(r.status, 201, "s{i}: {}", r.body);
    });
    wait_online(&s, n, 120);

    let (reader, handle) = Reader::start(&s, n);
    std::thread::sleep(Duration::from_secs(2));
    let (quiet, quiet_reads) = reader.p99();

    let mut storm_p99 = Duration::ZERO;
    let mut storm_reads = 0;
    for round in 1..=3 {
        let t = Instant::now();
        in_parallel(n, 8, |i| {
            let r = s.fault(&format!("s{i}"), "panic");
            assert_eq!(r.status, 200, "round {round}, s{i}: {}", r.body);
        });
        wait_online(&s, n, 120);
        let (p99, reads) = reader.p99();
        eprintln!(
            "storm round {round}: {n} panics, all online again after {:?}; reads: {reads}, p99 {p99:?}",
            t.elapsed()
        );
        storm_p99 = storm_p99.max(p99);
        storm_reads += reads;
    }
    reader.stop.store(true, Ordering::Relaxed);
    handle.join().unwrap();
    let failures = reader.failures.lock().unwrap().clone();
    eprintln!(
        "reads: quiet p99 {quiet:?} ({quiet_reads} reads), storm p99 {storm_p99:?} ({storm_reads} reads), {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "reads failed during the storm: {:?}",
        &failures[..failures.len().min(10)]
    );
    // Within 10x of quiet; the floor absorbs a scheduler hiccup on a shared 2-core machine.
    let bound = (quiet * 10).max(Duration::from_millis(50));
    assert!(
        storm_p99 <= bound,
        "storm p99 {storm_p99:?} > {bound:?} (quiet {quiet:?})"
    );

    // Each session spent exactly its own three restarts.
    for i in (0..n).step_by((n / 50).max(1)) {
        let v = s.session(&format!("s{i}"));
        assert_eq!(v["restarts"], 3, "{v}");
        assert_eq!(v["state"], "online", "{v}");
    }
    // A fourth panic exhausts the budget of those sessions only.
    let spent: Vec<String> = (0..10).map(|i| format!("s{i}")).collect();
    for id in &spent {
        assert_eq!(s.fault(id, "panic").status, 200);
    }
    for id in &spent {
        let v = s.wait_state(id, "failed");
        assert!(
            v["lastError"]
                .as_str()
                .unwrap()
                .contains("gave up after 3 restarts"),
            "{v}"
        );
    }
    let stats = s.get("/api/stats").json();
    assert_eq!(
        stats["onlineSessions"].as_u64(),
        Some((n - spent.len()) as u64),
        "{stats}"
    );

    // The supervisor, the view and the database agree; every actor belongs to a running row.
    let audit = s.get("/api/audit").json();
    assert_eq!(audit["consistent"], true, "{audit}");
    assert_eq!(audit["sessions"].as_u64(), Some(n as u64), "{audit}");
    assert_eq!(
        audit["liveActors"].as_u64(),
        Some((n - spent.len()) as u64),
        "{audit}"
    );
}
