//! The process log: stderr, text or JSON, filtered by `RUST_LOG`, with secrets capped
//! and third-party repeats limited.
//!
//! whatsapp-rust logs some failures at ERROR on every retry ("Failed to connect ... Will
//! retry", every few seconds per session, for as long as the network is away). botvisor
//! reports those per session in `lastError`; in the log, each such line is shown the
//! first time and then at most once a minute.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use botvisor_heap_zone::outside;
use tracing::{Event, Level, Metadata};
use tracing_log::NormalizeEvent;
use tracing_subscriber::filter::FilterExt;
use tracing_subscriber::layer::{Context, Filter, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// An error with its causes, each said once (`client error (Connect): tcp connect
/// error: Connection refused`): for a log line or an error message.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

/// whatsapp-rust logs secrets under these targets: pairing codes at info, and at debug
/// every node it sends and receives (QR refs, keys, pairing material). Each is capped at
/// the given level unless the operator names the target in `RUST_LOG` explicitly.
const SECRET_LOG_TARGETS: [(&str, &str); 4] = [
    ("Client/PairCode", "warn"),
    ("Bot/PairCode", "warn"),
    ("Client/Send", "info"),
    ("Client/Recv", "info"),
];

/// How often a repeating third-party warning or error is shown.
pub const REPEAT_INTERVAL: Duration = Duration::from_secs(60);

/// The log's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line (for log shippers).
    Json,
}

/// The log filter: `RUST_LOG` (default `info`) with the secret-bearing targets capped.
pub fn log_filter(rust_log: Option<&str>) -> String {
    let base = rust_log.filter(|s| !s.trim().is_empty()).unwrap_or("info");
    let mut filter = base.to_string();
    for (target, cap) in SECRET_LOG_TARGETS {
        if !base.contains(target) {
            filter.push_str(&format!(",{target}={cap}"));
        }
    }
    filter
}

/// Colour in the log only on a terminal, and never with `NO_COLOR` (no escape codes in
/// log files or journald).
pub fn log_colour(stderr_is_terminal: bool, no_color: bool) -> bool {
    stderr_is_terminal && !no_color
}

/// Installs the process log on stderr.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::new(log_filter(std::env::var("RUST_LOG").ok().as_deref()));
    let limited = filter.and(RepeatLimiter::new(REPEAT_INTERVAL));
    let registry = tracing_subscriber::registry();
    match format {
        LogFormat::Text => {
            let colour = log_colour(
                std::io::IsTerminal::is_terminal(&std::io::stderr()),
                std::env::var_os("NO_COLOR").is_some(),
            );
            let layer = tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(colour);
            OutsideSessions(registry.with(layer.with_filter(limited))).init();
        }
        LogFormat::Json => {
            let layer = tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .with_writer(std::io::stderr);
            OutsideSessions(registry.with(layer.with_filter(limited))).init();
        }
    }
}

/// The log's subscriber, run outside the sessions' heap (`crate::session_heap`): a span
/// opened by a WhatsApp client (whatsapp-rust's `connect` span is at info) takes a pooled
/// slot of the span registry, whose field map lives on after the span closes, for the next
/// span that takes the slot. Made in a session's heap, each pinned a slab of it after the
/// session stopped (551 of them at 1,000 stopped sessions, measured with jemalloc's stats).
pub struct OutsideSessions<S>(pub S);

impl<S: tracing::Subscriber> tracing::Subscriber for OutsideSessions<S> {
    fn on_register_dispatch(&self, subscriber: &tracing::Dispatch) {
        self.0.on_register_dispatch(subscriber)
    }
    fn register_callsite(
        &self,
        metadata: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        outside(|| self.0.register_callsite(metadata))
    }
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        self.0.enabled(metadata)
    }
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        self.0.max_level_hint()
    }
    fn new_span(&self, span: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        outside(|| self.0.new_span(span))
    }
    fn record(&self, span: &tracing::span::Id, values: &tracing::span::Record<'_>) {
        outside(|| self.0.record(span, values))
    }
    fn record_follows_from(&self, span: &tracing::span::Id, follows: &tracing::span::Id) {
        outside(|| self.0.record_follows_from(span, follows))
    }
    fn event_enabled(&self, event: &tracing::Event<'_>) -> bool {
        outside(|| self.0.event_enabled(event))
    }
    fn event(&self, event: &tracing::Event<'_>) {
        outside(|| self.0.event(event))
    }
    fn enter(&self, span: &tracing::span::Id) {
        outside(|| self.0.enter(span))
    }
    fn exit(&self, span: &tracing::span::Id) {
        outside(|| self.0.exit(span))
    }
    fn clone_span(&self, id: &tracing::span::Id) -> tracing::span::Id {
        outside(|| self.0.clone_span(id))
    }
    fn try_close(&self, id: tracing::span::Id) -> bool {
        outside(|| self.0.try_close(id))
    }
    fn current_span(&self) -> tracing_core::span::Current {
        self.0.current_span()
    }
    unsafe fn downcast_raw(&self, id: std::any::TypeId) -> Option<*const ()> {
        if id == std::any::TypeId::of::<Self>() {
            Some(self as *const Self as *const ())
        } else {
            // SAFETY: forwarded as received.
            unsafe { self.0.downcast_raw(id) }
        }
    }
}

