//! The config file: YAML → typed [`Config`], with every problem reported by its YAML path.
//!
//! serde stops at the first error, but `check-config` must name every mistake. So the YAML
//! is first read into a generic tree (after `${ENV}` substitution), then deserialized into
//! the typed config; each failing node is recorded and removed, and deserialization retried,
//! until it succeeds. A semantic pass over the result adds what types cannot say.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper::Uri;
use ipnet::IpNet;
use serde::Deserialize;
use serde_json::Value;

/// The whole configuration of one keygate instance (SPEC §2).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Data-plane listen address.
    pub listen: SocketAddr,
    /// TLS on the data plane.
    pub tls: Option<TlsConfig>,
    pub admin: AdminConfig,
    pub store: StoreConfig,
    pub cache: CacheConfig,
    pub rate_limit: RateLimitConfig,
    pub keys: KeysConfig,
    pub usage: UsageConfig,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
    /// First match wins.
    pub routes: Vec<RouteConfig>,
    pub limits: LimitsConfig,
    #[serde(with = "duration")]
    pub shutdown_timeout: Duration,
    /// Threads serving requests; `None`: one per CPU.
    pub workers: Option<usize>,
}

impl Config {
    /// The number of worker threads to run: `workers`, else one per CPU.
    pub fn worker_threads(&self) -> usize {
        self.workers.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        })
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "0.0.0.0:8080".parse().expect("valid literal"),
            tls: None,
            admin: AdminConfig::default(),
            store: StoreConfig::default(),
            cache: CacheConfig::default(),
            rate_limit: RateLimitConfig::default(),
            keys: KeysConfig::default(),
            usage: UsageConfig::default(),
            trusted_proxies: Vec::new(),
            routes: Vec::new(),
            limits: LimitsConfig::default(),
            shutdown_timeout: Duration::from_secs(30),
            workers: None,
        }
    }
}

/// Certificate and key for TLS on the data plane.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The admin listener and its bearer token.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// Empty means: generate one at first start into a 0600 file.
    pub token: Option<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:9901".parse().expect("valid literal"),
            token: None,
        }
    }
}

/// Which key store backs this instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Embedded,
    Redis,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub backend: Backend,
    /// Embedded store file.
    pub path: PathBuf,
    pub redis_url: String,
    /// Namespace of every Redis key.
    pub key_prefix: String,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: Backend::Embedded,
            path: PathBuf::from("data/keygate.db"),
            redis_url: "redis://127.0.0.1:6379/0".into(),
            key_prefix: "keygate:".into(),
        }
    }
}

