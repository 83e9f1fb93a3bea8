//! Command line, environment and TOML file, merged into one `Config`.
//! Precedence: flag > env > file > default.
//!
//! One definition: [`ServeArgs`] (clap) declares every setting once, with its flag, its
//! environment variable and its default. The defaults come from the types they configure
//! (`RestartPolicy::default()`, `SupervisorConfig::default()`, `SimSettings::default()`)
//! or, for settings only this crate has, are written in the attribute. The `--config`
//! file uses the same names (snake_case, `builtin_commands` for `--no-builtin-commands`):
//! every file key whose flag was set neither on the command line nor in the environment
//! is appended to the command line as `--flag=value` and the whole is parsed again, so
//! clap's own parsers check file values too and name the flag when one is wrong.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::error::ErrorKind;
use clap::parser::ValueSource;
use clap::{
    Arg, ArgAction, ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum,
};

use botvisor_actors::{RestartPolicy, SupervisorConfig};

use crate::link::sim::SimSettings;
use crate::link::whatsapp::{parse_version, WhatsAppSettings};
use crate::logging::LogFormat;
use crate::store::Database;

/// botvisor: runs many WhatsApp bot sessions under a supervisor, behind an HTTP API.
#[derive(Debug, Parser)]
#[command(name = "botvisor", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
// Parsed once at start: the size of the serve variant does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Run the HTTP API and the session supervisor.
    Serve(ServeArgs),
    /// Check that a running botvisor answers (exit 0) or not (exit 1): for container
    /// HEALTHCHECKs and scripts, with no curl needed.
    Health {
        /// The URL to GET (plain http).
        #[arg(long, default_value = "http://127.0.0.1:8000/healthz")]
        url: String,
    },
}

/// Which network the sessions connect to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LinkKind {
    /// The real WhatsApp network (whatsapp-rust).
    Whatsapp,
    /// A simulated network for tests and demos; takes injected faults.
    Sim,
}

/// Where the real link keeps each session's WhatsApp keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KeysAt {
    /// One SQLite file per session, `<data-dir>/sessions/<userId>.db` (whatsapp-rust's own
    /// store).
    Files,
    /// In the PostgreSQL database of `--database-url`, every session's rows in one set of
    /// tables. Backups of such sessions are not available yet (back the database up).
    Database,
}

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

fn parse_webhook_url(s: &str) -> Result<String, String> {
    crate::webhooks::parse_url(s)
}

/// The longest backoff accepted: beyond it a crashed bot would look dead, not waiting.
const BACKOFF_MAX_LIMIT: Duration = Duration::from_secs(3600);

