//! Reading texts for `kiln run`: one text per line, or JSON Lines.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::Value;

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

/// A text and the id its output line carries.
#[derive(Debug, Clone, PartialEq)]
pub struct TextRecord {
    /// From the input, or the 0-based line number.
    pub id: Value,
    /// The text.
    pub text: String,
}

/// Reads every text of `path`. Errors name the file and the 1-based line.
pub fn read_texts(path: &Path, format: InputFormat) -> Result<Vec<TextRecord>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading input {}", path.display()))?;
    let format = match format {
        InputFormat::Auto => match path.extension().and_then(|e| e.to_str()) {
            Some("jsonl" | "ndjson") => InputFormat::Jsonl,
            _ => InputFormat::Lines,
        },
        other => other,
    };
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let mut lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    if lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop(); // a final newline ends the last line; it does not start an empty one
    }
    let mut records = Vec::with_capacity(lines.len());
    for (index, raw) in lines.into_iter().enumerate() {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let line = std::str::from_utf8(raw).map_err(|e| {
            anyhow::anyhow!(
                "{}: line {} is not valid UTF-8 (invalid byte at column {}); kiln reads UTF-8 text",
                path.display(),
                index + 1,
                e.valid_up_to() + 1
            )
        })?;
        match format {
            InputFormat::Jsonl => {
                if line.trim().is_empty() {
                    continue;
                }
                records.push(
                    parse_jsonl_line(line, index)
                        .map_err(|e| anyhow::anyhow!("{}: line {}: {e}", path.display(), index + 1))?,
                );
            }
            _ => records.push(TextRecord { id: Value::from(index), text: line.to_string() }),
        }
    }
    if records.is_empty() {
        bail!(
            "{}: the input has no texts; expected one text per line, or JSON Lines with a \"text\" field",
            path.display()
        );
    }
    Ok(records)
}

fn parse_jsonl_line(line: &str, index: usize) -> std::result::Result<TextRecord, String> {
    let value: Value = serde_json::from_str(line).map_err(|e| format!("invalid JSON ({e})"))?;
    let Value::Object(mut object) = value else {
        return Err(r#"expected a JSON object like {"id": 1, "text": "..."}"#.to_string());
    };
    let text = match object.remove("text") {
        Some(Value::String(text)) => text,
        Some(other) => return Err(format!("\"text\" must be a string, found {other}")),
        None => return Err(r#"no "text" field; expected {"id": ..., "text": "..."}"#.to_string()),
    };
    let id = object.remove("id").unwrap_or_else(|| Value::from(index));
    Ok(TextRecord { id, text })
}

#[cfg(test)]
mod tests {
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
