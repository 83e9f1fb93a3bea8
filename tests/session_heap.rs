//! The sessions' heap as the binary sets it up (src/main.rs): the global allocator and
//! SQLite's allocator serve a session's code from the session heap and everything else
//! from glibc, and either frees what the other made. In a process of its own: SQLite's
//! allocator can be set only before SQLite's first use.

use botvisor::session_heap::{self, holds, outside, run_within, SessionHeapAlloc};

#[global_allocator]
static ALLOCATOR: SessionHeapAlloc<std::alloc::System> = SessionHeapAlloc(std::alloc::System);

#[test]
fn sqlite_and_rust_allocate_in_the_session_heap_only_for_session_code() {
    assert!(session_heap::init());
    assert!(session_heap::route_sqlite());
    use rusqlite::ffi;

    // SQLite's own allocations follow the thread's flag.
    // SAFETY: SQLite's allocator, used as documented: each pointer freed once.
    unsafe {
        let inside = run_within(|| ffi::sqlite3_malloc(1000));
        let plain = ffi::sqlite3_malloc(1000);
        assert!(holds(inside as *const u8));
        assert!(!holds(plain as *const u8));
        assert!(ffi::sqlite3_msize(inside) >= 1000);
        assert!(ffi::sqlite3_msize(plain) >= 1000);
        // Grown by anyone, an allocation stays in its heap; freed by anyone.
        let inside = ffi::sqlite3_realloc(inside, 100_000);
        assert!(holds(inside as *const u8));
        let plain = run_within(|| ffi::sqlite3_realloc(plain, 100_000));
        assert!(!holds(plain as *const u8));
        run_within(|| ffi::sqlite3_free(plain));
        ffi::sqlite3_free(inside);
    }

    // A key store's connection: opened and used as a session (its page cache in the
    // session heap), read from outside, closed from outside.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.db");
    let conn = run_within(|| {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(
            "PRAGMA journal_mode=WAL; CREATE TABLE k (id INTEGER PRIMARY KEY, v BLOB);",
        )
        .unwrap();
        let mut insert = c.prepare("INSERT INTO k (v) VALUES (?1)").unwrap();
        for i in 0..2000u32 {
            insert.execute([i.to_le_bytes().repeat(64)]).unwrap();
        }
        drop(insert);
        c
    });
    let sum: i64 = outside(|| {
        conn.query_row("SELECT sum(length(v)) FROM k", [], |r| r.get(0))
            .unwrap()
    });
    assert_eq!(sum, 2000 * 256);
    drop(conn);
    // botvisor's own database, outside: nothing in the session heap.
    let own = rusqlite::Connection::open(dir.path().join("botvisor.db")).unwrap();
    own.execute_batch("CREATE TABLE t (x TEXT); INSERT INTO t VALUES ('ünïcode');")
        .unwrap();
    let x: String = own.query_row("SELECT x FROM t", [], |r| r.get(0)).unwrap();
    assert!(!holds(x.as_ptr()));
    assert_eq!(x, "ünïcode");
    session_heap::purge();
}

mod actors {
    //! The supervisor and a session actor on a link of the test's own.

    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use botvisor::session_heap::{self, holds};
    use botvisor_actors::*;
    use ractor::Actor;

    #[derive(Default)]
    struct Rows(Mutex<Vec<(String, SessionState)>>);

