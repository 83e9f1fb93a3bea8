//! `botvisor migrate --from URL --to URL`: copies a whole fleet's rows (sessions, their
//! events, settings, the webhook outbox with its dead letters, per-session receivers)
//! from one database to another, either engine to either engine.
//!
//! - Both databases are taken first: a botvisor serving either one (its data-dir lock for
//!   SQLite, the owner lock for PostgreSQL) makes the command refuse, so nothing is copied
//!   from or into a database that is changing.
//! - A target that already has rows is refused unless `--force` (rows of the same key are
//!   then replaced by the source's), or unless it is the unfinished copy of this same
//!   source: the target remembers `migrate.source` and `migrate.state` in its settings,
//!   so a copy killed half-way is resumed by running the same command again.
//! - Each table is copied in key order, in batches of one transaction each, every row
//!   written as an upsert: running it again gives the same rows (idempotent).
//! - At the end every table's count is compared, and the sessions and a sample of the
//!   other tables are compared row by row; any difference fails the command.
//! - The WhatsApp keys ([`keys`]): key files (`--keys files`, the default) stay in the
//!   data dir unless `--keys database` copies them into a PostgreSQL target; keys kept in
//!   a PostgreSQL source are copied where `--keys` says (its rows, or key files in
//!   `--data-dir`), each session checked row by row.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::config::parse_database_url;
use crate::db::tables::{Kind, Row, Table, Value, TABLES};
use crate::db::{self, Engine};
use crate::store::{open_database, redact_password, Database, OpenError};

mod keys;

/// Rows of each table compared one by one at the end (besides every session).
const SAMPLE: usize = 500;
/// Settings of the copy itself, kept in the target (never copied from the source).
const MARK_SOURCE: &str = "migrate.source";
const MARK_STATE: &str = "migrate.state";

/// What to copy where: the flags of `botvisor migrate`.
pub use crate::config::MigrateArgs as Options;

/// One table's rows after the copy.
#[derive(Debug, Clone, PartialEq)]
pub struct Copied {
    pub table: &'static str,
    pub source: i64,
    pub target: i64,
}

/// What a finished copy did.
#[derive(Debug)]
pub struct Report {
    /// Whether an unfinished copy of the same source was resumed.
    pub resumed: bool,
    pub tables: Vec<Copied>,
    /// Sessions whose WhatsApp keys were copied, and their rows.
    pub keys: (usize, usize),
}

/// One side of the copy: the database taken, and a handle on it.
struct Side {
    name: String,
    database: Database,
    engine: Box<dyn Engine>,
    location: db::Location,
    /// The directory taken for an SQLite file, and its lock.
    taken: Option<(PathBuf, crate::paths::DataDirLock)>,
}

fn open_side(url: &str, role: &str, must_exist: bool) -> Result<Side, String> {
    let database = parse_database_url(url).map_err(|e| format!("--{role}: {e}"))?;
    let name = match &database {
        Database::Memory => return Err(format!("--{role}: an in-memory database holds no fleet")),
        Database::Postgres { url, .. } => redact_password(url),
        Database::File(path) => path.display().to_string(),
    };
    let taken = match &database {
        Database::File(path) => Some(take_file(path, role, must_exist)?),
        _ => None,
    };
    let location = open_database(&database).map_err(|e| match e {
        OpenError::Taken(_) => format!(
            "--{role} {name}: a botvisor is serving this database; stop it first (a copy of a \
             database in use would miss what it writes meanwhile)"
        ),
        other => format!("--{role} {name}: {other}"),
    })?;
    let engine = location
        .connect()
        .map_err(|e| format!("--{role} {name}: {e}"))?;
    Ok(Side {
        name,
        database,
        engine,
        location,
        taken,
    })
}

