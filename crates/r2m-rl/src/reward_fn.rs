//! Rewards behind one trait: a batch of sequences in, one scalar per sequence out.
//!
//! - [`LearnedRm`]: a reward model (e.g. from `r2m train-rm`);
//! - [`RuleReward`]: a rule on the response tokens;
//! - the R2M reward (policy feedback) lives in the RL loop, which owns the policy's hidden states.
//!
//! The missing-EOS penalty is applied by the RL loop to whatever reward is used.

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use r2m_core::{R2mError, Result};
use r2m_data::tokenize::encode_conversation;
use r2m_data::{batches_by_tokens, read_prompts, ReadOptions};
use r2m_models::generate::FinishReason;
use r2m_models::{ChatMessage, RewardModel, Tokenizer};

use crate::r2m_reward::RmUpdateStats;
use crate::reward_training::{int_tensor, pad_tokens};
use crate::rollout::Rollout;

/// A prompt for RL: its token ids (chat template applied, ending with the generation prompt)
/// and, when it came from a conversation, the messages.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    pub ids: Vec<u32>,
    pub messages: Option<Vec<ChatMessage>>,
}

/// One sequence to score.
#[derive(Debug, Clone, Copy)]
pub struct RewardInput<'a> {
    pub prompt: &'a Prompt,
    /// Response token ids, including the EOS that ended it (if any).
    pub response: &'a [u32],
    /// The decoded response without special tokens (when the policy has a tokenizer).
    pub text: Option<&'a str>,
    pub finish: FinishReason,
}

/// What the RL loop asks of a reward: one score per rollout row, and a hook after the policy
/// update (where R2M trains its head, [`crate::r2m_reward::R2mReward`]). Every [`RewardFn`] is
/// one.
pub trait RolloutReward<B: Backend> {
    /// A short name for logs.
    fn name(&self) -> String;
    /// Whether rollouts must keep the policy's hidden states `h` (and refresh them in the final
    /// epoch of the update).
    fn wants_hidden(&self) -> bool {
        false
    }
    /// One reward per row. `t` counts RL steps from 1; `total` is T.
    fn score_rollout(&mut self, rollout: &Rollout<B>, t: usize, total: usize) -> Result<Vec<f32>>;
    /// Called after the policy update with the rollout (its `hidden` refreshed) and the scores
    /// [`RolloutReward::score_rollout`] gave it; that rollout is the last one the loop scored.
    fn after_policy_update(
        &mut self,
        _rollout: &Rollout<B>,
        _scores: &[f32],
        _t: usize,
        _total: usize,
    ) -> Result<Option<RmUpdateStats>> {
        Ok(None)
    }
    /// Measurements against a gold reward for the step just finished (see
    /// [`crate::overopt::GoldTracked`]), collected by the loop after
    /// [`RolloutReward::after_policy_update`] and logged with the step's metrics.
    fn gold_stats(&mut self) -> Option<crate::overopt::GoldStats> {
        None
    }
    /// Save whatever the reward trains (R2M: fusion head, `phi`, optimizer state) into `dir`.
    fn save_state(&self, _dir: &std::path::Path) -> Result<()> {
        Ok(())
    }
    /// Restore what [`RolloutReward::save_state`] wrote (a resumed run).
    fn load_state(&mut self, _dir: &std::path::Path) -> Result<()> {
        Ok(())
    }
}

impl<B: Backend, R: RewardFn> RolloutReward<B> for R {
    fn name(&self) -> String {
        RewardFn::name(self)
    }

    fn score_rollout(
        &mut self,
        rollout: &Rollout<B>,
        _t: usize,
        _total: usize,
    ) -> Result<Vec<f32>> {
        self.score(&rollout.reward_inputs())
    }
}

