//! The signature every delivery carries, and event ids.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use botvisor_actors::now_ms;

/// The signature header's value for `body` sent at `timestamp`.
pub fn signature(secret: &str, timestamp: u64, body: &str) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// An event id derived from `parts` (SHA-256, 128 bits): the same parts, the same id.
pub fn derived_event_id(parts: &[&str]) -> String {
    use sha2::Digest;
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p.as_bytes());
    }
    format!("evt_{}", hex::encode(&h.finalize()[..16]))
}

/// A new event id (random, 128 bits).
pub fn event_id() -> String {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(now_ms());
    let a = h.finish();
    let mut h = RandomState::new().build_hasher();
    h.write_u64(a);
    format!("evt_{a:016x}{:016x}", h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_over_timestamp_dot_body() {
        // Checked against: printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac secret
        assert_eq!(
            signature("secret", 1_700_000_000, r#"{"a":1}"#),
            "v1=49f24e537407743fa4a0242bb63b94b9a47ee99cbbe071ccd8a22550ae411686"
        );
    }
}
