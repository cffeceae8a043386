//! r2m-data: preference and prompt datasets.
//!
//! - [`records`]: reading `.jsonl` / `.jsonl.gz` files of HH-RLHF pairs, generic
//!   `{prompt, chosen, rejected}` records (strings or chat messages) and prompt-only records, with
//!   errors that name `file:line`;
//! - [`split`]: a deterministic seeded train/eval split.

pub mod records;
pub mod split;

pub use records::{read_preferences, read_prompts, PreferencePair, ReadOptions, ReadReport};
pub use split::train_eval_split;