fn parse_duration(s: &str) -> Result<HumanDuration, String> {
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
    /// Webhook receiver for every event (state changes, messages); repeatable, or
    /// comma-separated in the environment. Needs --webhook-secret.
    #[arg(long = "webhook-url", env = "BOTVISOR_WEBHOOK_URL", value_name = "URL",
          value_delimiter = ',', value_parser = parse_webhook_url)]
    pub webhook_url: Vec<String>,
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
    /// Time a session gets to answer a call; past it the API answers 503 and the session is restarted.
    #[arg(long, env = "BOTVISOR_CALL_TIMEOUT", value_name = "DURATION",
          value_parser = parse_duration, default_value_t = HumanDuration(supervisor().call_timeout))]
    pub call_timeout: HumanDuration,
    /// How often every session is pinged to find hung ones.
    #[arg(long, env = "BOTVISOR_WATCHDOG_INTERVAL", value_name = "DURATION",
          value_parser = parse_duration, default_value_t = HumanDuration(supervisor().watchdog_interval))]
    pub watchdog_interval: HumanDuration,
    /// How long POST /api/sessions waits for the first pairing code.
    #[arg(long, env = "BOTVISOR_CREATE_TIMEOUT", value_name = "DURATION",
          value_parser = parse_duration, default_value_t = HumanDuration(supervisor().create_timeout))]
    pub create_timeout: HumanDuration,
    /// Sessions resumed at start are started this many at a time (>= 1), so thousands of
    /// WhatsApp sessions do not reconnect at once.
    #[arg(long, env = "BOTVISOR_BOOT_BATCH", value_name = "N",
          default_value_t = supervisor().boot_batch)]
    pub boot_batch: usize,
    /// Pause between those batches of sessions resumed at start, so thousands of WhatsApp
    /// sessions do not reconnect at once; 0s starts the next batch at once (use it with the
    /// simulated link).
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
    fn explain(&self, e: ConfigError) -> ConfigError {
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

impl Cli {
    /// Parses the command line and the environment, then the `--config` file under them.
    /// Exits with clap's message (status 2) on any error, like `Cli::parse`.
    pub fn parse_layered() -> Cli {
        Cli::try_parse_layered(std::env::args_os()).unwrap_or_else(|e| e.exit())
    }

    /// [`Cli::parse_layered`] from the given arguments (the first is the program name).
    pub fn try_parse_layered<I, T>(argv: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString>,
    {
        layered(Cli::command(), argv.into_iter().map(Into::into).collect())
    }
}

fn layered(mut cmd: clap::Command, mut argv: Vec<OsString>) -> Result<Cli, clap::Error> {
    let matches = cmd
        .try_get_matches_from_mut(argv.clone())
        .map_err(|e| name_env_var(e, &cmd, &argv))?;
    let Some(("serve", serve)) = matches.subcommand() else {
        return Cli::from_arg_matches(&matches);
    };
    let env_sources = env_sources(serve, cmd.find_subcommand("serve").expect("serve"));
    let Some(path) = serve.get_one::<PathBuf>("config").cloned() else {
        return with_sources(Cli::from_arg_matches(&matches)?, env_sources);
    };
    let serve_cmd = cmd.find_subcommand("serve").expect("serve is a subcommand");
    let extra = file_args(&path, serve, serve_cmd)
        .map_err(|msg| clap::Error::raw(ErrorKind::InvalidValue, format!("{msg}\n")))?;
    let mut sources = env_sources;
    for flag in &extra {
        let flag = flag.to_string_lossy();
        let long = flag
            .trim_start_matches("--")
            .split('=')
            .next()
            .unwrap_or("");
        sources.push((
            long.to_string(),
            format!("--config file {}", path.display()),
        ));
    }
    argv.extend(extra);
    // The first parse succeeded, so an error now comes from a value in the file.
    let matches = cmd.try_get_matches_from_mut(argv).map_err(|e| {
        let text = e.to_string();
        let first = text.lines().next().unwrap_or_default();
        let first = first.strip_prefix("error: ").unwrap_or(first);
        let from = format!("(from --config file {})", path.display());
        clap::Error::raw(e.kind(), format!("{first} {from}\n"))
    })?;
    with_sources(Cli::from_arg_matches(&matches)?, sources)
}

fn with_sources(mut cli: Cli, sources: Vec<(String, String)>) -> Result<Cli, clap::Error> {
    if let Command::Serve(args) = &mut cli.command {
        args.sources = sources;
    }
    Ok(cli)
}

/// The settings whose value came from the environment: `(long flag, "environment
/// variable NAME")`.
fn env_sources(set: &ArgMatches, serve: &clap::Command) -> Vec<(String, String)> {
    settings(serve)
        .filter(|a| set.value_source(a.get_id().as_str()) == Some(ValueSource::EnvVariable))
        .filter_map(|a| {
            let var = a.get_env()?.to_string_lossy();
            Some((
                a.get_long()?.to_string(),
                format!("environment variable {var}"),
            ))
        })
        .collect()
}

/// clap names a bad value by its flag even when it came from the environment: name the
/// variable the operator actually set.
fn name_env_var(e: clap::Error, cmd: &clap::Command, argv: &[OsString]) -> clap::Error {
    use clap::error::{ContextKind, ContextValue};
    let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) else {
        return e;
    };
    let long = arg
        .split_whitespace()
        .next()
        .unwrap_or("")
        .trim_start_matches("--");
    let on_command_line = argv.iter().any(|a| {
        let a = a.to_string_lossy();
        a.strip_prefix("--")
            .is_some_and(|a| a == long || a.starts_with(&format!("{long}=")))
    });
    let var = cmd
        .find_subcommand("serve")
        .and_then(|serve| settings(serve).find(|a| a.get_long() == Some(long)))
        .and_then(Arg::get_env)
        .filter(|var| std::env::var_os(var).is_some());
    match var {
        Some(var) if !on_command_line => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            let first = first.strip_prefix("error: ").unwrap_or(first);
            let named = first.replacen(
                &format!("'{arg}'"),
                &format!("environment variable {} (--{long})", var.to_string_lossy()),
                1,
            );
            clap::Error::raw(e.kind(), format!("{named}\n"))
        }
        _ => e,
    }
}

