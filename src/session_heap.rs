//! The real link's sessions allocate in a heap of their own.
//!
//! A WhatsApp client's memory is short-lived next to botvisor's: it comes and goes with
//! each connection, while the records of the store's view, the supervisor's entries and
//! the audit of each session live as long as the session. In one allocator the two mix on
//! the same pages, and after a mass stop each page that still carries one of botvisor's
//! small records stays resident with the freed client memory around it (issue 26: a
//! quarter of what 1,000 sessions grew stayed after stopping them all, with only ~5 KiB
//! per session still allocated).
//!
//! So what runs *in* a session's client (the futures the link polls, the tasks
//! whatsapp-rust spawns, its blocking work) allocates from a jemalloc arena of its own,
//! whose extents come from one reserved range of address space, and everything else
//! from the process's allocator (glibc, or jemalloc with `--features jemalloc`). A
//! pointer's range tells which heap frees it, so memory may cross freely: a string made
//! in the client and kept by botvisor is freed into the session heap when botvisor drops
//! it. Once the sessions stop, their heap holds nothing and [`purge`] gives its pages
//! back.
//!
//! The heap exists only once [`init`] ran (the binary, for `--link whatsapp`); before
//! that, or where [`SessionHeapAlloc`] is not the global allocator, [`within`] changes
//! nothing. When the session heap cannot serve an allocation (its range is full, jemalloc
//! failed), the process's allocator serves it.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicUsize, Ordering};

use tikv_jemalloc_sys as je;

pub use botvisor_heap_zone::{outside, run_within, within, Within};

/// Address space reserved for the session heap (nothing is committed until used).
const RESERVE: usize = 64 << 30;

/// jemalloc's alignment without flags (x86-64, aarch64).
const MIN_ALIGN: usize = 16;

/// The reserved range `[START, END)`; both 0 until [`init`].
static START: AtomicUsize = AtomicUsize::new(0);
static END: AtomicUsize = AtomicUsize::new(0);
/// The next unused address of the range.
static NEXT: AtomicUsize = AtomicUsize::new(0);
/// jemalloc's flags for the session heap's arena (0: no session heap).
static FLAGS: AtomicUsize = AtomicUsize::new(0);
/// The arena's index, for its purge.
static ARENA: AtomicUsize = AtomicUsize::new(usize::MAX);

/// The global allocator: the session heap for what session code allocates, `A` for the
/// rest.
pub struct SessionHeapAlloc<A>(pub A);

#[inline]
fn in_range(ptr: *mut u8) -> bool {
    let p = ptr as usize;
    p >= START.load(Ordering::Relaxed) && p < END.load(Ordering::Relaxed)
}

/// The session heap's arena flags, when this thread runs session code and the heap exists.
#[inline]
fn session_base() -> Option<i32> {
    let base = FLAGS.load(Ordering::Relaxed);
    (base != 0 && botvisor_heap_zone::inside()).then_some(base as i32)
}

/// The session heap's flags for this layout, as [`session_base`].
#[inline]
fn session_flags(layout: &Layout) -> Option<i32> {
    session_base().map(|base| base | align_flags(layout))
}

#[inline]
fn align_flags(layout: &Layout) -> i32 {
    if layout.align() <= MIN_ALIGN && layout.align() <= layout.size() {
        0
    } else {
        je::MALLOCX_ALIGN(layout.align())
    }
}

/// The flags to free or resize an allocation of the session heap.
#[inline]
fn owned_flags(layout: &Layout) -> i32 {
    arena_flags() | align_flags(layout)
}

