//! Secrets: where a request carries one, what a well-formed one looks like, and its digest.
//! No I/O here: a malformed secret is refused before the store is asked.
//!
//! A secret is `prefix` + 32 characters of `[0-9A-Za-z]` + a 6-character checksum: the
//! CRC-32 (IEEE, as zlib computes it) of everything before it, in base 62 (`0-9A-Za-z`),
//! left-padded with `0`.

use hyper::HeaderMap;
use hyper::header::{AUTHORIZATION, HeaderName};
use rand::distr::{Alphanumeric, SampleString};
use sha2::{Digest, Sha256};

/// The header that carries a key besides `Authorization: Bearer`.
pub const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

const BODY_LEN: usize = 32;
const CHECKSUM_LEN: usize = 6;
/// Characters of a secret kept as its display prefix.
pub const DISPLAY_PREFIX_LEN: usize = 12;

/// Which headers carried the credential, so exactly those are removed before forwarding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CarriedBy {
    pub x_api_key: bool,
    pub authorization: bool,
}

/// Why a request has no usable credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialError {
    /// Neither header is present.
    Missing,
    /// Several values that differ, or a value that is not text.
    Conflicting,
}

/// Finds the secret in `X-API-Key` or `Authorization: Bearer` (scheme case-insensitive).
/// Every value present must be the same secret.
pub fn extract(headers: &HeaderMap) -> Result<(&str, CarriedBy), CredentialError> {
    let mut found: Option<&[u8]> = None;
    let mut carried = CarriedBy::default();
    let mut conflict = false;
    for value in headers.get_all(X_API_KEY) {
        carried.x_api_key = true;
        note(&mut found, &mut conflict, trim(value.as_bytes()));
    }
    for value in headers.get_all(AUTHORIZATION) {
        let Some(secret) = bearer(value.as_bytes()) else {
            // Another scheme (Basic, ...) belongs to the upstream, not to us.
            continue;
        };
        carried.authorization = true;
        note(&mut found, &mut conflict, secret);
    }
    match found {
        None => Err(CredentialError::Missing),
        Some(_) if conflict => Err(CredentialError::Conflicting),
        Some(secret) => std::str::from_utf8(secret)
            .map(|s| (s, carried))
            .map_err(|_| CredentialError::Conflicting),
    }
}

fn note<'a>(found: &mut Option<&'a [u8]>, conflict: &mut bool, value: &'a [u8]) {
    match found {
        None => *found = Some(value),
        Some(seen) => *conflict |= *seen != value,
    }
}

fn bearer(value: &[u8]) -> Option<&[u8]> {
    let value = trim(value);
    if value.len() > 7 && value[..6].eq_ignore_ascii_case(b"bearer") && value[6] == b' ' {
        Some(trim(&value[7..]))
    } else {
        None
    }
}

fn trim(value: &[u8]) -> &[u8] {
    value.trim_ascii()
}

/// True when `secret` has the generated shape for `prefix` and its checksum matches.
pub fn is_well_formed(secret: &str, prefix: &str) -> bool {
    let Some(rest) = secret.strip_prefix(prefix) else {
        return false;
    };
    if rest.len() != BODY_LEN + CHECKSUM_LEN || !rest.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return false;
    }
    let (signed, checksum) = secret.split_at(secret.len() - CHECKSUM_LEN);
    // The six digits are decoded (multiplications) rather than the CRC encoded to compare
    // with them: base62 encodes through u128, six divisions by 62 in software. Either way
    // one string matches, its digits zero-padded to six.
    base62::decode(checksum).is_ok_and(|n| n == u128::from(crc32fast::hash(signed.as_bytes())))
}

/// A new random secret with a valid checksum.
pub fn generate(prefix: &str) -> String {
    let mut secret = String::with_capacity(prefix.len() + BODY_LEN + CHECKSUM_LEN);
    secret.push_str(prefix);
    Alphanumeric.append_string(&mut rand::rng(), &mut secret, BODY_LEN);
    let mut checksum = [0u8; CHECKSUM_LEN];
    encode_checksum(crc32fast::hash(secret.as_bytes()), &mut checksum);
    secret.push_str(std::str::from_utf8(&checksum).expect("base62 is ASCII"));
    secret
}

/// CRC-32 in base 62, most significant digit first, left-padded with `0` to 6 characters.
fn encode_checksum(crc: u32, out: &mut [u8; CHECKSUM_LEN]) {
    let mut digits = [0u8; 8];
    let len = base62::encode_bytes(crc, &mut digits).expect("u32 fits 6 base62 digits");
    out.fill(b'0');
    out[CHECKSUM_LEN - len..].copy_from_slice(&digits[..len]);
}

