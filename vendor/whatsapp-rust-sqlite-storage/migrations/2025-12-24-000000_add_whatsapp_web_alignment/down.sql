DROP TABLE IF EXISTS sender_key_status;
DROP TABLE IF EXISTS device_registry;
DROP TABLE IF EXISTS base_keys;
