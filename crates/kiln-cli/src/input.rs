//! Reading texts for `kiln run`: one text per line, or JSON Lines.

use std::path::Path;

use anyhow::{Context, Result};
pub use kiln::text::input::TextRecord;
use kiln::text::input::{TextFormat, parse_texts};

/// How an input file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InputFormat {
    /// `.jsonl` / `.ndjson` files are JSON Lines, anything else one text per line.
    Auto,
    /// One UTF-8 text per line; empty lines are empty texts.
    Lines,
    /// One JSON object per line: `{"id": ..., "text": "..."}`; `id` is optional.
    Jsonl,
}

/// Reads every text of `path`. Errors name the file and the 1-based line.
pub fn read_texts(path: &Path, format: InputFormat) -> Result<Vec<TextRecord>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading input {}", path.display()))?;
    let format = match format {
        InputFormat::Jsonl => TextFormat::Jsonl,
        InputFormat::Lines => TextFormat::Lines,
        InputFormat::Auto => match path.extension().and_then(|e| e.to_str()) {
            Some("jsonl" | "ndjson") => TextFormat::Jsonl,
            _ => TextFormat::Lines,
        },
    };
    parse_texts(&bytes, &path.display().to_string(), format).map_err(anyhow::Error::msg)
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    fn read(content: &[u8], name: &str, format: InputFormat) -> Result<Vec<TextRecord>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        read_texts(&path, format)
    }

    #[test]
    fn lines_keep_empty_lines_and_number_ids_from_zero() {
        let r = read(b"a\r\n\nc\n", "t.txt", InputFormat::Auto).unwrap();
        let texts: Vec<_> = r.iter().map(|r| r.text.as_str()).collect();
        assert_eq!(texts, ["a", "", "c"]);
        assert_eq!(r[2].id, Value::from(2));
    }

    #[test]
    fn jsonl_takes_ids_and_falls_back_to_line_numbers() {
        let r =
            read(b"{\"id\": \"x\", \"text\": \"hi\"}\n\n{\"text\": \"\"}\n", "t.jsonl", InputFormat::Auto)
                .unwrap();
        assert_eq!(
            r,
            vec![
                TextRecord { id: Value::from("x"), text: "hi".into() },
                TextRecord { id: Value::from(2), text: "".into() },
            ]
        );
    }

    #[test]
    fn a_bad_jsonl_line_names_its_line_number() {
        let err = read(b"{\"text\": \"ok\"}\n{\"text\": 3}\n", "t.jsonl", InputFormat::Auto)
            .unwrap_err()
            .to_string();
        assert!(err.ends_with("t.jsonl: line 2: \"text\" must be a string, found 3"), "{err}");
        let err = read(b"{\"text\": \"ok\"}\n{oops\n", "t.txt", InputFormat::Jsonl).unwrap_err().to_string();
        assert!(err.contains("line 2: invalid JSON"), "{err}");
    }

    #[test]
    fn invalid_utf8_and_empty_files_are_clear_errors() {
        let err = read(b"fine\nbad \xff byte\n", "t.txt", InputFormat::Auto).unwrap_err().to_string();
        assert!(err.contains("line 2 is not valid UTF-8 (invalid byte at column 5)"), "{err}");
        let err = read(b"", "t.txt", InputFormat::Auto).unwrap_err().to_string();
        assert!(err.contains("the input has no texts"), "{err}");
    }
}
