ALTER TABLE device DROP COLUMN first_unupload_pre_key_id;
