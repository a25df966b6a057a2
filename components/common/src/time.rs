//! Timestamps of the wire format: RFC 3339 in UTC with milliseconds.

use chrono::{DateTime, SecondsFormat};

/// Formats milliseconds since the Unix epoch as RFC 3339 in UTC with
/// millisecond precision, for example `2026-12-04T15:02:07.123Z`. Returns
/// `None` past the year 262143, the end of chrono's range.
pub fn rfc3339_from_ms(ms: u64) -> Option<String> {
    let ms = i64::try_from(ms).ok()?;
    let instant = DateTime::from_timestamp_millis(ms)?;
    Some(instant.to_rfc3339_opts(SecondsFormat::Millis, true))
}

/// Returns the wall-clock time in milliseconds since the Unix epoch, for
/// HTTP routes, which get no `now-ms` from the host.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_epoch_and_millis() {
        assert_eq!(
            rfc3339_from_ms(0).as_deref(),
            Some("1970-01-01T00:00:00.000Z")
        );
        assert_eq!(
            rfc3339_from_ms(1_796_396_527_123).as_deref(),
            Some("2026-12-04T15:02:07.123Z")
        );
    }

    #[test]
    fn rejects_out_of_range() {
        assert_eq!(rfc3339_from_ms(u64::MAX), None);
    }
}