// SAFETY: every pointer handed out comes from either jemalloc's session arena (inside
// the reserved range) or `A` (outside it, as `A`'s allocations never come from that
// range: it is mapped by this module alone), and each is freed or resized by the one
// it came from, with the layout Rust passes back.
unsafe impl<A: GlobalAlloc> GlobalAlloc for SessionHeapAlloc<A> {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if let Some(flags) = session_flags(&layout) {
            // SAFETY: a non-zero size (GlobalAlloc's contract) and valid flags.
            let p = unsafe { je::mallocx(layout.size(), flags) } as *mut u8;
            if !p.is_null() {
                return p;
            }
        }
        // SAFETY: forwarded as received.
        unsafe { self.0.alloc(layout) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if let Some(flags) = session_flags(&layout) {
            // SAFETY: as in `alloc`.
            let p = unsafe { je::mallocx(layout.size(), flags | je::MALLOCX_ZERO) } as *mut u8;
            if !p.is_null() {
                return p;
            }
        }
        // SAFETY: forwarded as received.
        unsafe { self.0.alloc_zeroed(layout) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if in_range(ptr) {
            // SAFETY: allocated by the session arena with this layout.
            unsafe { je::sdallocx(ptr as *mut _, layout.size(), owned_flags(&layout)) }
        } else {
            // SAFETY: allocated by `A` with this layout.
            unsafe { self.0.dealloc(ptr, layout) }
        }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if in_range(ptr) {
            // SAFETY: allocated by the session arena with this layout; the arena flag
            // keeps a moved allocation in it.
            unsafe { je::rallocx(ptr as *mut _, new_size, owned_flags(&layout)) as *mut u8 }
        } else {
            // SAFETY: allocated by `A` with this layout.
            unsafe { self.0.realloc(ptr, layout, new_size) }
        }
    }
}

/// Sets up the session heap: reserves its address range and makes its jemalloc arena.
/// Called once, before any session starts; a second call does nothing. Returns whether
/// the heap exists (it does not when the range cannot be reserved or jemalloc refuses
/// the arena: sessions then allocate as everything else does).
pub fn init() -> bool {
    use std::sync::OnceLock;
    static DONE: OnceLock<bool> = OnceLock::new();
    *DONE.get_or_init(|| {
        // SAFETY: a fresh private mapping with no access, only reserving addresses.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                RESERVE,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return false;
        }
        let base = base as usize;
        NEXT.store(base, Ordering::SeqCst);
        START.store(base, Ordering::SeqCst);
        END.store(base + RESERVE, Ordering::SeqCst);
        // jemalloc keeps this pointer for the arena's whole life: a static.
        static mut HOOKS: je::extent_hooks_t = je::extent_hooks_t {
            alloc: Some(extent_alloc),
            dalloc: Some(extent_dalloc),
            destroy: None,
            commit: None,
            decommit: None,
            purge_lazy: None,
            purge_forced: Some(extent_purge),
            split: Some(extent_split_ok),
            merge: Some(extent_merge_ok),
        };
        let mut arena: libc::c_uint = 0;
        let mut len = std::mem::size_of::<libc::c_uint>();
        // SAFETY: a pointer to the static hooks, which outlive the arena.
        let mut hooks: *mut je::extent_hooks_t = &raw mut HOOKS;
        // SAFETY: the documented `arenas.create` call: the new arena's index out, the
        // hooks in.
        let rc = unsafe {
            je::mallctl(
                c"arenas.create".as_ptr(),
                &mut arena as *mut _ as *mut _,
                &mut len,
                &mut hooks as *mut _ as *mut _,
                std::mem::size_of::<*mut je::extent_hooks_t>(),
            )
        };
        if rc != 0 {
            return false;
        }
        // Freed pages go back after a second of the arena's activity, and at once on a
        // purge (after stops).
        set_decay(arena, c"dirty_decay_ms", 1000);
        set_decay(arena, c"muzzy_decay_ms", 0);
        ARENA.store(arena as usize, Ordering::SeqCst);
        FLAGS.store(
            (je::MALLOCX_ARENA(arena as usize) | je::MALLOCX_TCACHE_NONE) as usize,
            Ordering::SeqCst,
        );
        true
    })
}

fn set_decay(arena: libc::c_uint, what: &std::ffi::CStr, ms: isize) {
    let Ok(name) = std::ffi::CString::new(format!("arena.{arena}.{}", what.to_string_lossy()))
    else {
        return;
    };
    let mut value: libc::ssize_t = ms;
    // SAFETY: writing an ssize_t setting of an existing arena.
    unsafe {
        je::mallctl(
            name.as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            &mut value as *mut _ as *mut _,
            std::mem::size_of::<libc::ssize_t>(),
        );
    }
}

/// Gives the session heap's freed pages back to the system at once.
pub fn purge() {
    let arena = ARENA.load(Ordering::SeqCst);
    if arena == usize::MAX {
        return;
    }
    let Ok(name) = std::ffi::CString::new(format!("arena.{arena}.purge")) else {
        return;
    };
    // SAFETY: a write-nothing, read-nothing control call on an existing arena.
    unsafe {
        je::mallctl(
            name.as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        );
    }
}

/// Gives SQLite an allocator that serves a session's key store (its connections' page
/// cache and schema, allocated on the store's blocking threads, which run as the session:
/// `botvisor_heap_zone::inherit`) from the session heap, and every other connection
/// (botvisor's own database) from `malloc`, as before. Without it the key stores' SQLite
/// memory, the largest part of a session's while its store is open, came and went in glibc's
/// arenas among botvisor's long-lived records. Called before SQLite's first use, after
/// [`init`]; false when SQLite refused (it was already in use) or there is no session heap.
pub fn route_sqlite() -> bool {
    use rusqlite::ffi;
    if !exists() {
        return false;
    }
    let methods = ffi::sqlite3_mem_methods {
        xMalloc: Some(sqlite_malloc),
        xFree: Some(sqlite_free),
        xRealloc: Some(sqlite_realloc),
        xSize: Some(sqlite_size),
        xRoundup: Some(sqlite_roundup),
        xInit: Some(sqlite_init),
        xShutdown: Some(sqlite_shutdown),
        pAppData: std::ptr::null_mut(),
    };
    // SAFETY: SQLite copies the methods before returning; it refuses the change
    // (SQLITE_MISUSE) once initialised.
    let rc = unsafe { ffi::sqlite3_config(ffi::SQLITE_CONFIG_MALLOC, &methods) };
    rc == ffi::SQLITE_OK
}

