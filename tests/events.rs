//! `GET /api/events` over real sockets: every change as a numbered Server-Sent Event,
//! resume with `Last-Event-ID`, pairing codes only for holders of the key, and a client
//! that does not read is dropped without holding anything else up.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{EventStream as Stream, Server};

const KEY: &str = "events-k3y-0123456789abcdefghijk";

fn online(user: &str) -> impl Fn(&str) -> bool + '_ {
    move |buf: &str| {
        buf.lines()
            .any(|l| l.contains(&format!(r#""userId":"{user}","state":"online""#)))
    }
}

#[test]
fn every_change_is_a_numbered_event_and_a_client_resumes_by_last_event_id() {
    let s = Server::start(&["--api-key", KEY, "--sim-pair-delay", "200ms"]);
    let mut public = Stream::open(&s, &[]);
    let mut keyed = Stream::open(&s, &[("X-API-Key", KEY)]);
    assert!(
        public.until(5, |b| b.contains("text/event-stream")),
        "{}",
        public.buf
    );
    let r = s.req(
        "POST",
        "/api/sessions",
        Some(r#"{"userId":"ev1","phoneNumber":"1234567890"}"#),
        &[("X-API-Key", KEY)],
    );
    assert_eq!(r.status, 201);
    let code = r.json()["pairingCode"].as_str().unwrap().to_string();
    assert!(public.until(10, online("ev1")), "{}", public.buf);
    assert!(keyed.until(10, online("ev1")), "{}", keyed.buf);
    let events = public.events();
    let states: Vec<&str> = events
        .iter()
        .filter(|(_, k, _)| k == "session.state")
        .map(|(_, _, d)| {
            d.split(r#""state":""#)
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
        })
        .collect();
    assert_eq!(
        states,
        ["starting", "pairing", "connecting", "online"],
        "{events:?}"
    );
    let ids: Vec<u64> = events.iter().map(|(i, _, _)| *i).collect();
    assert!(
        ids.windows(2).all(|w| w[1] == w[0] + 1),
        "consecutive ids: {ids:?}"
    );
    // The code is in the stream only for the key's holder.
    assert!(events.iter().any(|(_, k, _)| k == "session.pairing_code"));
    assert!(
        !public.buf.contains(&code),
        "a pairing code leaked to a client without the key"
    );
    assert!(keyed.buf.contains(&code));

    // Resume after the second event: exactly what came after it, same ids.
    let mut resumed = Stream::open(&s, &[("Last-Event-ID", &ids[1].to_string())]);
    assert!(resumed.until(5, online("ev1")), "{}", resumed.buf);
    let again: Vec<u64> = resumed.events().iter().map(|(i, _, _)| *i).collect();
    assert_eq!(again, ids[2..].to_vec());
    // And live events keep coming on the resumed stream.
    assert_eq!(
        s.req(
            "POST",
            "/api/sessions/ev1/stop",
            None,
            &[("X-API-Key", KEY)]
        )
        .status,
        200
    );
    assert!(
        resumed.until(5, |b| b.contains(r#""state":"stopped""#)),
        "{}",
        resumed.buf
    );
    // A delete is an event too.
    assert_eq!(
        s.req("DELETE", "/api/sessions/ev1", None, &[("X-API-Key", KEY)])
            .status,
        200
    );
    assert!(
        resumed.until(5, |b| b.contains("event: session.deleted")),
        "{}",
        resumed.buf
    );
}

/// (That such a client is then dropped, at its 256-event buffer, is a unit test of the
/// stream's pump: here the kernel's socket buffers, megabytes, would hide it.)
#[test]
fn a_client_that_does_not_read_holds_nothing_up() {
    let s = Server::start(&[
        "--restart-max",
        "100000",
        "--sim-pair-delay",
        "10ms",
        "--backoff-initial",
        "1ms",
        "--backoff-max",
        "5ms",
    ]);
    // A client with a tiny receive buffer that never reads.
    let mut slow = socket_with_small_rcvbuf(s.addr);
    slow.write_all(b"GET /api/events HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    // A client that reads everything.
    let mut fast = Stream::open(&s, &[]);
    let ids: Vec<String> = (0..20).map(|i| format!("slow{i}")).collect();
    for id in &ids {
        assert_eq!(s.create(id, "1234567890").status, 201);
    }
    for id in &ids {
        s.wait_state(id, "online");
    }
    // Thousands of events: panics and the restarts that follow.
    for _ in 0..25 {
        in_parallel(&ids, |id| {
            let _ = s.fault(id, "panic");
        });
        let t = Instant::now();
        assert_eq!(s.get("/api/stats").status, 200);
        assert!(t.elapsed() < Duration::from_secs(2), "the API slowed down");
        let _ = fast.until(0, |_| false);
    }
    for id in &ids {
        s.wait_for(id, 10, |v| v["state"] == "online");
    }
    let _ = fast.until(3, |_| false);
    let fast_ids: Vec<u64> = fast.events().iter().map(|(i, _, _)| *i).collect();
    assert!(fast_ids.len() > 1_500, "only {} events", fast_ids.len());
    assert!(
        fast_ids.windows(2).all(|w| w[1] == w[0] + 1),
        "the reading client missed events"
    );
    drop(slow);
}

fn in_parallel(ids: &[String], f: impl Fn(&str) + Sync) {
    std::thread::scope(|scope| {
        for chunk in ids.chunks(5) {
            let f = &f;
            scope.spawn(move || chunk.iter().for_each(|id| f(id)));
        }
    });
}

fn socket_with_small_rcvbuf(addr: std::net::SocketAddr) -> TcpStream {
    use std::os::fd::FromRawFd;
    let std::net::SocketAddr::V4(v4) = addr else {
        panic!("the test server listens on IPv4");
    };
    // SAFETY: a plain socket, setsockopt and connect on a descriptor we own; it is handed
    // to TcpStream, which closes it.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0);
        let size: libc::c_int = 4096;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &size as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(v4.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        let rc = libc::connect(
            fd,
            &sa as *const libc::sockaddr_in as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "connect");
        TcpStream::from_raw_fd(fd)
    }
}
