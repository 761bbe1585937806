//! The secret's shape and checksum check on any string: never panics, and accepts a string
//! only if it has the prefix. Every generated secret passes, and changing any one of its
//! characters makes it fail.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if keygate::credential::is_well_formed(text, "kg_") {
        assert!(text.starts_with("kg_"));
    }
    let _ = keygate::credential::display_prefix(text);
    let _ = keygate::credential::digest(text);

    // A real secret with one character replaced by the fuzzer's choice.
    if let Some((&at, rest)) = data.split_first()
        && let Some(&with) = rest.first()
    {
        let secret = keygate::credential::generate("kg_");
        assert!(keygate::credential::is_well_formed(&secret, "kg_"));
        let mut bytes = secret.clone().into_bytes();
        let at = usize::from(at) % bytes.len();
        if bytes[at] != with {
            bytes[at] = with;
            if let Ok(changed) = String::from_utf8(bytes) {
                assert!(
                    !keygate::credential::is_well_formed(&changed, "kg_"),
                    "one changed character kept the checksum valid: {changed}"
                );
            }
        }
    }
});
