//! `GET /metrics`: Prometheus text (OpenMetrics) through `prometheus-client`.
//!
//! Counters and histograms are updated where things happen (HTTP requests in the front
//! end, commits in the store's writer); gauges that describe the fleet (sessions by state,
//! restarts, descriptors) are computed when scraped, from the store's read view, so they
//! cost nothing between scrapes.

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use botvisor_actors::{SessionRecord, SessionState};

/// Labels of an HTTP request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// The route's pattern (`/api/sessions/:id`), or `unmatched`.
    pub route: String,
    /// `GET`, `POST`, ...
    pub method: String,
    /// `200`, `404`, ...
    pub status: String,
}

/// Labels of a route.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// The route's pattern.
    pub route: String,
}

/// Labels of a session state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// `online`, `failed`, ...
    pub state: String,
}

/// Labels of a received message.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `text`, `image`, ... (a fixed set: anything else is `other`).
    pub kind: String,
}

/// The kinds a received message is counted under.
pub const MESSAGE_KINDS: [&str; 12] = [
    "text", "image", "video", "audio", "document", "sticker", "location", "contact", "reaction",
    "poll", "protocol", "other",
];

/// Messages in and out (the store counts them as it records their events).
#[derive(Clone, Default, Debug)]
pub struct MessageCounts {
    received: Family<KindLabels, Counter>,
    /// Sends through the API that the link took.
    pub sent: Counter,
    /// Sends through the API that the link refused.
    pub failed: Counter,
}

impl MessageCounts {
    /// One received message of `kind`.
    pub fn received(&self, kind: &str) {
        let kind = MESSAGE_KINDS
            .iter()
            .find(|k| **k == kind)
            .copied()
            .unwrap_or("other");
        self.received
            .get_or_create(&KindLabels {
                kind: kind.to_string(),
            })
            .inc();
    }
}

/// Webhook deliveries (the dispatcher counts them).
#[derive(Clone, Default, Debug)]
pub struct WebhookCounts {
    /// Attempts answered 2xx.
    pub delivered: Counter,
    /// Attempts that failed (a later one may succeed).
    pub failed: Counter,
    /// Deliveries that became dead letters.
    pub dead: Counter,
    /// Messages refused upstream because the backlog was full (503, or left unacked).
    pub refused: Counter,
    /// Deliveries waiting (the backlog on disk, plus events queued since it was counted).
    pub backlog: Gauge,
    /// Receivers taken for down (being probed).
    pub receivers_down: Gauge,
}

/// Every metric botvisor exports.
pub struct Metrics {
    /// Messages in and out.
    pub messages: MessageCounts,
    /// Webhook deliveries.
    pub webhooks: WebhookCounts,
    registry: Mutex<Registry>,
    http_requests: Family<HttpLabels, Counter>,
    http_seconds: Family<RouteLabels, Histogram>,
    /// Seconds per store commit (the writer records into it).
    pub store_commit_seconds: Histogram,
    /// Seconds from a crash to the session being online again (the store records it).
    pub recovery_seconds: Histogram,
    supervisor_seconds: prometheus_client::metrics::gauge::Gauge<f64, std::sync::atomic::AtomicU64>,
    sessions: Family<StateLabels, Gauge>,
    restarts: Gauge,
    disconnects: Gauge,
    open_fds: Gauge,
    fd_limit: Gauge,
    session_capacity: Gauge,
    /// The whole fleet's sessions by state (several nodes on one database; registered
    /// only there, see [`Metrics::enable_fleet`]).
    fleet_sessions: Family<StateLabels, Gauge>,
    /// The nodes sharing the database, by state.
    fleet_nodes: Family<StateLabels, Gauge>,
}

/// The states `GET /api/nodes` shows a node in.
const NODE_STATES: [&str; 4] = ["live", "draining", "expired", "stopped"];

const STATES: [SessionState; 9] = [
    SessionState::Starting,
    SessionState::Pairing,
    SessionState::Connecting,
    SessionState::Online,
    SessionState::Disconnected,
    SessionState::Restarting,
    SessionState::Stopped,
    SessionState::Failed,
    SessionState::LoggedOut,
];

