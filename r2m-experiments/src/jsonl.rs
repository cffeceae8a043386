//! JSONL files of the experiments: read one value a line (errors name the file and line),
//! write atomically.

use std::path::Path;

use r2m_core::{R2mError, Result};
use serde::Serialize;

/// One `T` per non-empty line of `path`; a bad line is an error naming the file and line.
pub fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let text = std::fs::read_to_string(path).map_err(|e| R2mError::io(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| R2mError::format(path, format!("line {}: {e}", i + 1)))
        })
        .collect()
}

/// Write JSONL atomically (a temporary file renamed into place).
pub fn write_jsonl<T: Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    let mut text = String::new();
    for r in rows {
        text.push_str(&serde_json::to_string(r).expect("json"));
        text.push('\n');
    }
    write_atomic(path, &text)
}

/// Write `text` to `path` atomically (a temporary file renamed into place).
pub fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| R2mError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| R2mError::io(path, e))
}
