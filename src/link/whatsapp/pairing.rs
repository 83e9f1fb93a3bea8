//! The pairing manager: a live pairing code while the session is unpaired.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use whatsapp_rust::pair_code::{PairCodeOptions, PairCodeRejection};
use whatsapp_rust::prelude::*;

use botvisor_actors::{now_ms, LinkEvent, PairingCode};

use super::events::{format_code, Shared};
use super::{CODE_VALIDITY, REFRESH_MARGIN, SOCKET_WAIT, THROTTLE_RETRY};

/// Keeps a live pairing code while the session is unpaired.
pub(super) async fn pairing_manager(
    client: Arc<Client>,
    shared: Arc<Shared>,
    phone_number: String,
) {
    let done = || shared.paired.load(Ordering::SeqCst) || shared.closing.load(Ordering::SeqCst);
    loop {
        if done() {
            return;
        }
        if client.wait_for_socket(SOCKET_WAIT).await.is_err() {
            continue; // the client keeps reconnecting by itself
        }
        if done() || client.is_logged_in() {
            return;
        }
        client.cancel_pair_code().await;
        let options = PairCodeOptions {
            phone_number: phone_number.clone(),
            // Shown on the phone as "Chrome (Linux)"; WhatsApp rejects unknown OS names.
            display_os: Some("Linux".into()),
            ..Default::default()
        };
        let wait = match client.pair_with_code(options).await {
            Ok(code) => {
                crate::session_heap::outside(|| {
                    shared.events.emit(LinkEvent::PairingCode(PairingCode {
                        code: format_code(&code),
                        expires_at_ms: now_ms() + CODE_VALIDITY.as_millis() as u64,
                    }))
                });
                CODE_VALIDITY.saturating_sub(REFRESH_MARGIN)
            }
            Err(e) => {
                let throttled = e.rejection().is_some_and(PairCodeRejection::is_throttled);
                let retry = e.backoff().unwrap_or(if throttled {
                    THROTTLE_RETRY
                } else {
                    Duration::from_secs(5)
                });
                if let Some(rejection) = e.rejection() {
                    let (message, throttled) = crate::session_heap::outside(|| {
                        let message = if throttled {
                            format!(
                            "WhatsApp is rate-limiting pairing codes for this number ({}); retry in {} s",
                            rejection.text().unwrap_or("throttled"),
                            retry.as_secs()
                        )
                        } else {
                            format!(
                                "WhatsApp refused to issue a pairing code: {}",
                                rejection.text().unwrap_or("refused")
                            )
                        };
                        (message, throttled)
                    });
                    shared
                        .events
                        .emit(LinkEvent::PairingRejected { message, throttled });
                } else {
                    tracing::warn!(user_id = %shared.user_id, error = %e, "pairing code request failed");
                }
                retry
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shared.refresh.notified() => {}
        }
    }
}

/// Whether a connect error will not heal in seconds (no such host, nothing listening):
/// a create waiting for its first pairing code fails at once instead of timing out.
pub(super) fn is_lasting(error: &str) -> bool {
    let e = error.to_ascii_lowercase();
    [
        "dns",
        "lookup",
        "name or service not known",
        "no such host",
        "connection refused",
        "network is unreachable",
    ]
    .iter()
    .any(|needle| e.contains(needle))
}
