//! What the supervisor knows about a session: desired state (persisted, changed by the
//! API) apart from actual state (live, reported by the session actor).

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

/// The live state of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionState {
    /// The child actor is being spawned and its link opened.
    Starting,
    /// A pairing code is out; waiting for the phone to enter it.
    Pairing,
    /// Paired; the link is connecting.
    Connecting,
    /// Connected and usable.
    Online,
    /// The link dropped and is reconnecting by itself.
    Disconnected,
    /// The child crashed; a restart is scheduled after a backoff.
    Restarting,
    /// Not running (by a user's stop, or a replaced connection).
    Stopped,
    /// Too many restarts in the window, or a ban: waits for a user's `start`.
    Failed,
    /// The device was unlinked on the phone: credentials wiped, waits for `start` to pair afresh.
    LoggedOut,
}

impl SessionState {
    /// The wire name (`online`, `logged_out`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Starting => "starting",
            SessionState::Pairing => "pairing",
            SessionState::Connecting => "connecting",
            SessionState::Online => "online",
            SessionState::Disconnected => "disconnected",
            SessionState::Restarting => "restarting",
            SessionState::Stopped => "stopped",
            SessionState::Failed => "failed",
            SessionState::LoggedOut => "logged_out",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<SessionState> {
        Some(match s {
            "starting" => SessionState::Starting,
            "pairing" => SessionState::Pairing,
            "connecting" => SessionState::Connecting,
            "online" => SessionState::Online,
            "disconnected" => SessionState::Disconnected,
            "restarting" => SessionState::Restarting,
            "stopped" => SessionState::Stopped,
            "failed" => SessionState::Failed,
            "logged_out" => SessionState::LoggedOut,
            _ => return None,
        })
    }

    /// True for the states in which the session has (or is about to have) a live actor.
    pub fn is_active(self) -> bool {
        !matches!(
            self,
            SessionState::Stopped | SessionState::Failed | SessionState::LoggedOut
        )
    }
}

impl fmt::Display for SessionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the user asked for; persisted, and resumed on boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Desired {
    /// Keep it running (restart after crashes, start on boot).
    Running,
    /// Leave it stopped.
    Stopped,
}

impl Desired {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Desired::Running => "running",
            Desired::Stopped => "stopped",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Desired> {
        match s {
            "running" => Some(Desired::Running),
            "stopped" => Some(Desired::Stopped),
            _ => None,
        }
    }
}

/// A pairing code the phone can enter, with its expiry.
#[derive(Clone, PartialEq, Eq)]
pub struct PairingCode {
    /// `XXXX-XXXX`.
    pub code: String,
    /// Milliseconds since the Unix epoch.
    pub expires_at_ms: u64,
}

impl fmt::Debug for PairingCode {
    // A pairing code is a secret: keep it out of debug logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PairingCode")
            .field("code", &"<redacted>")
            .field("expires_at_ms", &self.expires_at_ms)
            .finish()
    }
}

/// A QR code the phone can scan (WhatsApp > Linked Devices > Link a device), with its
/// expiry. `data` is the string to encode; it is as secret as a pairing code.
#[derive(Clone, PartialEq, Eq)]
pub struct PairingQr {
    /// The QR payload.
    pub data: String,
    /// Milliseconds since the Unix epoch.
    pub expires_at_ms: u64,
}

impl fmt::Debug for PairingQr {
    // A QR payload links a device: keep it out of debug logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PairingQr")
            .field("data", &"<redacted>")
            .field("expires_at_ms", &self.expires_at_ms)
            .finish()
    }
}

