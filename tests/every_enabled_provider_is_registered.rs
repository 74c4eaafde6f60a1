//! Every provider whose cargo feature is on is in the registry (the facade links it).

#[test]
fn every_enabled_provider_is_in_the_registry() {
    let registry = kiln::providers().expect("no duplicate provider names");
    let names = registry.names();
    for enabled in kiln::ENABLED_PROVIDERS {
        assert!(
            names.contains(enabled),
            "provider `{enabled}` is enabled but not registered; registered: {names:?}"
        );
    }
    #[cfg(feature = "candle")]
    assert!(names.contains(&"candle"));
}

#[test]
fn an_unknown_provider_is_answered_with_the_known_ones() {
    let err = kiln::build_provider(&kiln::ProviderConfig { name: "candel".into(), ..Default::default() })
        .err()
        .expect("no provider is called candel")
        .to_string();
    assert!(err.starts_with("unknown provider `candel`; known providers: "), "{err}");
    for enabled in kiln::ENABLED_PROVIDERS {
        assert!(err.contains(enabled), "{err}");
    }
}
