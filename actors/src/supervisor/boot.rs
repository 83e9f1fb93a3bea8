//! Start and end of the supervisor's life: resuming the sessions found in the store
//! (paced in batches), and stopping every session at shutdown.

use std::collections::HashSet;

use ractor::{ActorRef, RpcReplyPort};

use crate::error::CmdError;
use crate::record::{Desired, SessionRecord};

use super::entry::{Entry, Intent};
use super::messages::SupervisorMsg;
use super::SupervisorState;

impl SupervisorState {
    /// Takes the stored sessions and queues the ones that should run.
    pub(super) fn boot(&mut self, myself: &ActorRef<SupervisorMsg>, stored: Vec<SessionRecord>) {
        self.sessions.reserve(stored.len());
        self.boot_queue.reserve(stored.len());
        for mut rec in stored {
            rec.clear_pairing();
            let resume = rec.resumes_at_boot();
            let now = rec.state_at_boot();
            let user_id = rec.user_id.clone();
            if resume {
                self.boot_queue.push_back(user_id.clone());
            }
            let stale = rec.state != now;
            self.sessions.insert(user_id.clone(), Entry::new(rec));
            // What was stored is the state before the process died (often `online`):
            // publish what is true now (the store's view shows it from its open on).
            if stale {
                self.set_state(&user_id, now);
            }
        }
        if !self.boot_queue.is_empty() {
            tracing::info!(
                sessions = self.boot_queue.len(),
                batch = self.config.boot_batch,
                interval = ?self.config.boot_interval,
                "resuming running sessions"
            );
            self.boot_scheduled = true;
            let _ = myself.cast(SupervisorMsg::BootNext);
        }
    }

    /// Starts resumed sessions while fewer than `boot_batch` of them are still connecting,
    /// then schedules the next round. A round waits for a free slot and, when
    /// `boot_interval` is set, that long: at most `boot_batch` starts are in flight, so a
    /// large fleet flows through the link at the pace it connects, instead of every
    /// session spawned at once and waiting its turn (at 100,000 sessions that wait
    /// outlasted the watchdog and the start bound, and the restarts made the boot
    /// superlinear).
    pub(super) async fn boot_next(&mut self, myself: &ActorRef<SupervisorMsg>) {
        self.boot_scheduled = false;
        while self.boot_slot_free() && self.shutdown.is_none() {
            let Some(user_id) = self.boot_queue.pop_front() else {
                break;
            };
            let ready = self.sessions.get(&user_id).is_some_and(|e| {
                e.child.is_none()
                    && e.rec.desired == Desired::Running
                    && e.intent.is_none()
                    && e.restart_token.is_none()
            });
            if ready {
                self.booting.insert(user_id.clone());
                self.spawn_child(myself, &user_id).await;
                // A spawn that failed is a crash, not a start in flight.
                if self
                    .sessions
                    .get(&user_id)
                    .is_some_and(|e| e.child.is_none())
                {
                    self.booting.remove(&user_id);
                }
            }
        }
        self.schedule_boot(myself);
    }

    /// Schedules the next boot round if sessions wait and a slot is free (a slot freed
    /// later schedules it then).
    fn schedule_boot(&mut self, myself: &ActorRef<SupervisorMsg>) {
        if self.boot_scheduled
            || self.boot_queue.is_empty()
            || self.shutdown.is_some()
            || !self.boot_slot_free()
        {
            return;
        }
        self.boot_scheduled = true;
        if self.config.boot_interval.is_zero() {
            // No pause, but other messages (API commands) get their turn between rounds.
            let _ = myself.cast(SupervisorMsg::BootNext);
        } else {
            myself.send_after(self.config.boot_interval, || SupervisorMsg::BootNext);
        }
    }

    /// Fewer than `boot_batch` resumed sessions are connecting.
    fn boot_slot_free(&self) -> bool {
        self.booting.len() < self.config.boot_batch.max(1)
    }

    /// A child's connect returned: if it is still that incarnation, its boot slot is free.
    pub(super) fn child_started(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        user_id: &str,
        incarnation: u64,
    ) {
        let current = self.sessions.get(user_id).and_then(|e| e.child.as_ref());
        if current.is_some_and(|c| c.incarnation == incarnation) {
            self.boot_slot_freed(myself, user_id);
        }
    }

    /// A session resumed at boot has connected (or is gone): its slot goes to the next.
    pub(super) fn boot_slot_freed(&mut self, myself: &ActorRef<SupervisorMsg>, user_id: &str) {
        if self.booting.remove(user_id) {
            self.schedule_boot(myself);
        }
    }

