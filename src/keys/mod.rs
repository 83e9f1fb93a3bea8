//! Where a session's WhatsApp keys live, other than the per-session SQLite file the link
//! opens today (`sessions/<id>.db`, upstream's `SqliteStore`).
//!
//! - [`postgres`]: [`PgKeys`], every session's keys in one PostgreSQL database (one pool,
//!   every table keyed by the session id), and [`PgSessionKeys`], one session's view of it,
//!   which is a whatsapp-rust storage `Backend`.
//! - `inbound`: the received messages' pending-inbound rows of every session, written
//!   through one queue (group commit).
//! - [`copy`]: one session's keys moved whole between PostgreSQL and a `SqliteStore` file
//!   (portable backups and their restore), with [`files`] listing such a file's rows.
//!
//! The real link uses it with `--keys database` (`link::credentials`); the default is
//! still a SQLite file per session. What a backend must answer is pinned by
//! `tests/keystore_contract.rs`, which runs upstream's reference store, SqliteStore and
//! this one through the same sequence.

pub mod copy;
pub mod files;
mod inbound;
pub mod postgres;

pub use postgres::{PgError, PgKeys, PgKeysConfig, PgSessionKeys};
