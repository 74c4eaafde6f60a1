//! Name → plugin registries, filled at link time by `inventory`.
//!
//! A plugin crate submits a registration (a name plus a plain constructor function,
//! built in const context) with [`register_provider!`](crate::register_provider) or
//! [`register_tracker!`](crate::register_tracker). [`Registry::collect`] folds what was
//! submitted into a sorted map once, rejecting duplicate names; a lookup of an unknown
//! name answers with the names that are known. No central list of backends exists.
//!
//! Every plugin kind — provider, tracker, cache, profiler — has the same registration
//! shape, defined once by [`plugin_kind!`](crate::plugin_kind): a `name` configs choose
//! it by, a one-line `description`, and `build`, a plain function from the kind's set-up
//! (what its constructor is given) to the plugin, run only when a config chooses it.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;

use crate::error::{ConfigIssue, Error, Result};

/// A plugin's own keys as its options type, or a config error at `key` naming the kind:
/// what every `*Setup::options` of a registry does.
pub fn plugin_options<T: DeserializeOwned>(
    options: &serde_json::Map<String, serde_json::Value>,
    key: &str,
    what: &str,
) -> Result<T> {
    // The error names the option that was wrong (`provider.options.tf32`), not only the table.
    serde_path_to_error::deserialize(serde_json::Value::Object(options.clone())).map_err(|e| {
        let path = e.path().to_string();
        let at = if path.is_empty() || path == "." { key.to_string() } else { format!("{key}.{path}") };
        Error::Config(vec![ConfigIssue::new(
            at,
            e.inner().to_string(),
            format!("the keys {what} accepts (see docs/config.md)"),
        )])
    })
}

/// A registration that can live in a [`Registry`].
pub trait Registration: Sync + 'static {
    /// What kind of plugin this is, for messages: "provider", "tracker".
    const KIND: &'static str;
    /// The name it is chosen by in configs.
    fn name(&self) -> &'static str;
    /// A one-line description for listings.
    fn description(&self) -> &'static str;
}

/// Defines the registration type of one plugin kind: `$registration { name,
/// description, build: fn(&$setup) -> Result<$built> }`, its const constructor, its
/// [`Registration`] impl (`KIND = $kind`, for messages) and its `inventory` collection.
/// The four kinds are declared with it, so they cannot drift apart.
#[doc(hidden)]
#[macro_export]
macro_rules! plugin_kind {
    ($(#[$doc:meta])* $registration:ident, $kind:literal, $setup:ty, $built:ty) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub struct $registration {
            /// The name a config chooses it by.
            pub name: &'static str,
            /// One line for listings (`kiln providers`).
            pub description: &'static str,
            /// Builds it when a config chooses it; registering does no work.
            pub build: fn(&$setup) -> $crate::Result<$built>,
        }

        impl $registration {
            /// Const constructor, used by the kind's `register_*!` macro.
            pub const fn new(
                name: &'static str,
                description: &'static str,
                build: fn(&$setup) -> $crate::Result<$built>,
            ) -> Self {
                $registration { name, description, build }
            }
        }

        impl $crate::Registration for $registration {
            const KIND: &'static str = $kind;
            fn name(&self) -> &'static str {
                self.name
            }
            fn description(&self) -> &'static str {
                self.description
            }
        }

        $crate::__private::inventory::collect!($registration);
    };
}

/// Registrations of one kind, by name.
#[derive(Debug)]
pub struct Registry<R: 'static> {
    entries: BTreeMap<&'static str, &'static R>,
}

impl<R: Registration> Registry<R> {
    /// Folds registrations into a registry; two with the same name are an error.
    pub fn collect(items: impl IntoIterator<Item = &'static R>) -> Result<Self> {
        let mut entries = BTreeMap::new();
        for item in items {
            if entries.insert(item.name(), item).is_some() {
                return Err(Error::DuplicateName { kind: R::KIND, name: item.name().to_string() });
            }
        }
        Ok(Registry { entries })
    }

    /// The registration called `name`, or [`Error::UnknownName`] listing the known ones.
    pub fn get(&self, name: &str) -> Result<&'static R> {
        self.entries.get(name).copied().ok_or_else(|| Error::UnknownName {
            kind: R::KIND,
            name: name.to_string(),
            known: self.names().into_iter().map(String::from).collect(),
        })
    }

    /// Registered names, sorted.
    pub fn names(&self) -> Vec<&'static str> {
        self.entries.keys().copied().collect()
    }

    /// Registrations, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = &'static R> + '_ {
        self.entries.values().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Reg(&'static str);
    impl Registration for Reg {
        const KIND: &'static str = "widget";
        fn name(&self) -> &'static str {
            self.0
        }
        fn description(&self) -> &'static str {
            "test widget"
        }
    }

    static A: Reg = Reg("alpha");
    static B: Reg = Reg("beta");
    static A_AGAIN: Reg = Reg("alpha");

    #[test]
    fn duplicate_names_are_rejected() {
        let err = Registry::collect([&A, &B, &A_AGAIN]).unwrap_err();
        assert_eq!(err.to_string(), "widget `alpha` is registered twice; each widget name must be unique");
    }

    #[test]
    fn unknown_name_lists_known_names_sorted() {
        let reg = Registry::collect([&B, &A]).unwrap();
        assert_eq!(reg.names(), vec!["alpha", "beta"]);
        assert_eq!(reg.get("beta").unwrap().name(), "beta");
        let err = reg.get("gamma").unwrap_err().to_string();
        assert_eq!(err, "unknown widget `gamma`; known widgets: alpha, beta");
    }
}
