//! The README's quick start and key walkthrough, run as written: every `console` block of
//! those sections is executed against a gateway started from the shipped
//! `config/keygate.yaml`, and each command's output must match what the README shows.
//!
//! Conventions of the README's `console` blocks:
//! - a line starting with `$ ` is a command (run by bash in the gateway's working directory,
//!   `keygate` being the binary under test); the lines up to the next command are its output;
//! - in shown output, `…` stands for any text within a line, and a line of only `…` for any
//!   number of lines (dates, timings); secrets and key ids are shown as `kg_…` and `key_…`;
//! - `$SECRET` and `$KEY_ID` are the secret and key id the last `keys create` or `keys rotate`
//!   printed, as a reader would copy them.
//!
//! The shipped config is used as is, except what a test must change: ports 8080 and 9901
//! become free ones (and `127.0.0.1:8080` in commands the real data-plane address), and its
//! upstream `127.0.0.1:3000` becomes the test's upstream.

mod support;

use std::path::Path;
use std::process::Command;

use support::{Gateway, Upstream};

/// The README sections whose `console` blocks are run.
const RUN_SECTIONS: [&str; 2] = ["## Quick start", "## Key walkthrough"];

struct Step {
    command: String,
    expected: Vec<String>,
}

/// The steps of every `console` block in the sections to run, in order.
fn steps(readme: &str) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    let (mut in_section, mut in_block) = (false, false);
    for line in readme.lines() {
        if line.starts_with("## ") {
            in_section = RUN_SECTIONS.iter().any(|s| line.starts_with(s));
        } else if in_section && line.starts_with("```") {
            in_block = !in_block && line == "```console";
        } else if in_block {
            match line.strip_prefix("$ ") {
                Some(command) => steps.push(Step {
                    command: command.to_string(),
                    expected: Vec::new(),
                }),
                None => steps
                    .last_mut()
                    .expect("output before any command")
                    .expected
                    .push(line.to_string()),
            }
        }
    }
    steps
}

/// Whether one line matches a shown line, `…` standing for any text.
fn line_matches(actual: &str, shown: &str) -> bool {
    let parts: Vec<&str> = shown.split('…').collect();
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if parts.len() == 1 {
        return actual == shown;
    }
    if !actual.starts_with(first) || actual.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &actual[first.len()..];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(at) => rest = &rest[at + middle.len()..],
            None => return false,
        }
    }
    rest.ends_with(last)
}

/// Whether the output lines match the shown lines, a line of only `…` standing for any lines.
fn lines_match(actual: &[String], shown: &[String]) -> bool {
    match shown.split_first() {
        None => actual.is_empty(),
        Some((first, rest)) if first == "…" => {
            (0..=actual.len()).any(|skip| lines_match(&actual[skip..], rest))
        }
        Some((first, rest)) => {
            !actual.is_empty() && line_matches(&actual[0], first) && lines_match(&actual[1..], rest)
        }
    }
}

/// Secrets and key ids as the README shows them; no trailing whitespace (nor \r).
fn normalized(output: &str) -> Vec<String> {
    output
        .lines()
        .map(|line| {
            let mut out = String::new();
            for (i, word) in line.trim_end().split(' ').enumerate() {
                if i > 0 {
                    out.push(' ');
                }
                out.push_str(&mask(word));
            }
            out
        })
        .collect()
}