impl Metrics {
    /// Registers every metric.
    pub fn new(link: &'static str) -> Metrics {
        let metrics = Metrics {
            messages: MessageCounts::default(),
            webhooks: WebhookCounts::default(),
            registry: Mutex::new(Registry::with_prefix("botvisor")),
            http_requests: Family::default(),
            http_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0001, 4.0, 10))
            }),
            store_commit_seconds: Histogram::new(exponential_buckets(0.0001, 4.0, 10)),
            recovery_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 14)),
            supervisor_seconds: Default::default(),
            sessions: Family::default(),
            restarts: Gauge::default(),
            disconnects: Gauge::default(),
            open_fds: Gauge::default(),
            fd_limit: Gauge::default(),
            session_capacity: Gauge::default(),
            fleet_sessions: Family::default(),
            fleet_nodes: Family::default(),
        };
        {
            let mut registry = metrics.registry.lock().unwrap_or_else(|p| p.into_inner());
            register_counts(&mut registry, &metrics.messages, &metrics.webhooks);
            metrics.register_fleet(&mut registry);
            registry.register(
                "build",
                "The running build",
                Info::new(vec![
                    ("version", env!("CARGO_PKG_VERSION").to_string()),
                    ("link", link.to_string()),
                ]),
            );
        }
        metrics
    }

    /// Adds the fleet's gauges (`botvisor_fleet_sessions`, `botvisor_fleet_nodes`): this
    /// process is one node of several. A single server's exposition stays as it was.
    pub fn enable_fleet(&self) {
        let mut registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        registry.register(
            "fleet_sessions",
            "Sessions of the whole fleet by state, counted by the database (the same on every node: aggregate with max, not sum; botvisor_sessions is this node's)",
            self.fleet_sessions.clone(),
        );
        registry.register(
            "fleet_nodes",
            "Nodes sharing the database, by state (as GET /api/nodes shows them)",
            self.fleet_nodes.clone(),
        );
    }

    /// Sets the fleet's gauges from the database's counts: (state, sessions) and (state,
    /// nodes); a state not counted is 0.
    pub fn set_fleet(&self, sessions: &[(String, i64)], nodes: &[(String, i64)]) {
        let count = |of: &[(String, i64)], state: &str| {
            of.iter()
                .filter(|(s, _)| s == state)
                .map(|(_, n)| *n)
                .sum::<i64>()
        };
        for state in STATES.iter().map(|s| s.as_str()) {
            self.fleet_sessions
                .get_or_create(&StateLabels {
                    state: state.to_string(),
                })
                .set(count(sessions, state));
        }
        for state in NODE_STATES {
            self.fleet_nodes
                .get_or_create(&StateLabels {
                    state: state.to_string(),
                })
                .set(count(nodes, state));
        }
    }

    /// Records one answered request.
    pub fn request(&self, route: &str, method: &str, status: u16, seconds: f64) {
        // Bounded label values: a client inventing methods cannot grow the series.
        let method = match method {
            "GET" | "POST" | "PUT" | "DELETE" | "OPTIONS" | "HEAD" | "PATCH" => method,
            _ => "other",
        };
        self.http_requests
            .get_or_create(&HttpLabels {
                route: route.to_string(),
                method: method.to_string(),
                status: status.to_string(),
            })
            .inc();
        self.http_seconds
            .get_or_create(&RouteLabels {
                route: route.to_string(),
            })
            .observe(seconds);
    }

    /// The text exposition, with the fleet gauges computed from `sessions` now and the
    /// supervisor's answer time just measured (`None`: it did not answer).
    pub fn render(
        &self,
        sessions: &[SessionRecord],
        files_per_session: u32,
        supervisor: Option<f64>,
    ) -> String {
        self.supervisor_seconds
            .set(supervisor.unwrap_or(f64::INFINITY));
        let mut by_state = [0i64; STATES.len()];
        let (mut restarts, mut disconnects) = (0i64, 0i64);
        for rec in sessions {
            if let Some(i) = STATES.iter().position(|s| *s == rec.state) {
                by_state[i] += 1;
            }
            restarts += i64::from(rec.restarts);
            disconnects += i64::from(rec.disconnects);
        }
        for (state, n) in STATES.iter().zip(by_state) {
            self.sessions
                .get_or_create(&StateLabels {
                    state: state.as_str().to_string(),
                })
                .set(n);
        }
        self.restarts.set(restarts);
        self.disconnects.set(disconnects);
        if let Some((used, limit)) = crate::limits::open_files() {
            self.open_fds.set(used as i64);
            self.fd_limit.set(limit as i64);
            self.session_capacity.set(match files_per_session {
                0 => -1,
                per => {
                    (limit.saturating_sub(used + crate::limits::RESERVE) / u64::from(per)) as i64
                }
            });
        }
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

/// Registers the message and webhook counters.
fn register_counts(registry: &mut Registry, messages: &MessageCounts, webhooks: &WebhookCounts) {
    registry.register(
        "messages_received",
        "Messages received, by kind",
        messages.received.clone(),
    );
    let plain: [(&str, &str, &Counter); 6] = [
        (
            "messages_sent",
            "Messages sent through the API that the link took",
            &messages.sent,
        ),
        (
            "messages_failed",
            "Messages sent through the API that the link refused",
            &messages.failed,
        ),
        (
            "webhook_deliveries",
            "Webhook attempts answered 2xx",
            &webhooks.delivered,
        ),
        (
            "webhook_failed_attempts",
            "Webhook attempts that failed (timeout, refused, non-2xx)",
            &webhooks.failed,
        ),
        (
            "webhook_dead_letters",
            "Webhook deliveries that gave up (GET /api/webhooks/dead)",
            &webhooks.dead,
        ),
        (
            "webhook_refused_messages",
            "Messages refused upstream because the webhook backlog was full (503 with Retry-After, or left unacknowledged to WhatsApp)",
            &webhooks.refused,
        ),
    ];
    for (name, help, counter) in plain {
        registry.register(name, help, counter.clone());
    }
    registry.register(
        "webhook_backlog",
        "Webhook deliveries waiting on disk",
        webhooks.backlog.clone(),
    );
    registry.register(
        "webhook_receivers_down",
        "Webhook receivers taken for down (one probe at a time tries each)",
        webhooks.receivers_down.clone(),
    );
}

impl Metrics {
    /// Registers the HTTP, store and fleet metrics.
    fn register_fleet(&self, registry: &mut Registry) {
        registry.register(
            "http_requests",
            "HTTP requests answered, by route, method and status",
            self.http_requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time to answer an HTTP request, by route",
            self.http_seconds.clone(),
        );
        registry.register(
            "store_commit_duration_seconds",
            "Time of one group commit of the session store (fsync included)",
            self.store_commit_seconds.clone(),
        );
        registry.register(
            "crash_to_online_seconds",
            "Time from a session's crash (or drop) to it being online again",
            self.recovery_seconds.clone(),
        );
        registry.register(
            "supervisor_answer_seconds",
            "Time the supervisor took to answer at the last scrape (its mailbox backlog, in time)",
            self.supervisor_seconds.clone(),
        );
        registry.register("sessions", "Sessions by state", self.sessions.clone());
        registry.register(
            "session_restarts",
            "Automatic restarts of the current sessions since their last start, summed",
            self.restarts.clone(),
        );
        registry.register(
            "session_disconnects",
            "Connection drops the current sessions recovered from, summed",
            self.disconnects.clone(),
        );
        registry.register("open_fds", "Open file descriptors", self.open_fds.clone());
        registry.register("fd_limit", "The open-files limit", self.fd_limit.clone());
        registry.register(
            "session_capacity",
            "Sessions the open-files limit allows on this link (-1: no per-session descriptors)",
            self.session_capacity.clone(),
        );
    }
}
