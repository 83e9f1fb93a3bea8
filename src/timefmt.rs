//! How times look on the wire: a leaf module every layer may use.

/// A time (ms since the epoch) as the API shows it: ISO 8601, UTC, milliseconds, `Z`.
pub fn iso(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

/// An RFC 3339 time (`2026-12-05T10:00:00Z`, with or without fractions or an offset
/// of `Z`) as ms since the epoch; `None` if it is not one.
pub fn parse_iso(s: &str) -> Option<u64> {
    let t = humantime::parse_rfc3339_weak(s.trim()).ok()?;
    u64::try_from(t.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis()).ok()
}

#[cfg(test)]
mod tests {
    use super::{iso, parse_iso};

    #[test]
    fn iso_times_parse_back() {
        assert_eq!(
            parse_iso("2024-01-15T12:30:00.000Z"),
            Some(1_705_321_800_000)
        );
        assert_eq!(parse_iso("2024-01-15T12:30:00Z"), Some(1_705_321_800_000));
        assert_eq!(parse_iso("tomorrow"), None);
    }

    #[test]
    fn times_are_iso_utc_with_millis() {
        assert_eq!(iso(1_705_321_800_000), "2024-01-15T12:30:00.000Z");
    }
}
