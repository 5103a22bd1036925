//! Path normalization: never panics; what it returns starts at the root,
//! holds no empty or dot segment, no escape of an unreserved character (it
//! would decode to something else at the upstream), no encoded or raw
//! slash or backslash, and normalizes to itself.
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
    assert!(!once.contains('\\'), "{path:?} -> {once:?}");
    let b = once.as_bytes();
    for (i, _) in once.match_indices('%') {
        let hex = std::str::from_utf8(&b[i + 1..i + 3]).expect("two hex digits");
        let v = u8::from_str_radix(hex, 16).expect("an escape");
        assert!(
            !(v.is_ascii_alphanumeric() || b"-._~/\\".contains(&v)),
            "{path:?} -> {once:?} keeps %{hex}"
        );
    }
    assert_eq!(
        gatehouse::fuzzing::normalize_path(&once).as_deref(),
        Ok(once.as_str()),
        "not idempotent on {path:?}"
    );
});
