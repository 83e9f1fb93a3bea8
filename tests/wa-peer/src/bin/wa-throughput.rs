//! `wa-throughput`: messages per second over real Signal sessions, botvisor's real
//! WhatsApp link against the loopback peer, with the keys in SQLite files (`--keys
//! files`) and, given `--database-url`, in PostgreSQL (`--keys database`), from one run.
//!
//! For each key store: a fresh data dir (and, for PostgreSQL, a fresh database on the
//! given server, dropped afterwards), a fresh peer, `--sessions K` sessions paired
//! (created, stopped, `pn` seeded into their keys, started, online, pre-keys uploaded),
//! then
//!
//! 1. **sent**: `--messages N` `POST /api/sessions/:id/messages` to the peer's second user,
//!    spread over the sessions, `--concurrency C` at a time; timed until every one is
//!    answered 201 and until the peer has decrypted every one (each send reads and writes
//!    the sender's Signal session, and the first to a device fetches its pre-key bundle);
//! 2. **received**: N Signal-encrypted messages from the peer to the sessions; timed until
//!    `botvisor_messages_received_total` counts all N (each is decrypted by the client,
//!    its Signal session written, and its `message.received` event committed before the
//!    client acknowledges it).
//!
//! It prints the figures and a `SUMMARY` line per key store, then the ratio; it asserts
//! nothing. Bounded in count and time; botvisor is killed on every exit path.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use botvisor_wa_peer::harness::{
    check, exit_on_error, fan_out, raise_nofile, seed_paired_file, start_botvisor, wait, DirGuard,
};
use botvisor_wa_peer::signal::Content;
use botvisor_wa_peer::{Command as PeerCommand, Peer};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "wa-throughput",
    about = "Messages per second over Signal on botvisor's real link, keys in SQLite files vs PostgreSQL"
)]
struct Args {
    /// The botvisor binary (built with --features test-peer, e.g. --profile peer-bench).
    #[arg(long)]
    binary: PathBuf,
    /// Paired sessions the messages are spread over.
    #[arg(long, default_value_t = 10)]
    sessions: usize,
    /// Messages sent, and then received (at most 4096: the peer queues the received ones
    /// all at once).
    #[arg(long, default_value_t = 1000)]
    messages: usize,
    /// Concurrent HTTP clients for the sends.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// A PostgreSQL server (`postgres://user@host:port/db`) on which a fresh database is
    /// made for the `--keys database` run (and dropped after); without it only the files
    /// run is made.
    #[arg(long)]
    database_url: Option<String>,
    /// psql, to make and drop that database and seed the keys [default: psql on PATH,
    /// else Debian's PostgreSQL 15].
    #[arg(long)]
    psql: Option<PathBuf>,
    /// Extra environment for botvisor, KEY=VALUE (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Keep the data dirs (their paths are printed) instead of removing them.
    #[arg(long)]
    keep_dir: bool,
}

/// The peer's second user, whom every send goes to.
const RECIPIENT: &str = "15557654321";

fn id_of(i: usize) -> String {
    format!("tp{i:04}")
}

fn phone_of(i: usize) -> String {
    format!("1556{i:07}")
}

/// Where one run keeps its keys.
enum Keys {
    Files,
    /// A database of the run's own: its URL, and the server's (to drop it).
    Database {
        url: String,
        server: String,
        name: String,
    },
}

struct Figures {
    sent_accepted_per_s: f64,
    sent_decrypted_per_s: f64,
    received_per_s: f64,
}

fn main() {
    let args = Args::parse();
    raise_nofile();
    exit_on_error("wa-throughput", || run(&args));
}

