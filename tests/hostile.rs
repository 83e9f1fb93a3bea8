//! Hostile HTTP over real sockets: slow clients, trickled bodies, pipelining, broken
//! bytes, lying lengths, huge heads, thousands of idle connections. Each gets a 4xx in
//! the spec's shape or a closed connection, and the server keeps answering.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::Server;

/// Short, so the timeouts are seen quickly.
const TIMEOUT: &[&str] = &["--request-timeout", "1s"];

fn connect(s: &Server) -> TcpStream {
    let c = TcpStream::connect(s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    c
}

/// Reads until the server closes; returns what came and how long it took.
fn until_closed(c: &mut TcpStream) -> (String, Duration) {
    let t = Instant::now();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match c.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the server neither answered nor closed: {e}"),
        }
    }
    (String::from_utf8_lossy(&buf).to_string(), t.elapsed())
}

fn status_of(answer: &str) -> Option<u16> {
    answer.split_whitespace().nth(1)?.parse().ok()
}

/// The spec's error shape in a raw answer: its status and message.
fn spec_error(answer: &str) -> (u16, String) {
    let status = status_of(answer).unwrap_or_else(|| panic!("no status: {answer:?}"));
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {answer:?}"));
    assert_eq!(v["success"], false, "{answer}");
    (status, v["message"].as_str().unwrap().to_string())
}

