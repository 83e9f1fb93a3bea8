//! Several nodes on one PostgreSQL (`--nodes N`, issue 23): N botvisor processes with the
//! simulated link, `--node-id n0..`, each on a data dir of its own, sharing the empty
//! database of `--database-url`. Measured from outside:
//!
//! - memory and descriptors per node with `--sessions` spread over them (created through
//!   n0, each placed on the least-loaded node);
//! - the PostgreSQL connections the fleet holds (`pg_stat_activity`, with `psql`);
//! - the cost of forwarding: one client, `GET /api/sessions/:id` and a send
//!   (`POST /api/sessions/:id/messages`) of sessions n0 owns, asked of n0 (direct) and of
//!   n1 (forwarded to n0);
//! - failover: kill -9 of the last node; each of its sessions' time until online on a
//!   survivor (the fleet list polled through n0), p50/p99 and all;
//! - drain: `POST /api/nodes/n0/drain`; each session's downtime (from the first poll that
//!   sees it down to the first that sees it online elsewhere), and the drain's total.
//!
//! Polls of the whole fleet list are themselves a load at 10,000 sessions: their period is
//! printed as the figures' resolution.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use super::{
    agent, cpu_seconds, create_sessions, footprint, get_json, kib, ms, pct, post, secs,
    spawn_server, Ctx, Nofile, Report, Server, ServerSpec,
};

/// The lease of the measured fleet (the issue's: 10 s).
const LEASE: &str = "10s";
/// Requests per forwarding figure.
const FORWARD_REQUESTS: usize = 2_000;

struct Fleet {
    nodes: Vec<Option<Server>>,
    data: Vec<PathBuf>,
}

