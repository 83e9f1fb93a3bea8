//! Command line, environment and TOML file, merged into one `Config`.
//! Precedence: flag > env > file > default.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;

use botvisor_actors::{RestartPolicy, SupervisorConfig};

use crate::link::sim::SimSettings;
use crate::link::whatsapp::{parse_version, WhatsAppSettings};
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
pub enum Command {
    /// Run the HTTP API and the session supervisor.
    Serve(ServeArgs),
}

/// Which network the sessions connect to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkKind {
    /// The real WhatsApp network (whatsapp-rust).
    Whatsapp,
    /// A simulated network for tests and demos; takes injected faults.
    Sim,
}

/// Flags of `botvisor serve`. Every one can also be set in the `--config` file.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// TOML file with any of these settings (see config/botvisor.example.toml).
    #[arg(long, env = "BOTVISOR_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// TCP port to listen on; 0 picks a free one [default: 8000].
    #[arg(long, env = "PORT")]
    pub port: Option<u16>,
    /// Address to bind [default: 0.0.0.0].
    #[arg(long, env = "BOTVISOR_BIND", value_name = "ADDR")]
    pub bind: Option<String>,
    /// Directory for the database, session credentials and backups [default: ./data].
    #[arg(long, env = "BOTVISOR_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// sqlite://PATH, sqlite::memory: or a plain path [default: <data-dir>/botvisor.db].
    #[arg(long, env = "DATABASE_URL", value_name = "URL")]
    pub database_url: Option<String>,
    /// Guards the write endpoints (X-API-Key header) when set.
    #[arg(long, env = "API_KEY", value_name = "KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Allowed CORS origin; repeatable [default: any origin].
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    pub cors_origin: Vec<String>,
    /// Network the sessions connect to [default: whatsapp].
    #[arg(long, env = "BOTVISOR_LINK", value_enum)]
    pub link: Option<LinkKind>,
    /// Restarts allowed within --restart-window before a session is failed [default: 5].
    #[arg(long, env = "BOTVISOR_RESTART_MAX", value_name = "N")]
    pub restart_max: Option<u32>,
    /// Window the restart budget is counted over [default: 60s].
    #[arg(long, env = "BOTVISOR_RESTART_WINDOW", value_name = "DURATION", value_parser = parse_duration)]
    pub restart_window: Option<Duration>,
    /// Delay before the first restart [default: 500ms].
    #[arg(long, env = "BOTVISOR_BACKOFF_INITIAL", value_name = "DURATION", value_parser = parse_duration)]
    pub backoff_initial: Option<Duration>,
    /// Longest delay between restarts [default: 30s].
    #[arg(long, env = "BOTVISOR_BACKOFF_MAX", value_name = "DURATION", value_parser = parse_duration)]
    pub backoff_max: Option<Duration>,
    /// Growth of the delay per consecutive restart, >= 1 [default: 2.0].
    #[arg(long, env = "BOTVISOR_BACKOFF_MULTIPLIER", value_name = "FACTOR")]
    pub backoff_multiplier: Option<f64>,
    /// Proportional jitter of each delay, a fraction in [0, 1] [default: 0.2].
    #[arg(long, env = "BOTVISOR_BACKOFF_JITTER", value_name = "FRACTION")]
    pub backoff_jitter: Option<f64>,
    /// Stable uptime after which the backoff starts over [default: 60s].
    #[arg(long, env = "BOTVISOR_BACKOFF_RESET_AFTER", value_name = "DURATION", value_parser = parse_duration)]
    pub backoff_reset_after: Option<Duration>,
    /// Time a session gets to close cleanly before it is killed [default: 10s].
    #[arg(long, env = "BOTVISOR_SHUTDOWN_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub shutdown_timeout: Option<Duration>,
    /// Time a session gets to answer a call; past it the API answers 503 and the session is restarted [default: 5s].
    #[arg(long, env = "BOTVISOR_CALL_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub call_timeout: Option<Duration>,
    /// How often every session is pinged to find hung ones [default: 10s].
    #[arg(long, env = "BOTVISOR_WATCHDOG_INTERVAL", value_name = "DURATION", value_parser = parse_duration)]
    pub watchdog_interval: Option<Duration>,
    /// How long POST /api/sessions waits for the first pairing code [default: 30s].
    #[arg(long, env = "BOTVISOR_CREATE_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub create_timeout: Option<Duration>,
    /// Backups kept per session; older ones are deleted [default: 10].
    #[arg(long, env = "BOTVISOR_BACKUP_KEEP", value_name = "N")]
    pub backup_keep: Option<usize>,
    /// WhatsApp Web version the client announces, so nothing is fetched at start [default: 2.3000.1042742319].
    #[arg(long, env = "BOTVISOR_WA_VERSION", value_name = "A.B.C")]
    pub wa_version: Option<String>,
    /// WebSocket URL of the WhatsApp server [default: WhatsApp's own, wss://web.whatsapp.com/ws/chat].
    #[arg(long, env = "BOTVISOR_WA_URL", value_name = "URL")]
    pub wa_url: Option<String>,
    /// Turn off the built-in bot commands (`!ping` answers `pong` with the uptime).
    #[arg(long)]
    pub no_builtin_commands: bool,
    /// Simulated link: how long a pairing code is valid [default: 3m].
    #[arg(long, env = "BOTVISOR_SIM_CODE_TTL", value_name = "DURATION", value_parser = parse_duration)]
    pub sim_code_ttl: Option<Duration>,
    /// Simulated link: how long after the code the phone "pairs" [default: 3s].
    #[arg(long, env = "BOTVISOR_SIM_PAIR_DELAY", value_name = "DURATION", value_parser = parse_duration)]
    pub sim_pair_delay: Option<Duration>,
    /// Simulated link: network latency before the first pairing code or connect [default: 0s].
    #[arg(long, env = "BOTVISOR_SIM_CONNECT_DELAY", value_name = "DURATION", value_parser = parse_duration)]
    pub sim_connect_delay: Option<Duration>,
}

