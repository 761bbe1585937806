//! `/v1/keys` and `/v1/audit`: the key lifecycle.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::gateway::RequestBody;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use jiff::{SignedDuration, Timestamp};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{AdminError, json, read_json};
use crate::config::duration;
use crate::credential;
use crate::gateway::Gateway;
use crate::key::{self, Invalid, KeyRecord, Status};
use crate::metrics::StoreOp;
use crate::store::{AuditEvent, AuditKind, KeyFilter};

/// Rotation grace period when none is given.
const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);

pub(super) async fn dispatch(
    gw: &Arc<Gateway>,
    req: Request<RequestBody>,
    segments: &[&str],
) -> Result<Response<Full<Bytes>>, AdminError> {
    match (req.method().clone(), segments) {
        (Method::POST, ["keys"]) => create(gw, req).await,
        (Method::GET, ["keys"]) => list(gw, &req).await,
        (Method::GET, ["keys", id]) => show(gw, id).await,
        (Method::PATCH, ["keys", id]) => edit(gw, req, id).await,
        (Method::DELETE, ["keys", id]) => revoke(gw, id).await,
        (Method::POST, ["keys", id, "rotate"]) => rotate(gw, req, id).await,
        (Method::GET, ["audit"]) => audit(gw, &req).await,
        (_, ["keys"] | ["keys", _] | ["keys", _, "rotate"] | ["audit"]) => {
            Err(AdminError::MethodNotAllowed)
        }
        _ => Err(AdminError::NotFound(format!(
            "no admin endpoint at `/v1/{}`",
            segments.join("/")
        ))),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    name: String,
    owner: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    expires_in: Option<String>,
    #[serde(default)]
    expires_at: Option<String>,
    #[serde(default)]
    rate_limit: Option<RateLimitInput>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RateLimitInput {
    #[serde(default)]
    per_minute: Option<u32>,
    #[serde(default)]
    per_second: Option<u32>,
}

fn view(gw: &Gateway, key: &KeyRecord) -> Value {
    key.to_json(gw.defaults, Timestamp::now())
}

/// Writes audit events at once; a failure is logged, never fails the call that succeeded.
async fn audit_event(gw: &Gateway, kind: AuditKind, key_id: &str, detail: Value) {
    let event = AuditEvent {
        at: Timestamp::now(),
        kind,
        key_id: key_id.to_string(),
        detail,
    };
    if let Err(e) = gw.store.append_audit(std::slice::from_ref(&event)).await {
        gw.metrics.store_error(StoreOp::Audit);
        tracing::warn!(error = %e, "audit event kept for the next flush");
        gw.usage.push_audit(event);
    }
}

/// A new secret, its digest and its display prefix.
fn new_secret(gw: &Gateway) -> (String, [u8; 32], String) {
    let secret = credential::generate(&gw.config.keys.prefix);
    let hash = credential::digest(&secret);
    let prefix = credential::display_prefix(&secret).to_string();
    (secret, hash, prefix)
}

fn with_secret(mut body: Value, secret: &str) -> Value {
    body["secret"] = Value::String(secret.to_string());
    body
}

fn created(body: &Value, id: &str) -> Response<Full<Bytes>> {
    let mut response = json(StatusCode::CREATED, body);
    if let Ok(location) = HeaderValue::from_str(&format!("/v1/keys/{id}")) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    // The secret is in this body: no cache may keep it.
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn create(
    gw: &Arc<Gateway>,
    req: Request<RequestBody>,
) -> Result<Response<Full<Bytes>>, AdminError> {
    let input: CreateKey = read_json(req, "").await?;
    let now = Timestamp::now();
    key::validate_name(&input.name)?;
    key::validate_owner(&input.owner)?;
    if let Some(d) = &input.description {
        key::validate_description(d)?;
    }
    key::validate_metadata(&input.metadata)?;
    let expires_at = match (&input.expires_in, &input.expires_at) {
        (Some(_), Some(_)) => {
            return Err(
                Invalid::new("expires_at", "give expires_in or expires_at, not both").into(),
            );
        }
        (Some(text), None) => key::expires_in("expires_in", text, now)?,
        (None, Some(text)) => Some(key::expires_at("expires_at", text, now)?),
        (None, None) => None,
    };
    let (per_minute, per_second) = match &input.rate_limit {
        Some(limits) => (limits.per_minute, limits.per_second),
        None => (None, None),
    };
    if let Some(n) = per_minute {
        key::validate_limit("rate_limit.per_minute", n)?;
    }
    if let Some(n) = per_second {
        key::validate_limit("rate_limit.per_second", n)?;
    }

    let (secret, hash, prefix) = new_secret(gw);
    let id = key::new_id();
    let record = KeyRecord {
        family: id.clone(),
        id,
        hash,
        prefix,
        name: input.name,
        description: input.description,
        owner: input.owner,
        created_at: now,
        expires_at,
        revoked_at: None,
        last_used_at: None,
        last_used_ip: None,
        per_minute,
        per_second,
        metadata: input.metadata,
    };
    gw.store
        .insert_key(&record, gw.config.keys.max_per_owner)
        .await?;
    // A digest cached as unknown (someone tried this secret before) must not hide the new key.
    gw.cache.invalidate(&record.hash);
    audit_event(
        gw,
        AuditKind::Created,
        &record.id,
        json!({"name": record.name, "owner": record.owner}),
    )
    .await;
    Ok(created(
        &with_secret(view(gw, &record), &secret),
        &record.id,
    ))
}

/// Query parameters, percent-decoded.
fn query(req: &Request<RequestBody>) -> Vec<(String, String)> {
    form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

async fn list(
    gw: &Arc<Gateway>,
    req: &Request<RequestBody>,
) -> Result<Response<Full<Bytes>>, AdminError> {
    let mut filter = KeyFilter::default();
    let mut status = None;
    for (name, value) in query(req) {
        match name.as_str() {
            "status" => {
                status = Some(Status::parse(&value).ok_or_else(|| {
                    Invalid::new(
                        "status",
                        format!(
                            "expected active, expiring_soon, expired or revoked; got `{value}`"
                        ),
                    )
                })?)
            }
            "owner" if !value.is_empty() => filter.owner = Some(value),
            "search" if !value.is_empty() => filter.search = Some(value),
            "owner" | "search" => {}
            other => {
                return Err(Invalid::new(
                    other,
                    "unknown query parameter; use status, owner or search",
                )
                .into());
            }
        }
    }
    let now = Timestamp::now();
    let keys: Vec<Value> = gw
        .store
        .list_keys(&filter)
        .await?
        .iter()
        .filter(|k| status.is_none_or(|s| k.status(now) == s))
        .map(|k| k.to_json(gw.defaults, now))
        .collect();
    Ok(json(StatusCode::OK, &json!({ "keys": keys })))
}

async fn show(gw: &Arc<Gateway>, id: &str) -> Result<Response<Full<Bytes>>, AdminError> {
    let key = gw
        .store
        .key_by_id(id)
        .await?
        .ok_or_else(|| AdminError::NotFound(format!("no key with id `{id}`")))?;
    Ok(json(StatusCode::OK, &view(gw, &key)))
}

async fn edit(
    gw: &Arc<Gateway>,
    req: Request<RequestBody>,
    id: &str,
) -> Result<Response<Full<Bytes>>, AdminError> {
    let body: serde_json::Map<String, Value> = read_json(req, "{}").await?;
    let mut name = None;
    let mut description = None;
    for (field, value) in &body {
        match (field.as_str(), value) {
            ("name", Value::String(n)) => {
                key::validate_name(n)?;
                name = Some(n.as_str());
            }
            ("description", Value::String(d)) => {
                key::validate_description(d)?;
                description = Some(Some(d.as_str()));
            }
            ("description", Value::Null) => description = Some(None),
            ("name" | "description", _) => {
                return Err(Invalid::new(field, "expected a string").into());
            }
            _ => {
                return Err(Invalid::new(field, "only name and description can be edited").into());
            }
        }
    }
    let key = gw
        .store
        .edit_key(id, name, description, Timestamp::now())
        .await?;
    gw.cache.invalidate(&key.hash);
    audit_event(
        gw,
        AuditKind::Edited,
        &key.id,
        json!({ "fields": body.keys().collect::<Vec<_>>() }),
    )
    .await;
    Ok(json(StatusCode::OK, &view(gw, &key)))
}

async fn revoke(gw: &Arc<Gateway>, id: &str) -> Result<Response<Full<Bytes>>, AdminError> {
    let now = Timestamp::now();
    let key = gw.store.revoke_key(id, now).await?;
    // The very next request through this instance must be refused.
    gw.cache.invalidate(&key.hash);
    if key.revoked_at == Some(Timestamp::from_millisecond(now.as_millisecond()).unwrap_or(now)) {
        audit_event(gw, AuditKind::Revoked, &key.id, json!({})).await;
    }
    Ok(json(StatusCode::OK, &view(gw, &key)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateInput {
    #[serde(default)]
    grace_period: Option<String>,
}

async fn rotate(
    gw: &Arc<Gateway>,
    req: Request<RequestBody>,
    id: &str,
) -> Result<Response<Full<Bytes>>, AdminError> {
    let input: RotateInput = read_json(req, "{}").await?;
    let grace = match &input.grace_period {
        Some(text) => duration::parse(text).map_err(|m| Invalid::new("grace_period", m))?,
        None => DEFAULT_GRACE,
    };
    let grace =
        SignedDuration::try_from(grace).map_err(|_| Invalid::new("grace_period", "too long"))?;
    let old = gw
        .store
        .key_by_id(id)
        .await?
        .ok_or_else(|| AdminError::NotFound(format!("no key with id `{id}`")))?;
    let now = Timestamp::now();
    let (secret, hash, prefix) = new_secret(gw);
    let new = KeyRecord {
        id: key::new_id(),
        hash,
        prefix,
        created_at: now,
        revoked_at: None,
        last_used_at: None,
        last_used_ip: None,
        expires_at: old.expires_at.filter(|at| *at > now),
        ..old.clone()
    };
    let old_expires = now
        .checked_add(grace)
        .map_err(|_| Invalid::new("grace_period", "too long"))?;
    let old = gw.store.rotate_key(&old.id, &new, old_expires).await?;
    gw.cache.invalidate(&old.hash);
    audit_event(
        gw,
        AuditKind::Rotated,
        &old.id,
        json!({ "new_key_id": new.id, "old_expires_at": old.expires_at.map(key::rfc3339) }),
    )
    .await;
    Ok(created(&with_secret(view(gw, &new), &secret), &new.id))
}

async fn audit(
    gw: &Arc<Gateway>,
    req: &Request<RequestBody>,
) -> Result<Response<Full<Bytes>>, AdminError> {
    let mut key_id = None;
    let mut limit = 100usize;
    for (name, value) in query(req) {
        match name.as_str() {
            "key_id" if !value.is_empty() => key_id = Some(value),
            "key_id" => {}
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=1000).contains(n))
                    .ok_or_else(|| {
                        Invalid::new("limit", format!("expected 1 to 1000, got `{value}`"))
                    })?
            }
            other => {
                return Err(
                    Invalid::new(other, "unknown query parameter; use key_id or limit").into(),
                );
            }
        }
    }
    let events: Vec<Value> = gw
        .store
        .audit(key_id.as_deref(), limit)
        .await?
        .into_iter()
        .map(|e| {
            json!({
                "at": key::rfc3339(e.at),
                "event": e.kind.as_str(),
                "key_id": e.key_id,
                "detail": e.detail,
            })
        })
        .collect();
    Ok(json(StatusCode::OK, &json!({ "events": events })))
}
