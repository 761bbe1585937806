//! The key model, its status rules and the validation of what users may set. No I/O.

use std::collections::BTreeMap;
use std::net::IpAddr;

use jiff::{SignedDuration, Timestamp};
use serde_json::{Value, json};

use crate::ratelimit::Limits;

/// A key that expires within this long is `expiring_soon`.
const EXPIRING_SOON: SignedDuration = SignedDuration::from_hours(7 * 24);

/// One API key as the store keeps it. The secret itself is never kept, only its digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub id: String,
    /// SHA-256 of the secret.
    pub hash: [u8; 32],
    /// First characters of the secret, to tell keys apart in listings.
    pub prefix: String,
    pub name: String,
    pub description: Option<String>,
    pub owner: String,
    /// Id of the first key of a rotation chain: a key and its replacements share a name.
    pub family: String,
    pub created_at: Timestamp,
    pub expires_at: Option<Timestamp>,
    pub revoked_at: Option<Timestamp>,
    pub last_used_at: Option<Timestamp>,
    pub last_used_ip: Option<IpAddr>,
    /// The key's own limits; `None` means the configured default.
    pub per_minute: Option<u32>,
    pub per_second: Option<u32>,
    pub metadata: BTreeMap<String, String>,
}

/// Where a key stands, from the SPEC's rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Active,
    ExpiringSoon,
    Expired,
    Revoked,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::ExpiringSoon => "expiring_soon",
            Status::Expired => "expired",
            Status::Revoked => "revoked",
        }
    }

    pub fn parse(text: &str) -> Option<Status> {
        match text {
            "active" => Some(Status::Active),
            "expiring_soon" => Some(Status::ExpiringSoon),
            "expired" => Some(Status::Expired),
            "revoked" => Some(Status::Revoked),
            _ => None,
        }
    }

    /// Whether requests with a key in this status are let through.
    pub fn is_usable(self) -> bool {
        matches!(self, Status::Active | Status::ExpiringSoon)
    }
}

/// The status rule of [`KeyRecord::status`], for whoever keeps only these two fields.
pub(crate) fn status_at(revoked: bool, expires_at: Option<Timestamp>, now: Timestamp) -> Status {
    if revoked {
        return Status::Revoked;
    }
    match expires_at {
        Some(at) if at <= now => Status::Expired,
        Some(at) if at.duration_since(now) <= EXPIRING_SOON => Status::ExpiringSoon,
        _ => Status::Active,
    }
}

impl KeyRecord {
    /// `revoked` if revoked, else `expired` if past `expires_at`, else `expiring_soon`
    /// within 7 days of it, else `active`.
    pub fn status(&self, now: Timestamp) -> Status {
        status_at(self.revoked_at.is_some(), self.expires_at, now)
    }

    /// The limits in force: the key's own, defaults filled in.
    pub fn limits(&self, defaults: Limits) -> Limits {
        Limits {
            per_minute: self.per_minute.unwrap_or(defaults.per_minute),
            per_second: self.per_second.unwrap_or(defaults.per_second),
        }
    }

    /// The key object of the admin API. Never contains the secret or its digest.
    pub fn to_json(&self, defaults: Limits, now: Timestamp) -> Value {
        let limits = self.limits(defaults);
        json!({
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "owner": self.owner,
            "prefix": self.prefix,
            "created_at": rfc3339(self.created_at),
            "expires_at": self.expires_at.map(rfc3339),
            "revoked_at": self.revoked_at.map(rfc3339),
            "last_used_at": self.last_used_at.map(rfc3339),
            "last_used_ip": self.last_used_ip.map(|ip| ip.to_string()),
            "rate_limit": {"per_minute": limits.per_minute, "per_second": limits.per_second},
            "metadata": self.metadata,
            "status": self.status(now).as_str(),
        })
    }
}

/// RFC 3339 in UTC with at most millisecond precision.
pub fn rfc3339(at: Timestamp) -> String {
    Timestamp::from_millisecond(at.as_millisecond())
        .unwrap_or(at)
        .to_string()
}

/// A new key id: `key_` and 20 random characters.
pub fn new_id() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    let mut id = String::from("key_");
    Alphanumeric.append_string(&mut rand::rng(), &mut id, 20);
    id
}

/// A user-facing validation failure, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{field}`: {message}")]
pub struct Invalid {
    pub field: String,
    pub message: String,
}

