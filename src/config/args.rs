//! `botvisor serve`'s settings, declared once (clap): flag, environment variable and
//! default of each, with the parsers that check their values.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use botvisor_actors::{RestartPolicy, SupervisorConfig};

use super::{ConfigError, KeysAt, LinkKind};
use crate::link::sim::SimSettings;
use crate::link::whatsapp::parse_version;
use crate::logging::LogFormat;

/// A duration written the human way (`250ms`, `5s`, `2m`), both ways: parsed from flags,
/// env and file, and rendered for clap's `[default: ...]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

/// `http(s)://host[:port]`, as a browser sends it in `Origin` (no path, no trailing `/`).
fn parse_origin(s: &str) -> Result<String, String> {
    let s = s.trim();
    let host = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .filter(|h| !h.is_empty() && !h.contains(['/', '?', '#', ' ']));
    match host {
        Some(_) => Ok(s.to_string()),
        None => Err(format!(
            "'{s}' is not an origin: use scheme://host[:port], e.g. https://app.example.com"
        )),
    }
}

fn parse_node_id(s: &str) -> Result<String, String> {
    let s = s.trim();
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "'{s}' is not a node id: use 1-64 letters, digits, '_' or '-'"
        ))
    }
}

fn parse_webhook_url(s: &str) -> Result<String, String> {
    crate::webhooks::parse_url(s)
}

/// The longest backoff accepted: beyond it a crashed bot would look dead, not waiting.
pub(super) const BACKOFF_MAX_LIMIT: Duration = Duration::from_secs(3600);

pub(super) fn parse_duration(s: &str) -> Result<HumanDuration, String> {
    humantime::parse_duration(s.trim())
        .map(HumanDuration)
        .map_err(|e| format!("{e} (use a human duration such as 250ms, 5s or 2m)"))
}

fn parse_wa_version(s: &str) -> Result<String, crate::link::whatsapp::VersionError> {
    parse_version(s).map(|_| s.trim().to_string())
}

fn policy() -> RestartPolicy {
    RestartPolicy::default()
}

fn supervisor() -> SupervisorConfig {
    SupervisorConfig::default()
}

fn sim() -> SimSettings {
    SimSettings::default()
}

/// The WhatsApp Web version whatsapp-rust 0.7 itself uses for new devices.
pub const DEFAULT_WA_VERSION: &str = "2.3000.1042742319";

