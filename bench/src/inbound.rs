//! The inbound burst (`--inbound-burst SECS`, issue 22's "push back instead of dropping"):
//! a server with signed webhooks to a receiver in this process that answers 200 at once;
//! `--inbound-sessions` simulated sessions; `--inbound-clients` clients post
//! `POST /api/sim/:id/inbound` as fast as they are answered for SECS seconds. Then the
//! backlog drains. It prints what was offered, accepted (2xx) and refused (503), the
//! deliveries per second during the burst and until drained, and how many accepted
//! messages never reached the receiver (must be 0) or reached it twice.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{
    agent, create_sessions, lock, post, spawn_server, wait_online, Ctx, Nofile, Report, ServerSpec,
};

/// The message ids the receiver got, with how many times, and when the last arrived.
#[derive(Default)]
struct Got {
    times: HashMap<String, u32>,
    /// Deliveries of `message.received` (and `message.sent`), with the time each arrived.
    at: Vec<Instant>,
}

/// A receiver answering 200 to every POST at once; it records `data.messageId`.
fn receiver() -> Result<(String, Arc<Mutex<Got>>), String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("receiver: {e}"))?;
    let url = format!(
        "http://{}/hook",
        listener.local_addr().map_err(|e| e.to_string())?
    );
    let got = Arc::new(Mutex::new(Got::default()));
    let g = got.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let g = g.clone();
            std::thread::spawn(move || serve(conn, &g));
        }
    });
    Ok((url, got))
}

fn serve(conn: TcpStream, got: &Mutex<Got>) {
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    loop {
        let mut length = 0usize;
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
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
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        if v["event"] == "message.received" || v["event"] == "message.sent" {
            if let Some(id) = v["data"]["messageId"].as_str() {
                let mut g = lock(got);
                *g.times.entry(id.to_string()).or_default() += 1;
                g.at.push(Instant::now());
            }
        }
        if out
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            .is_err()
        {
            return;
        }
    }
}

/// What the clients saw during the burst.
#[derive(Default)]
struct Burst {
    accepted: Vec<String>,
    refused: usize,
    other: usize,
}

fn burst(base: &str, sessions: usize, clients: usize, secs: u64) -> Burst {
    burst_of(clients, secs, &|i| {
        (
            format!("{base}/api/sim/bench_{}/inbound", i % sessions),
            format!(r#"{{"from":"15557654321","text":"burst {i}"}}"#),
        )
    })
}

/// `clients` clients post the `i`th request `request(i)` (URL, body) as fast as they are
/// answered, for `secs` seconds; a 2xx's `messageId` is what was accepted.
fn burst_of(
    clients: usize,
    secs: u64,
    request: &(dyn Fn(usize) -> (String, String) + Sync),
) -> Burst {
    let stop = AtomicBool::new(false);
    let next = AtomicUsize::new(0);
    let out = Mutex::new(Burst::default());
    std::thread::scope(|scope| {
        for _ in 0..clients.max(1) {
            let (stop, next, out) = (&stop, &next, &out);
            scope.spawn(move || {
                let a = agent(Duration::from_secs(30));
                let mut mine = Burst::default();
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let (url, body) = request(i);
                    match post(&a, &url, &body) {
                        Ok((200..=202, text)) => {
                            let v: serde_json::Value =
                                serde_json::from_str(&text).unwrap_or_default();
                            match v["messageId"].as_str() {
                                Some(id) => mine.accepted.push(id.to_string()),
                                None => mine.other += 1,
                            }
                        }
                        Ok((503, _)) => mine.refused += 1,
                        _ => mine.other += 1,
                    }
                }
                let mut all = lock(out);
                all.accepted.append(&mut mine.accepted);
                all.refused += mine.refused;
                all.other += mine.other;
            });
        }
        std::thread::sleep(Duration::from_secs(secs));
        stop.store(true, Ordering::Relaxed);
    });
    out.into_inner().unwrap_or_else(|p| p.into_inner())
}