fn run(args: &Args) -> Result<(), String> {
    if args.sessions == 0 || args.messages == 0 {
        return Err("--sessions and --messages must be at least 1".into());
    }
    if args.messages > Peer::COMMAND_BACKLOG {
        return Err(format!(
            "--messages is at most {}: the peer queues the inbound ones all at once",
            Peer::COMMAND_BACKLOG
        ));
    }
    let psql = psql(args);
    let files = measure(args, &psql, &Keys::Files)?;
    let Some(server) = &args.database_url else {
        println!("(no --database-url: the PostgreSQL run is skipped)");
        return Ok(());
    };
    let name = format!("wa_throughput_{}", std::process::id());
    sql(&psql, server, &format!("CREATE DATABASE {name}"))?;
    let keys = Keys::Database {
        url: with_database(server, &name)?,
        server: server.clone(),
        name,
    };
    let database = measure(args, &psql, &keys);
    if let Keys::Database { server, name, .. } = &keys {
        if let Err(e) = sql(&psql, server, &format!("DROP DATABASE IF EXISTS {name}")) {
            eprintln!("wa-throughput: could not drop {name}: {e}");
        }
    }
    let database = database?;
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    println!(
        "PostgreSQL / files: sent accepted {:.2}x, sent decrypted {:.2}x, received {:.2}x",
        ratio(database.sent_accepted_per_s, files.sent_accepted_per_s),
        ratio(database.sent_decrypted_per_s, files.sent_decrypted_per_s),
        ratio(database.received_per_s, files.received_per_s),
    );
    Ok(())
}

fn psql(args: &Args) -> PathBuf {
    if let Some(p) = &args.psql {
        return p.clone();
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join("psql").is_file()))
        .unwrap_or(false);
    if on_path {
        PathBuf::from("psql")
    } else {
        PathBuf::from("/usr/lib/postgresql/15/bin/psql")
    }
}

/// Runs `statement` with psql on `url`.
fn sql(psql: &Path, url: &str, statement: &str) -> Result<String, String> {
    let out = Command::new(psql)
        .args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            url,
            "-c",
        ])
        .arg(statement)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", psql.display()))?;
    if !out.status.success() {
        return Err(format!(
            "psql: {statement}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// PostgreSQL's counters of the database with the keys: transactions committed, and rows
/// inserted, updated and deleted per table (empty for key files).
fn activity(psql: &Path, keys: &Keys) -> Result<std::collections::BTreeMap<String, i64>, String> {
    let Keys::Database { url, .. } = keys else {
        return Ok(Default::default());
    };
    // Backends report their counters at most once a second.
    std::thread::sleep(Duration::from_millis(1_500));
    let text = sql(
        psql,
        url,
        "SELECT 'transactions', xact_commit FROM pg_stat_database \
         WHERE datname = current_database() \
         UNION ALL SELECT relname || ' ins', n_tup_ins FROM pg_stat_user_tables \
         UNION ALL SELECT relname || ' upd', n_tup_upd FROM pg_stat_user_tables \
         UNION ALL SELECT relname || ' del', n_tup_del FROM pg_stat_user_tables",
    )?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once('|'))
        .filter_map(|(k, v)| Some((k.to_string(), v.trim().parse().ok()?)))
        .collect())
}

/// What the received messages cost PostgreSQL, per message.
fn print_activity(
    psql: &Path,
    keys: &Keys,
    before: &std::collections::BTreeMap<String, i64>,
    n: usize,
) -> Result<(), String> {
    let after = activity(psql, keys)?;
    let mut parts: Vec<String> = after
        .iter()
        .filter_map(|(k, v)| {
            let d = v - before.get(k).copied().unwrap_or(0);
            (d > 0).then(|| format!("{k} {:.2}", d as f64 / n as f64))
        })
        .collect();
    if !parts.is_empty() {
        parts.sort();
        println!("  PostgreSQL per received message: {}", parts.join(", "));
    }
    if let Keys::Database { url, .. } = keys {
        print_statements(psql, url, n);
    }
    Ok(())
}

/// The statements the received messages ran, per message, where pg_stat_statements is
/// loaded (`-c shared_preload_libraries=pg_stat_statements`); nothing otherwise.
fn print_statements(psql: &Path, url: &str, n: usize) {
    let Ok(text) = sql(
        psql,
        url,
        "SELECT calls, round(total_exec_time::numeric, 1), \
         regexp_replace(left(query, 90), '\\s+', ' ', 'g') \
         FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database \
         WHERE datname = current_database()) AND query NOT LIKE '%pg_stat_statements%' \
         ORDER BY calls DESC LIMIT 12",
    ) else {
        return;
    };
    for line in text.lines() {
        let mut cols = line.splitn(3, '|');
        let (Some(calls), Some(ms), Some(query)) = (cols.next(), cols.next(), cols.next()) else {
            continue;
        };
        let calls: f64 = calls.parse().unwrap_or(0.0);
        println!(
            "    {:>6.2} calls/msg {:>8} ms  {query}",
            calls / n as f64,
            ms
        );
    }
}

/// `postgres://u@h:p/db?x` with the database `name` instead of `db`.
fn with_database(url: &str, name: &str) -> Result<String, String> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let (server, _) = base
        .rsplit_once('/')
        .filter(|(s, _)| s.contains("://") && !s.ends_with('/'))
        .ok_or_else(|| format!("--database-url {url}: expected postgres://USER@HOST:PORT/DB"))?;
    Ok(match query {
        Some(q) => format!("{server}/{name}?{q}"),
        None => format!("{server}/{name}"),
    })
}