impl StoreConfig {
    /// Where a generated admin token lives: beside the embedded store's file, or in `data/`.
    pub fn admin_token_path(&self) -> PathBuf {
        match self.backend {
            Backend::Embedded => self
                .path
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default()
                .join("admin.token"),
            Backend::Redis => PathBuf::from("data/admin.token"),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// How long a verified key is trusted without asking the store.
    #[serde(with = "duration")]
    pub ttl: Duration,
    /// How long an unknown key is remembered as unknown.
    #[serde(with = "duration")]
    pub negative_ttl: Duration,
    /// How long past `ttl` cached keys keep working while the store is down.
    #[serde(with = "duration")]
    pub stale_if_error: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            ttl: Duration::from_secs(30),
            negative_ttl: Duration::from_secs(5),
            stale_if_error: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Global,
    Local,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnStoreError {
    Local,
    Reject,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    pub per_minute: u32,
    pub per_second: u32,
    pub scope: Scope,
    pub on_store_error: OnStoreError,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            per_minute: 100,
            per_second: 10,
            scope: Scope::Global,
            on_store_error: OnStoreError::Local,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeysConfig {
    /// Prefix of generated secrets.
    pub prefix: String,
    pub max_per_owner: u32,
}

impl Default for KeysConfig {
    fn default() -> Self {
        KeysConfig {
            prefix: "kg_".into(),
            max_per_owner: 100,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UsageConfig {
    /// Last-used time and IP reach the store within this.
    #[serde(with = "duration")]
    pub flush_interval: Duration,
}

impl Default for UsageConfig {
    fn default() -> Self {
        UsageConfig {
            flush_interval: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    Required,
    None,
}

/// One route: which requests it takes and where they go.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouteConfig {
    pub name: String,
    pub path_prefix: String,
    /// Exact Host match, port and case ignored.
    pub host: Option<String>,
    #[serde(deserialize_with = "upstream_uri")]
    pub upstream: Option<Uri>,
    pub auth: AuthMode,
    pub strip_prefix: bool,
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// PEM certificates trusted for an `https` upstream besides the system's roots.
    pub ca_file: Option<PathBuf>,
}

impl Default for RouteConfig {
    fn default() -> Self {
        RouteConfig {
            name: String::new(),
            path_prefix: "/".into(),
            host: None,
            upstream: None,
            auth: AuthMode::Required,
            strip_prefix: false,
            timeout: Duration::from_secs(30),
            ca_file: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub max_header_bytes: usize,
    #[serde(with = "duration")]
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    /// 401s one client IP may earn per minute before 429; 0 = off.
    pub failed_auth_per_minute_per_ip: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_header_bytes: 16384,
            header_read_timeout: Duration::from_secs(10),
            max_connections: 10000,
            failed_auth_per_minute_per_ip: 300,
        }
    }
}

/// One thing wrong with a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// YAML path, such as `routes[2].upstream`; empty for the document itself.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "`{}`: {}", self.path, self.message)
        }
    }
}

/// Everything wrong with a config file, or the reason it could not be read.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub source_name: String,
    pub problems: Vec<ConfigProblem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} problem{}",
            self.source_name,
            self.problems.len(),
            if self.problems.len() == 1 { "" } else { "s" }
        )?;
        for problem in &self.problems {
            write!(f, "\n  - {problem}")?;
        }
        Ok(())
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source_name: path.display().to_string(),
            problems: vec![ConfigProblem {
                path: String::new(),
                message: format!("cannot read the file: {e}"),
            }],
        })?;
        Config::parse(&text).map_err(|problems| ConfigError {
            source_name: path.display().to_string(),
            problems,
        })
    }

    /// Parses and validates config text, substituting `${VAR}` from the environment.
    pub fn parse(text: &str) -> Result<Config, Vec<ConfigProblem>> {
        Config::parse_with_env(text, &|name| std::env::var(name).ok())
    }

    /// As [`Config::parse`], with the environment given as a function.
    pub fn parse_with_env(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, Vec<ConfigProblem>> {
        let mut tree: Value = match serde_saphyr::from_str(text) {
            Ok(tree) => tree,
            Err(e) => {
                return Err(vec![ConfigProblem {
                    path: String::new(),
                    message: format!("not valid YAML: {e}"),
                }]);
            }
        };
        if tree.is_null() {
            tree = Value::Object(Default::default());
        }
        if !tree.is_object() {
            return Err(vec![ConfigProblem {
                path: String::new(),
                message: "expected a mapping of settings at the top level".into(),
            }]);
        }
        expand_env(&mut tree, env);

        let mut problems = Vec::new();
        let config = loop {
            match serde_path_to_error::deserialize::<_, Config>(&tree) {
                Ok(config) => break config,
                Err(e) => {
                    let path = e.path().to_string();
                    let path = if path == "." { String::new() } else { path };
                    let mut message = e.into_inner().to_string();
                    let segments = segments_of(&path);
                    if let Some(found) = scalar_at(&tree, &segments)
                        && !message.contains(&found)
                    {
                        message = format!("{message}, got `{found}`");
                    }
                    let removed = remove_at(&mut tree, &segments);
                    problems.push(ConfigProblem { path, message });
                    if !removed || problems.len() > 100 {
                        return Err(problems);
                    }
                }
            }
        };
        let mut semantic = Vec::new();
        config.validate(&mut semantic);
        // A node already reported (and removed) shows up again as missing: say it once.
        semantic.retain(|p: &ConfigProblem| problems.iter().all(|q| q.path != p.path));
        problems.extend(semantic);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(problems)
        }
    }

    fn validate(&self, problems: &mut Vec<ConfigProblem>) {
        let mut problem =
            |path: String, message: String| problems.push(ConfigProblem { path, message });
        if self.routes.is_empty() {
            problem("routes".into(), "at least one route is required".into());
        }
        let mut names = HashSet::new();
        for (i, route) in self.routes.iter().enumerate() {
            if route.name.trim().is_empty() {
                problem(format!("routes[{i}].name"), "a route needs a name".into());
            } else if !names.insert(route.name.as_str()) {
                problem(
                    format!("routes[{i}].name"),
                    format!("route name `{}` is used twice", route.name),
                );
            }
            if !route.path_prefix.starts_with('/') {
                problem(
                    format!("routes[{i}].path_prefix"),
                    format!("must start with `/`, got `{}`", route.path_prefix),
                );
            }
            if route.upstream.is_none() {
                problem(
                    format!("routes[{i}].upstream"),
                    "required: an http:// or https:// URL".into(),
                );
            }
            if route.timeout.is_zero() {
                problem(
                    format!("routes[{i}].timeout"),
                    "must be more than 0s".into(),
                );
            }
        }
        if self.rate_limit.per_minute == 0 {
            problem("rate_limit.per_minute".into(), "must be at least 1".into());
        }
        if self.rate_limit.per_second == 0 {
            problem("rate_limit.per_second".into(), "must be at least 1".into());
        }
        if self.keys.prefix.is_empty()
            || self.keys.prefix.len() > 16
            || !self
                .keys
                .prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            problem(
                "keys.prefix".into(),
                format!(
                    "1 to 16 characters from [A-Za-z0-9_-], got `{}`",
                    self.keys.prefix
                ),
            );
        }
        if self.keys.max_per_owner == 0 {
            problem("keys.max_per_owner".into(), "must be at least 1".into());
        }
        if self.usage.flush_interval.is_zero() {
            problem("usage.flush_interval".into(), "must be more than 0s".into());
        }
        if self.limits.max_header_bytes < 1024 {
            problem(
                "limits.max_header_bytes".into(),
                format!(
                    "must be at least 1024, got {}",
                    self.limits.max_header_bytes
                ),
            );
        }
        if self.limits.max_connections == 0 {
            problem("limits.max_connections".into(), "must be at least 1".into());
        }
        if self.limits.header_read_timeout.is_zero() {
            problem(
                "limits.header_read_timeout".into(),
                "must be more than 0s".into(),
            );
        }
        match self.store.backend {
            Backend::Embedded => {
                if self.store.path.as_os_str().is_empty() {
                    problem(
                        "store.path".into(),
                        "required for the embedded store".into(),
                    );
                }
            }
            Backend::Redis => {
                use redis::IntoConnectionInfo;
                // The redis crate's own parser, so what passes here connects; its message never
                // repeats the URL, which may hold a password.
                if let Err(e) = self.store.redis_url.as_str().into_connection_info() {
                    problem(
                        "store.redis_url".into(),
                        format!("expected redis://[:password@]host[:port][/db] ({e})"),
                    );
                }
                if self.store.key_prefix.is_empty() {
                    problem(
                        "store.key_prefix".into(),
                        "must not be empty: every Redis key of keygate lives under it".into(),
                    );
                }
            }
        }
        if self.workers == Some(0) {
            problem(
                "workers".into(),
                "must be at least 1 (leave it out for one per CPU)".into(),
            );
        }
        if self.listen == self.admin.listen && self.listen.port() != 0 {
            problem(
                "admin.listen".into(),
                format!("must differ from `listen` ({})", self.listen),
            );
        }
    }
}