/// Takes the directory of an SQLite file the way a server takes its data dir.
fn take_file(
    path: &Path,
    role: &str,
    must_exist: bool,
) -> Result<(PathBuf, crate::paths::DataDirLock), String> {
    if must_exist && !path.is_file() {
        return Err(format!(
            "--{role}: there is no database at {}",
            path.display()
        ));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    crate::paths::create_private_dir(&dir)
        .map_err(|e| format!("--{role}: cannot create {}: {e}", dir.display()))?;
    let lock = crate::paths::lock_data_dir(&dir).map_err(|e| format!("--{role}: {e}"))?;
    Ok((dir, lock))
}

/// Takes `--data-dir` when the keys copy reads or writes it, unless a side's SQLite file
/// already took it.
fn take_data_dir(
    dir: &Path,
    sides: [&Side; 2],
) -> Result<Option<crate::paths::DataDirLock>, String> {
    crate::paths::create_private_dir(dir)
        .map_err(|e| format!("--data-dir: cannot create {}: {e}", dir.display()))?;
    let same = |taken: &Path| matches!((taken.canonicalize(), dir.canonicalize()), (Ok(a), Ok(b)) if a == b);
    if sides
        .iter()
        .any(|s| s.taken.as_ref().is_some_and(|(d, _)| same(d)))
    {
        return Ok(None);
    }
    crate::paths::lock_data_dir(dir)
        .map(Some)
        .map_err(|e| format!("--data-dir: {e}"))
}

/// Copies everything from `opts.from` to `opts.to`, telling `out` what it does.
pub fn run(opts: &Options, out: &mut dyn Write) -> Result<Report, String> {
    if opts.from.trim() == opts.to.trim() {
        return Err("--from and --to are the same database".into());
    }
    let mut from = open_side(&opts.from, "from", true)?;
    let mut to = open_side(&opts.to, "to", false)?;
    if same_file(&opts.from, &opts.to) {
        return Err("--from and --to are the same database".into());
    }
    let (keys, _data_dir) = plan_keys(opts, &from, &to)?;
    let resumed = check_target(&mut from, &mut to, opts.force)?;
    let sessions = session_ids(&mut from)?;
    keys.check_files(&sessions, opts.force || resumed)?;
    let say = |out: &mut dyn Write, text: String| {
        let _ = writeln!(out, "{text}");
    };
    say(
        out,
        format!(
            "{} {} -> {}",
            if resumed {
                "resuming the copy"
            } else {
                "copying"
            },
            from.name,
            to.name
        ),
    );
    let set = |to: &mut Side, key: &str, value: &str| {
        to.engine
            .set_setting(key, value)
            .map_err(|e| format!("{}: {e}", to.name))
    };
    set(&mut to, MARK_SOURCE, &from.name)?;
    set(&mut to, MARK_STATE, "copying")?;
    for table in TABLES {
        let rows = copy_table(&mut from, &mut to, table, opts.batch.max(1))?;
        say(out, format!("  {:<17} {rows} rows", table.name));
    }
    let copied_keys = keys.run(&sessions)?;
    if !matches!(keys.to, keys::Target::Stay) {
        say(
            out,
            format!(
                "  {:<17} {} sessions, {} rows, each checked against its source",
                "whatsapp keys", copied_keys.0, copied_keys.1
            ),
        );
    }
    let tables = verify(&mut from, &mut to, opts.force)?;
    set(&mut to, MARK_STATE, "done")?;
    say(out, finished(opts, &to.name, &keys.to));
    Ok(Report {
        resumed,
        tables,
        keys: copied_keys,
    })
}

/// Where the WhatsApp keys come from and go, and `--data-dir` taken if that copy uses it.
fn plan_keys(
    opts: &Options,
    from: &Side,
    to: &Side,
) -> Result<(keys::Plan, Option<crate::paths::DataDirLock>), String> {
    let key_sessions = match &from.location {
        db::Location::Postgres(rows) => rows
            .key_sessions()
            .map_err(|e| format!("--from {}: {e}", from.name))?,
        _ => 0,
    };
    let plan = keys::plan(
        opts.keys,
        &from.database,
        key_sessions,
        &to.database,
        &opts.data_dir,
    )?;
    let lock = match plan.uses_data_dir() {
        true => take_data_dir(&opts.data_dir, [from, to])?,
        false => None,
    };
    Ok((plan, lock))
}

/// The last line: what was verified and how to start the server on the target.
fn finished(opts: &Options, target: &str, keys: &keys::Target) -> String {
    format!(
        "verified: every table's count{}, every row of the tables keyed by session and the \
         first {SAMPLE} events and outbox rows. Start botvisor with --database-url {target} {}",
        if opts.force {
            " (at least the source's)"
        } else {
            " matches"
        },
        match keys {
            keys::Target::Stay =>
                "and the same --data-dir (the WhatsApp key files and backups stay there).".into(),
            keys::Target::Database(_) =>
                "--keys database and the same --data-dir (backups stay there).".into(),
            keys::Target::Files => format!(
                "and --data-dir {} (the WhatsApp keys are files there now).",
                opts.data_dir.display()
            ),
        }
    )
}

/// Two SQLite URLs naming one file.
fn same_file(a: &str, b: &str) -> bool {
    match (parse_database_url(a), parse_database_url(b)) {
        (Ok(Database::File(a)), Ok(Database::File(b))) => {
            matches!((a.canonicalize(), b.canonicalize()), (Ok(a), Ok(b)) if a == b)
        }
        _ => false,
    }
}

/// The ids of the source's sessions.
fn session_ids(from: &mut Side) -> Result<Vec<String>, String> {
    let sessions = TABLES
        .iter()
        .find(|t| t.name == "sessions")
        .expect("the sessions table is described");
    Ok(all_rows(from, sessions, usize::MAX)?
        .iter()
        .filter_map(|r| r.first().and_then(Value::as_text).map(str::to_string))
        .collect())
}

/// Refuses a target with rows of its own (unless `force`); true when it is an unfinished
/// copy of this same source.
fn check_target(from: &mut Side, to: &mut Side, force: bool) -> Result<bool, String> {
    let fail = |side: &Side, e: botvisor_actors::StorageError| format!("{}: {e}", side.name);
    let source = to.engine.setting(MARK_SOURCE).map_err(|e| fail(to, e))?;
    let state = to.engine.setting(MARK_STATE).map_err(|e| fail(to, e))?;
    let resuming =
        source.as_deref() == Some(from.name.as_str()) && state.as_deref() == Some("copying");
    let mut rows = 0;
    for table in TABLES.iter().filter(|t| t.name != "settings") {
        rows += to.engine.count(table).map_err(|e| fail(to, e))?;
    }
    if rows > 0 && !resuming && !force {
        return Err(format!(
            "--to {} already has {rows} row(s) of sessions, events, webhooks or receivers; \
             give an empty database, or --force to copy over them (rows of the same key are \
             replaced by the source's)",
            to.name
        ));
    }
    Ok(resuming)
}

/// The key of a row (its first column).
fn key_of(row: &Row) -> Option<Value> {
    row.first().cloned()
}

fn is_mark(table: &Table, row: &Row) -> bool {
    table.name == "settings"
        && row
            .first()
            .and_then(Value::as_text)
            .is_some_and(|k| k.starts_with("migrate."))
}

fn copy_table(from: &mut Side, to: &mut Side, table: &Table, batch: usize) -> Result<u64, String> {
    let mut after: Option<Value> = None;
    let mut copied = 0u64;
    loop {
        let mut rows = from
            .engine
            .export(table, after.as_ref(), batch)
            .map_err(|e| format!("reading {} from {}: {e}", table.name, from.name))?;
        let Some(last) = rows.last().and_then(key_of) else {
            return Ok(copied);
        };
        rows.retain(|r| !is_mark(table, r));
        to.engine
            .import(table, &rows)
            .map_err(|e| format!("writing {} to {}: {e}", table.name, to.name))?;
        copied += rows.len() as u64;
        after = Some(last);
    }
}

/// Every row of `table` on one side, without the copy's own settings, in Rust's order
/// (the engines order text differently).
fn all_rows(side: &mut Side, table: &Table, limit: usize) -> Result<BTreeSet<Row>, String> {
    let rows = side
        .engine
        .export(table, None, limit)
        .map_err(|e| format!("reading {} from {}: {e}", table.name, side.name))?;
    Ok(rows.into_iter().filter(|r| !is_mark(table, r)).collect())
}

fn verify(from: &mut Side, to: &mut Side, force: bool) -> Result<Vec<Copied>, String> {
    let mut report = Vec::new();
    for table in TABLES {
        let count = |side: &mut Side| {
            side.engine
                .count(table)
                .map_err(|e| format!("counting {} in {}: {e}", table.name, side.name))
        };
        let marks = |side: &mut Side| -> Result<i64, String> {
            Ok(all_rows(side, table, usize::MAX)?.len() as i64)
        };
        let (source, target) = if table.name == "settings" {
            (marks(from)?, marks(to)?)
        } else {
            (count(from)?, count(to)?)
        };
        if target < source || (!force && target != source) {
            return Err(format!(
                "verification failed: {} has {source} rows in the source and {target} in the \
                 target",
                table.name
            ));
        }
        // Tables keyed by text (one row per session at most) row by row; the first rows of
        // the numbered ones (events, outbox), whose order both engines share. Over a
        // target that had rows of its own (`force`), those are checked by count only.
        let numbered = table.columns[0].1 != Kind::Text;
        if numbered && force {
            report.push(Copied {
                table: table.name,
                source,
                target,
            });
            continue;
        }
        let limit = if numbered { SAMPLE } else { usize::MAX };
        let sample = all_rows(from, table, limit)?;
        let there = all_rows(to, table, limit)?;
        if let Some(missing) = sample.iter().find(|r| !there.contains(*r)) {
            return Err(format!(
                "verification failed: a row of {} differs in the target (key {:?})",
                table.name,
                missing.first()
            ));
        }
        report.push(Copied {
            table: table.name,
            source,
            target,
        });
    }
    Ok(report)
}
