//! The config loader on any text: never panics; a config it accepts is accepted again when
//! parsed a second time (no hidden state), and every refusal names at least one problem.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match keygate::config::Config::parse(text) {
        Ok(_) => assert!(keygate::config::Config::parse(text).is_ok()),
        Err(problems) => assert!(!problems.is_empty()),
    }
});
