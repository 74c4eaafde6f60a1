//! Which PyTorch a libtorch folder is; shared by the build script and the provider.

use std::path::Path;

/// The version of the torch whose `lib/` folder is `lib`: `__version__` from a pip
/// torch's `version.py`, or a libtorch archive's `build-version`, beside `lib/`.
/// `None` when neither says.
pub fn torch_version(lib: &Path) -> Option<String> {
    let root = lib.parent()?;
    if let Ok(text) = std::fs::read_to_string(root.join("version.py")) {
        return text.lines().find_map(|l| {
            let value = l.strip_prefix("__version__")?.split('=').nth(1)?;
            Some(value.trim().trim_matches(|c| c == '\'' || c == '"').to_string())
        });
    }
    std::fs::read_to_string(root.join("build-version")).ok().map(|v| v.trim().to_string())
}

/// Whether a version string (`2.11.0+cu130`) is the release `expected` (`2.11.0`).
pub fn same_release(found: &str, expected: &str) -> bool {
    found.split('+').next() == Some(expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pip_and_archive_layouts_give_their_version() {
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("lib");
        assert_eq!(torch_version(&lib), None, "nothing says");
        std::fs::write(dir.path().join("build-version"), "2.11.0+cpu\n").unwrap();
        assert_eq!(torch_version(&lib).as_deref(), Some("2.11.0+cpu"));
        // pip's version.py wins over an archive's file.
        std::fs::write(
            dir.path().join("version.py"),
            "__all__ = ['__version__']\n__version__ = '2.10.1+cu130'\ndebug = False\n",
        )
        .unwrap();
        assert_eq!(torch_version(&lib).as_deref(), Some("2.10.1+cu130"));
        assert!(same_release("2.11.0+cu130", "2.11.0") && same_release("2.11.0", "2.11.0"));
        assert!(!same_release("2.10.1+cu130", "2.11.0") && !same_release("2.11.01", "2.11.0"));
    }
}
