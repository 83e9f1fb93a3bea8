//! Drives the real Supervisor and SessionActors with a scripted in-memory link.
//!
//! Tests that check that something does *not* happen later run on tokio's paused clock
//! (`start_paused`): the runtime moves the clock only when every task is idle, so
//! `run_for(d)` returns once every timer due within `d` (ractor's `send_after` sleeps on
//! tokio's clock: backoffs, deadlines, watchdog rounds) has fired and all it caused has
//! been handled. That is deterministic, not a race against a real clock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use botvisor_actors::*;
use ractor::{Actor, ActorRef};

/// Records what the supervisor persisted.
#[derive(Default)]
struct MemStore {
    rows: Mutex<HashMap<String, SessionRecord>>,
    /// Every state stored (insert or save), in order.
    log: Mutex<Vec<(String, SessionState)>>,
    /// Each session's state as of the last flush (what a crash would keep).
    durable: Mutex<HashMap<String, SessionState>>,
}

impl MemStore {
    fn record(&self, rec: &SessionRecord) {
        self.log
            .lock()
            .unwrap()
            .push((rec.user_id.clone(), rec.state));
    }
    /// A position in the log, for `states_since`.
    fn mark(&self) -> usize {
        self.log.lock().unwrap().len()
    }
    /// The states stored for `user_id` since `mark`.
    fn states_since(&self, mark: usize, user_id: &str) -> Vec<SessionState> {
        self.log.lock().unwrap()[mark..]
            .iter()
            .filter(|(id, _)| id == user_id)
            .map(|(_, state)| *state)
            .collect()
    }
    fn stored_state(&self, user_id: &str) -> Option<SessionState> {
        self.rows.lock().unwrap().get(user_id).map(|r| r.state)
    }
}

/// Lets (paused) virtual time run `d` ahead; see the module comment.
async fn run_for(d: Duration) {
    let before = tokio::time::Instant::now();
    tokio::time::sleep(d).await;
    assert!(before.elapsed() >= d);
}

/// Longer than any backoff (`backoff_max` 100 ms) and many watchdog rounds (100 ms).
const WELL_PAST_ANY_TIMER: Duration = Duration::from_secs(5);

impl Persistence for MemStore {
    fn insert(&self, rec: &SessionRecord) {
        self.save(rec);
    }
    fn save(&self, rec: &SessionRecord) {
        self.record(rec);
        self.rows
            .lock()
            .unwrap()
            .insert(rec.user_id.clone(), rec.clone());
    }
    fn delete(&self, user_id: &str, _by: Option<&str>) {
        self.rows.lock().unwrap().remove(user_id);
    }
    fn flush(&self) -> BoxFuture<'static, Result<(), StorageError>> {
        let rows = self.rows.lock().unwrap();
        *self.durable.lock().unwrap() = rows.iter().map(|(id, r)| (id.clone(), r.state)).collect();
        Box::pin(async { Ok(()) })
    }
}

/// A link that pairs at once on connect (code, then online), and takes faults.
#[derive(Default)]
struct TestLink {
    connects: AtomicUsize,
    removed: Mutex<Vec<String>>,
    /// The store, to tell what was durable when credentials were removed.
    store: std::sync::OnceLock<Arc<MemStore>>,
    /// Each removal with the session's durable state at that moment.
    removed_when: Mutex<Vec<(String, Option<SessionState>)>>,
    /// Sessions whose connect emits no pairing code (a network that never answers).
    silent: Mutex<Vec<String>>,
    /// How long each connect takes before it returns.
    connect_delay: Mutex<Duration>,
    /// Connects in progress now, and the most at once.
    connecting: Arc<AtomicUsize>,
    most_connecting: Arc<AtomicUsize>,
}

struct TestConn {
    sink: EventSink,
}

