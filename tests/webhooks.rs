//! Messages and signed, durable webhooks over real sockets, with a receiver in the test
//! that can answer 2xx, answer 500, hang, drop the connection, be down, and come back on
//! the same port.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::io::{BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
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

/// How the receiver treats a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Mode {
    /// 200 (recorded as delivered).
    Ok = 0,
    /// 500.
    Fail = 1,
    /// Reads the request and never answers (the connection stays open).
    Hang = 2,
    /// Reads the request and closes the connection.
    Close = 3,
}

/// What the receiver's threads share.
#[derive(Default)]
struct Shared {
    /// Deliveries answered 2xx.
    got: Mutex<Vec<Delivery>>,
    /// Requests read, whatever the answer.
    requests: AtomicUsize,
    /// Sessions (`data.userId`) whose requests get a 500 whatever the mode.
    fail_users: Mutex<HashSet<String>>,
    /// A `Mode`.
    mode: AtomicU8,
    /// Hung requests whose connection is still open, by the session they are about.
    hung: Mutex<Vec<(TcpStream, String)>>,
    /// The most hung requests open at once.
    max_hung: AtomicUsize,
    /// Sessions whose requests were hung at least once.
    hung_users: Mutex<BTreeSet<String>>,
    /// Every connection accepted (shut down when the receiver goes down).
    conns: Mutex<Vec<TcpStream>>,
}

