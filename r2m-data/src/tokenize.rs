//! Preference pairs to token ids, through the model's chat template; truncation; token-budget
//! batching.
//!
//! **Rendering.** A pair's two sequences are `template(prompt messages + assistant reply)`,
//! tokenized without extra special tokens (what `apply_chat_template(..., tokenize=True)` does in
//! `transformers`). The tokens both sequences share (the conversation up to where the replies
//! differ) are kept once as [`TokenizedPair::prompt`]; the rest are the two replies.
//!
//! **Truncation policy** (`max_len` tokens per sequence). When the longer sequence does not fit:
//! 1. the prompt loses its *oldest* tokens: it keeps its last `max(max_len - longest reply,
//!    max_len / 4)` tokens (the most recent turns matter most to judging the reply);
//! 2. a reply still longer than what is left is cut at the end.
//!
//! Both replies keep the same truncated prompt, so the pair stays comparable. Truncated pairs are
//! counted ([`TokenizeReport::truncated`]), never dropped.

use r2m_core::{R2mError, Result};
use r2m_models::{ChatMessage, Tokenizer};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};

use crate::records::PreferencePair;

/// One tokenized preference pair. The full sequences are `prompt ++ chosen` and
/// `prompt ++ rejected`.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedPair {
    /// Tokens shared by both sequences.
    pub prompt: Vec<u32>,
    /// The chosen sequence's tokens after `prompt` (never empty).
    pub chosen: Vec<u32>,
    /// The rejected sequence's tokens after `prompt` (never empty).
    pub rejected: Vec<u32>,
    /// 1-based line of the record in its file.
    pub line: usize,
    /// Whether the truncation policy cut anything.
    pub truncated: bool,
}

impl TokenizedPair {
    pub fn chosen_ids(&self) -> Vec<u32> {
        [self.prompt.as_slice(), &self.chosen].concat()
    }

    pub fn rejected_ids(&self) -> Vec<u32> {
        [self.prompt.as_slice(), &self.rejected].concat()
    }

    /// Length of the longer of the two sequences.
    pub fn max_len(&self) -> usize {
        self.prompt.len() + self.chosen.len().max(self.rejected.len())
    }

    /// Tokens in both sequences together.
    pub fn total_tokens(&self) -> usize {
        2 * self.prompt.len() + self.chosen.len() + self.rejected.len()
    }
}

/// What tokenization did to a dataset.
#[derive(Debug, Clone, Default)]
pub struct TokenizeReport {
    pub pairs: usize,
    pub truncated: usize,
    pub tokens: usize,
}

impl std::fmt::Display for TokenizeReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} pairs, {} tokens, {} truncated",
            self.pairs, self.tokens, self.truncated
        )
    }
}

/// Render and tokenize one conversation ending in an assistant `reply`.
pub fn encode_conversation(
    tokenizer: &Tokenizer,
    prompt: &[ChatMessage],
    reply: &str,
) -> Result<Vec<u32>> {
    let mut messages = prompt.to_vec();
    messages.push(ChatMessage::assistant(reply));
    let text = tokenizer.apply_chat_template(&messages, false)?;
    tokenizer.encode(&text, false)
}

/// Tokenize one pair and apply the truncation policy (see the module docs).
pub fn tokenize_pair(
    tokenizer: &Tokenizer,
    pair: &PreferencePair,
    max_len: usize,
) -> Result<TokenizedPair> {
    let line_err = |msg: String| R2mError::Other(format!("record at line {}: {msg}", pair.line));
    if max_len < 8 {
        return Err(R2mError::Config(format!(
            "max_len must be at least 8 tokens, got {max_len}"
        )));
    }
    let c = encode_conversation(tokenizer, &pair.prompt, &pair.chosen)?;
    let r = encode_conversation(tokenizer, &pair.prompt, &pair.rejected)?;
    if c == r {
        return Err(line_err(
            "chosen and rejected tokenize identically".to_string(),
        ));
    }
    let shared = c.iter().zip(&r).take_while(|(a, b)| a == b).count();
    // Both replies keep at least one token of their own.
    let shared = shared
        .min(c.len().saturating_sub(1))
        .min(r.len().saturating_sub(1));
    let mut prompt = c[..shared].to_vec();
    let mut chosen = c[shared..].to_vec();
    let mut rejected = r[shared..].to_vec();
    let longest_reply = chosen.len().max(rejected.len());
    let truncated = prompt.len() + longest_reply > max_len;
    if truncated {
        let keep = prompt
            .len()
            .min(max_len.saturating_sub(longest_reply).max(max_len / 4));
        prompt.drain(..prompt.len() - keep);
        let room = max_len - prompt.len();
        chosen.truncate(room);
        rejected.truncate(room);
    }
    Ok(TokenizedPair {
        prompt,
        chosen,
        rejected,
        line: pair.line,
        truncated,
    })
}