/// jemalloc's flags for the session heap's arena (to free or resize what it made; SQLite's
/// allocations need no alignment flag).
fn arena_flags() -> i32 {
    FLAGS.load(Ordering::Relaxed) as i32
}

unsafe extern "C" fn sqlite_malloc(n: std::ffi::c_int) -> *mut std::ffi::c_void {
    let n = n.max(1) as usize;
    if let Some(flags) = session_base() {
        // SAFETY: a non-zero size and the arena's flags.
        let p = unsafe { je::mallocx(n, flags) };
        if !p.is_null() {
            return p;
        }
    }
    // SAFETY: plain malloc.
    unsafe { libc::malloc(n) }
}

unsafe extern "C" fn sqlite_free(p: *mut std::ffi::c_void) {
    if p.is_null() {
        return;
    }
    if in_range(p as *mut u8) {
        // SAFETY: allocated by the session arena (`sqlite_malloc`/`sqlite_realloc`).
        unsafe { je::dallocx(p, arena_flags()) }
    } else {
        // SAFETY: allocated by malloc.
        unsafe { libc::free(p) }
    }
}

unsafe extern "C" fn sqlite_realloc(
    p: *mut std::ffi::c_void,
    n: std::ffi::c_int,
) -> *mut std::ffi::c_void {
    if p.is_null() {
        // SAFETY: as `sqlite_malloc`.
        return unsafe { sqlite_malloc(n) };
    }
    let n = n.max(1) as usize;
    if in_range(p as *mut u8) {
        // SAFETY: allocated by the session arena; stays in it.
        unsafe { je::rallocx(p, n, arena_flags()) }
    } else {
        // SAFETY: allocated by malloc.
        unsafe { libc::realloc(p, n) }
    }
}

unsafe extern "C" fn sqlite_size(p: *mut std::ffi::c_void) -> std::ffi::c_int {
    if p.is_null() {
        return 0;
    }
    let size = if in_range(p as *mut u8) {
        // SAFETY: allocated by the session arena.
        unsafe { je::sallocx(p, arena_flags()) }
    } else {
        // SAFETY: allocated by malloc.
        unsafe { libc::malloc_usable_size(p) }
    };
    size.min(i32::MAX as usize) as std::ffi::c_int
}

unsafe extern "C" fn sqlite_roundup(n: std::ffi::c_int) -> std::ffi::c_int {
    n.saturating_add(7) & !7
}

unsafe extern "C" fn sqlite_init(_: *mut std::ffi::c_void) -> std::ffi::c_int {
    0
}

unsafe extern "C" fn sqlite_shutdown(_: *mut std::ffi::c_void) {}

/// Whether `ptr` was allocated by the session heap.
pub fn holds<T: ?Sized>(ptr: *const T) -> bool {
    in_range(ptr as *const u8 as *mut u8)
}

/// Whether the session heap exists.
pub fn exists() -> bool {
    FLAGS.load(Ordering::Relaxed) != 0
}

/// Takes `size` bytes aligned to `alignment` from the reserved range, made readable and
/// writable. jemalloc asks for a fresh extent; a request for a given address is refused.
unsafe extern "C" fn extent_alloc(
    _hooks: *mut je::extent_hooks_t,
    new_addr: *mut libc::c_void,
    size: usize,
    alignment: usize,
    zero: *mut bool,
    commit: *mut bool,
    _arena: libc::c_uint,
) -> *mut libc::c_void {
    if !new_addr.is_null() || size == 0 || !alignment.is_power_of_two() {
        return std::ptr::null_mut();
    }
    let end = END.load(Ordering::SeqCst);
    let mut next = NEXT.load(Ordering::SeqCst);
    let start = loop {
        let start = (next + alignment - 1) & !(alignment - 1);
        let Some(stop) = start.checked_add(size).filter(|s| *s <= end) else {
            return std::ptr::null_mut();
        };
        match NEXT.compare_exchange(next, stop, Ordering::SeqCst, Ordering::SeqCst) {
            Ok(_) => break start,
            Err(now) => next = now,
        }
    };
    // SAFETY: `[start, start + size)` lies in the range this module reserved and no one
    // else was given it.
    let rc = unsafe { libc::mprotect(start as *mut _, size, libc::PROT_READ | libc::PROT_WRITE) };
    if rc != 0 {
        return std::ptr::null_mut();
    }
    // SAFETY: jemalloc passes valid out-pointers. Fresh anonymous pages read as zeroes.
    unsafe {
        *zero = true;
        *commit = true;
    }
    start as *mut _
}

