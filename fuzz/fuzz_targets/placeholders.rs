//! Aggregate placeholders: never panic, and a value can neither add a path
//! segment, a dot segment nor a query parameter to the part's path.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[derive(arbitrary::Arbitrary, Debug)]
struct Case {
    value: String,
    query_value: String,
    claim: String,
}

fuzz_target!(|case: Case| {
    let template = "/orders/{id}/items?user={query.u}&by={claim.sub}";
    let query = format!("u={}", case.query_value);
    let params = vec![("id".to_string(), case.value.clone())];
    let Ok(path) =
        gatehouse::fuzzing::fill_template(template, &params, Some(&query), Some(&case.claim))
    else {
        return;
    };
    let (path_part, query_part) = path.split_once('?').expect("the template's query");
    assert_eq!(path_part.matches('/').count(), 3, "{path}");
    for segment in path_part.split('/') {
        assert!(segment != "." && segment != "..", "{path}");
    }
    assert_eq!(query_part.matches('&').count(), 1, "{path}");
    assert_eq!(query_part.matches('=').count(), 2, "{path}");
    assert!(!path.contains('#'), "{path}");
});
