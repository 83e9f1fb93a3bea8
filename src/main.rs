//! The `botvisor` binary: parses flags and runs the server.

// The test-peer feature turns off WhatsApp's certificate-chain check so the client accepts
// the loopback test peer. It must never reach a release build.
#[cfg(all(feature = "test-peer", not(debug_assertions)))]
compile_error!(
    "the `test-peer` feature disables WhatsApp certificate checks: never build it in release mode"
);

// The real link's sessions allocate from a heap of their own (src/session_heap.rs); the
// rest from glibc, or from jemalloc with `--features jemalloc`.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: SessionHeapAlloc<tikv_jemallocator::Jemalloc> =
    SessionHeapAlloc(tikv_jemallocator::Jemalloc);
#[cfg(not(feature = "jemalloc"))]
#[global_allocator]
static ALLOCATOR: SessionHeapAlloc<std::alloc::System> = SessionHeapAlloc(std::alloc::System);

use botvisor::session_heap::SessionHeapAlloc;

/// The jemalloc of the sessions' heap (prefixed, beside glibc) keeps no thread caches: each
/// thread's cache took memory from jemalloc's own arenas, which nothing else uses, so a
/// purge never reached it (measured: ~19 MiB of 1,000 stopped sessions' memory stayed there).
/// The sessions' allocations bypass the caches anyway (`MALLOCX_TCACHE_NONE`).
#[cfg(not(feature = "jemalloc"))]
#[export_name = "_rjem_malloc_conf"]
pub static SESSION_HEAP_JEMALLOC_CONF: &[u8; 13] = b"tcache:false\0";

use tokio::net::TcpListener;

use botvisor::config::{Cli, Command, Config};

/// glibc gives each thread that allocates under contention its own arena, up to 8 per
/// core, and a WhatsApp session's long-lived memory ends up spread over all of them:
/// measured with the real link, two arenas cost ~60-180 KiB less RSS per online session
/// and give back more after a mass stop (BENCHMARKS.md, the real link; mimalloc was tried too
/// and held far more). Only for the real link: simulated sessions hold almost nothing,
/// and there two arenas made a 10,000-session boot 30-50 % slower (malloc contention).
/// MALLOC_ARENA_MAX, when set, still wins. Called before the runtime starts any thread.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only changes a malloc tunable; called from main before any
        // other thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

/// SQLite gives every connection a lookaside allocator for its small objects: 40 slots
/// of 1,200 bytes (48 KB), allocated and written through at open. With the real link
/// every session holds one connection to its key store, idle nearly all the time, so
/// those 48 KB were resident per session whatever it did (heaptrack: the largest single
/// allocation of a paired idle session). Without it SQLite takes small objects from
/// malloc as they come. Only for the real link, like the arenas above; called before any
/// connection is opened (SQLite refuses the change once it is initialised; then nothing
/// changes).
fn no_sqlite_lookaside() {
    use std::ffi::c_int;
    // SAFETY: a process-wide SQLite setting, called from main before any other thread
    // exists and before any connection is opened.
    let rc = unsafe {
        rusqlite::ffi::sqlite3_config(
            rusqlite::ffi::SQLITE_CONFIG_LOOKASIDE,
            0 as c_int,
            0 as c_int,
        )
    };
    if rc != rusqlite::ffi::SQLITE_OK {
        eprintln!("botvisor: SQLite kept its lookaside allocator (sqlite3_config: {rc})");
    }
}

/// Gives the real link's sessions their own heap, so that a stopped session's memory goes
/// back to the system instead of staying pinned by botvisor's records among it (issue 26;
/// BENCHMARKS.md). `BOTVISOR_SESSION_HEAP=off` keeps them in the process's heap.
fn session_heap() {
    if std::env::var_os("BOTVISOR_SESSION_HEAP").is_some_and(|v| v == "off") {
        return;
    }
    if !botvisor::session_heap::init() {
        eprintln!("botvisor: the sessions' own heap could not be set up; they share the process's");
    } else if !botvisor::session_heap::route_sqlite() {
        eprintln!("botvisor: SQLite kept its allocator; the key stores' memory is not in the sessions' heap");
    }
}