/// The settings of `serve`: every argument but clap's own `--help`.
pub fn settings(serve: &clap::Command) -> impl Iterator<Item = &Arg> {
    serve.get_arguments().filter(|a| {
        !matches!(
            a.get_action(),
            ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
        )
    })
}

/// The `--config` file key of a setting (`None`: not settable from the file).
pub fn file_key(arg: &Arg) -> Option<&str> {
    match arg.get_id().as_str() {
        "config" => None,
        "no_builtin_commands" => Some("builtin_commands"),
        id => Some(id),
    }
}

/// The file's settings as extra command-line arguments, for those keys whose flag was
/// set neither on the command line nor in the environment.
fn file_args(
    path: &Path,
    set: &ArgMatches,
    serve: &clap::Command,
) -> Result<Vec<OsString>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read --config file {}: {e}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| format!("invalid --config file {}: {e}", path.display()))?;
    let mut out: Vec<OsString> = Vec::new();
    for (key, value) in &table {
        let Some(arg) = settings(serve).find(|a| file_key(a) == Some(key.as_str())) else {
            let known: Vec<&str> = settings(serve).filter_map(file_key).collect();
            return Err(format!(
                "invalid --config file {}: unknown key `{key}`; the keys are {}",
                path.display(),
                known.join(", ")
            ));
        };
        let id = arg.get_id().as_str();
        if !matches!(set.value_source(id), None | Some(ValueSource::DefaultValue)) {
            continue; // set on the command line or in the environment
        }
        let long = arg.get_long().expect("every setting has a long flag");
        let bad = |what: &str| {
            format!(
                "invalid --config file {}: `{key}` must be {what}",
                path.display()
            )
        };
        match (arg.get_action(), value) {
            (ArgAction::SetTrue, toml::Value::Boolean(on)) => {
                // builtin_commands = false is --no-builtin-commands; other switches
                // (protect_reads = true) are their flag.
                let negated = file_key(arg) != Some(id);
                if *on != negated {
                    out.push(format!("--{long}").into());
                }
            }
            (ArgAction::SetTrue, _) => return Err(bad("true or false")),
            (ArgAction::Append, toml::Value::Array(items)) => {
                for item in items {
                    let item = scalar(item).ok_or_else(|| bad("a list of strings"))?;
                    out.push(format!("--{long}={item}").into());
                }
            }
            (ArgAction::Append, _) => return Err(bad("a list such as [\"a\", \"b\"]")),
            (_, value) => {
                let value = scalar(value).ok_or_else(|| bad("a string or a number"))?;
                out.push(format!("--{long}={value}").into());
            }
        }
    }
    Ok(out)
}

fn scalar(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        _ => None,
    }
}

/// A setting that cannot be used, with a message that names its flag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl From<String> for ConfigError {
    fn from(s: String) -> ConfigError {
        ConfigError(s)
    }
}

impl From<&str> for ConfigError {
    fn from(s: &str) -> ConfigError {
        ConfigError(s.to_string())
    }
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address to bind.
    pub bind: String,
    /// Port to bind.
    pub port: u16,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Session database.
    pub database: Database,
    /// Where the real link keeps WhatsApp keys (`Database` only with PostgreSQL).
    pub keys: KeysAt,
    /// API key, if any.
    pub api_key: Option<String>,
    /// The key is needed for reads too.
    pub protect_reads: bool,
    /// The log's format.
    pub log_format: LogFormat,
    /// How long a client gets to send a request's head, and then its body.
    pub request_timeout: Duration,
    /// `/metrics` needs the key.
    pub protect_metrics: bool,
    /// Allowed origins; empty means any.
    pub cors_origins: Vec<String>,
    /// Sends per session per minute.
    pub send_rate: u32,
    /// Webhooks, when receivers are set.
    pub webhooks: Option<crate::webhooks::WebhookSettings>,
    /// The network.
    pub link: LinkKind,
    /// Supervisor tunables (restart policy, timeouts).
    pub supervisor: SupervisorConfig,
    /// Backups kept per session.
    pub backup_keep: usize,
    /// Simulated link settings.
    pub sim: SimSettings,
    /// Real link settings.
    pub whatsapp: WhatsAppSettings,
}

