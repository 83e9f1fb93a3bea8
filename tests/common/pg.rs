//! A real PostgreSQL for the tests: a throwaway cluster in a temporary directory, on
//! 127.0.0.1 and a free port, run as the `postgres` user (initdb refuses root), trust
//! authentication, `fsync=off`. One database per test ([`PgServer::fresh_database`]).
//!
//! [`shared`] starts one server per test process and stops it when the process exits;
//! [`PgServer::start`] starts one of a test's own (stopped, and its directory removed, on
//! `Drop`), for tests that restart or stop it. Either way, if the test process dies
//! without exiting (SIGKILL, a CI timeout), a small watcher stops the server too.
//!
//! Where PostgreSQL cannot start (no binaries, not root, no `runuser`, no `postgres`
//! user), [`server_or_skip`] prints `SKIPPED <test>: <reason>` and the test returns,
//! unless `BOTVISOR_REQUIRE_POSTGRES` is set: then the test fails.
#![allow(dead_code)]

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// Where Debian's PostgreSQL 15 puts its server binaries.
const DEBIAN_BINDIR: &str = "/usr/lib/postgresql/15/bin";

/// Appended to every reason a PostgreSQL test is skipped.
const HOW_TO_RUN: &str = "to run it: apt-get install postgresql and run the tests as root";

/// A running PostgreSQL cluster.
pub struct PgServer {
    /// The temporary directory: the cluster in `data/`, its socket and `server.log`.
    dir: PathBuf,
    bindir: PathBuf,
    port: u16,
}

/// The server shared by the tests of this process, started on first use.
pub fn shared() -> Result<&'static PgServer, String> {
    static SHARED: OnceLock<Result<PgServer, String>> = OnceLock::new();
    let server = SHARED.get_or_init(|| {
        let server = PgServer::start()?;
        // Statics are never dropped: stop it when the process exits.
        extern "C" fn stop_shared() {
            if let Some(Ok(server)) = SHARED.get() {
                server.stop_and_remove();
            }
        }
        // SAFETY: registers a plain `extern "C" fn` with no arguments, as atexit wants.
        unsafe {
            libc::atexit(stop_shared);
        }
        Ok(server)
    });
    server.as_ref().map_err(Clone::clone)
}

/// The shared server, or `None` after printing why the test is skipped (failing instead
/// when `BOTVISOR_REQUIRE_POSTGRES` is set).
pub fn server_or_skip(test: &str) -> Option<&'static PgServer> {
    match shared() {
        Ok(server) => Some(server),
        Err(reason) => {
            skip(test, &reason);
            None
        }
    }
}

/// Prints `SKIPPED <test>: <reason>; to run it: ...`, or fails the test when
/// `BOTVISOR_REQUIRE_POSTGRES` is set.
pub fn skip(test: &str, reason: &str) {
    super::skip_unless_required_by(
        test,
        &format!("{reason}; {HOW_TO_RUN}"),
        &["BOTVISOR_REQUIRE_POSTGRES"],
    );
}