/// Extents are never unmapped (jemalloc keeps them for reuse, purged).
unsafe extern "C" fn extent_dalloc(
    _hooks: *mut je::extent_hooks_t,
    _addr: *mut libc::c_void,
    _size: usize,
    _committed: bool,
    _arena: libc::c_uint,
) -> bool {
    true // opt out
}

/// Gives the pages back; they read as zeroes afterwards.
unsafe extern "C" fn extent_purge(
    _hooks: *mut je::extent_hooks_t,
    addr: *mut libc::c_void,
    _size: usize,
    offset: usize,
    length: usize,
    _arena: libc::c_uint,
) -> bool {
    // SAFETY: a page-aligned part of an extent of the reserved range.
    let rc = unsafe {
        libc::madvise(
            (addr as usize + offset) as *mut _,
            length,
            libc::MADV_DONTNEED,
        )
    };
    rc != 0
}

unsafe extern "C" fn extent_split_ok(
    _hooks: *mut je::extent_hooks_t,
    _addr: *mut libc::c_void,
    _size: usize,
    _size_a: usize,
    _size_b: usize,
    _committed: bool,
    _arena: libc::c_uint,
) -> bool {
    false // allowed: the extents are parts of one mapping
}

unsafe extern "C" fn extent_merge_ok(
    _hooks: *mut je::extent_hooks_t,
    _addr_a: *mut libc::c_void,
    _size_a: usize,
    _addr_b: *mut libc::c_void,
    _size_b: usize,
    _committed: bool,
    _arena: libc::c_uint,
) -> bool {
    false // allowed
}

#[cfg(test)]
#[global_allocator]
static TEST_ALLOCATOR: SessionHeapAlloc<std::alloc::System> = SessionHeapAlloc(std::alloc::System);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_code_allocates_in_the_session_heap_and_anything_frees_anything() {
        assert!(init());
        assert!(exists());
        let plain = vec![1u8; 100];
        assert!(!holds(plain.as_ptr()));
        let mut session = run_within(|| vec![2u8; 100]);
        assert!(holds(session.as_ptr()));
        // Grown outside the session code: stays in the session heap.
        session.extend(std::iter::repeat_n(3u8, 100_000));
        assert!(holds(session.as_ptr()));
        assert_eq!(session[..100], [2u8; 100]);
        // Botvisor's code called from the session allocates outside.
        let kept = run_within(|| outside(|| String::from("kept")));
        assert!(!holds(kept.as_ptr()));
        // Over-aligned and zeroed allocations.
        #[repr(align(4096))]
        struct Page([u8; 4096]);
        let page = run_within(|| Box::new(Page([9; 4096])));
        assert!(holds(&*page as *const Page));
        assert_eq!(page.0[4095], 9);
        assert_eq!(&*page as *const Page as usize % 4096, 0);
        let zeroed = run_within(|| vec![0u64; 10_000]);
        assert!(zeroed.iter().all(|x| *x == 0));
        drop((plain, session, page, zeroed));
        purge();
    }

    #[test]
    fn a_future_allocates_in_the_session_heap_only_while_polled() {
        assert!(init());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (inside, after) = runtime.block_on(async {
            let inside = tokio::spawn(within(async {
                tokio::task::yield_now().await;
                let v = vec![7u8; 64];
                tokio::task::yield_now().await;
                v
            }))
            .await
            .unwrap();
            (inside, vec![8u8; 64])
        });
        assert!(holds(inside.as_ptr()));
        assert!(!holds(after.as_ptr()));
    }

    #[test]
    fn threads_allocating_and_freeing_across_both_heaps_lose_nothing() {
        assert!(init());
        let (tx, rx) = std::sync::mpsc::channel::<Vec<String>>();
        let makers: Vec<_> = (0..4)
            .map(|t| {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for round in 0..200 {
                        let batch = run_within(|| {
                            (0..50)
                                .map(|i| format!("{t}-{round}-{i}-{}", "x".repeat(i * 7)))
                                .collect::<Vec<_>>()
                        });
                        tx.send(batch).unwrap();
                    }
                })
            })
            .collect();
        drop(tx);
        let mut seen = 0;
        for mut batch in rx {
            for s in &mut batch {
                assert!(holds(s.as_ptr()) || s.is_empty());
                s.push_str("-seen"); // grown by another thread, outside
            }
            seen += batch.len();
        }
        for m in makers {
            m.join().unwrap();
        }
        assert_eq!(seen, 4 * 200 * 50);
        purge();
    }
}
