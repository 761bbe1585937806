//! The admin API of SPEC §4 as a platform team uses it.

mod support;

use reqwest::Method;
use serde_json::{Value, json};
use support::{Gateway, Upstream, key_id};

fn id(key: &Value) -> String {
    key_id(key).to_string()
}

/// Without the admin token every /v1 call is 401; health and metrics need none.
#[tokio::test]
async fn the_admin_api_is_never_open() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream, "").await;
    let base = format!("http://{}", gw.admin);
    let none = gw.http.get(format!("{base}/v1/keys")).send().await.unwrap();
    assert_eq!(none.status(), 401);
    assert_eq!(none.headers()["content-type"], "application/problem+json");
    let wrong = gw
        .http
        .get(format!("{base}/v1/keys"))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    assert_eq!(gw.probe("/healthz").await, 200);
    assert_eq!(gw.probe("/readyz").await, 200);
    let metrics = gw
        .http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("keygate_requests_total"));
}

/// Creation validates every field, names it, and enforces the name and count rules.
#[tokio::test]
async fn create_validates_and_enforces_name_rules() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream, "keys:\n  max_per_owner: 3\n").await;
    let (key, secret) = gw
        .create_key(json!({
            "name": "deploy-bot", "owner": "team-a", "description": "CI deploys",
            "expires_in": "30d", "metadata": {"env": "prod"}
        }))
        .await;
    assert!(secret.starts_with("kg_") && secret.len() == 41);
    assert_eq!(key["prefix"], &secret[..12]);
    assert_eq!(key["status"], "active");
    assert_eq!(
        key["rate_limit"],
        json!({"per_minute": 100, "per_second": 10})
    );
    assert_eq!(key["metadata"], json!({"env": "prod"}));
    // The secret is shown once: never again.
    let shown = gw.get_key(&id(&key)).await;
    assert!(shown.get("secret").is_none());
    assert!(!shown.to_string().contains(&secret[3..]));

    for (body, field) in [
        (json!({"name": "ab", "owner": "team-a"}), "name"),
        (json!({"owner": "team-a"}), "name"),
        (json!({"name": "valid-name"}), "owner"),
        (
            json!({"name": "valid-name", "owner": "team-a", "expires_in": "2d"}),
            "expires_in",
        ),
        (
            json!({"name": "valid-name", "owner": "team-a", "expires_at": "2001-01-01T00:00:00Z"}),
            "expires_at",
        ),
        (
            json!({"name": "valid-name", "owner": "team-a", "colour": "red"}),
            "colour",
        ),
        (
            json!({"name": "valid-name", "owner": "team-a", "rate_limit": {"per_minute": 0}}),
            "rate_limit.per_minute",
        ),
        (
            json!({"name": "valid-name", "owner": "team-a", "rate_limit": {"per_minute": "many"}}),
            "rate_limit.per_minute",
        ),
    ] {
        let (status, problem) = gw.admin(Method::POST, "/v1/keys", Some(body.clone())).await;
        assert_eq!(status, 422, "{body} → {problem}");
        assert_eq!(problem["field"], field, "{body} → {problem}");
        assert!(
            problem["detail"].as_str().unwrap().contains(field),
            "{problem}"
        );
    }
    let broken = gw
        .http
        .post(format!("http://{}/v1/keys", gw.admin))
        .bearer_auth(support::ADMIN_TOKEN)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(broken.status(), 400);

    // Unique per owner among non-revoked keys.
    let (status, problem) = gw
        .admin(
            Method::POST,
            "/v1/keys",
            Some(json!({"name": "deploy-bot", "owner": "team-a"})),
        )
        .await;
    assert_eq!((status, problem["code"].as_str()), (409, Some("conflict")));
    gw.create_key(json!({"name": "deploy-bot", "owner": "team-b"}))
        .await;
    // max_per_owner is 3.
    gw.create_key(json!({"name": "second", "owner": "team-a"}))
        .await;
    let (third, _) = gw
        .create_key(json!({"name": "third", "owner": "team-a"}))
        .await;
    let (status, problem) = gw
        .admin(
            Method::POST,
            "/v1/keys",
            Some(json!({"name": "fourth", "owner": "team-a"})),
        )
        .await;
    assert_eq!(status, 409, "{problem}");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("max_per_owner")
    );
    // Revoking frees both the slot and the name.
    assert_eq!(gw.revoke(&id(&third)).await.0, 200);
    gw.create_key(json!({"name": "third", "owner": "team-a"}))
        .await;
}

