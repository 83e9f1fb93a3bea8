//! Several botvisor processes ("nodes") serving one PostgreSQL database.
//!
//! The protocol, in the database's own clock:
//!
//! - **A node's lease.** `bv_nodes(id, epoch, lease_until, …)`. A node registers (a new
//!   epoch, taken only when the id's lease has run out, was given up, or is this
//!   process's own) and renews every `ttl / 5` with an update conditional on its id, its
//!   epoch and an unexpired lease. Its local deadline is the monotonic instant read
//!   *before* the renewal was sent, plus the ttl: never later than the database's
//!   `lease_until`. A node past that deadline fences itself ([`Standing::fence`]).
//! - **A session's owner and fence.** `bv_sessions.owner` names the node, `fence` grows on
//!   every change of owner. A node claims sessions with no owner, or whose owner's lease
//!   ran out more than a grace ago, with `FOR UPDATE SKIP LOCKED`, a fair share per round.
//! - **Every write is gated.** A commit of the store's writer locks the rows of the
//!   sessions it writes (`FOR SHARE`) and writes only those whose owner and fence are this
//!   node's; the others are reported lost and their actors stopped. A claim must update
//!   the row, so it waits for a commit in flight, and a commit after a claim sees the new
//!   fence: no write with a stale fence is accepted.
//!
//! [`Standing`] is what this process knows of its own standing; the statements are
//! methods of [`Rows`].

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;

use botvisor_actors::{SessionRecord, StorageError};

/// SQL: the owner (`n`, joined from `bv_nodes`) of a session row holds a live lease. NULL
/// (not true) when the session has no owner.
macro_rules! owner_live {
    () => {
        "(n.lease_until > now() AND n.state <> 'stopped')"
    };
}

/// SQL: a node's (`n`) state as `GET /api/nodes` and the fleet's gauges show it.
macro_rules! node_state {
    () => {
        "CASE WHEN n.state = 'stopped' THEN 'stopped' \
         WHEN n.lease_until < now() THEN 'expired' ELSE n.state END"
    };
}

/// SQL: the session states that are not meant to be running.
macro_rules! at_rest {
    () => {
        "('stopped', 'failed', 'logged_out')"
    };
}

use super::postgres::{PgError, Rows};

/// This node's standing: its lease, the sessions it holds with their fences, and the
/// ones a commit found owned elsewhere. Shared by the lease loop, the store's writer (the
/// gate) and the HTTP layer (503 while fenced, forwarding).
pub struct Standing {
    /// `--node-id`.
    pub id: String,
    /// Where the other nodes reach this one (`--advertise`).
    pub advertise: String,
    /// `--lease-ttl`.
    pub ttl: Duration,
    epoch: AtomicI64,
    /// The monotonic deadline of the lease (`None`: not registered).
    deadline: Mutex<Option<Instant>>,
    fenced: AtomicBool,
    /// Sessions held, with their fence.
    fences: DashMap<String, i64>,
    lost: Mutex<Vec<String>>,
    /// The node hands its sessions over and takes no new ones.
    draining: AtomicBool,
}

impl std::fmt::Debug for Standing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Standing")
            .field("id", &self.id)
            .field("epoch", &self.epoch())
            .field("fenced", &self.is_fenced())
            .field("sessions", &self.count())
            .finish()
    }
}

impl Standing {
    pub fn new(id: String, advertise: String, ttl: Duration) -> Arc<Standing> {
        Arc::new(Standing {
            id,
            advertise,
            ttl,
            epoch: AtomicI64::new(0),
            deadline: Mutex::new(None),
            fenced: AtomicBool::new(true),
            fences: DashMap::new(),
            lost: Mutex::new(Vec::new()),
            draining: AtomicBool::new(false),
        })
    }

    /// The current registration's epoch (0: none yet).
    pub fn epoch(&self) -> i64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Registered, not fenced, and before the lease's deadline.
    pub fn live(&self) -> bool {
        !self.fenced.load(Ordering::Acquire) && !self.past_deadline()
    }