/// Writes the paired phone number into session `i`'s keys (stopped).
fn seed(dir: &Path, keys: &Keys, psql: &Path, i: usize) -> Result<(), String> {
    let pn = format!("{}:7@s.whatsapp.net", phone_of(i));
    match keys {
        Keys::Files => seed_paired_file(
            &dir.join(format!("sessions/{}.db", id_of(i))),
            &pn,
            "Throughput",
        ),
        Keys::Database { url, .. } => {
            let statement = format!(
                "UPDATE wa_device SET pn = '{pn}', push_name = 'Throughput' \
                 WHERE session_id = '{}' RETURNING 1",
                id_of(i)
            );
            let changed = sql(psql, url, &statement)?.lines().count();
            (changed == 1)
                .then_some(())
                .ok_or_else(|| format!("{}: {changed} device rows", id_of(i)))
        }
    }
}

fn measure(args: &Args, psql: &Path, keys: &Keys) -> Result<Figures, String> {
    let (k, n) = (args.sessions, args.messages);
    let label = match keys {
        Keys::Files => "files",
        Keys::Database { .. } => "database",
    };
    let peer = Peer::start();
    let dir = DirGuard::fresh(&format!("wa-throughput-{label}"), args.keep_dir)?;
    let mut extra: Vec<String> = ["--send-rate", "1000000", "--keys", label]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if let Keys::Database { url, .. } = keys {
        extra.extend(["--database-url".to_string(), url.clone()]);
    }
    let bv = start_botvisor(&args.binary, &peer.url(), &dir.path, &extra, &args.env)?;
    let api = &bv.api;
    println!(
        "== keys in {label}: botvisor pid {} at {}; {k} sessions, {n} messages, {} clients",
        bv.pid, bv.addr, args.concurrency
    );

    // Paired and online: created (a code), stopped, seeded, started.
    let failures = fan_out(k, 4, |i| {
        let body = format!(
            r#"{{"userId":"{}","phoneNumber":"{}"}}"#,
            id_of(i),
            phone_of(i)
        );
        let (status, v) = api.call("POST", "/api/sessions", Some(body))?;
        (status == 201)
            .then_some(())
            .ok_or_else(|| format!("create {}: {status} {v}", id_of(i)))
    });
    check("create", failures)?;
    let failures = fan_out(k, 4, |i| {
        let (status, v) = api.call("POST", &format!("/api/sessions/{}/stop", id_of(i)), None)?;
        if status != 200 {
            return Err(format!("stop {}: {status} {v}", id_of(i)));
        }
        seed(&dir.path, keys, psql, i)?;
        let (status, v) = api.call("POST", &format!("/api/sessions/{}/start", id_of(i)), None)?;
        (status == 200)
            .then_some(())
            .ok_or_else(|| format!("start {}: {status} {v}", id_of(i)))
    });
    check("pair", failures)?;
    api.wait_stats(Duration::from_secs(60), "all online", |v| {
        v["onlineSessions"].as_u64() == Some(k as u64)
    })?;
    wait(
        Duration::from_secs(60),
        "every client uploads its pre-keys",
        || peer.stats().pre_key_uploads >= k,
    )?;

    // 1. Sent.
    let t0 = Instant::now();
    let failures = fan_out(n, args.concurrency, |i| {
        let body = serde_json::json!({"to": RECIPIENT, "text": format!("throughput {i}")});
        let path = format!("/api/sessions/{}/messages", id_of(i % k));
        let (status, v) = api.call("POST", &path, Some(body.to_string()))?;
        (status == 201)
            .then_some(())
            .ok_or_else(|| format!("send {i}: {status} {v}"))
    });
    let accepted = t0.elapsed().as_secs_f64();
    check("send", failures)?;
    let decrypted_count = || {
        peer.stats()
            .decrypted
            .iter()
            .filter(|d| d.to.starts_with(RECIPIENT))
            .count()
    };
    wait(
        Duration::from_secs(120 + n as u64 / 10),
        "the peer decrypts every send",
        || decrypted_count() >= n,
    )?;
    let decrypted = t0.elapsed().as_secs_f64();
    let errors = peer.stats().signal_errors;
    if !errors.is_empty() {
        return Err(format!("the peer could not decrypt: {errors:?}"));
    }

    // 2. Received.
    let activity_before = activity(psql, keys)?;
    if let Keys::Database { url, .. } = keys {
        // Statement counts, where the server loads pg_stat_statements (counted at once,
        // where the table counters may lag by up to 10 s).
        let _ = sql(
            psql,
            url,
            "CREATE EXTENSION IF NOT EXISTS pg_stat_statements; SELECT pg_stat_statements_reset()",
        );
    }
    let before = api.metric_sum("botvisor_messages_received_total")?;
    let cpu_before = Cpu::now(bv.pid);
    let t1 = Instant::now();
    for i in 0..n {
        peer.command(PeerCommand::Send {
            from: format!("1557{:07}", i % 5),
            to: phone_of(i % k),
            id: format!("3EB0TP{i:014}"),
            content: Content::Text(format!("inbound {i}")),
        });
    }
    wait(
        Duration::from_secs(120 + n as u64 / 10),
        "every message is received",
        || {
            api.metric_sum("botvisor_messages_received_total")
                .is_ok_and(|v| v - before >= n as f64)
        },
    )?;
    let received = t1.elapsed().as_secs_f64();
    let cpu = Cpu::now(bv.pid).since(cpu_before);
    print_activity(psql, keys, &activity_before, n)?;

    let figures = Figures {
        sent_accepted_per_s: n as f64 / accepted.max(1e-9),
        sent_decrypted_per_s: n as f64 / decrypted.max(1e-9),
        received_per_s: n as f64 / received.max(1e-9),
    };
    println!(
        "  sent:     {n} answered 201 in {accepted:.2} s ({:.0}/s), all decrypted at the peer in {decrypted:.2} s ({:.0}/s)",
        figures.sent_accepted_per_s, figures.sent_decrypted_per_s
    );
    println!(
        "  received: {n} counted in {received:.2} s ({:.0}/s); {cpu}",
        figures.received_per_s
    );
    println!(
        "SUMMARY keys={label} sessions={k} messages={n} concurrency={} sent_accepted_per_s={:.1} sent_decrypted_per_s={:.1} received_per_s={:.1}",
        args.concurrency, figures.sent_accepted_per_s, figures.sent_decrypted_per_s, figures.received_per_s
    );
    drop(bv);
    Ok(figures)
}