/// Everything the API shows about one session.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRecord {
    /// `[A-Za-z0-9_-]{1,64}`.
    pub user_id: String,
    /// Digits only, E.164 without `+`.
    pub phone_number: String,
    /// The account's push name once known.
    pub name: Option<String>,
    /// Live state.
    pub state: SessionState,
    /// What the user asked for.
    pub desired: Desired,
    /// Automatic restarts since the last user `start` (or create).
    pub restarts: u32,
    /// Connection drops the link recovered from by itself (lifetime count).
    pub disconnects: u32,
    /// Why the session last crashed, failed or stopped by itself.
    pub last_error: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// Milliseconds since the Unix epoch of the last change.
    pub updated_at_ms: u64,
    /// Last time the session was seen online (ms since the epoch).
    pub last_seen_at_ms: Option<u64>,
    /// The current pairing code, if one is pending. Never persisted.
    pub pairing: Option<PairingCode>,
    /// The current pairing QR code, if one is pending. Never persisted.
    pub qr: Option<PairingQr>,
    /// Who made the latest change by a command: an API key's id, `admin` for the
    /// configured key (`None`: the session changed by itself, or no key is configured).
    /// Carried by `session.state` events as `by`; never persisted.
    pub by: Option<std::sync::Arc<str>>,
}

impl SessionRecord {
    /// Makes this record equal to `other`, reusing its own strings' buffers (a derived
    /// `clone_from` would allocate every string anew). Records that live as long as their
    /// session (the read view's) are updated on every state change: each update's fresh
    /// small allocations would land among the session's memory and keep its freed pages
    /// resident after a stop.
    pub fn assign(&mut self, other: &SessionRecord) {
        self.user_id.clone_from(&other.user_id);
        self.phone_number.clone_from(&other.phone_number);
        self.name.clone_from(&other.name);
        self.state = other.state;
        self.desired = other.desired;
        self.restarts = other.restarts;
        self.disconnects = other.disconnects;
        self.last_error.clone_from(&other.last_error);
        self.created_at_ms = other.created_at_ms;
        self.updated_at_ms = other.updated_at_ms;
        self.last_seen_at_ms = other.last_seen_at_ms;
        self.pairing.clone_from(&other.pairing);
        self.qr.clone_from(&other.qr);
        self.by.clone_from(&other.by);
    }

    /// A new session, as created by the API: desired running, starting.
    pub fn new(user_id: String, phone_number: String) -> SessionRecord {
        let now = now_ms();
        SessionRecord {
            user_id,
            phone_number,
            name: None,
            state: SessionState::Starting,
            desired: Desired::Running,
            restarts: 0,
            disconnects: 0,
            last_error: None,
            created_at_ms: now,
            updated_at_ms: now,
            last_seen_at_ms: None,
            pairing: None,
            qr: None,
            by: None,
        }
    }

    /// Forgets the pending pairing code and QR code (they end with the pairing state).
    pub fn clear_pairing(&mut self) {
        self.pairing = None;
        self.qr = None;
    }

    /// Whether a boot resumes this stored session (it should run and has not ended).
    pub fn resumes_at_boot(&self) -> bool {
        self.desired == Desired::Running
            && !matches!(self.state, SessionState::Failed | SessionState::LoggedOut)
    }

    /// The state that is true of this stored session once the process starts again: what
    /// was stored is its state before the process died (often `online`).
    pub fn state_at_boot(&self) -> SessionState {
        if self.resumes_at_boot() {
            SessionState::Starting
        } else if self.desired == Desired::Stopped {
            SessionState::Stopped
        } else {
            self.state
        }
    }
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assign_makes_an_equal_record_in_the_same_buffers() {
        let mut kept = SessionRecord::new("user-1".into(), "15550001111".into());
        kept.name = Some("a name long enough".into());
        kept.last_error = Some("an error message of some length".into());
        let (id, name, error) = (
            kept.user_id.as_ptr(),
            kept.name.as_ref().unwrap().as_ptr(),
            kept.last_error.as_ref().unwrap().as_ptr(),
        );
        let mut next = kept.clone();
        next.state = SessionState::Online;
        next.name = Some("shorter".into());
        next.last_error = Some("short".into());
        next.restarts = 3;
        next.last_seen_at_ms = Some(5);
        next.pairing = Some(PairingCode {
            code: "ABCD-1234".into(),
            expires_at_ms: 9,
        });
        kept.assign(&next);
        assert_eq!(kept, next);
        assert_eq!(kept.user_id.as_ptr(), id, "no new allocation");
        assert_eq!(kept.name.as_ref().unwrap().as_ptr(), name);
        assert_eq!(kept.last_error.as_ref().unwrap().as_ptr(), error);
        next.pairing = None;
        next.last_error = None;
        kept.assign(&next);
        assert_eq!(kept, next);
    }
}
