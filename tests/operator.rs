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
