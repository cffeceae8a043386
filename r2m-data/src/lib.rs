//! r2m-data: preference and prompt datasets.
//!
//! - [`records`]: reading `.jsonl` / `.jsonl.gz` files of HH-RLHF pairs, generic
//!   `{prompt, chosen, rejected}` records (strings or chat messages) and prompt-only records, with
//!   errors that name `file:line`;
//! - [`split`]: a deterministic seeded train/eval split;
//! - [`tokenize`]: chat-template tokenization, the truncation policy, token-budget batching.

pub mod records;
pub mod split;
pub mod tokenize;

pub use records::{read_preferences, read_prompts, PreferencePair, ReadOptions, ReadReport};
pub use split::{label_noise_rows, train_eval_split};
pub use tokenize::{
    batches_by_tokens, length_grouped_order, tokenize_pair, tokenize_pairs, TokenizeReport,
    TokenizedPair,
};
