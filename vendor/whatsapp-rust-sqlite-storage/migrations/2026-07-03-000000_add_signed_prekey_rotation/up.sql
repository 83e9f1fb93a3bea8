ALTER TABLE device ADD COLUMN last_signed_pre_key_rotation_ms BIGINT NOT NULL DEFAULT 0;
