//! API key checks, in constant time.

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
    use super::keys_match;

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
