//! Held-out evaluation: fixed prompts nothing trains on ([`crate::overopt::eval_prompts`]), the
//! policy's responses to them, scored by the proxy reward model and by the gold reward.
//!
//! The demo scores greedy responses before the first RL step and after the last, and reports
//! the paired difference per prompt ([`crate::stats::paired`]).

use burn::tensor::backend::Backend;
use r2m_core::Result;
use r2m_models::{generate, CausalLm, ChatMessage, GenerationConfig, Tokenizer};
use r2m_rl::{LearnedRm, Prompt, RewardFn, RewardInput};
use serde::{Deserialize, Serialize};

use crate::gold::GoldConfig;
use crate::overopt::{gold_of, GoldKind};

/// One held-out prompt's response and its scores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeldOut {
    pub prompt: String,
    pub response: String,
    /// The proxy reward model's score.
    pub proxy: f64,
    /// The gold reward.
    pub gold: f64,
}

/// How the held-out responses are made and judged.
pub struct HeldOutEval<'a, B: Backend> {
    pub tokenizer: &'a Tokenizer,
    /// The proxy, fixed for the whole evaluation (so before and after are scored alike).
    pub proxy: &'a mut LearnedRm<B>,
    pub max_new_tokens: usize,
    /// 0: greedy. Otherwise sampled with `seed`.
    pub temperature: f64,
    pub seed: u64,
    pub gold: GoldKind,
    pub gates: &'a GoldConfig,
}

impl<B: Backend> HeldOutEval<'_, B> {
    /// `policy`'s response to each prompt (one batch), with its proxy and gold scores.
    pub fn score(&mut self, policy: &CausalLm<B>, prompts: &[String]) -> Result<Vec<HeldOut>> {
        let tok = self.tokenizer;
        let ids = prompts
            .iter()
            .map(|p| {
                let text = tok.apply_chat_template(&[ChatMessage::user(p.clone())], true)?;
                tok.encode(&text, false)
            })
            .collect::<Result<Vec<_>>>()?;
        let cfg = GenerationConfig {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature as f32,
            seed: self.seed,
            ..Default::default()
        };
        let gens = generate(policy, Some(tok), &ids, &cfg)?;
        let texts: Vec<String> = gens
            .iter()
            .map(|g| g.text.clone().unwrap_or_default())
            .collect();
        // Scored as the RL loop scores: the prompt as one user message, the text as the reply.
        let as_prompts: Vec<Prompt> = prompts
            .iter()
            .map(|p| Prompt {
                ids: Vec::new(),
                messages: Some(vec![ChatMessage::user(p.clone())]),
            })
            .collect();
        let inputs: Vec<RewardInput<'_>> = as_prompts
            .iter()
            .zip(&texts)
            .zip(&gens)
            .map(|((p, t), g)| RewardInput {
                prompt: p,
                response: &g.tokens,
                text: Some(t.as_str()),
                finish: g.finish,
            })
            .collect();
        let proxy = self.proxy.score(&inputs)?;
        Ok(prompts
            .iter()
            .zip(texts)
            .zip(proxy)
            .map(|((p, response), s)| HeldOut {
                gold: gold_of(self.gold, self.gates, p, &response),
                prompt: p.clone(),
                response,
                proxy: s as f64,
            })
            .collect())
    }
}