impl ServeArgs {
    /// `--database-url` (the data dir's `botvisor.db` without it), with `--database-pool`
    /// for PostgreSQL.
    fn database(&self) -> Result<Database, ConfigError> {
        Ok(match &self.database_url {
            None => Database::File(self.data_dir.join("botvisor.db")),
            Some(url) => match parse_database_url(url)? {
                Database::Postgres { url, .. } => Database::Postgres {
                    url,
                    pool_size: usize::from(self.database_pool),
                },
                other => other,
            },
        })
    }

    /// The restart policy and the supervisor's timings.
    fn supervisor(&self) -> SupervisorConfig {
        let policy = RestartPolicy {
            max_restarts: self.restart_max,
            window: self.restart_window.0,
            backoff_initial: self.backoff_initial.0,
            backoff_max: self.backoff_max.0,
            backoff_multiplier: self.backoff_multiplier,
            backoff_jitter: self.backoff_jitter,
            backoff_reset_after: self.backoff_reset_after.0,
        };
        SupervisorConfig {
            policy,
            shutdown_timeout: self.shutdown_timeout.0,
            call_timeout: self.call_timeout.0,
            watchdog_interval: self.watchdog_interval.0,
            create_timeout: self.create_timeout.0,
            boot_batch: self.boot_batch,
            boot_interval: self.boot_interval.0,
            ..SupervisorConfig::default()
        }
    }

    /// The webhook settings, when receivers or a secret are given (checked: a secret of at
    /// least 16 characters, bounds of at least 1, a readable CA file).
    fn webhooks(&self) -> Result<Option<crate::webhooks::WebhookSettings>, ConfigError> {
        if self.webhook_secret.is_none() && self.webhook_url.is_empty() {
            return Ok(None);
        }
        let secret = self.webhook_secret.clone().unwrap_or_default();
        let refuse = |msg: &str| Err(self.explain(ConfigError(msg.into())));
        if secret.chars().count() < 16 {
            return refuse(
                "--webhook-url needs --webhook-secret (BOTVISOR_WEBHOOK_SECRET) of at least 16 characters: \
                 every webhook is signed with it",
            );
        }
        if self.webhook_max_attempts == 0 {
            return refuse("--webhook-max-attempts must be at least 1");
        }
        if self.webhook_max_inflight == 0 {
            return refuse("--webhook-max-inflight must be at least 1");
        }
        let ca_certs = match &self.webhook_ca_file {
            Some(path) => {
                crate::webhooks::load_ca_file(path).map_err(|e| self.explain(ConfigError(e)))?
            }
            None => Vec::new(),
        };
        Ok(Some(crate::webhooks::WebhookSettings {
            ca_certs,
            urls: self.webhook_url.clone(),
            secret,
            max_attempts: self.webhook_max_attempts,
            timeout: self.webhook_timeout.0,
            backlog_max: self.webhook_backlog_max,
            retry_max: self.webhook_retry_max.0,
            max_inflight: self.webhook_max_inflight,
            pairing_codes: self.webhook_pairing_codes,
        }))
    }
}

