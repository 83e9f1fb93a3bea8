ALTER TABLE device DROP COLUMN last_signed_pre_key_rotation_ms;