/// The WhatsApp Web version whatsapp-rust 0.7 itself uses for new devices.
pub const DEFAULT_WA_VERSION: &str = "2.3000.1042742319";

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{e} (use a human duration such as 250ms, 5s or 2m)"))
}

/// The `--config` file: the same settings, snake_case, durations as strings.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    port: Option<u16>,
    bind: Option<String>,
    data_dir: Option<PathBuf>,
    database_url: Option<String>,
    api_key: Option<String>,
    cors_origin: Option<Vec<String>>,
    link: Option<LinkKind>,
    restart_max: Option<u32>,
    restart_window: Option<String>,
    backoff_initial: Option<String>,
    backoff_max: Option<String>,
    backoff_multiplier: Option<f64>,
    backoff_jitter: Option<f64>,
    backoff_reset_after: Option<String>,
    shutdown_timeout: Option<String>,
    call_timeout: Option<String>,
    watchdog_interval: Option<String>,
    create_timeout: Option<String>,
    backup_keep: Option<usize>,
    wa_version: Option<String>,
    wa_url: Option<String>,
    builtin_commands: Option<bool>,
    sim_code_ttl: Option<String>,
    sim_pair_delay: Option<String>,
    sim_connect_delay: Option<String>,
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
    /// API key, if any.
    pub api_key: Option<String>,
    /// Allowed origins; empty means any.
    pub cors_origins: Vec<String>,
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

impl Config {
    /// Merges flags/env (already in `args`) with the file and the defaults, and checks it.
    pub fn resolve(args: &ServeArgs) -> Result<Config, String> {
        let file = match &args.config {
            Some(path) => load_file(path)?,
            None => FileConfig::default(),
        };
        let dur = |flag: Option<Duration>,
                   file_val: &Option<String>,
                   key: &str,
                   default: &str|
         -> Result<Duration, String> {
            if let Some(d) = flag {
                return Ok(d);
            }
            let text = file_val.as_deref().unwrap_or(default);
            parse_duration(text).map_err(|e| format!("invalid value '{text}' for '{key}': {e}"))
        };
        let data_dir = args
            .data_dir
            .clone()
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from("./data"));
        let database_url = args.database_url.clone().or(file.database_url);
        let database = match database_url {
            None => Database::File(data_dir.join("botvisor.db")),
            Some(url) => parse_database_url(&url)?,
        };
        let policy = RestartPolicy {
            max_restarts: args.restart_max.or(file.restart_max).unwrap_or(5),
            window: dur(
                args.restart_window,
                &file.restart_window,
                "--restart-window",
                "60s",
            )?,
            backoff_initial: dur(
                args.backoff_initial,
                &file.backoff_initial,
                "--backoff-initial",
                "500ms",
            )?,
            backoff_max: dur(args.backoff_max, &file.backoff_max, "--backoff-max", "30s")?,
            backoff_multiplier: args
                .backoff_multiplier
                .or(file.backoff_multiplier)
                .unwrap_or(2.0),
            backoff_jitter: args.backoff_jitter.or(file.backoff_jitter).unwrap_or(0.2),
            backoff_reset_after: dur(
                args.backoff_reset_after,
                &file.backoff_reset_after,
                "--backoff-reset-after",
                "60s",
            )?,
        };
        let supervisor = SupervisorConfig {
            policy,
            shutdown_timeout: dur(
                args.shutdown_timeout,
                &file.shutdown_timeout,
                "--shutdown-timeout",
                "10s",
            )?,
            call_timeout: dur(
                args.call_timeout,
                &file.call_timeout,
                "--call-timeout",
                "5s",
            )?,
            watchdog_interval: dur(
                args.watchdog_interval,
                &file.watchdog_interval,
                "--watchdog-interval",
                "10s",
            )?,
            create_timeout: dur(
                args.create_timeout,
                &file.create_timeout,
                "--create-timeout",
                "30s",
            )?,
            ..SupervisorConfig::default()
        };
        let cors_origins = if args.cors_origin.is_empty() {
            file.cors_origin.unwrap_or_default()
        } else {
            args.cors_origin.clone()
        };
        let config = Config {
            bind: args
                .bind
                .clone()
                .or(file.bind)
                .unwrap_or_else(|| "0.0.0.0".into()),
            port: args.port.or(file.port).unwrap_or(8000),
            data_dir,
            database,
            api_key: args
                .api_key
                .clone()
                .or(file.api_key)
                .filter(|k| !k.is_empty()),
            cors_origins,
            link: args.link.or(file.link).unwrap_or(LinkKind::Whatsapp),
            supervisor,
            backup_keep: args.backup_keep.or(file.backup_keep).unwrap_or(10),
            sim: SimSettings {
                code_ttl: dur(
                    args.sim_code_ttl,
                    &file.sim_code_ttl,
                    "--sim-code-ttl",
                    "3m",
                )?,
                pair_delay: dur(
                    args.sim_pair_delay,
                    &file.sim_pair_delay,
                    "--sim-pair-delay",
                    "3s",
                )?,
                connect_delay: dur(
                    args.sim_connect_delay,
                    &file.sim_connect_delay,
                    "--sim-connect-delay",
                    "0s",
                )?,
                login_delay: std::time::Duration::from_millis(20),
            },
            whatsapp: WhatsAppSettings {
                version: parse_version(
                    args.wa_version
                        .as_deref()
                        .or(file.wa_version.as_deref())
                        .unwrap_or(DEFAULT_WA_VERSION),
                )
                .map_err(|e| format!("invalid value for '--wa-version': {e}"))?,
                url: args.wa_url.clone().or(file.wa_url),
                builtin_commands: !args.no_builtin_commands
                    && file.builtin_commands.unwrap_or(true),
            },
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        let p = &self.supervisor.policy;
        let s = &self.supervisor;
        let checks: [(bool, &str); 11] = [
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
            (self.backup_keep == 0, "--backup-keep must be at least 1"),
            (
                self.sim.code_ttl.is_zero(),
                "--sim-code-ttl must be greater than 0",
            ),
            (
                self.bind.parse::<std::net::IpAddr>().is_err(),
                "--bind must be an IP address such as 0.0.0.0 or 127.0.0.1",
            ),
        ];
        match checks.iter().find(|(bad, _)| *bad) {
            Some((_, msg)) => Err(msg.to_string()),
            None => Ok(()),
        }
    }
}

