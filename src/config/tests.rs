//! The configuration's tests: flags, environment and file, merged and checked.

use std::ffi::OsString;
use std::path::Path;

use clap::{Arg, CommandFactory};

use super::args::parse_duration;
use super::layers::layered;
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

#[test]
fn nodes_need_postgresql_and_the_real_link_needs_its_keys_there() {
    assert_eq!(resolve(&[]).unwrap().node, None);
    let err = resolve(&["--node-id", "n1"]).unwrap_err();
    assert!(
        err.contains("--node-id") && err.contains("postgres://"),
        "{err}"
    );
    let pg = ["--database-url", "postgres://u@h/db"];
    let err = resolve(&[&pg[..], &["--node-id", "n1", "--link", "whatsapp"]].concat()).unwrap_err();
    assert!(err.contains("--keys database"), "{err}");
    for bad in ["", "a.b", "a/b", &"x".repeat(65)] {
        let err = resolve(&[&pg[..], &["--node-id", bad]].concat()).unwrap_err();
        assert!(err.contains("not a node id"), "{bad}: {err}");
    }
    let err =
        resolve(&[&pg[..], &["--node-id", "n1", "--lease-ttl", "500ms"]].concat()).unwrap_err();
    assert!(err.contains("--lease-ttl must be at least 1s"), "{err}");
    let err = resolve(&[&pg[..], &["--node-id", "n1", "--advertise", "10.0.0.5:80"]].concat())
        .unwrap_err();
    assert!(err.contains("--advertise"), "{err}");
    let c = resolve(
        &[
            &pg[..],
            &[
                "--node-id",
                "n-1_a",
                "--link",
                "whatsapp",
                "--keys",
                "database",
                "--handoff",
            ],
        ]
        .concat(),
    )
    .unwrap();
    let node = c.node.unwrap();
    assert_eq!(
        (
            node.id.as_str(),
            node.lease_ttl,
            node.advertise,
            node.handoff
        ),
        ("n-1_a", std::time::Duration::from_secs(10), None, true)
    );
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
            && err.contains(
                "--backoff-max is set by environment variable BOTVISOR_TEST_ENV_LAYER_BACKOFF_MAX"
            ),
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
        (
            "messages_keep = \"30s\"\n",
            "--messages-keep must be at least 1m",
        ),
        ("messages_keep = \"forever\"\n", "'--messages-keep"),
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
            "advertise",
            "database_url",
            "node_id",
            "proxy",
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