impl Connection for TestConn {
    fn logout(&mut self) -> BoxFuture<'_, Result<(), LinkError>> {
        Box::pin(async { Ok(()) })
    }
    fn close(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
    fn inject(&mut self, fault: Fault) -> Result<FaultEffect, LinkError> {
        Ok(match fault {
            Fault::Panic => FaultEffect::Panic,
            Fault::Hang => FaultEffect::Hang,
            Fault::Disconnect => {
                self.sink.emit(LinkEvent::Crashed {
                    error: "link dropped".into(),
                });
                FaultEffect::Handled
            }
            Fault::Logout => {
                self.sink.emit(LinkEvent::LoggedOut {
                    reason: "device removed".into(),
                });
                FaultEffect::Handled
            }
        })
    }
}

impl Link for TestLink {
    fn name(&self) -> &'static str {
        "test"
    }
    fn connect(
        &self,
        spec: SessionSpec,
        events: EventSink,
    ) -> BoxFuture<'static, Result<Box<dyn Connection>, LinkError>> {
        self.connects.fetch_add(1, Ordering::SeqCst);
        let silent = self.silent.lock().unwrap().contains(&spec.user_id);
        let delay = *self.connect_delay.lock().unwrap();
        let (connecting, most) = (self.connecting.clone(), self.most_connecting.clone());
        Box::pin(async move {
            let now = connecting.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            connecting.fetch_sub(1, Ordering::SeqCst);
            if !silent {
                events.emit(LinkEvent::PairingCode(PairingCode {
                    code: "ABCD-1234".into(),
                    expires_at_ms: now_ms() + 180_000,
                }));
                events.emit(LinkEvent::Online {
                    name: Some(format!("bot {}", spec.user_id)),
                });
            }
            Ok(Box::new(TestConn { sink: events }) as Box<dyn Connection>)
        })
    }
    fn remove_data(&self, user_id: &str) -> Result<(), LinkError> {
        self.removed.lock().unwrap().push(user_id.to_string());
        let durable = self
            .store
            .get()
            .and_then(|s| s.durable.lock().unwrap().get(user_id).copied());
        self.removed_when
            .lock()
            .unwrap()
            .push((user_id.to_string(), durable));
        Ok(())
    }
}

struct Harness {
    sup: ActorRef<SupervisorMsg>,
    link: Arc<TestLink>,
    store: Arc<MemStore>,
}

fn config() -> SupervisorConfig {
    SupervisorConfig {
        policy: RestartPolicy {
            max_restarts: 2,
            window: Duration::from_secs(60),
            backoff_initial: Duration::from_millis(20),
            backoff_max: Duration::from_millis(100),
            backoff_multiplier: 2.0,
            backoff_jitter: 0.0,
            backoff_reset_after: Duration::from_secs(60),
        },
        shutdown_timeout: Duration::from_millis(300),
        call_timeout: Duration::from_millis(200),
        watchdog_interval: Duration::from_millis(100),
        create_timeout: Duration::from_millis(500),
        boot_batch: 2,
        boot_interval: Duration::from_millis(10),
        jitter_seed: Some(1),
    }
}

async fn start(boot: Vec<SessionRecord>) -> Harness {
    let link = Arc::new(TestLink::default());
    let store = Arc::new(MemStore::default());
    let _ = link.store.set(store.clone());
    let (sup, _) = Actor::spawn(
        None,
        Supervisor,
        SupervisorArgs {
            config: config(),
            link: link.clone(),
            persistence: store.clone(),
            boot,
        },
    )
    .await
    .unwrap();
    Harness { sup, link, store }
}