/// `kg_` + 38 alphanumerics → `kg_…`, `key_` + 20 → `key_…`, wherever they are in a word.
fn mask(word: &str) -> String {
    let mut out = String::new();
    let mut rest = word;
    while !rest.is_empty() {
        let found = [("kg_", 38), ("key_", 20)]
            .iter()
            .find_map(|&(prefix, len)| {
                let tail = rest.strip_prefix(prefix)?;
                let body: String = tail
                    .chars()
                    .take_while(char::is_ascii_alphanumeric)
                    .collect();
                (body.len() == len).then(|| (prefix, prefix.len() + len))
            });
        match found {
            Some((prefix, taken)) => {
                out.push_str(prefix);
                out.push('…');
                rest = &rest[taken..];
            }
            None => {
                let c = rest.chars().next().unwrap();
                out.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
    }
    out
}

/// The last `kg_…` secret and the key id of the last "Created key …" / "the new key is …".
fn capture(output: &str, secret: &mut String, key_id: &mut String) {
    for line in output.lines() {
        let word = line.trim();
        if word.starts_with("kg_") && !word.contains(' ') {
            *secret = word.to_string();
        }
        for marker in ["Created key ", "the new key is "] {
            if let Some(rest) = line.split(marker).nth(1) {
                *key_id = rest.split([' ', ',', '.']).next().unwrap_or("").to_string();
            }
        }
    }
}

#[tokio::test]
async fn quick_start_and_walkthrough_run_as_written() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let steps = steps(&readme);
    assert!(
        steps.len() >= 8,
        "found only {} README commands",
        steps.len()
    );

    let upstream = Upstream::start().await;
    let shipped = std::fs::read_to_string(root.join("config/keygate.yaml")).unwrap();
    for needle in ["0.0.0.0:8080", "127.0.0.1:9901", "http://127.0.0.1:3000"] {
        assert!(
            shipped.contains(needle),
            "the shipped config changed: {needle}"
        );
    }
    let yaml = shipped
        .replace("0.0.0.0:8080", "127.0.0.1:0")
        .replace("127.0.0.1:9901", "127.0.0.1:0")
        .replace("http://127.0.0.1:3000", &upstream.url());
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("config")).unwrap();
    std::fs::write(dir.path().join("config/keygate.yaml"), &yaml).unwrap();
    // As in the README: no token configured, so the gateway generates data/admin.token and
    // the keys commands read it from there.
    let gw = Gateway::start_with(dir.path(), &yaml, None, &[]).await;
    let bin_dir = Path::new(support::binary()).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );

    let (mut secret, mut key_id) = (String::new(), String::new());
    for step in &steps {
        let command = step.command.replace("127.0.0.1:8080", &gw.addr.to_string());
        let mut bash = Command::new("bash");
        bash.arg("-c")
            .arg(&command)
            .current_dir(dir.path())
            .env("PATH", &path)
            .env("KEYGATE_ADMIN_URL", format!("http://{}", gw.admin))
            .env_remove("KEYGATE_ADMIN_TOKEN")
            .env("SECRET", &secret)
            .env("KEY_ID", &key_id);
        // Off the runtime's thread: the upstream answering curl runs on it.
        let output = tokio::task::spawn_blocking(move || bash.output().unwrap())
            .await
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        capture(&text, &mut secret, &mut key_id);
        if !secret.is_empty() {
            gw.remember_secret(&secret);
        }
        let actual = normalized(&text);
        assert!(
            lines_match(&actual, &step.expected),
            "README command `{}` printed:\n{}\nbut the README shows:\n{}",
            step.command,
            actual.join("\n"),
            step.expected.join("\n")
        );
    }
}

#[test]
fn the_matcher_knows_its_wildcards() {
    let lines = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert!(line_matches("date: Sun, 22 Nov", "date: …"));
    assert!(line_matches("a x b y c", "a … b … c"));
    assert!(!line_matches("a x b", "a … c"));
    assert!(!line_matches("ab", "ab…b"));
    assert!(lines_match(
        &lines(&["1", "2", "3"]),
        &lines(&["1", "…", "3"])
    ));
    assert!(lines_match(&lines(&["1", "3"]), &lines(&["1", "…", "3"])));
    assert!(!lines_match(&lines(&["1", "2"]), &lines(&["1", "…", "3"])));
    assert_eq!(
        mask("(kg_0123456789012345678901234567890123456789)"),
        "(kg_0123456789012345678901234567890123456789)"
    );
    assert_eq!(mask("kg_01234567890123456789012345678901234567,"), "kg_…,");
    assert_eq!(mask("key_01234567890123456789:"), "key_…:");
}