/// The phase: its own server and data dir.
pub(super) fn inbound_burst(ctx: &Ctx, report: &mut Report) -> Result<(), String> {
    let args = ctx.args;
    let (secs, sessions) = (args.inbound_burst, args.inbound_sessions.max(1));
    println!(
        "\n== inbound burst: {sessions} sessions, {} clients, {secs} s, receiver answering at once",
        args.inbound_clients
    );
    let (server, got) = burst_server(ctx, "inbound", &[])?;
    let base = server.base.clone();
    let start = Instant::now();
    let b = burst(&base, sessions, args.inbound_clients, secs);
    let burst_time = start.elapsed();
    let during = lock(&got).at.len();
    // Drained: every accepted message delivered, or nothing new for 10 s.
    let drained = drain(&got, &b.accepted).map(|t| t.duration_since(start));
    let g = lock(&got);
    print_burst(report, &b, &g, during, burst_time, drained);
    Ok(())
}

/// A server of its own (`<label>` data dir and log) with signed webhooks to a receiver
/// in this process, `--inbound-sessions` sessions online; `extra` flags besides.
fn burst_server(
    ctx: &Ctx,
    label: &str,
    extra: &[&str],
) -> Result<(super::Server, Arc<Mutex<Got>>), String> {
    let args = ctx.args;
    let sessions = args.inbound_sessions.max(1);
    let (url, got) = receiver()?;
    let backlog = args.inbound_backlog_max.to_string();
    let mut flags = vec![
        "--webhook-url",
        &url,
        "--webhook-secret",
        "bench-webhook-secret-0123456789",
        "--webhook-backlog-max",
        &backlog,
        "--send-rate",
        "1000000",
    ];
    flags.extend_from_slice(extra);
    let flags: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
    let server = spawn_server(&ServerSpec {
        database_url: None,
        bin: &ctx.bin,
        data: &ctx.work.join(format!("data-{label}")),
        pair_delay: &args.pair_delay,
        nofile: Nofile::Raise,
        extra: &flags,
        log: ctx.work.join(format!("server-{label}.log")),
    })?;
    let c = create_sessions(&server.base, sessions, args.clients);
    if c.created < sessions {
        return Err(format!(
            "{label} burst: {} of {sessions} sessions created",
            c.created
        ));
    }
    wait_online(
        &ctx.api,
        &server.base,
        sessions,
        Instant::now(),
        Duration::from_secs(120),
    )
    .ok_or(format!("{label} burst: the sessions did not come online"))?;
    Ok((server, got))
}

