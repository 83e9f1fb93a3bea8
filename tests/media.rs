//! Sending media on the simulated network: as base64 and by URL from a server started
//! here (redirects followed), arriving with the same bytes (their SHA-256), the caption,
//! the file name and the type; and the fetch's bounds: internal addresses refused unless
//! `--media-allow-private`, `--media-max-bytes`, a type that does not fit the kind, a
//! URL that fails, too many redirects; a queued send by URL.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use base64::Engine;
use common::Server;
use serde_json::{json, Value};
use sha2::Digest;

/// A PNG's first bytes, then some more.
fn png() -> Vec<u8> {
    let mut b = b"\x89PNG\r\n\x1a\n".to_vec();
    b.extend((0..5000u32).map(|i| (i * 7 % 251) as u8));
    b
}

fn pdf() -> Vec<u8> {
    let mut b = b"%PDF-1.7\n".to_vec();
    b.extend((0..3000u32).map(|i| (i % 200) as u8));
    b
}

fn sha(b: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(b))
}

/// A file server on the loopback: `/png`, `/pdf`, `/ogg`, `/html`, `/big` (declares
/// 10 MB), `/missing` (404), `/r1` → `/png`, `/loop` → itself.
fn file_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    return;
                }
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
                        break;
                    }
                }
                let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                let mut conn = conn;
                let (status, headers, body): (&str, String, Vec<u8>) = match path.as_str() {
                    "/png" => ("200 OK", "Content-Type: image/png\r\n".into(), png()),
                    "/pdf" => ("200 OK", "Content-Type: application/pdf\r\n".into(), pdf()),
                    "/ogg" => (
                        "200 OK",
                        "Content-Type: audio/ogg\r\n".into(),
                        b"OggS-voice".to_vec(),
                    ),
                    "/html" => (
                        "200 OK",
                        "Content-Type: text/html\r\n".into(),
                        b"<html></html>".to_vec(),
                    ),
                    "/r1" => ("302 Found", "Location: /png\r\n".into(), Vec::new()),
                    "/loop" => ("302 Found", "Location: /loop\r\n".into(), Vec::new()),
                    "/big" => {
                        let _ = write!(
                            conn,
                            "HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 10000000\r\nConnection: close\r\n\r\n"
                        );
                        let _ = conn.write_all(&png());
                        return;
                    }
                    _ => ("404 Not Found", String::new(), Vec::new()),
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(&body);
            });
        }
    });
    port
}

fn online(s: &Server, id: &str) {
    assert_eq!(s.create(id, "15551234567").status, 201);
    s.wait_state(id, "online");
}

fn send(s: &Server, id: &str, body: Value) -> common::Resp {
    s.post(
        &format!("/api/sessions/{id}/messages"),
        Some(&body.to_string()),
    )
}

/// The newest message the simulated network holds for `id`.
fn last_sent(s: &Server, id: &str) -> Value {
    let v = s.get(&format!("/api/sim/{id}/messages")).json();
    v["messages"].as_array().unwrap().last().cloned().unwrap()
}