/// `RUST_BACKTRACE=1` (common on developer machines) is for panics. Errors that
/// libraries build with `anyhow` would otherwise carry a backtrace each, and an expected
/// failure (WhatsApp unreachable, logged by whatsapp-rust on every retry) became a
/// 24-frame WARN. Error backtraces stay off unless `RUST_LIB_BACKTRACE` asks for them;
/// returns whether panics get theirs. Called before any other thread exists.
fn backtraces_for_panics_only() -> bool {
    let wanted = |name: &str| std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0");
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    wanted("RUST_BACKTRACE")
}

/// Exits 0 on `Ok`, else 1 after one line on stderr, `botvisor: <what>: <why>` (the
/// one-shot commands: `migrate`, `health`).
fn exit_with<T>(result: Result<T, impl std::fmt::Display>, what: &str) -> ! {
    match result {
        Ok(_) => std::process::exit(0),
        Err(e) => {
            eprintln!("botvisor: {what}: {e}");
            std::process::exit(1);
        }
    }
}

/// Panics (a session's, caught and restarted by the supervisor) go to the log as one
/// line; the backtrace only when RUST_BACKTRACE asks for it.
fn install_panic_hook(panic_backtraces: bool) {
    std::panic::set_hook(Box::new(move |info| {
        let message = info.payload_as_str().unwrap_or("(no message)");
        let at = info.location().map(|l| l.to_string()).unwrap_or_default();
        if panic_backtraces {
            let backtrace = std::backtrace::Backtrace::force_capture();
            tracing::error!(%message, %at, %backtrace, "panic")
        } else {
            tracing::error!(%message, %at, "panic")
        }
    }));
}

fn main() {
    let cli = Cli::parse_layered();
    let args = match cli.command {
        Command::Serve(args) => args,
        Command::Migrate(options) => exit_with(
            botvisor::migrate::run(&options, &mut std::io::stdout()),
            "migrate",
        ),
        Command::Health { url } => exit_with(botvisor::health_check(&url), "unhealthy"),
    };
    let config = match Config::resolve(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("botvisor: error: {e}");
            std::process::exit(2);
        }
    };
    if config.link == botvisor::config::LinkKind::Whatsapp {
        limit_malloc_arenas();
        no_sqlite_lookaside();
        session_heap();
    }
    let panic_backtraces = backtraces_for_panics_only();
    botvisor::logging::init(config.log_format);
    install_panic_hook(panic_backtraces);
    if config.api_key.is_none() && config.protect_reads {
        tracing::warn!("--protect-reads has no effect without an API key (--api-key / API_KEY)");
    }
    if config.api_key.is_none() {
        tracing::warn!(
            "no API key is set (--api-key / API_KEY): the write endpoints are open to anyone \
             who can reach this port"
        );
    }
    match botvisor::limits::raise_open_files_limit() {
        Some(limit) => tracing::info!(open_files_limit = limit, "open-files limit"),
        None => tracing::warn!("could not read the open-files limit"),
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("botvisor: error: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(serve(config)) {
        eprintln!("botvisor: error: {e}");
        std::process::exit(1);
    }
}

async fn serve(config: Config) -> Result<(), botvisor::RunError> {
    let shutdown = shutdown_signal();
    let addr = format!("{}:{}", config.bind, config.port);
    let listener = TcpListener::bind(&addr)
        .await
        .map_err(|source| botvisor::RunError::Listen { addr, source })?;
    if cfg!(feature = "test-peer") {
        tracing::warn!("TEST BUILD (feature test-peer): WhatsApp certificate checks are OFF");
    }
    botvisor::run(config, listener, shutdown).await
}

/// SIGTERM or Ctrl-C. The handlers are installed here, before anything is served: a
/// signal that arrives right after "listening" must stop the server cleanly, not kill it
/// (a handler installed on first poll came too late for a SIGTERM sent at once).
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        let wait = |s: std::io::Result<tokio::signal::unix::Signal>| async move {
            match s {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = wait(term) => {},
            _ = wait(int) => {},
        }
        tracing::info!("signal received");
    }
}