/// Replaces `${VAR}` in every string of the tree; an unset variable becomes empty, so
/// `token: ${KEYGATE_ADMIN_TOKEN}` with the variable unset means "no token configured".
fn expand_env(tree: &mut Value, env: &dyn Fn(&str) -> Option<String>) {
    match tree {
        Value::String(s) if s.contains("${") => {
            let mut out = String::with_capacity(s.len());
            let mut rest = s.as_str();
            while let Some(start) = rest.find("${") {
                out.push_str(&rest[..start]);
                match rest[start + 2..].find('}') {
                    Some(end) => {
                        let name = &rest[start + 2..start + 2 + end];
                        out.push_str(&env(name).unwrap_or_default());
                        rest = &rest[start + 2 + end + 1..];
                    }
                    None => {
                        out.push_str(&rest[start..]);
                        rest = "";
                    }
                }
            }
            out.push_str(rest);
            *s = out;
        }
        Value::Array(items) => items.iter_mut().for_each(|v| expand_env(v, env)),
        Value::Object(map) => map.values_mut().for_each(|v| expand_env(v, env)),
        _ => {}
    }
}

#[derive(Debug)]
enum Segment {
    Key(String),
    Index(usize),
}

/// Splits a serde_path_to_error path such as `routes[2].upstream` into segments.
fn segments_of(path: &str) -> Vec<Segment> {
    let mut segments = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (name, mut indexes) = match part.find('[') {
            Some(at) => (&part[..at], &part[at..]),
            None => (part, ""),
        };
        if !name.is_empty() {
            segments.push(Segment::Key(name.to_string()));
        }
        // `[2][0]`; anything else (a map key may hold brackets) ends the indexes. Slicing
        // by the first `]` alone panicked on `]` before `[` (found by the `config` fuzz target).
        while let Some(rest) = indexes.strip_prefix('[') {
            let Some(close) = rest.find(']') else {
                break;
            };
            if let Ok(i) = rest[..close].parse() {
                segments.push(Segment::Index(i));
            }
            indexes = &rest[close + 1..];
        }
    }
    segments
}