/// Waits until the receiver has every one of `ids` (then: when the last delivery came),
/// or nothing new came for 10 s (`None`).
fn drain(got: &Mutex<Got>, ids: &[String]) -> Option<Instant> {
    let mut last = (lock(got).at.len(), Instant::now());
    loop {
        let g = lock(got);
        let n = g.at.len();
        if ids.iter().all(|id| g.times.contains_key(id)) {
            return g.at.last().copied().or(Some(Instant::now()));
        }
        drop(g);
        if n != last.0 {
            last = (n, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(10) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The figures of one burst.
fn print_burst(
    report: &mut Report,
    b: &Burst,
    g: &Got,
    during: usize,
    burst_time: Duration,
    drained: Option<Duration>,
) {
    let missing = b
        .accepted
        .iter()
        .filter(|id| !g.times.contains_key(*id))
        .count();
    let twice = g.times.values().filter(|n| **n > 1).count();
    let per_s = |n: usize, d: Duration| format!("{:.0}/s", n as f64 / d.as_secs_f64().max(1e-9));
    let offered = b.accepted.len() + b.refused + b.other;
    report.row(
        "inbound offered (answered requests)",
        per_s(offered, burst_time),
    );
    report.row(
        "inbound accepted (2xx: event committed)",
        format!(
            "{} ({})",
            b.accepted.len(),
            per_s(b.accepted.len(), burst_time)
        ),
    );
    report.row(
        "inbound refused (503, webhook backlog full)",
        format!("{} (other answers: {})", b.refused, b.other),
    );
    report.row(
        "webhook deliveries during the burst",
        format!("{during} ({})", per_s(during, burst_time)),
    );
    match drained {
        Some(t) => report.row(
            "every accepted message delivered, from the burst's start",
            format!("{:.1} s ({})", t.as_secs_f64(), per_s(b.accepted.len(), t)),
        ),
        None => report.row("every accepted message delivered", "NO: stalled for 10 s"),
    }
    report.row(
        "accepted but never delivered / delivered twice",
        format!("{missing} / {twice}"),
    );
}

/// The send burst (`--send-burst SECS`): on a server of its own with signed webhooks,
/// `--inbound-sessions` sessions, `--inbound-clients` clients send as fast as they are
/// answered, first directly (201: sent), then queued (`?queue=true`, 202: committed to
/// the queue, sent later at `--send-interval` 1ms, so the queues drain as fast as they
/// can). It prints sends per second accepted each way, and how fast the queued ones went
/// out (as `message.sent` webhooks) and whether any was lost or sent twice.
pub(super) fn send_burst(ctx: &Ctx, report: &mut Report) -> Result<(), String> {
    let args = ctx.args;
    let (secs, sessions) = (args.send_burst, args.inbound_sessions.max(1));
    println!(
        "\n== send burst: {sessions} sessions, {} clients, {secs} s direct then {secs} s queued",
        args.inbound_clients
    );
    let (server, got) = burst_server(ctx, "sends", &["--send-interval", "1ms"])?;
    let base = server.base.clone();
    let per_s = |n: usize, d: Duration| format!("{:.0}/s", n as f64 / d.as_secs_f64().max(1e-9));
    let send = |query: &'static str| {
        let base = base.clone();
        move |i: usize| {
            (
                format!("{base}/api/sessions/bench_{}/messages{query}", i % sessions),
                format!(r#"{{"to":"15557654321","text":"send {i}"}}"#),
            )
        }
    };
    let start = Instant::now();
    let direct = burst_of(args.inbound_clients, secs, &send(""));
    let direct_time = start.elapsed();
    report.row(
        "sends accepted, direct (201: sent, event committed)",
        format!(
            "{} ({}; refused {}, other {})",
            direct.accepted.len(),
            per_s(direct.accepted.len(), direct_time),
            direct.refused,
            direct.other
        ),
    );
    let start = Instant::now();
    let queued = burst_of(args.inbound_clients, secs, &send("?queue=true"));
    let queued_time = start.elapsed();
    report.row(
        "sends accepted, queued (202: committed to the queue)",
        format!(
            "{} ({}; refused {}, other {})",
            queued.accepted.len(),
            per_s(queued.accepted.len(), queued_time),
            queued.refused,
            queued.other
        ),
    );
    // Drained: every queued send's message.sent delivered, or nothing new for 10 s.
    let drained = drain(&got, &queued.accepted).map(|_| start.elapsed());
    let g = lock(&got);
    match drained {
        Some(t) => report.row(
            "every queued send sent (message.sent delivered), from the queued burst's start",
            format!(
                "{:.1} s ({})",
                t.as_secs_f64(),
                per_s(queued.accepted.len(), t)
            ),
        ),
        None => report.row("every queued send sent", "NO: stalled for 10 s"),
    }
    let missing = queued
        .accepted
        .iter()
        .filter(|id| !g.times.contains_key(*id))
        .count();
    let twice = queued
        .accepted
        .iter()
        .filter(|id| g.times.get(*id).is_some_and(|n| *n > 1))
        .count();
    report.row(
        "queued but never sent / sent event delivered twice",
        format!("{missing} / {twice}"),
    );
    Ok(())
}