/// Scores sequences.
pub trait RewardFn {
    /// A short name for logs.
    fn name(&self) -> String;
    /// One reward per input.
    fn score(&mut self, batch: &[RewardInput<'_>]) -> Result<Vec<f32>>;
}

/// A rule-based reward on the response tokens.
#[derive(Debug, Clone, PartialEq)]
pub enum RuleReward {
    /// Share of response tokens equal to this id (EOS excluded from neither count).
    TokenShare(u32),
    /// `-|len - target| / target`, with `len` the response length in tokens.
    Length(usize),
}

impl std::str::FromStr for RuleReward {
    type Err = R2mError;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            R2mError::Config(format!(
                "reward rule must be `token-share:ID` or `length:N` (N > 0), got `{s}`"
            ))
        };
        let (kind, arg) = s.split_once(':').ok_or_else(bad)?;
        let n: usize = arg.trim().parse().map_err(|_| bad())?;
        match kind.trim() {
            "token-share" => Ok(Self::TokenShare(n as u32)),
            "length" if n > 0 => Ok(Self::Length(n)),
            _ => Err(bad()),
        }
    }
}

impl RuleReward {
    /// The reward of one response.
    pub fn reward(&self, response: &[u32]) -> f32 {
        match *self {
            Self::TokenShare(id) => {
                if response.is_empty() {
                    0.0
                } else {
                    response.iter().filter(|&&t| t == id).count() as f32 / response.len() as f32
                }
            }
            Self::Length(target) => -(response.len() as f32 - target as f32).abs() / target as f32,
        }
    }
}

impl RewardFn for RuleReward {
    fn name(&self) -> String {
        match self {
            Self::TokenShare(id) => format!("rule token-share:{id}"),
            Self::Length(n) => format!("rule length:{n}"),
        }
    }

    fn score(&mut self, batch: &[RewardInput<'_>]) -> Result<Vec<f32>> {
        Ok(batch.iter().map(|x| self.reward(x.response)).collect())
    }
}

/// A learned reward model on backend `B` (no gradients).
///
/// A response is scored as the reward model was trained: the prompt's conversation plus the
/// response as an assistant turn, rendered with the reward model's chat template. Without
/// messages or a tokenizer, the policy's token ids are used as they are (the vocabularies must
/// then agree).
pub struct LearnedRm<B: Backend> {
    pub model: RewardModel<B>,
    pub tokenizer: Option<Tokenizer>,
    /// Padded tokens per batch.
    pub token_budget: usize,
    pub name: String,
}

impl<B: Backend> LearnedRm<B> {
    /// Load an RM directory (HF sequence-classification layout, with its tokenizer if present).
    pub fn load(dir: &std::path::Path, token_budget: usize, device: &B::Device) -> Result<Self> {
        let model = RewardModel::<B>::load_hf_dir(dir, device)?;
        let tokenizer = if dir.join("tokenizer.json").exists() {
            Some(Tokenizer::from_hf_dir(dir)?)
        } else {
            None
        };
        Ok(Self {
            model,
            tokenizer,
            token_budget,
            name: format!("rm {}", dir.display()),
        })
    }

    /// The token ids the reward model sees for one input.
    pub fn sequence(&self, x: &RewardInput<'_>) -> Result<Vec<u32>> {
        match (&self.tokenizer, &x.prompt.messages, x.text) {
            (Some(tok), Some(messages), Some(text)) => encode_conversation(tok, messages, text),
            _ => {
                let vocab = self.model.backbone.config.vocab_size as u32;
                let ids: Vec<u32> = x.prompt.ids.iter().chain(x.response).copied().collect();
                if let Some(bad) = ids.iter().find(|&&t| t >= vocab) {
                    return Err(R2mError::Config(format!(
                        "{}: token id {bad} is outside the reward model's vocabulary ({vocab})",
                        self.name
                    )));
                }
                Ok(ids)
            }
        }
    }

    /// Rewards of token sequences, batched by padded tokens.
    pub fn score_sequences(&self, seqs: &[Vec<u32>]) -> Vec<f32> {
        let (rewards, _) = self.forward_sequences(seqs, false);
        rewards
    }

    /// `H_last` (final-norm hidden state at the last token) of each sequence, `[n, hidden]`.
    pub fn last_hidden(&self, seqs: &[Vec<u32>]) -> Tensor<B, 2> {
        let (_, h) = self.forward_sequences(seqs, true);
        h.expect("requested")
    }