/// Flags of `botvisor serve`. Every one can also be set in the `--config` file.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// TOML file with any of these settings (see config/botvisor.example.toml).
    #[arg(long, env = "BOTVISOR_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// TCP port to listen on; 0 picks a free one.
    #[arg(long, env = "PORT", default_value_t = 8000)]
    pub port: u16,
    /// Address to bind.
    #[arg(
        long,
        env = "BOTVISOR_BIND",
        value_name = "ADDR",
        default_value = "0.0.0.0"
    )]
    pub bind: String,
    /// Directory for the database, session credentials and backups.
    #[arg(
        long,
        env = "BOTVISOR_DATA_DIR",
        value_name = "DIR",
        default_value = "./data"
    )]
    pub data_dir: PathBuf,
    /// sqlite://PATH, sqlite::memory:, a plain path, or postgres://USER@HOST:PORT/DB
    /// [default: <data-dir>/botvisor.db].
    #[arg(long, env = "DATABASE_URL", value_name = "URL")]
    pub database_url: Option<String>,
    /// With PostgreSQL: connections botvisor's own rows may use at most (the WhatsApp keys
    /// have a pool of their own of the same size).
    #[arg(
        long,
        env = "BOTVISOR_DATABASE_POOL",
        value_name = "N",
        default_value_t = 16,
        value_parser = clap::value_parser!(u16).range(1..=1000)
    )]
    pub database_pool: u16,
    /// Where the real link keeps the sessions' WhatsApp keys: `files` (a SQLite file per
    /// session in the data dir) or `database` (the PostgreSQL of --database-url).
    #[arg(long, env = "BOTVISOR_KEYS", value_enum, default_value_t = KeysAt::Files)]
    pub keys: KeysAt,
    /// Run as one node of several sharing the PostgreSQL of --database-url (letters,
    /// digits, `_`, `-`; unique per process). Without it, one botvisor serves the
    /// database alone.
    #[arg(long, env = "BOTVISOR_NODE_ID", value_name = "ID", value_parser = parse_node_id)]
    pub node_id: Option<String>,
    /// How long a node's lease lasts without renewal (renewed every fifth of it): a node
    /// that cannot renew for this long drops its sessions, and the others take them over
    /// shortly after.
    #[arg(long, env = "BOTVISOR_LEASE_TTL", value_name = "DURATION",
          value_parser = parse_duration, default_value = "10s")]
    pub lease_ttl: HumanDuration,
    /// The URL the other nodes reach this one at (forwarded commands)
    /// [default: http://<bind>:<port>, 127.0.0.1 for 0.0.0.0].
    #[arg(long, env = "BOTVISOR_ADVERTISE", value_name = "URL")]
    pub advertise: Option<String>,
    /// On SIGTERM, hand this node's sessions to the other nodes (they take them at once)
    /// instead of keeping them for its return.
    #[arg(long, env = "BOTVISOR_HANDOFF")]
    pub handoff: bool,
    /// Guards the write endpoints (X-API-Key header) when set.
    #[arg(long, env = "API_KEY", value_name = "KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Require the API key for reads too (sessions, stats, events, the dashboard), so phone
    /// numbers and names are not readable without it. Off by default: the LD7 guide keeps
    /// reads open.
    #[arg(long, env = "BOTVISOR_PROTECT_READS")]
    pub protect_reads: bool,
    /// Require the API key for GET /metrics too (it shows fleet sizes, not phone numbers).
    #[arg(long, env = "BOTVISOR_PROTECT_METRICS")]
    pub protect_metrics: bool,
    /// How long a client gets to send a request's headers, and then its body; a slower
    /// client (or an idle keep-alive connection) is cut off.
    #[arg(long, env = "BOTVISOR_REQUEST_TIMEOUT", value_name = "DURATION",
          value_parser = parse_duration, default_value = "10s")]
    pub request_timeout: HumanDuration,
    /// Log format on stderr: text (one line per event) or json (one object per line).
    /// The level comes from RUST_LOG (default info).
    #[arg(long, env = "BOTVISOR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Messages a session may send per minute (POST .../messages; bursts of as many);
    /// past it: 429 with Retry-After. WhatsApp bans numbers that flood.
    #[arg(
        long,
        env = "BOTVISOR_SEND_RATE",
        value_name = "PER_MINUTE",
        default_value_t = 20
    )]
    pub send_rate: u32,
    /// The largest media a send may carry, given as base64 or fetched from a URL
    /// (bytes; WhatsApp's own limits: 16 MB for most media, 100 MB for documents).
    #[arg(
        long,
        env = "BOTVISOR_MEDIA_MAX_BYTES",
        value_name = "BYTES",
        default_value_t = 16 * 1024 * 1024,
        value_parser = clap::value_parser!(u64).range(1024..=2 * 1024 * 1024 * 1024)
    )]
    pub media_max_bytes: u64,
    /// How long fetching a send's media URL may take, redirects included.
    #[arg(long, env = "BOTVISOR_MEDIA_FETCH_TIMEOUT", value_name = "DURATION",
          value_parser = parse_duration, default_value = "30s")]
    pub media_fetch_timeout: HumanDuration,
    /// How long a message is remembered by its id: what a reply, a reaction, an edit, a
    /// revoke or a poll vote needs to name it, a sent poll's options, and where a
    /// received media's bytes are (its key). Older ones are forgotten: their media can no
    /// longer be downloaded, nor a vote on their poll read.
    #[arg(long, env = "BOTVISOR_MESSAGES_KEEP", value_name = "DURATION",
          value_parser = parse_duration, default_value = "30days")]
    pub messages_keep: HumanDuration,
    /// Fetch media URLs that resolve to private, loopback or link-local addresses too
    /// (refused by default: a send must not reach into the server's own network).
    #[arg(long, env = "BOTVISOR_MEDIA_ALLOW_PRIVATE")]
    pub media_allow_private: bool,
    /// Between two queued sends of a session (`?queue=true`), ±25 % jitter.
    #[arg(long, env = "BOTVISOR_SEND_INTERVAL", value_name = "DURATION",
          value_parser = parse_duration, default_value = "2s")]
    pub send_interval: HumanDuration,
    /// Webhook receiver for every event (state changes, messages); repeatable, or
    /// comma-separated in the environment. Needs --webhook-secret.
    #[arg(long = "webhook-url", env = "BOTVISOR_WEBHOOK_URL", value_name = "URL",
          value_delimiter = ',', value_parser = parse_webhook_url)]
    pub webhook_url: Vec<String>,
    /// Which events the --webhook-url receivers get: names and families, e.g.
    /// `message.received,session.*` (default: every event).
    #[arg(
        long = "webhook-events",
        env = "BOTVISOR_WEBHOOK_EVENTS",
        value_name = "EVENTS",
        value_delimiter = ','
    )]
    pub webhook_events: Vec<String>,
    /// The HMAC-SHA256 key that signs every webhook (X-Botvisor-Signature); at least 16
    /// characters. Needed for --webhook-url and for per-session webhooks.
    #[arg(
        long,
        env = "BOTVISOR_WEBHOOK_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub webhook_secret: Option<String>,
    /// Attempts per webhook delivery before it becomes a dead letter.
    #[arg(
        long,
        env = "BOTVISOR_WEBHOOK_MAX_ATTEMPTS",
        value_name = "N",
        default_value_t = 10
    )]
    pub webhook_max_attempts: u32,
    /// Time limit of one webhook attempt.
    #[arg(long, env = "BOTVISOR_WEBHOOK_TIMEOUT", value_name = "DURATION",
          value_parser = parse_duration, default_value = "10s")]
    pub webhook_timeout: HumanDuration,
    /// Webhook deliveries waiting (on disk) past which new events are dropped, with a
    /// warning.
    #[arg(
        long,
        env = "BOTVISOR_WEBHOOK_BACKLOG_MAX",
        value_name = "N",
        default_value_t = 100_000
    )]
    pub webhook_backlog_max: u64,
    /// The longest wait between two attempts of a webhook delivery (the backoff doubles
    /// from 1 s up to it).
    #[arg(long, env = "BOTVISOR_WEBHOOK_RETRY_MAX", value_name = "DURATION",
          value_parser = parse_duration, default_value = "5m")]
    pub webhook_retry_max: HumanDuration,
    /// Webhook requests in flight at most, over every receiver and session (each session
    /// has at most one in flight per receiver).
    #[arg(
        long,
        env = "BOTVISOR_WEBHOOK_MAX_INFLIGHT",
        value_name = "N",
        default_value_t = 32
    )]
    pub webhook_max_inflight: usize,
    /// Extra CA certificates (PEM) trusted for https webhook receivers, besides the public
    /// roots: an internal CA, or a receiver's own certificate authority.
    #[arg(long, env = "BOTVISOR_WEBHOOK_CA_FILE", value_name = "PATH")]
    pub webhook_ca_file: Option<PathBuf>,
    /// Also send session.pairing_code events (they carry the code, a secret).
    #[arg(long, env = "BOTVISOR_WEBHOOK_PAIRING_CODES")]
    pub webhook_pairing_codes: bool,
    /// Allowed CORS origin (`https://app.example.com`); repeatable, or comma-separated in
    /// the environment [default: any origin].
    #[arg(long = "cors-origin", env = "BOTVISOR_CORS_ORIGIN", value_name = "ORIGIN",
          value_delimiter = ',', value_parser = parse_origin)]
    pub cors_origin: Vec<String>,
    /// Network the sessions connect to.
    #[arg(long, env = "BOTVISOR_LINK", value_enum, default_value_t = LinkKind::Whatsapp)]
    pub link: LinkKind,
    /// Restarts allowed within --restart-window before a session is failed (0: never
    /// restart; the first crash fails the session).
    #[arg(long, env = "BOTVISOR_RESTART_MAX", value_name = "N",
          default_value_t = policy().max_restarts)]
    pub restart_max: u32,
    /// Window the restart budget is counted over.
    #[arg(long, env = "BOTVISOR_RESTART_WINDOW", value_name = "DURATION",
          value_parser = parse_duration, default_value_t = HumanDuration(policy().window))]
    pub restart_window: HumanDuration,
    /// Delay before the first restart.
    #[arg(long, env = "BOTVISOR_BACKOFF_INITIAL", value_name = "DURATION",
          value_parser = parse_duration, default_value_t = HumanDuration(policy().backoff_initial))]
    pub backoff_initial: HumanDuration,
    /// Longest delay between restarts.
    #[arg(long, env = "BOTVISOR_BACKOFF_MAX", value_name = "DURATION",
          value_parser = parse_duration, default_value_t = HumanDuration(policy().backoff_max))]
    pub backoff_max: HumanDuration,
    /// Growth of the delay per consecutive restart, >= 1.
    #[arg(long, env = "BOTVISOR_BACKOFF_MULTIPLIER", value_name = "FACTOR",
          default_value_t = policy().backoff_multiplier)]
    pub backoff_multiplier: f64,
    /// Proportional jitter of each delay, a fraction in [0, 1].
    #[arg(long, env = "BOTVISOR_BACKOFF_JITTER", value_name = "FRACTION",
          default_value_t = policy().backoff_jitter)]
    pub backoff_jitter: f64,
    /// Stable uptime after which the backoff starts over.
    #[arg(long, env = "BOTVISOR_BACKOFF_RESET_AFTER", value_name = "DURATION",
          value_parser = parse_duration, default_value_t = HumanDuration(policy().backoff_reset_after))]
    pub backoff_reset_after: HumanDuration,
    /// Time a session gets to close cleanly before it is killed.
    #[arg(long, env = "BOTVISOR_SHUTDOWN_TIMEOUT", value_name = "DURATION",
          value_parser = parse_duration, default_value_t = HumanDuration(supervisor().shutdown_timeout))]
    pub shutdown_timeout: HumanDuration,
    /// Time a session gets to answer a call, or may spend on one message; past it the API answers 503 and the session is restarted.
    #[arg(long, env = "BOTVISOR_CALL_TIMEOUT", value_name = "DURATION",
          value_parser = parse_duration, default_value_t = HumanDuration(supervisor().call_timeout))]
    pub call_timeout: HumanDuration,
    /// How often the watchdog looks for sessions stuck in one message for longer than --call-timeout.
    #[arg(long, env = "BOTVISOR_WATCHDOG_INTERVAL", value_name = "DURATION",
          value_parser = parse_duration, default_value_t = HumanDuration(supervisor().watchdog_interval))]
    pub watchdog_interval: HumanDuration,
    /// How long POST /api/sessions waits for the first pairing code.
    #[arg(long, env = "BOTVISOR_CREATE_TIMEOUT", value_name = "DURATION",
          value_parser = parse_duration, default_value_t = HumanDuration(supervisor().create_timeout))]
    pub create_timeout: HumanDuration,
    /// Sessions resumed at start are started this many at a time (>= 1): at most this many
    /// are connecting at once (the next start when one has connected), so thousands of
    /// WhatsApp sessions do not reconnect at once.
    #[arg(long, env = "BOTVISOR_BOOT_BATCH", value_name = "N",
          default_value_t = supervisor().boot_batch)]
    pub boot_batch: usize,
    /// Pause between those batches of sessions resumed at start, so thousands of WhatsApp
    /// sessions do not reconnect at once; 0s starts the next ones as soon as earlier ones
    /// have connected (use it with the simulated link).
    #[arg(long, env = "BOTVISOR_BOOT_INTERVAL", value_name = "DURATION",
          value_parser = parse_duration, default_value_t = HumanDuration(supervisor().boot_interval))]
    pub boot_interval: HumanDuration,
    /// Backups kept per session; older ones are deleted.
    #[arg(
        long,
        env = "BOTVISOR_BACKUP_KEEP",
        value_name = "N",
        default_value_t = 10
    )]
    pub backup_keep: usize,
    /// WhatsApp Web version the client announces, so nothing is fetched at start.
    #[arg(long, env = "BOTVISOR_WA_VERSION", value_name = "A.B.C",
          value_parser = parse_wa_version, default_value = DEFAULT_WA_VERSION)]
    pub wa_version: String,
    /// WebSocket URL of the WhatsApp server [default: WhatsApp's own, wss://web.whatsapp.com/ws/chat].
    #[arg(long, env = "BOTVISOR_WA_URL", value_name = "URL")]
    pub wa_url: Option<String>,
    /// The proxy every session's WhatsApp socket goes through unless it has its own:
    /// socks5://[user:password@]host:port or http://[user:password@]host:port (CONNECT).
    #[arg(
        long,
        env = "BOTVISOR_PROXY",
        value_name = "URL",
        hide_env_values = true
    )]
    pub proxy: Option<String>,
    /// Turn off the built-in bot commands (`!ping` answers `pong` with the uptime).
    /// In the file: builtin_commands = false.
    #[arg(long, env = "BOTVISOR_NO_BUILTIN_COMMANDS")]
    pub no_builtin_commands: bool,
    /// Simulated link: how long a pairing code is valid.
    #[arg(long, env = "BOTVISOR_SIM_CODE_TTL", value_name = "DURATION",
          value_parser = parse_duration, default_value_t = HumanDuration(sim().code_ttl))]
    pub sim_code_ttl: HumanDuration,
    /// Simulated link: how long after the code the phone "pairs".
    #[arg(long, env = "BOTVISOR_SIM_PAIR_DELAY", value_name = "DURATION",
          value_parser = parse_duration, default_value_t = HumanDuration(sim().pair_delay))]
    pub sim_pair_delay: HumanDuration,
    /// Simulated link: network latency before the first pairing code or connect.
    #[arg(long, env = "BOTVISOR_SIM_CONNECT_DELAY", value_name = "DURATION",
          value_parser = parse_duration, default_value_t = HumanDuration(sim().connect_delay))]
    pub sim_connect_delay: HumanDuration,
    /// Simulated link: time from connecting to online (the simulated login).
    #[arg(long, env = "BOTVISOR_SIM_LOGIN_DELAY", value_name = "DURATION",
          value_parser = parse_duration, default_value_t = HumanDuration(sim().login_delay))]
    pub sim_login_delay: HumanDuration,
    /// Where settings not given on the command line came from: `(long flag, source)`,
    /// so a value that is refused names the variable or file that set it.
    #[arg(skip)]
    pub sources: Vec<(String, String)>,
}

impl ServeArgs {
    /// Adds to a refusal that names a flag where its value came from, when that was not
    /// the command line.
    pub(super) fn explain(&self, e: ConfigError) -> ConfigError {
        let from: Vec<String> = self
            .sources
            .iter()
            .filter(|(long, _)| {
                let flag = format!("--{long}");
                e.0.match_indices(&flag).any(|(i, _)| {
                    !e.0[i + flag.len()..]
                        .starts_with(|c: char| c.is_ascii_alphanumeric() || c == '-')
                })
            })
            .map(|(long, source)| format!("--{long} is set by {source}"))
            .collect();
        if from.is_empty() {
            e
        } else {
            ConfigError(format!("{} ({})", e.0, from.join("; ")))
        }
    }
}
