//! The in-memory view the HTTP reads are served from: reads never wait on an actor or
//! the disk. Counts by state are kept as records change, so `/api/stats` is O(1), and
//! the list order (oldest first) is kept instead of sorted per request.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::RwLock;

use dashmap::DashMap;

use botvisor_actors::{SessionRecord, SessionState};

/// Session counts, as `/api/stats` shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// All sessions.
    pub total: usize,
    /// Sessions with a live actor (any state but stopped, failed, logged out).
    pub active: usize,
    /// Sessions online.
    pub online: usize,
}

/// Records by id, their order, and counts.
#[derive(Default)]
pub struct View {
    records: DashMap<String, SessionRecord>,
    order: RwLock<BTreeSet<(u64, String)>>,
    total: AtomicUsize,
    active: AtomicUsize,
    online: AtomicUsize,
}

fn count(counter: &AtomicUsize, before: bool, after: bool) {
    match (before, after) {
        (false, true) => {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        (true, false) => {
            counter.fetch_sub(1, Ordering::Relaxed);
        }
        _ => {}
    }
}

impl View {
    /// Inserts or replaces a record; returns the state it replaced, if any.
    /// An empty view with room for `n` records (a boot fills it with every stored one).
    pub fn with_capacity(n: usize) -> View {
        View {
            records: DashMap::with_capacity(n),
            ..View::default()
        }
    }

    pub fn put(&self, rec: &SessionRecord) -> Option<SessionState> {
        // Updated in place: see `SessionRecord::assign`.
        let old = match self.records.get_mut(&rec.user_id) {
            Some(mut kept) => {
                let old = (kept.state, kept.created_at_ms);
                kept.assign(rec);
                Some(old)
            }
            None => self
                .records
                .insert(rec.user_id.clone(), rec.clone())
                .map(|old| (old.state, old.created_at_ms)),
        };
        // The order changes only when a record arrives (a state change leaves it alone).
        let moved = match old {
            None => {
                self.total.fetch_add(1, Ordering::Relaxed);
                Some(None)
            }
            Some((_, created)) if created != rec.created_at_ms => Some(Some(created)),
            Some(_) => None,
        };
        if let Some(previous) = moved {
            let mut order = self.order.write().unwrap_or_else(|p| p.into_inner());
            if let Some(created) = previous {
                order.remove(&(created, rec.user_id.clone()));
            }
            order.insert((rec.created_at_ms, rec.user_id.clone()));
        }
        let before = old.map(|(s, _)| s);
        count(
            &self.active,
            before.is_some_and(SessionState::is_active),
            rec.state.is_active(),
        );
        count(
            &self.online,
            before == Some(SessionState::Online),
            rec.state == SessionState::Online,
        );
        before
    }

    /// Forgets a record.
    pub fn remove(&self, user_id: &str) {
        let Some((_, old)) = self.records.remove(user_id) else {
            return;
        };
        self.order
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(old.created_at_ms, old.user_id));
        self.total.fetch_sub(1, Ordering::Relaxed);
        count(&self.active, old.state.is_active(), false);
        count(&self.online, old.state == SessionState::Online, false);
    }

    /// Runs `f` on one record without copying it.
    pub fn read<T>(&self, user_id: &str, f: impl FnOnce(&SessionRecord) -> T) -> Option<T> {
        self.records.get(user_id).map(|r| f(&r))
    }

    /// A copy of one record.
    pub fn get(&self, user_id: &str) -> Option<SessionRecord> {
        self.read(user_id, SessionRecord::clone)
    }

    /// All records, oldest first.
    pub fn list(&self) -> Vec<SessionRecord> {
        let order = self.order.read().unwrap_or_else(|p| p.into_inner());
        order.iter().filter_map(|(_, id)| self.get(id)).collect()
    }

    /// Counts by state.
    pub fn counts(&self) -> Counts {
        Counts {
            total: self.total.load(Ordering::Relaxed),
            active: self.active.load(Ordering::Relaxed),
            online: self.online.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, created: u64, state: SessionState) -> SessionRecord {
        let mut r = SessionRecord::new(id.into(), "15550001111".into());
        r.created_at_ms = created;
        r.state = state;
        r
    }

    #[test]
    fn counts_follow_every_change_and_the_order_is_kept() {
        let v = View::default();
        v.put(&rec("b", 2, SessionState::Starting));
        v.put(&rec("a", 1, SessionState::Online));
        v.put(&rec("c", 3, SessionState::Stopped));
        let c = v.counts();
        assert_eq!((c.total, c.active, c.online), (3, 2, 1));
        v.put(&rec("a", 1, SessionState::Failed));
        v.put(&rec("b", 2, SessionState::Online));
        let c = v.counts();
        assert_eq!((c.total, c.active, c.online), (3, 1, 1));
        let ids: Vec<String> = v.list().into_iter().map(|r| r.user_id).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        v.remove("b");
        v.remove("b");
        let c = v.counts();
        assert_eq!((c.total, c.active, c.online), (2, 0, 0));
        assert_eq!(v.list().len(), 2);
    }
}
