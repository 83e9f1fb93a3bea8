-- botvisor's one SQL schema (embedded with include_str!).
-- Version 10; the version lives in PRAGMA user_version. Every statement is idempotent, so
-- an older database is migrated by running this file again (v2 added `settings`, v3 the
-- webhook `outbox`, v4 `session_webhooks`, v5 replaced the outbox index `outbox_next` by
-- `outbox_lane`, v6 added `outbox_event`, v7 `messages`, v8 `queued`, v9 `session_webhook_options`,
-- v10 `message_media`).
-- Times are milliseconds since the Unix epoch (UTC).

CREATE TABLE IF NOT EXISTS sessions (
    user_id      TEXT PRIMARY KEY NOT NULL,
    phone_number TEXT NOT NULL,
    name         TEXT,
    desired      TEXT NOT NULL CHECK (desired IN ('running', 'stopped')),
    state        TEXT NOT NULL,
    restarts     INTEGER NOT NULL DEFAULT 0,
    disconnects  INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    last_seen_at INTEGER
) STRICT;

-- State transitions, newest kept per session (older ones are pruned).
CREATE TABLE IF NOT EXISTS events (
    id      INTEGER PRIMARY KEY,
    user_id TEXT NOT NULL,
    at      INTEGER NOT NULL,
    state   TEXT NOT NULL,
    detail  TEXT
) STRICT;

CREATE INDEX IF NOT EXISTS events_by_user ON events (user_id, id);

-- Facts about the data directory, e.g. `link`: the link whose credentials it holds.
CREATE TABLE IF NOT EXISTS settings (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
) STRICT;

-- Webhook deliveries not yet made: written in the same transaction as the change that
-- caused them, deleted once the receiver answered 2xx, kept as dead letters (dead = 1)
-- after the last attempt. Delivered in id order per lane (destination, session).
CREATE TABLE IF NOT EXISTS outbox (
    id          INTEGER PRIMARY KEY,
    event_id    TEXT NOT NULL,
    destination TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    kind        TEXT NOT NULL,
    body        TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    next_at     INTEGER NOT NULL,
    dead        INTEGER NOT NULL DEFAULT 0,
    last_error  TEXT
) STRICT;

-- A lane's head (WHERE dead = 0 AND destination = ? AND user_id = ? ORDER BY id), every
-- lane's head (WHERE dead = 0 GROUP BY destination, user_id) and the backlog's count.
CREATE INDEX IF NOT EXISTS outbox_lane ON outbox (dead, destination, user_id, id);
-- (v3-v4: one delivery thread per destination read its head through this one.)
DROP INDEX IF EXISTS outbox_next;
-- A replay of a dead letter finds its rows by event id (WHERE event_id = ? AND dead = 1).
CREATE INDEX IF NOT EXISTS outbox_event ON outbox (event_id);

-- A session's own webhook receiver (PUT /api/sessions/:id/webhook), besides the global ones.
CREATE TABLE IF NOT EXISTS session_webhooks (
    user_id TEXT PRIMARY KEY NOT NULL,
    url     TEXT NOT NULL
) STRICT;

-- Messages sent and received, by id (v7): what a reaction, an edit, a revoke or a reply
-- needs to name a message on the network. Kept 30 days (db::MESSAGES_KEPT_MS).
CREATE TABLE IF NOT EXISTS messages (
    key     TEXT PRIMARY KEY NOT NULL, -- '<user_id>/<message_id>': one b-tree, a session is a range
    chat    TEXT NOT NULL,
    author  TEXT,
    from_me INTEGER NOT NULL,
    at      INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

-- Where a received media's bytes are (v10): the link's locator, for
-- GET /api/sessions/:userId/messages/:messageId/media. Same key as `messages`; kept and
-- forgotten with it.
CREATE TABLE IF NOT EXISTS message_media (
    key     TEXT PRIMARY KEY NOT NULL,
    locator TEXT NOT NULL,
    size    INTEGER,                   -- bytes, as the sender declared them
    mimetype TEXT,
    at      INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

-- The options of a poll the session sent (v11): a vote names the options it picked by
-- their hashes, so the names are kept to tell them. Same key as `messages`; kept and
-- forgotten with it. `options` is a JSON array of strings.
CREATE TABLE IF NOT EXISTS message_polls (
    key     TEXT PRIMARY KEY NOT NULL,
    options TEXT NOT NULL,
    at      INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

-- Sends waiting in their session's durable outbound queue (v8, `?queue=true`): sent in
-- key order, paced, and removed in the transaction that writes their message.sent or
-- message.failed event.
CREATE TABLE IF NOT EXISTS queued (
    key        TEXT PRIMARY KEY NOT NULL, -- '<user_id>/<seq, 20 digits>': a session's queue is a range, in order
    message_id TEXT NOT NULL,
    body       TEXT NOT NULL,
    at         INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

-- A session's own receiver's options (v9): which events it gets (comma-separated names and
-- families; NULL: every event) and its own signing secret (NULL: --webhook-secret).
CREATE TABLE IF NOT EXISTS session_webhook_options (
    user_id TEXT PRIMARY KEY NOT NULL,
    events  TEXT,
    secret  TEXT
) STRICT;
