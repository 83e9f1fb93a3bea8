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
