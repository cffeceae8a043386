//! r2m-models: decoder LLMs on burn.
//!
//! - [`config`]: one [`ModelConfig`] for Llama/SmolLM2/Llama-3, Qwen2 and GPT-NeoX/Pythia;
//! - [`model`]: the decoder ([`CausalLm`]), returning logits and last-layer hidden states;
//! - [`fused`]: its CPU hot spots (SwiGLU gate, RMSNorm, attention, few-row GEMM, KV-cache
//!   writes, target log-probs, AdamW) with multi-threaded kernels and custom autodiff ops for the
//!   flex backend;
//! - [`weights`], [`gguf`]: HF safetensors and GGUF checkpoints, dequantised to f32;
//! - [`tokenizer`]: HF tokenizers and chat templates;
//! - [`generate`](mod@generate): batched sampling with a KV cache;
//! - [`reward`]: scalar reward models in the HF sequence-classification layout;
//! - [`lora`]: LoRA adapters on the projections, merging, and PEFT's adapter files;
//! - [`hub`], [`load`]: the default model (`smollm2`), loading and saving.

pub mod config;
pub mod fused;
pub mod generate;
pub mod gguf;
pub mod hub;
pub mod load;
pub mod lora;
pub mod model;
pub mod reward;
pub mod tokenizer;
pub mod weights;

pub use config::{Architecture, ModelConfig};
pub use generate::{generate, generate_keeping, Generation, GenerationConfig, Keep, Kept};
pub use load::{load_gguf, load_hf_dir, load_model, save_hf_dir, Loaded};
pub use model::{CausalLm, ForwardOutput, KvCache, Padding};
pub use reward::{RewardModel, RewardOutput};
pub use tokenizer::{ChatMessage, Tokenizer};