    impl Persistence for Rows {
        fn insert(&self, rec: &SessionRecord) {
            self.save(rec)
        }
        fn save(&self, rec: &SessionRecord) {
            self.0
                .lock()
                .unwrap()
                .push((rec.user_id.clone(), rec.state));
        }
        fn delete(&self, _user_id: &str, _by: Option<&str>) {}
        fn flush(&self) -> BoxFuture<'static, Result<(), StorageError>> {
            Box::pin(async { Ok(()) })
        }
    }

    /// What each `connect` saw: the session flag, and where its spec and a buffer it made
    /// were allocated.
    #[derive(Default)]
    struct ZoneLink {
        connects: AtomicUsize,
        outside: Mutex<Vec<String>>,
    }

    struct Conn(#[allow(dead_code)] Vec<u8>);

    impl Connection for Conn {
        fn logout(&mut self) -> BoxFuture<'_, Result<(), LinkError>> {
            Box::pin(async { Ok(()) })
        }
        fn close(&mut self) -> BoxFuture<'_, ()> {
            Box::pin(async {})
        }
    }

    impl Link for ZoneLink {
        fn name(&self) -> &'static str {
            "zone-test"
        }
        fn connect(
            &self,
            spec: SessionSpec,
            events: EventSink,
        ) -> BoxFuture<'static, Result<Box<dyn Connection>, LinkError>> {
            self.connects.fetch_add(1, Ordering::SeqCst);
            let buffer = vec![7u8; 4096];
            let made_inside = botvisor_heap_zone::inside()
                && holds(spec.user_id.as_ptr())
                && holds(buffer.as_ptr());
            if !made_inside {
                self.outside.lock().unwrap().push(spec.user_id.clone());
            }
            Box::pin(async move {
                events.emit(LinkEvent::Online {
                    name: Some(format!("bot ünï {}", spec.user_id)),
                });
                Ok(Box::new(Conn(buffer)) as Box<dyn Connection>)
            })
        }
        fn remove_data(&self, _user_id: &str) -> Result<(), LinkError> {
            Ok(())
        }
    }

    async fn state_of(sup: &ractor::ActorRef<SupervisorMsg>, id: &str) -> SessionState {
        let id = id.to_string();
        ractor::call!(sup, |reply| SupervisorMsg::Get { user_id: id, reply })
            .unwrap()
            .unwrap()
            .state
    }

    async fn until_online(sup: &ractor::ActorRef<SupervisorMsg>, id: &str) {
        for _ in 0..500 {
            if state_of(sup, id).await == SessionState::Online {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{id} never came online");
    }

    /// The session's actor and what its link's `connect` makes are session code: with the
    /// session heap, they are allocated there (so they go with the session, not among the
    /// records that outlive it), and sessions stop and start again with their memory freed
    /// across both heaps.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sessions_actor_and_connection_are_made_as_session_code() {
        assert!(session_heap::init());
        let link = Arc::new(ZoneLink::default());
        let rows = Arc::new(Rows::default());
        let config = SupervisorConfig {
            create_timeout: Duration::from_secs(5),
            ..SupervisorConfig::default()
        };
        let (sup, _) = Actor::spawn(
            None,
            Supervisor,
            SupervisorArgs {
                config,
                link: link.clone(),
                persistence: rows.clone(),
                boot: Vec::new(),
            },
        )
        .await
        .unwrap();
        let ids: Vec<String> = (0..20).map(|i| format!("zone-{i}")).collect();
        for id in &ids {
            let user_id = id.clone();
            ractor::call!(sup, |reply| SupervisorMsg::Create {
                user_id,
                phone_number: "15550001111".into(),
                by: None,
                reply
            })
            .unwrap()
            .unwrap();
        }
        for round in 0..3 {
            for id in &ids {
                until_online(&sup, id).await;
            }
            for id in &ids {
                let user_id = id.clone();
                ractor::call!(sup, |reply| SupervisorMsg::Stop {
                    user_id,
                    by: None,
                    reply
                })
                .unwrap()
                .unwrap();
                assert_eq!(state_of(&sup, id).await, SessionState::Stopped);
            }
            session_heap::purge();
            if round < 2 {
                for id in &ids {
                    let user_id = id.clone();
                    ractor::call!(sup, |reply| SupervisorMsg::Start {
                        user_id,
                        by: None,
                        reply
                    })
                    .unwrap()
                    .unwrap();
                }
            }
        }
        assert_eq!(link.connects.load(Ordering::SeqCst), 60);
        assert_eq!(link.outside.lock().unwrap().as_slice(), &[] as &[String]);
        let name = {
            let user_id = ids[0].clone();
            ractor::call!(sup, |reply| SupervisorMsg::Get { user_id, reply })
                .unwrap()
                .unwrap()
                .name
        };
        assert_eq!(name.as_deref(), Some("bot ünï zone-0"));
        assert!(rows.0.lock().unwrap().len() >= 60 * 3);
        sup.stop(None);
    }
}
