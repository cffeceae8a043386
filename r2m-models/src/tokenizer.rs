//! Tokenizer and chat template.
//!
//! Text <-> ids goes through the `tokenizers` crate: an HF `tokenizer.json`, or a byte-level BPE
//! built from GGUF metadata. Chat prompts are rendered with the checkpoint's own Jinja template
//! (minijinja, with the `trim_blocks`/`lstrip_blocks` settings `transformers` uses).

use std::path::{Path, PathBuf};

use r2m_core::{R2mError, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper};

use crate::gguf::{GgufFile, GgufValue};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// A tokenizer with its special tokens and chat template.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// Prepend `bos_token` when encoding with special tokens (GGUF `add_bos_token`).
    pub add_bos: bool,
    pub source: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("vocab", &self.vocab_size())
            .finish()
    }
}

fn tok_err(path: &Path, msg: impl std::fmt::Display) -> R2mError {
    R2mError::Tokenizer {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    }
}

/// A special-token entry of `tokenizer_config.json`: a string or `{"content": ...}`.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Load `tokenizer.json` (required) and `tokenizer_config.json` (optional) from an HF directory.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(tok_err(
                &path,
                "tokenizer.json not found; an HF model directory needs one",
            ));
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| tok_err(&path, e))?;
        let mut tok = Tokenizer {
            inner,
            chat_template: None,
            bos_token: None,
            eos_token: None,
            add_bos: false,
            source: path,
        };
        let cfg_path = dir.join("tokenizer_config.json");
        if cfg_path.exists() {
            let text =
                std::fs::read_to_string(&cfg_path).map_err(|e| R2mError::io(&cfg_path, e))?;
            let cfg: Value = serde_json::from_str(&text)
                .map_err(|e| R2mError::format(&cfg_path, format!("line {}: {e}", e.line())))?;
            tok.chat_template = match cfg.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                // A list of named templates: take "default".
                Some(Value::Array(a)) => a
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                    .map(str::to_string),
                _ => None,
            };
            tok.bos_token = token_string(cfg.get("bos_token"));
            tok.eos_token = token_string(cfg.get("eos_token"));
        }
        // transformers 4.43+ may keep the template in its own file.
        let jinja = dir.join("chat_template.jinja");
        if tok.chat_template.is_none() && jinja.exists() {
            tok.chat_template =
                Some(std::fs::read_to_string(&jinja).map_err(|e| R2mError::io(&jinja, e))?);
        }
        Ok(tok)
    }

    /// Build the byte-level BPE tokenizer stored in a GGUF file's metadata.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let path = &g.path;
        let model = g.get_str("tokenizer.ggml.model").unwrap_or("");
        if model != "gpt2" {
            return Err(tok_err(
                path,
                format!(
                    "GGUF tokenizer model `{model}` is not supported (byte-level BPE `gpt2` is)"
                ),
            ));
        }
        let strings = |key: &str| -> Result<Vec<String>> {
            g.get(key)
                .and_then(GgufValue::as_array)
                .ok_or_else(|| tok_err(path, format!("metadata `{key}` is missing")))?
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| tok_err(path, format!("`{key}` holds a non-string")))
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges: Vec<(String, String)> = strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| tok_err(path, format!("bad merge `{m}`")))
            })
            .collect::<Result<_>>()?;
        let types: Vec<u64> = g
            .get("tokenizer.ggml.token_type")
            .and_then(GgufValue::as_array)
            .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(1)).collect())
            .unwrap_or_default();
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| tok_err(path, e))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        // llama.cpp's `smollm`/`starcoder`/`refact` pre-tokenizers split digits one by one before
        // the GPT-2 byte-level split; the others use the GPT-2 split alone.
        let pre = g.get_str("tokenizer.ggml.pre").unwrap_or("default");
        let byte_level = PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true));
        if matches!(pre, "smollm" | "starcoder" | "refact") {
            inner.with_pre_tokenizer(Some(Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                byte_level,
            ])));
        } else {
            inner.with_pre_tokenizer(Some(byte_level));
        }
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        // Control (3) and user-defined (4) tokens are matched whole, before BPE.
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(types.iter())
            .filter(|(_, &t)| t == 3 || t == 4)
            .map(|(s, &t)| AddedToken::from(s.clone(), t == 3))
            .collect();
        inner
            .add_special_tokens(specials)
            .map_err(|e| tok_err(path, e))?;
        let id_tok = |key: &str| {
            g.get(key)
                .and_then(GgufValue::as_u64)
                .and_then(|id| tokens.get(id as usize).cloned())
        };
        Ok(Tokenizer {
            inner,
            chat_template: g.get_str("tokenizer.chat_template").map(str::to_string),
            bos_token: id_tok("tokenizer.ggml.bos_token_id"),
            eos_token: id_tok("tokenizer.ggml.eos_token_id"),
            add_bos: matches!(
                g.get("tokenizer.ggml.add_bos_token"),
                Some(GgufValue::Bool(true))
            ),
            source: path.clone(),
        })
    }

    /// Write `tokenizer.json` and `tokenizer_config.json` into `dir` (what `transformers` reads).
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        let path = dir.join("tokenizer.json");
        self.inner
            .save(&path, false)
            .map_err(|e| tok_err(&path, e))?;
        let mut cfg = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": false,
            "add_bos_token": self.add_bos,
        });
        let m = cfg.as_object_mut().expect("object");
        if let Some(t) = &self.chat_template {
            m.insert("chat_template".into(), json!(t));
        }
        if let Some(t) = &self.bos_token {
            m.insert("bos_token".into(), json!(t));
        }
        if let Some(t) = &self.eos_token {
            m.insert("eos_token".into(), json!(t));
            m.insert("pad_token".into(), json!(t));
        }
        let cfg_path = dir.join("tokenizer_config.json");
        let text = serde_json::to_string_pretty(&cfg).expect("json");
        std::fs::write(&cfg_path, text).map_err(|e| R2mError::io(&cfg_path, e))
    }

    /// Token ids of `text`. With `add_special_tokens`, the tokenizer's own post-processing runs
    /// (and a BOS is prepended where the checkpoint asks for one).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| tok_err(&self.source, e))?;
        let mut ids = enc.get_ids().to_vec();
        if add_special_tokens && self.add_bos {
            if let Some(bos) = self.bos_id() {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
        }
        Ok(ids)
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| tok_err(&self.source, e))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// Token ids of one user message in the chat template, the assistant's turn opened: what a
    /// chat model is prompted with.
    pub fn encode_user_turn(&self, user: &str) -> Result<Vec<u32>> {
        let text = self.apply_chat_template(&[ChatMessage::user(user.to_string())], true)?;
        self.encode(&text, false)
    }

    /// Render `messages` with the checkpoint's chat template.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| tok_err(&self.source, "this tokenizer has no chat template"))?;
        render_chat_template(
            template,
            messages,
            add_generation_prompt,
            self.bos_token.as_deref().unwrap_or(""),
            self.eos_token.as_deref().unwrap_or(""),
        )
        .map_err(|e| tok_err(&self.source, format!("chat template: {e}")))
    }
}

/// Render an HF chat template the way `transformers` does (`trim_blocks`, `lstrip_blocks`,
/// `raise_exception`, Python string methods).
pub fn render_chat_template(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> std::result::Result<String, minijinja::Error> {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_template("chat", template)?;
    env.get_template("chat")?.render(minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_template_renders_like_transformers() {
        let t = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        let out = render_chat_template(t, &[ChatMessage::user("Hi")], true, "", "").unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_surfaces_as_error() {
        let t = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}";
        let err = render_chat_template(t, &[ChatMessage::system("x")], false, "", "").unwrap_err();
        assert!(err.to_string().contains("first must be user"), "{err}");
    }
}