/// List filters by status, owner and search text; show, edit, revoke behave as the SPEC says.
#[tokio::test]
async fn list_show_edit_and_revoke() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream, "").await;
    let (a, _) = gw
        .create_key(
            json!({"name": "billing-sync", "owner": "team-a", "description": "Nightly ledger"}),
        )
        .await;
    let (b, _) = gw
        .create_key(json!({"name": "search-api", "owner": "team-b", "expires_in": "7d"}))
        .await;
    let (c, _) = gw
        .create_key(json!({"name": "old-one", "owner": "team-a"}))
        .await;
    assert_eq!(gw.revoke(&id(&c)).await.0, 200);

    let names = |list: Value| -> Vec<String> {
        list["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["name"].as_str().unwrap().to_string())
            .collect()
    };
    let (_, all) = gw.admin(Method::GET, "/v1/keys", None).await;
    assert_eq!(names(all), ["billing-sync", "search-api", "old-one"]);
    let (_, list) = gw.admin(Method::GET, "/v1/keys?owner=team-a", None).await;
    assert_eq!(names(list), ["billing-sync", "old-one"]);
    let (_, list) = gw.admin(Method::GET, "/v1/keys?status=revoked", None).await;
    assert_eq!(names(list), ["old-one"]);
    let (_, list) = gw
        .admin(Method::GET, "/v1/keys?status=expiring_soon", None)
        .await;
    assert_eq!(names(list), ["search-api"]);
    let (_, list) = gw.admin(Method::GET, "/v1/keys?status=active", None).await;
    assert_eq!(names(list), ["billing-sync"]);
    let (_, list) = gw.admin(Method::GET, "/v1/keys?search=LEDGER", None).await;
    assert_eq!(names(list), ["billing-sync"]);
    let prefix = b["prefix"].as_str().unwrap();
    let (_, list) = gw
        .admin(Method::GET, &format!("/v1/keys?search={prefix}"), None)
        .await;
    assert_eq!(names(list), ["search-api"]);
    let (status, _) = gw.admin(Method::GET, "/v1/keys?status=sleepy", None).await;
    assert_eq!(status, 422);

    let (status, edited) = gw
        .admin(
            Method::PATCH,
            &format!("/v1/keys/{}", id(&a)),
            Some(json!({"name": "billing-sync-2", "description": null})),
        )
        .await;
    assert_eq!(status, 200, "{edited}");
    assert_eq!(edited["name"], "billing-sync-2");
    assert!(edited["description"].is_null());
    let (status, problem) = gw
        .admin(
            Method::PATCH,
            &format!("/v1/keys/{}", id(&a)),
            Some(json!({"owner": "team-z"})),
        )
        .await;
    assert_eq!((status, problem["field"].as_str()), (422, Some("owner")));
    let (status, _) = gw
        .admin(
            Method::PATCH,
            &format!("/v1/keys/{}", id(&c)),
            Some(json!({"name": "revived"})),
        )
        .await;
    assert_eq!(status, 409);
    let (status, _) = gw
        .admin(Method::GET, "/v1/keys/key_doesnotexist", None)
        .await;
    assert_eq!(status, 404);

    // Revocation is idempotent and keeps the first time.
    let (s1, r1) = gw.revoke(&id(&b)).await;
    let (s2, r2) = gw.revoke(&id(&b)).await;
    assert_eq!((s1, s2), (200, 200));
    assert_eq!(r1["status"], "revoked");
    assert_eq!(r1["revoked_at"], r2["revoked_at"]);

    let kinds = gw.audit_events("?limit=50").await;
    assert_eq!(kinds.iter().filter(|k| *k == "created").count(), 3);
    assert_eq!(
        kinds.iter().filter(|k| *k == "revoked").count(),
        2,
        "{kinds:?}"
    );
    assert_eq!(kinds.iter().filter(|k| *k == "edited").count(), 1);
}

/// Rotation gives a new key with the same name, owner and limits; the old one keeps working
/// for the grace period, and with `0s` stops at once.
#[tokio::test]
async fn rotation_with_and_without_grace() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream, "").await;
    let (old, old_secret) = gw
        .create_key(json!({"name": "rotating", "owner": "team-a", "rate_limit": {"per_minute": 50}, "metadata": {"k": "v"}}))
        .await;
    assert_eq!(gw.call_with_key("/", &old_secret).await.status(), 200);

    let (status, new) = gw.rotate(&id(&old), None).await;
    assert_eq!(status, 201, "{new}");
    let new_secret = new["secret"].as_str().unwrap().to_string();
    assert_ne!(new_secret, old_secret);
    assert_eq!(new["name"], "rotating");
    assert_eq!(new["rate_limit"]["per_minute"], 50);
    assert_eq!(new["metadata"], json!({"k": "v"}));
    let old_now = gw.get_key(&id(&old)).await;
    let expires: jiff::Timestamp = old_now["expires_at"].as_str().unwrap().parse().unwrap();
    let hours = expires.duration_since(jiff::Timestamp::now()).as_secs_f64() / 3600.0;
    assert!((23.9..=24.0).contains(&hours), "{hours}");
    assert_eq!(gw.call_with_key("/", &old_secret).await.status(), 200);
    assert_eq!(gw.call_with_key("/", &new_secret).await.status(), 200);

    let (status, newer) = gw.rotate(&id(&new), Some("0s")).await;
    assert_eq!(status, 201);
    let newer_secret = newer["secret"].as_str().unwrap();
    gw.refused("/", &new_secret, 401, "expired_api_key").await;
    assert_eq!(gw.call_with_key("/", newer_secret).await.status(), 200);

    let (_, audit) = gw
        .admin(Method::GET, &format!("/v1/audit?key_id={}", id(&old)), None)
        .await;
    let first = &audit["events"][0];
    assert_eq!(first["event"], "rotated");
    assert_eq!(first["detail"]["new_key_id"], new["id"]);
}
