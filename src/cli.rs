//! The `keygate` command line: arguments, and the `keys` commands, which talk to a running
//! gateway's admin API so that a change takes effect in that gateway at once.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use jiff::Timestamp;
use serde_json::{Value, json};

use crate::config::Config;
use crate::server::admin_token;

/// keygate: API keys in front of the HTTP APIs you already run.
#[derive(Debug, Parser)]
#[command(name = "keygate", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway (data plane and admin listener).
    Serve {
        #[arg(short, long, default_value = "config/keygate.yaml")]
        config: PathBuf,
        #[arg(long, env = "KEYGATE_LOG_FORMAT", value_enum, default_value = "text")]
        log_format: LogFormat,
    },
    /// Validate a config file: exit 0, or print every problem with its YAML path and exit 1.
    CheckConfig {
        #[arg(short, long, default_value = "config/keygate.yaml")]
        config: PathBuf,
    },
    /// Create, list, show, edit, revoke and rotate keys through a running gateway.
    Keys(KeysArgs),
}

pub use crate::logging::LogFormat;

#[derive(Debug, Args)]
pub struct KeysArgs {
    /// Config file, for the admin address and token.
    #[arg(short, long, global = true, default_value = "config/keygate.yaml")]
    pub config: PathBuf,
    /// Admin API base URL (default: KEYGATE_ADMIN_URL, else http:// + admin.listen).
    #[arg(long, global = true, env = "KEYGATE_ADMIN_URL")]
    pub admin_url: Option<String>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: KeysCommand,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key and print its secret, once.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        owner: String,
        #[arg(long)]
        description: Option<String>,
        /// 7d, 30d, 90d, 180d, 1y, never, or an RFC 3339 time.
        #[arg(long)]
        expires: Option<String>,
        #[arg(long)]
        per_minute: Option<u32>,
        #[arg(long)]
        per_second: Option<u32>,
        /// Metadata as key=value; repeat for more.
        #[arg(long = "meta", value_name = "KEY=VALUE")]
        meta: Vec<String>,
    },
    /// List keys (never secrets).
    List {
        /// active, expiring_soon, expired or revoked.
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        owner: Option<String>,
        /// Text in the name, description or prefix.
        #[arg(long)]
        search: Option<String>,
    },
    /// Show one key.
    Show { id: String },
    /// Change a key's name or description.
    Edit {
        id: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        description: Option<String>,
    },
    /// Revoke a key: every request with it is refused from now on.
    Revoke { id: String },
    /// Issue a replacement key; the old one keeps working for the grace period.
    Rotate {
        id: String,
        #[arg(long, default_value = "24h")]
        grace: String,
    },
}

/// A `keys` command failure: a short reason for stderr.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct CliError(pub String);

struct AdminClient {
    base: String,
    token: String,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl AdminClient {
    fn new(args: &KeysArgs) -> Result<AdminClient, CliError> {
        let config = load_config(&args.config);
        let base = match (&args.admin_url, &config) {
            (Some(url), _) => url.trim_end_matches('/').to_string(),
            (None, Ok(config)) => {
                let mut addr = config.admin.listen;
                if addr.ip().is_unspecified() {
                    addr.set_ip(if addr.is_ipv4() {
                        [127, 0, 0, 1].into()
                    } else {
                        std::net::Ipv6Addr::LOCALHOST.into()
                    });
                }
                format!("http://{addr}")
            }
            (None, Err(e)) => return Err(e.clone()),
        };
        let token = match std::env::var("KEYGATE_ADMIN_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
        {
            Some(token) => token,
            None => {
                let config = config?;
                admin_token(&config, false)
                    .map_err(|e| {
                        CliError(format!(
                            "no admin token: set KEYGATE_ADMIN_TOKEN or admin.token, or start the gateway once to generate one ({})",
                            crate::error_chain(&e)
                        ))
                    })?
                    .0
            }
        };
        Ok(AdminClient {
            base,
            token,
            http: Client::builder(TokioExecutor::new()).build_http(),
        })
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, CliError> {
        let uri = format!("{}{}", self.base, path);
        let mut req = Request::builder()
            .method(method)
            .uri(&uri)
            .header(AUTHORIZATION, format!("Bearer {}", self.token));
        if body.is_some() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(
                body.map(|b| b.to_string()).unwrap_or_default(),
            )))
            .map_err(|e| CliError(format!("bad admin URL `{uri}`: {e}")))?;
        let response = self.http.request(req).await.map_err(|e| {
            CliError(format!(
                "cannot reach the admin API at {}: {} (is `keygate serve` running?)",
                self.base,
                crate::error_chain(&e)
            ))
        })?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| CliError(format!("admin API answer cut short: {e}")))?
            .to_bytes();
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status.is_success() {
            Ok(value)
        } else {
            let detail = value["detail"].as_str().unwrap_or("no detail");
            let code = value["code"].as_str().unwrap_or("error");
            Err(CliError(format!("{} {code}: {detail}", status.as_u16())))
        }
    }
}

fn load_config(path: &Path) -> Result<Config, CliError> {
    Config::load(path).map_err(|e| CliError(e.to_string()))
}