    /// The lease's local deadline has passed (or there is none).
    pub fn past_deadline(&self) -> bool {
        let deadline = *self.deadline.lock().unwrap_or_else(|p| p.into_inner());
        deadline.is_none_or(|d| Instant::now() >= d)
    }

    /// A registration with `epoch`, sent at `sent`: live until `sent + ttl`.
    pub fn registered(&self, epoch: i64, sent: Instant) {
        self.epoch.store(epoch, Ordering::Release);
        self.renewed(sent);
        self.fenced.store(false, Ordering::Release);
    }

    /// A renewal sent at `sent` was confirmed.
    pub fn renewed(&self, sent: Instant) {
        let mut d = self.deadline.lock().unwrap_or_else(|p| p.into_inner());
        *d = Some(sent + self.ttl);
    }

    /// Fences the node: from now on it holds nothing. Returns how many sessions it held
    /// (whose sockets must go now); `None` when it was fenced already.
    pub fn fence(&self) -> Option<usize> {
        if self.fenced.swap(true, Ordering::AcqRel) {
            return None;
        }
        *self.deadline.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let held = self.fences.len();
        self.fences.clear();
        Some(held)
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    pub fn set_draining(&self, on: bool) {
        self.draining.store(on, Ordering::Release);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// The fence this node holds a session with.
    pub fn fence_of(&self, user_id: &str) -> Option<i64> {
        self.fences.get(user_id).map(|f| *f)
    }

    /// Holds a session with `fence`.
    pub fn hold(&self, user_id: &str, fence: i64) {
        self.fences.insert(user_id.to_string(), fence);
    }

    /// Lets a session go; whether it was held.
    pub fn let_go(&self, user_id: &str) -> bool {
        self.fences.remove(user_id).is_some()
    }

    /// Sessions held.
    pub fn held(&self) -> Vec<String> {
        self.fences.iter().map(|e| e.key().clone()).collect()
    }

    pub fn holds(&self, user_id: &str) -> bool {
        self.fences.contains_key(user_id)
    }

    /// How many sessions it holds.
    pub fn count(&self) -> usize {
        self.fences.len()
    }

    /// A commit found these sessions owned elsewhere: they are no longer held, and wait
    /// for [`Standing::take_lost`].
    pub fn lose(&self, user_ids: Vec<String>) {
        if user_ids.is_empty() {
            return;
        }
        for id in &user_ids {
            self.fences.remove(id);
        }
        self.lost
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(user_ids);
    }

    /// Sessions lost since the last call.
    pub fn take_lost(&self) -> Vec<String> {
        std::mem::take(&mut *self.lost.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// The channel a node notifies when it gives sessions up (`LISTEN`ed by the others).
pub const FLEET_CHANNEL: &str = "bv_fleet";

/// The channel every node relays its live events on (`GET /api/events` on any node
/// shows the whole fleet's). A payload is the sending node's id on its first line, then
/// one event per line, `<event number>\t<kind>\t<public JSON>` (see `nodes::pack`); a
/// pairing code never travels.
pub const EVENTS_CHANNEL: &str = "bv_events";

/// The largest payload PostgreSQL's NOTIFY takes is 8,000 bytes; an event larger than
/// this stays on its node (none is, with the fields events have).
pub const EVENT_PAYLOAD_MAX: usize = 7_900;

/// The fleet's gauges for `/metrics` on a node ([`Rows::fleet_gauges`]).
#[derive(Debug, Default)]
pub struct FleetGauges {
    /// (state, sessions).
    pub sessions: Vec<(String, i64)>,
    /// (state as `GET /api/nodes` shows it, nodes).
    pub nodes: Vec<(String, i64)>,
}

/// A node as `GET /api/nodes` lists it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRow {
    pub id: String,
    /// Where the other nodes reach it.
    pub address: String,
    pub epoch: i64,
    /// `live`, `draining`, `stopped` (it left cleanly) or `expired` (its lease ran out).
    pub state: String,
    /// Sessions it owns.
    pub sessions: i64,
    /// Milliseconds since its lease was last renewed.
    pub lease_age_ms: i64,
    /// Milliseconds until its lease runs out (negative: ran out that long ago).
    pub lease_left_ms: i64,
}

/// A session as the fleet's reads see it.
#[derive(Debug, Clone)]
pub struct FleetRow {
    /// Its row as its owner last wrote it.
    pub rec: SessionRecord,
    /// The node that owns it (`None`: given up, a claim is coming).
    pub owner: Option<String>,
    /// The owner's lease is live (else what its row says may no longer be true).
    pub owner_live: bool,
}

/// Who owns a session, as a forwarder needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The owning node (`None`: no owner now, a claim is coming).
    pub node: Option<String>,
    /// Its address, when its lease is live.
    pub address: Option<String>,
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Rows {
    /// Registers `standing` with a new epoch, if the id is free: its lease ran out, it
    /// left cleanly, or `previous` is the epoch this process held. `None`: another
    /// process holds the id's live lease.
    pub fn register(
        &self,
        standing: &Standing,
        previous: i64,
    ) -> Result<Option<(i64, Instant)>, StorageError> {
        let ttl = millis(standing.ttl);
        let (id, addr) = (standing.id.clone(), standing.advertise.clone());
        self.run_storage(|c| async move {
            let sent = Instant::now();
            let row = c
                .query_opt(
                    "INSERT INTO bv_nodes (id, http_addr, epoch, lease_until, renewed_at, \
                     started_at, state) \
                     VALUES ($1, $2, 1, now() + $3 * interval '1 millisecond', now(), now(), \
                     'live') \
                     ON CONFLICT (id) DO UPDATE SET epoch = bv_nodes.epoch + 1, \
                     http_addr = excluded.http_addr, lease_until = excluded.lease_until, \
                     renewed_at = now(), started_at = now(), state = 'live' \
                     WHERE bv_nodes.lease_until < now() OR bv_nodes.state = 'stopped' \
                     OR bv_nodes.epoch = $4 \
                     RETURNING epoch",
                    &[&id, &addr, &(ttl as f64), &previous],
                )
                .await?;
            Ok(row
                .map(|r| r.try_get::<_, i64>(0))
                .transpose()?
                .map(|e| (e, sent)))
        })
    }

    /// Renews the lease; `Some(sent)` when the database confirmed it (with the instant the
    /// renewal was sent), `None` when the lease is gone (ran out, or the epoch moved).
    pub fn renew(&self, standing: &Standing) -> Result<Option<Instant>, StorageError> {
        let ttl = millis(standing.ttl) as f64;
        let (id, epoch) = (standing.id.clone(), standing.epoch());
        let state = if standing.draining() {
            "draining"
        } else {
            "live"
        };
        self.run_storage(|c| async move {
            let sent = Instant::now();
            let n = c
                .execute(
                    "UPDATE bv_nodes SET lease_until = now() + $3 * interval '1 millisecond', \
                     renewed_at = now(), state = $4 \
                     WHERE id = $1 AND epoch = $2 AND lease_until > now() \
                     AND state <> 'stopped'",
                    &[&id, &epoch, &ttl, &state],
                )
                .await?;
            Ok((n == 1).then_some(sent))
        })
    }

    /// Takes back the sessions this node's earlier registrations owned (its own: no other
    /// node could have claimed them without its lease running out first, and then they
    /// would not name it any more). Each gets a new fence.
    pub fn reclaim_own(
        &self,
        standing: &Standing,
    ) -> Result<Vec<(SessionRecord, i64)>, StorageError> {
        let (id, epoch) = (standing.id.clone(), standing.epoch());
        self.run_storage(|c| async move {
            let rows = c
                .query(
                    &format!(
                        "UPDATE bv_sessions SET owner_epoch = $2, fence = fence + 1, {RESUMED} \
                         WHERE owner = $1 AND owner_epoch <> $2 \
                         RETURNING {}, fence",
                        super::postgres::SESSION_COLUMNS
                    ),
                    &[&id, &epoch],
                )
                .await?;
            claimed(&rows)
        })
    }

    /// Claims a fair share (the sessions up for claim divided among the live nodes, at most
    /// `limit`) of the sessions with no owner or whose owner's lease ran out more than
    /// `grace` ago. Each gets a new fence.
    ///
    /// The expired nodes' rows are locked (`FOR SHARE`) and every condition is on the
    /// locked rows themselves: a node re-registering meanwhile waits for this claim (and
    /// then finds its sessions taken), a claim after it sees its fresh lease (READ
    /// COMMITTED re-checks a locked row's condition on its newest version).
    pub fn claim(
        &self,
        standing: &Standing,
        grace: Duration,
        limit: i64,
    ) -> Result<Vec<(SessionRecord, i64)>, StorageError> {
        let (id, epoch) = (standing.id.clone(), standing.epoch());
        let grace = millis(grace) as f64;
        self.run_storage(|c| async move {
            let rows = c
                .query(
                    &format!(
                        "WITH expired AS (SELECT id FROM bv_nodes \
                           WHERE lease_until < now() - $3 * interval '1 millisecond' \
                           FOR SHARE), \
                         live AS (SELECT greatest(count(*), 1) AS n FROM bv_nodes \
                           WHERE lease_until > now() AND state = 'live'), \
                         share AS (SELECT least($4::bigint, ceil((SELECT count(*) FROM bv_sessions \
                           WHERE owner IS NULL OR owner IN (SELECT id FROM expired))::float8 \
                           / (SELECT n FROM live))::bigint) AS k), \
                         c AS (SELECT user_id FROM bv_sessions \
                           WHERE owner IS NULL OR owner IN (SELECT id FROM expired) \
                           ORDER BY created_at \
                           LIMIT (SELECT k FROM share) FOR UPDATE SKIP LOCKED) \
                         UPDATE bv_sessions s SET owner = $1, owner_epoch = $2, \
                           fence = s.fence + 1, {RESUMED} \
                         FROM c WHERE s.user_id = c.user_id \
                         RETURNING {}, s.fence",
                        prefixed("s.")
                    ),
                    &[&id, &epoch, &grace, &limit],
                )
                .await?;
            claimed(&rows)
        })
    }

    /// Gives up the lease: `handoff` also gives up every session (the others claim them at
    /// their next round); without it the sessions wait for this node to come back, or for
    /// its lease to run out.
    pub fn leave(&self, standing: &Standing, handoff: bool) -> Result<u64, StorageError> {
        let (id, epoch) = (standing.id.clone(), standing.epoch());
        self.run_storage(|c| async move {
            let mut c = c;
            let tx = c.transaction().await?;
            let released = if handoff {
                tx.execute(
                    "UPDATE bv_sessions SET owner = NULL WHERE owner = $1 AND owner_epoch = $2",
                    &[&id, &epoch],
                )
                .await?
            } else {
                0
            };
            let expire = if handoff {
                "UPDATE bv_nodes SET state = 'stopped', lease_until = now() \
                 WHERE id = $1 AND epoch = $2"
            } else {
                "UPDATE bv_nodes SET state = 'stopped' WHERE id = $1 AND epoch = $2"
            };
            tx.execute(expire, &[&id, &epoch]).await?;
            if handoff {
                tx.execute("SELECT pg_notify($1, 'released')", &[&FLEET_CHANNEL])
                    .await?;
            }
            tx.commit().await?;
            Ok(released)
        })
    }

    /// Reserves a new session's id for this node before it is created here: its row,
    /// owned by this node with fence 1, unless the id exists (`false`). Two nodes asked to
    /// create one id at once: one gets it, the other answers 409.
    pub fn reserve(&self, standing: &Standing, rec: &SessionRecord) -> Result<bool, StorageError> {
        let (id, epoch) = (standing.id.clone(), standing.epoch());
        let user_id = rec.user_id.clone();
        let rec = rec.clone();
        let reserved = self.run_storage(|c| async move {
            let n = c
                .execute(
                    "INSERT INTO bv_sessions (user_id, phone_number, desired, state, \
                     created_at, updated_at, owner, owner_epoch, fence) \
                     VALUES ($1, $2, 'running', 'starting', $3, $3, $4, $5, 1) \
                     ON CONFLICT (user_id) DO NOTHING",
                    &[
                        &rec.user_id,
                        &rec.phone_number,
                        &i64::try_from(rec.created_at_ms).unwrap_or(i64::MAX),
                        &id,
                        &epoch,
                    ],
                )
                .await?;
            Ok(n == 1)
        })?;
        if reserved {
            standing.hold(&user_id, 1);
        }
        Ok(reserved)
    }

    /// Takes back a reservation whose create did not happen (its row still fence 1:
    /// a create that did write its row rolls back by itself).
    pub fn unreserve(&self, standing: &Standing, user_id: &str) -> Result<(), StorageError> {
        let (id, user_id) = (standing.id.clone(), user_id.to_string());
        if standing.fence_of(&user_id) == Some(1) {
            standing.let_go(&user_id);
        }
        self.run_storage(|c| async move {
            c.execute(
                "DELETE FROM bv_sessions WHERE user_id = $1 AND owner = $2 AND fence = 1",
                &[&user_id, &id],
            )
            .await?;
            Ok(())
        })
    }

    /// Gives up sessions (a planned handoff, once they stopped here) and tells the other
    /// nodes ([`FLEET_CHANNEL`]): the next to claim takes them at once.
    pub fn release(&self, standing: &Standing, user_ids: &[String]) -> Result<u64, StorageError> {
        let (id, user_ids) = (standing.id.clone(), user_ids.to_vec());
        self.run_storage(|c| async move {
            let mut c = c;
            let tx = c.transaction().await?;
            let n = tx
                .execute(
                    "UPDATE bv_sessions SET owner = NULL WHERE user_id = ANY($1) AND owner = $2",
                    &[&user_ids, &id],
                )
                .await?;
            tx.execute("SELECT pg_notify($1, 'released')", &[&FLEET_CHANNEL])
                .await?;
            tx.commit().await?;
            Ok(n)
        })
    }

    /// Every node, with its sessions and lease.
    pub fn nodes(&self) -> Result<Vec<NodeRow>, StorageError> {
        self.run_storage(|c| async move {
            let rows = c
                .query(
                    concat!(
                        "SELECT n.id, n.http_addr, n.epoch, ",
                        node_state!(),
                        ", (SELECT count(*) FROM bv_sessions s WHERE s.owner = n.id), \
                     (extract(epoch FROM now() - n.renewed_at) * 1000)::bigint, \
                     (extract(epoch FROM n.lease_until - now()) * 1000)::bigint \
                     FROM bv_nodes n ORDER BY n.id"
                    ),
                    &[],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| {
                    Ok(NodeRow {
                        id: r.try_get(0)?,
                        address: r.try_get(1)?,
                        epoch: r.try_get(2)?,
                        state: r.try_get(3)?,
                        sessions: r.try_get(4)?,
                        lease_age_ms: r.try_get(5)?,
                        lease_left_ms: r.try_get(6)?,
                    })
                })
                .collect::<Result<_, tokio_postgres::Error>>()?)
        })
    }

    /// Who owns a session (`None`: no such session).
    pub fn owner_of(&self, user_id: &str) -> Result<Option<Owner>, StorageError> {
        let user_id = user_id.to_string();
        self.run_storage(|c| async move {
            let row = c
                .query_opt(
                    concat!(
                        "SELECT s.owner, CASE WHEN ",
                        owner_live!(),
                        " THEN n.http_addr END \
                         FROM bv_sessions s LEFT JOIN bv_nodes n ON n.id = s.owner \
                         WHERE s.user_id = $1"
                    ),
                    &[&user_id],
                )
                .await?;
            Ok(row
                .map(|r| {
                    Ok::<_, tokio_postgres::Error>(Owner {
                        node: r.try_get(0)?,
                        address: r.try_get(1)?,
                    })
                })
                .transpose()?)
        })
    }

    /// A simulated session's credentials (several nodes keep them here): `None` before it
    /// paired, else the account's name if known.
    pub fn sim_credentials(&self, user_id: &str) -> Result<Option<Option<String>>, StorageError> {
        let user_id = user_id.to_string();
        self.run_storage(|c| async move {
            let row = c
                .query_opt(
                    "SELECT name FROM bv_sim_credentials WHERE user_id = $1",
                    &[&user_id],
                )
                .await?;
            Ok(row.map(|r| r.try_get(0)).transpose()?)
        })
    }

    /// Records that a simulated session's phone paired.
    pub fn sim_paired(&self, user_id: &str, name: &str) -> Result<(), StorageError> {
        let (user_id, name) = (user_id.to_string(), name.to_string());
        self.run_storage(|c| async move {
            c.execute(
                "INSERT INTO bv_sim_credentials (user_id, paired_at, name) \
                 VALUES ($1, (extract(epoch FROM now()) * 1000)::bigint, $2) \
                 ON CONFLICT (user_id) DO UPDATE SET paired_at = excluded.paired_at, \
                 name = excluded.name",
                &[&user_id, &name],
            )
            .await?;
            Ok(())
        })
    }

    /// Every session with its owner and whether the owner's lease is live, oldest
    /// first.
    pub fn fleet(&self) -> Result<Vec<FleetRow>, StorageError> {
        self.fleet_rows(None)
    }

    /// One session as [`Rows::fleet`] has it.
    pub fn fleet_row(&self, user_id: &str) -> Result<Option<FleetRow>, StorageError> {
        Ok(self.fleet_rows(Some(user_id))?.pop())
    }

    fn fleet_rows(&self, only: Option<&str>) -> Result<Vec<FleetRow>, StorageError> {
        let only = only.map(str::to_string);
        self.run_storage(|c| async move {
            let rows = c
                .query(
                    &format!(
                        concat!(
                            "SELECT {}, s.owner, coalesce(",
                            owner_live!(),
                            ", false) \
                             FROM bv_sessions s LEFT JOIN bv_nodes n ON n.id = s.owner \
                             WHERE $1::text IS NULL OR s.user_id = $1 \
                             ORDER BY s.created_at, s.user_id"
                        ),
                        prefixed("s.")
                    ),
                    &[&only],
                )
                .await?;
            let n = super::postgres::SESSION_COLUMNS.split(", ").count();
            Ok(rows
                .iter()
                .map(|r| {
                    Ok(FleetRow {
                        rec: super::postgres::session_of(r)?,
                        owner: r.try_get(n)?,
                        owner_live: r.try_get(n + 1)?,
                    })
                })
                .collect::<Result<_, tokio_postgres::Error>>()?)
        })
    }

    /// Sends the other nodes these [`EVENTS_CHANNEL`] payloads, in order, in one
    /// statement.
    pub fn notify_events(&self, payloads: Vec<String>) -> Result<(), StorageError> {
        self.run_storage(|c| async move {
            c.execute(
                "SELECT pg_notify($1, p) FROM unnest($2::text[]) WITH ORDINALITY AS t(p, i) \
                 ORDER BY i",
                &[&EVENTS_CHANNEL, &payloads],
            )
            .await?;
            Ok(())
        })
    }

    /// The fleet's sessions by state as [`Rows::fleet`] shows them (a session whose
    /// owner is not live and that should be active counts as `disconnected`), and its
    /// nodes by state as `GET /api/nodes` shows them, counted by the database.
    pub fn fleet_gauges(&self) -> Result<FleetGauges, StorageError> {
        self.run_storage(|c| async move {
            let sessions = c
                .query(
                    concat!(
                        "SELECT CASE WHEN s.state NOT IN ",
                        at_rest!(),
                        " AND NOT coalesce(",
                        owner_live!(),
                        ", false) THEN 'disconnected' ELSE s.state END AS st, count(*) \
                         FROM bv_sessions s LEFT JOIN bv_nodes n ON n.id = s.owner GROUP BY st"
                    ),
                    &[],
                )
                .await?;
            let nodes = c
                .query(
                    concat!(
                        "SELECT ",
                        node_state!(),
                        " AS st, count(*) FROM bv_nodes n GROUP BY st"
                    ),
                    &[],
                )
                .await?;
            let pairs = |rows: Vec<tokio_postgres::Row>| {
                rows.iter()
                    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                    .collect::<Result<Vec<(String, i64)>, tokio_postgres::Error>>()
            };
            Ok(FleetGauges {
                sessions: pairs(sessions)?,
                nodes: pairs(nodes)?,
            })
        })
    }

    /// The fleet's counts as [`Rows::fleet`] shows its sessions (a session whose owner is
    /// not live counts as active, not online): (total, active, online), counted by the
    /// database, no row sent.
    pub fn fleet_counts(&self) -> Result<(i64, i64, i64), StorageError> {
        self.run_storage(|c| async move {
            let r = c
                .query_one(
                    concat!(
                        "SELECT count(*), count(*) FILTER (WHERE s.state NOT IN ",
                        at_rest!(),
                        "), count(*) FILTER (WHERE s.state = 'online' AND ",
                        owner_live!(),
                        ") FROM bv_sessions s LEFT JOIN bv_nodes n ON n.id = s.owner"
                    ),
                    &[],
                )
                .await?;
            Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?))
        })
    }

    /// The least-loaded live node other than `standing` and its address, if it has fewer
    /// sessions than `standing` by more than `margin` (`None`: whatever its load), where
    /// a new session should go.
    pub fn less_loaded(
        &self,
        standing: &Standing,
        margin: Option<i64>,
    ) -> Result<Option<(String, String)>, StorageError> {
        let id = standing.id.clone();
        self.run_storage(|c| async move {
            let row = c
                .query_opt(
                    "WITH load AS (SELECT n.id, n.http_addr, \
                       (SELECT count(*) FROM bv_sessions s WHERE s.owner = n.id) AS k \
                       FROM bv_nodes n WHERE n.lease_until > now() AND n.state = 'live') \
                     SELECT id, http_addr FROM load \
                     WHERE id <> $1 AND ($2::bigint IS NULL \
                       OR k + $2 < (SELECT k FROM load WHERE id = $1)) \
                     ORDER BY k, id LIMIT 1",
                    &[&id, &margin],
                )
                .await?;
            Ok(row
                .map(|r| Ok::<_, tokio_postgres::Error>((r.try_get(0)?, r.try_get(1)?)))
                .transpose()?)
        })
    }
}

/// A claimed session's state as its new owner resumes it (what the supervisor's boot
/// makes of it): a running one is starting, a stopped one stopped. Written with the
/// claim, so the fleet's reads never show the old owner's last state as live.
const RESUMED: &str = "state = CASE \
     WHEN desired = 'stopped' THEN 'stopped' \
     WHEN state IN ('failed', 'logged_out') THEN state \
     ELSE 'starting' END";

/// The session columns prefixed with a table's alias.
fn prefixed(alias: &str) -> String {
    super::postgres::SESSION_COLUMNS
        .split(", ")
        .map(|c| format!("{alias}{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn claimed(rows: &[tokio_postgres::Row]) -> Result<Vec<(SessionRecord, i64)>, PgError> {
    let n = super::postgres::SESSION_COLUMNS.split(", ").count();
    Ok(rows
        .iter()
        .map(|r| Ok((super::postgres::session_of(r)?, r.try_get(n)?)))
        .collect::<Result<_, tokio_postgres::Error>>()?)
}