impl Invalid {
    pub fn new(field: &str, message: impl Into<String>) -> Invalid {
        Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// 3 to 50 characters, not blank.
pub fn validate_name(name: &str) -> Result<(), Invalid> {
    let len = name.chars().count();
    if !(3..=50).contains(&len) || name.trim().is_empty() {
        return Err(Invalid::new(
            "name",
            format!("must be 3 to 50 characters, got {len}"),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(Invalid::new("name", "must not contain control characters"));
    }
    Ok(())
}

/// The owner travels to upstreams as `X-Keygate-Owner`, so it must be a valid header value.
pub fn validate_owner(owner: &str) -> Result<(), Invalid> {
    if owner.is_empty() || owner.len() > 200 {
        return Err(Invalid::new("owner", "must be 1 to 200 characters"));
    }
    if !owner.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return Err(Invalid::new(
            "owner",
            "must be printable ASCII without spaces (it is sent upstream as X-Keygate-Owner)",
        ));
    }
    Ok(())
}

pub fn validate_description(description: &str) -> Result<(), Invalid> {
    if description.chars().count() > 500 {
        return Err(Invalid::new(
            "description",
            "must be at most 500 characters",
        ));
    }
    Ok(())
}

pub fn validate_metadata(metadata: &BTreeMap<String, String>) -> Result<(), Invalid> {
    if metadata.len() > 50 {
        return Err(Invalid::new("metadata", "at most 50 entries"));
    }
    for (k, v) in metadata {
        if k.is_empty() || k.len() > 100 || v.len() > 1000 {
            return Err(Invalid::new(
                "metadata",
                format!("keys must be 1 to 100 bytes and values at most 1000, see `{k}`"),
            ));
        }
    }
    Ok(())
}

/// 1 to 1,000,000 per window.
pub fn validate_limit(field: &str, value: u32) -> Result<(), Invalid> {
    if !(1..=1_000_000).contains(&value) {
        return Err(Invalid::new(
            field,
            format!("must be 1 to 1000000, got {value}"),
        ));
    }
    Ok(())
}

/// `7d`, `30d`, `90d`, `180d`, `1y` (365 days) or `never`, from `now`.
pub fn expires_in(field: &str, text: &str, now: Timestamp) -> Result<Option<Timestamp>, Invalid> {
    let days = match text {
        "never" => return Ok(None),
        "7d" => 7,
        "30d" => 30,
        "90d" => 90,
        "180d" => 180,
        "1y" => 365,
        _ => {
            return Err(Invalid::new(
                field,
                format!("expected one of 7d, 30d, 90d, 180d, 1y, never; got `{text}`"),
            ));
        }
    };
    Ok(Some(now + SignedDuration::from_hours(24 * days)))
}

/// An RFC 3339 time in the future.
pub fn expires_at(field: &str, text: &str, now: Timestamp) -> Result<Timestamp, Invalid> {
    let at: Timestamp = text.parse().map_err(|_| {
        Invalid::new(
            field,
            format!("expected an RFC 3339 time such as 2027-01-31T00:00:00Z, got `{text}`"),
        )
    })?;
    if at <= now {
        return Err(Invalid::new(field, "must be in the future"));
    }
    Ok(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> KeyRecord {
        KeyRecord {
            id: "key_1".into(),
            hash: [0; 32],
            prefix: "kg_abcdefghi".into(),
            name: "ci".into(),
            description: None,
            owner: "team-a".into(),
            family: "key_1".into(),
            created_at: Timestamp::UNIX_EPOCH,
            expires_at: None,
            revoked_at: None,
            last_used_at: None,
            last_used_ip: None,
            per_minute: None,
            per_second: Some(3),
            metadata: BTreeMap::new(),
        }
    }

    #[test]
    fn status_rules() {
        let now: Timestamp = "2026-01-10T00:00:00Z".parse().unwrap();
        let mut k = key();
        assert_eq!(k.status(now), Status::Active);
        k.expires_at = Some(now + SignedDuration::from_hours(24 * 8));
        assert_eq!(k.status(now), Status::Active);
        k.expires_at = Some(now + SignedDuration::from_hours(24 * 7));
        assert_eq!(k.status(now), Status::ExpiringSoon);
        k.expires_at = Some(now);
        assert_eq!(k.status(now), Status::Expired);
        k.revoked_at = Some(now);
        assert_eq!(k.status(now), Status::Revoked);
    }

    #[test]
    fn own_limits_replace_defaults() {
        let l = key().limits(Limits {
            per_minute: 100,
            per_second: 10,
        });
        assert_eq!((l.per_minute, l.per_second), (100, 3));
    }

    #[test]
    fn json_has_no_secret_material() {
        let json = key().to_json(
            Limits {
                per_minute: 100,
                per_second: 10,
            },
            Timestamp::UNIX_EPOCH,
        );
        assert!(json.get("hash").is_none() && json.get("secret").is_none());
        assert_eq!(json["rate_limit"]["per_second"], 3);
        assert_eq!(json["status"], "active");
        assert_eq!(json["created_at"], "1970-01-01T00:00:00Z");
    }

    #[test]
    fn name_rules() {
        assert!(validate_name("ab").is_err());
        assert!(validate_name("abc").is_ok());
        assert!(validate_name(&"x".repeat(50)).is_ok());
        assert!(validate_name(&"x".repeat(51)).is_err());
        assert!(validate_name("   ").is_err());
    }

    #[test]
    fn expiry_forms() {
        let now: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        assert_eq!(expires_in("e", "never", now).unwrap(), None);
        assert_eq!(
            expires_in("e", "1y", now).unwrap().unwrap().to_string(),
            "2027-01-01T00:00:00Z"
        );
        assert!(expires_in("e", "2d", now).is_err());
        assert!(expires_at("e", "2025-01-01T00:00:00Z", now).is_err());
        assert_eq!(
            expires_at("e", "2026-06-01T02:00:00+02:00", now)
                .unwrap()
                .to_string(),
            "2026-06-01T00:00:00Z"
        );
    }
}
