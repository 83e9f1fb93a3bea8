//! The tables botvisor keeps, described once for both engines, and their rows as plain
//! values: what `botvisor migrate` copies from one engine to the other. Both engines
//! have the same tables and columns (PostgreSQL's names carry a `bv_` prefix, and its
//! `dead` is a BOOLEAN where SQLite's is 0/1).

/// A column's type, as both engines store it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// TEXT (may be NULL).
    Text,
    /// BIGINT / INTEGER (may be NULL).
    Int,
    /// PostgreSQL INTEGER (SQLite INTEGER).
    Int32,
    /// PostgreSQL BOOLEAN (SQLite 0/1).
    Bool,
}

/// One table.
#[derive(Debug)]
pub struct Table {
    /// SQLite's name; PostgreSQL's is `bv_` and this.
    pub name: &'static str,
    /// Its columns; the first is the primary key, which orders and pages the copy.
    pub columns: &'static [(&'static str, Kind)],
    /// Whether the key is a number the database hands out (a copy keeps it, so the
    /// target's counter must move past it).
    pub generated_key: bool,
}

impl Table {
    /// The primary key column.
    pub fn key(&self) -> &'static str {
        self.columns[0].0
    }

    /// The columns, comma-separated.
    pub fn column_list(&self) -> String {
        self.columns
            .iter()
            .map(|(c, _)| *c)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Every table, in copy order (sessions first: the rest refer to them).
pub const TABLES: &[Table] = &[
    Table {
        name: "sessions",
        columns: &[
            ("user_id", Kind::Text),
            ("phone_number", Kind::Text),
            ("name", Kind::Text),
            ("desired", Kind::Text),
            ("state", Kind::Text),
            ("restarts", Kind::Int),
            ("disconnects", Kind::Int),
            ("last_error", Kind::Text),
            ("created_at", Kind::Int),
            ("updated_at", Kind::Int),
            ("last_seen_at", Kind::Int),
        ],
        generated_key: false,
    },
    Table {
        name: "session_webhooks",
        columns: &[("user_id", Kind::Text), ("url", Kind::Text)],
        generated_key: false,
    },
    Table {
        name: "settings",
        columns: &[("key", Kind::Text), ("value", Kind::Text)],
        generated_key: false,
    },
    Table {
        name: "events",
        columns: &[
            ("id", Kind::Int),
            ("user_id", Kind::Text),
            ("at", Kind::Int),
            ("state", Kind::Text),
            ("detail", Kind::Text),
        ],
        generated_key: true,
    },
    Table {
        name: "outbox",
        columns: &[
            ("id", Kind::Int),
            ("event_id", Kind::Text),
            ("destination", Kind::Text),
            ("user_id", Kind::Text),
            ("kind", Kind::Text),
            ("body", Kind::Text),
            ("created_at", Kind::Int),
            ("attempts", Kind::Int32),
            ("next_at", Kind::Int),
            ("dead", Kind::Bool),
            ("last_error", Kind::Text),
        ],
        generated_key: true,
    },
    Table {
        name: "messages",
        columns: &[
            ("key", Kind::Text),
            ("chat", Kind::Text),
            ("author", Kind::Text),
            ("from_me", Kind::Bool),
            ("at", Kind::Int),
        ],
        generated_key: false,
    },
    Table {
        name: "message_media",
        columns: &[
            ("key", Kind::Text),
            ("locator", Kind::Text),
            ("size", Kind::Int),
            ("mimetype", Kind::Text),
            ("at", Kind::Int),
        ],
        generated_key: false,
    },
    Table {
        name: "message_polls",
        columns: &[
            ("key", Kind::Text),
            ("options", Kind::Text),
            ("at", Kind::Int),
        ],
        generated_key: false,
    },
    Table {
        name: "queued",
        columns: &[
            ("key", Kind::Text),
            ("message_id", Kind::Text),
            ("body", Kind::Text),
            ("at", Kind::Int),
        ],
        generated_key: false,
    },
    Table {
        name: "session_webhook_options",
        columns: &[
            ("user_id", Kind::Text),
            ("events", Kind::Text),
            ("secret", Kind::Text),
        ],
        generated_key: false,
    },
];

/// One value of a row.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
}

impl Value {
    /// As an integer (NULL and text: `None`).
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(v) => Some(*v),
            _ => None,
        }
    }

    /// As text (NULL and numbers: `None`).
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Value::Text(v) => Some(v),
            _ => None,
        }
    }
}

/// A row: one value per column, in the table's column order.
pub type Row = Vec<Value>;