/// Runs a `keys` command, printing its result on stdout.
pub async fn run_keys(args: KeysArgs) -> Result<(), CliError> {
    let client = AdminClient::new(&args)?;
    let as_json = args.json;
    match args.command {
        KeysCommand::Create {
            name,
            owner,
            description,
            expires,
            per_minute,
            per_second,
            meta,
        } => {
            let mut body = json!({ "name": name, "owner": owner });
            if let Some(d) = description {
                body["description"] = json!(d);
            }
            match expires.as_deref() {
                None => {}
                Some(e @ ("7d" | "30d" | "90d" | "180d" | "1y" | "never")) => {
                    body["expires_in"] = json!(e)
                }
                Some(at) => body["expires_at"] = json!(at),
            }
            if per_minute.is_some() || per_second.is_some() {
                let mut limits = json!({});
                if let Some(n) = per_minute {
                    limits["per_minute"] = json!(n);
                }
                if let Some(n) = per_second {
                    limits["per_second"] = json!(n);
                }
                body["rate_limit"] = limits;
            }
            let mut metadata = serde_json::Map::new();
            for pair in meta {
                let (k, v) = pair
                    .split_once('=')
                    .ok_or_else(|| CliError(format!("--meta expects KEY=VALUE, got `{pair}`")))?;
                metadata.insert(k.to_string(), json!(v));
            }
            if !metadata.is_empty() {
                body["metadata"] = Value::Object(metadata);
            }
            let key = client.call(Method::POST, "/v1/keys", Some(body)).await?;
            if as_json {
                println!("{key:#}");
            } else {
                println!(
                    "Created key {} ({}) for {}.",
                    s(&key["id"]),
                    s(&key["name"]),
                    s(&key["owner"])
                );
                println!();
                println!("    {}", s(&key["secret"]));
                println!();
                println!("This secret is shown only once: store it now.");
            }
        }
        KeysCommand::List {
            status,
            owner,
            search,
        } => {
            let mut query = form_urlencoded::Serializer::new(String::new());
            for (name, value) in [("status", status), ("owner", owner), ("search", search)] {
                if let Some(value) = value {
                    query.append_pair(name, &value);
                }
            }
            let query = query.finish();
            let path = if query.is_empty() {
                "/v1/keys".to_string()
            } else {
                format!("/v1/keys?{query}")
            };
            let list = client.call(Method::GET, &path, None).await?;
            if as_json {
                println!("{list:#}");
            } else {
                print_table(list["keys"].as_array().map(Vec::as_slice).unwrap_or(&[]));
            }
        }
        KeysCommand::Show { id } => {
            let key = client
                .call(Method::GET, &format!("/v1/keys/{id}"), None)
                .await?;
            print_key(&key, as_json);
        }
        KeysCommand::Edit {
            id,
            name,
            description,
        } => {
            let mut body = json!({});
            if let Some(n) = name {
                body["name"] = json!(n);
            }
            if let Some(d) = description {
                body["description"] = json!(d);
            }
            if body.as_object().is_some_and(|b| b.is_empty()) {
                return Err(CliError(
                    "nothing to change: give --name and/or --description".into(),
                ));
            }
            let key = client
                .call(Method::PATCH, &format!("/v1/keys/{id}"), Some(body))
                .await?;
            print_key(&key, as_json);
        }
        KeysCommand::Revoke { id } => {
            let key = client
                .call(Method::DELETE, &format!("/v1/keys/{id}"), None)
                .await?;
            if as_json {
                println!("{key:#}");
            } else {
                println!("Revoked key {} ({}).", s(&key["id"]), s(&key["name"]));
            }
        }
        KeysCommand::Rotate { id, grace } => {
            let key = client
                .call(
                    Method::POST,
                    &format!("/v1/keys/{id}/rotate"),
                    Some(json!({ "grace_period": grace })),
                )
                .await?;
            if as_json {
                println!("{key:#}");
            } else {
                println!(
                    "Rotated key {id}: the new key is {} and the old one stops working after {grace}.",
                    s(&key["id"])
                );
                println!();
                println!("    {}", s(&key["secret"]));
                println!();
                println!("This secret is shown only once: store it now.");
            }
        }
    }
    Ok(())
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn print_key(key: &Value, as_json: bool) {
    if as_json {
        println!("{key:#}");
        return;
    }
    for field in [
        "id",
        "name",
        "description",
        "owner",
        "prefix",
        "status",
        "created_at",
        "expires_at",
        "revoked_at",
        "last_used_at",
        "last_used_ip",
    ] {
        println!("{field:<13} {}", s(&key[field]));
    }
    println!(
        "{:<13} {}/minute, {}/second",
        "rate_limit",
        s(&key["rate_limit"]["per_minute"]),
        s(&key["rate_limit"]["per_second"])
    );
    if let Some(meta) = key["metadata"].as_object().filter(|m| !m.is_empty()) {
        let pairs: Vec<String> = meta.iter().map(|(k, v)| format!("{k}={}", s(v))).collect();
        println!("{:<13} {}", "metadata", pairs.join(", "));
    }
}

fn print_table(keys: &[Value]) {
    let headers = [
        "ID",
        "NAME",
        "OWNER",
        "PREFIX",
        "STATUS",
        "EXPIRES",
        "LAST USED",
    ];
    let rows: Vec<[String; 7]> = keys
        .iter()
        .map(|k| {
            [
                s(&k["id"]),
                s(&k["name"]),
                s(&k["owner"]),
                s(&k["prefix"]),
                s(&k["status"]),
                short_time(&k["expires_at"]),
                short_time(&k["last_used_at"]),
            ]
        })
        .collect();
    let mut widths = headers.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(headers.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
    if rows.is_empty() {
        println!("(no keys)");
    }
}

fn short_time(v: &Value) -> String {
    match v.as_str().and_then(|t| t.parse::<Timestamp>().ok()) {
        Some(t) => t.strftime("%Y-%m-%d %H:%M").to_string(),
        None => "-".into(),
    }
}