impl Harness {
    async fn create(&self, id: &str) -> Result<SessionRecord, CmdError> {
        let id = id.to_string();
        ractor::call!(self.sup, |reply| SupervisorMsg::Create {
            user_id: id,
            phone_number: "15550001111".into(),
            by: None,
            reply
        })
        .unwrap()
    }
    async fn stop(&self, id: &str) -> Result<(), CmdError> {
        let id = id.to_string();
        ractor::call!(self.sup, |reply| SupervisorMsg::Stop {
            user_id: id,
            by: None,
            reply
        })
        .unwrap()
    }
    async fn start_again(&self, id: &str) -> Result<SessionRecord, CmdError> {
        let id = id.to_string();
        ractor::call!(self.sup, |reply| SupervisorMsg::Start {
            user_id: id,
            by: None,
            reply
        })
        .unwrap()
    }
    async fn get(&self, id: &str) -> Result<SessionRecord, CmdError> {
        let id = id.to_string();
        ractor::call!(self.sup, |reply| SupervisorMsg::Get { user_id: id, reply }).unwrap()
    }
    async fn fault(&self, id: &str, fault: Fault) -> Result<(), CmdError> {
        let id = id.to_string();
        ractor::call!(self.sup, |reply| SupervisorMsg::Fault {
            user_id: id,
            fault,
            reply
        })
        .unwrap()
    }
    async fn wait_state(&self, id: &str, state: SessionState) -> SessionRecord {
        for _ in 0..300 {
            if let Ok(rec) = self.get(id).await {
                if rec.state == state {
                    return rec;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{id} never reached {state}: {:?}", self.get(id).await);
    }
}

/// Boots a supervisor over `ids` stored as `online` (as a kill -9 leaves them), with
/// `config`; returns the store and the supervisor.
async fn boot_stored_online(
    link: &Arc<TestLink>,
    ids: &[String],
    config: SupervisorConfig,
) -> (Arc<MemStore>, ActorRef<SupervisorMsg>) {
    let store = Arc::new(MemStore::default());
    let boot: Vec<SessionRecord> = ids
        .iter()
        .map(|id| {
            let mut rec = SessionRecord::new(id.clone(), "15550001111".into());
            rec.state = SessionState::Online;
            store.save(&rec);
            rec
        })
        .collect();
    let (sup, _) = Actor::spawn(
        None,
        Supervisor,
        SupervisorArgs {
            config,
            link: link.clone(),
            persistence: store.clone(),
            boot,
        },
    )
    .await
    .unwrap();
    // The boot runs in the supervisor's `post_start`, after the spawn returns and before
    // it handles a message: a first call answers once the stored states are corrected.
    ractor::call!(sup, SupervisorMsg::Health).unwrap();
    (store, sup)
}

#[tokio::test]
async fn create_answers_with_the_first_pairing_code_and_goes_online() {
    let h = start(vec![]).await;
    let rec = h.create("a").await.unwrap();
    assert_eq!(rec.pairing.unwrap().code, "ABCD-1234");
    let rec = h.wait_state("a", SessionState::Online).await;
    assert_eq!(rec.name.as_deref(), Some("bot a"));
    assert_eq!(h.create("a").await, Err(CmdError::Exists));
    assert_eq!(
        h.store.rows.lock().unwrap()["a"].state,
        SessionState::Online
    );
}

#[tokio::test]
async fn panicking_child_is_restarted_with_backoff() {
    let h = start(vec![]).await;
    h.create("p").await.unwrap();
    h.wait_state("p", SessionState::Online).await;
    h.fault("p", Fault::Panic).await.unwrap();
    let rec = h.wait_state("p", SessionState::Online).await;
    assert_eq!(rec.restarts, 1);
    assert!(rec.last_error.unwrap().contains("injected fault"));
    assert_eq!(h.link.connects.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn too_many_crashes_fail_one_session_and_leave_the_others_alone() {
    let h = start(vec![]).await;
    h.create("bad").await.unwrap();
    h.create("good").await.unwrap();
    h.wait_state("good", SessionState::Online).await;
    for _ in 0..2 {
        h.wait_state("bad", SessionState::Online).await;
        h.fault("bad", Fault::Disconnect).await.unwrap();
    }
    h.wait_state("bad", SessionState::Online).await;
    h.fault("bad", Fault::Panic).await.unwrap();
    let rec = h.wait_state("bad", SessionState::Failed).await;
    assert!(rec.last_error.unwrap().contains("gave up after 2 restarts"));
    // Not restarted by itself: nothing is stored for it while every timer runs out.
    let mark = h.store.mark();
    run_for(WELL_PAST_ANY_TIMER).await;
    assert_eq!(h.store.states_since(mark, "bad"), []);
    assert_eq!(h.get("bad").await.unwrap().state, SessionState::Failed);
    assert_eq!(h.link.connects.load(Ordering::SeqCst), 1 + 3);
    assert_eq!(h.get("good").await.unwrap().state, SessionState::Online);
    // A user's start gives it a fresh budget.
    h.start_again("bad").await.unwrap();
    let rec = h.wait_state("bad", SessionState::Online).await;
    assert_eq!(rec.restarts, 0);
}

#[tokio::test(start_paused = true)]
async fn logout_from_the_phone_is_terminal_and_wipes_credentials() {
    let h = start(vec![]).await;
    h.create("l").await.unwrap();
    h.wait_state("l", SessionState::Online).await;
    h.fault("l", Fault::Logout).await.unwrap();
    h.wait_state("l", SessionState::LoggedOut).await;
    let mark = h.store.mark();
    run_for(WELL_PAST_ANY_TIMER).await;
    assert_eq!(h.store.states_since(mark, "l"), []);
    assert_eq!(h.get("l").await.unwrap().state, SessionState::LoggedOut);
    assert_eq!(h.link.connects.load(Ordering::SeqCst), 1);
    assert_eq!(*h.link.removed.lock().unwrap(), vec!["l".to_string()]);
    // Wiped only once logged_out was durable: a crash before the commit reboots it as it
    // was (with its credentials), never as a running session with none (pairing anew).
    assert_eq!(
        *h.link.removed_when.lock().unwrap(),
        vec![("l".to_string(), Some(SessionState::LoggedOut))]
    );
}

#[tokio::test]
async fn hung_session_is_killed_by_the_watchdog_and_restarted() {
    let h = start(vec![]).await;
    h.create("h").await.unwrap();
    h.wait_state("h", SessionState::Online).await;
    h.fault("h", Fault::Hang).await.unwrap();
    // The supervisor keeps answering while the child hangs.
    assert!(h.get("h").await.is_ok());
    let rec = h.wait_state("h", SessionState::Restarting).await;
    assert!(rec.last_error.unwrap().contains("did not answer"));
    h.wait_state("h", SessionState::Online).await;
}

#[tokio::test]
async fn stop_and_delete_are_answered_after_the_child_is_gone() {
    let h = start(vec![]).await;
    h.create("s").await.unwrap();
    h.wait_state("s", SessionState::Online).await;
    h.stop("s").await.unwrap();
    let rec = h.get("s").await.unwrap();
    assert_eq!(
        (rec.state, rec.desired),
        (SessionState::Stopped, Desired::Stopped)
    );
    assert!(matches!(
        h.fault("s", Fault::Panic).await,
        Err(CmdError::Conflict(_))
    ));
    let id = "s".to_string();
    ractor::call!(h.sup, |reply| SupervisorMsg::Delete {
        user_id: id,
        by: None,
        reply
    })
    .unwrap()
    .unwrap();
    assert!(matches!(h.get("s").await, Err(CmdError::NotFound(_))));
    assert!(h.store.rows.lock().unwrap().is_empty());
}

#[tokio::test]
async fn stop_of_a_hung_session_kills_it_after_the_shutdown_timeout() {
    let h = start(vec![]).await;
    h.create("hs").await.unwrap();
    h.wait_state("hs", SessionState::Online).await;
    h.fault("hs", Fault::Hang).await.unwrap();
    h.stop("hs").await.unwrap();
    assert_eq!(h.get("hs").await.unwrap().state, SessionState::Stopped);
}

#[tokio::test]
async fn create_that_gets_no_code_in_time_leaves_nothing_behind() {
    let h = start(vec![]).await;
    h.link.silent.lock().unwrap().push("slow".into());
    let err = h.create("slow").await.unwrap_err();
    assert!(matches!(err, CmdError::Unavailable(_)), "{err:?}");
    assert!(matches!(h.get("slow").await, Err(CmdError::NotFound(_))));
    assert!(h.store.rows.lock().unwrap().is_empty());
    assert_eq!(*h.link.removed.lock().unwrap(), vec!["slow".to_string()]);
}

#[tokio::test]
async fn boot_resumes_running_sessions_but_not_failed_or_stopped_ones() {
    let mut run = SessionRecord::new("run".into(), "15550001111".into());
    run.state = SessionState::Online;
    let mut failed = SessionRecord::new("failed".into(), "15550001111".into());
    failed.state = SessionState::Failed;
    let mut stopped = SessionRecord::new("stopped".into(), "15550001111".into());
    stopped.desired = Desired::Stopped;
    let h = start(vec![run, failed, stopped]).await;
    h.wait_state("run", SessionState::Online).await;
    assert_eq!(h.get("failed").await.unwrap().state, SessionState::Failed);
    assert_eq!(h.get("stopped").await.unwrap().state, SessionState::Stopped);
    assert_eq!(h.link.connects.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn boot_publishes_the_true_state_not_the_stale_stored_one() {
    let link = Arc::new(TestLink::default());
    // One session per boot batch, and a long pause: "queued" waits for its turn.
    let config = SupervisorConfig {
        boot_batch: 1,
        boot_interval: Duration::from_secs(60),
        ..config()
    };
    let ids = ["first".to_string(), "queued".to_string()];
    let (store, _sup) = boot_stored_online(&link, &ids, config).await;
    // The first batch has run: "first" was started again and is back online...
    let restarted = || {
        let states = store.states_since(0, "first");
        let started = states.iter().position(|s| *s == SessionState::Starting);
        started.is_some_and(|i| states[i..].contains(&SessionState::Online))
    };
    for _ in 0..300 {
        if restarted() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(restarted(), "{:?}", store.states_since(0, "first"));
    // ...while "queued" waits a minute for its turn. It is not running yet, so nobody may
    // read the `online` stored before the crash.
    assert_eq!(store.stored_state("queued"), Some(SessionState::Starting));
    assert_eq!(link.connects.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn shutdown_stops_every_child_and_keeps_desired_states() {
    let h = start(vec![]).await;
    for id in ["x", "y", "z"] {
        h.create(id).await.unwrap();
    }
    h.wait_state("z", SessionState::Online).await;
    ractor::call!(h.sup, SupervisorMsg::Shutdown).unwrap();
    // Answered once every child is gone: each is stopped (stored and shown), and still
    // meant to run at the next boot.
    for id in ["x", "y", "z"] {
        let rec = h.store.rows.lock().unwrap()[id].clone();
        assert_eq!(
            (rec.state, rec.desired),
            (SessionState::Stopped, Desired::Running),
            "{id} as stored"
        );
        let rec = h.get(id).await.unwrap();
        assert_eq!(
            (rec.state, rec.desired),
            (SessionState::Stopped, Desired::Running),
            "{id} as shown"
        );
    }
    assert!(matches!(h.create("w").await, Err(CmdError::Unavailable(_))));
}

/// A large boot flows through the link at the pace it connects: never more than
/// `boot_batch` connects at once, however many sessions wait (all of them spawned at once
/// used to wait their turn past the watchdog and be killed as hung).
#[tokio::test(start_paused = true)]
async fn boot_keeps_at_most_a_batch_of_connects_in_flight() {
    let link = Arc::new(TestLink::default());
    *link.connect_delay.lock().unwrap() = Duration::from_millis(150);
    let config = SupervisorConfig {
        boot_batch: 4,
        boot_interval: Duration::ZERO,
        ..config()
    };
    let ids: Vec<String> = (0..60).map(|i| format!("b{i}")).collect();
    let (store, _sup) = boot_stored_online(&link, &ids, config).await;
    let online = || {
        let rows = store.rows.lock().unwrap();
        rows.values()
            .filter(|r| r.state == SessionState::Online)
            .count()
    };
    for _ in 0..1000 {
        if online() == 60 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(online(), 60);
    assert_eq!(link.most_connecting.load(Ordering::SeqCst), 4);
    // Each connected once: nothing was killed for waiting (150 ms is past the 100 ms
    // watchdog round and near the 200 ms call timeout; 15 rounds of 4 took 2.25 s).
    assert_eq!(link.connects.load(Ordering::SeqCst), 60);
    let restarted = store
        .rows
        .lock()
        .unwrap()
        .values()
        .filter(|r| r.restarts > 0)
        .count();
    assert_eq!(restarted, 0);
}

/// A connect slower than `call_timeout` is not a hang: the watchdog judges steps of a
/// started session; a start has its own bound, `create_timeout`.
#[tokio::test(start_paused = true)]
async fn a_slow_connect_is_not_killed_by_the_watchdog_but_bounded_by_the_start_limit() {
    let h = start(vec![]).await;
    // 400 ms: past the call timeout (200 ms) and several watchdog rounds, within the
    // create timeout (500 ms).
    *h.link.connect_delay.lock().unwrap() = Duration::from_millis(400);
    h.create("slow").await.unwrap();
    let rec = h.wait_state("slow", SessionState::Online).await;
    assert_eq!(rec.restarts, 0, "{rec:?}");
    assert_eq!(h.link.connects.load(Ordering::SeqCst), 1);
    // Past the create timeout: the start is a crash, restarted under the policy, and the
    // session fails once the budget is spent (each connect is as slow).
    *h.link.connect_delay.lock().unwrap() = Duration::from_secs(5);
    h.stop("slow").await.unwrap();
    h.start_again("slow").await.unwrap();
    let rec = h.wait_state("slow", SessionState::Failed).await;
    assert!(
        rec.last_error
            .as_deref()
            .unwrap_or_default()
            .contains("did not connect within"),
        "{rec:?}"
    );
}

/// Several nodes: sessions handed to this node (`Adopt`) resume as at boot; released
/// ones (`Release`) stop and are forgotten without a write; a planned handoff is
/// answered once its sessions stopped; one claimed again while its child was still
/// stopping (a node that fenced itself and registered again) runs again once it is gone.
#[tokio::test]
async fn adopted_sessions_run_released_ones_stop_and_a_readopted_one_runs_again() {
    let h = start(vec![]).await;
    let mut rec = SessionRecord::new("claimed".into(), "15550001111".into());
    rec.state = SessionState::Starting;
    let other = SessionRecord::new("other".into(), "15550001111".into());
    h.sup
        .cast(SupervisorMsg::Adopt(vec![rec.clone(), other]))
        .unwrap();
    h.wait_state("claimed", SessionState::Online).await;
    h.wait_state("other", SessionState::Online).await;
    let connects = h.link.connects.load(Ordering::SeqCst);
    assert_eq!(connects, 2);
    // Released and adopted again before its child is gone: it comes back.
    let writes = h.store.states_since(0, "claimed").len();
    h.sup
        .cast(SupervisorMsg::Release(Some(vec!["claimed".into()])))
        .unwrap();
    h.sup.cast(SupervisorMsg::Adopt(vec![rec])).unwrap();
    for _ in 0..300 {
        if h.link.connects.load(Ordering::SeqCst) == connects + 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(h.link.connects.load(Ordering::SeqCst), connects + 1);
    h.wait_state("claimed", SessionState::Online).await;
    // A handoff is answered once the child is gone; the session is then unknown here, and
    // nothing was written for it on the way out.
    let before = h.store.states_since(0, "other").len();
    ractor::call!(h.sup, |reply| SupervisorMsg::Handoff {
        user_ids: vec!["other".into()],
        reply
    })
    .unwrap();
    assert!(matches!(h.get("other").await, Err(CmdError::NotFound(_))));
    assert_eq!(h.store.states_since(0, "other").len(), before);
    assert!(writes > 0);
    let audit = ractor::call!(h.sup, SupervisorMsg::Audit).unwrap();
    assert!(audit.problems.is_empty(), "{:?}", audit.problems);
    assert_eq!(audit.live, ["claimed"]);
}