/// `POST …/messages?kind=…&to=…` with the media as the body: streamed into a
/// temporary file (never whole in memory), sent like any media, its details in the query;
/// every bad shape a clear 4xx.
#[test]
fn media_uploaded_as_the_body_is_sent_whole() {
    let s = Server::start(&["--media-max-bytes", "2000000"]);
    online(&s, "mu");
    let upload = |query: &str, content_type: Option<&str>, body: &[u8]| {
        let mut r = format!(
            "POST /api/sessions/mu/messages/upload?{query} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        if let Some(t) = content_type {
            r.push_str(&format!("Content-Type: {t}\r\n"));
        }
        r.push_str("\r\n");
        let mut bytes = r.into_bytes();
        bytes.extend_from_slice(body);
        s.raw(&bytes)
    };
    // Larger than one write batch (256 KiB), so it is spooled in several.
    let big: Vec<u8> = b"%PDF-1.7\n"
        .iter()
        .copied()
        .chain((0..700_000u32).map(|i| (i % 251) as u8))
        .collect();
    let r = upload(
        "kind=document&to=15550001111&filename=r%C3%A9sum%C3%A9.pdf&caption=the+report",
        Some("application/pdf"),
        &big,
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["kind"], "document");
    let m = last_sent(&s, "mu");
    assert_eq!(m["document"]["sha256"], sha(&big), "{m}");
    assert_eq!(m["document"]["size"], big.len(), "{m}");
    assert_eq!(m["document"]["mimetype"], "application/pdf", "{m}");
    assert_eq!(m["document"]["fileName"], "résumé.pdf", "{m}");
    assert_eq!(m["document"]["caption"], "the report", "{m}");
    let r = upload(
        "kind=audio&to=15550001111&voice=true",
        Some("audio/ogg; codecs=opus"),
        b"OggS-voice",
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(last_sent(&s, "mu")["audio"]["voice"], true);

    for (query, content_type, body, status, needle) in [
        (
            "kind=image&to=15550001111",
            None,
            &png()[..],
            415,
            "Content-Type",
        ),
        (
            "kind=image&to=15550001111",
            Some("application/json"),
            &png()[..],
            415,
            "Content-Type",
        ),
        (
            "kind=text&to=15550001111",
            Some("image/png"),
            &png()[..],
            400,
            "kind must be",
        ),
        (
            "to=15550001111",
            Some("image/png"),
            &png()[..],
            400,
            "kind is required",
        ),
        (
            "kind=image&to=15550001111&mentions=1",
            Some("image/png"),
            &png()[..],
            400,
            "mentions is not a parameter",
        ),
        (
            "kind=image&to=15550001111",
            Some("application/pdf"),
            &pdf()[..],
            400,
            "not image/",
        ),
        (
            "kind=image&to=15550001111",
            Some("image/png"),
            &b""[..],
            400,
            "empty",
        ),
        (
            "kind=image",
            Some("image/png"),
            &png()[..],
            400,
            "to is required",
        ),
        (
            "kind=image&to=15550001111&queue=true",
            Some("image/png"),
            &png()[..],
            400,
            "cannot be queued",
        ),
        (
            "kind=audio&to=15550001111&voice=maybe",
            Some("audio/ogg"),
            &b"OggS"[..],
            400,
            "voice must be",
        ),
        (
            "kind=sticker&to=15550001111&caption=hi",
            Some("image/webp"),
            &b"RIFF0000WEBP"[..],
            400,
            "no caption",
        ),
        (
            "kind=document&to=15550001111&filename=..%2Fetc%2Fpasswd",
            Some("application/pdf"),
            &pdf()[..],
            400,
            "not a path",
        ),
        (
            "kind=image&to=15550001111&caption=%ZZ",
            Some("image/png"),
            &png()[..],
            400,
            "bad %-escape",
        ),
    ] {
        let r = upload(query, content_type, body);
        assert_eq!(r.status, status, "{query}: {}", r.body);
        assert!(r.body.contains(needle), "{query}: {}", r.body);
    }
    // application/octet-stream says nothing: the type is sniffed.
    let r = upload(
        "kind=image&to=15550001111",
        Some("application/octet-stream"),
        &png(),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(last_sent(&s, "mu")["image"]["mimetype"], "image/png");
    let too_big = vec![7u8; 2_000_001];
    let r = upload(
        "kind=document&to=15550001111",
        Some("application/octet-stream"),
        &too_big,
    );
    assert_eq!(r.status, 413, "{}", r.body);
    let r = upload("kind=image&to=15550001111", Some("image/png"), &png());
    assert_eq!(r.status, 201, "{}", r.body);
    let r = s.raw(
        format!(
            "POST /api/sessions/nobody/messages/upload?kind=image&to=15550001111 HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: image/png\r\nContent-Length: {}\r\n\r\n",
            png().len()
        )
        .as_bytes(),
    );
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(s.session("mu")["state"], "online");
}

#[test]
fn media_by_data_and_by_url_arrive_with_the_same_bytes() {
    let files = file_server();
    let s = Server::start(&["--media-allow-private"]);
    online(&s, "m1");
    let data = base64::engine::general_purpose::STANDARD.encode(png());
    let r = send(
        &s,
        "m1",
        json!({"to": "15550001111", "image": {"data": data}, "caption": "a picture"}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["kind"], "image");
    let m = last_sent(&s, "m1");
    assert_eq!(m["kind"], "image", "{m}");
    assert_eq!(m["image"]["sha256"], sha(&png()), "{m}");
    assert_eq!(m["image"]["size"], png().len());
    assert_eq!(m["image"]["mimetype"], "image/png", "sniffed: {m}");
    assert_eq!(m["image"]["caption"], "a picture");
    assert_eq!(m["text"], "a picture");

    let url = format!("http://127.0.0.1:{files}/pdf");
    let r = send(
        &s,
        "m1",
        json!({"to": "15550001111", "document": {"url": url, "filename": "report.pdf"}}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let m = last_sent(&s, "m1");
    assert_eq!(m["document"]["sha256"], sha(&pdf()), "{m}");
    assert_eq!(m["document"]["fileName"], "report.pdf");
    assert_eq!(m["document"]["mimetype"], "application/pdf");

    // A redirect is followed; a voice note keeps its flag.
    let r = send(
        &s,
        "m1",
        json!({"to": "15550001111", "image": {"url": format!("http://127.0.0.1:{files}/r1")}}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(last_sent(&s, "m1")["image"]["sha256"], sha(&png()));
    let r = send(
        &s,
        "m1",
        json!({"to": "15550001111", "audio": {"url": format!("http://127.0.0.1:{files}/ogg"), "voice": true}}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let m = last_sent(&s, "m1");
    assert_eq!(
        (m["kind"].clone(), m["audio"]["voice"].clone()),
        (json!("audio"), json!(true))
    );
    assert_eq!(m["audio"]["mimetype"], "audio/ogg");
}

#[test]
fn media_fetches_are_bounded_and_never_reach_inside_unless_allowed() {
    let files = file_server();
    let closed = Server::start(&[]);
    online(&closed, "m2");
    for host in ["127.0.0.1", "localhost", "[::1]"] {
        let url = format!("http://{host}:{files}/png");
        let r = send(
            &closed,
            "m2",
            json!({"to": "15550001111", "image": {"url": url}}),
        );
        let msg = r.error(403);
        assert!(msg.contains("internal address"), "{url}: {msg}");
    }
    // A redirect into the inside is refused the same way.
    let r = send(
        &closed,
        "m2",
        json!({"to": "15550001111", "image": {"url": "http://169.254.169.254/latest/meta-data"}}),
    );
    assert!(r.error(403).contains("internal address"));
    assert!(
        closed.get("/api/sim/m2/messages").json()["messages"]
            .as_array()
            .unwrap()
            .is_empty(),
        "nothing was sent"
    );

    let s = Server::start(&["--media-allow-private", "--media-max-bytes", "4096"]);
    online(&s, "m3");
    let at = |p: &str| format!("http://127.0.0.1:{files}{p}");
    let cases = [
        (
            json!({"image": {"url": at("/big")}}),
            413,
            "--media-max-bytes",
        ),
        (
            json!({"image": {"url": at("/png")}}),
            413,
            "--media-max-bytes",
        ),
        (json!({"image": {"url": at("/html")}}), 400, "text/html"),
        (json!({"image": {"url": at("/missing")}}), 502, "404"),
        (json!({"image": {"url": at("/loop")}}), 502, "redirects"),
        (json!({"video": {"url": at("/pdf")}}), 400, "not video/"),
        (
            json!({"image": {"data": base64::engine::general_purpose::STANDARD.encode(png())}}),
            413,
            "--media-max-bytes",
        ),
    ];
    for (mut body, status, says) in cases {
        body["to"] = json!("15550001111");
        let r = send(&s, "m3", body.clone());
        let msg = r.error(status);
        assert!(msg.contains(says), "{body}: {msg}");
    }
    // A body past the send's own limit is refused before it is read.
    let huge = "A".repeat(64 * 1024 + 8 * 1024);
    let r = send(
        &s,
        "m3",
        json!({"to": "15550001111", "image": {"data": huge}}),
    );
    assert_eq!(r.status, 413, "{}", r.body);
    // Other routes keep the 64 KiB limit.
    let r = s.post(
        "/api/sessions",
        Some(&json!({"userId": "x", "phoneNumber": "1", "pad": "A".repeat(70_000)}).to_string()),
    );
    assert_eq!(r.status, 413);
}

#[test]
fn a_queued_media_send_is_fetched_when_its_turn_comes() {
    let files = file_server();
    let s = Server::start(&["--media-allow-private", "--send-interval", "10ms"]);
    online(&s, "m4");
    let r = s.post(
        "/api/sessions/m4/messages?queue=true",
        Some(&json!({"to": "15550001111", "image": {"url": format!("http://127.0.0.1:{files}/png")}, "caption": "later"}).to_string()),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.json()["kind"], "image");
    let id = r.json()["messageId"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = s.get("/api/sim/m4/messages").json();
        if let Some(m) = m["messages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["messageId"] == id)
        {
            assert_eq!(m["image"]["sha256"], sha(&png()), "{m}");
            assert_eq!(m["image"]["caption"], "later");
            break;
        }
        assert!(Instant::now() < deadline, "the queued image never went out");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The real link, end to end against the loopback peer: the media (base64 in JSON, an
/// image by URL, a document and an image uploaded as the body) is encrypted and uploaded
/// by whatsapp-rust to the peer's media host (HTTPS), the message carries its key and
/// path, and the peer, reading the host's bytes back and decrypting them, finds the very
/// bytes sent (SHA-256), with the type, caption and file name.
#[cfg(feature = "test-peer")]
#[test]
fn real_link_media_reaches_the_peer_intact_through_its_media_host() {
    use botvisor_wa_peer::Peer;
    let peer = Peer::start();
    let files = file_server();
    let dir = tempfile::tempdir().unwrap();
    let s = common::start_real_link(&peer.url(), dir.path(), &["--media-allow-private"]);
    common::paired_online(&s, "wm_1", "Media Bot");
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let ogg = {
        let mut b = b"OggS\x00\x02".to_vec();
        b.extend((0..300_000u32).map(|i| (i % 97) as u8));
        b
    };
    let sends = [
        (
            json!({"to": "15550001111", "image": {"data": b64(&png()), "caption": "a chart"}}),
            format!(
                "image image/png {} sha256:{} caption a chart",
                png().len(),
                sha(&png())
            ),
        ),
        (
            json!({"to": "15550001111", "document": {"data": b64(&pdf()), "mimetype": "application/pdf", "filename": "report.pdf"}}),
            format!(
                "document application/pdf {} sha256:{} file report.pdf",
                pdf().len(),
                sha(&pdf())
            ),
        ),
        (
            json!({"to": "15550001111", "image": {"url": format!("http://127.0.0.1:{files}/png")}, "caption": "by url"}),
            format!(
                "image image/png {} sha256:{} caption by url",
                png().len(),
                sha(&png())
            ),
        ),
        (
            json!({"to": "15550001111", "audio": {"data": b64(&ogg), "mimetype": "audio/ogg; codecs=opus", "voice": true}}),
            format!(
                "voice audio/ogg; codecs=opus {} sha256:{}",
                ogg.len(),
                sha(&ogg)
            ),
        ),
    ];
    for (body, expected) in sends {
        let r = send(&s, "wm_1", body);
        assert_eq!(r.status, 201, "{}", r.body);
        let id = r.json()["messageId"].as_str().unwrap().to_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        let about = loop {
            let found = peer
                .stats()
                .decrypted
                .iter()
                .find(|d| d.id == id && d.to.starts_with("15550001111"))
                .and_then(|d| d.about.clone());
            if let Some(a) = found {
                break a;
            }
            assert!(
                Instant::now() < deadline,
                "{id} never decrypted: {:?}",
                peer.stats().signal_errors
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(about, expected);
    }
    // Media uploaded as the request's body go the same way.
    for (query, content_type, body, expected) in [
        (
            "kind=document&to=15550001111&filename=body.pdf",
            "application/pdf",
            pdf(),
            format!(
                "document application/pdf {} sha256:{} file body.pdf",
                pdf().len(),
                sha(&pdf())
            ),
        ),
        (
            "kind=image&to=15550001111&caption=uploaded",
            "image/png",
            png(),
            format!(
                "image image/png {} sha256:{} caption uploaded",
                png().len(),
                sha(&png())
            ),
        ),
    ] {
        let mut r = format!(
            "POST /api/sessions/wm_1/messages/upload?{query} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(&body);
        let raw = s.raw(&r);
        assert_eq!(raw.status, 201, "{}", raw.body);
        let id = raw.json()["messageId"].as_str().unwrap().to_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        let about = loop {
            let found = peer
                .stats()
                .decrypted
                .iter()
                .find(|d| d.id == id)
                .and_then(|d| d.about.clone());
            if let Some(a) = found {
                break a;
            }
            assert!(Instant::now() < deadline, "{id} never decrypted");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(about, expected);
    }
    assert_eq!(peer.media_uploads().len(), 6, "one upload per send");
    assert_eq!(s.session("wm_1")["state"], "online");
}

#[test]
fn media_received_on_the_simulated_network_is_described_in_its_webhook() {
    let (hook, got) = common::json_receiver();
    let s = Server::start(&[
        "--webhook-url",
        &hook,
        "--webhook-secret",
        "media-webhook-secret-0123456789",
    ]);
    online(&s, "m5");
    let data = base64::engine::general_purpose::STANDARD.encode(pdf());
    let r = s.post(
        "/api/sim/m5/inbound",
        Some(
            &json!({"from": "15557654321", "document": {"data": data, "filename": "menu.pdf"}, "caption": "the menu"})
                .to_string(),
        ),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let id = r.json()["messageId"].as_str().unwrap().to_string();
    let event = common::event_for(&got, &id);
    let d = &event["data"];
    assert_eq!(event["event"], "message.received", "{event}");
    assert_eq!(d["kind"], "document", "{event}");
    assert_eq!(d["mimetype"], "application/pdf", "{event}");
    assert_eq!(d["size"], pdf().len(), "{event}");
    assert_eq!(d["sha256"], sha(&pdf()), "{event}");
    assert_eq!(d["fileName"], "menu.pdf", "{event}");
    assert_eq!(d["caption"], "the menu", "{event}");
    assert_eq!(d["text"], "the menu", "{event}");
}

/// A received media is downloadable by its message's id, with the bytes that arrived and
/// the sender's type; other messages and unknown ids are 404s, a stopped session a 409.
#[test]
fn received_media_is_downloaded_by_message_id_with_its_bytes_and_type() {
    let s = Server::start(&[]);
    online(&s, "md1");
    let data = base64::engine::general_purpose::STANDARD.encode(pdf());
    let r = s.post(
        "/api/sim/md1/inbound",
        Some(
            &json!({"from": "15557654321", "document": {"data": data, "filename": "menu.pdf"}})
                .to_string(),
        ),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let id = r.json()["messageId"].as_str().unwrap().to_string();
    let (status, headers, body) = s.get_bytes(&format!("/api/sessions/md1/messages/{id}/media"));
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(sha(&body), sha(&pdf()), "the bytes that arrived");
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    assert_eq!(header("content-type").as_deref(), Some("application/pdf"));
    assert_eq!(
        header("cache-control").as_deref(),
        Some("private, no-store")
    );
    // A text has no media; an id the session never saw is unknown.
    let r = s.post(
        "/api/sim/md1/inbound",
        Some(&json!({"from": "15557654321", "text": "hello"}).to_string()),
    );
    let text_id = r.json()["messageId"].as_str().unwrap().to_string();
    let r = s.get(&format!("/api/sessions/md1/messages/{text_id}/media"));
    assert!(r.error(404).contains("has no media"), "{}", r.body);
    let r = s.get("/api/sessions/md1/messages/NOSUCHMESSAGE1/media");
    assert!(r.error(404).contains("is not known"), "{}", r.body);
    let r = s.get("/api/sessions/nobody/messages/NOSUCHMESSAGE1/media");
    assert_eq!(r.status, 404, "{}", r.body);
    let r = s.get(&format!("/api/sessions/md1/messages/{id}/media"));
    assert_eq!(r.status, 200);
    // The session fetches it: stopped, it cannot.
    assert_eq!(s.post("/api/sessions/md1/stop", None).status, 200);
    let r = s.get(&format!("/api/sessions/md1/messages/{id}/media"));
    assert!(r.error(409).contains("not online"), "{}", r.body);
}