/// SHA-256 of a secret: the only form in which the store sees it.
pub fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// The part of a secret shown in listings to tell keys apart.
pub fn display_prefix(secret: &str) -> &str {
    // Cut at a character boundary: any string may come here, not only our ASCII secrets
    // (found by the `checksum` fuzz target).
    let mut end = DISPLAY_PREFIX_LEN.min(secret.len());
    while !secret.is_char_boundary(end) {
        end -= 1;
    }
    &secret[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    #[test]
    fn display_prefix_cuts_at_a_character_boundary() {
        assert_eq!(display_prefix("kg_abcdefgh\u{753}xyz"), "kg_abcdefgh");
        assert_eq!(display_prefix("kg_"), "kg_");
    }

    #[test]
    fn generated_secrets_are_well_formed() {
        for _ in 0..100 {
            let s = generate("kg_");
            assert_eq!(s.len(), 3 + 32 + 6);
            assert!(is_well_formed(&s, "kg_"), "{s}");
            assert!(!is_well_formed(&s, "xx_"));
        }
    }

    #[test]
    fn checksum_matches_zlib_crc32_in_base62() {
        // zlib.crc32(b"kg_" + b"A"*32) == 1094712787; in base 62 (0-9A-Za-z): "1C5Inr".
        let body = format!("kg_{}", "A".repeat(32));
        assert_eq!(crc32fast::hash(body.as_bytes()), 1094712787);
        let mut out = [0u8; 6];
        encode_checksum(1094712787, &mut out);
        assert_eq!(&out, b"1C5Inr");
        assert!(is_well_formed(&format!("{body}1C5Inr"), "kg_"));
        // Every digit counts, and so does a letter's case (C is 12, c is 38).
        for at in 0..6 {
            let mut wrong = *b"1C5Inr";
            wrong[at] = if wrong[at] == b'0' { b'1' } else { b'0' };
            let wrong = std::str::from_utf8(&wrong).unwrap();
            assert!(!is_well_formed(&format!("{body}{wrong}"), "kg_"), "{wrong}");
        }
        assert!(!is_well_formed(&format!("{body}1c5Inr"), "kg_"));
        // Small values are left-padded with zeros.
        encode_checksum(61, &mut out);
        assert_eq!(&out, b"00000z");
    }

    #[test]
    fn any_changed_character_breaks_the_checksum() {
        let s = generate("kg_");
        let mut bytes = s.clone().into_bytes();
        bytes[10] = if bytes[10] == b'a' { b'b' } else { b'a' };
        assert!(!is_well_formed(std::str::from_utf8(&bytes).unwrap(), "kg_"));
        assert!(!is_well_formed(&s[..s.len() - 1], "kg_"));
        assert!(!is_well_formed(&format!("{s}0"), "kg_"));
        assert!(!is_well_formed("", "kg_"));
        assert!(!is_well_formed("kg_ünïcode", "kg_"));
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    #[test]
    fn extracts_from_either_header() {
        let h = headers(&[("x-api-key", "abc")]);
        assert_eq!(extract(&h).unwrap().0, "abc");
        let h = headers(&[("authorization", "bEaReR  abc ")]);
        let (secret, by) = extract(&h).unwrap();
        assert_eq!(secret, "abc");
        assert!(by.authorization && !by.x_api_key);
    }

    #[test]
    fn equal_values_in_both_headers_are_accepted() {
        let h = headers(&[("x-api-key", "abc"), ("authorization", "Bearer abc")]);
        let (_, by) = extract(&h).unwrap();
        assert!(by.authorization && by.x_api_key);
    }

    #[test]
    fn differing_values_conflict() {
        let h = headers(&[("x-api-key", "abc"), ("authorization", "Bearer abd")]);
        assert_eq!(extract(&h), Err(CredentialError::Conflicting));
        let h = headers(&[("x-api-key", "abc"), ("x-api-key", "xyz")]);
        assert_eq!(extract(&h), Err(CredentialError::Conflicting));
    }

    #[test]
    fn other_authorization_schemes_are_not_credentials() {
        let h = headers(&[("authorization", "Basic dXNlcjpwYXNz")]);
        assert_eq!(extract(&h), Err(CredentialError::Missing));
        assert_eq!(extract(&HeaderMap::new()), Err(CredentialError::Missing));
    }
}
