DROP INDEX IF EXISTS idx_msg_secrets_created;
DROP TABLE IF EXISTS msg_secrets;
