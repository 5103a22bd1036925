//! XML to JSON: never panics, holds its tree to the budget, and writes one
//! JSON document.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(json) = gatehouse::fuzzing::xml_to_json(data, 1 << 20) {
        // A raw value: checked whole, without serde_json's depth limit (the
        // converter allows 128 levels, each of which may add an array).
        assert!(
            serde_json::from_str::<&serde_json::value::RawValue>(&json).is_ok(),
            "{json}"
        );
    }
});