fn load_file(path: &Path) -> Result<FileConfig, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read --config file {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("invalid --config file {}: {e}", path.display()))
}

/// `sqlite://PATH`, `sqlite::memory:` or a plain path; anything else is refused.
pub fn parse_database_url(url: &str) -> Result<Database, String> {
    let url = url.trim();
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
            "--database-url scheme '{scheme}' is not supported: botvisor keeps its sessions in SQLite; \
             use sqlite://PATH, sqlite::memory: or a plain file path"
        ));
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
        let err = parse_database_url("postgres://u@h/db").unwrap_err();
        assert!(err.contains("'postgres' is not supported"), "{err}");
    }

    #[test]
    fn flag_beats_file_beats_default() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("b.toml");
        std::fs::write(
            &file,
            "port = 9000\nrestart_window = \"2m\"\nrestart_max = 7\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(file),
            port: Some(9100),
            ..ServeArgs::default()
        };
        let c = Config::resolve(&args).unwrap();
        assert_eq!(c.port, 9100);
        assert_eq!(c.supervisor.policy.window, Duration::from_secs(120));
        assert_eq!(c.supervisor.policy.max_restarts, 7);
        assert_eq!(
            c.supervisor.policy.backoff_initial,
            Duration::from_millis(500)
        );
        assert_eq!(c.link, LinkKind::Whatsapp);
    }

    #[test]
    fn bad_values_name_their_flag() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("b.toml");
        std::fs::write(&file, "backoff_max = \"soon\"\n").unwrap();
        let args = ServeArgs {
            config: Some(file.clone()),
            ..ServeArgs::default()
        };
        assert!(Config::resolve(&args)
            .unwrap_err()
            .contains("--backoff-max"));
        std::fs::write(&file, "backoff_jitter = 1.5\n").unwrap();
        assert!(Config::resolve(&args)
            .unwrap_err()
            .contains("--backoff-jitter"));
        std::fs::write(&file, "no_such_key = 1\n").unwrap();
        assert!(Config::resolve(&args).unwrap_err().contains("no_such_key"));
    }

    #[test]
    fn example_config_file_parses_and_matches_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/botvisor.example.toml");
        let args = ServeArgs {
            config: Some(path),
            ..ServeArgs::default()
        };
        let from_file = Config::resolve(&args).unwrap();
        let defaults = Config::resolve(&ServeArgs::default()).unwrap();
        assert_eq!(format!("{from_file:?}"), format!("{defaults:?}"));
    }
}
