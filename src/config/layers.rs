//! The command line, the environment and the `--config` file, layered: flag > env >
//! file > default, every value checked by clap's own parsers.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::error::ErrorKind;
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, CommandFactory, FromArgMatches};

use super::{Cli, Command};

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

pub(super) fn layered(mut cmd: clap::Command, mut argv: Vec<OsString>) -> Result<Cli, clap::Error> {
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
