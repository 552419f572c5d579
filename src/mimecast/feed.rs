//! The six log feeds as one enum and one table: every difference between them is data here, not code elsewhere.

use serde_json::{Map, Value};

/// One of the six Mimecast log feeds. In the config it is spelled by its name (`log_types`); serde goes through
/// [`Feed::from_name`] and [`Feed::name`], so the table below stays the one place where names are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "&'static str")]
pub enum Feed {
    Audit,
    Dlp,
    Rejection,
    TtpAttachment,
    TtpImpersonation,
    TtpUrl,
}

/// A filter value sent with every page of a feed besides the window.
#[derive(Debug, Clone, Copy)]
pub enum Extra {
    Bool(bool),
    Str(&'static str),
}

/// What differs between feeds, as data.
#[derive(Debug)]
pub struct Spec {
    /// The config name, which is also the Datadog `service` (exactly what Datadog's pipeline matches).
    pub name: &'static str,
    pub path: &'static str,
    pub from_field: &'static str,
    pub to_field: &'static str,
    pub extra: &'static [(&'static str, Extra)],
    /// Records sit in `data[0].<key>[]`; `None` means a flat `data[]`.
    pub records_key: Option<&'static str>,
    pub time_field: &'static str,
    pub id_field: Option<&'static str>,
    /// The permission the API application needs, named in the error when a feed answers 403.
    pub permission: &'static str,
}

const SPECS: [Spec; 6] = [
    Spec {
        name: "audit",
        path: "/api/audit/get-audit-events",
        from_field: "startDateTime",
        to_field: "endDateTime",
        extra: &[],
        records_key: None,
        time_field: "eventTime",
        id_field: Some("id"),
        permission: "Account | Logs | Read",
    },
    Spec {
        name: "dlp",
        path: "/api/dlp/get-logs",
        from_field: "from",
        to_field: "to",
        extra: &[("oldestFirst", Extra::Bool(true))],
        records_key: Some("dlpLogs"),
        time_field: "eventTime",
        id_field: None,
        permission: "Monitoring | Data Leak Prevention | Read",
    },
    Spec {
        name: "rejection",
        path: "/api/gateway/get-rejections",
        from_field: "start",
        to_field: "end",
        extra: &[("admin", Extra::Bool(true))],
        // Unconfirmed by any public source: the wrapper may be absent, so a flat data[] is accepted too (wire.rs).
        records_key: Some("rejections"),
        time_field: "created",
        id_field: Some("id"),
        permission: "Monitoring | Rejections | Read",
    },
    Spec {
        name: "ttp-attachment-protection",
        path: "/api/ttp/attachment/get-logs",
        from_field: "from",
        to_field: "to",
        extra: &[("oldestFirst", Extra::Bool(true)), ("route", Extra::Str("all")), ("result", Extra::Str("all"))],
        records_key: Some("attachmentLogs"),
        time_field: "date",
        id_field: None,
        permission: "Monitoring | Attachment Protection | Read",
    },
    Spec {
        name: "ttp-impersonation",
        path: "/api/ttp/impersonation/get-logs",
        from_field: "from",
        to_field: "to",
        extra: &[("oldestFirst", Extra::Bool(true))],
        records_key: Some("impersonationLogs"),
        time_field: "eventTime",
        id_field: Some("id"),
        permission: "Monitoring | Impersonation Protection | Read",
    },
    Spec {
        name: "ttp-url",
        path: "/api/ttp/url/get-logs",
        from_field: "from",
        to_field: "to",
        extra: &[("oldestFirst", Extra::Bool(true)), ("route", Extra::Str("all")), ("scanResult", Extra::Str("all"))],
        records_key: Some("clickLogs"),
        time_field: "date",
        id_field: None,
        permission: "Monitoring | URL Protection | Read",
    },
];

impl Feed {
    pub const ALL: [Feed; 6] =
        [Feed::Audit, Feed::Dlp, Feed::Rejection, Feed::TtpAttachment, Feed::TtpImpersonation, Feed::TtpUrl];

    pub fn spec(self) -> &'static Spec {
        &SPECS[self as usize]
    }

    pub fn name(self) -> &'static str {
        self.spec().name
    }

    /// Accepts the config names, plus `ttp-attachment` as an alias (interface.md).
    pub fn from_name(name: &str) -> Option<Feed> {
        if name == "ttp-attachment" {
            return Some(Feed::TtpAttachment);
        }
        Feed::ALL.into_iter().find(|f| f.name() == name)
    }

    /// Whether the API can return this feed oldest first.
    pub fn oldest_first(self) -> bool {
        self.spec().extra.iter().any(|(k, _)| *k == "oldestFirst")
    }

    /// The filter object for a window: identical for every page of that window.
    pub fn filter(self, from: &str, to: &str) -> Value {
        let spec = self.spec();
        let mut m = Map::new();
        m.insert(spec.from_field.into(), Value::String(from.into()));
        m.insert(spec.to_field.into(), Value::String(to.into()));
        for (k, v) in spec.extra {
            let v = match v {
                Extra::Bool(b) => Value::Bool(*b),
                Extra::Str(s) => Value::String((*s).into()),
            };
            m.insert((*k).into(), v);
        }
        Value::Object(m)
    }
}

impl TryFrom<String> for Feed {
    type Error = String;

    fn try_from(name: String) -> Result<Feed, String> {
        Feed::from_name(&name).ok_or_else(|| {
            let names: Vec<_> = Feed::ALL.iter().map(|f| f.name()).collect();
            format!("unknown log type {name:?}: expected some of {}", names.join(", "))
        })
    }
}

impl From<Feed> for &'static str {
    fn from(feed: Feed) -> &'static str {
        feed.name()
    }
}

impl std::fmt::Display for Feed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_in_enum_order_and_names_round_trip() {
        for feed in Feed::ALL {
            assert_eq!(Feed::from_name(feed.name()), Some(feed));
        }
        assert_eq!(Feed::from_name("ttp-attachment"), Some(Feed::TtpAttachment));
        assert_eq!(Feed::TtpAttachment.name(), "ttp-attachment-protection");
        assert_eq!(Feed::from_name("ttp"), None);
        let names: Vec<Feed> = serde_json::from_str(r#"["ttp-url", "ttp-attachment", "audit"]"#).unwrap();
        assert_eq!(names, [Feed::TtpUrl, Feed::TtpAttachment, Feed::Audit]);
        assert_eq!(serde_json::to_string(&Feed::TtpAttachment).unwrap(), r#""ttp-attachment-protection""#);
        let e = serde_json::from_str::<Feed>(r#""spam""#).unwrap_err().to_string();
        assert!(e.contains("\"spam\"") && e.contains("ttp-impersonation"), "{e}");
    }

    #[test]
    fn filters_carry_each_feeds_window_fields_and_extras() {
        let f = Feed::Rejection.filter("A", "B");
        assert_eq!(f, serde_json::json!({"start": "A", "end": "B", "admin": true}));
        let f = Feed::TtpUrl.filter("A", "B");
        assert_eq!(
            f,
            serde_json::json!({"from": "A", "to": "B", "oldestFirst": true, "route": "all", "scanResult": "all"})
        );
        let f = Feed::Audit.filter("A", "B");
        assert_eq!(f, serde_json::json!({"startDateTime": "A", "endDateTime": "B"}));
        assert!(!Feed::Audit.oldest_first());
        assert!(Feed::Dlp.oldest_first());
    }
}