impl Config {
    /// Turns the parsed settings (flags, env and file already layered by
    /// [`Cli::parse_layered`]) into the configuration, and checks it.
    pub fn resolve(args: &ServeArgs) -> Result<Config, ConfigError> {
        let config = Config {
            bind: args.bind.clone(),
            port: args.port,
            data_dir: args.data_dir.clone(),
            database: args.database()?,
            keys: args.keys,
            api_key: args.api_key.clone().filter(|k| !k.is_empty()),
            protect_reads: args.protect_reads,
            log_format: args.log_format,
            request_timeout: args.request_timeout.0,
            protect_metrics: args.protect_metrics,
            cors_origins: args.cors_origin.clone(),
            send_rate: args.send_rate,
            webhooks: args.webhooks()?,
            link: args.link,
            supervisor: args.supervisor(),
            backup_keep: args.backup_keep,
            sim: SimSettings {
                code_ttl: args.sim_code_ttl.0,
                pair_delay: args.sim_pair_delay.0,
                connect_delay: args.sim_connect_delay.0,
                login_delay: args.sim_login_delay.0,
                builtin_commands: !args.no_builtin_commands,
            },
            whatsapp: WhatsAppSettings {
                version: parse_version(&args.wa_version).map_err(|e| {
                    args.explain(ConfigError(format!("invalid value for --wa-version: {e}")))
                })?,
                url: args.wa_url.clone(),
                builtin_commands: !args.no_builtin_commands,
            },
        };
        config.validate().map_err(|e| args.explain(e))?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let p = &self.supervisor.policy;
        let s = &self.supervisor;
        let checks: [(bool, &str); 15] = [
            (
                p.backoff_max > BACKOFF_MAX_LIMIT,
                "--backoff-max must be at most 1h (a longer wait looks like a dead bot)",
            ),
            (
                p.window.is_zero(),
                "--restart-window must be greater than 0",
            ),
            (
                !(p.backoff_multiplier.is_finite() && p.backoff_multiplier >= 1.0),
                "--backoff-multiplier must be a number >= 1.0",
            ),
            (
                !(0.0..=1.0).contains(&p.backoff_jitter),
                "--backoff-jitter must be a fraction between 0 and 1",
            ),
            (
                p.backoff_initial > p.backoff_max,
                "--backoff-initial must not exceed --backoff-max",
            ),
            (
                s.shutdown_timeout.is_zero(),
                "--shutdown-timeout must be greater than 0",
            ),
            (
                s.call_timeout.is_zero(),
                "--call-timeout must be greater than 0",
            ),
            (
                s.watchdog_interval.is_zero(),
                "--watchdog-interval must be greater than 0",
            ),
            (
                s.create_timeout.is_zero(),
                "--create-timeout must be greater than 0",
            ),
            (s.boot_batch == 0, "--boot-batch must be at least 1"),
            (
                self.request_timeout.is_zero(),
                "--request-timeout must be greater than 0",
            ),
            (self.backup_keep == 0, "--backup-keep must be at least 1"),
            (
                self.sim.code_ttl.is_zero(),
                "--sim-code-ttl must be greater than 0",
            ),
            (
                self.bind.parse::<std::net::IpAddr>().is_err(),
                "--bind must be an IP address such as 0.0.0.0 or 127.0.0.1",
            ),
            (
                self.keys == KeysAt::Database
                    && !matches!(self.database, Database::Postgres { .. }),
                "--keys database keeps the WhatsApp keys in PostgreSQL: it needs a postgres:// --database-url (DATABASE_URL)",
            ),
        ];
        match checks.iter().find(|(bad, _)| *bad) {
            Some((_, msg)) => Err(ConfigError(msg.to_string())),
            None => Ok(()),
        }
    }
}

