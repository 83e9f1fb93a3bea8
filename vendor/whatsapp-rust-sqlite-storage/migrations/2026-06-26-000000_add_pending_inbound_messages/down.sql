DROP INDEX IF EXISTS idx_pending_inbound_inserted;
DROP TABLE IF EXISTS pending_inbound_messages;
