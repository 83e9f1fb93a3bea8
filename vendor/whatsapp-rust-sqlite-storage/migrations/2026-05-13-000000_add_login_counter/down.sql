ALTER TABLE device DROP COLUMN login_counter;
