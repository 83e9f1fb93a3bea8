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
mod args;
mod layers;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use botvisor_actors::{RestartPolicy, SupervisorConfig};

use crate::link::sim::SimSettings;
use crate::link::whatsapp::{parse_version, WhatsAppSettings};
use crate::logging::LogFormat;
use crate::store::Database;

use args::BACKOFF_MAX_LIMIT;
pub use args::{HumanDuration, ServeArgs, DEFAULT_WA_VERSION};
pub use layers::{file_key, settings};

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
    /// Copy a whole fleet's rows (sessions, events, settings, webhook outbox, receivers)
    /// from one database to another, SQLite or PostgreSQL either way. Stop the servers of
    /// both first; run it again to resume a copy that was interrupted.
    Migrate(MigrateArgs),
}

/// What `botvisor migrate` copies where (`migrate::run` takes it as its options).
#[derive(clap::Args, Debug, Clone)]
pub struct MigrateArgs {
    /// The database to copy from, as a --database-url (sqlite://PATH, a path, or
    /// postgres://...).
    #[arg(long)]
    pub from: String,
    /// The database to copy into (an SQLite file is created if missing).
    #[arg(long)]
    pub to: String,
    /// Copy into a database that has rows already (rows of the same key are replaced
    /// by the source's).
    #[arg(long)]
    pub force: bool,
    /// Rows per transaction.
    #[arg(long, default_value_t = 2_000)]
    pub batch: usize,
    /// Where the WhatsApp keys go: `database` copies them into --to (PostgreSQL),
    /// `files` writes them as key files in --data-dir. Without it key files stay
    /// where they are, and keys kept in a PostgreSQL --from are refused.
    #[arg(long, value_enum, value_name = "KEYS")]
    pub keys: Option<KeysAt>,
    /// The data dir whose key files are read (or written, with --keys files).
    #[arg(
        long,
        env = "BOTVISOR_DATA_DIR",
        value_name = "DIR",
        default_value = "./data"
    )]
    pub data_dir: PathBuf,
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
    /// tables. A backup copies a session's rows out to a key file of the `Files` format.
    Database,
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
    /// Between two queued sends of a session.
    pub send_interval: Duration,
    /// Webhooks, when receivers are set.
    pub webhooks: Option<crate::webhooks::WebhookSettings>,
    /// The network.
    pub link: LinkKind,
    /// The default proxy of the sessions' WhatsApp sockets.
    pub proxy: Option<crate::link::proxy::ProxyUrl>,
    /// How sends' media is taken in.
    pub media: crate::http::handlers::media::MediaSettings,
    /// Supervisor tunables (restart policy, timeouts).
    pub supervisor: SupervisorConfig,
    /// Backups kept per session.
    pub backup_keep: usize,
    /// How long messages are remembered by id (`--messages-keep`).
    pub messages_keep: std::time::Duration,
    /// Simulated link settings.
    pub sim: SimSettings,
    /// Real link settings.
    pub whatsapp: WhatsAppSettings,
    /// One node of several (`--node-id`), if so.
    pub node: Option<NodeSettings>,
}

/// This process as one node of several on one PostgreSQL database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSettings {
    /// `--node-id`.
    pub id: String,
    /// `--lease-ttl`.
    pub lease_ttl: std::time::Duration,
    /// `--advertise` (default: `http://<bind>:<port>` as bound, 127.0.0.1 for an
    /// unspecified bind).
    pub advertise: Option<String>,
    /// `--handoff`.
    pub handoff: bool,
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
        let events = match self.webhook_events.as_slice() {
            [] => None,
            patterns => Some(
                crate::webhooks::EventFilter::parse(patterns)
                    .map_err(|e| self.explain(ConfigError(format!("--webhook-events: {e}"))))?,
            ),
        };
        Ok(Some(crate::webhooks::WebhookSettings {
            events,
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
            send_interval: args.send_interval.0,
            webhooks: args.webhooks()?,
            link: args.link,
            supervisor: args.supervisor(),
            backup_keep: args.backup_keep,
            messages_keep: args.messages_keep.0,
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
            node: args.node_id.clone().map(|id| NodeSettings {
                id,
                lease_ttl: args.lease_ttl.0,
                advertise: args.advertise.clone(),
                handoff: args.handoff,
            }),
            media: crate::http::handlers::media::MediaSettings {
                max_bytes: usize::try_from(args.media_max_bytes).unwrap_or(usize::MAX),
                fetch_timeout: args.media_fetch_timeout.0,
                allow_private: args.media_allow_private,
            },
            proxy: match args.proxy.as_deref().filter(|p| !p.is_empty()) {
                None => None,
                // The message never repeats the value: it may hold a password.
                Some(p) => Some(crate::link::proxy::ProxyUrl::parse(p).map_err(|e| {
                    args.explain(ConfigError(format!("invalid value for --proxy: {e}")))
                })?),
            },
        };
        config.validate().map_err(|e| args.explain(e))?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let p = &self.supervisor.policy;
        let s = &self.supervisor;
        let checks: [(bool, &str); 20] = [
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
                self.messages_keep < std::time::Duration::from_secs(60),
                "--messages-keep must be at least 1m",
            ),
            (
                self.sim.code_ttl.is_zero(),
                "--sim-code-ttl must be greater than 0",
            ),
            (
                self.bind.parse::<std::net::IpAddr>().is_err(),
                "--bind must be an IP address such as 0.0.0.0 or 127.0.0.1",
            ),
            (
                self.node.is_some() && !matches!(self.database, Database::Postgres { .. }),
                "--node-id runs several nodes on one database: it needs a postgres:// --database-url (DATABASE_URL)",
            ),
            (
                self.node
                    .as_ref()
                    .is_some_and(|n| n.lease_ttl < std::time::Duration::from_secs(1)),
                "--lease-ttl must be at least 1s",
            ),
            (
                self.node
                    .as_ref()
                    .and_then(|n| n.advertise.as_deref())
                    .is_some_and(|a| !a.starts_with("http://")),
                "--advertise must be an http:// URL, e.g. http://10.0.0.5:3000",
            ),
            (
                self.node.is_some() && self.link == LinkKind::Whatsapp && self.keys != KeysAt::Database,
                "--node-id with the real link needs --keys database: every node must reach every session's WhatsApp keys",
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