pub(super) fn run(ctx: &Ctx, report: &mut Report, n_nodes: usize) -> Result<(), String> {
    let url = ctx
        .args
        .database_url
        .as_deref()
        .filter(|u| u.starts_with("postgres"))
        .ok_or("--nodes needs an empty PostgreSQL --database-url")?;
    let n = ctx.n;
    println!("\n== {n_nodes} nodes on one PostgreSQL, {n} simulated sessions");
    let mut fleet = Fleet {
        nodes: Vec::new(),
        data: (0..n_nodes)
            .map(|i| ctx.work.join(format!("node-{i}")))
            .collect(),
    };
    for i in 0..n_nodes {
        let server = start_node(ctx, &fleet.data[i], i, url)?;
        println!("  n{i}: {} (pid {})", server.base, server.proc.pid());
        fleet.nodes.push(Some(server));
    }
    let base = |f: &Fleet, i: usize| {
        f.nodes[i]
            .as_ref()
            .map(|s| s.base.clone())
            .unwrap_or_default()
    };
    let idle: Vec<_> = fleet
        .nodes
        .iter()
        .map(|s| footprint(s.as_ref().map_or(0, |s| s.proc.pid())))
        .collect();
    let t0 = Instant::now();
    let c = create_sessions(&base(&fleet, 0), n, ctx.args.clients);
    if let Some((i, status, msg)) = &c.refused {
        return Err(format!("create {i} refused: {status} {msg}"));
    }
    report.row(
        format!("{n_nodes} nodes: creates through n0 (placed on the least-loaded node)"),
        format!("{n} in {:.1} s", c.elapsed.as_secs_f64()),
    );
    let api = agent(Duration::from_secs(60));
    let online = wait_all_online(
        &api,
        &base(&fleet, 0),
        n,
        Duration::from_secs(ctx.args.max_wait),
    );
    report.row(
        "all online after the creates' start",
        secs(online.map(|_| t0.elapsed())),
    );
    std::thread::sleep(Duration::from_secs(3));
    let placed = owners_of(&api, &base(&fleet, 0))?;
    for (i, server) in fleet.nodes.iter().enumerate() {
        let server = server.as_ref().expect("running");
        let held = placed.values().filter(|o| **o == format!("n{i}")).count();
        let now = footprint(server.proc.pid());
        let per = (now.rss_kib as f64 - idle[i].rss_kib as f64) / held.max(1) as f64;
        report.row(
            format!("n{i}: sessions, RSS, descriptors"),
            format!(
                "{held}, {} ({} per session over its idle {}), {} fds",
                kib(now.rss_kib as f64),
                kib(per),
                kib(idle[i].rss_kib as f64),
                now.fds
            ),
        );
    }
    report.row(
        "PostgreSQL connections the fleet holds",
        pg_connections(url),
    );
    // Idle: every node's CPU over one window (leases renewed, claims looked for).
    let window = Duration::from_secs(ctx.args.idle_window.clamp(1, 60));
    let pids: Vec<u32> = fleet
        .nodes
        .iter()
        .map(|s| s.as_ref().map_or(0, |s| s.proc.pid()))
        .collect();
    let before: Vec<f64> = pids.iter().map(|p| cpu_seconds(*p)).collect();
    let t = Instant::now();
    std::thread::sleep(window);
    let idle_cpu: Vec<String> = pids
        .iter()
        .zip(&before)
        .map(|(p, b)| {
            let used = cpu_seconds(*p) - b;
            format!("{:.2} %", used / t.elapsed().as_secs_f64() * 100.0)
        })
        .collect();
    report.row(
        format!(
            "idle CPU of each node, {} s window (of one core)",
            window.as_secs()
        ),
        idle_cpu.join(" / "),
    );

    // ---- Forwarding: direct (n0 asked about its own) vs forwarded (n1 asked).
    let mine: Vec<&String> = placed
        .iter()
        .filter(|(_, o)| *o == "n0")
        .map(|(id, _)| id)
        .take(FORWARD_REQUESTS)
        .collect();
    for (label, via) in [("direct (n0)", 0), ("forwarded (n1 → n0)", 1)] {
        let read = timed(FORWARD_REQUESTS, |k| {
            let id = mine[k % mine.len()];
            get_json(&api, &format!("{}/api/sessions/{id}", base(&fleet, via)))
                .map(|v| v["success"] == true)
                .unwrap_or(false)
        });
        report.row(format!("GET /api/sessions/:id, {label}"), read);
        let send = timed(FORWARD_REQUESTS / 4, |k| {
            let id = mine[k % mine.len()];
            post(
                &api,
                &format!("{}/api/sessions/{id}/messages", base(&fleet, via)),
                r#"{"to":"15550001111","text":"bench"}"#,
            )
            .map(|(s, _)| s == 201)
            .unwrap_or(false)
        });
        report.row(format!("POST /api/sessions/:id/messages, {label}"), send);
    }

    // ---- Failover: kill -9 of the last node.
    let last = n_nodes - 1;
    let victims: Vec<String> = placed
        .iter()
        .filter(|(_, o)| **o == format!("n{last}"))
        .map(|(id, _)| id.clone())
        .collect();
    println!("\n== kill -9 of n{last} ({} sessions)", victims.len());
    if let Some(mut s) = fleet.nodes[last].take() {
        s.proc.kill9();
    }
    let killed = Instant::now();
    let from = format!("n{last}");
    let (times, period) = until_moved(&api, &base(&fleet, 0), &victims, killed, &from, ctx);
    moved_rows(
        report,
        &format!("failover after kill -9 of n{last} (lease {LEASE})"),
        &times,
        victims.len(),
        period,
    );
    // The killed node comes back (it owns nothing now).
    let server = start_node(ctx, &fleet.data[last], last, url)?;
    fleet.nodes[last] = Some(server);

    // ---- Drain n0.
    let now_placed = owners_of(&api, &base(&fleet, 1))?;
    let drained: Vec<String> = now_placed
        .iter()
        .filter(|(_, o)| *o == "n0")
        .map(|(id, _)| id.clone())
        .collect();
    println!("\n== drain of n0 ({} sessions)", drained.len());
    let start = Instant::now();
    let (status, body) = post(&api, &format!("{}/api/nodes/n0/drain", base(&fleet, 1)), "")?;
    if status != 202 {
        return Err(format!("drain refused: {status} {body}"));
    }
    let (times, period) = until_moved(&api, &base(&fleet, 1), &drained, start, "n0", ctx);
    moved_rows(
        report,
        "drain of n0: per-session downtime",
        &times,
        drained.len(),
        period,
    );
    if let Some(total) = times.iter().map(|t| t.1).max_by(f64::total_cmp) {
        report.row(
            "drain of n0: total, per session handed over",
            format!(
                "{}, {}",
                ms(Some(total)),
                ms(Some(total / drained.len().max(1) as f64))
            ),
        );
    }
    report.row(
        "PostgreSQL connections after the drain",
        pg_connections(url),
    );
    Ok(())
}

