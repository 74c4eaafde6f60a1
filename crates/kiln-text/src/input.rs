//! Text input files: one text per line, or JSON Lines with a `"text"` field. The parser
//! works on bytes so the CLI, the bench and the fuzz harnesses read input the same way.

use serde_json::Value;

/// How the bytes of a text input are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextFormat {
    /// One UTF-8 text per line; empty lines are empty texts.
    Lines,
    /// One JSON object per line: `{"id": ..., "text": "..."}`; `id` is optional and
    /// blank lines are skipped.
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

/// Parses every text of an input. A UTF-8 byte-order mark and `\r\n` line ends are
/// accepted; a final newline does not start an empty text. Errors are one line that
/// starts with `source` and names the 1-based line and what was wrong.
pub fn parse_texts(bytes: &[u8], source: &str, format: TextFormat) -> Result<Vec<TextRecord>, String> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    if lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    let mut records = Vec::with_capacity(lines.len());
    for (index, raw) in lines.into_iter().enumerate() {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let line = std::str::from_utf8(raw).map_err(|e| {
            format!(
                "{source}: line {} is not valid UTF-8 (invalid byte at column {}); kiln reads UTF-8 text",
                index + 1,
                e.valid_up_to() + 1
            )
        })?;
        match format {
            TextFormat::Jsonl => {
                if line.trim().is_empty() {
                    continue;
                }
                records.push(
                    parse_jsonl_line(line, index)
                        .map_err(|e| format!("{source}: line {}: {e}", index + 1))?,
                );
            }
            TextFormat::Lines => records.push(TextRecord { id: Value::from(index), text: line.to_string() }),
        }
    }
    if records.is_empty() {
        return Err(format!(
            "{source}: the input has no texts; expected one text per line, or JSON Lines with a \"text\" field"
        ));
    }
    Ok(records)
}

fn parse_jsonl_line(line: &str, index: usize) -> Result<TextRecord, String> {
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
