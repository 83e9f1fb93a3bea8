//! What a live session reports about its connection, turned into record changes.

use crate::error::CmdError;
use crate::link::LinkEvent;
use crate::record::{now_ms, SessionState};

use super::entry::Intent;
use super::SupervisorState;

impl SupervisorState {
    pub(super) fn child_event(&mut self, user_id: &str, incarnation: u64, event: LinkEvent) {
        let Some(entry) = self.sessions.get_mut(user_id) else {
            return;
        };
        if entry.child.as_ref().map(|c| c.incarnation) != Some(incarnation)
            || entry.intent.is_some()
        {
            return;
        }
        match event {
            LinkEvent::PairingCode(code) => {
                entry.rec.pairing = Some(code);
                entry.rec.state = SessionState::Pairing;
                entry.rec.updated_at_ms = now_ms();
                // Saved (into the read view) before the creators hear of it: a client that
                // reads `GET .../pairing` right after its create must see the code.
                self.save(user_id);
                if let Some(entry) = self.sessions.get_mut(user_id) {
                    let rec = entry.rec.clone();
                    entry.answer_creators(Ok(rec));
                }
            }
            // A QR code alone neither answers a create (its reply carries the code) nor
            // moves the state: `pairing` keeps meaning "a pairing code is out".
            LinkEvent::PairingQr(qr) => {
                entry.rec.qr = Some(qr);
                self.save(user_id);
            }
            LinkEvent::Connecting => {
                // From here on the session changes by itself, not by a command.
                entry.rec.by = None;
                self.set_state(user_id, SessionState::Connecting)
            }
            LinkEvent::Online { name } => {
                entry.rec.by = None;
                if name.is_some() {
                    entry.rec.name = name;
                }
                entry.rec.last_seen_at_ms = Some(now_ms());
                self.set_state(user_id, SessionState::Online);
                if let Some(entry) = self.sessions.get_mut(user_id) {
                    let rec = entry.rec.clone();
                    entry.answer_creators(Ok(rec));
                }
            }
            LinkEvent::Disconnected { reason } => {
                entry.rec.by = None;
                entry.rec.last_error = Some(reason);
                entry.rec.disconnects = entry.rec.disconnects.saturating_add(1);
                self.set_state(user_id, SessionState::Disconnected);
            }
            LinkEvent::Trouble { message } => {
                if entry.rec.last_error.as_deref() != Some(message.as_str()) {
                    entry.rec.last_error = Some(message);
                    self.save(user_id);
                }
            }
            LinkEvent::PairingRejected { message, throttled } => {
                entry.rec.last_error = Some(message.clone());
                if entry.create_waiters.is_empty() {
                    self.save(user_id);
                    return;
                }
                let err = if throttled {
                    CmdError::Rejected(message)
                } else {
                    CmdError::Unavailable(message)
                };
                entry.intent = Some(Intent::CreateAbort(err));
                if let Some(c) = &entry.child {
                    c.actor.stop(None);
                }
            }
            LinkEvent::Message(msg) => self.persistence.inbound(user_id, &msg),
            LinkEvent::Receipt(r) => self.persistence.receipt(user_id, &r),
            // The session actor turns these into exits; they never arrive here.
            LinkEvent::Crashed { .. }
            | LinkEvent::LoggedOut { .. }
            | LinkEvent::Replaced { .. }
            | LinkEvent::Banned { .. } => {}
        }
    }
}
