//! Reading preference and prompt records from `.jsonl` / `.jsonl.gz`.
//!
//! Accepted record shapes, one JSON object per line:
//! - HH-RLHF: `{"chosen": "\n\nHuman: ...\n\nAssistant: ...", "rejected": "..."}`: the shared
//!   conversation prefix becomes the prompt (as chat messages), the two final assistant turns the
//!   replies;
//! - generic: `{"prompt": P, "chosen": R, "rejected": R}` where `P` is a string (one user message)
//!   or a list of `{role, content}` messages, and `R` is a string or a message list whose last
//!   assistant message is the reply (the UltraFeedback-binarized schema);
//! - prompt-only (for RL): `{"prompt": P}`.
//!
//! A bad line (bad JSON, missing field, empty reply, identical replies) is an error naming
//! `file:line`, or, with [`ReadOptions::skip_bad`], counted in [`ReadReport`]. Nothing is dropped
//! silently.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use r2m_core::{R2mError, Result};
use r2m_models::ChatMessage;
use serde_json::Value;

/// One preference pair: a conversation and two candidate final replies.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferencePair {
    pub prompt: Vec<ChatMessage>,
    pub chosen: String,
    pub rejected: String,
    /// 1-based line in the source file.
    pub line: usize,
}

/// How strict to be with bad lines.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadOptions {
    /// Skip (and count) bad lines instead of failing on the first one.
    pub skip_bad: bool,
    /// Stop after this many good records.
    pub limit: Option<usize>,
}

/// What was read and what was skipped.
#[derive(Debug, Clone, Default)]
pub struct ReadReport {
    pub path: PathBuf,
    pub read: usize,
    /// `(line, reason)` of each skipped line.
    pub skipped: Vec<(usize, String)>,
}

impl std::fmt::Display for ReadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} records read", self.path.display(), self.read)?;
        if !self.skipped.is_empty() {
            write!(
                f,
                ", {} bad lines skipped (first: line {}: {})",
                self.skipped.len(),
                self.skipped[0].0,
                self.skipped[0].1
            )?;
        }
        Ok(())
    }
}

fn open_lines(path: &Path) -> Result<Box<dyn BufRead>> {
    let f = std::fs::File::open(path).map_err(|e| R2mError::io(path, e))?;
    let reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::MultiGzDecoder::new(f))
    } else {
        Box::new(f)
    };
    Ok(Box::new(BufReader::new(reader)))
}

