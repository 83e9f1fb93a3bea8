//! API key checks, in constant time.

use hyper::header::{HeaderMap, AUTHORIZATION};

/// The key a request carries: `X-API-Key`, or `Authorization: Bearer <key>` (what most
/// HTTP clients and API gateways send).
pub fn given_key(headers: &HeaderMap) -> Option<&[u8]> {
    if let Some(v) = headers.get("x-api-key") {
        return Some(v.as_bytes());
    }
    let auth = headers.get(AUTHORIZATION)?.as_bytes();
    let (scheme, key) = auth.split_at_checked(7)?;
    scheme.eq_ignore_ascii_case(b"bearer ").then_some(key)
}

/// Compares two secrets without an early exit: the time taken depends only on the
/// length of `expected`, never on where the first difference is.
pub fn keys_match(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = (given.len() ^ expected.len()) as u64;
    for (i, e) in expected.iter().enumerate() {
        let g = given.get(i).copied().unwrap_or(0);
        diff |= u64::from(g ^ e);
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::{given_key, keys_match};
    use hyper::header::{HeaderMap, HeaderValue, AUTHORIZATION};

    #[test]
    fn the_key_comes_from_x_api_key_or_a_bearer_token() {
        let mut h = HeaderMap::new();
        assert_eq!(given_key(&h), None);
        h.insert(AUTHORIZATION, HeaderValue::from_static("bearer k1"));
        assert_eq!(given_key(&h), Some(&b"k1"[..]));
        h.insert(AUTHORIZATION, HeaderValue::from_static("Basic k1"));
        assert_eq!(given_key(&h), None);
        h.insert("x-api-key", HeaderValue::from_static("k2"));
        assert_eq!(given_key(&h), Some(&b"k2"[..]));
    }

    #[test]
    fn only_the_exact_key_matches() {
        assert!(keys_match(b"secret-key", b"secret-key"));
        assert!(!keys_match(b"secret-kex", b"secret-key"));
        assert!(!keys_match(b"secret-ke", b"secret-key"));
        assert!(!keys_match(b"secret-key!", b"secret-key"));
        assert!(!keys_match(b"", b"secret-key"));
        assert!(!keys_match(b"secret-key\0", b"secret-key"));
    }
}
