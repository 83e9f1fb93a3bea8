ALTER TABLE device DROP COLUMN server_cert_chain;
