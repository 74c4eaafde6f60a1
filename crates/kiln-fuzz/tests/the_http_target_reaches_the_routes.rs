//! The `http` fuzz target is worth its mutations only if its seeds get past the door.

use kiln_fuzz::seeds;

/// The `http` target reaches the routes: its seeds are answered as a client would be
/// (embeddings and the protocol's infer 200, a request without the key 401), so its
/// mutations exercise the request parsing of every route, not a refusal at the door.
#[test]
fn the_http_target_s_seeds_reach_the_routes() {
    let corpus = seeds("http").unwrap();
    let status = |i: usize| kiln_fuzz::http_call(&corpus[i]).expect("an HTTP request").0.as_u16();
    assert_eq!(status(0), 200, "POST /v1/embeddings");
    assert_eq!(status(1), 200, "POST /embed");
    assert_eq!(status(2), 200, "POST /v2/models/…/infer");
    assert_eq!(status(3), 200, "GET /info");
    assert_eq!(status(7), 401, "no API key");
}
