//! r2m-experiments: experiments built on the RL engine (`r2m-rl`), kept out of it so that the
//! engine names no experiment's types and an embedding program compiles none of this.
//!
//! - [`overopt`]: `r2m experiment overopt`, reward over-optimization against a gold reward;
//! - [`vader`]: VADER sentiment (a port of vaderSentiment 3.3.2), that experiment's gold reward;
//! - [`gold`]: a gold reward that degenerate text cannot fool (VADER behind quality gates), and
//!   [`gold::Gold`], the gold an experiment measures with: built in or a command of the user's;
//! - [`oracle`]: the experiment's upper bound, a proxy head retrained on gold-labelled pairs;
//! - [`heldout`]: held-out prompts scored by proxy and gold (before/after, evaluation);
//! - [`report`]: that experiment's report (tables, `report.json`, plots) from its finished runs;
//! - [`jsonl`]: the experiments' JSONL files;
//! - [`stats`]: t, Wilson and bootstrap intervals;
//! - [`verdict`]: the experiment's verdict from the held-out curves (`report.json`'s keys);
//! - [`demo`]: `r2m demo`, the whole method on the real default model in minutes.
//!
//! Like the engine, nothing here prints: progress and messages go to an
//! [`r2m_core::Observer`].

pub mod demo;
pub mod gold;
pub mod heldout;
pub mod jsonl;
pub mod oracle;
pub mod overopt;
pub mod report;
pub mod stats;
pub mod vader;
pub mod verdict;
