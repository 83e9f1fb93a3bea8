//! # botvisor
//!
//! Runs many WhatsApp bot sessions, one per user, under a supervisor, behind the LD7
//! multi-user HTTP API.
//!
//! # Layout
//! - `main.rs`: the `botvisor` binary (parses flags, calls [`run`], [`migrate::run`] or
//!   [`health_check`]).
//! - [`migrate`]: `botvisor migrate`, a whole fleet's rows (and, with `--keys`, its
//!   WhatsApp keys) copied between databases of either engine.
//! - [`config`]: flags, environment and TOML file merged into a `Config`.
//! - [`http`]: the hyper front end (routes, auth, CORS, errors, dashboard; forwarding
//!   to a session's node).
//! - [`nodes`]: this process as one node of several on one PostgreSQL (lease, claims,
//!   fencing, drain; the statements and the fence gate are in [`db::nodes`]).
//! - [`link`]: the networks sessions connect through (`whatsapp`, the real one; `sim`).
//! - [`keys`]: WhatsApp keys in PostgreSQL (`PgKeys`, a whatsapp-rust storage backend;
//!   `keys::copy`, one session's keys moved whole to or from a key file; the received
//!   messages' pending-inbound rows of every session group-committed;
//!   the real link's `--keys database`).
//! - [`store`]: the writer thread (group commit) over a database engine, the read view
//!   with counters, and backups.
//! - [`events`]: the live event stream (SSE) the store feeds.
//! - [`webhooks`]: settings, signing, the HTTPS client and the dispatcher of the outbox.
//! - [`db`]: the rows behind one seam ([`db::Engine`]) with two engines, SQLite and
//!   PostgreSQL; the only module that touches either database's crate for them.
//! - [`metrics`]: `GET /metrics` (Prometheus text).
//! - [`qr`]: pairing QR codes as SVG or PNG.
//! - [`logging`]: the process log (text or JSON, secrets capped, repeats limited).
//! - [`limits`]: open-file limits (raised at start, checked before new sessions).
//! - [`paths`], [`timefmt`], [`tls`]: where files live under the data directory; ISO 8601
//!   times; the TLS clients' roots.
//! - [`session_heap`]: the global allocator's heap of the real link's sessions (a jemalloc
//!   arena beside glibc), so a stopped session's memory goes back to the system.
//! - The supervision core (Supervisor, SessionActor, RestartPolicy, Link trait) is the
//!   `botvisor-actors` crate in `actors/`.
//!
//! Imports point down: `migrate` → `config` → `http` → `nodes` → supervisor
//! (`botvisor-actors`) → `link` → `keys`; `store` → `webhooks` → `db` → `paths`/`limits`/`timefmt`/`session_heap`. Only
//! `lib.rs` and `config` wire the layers together (`migrate` opens databases through
//! `store` and copies rows through `db`).

pub mod config;
pub mod db;
pub mod events;
pub mod http;
pub mod keys;
pub mod limits;
pub mod link;
pub mod logging;
pub mod metrics;
pub mod migrate;
pub mod nodes;
pub mod paths;
pub mod qr;
pub mod session_heap;
pub mod store;
pub mod timefmt;
pub mod tls;
pub mod webhooks;

use std::future::Future;
use std::sync::Arc;

use ractor::Actor;
use tokio::net::TcpListener;

use botvisor_actors::{Link, Supervisor, SupervisorArgs, SupervisorMsg};

use config::{Config, LinkKind};
use store::{Store, StoreConfig};

/// The concrete link behind the `dyn Link` (the simulated network has test endpoints; the
/// WhatsApp link is told where received messages are kept once the store is open).
enum Concrete {
    Sim(Arc<link::sim::SimLink>),
    WhatsApp(Arc<link::whatsapp::WhatsAppLink>),
}

