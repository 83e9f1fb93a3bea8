//! `wa-media`: media throughput through botvisor's real WhatsApp link and the loopback
//! peer's media host, and the memory each transfer in flight holds.
//!
//! One paired session (created, stopped, `pn` seeded into its keys, started, online),
//! then, `--transfers N` media of `--size-mib S` each, `--concurrency C` at a time:
//!
//! 1. **up, uploaded body**: `POST …/messages/upload?kind=document` with the bytes as the
//!    body, timed until every one is answered 201 and the peer has read every one back
//!    from its media host and decrypted it (the send streams the body into a file,
//!    encrypts it into another and streams that to the media host);
//! 2. **up, base64 in JSON**: the same media as `{"document": {"data": …}}`, for contrast
//!    (that body is in memory whole, as JSON);
//! 3. **down**: N media the peer's user sends (encrypted onto the media host), fetched
//!    with `GET …/messages/:id/media`, timed until every body is read whole and checked.
//!
//! botvisor's resident memory is sampled every 10 ms; each phase prints its peak above
//! the idle figure, and that divided by C (memory per transfer in flight). It asserts
//! nothing but the bytes; bounded in time; botvisor is killed on every exit path.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use botvisor_wa_peer::harness::{
    check, exit_on_error, fan_out, raise_nofile, seed_paired_file, start_botvisor, wait, DirGuard,
};
use botvisor_wa_peer::{Command as PeerCommand, Peer};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "wa-media",
    about = "Media MB/s up and down through botvisor's real link and the peer's media host, and memory per transfer"
)]
struct Args {
    /// The botvisor binary (built with --features test-peer, e.g. --profile peer-bench).
    #[arg(long)]
    binary: PathBuf,
    /// Media per phase.
    #[arg(long, default_value_t = 8)]
    transfers: usize,
    /// Each media's size (MiB).
    #[arg(long, default_value_t = 8)]
    size_mib: usize,
    /// Transfers in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Keep the data dir (its path is printed) instead of removing it.
    #[arg(long)]
    keep_dir: bool,
}

const USER: &str = "media1";
const PHONE: &str = "15560000001";
/// The peer's user the media goes to and comes from.
const PEER_USER: &str = "15557654321";

fn main() {
    let args = Args::parse();
    raise_nofile();
    exit_on_error("wa-media", || run(&args));
}

