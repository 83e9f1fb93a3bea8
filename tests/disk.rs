//! Disk trouble on a real filesystem: a data dir on a small tmpfs that fills up mid-burst,
//! that turns read-only mid-run and at start, and a database locked by another process.
//! Needs root (to mount a tmpfs); skipped with a printed reason otherwise, failed in CI.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::Server;

/// Set by `.ci/run` when the machine can mount filesystems: these tests must run then.
const DISK: &[&str] = &["BOTVISOR_REQUIRE_DISK_TESTS"];

/// A tmpfs mounted for one test; unmounted when dropped.
struct Tmpfs {
    dir: PathBuf,
    _parent: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(test: &str, size: &str) -> Option<Tmpfs> {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("data");
        std::fs::create_dir(&dir).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&dir)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs {
                dir,
                _parent: parent,
            }),
            Ok(o) => {
                common::skip_unless_required_by(
                    test,
                    &format!(
                        "cannot mount a tmpfs (needs root): {}; to run it: run the tests as root (sudo -E cargo test ...)",
                        String::from_utf8_lossy(&o.stderr).trim()
                    ),
                    DISK,
                );
                None
            }
            Err(e) => {
                common::skip_unless_required_by(test, &format!("no mount command: {e}"), DISK);
                None
            }
        }
    }

    fn remount(&self, mode: &str) {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,{mode}")])
            .arg(&self.dir)
            .status()
            .unwrap();
        assert!(st.success(), "remount {mode}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// An ext4 filesystem in a loop file, mounted with `errors=remount-ro`, so a test can
/// make it turn read-only mid-run (as a real disk error would) with ext4's own
/// `trigger_fs_error`, while botvisor holds its files open.
struct Ext4 {
    dir: PathBuf,
    image: PathBuf,
    device: String,
    _parent: tempfile::TempDir,
}

impl Ext4 {
    fn mount(test: &str) -> Option<Ext4> {
        let parent = tempfile::tempdir().unwrap();
        let image = parent.path().join("fs.img");
        let dir = parent.path().join("data");
        std::fs::create_dir(&dir).unwrap();
        std::fs::File::create(&image)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let run = |cmd: &mut Command| -> Result<String, String> {
            match cmd.output() {
                Ok(o) if o.status.success() => {
                    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
                }
                Ok(o) => Err(String::from_utf8_lossy(&o.stderr).trim().to_string()),
                Err(e) => Err(e.to_string()),
            }
        };
        let setup = run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image))
            .and_then(|_| {
                run(Command::new("mount")
                    .args(["-o", "loop,errors=remount-ro"])
                    .arg(&image)
                    .arg(&dir))
            })
            .and_then(|_| {
                run(Command::new("findmnt")
                    .args(["-n", "-o", "SOURCE"])
                    .arg(&dir))
            });
        match setup {
            Ok(source) => {
                let device = source.rsplit('/').next().unwrap_or_default().to_string();
                let fs = Ext4 {
                    dir,
                    image,
                    device,
                    _parent: parent,
                };
                if Path::new(&fs.trigger_path()).exists() {
                    Some(fs)
                } else {
                    common::skip_unless_required_by(
                        test,
                        "this kernel has no ext4 trigger_fs_error",
                        DISK,
                    );
                    None
                }
            }
            Err(e) => {
                common::skip_unless_required_by(
                    test,
                    &format!("cannot mount an ext4 loop file (needs root and loop devices): {e}; to run it: run the tests as root (sudo -E cargo test ...)"),
                    DISK,
                );
                None
            }
        }
    }

    fn trigger_path(&self) -> String {
        format!("/sys/fs/ext4/{}/trigger_fs_error", self.device)
    }

    /// A filesystem error: ext4 turns the filesystem read-only at once.
    fn fail(&self) {
        std::fs::write(self.trigger_path(), "1").unwrap();
    }

    /// The operator's fix after a filesystem error: unmount, fsck, mount again.
    fn repair(&mut self) {
        let ok = |cmd: &mut Command| cmd.status().map(|s| s.success()).unwrap_or(false);
        assert!(ok(Command::new("umount").arg(&self.dir)), "umount");
        // e2fsck exits 1 when it fixed something.
        let fsck = Command::new("e2fsck")
            .args(["-f", "-y"])
            .arg(&self.image)
            .output()
            .unwrap();
        assert!(fsck.status.code().unwrap_or(8) < 4, "e2fsck: {fsck:?}");
        assert!(ok(Command::new("mount")
            .args(["-o", "loop,errors=remount-ro"])
            .arg(&self.image)
            .arg(&self.dir)));
        let source = Command::new("findmnt")
            .args(["-n", "-o", "SOURCE"])
            .arg(&self.dir)
            .output()
            .unwrap();
        self.device = String::from_utf8_lossy(&source.stdout)
            .trim()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string();
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Fills the filesystem of `dir` with a file until writes fail; returns it.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let filler = dir.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    while f.write_all(&chunk).is_ok() {}
    // Byte by byte for the last partial chunk.
    while f.write_all(&[0u8]).is_ok() {}
    let _ = f.sync_all();
    filler
}

/// The server's log, for failure messages.
fn log_of(s: &Server) -> String {
    std::fs::read_to_string(&s.log).unwrap_or_default()
}

#[test]
fn a_full_disk_gives_507_loses_nothing_confirmed_and_recovers_by_itself() {
    let Some(fs) = Tmpfs::mount(
        "a_full_disk_gives_507_loses_nothing_confirmed_and_recovers_by_itself",
        "8m",
    ) else {
        return;
    };
    // The log lives outside the tmpfs, or a full disk would silence it.
    let mut s = Server::start_in(&fs.dir, &["--sim-pair-delay", "50ms"]);
    let mut confirmed = Vec::new();
    for i in 0..5 {
        let id = format!("before{i}");
        assert_eq!(s.create(&id, "1234567890").status, 201);
        confirmed.push(id);
    }
    let filler = fill(&fs.dir);
    // A burst into the full disk: every answer is a 2xx or a clear 507/503, never a hang
    // or a crash; a 2xx means the session is really there.
    let mut refused = 0;
    for i in 0..40 {
        let id = format!("burst{i}");
        let t = Instant::now();
        let r = s.create(&id, "1234567890");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{id} took {:?}",
            t.elapsed()
        );
        match r.status {
            201 => confirmed.push(id),
            507 | 503 => {
                let msg = r.error(r.status);
                assert!(
                    msg.contains("disk full")
                        || msg.contains("read-only")
                        || msg.contains("nothing was created"),
                    "{msg}"
                );
                refused += 1;
            }
            other => panic!("create {id}: {other} {}\n{}", r.body, log_of(&s)),
        }
    }
    assert!(refused > 0, "the disk never filled up");
    let ready = s.get("/readyz");
    assert_eq!(ready.status, 503, "{}", ready.body);
    assert!(ready.error(503).contains("disk full"));
    assert_eq!(s.get("/healthz").status, 200, "alive, just not ready");
    // Reads still work.
    assert_eq!(s.get("/api/stats").status, 200);
    let r = s.post("/api/sessions/before0/stop", None);
    assert!(
        [200, 503, 507].contains(&r.status),
        "stop on a full disk: {} {}",
        r.status,
        r.body
    );
    let stopped = r.status == 200;
    // Space returns: the server recovers without a restart.
    std::fs::remove_file(&filler).unwrap();
    let t = Instant::now();
    loop {
        let r = s.create("after_space", "1234567890");
        if r.status == 201 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no recovery after space returned: {} {}",
            r.status,
            r.body
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    confirmed.push("after_space".into());
    assert_eq!(s.get("/readyz").status, 200, "ready again");
    // Nothing confirmed was lost, across a kill -9 too.
    s.kill9();
    let s = Server::start_in(&fs.dir, &[]);
    let list = s.get("/api/sessions").json();
    let ids: Vec<&str> = list["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["userId"].as_str().unwrap())
        .collect();
    for id in &confirmed {
        assert!(ids.contains(&id.as_str()), "{id} lost: {ids:?}");
    }
    if stopped {
        assert_eq!(s.session("before0")["desired"], "stopped");
    }
    let check: String = rusqlite::Connection::open(fs.dir.join("botvisor.db"))
        .unwrap()
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
}

#[test]
fn a_data_dir_that_turns_read_only_mid_run_gives_503_and_loses_nothing() {
    let Some(mut fs) =
        Ext4::mount("a_data_dir_that_turns_read_only_mid_run_gives_503_and_loses_nothing")
    else {
        return;
    };
    let mut s = Server::start_in(&fs.dir, &[]);
    for id in ["rw1", "rw2"] {
        assert_eq!(s.create(id, "1234567890").status, 201);
        s.wait_state(id, "online");
    }
    assert_eq!(s.post("/api/sessions/rw2/stop", None).status, 200);
    fs.fail();
    let r = s.create("ro1", "1234567890");
    assert_eq!(r.status, 503, "{}\n{}", r.body, log_of(&s));
    assert!(r.error(503).contains("read-only"));
    let stop = s.post("/api/sessions/rw1/stop", None);
    assert_eq!(stop.status, 503, "{}", stop.body);
    assert!(stop.error(503).contains("read-only"));
    // Reads still work, and show no half-created session.
    assert_eq!(s.get("/api/sessions/rw1").status, 200);
    assert_eq!(s.get("/api/sessions/ro1").status, 404);
    assert_eq!(s.get("/api/stats").status, 200);
    // The operator repairs the filesystem and starts botvisor again: what was confirmed
    // before the error is all there; what was refused left nothing.
    s.kill9();
    fs.repair();
    let s = Server::start_in(&fs.dir, &[]);
    let v = s.wait_state("rw1", "online");
    assert_eq!(v["desired"], "running", "the refused stop changed nothing");
    assert_eq!(s.session("rw2")["desired"], "stopped");
    assert_eq!(s.get("/api/sessions/ro1").status, 404);
    assert_eq!(s.create("after", "1234567890").status, 201);
}

#[test]
fn a_read_only_data_dir_at_start_is_one_clear_line() {
    let Some(fs) = Tmpfs::mount("a_read_only_data_dir_at_start_is_one_clear_line", "4m") else {
        return;
    };
    {
        let mut s = Server::start_in(&fs.dir, &[]);
        assert_eq!(s.create("kept", "1234567890").status, 201);
        assert_eq!(s.terminate(), Some(0));
    }
    fs.remount("ro");
    let line = common::refusal_line(&common::serve_once(&fs.dir));
    assert!(
        line.contains("read-only") && line.contains("--data-dir"),
        "{line}"
    );
    fs.remount("rw");
    let s = Server::start_in(&fs.dir, &[]);
    assert_eq!(s.get("/api/sessions/kept").status, 200);
}

/// An empty data dir on a read-only filesystem, and one its user may not write: the
/// refusal says what to do (remount, fix the owner, or another --data-dir), not only the
/// OS error.
#[test]
fn an_unwritable_empty_data_dir_says_what_to_do() {
    let Some(fs) = Tmpfs::mount("an_unwritable_empty_data_dir_says_what_to_do", "1m") else {
        return;
    };
    fs.remount("ro");
    let line = common::refusal_line(&common::serve_once(&fs.dir));
    assert!(
        line.contains("read-only") && line.contains("remount") && line.contains("--data-dir"),
        "{line}"
    );
    fs.remount("rw");

    // A directory owned by root, 0700, for an unprivileged user (nobody), who runs a copy
    // of the binary (the checkout's path may be closed to it).
    let dir = fs.dir.join("root-only");
    std::fs::create_dir(&dir).unwrap();
    let bin_dir = tempfile::tempdir().unwrap();
    let bin = bin_dir.path().join("botvisor");
    std::fs::copy(common::botvisor_bin(), &bin).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(bin_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = common::serve_command_via(
        &["runuser", "-u", "nobody", "--"],
        &bin,
        &dir.join("data"),
        "0",
        &[],
    )
    .output();
    let out = match out {
        Ok(o) if !String::from_utf8_lossy(&o.stderr).contains("runuser:") => o,
        other => {
            common::skip_unless_required_by(
                "an_unwritable_empty_data_dir_says_what_to_do (permissions)",
                &format!("cannot run as nobody: {other:?}"),
                DISK,
            );
            return;
        }
    };
    let line = common::refusal_line(&out);
    assert!(
        line.contains("Permission denied") && line.contains("chown") && line.contains("--data-dir"),
        "{line}"
    );
}

#[test]
fn a_database_locked_by_another_process_gives_503_then_works() {
    let s = Server::start(&[]);
    assert_eq!(s.create("l1", "1234567890").status, 201);
    let db = s.data_dir.join("botvisor.db");
    let locker = rusqlite::Connection::open(&db).unwrap();
    locker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let t = Instant::now();
    let r = s.create("l2", "1234567890");
    let took = t.elapsed();
    assert!(
        r.status == 503 || r.status == 201,
        "{} {}",
        r.status,
        r.body
    );
    if r.status == 503 {
        let msg = r.error(503);
        assert!(
            msg.contains("locked") || msg.contains("busy") || msg.contains("nothing was created"),
            "{msg}"
        );
        assert_eq!(
            s.get("/api/sessions/l2").status,
            404,
            "no half-created session"
        );
    }
    assert!(took < Duration::from_secs(40), "{took:?}");
    locker.execute_batch("ROLLBACK").unwrap();
    drop(locker);
    let t = Instant::now();
    loop {
        let r = s.create("l3", "1234567890");
        if r.status == 201 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{} {}",
            r.status,
            r.body
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(s.get("/api/sessions/l1").status, 200);
}
