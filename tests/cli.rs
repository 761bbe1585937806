//! The `keygate` command line: check-config, and the key lifecycle against a running gateway.

mod support;

use std::process::Command;

use serde_json::Value;
use support::{Gateway, Upstream, binary};

fn keygate(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let output = Command::new(binary())
        .args(args)
        .envs(env.iter().copied())
        .env_remove("KEYGATE_ADMIN_TOKEN")
        .env_remove("KEYGATE_ADMIN_URL")
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The secret a `keys create` or `keys rotate` printed.
fn secret_in(stdout: &str) -> String {
    stdout
        .split_whitespace()
        .find(|w| w.starts_with("kg_"))
        .unwrap_or_else(|| panic!("no secret in:\n{stdout}"))
        .to_string()
}

/// A config with three mistakes: check-config names all three by path and exits 1.
#[test]
fn check_config_names_every_mistake() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "listen: 0.0.0.0:80\ncache:\n  ttl: soon\nrate_limit:\n  per_minuet: 100\nroutes:\n  - name: api\n    upstream: localhost:3000\n",
    )
    .unwrap();
    let (code, _, stderr) = keygate(&["check-config", "-c", path.to_str().unwrap()], &[]);
    assert_eq!(code, 1);
    assert!(stderr.contains("3 problems"), "{stderr}");
    for path in [
        "`cache.ttl`",
        "`rate_limit.per_minuet`",
        "`routes[0].upstream`",
    ] {
        assert!(stderr.contains(path), "{path} not named in:\n{stderr}");
    }
    assert!(stderr.contains("soon") && stderr.contains("localhost:3000"));
}

/// With no admin token configured, the gateway generates one into a 0600 file beside the
/// store, and the CLI finds it there: create, list, show, edit, rotate and revoke.
#[tokio::test]
async fn key_lifecycle_through_the_cli_with_a_generated_token() {
    use std::os::unix::fs::PermissionsExt;
    let upstream = Upstream::start().await;
    let gw = Gateway::start_edited(&upstream, &[], |yaml| {
        yaml.replace(
            &format!("  token: {}\n", support::ADMIN_TOKEN),
            "  token: ${KEYGATE_ADMIN_TOKEN}\n",
        )
    })
    .await;
    let dir = gw.dir.clone();
    let token_file = dir.join("admin.token");
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let token = std::fs::read_to_string(&token_file).unwrap();
    assert!(
        !gw.logs().contains(token.trim()),
        "the admin token was logged"
    );

    let config = dir.join("keygate.yaml");
    let admin_url = format!("http://{}", gw.admin);
    let base = [
        "keys",
        "-c",
        config.to_str().unwrap(),
        "--admin-url",
        admin_url.as_str(),
    ];
    let run = |extra: &[&str]| {
        let args: Vec<&str> = base.iter().copied().chain(extra.iter().copied()).collect();
        keygate(&args, &[])
    };

    let (code, stdout, stderr) = run(&[
        "create",
        "--name",
        "cli-key",
        "--owner",
        "team-a",
        "--per-minute",
        "30",
        "--meta",
        "env=dev",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("shown only once"));
    let secret = secret_in(&stdout);
    gw.remember_secret(&secret);
    assert_eq!(gw.call_with_key("/", &secret).await.status(), 200);

    let (code, stdout, _) = run(&["list", "--json"]);
    assert_eq!(code, 0);
    let list: Value = serde_json::from_str(&stdout).unwrap();
    let id = list["keys"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(list["keys"][0]["rate_limit"]["per_minute"], 30);
    assert!(!stdout.contains(&secret));

    let (code, stdout, _) = run(&["list", "--owner", "team-a"]);
    assert_eq!(code, 0);
    assert!(stdout.lines().next().unwrap().starts_with("ID"));
    assert!(stdout.contains("cli-key") && stdout.contains("active"));

    let (code, stdout, _) = run(&["edit", &id, "--description", "from the CLI"]);
    assert_eq!(code, 0);
    assert!(stdout.contains("from the CLI"));
    let (code, stdout, _) = run(&["show", &id]);
    assert_eq!(code, 0);
    assert!(stdout.contains("env=dev") && stdout.contains("30/minute"));

    let (code, stdout, _) = run(&["rotate", &id, "--grace", "0s"]);
    assert_eq!(code, 0);
    let rotated = secret_in(&stdout);
    gw.remember_secret(&rotated);
    assert_eq!(gw.call_with_key("/", &rotated).await.status(), 200);
    gw.refused("/", &secret, 401, "expired_api_key").await;
    let (code, _, _) = run(&["revoke", &id]);
    assert_eq!(code, 0);

    // Errors: non-zero exit and a short reason.
    let (code, _, stderr) = run(&["show", "key_nope"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("404"), "{stderr}");
    let (code, _, stderr) = run(&["create", "--name", "x", "--owner", "team-a"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("name"), "{stderr}");
}
