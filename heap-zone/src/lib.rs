//! Which heap a thread allocates from: a WhatsApp session's or the process's.
//!
//! botvisor's global allocator (`src/session_heap.rs`) reads [`inside`] on every
//! allocation. This flag lives in a crate of its own, with no dependency, so that the
//! vendored whatsapp-rust SQLite store can carry it to its blocking work
//! ([`inherit`]): the session's key store then allocates (SQLite's page cache included)
//! from the session's heap, not among botvisor's long-lived records.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

thread_local! {
    /// Set while this thread runs a session's code.
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

/// Whether this thread runs a session's code now.
#[inline]
pub fn inside() -> bool {
    INSIDE.with(Cell::get)
}

/// Sets the flag while it lives, then puts back what was.
struct Enter(bool);

impl Enter {
    fn new(inside: bool) -> Enter {
        Enter(INSIDE.with(|c| c.replace(inside)))
    }
}

impl Drop for Enter {
    fn drop(&mut self) {
        INSIDE.with(|c| c.set(self.0));
    }
}

/// `future`, each poll of which runs as a session's code.
pub fn within<F: Future>(future: F) -> Within<F> {
    Within(future)
}

/// A future polled as a session's code.
pub struct Within<F>(F);

impl<F: Future> Future for Within<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let _inside = Enter::new(true);
        // SAFETY: a plain projection; the inner future is never moved out.
        unsafe { self.map_unchecked_mut(|w| &mut w.0) }.poll(cx)
    }
}

/// Runs `f` as a session's code.
pub fn run_within<R>(f: impl FnOnce() -> R) -> R {
    let _inside = Enter::new(true);
    f()
}

/// Runs `f` as the process's code (what it makes may outlive the session).
pub fn outside<R>(f: impl FnOnce() -> R) -> R {
    let _outside = Enter::new(false);
    f()
}

/// `f`, to run on another thread as the code that made it runs now: a session's blocking
/// work stays a session's.
pub fn inherit<R>(f: impl FnOnce() -> R) -> impl FnOnce() -> R {
    let was = inside();
    move || {
        let _same = Enter::new(was);
        f()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_nests_and_travels_with_inherited_work() {
        assert!(!inside());
        let on_thread = run_within(|| {
            assert!(inside());
            outside(|| assert!(!inside()));
            assert!(inside());
            let work = inherit(inside);
            std::thread::spawn(work).join().unwrap()
        });
        assert!(on_thread);
        assert!(!inside());
        assert!(!std::thread::spawn(inherit(inside)).join().unwrap());
    }
}
