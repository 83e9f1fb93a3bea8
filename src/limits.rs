//! Open-file limits. Each session holds a few descriptors (its credential store's
//! `.db`, `-wal`, `-shm`, and a socket once connected); running out makes SQLite fail with
//! a vague "unable to open database file", so botvisor raises the limit at start and
//! refuses new sessions clearly before it runs out.

/// Descriptors kept free for HTTP connections and the sessions already running.
pub const RESERVE: u64 = 32;

fn soft_limit() -> Option<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0).then_some(lim)
}

/// Lifts the soft open-files limit to the hard one; returns the limit now in force.
pub fn raise_open_files_limit() -> Option<u64> {
    let mut lim = soft_limit()?;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit only reads the struct we pass.
        let _ = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
    soft_limit().map(|l| l.rlim_cur)
}

/// (descriptors in use, soft limit), where the platform tells.
pub fn open_files() -> Option<(u64, u64)> {
    let used = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    Some((used, soft_limit()?.rlim_cur))
}

/// Too few descriptors are left for another session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "Too many open files: {used} of {limit} in use or held for running sessions; raise the open-files limit \
     (ulimit -n, or LimitNOFILE= in systemd) before adding sessions"
)]
pub struct OutOfFiles {
    /// Descriptors in use, or held for the sessions already running if more.
    pub used: u64,
    /// The soft limit.
    pub limit: u64,
}

/// `Err` with a clear message when too few descriptors are left for another session.
/// `reserved`: what the sessions already admitted may hold at once, counted as in use
/// when more than what is open now (a key store closed while its session is idle
/// reopens its files on the next message, and must find them).
pub fn check_headroom(reserved: u64) -> Result<(), OutOfFiles> {
    match open_files() {
        Some((used, limit)) if used.max(reserved) + RESERVE > limit => Err(OutOfFiles {
            used: used.max(reserved),
            limit,
        }),
        _ => Ok(()),
    }
}

/// SQLite says only "unable to open database file" when the process is out of file
/// descriptors: say so. (errno is no use here: the open may run on another thread.)
pub fn open_error_hint(text: String) -> String {
    if text.contains("unable to open database file") {
        if let Some((used, limit)) = open_files() {
            if used + 8 >= limit {
                return format!(
                    "too many open files ({used} of {limit} in use; raise the open-files limit, ulimit -n)"
                );
            }
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_held_for_running_sessions_count_as_in_use() {
        let Some((used, limit)) = open_files() else {
            return;
        };
        assert!(used + RESERVE <= limit, "the test process has room");
        assert_eq!(check_headroom(0), Ok(()));
        assert_eq!(check_headroom(used), Ok(()), "no more than is open");
        // Sessions whose stores closed their files while idle still hold their share.
        let held = limit - RESERVE + 1;
        assert_eq!(check_headroom(held), Err(OutOfFiles { used: held, limit }));
    }
}
