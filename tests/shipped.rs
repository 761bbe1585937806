//! What ships beside the binary: every config passes `keygate check-config`, and the compose
//! stack hangs together. No Docker engine runs here, so the stack is checked as files: every
//! mounted file exists, every keygate service's config passes check-config, host ports do not
//! collide, Prometheus scrapes the keygate services on their admin port with rules it can
//! load, and Grafana is provisioned with a datasource and the dashboard.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"))
}

/// Runs `keygate check-config` on a file; panics with its report unless it passes.
fn check_config(path: &Path) {
    let output = Command::new(support::binary())
        .arg("check-config")
        .arg("-c")
        .arg(path)
        .env("KEYGATE_ADMIN_TOKEN", "some-token")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{path:?} fails check-config:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn every_shipped_keygate_config_passes_check_config() {
    for name in ["keygate.yaml", "compose.yaml", "example.yaml"] {
        check_config(&root().join("config").join(name));
    }
}

/// A service's bind mounts: container path → host path.
fn mounts(service: &Value) -> BTreeMap<String, PathBuf> {
    service["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .filter(|v| v.starts_with("./"))
        .map(|v| {
            let mut parts = v.split(':');
            let host = root().join(parts.next().unwrap());
            (parts.next().unwrap().to_string(), host)
        })
        .collect()
}

/// The host ports a service publishes.
fn host_ports(service: &Value) -> Vec<u16> {
    service["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let p = p.as_str().expect("ports as strings");
            let parts: Vec<&str> = p.split(':').collect();
            parts[parts.len() - 2].parse().expect("a host port")
        })
        .collect()
}

#[test]
fn the_compose_stack_hangs_together() {
    let compose = yaml(&root().join("docker-compose.yml"));
    let services = compose["services"].as_object().expect("services");
    for needed in [
        "redis",
        "upstream",
        "keygate-a",
        "keygate-b",
        "prometheus",
        "grafana",
    ] {
        assert!(services.contains_key(needed), "no `{needed}` service");
    }

    let mut ports = HashSet::new();
    for (name, service) in services {
        for (target, host) in mounts(service) {
            assert!(host.exists(), "{name} mounts {host:?} at {target}: missing");
        }
        for port in host_ports(service) {
            assert!(ports.insert(port), "host port {port} published twice");
        }
    }
    assert!(
        services["redis"]["command"]
            .to_string()
            .contains("appendonly"),
        "Redis must persist keys"
    );

    // Each keygate: its config is mounted, passes check-config, uses Redis and the upstream
    // service, and its admin port is the one Prometheus scrapes.
    let mut keygates = Vec::new();
    for (name, service) in services {
        let command: Vec<&str> = service["command"]
            .as_array()
            .map(|c| c.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if command.first() != Some(&"serve") {
            continue;
        }
        let at = command
            .iter()
            .position(|&a| a == "-c")
            .expect("serve -c FILE");
        let host = mounts(service)
            .remove(command[at + 1])
            .unwrap_or_else(|| panic!("{name}: {} is not mounted", command[at + 1]));
        check_config(&host);
        let config = yaml(&host);
        assert_eq!(config["store"]["backend"], "redis", "{name}");
        assert!(
            config["store"]["redis_url"]
                .as_str()
                .unwrap()
                .contains("//redis:"),
            "{name} must use the redis service"
        );
        for route in config["routes"].as_array().unwrap() {
            let upstream = route["upstream"].as_str().unwrap();
            let host = upstream
                .trim_start_matches("http://")
                .split(':')
                .next()
                .unwrap();
            assert!(
                services.contains_key(host),
                "{name} routes to unknown `{host}`"
            );
        }
        let admin_port = config["admin"]["listen"]
            .as_str()
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap();
        keygates.push(format!("{name}:{admin_port}"));
    }
    assert_eq!(keygates.len(), 2, "two keygate instances");

    // Prometheus: the mounted config passes promtool, loads rules mounted beside it, and
    // scrapes exactly the keygate services.
    let prometheus = mounts(&services["prometheus"]);
    let config_host = &prometheus["/etc/prometheus/prometheus.yml"];
    let promtool = Command::new("promtool")
        .args(["check", "config"])
        .arg(config_host)
        .output()
        .expect("promtool (./scripts/test installs it)");
    assert!(
        promtool.status.success(),
        "{}",
        String::from_utf8_lossy(&promtool.stdout)
    );
    let config = yaml(config_host);
    for rule in config["rule_files"].as_array().unwrap() {
        let target = format!("/etc/prometheus/{}", rule.as_str().unwrap());
        assert!(prometheus.contains_key(&target), "{target} not mounted");
    }
    let mut targets: Vec<String> = config["scrape_configs"][0]["static_configs"][0]["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    targets.sort();
    keygates.sort();
    assert_eq!(targets, keygates);

    // Grafana: a datasource pointing at the prometheus service, and the dashboard where the
    // provider reads dashboards from.
    let grafana = mounts(&services["grafana"]);
    let datasources =
        yaml(&grafana["/etc/grafana/provisioning/datasources"].join("prometheus.yml"));
    assert_eq!(
        datasources["datasources"][0]["url"],
        "http://prometheus:9090"
    );
    let providers = yaml(&grafana["/etc/grafana/provisioning/dashboards"].join("keygate.yml"));
    let dashboards = providers["providers"][0]["options"]["path"]
        .as_str()
        .unwrap();
    let dashboard = &grafana[&format!("{dashboards}/keygate.json")];
    let json: Value = serde_json::from_str(&std::fs::read_to_string(dashboard).unwrap()).unwrap();
    assert!(!json["panels"].as_array().unwrap().is_empty());
}

/// The image: built in two stages, runs as a non-root user, and ships configs that exist.
#[test]
fn the_dockerfile_builds_a_small_non_root_image() {
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let stages = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .count();
    assert_eq!(stages, 2, "two stages");
    assert!(dockerfile.contains("FROM gcr.io/distroless/cc-debian12:nonroot"));
    assert!(dockerfile.contains("\nUSER nonroot\n"));
    for line in dockerfile.lines().filter(|l| l.starts_with("COPY config/")) {
        for file in line
            .split_whitespace()
            .skip(1)
            .filter(|w| w.starts_with("config/"))
        {
            assert!(root().join(file).exists(), "{file} is copied but missing");
        }
    }
}
