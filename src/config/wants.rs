//! What each config key takes, in words, for the message about a value of the wrong type: serde says
//! `invalid type: string "big", expected u32`; a person reads `must be a whole number from 1 to 1000, got the
//! string "big"`.

/// What a key takes.
#[derive(Debug, Clone, Copy)]
pub(super) enum Wants {
    /// A whole number in the range that `validate` enforces (a test holds the two together), of `unit`.
    Number { lo: i64, hi: i64, unit: &'static str },
    /// Anything else, in words.
    Words(&'static str),
    /// A list, in words: serde names the type of an item, not of the list.
    List(&'static str),
}

use Wants::{List, Number, Words};

const PATH: Wants = Words("a file path in quotes");
const URL: Wants = Words("an http:// or https:// URL in quotes");
const SECONDS: &str = "seconds";

/// The keys of the file and what each takes. A key missing here is described by its type alone
/// (`a whole number`, `true or false`, `a string in quotes`).
pub(super) const KEYS: [(&str, Wants); 28] = [
    ("mimecast.base_url", URL),
    ("mimecast.client_id", Words("a string in quotes")),
    ("mimecast.client_secret_file", PATH),
    ("mimecast.log_types", List("a list of log types in brackets, such as [\"audit\", \"ttp-url\"]")),
    ("mimecast.poll_interval_secs", Number { lo: 1, hi: 86400, unit: SECONDS }),
    ("mimecast.page_size", Number { lo: 1, hi: 1000, unit: "" }),
    ("mimecast.initial_lookback_secs", Number { lo: 0, hi: 10 * 365 * 86400, unit: SECONDS }),
    ("mimecast.settle_secs", Number { lo: 0, hi: 86400, unit: SECONDS }),
    ("mimecast.overlap_secs", Number { lo: 0, hi: 7 * 86400, unit: SECONDS }),
    ("mimecast.max_window_secs", Words("a whole number of seconds, more than mimecast.overlap_secs")),
    ("datadog.site", Words("a Datadog site in quotes, such as \"datadoghq.eu\"")),
    ("datadog.intake_url", URL),
    ("datadog.api_key_file", PATH),
    ("datadog.hostname", Words("a host name in quotes")),
    ("datadog.tags", List("a list of tags in brackets, such as [\"env:prod\"]")),
    ("datadog.late_records", Words("\"restamp\" or \"keep\", in quotes")),
    ("datadog.max_event_age_secs", Number { lo: 60, hi: 64800, unit: SECONDS }),
    ("datadog.sends_in_flight", Number { lo: 1, hi: 16, unit: "" }),
    ("datadog.log_shape", Words("\"full\" or \"message\", in quotes")),
    ("queue.path", PATH),
    ("queue.max_bytes", Number { lo: 1, hi: i64::MAX, unit: "bytes" }),
    ("queue.when_full", Words("\"pause\" or \"drop-oldest\", in quotes")),
    ("http.timeout_secs", Number { lo: 1, hi: 600, unit: SECONDS }),
    ("http.proxy", URL),
    ("http.ca_file", PATH),
    ("telemetry.enabled", Words("true or false")),
    ("telemetry.interval_secs", Number { lo: 1, hi: 3600, unit: SECONDS }),
    ("telemetry.api_url", URL),
];

/// serde's `message` about `key`'s value said for a person, when it is about the value's type or its type's
/// range; `None` for any other error (a syntax error, an unknown key or value), which says itself well enough.
pub(super) fn reword(key: &str, message: &str) -> Option<String> {
    let known = KEYS.iter().find(|(k, _)| *k == key).map(|(_, w)| *w);
    if message == "wanted string or table" {
        // A number or a boolean where one of a few words belongs (`when_full = 3`).
        return Some(format!("must be {}", known.map_or_else(|| "a string in quotes".to_owned(), words)));
    }
    let rest = message.strip_prefix("invalid type: ").or_else(|| message.strip_prefix("invalid value: "))?;
    let (got, expected) = rest.split_once(", expected ")?;
    let got = value(got);
    Some(match known {
        Some(w @ List(_)) if expected != "a sequence" => format!("must be {}; got {got} as an item", words(w)),
        Some(w) => format!("must be {}, got {got}", words(w)),
        None => format!("must be {}, got {got}", by_type(key, expected)),
    })
}

fn words(w: Wants) -> String {
    match w {
        Number { lo, hi, unit: "" } => format!("a whole number from {lo} to {hi}"),
        Number { lo, hi, unit } => format!("a whole number of {unit} from {lo} to {hi}"),
        Words(text) | List(text) => text.to_owned(),
    }
}

/// What serde's name of a type (`u32`, `a boolean`, `struct RawQueue`) means in a config file.
fn by_type(key: &str, expected: &str) -> String {
    let integer = matches!(expected.as_bytes(), [b'u' | b'i', digits @ ..] if digits.iter().all(u8::is_ascii_digit));
    match expected {
        _ if integer && key.ends_with("_secs") => "a whole number of seconds".into(),
        _ if integer => "a whole number".into(),
        "f32" | "f64" => "a number".into(),
        "a boolean" => "true or false".into(),
        "a string" | "a character" => "a string in quotes".into(),
        "path string" => "a file path in quotes".into(),
        "a sequence" => "a list in brackets".into(),
        e if e.starts_with("struct ") || e.contains("map") => format!("a table ([{key}])"),
        e => e.into(),
    }
}

/// serde's account of the value found (`string "big"`, ``integer `5` ``, `sequence`), as a config file says it.
fn value(got: &str) -> String {
    let quoted = |prefix: &str| got.strip_prefix(prefix).map(|v| v.trim_matches('`').to_owned());
    if let Some(s) = got.strip_prefix("string ") {
        return format!("the string {s}");
    }
    quoted("integer ").or_else(|| quoted("floating point ")).or_else(|| quoted("boolean ")).unwrap_or_else(|| match got
    {
        "sequence" => "a list".into(),
        "map" => "a table or a date".into(),
        other => other.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(key: &str, message: &str, expected: Option<&str>) {
        assert_eq!(reword(key, message).as_deref(), expected, "{key}: {message}");
    }

    #[test]
    fn says_what_the_key_wants_and_what_it_got() {
        check(
            "mimecast.page_size",
            "invalid type: string \"big\", expected u32",
            Some("must be a whole number from 1 to 1000, got the string \"big\""),
        );
        check(
            "mimecast.page_size",
            "invalid value: integer `5000000000`, expected u32",
            Some("must be a whole number from 1 to 1000, got 5000000000"),
        );
        check(
            "mimecast.poll_interval_secs",
            "invalid type: string \"60s\", expected i64",
            Some("must be a whole number of seconds from 1 to 86400, got the string \"60s\""),
        );
        check(
            "queue.max_bytes",
            "invalid value: integer `-1`, expected u64",
            Some("must be a whole number of bytes from 1 to 9223372036854775807, got -1"),
        );
        check(
            "datadog.hostname",
            "invalid type: boolean `true`, expected a string",
            Some("must be a host name in quotes, got true"),
        );
        check(
            "mimecast.log_types",
            "invalid type: string \"audit\", expected a sequence",
            Some("must be a list of log types in brackets, such as [\"audit\", \"ttp-url\"], got the string \"audit\""),
        );
        check(
            "mimecast.log_types",
            "invalid type: integer `3`, expected a string",
            Some("must be a list of log types in brackets, such as [\"audit\", \"ttp-url\"]; got 3 as an item"),
        );
        check("queue.when_full", "wanted string or table", Some("must be \"pause\" or \"drop-oldest\", in quotes"));
        check(
            "mimecast.page_size",
            "invalid type: sequence, expected u32",
            Some("must be a whole number from 1 to 1000, got a list"),
        );
    }

    #[test]
    fn keys_it_does_not_know_are_described_by_their_type() {
        check(
            "x.enabled",
            "invalid type: string \"yes\", expected a boolean",
            Some("must be true or false, got the string \"yes\""),
        );
        check(
            "x.interval_secs",
            "invalid type: floating point `1.5`, expected i64",
            Some("must be a whole number of seconds, got 1.5"),
        );
        check("x.count", "invalid value: integer `-2`, expected u32", Some("must be a whole number, got -2"));
        check("x.name", "invalid type: integer `2`, expected a string", Some("must be a string in quotes, got 2"));
        check(
            "x.file",
            "invalid type: integer `2`, expected path string",
            Some("must be a file path in quotes, got 2"),
        );
        check(
            "datadog",
            "invalid type: integer `5`, expected struct RawDatadog",
            Some("must be a table ([datadog]), got 5"),
        );
    }

    #[test]
    fn other_errors_are_left_as_they_are() {
        check("queue.when_full", "unknown variant `block`, expected `pause` or `drop-oldest`", None);
        check("queue.when_ful", "unknown field `when_ful`, expected one of `path`, `max_bytes`, `when_full`", None);
        check("", "invalid table header", None);
    }

    /// The ranges said here are the ones `validate` enforces: each bound is accepted, one beyond it refused.
    #[test]
    fn number_ranges_are_the_ones_validate_enforces() {
        for (key, wants) in KEYS {
            let Number { lo, hi, .. } = wants else { continue };
            let (section, name) = key.split_once('.').unwrap();
            let config = |v: i128| {
                let line = |s: &str| if s == section { format!("{name} = {v}\n") } else { String::new() };
                let mut text = format!(
                    "[mimecast]\nclient_id = \"i\"\nclient_secret = \"s\"\nmax_window_secs = 999999999\n{}\
                     [datadog]\napi_key = \"k\"\n{}",
                    line("mimecast"),
                    line("datadog"),
                );
                if !matches!(section, "mimecast" | "datadog") {
                    text.push_str(&format!("[{section}]\n{}", line(section)));
                }
                super::super::from_str(&text, &|_| None)
            };
            for ok in [lo, hi] {
                assert!(config(ok.into()).is_ok(), "{key} = {ok}: {:?}", config(ok.into()).err());
            }
            for bad in [i128::from(lo) - 1, i128::from(hi) + 1] {
                let e = config(bad).expect_err(&format!("{key} = {bad} is refused")).to_string();
                assert!(e.contains(key), "{key} = {bad}: {e}");
            }
        }
    }
}
