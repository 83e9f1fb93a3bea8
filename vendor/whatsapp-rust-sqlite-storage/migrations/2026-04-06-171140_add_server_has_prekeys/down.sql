ALTER TABLE device DROP COLUMN server_has_prekeys;
