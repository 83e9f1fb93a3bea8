ALTER TABLE device DROP COLUMN read_receipts_disabled;
