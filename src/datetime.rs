//! UTC timestamps as Unix seconds, and the two datetime spellings Mimecast uses.

use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{OffsetDateTime, UtcOffset};

/// Parses `2015-11-16T14:49:18+0000` (Mimecast's documented form) or RFC 3339 (`Z`, `+00:00`, fractions).
pub fn parse(s: &str) -> Option<i64> {
    let mimecast =
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second][offset_hour sign:mandatory][offset_minute]");
    OffsetDateTime::parse(s, &mimecast).or_else(|_| OffsetDateTime::parse(s, &Rfc3339)).ok().map(|t| t.unix_timestamp())
}

/// The form sent to Mimecast: always UTC, numeric offset without a colon.
pub fn mimecast(secs: i64) -> String {
    let fmt = format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]+0000");
    to_utc(secs).format(&fmt).unwrap_or_else(|_| secs.to_string())
}

/// RFC 3339 in UTC with a `Z`, for status output and restamped logs.
pub fn rfc3339(secs: i64) -> String {
    to_utc(secs).format(&Rfc3339).unwrap_or_else(|_| secs.to_string())
}

fn to_utc(secs: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(secs).unwrap_or(OffsetDateTime::UNIX_EPOCH).to_offset(UtcOffset::UTC)
}

/// Seconds since the Unix epoch, now.
pub fn now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_spellings() {
        let check = |s: &str, want: Option<i64>| assert_eq!(parse(s), want, "{s}");
        check("2021-10-18T08:45:02+0000", Some(1_634_546_702));
        check("2021-10-18T08:45:02Z", Some(1_634_546_702));
        check("2021-10-18T08:45:02.250Z", Some(1_634_546_702));
        check("2021-10-18T10:45:02+0200", Some(1_634_546_702));
        check("2021-10-18T10:45:02+02:00", Some(1_634_546_702));
        check("18/10/2021", None);
        check("", None);
    }

    #[test]
    fn formats_utc() {
        assert_eq!(mimecast(1_634_546_702), "2021-10-18T08:45:02+0000");
        assert_eq!(rfc3339(1_634_546_702), "2021-10-18T08:45:02Z");
        assert_eq!(parse(&mimecast(1_700_000_000)), Some(1_700_000_000));
    }
}