    /// Stops every session (desired states untouched, so the next boot resumes them);
    /// creates still in flight are rolled back. `reply` is answered when all are gone.
    pub(super) fn begin_shutdown(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        reply: RpcReplyPort<()>,
    ) {
        self.shutdown.get_or_insert_with(Vec::new).push(reply);
        self.boot_queue.clear();
        let ids: Vec<String> = self.sessions.keys().cloned().collect();
        for user_id in ids {
            let Some(entry) = self.sessions.get_mut(&user_id) else {
                continue;
            };
            entry.restart_token = None;
            let creating = !entry.create_waiters.is_empty();
            match (&entry.child, &entry.intent, creating) {
                (None, None, true) => self.abort_create(&user_id, CmdError::shutting_down()),
                (Some(_), None, true) => {
                    entry.intent = Some(Intent::CreateAbort(CmdError::shutting_down()));
                    self.stop_child(myself, &user_id, false);
                }
                (Some(_), None, false) => {
                    entry.intent = Some(Intent::Shutdown);
                    self.stop_child(myself, &user_id, false);
                }
                _ => {}
            }
        }
        self.check_shutdown_done();
    }

    /// Sessions this node now owns: resumed as at boot (ids already here are skipped).
    pub(super) fn adopt(&mut self, myself: &ActorRef<SupervisorMsg>, recs: Vec<SessionRecord>) {
        if self.shutdown.is_some() {
            return;
        }
        let mut new = Vec::with_capacity(recs.len());
        for rec in recs {
            match self.sessions.get_mut(&rec.user_id) {
                // Released a moment ago (the node fenced, then registered and claimed it
                // again): resumed once its child is gone.
                Some(e) if e.released => e.readopt = Some(rec),
                Some(_) => {}
                None => {
                    self.persistence.adopted(&rec);
                    new.push(rec);
                }
            }
        }
        if !new.is_empty() {
            self.boot(myself, new);
        }
    }

    /// Sessions another node owns now: stopped, then forgotten without a write.
    pub(super) fn release(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        user_ids: Option<Vec<String>>,
    ) {
        let user_ids = user_ids.unwrap_or_else(|| self.sessions.keys().cloned().collect());
        let gone: HashSet<&str> = user_ids.iter().map(String::as_str).collect();
        self.boot_queue.retain(|u| !gone.contains(u.as_str()));
        for user_id in &user_ids {
            let Some(entry) = self.sessions.get_mut(user_id) else {
                continue;
            };
            entry.restart_token = None;
            entry.released = true;
            if entry.child.is_some() {
                self.stop_child(myself, user_id, false);
            } else {
                self.forget_released(myself, user_id);
            }
        }
        self.check_shutdown_done();
    }

    /// Forgets a released session here (its record stays the new owner's), or resumes
    /// it when it was claimed again meanwhile.
    pub(super) fn forget_released(&mut self, myself: &ActorRef<SupervisorMsg>, user_id: &str) {
        let mut readopt = None;
        if let Some(mut entry) = self.sessions.remove(user_id) {
            entry.answer_creators(Err(CmdError::Unavailable(format!(
                "Session {user_id} moved to another node; try again"
            ))));
            readopt = entry.readopt.take();
        }
        self.booting.remove(user_id);
        self.persistence.release(user_id);
        for (waiting, _) in &mut self.handoffs {
            waiting.remove(user_id);
        }
        self.check_handoffs();
        if let Some(rec) = readopt {
            self.adopt(myself, vec![rec]);
        }
    }

    /// Answers the planned handoffs whose sessions have all stopped (ids that were not
    /// here count as stopped).
    pub(super) fn check_handoffs(&mut self) {
        let sessions = &self.sessions;
        for (waiting, _) in &mut self.handoffs {
            waiting.retain(|id| sessions.contains_key(id));
        }
        let (done, pending): (Vec<_>, Vec<_>) = std::mem::take(&mut self.handoffs)
            .into_iter()
            .partition(|(waiting, _)| waiting.is_empty());
        self.handoffs = pending;
        for (_, reply) in done {
            let _ = reply.send(());
        }
    }

    pub(super) fn check_shutdown_done(&mut self) {
        if self.children.is_empty() {
            if let Some(waiters) = self.shutdown.as_mut() {
                for w in waiters.drain(..) {
                    let _ = w.send(());
                }
            }
        }
    }
}