/// CPU seconds (user + system) used so far by botvisor, by every `postgres` process
/// (server and backends), and by this process (the peer).
#[derive(Clone, Copy, Default)]
struct Cpu {
    botvisor: f64,
    postgres: f64,
    peer: f64,
}

impl Cpu {
    fn now(botvisor: u32) -> Cpu {
        let mut cpu = Cpu {
            botvisor: stat_cpu(&format!("/proc/{botvisor}/stat")).map_or(0.0, |(_, s)| s),
            peer: stat_cpu("/proc/self/stat").map_or(0.0, |(_, s)| s),
            postgres: 0.0,
        };
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            if let Some((comm, s)) = stat_cpu(&format!("{}/stat", entry.path().display())) {
                if comm == "postgres" {
                    cpu.postgres += s;
                }
            }
        }
        cpu
    }

    fn since(self, before: Cpu) -> String {
        format!(
            "CPU s: botvisor {:.2}, postgres {:.2}, peer {:.2}",
            self.botvisor - before.botvisor,
            self.postgres - before.postgres,
            self.peer - before.peer
        )
    }
}

/// A process's name and CPU seconds, from its `/proc/PID/stat`.
fn stat_cpu(path: &str) -> Option<(String, f64)> {
    let text = std::fs::read_to_string(path).ok()?;
    let (head, tail) = text.rsplit_once(')')?;
    let comm = head.split_once('(')?.1.to_string();
    // After the name: state is field 3; utime and stime are fields 14 and 15.
    let fields: Vec<&str> = tail.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some((comm, ticks / 100.0))
}