/// Read every non-empty line of `path` through `parse` (which gets the JSON and the 1-based line
/// number), applying the error policy.
fn read_records<T>(
    path: &Path,
    opts: ReadOptions,
    parse: impl Fn(&Value, usize) -> std::result::Result<T, String>,
) -> Result<(Vec<T>, ReadReport)> {
    let mut out = Vec::new();
    let mut report = ReadReport {
        path: path.to_path_buf(),
        ..Default::default()
    };
    for (i, line) in open_lines(path)?.lines().enumerate() {
        let n = i + 1;
        let line = line.map_err(|e| R2mError::format(path, format!("line {n}: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed = serde_json::from_str::<Value>(&line)
            .map_err(|e| format!("invalid JSON: {e}"))
            .and_then(|v| parse(&v, n));
        match parsed {
            Ok(r) => {
                out.push(r);
                if opts.limit.is_some_and(|l| out.len() >= l) {
                    break;
                }
            }
            Err(msg) if opts.skip_bad => report.skipped.push((n, msg)),
            Err(msg) => return Err(R2mError::format(path, format!("line {n}: {msg}"))),
        }
    }
    report.read = out.len();
    Ok((out, report))
}

/// Read preference pairs from `path` (`.jsonl` or `.jsonl.gz`).
pub fn read_preferences(
    path: &Path,
    opts: ReadOptions,
) -> Result<(Vec<PreferencePair>, ReadReport)> {
    read_records(path, opts, |v, line| {
        parse_preference(v).map(|p| PreferencePair { line, ..p })
    })
}

/// Read prompts (for RL) from `path`: `{"prompt": ...}` records, or the prompts of preference
/// records of either shape.
pub fn read_prompts(path: &Path, opts: ReadOptions) -> Result<(Vec<Vec<ChatMessage>>, ReadReport)> {
    read_records(path, opts, |v, _| match v.get("prompt") {
        Some(p) => {
            let msgs = messages_of(p, "prompt")?;
            if msgs.iter().all(|m| m.content.trim().is_empty()) {
                return Err("empty prompt".into());
            }
            Ok(msgs)
        }
        None => parse_preference_shape(v).map(|p| p.prompt),
    })
}

fn parse_preference(v: &Value) -> std::result::Result<PreferencePair, String> {
    let pair = parse_preference_shape(v)?;
    if pair.chosen.trim().is_empty() {
        return Err("empty `chosen` reply".into());
    }
    if pair.rejected.trim().is_empty() {
        return Err("empty `rejected` reply".into());
    }
    if pair.chosen == pair.rejected {
        return Err("`chosen` and `rejected` replies are identical".into());
    }
    Ok(pair)
}

/// A preference record's prompt and replies, without the checks that only matter for pairs
/// (reading prompts needs the conversation only).
fn parse_preference_shape(v: &Value) -> std::result::Result<PreferencePair, String> {
    let obj = v.as_object().ok_or("a record must be a JSON object")?;
    let chosen = obj.get("chosen").ok_or("missing field `chosen`")?;
    let rejected = obj.get("rejected").ok_or("missing field `rejected`")?;
    let pair = match obj.get("prompt") {
        Some(p) => PreferencePair {
            prompt: messages_of(p, "prompt")?,
            chosen: reply_of(chosen, "chosen")?,
            rejected: reply_of(rejected, "rejected")?,
            line: 0,
        },
        None => {
            let c = chosen
                .as_str()
                .ok_or("`chosen` must be a string in HH-RLHF records")?;
            let r = rejected
                .as_str()
                .ok_or("`rejected` must be a string in HH-RLHF records")?;
            split_hh(c, r)?
        }
    };
    Ok(pair)
}

/// A string (one user message) or a list of `{role, content}` messages.
fn messages_of(v: &Value, field: &str) -> std::result::Result<Vec<ChatMessage>, String> {
    match v {
        Value::String(s) => Ok(vec![ChatMessage::user(s.clone())]),
        Value::Array(a) => a
            .iter()
            .map(|m| {
                let role = m
                    .get("role")
                    .and_then(Value::as_str)
                    .ok_or(format!("`{field}`: message without a `role`"))?;
                let content = m
                    .get("content")
                    .and_then(Value::as_str)
                    .ok_or(format!("`{field}`: message without `content`"))?;
                Ok(ChatMessage::new(role, content))
            })
            .collect(),
        _ => Err(format!("`{field}` must be a string or a list of messages")),
    }
}

/// A reply: a string, or the last assistant message of a conversation.
fn reply_of(v: &Value, field: &str) -> std::result::Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(_) => messages_of(v, field)?
            .into_iter()
            .rev()
            .find(|m| m.role == "assistant")
            .map(|m| m.content)
            .ok_or(format!("`{field}` has no assistant message")),
        _ => Err(format!("`{field}` must be a string or a list of messages")),
    }
}

const HUMAN: &str = "\n\nHuman:";
const ASSISTANT: &str = "\n\nAssistant:";

/// Split an HH-RLHF pair into the shared conversation and the two final assistant replies.
///
/// The conversation is the longest common prefix of the two texts that ends just before an
/// `"\n\nAssistant:"` turn (as TRL's prompt extraction does), so a reply that itself contains a
/// stray `Assistant:` turn stays whole.
fn split_hh(chosen: &str, rejected: &str) -> std::result::Result<PreferencePair, String> {
    let common = chosen
        .char_indices()
        .zip(rejected.chars())
        .find(|((_, a), b)| a != b)
        .map_or(chosen.len().min(rejected.len()), |((i, _), _)| i);
    // The last assistant turn marker lying wholly within the shared part.
    let cut = chosen[..common]
        .rfind(ASSISTANT)
        .ok_or("`chosen` and `rejected` share no conversation ending in \"\\n\\nAssistant:\"")?;
    if !rejected[cut..].starts_with(ASSISTANT) {
        return Err("`chosen` and `rejected` do not share the conversation before their last assistant turn".into());
    }
    let prefix = &chosen[..cut];
    Ok(PreferencePair {
        prompt: parse_hh_dialogue(prefix)?,
        chosen: chosen[cut + ASSISTANT.len()..].trim().to_string(),
        rejected: rejected[cut + ASSISTANT.len()..].trim().to_string(),
        line: 0,
    })
}

/// `"\n\nHuman: a\n\nAssistant: b\n\nHuman: c"` -> user a, assistant b, user c.
fn parse_hh_dialogue(text: &str) -> std::result::Result<Vec<ChatMessage>, String> {
    let mut msgs = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (role, body) = if let Some(r) = rest.strip_prefix(HUMAN) {
            ("user", r)
        } else if let Some(r) = rest.strip_prefix(ASSISTANT) {
            ("assistant", r)
        } else {
            return Err("conversation does not start with \"\\n\\nHuman:\"".into());
        };
        let end = [body.find(HUMAN), body.find(ASSISTANT)]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(body.len());
        msgs.push(ChatMessage::new(role, body[..end].trim()));
        rest = &body[end..];
    }
    if msgs.first().is_none_or(|m| m.role != "user") {
        return Err("conversation does not start with a human turn".into());
    }
    Ok(msgs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(lines: &[&str]) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new()
            .suffix(".jsonl")
            .tempfile()
            .unwrap();
        for l in lines {
            writeln!(f, "{l}").unwrap();
        }
        f
    }

    #[test]
    fn hh_record_splits_into_conversation_and_replies() {
        let p = split_hh(
            "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: Fine, thanks.",
            "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: Go away.",
        )
        .unwrap();
        assert_eq!(
            p.prompt,
            vec![
                ChatMessage::user("hi"),
                ChatMessage::assistant("hello"),
                ChatMessage::user("how are you?")
            ]
        );
        assert_eq!(
            (p.chosen.as_str(), p.rejected.as_str()),
            ("Fine, thanks.", "Go away.")
        );
    }

    #[test]
    fn generic_and_ultrafeedback_records() {
        let f = write(&[
            r#"{"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."}"#,
            r#"{"prompt": [{"role":"user","content":"Q"}], "chosen": [{"role":"user","content":"Q"},{"role":"assistant","content":"good"}], "rejected": [{"role":"user","content":"Q"},{"role":"assistant","content":"bad"}]}"#,
        ]);
        let (pairs, report) = read_preferences(f.path(), ReadOptions::default()).unwrap();
        assert_eq!(report.read, 2);
        assert_eq!(pairs[0].prompt, vec![ChatMessage::user("Say hi")]);
        assert_eq!(
            (pairs[1].chosen.as_str(), pairs[1].rejected.as_str()),
            ("good", "bad")
        );
        assert_eq!((pairs[0].line, pairs[1].line), (1, 2));
    }

    #[test]
    fn bad_lines_name_file_and_line_or_are_counted() {
        let f = write(&[
            r#"{"prompt": "a", "chosen": "x", "rejected": "y"}"#,
            r#"{"prompt": "a", "chosen": "x""#,
            r#"{"prompt": "a", "rejected": "y"}"#,
            r#"{"prompt": "a", "chosen": "  ", "rejected": "y"}"#,
            r#"{"prompt": "a", "chosen": "same", "rejected": "same"}"#,
            "",
            r#"{"prompt": "b", "chosen": "x", "rejected": "z"}"#,
        ]);
        let err = read_preferences(f.path(), ReadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&f.path().display().to_string())
                && err.contains("line 2")
                && err.contains("invalid JSON"),
            "{err}"
        );
        let (pairs, report) = read_preferences(
            f.path(),
            ReadOptions {
                skip_bad: true,
                limit: None,
            },
        )
        .unwrap();
        assert_eq!(pairs.len(), 2);
        assert_eq!((pairs[0].line, pairs[1].line), (1, 7));
        let reasons: Vec<_> = report
            .skipped
            .iter()
            .map(|(l, r)| (*l, r.clone()))
            .collect();
        assert_eq!(reasons.len(), 4);
        assert_eq!(reasons[1], (3, "missing field `chosen`".to_string()));
        assert!(reasons[2].1.contains("empty `chosen`"));
        assert!(reasons[3].1.contains("identical"));
        assert!(report.to_string().contains("4 bad lines skipped"));
    }

    #[test]
    fn prompt_only_records() {
        let f = write(&[
            r#"{"prompt": "Write a poem"}"#,
            r#"{"prompt": [{"role":"system","content":"s"},{"role":"user","content":"u"}]}"#,
        ]);
        let (prompts, _) = read_prompts(f.path(), ReadOptions::default()).unwrap();
        assert_eq!(prompts[0], vec![ChatMessage::user("Write a poem")]);
        assert_eq!(prompts[1].len(), 2);
    }
}