/// Builds the link the configuration asks for, and the concrete one behind it; with
/// `--keys database`, the real link's key store in PostgreSQL is opened (and migrated).
async fn make_link(
    config: &Config,
    node: Option<&Arc<db::nodes::Standing>>,
) -> Result<(Arc<dyn Link>, Concrete), RunError> {
    match config.link {
        LinkKind::Sim => {
            let sim = Arc::new(link::sim::SimLink::new(
                config.data_dir.clone(),
                config.sim.clone(),
            ));
            Ok((sim.clone(), Concrete::Sim(sim)))
        }
        LinkKind::Whatsapp => {
            let credentials = match (&config.keys, &config.database) {
                (config::KeysAt::Database, store::Database::Postgres { url, pool_size }) => {
                    let pool = db::postgres::PoolConfig {
                        pool_size: *pool_size,
                        ..Default::default()
                    };
                    let keys = keys::PgKeys::open_with(url, pool)
                        .await
                        .map_err(|e| RunError::Keys(e.to_string()))?;
                    if let Some(node) = node {
                        keys.set_node(node.clone());
                    }
                    link::credentials::Credentials::database(keys)
                }
                _ => link::credentials::Credentials::Files {
                    data_dir: config.data_dir.clone(),
                },
            };
            let wa = Arc::new(link::whatsapp::WhatsAppLink::with_credentials(
                credentials,
                config.whatsapp.clone(),
            ));
            Ok((wa.clone(), Concrete::WhatsApp(wa)))
        }
    }
}

