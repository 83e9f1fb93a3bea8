//! A proxy per session: the API (create's `proxy`, `PUT`/`GET /api/sessions/:id/proxy`,
//! `--proxy`) with passwords never shown or logged, and, with the loopback peer, the real
//! link's WhatsApp socket through a SOCKS5 and an HTTP CONNECT proxy started here, a dead
//! proxy named in the create's 503, and the proxy kept across a restart.

mod common;

use common::Server;

const PASSWORD: &str = "pw-s3cret-9f8e";

fn create_with(s: &Server, id: &str, proxy: &str) -> common::Resp {
    s.post(
        "/api/sessions",
        Some(&format!(
            r#"{{"userId":"{id}","phoneNumber":"15551234567","proxy":"{proxy}"}}"#
        )),
    )
}

#[test]
fn proxies_are_set_shown_masked_and_checked() {
    let s = Server::start(&["--proxy", "socks5://10.0.0.1:1080"]);
    let own = format!("socks5://bot:{PASSWORD}@127.0.0.1:1080");
    assert_eq!(create_with(&s, "p1", &own).status, 201);
    let v = s.get("/api/sessions/p1/proxy").json();
    assert_eq!(v["proxy"], "socks5://bot:***@127.0.0.1:1080", "{v}");
    assert_eq!(v["effective"], "socks5://bot:***@127.0.0.1:1080");
    // Cleared: the default applies.
    let r = s.req(
        "PUT",
        "/api/sessions/p1/proxy",
        Some(r#"{"proxy":null}"#),
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let v = s.get("/api/sessions/p1/proxy").json();
    assert!(v["proxy"].is_null(), "{v}");
    assert_eq!(v["effective"], "socks5://10.0.0.1:1080");
    let r = s.req(
        "PUT",
        "/api/sessions/p1/proxy",
        Some(&format!(
            r#"{{"proxy":"http://bot:{PASSWORD}@127.0.0.1:3128"}}"#
        )),
        &[],
    );
    assert_eq!(
        r.json()["proxy"],
        "http://bot:***@127.0.0.1:3128",
        "{}",
        r.body
    );
    for (body, says) in [
        (r#"{"proxy":"ftp://h:1"}"#.to_string(), "socks5://"),
        (r#"{"proxy":"socks5://h"}"#.to_string(), "port"),
        (r#"{"proxy":5}"#.to_string(), "must be a string"),
        ("{}".to_string(), "proxy is required"),
        (
            format!(r#"{{"proxy":"socks5://bot:{PASSWORD}@h o:1"}}"#),
            "host",
        ),
    ] {
        let r = s.req("PUT", "/api/sessions/p1/proxy", Some(&body), &[]);
        let msg = r.error(400);
        assert!(msg.contains(says), "{body}: {msg}");
        assert!(!msg.contains(PASSWORD), "{msg}");
    }
    // A bad proxy on create leaves nothing behind.
    let r = create_with(&s, "p2", "socks5://nowhere");
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(s.get("/api/sessions/p2").status, 404);
    assert_eq!(s.get("/api/sessions/nobody/proxy").status, 404);
    // Deleted with its session: a new p1 has none of its own.
    assert_eq!(s.req("DELETE", "/api/sessions/p1", None, &[]).status, 200);
    s.create("p1", "15551234567");
    assert!(s.get("/api/sessions/p1/proxy").json()["proxy"].is_null());
    let log = std::fs::read_to_string(&s.log).unwrap();
    assert!(!log.contains(PASSWORD), "the log holds a proxy password");
}

/// Creates of one id that bring proxies: the one that is created connects through its
/// own proxy, and a refused one (the id exists, or another create of it is under way)
/// never replaces it, not even for a moment.
#[test]
fn a_refused_create_never_replaces_the_sessions_proxy() {
    let s = Server::start(&[]);
    assert_eq!(
        create_with(&s, "pr_1", "socks5://10.0.0.1:1081").status,
        201
    );
    let r = create_with(&s, "pr_1", "socks5://10.0.0.2:1082");
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(
        s.get("/api/sessions/pr_1/proxy").json()["proxy"],
        "socks5://10.0.0.1:1081"
    );
    // Eight creates of one new id at once, each with its own proxy: one wins, and the
    // proxy kept is the winner's.
    let answers: Vec<(u16, u16)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8u16)
            .map(|i| {
                let s = &s;
                scope.spawn(move || {
                    let port = 2000 + i;
                    let r = create_with(s, "pr_race", &format!("socks5://10.0.1.{i}:{port}"));
                    (r.status, port)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let won: Vec<u16> = answers
        .iter()
        .filter(|(status, _)| *status == 201)
        .map(|(_, port)| *port)
        .collect();
    assert_eq!(won.len(), 1, "{answers:?}");
    assert!(
        answers
            .iter()
            .all(|(status, _)| *status == 201 || *status == 409),
        "{answers:?}"
    );
    let kept = s.get("/api/sessions/pr_race/proxy").json();
    assert!(
        kept["proxy"]
            .as_str()
            .unwrap()
            .ends_with(&format!(":{}", won[0])),
        "{kept} {answers:?}"
    );
}

#[test]
fn a_proxy_flag_that_does_not_parse_refuses_to_start_without_echoing_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = common::serve_command(
        dir.path(),
        "0",
        &["--proxy", &format!("socks5://bot:{PASSWORD}@h")],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--proxy"), "{err}");
    assert!(!err.contains(PASSWORD), "{err}");
}

#[cfg(feature = "test-peer")]
mod real_link {
    use super::*;
    use botvisor_wa_peer::Peer;
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::sync::{Arc, Mutex};

    /// A proxy on the loopback (SOCKS5 and HTTP CONNECT on one port, told apart by the first
    /// byte) that wants user `bot` and [`PASSWORD`], and records the targets it tunnelled to.
    struct TestProxy {
        port: u16,
        targets: Arc<Mutex<Vec<String>>>,
        /// While set, every connection is closed at once (a proxy that is down).
        down: Arc<std::sync::atomic::AtomicBool>,
    }

    impl TestProxy {
        fn start() -> TestProxy {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            let targets = Arc::new(Mutex::new(Vec::new()));
            let seen = targets.clone();
            let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let is_down = down.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming().flatten() {
                    if is_down.load(std::sync::atomic::Ordering::SeqCst) {
                        continue;
                    }
                    let seen = seen.clone();
                    std::thread::spawn(move || {
                        if let Some((client, target, name)) = handshake(conn) {
                            seen.lock().unwrap().push(name);
                            pump(client, target);
                        }
                    });
                }
            });
            TestProxy {
                port,
                targets,
                down,
            }
        }

        fn targets(&self) -> Vec<String> {
            self.targets.lock().unwrap().clone()
        }
    }

    fn read_exact(s: &mut TcpStream, n: usize) -> Option<Vec<u8>> {
        let mut b = vec![0u8; n];
        s.read_exact(&mut b).ok()?;
        Some(b)
    }

    /// The proxy's side of SOCKS5 (RFC 1928/1929) or HTTP CONNECT; the client, the target and
    /// its `host:port`.
    fn handshake(mut c: TcpStream) -> Option<(TcpStream, TcpStream, String)> {
        let first = read_exact(&mut c, 1)?[0];
        if first == 5 {
            let n = read_exact(&mut c, 1)?[0] as usize;
            let methods = read_exact(&mut c, n)?;
            if !methods.contains(&2) {
                c.write_all(&[5, 0xff]).ok()?;
                return None;
            }
            c.write_all(&[5, 2]).ok()?;
            let _ver = read_exact(&mut c, 1)?;
            let ulen = read_exact(&mut c, 1)?[0] as usize;
            let user = read_exact(&mut c, ulen)?;
            let plen = read_exact(&mut c, 1)?[0] as usize;
            let pass = read_exact(&mut c, plen)?;
            if user != b"bot" || pass != PASSWORD.as_bytes() {
                c.write_all(&[1, 1]).ok()?;
                return None;
            }
            c.write_all(&[1, 0]).ok()?;
            let head = read_exact(&mut c, 4)?;
            let host = match head[3] {
                1 => {
                    let ip = read_exact(&mut c, 4)?;
                    format!("{}.{}.{}.{}", ip[0], ip[1], ip[2], ip[3])
                }
                3 => {
                    let len = read_exact(&mut c, 1)?[0] as usize;
                    String::from_utf8(read_exact(&mut c, len)?).ok()?
                }
                _ => return None,
            };
            let port = read_exact(&mut c, 2)?;
            let name = format!("{host}:{}", u16::from_be_bytes([port[0], port[1]]));
            let target = TcpStream::connect(&name).ok()?;
            c.write_all(&[5, 0, 0, 1, 0, 0, 0, 0, 0, 0]).ok()?;
            Some((c, target, name))
        } else {
            let mut head = vec![first];
            while !head.ends_with(b"\r\n\r\n") {
                head.extend(read_exact(&mut c, 1)?);
            }
            let head = String::from_utf8(head).ok()?;
            let name = head
                .strip_prefix("CONNECT ")?
                .split(' ')
                .next()?
                .to_string();
            use base64::Engine;
            let token = base64::engine::general_purpose::STANDARD.encode(format!("bot:{PASSWORD}"));
            if !head.contains(&format!("Proxy-Authorization: Basic {token}\r\n")) {
                c.write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
                    .ok()?;
                return None;
            }
            let target = TcpStream::connect(&name).ok()?;
            c.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .ok()?;
            Some((c, target, name))
        }
    }

    /// Copies both ways until either side ends.
    fn pump(a: TcpStream, b: TcpStream) {
        let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
        let t = std::thread::spawn(move || {
            let _ = std::io::copy(&mut a2, &mut b2);
            let _ = b2.shutdown(Shutdown::Both);
        });
        let (mut a, mut b) = (a, b);
        let _ = std::io::copy(&mut b, &mut a);
        let _ = a.shutdown(Shutdown::Both);
        let _ = t.join();
    }

    /// A loopback port nothing listens on.
    fn dead_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn start_in(peer: &Peer, dir: &std::path::Path, extra: &[&str]) -> Server {
        common::start_real_link(&peer.url(), dir, extra)
    }

    fn peer_addr(peer: &Peer) -> String {
        let url = peer.url();
        let rest = url.split_once("://").unwrap().1;
        rest.split('/').next().unwrap().to_string()
    }

    #[test]
    fn the_whatsapp_socket_goes_through_socks5_or_http_and_a_dead_proxy_is_named() {
        let peer = Peer::start();
        let proxy = TestProxy::start();
        let dir = tempfile::tempdir().unwrap();
        let mut s = start_in(&peer, dir.path(), &[]);
        let socks = format!("socks5://bot:{PASSWORD}@127.0.0.1:{}", proxy.port);
        let r = create_with(&s, "px_1", &socks);
        assert_eq!(r.status, 201, "{}", r.body);
        assert!(r.json()["pairingCode"].is_string());
        assert_eq!(proxy.targets(), vec![peer_addr(&peer)], "through SOCKS5");
        let http = format!("http://bot:{PASSWORD}@127.0.0.1:{}", proxy.port);
        let r = create_with(&s, "px_2", &http);
        assert_eq!(r.status, 201, "{}", r.body);
        assert_eq!(proxy.targets().len(), 2, "through HTTP CONNECT");
        assert_eq!(peer.stats().companion_hellos.len(), 2);
        // A proxy that is down: the create's 503 names it, never its password, and
        // leaves nothing.
        let dead = dead_port();
        let r = create_with(
            &s,
            "px_3",
            &format!("socks5://bot:{PASSWORD}@127.0.0.1:{dead}"),
        );
        let msg = r.error(503);
        assert!(
            msg.contains(&format!("proxy socks5://bot:***@127.0.0.1:{dead}")),
            "{msg}"
        );
        assert!(!msg.contains(PASSWORD), "{msg}");
        assert_eq!(s.get("/api/sessions/px_3").status, 404);
        // A wrong password is the proxy's refusal, named the same way.
        let r = create_with(
            &s,
            "px_4",
            &format!("socks5://bot:wrong@127.0.0.1:{}", proxy.port),
        );
        assert!(
            r.error(503).contains("proxy socks5://bot:***@"),
            "{}",
            r.body
        );
        // Across a restart, px_1 reconnects through its proxy again.
        s.terminate();
        let before = proxy.targets().len();
        let s = start_in(&peer, dir.path(), &[]);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while proxy.targets().len() < before + 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "the sessions did not reconnect through their proxies: {:?}",
                proxy.targets()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let log = std::fs::read_to_string(&s.log).unwrap();
        assert!(!log.contains(PASSWORD), "the log holds a proxy password");
    }

    #[test]
    fn the_default_proxy_carries_sessions_without_their_own() {
        let peer = Peer::start();
        let proxy = TestProxy::start();
        let dir = tempfile::tempdir().unwrap();
        let default = format!("http://bot:{PASSWORD}@127.0.0.1:{}", proxy.port);
        let s = start_in(&peer, dir.path(), &["--proxy", &default]);
        assert_eq!(s.create("pd_1", "15551234567").status, 201);
        assert_eq!(proxy.targets(), vec![peer_addr(&peer)]);
        let v = s.get("/api/sessions/pd_1/proxy").json();
        assert_eq!(
            v["effective"],
            format!("http://bot:***@127.0.0.1:{}", proxy.port)
        );
    }

    /// Media goes where the socket goes: the upload to the media host is tunnelled by the
    /// session's proxy (SOCKS5 for one session, HTTP CONNECT for the other), and arrives.
    #[test]
    fn media_uploads_go_through_the_sessions_proxy() {
        let peer = Peer::start();
        let proxy = TestProxy::start();
        let dir = tempfile::tempdir().unwrap();
        let s = start_in(&peer, dir.path(), &[]);
        let media_host = peer.media_addr().to_string();
        for (id, scheme) in [("mp_1", "socks5"), ("mp_2", "http")] {
            let url = format!("{scheme}://bot:{PASSWORD}@127.0.0.1:{}", proxy.port);
            assert_eq!(create_with(&s, id, &url).status, 201);
            assert_eq!(
                s.post(&format!("/api/sessions/{id}/stop"), None).status,
                200
            );
            common::seed_paired(&s, id, "Proxied Bot");
            assert_eq!(
                s.post(&format!("/api/sessions/{id}/start"), None).status,
                200
            );
            s.wait_state(id, "online");
            let before = proxy.targets().len();
            let body = serde_json::json!({
                "to": "15550001111",
                "document": {"data": "JVBERi0xLjcKJSBhIHRpbnkgcGRm", "mimetype": "application/pdf", "filename": "a.pdf"}
            });
            let r = s.post(
                &format!("/api/sessions/{id}/messages"),
                Some(&body.to_string()),
            );
            assert_eq!(r.status, 201, "{}", r.body);
            let tunnelled: Vec<String> = proxy.targets()[before..].to_vec();
            assert_eq!(
                tunnelled,
                vec![media_host.clone()],
                "{scheme}: {tunnelled:?}"
            );
        }
        assert_eq!(peer.media_uploads().len(), 2);
        let log = std::fs::read_to_string(&s.log).unwrap();
        assert!(!log.contains(PASSWORD), "the log holds a proxy password");
    }

    #[test]
    fn a_paired_session_whose_proxy_goes_down_names_it_in_last_error() {
        let peer = Peer::start();
        let proxy = TestProxy::start();
        let dir = tempfile::tempdir().unwrap();
        let s = start_in(&peer, dir.path(), &[]);
        let socks = format!("socks5://bot:{PASSWORD}@127.0.0.1:{}", proxy.port);
        assert_eq!(create_with(&s, "pp_1", &socks).status, 201);
        assert_eq!(s.post("/api/sessions/pp_1/stop", None).status, 200);
        common::seed_paired(&s, "pp_1", "Proxied Bot");
        assert_eq!(s.post("/api/sessions/pp_1/start", None).status, 200);
        s.wait_state("pp_1", "online");
        assert_eq!(peer.stats().logins, 1);
        assert_eq!(proxy.targets().len(), 2, "both connections went through it");
        // The proxy goes down and the connection drops: the client retries by itself,
        // and the session says why it cannot get back.
        proxy.down.store(true, std::sync::atomic::Ordering::SeqCst);
        peer.command(botvisor_wa_peer::Command::Close);
        let v = s.wait_for("pp_1", 20, |v| {
            v["lastError"]
                .as_str()
                .is_some_and(|e| e.contains("proxy socks5://bot:***@127.0.0.1"))
        });
        assert_ne!(v["state"], "online", "{v}");
        assert!(!v.to_string().contains(PASSWORD));
        // Back up: online again through it.
        proxy.down.store(false, std::sync::atomic::Ordering::SeqCst);
        s.wait_for("pp_1", 30, |v| v["state"] == "online");
        assert_eq!(peer.stats().logins, 2);
    }
}
