//! The credential parser on any header block: X-API-Key and Authorization values of any bytes,
//! repeated or not. It must never panic, and what it extracts must be one of the values sent.
#![no_main]

use hyper::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut headers = HeaderMap::new();
    // Split the input into up to four header values; the first byte of each part chooses
    // the header it goes to.
    for part in data.split(|&b| b == b'\n').take(4) {
        let Some((&which, value)) = part.split_first() else {
            continue;
        };
        let Ok(value) = HeaderValue::from_bytes(value) else {
            continue;
        };
        if which % 2 == 0 {
            headers.append("x-api-key", value);
        } else {
            headers.append(AUTHORIZATION, value);
        }
    }
    if let Ok((secret, _)) = keygate::credential::extract(&headers) {
        let sent = secret.is_empty() || headers.iter().any(|(_, v)| {
            v.as_bytes()
                .windows(secret.len())
                .any(|w| w == secret.as_bytes())
        });
        assert!(sent, "extracted a secret that was not sent");
        // The shape check runs on whatever was extracted.
        let _ = keygate::credential::is_well_formed(secret, "kg_");
    }
});