/// Says how many sessions the open-files limit allows for this link.
fn log_capacity(link: &dyn Link) {
    let Some((used, limit)) = limits::open_files() else {
        return;
    };
    match link.files_per_session() {
        0 => tracing::info!(
            open_files_limit = limit,
            "open files: sessions on the {} link hold none while idle",
            link.name()
        ),
        per => {
            let sessions = limit.saturating_sub(used + limits::RESERVE) / u64::from(per);
            tracing::info!(
                open_files_limit = limit,
                files_per_session = per,
                sessions,
                "open files allow about {sessions} sessions; raise the limit (LimitNOFILE= in systemd, ulimit -n) for more"
            );
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The data directory cannot be created or used.
    #[error("cannot create {path}: {}", paths::io_hint(source))]
    DataDir {
        /// Which directory.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The session database cannot be opened.
    #[error("cannot open the database: {0}")]
    Database(#[from] botvisor_actors::StorageError),
    /// Another process has the data directory (or it cannot be locked).
    #[error("{0}")]
    Locked(#[from] paths::LockError),
    /// The store refused to open: the data directory belongs to another link, or another
    /// botvisor serves the (PostgreSQL) database.
    #[error("{0}")]
    Refused(store::OpenError),
    /// The WhatsApp key store in PostgreSQL (`--keys database`) cannot be opened.
    #[error("cannot open the WhatsApp key store: {0}")]
    Keys(String),
    /// The supervisor actor did not start.
    #[error("cannot start the supervisor: {0}")]
    Supervisor(String),
    /// The listening socket is unusable.
    #[error("cannot listen on {addr}: {}", listen_hint(source))]
    Listen {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Serves HTTP on a runtime of its own (as many threads as cores, like the default one),
/// until `shutdown` resolves and the drain ends. The sessions' runtime can be flooded with
/// work (a thousand restarts at once, a boot): reads must not queue behind it in the same
/// task queues; the OS scheduler shares the cores between the two. Measured with
/// `tests/storm.rs`: read p99 during a 1,000-session crash storm fell from 14x to ~10x its
/// quiet p99 (7.5 ms to ~3 ms, debug build).
async fn serve_on_own_runtime(
    listener: TcpListener,
    app: Arc<http::App>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let listen_error = |source: std::io::Error| RunError::Listen {
        addr: addr.clone(),
        source,
    };
    let std_listener = listener.into_std().map_err(listen_error)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
        )
        .thread_name("botvisor-http")
        .enable_all()
        .build()
        .map_err(listen_error)?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("botvisor-http".into())
        .spawn(move || {
            runtime.block_on(async move {
                match TcpListener::from_std(std_listener) {
                    Ok(listener) => {
                        http::serve(listener, app, async {
                            let _ = stop_rx.await;
                        })
                        .await
                    }
                    Err(e) => tracing::error!(error = %e, "cannot serve HTTP"),
                }
            });
            // In-flight handler tasks end with the runtime.
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
            let _ = done_tx.send(());
        })
        .map_err(listen_error)?;
    let mut done_rx = done_rx;
    tokio::select! {
        _ = shutdown => {
            let _ = stop_tx.send(());
            let _ = (&mut done_rx).await;
        }
        // The HTTP side ended by itself (it could not serve): stop too.
        _ = &mut done_rx => {}
    }
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    Ok(())
}

/// `botvisor health`: GET `url` (plain http) and expect a 200 within 5 s.
pub fn health_check(url: &str) -> Result<(), String> {
    use std::io::{Read, Write};
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// URLs are supported"))?;
    let (host, path) = match rest.split_once('/') {
        Some((h, p)) => (h, format!("/{p}")),
        None => (rest, "/".to_string()),
    };
    let addr = std::net::ToSocketAddrs::to_socket_addrs(host)
        .map_err(|e| format!("{host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host}: no address"))?;
    let timeout = std::time::Duration::from_secs(5);
    let mut conn =
        std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{addr}: {e}"))?;
    conn.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut head = [0u8; 64];
    let n = conn.read(&mut head).map_err(|e| e.to_string())?;
    let line = String::from_utf8_lossy(&head[..n]);
    match line.split_whitespace().nth(1) {
        Some("200") => Ok(()),
        Some(status) => Err(format!("{url} answered {status}")),
        None => Err(format!("{url}: no HTTP answer")),
    }
}

/// Tells systemd (when it started us with `NOTIFY_SOCKET`) how the service is doing; a
/// no-op otherwise.
fn notify_systemd(state: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(false, state) {
        tracing::warn!(error = %e, "could not notify systemd");
    }
}

/// Why a bind failed, with what to do for the common causes.
fn listen_hint(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => format!(
            "{e}: another process holds this port (another botvisor?); stop it, or pick another with --port / PORT"
        ),
        std::io::ErrorKind::PermissionDenied => format!(
            "{e}: ports below 1024 need root or CAP_NET_BIND_SERVICE; pick a port of 1024 or more with --port / PORT"
        ),
        std::io::ErrorKind::AddrNotAvailable => {
            format!("{e}: no interface of this machine has that address (--bind)")
        }
        _ => e.to_string(),
    }
}

/// Creates the data directory and its subdirectories and takes its lock (held while the
/// guard lives).
fn prepare_data_dir(dir: &std::path::Path) -> Result<paths::DataDirLock, RunError> {
    let create = |dir: &std::path::Path| {
        paths::create_private_dir(dir).map_err(|source| RunError::DataDir {
            path: dir.display().to_string(),
            source,
        })
    };
    create(dir)?;
    let lock = paths::lock_data_dir(dir)?;
    create(&paths::sessions_dir(dir))?;
    create(&paths::backups_dir(dir))?;
    Ok(lock)
}

/// Opens the store (off the runtime: the database's first connection may block) with
/// the metrics and webhooks wired in; the store and the sessions to boot.
/// Several nodes: when another node changes the API keys, a session's proxy or its own
/// webhook receiver (the database notifies [`db::CONFIG_CHANNEL`]; and each time the
/// listening connection is opened, in case a notice was missed), this node reads them
/// again, so a key revoked anywhere is refused here from the next request on.
fn follow_config(app: &Arc<http::App>, rows: &db::postgres::Rows) {
    let runtime = tokio::runtime::Handle::current();
    let app = Arc::downgrade(app);
    let busy = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pending = Arc::new(std::sync::atomic::AtomicBool::new(false));
    rows.listen(db::CONFIG_CHANNEL, move |_| {
        use std::sync::atomic::Ordering::AcqRel;
        let Some(app) = app.upgrade() else {
            return;
        };
        // One reload at a time; a notice that comes during one is followed by another.
        pending.store(true, std::sync::atomic::Ordering::Release);
        if busy.swap(true, AcqRel) {
            return;
        }
        let (busy, pending) = (busy.clone(), pending.clone());
        runtime.spawn(async move {
            loop {
                pending.store(false, std::sync::atomic::Ordering::Release);
                let results = [
                    app.keys.reload().await,
                    http::handlers::proxy::reload(&app.store, &app.proxies).await,
                    app.store.reload_session_webhooks().await,
                ];
                for e in results.into_iter().filter_map(Result::err) {
                    tracing::warn!(error = %e, "cannot read the fleet's configuration again");
                }
                busy.store(false, std::sync::atomic::Ordering::Release);
                if !pending.swap(false, AcqRel) || busy.swap(true, AcqRel) {
                    break;
                }
            }
        });
    });
}

/// The address the other nodes reach this one at, by default: the bound address, with
/// loopback for an unspecified one.
fn advertised(listener: &TcpListener) -> String {
    match listener.local_addr() {
        Ok(mut a) => {
            if a.ip().is_unspecified() {
                a.set_ip(if a.is_ipv4() {
                    std::net::Ipv4Addr::LOCALHOST.into()
                } else {
                    std::net::Ipv6Addr::LOCALHOST.into()
                });
            }
            format!("http://{a}")
        }
        Err(_) => "http://127.0.0.1".into(),
    }
}

async fn open_store(
    config: &Config,
    link: &'static str,
    metrics: &metrics::Metrics,
    node: Option<Arc<db::nodes::Standing>>,
) -> Result<(Arc<Store>, Vec<botvisor_actors::SessionRecord>), RunError> {
    let store_config = StoreConfig {
        database: config.database.clone(),
        data_dir: config.data_dir.clone(),
        backup_keep: config.backup_keep,
        messages_keep: config.messages_keep,
        link,
        commit_seconds: Some(metrics.store_commit_seconds.clone()),
        recovery_seconds: Some(metrics.recovery_seconds.clone()),
        webhooks: config
            .webhooks
            .clone()
            .map(|w| webhooks::Webhooks::new(w, metrics.webhooks.clone())),
        messages: Some(metrics.messages.clone()),
        node: node.clone(),
    };
    let open = tokio::task::spawn_blocking(move || Store::open(store_config))
        .await
        .map_err(|e| botvisor_actors::StorageError::Failed(e.to_string()))?;
    let (store, boot) = open.map_err(|e| match e {
        store::OpenError::Storage(e) => RunError::Database(e),
        other => RunError::Refused(other),
    })?;
    Ok((Arc::new(store), boot))
}

/// Removes keys in PostgreSQL that belong to no session (a delete or a create killed
/// half-way; files are swept with the store's other leftovers), before anything runs.
async fn sweep_keys(
    credentials: &link::credentials::Credentials,
    boot: &[botvisor_actors::SessionRecord],
) -> Result<(), RunError> {
    let known = boot.iter().map(|r| r.user_id.as_str()).collect();
    let removed = credentials
        .sweep(&known)
        .await
        .map_err(|e| RunError::Keys(e.to_string()))?;
    if removed > 0 {
        tracing::info!(
            sessions = removed,
            "removed WhatsApp keys of sessions that no longer exist"
        );
    }
    Ok(())
}

/// Runs botvisor on `listener` until `shutdown` resolves; then stops every session
/// (desired states untouched, so the next boot resumes them) and returns.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    // Held until this function returns (and by the kernel until the process ends).
    let _data_dir = prepare_data_dir(&config.data_dir)?;
    let standing = config.node.as_ref().map(|n| {
        let advertise = n.advertise.clone().unwrap_or_else(|| advertised(&listener));
        db::nodes::Standing::new(n.id.clone(), advertise, n.lease_ttl)
    });
    let (link, concrete) = make_link(&config, standing.as_ref()).await?;
    let metrics = Arc::new(metrics::Metrics::new(link.name()));
    let (store, boot) = open_store(&config, link.name(), &metrics, standing.clone()).await?;
    let mut database_keys = None;
    let proxies = link::proxy::Proxies::new(config.proxy.clone());
    let known = boot.iter().map(|r| r.user_id.as_str()).collect();
    http::handlers::proxy::load(&store, &proxies, &known).await?;
    let sim = match concrete {
        Concrete::Sim(sim) => {
            if let (Some(_), Some(rows)) = (&standing, store.rows()) {
                sim.keep_credentials_in(rows.clone());
            }
            Some(sim)
        }
        Concrete::WhatsApp(wa) => {
            wa.connect_through(proxies.clone());
            wa.keep_inbound_in(store.clone());
            database_keys = wa.credentials().database_keys();
            // (Nodes do not sweep: another node may be creating a session right now,
            // its keys written before its row.)
            if standing.is_none() {
                sweep_keys(wa.credentials(), &boot).await?;
            }
            None
        }
    };
    tracing::info!(sessions = boot.len(), link = link.name(), "store opened");
    log_capacity(link.as_ref());
    let (sup, sup_task) = Actor::spawn(
        None,
        Supervisor,
        SupervisorArgs {
            config: config.supervisor.clone(),
            link: link.clone(),
            persistence: store.clone(),
            // A node resumes only the sessions it claims, once registered.
            boot: if standing.is_some() { Vec::new() } else { boot },
        },
    )
    .await
    .map_err(|e| RunError::Supervisor(e.to_string()))?;
    let node = match (standing, &config.node, store.rows()) {
        (Some(standing), Some(settings), Some(rows)) => {
            tracing::info!(node = %settings.id, advertise = %standing.advertise,
                "registering as a node of the fleet");
            let node = nodes::Node::new(rows.clone(), standing, settings.handoff);
            node.relay_events(store.hub().clone());
            metrics.enable_fleet();
            node.start(sup.clone())
                .await
                .map_err(RunError::Supervisor)?;
            Some(node)
        }
        _ => None,
    };
    let keys = Arc::new(http::access::Keys::load(store.clone()).await?);
    if !keys.is_empty() && !config.protect_reads {
        tracing::warn!(
            keys = keys.len(),
            "scoped API keys exist but reads are open to anyone without a key: start with --protect-reads so each key sees only its sessions"
        );
    }
    let app = Arc::new(http::App {
        sup: sup.clone(),
        store: store.clone(),
        api_key: config.api_key.clone(),
        protect_reads: config.protect_reads,
        cors: http::cors::Cors::new(config.cors_origins.clone()),
        faults: link.accepts_faults(),
        supervisor: config.supervisor.clone(),
        request_timeout: config.request_timeout,
        metrics,
        protect_metrics: config.protect_metrics,
        files_per_session: link.files_per_session(),
        database_keys,
        send_limit: http::ratelimit::SendLimit::new(config.send_rate),
        send_rate: config.send_rate,
        sim,
        outbound: http::outbound::Outbound::new(config.send_interval),
        keys,
        proxies,
        node: node.clone(),
        media: Arc::new(
            http::handlers::media::Fetcher::new(config.media.clone())
                .map_err(|e| RunError::Supervisor(format!("cannot build the media client: {e}")))?,
        ),
    });
    // The sends still queued go on from where they were.
    let queued = store.queued().await?;
    app.outbound.resume(&app, queued);
    if let (Some(_), Some(rows)) = (&node, store.rows()) {
        follow_config(&app, rows);
    }
    let local = listener.local_addr().map_err(|source| RunError::Listen {
        addr: format!("{}:{}", config.bind, config.port),
        source,
    })?;
    // One plain line on stdout that scripts and tests can wait for: the API answers now.
    println!("botvisor listening on http://{local}");
    tracing::info!(%local, link = link.name(), auth = config.api_key.is_some(), "listening");
    // Under systemd (Type=notify) the unit is "started" now, not when the process forked.
    notify_systemd(&[sd_notify::NotifyState::Ready]);
    serve_on_own_runtime(listener, app, shutdown).await?;
    notify_systemd(&[sd_notify::NotifyState::Stopping]);
    tracing::info!("shutting down: stopping every session");
    if let Some(node) = &node {
        if node.handoff {
            tracing::info!("--handoff: handing every session to the other nodes first");
            node.drain(&sup).await;
        }
        node.standing.set_draining(true);
    }
    let wait = config.supervisor.shutdown_timeout * 2;
    match ractor::call_t!(sup, SupervisorMsg::Shutdown, wait.as_millis() as u64) {
        Ok(()) => tracing::info!("all sessions stopped"),
        Err(e) => tracing::warn!(error = %e, "sessions did not all stop in time"),
    }
    if let Some(node) = &node {
        node.leave().await;
    }
    sup.stop(None);
    let _ = sup_task.await;
    store.close().await;
    Ok(())
}
