ALTER TABLE device DROP COLUMN lid_migrated;