/// `sqlite://PATH`, `sqlite::memory:`, a plain path, or `postgres://` /
/// `postgresql://` (its pool size the default until `resolve` sets the flag's);
/// anything else is refused.
pub fn parse_database_url(url: &str) -> Result<Database, ConfigError> {
    let url = url.trim();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Database::Postgres {
            url: url.to_string(),
            pool_size: 16,
        });
    }
    if url == "sqlite::memory:" || url == "sqlite://:memory:" {
        return Ok(Database::Memory);
    }
    if let Some(path) = url.strip_prefix("sqlite://") {
        if path.is_empty() {
            return Err(
                "--database-url sqlite:// needs a path, e.g. sqlite://data/botvisor.db".into(),
            );
        }
        return Ok(Database::File(PathBuf::from(path)));
    }
    if let Some((scheme, _)) = url.split_once("://") {
        return Err(format!(
            "--database-url scheme '{scheme}' is not supported: use sqlite://PATH, \
             sqlite::memory:, a plain file path, or postgres://USER@HOST:PORT/DB"
        )
        .into());
    }
    if url.is_empty() {
        return Err("--database-url is empty".into());
    }
    Ok(Database::File(PathBuf::from(url)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_urls() {
        assert_eq!(parse_database_url("sqlite::memory:"), Ok(Database::Memory));
        assert_eq!(
            parse_database_url("sqlite:///var/lib/b.db"),
            Ok(Database::File("/var/lib/b.db".into()))
        );
        assert_eq!(
            parse_database_url("x/b.db"),
            Ok(Database::File("x/b.db".into()))
        );
        assert_eq!(
            parse_database_url("postgres://u@h/db"),
            Ok(Database::Postgres {
                url: "postgres://u@h/db".into(),
                pool_size: 16
            })
        );
        assert!(matches!(
            parse_database_url("postgresql://u@h:5433/db"),
            Ok(Database::Postgres { .. })
        ));
        let err = parse_database_url("mysql://u@h/db").unwrap_err();
        assert!(err.0.contains("'mysql' is not supported"), "{err}");
    }

    #[test]
    fn keys_in_the_database_need_postgresql() {
        assert_eq!(resolve(&[]).unwrap().keys, KeysAt::Files);
        let err = resolve(&["--keys", "database"]).unwrap_err();
        assert!(err.contains("needs a postgres:// --database-url"), "{err}");
        let err = resolve(&["--keys", "database", "--database-url", "x/b.db"]).unwrap_err();
        assert!(err.contains("--keys database"), "{err}");
        let c = resolve(&["--keys", "database", "--database-url", "postgres://u@h/db"]).unwrap();
        assert_eq!(c.keys, KeysAt::Database);
    }

    /// `botvisor` with its environment variables renamed by `rename` (`None`: ignored), so a
    /// test sees neither the developer's environment nor another test's.
    fn command_with_env(rename: impl Fn(&Arg) -> Option<&'static str>) -> clap::Command {
        Cli::command().mut_subcommand("serve", |serve| {
            serve.mut_args(|a| {
                let env = rename(&a);
                a.env(env)
            })
        })
    }

    fn resolve_with(cmd: clap::Command, flags: &[&str]) -> Result<Config, String> {
        let mut argv: Vec<OsString> = vec!["botvisor".into(), "serve".into()];
        argv.extend(flags.iter().map(OsString::from));
        let Command::Serve(args) = layered(cmd, argv).map_err(|e| e.to_string())?.command else {
            unreachable!("tests parse serve");
        };
        Config::resolve(&args).map_err(|e| e.0)
    }

    /// Flags and `--config` only; no environment.
    fn resolve(flags: &[&str]) -> Result<Config, String> {
        resolve_with(command_with_env(|_| None), flags)
    }

    fn toml_file(dir: &tempfile::TempDir, text: &str) -> String {
        let file = dir.path().join("b.toml");
        std::fs::write(&file, text).unwrap();
        file.to_str().unwrap().to_string()
    }

    #[test]
    fn defaults_come_from_the_types_they_configure() {
        let c = resolve(&[]).unwrap();
        let s = SupervisorConfig::default();
        assert_eq!(c.supervisor.policy, RestartPolicy::default());
        assert_eq!(c.supervisor.shutdown_timeout, s.shutdown_timeout);
        assert_eq!(c.supervisor.call_timeout, s.call_timeout);
        assert_eq!(c.supervisor.watchdog_interval, s.watchdog_interval);
        assert_eq!(c.supervisor.create_timeout, s.create_timeout);
        assert_eq!(c.supervisor.boot_batch, 32);
        assert_eq!(c.supervisor.boot_interval, Duration::from_millis(200));
        assert_eq!(
            format!("{:?}", c.sim),
            format!("{:?}", SimSettings::default())
        );
        assert_eq!(c.sim.login_delay, Duration::from_millis(20));
        assert_eq!(
            (c.port, c.bind.as_str(), c.link),
            (8000, "0.0.0.0", LinkKind::Whatsapp)
        );
        assert_eq!(c.database, Database::File("./data/botvisor.db".into()));
        assert!(c.whatsapp.builtin_commands);
        assert!(!c.protect_reads);
        assert!(c.cors_origins.is_empty());
    }

    #[test]
    fn flag_beats_file_beats_default() {
        let dir = tempfile::tempdir().unwrap();
        let file = toml_file(
            &dir,
            "port = 9000\nrestart_window = \"2m\"\nrestart_max = 7\nboot_batch = 4\n\
             boot_interval = \"0s\"\nsim_login_delay = \"5ms\"\nbuiltin_commands = false\n\
             protect_reads = true\n\
             cors_origin = [\"https://a.example\", \"https://b.example\"]\nbackoff_multiplier = 3\n",
        );
        let c = resolve(&["--config", &file, "--port", "9100"]).unwrap();
        assert_eq!(c.port, 9100);
        assert!(c.protect_reads, "a switch set in the file is on");
        assert_eq!(c.supervisor.policy.window, Duration::from_secs(120));
        assert_eq!(c.supervisor.policy.max_restarts, 7);
        assert_eq!(c.supervisor.policy.backoff_multiplier, 3.0);
        assert_eq!(
            c.supervisor.policy.backoff_initial,
            Duration::from_millis(500)
        );
        assert_eq!(c.supervisor.boot_batch, 4);
        assert_eq!(c.supervisor.boot_interval, Duration::ZERO);
        assert_eq!(c.sim.login_delay, Duration::from_millis(5));
        assert!(!c.whatsapp.builtin_commands);
        assert_eq!(c.cors_origins, ["https://a.example", "https://b.example"]);
        assert_eq!(c.link, LinkKind::Whatsapp);
        // A repeated flag replaces the file's list, it does not add to it.
        let c = resolve(&["--config", &file, "--cors-origin", "https://c.example"]).unwrap();
        assert_eq!(c.cors_origins, ["https://c.example"]);
        let c = resolve(&[
            "--config",
            &file,
            "--boot-batch",
            "8",
            "--boot-interval",
            "1s",
        ])
        .unwrap();
        assert_eq!(c.supervisor.boot_batch, 8);
        assert_eq!(c.supervisor.boot_interval, Duration::from_secs(1));
    }

    #[test]
    fn env_sits_between_flag_and_file() {
        // Names no other test reads, so setting them here races with nothing.
        let cmd = || {
            command_with_env(|a| match a.get_id().as_str() {
                "restart_max" => Some("BOTVISOR_TEST_ENV_LAYER_RESTART_MAX"),
                "boot_interval" => Some("BOTVISOR_TEST_ENV_LAYER_BOOT_INTERVAL"),
                "backoff_max" => Some("BOTVISOR_TEST_ENV_LAYER_BACKOFF_MAX"),
                _ => None,
            })
        };
        std::env::set_var("BOTVISOR_TEST_ENV_LAYER_RESTART_MAX", "8");
        std::env::set_var("BOTVISOR_TEST_ENV_LAYER_BOOT_INTERVAL", "0s");
        let dir = tempfile::tempdir().unwrap();
        let file = toml_file(
            &dir,
            "restart_max = 7\nboot_interval = \"1s\"\nboot_batch = 3\n",
        );
        let c = resolve_with(cmd(), &["--config", &file]).unwrap();
        assert_eq!(c.supervisor.policy.max_restarts, 8, "env beats file");
        assert_eq!(c.supervisor.boot_interval, Duration::ZERO, "env beats file");
        assert_eq!(c.supervisor.boot_batch, 3, "file beats default");
        let c = resolve_with(cmd(), &["--config", &file, "--restart-max", "9"]).unwrap();
        assert_eq!(c.supervisor.policy.max_restarts, 9, "flag beats env");
        // A bad value in the environment names the variable (and its flag).
        std::env::set_var("BOTVISOR_TEST_ENV_LAYER_BACKOFF_MAX", "soon");
        let err = resolve_with(cmd(), &[]).unwrap_err();
        assert!(
            err.contains(
                "invalid value 'soon' for environment variable BOTVISOR_TEST_ENV_LAYER_BACKOFF_MAX (--backoff-max)"
            ),
            "{err}"
        );
        // On the command line it is the flag's fault, whatever the environment says.
        let err = resolve_with(cmd(), &["--backoff-max", "later"]).unwrap_err();
        assert!(
            err.contains("invalid value 'later' for '--backoff-max"),
            "{err}"
        );
        // A value that parses but is refused says where it came from too.
        std::env::set_var("BOTVISOR_TEST_ENV_LAYER_BACKOFF_MAX", "2h");
        let err = resolve_with(cmd(), &[]).unwrap_err();
        assert!(
            err.contains("--backoff-max must be at most 1h")
                && err.contains("--backoff-max is set by environment variable BOTVISOR_TEST_ENV_LAYER_BACKOFF_MAX"),
            "{err}"
        );
        std::env::remove_var("BOTVISOR_TEST_ENV_LAYER_BACKOFF_MAX");
        let file = toml_file(&dir, "boot_batch = 0\n");
        let err = resolve_with(cmd(), &["--config", &file]).unwrap_err();
        assert!(
            err.contains("--boot-batch is set by --config file"),
            "{err}"
        );
        for name in ["RESTART_MAX", "BOOT_INTERVAL", "BACKOFF_MAX"] {
            std::env::remove_var(format!("BOTVISOR_TEST_ENV_LAYER_{name}"));
        }
    }

    #[test]
    fn bad_values_name_their_flag() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                "backoff_max = \"soon\"\n",
                "invalid value 'soon' for '--backoff-max",
            ),
            ("backoff_jitter = 1.5\n", "--backoff-jitter"),
            ("port = 70000\n", "'--port"),
            ("link = \"pigeon\"\n", "'--link"),
            ("wa_version = \"2.x\"\n", "'--wa-version"),
            ("boot_batch = 0\n", "--boot-batch must be at least 1"),
            ("boot_batch = -1\n", "'--boot-batch"),
            ("no_such_key = 1\n", "unknown key `no_such_key`"),
            ("config = \"other.toml\"\n", "unknown key `config`"),
            (
                "no_builtin_commands = true\n",
                "unknown key `no_builtin_commands`",
            ),
            (
                "builtin_commands = \"no\"\n",
                "`builtin_commands` must be true or false",
            ),
            (
                "cors_origin = \"https://a.example\"\n",
                "`cors_origin` must be a list",
            ),
            ("port = [1]\n", "`port` must be a string or a number"),
            ("port = \n", "invalid --config file"),
        ];
        for (text, expect) in cases {
            let file = toml_file(&dir, text);
            let err = resolve(&["--config", &file]).unwrap_err();
            assert!(err.contains(expect), "{text}: {err}");
        }
        let err = resolve(&["--boot-interval", "later"]).unwrap_err();
        assert!(err.contains("'--boot-interval"), "{err}");
        let err = resolve(&["--config", "/nonexistent/b.toml"]).unwrap_err();
        assert!(err.contains("cannot read --config file"), "{err}");
    }

    #[test]
    fn example_config_file_parses_and_matches_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/botvisor.example.toml");
        let from_file = resolve(&["--config", path.to_str().unwrap()]).unwrap();
        let defaults = resolve(&[]).unwrap();
        assert_eq!(format!("{from_file:?}"), format!("{defaults:?}"));
        // Every setting is in it, bar those with no default (commented examples there).
        let table: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
        let cmd = Cli::command();
        let serve = cmd.find_subcommand("serve").unwrap();
        for key in settings(serve).filter_map(file_key) {
            let commented = [
                "api_key",
                "database_url",
                "wa_url",
                "webhook_secret",
                "webhook_ca_file",
            ]
            .contains(&key);
            assert_eq!(
                table.contains_key(key),
                !commented,
                "config/botvisor.example.toml and the flag of `{key}`"
            );
        }
    }

    #[test]
    fn durations_render_the_way_they_parse() {
        for text in ["0s", "20ms", "200ms", "3s", "1m", "3m", "1h 30m"] {
            assert_eq!(parse_duration(text).unwrap().to_string(), text);
        }
    }
}
