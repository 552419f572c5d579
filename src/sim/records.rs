//! Realistic generated records for the simulators, shaped like the real ones in the fixtures.

use serde_json::{Value, json};

use crate::datetime;
use crate::mimecast::Feed;

/// Record number `i` of `feed` at `time`, padded to about `size` bytes of JSON. Every record is distinct.
pub fn generate(feed: Feed, i: u64, time: i64, size: usize) -> Value {
    let t = datetime::mimecast(time);
    let mut r = match feed {
        Feed::Audit => json!({
            "id": format!("eNqrVipOTS4tSs1MUbJS8sim-audit-{i}"),
            "auditType": "User Logged On",
            "user": format!("user{}@example.com", i % 97),
            "eventTime": t,
            "eventInfo": format!("Successful authentication for user{}@example.com, IP: 192.0.2.{}, Application: Web", i % 97, i % 250),
            "category": "authentication_logs"
        }),
        Feed::Dlp => json!({
            "senderAddress": "<>",
            "recipientAddress": format!("user{}@example.com", i % 97),
            "subject": "Undelivered Mail Returned to Sender",
            "eventTime": t,
            "route": "inbound",
            "policy": "Content Inspection - Watermark",
            "action": if i.is_multiple_of(2) { "hold" } else { "notification" },
            "messageId": format!("<{}.sim@mail.example.net>", i / 2)
        }),
        Feed::Rejection => json!({
            "fromAddress": format!("sender{}@dummy.net", i % 89),
            "toAddress": format!("user{}@example.com", i % 97),
            "description": "Virus Signature Detection",
            "type": 14030,
            "info": "[clam.Eicar-Test-Signature, soph.EICAR-AV-Test]",
            "created": t,
            "ipAddress": "192.0.2.12",
            "remoteName": "dummy.net",
            "manageRecipient": if i.is_multiple_of(2) { json!("false") } else { json!(false) },
            "id": format!("eNpVT1tPwjAU_sim-rejection-{i}"),
            "spamScore": i % 100,
            "detectionLevel": "aggressive"
        }),
        Feed::TtpAttachment => json!({
            "senderAddress": "<>",
            "recipientAddress": format!("user{}@example.com", i % 97),
            "fileName": format!("invoice-{i}.pdf"),
            "fileType": "application/pdf",
            "result": "safe",
            "actionTriggered": "user release, none",
            "date": t,
            "details": "Safe                                              \r\nTime taken: 0 hrs, 0 min, 4 sec",
            "route": "inbound",
            "messageId": format!("<{i}.attach@mail.example.net>"),
            "subject": "Updated numbers",
            "fileHash": format!("{:064x}", i),
            "definition": "Inbound - Safe file with On-Demand Sandbox"
        }),
        Feed::TtpImpersonation => json!({
            "id": format!("MTOKEN:eNqrVkouLS7Jz00tSs5sim-{i}"),
            "senderAddress": "smtp@example.com",
            "recipientAddress": format!("user{}@example.com", i % 97),
            "subject": "Requested File",
            "definition": "IP - 1 hit (Tag email)",
            "hits": 1,
            "identifiers": ["internal_user_name"],
            "action": "none",
            "taggedExternal": false,
            "taggedMalicious": true,
            "senderIpAddress": "192.0.2.15",
            "eventTime": t,
            "impersonationResults": [{"impersonationDomainSource": "internal_user_name", "similarDomain": "John Doe Jr <johndoejr@example.com>", "checkerResult": "hit"}],
            "messageId": format!("<{i}.imp@emailsec.example>")
        }),
        Feed::TtpUrl => json!({
            "userEmailAddress": format!("user{}@example.com", i % 97),
            "fromUserEmailAddress": "news@example.org",
            "url": format!("https://click.example.org/?qs={i}"),
            "ttpDefinition": "Inbound URL 'Aggressive'",
            "subject": "Today only",
            "action": "allow",
            "adminOverride": "N/A",
            "userOverride": "None",
            "scanResult": "clean",
            "category": "Business",
            "sendingIp": if i.is_multiple_of(5) { "Internal IP" } else { "192.0.2.33" },
            "userAwarenessAction": "Continue",
            "date": t,
            "actions": "Allow",
            "route": "inbound",
            "creationMethod": "User Click",
            "emailPartsDescription": ["Body"],
            "messageId": format!("<{i}.url@mta.example.net>")
        }),
    };
    let len = r.to_string().len();
    if len < size {
        let pad_field = match feed {
            Feed::Audit => "eventInfo",
            Feed::Rejection => "info",
            _ => "subject",
        };
        if let Some(Value::String(s)) = r.get_mut(pad_field) {
            s.push(' ');
            s.push_str(&"x".repeat(size - len - 1));
        }
    }
    r
}

/// The real records of `tests/data/` (Elastic's test logs of five feeds, then Datadog's pipeline samples of all
/// six), each with its feed: what tests and the record-path example measure and pin on. Panics when the files are
/// missing: it is for tests and examples run from the source tree.
#[allow(clippy::unwrap_used)]
pub fn fixtures() -> Vec<(Feed, Value)> {
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data");
    let mut out = Vec::new();
    for (feed, file) in [
        (Feed::Audit, "audit_test-audit-events"),
        (Feed::Dlp, "dlp_test-dlp-logs"),
        (Feed::TtpAttachment, "ttp_attachment_test-ttp-ap-logs"),
        (Feed::TtpImpersonation, "ttp_impersonation_test-ttp-ip-logs"),
        (Feed::TtpUrl, "ttp_url_test-ttp-url-logs"),
    ] {
        let text = std::fs::read_to_string(format!("{data}/elastic_{file}.log")).unwrap();
        out.extend(text.lines().map(|l| (feed, serde_json::from_str(l).unwrap())));
    }
    let samples: Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{data}/datadog_pipeline_samples.json")).unwrap())
            .unwrap();
    for s in samples.as_array().unwrap() {
        let feed = Feed::from_name(s["service"].as_str().unwrap()).unwrap();
        out.push((feed, serde_json::from_str(s["sample"].as_str().unwrap()).unwrap()));
    }
    out
}