/// The text of a scalar at a path, to quote it in a message.
fn scalar_at(tree: &Value, segments: &[Segment]) -> Option<String> {
    let mut node = tree;
    for segment in segments {
        node = match (segment, node) {
            (Segment::Key(k), Value::Object(map)) => map.get(k)?,
            (Segment::Index(i), Value::Array(items)) => items.get(*i)?,
            _ => return None,
        };
    }
    match node {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Removes the node a deserialization error points at (an unknown field is reported at its
/// own path) so the next attempt gets past it. False when there is nothing to remove.
fn remove_at(tree: &mut Value, segments: &[Segment]) -> bool {
    let Some((last, parents)) = segments.split_last() else {
        return false;
    };
    let mut node = tree;
    for segment in parents {
        node = match (segment, node) {
            (Segment::Key(k), Value::Object(map)) => match map.get_mut(k) {
                Some(v) => v,
                None => return false,
            },
            (Segment::Index(i), Value::Array(items)) => match items.get_mut(*i) {
                Some(v) => v,
                None => return false,
            },
            _ => return false,
        };
    }
    match (last, node) {
        (Segment::Key(k), Value::Object(map)) => map.remove(k).is_some(),
        (Segment::Index(i), Value::Array(items)) if *i < items.len() => {
            // Keep indexes stable for later messages: blank the entry instead of removing it.
            items[*i] = Value::Object(Default::default());
            true
        }
        _ => false,
    }
}

/// Durations as strings such as `500ms`, `30s`, `5m`, `24h`.
pub(crate) mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, de::Error};

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map_err(D::Error::custom)
    }

    /// Parses `500ms`, `30s`, `5m`, `24h`, `7d`.
    pub(crate) fn parse(text: &str) -> Result<Duration, String> {
        humantime::parse_duration(text.trim()).map_err(|_| {
            format!("expected a duration such as `500ms`, `30s`, `5m` or `24h`, got `{text}`")
        })
    }
}

