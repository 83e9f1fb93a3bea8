//! The operator surface: Prometheus metrics after a known sequence of events, and their
//! guard.

mod common;

use common::Server;

/// The value of one sample line (`name{labels} value`) in a text exposition.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn metrics_follow_a_known_sequence_of_events() {
    let s = Server::start(&["--sim-pair-delay", "100ms"]);
    for id in ["m1", "m2", "m3"] {
        assert_eq!(s.create(id, "1234567890").status, 201);
        s.wait_state(id, "online");
    }
    assert_eq!(s.fault("m1", "panic").status, 200);
    s.wait_for("m1", 10, |v| v["restarts"] == 1 && v["state"] == "online");
    assert_eq!(s.post("/api/sessions/m2/stop", None).status, 200);
    assert_eq!(s.get("/api/sessions/nobody").status, 404);
    let r = s.get("/metrics");
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let m = &r.body;
    let v = |series: &str| sample(m, series).unwrap_or_else(|| panic!("no {series} in\n{m}"));
    assert_eq!(v(r#"botvisor_sessions{state="online"}"#), 2.0);
    assert_eq!(v(r#"botvisor_sessions{state="stopped"}"#), 1.0);
    assert_eq!(v(r#"botvisor_sessions{state="failed"}"#), 0.0);
    assert_eq!(v("botvisor_session_restarts"), 1.0);
    assert_eq!(
        v(r#"botvisor_http_requests_total{route="/api/sessions",method="POST",status="201"}"#),
        3.0
    );
    assert_eq!(
        v(
            r#"botvisor_http_requests_total{route="/api/sessions/:id/stop",method="POST",status="200"}"#
        ),
        1.0
    );
    assert_eq!(
        v(r#"botvisor_http_requests_total{route="/api/sessions/:id",method="GET",status="404"}"#),
        1.0
    );
    assert!(v(r#"botvisor_http_request_duration_seconds_count{route="/api/sessions"}"#) >= 3.0);
    assert!(
        v("botvisor_store_commit_duration_seconds_count") >= 3.0,
        "commits are timed"
    );
    assert_eq!(
        v("botvisor_crash_to_online_seconds_count"),
        1.0,
        "one crash, back online"
    );
    assert!(v("botvisor_crash_to_online_seconds_sum") > 0.0);
    let answer = v("botvisor_supervisor_answer_seconds");
    assert!(answer.is_finite() && answer >= 0.0, "{answer}");
    assert!(v("botvisor_open_fds") > 0.0);
    assert!(v("botvisor_fd_limit") >= v("botvisor_open_fds"));
    assert_eq!(
        v("botvisor_session_capacity"),
        -1.0,
        "sim sessions hold no descriptors"
    );
    assert!(m.contains(r#"botvisor_build_info{version=""#), "{m}");
    // A made-up method does not make a new series.
    s.req("BREW", "/api/stats", None, &[]);
    let m = s.get("/metrics").body;
    assert!(!m.contains("BREW"));
    assert!(m.contains(r#"method="other""#));
}

#[test]
fn protect_metrics_needs_the_key() {
    let key = "metrics-k3y-0123456789abcdefghijkl";
    let s = Server::start(&["--api-key", key, "--protect-metrics"]);
    assert!(s.get("/metrics").error(401).contains("API key"));
    assert_eq!(
        s.req("GET", "/metrics", None, &[("X-API-Key", key)]).status,
        200
    );
    // Without the flag, metrics are open like the other reads.
    let open = Server::start(&["--api-key", key]);
    assert_eq!(open.get("/metrics").status, 200);
}

#[test]
fn message_and_webhook_metrics_follow_what_happened() {
    let (ok, _) = common::json_receiver();
    // Nothing listens here: every attempt is refused.
    let refused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/hook", l.local_addr().unwrap())
    };
    let s = Server::start(&[
        "--sim-pair-delay",
        "100ms",
        "--webhook-url",
        &ok,
        "--webhook-url",
        &refused,
        "--webhook-secret",
        "metrics-webhook-secret-0123",
        "--webhook-max-attempts",
        "1",
        "--webhook-retry-max",
        "1s",
    ]);
    assert_eq!(s.create("mm", "1234567890").status, 201);
    s.wait_state("mm", "online");
    for text in ["one", "two"] {
        let r = s.post(
            "/api/sessions/mm/messages",
            Some(&format!(r#"{{"to":"15557654321","text":"{text}"}}"#)),
        );
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let r = s.post(
        "/api/sim/mm/inbound",
        Some(r#"{"from":"15557654321","text":"hi"}"#),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    // 4 state events, 2 sent, 1 received: 7 events, to each of the two receivers.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let m = loop {
        let m = s.get("/metrics").body;
        let done = sample(&m, "botvisor_webhook_deliveries_total") == Some(7.0)
            && sample(&m, "botvisor_webhook_dead_letters_total") == Some(7.0);
        if done {
            break m;
        }
        assert!(std::time::Instant::now() < deadline, "{m}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let v = |series: &str| sample(&m, series).unwrap_or_else(|| panic!("no {series} in\n{m}"));
    assert_eq!(v("botvisor_messages_sent_total"), 2.0);
    assert_eq!(v("botvisor_messages_failed_total"), 0.0);
    assert_eq!(v(r#"botvisor_messages_received_total{kind="text"}"#), 1.0);
    assert_eq!(v("botvisor_webhook_failed_attempts_total"), 7.0);
    assert_eq!(v("botvisor_webhook_refused_messages_total"), 0.0);
    assert_eq!(v("botvisor_webhook_receivers_down"), 1.0, "the refused one");
}

/// The demo bot answers: `!ping` from a number or a JID gets `pong (up …)` back in that
/// chat on the simulated link (as on the real one); other text gets nothing, and
/// `--no-builtin-commands` turns the answer off.
#[test]
fn the_simulated_bot_answers_ping() {
    let sent_texts = |s: &Server, id: &str| -> Vec<(String, String)> {
        let r = s.get(&format!("/api/sim/{id}/messages"));
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["to"].as_str().unwrap().to_string(),
                    m["text"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let inbound = |s: &Server, id: &str, from: &str, text: &str| {
        let r = s.post(
            &format!("/api/sim/{id}/inbound"),
            Some(&serde_json::json!({"from": from, "text": text}).to_string()),
        );
        assert_eq!(r.status, 200, "{}", r.body);
    };
    let s = Server::start(&["--sim-pair-delay", "100ms"]);
    assert_eq!(s.create("pinged", "1234567890").status, 201);
    s.wait_state("pinged", "online");
    inbound(&s, "pinged", "15557654321", "!ping");
    inbound(&s, "pinged", "15550001111@s.whatsapp.net", "  !PING ");
    inbound(&s, "pinged", "15557654321", "hello");
    let sent = sent_texts(&s, "pinged");
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!(sent[0].0, "15557654321@s.whatsapp.net");
    assert_eq!(sent[1].0, "15550001111@s.whatsapp.net");
    for (_, text) in &sent {
        assert!(
            text.starts_with("pong (up ") && text.ends_with("s)"),
            "{text}"
        );
    }
    drop(s);

    let quiet = Server::start(&["--sim-pair-delay", "100ms", "--no-builtin-commands"]);
    assert_eq!(quiet.create("quiet", "1234567890").status, 201);
    quiet.wait_state("quiet", "online");
    inbound(&quiet, "quiet", "15557654321", "!ping");
    assert!(sent_texts(&quiet, "quiet").is_empty());
}
