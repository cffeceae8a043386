//! RL prompts: reading them ([`load_prompts`]) and handing them out per step ([`PromptSampler`]).

use std::path::Path;

use r2m_core::{Observer, R2mError, Result};
use r2m_data::{read_prompts, ReadOptions};
use r2m_models::{ChatMessage, Tokenizer};
use rand::seq::SliceRandom;
use rand::{rngs::StdRng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::seed::{step_seed, stream};

/// A prompt for RL: its token ids (chat template applied, ending with the generation prompt)
/// and, when it came from a conversation, the messages.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    pub ids: Vec<u32>,
    pub messages: Option<Vec<ChatMessage>>,
}

impl Prompt {
    /// A prompt that is one user message, for rewards that read text (no token ids).
    pub fn user(text: &str) -> Self {
        Self {
            ids: Vec::new(),
            messages: Some(vec![ChatMessage::user(text.to_string())]),
        }
    }
}

/// Read the prompts of `path` (`data.prompts`), render them with the chat template (ending with
/// the generation prompt) and drop those longer than `max_prompt_len` tokens. The data report
/// and the count kept go to `observer`.
pub fn load_prompts(
    path: &Path,
    opts: ReadOptions,
    max_prompt_len: usize,
    tok: &Tokenizer,
    observer: &dyn Observer,
) -> Result<Vec<Prompt>> {
    let (convs, report) = read_prompts(path, opts)?;
    observer.message(&report.to_string());
    let mut out = Vec::with_capacity(convs.len());
    let mut too_long = 0usize;
    for messages in convs {
        let text = tok.apply_chat_template(&messages, true)?;
        let ids = tok.encode(&text, false)?;
        if ids.len() > max_prompt_len {
            too_long += 1;
            continue;
        }
        out.push(Prompt {
            ids,
            messages: Some(messages),
        });
    }
    observer.message(&format!(
        "{} prompts kept, {too_long} longer than data.max_prompt_len = {max_prompt_len} skipped",
        out.len()
    ));
    if out.is_empty() {
        return Err(R2mError::Config(format!(
            "{}: no prompt fits data.max_prompt_len = {max_prompt_len}",
            path.display()
        )));
    }
    Ok(out)
}

/// Hands out prompt indices for each step: a seeded shuffle, reshuffled on every pass. Its state
/// (the data position) is part of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptSampler {
    order: Vec<usize>,
    pos: usize,
    pass: u64,
    seed: u64,
}

impl PromptSampler {
    pub fn new(len: usize, seed: u64) -> Self {
        let mut s = Self {
            order: (0..len).collect(),
            pos: 0,
            pass: 0,
            seed,
        };
        s.shuffle();
        s
    }

    fn shuffle(&mut self) {
        let seed = step_seed(self.seed, self.pass as usize, stream::PROMPTS);
        self.order.shuffle(&mut StdRng::seed_from_u64(seed));
    }

    /// The next `n` prompt indices.
    pub fn next_batch(&mut self, n: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n && !self.order.is_empty() {
            if self.pos == self.order.len() {
                self.pass += 1;
                self.pos = 0;
                self.shuffle();
            }
            out.push(self.order[self.pos]);
            self.pos += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_sampler_covers_every_prompt_per_pass() {
        let mut s = PromptSampler::new(5, 1);
        let mut a = s.next_batch(3);
        a.extend(s.next_batch(2));
        a.sort();
        assert_eq!(a, vec![0, 1, 2, 3, 4]);
        let b = s.next_batch(5);
        assert_eq!(b.len(), 5);
        let again: Vec<usize> = PromptSampler::new(5, 1).next_batch(5);
        let mut first = PromptSampler::new(5, 1);
        assert_eq!(first.next_batch(5), again);
    }
}