fn upstream_uri<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Uri>, D::Error> {
    use serde::de::Error;
    let text = String::deserialize(d)?;
    let bad = || {
        D::Error::custom(format!(
            "expected an http:// or https:// URL such as `http://127.0.0.1:3000`, got `{text}`"
        ))
    };
    let uri: Uri = text.parse().map_err(|_| bad())?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(bad()),
    }
    if uri.authority().is_none() || uri.query().is_some() {
        return Err(bad());
    }
    Ok(Some(uri))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_with_brackets_in_a_key_gets_an_error_not_a_panic() {
        // The `config` fuzz target's crash: a key holding `]` before `[`.
        let text = "c[Snook SSSS@][[]][][]]_http:|//fi;:ppaa [oon ]its h_per_me_p_i: 29 http+a";
        assert!(Config::parse(text).is_err());
        assert_eq!(segments_of("routes[2].upstream").len(), 3);
        assert_eq!(segments_of("a]b[1]").len(), 2);
        assert_eq!(segments_of("a[x]]y").len(), 1);
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    const MINIMAL: &str = "routes:\n  - name: api\n    upstream: http://127.0.0.1:3000\n";

    #[test]
    fn minimal_config_takes_spec_defaults() {
        let c = Config::parse_with_env(MINIMAL, &no_env).unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(c.admin.listen.to_string(), "127.0.0.1:9901");
        assert_eq!(c.rate_limit.per_minute, 100);
        assert_eq!(c.rate_limit.per_second, 10);
        assert_eq!(c.cache.ttl, Duration::from_secs(30));
        assert_eq!(c.cache.stale_if_error, Duration::from_secs(300));
        assert_eq!(c.routes[0].path_prefix, "/");
        assert_eq!(c.routes[0].auth, AuthMode::Required);
        assert_eq!(c.limits.failed_auth_per_minute_per_ip, 300);
    }

    #[test]
    fn every_mistake_is_named_by_path() {
        let text = "\
listen: not-an-address
cache:
  ttl: 30 parsecs
  negative_tll: 5s
rate_limit:
  per_minute: -3
routes:
  - name: api
    upstream: localhost:3000
  - name: api
    upstream: http://127.0.0.1:3001
    auth: maybe
";
        let problems = Config::parse_with_env(text, &no_env).unwrap_err();
        let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        for expected in [
            "listen",
            "cache.ttl",
            "cache.negative_tll",
            "rate_limit.per_minute",
            "routes[0].upstream",
            "routes[1].auth",
            "routes[1].name",
        ] {
            assert!(
                paths.contains(&expected),
                "{expected} missing from {problems:?}"
            );
        }
        assert_eq!(problems.len(), 7, "each mistake once: {problems:?}");
        let listen = problems.iter().find(|p| p.path == "listen").unwrap();
        assert!(listen.message.contains("not-an-address"), "{listen:?}");
        let upstream = problems
            .iter()
            .find(|p| p.path == "routes[0].upstream")
            .unwrap();
        assert!(upstream.message.contains("localhost:3000"));
    }

    #[test]
    fn a_bad_redis_url_is_named_without_repeating_it() {
        let text =
            format!("{MINIMAL}store:\n  backend: redis\n  redis_url: http://user:s3cret@host/0\n");
        let problems = Config::parse_with_env(&text, &no_env).unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].path, "store.redis_url");
        assert!(!problems[0].message.contains("s3cret"), "{problems:?}");
        let good =
            format!("{MINIMAL}store:\n  backend: redis\n  redis_url: redis://10.0.0.5:6380/2\n");
        assert!(Config::parse_with_env(&good, &no_env).is_ok());
    }

    #[test]
    fn workers_default_to_one_per_cpu_and_zero_is_refused() {
        let c = Config::parse_with_env(MINIMAL, &no_env).unwrap();
        assert_eq!(
            c.worker_threads(),
            std::thread::available_parallelism().unwrap().get()
        );
        let one = Config::parse_with_env(&format!("{MINIMAL}workers: 1\n"), &no_env).unwrap();
        assert_eq!(one.worker_threads(), 1);
        let problems =
            Config::parse_with_env(&format!("{MINIMAL}workers: 0\n"), &no_env).unwrap_err();
        assert_eq!(problems[0].path, "workers");
    }

    #[test]
    fn unknown_top_level_field_is_an_error() {
        let text = format!("{MINIMAL}lisen: 0.0.0.0:80\n");
        let problems = Config::parse_with_env(&text, &no_env).unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].message.contains("lisen"));
    }

    #[test]
    fn env_vars_are_substituted_and_unset_ones_are_empty() {
        let text = format!("{MINIMAL}admin:\n  token: ${{TOKEN}}\nstore:\n  path: ${{DIR}}/k.db\n");
        let env = |name: &str| (name == "DIR").then(|| "/tmp/x".to_string());
        let c = Config::parse_with_env(&text, &env).unwrap();
        assert_eq!(c.admin.token.as_deref(), Some(""));
        assert_eq!(c.store.path, PathBuf::from("/tmp/x/k.db"));
    }

    #[test]
    fn no_routes_is_an_error() {
        let problems = Config::parse_with_env("listen: 127.0.0.1:8080\n", &no_env).unwrap_err();
        assert_eq!(problems[0].path, "routes");
    }

    #[test]
    fn yaml_syntax_error_is_reported() {
        let problems = Config::parse_with_env("routes: [\n", &no_env).unwrap_err();
        assert!(problems[0].message.contains("YAML"));
    }

    #[test]
    fn shipped_config_is_valid() {
        let text = include_str!("../config/keygate.yaml");
        Config::parse_with_env(text, &no_env).unwrap();
    }
}
