//! How times look on the wire: a leaf module every layer may use.

/// A time (ms since the epoch) as the API shows it: ISO 8601, UTC, milliseconds, `Z`.
pub fn iso(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::iso;

    #[test]
    fn times_are_iso_utc_with_millis() {
        assert_eq!(iso(1_705_321_800_000), "2024-01-15T12:30:00.000Z");
    }
}
