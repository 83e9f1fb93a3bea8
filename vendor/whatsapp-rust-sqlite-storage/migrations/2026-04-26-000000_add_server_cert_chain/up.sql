ALTER TABLE device ADD COLUMN server_cert_chain BLOB NULL;