fn run(what: &str, cmd: &mut Command) -> Result<Output, String> {
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(format!(
            "{what} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout).trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// The directory with `initdb`, `pg_ctl` and `postgres`: Debian's for PostgreSQL 15,
/// `pg_config --bindir`, then Debian's for any other version (the newest first).
fn find_bindir() -> Result<PathBuf, String> {
    let mut candidates = vec![PathBuf::from(DEBIAN_BINDIR)];
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        if out.status.success() {
            candidates.push(PathBuf::from(
                String::from_utf8_lossy(&out.stdout).trim().to_string(),
            ));
        }
    }
    if let Ok(versions) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut others: Vec<(u32, PathBuf)> = versions
            .filter_map(Result::ok)
            .filter_map(|e| {
                let version = e.file_name().to_str()?.parse().ok()?;
                Some((version, e.path().join("bin")))
            })
            .collect();
        others.sort_by_key(|(version, _)| std::cmp::Reverse(*version));
        candidates.extend(others.into_iter().map(|(_, dir)| dir));
    }
    candidates
        .into_iter()
        .find(|dir| {
            ["initdb", "pg_ctl", "postgres"]
                .iter()
                .all(|b| dir.join(b).is_file())
        })
        .ok_or_else(|| {
            format!(
                "no PostgreSQL server binaries (looked in {DEBIAN_BINDIR}, pg_config --bindir \
                 and /usr/lib/postgresql/*/bin)"
            )
        })
}

/// The uid and gid of the `postgres` user.
fn postgres_user() -> Result<(u32, u32), String> {
    let name = CString::new("postgres").map_err(|e| e.to_string())?;
    // SAFETY: getpwnam with a valid C string; the fields are read at once, before any
    // other call could reuse its static buffer (tests only call it from here, once).
    let entry = unsafe { libc::getpwnam(name.as_ptr()) };
    if entry.is_null() {
        return Err("there is no postgres user (initdb refuses to run as root)".into());
    }
    // SAFETY: non-null, points to the passwd record getpwnam returned.
    let (uid, gid) = unsafe { ((*entry).pw_uid, (*entry).pw_gid) };
    Ok((uid, gid))
}

fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| format!("no free port on 127.0.0.1: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}

impl PgServer {
    /// Starts a new cluster (about 1.5 s). Err says why it cannot run here.
    pub fn start() -> Result<PgServer, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(
                "not root (the harness runs PostgreSQL as the postgres user through runuser)"
                    .into(),
            );
        }
        let bindir = find_bindir()?;
        let (uid, gid) = postgres_user()?;
        if Command::new("runuser").arg("--help").output().is_err() {
            return Err("no runuser (util-linux)".into());
        }
        let dir = tempfile::Builder::new()
            .prefix("botvisor-pg-")
            .tempdir()
            .map_err(|e| format!("cannot make a temporary directory: {e}"))?
            .keep();
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
            .map_err(|e| format!("cannot chown {} to postgres: {e}", dir.display()))?;
        let mut server = PgServer {
            dir,
            bindir,
            port: 0,
        };
        // From here on, Drop cleans up whatever happens.
        server.as_postgres(
            "initdb",
            &[
                "-D",
                &server.data().to_string_lossy(),
                "-A",
                "trust",
                "--no-sync",
                "-U",
                "postgres",
                "-E",
                "UTF8",
            ],
        )?;
        // A port is free when checked, not necessarily when the server binds it: retry.
        let mut last = String::new();
        for _ in 0..5 {
            server.port = free_port()?;
            match server.pg_ctl(&["start"]) {
                Ok(()) => {
                    server.watch_for_parent_death();
                    return Ok(server);
                }
                Err(e) => last = e,
            }
        }
        Err(format!("PostgreSQL did not start: {last}"))
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The server's log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A libpq connection string for `database` on this server.
    pub fn url(&self, database: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={database}",
            self.port
        )
    }

    /// Creates a new, empty database named after `name` (made unique) and returns its
    /// connection string.
    pub fn fresh_database(&self, name: &str) -> Result<String, String> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let clean: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(40)
            .collect();
        let database = format!("{clean}_{}", NEXT.fetch_add(1, Ordering::Relaxed));
        run(
            "psql CREATE DATABASE",
            Command::new(self.bindir.join("psql"))
                .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
                .args([
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    "postgres",
                    "-d",
                    "postgres",
                ])
                .args(["-c", &format!("CREATE DATABASE \"{database}\"")]),
        )?;
        Ok(self.url(&database))
    }

    /// [`fresh_database`](Self::fresh_database) as a `postgres://` URL (what
    /// `--database-url` takes).
    pub fn fresh_database_url(&self, name: &str) -> Result<String, String> {
        let conninfo = self.fresh_database(name)?;
        let database = conninfo
            .rsplit("dbname=")
            .next()
            .ok_or("no dbname in the connection string")?;
        Ok(format!(
            "postgres://postgres@127.0.0.1:{}/{database}",
            self.port
        ))
    }

    /// Runs `sql` with psql on the database at `url` (a [`fresh_database`] answer); its
    /// output, unaligned and without headers.
    ///
    /// [`fresh_database`]: Self::fresh_database
    pub fn psql(&self, url: &str, sql: &str) -> Result<String, String> {
        let out = self.psql_with(url, sql, &[])?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// psql on `url` running `sql`, unaligned, without headers, stopping at an error,
    /// with `extra` options.
    fn psql_with(&self, url: &str, sql: &str, extra: &[&str]) -> Result<Output, String> {
        run(
            "psql",
            Command::new(self.bindir.join("psql"))
                .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
                .args(extra)
                .args(["-d", url, "-c", sql]),
        )
    }

    /// Runs a query with psql on `url`: its rows, each column as text (`None`: NULL).
    pub fn rows(&self, url: &str, sql: &str) -> Result<Vec<Vec<Option<String>>>, String> {
        const NULL: &str = "\u{1}NULL\u{1}";
        let null = format!("null={NULL}");
        let out = self.psql_with(url, sql, &["-F", "\u{1f}", "-P", &null])?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| {
                l.split('\u{1f}')
                    .map(|c| (c != NULL).then(|| c.to_string()))
                    .collect()
            })
            .collect())
    }

    /// `pg_ctl restart -m immediate`: every backend killed at once (connections break,
    /// nothing is shut down cleanly), then the server back, waiting until it answers.
    pub fn restart_immediate(&self) -> Result<(), String> {
        self.pg_ctl(&["-m", "immediate", "restart"])
    }

    /// Turns TLS on with this certificate and key (PEM files), without a restart: the
    /// files go into the data directory, owned by postgres, then `ssl = on` and a reload.
    pub fn enable_tls(&self, cert: &Path, key: &Path) -> Result<(), String> {
        let (uid, gid) = postgres_user()?;
        for (from, name) in [(cert, "server.crt"), (key, "server.key")] {
            let to = self.data().join(name);
            std::fs::copy(from, &to).map_err(|e| format!("copy {}: {e}", from.display()))?;
            std::os::unix::fs::chown(&to, Some(uid), Some(gid)).map_err(|e| e.to_string())?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| e.to_string())?;
        }
        let url = self.url("postgres");
        self.psql(&url, "ALTER SYSTEM SET ssl = on")?;
        self.psql(&url, "SELECT pg_reload_conf()")?;
        // The reload is asynchronous: wait until new connections see it.
        for _ in 0..100 {
            if self.psql(&url, "SHOW ssl")? == "on" {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Err(format!("ssl did not turn on\n{}", self.log()))
    }

    /// `pg_ctl stop -m immediate`.
    pub fn stop_immediate(&self) -> Result<(), String> {
        self.as_postgres(
            "pg_ctl",
            &[
                "-D",
                &self.data().to_string_lossy(),
                "-w",
                "-m",
                "immediate",
                "stop",
            ],
        )
        .map(drop)
    }

    /// Starts the server again after [`stop_immediate`](Self::stop_immediate), same port.
    pub fn start_again(&self) -> Result<(), String> {
        self.pg_ctl(&["start"])
    }

    /// `pg_ctl <action>` with this server's settings, waiting for it to finish.
    fn pg_ctl(&self, action: &[&str]) -> Result<(), String> {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off",
            self.port,
            self.dir.display()
        );
        let data = self.data().to_string_lossy().into_owned();
        let log = self.dir.join("server.log").to_string_lossy().into_owned();
        let mut args = vec!["-D", &data, "-w", "-t", "60", "-l", &log, "-o", &options];
        args.extend_from_slice(action);
        self.as_postgres("pg_ctl", &args)
            .map(drop)
            .map_err(|e| format!("{e}\n--- server.log ---\n{}", self.log()))
    }

    /// Runs one of the server binaries as the postgres user, in the server's directory
    /// (the postgres user cannot read the tests' working directory).
    fn as_postgres(&self, binary: &str, args: &[&str]) -> Result<Output, String> {
        run(
            binary,
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(self.bindir.join(binary))
                .args(args)
                .current_dir(&self.dir),
        )
    }

    /// Stops the server if the test process dies without running its exit handlers.
    fn watch_for_parent_death(&self) {
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
             runuser -u postgres -- '{pg_ctl}' -D '{data}' -m immediate stop >/dev/null 2>&1; \
             rm -rf '{dir}'",
            pid = std::process::id(),
            pg_ctl = self.bindir.join("pg_ctl").display(),
            data = self.data().display(),
            dir = self.dir.display(),
        );
        // Detached: its own output, so it never holds the test's pipes open.
        let _ = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    }

    fn stop_and_remove(&self) {
        if self.data().join("postmaster.pid").exists() {
            let _ = self.stop_immediate();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop_and_remove();
    }
}