/// Lets a warning or error from another crate through once per `interval` per place in
/// the code that logs it (botvisor's own lines always pass: each one is about a session).
pub struct RepeatLimiter {
    interval: Duration,
    /// Per call site: when it was last shown.
    seen: Mutex<HashMap<u64, Instant>>,
}

impl RepeatLimiter {
    /// A limiter showing each site at most once per `interval`.
    pub fn new(interval: Duration) -> RepeatLimiter {
        RepeatLimiter {
            interval,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Whether an event from `meta` is shown now.
    pub fn admit(&self, meta: &Metadata<'_>, now: Instant) -> bool {
        if *meta.level() > Level::WARN || meta.target().starts_with("botvisor") {
            return true;
        }
        // Log records (whatsapp-rust uses the `log` crate) share one callsite per level:
        // tell them apart by target, file and line.
        let mut h = DefaultHasher::new();
        (meta.target(), meta.file(), meta.line(), meta.name()).hash(&mut h);
        let key = h.finish();
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        match seen.get_mut(&key) {
            Some(last) if now.duration_since(*last) < self.interval => false,
            Some(last) => {
                *last = now;
                true
            }
            None => {
                seen.insert(key, now);
                true
            }
        }
    }
}

impl<S> Filter<S> for RepeatLimiter {
    fn enabled(&self, _meta: &Metadata<'_>, _cx: &Context<'_, S>) -> bool {
        true
    }

    fn event_enabled(&self, event: &Event<'_>, _cx: &Context<'_, S>) -> bool {
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        self.admit(meta, Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::EnvFilter;

    struct TestSite;
    static SITE: TestSite = TestSite;
    impl tracing::callsite::Callsite for TestSite {
        fn set_interest(&self, _: tracing::subscriber::Interest) {}
        fn metadata(&self) -> &Metadata<'_> {
            unreachable!("test metadata only")
        }
    }

    fn meta(target: &'static str, level: Level, line: u32) -> Metadata<'static> {
        Metadata::new(
            "event",
            target,
            level,
            Some("src/x.rs"),
            Some(line),
            None,
            tracing::field::FieldSet::new(&[], tracing::callsite::Identifier(&SITE)),
            tracing::metadata::Kind::EVENT,
        )
    }

    #[test]
    fn a_repeating_library_error_is_shown_once_a_minute_and_ours_always() {
        let limiter = RepeatLimiter::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let shown = |m: &Metadata<'_>, secs: u64| limiter.admit(m, t0 + Duration::from_secs(secs));
        let theirs = meta("whatsapp_rust::client::lifecycle", Level::ERROR, 587);
        assert!(shown(&theirs, 0));
        assert!(!shown(&theirs, 5));
        assert!(!shown(&theirs, 59));
        assert!(shown(&theirs, 61));
        assert!(!shown(&theirs, 62));
        // Another line of the same crate is its own site.
        assert!(shown(
            &meta("whatsapp_rust::client::lifecycle", Level::ERROR, 600),
            62
        ));
        // botvisor's own warnings, and anything at info or below, always pass.
        let ours = meta("botvisor::link::whatsapp", Level::WARN, 1);
        let info = meta("whatsapp_rust::client", Level::INFO, 1);
        for t in 0..5 {
            assert!(shown(&ours, 100 + t));
            assert!(shown(&info, 100 + t));
        }
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(log_colour(true, false));
        assert!(!log_colour(false, false));
        assert!(!log_colour(true, true));
    }

    #[test]
    fn secret_bearing_targets_are_capped() {
        let f = log_filter(None);
        assert_eq!(
            f,
            "info,Client/PairCode=warn,Bot/PairCode=warn,Client/Send=info,Client/Recv=info"
        );
        EnvFilter::try_new(&f).expect("valid filter");
        assert_eq!(
            log_filter(Some("debug,Client/PairCode=debug,Client/Recv=debug")),
            "debug,Client/PairCode=debug,Client/Recv=debug,Bot/PairCode=warn,Client/Send=info"
        );
    }
}
