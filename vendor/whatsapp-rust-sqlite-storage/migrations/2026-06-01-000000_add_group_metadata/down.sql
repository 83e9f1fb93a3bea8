DROP TABLE IF EXISTS group_metadata;
