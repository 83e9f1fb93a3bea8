-- Drop the SKDM recipients table
DROP INDEX IF EXISTS idx_skdm_recipients_group;
DROP TABLE IF EXISTS skdm_recipients;
