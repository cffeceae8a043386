//! Held-out evaluation: fixed prompts nothing trains on ([`crate::overopt::eval_prompts`]), the
//! policy's responses to them, scored by the proxy reward model and by the gold reward.
//!
//! The demo scores greedy responses before the first RL step and after the last, and reports
//! the paired difference per prompt ([`crate::stats::paired`]). The over-optimization
//! experiment samples responses every few RL steps ([`evaluate_policy`], `RUN/heldout.jsonl`)
//! and reads gold, proxy and KL on them rather than on the training batch.

use std::path::{Path, PathBuf};

use burn::tensor::backend::{AutodiffBackend, Backend};
use r2m_core::{R2mError, Result};
use r2m_models::{generate, CausalLm, GenerationConfig, Tokenizer};
use r2m_rl::{LearnedRm, Prompt, RewardFn, RewardInput, RlTrainer};
use serde::{Deserialize, Serialize};

use crate::gold::{gold_scores, Gold};

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
    pub gold: &'a mut Gold,
}

impl<B: Backend> HeldOutEval<'_, B> {
    /// `policy`'s response to each prompt (one batch), with its proxy and gold scores.
    pub fn score(&mut self, policy: &CausalLm<B>, prompts: &[String]) -> Result<Vec<HeldOut>> {
        let tok = self.tokenizer;
        let ids = prompts
            .iter()
            .map(|p| tok.encode_user_turn(p))
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
        let as_prompts: Vec<Prompt> = prompts.iter().map(|p| Prompt::user(p)).collect();
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
        let items: Vec<(&str, &str)> = prompts
            .iter()
            .zip(&texts)
            .map(|(p, t)| (p.as_str(), t.as_str()))
            .collect();
        let gold = self.gold.score(&items)?;
        Ok(prompts
            .iter()
            .zip(texts)
            .zip(proxy)
            .zip(gold)
            .map(|(((p, response), s), gold)| HeldOut {
                gold,
                prompt: p.clone(),
                response,
                proxy: s as f64,
            })
            .collect())
    }
}

// ---------------------------------------------------------------------------------------------
// During RL: the experiment's held-out curve
// ---------------------------------------------------------------------------------------------

/// One held-out evaluation of the policy during RL (a line of `RUN/heldout.jsonl`): `k`
/// responses to each held-out prompt, sampled as the training rollouts are (same temperature
/// and length), each with its gold, the fixed proxy's score and its sequence KL to the reference
/// (`sum_t log pi(y_t) - log pi_ref(y_t)`), and the response itself, so that another gold can
/// score the curve again later. Row `i * k + j` is sample `j` of prompt `i`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeldOutStep {
    pub step: usize,
    pub k: usize,
    pub gold: Vec<f64>,
    pub proxy: Vec<f64>,
    pub kl: Vec<f64>,
    /// The responses (empty in logs written before 2026-12-07's final sweep resumed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub responses: Vec<String>,
}

impl HeldOutStep {
    /// Prompts evaluated.
    pub fn prompts(&self) -> usize {
        self.gold.len() / self.k.max(1)
    }

    /// Mean of `v` over the samples of the prompts `idx`.
    pub fn mean_over(&self, v: &[f64], idx: &[usize]) -> f64 {
        let k = self.k.max(1);
        let sum: f64 = idx.iter().flat_map(|&i| &v[i * k..(i + 1) * k]).sum();
        sum / (idx.len() * k).max(1) as f64
    }

    pub fn gold_mean(&self) -> f64 {
        mean(&self.gold)
    }

    pub fn proxy_mean(&self) -> f64 {
        mean(&self.proxy)
    }

    /// `sqrt` of the mean sequence KL (0 when the estimate is negative).
    pub fn sqrt_kl(&self) -> f64 {
        mean(&self.kl).max(0.0).sqrt()
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Evaluate `trainer`'s current policy on the held-out `prompts` (see [`HeldOutStep`]); the
/// samples are drawn with `seed` (the same for every method at a given step, so methods are
/// compared on common random numbers).
pub fn evaluate_policy<B: AutodiffBackend>(
    trainer: &RlTrainer<B>,
    prompts: &[Prompt],
    proxy: &mut LearnedRm<B::InnerBackend>,
    gold: &mut Gold,
    seed: u64,
) -> Result<HeldOutStep> {
    let (exp, _) = trainer.rollout(prompts.to_vec(), seed)?;
    let scores = proxy.score(&exp.reward_inputs())?;
    let golds = gold_scores(&exp, gold)?;
    let kl = exp
        .old_logprobs
        .iter()
        .zip(&exp.ref_logprobs)
        .map(|(o, r)| o.iter().zip(r).map(|(a, b)| (a - b) as f64).sum())
        .collect();
    Ok(HeldOutStep {
        step: trainer.step,
        k: exp.k,
        gold: golds,
        proxy: scores.into_iter().map(f64::from).collect(),
        kl,
        responses: (exp.responses.iter())
            .map(|r| r.text.clone().unwrap_or_default())
            .collect(),
    })
}

/// `RUN/heldout.jsonl`: one [`HeldOutStep`] a line.
pub struct HeldOutLog {
    path: PathBuf,
}

impl HeldOutLog {
    /// Open the log, dropping lines past `resumed_step` (written after the checkpoint a resumed
    /// run continues from, so they will be written again).
    pub fn open(path: &Path, resumed_step: usize) -> Result<Self> {
        let kept: Vec<HeldOutStep> = read_heldout(path)?
            .into_iter()
            .filter(|s| s.step <= resumed_step)
            .collect();
        let mut text = String::new();
        for s in &kept {
            text.push_str(&serde_json::to_string(s).expect("json"));
            text.push('\n');
        }
        std::fs::write(path, text).map_err(|e| R2mError::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
        })
    }

    /// Whether the log holds step `step`.
    pub fn has(&self, step: usize) -> Result<bool> {
        Ok(read_heldout(&self.path)?.iter().any(|s| s.step == step))
    }

    /// Append one evaluation (flushed).
    pub fn append(&self, s: &HeldOutStep) -> Result<()> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.path)
            .map_err(|e| R2mError::io(&self.path, e))?;
        writeln!(f, "{}", serde_json::to_string(s).expect("json"))
            .and_then(|_| f.flush())
            .map_err(|e| R2mError::io(&self.path, e))
    }
}

/// The evaluations in `path` (none when it does not exist).
pub fn read_heldout(path: &Path) -> Result<Vec<HeldOutStep>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    crate::jsonl::read_jsonl(path)
}
