//! The admin listener: the key API of SPEC §4 behind a bearer token, and the unauthenticated
//! `/healthz`, `/readyz` and `/metrics`.

mod keys;

use std::sync::Arc;

use crate::gateway::RequestBody;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error_chain;
use crate::gateway::Gateway;
use crate::key::Invalid;
use crate::metrics::StoreOp;
use crate::problem::{problem_response, problem_with_field};
use crate::store::StoreError;

/// Largest admin request body accepted.
const MAX_BODY: usize = 1 << 20;

/// Why an admin call failed; each maps to one status and problem `code`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AdminError {
    #[error("missing or wrong admin token")]
    Unauthorized,
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("{0}")]
    BadRequest(String),
    #[error("request body over {MAX_BODY} bytes")]
    PayloadTooLarge,
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("{0}")]
    Conflict(String),
    #[error("store unavailable")]
    StoreUnavailable(#[source] StoreError),
}

impl From<StoreError> for AdminError {
    fn from(e: StoreError) -> AdminError {
        match e {
            StoreError::NotFound => AdminError::NotFound("no such key".into()),
            StoreError::Conflict(why) => AdminError::Conflict(why),
            e @ StoreError::Unavailable(_) => AdminError::StoreUnavailable(e),
        }
    }
}

impl AdminError {
    fn response(&self) -> Response<Full<Bytes>> {
        let (status, code, title) = match self {
            AdminError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Admin token required",
            ),
            AdminError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found", "Not found"),
            AdminError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "Method not allowed",
            ),
            AdminError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request", "Bad request"),
            AdminError::PayloadTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "Request body too large",
            ),
            AdminError::Invalid(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation_failed",
                "Validation failed",
            ),
            AdminError::Conflict(_) => (StatusCode::CONFLICT, "conflict", "Conflict"),
            AdminError::StoreUnavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "Key store unavailable",
            ),
        };
        let detail = match self {
            AdminError::Unauthorized => {
                "Send the admin token as Authorization: Bearer <token>.".to_string()
            }
            AdminError::StoreUnavailable(_) => "The key store is unreachable. Retry later.".into(),
            other => other.to_string(),
        };
        // A validation problem names its field as a member of its own too, for scripts.
        let field = match self {
            AdminError::Invalid(invalid) => Some(invalid.field.as_str()),
            _ => None,
        };
        let mut response = problem_with_field(status, code, title, &detail, field);
        match self {
            AdminError::Unauthorized => {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"keygate-admin\""),
                );
            }
            AdminError::StoreUnavailable(_) => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            AdminError::Invalid(_)
            | AdminError::NotFound(_)
            | AdminError::MethodNotAllowed
            | AdminError::BadRequest(_)
            | AdminError::PayloadTooLarge
            | AdminError::Conflict(_) => {}
        }
        response
    }
}

/// The admin API of one gateway.
#[derive(Debug)]
pub(crate) struct Admin {
    gateway: Arc<Gateway>,
    token: String,
}

impl Admin {
    pub(crate) fn new(gateway: Arc<Gateway>, token: String) -> Admin {
        Admin { gateway, token }
    }

    pub(crate) async fn handle(&self, req: Request<RequestBody>) -> Response<Full<Bytes>> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let response = match self.route(req).await {
            Ok(response) => response,
            Err(e) => {
                if let AdminError::StoreUnavailable(cause) = &e {
                    self.gateway.metrics.store_error(StoreOp::Admin);
                    tracing::warn!(%method, path, cause = %error_chain(cause), "admin call failed");
                }
                e.response()
            }
        };
        tracing::info!(target: "keygate::admin", %method, path, status = response.status().as_u16(), "admin");
        response
    }

    async fn route(&self, req: Request<RequestBody>) -> Result<Response<Full<Bytes>>, AdminError> {
        let path = req.uri().path().to_string();
        let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
        match (req.method(), segments.as_slice()) {
            (&Method::GET, ["healthz"]) => Ok(text(StatusCode::OK, "ok\n", "text/plain")),
            (&Method::GET, ["readyz"]) => Ok(self.ready().await),
            (&Method::GET, ["metrics"]) => Ok(text(
                StatusCode::OK,
                &self.gateway.metrics.render(),
                "text/plain; version=0.0.4; charset=utf-8",
            )),
            (_, ["healthz" | "readyz" | "metrics"]) => Err(AdminError::MethodNotAllowed),
            (_, ["v1", ..]) => {
                self.authorize(&req)?;
                keys::dispatch(&self.gateway, req, &segments[1..]).await
            }
            _ => Err(AdminError::NotFound(format!(
                "no admin endpoint at `{path}`"
            ))),
        }
    }

    async fn ready(&self) -> Response<Full<Bytes>> {
        match self.gateway.store.ping().await {
            Ok(()) => {
                self.gateway.health.answered();
                text(StatusCode::OK, "ready\n", "text/plain")
            }
            Err(e) => {
                self.gateway.metrics.store_error(StoreOp::Ping);
                self.gateway.health.failed(&e);
                problem_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "Key store unavailable",
                    "The key store does not answer.",
                )
            }
        }
    }

    fn authorize(&self, req: &Request<RequestBody>) -> Result<(), AdminError> {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.get(..7)
                    .filter(|s| s.eq_ignore_ascii_case("bearer "))
                    .map(|_| v[7..].trim())
            })
            .ok_or(AdminError::Unauthorized)?;
        if constant_time_eq(given.as_bytes(), self.token.as_bytes()) {
            Ok(())
        } else {
            Err(AdminError::Unauthorized)
        }
    }
}

/// Compares without an early exit, so timing does not reveal how much of a token matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn text(status: StatusCode, body: &str, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn json(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    text(status, &body.to_string(), "application/json")
}

/// Reads a JSON body (at most 1 MiB). Syntax errors are 400; a field of the wrong type,
/// missing or unknown is 422 naming the field.
async fn read_json<T: DeserializeOwned>(
    req: Request<RequestBody>,
    empty_as: &str,
) -> Result<T, AdminError> {
    let bytes = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|_| AdminError::PayloadTooLarge)?
        .to_bytes();
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        empty_as.as_bytes()
    } else {
        &bytes
    };
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            return AdminError::BadRequest(format!("the body is not valid JSON: {inner}"));
        }
        let message = inner.to_string();
        let field = if path == "." {
            message.split('`').nth(1).unwrap_or("body").to_string()
        } else {
            path
        };
        let message = message
            .split(" at line ")
            .next()
            .unwrap_or(&message)
            .to_string();
        AdminError::Invalid(Invalid { field, message })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }

    #[test]
    fn invalid_names_the_field_in_the_body() {
        let e = AdminError::Invalid(Invalid::new("name", "too short"));
        let response = e.response();
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    }
}
