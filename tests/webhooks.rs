//! Messages and signed, durable webhooks over real sockets, with a receiver in the test
//! that can answer 2xx, answer 500, or be down.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Server;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::Value;
use sha2::Sha256;

const SECRET: &str = "webhook-s3cret-0123456789";

/// One delivery as the receiver saw it.
#[derive(Debug, Clone)]
struct Delivery {
    event_id: String,
    kind: String,
    timestamp: String,
    signature: String,
    body: String,
}

impl Delivery {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap()
    }
}

/// A webhook receiver: records every POST, answers with `status` (changeable).
struct Receiver {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Delivery>>>,
    status: Arc<AtomicU16>,
}

impl Receiver {
    fn start_on(listener: TcpListener) -> Receiver {
        let addr = listener.local_addr().unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let status = Arc::new(AtomicU16::new(200));
        let (g, st) = (got.clone(), status.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let (g, st) = (g.clone(), st.clone());
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(conn.try_clone().unwrap());
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let mut headers = HashMap::new();
                        loop {
                            let mut h = String::new();
                            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                                return;
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
                        if reader.read_exact(&mut body).is_err() {
                            return;
                        }
                        let h = |k: &str| headers.get(k).cloned().unwrap_or_default();
                        let code = st.load(Ordering::SeqCst);
                        if code == 200 {
                            g.lock().unwrap().push(Delivery {
                                event_id: h("x-botvisor-event-id"),
                                kind: h("x-botvisor-event"),
                                timestamp: h("x-botvisor-timestamp"),
                                signature: h("x-botvisor-signature"),
                                body: String::from_utf8_lossy(&body).into_owned(),
                            });
                        }
                        let _ = write!(conn, "HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n");
                    }
                });
            }
        });
        Receiver { addr, got, status }
    }

    fn start() -> Receiver {
        Receiver::start_on(TcpListener::bind("127.0.0.1:0").unwrap())
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn deliveries(&self) -> Vec<Delivery> {
        self.got.lock().unwrap().clone()
    }

    /// Waits until `pred` holds on the deliveries so far.
    fn wait(&self, secs: u64, what: &str, pred: impl Fn(&[Delivery]) -> bool) -> Vec<Delivery> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let got = self.deliveries();
            if pred(&got) {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {got:#?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The receiver's side of the signature check (what examples/ shows in Python and Node).
fn signature_valid(secret: &str, timestamp: &str, body: &str, signature: &str) -> bool {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{timestamp}.{body}").as_bytes());
    let expected = format!("v1={}", hex::encode(mac.finalize().into_bytes()));
    expected == signature
}

fn start(urls: &[&str], extra: &[&str]) -> Server {
    let mut args: Vec<&str> = vec!["--webhook-secret", SECRET, "--sim-pair-delay", "100ms"];
    for u in urls {
        args.push("--webhook-url");
        args.push(u);
    }
    args.extend_from_slice(extra);
    Server::start(&args)
}

fn kinds(got: &[Delivery], user: &str) -> Vec<String> {
    got.iter()
        .filter(|d| d.json()["data"]["userId"] == user)
        .map(|d| {
            let v = d.json();
            match v["data"]["state"].as_str() {
                Some(state) => format!("{}:{state}", d.kind),
                None => d.kind.clone(),
            }
        })
        .collect()
}

#[test]
fn sends_and_receives_reach_a_signed_webhook_in_order() {
    let r = Receiver::start();
    let url = r.url();
    let s = start(&[&url], &[]);
    assert_eq!(s.create("wh1", "15550001111").status, 201);
    s.wait_state("wh1", "online");
    let sent = s.post(
        "/api/sessions/wh1/messages",
        Some(r#"{"to":"15557654321","text":"hello from the bot"}"#),
    );
    assert_eq!(sent.status, 201, "{}", sent.body);
    let message_id = sent.json()["messageId"].as_str().unwrap().to_string();
    // The simulated network has it.
    let on_network = s.get("/api/sim/wh1/messages").json();
    assert_eq!(on_network["messages"][0]["text"], "hello from the bot");
    assert_eq!(on_network["messages"][0]["messageId"], message_id.as_str());
    // Someone writes to the bot.
    let r2 = s.post(
        "/api/sim/wh1/inbound",
        Some(r#"{"from":"15557654321","text":"hi bot"}"#),
    );
    assert_eq!(r2.status, 200, "{}", r2.body);
    let got = r.wait(15, "the message.received webhook", |g| {
        g.iter().any(|d| d.kind == "message.received")
    });
    assert_eq!(
        kinds(&got, "wh1"),
        [
            "session.state:starting",
            "session.state:pairing",
            "session.state:connecting",
            "session.state:online",
            "message.sent",
            "message.received"
        ]
    );
    for d in &got {
        assert!(
            signature_valid(SECRET, &d.timestamp, &d.body, &d.signature),
            "{d:?}"
        );
        let v = d.json();
        assert_eq!(v["id"], d.event_id.as_str(), "the body names its event id");
        assert_eq!(v["event"], d.kind.as_str());
    }
    let received = got
        .iter()
        .find(|d| d.kind == "message.received")
        .unwrap()
        .json();
    assert_eq!(received["data"]["text"], "hi bot");
    assert_eq!(received["data"]["from"], "15557654321@s.whatsapp.net");
    let sent_event = got
        .iter()
        .find(|d| d.kind == "message.sent")
        .unwrap()
        .json();
    assert_eq!(sent_event["data"]["messageId"], message_id.as_str());
    // A signature does not survive a changed body, a changed timestamp or a wrong secret.
    let d = &got[0];
    assert!(!signature_valid(
        SECRET,
        &d.timestamp,
        &d.body.replace("starting", "online"),
        &d.signature
    ));
    let later = (d.timestamp.parse::<u64>().unwrap() + 1).to_string();
    assert!(!signature_valid(SECRET, &later, &d.body, &d.signature));
    assert!(!signature_valid(
        "another-secret-123456",
        &d.timestamp,
        &d.body,
        &d.signature
    ));
}

#[test]
fn the_send_api_refuses_clearly_and_limits_the_rate() {
    let s = Server::start(&["--send-rate", "3", "--sim-pair-delay", "30s"]);
    assert_eq!(s.create("tx", "15550001111").status, 201);
    let send = |body: &str| s.post("/api/sessions/tx/messages", Some(body));
    // Not online yet (pairing).
    let msg = send(r#"{"to":"15557654321","text":"hi"}"#).error(409);
    assert!(msg.contains("is not online (state: pairing)"), "{msg}");
    assert!(send(r#"{"to":"+1 555","text":"hi"}"#)
        .error(400)
        .contains("to must be a phone number"));
    assert!(send(r#"{"to":"15557654321","text":"  "}"#)
        .error(400)
        .contains("non-empty"));
    let long = format!(r#"{{"to":"15557654321","text":"{}"}}"#, "x".repeat(5000));
    assert!(send(&long).error(400).contains("too long"));
    assert_eq!(
        s.post(
            "/api/sessions/nobody/messages",
            Some(r#"{"to":"15557654321","text":"hi"}"#)
        )
        .status,
        404
    );
    // Online: three go through, the fourth waits.
    let s = Server::start(&["--send-rate", "3", "--sim-pair-delay", "50ms"]);
    assert_eq!(s.create("tx", "15550001111").status, 201);
    s.wait_state("tx", "online");
    for i in 0..3 {
        let r = s.post(
            "/api/sessions/tx/messages",
            Some(&format!(r#"{{"to":"15557654321","text":"m{i}"}}"#)),
        );
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let r = s.post(
        "/api/sessions/tx/messages",
        Some(r#"{"to":"15557654321","text":"m3"}"#),
    );
    assert!(r.error(429).contains("--send-rate"));
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=20).contains(&retry), "Retry-After {retry}");
    assert_eq!(
        s.get("/api/sim/tx/messages").json()["messages"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
}

#[test]
fn a_receiver_that_is_down_gets_every_event_once_in_order_when_it_comes_back() {
    // Reserve a port, then close it: the receiver is down.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/hook");
    let s = start(&[&url], &["--webhook-retry-max", "1s"]);
    for id in ["d1", "d2"] {
        assert_eq!(s.create(id, "15550001111").status, 201);
    }
    for id in ["d1", "d2"] {
        s.wait_state(id, "online");
        for i in 0..5 {
            let r = s.post(
                &format!("/api/sessions/{id}/messages"),
                Some(&format!(r#"{{"to":"15557654321","text":"{id}-{i}"}}"#)),
            );
            assert_eq!(r.status, 201);
        }
    }
    assert_eq!(s.post("/api/sessions/d1/stop", None).status, 200);
    std::thread::sleep(Duration::from_secs(3));
    // Back up.
    let r = Receiver::start_on(TcpListener::bind(("127.0.0.1", port)).unwrap());
    let expected = 2 * (4 + 5) + 1; // states to online + sends, each; d1's stop
    let got = r.wait(30, "every event", |g| g.len() >= expected);
    std::thread::sleep(Duration::from_secs(2));
    let got_now = r.deliveries();
    assert_eq!(
        got_now.len(),
        got.len(),
        "more deliveries than events: duplicates"
    );
    let ids: BTreeSet<&str> = got.iter().map(|d| d.event_id.as_str()).collect();
    assert_eq!(ids.len(), got.len(), "an event was delivered twice");
    for id in ["d1", "d2"] {
        let texts: Vec<String> = got
            .iter()
            .filter(|d| d.kind == "message.sent" && d.json()["data"]["userId"] == id)
            .map(|d| d.json()["data"]["text"].as_str().unwrap().to_string())
            .collect();
        let want: Vec<String> = (0..5).map(|i| format!("{id}-{i}")).collect();
        assert_eq!(texts, want, "in order per session");
    }
    assert!(kinds(&got, "d1").last().unwrap().ends_with(":stopped"));
}

#[test]
fn a_receiver_failing_forever_makes_dead_letters_that_replay() {
    let r = Receiver::start();
    r.status.store(500, Ordering::SeqCst);
    let url = r.url();
    let s = start(
        &[&url],
        &["--webhook-max-attempts", "2", "--webhook-retry-max", "1s"],
    );
    assert_eq!(s.create("dl", "15550001111").status, 201);
    s.wait_state("dl", "online");
    let deadline = Instant::now() + Duration::from_secs(30);
    let dead = loop {
        let d = s.get("/api/webhooks/dead").json();
        if d["count"].as_u64() == Some(4) {
            break d;
        }
        assert!(Instant::now() < deadline, "no dead letters: {d}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let first = &dead["dead"][0];
    assert_eq!(first["attempts"], 2);
    assert_eq!(first["event"], "session.state");
    assert!(
        first["lastError"].as_str().unwrap().contains("500"),
        "{first}"
    );
    // The receiver is fixed; the operator replays.
    r.status.store(200, Ordering::SeqCst);
    for d in dead["dead"].as_array().unwrap() {
        let id = d["eventId"].as_str().unwrap();
        let rep = s.post(&format!("/api/webhooks/dead/{id}/replay"), None);
        assert_eq!(rep.status, 200, "{}", rep.body);
    }
    let got = r.wait(15, "the replayed events", |g| g.len() >= 4);
    assert_eq!(
        kinds(&got, "dl"),
        [
            "session.state:starting",
            "session.state:pairing",
            "session.state:connecting",
            "session.state:online"
        ]
    );
    assert_eq!(s.get("/api/webhooks/dead").json()["count"], 0);
    let missing = s.post("/api/webhooks/dead/evt_nope/replay", None);
    assert_eq!(missing.error(404), "No dead letter with event id evt_nope");
}

#[test]
fn a_kill_mid_burst_loses_no_confirmed_event() {
    let r = Receiver::start();
    let url = r.url();
    let tmp = tempfile::tempdir().unwrap();
    let args = [
        "--webhook-secret",
        SECRET,
        "--webhook-url",
        &url,
        "--webhook-retry-max",
        "1s",
        "--sim-pair-delay",
        "50ms",
        "--send-rate",
        "1000",
    ];
    let mut s = Server::start_in(tmp.path(), &args);
    assert_eq!(s.create("k1", "15550001111").status, 201);
    s.wait_state("k1", "online");
    let mut confirmed = Vec::new();
    let burst_start = Instant::now();
    for i in 0..200 {
        let r = s.post(
            "/api/sessions/k1/messages",
            Some(&format!(r#"{{"to":"15557654321","text":"burst-{i}"}}"#)),
        );
        if r.status == 201 {
            confirmed.push(r.json()["messageId"].as_str().unwrap().to_string());
        }
        if i == 120 {
            s.kill9();
            break;
        }
    }
    let _ = burst_start;
    let before = r.deliveries().len();
    let s = Server::start_in(tmp.path(), &args);
    let got = r.wait(30, "every confirmed message.sent", |g| {
        let ids: BTreeSet<String> = g
            .iter()
            .filter(|d| d.kind == "message.sent")
            .map(|d| d.json()["data"]["messageId"].as_str().unwrap().to_string())
            .collect();
        confirmed.iter().all(|id| ids.contains(id))
    });
    eprintln!(
        "{} sends confirmed before the kill; {before} deliveries before, {} after the restart",
        confirmed.len(),
        got.len()
    );
    assert!(confirmed.len() > 100);
    drop(s);
}

#[test]
fn a_session_can_have_its_own_receiver_besides_the_global_one() {
    let global = Receiver::start();
    let own = Receiver::start();
    let (gurl, ourl) = (global.url(), own.url());
    let s = start(&[&gurl], &[]);
    for id in ["mine", "other"] {
        assert_eq!(s.create(id, "15550001111").status, 201);
        s.wait_state(id, "online");
    }
    let put = s.req(
        "PUT",
        "/api/sessions/mine/webhook",
        Some(&format!(r#"{{"url":"{ourl}"}}"#)),
        &[],
    );
    assert_eq!(put.status, 200, "{}", put.body);
    assert_eq!(
        s.get("/api/sessions/mine/webhook").json()["url"],
        ourl.as_str()
    );
    let bad = s.req(
        "PUT",
        "/api/sessions/mine/webhook",
        Some(r#"{"url":"ftp://x"}"#),
        &[],
    );
    assert!(bad.error(400).contains("is not a webhook URL"));
    for id in ["mine", "other"] {
        let r = s.post(
            &format!("/api/sessions/{id}/messages"),
            Some(&format!(r#"{{"to":"15557654321","text":"from {id}"}}"#)),
        );
        assert_eq!(r.status, 201);
    }
    let got = own.wait(15, "mine's message on its own receiver", |g| {
        g.iter().any(|d| d.kind == "message.sent")
    });
    assert!(
        got.iter().all(|d| d.json()["data"]["userId"] == "mine"),
        "only mine's events: {got:?}"
    );
    global.wait(15, "both messages on the global receiver", |g| {
        g.iter().filter(|d| d.kind == "message.sent").count() == 2
    });
    // Cleared: mine's new events go to the global receiver only.
    assert_eq!(
        s.req("DELETE", "/api/sessions/mine/webhook", None, &[])
            .status,
        200
    );
    assert_eq!(
        s.get("/api/sessions/mine/webhook").json()["url"],
        serde_json::Value::Null
    );
    let before = own.deliveries().len();
    assert_eq!(s.post("/api/sessions/mine/stop", None).status, 200);
    global.wait(15, "the stop on the global receiver", |g| {
        g.iter().any(|d| d.json()["data"]["state"] == "stopped")
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        own.deliveries().len(),
        before,
        "nothing more to the cleared receiver"
    );
}

#[test]
fn per_session_webhooks_need_a_secret() {
    let s = Server::start(&["--sim-pair-delay", "50ms"]);
    assert_eq!(s.create("ns", "15550001111").status, 201);
    let r = s.req(
        "PUT",
        "/api/sessions/ns/webhook",
        Some(r#"{"url":"http://127.0.0.1:9/x"}"#),
        &[],
    );
    assert!(r.error(409).contains("--webhook-secret"));
}
