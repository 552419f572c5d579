//! The README's example config is the shipped file, and it parses to the documented defaults; the README states
//! the demo's time limit.

use mimecast_forwarder::config::{self, LateRecords, WhenFull};
use mimecast_forwarder::mimecast::Feed;

#[test]
fn the_readme_shows_the_shipped_config_and_it_parses() {
    let shipped = std::fs::read_to_string("packaging/config.toml").unwrap();
    let readme = std::fs::read_to_string("README.md").unwrap();
    let block = readme
        .split("<!-- example-config:start -->\n```toml\n")
        .nth(1)
        .and_then(|rest| rest.split("```\n<!-- example-config:end -->").next())
        .expect("README has the example-config block");
    assert_eq!(block, shipped, "README's example config differs from packaging/config.toml");

    let env = |k: &str| match k {
        "MIMECAST_CLIENT_ID" => Some("id".to_string()),
        "MIMECAST_CLIENT_SECRET" | "DD_API_KEY" => Some("secret".to_string()),
        _ => None,
    };
    let c = config::from_str(&shipped, &env).unwrap();
    assert_eq!(c.mimecast.feeds, Feed::ALL.to_vec());
    assert_eq!(c.datadog.intake_url.as_str(), "https://http-intake.logs.datadoghq.com/api/v2/logs");
    assert_eq!((c.datadog.late_records, c.queue.when_full), (LateRecords::Restamp, WhenFull::Pause));
    assert_eq!(c.queue.path.to_str(), Some("/var/lib/mimecast-forwarder/queue.db"));
    // Without credentials the shipped config is refused, naming all that is missing at once.
    let e = config::from_str(&shipped, &|_| None).unwrap_err().to_string();
    for key in ["mimecast.client_id", "mimecast.client_secret", "datadog.api_key"] {
        assert!(e.contains(&format!("missing {key}")), "{e}");
    }
}

#[test]
fn the_readme_states_the_demos_time_limit() {
    let readme = std::fs::read_to_string("README.md").unwrap();
    let limit = format!("within {} s at most", mimecast_forwarder::demo::LIMIT.as_secs());
    assert!(readme.contains(&limit), "README does not say the demo ends {limit}");
}
