//! Durations and times on the command line and in output: the parsers clap calls for
//! duration arguments, and how times and durations are printed.

use std::time::{Duration, SystemTime};

/// Parses `30s`, `5m`, `500ms`, `1h 30m`; refuses negative ones. (Duration arguments take
/// `allow_hyphen_values`, so that `--delay -5s` reaches this message instead of clap's
/// advice to pass `-5` after `--`.)
pub(crate) fn duration(text: &str) -> Result<Duration, String> {
    if text.trim_start().starts_with('-') {
        return Err("negative durations are not allowed (expected e.g. 500ms, 30s, 5m)".into());
    }
    humantime::parse_duration(text).map_err(|e| format!("{e} (expected e.g. 500ms, 30s, 5m)"))
}

/// [`duration`], and more than zero: for leases, intervals and timeouts, where zero
/// would make no sense.
pub(crate) fn positive_duration(text: &str) -> Result<Duration, String> {
    match duration(text)? {
        zero if zero.is_zero() => Err("must be more than zero (e.g. 500ms, 30s, 5m)".into()),
        positive => Ok(positive),
    }
}

/// A time as RFC 3339 with milliseconds, in UTC (every listing and JSON output).
pub(crate) fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Whole milliseconds, saturating (for JSON `*_ms` fields).
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Parses an RFC 3339 time in UTC (`2025-01-31T09:00:00Z`; `+00:00` or no zone mean UTC
/// too, other offsets are refused).
pub(crate) fn time(text: &str) -> Result<SystemTime, String> {
    humantime::parse_rfc3339_weak(text.trim())
        .map_err(|e| format!("{e} (expected a UTC time such as 2025-01-31T09:00:00Z)"))
}