/// Whether the peer closed `s` (without blocking, without changing its flags).
fn peer_closed(s: &TcpStream) -> bool {
    let mut byte = 0u8;
    // SAFETY: a valid socket and a one-byte buffer that outlives the call.
    let n = unsafe {
        libc::recv(
            s.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n == 0 || (n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock)
}

fn handle(conn: TcpStream, sh: &Shared) {
    let mut out = conn.try_clone().unwrap();
    let mut reader = BufReader::new(conn);
    while let Some((headers, body)) = common::read_request(&mut reader) {
        sh.requests.fetch_add(1, Ordering::SeqCst);
        let h = |k: &str| headers.get(k).cloned().unwrap_or_default();
        let d = Delivery {
            event_id: h("x-botvisor-event-id"),
            kind: h("x-botvisor-event"),
            timestamp: h("x-botvisor-timestamp"),
            signature: h("x-botvisor-signature"),
            body: String::from_utf8_lossy(&body).into_owned(),
        };
        let user = serde_json::from_str::<Value>(&d.body)
            .ok()
            .and_then(|v| v["data"]["userId"].as_str().map(str::to_string))
            .unwrap_or_default();
        let mode = match sh.mode.load(Ordering::SeqCst) {
            _ if sh.fail_users.lock().unwrap().contains(&user) => Mode::Fail,
            0 => Mode::Ok,
            1 => Mode::Fail,
            2 => Mode::Hang,
            _ => Mode::Close,
        };
        match mode {
            Mode::Ok => {
                sh.got.lock().unwrap().push(d);
                let _ = write!(out, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
            }
            Mode::Fail => {
                let _ = write!(out, "HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n");
            }
            Mode::Close => {
                let _ = out.shutdown(Shutdown::Both);
                return;
            }
            Mode::Hang => {
                {
                    // Open requests: those whose client has not closed the connection. A
                    // client that gave up closed it before it sent the next request, so
                    // the count does not depend on which thread here runs first.
                    let mut hung = sh.hung.lock().unwrap();
                    hung.retain(|(s, _)| !peer_closed(s));
                    hung.push((out.try_clone().unwrap(), user.clone()));
                    sh.max_hung.fetch_max(hung.len(), Ordering::SeqCst);
                    sh.hung_users.lock().unwrap().insert(user);
                }
                // Never answer; return when the client closes.
                let mut sink = [0u8; 1024];
                while reader.read(&mut sink).is_ok_and(|n| n > 0) {}
                return;
            }
        }
    }
}

/// A webhook receiver on 127.0.0.1: records every POST it answers 2xx.
struct Receiver {
    port: u16,
    sh: Arc<Shared>,
    /// Set to stop the accepting thread (which then drops the listener).
    stop: Mutex<Option<(Arc<AtomicBool>, std::thread::JoinHandle<()>)>>,
}

impl Receiver {
    fn start_on(listener: TcpListener) -> Receiver {
        let r = Receiver {
            port: listener.local_addr().unwrap().port(),
            sh: Arc::default(),
            stop: Mutex::new(None),
        };
        r.serve(listener);
        r
    }

    fn start() -> Receiver {
        Receiver::start_on(TcpListener::bind("127.0.0.1:0").unwrap())
    }

    /// Accepts on `listener` until `down`.
    fn serve(&self, listener: TcpListener) {
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (sh, flag) = (self.sh.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        conn.set_nonblocking(false).unwrap();
                        sh.conns.lock().unwrap().push(conn.try_clone().unwrap());
                        let sh = sh.clone();
                        std::thread::spawn(move || handle(conn, &sh));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        *self.stop.lock().unwrap() = Some((stop, thread));
    }

    /// Down: the listener is closed (connections are refused) and so is every connection.
    fn down(&self) {
        if let Some((flag, thread)) = self.stop.lock().unwrap().take() {
            flag.store(true, Ordering::SeqCst);
            thread.join().unwrap();
        }
        for c in self.sh.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// Up again on the same port.
    fn up(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", self.port)) {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("rebinding port {}: {e}", self.port);
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("cannot listen on port {} again: {e}", self.port),
            }
        };
        self.serve(listener);
    }

    fn set_mode(&self, mode: Mode) {
        self.sh.mode.store(mode as u8, Ordering::SeqCst);
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    fn deliveries(&self) -> Vec<Delivery> {
        self.sh.got.lock().unwrap().clone()
    }

    fn requests(&self) -> usize {
        self.sh.requests.load(Ordering::SeqCst)
    }

    /// Waits until `pred` holds on the deliveries so far.
    fn wait(&self, secs: u64, what: &str, pred: impl Fn(&[Delivery]) -> bool) -> Vec<Delivery> {
        poll(secs, what, || self.deliveries(), |got| pred(got))
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.down();
    }
}

/// The outbox as the server left it on disk: (user, attempts, last error, dead) by id.
fn outbox(s: &Server) -> Vec<(String, u32, Option<String>, bool)> {
    common::committed_rows(
        &s.data_dir,
        "SELECT user_id, attempts, last_error, dead FROM outbox ORDER BY id",
        "SELECT user_id, attempts, last_error, dead::int FROM bv_outbox ORDER BY id",
    )
    .into_iter()
    .map(|r| {
        let text = |i: usize| r[i].clone().unwrap_or_default();
        (
            text(0),
            text(1).parse().unwrap(),
            r[2].clone(),
            text(3) == "1",
        )
    })
    .collect()
}

/// Polls the outbox until `pred` holds.
fn wait_outbox(
    s: &Server,
    secs: u64,
    what: &str,
    pred: impl Fn(&[(String, u32, Option<String>, bool)]) -> bool,
) -> Vec<(String, u32, Option<String>, bool)> {
    poll(secs, what, || outbox(s), |rows| pred(rows))
}

/// Calls `get` until `pred` holds on what it returns (every 50 ms, for `secs` at most).
fn poll<T: std::fmt::Debug>(
    secs: u64,
    what: &str,
    get: impl Fn() -> T,
    pred: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let got = get();
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

/// Every event id once: no duplicate deliveries.
fn assert_once(got: &[Delivery]) {
    let ids: BTreeSet<&str> = got.iter().map(|d| d.event_id.as_str()).collect();
    assert_eq!(
        ids.len(),
        got.len(),
        "an event was delivered twice: {got:#?}"
    );
}

fn send(s: &Server, id: &str, text: &str) {
    let r = s.post(
        &format!("/api/sessions/{id}/messages"),
        Some(&format!(r#"{{"to":"15557654321","text":"{text}"}}"#)),
    );
    assert_eq!(r.status, 201, "{}", r.body);
}

/// The texts of a session's message.sent deliveries, in the order they came.
fn sent_texts(got: &[Delivery], user: &str) -> Vec<String> {
    got.iter()
        .filter(|d| d.kind == "message.sent" && d.json()["data"]["userId"] == user)
        .map(|d| d.json()["data"]["text"].as_str().unwrap().to_string())
        .collect()
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
    // A text's event keeps the contract's shape; a poll's names its kind and carries it.
    assert!(sent_event["data"].get("kind").is_none(), "{sent_event}");
    let poll = s.post(
        "/api/sessions/wh1/messages",
        Some(r#"{"to":"15557654321","poll":{"question":"Lunch?","options":["pizza","soup"]}}"#),
    );
    assert_eq!(poll.status, 201, "{}", poll.body);
    let is_poll = |d: &Delivery| d.kind == "message.sent" && d.json()["data"]["kind"] == "poll";
    let got = r.wait(15, "the poll's message.sent webhook", |g| {
        g.iter().any(is_poll)
    });
    let v = got.iter().find(|d| is_poll(d)).unwrap().json();
    assert_eq!(v["data"]["text"], "Lunch?");
    assert_eq!(v["data"]["poll"]["options"][1], "soup");
    assert_eq!(v["data"]["poll"]["selectable"], 1);
}

/// The simulated network's inbound takes what WhatsApp users send besides a text: a reply
/// (`message.received` with `replyTo`), another kind (`text` null), a reaction, an edit and
/// a revoke (events of their own, naming their message), shaped as the real link
/// reports them; a reaction with content, or a bad id, is a 400 and delivers nothing.
#[test]
fn simulated_inbound_replies_reactions_edits_and_revokes() {
    let r = Receiver::start();
    let url = r.url();
    let s = start(&[&url], &[]);
    assert_eq!(s.create("wh_in", "15550001111").status, 201);
    s.wait_state("wh_in", "online");
    let inbound = |body: &str| {
        let got = s.post("/api/sim/wh_in/inbound", Some(body));
        assert_eq!(got.status, 200, "{body}: {}", got.body);
        got.json()["messageId"].as_str().unwrap().to_string()
    };
    let first = inbound(r#"{"from":"15557654321","text":"first"}"#);
    let reply = inbound(&format!(
        r#"{{"from":"15557654321","text":"an answer","replyTo":"{first}"}}"#
    ));
    inbound(r#"{"from":"15557654321","location":{"latitude":1.5,"longitude":2.5}}"#);
    inbound(&format!(
        r#"{{"from":"15557654321","reaction":{{"messageId":"{first}","emoji":"👍"}}}}"#
    ));
    inbound(&format!(
        r#"{{"from":"15557654321","edit":{{"messageId":"{first}","text":"first, fixed"}}}}"#
    ));
    inbound(&format!(
        r#"{{"from":"15557654321","revoke":{{"messageId":"{reply}"}}}}"#
    ));
    for (body, needle) in [
        (
            format!(
                r#"{{"from":"15557654321","text":"x","reaction":{{"messageId":"{first}","emoji":"👍"}}}}"#
            ),
            "reaction comes alone",
        ),
        (
            r#"{"from":"15557654321","reaction":{"messageId":"../x","emoji":"👍"}}"#.to_string(),
            "reaction.messageId",
        ),
        (
            format!(
                r#"{{"from":"15557654321","reaction":{{"messageId":"{first}","emoji":"a b"}}}}"#
            ),
            "emoji must be one emoji",
        ),
        (
            format!(r#"{{"from":"15557654321","edit":{{"messageId":"{first}"}}}}"#),
            "text must be a non-empty string",
        ),
        (
            r#"{"from":"15557654321","replyTo":"a/b","text":"x"}"#.to_string(),
            "replyTo",
        ),
    ] {
        let got = s.post("/api/sim/wh_in/inbound", Some(&body));
        assert_eq!(got.status, 400, "{body}: {}", got.body);
        let message = got.json()["message"].as_str().unwrap().to_string();
        assert!(message.contains(needle), "{body}: {message}");
    }
    let got = r.wait(15, "the revoke's webhook", |g| {
        g.iter().any(|d| d.kind == "message.revoked")
    });
    let events: Vec<serde_json::Value> = got
        .iter()
        .filter(|d| d.kind.starts_with("message.") && d.json()["data"]["userId"] == "wh_in")
        .map(|d| d.json())
        .collect();
    let kinds: Vec<&str> = events
        .iter()
        .map(|v| v["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "message.received",
            "message.received",
            "message.received",
            "message.reaction",
            "message.edited",
            "message.revoked"
        ],
        "{events:?}"
    );
    assert!(events[0]["data"].get("replyTo").is_none_or(|v| v.is_null()));
    assert_eq!(events[1]["data"]["replyTo"], first.as_str());
    assert_eq!(events[2]["data"]["kind"], "location");
    assert!(events[2]["data"]["text"].is_null());
    assert_eq!(events[3]["data"]["targetMessageId"], first.as_str());
    assert_eq!(events[3]["data"]["emoji"], "👍");
    assert_eq!(events[4]["data"]["targetMessageId"], first.as_str());
    assert_eq!(events[4]["data"]["text"], "first, fixed");
    assert_eq!(events[5]["data"]["targetMessageId"], reply.as_str());
    assert!(events.iter().all(|v| v["data"].get("mentions").is_none()));
    inbound(r#"{"from":"15557654321","text":"@15550001111 hi","mentions":["15550001111"]}"#);
    let got = r.wait(15, "the mention's webhook", |g| {
        g.iter().any(|d| d.json()["data"]["mentions"].is_array())
    });
    let v = got
        .iter()
        .map(|d| d.json())
        .find(|v| v["data"]["mentions"].is_array())
        .unwrap();
    assert_eq!(
        v["data"]["mentions"],
        serde_json::json!(["15550001111@s.whatsapp.net"])
    );
    assert!(v["data"].get("fromLid").is_none(), "{v}");
    // A sender known only by its LID.
    inbound(r#"{"from":"123456789012345@lid","text":"hidden number"}"#);
    let got = r.wait(15, "the LID sender's webhook", |g| {
        g.iter().any(|d| d.json()["data"]["fromLid"].is_string())
    });
    let v = got
        .iter()
        .map(|d| d.json())
        .find(|v| v["data"]["fromLid"].is_string())
        .unwrap();
    assert_eq!(v["data"]["fromLid"], "123456789012345@lid");
    assert_eq!(v["data"]["from"], "123456789012345@lid");
}

/// A vote on a poll the session sent is a `message.poll_vote` naming the poll and the
/// options picked (none: the vote taken back); the simulated network checks them against
/// the options the poll was sent with, kept by the store.
#[test]
fn simulated_poll_votes_name_the_options_picked() {
    let r = Receiver::start();
    let url = r.url();
    let s = start(&[&url], &[]);
    assert_eq!(s.create("wh_vote", "15550001111").status, 201);
    s.wait_state("wh_vote", "online");
    let sent = s.post(
        "/api/sessions/wh_vote/messages",
        Some(r#"{"to":"15557654321","poll":{"question":"Lunch?","options":["pizza","soup","salad"],"selectable":2}}"#),
    );
    assert_eq!(sent.status, 201, "{}", sent.body);
    let poll = sent.json()["messageId"].as_str().unwrap().to_string();
    let text = s.post(
        "/api/sessions/wh_vote/messages",
        Some(r#"{"to":"15557654321","text":"not a poll"}"#),
    );
    let text = text.json()["messageId"].as_str().unwrap().to_string();
    for (options, shown) in [
        (r#"["soup","pizza"]"#, vec!["soup", "pizza"]),
        ("[]", vec![]),
    ] {
        let body = format!(
            r#"{{"from":"15557654321","pollVote":{{"messageId":"{poll}","options":{options}}}}}"#
        );
        let got = s.post("/api/sim/wh_vote/inbound", Some(&body));
        assert_eq!(got.status, 200, "{body}: {}", got.body);
        let id = got.json()["messageId"].as_str().unwrap().to_string();
        let got = r.wait(15, "the vote's webhook", |g| {
            g.iter()
                .any(|d| d.json()["data"]["messageId"] == id.as_str())
        });
        let v = got
            .iter()
            .map(|d| d.json())
            .find(|v| v["data"]["messageId"] == id.as_str())
            .unwrap();
        assert_eq!(v["event"], "message.poll_vote", "{v}");
        assert_eq!(v["data"]["targetMessageId"], poll.as_str(), "{v}");
        assert_eq!(
            v["data"]["selectedOptions"],
            serde_json::json!(shown),
            "{v}"
        );
        assert_eq!(v["data"]["from"], "15557654321@s.whatsapp.net", "{v}");
    }
    for (body, needle) in [
        (
            format!(
                r#"{{"from":"15557654321","pollVote":{{"messageId":"{poll}","options":["soup","soup"]}}}}"#
            ),
            "each once",
        ),
        (
            format!(
                r#"{{"from":"15557654321","pollVote":{{"messageId":"{poll}","options":["tea"]}}}}"#
            ),
            "pizza, soup, salad",
        ),
        (
            format!(r#"{{"from":"15557654321","pollVote":{{"messageId":"{poll}"}}}}"#),
            "pollVote.options must be an array",
        ),
        (
            format!(
                r#"{{"from":"15557654321","text":"x","pollVote":{{"messageId":"{poll}","options":[]}}}}"#
            ),
            "comes alone",
        ),
    ] {
        let got = s.post("/api/sim/wh_vote/inbound", Some(&body));
        assert_eq!(got.status, 400, "{body}: {}", got.body);
        let message = got.json()["message"].as_str().unwrap().to_string();
        assert!(message.contains(needle), "{body}: {message}");
    }
    // A message that is no poll of this session's: 404.
    for id in [text.as_str(), "3EB0NOPE"] {
        let body =
            format!(r#"{{"from":"15557654321","pollVote":{{"messageId":"{id}","options":[]}}}}"#);
        let got = s.post("/api/sim/wh_vote/inbound", Some(&body));
        assert_eq!(got.status, 404, "{body}: {}", got.body);
        assert!(
            got.body.contains("is not a poll this session sent"),
            "{}",
            got.body
        );
    }
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

/// The issue's case: the receiver is down for a whole minute while sessions go on (sends,
/// a stop), with retries capped at a few seconds; once it is back on the same port every
/// event arrives exactly once (by X-Botvisor-Event-Id), in order per session.
#[test]
fn a_receiver_down_for_a_minute_gets_every_event_once_in_order_when_it_comes_back() {
    let r = Receiver::start();
    let url = r.url();
    let s = start(
        &[&url],
        &[
            "--webhook-retry-max",
            "3s",
            "--webhook-max-attempts",
            "1000",
        ],
    );
    let users = ["d1", "d2", "d3"];
    for id in users {
        assert_eq!(s.create(id, "15550001111").status, 201);
    }
    for id in users {
        s.wait_state(id, "online");
        send(&s, id, &format!("{id}-before"));
    }
    r.wait(20, "the events before the outage", |g| g.len() == 3 * 5);
    r.down();
    let down_at = Instant::now();
    let rounds = 12;
    for round in 0..rounds {
        for id in ["d1", "d2"] {
            send(&s, id, &format!("{id}-{round}"));
        }
        if round == 6 {
            assert_eq!(s.post("/api/sessions/d3/stop", None).status, 200);
        }
        if round == 10 {
            // Retried all along (a head at a time per lane), none given up.
            let rows = outbox(&s);
            let tried = rows.iter().map(|(_, a, _, _)| *a).max().unwrap_or(0);
            assert!(tried >= 5, "retries every few seconds: {rows:#?}");
            assert!(rows.iter().all(|(_, _, _, dead)| !dead), "{rows:#?}");
            let refused = rows
                .iter()
                .filter_map(|(_, _, e, _)| e.as_deref())
                .any(|e| e.contains("refused"));
            assert!(refused, "{rows:#?}");
        }
        let next = down_at + Duration::from_secs(5 * (round + 1));
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    assert!(down_at.elapsed() >= Duration::from_secs(60));
    assert_eq!(r.deliveries().len(), 15, "nothing got through while down");
    let queued = outbox(&s).len();
    r.up();
    let back = Instant::now();
    let complete = |g: &[Delivery]| {
        ["d1", "d2"]
            .iter()
            .all(|id| sent_texts(g, id).len() == 1 + rounds as usize)
            && kinds(g, "d3")
                .last()
                .is_some_and(|k| k.ends_with(":stopped"))
    };
    let got = r.wait(30, "every event", complete);
    let caught_up = back.elapsed();
    // Longer than a retry (3 s and jitter): a duplicate would have shown up by now.
    std::thread::sleep(Duration::from_secs(5));
    let got_now = r.deliveries();
    assert_eq!(got_now.len(), got.len(), "more deliveries than events");
    assert_once(&got_now);
    assert_eq!(
        got_now.len(),
        15 + queued,
        "each event queued in the outage, once"
    );
    for id in ["d1", "d2"] {
        let mut want = vec![format!("{id}-before")];
        want.extend((0..rounds).map(|i| format!("{id}-{i}")));
        assert_eq!(sent_texts(&got_now, id), want, "in order per session");
        let k = kinds(&got_now, id);
        assert_eq!(
            k[..4],
            [
                "session.state:starting",
                "session.state:pairing",
                "session.state:connecting",
                "session.state:online"
            ],
            "{k:?}"
        );
    }
    assert!(outbox(&s).is_empty(), "the outbox is drained");
    eprintln!(
        "{queued} deliveries queued during the 60 s outage; all in {} ms after the receiver came back",
        caught_up.as_millis()
    );
}

/// A receiver that hangs (reads the request, never answers) or drops the connection
/// mid-request fails the attempt with a clear error; later attempts go on, and once it
/// answers 2xx every event arrives once, in order.
fn fails_then_delivers(mode: Mode, error: &str) {
    let r = Receiver::start();
    r.set_mode(mode);
    let url = r.url();
    let s = start(
        &[&url],
        &["--webhook-timeout", "1s", "--webhook-retry-max", "1s"],
    );
    assert_eq!(s.create("h1", "15550001111").status, 201);
    s.wait_state("h1", "online");
    let rows = wait_outbox(&s, 20, "two failed attempts", |rows| {
        rows.first()
            .is_some_and(|(_, a, e, _)| *a >= 2 && e.as_deref().is_some_and(|e| e.contains(error)))
    });
    assert_eq!(rows.len(), 4, "{rows:#?}");
    assert!(
        rows[1..].iter().all(|(_, a, _, _)| *a == 0),
        "only the head of the lane is tried: {rows:#?}"
    );
    assert!(r.requests() >= 2);
    assert!(r.deliveries().is_empty());
    r.set_mode(Mode::Ok);
    r.wait(20, "the state events", |g| g.len() >= 4);
    wait_outbox(&s, 10, "an empty outbox", |rows| rows.is_empty());
    std::thread::sleep(Duration::from_millis(1_500));
    let got = r.deliveries();
    assert_once(&got);
    assert_eq!(
        kinds(&got, "h1"),
        [
            "session.state:starting",
            "session.state:pairing",
            "session.state:connecting",
            "session.state:online"
        ]
    );
}

#[test]
fn a_hanging_receiver_times_out_and_a_later_2xx_delivers() {
    fails_then_delivers(
        Mode::Hang,
        "timed out: no answer within 1s (--webhook-timeout)",
    );
}

#[test]
fn a_receiver_closing_the_connection_fails_the_attempt_and_a_later_2xx_delivers() {
    fails_then_delivers(Mode::Close, "connection closed before message completed");
}

/// A stop does not wait for a receiver that hangs: the attempt in flight is abandoned,
/// its row stays, and the next start delivers it (at least once).
#[test]
fn a_stop_does_not_wait_for_a_hanging_receiver() {
    let r = Receiver::start();
    r.set_mode(Mode::Hang);
    let url = r.url();
    let tmp = tempfile::tempdir().unwrap();
    let args = [
        "--webhook-secret",
        SECRET,
        "--webhook-url",
        &url,
        "--webhook-timeout",
        "5m",
        "--sim-pair-delay",
        "100ms",
    ];
    let mut s = Server::start_in(tmp.path(), &args);
    assert_eq!(s.create("t1", "15550001111").status, 201);
    s.wait_state("t1", "online");
    let deadline = Instant::now() + Duration::from_secs(20);
    while r.sh.hung.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "no request reached the receiver");
        std::thread::sleep(Duration::from_millis(50));
    }
    let stopping = Instant::now();
    assert_eq!(s.terminate(), Some(0));
    let took = stopping.elapsed();
    assert!(took < Duration::from_secs(8), "the stop took {took:?}");
    // The four states to online, and the stop's.
    assert_eq!(outbox(&s).len(), 5, "the undelivered events stay");
    r.set_mode(Mode::Ok);
    let _s = Server::start_in(tmp.path(), &args);
    let got = r.wait(20, "the events after the restart", |g| {
        kinds(g, "t1")
            .iter()
            .filter(|k| k.ends_with(":online"))
            .count()
            == 2
    });
    assert_eq!(
        kinds(&got, "t1")[..5],
        [
            "session.state:starting",
            "session.state:pairing",
            "session.state:connecting",
            "session.state:online",
            "session.state:stopped"
        ]
    );
    eprintln!("stopped in {} ms with a request hung", took.as_millis());
}

/// Lanes are per session: one session's events failing (500) on a receiver does not hold
/// up another session's on the same receiver.
#[test]
fn a_failing_session_does_not_hold_up_the_others_on_the_same_receiver() {
    let r = Receiver::start();
    r.sh.fail_users.lock().unwrap().insert("bad".into());
    let url = r.url();
    let s = start(
        &[&url],
        &["--webhook-retry-max", "1s", "--webhook-max-attempts", "100"],
    );
    // bad's events are older in the outbox than good's, for the same destination.
    assert_eq!(s.create("bad", "15550001111").status, 201);
    s.wait_state("bad", "online");
    assert_eq!(s.create("good", "15550002222").status, 201);
    s.wait_state("good", "online");
    for i in 0..5 {
        send(&s, "good", &format!("good-{i}"));
    }
    let got = r.wait(20, "good's events", |g| sent_texts(g, "good").len() == 5);
    assert_eq!(
        sent_texts(&got, "good"),
        (0..5).map(|i| format!("good-{i}")).collect::<Vec<_>>()
    );
    assert!(kinds(&got, "bad").is_empty());
    let rows = outbox(&s);
    let bad: Vec<_> = rows.iter().filter(|(u, _, _, _)| u == "bad").collect();
    assert_eq!(bad.len(), 4, "{rows:#?}");
    assert!(
        bad[0].1 >= 1 && bad[0].2.as_deref().is_some_and(|e| e.contains("500")),
        "{rows:#?}"
    );
    assert!(bad[1..].iter().all(|(_, a, _, _)| *a == 0), "{rows:#?}");
    // Fixed: bad's events follow, in order.
    r.sh.fail_users.lock().unwrap().clear();
    let got = r.wait(20, "bad's events", |g| kinds(g, "bad").len() == 4);
    assert_eq!(
        kinds(&got, "bad"),
        [
            "session.state:starting",
            "session.state:pairing",
            "session.state:connecting",
            "session.state:online"
        ]
    );
    assert_once(&got);
}

/// `--webhook-max-inflight 2`: six sessions' own receivers all hang, and the receiver never
/// has more than two requests open at once; every session still gets its turn.
#[test]
fn requests_in_flight_stay_within_the_bound() {
    let r = Receiver::start();
    r.set_mode(Mode::Hang);
    let s = Server::start(&[
        "--webhook-secret",
        SECRET,
        "--sim-pair-delay",
        "100ms",
        "--webhook-max-inflight",
        "2",
        "--webhook-timeout",
        "1s",
        "--webhook-retry-max",
        "1s",
    ]);
    let users: Vec<String> = (0..6).map(|i| format!("b{i}")).collect();
    for id in &users {
        assert_eq!(s.create(id, "15550001111").status, 201);
    }
    for id in &users {
        s.wait_state(id, "online");
        let own = format!(r#"{{"url":"http://127.0.0.1:{}/hook/{id}"}}"#, r.port);
        let put = s.req(
            "PUT",
            &format!("/api/sessions/{id}/webhook"),
            Some(&own),
            &[],
        );
        assert_eq!(put.status, 200, "{}", put.body);
    }
    for id in &users {
        send(&s, id, &format!("to {id}"));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while r.sh.hung_users.lock().unwrap().len() < users.len() {
        assert!(
            Instant::now() < deadline,
            "not every session got a turn: {:?}",
            r.sh.hung_users.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let max = r.sh.max_hung.load(Ordering::SeqCst);
    assert_eq!(
        max, 2,
        "at most --webhook-max-inflight open, and the bound is used"
    );
    r.set_mode(Mode::Ok);
    let got = r.wait(20, "every session's message", |g| {
        g.iter().filter(|d| d.kind == "message.sent").count() == users.len()
    });
    for id in &users {
        assert_eq!(sent_texts(&got, id), [format!("to {id}")]);
    }
    assert_once(&got);
    assert!(r.sh.max_hung.load(Ordering::SeqCst) <= 2);
}

#[test]
fn a_receiver_failing_forever_makes_dead_letters_that_replay() {
    let r = Receiver::start();
    r.set_mode(Mode::Fail);
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
    r.set_mode(Mode::Ok);
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
    let bad = s.post("/api/webhooks/dead/evt%20x/replay", None);
    assert_eq!(
        bad.error(400),
        "eventId must be alphanumeric (a-z, 0-9, _, -)"
    );
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

/// The message.sent events of a session's queued sends, first delivery of each event
/// (a receiver may see a retry), in the order they came: (messageId, event id).
fn queued_sent(got: &[Delivery], user: &str) -> Vec<(String, String)> {
    let mut seen = BTreeSet::new();
    got.iter()
        .filter(|d| d.kind == "message.sent")
        .map(|d| (d.json(), d.event_id.clone()))
        .filter(|(v, _)| v["data"]["userId"] == user && v["data"]["queued"] == true)
        .filter(|(_, event)| seen.insert(event.clone()))
        .map(|(v, event)| (v["data"]["messageId"].as_str().unwrap().to_string(), event))
        .collect()
}

/// `?queue=true` answers 202 with the id the message will have, once the send is
/// committed; the session's queue goes out in order, one send per `--send-interval`
/// (within its jitter), even when queued before the session is online, and each send
/// ends as one `message.sent` naming that id.
#[test]
fn queued_sends_go_out_in_order_paced_and_end_as_events() {
    let r = Receiver::start();
    let url = r.url();
    let s = start(&[&url], &["--send-interval", "200ms"]);
    assert_eq!(s.create("q1", "15550001111").status, 201);
    let queue = |body: &str| {
        let got = s.post("/api/sessions/q1/messages?queue=true", Some(body));
        assert_eq!(got.status, 202, "{body}: {}", got.body);
        let v = got.json();
        assert_eq!(v["message"], "Message queued");
        assert_eq!(v["queued"], true);
        v["messageId"].as_str().unwrap().to_string()
    };
    // Queued while the session is still pairing.
    let mut ids = vec![queue(r#"{"to":"15557654321","text":"q-0"}"#)];
    s.wait_state("q1", "online");
    for i in 1..6 {
        ids.push(queue(&format!(r#"{{"to":"15557654321","text":"q-{i}"}}"#)));
    }
    ids.push(queue(
        r#"{"to":"15557654321","location":{"latitude":1.5,"longitude":2.5,"name":"here"}}"#,
    ));
    ids.push(queue(
        r#"{"to":"15557654321","poll":{"question":"Q","options":["a","b"]}}"#,
    ));
    let refused = s.post(
        "/api/sessions/q1/messages?queue=maybe",
        Some(r#"{"to":"15557654321","text":"x"}"#),
    );
    assert_eq!(refused.status, 400, "{}", refused.body);
    let got = r.wait(20, "every queued send's message.sent", |g| {
        queued_sent(g, "q1").len() == ids.len()
    });
    let sent: Vec<String> = queued_sent(&got, "q1")
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(sent, ids, "in the order they were queued");
    let last = got
        .iter()
        .map(|d| d.json())
        .find(|v| v["data"]["messageId"] == ids[7].as_str())
        .unwrap();
    assert_eq!(last["data"]["kind"], "poll");
    // The network got them in order, under the ids of the 202s, paced.
    let on_network = s.get("/api/sim/q1/messages").json();
    let messages = on_network["messages"].as_array().unwrap();
    let network_ids: Vec<&str> = messages
        .iter()
        .map(|m| m["messageId"].as_str().unwrap())
        .collect();
    assert_eq!(network_ids, ids);
    let at: Vec<u64> = messages
        .iter()
        .map(|m| m["atMs"].as_u64().unwrap())
        .collect();
    for pair in at.windows(2) {
        assert!(
            pair[1] - pair[0] >= 140,
            "sends {} ms apart: {at:?}",
            pair[1] - pair[0]
        );
    }
    // A queued message is remembered by its id like any other: it can be reacted to.
    let react = s.post(
        &format!("/api/sessions/q1/messages/{}/reaction", ids[0]),
        Some(r#"{"emoji":"👍"}"#),
    );
    assert_eq!(react.status, 200, "{}", react.body);
}

/// 100 sends queued, the server killed (-9) while the queue is going out, then started
/// again: every queued send ends exactly once as `message.sent` (one event id per
/// message), none fails, and the events come in the order the sends were queued.
#[test]
fn queued_sends_survive_kill_9_and_each_ends_once_in_order() {
    let r = Receiver::start();
    let url = r.url();
    let tmp = tempfile::tempdir().unwrap();
    let args = [
        "--webhook-secret",
        SECRET,
        "--webhook-url",
        &url,
        "--sim-pair-delay",
        "50ms",
        "--send-interval",
        "20ms",
    ];
    let mut s = Server::start_in(tmp.path(), &args);
    assert_eq!(s.create("kq", "15550001111").status, 201);
    s.wait_state("kq", "online");
    let ids: Vec<String> = (0..100)
        .map(|i| {
            let got = s.post(
                "/api/sessions/kq/messages?queue=true",
                Some(&format!(r#"{{"to":"15557654321","text":"kq-{i}"}}"#)),
            );
            assert_eq!(got.status, 202, "{}", got.body);
            got.json()["messageId"].as_str().unwrap().to_string()
        })
        .collect();
    // What waits is listed in order: the queue's tail.
    let waiting = s.get("/api/sessions/kq/queue").json();
    let listed: Vec<String> = waiting["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["messageId"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(waiting["count"], listed.len());
    assert!(!listed.is_empty(), "{waiting}");
    assert_eq!(listed, ids[ids.len() - listed.len()..], "{waiting}");
    assert_eq!(waiting["messages"][0]["kind"], "text");
    r.wait(20, "some of the queue sent", |g| {
        queued_sent(g, "kq").len() >= 10
    });
    s.kill9();
    let sent_before = queued_sent(&r.deliveries(), "kq").len();
    assert!(
        sent_before < ids.len(),
        "the kill came before the queue was done"
    );
    let s = Server::start_in(tmp.path(), &args);
    let got = r.wait(60, "every queued send's message.sent", |g| {
        queued_sent(g, "kq").len() >= ids.len()
    });
    let mut left = s.get("/api/sessions/kq/queue").json();
    for _ in 0..50 {
        if left["count"] == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        left = s.get("/api/sessions/kq/queue").json();
    }
    assert_eq!(left["count"], 0, "{left}");
    let sent = queued_sent(&got, "kq");
    let sent_ids: Vec<String> = sent.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(
        sent_ids, ids,
        "each once, in order ({sent_before} sent before the kill)"
    );
    assert!(
        !got.iter().any(|d| d.kind == "message.failed"),
        "no queued send failed"
    );
}

/// `--webhook-events message.received`: the global receiver gets the messages received
/// and nothing else (no state change, no send), and the outbox holds no row for the rest
/// (seen with a receiver that is down, so rows stay). A misspelt event refuses to start.
#[test]
fn a_receiver_filtered_to_received_messages_gets_nothing_else() {
    let r = Receiver::start();
    let url = r.url();
    let s = start(&[&url], &["--webhook-events", "message.received"]);
    assert_eq!(s.create("f1", "15550001111").status, 201);
    s.wait_state("f1", "online");
    let sent = s.post(
        "/api/sessions/f1/messages",
        Some(r#"{"to":"15557654321","text":"out"}"#),
    );
    assert_eq!(sent.status, 201, "{}", sent.body);
    for text in ["one", "two"] {
        let got = s.post(
            "/api/sim/f1/inbound",
            Some(&format!(r#"{{"from":"15557654321","text":"{text}"}}"#)),
        );
        assert_eq!(got.status, 200, "{}", got.body);
    }
    r.wait(15, "two message.received", |g| {
        g.iter().filter(|d| d.kind == "message.received").count() == 2
    });
    // The sends' and states' events would have come long before the received ones.
    std::thread::sleep(Duration::from_millis(500));
    let kinds: BTreeSet<String> = r.deliveries().iter().map(|d| d.kind.clone()).collect();
    assert_eq!(kinds, BTreeSet::from(["message.received".to_string()]));

    let tmp = tempfile::tempdir().unwrap();
    let down = Server::start_in(
        tmp.path(),
        &[
            "--webhook-secret",
            SECRET,
            "--webhook-url",
            "http://127.0.0.1:9/down",
            "--webhook-events",
            "message.*",
            "--sim-pair-delay",
            "50ms",
        ],
    );
    assert_eq!(down.create("f2", "15550001111").status, 201);
    down.wait_state("f2", "online");
    let got = down.post(
        "/api/sim/f2/inbound",
        Some(r#"{"from":"15557654321","text":"kept"}"#),
    );
    assert_eq!(got.status, 200, "{}", got.body);
    let rows = common::committed_rows(
        tmp.path(),
        "SELECT kind FROM outbox ORDER BY id",
        "SELECT kind FROM bv_outbox ORDER BY id",
    );
    let kinds: Vec<String> = rows.into_iter().filter_map(|r| r[0].clone()).collect();
    assert_eq!(
        kinds,
        ["message.received"],
        "no row for the session's states"
    );
    drop(down);

    let refused = common::serve_command(
        tmp.path(),
        "0",
        &[
            "--webhook-secret",
            SECRET,
            "--webhook-url",
            "http://127.0.0.1:9/down",
            "--webhook-events",
            "message.recieved",
        ],
    )
    .output()
    .unwrap();
    assert_eq!(refused.status.code(), Some(2), "a configuration error");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("'message.recieved' names no event"), "{err}");
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

/// A session's own receiver with `events` and a `secret` of its own: it gets only those
/// events, signed with its secret (not `--webhook-secret`), survives a restart, and shows
/// its filter but never its secret; a bad filter or a short secret is a 400.
#[test]
fn a_sessions_own_receiver_filters_events_and_signs_with_its_own_secret() {
    let global = Receiver::start();
    let own = Receiver::start();
    let (gurl, ourl) = (global.url(), own.url());
    let tmp = tempfile::tempdir().unwrap();
    let args = [
        "--webhook-secret",
        SECRET,
        "--webhook-url",
        &gurl,
        "--sim-pair-delay",
        "50ms",
    ];
    let own_secret = "the-sessions-own-secret-42";
    let s = Server::start_in(tmp.path(), &args);
    assert_eq!(s.create("fs", "15550001111").status, 201);
    s.wait_state("fs", "online");
    let put = |body: &str| s.req("PUT", "/api/sessions/fs/webhook", Some(body), &[]);
    for (body, needle) in [
        (
            format!(r#"{{"url":"{ourl}","events":["message.recieved"]}}"#),
            "names no event",
        ),
        (
            format!(r#"{{"url":"{ourl}","events":"message.*"}}"#),
            "events must be a list",
        ),
        (
            format!(r#"{{"url":"{ourl}","secret":"short"}}"#),
            "secret must be",
        ),
    ] {
        assert!(put(&body).error(400).contains(needle), "{body}");
    }
    let r = put(&format!(
        r#"{{"url":"{ourl}","events":["message.received"],"secret":"{own_secret}"}}"#
    ));
    assert_eq!(r.status, 200, "{}", r.body);
    let shown = s.get("/api/sessions/fs/webhook").json();
    assert_eq!(shown["events"], serde_json::json!(["message.received"]));
    assert_eq!(shown["ownSecret"], true);
    assert!(!shown.to_string().contains(own_secret), "{shown}");
    drop(s);
    // After a restart, the same.
    let s = Server::start_in(tmp.path(), &args);
    s.wait_state("fs", "online");
    assert_eq!(
        s.get("/api/sessions/fs/webhook").json()["events"],
        serde_json::json!(["message.received"])
    );
    let sent = s.post(
        "/api/sessions/fs/messages",
        Some(r#"{"to":"15557654321","text":"out"}"#),
    );
    assert_eq!(sent.status, 201, "{}", sent.body);
    let got = s.post(
        "/api/sim/fs/inbound",
        Some(r#"{"from":"15557654321","text":"in"}"#),
    );
    assert_eq!(got.status, 200, "{}", got.body);
    let mine = own.wait(15, "the received message on the own receiver", |g| {
        g.iter().any(|d| d.kind == "message.received")
    });
    global.wait(15, "the received message on the global receiver", |g| {
        g.iter().any(|d| d.kind == "message.received")
    });
    std::thread::sleep(Duration::from_millis(500));
    let mine_kinds: BTreeSet<String> = own.deliveries().iter().map(|d| d.kind.clone()).collect();
    assert_eq!(mine_kinds, BTreeSet::from(["message.received".to_string()]));
    for d in &mine {
        assert!(signature_valid(
            own_secret,
            &d.timestamp,
            &d.body,
            &d.signature
        ));
        assert!(!signature_valid(
            SECRET,
            &d.timestamp,
            &d.body,
            &d.signature
        ));
    }
    // The global receiver still gets everything, signed with --webhook-secret.
    let all = global.deliveries();
    assert!(all.iter().any(|d| d.kind == "message.sent"));
    for d in &all {
        assert!(signature_valid(SECRET, &d.timestamp, &d.body, &d.signature));
    }
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

/// A receiver that fails for everyone is taken for down after a few failures in a row:
/// the other sessions' events wait without spending their attempts while one probe at a
/// time tries it, so an outage longer than the attempts allow leaves only the probes'
/// events as dead letters (not every event), and the receiver is not hammered by every
/// session's retries. Once a probe gets a 2xx, the backlog goes out, in order per session.
#[test]
fn a_receiver_failing_for_everyone_is_probed_not_hammered() {
    let r = Receiver::start();
    r.set_mode(Mode::Fail);
    let url = r.url();
    let s = start(
        &[&url],
        &["--webhook-max-attempts", "3", "--webhook-retry-max", "1s"],
    );
    let users: Vec<String> = (0..12).map(|i| format!("cb{i:02}")).collect();
    for u in &users {
        assert_eq!(s.create(u, "15550001111").status, 201);
    }
    for u in &users {
        s.wait_state(u, "online");
    }
    // Six seconds of failing answers (the outage itself, not a synchronisation).
    std::thread::sleep(Duration::from_secs(6));
    let during = r.requests();
    let dead_during = s.get("/api/webhooks/dead").json()["count"]
        .as_u64()
        .unwrap();
    r.set_mode(Mode::Ok);
    // 12 sessions x 4 state events; the dead ones stay dead until replayed.
    let expected = 48 - dead_during as usize;
    let got = r.wait(30, "the backlog", |g| g.len() >= expected);
    eprintln!(
        "receiver failing for 6 s: {during} requests, {dead_during} dead letters; then {} delivered",
        got.len()
    );
    // Without the breaker every lane retries by itself: ~12 requests a second, and every
    // head dead after 3 attempts (24+ dead letters in 6 s).
    assert!(during <= 30, "{during} requests while failing");
    assert!(dead_during <= 6, "{dead_during} dead letters");
    assert_once(&got);
    for u in &users {
        let k = kinds(&got, u);
        let mut sorted = k.clone();
        let order = ["starting", "pairing", "connecting", "online"];
        sorted.sort_by_key(|x| order.iter().position(|o| x.ends_with(o)));
        assert_eq!(k, sorted, "in order for {u}");
    }
}

/// A send to a session that does not exist is a 404 and nothing else: no `message.failed`
/// event (no lane for an invented id), no rate-limit bucket.
#[test]
fn a_send_to_no_session_is_a_404_and_no_event() {
    let r = Receiver::start();
    let url = r.url();
    let s = start(&[&url], &[]);
    for _ in 0..3 {
        let resp = s.post(
            "/api/sessions/nobody/messages",
            Some(r#"{"to":"15557654321","text":"hi"}"#),
        );
        assert_eq!(resp.error(404), "Session nobody not found");
    }
    // A real session's events come through; none of nobody's ever do.
    assert_eq!(s.create("somebody", "15550001111").status, 201);
    s.wait_state("somebody", "online");
    r.wait(15, "somebody's events", |g| kinds(g, "somebody").len() == 4);
    assert!(kinds(&r.deliveries(), "nobody").is_empty());
    assert!(outbox(&s).iter().all(|(u, _, _, _)| u != "nobody"));
}

/// An https receiver (rustls, blocking) with the given certificate; records each POST's
/// event id and answers 200.
fn tls_receiver(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> (String, Arc<Mutex<Vec<String>>>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://{}/hook", listener.local_addr().unwrap());
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    std::thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(tcp) = tcp else { continue };
            let (config, g) = (config.clone(), g.clone());
            std::thread::spawn(move || {
                let Ok(conn) = rustls::ServerConnection::new(config) else {
                    return;
                };
                let mut tls = BufReader::new(rustls::StreamOwned::new(conn, tcp));
                while let Some((headers, _)) = common::read_request(&mut tls) {
                    let id = headers
                        .get("x-botvisor-event-id")
                        .cloned()
                        .unwrap_or_default();
                    g.lock().unwrap().push(id);
                    let out = tls.get_mut();
                    if out
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                        .and_then(|_| out.flush())
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (url, got)
}

/// https receivers: a certificate from an unknown CA is refused (the TLS check is real,
/// `lastError` says why, nothing is sent); with that CA in `--webhook-ca-file` the same
/// receiver gets every event over TLS.
#[test]
fn https_receivers_are_verified_and_a_ca_file_adds_trust() {
    let dir = tempfile::tempdir().unwrap();
    let Some((ca, leaf, key)) = common::test_pki(dir.path()) else {
        common::skip_unless_required(
            "https_receivers_are_verified_and_a_ca_file_adds_trust",
            "the openssl command is not installed; to run it: apt-get install openssl",
        );
        return;
    };
    let (url, got) = tls_receiver(&leaf, &key);

    // Public roots only: the handshake fails on the unknown issuer.
    let s = start(&[&url], &["--webhook-max-attempts", "1"]);
    assert_eq!(s.create("tls1", "15550001111").status, 201);
    let dead = poll(
        20,
        "a dead letter",
        || s.get("/api/webhooks/dead").json(),
        |d| d["count"].as_u64().unwrap_or(0) >= 1,
    );
    let error = dead["dead"][0]["lastError"].as_str().unwrap().to_string();
    eprintln!("unknown CA: {error}");
    assert!(
        error.to_ascii_lowercase().contains("certificate"),
        "{error}"
    );
    assert!(got.lock().unwrap().is_empty(), "nothing was sent over it");
    drop(s);

    // The CA trusted: delivered, over TLS.
    let ca_arg = ca.display().to_string();
    let s = start(&[&url], &["--webhook-ca-file", &ca_arg]);
    assert_eq!(s.create("tls2", "15550001111").status, 201);
    s.wait_state("tls2", "online");
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.lock().unwrap().len() < 4 {
        assert!(Instant::now() < deadline, "{:?}", got.lock().unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }

    // A CA file that is not PEM stops the start with a clear line.
    let bad = dir.path().join("bad.pem");
    std::fs::write(&bad, "not a certificate").unwrap();
    let out = common::serve_command(
        dir.path(),
        "0",
        &[
            "--webhook-url",
            &url,
            "--webhook-secret",
            SECRET,
            "--webhook-ca-file",
            &bad.display().to_string(),
        ],
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--webhook-ca-file") && stderr.contains("no certificate"),
        "{stderr}"
    );
}

/// Past `--webhook-backlog-max` nothing accepted is dropped: with the receiver down, a
/// burst of received messages (sim inbound) and sends larger than the backlog is answered
/// 2xx while there is room, then 503 with Retry-After. When the receiver comes back,
/// every accepted message's event arrives exactly once, and no refused one does.
#[test]
fn a_burst_past_the_backlog_is_refused_and_every_accepted_event_arrives_once() {
    let r = Receiver::start();
    let url = r.url();
    let s = start(
        &[&url],
        &[
            "--webhook-backlog-max",
            "40",
            "--webhook-retry-max",
            "1s",
            "--webhook-max-attempts",
            "1000",
            "--send-rate",
            "100000",
        ],
    );
    assert_eq!(s.create("bp", "15550001111").status, 201);
    s.wait_state("bp", "online");
    r.wait(20, "the session's state events", |g| g.len() == 4);
    r.down();
    let (mut accepted, mut refused) = (BTreeSet::new(), 0);
    for i in 0..150 {
        let text = format!("burst-{i}");
        let resp = if i % 3 == 0 {
            s.post(
                "/api/sessions/bp/messages",
                Some(&format!(r#"{{"to":"15557654321","text":"{text}"}}"#)),
            )
        } else {
            s.post(
                "/api/sim/bp/inbound",
                Some(&format!(r#"{{"from":"15557654321","text":"{text}"}}"#)),
            )
        };
        match resp.status {
            200 | 201 => assert!(accepted.insert(text)),
            503 => {
                assert_eq!(resp.header("retry-after"), Some("5"), "{resp:?}");
                assert!(
                    resp.body.contains("webhook backlog is full"),
                    "{}",
                    resp.body
                );
                refused += 1;
            }
            other => panic!("{other}: {}", resp.body),
        }
    }
    assert!(
        (30..=40).contains(&accepted.len()),
        "{} accepted",
        accepted.len()
    );
    assert_eq!(accepted.len() + refused, 150);
    let metrics = s.get("/metrics").body;
    assert!(
        metrics
            .lines()
            .any(|l| l == format!("botvisor_webhook_refused_messages_total {refused}")),
        "{metrics}"
    );

    r.up();
    let texts = |g: &[Delivery]| -> BTreeSet<String> {
        g.iter()
            .filter(|d| d.kind.starts_with("message."))
            .map(|d| d.json()["data"]["text"].as_str().unwrap().to_string())
            .collect()
    };
    r.wait(30, "every accepted message's event", |g| {
        texts(g).len() >= accepted.len()
    });
    // Longer than a retry: a duplicate or a late refused event would show up by now.
    std::thread::sleep(Duration::from_secs(3));
    let got = r.deliveries();
    assert_once(&got);
    assert_eq!(texts(&got), accepted);
    assert_eq!(got.len(), 4 + accepted.len());
}