    fn forward_sequences(
        &self,
        seqs: &[Vec<u32>],
        keep_last: bool,
    ) -> (Vec<f32>, Option<Tensor<B, 2>>) {
        let dev = self.model.backbone.device();
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(seqs[i].len()));
        let mut out = vec![0f32; seqs.len()];
        let (mut lasts, mut done) = (Vec::new(), Vec::new());
        for batch in batches_by_tokens(&order, |i| seqs[i].len(), 1, self.token_budget) {
            let rows: Vec<&[u32]> = batch.iter().map(|&i| seqs[i].as_slice()).collect();
            let (ids, padding, s) = pad_tokens(&rows, 0);
            let o = self
                .model
                .forward(int_tensor::<B>(ids, [batch.len(), s], &dev), &padding);
            let r: Vec<f32> = o
                .rewards
                .into_data()
                .convert::<f32>()
                .to_vec()
                .expect("f32 rewards");
            for (k, &i) in batch.iter().enumerate() {
                out[i] = r[k];
            }
            if keep_last {
                lasts.push(o.last_hidden);
                done.extend(batch);
            }
        }
        let last = keep_last.then(|| {
            // Back to input order.
            let mut pos = vec![0i64; seqs.len()];
            for (k, &i) in done.iter().enumerate() {
                pos[i] = k as i64;
            }
            let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(pos, [seqs.len()]), &dev);
            Tensor::cat(lasts, 0).select(0, idx)
        });
        (out, last)
    }
}

impl<B: Backend> RewardFn for LearnedRm<B> {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn score(&mut self, batch: &[RewardInput<'_>]) -> Result<Vec<f32>> {
        let seqs = batch
            .iter()
            .map(|x| self.sequence(x))
            .collect::<Result<Vec<_>>>()?;
        Ok(self.score_sequences(&seqs))
    }
}

/// Read the prompts of `cfg.data`, render them with the chat template (ending with the generation
/// prompt) and drop those longer than `max_prompt_len` tokens.
pub fn load_prompts(cfg: &crate::RlConfig, tok: &Tokenizer) -> Result<Vec<Prompt>> {
    let path: &std::path::Path = cfg
        .data
        .prompts
        .as_deref()
        .ok_or_else(|| R2mError::Config("data.prompts is required".into()))?;
    let opts = ReadOptions {
        skip_bad: cfg.data.skip_bad,
        limit: cfg.data.limit,
    };
    let (convs, report) = read_prompts(path, opts)?;
    eprintln!("{report}");
    let mut out = Vec::with_capacity(convs.len());
    let mut too_long = 0usize;
    for messages in convs {
        let text = tok.apply_chat_template(&messages, true)?;
        let ids = tok.encode(&text, false)?;
        if ids.len() > cfg.data.max_prompt_len {
            too_long += 1;
            continue;
        }
        out.push(Prompt {
            ids,
            messages: Some(messages),
        });
    }
    eprintln!(
        "{} prompts kept, {too_long} longer than data.max_prompt_len = {} skipped",
        out.len(),
        cfg.data.max_prompt_len
    );
    if out.is_empty() {
        return Err(R2mError::Config(format!(
            "{}: no prompt fits data.max_prompt_len = {}",
            path.display(),
            cfg.data.max_prompt_len
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_score() {
        let r: RuleReward = "token-share:7".parse().unwrap();
        assert_eq!(r, RuleReward::TokenShare(7));
        assert_eq!(r.reward(&[7, 1, 7, 2]), 0.5);
        assert_eq!(r.reward(&[]), 0.0);
        let r: RuleReward = "length:10".parse().unwrap();
        assert!((r.reward(&[0; 5]) + 0.5).abs() < 1e-6);
        assert_eq!(r.reward(&[0; 10]), 0.0);
        for bad in ["length:0", "share:3", "token-share", "length:x"] {
            assert!(bad.parse::<RuleReward>().is_err(), "{bad}");
        }
    }
}
