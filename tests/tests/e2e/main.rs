//! End-to-end tests across the r2m crates (one test binary; modules per area).
//!
//! Fixtures in `tests/fixtures` come from `scripts/reference/make_fixtures.py` (PyTorch
//! `transformers` on the same weights). The SmolLM2 tests fetch the default model on first use.

mod backends;
mod command;
mod common;
mod data;
mod errors;
mod lora;
mod models;
mod overopt;
mod r2m;
mod reward;
mod rl;
mod run;