fn start_node(ctx: &Ctx, data: &std::path::Path, i: usize, url: &str) -> Result<Server, String> {
    let mut extra: Vec<String> = [
        "--node-id",
        &format!("n{i}"),
        "--lease-ttl",
        LEASE,
        "--boot-interval",
        "0s",
        "--send-rate",
        "100000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    extra.extend(ctx.args.server_args.iter().cloned());
    spawn_server(&ServerSpec {
        database_url: Some(url),
        bin: &ctx.bin,
        data,
        pair_delay: &ctx.args.pair_delay,
        nofile: Nofile::Raise,
        extra: &extra,
        log: ctx.work.join(format!("node-{i}.log")),
    })
}

/// Each session's owner, from a node's fleet list.
fn owners_of(api: &ureq::Agent, base: &str) -> Result<BTreeMap<String, String>, String> {
    Ok(fleet_list(api, base)?
        .into_iter()
        .map(|(id, (_, node))| (id, node))
        .collect())
}

/// The fleet list: id → (state, node).
fn fleet_list(api: &ureq::Agent, base: &str) -> Result<HashMap<String, (String, String)>, String> {
    let v = get_json(api, &format!("{base}/api/sessions"))?;
    Ok(v["sessions"]
        .as_array()
        .ok_or_else(|| format!("no sessions in the list: {v}"))?
        .iter()
        .map(|s| {
            (
                s["userId"].as_str().unwrap_or_default().to_string(),
                (
                    s["state"].as_str().unwrap_or_default().to_string(),
                    s["node"].as_str().unwrap_or_default().to_string(),
                ),
            )
        })
        .collect())
}

fn wait_all_online(api: &ureq::Agent, base: &str, n: usize, limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if let Ok(v) = get_json(api, &format!("{base}/api/stats")) {
            if v["onlineSessions"].as_u64().unwrap_or(0) >= n as u64 {
                return Some(t.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// Polls the fleet list until every one of `ids` is online on a node other than `from`.
/// Per session: (ms from `since` to the first poll seeing it not online on `from`, ms to
/// the first poll seeing it online elsewhere); and the mean period of the polls.
fn until_moved(
    api: &ureq::Agent,
    base: &str,
    ids: &[String],
    since: Instant,
    from: &str,
    ctx: &Ctx,
) -> (Vec<(f64, f64)>, f64) {
    let mut down: HashMap<&str, f64> = HashMap::new();
    let mut up: HashMap<&str, f64> = HashMap::new();
    let limit = Duration::from_secs(ctx.args.max_wait);
    let mut polls = 0u32;
    while up.len() < ids.len() && since.elapsed() < limit {
        let Ok(list) = fleet_list(api, base) else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        polls += 1;
        let at = since.elapsed().as_secs_f64() * 1e3;
        for id in ids {
            if up.contains_key(id.as_str()) {
                continue;
            }
            let Some((state, node)) = list.get(id) else {
                continue;
            };
            if state == "online" && node == from {
                continue;
            }
            down.entry(id).or_insert(at);
            if state == "online" {
                up.insert(id, at);
            }
        }
    }
    let period = since.elapsed().as_secs_f64() * 1e3 / f64::from(polls.max(1));
    let times = ids
        .iter()
        .filter_map(|id| Some((*down.get(id.as_str())?, *up.get(id.as_str())?)))
        .collect();
    (times, period)
}

fn moved_rows(report: &mut Report, what: &str, times: &[(f64, f64)], of: usize, period: f64) {
    let mut online: Vec<f64> = times.iter().map(|t| t.1).collect();
    online.sort_by(f64::total_cmp);
    let mut downtime: Vec<f64> = times.iter().map(|t| t.1 - t.0).collect();
    downtime.sort_by(f64::total_cmp);
    report.row(
        format!("{what}: online elsewhere p50 / p99 / all"),
        format!(
            "{} / {} / {} ({} of {of}; polls every {})",
            ms(pct(&online, 0.50)),
            ms(pct(&online, 0.99)),
            ms(online.last().copied()),
            online.len(),
            ms(Some(period))
        ),
    );
    report.row(
        format!("{what}: down (seen) p50 / p99"),
        format!(
            "{} / {}",
            ms(pct(&downtime, 0.50)),
            ms(pct(&downtime, 0.99))
        ),
    );
}

/// `k` requests one after another; "p50 / p99, N/s".
fn timed(k: usize, mut one: impl FnMut(usize) -> bool) -> String {
    let mut lat = Vec::with_capacity(k);
    let mut failed = 0;
    let t = Instant::now();
    for i in 0..k {
        let s = Instant::now();
        if !one(i) {
            failed += 1;
        }
        lat.push(s.elapsed().as_secs_f64() * 1e3);
    }
    let rate = k as f64 / t.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    format!(
        "p50 {} / p99 {}, {rate:.0}/s one client{}",
        ms(pct(&lat, 0.50)),
        ms(pct(&lat, 0.99)),
        if failed > 0 {
            format!(" ({failed} failed)")
        } else {
            String::new()
        }
    )
}

/// Connections to the database, from `pg_stat_activity` (by `psql`).
fn pg_connections(url: &str) -> String {
    let out = Command::new("psql")
        .args([
            "-X",
            "-A",
            "-t",
            "-d",
            url,
            "-c",
            "SELECT count(*) FILTER (WHERE application_name = 'botvisor'), \
             count(*) FILTER (WHERE application_name = 'botvisor-keys'), count(*) \
             FROM pg_stat_activity WHERE datname = current_database()",
        ])
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout).trim().to_string();
            let v: Vec<&str> = text.split('|').collect();
            match v.as_slice() {
                [rows, keys, all] => format!(
                    "{all} in all ({rows} for the rows, {keys} for WhatsApp keys, the rest psql's own and LISTEN)"
                ),
                _ => text,
            }
        }
        Ok(o) => format!("psql failed: {}", String::from_utf8_lossy(&o.stderr).trim()),
        Err(e) => format!("psql not found: {e}"),
    }
}