/// Tokenize many pairs (see [`tokenize_pair`]).
pub fn tokenize_pairs(
    tokenizer: &Tokenizer,
    pairs: &[PreferencePair],
    max_len: usize,
) -> Result<(Vec<TokenizedPair>, TokenizeReport)> {
    let mut out = Vec::with_capacity(pairs.len());
    let mut report = TokenizeReport::default();
    for p in pairs {
        let t = tokenize_pair(tokenizer, p, max_len)?;
        report.pairs += 1;
        report.truncated += t.truncated as usize;
        report.tokens += t.total_tokens();
        out.push(t);
    }
    Ok((out, report))
}

/// Split `order` (item indices, in the order to visit them) into batches whose padded size,
/// `rows_per_item * items * longest item`, stays within `budget` tokens. An item longer than the
/// budget on its own gets a batch of its own.
pub fn batches_by_tokens(
    order: &[usize],
    len_of: impl Fn(usize) -> usize,
    rows_per_item: usize,
    budget: usize,
) -> Vec<Vec<usize>> {
    let mut batches = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut longest = 0usize;
    for &i in order {
        let l = len_of(i);
        let new_longest = longest.max(l);
        if !cur.is_empty() && rows_per_item * (cur.len() + 1) * new_longest > budget {
            batches.push(std::mem::take(&mut cur));
            longest = l;
        } else {
            longest = new_longest;
        }
        cur.push(i);
    }
    if !cur.is_empty() {
        batches.push(cur);
    }
    batches
}

/// A seeded visiting order that keeps padding low: shuffle `0..lens.len()`, then sort each window
/// of `window` items by length. Batches cut from it (with [`batches_by_tokens`]) hold items of
/// similar length while the data still arrives in a random order.
pub fn length_grouped_order(lens: &[usize], window: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    let mut rng = StdRng::seed_from_u64(seed);
    order.shuffle(&mut rng);
    for chunk in order.chunks_mut(window.max(1)) {
        chunk.sort_by_key(|&i| std::cmp::Reverse(lens[i]));
    }
    order
}

/// Shuffle batches in place (seeded), so long and short windows interleave.
pub fn shuffle_batches(batches: &mut [Vec<usize>], seed: u64) {
    batches.shuffle(&mut StdRng::seed_from_u64(seed));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_budget_batches_respect_the_budget_and_keep_every_item() {
        let lens = [10, 50, 20, 200, 30, 30, 5];
        let order: Vec<usize> = (0..lens.len()).collect();
        let batches = batches_by_tokens(&order, |i| lens[i], 2, 200);
        let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, order);
        for b in &batches {
            let longest = b.iter().map(|&i| lens[i]).max().unwrap();
            assert!(b.len() == 1 || 2 * b.len() * longest <= 200, "{b:?}");
        }
        // The 200-token item does not fit with anything else.
        assert!(batches.contains(&vec![3]));
    }

    #[test]
    fn length_grouped_order_is_a_seeded_permutation() {
        let lens: Vec<usize> = (0..100).map(|i| (i * 37) % 101).collect();
        let a = length_grouped_order(&lens, 10, 1);
        let b = length_grouped_order(&lens, 10, 1);
        let c = length_grouped_order(&lens, 10, 2);
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
        for w in a.chunks(10) {
            assert!(w.windows(2).all(|p| lens[p[0]] >= lens[p[1]]));
        }
    }
}
