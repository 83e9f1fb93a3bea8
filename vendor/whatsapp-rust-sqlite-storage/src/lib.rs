//! SQLite storage backend for whatsapp-rust
//!
//! This crate provides a SQLite-based storage implementation for the whatsapp-rust library.
//! It implements all the required storage traits from wacore::store::traits.

mod schema;
mod shared;
mod sqlite_store;
mod wire;

pub use shared::SharedSqlite;
pub use sqlite_store::{ConnectionInitHook, SqliteStore, SqliteStoreConfig, Synchronous};

/// botvisor's patch: `tokio::task::spawn_blocking`, the work running as the code that
/// spawned it runs (`botvisor_heap_zone::inherit`): a session's key store allocates from
/// the session's own heap, SQLite's memory included (botvisor issue 26; VENDORED.md).
pub(crate) fn spawn_blocking<F, R>(f: F) -> tokio::task::JoinHandle<R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    tokio::task::spawn_blocking(botvisor_heap_zone::inherit(f))
}