#[test]
fn a_slow_loris_is_cut_off_after_the_request_timeout() {
    let s = Server::start(TIMEOUT);
    let mut c = connect(&s);
    c.write_all(b"GET /api/stats HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .unwrap();
    let (answer, took) = until_closed(&mut c);
    assert!(took < Duration::from_secs(5), "closed after {took:?}");
    assert!(answer.is_empty() || status_of(&answer).is_some_and(|st| (400..500).contains(&st)));
    // An idle keep-alive connection is closed the same way.
    let mut idle = connect(&s);
    idle.write_all(b"GET /api/stats HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let (answer, took) = until_closed(&mut idle);
    assert_eq!(status_of(&answer), Some(200), "{answer}");
    assert!(
        took < Duration::from_secs(5),
        "idle connection kept {took:?}"
    );
    assert_eq!(s.get("/api/stats").status, 200);
}

#[test]
fn a_body_that_trickles_in_gets_a_408_and_a_closed_connection() {
    let s = Server::start(TIMEOUT);
    let mut c = connect(&s);
    c.write_all(
        b"POST /api/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 100\r\n\r\n{\"userId\"",
    )
    .unwrap();
    let (answer, took) = until_closed(&mut c);
    assert!(took < Duration::from_secs(5), "{took:?}");
    let (status, message) = spec_error(&answer);
    assert_eq!(status, 408, "{answer}");
    assert!(message.contains("did not arrive"), "{message}");
    assert!(answer.to_ascii_lowercase().contains("connection: close"));
    // A Content-Length larger than what is sent, then the client closes its side.
    let mut c = connect(&s);
    c.write_all(
        b"POST /api/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 50\r\n\r\n{}",
    )
    .unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let (answer, _) = until_closed(&mut c);
    if !answer.is_empty() {
        assert_eq!(spec_error(&answer).0, 400, "{answer}");
    }
    assert_eq!(
        s.get("/api/sessions").json()["count"],
        0,
        "nothing was created"
    );
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let s = Server::start(&[]);
    let mut c = connect(&s);
    c.write_all(
        b"GET /api/stats HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /api/sessions/nobody HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /api/sessions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let (answer, _) = until_closed(&mut c);
    let statuses: Vec<u16> = answer
        .match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| status_of(&answer[i..]))
        .collect();
    assert_eq!(statuses, vec![200, 404, 200], "{answer}");
    assert!(answer.contains("Session nobody not found"));
}

#[test]
fn broken_bytes_in_paths_and_bodies_get_a_clear_4xx() {
    let s = Server::start(&[]);
    // Percent-encoded invalid UTF-8, NUL and traversal in the id: the guide's message.
    for path in [
        "/api/sessions/%FF%FE",
        "/api/sessions/a%00b",
        "/api/sessions/..%2F..%2Fetc",
        "/api/sessions/%C3%BC/start",
    ] {
        let r = s.req(
            "POST",
            &format!("{path}/stop").replace("/start/stop", "/start"),
            None,
            &[],
        );
        let msg = r.error(400);
        assert!(msg.contains("userId must be alphanumeric"), "{path}: {msg}");
    }
    // Raw invalid UTF-8 and a raw NUL in the request line: hyper refuses the head.
    for line in [
        &b"GET /api/sessions/\xff\xfe HTTP/1.1\r\n"[..],
        b"GET /api/\x00 HTTP/1.1\r\n",
    ] {
        let mut c = connect(&s);
        c.write_all(line).unwrap();
        c.write_all(b"Host: x\r\n\r\n").unwrap();
        let (answer, _) = until_closed(&mut c);
        assert!(
            answer.is_empty() || status_of(&answer).is_some_and(|st| (400..500).contains(&st)),
            "{answer:?}"
        );
    }
    // Invalid UTF-8 and NUL in JSON bodies.
    let mut c = connect(&s);
    let body = b"{\"userId\":\"\xff\xfe\",\"phoneNumber\":\"1234567890\"}";
    c.write_all(
        format!(
            "POST /api/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();
    c.write_all(body).unwrap();
    let (answer, _) = until_closed(&mut c);
    let (status, msg) = spec_error(&answer);
    assert_eq!(status, 400, "{answer}");
    assert!(msg.contains("not valid JSON"), "{msg}");
    let nul = s.post(
        "/api/sessions",
        Some(r#"{"userId":"a\u0000b","phoneNumber":"1234567890"}"#),
    );
    assert!(nul.error(400).contains("userId must be alphanumeric"));
    let nul_phone = s.post(
        "/api/sessions",
        Some(r#"{"userId":"ab","phoneNumber":"12345\u000067890"}"#),
    );
    assert!(nul_phone.error(400).contains("phoneNumber"));
    assert_eq!(s.get("/api/sessions").json()["count"], 0);
}

#[test]
fn huge_urls_and_headers_are_refused_without_harm() {
    let s = Server::start(&[]);
    let long_path = format!("/api/sessions/{}", "a".repeat(200_000));
    let mut c = connect(&s);
    c.write_all(format!("GET {long_path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    let (answer, _) = until_closed(&mut c);
    assert!(
        answer.is_empty() || status_of(&answer).is_some_and(|st| (400..500).contains(&st)),
        "{}",
        &answer[..answer.len().min(200)]
    );
    // A long id that fits in a head is just a bad id.
    let r = s.get(&format!("/api/sessions/{}", "a".repeat(5_000)));
    assert!(r.error(400).contains("userId must be alphanumeric"));
    let mut c = connect(&s);
    c.write_all(
        format!(
            "GET /api/stats HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "b".repeat(1_000_000)
        )
        .as_bytes(),
    )
    .ok();
    let (answer, _) = until_closed(&mut c);
    assert!(
        answer.is_empty() || status_of(&answer).is_some_and(|st| (400..500).contains(&st)),
        "{}",
        &answer[..answer.len().min(200)]
    );
    // Many headers.
    let mut many = String::from("GET /api/stats HTTP/1.1\r\nHost: x\r\n");
    for i in 0..500 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let mut c = connect(&s);
    c.write_all(many.as_bytes()).ok();
    let (answer, _) = until_closed(&mut c);
    assert!(
        answer.is_empty() || status_of(&answer).is_some_and(|st| (400..500).contains(&st)),
        "{answer}"
    );
    assert_eq!(s.get("/api/stats").status, 200, "still serving");
}

/// Raises this process's open-files limit to its hard limit; returns the new soft limit.
fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn five_thousand_idle_connections_do_not_take_the_api_down() {
    const IDLE: usize = 5_000;
    if raise_nofile() < IDLE as u64 + 200 {
        common::skip_unless_required_by(
            "five_thousand_idle_connections_do_not_take_the_api_down",
            "the open-files hard limit is below 5,200; to run it: raise it (ulimit -Hn 65536 as root)",
            &["BOTVISOR_REQUIRE_MANY_FILES"],
        );
        return;
    }
    let s = Server::start(&["--request-timeout", "2s"]);
    let before = rss_kib(s.child.id());
    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        match TcpStream::connect(s.addr) {
            Ok(c) => idle.push(c),
            Err(e) => panic!("connect {} failed: {e}", idle.len()),
        }
    }
    // Past the connection limit, new clients wait in the accept queue until idle ones
    // are cut off by the request timeout: they are answered, not refused.
    let t = Instant::now();
    let r = s.get("/api/stats");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "answered after {:?}",
        t.elapsed()
    );
    let peak = rss_kib(s.child.id());
    eprintln!(
        "{IDLE} idle connections: RSS {before} -> {peak} KiB, a new request answered in {:?}",
        t.elapsed()
    );
    assert!(
        peak < before + 256 * 1024,
        "RSS grew from {before} KiB to {peak} KiB for {IDLE} idle connections"
    );
    drop(idle);
    // Afterwards it answers at once, and still creates sessions.
    assert_eq!(s.create("after_flood", "1234567890").status, 201);
}
