//! Path normalization: never panics; what it returns starts at the root,
//! holds no empty or dot segment, and normalizes to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(once) = gatehouse::fuzzing::normalize_path(path) else {
        return;
    };
    assert!(once.starts_with('/'), "{path:?} -> {once:?}");
    for segment in once.trim_end_matches('/').split('/').skip(1) {
        assert!(!matches!(segment, "" | "." | ".."), "{path:?} -> {once:?}");
    }
    assert_eq!(
        gatehouse::fuzzing::normalize_path(&once).as_deref(),
        Ok(once.as_str()),
        "not idempotent on {path:?}"
    );
    for prefix in ["/admin", "/a/b"] {
        if gatehouse::fuzzing::prefix_matches(prefix, &once) {
            assert!(once.starts_with(prefix));
        }
    }
});