/// botvisor's resident memory (KiB), from `/proc/PID/status`.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Samples a process's RSS every 10 ms, keeping the peak, until dropped.
struct Peak {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Peak {
    fn start(pid: u32) -> Peak {
        let peak = Arc::new(AtomicU64::new(rss_kib(pid)));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (peak, stop) = (peak.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        };
        Peak {
            peak,
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

/// A media of `len` bytes that differs per `seed` (and does not compress to nothing).
fn media(len: usize, seed: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ seed as u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn sha_hex(b: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(b)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One phase's figures, printed.
fn report(phase: &str, n: usize, size: usize, secs: f64, idle: u64, peak: u64, c: usize) {
    let mib = (n * size) as f64 / (1024.0 * 1024.0);
    let above = peak.saturating_sub(idle);
    println!(
        "  {phase}: {n} x {:.1} MiB in {secs:.2} s = {:.1} MiB/s; RSS peak {:.1} MiB, {:.1} MiB above idle, {:.1} MiB per transfer in flight ({c} at once)",
        size as f64 / (1024.0 * 1024.0),
        mib / secs.max(1e-9),
        peak as f64 / 1024.0,
        above as f64 / 1024.0,
        above as f64 / 1024.0 / c as f64,
    );
    println!(
        "SUMMARY phase={} transfers={n} size_mib={:.1} concurrency={c} mib_per_s={:.2} rss_above_idle_mib={:.1} per_transfer_mib={:.2}",
        phase.replace(' ', "_").replace(',', ""),
        size as f64 / (1024.0 * 1024.0),
        mib / secs.max(1e-9),
        above as f64 / 1024.0,
        above as f64 / 1024.0 / c as f64
    );
}

fn run(args: &Args) -> Result<(), String> {
    let (n, c) = (args.transfers, args.concurrency.max(1));
    let size = args.size_mib * 1024 * 1024;
    if n == 0 || size == 0 {
        return Err("--transfers and --size-mib must be at least 1".into());
    }
    let peer = Peer::start();
    let dir = DirGuard::fresh("wa-media", args.keep_dir)?;
    let extra: Vec<String> = [
        "--send-rate",
        "1000000",
        "--media-max-bytes",
        &(size + 1024).to_string(),
        "--media-fetch-timeout",
        "300s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let bv = start_botvisor(&args.binary, &peer.url(), &dir.path, &extra, &[])?;
    let api = &bv.api;
    let body = format!(r#"{{"userId":"{USER}","phoneNumber":"{PHONE}"}}"#);
    let (status, v) = api.call("POST", "/api/sessions", Some(body))?;
    if status != 201 {
        return Err(format!("create: {status} {v}"));
    }
    let (status, v) = api.call("POST", &format!("/api/sessions/{USER}/stop"), None)?;
    if status != 200 {
        return Err(format!("stop: {status} {v}"));
    }
    seed_paired_file(
        &dir.path.join(format!("sessions/{USER}.db")),
        &format!("{PHONE}:7@s.whatsapp.net"),
        "Media",
    )?;
    let (status, v) = api.call("POST", &format!("/api/sessions/{USER}/start"), None)?;
    if status != 200 {
        return Err(format!("start: {status} {v}"));
    }
    api.wait_stats(Duration::from_secs(60), "online", |v| {
        v["onlineSessions"].as_u64() == Some(1)
    })?;
    wait(Duration::from_secs(60), "pre-keys uploaded", || {
        peer.stats().pre_key_uploads >= 1
    })?;
    // One small send first: the Signal session and the media connection are set up
    // outside the timed phases.
    let warm = serde_json::json!({"to": PEER_USER, "document": {"data": "JVBERi0xLjcK", "filename": "warm.pdf"}});
    let (status, v) = api.call(
        "POST",
        &format!("/api/sessions/{USER}/messages"),
        Some(warm.to_string()),
    )?;
    if status != 201 {
        return Err(format!("warm-up send: {status} {v}"));
    }
    std::thread::sleep(Duration::from_secs(1));
    let idle = rss_kib(bv.pid);
    println!(
        "== botvisor pid {} at {}; {n} media of {} MiB, {c} at once; RSS idle {:.1} MiB",
        bv.pid,
        bv.addr,
        args.size_mib,
        idle as f64 / 1024.0
    );
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(300)))
        .build()
        .into();
    let base = format!("http://{}", bv.addr);
    let files: Vec<Vec<u8>> = (0..n).map(|i| media(size, i)).collect();
    let decrypted = |ids: &[String]| {
        let st = peer.stats();
        ids.iter()
            .filter(|id| {
                st.decrypted
                    .iter()
                    .any(|d| &&d.id == id && d.about.is_some())
            })
            .count()
    };
    let check_about = |ids: &[String]| -> Result<(), String> {
        let st = peer.stats();
        for (i, id) in ids.iter().enumerate() {
            let about = st
                .decrypted
                .iter()
                .find(|d| &d.id == id)
                .and_then(|d| d.about.clone())
                .unwrap_or_default();
            if !about.contains(&format!("sha256:{}", sha_hex(&files[i]))) {
                return Err(format!("media {i} arrived other than sent: {about}"));
            }
        }
        Ok(())
    };

    // 1. Up, the media as the body.
    let ids = std::sync::Mutex::new(vec![String::new(); n]);
    let peak = Peak::start(bv.pid);
    let t0 = Instant::now();
    let failures = fan_out(n, c, |i| {
        let url = format!(
            "{base}/api/sessions/{USER}/messages/upload?kind=document&to={PEER_USER}&filename=up{i}.bin"
        );
        let mut resp = agent
            .post(&url)
            .header("content-type", "application/octet-stream")
            .send(&files[i][..])
            .map_err(|e| format!("upload {i}: {e}"))?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        if status != 201 {
            return Err(format!("upload {i}: {status} {text}"));
        }
        ids.lock().unwrap()[i] = v["messageId"].as_str().unwrap_or_default().to_string();
        Ok(())
    });
    check("upload", failures)?;
    let ids = ids.into_inner().unwrap();
    wait(
        Duration::from_secs(600),
        "the peer reads every upload",
        || decrypted(&ids) >= n,
    )?;
    let secs = t0.elapsed().as_secs_f64();
    report("up, uploaded body", n, size, secs, idle, peak.finish(), c);
    check_about(&ids)?;

    // 2. Up, base64 in JSON.
    use base64_engine::encode;
    std::thread::sleep(Duration::from_secs(2));
    let idle_json = rss_kib(bv.pid);
    let ids = std::sync::Mutex::new(vec![String::new(); n]);
    let peak = Peak::start(bv.pid);
    let t0 = Instant::now();
    let failures = fan_out(n, c, |i| {
        let body = serde_json::json!({"to": PEER_USER, "document": {"data": encode(&files[i]), "filename": format!("json{i}.bin")}});
        let (status, v) = api.call(
            "POST",
            &format!("/api/sessions/{USER}/messages"),
            Some(body.to_string()),
        )?;
        if status != 201 {
            return Err(format!("json send {i}: {status} {v}"));
        }
        ids.lock().unwrap()[i] = v["messageId"].as_str().unwrap_or_default().to_string();
        Ok(())
    });
    check("json send", failures)?;
    let ids = ids.into_inner().unwrap();
    wait(
        Duration::from_secs(600),
        "the peer reads every JSON send",
        || decrypted(&ids) >= n,
    )?;
    let secs = t0.elapsed().as_secs_f64();
    report(
        "up, base64 in JSON",
        n,
        size,
        secs,
        idle_json,
        peak.finish(),
        c,
    );
    check_about(&ids)?;

    // 3. Down.
    let before = api.metric_sum("botvisor_messages_received_total")?;
    for (i, f) in files.iter().enumerate() {
        let content = peer.upload_image(f, "image/png", &format!("down {i}"));
        peer.command(PeerCommand::Send {
            from: PEER_USER.into(),
            to: PHONE.into(),
            id: format!("3EB0MD{i:014}"),
            content,
        });
    }
    wait(
        Duration::from_secs(120),
        "every media message is received",
        || {
            api.metric_sum("botvisor_messages_received_total")
                .is_ok_and(|v| v - before >= n as f64)
        },
    )?;
    std::thread::sleep(Duration::from_secs(2));
    let idle_down = rss_kib(bv.pid);
    let peak = Peak::start(bv.pid);
    let t0 = Instant::now();
    let failures = fan_out(n, c, |i| {
        let url = format!("{base}/api/sessions/{USER}/messages/3EB0MD{i:014}/media");
        let mut resp = agent
            .get(&url)
            .call()
            .map_err(|e| format!("download {i}: {e}"))?;
        let status = resp.status().as_u16();
        let got = resp
            .body_mut()
            .with_config()
            .limit(size as u64 + 1024)
            .read_to_vec()
            .map_err(|e| format!("download {i}: {e}"))?;
        if status != 200 || got != files[i] {
            return Err(format!(
                "download {i}: {status}, {} bytes, {}",
                got.len(),
                if got == files[i] { "same" } else { "different" }
            ));
        }
        Ok(())
    });
    check("download", failures)?;
    let secs = t0.elapsed().as_secs_f64();
    report("down", n, size, secs, idle_down, peak.finish(), c);
    drop(bv);
    Ok(())
}

/// Standard base64 (the JSON body's `data`), without another dependency.
mod base64_engine {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn encode(bytes: &[u8]) -> String {
        let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                chunk.get(1).copied().unwrap_or(0),
                chunk.get(2).copied().unwrap_or(0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for (k, shift) in [18, 12, 6, 0].iter().enumerate() {
                if k <= chunk.len() {
                    out.push(ALPHABET[((n >> shift) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}
