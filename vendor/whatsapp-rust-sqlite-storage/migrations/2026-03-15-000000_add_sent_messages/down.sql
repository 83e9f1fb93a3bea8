DROP TABLE IF EXISTS sent_messages;
