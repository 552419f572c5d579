//! The docs that ship agree with the code: the README's example config is the shipped file and parses to the
//! documented defaults, the README states the demo's time limit, and the man page has every command and exit
//! code of the help.

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

/// The lines of `page` from the `.SH title` heading to the next heading.
fn man_section<'a>(page: &'a str, title: &str) -> &'a str {
    let start = page.find(&format!("\n.SH {title}\n")).unwrap_or_else(|| panic!("the man page has {title}"));
    let rest = &page[start + 1..];
    let end = rest[1..].find("\n.SH ").map_or(rest.len(), |i| i + 1);
    &rest[..end]
}

/// The man page (shipped gzipped in both packages) says what the help says: every command the usage lists is in
/// its synopsis and has its own entry, and every exit code a command's help gives is explained.
#[test]
fn the_man_page_has_every_command_and_exit_code_of_the_help() {
    use mimecast_forwarder::cli::{self, Command};
    let page = std::fs::read_to_string("packaging/mimecast-forwarder.1").unwrap();
    let (synopsis, commands, exits) =
        (man_section(&page, "SYNOPSIS"), man_section(&page, "COMMANDS"), man_section(&page, "EXIT STATUS"));
    let listed: Vec<&str> = cli::USAGE
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("mimecast-forwarder "))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter(|c| !c.starts_with('-'))
        .collect();
    assert_eq!(listed, ["run", "check-config", "status", "dead-letters", "demo"], "{}", cli::USAGE);
    for c in listed {
        assert!(synopsis.contains(&format!(".B mimecast-forwarder {c}\n")), "{c} is not in the SYNOPSIS");
        assert!(commands.contains(&format!("\n.B {c}\n")), "{c} has no entry under COMMANDS");
        let Ok(Command::Help(help)) = cli::parse(&[c.to_string(), "--help".to_string()]) else {
            panic!("{c} --help gives its help");
        };
        let codes = help.split("Exit code").nth(1).unwrap_or_else(|| panic!("{c} --help gives exit codes"));
        let codes = codes.trim_start_matches(['s', ':', ' ']);
        for clause in codes.split(';') {
            let code: String = clause.trim_start().chars().take_while(char::is_ascii_digit).collect();
            assert!(!code.is_empty(), "{c}: no code in {clause:?}");
            assert!(exits.contains(&format!("\n.B {code}\n")), "exit code {code} of {c} is not under EXIT STATUS");
        }
    }
}
