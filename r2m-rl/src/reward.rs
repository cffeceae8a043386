//! Rewards behind one trait: an experience in, one scalar per row out.
//!
//! - [`RolloutReward`]: what the RL loop asks of a reward: scores, and its own update after the
//!   policy's (where R2M trains its head, [`crate::r2m_reward::R2mReward`]), which returns named
//!   diagnostics for the step's metrics;
//! - [`RewardFn`]: a reward of the sequences alone; every one is a [`RolloutReward`];
//! - [`LearnedRm`]: a reward model (e.g. from `r2m train-rm`);
//! - [`RuleReward`]: a rule on the response tokens.
//!
//! The missing-EOS penalty is applied by the RL loop to whatever reward is used.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use r2m_core::{R2mError, Result};
use r2m_data::batches_by_tokens;
use r2m_data::tokenize::encode_conversation;
use r2m_models::{Padding, RewardModel, Tokenizer};
use serde::{Deserialize, Deserializer, Serialize};

use crate::experience::{Experience, RewardInput};
use crate::reward_training::{int_tensor, pad_tokens};

/// Named scalars a reward reports for a step (e.g. R2M's `rm_loss`, an experiment's
/// `gold_mean`), flattened into the step's line of `metrics.jsonl`. The engine names no
/// reward's or experiment's type: it only carries these.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(transparent)]
pub struct Diagnostics(pub BTreeMap<String, f64>);

impl Diagnostics {
    /// Set `key` (a value of `None` is left out).
    pub fn set(&mut self, key: &str, value: impl Into<Option<f64>>) {
        if let Some(v) = value.into() {
            self.0.insert(key.to_string(), v);
        }
    }

    pub fn get(&self, key: &str) -> Option<f64> {
        self.0.get(key).copied()
    }

    /// Add every entry of `other` (its values win).
    pub fn extend(&mut self, other: Diagnostics) {
        self.0.extend(other.0);
    }

    /// The first non-finite entry.
    pub fn non_finite(&self) -> Option<(&str, f64)> {
        self.0
            .iter()
            .find(|(_, v)| !v.is_finite())
            .map(|(k, &v)| (k.as_str(), v))
    }
}

/// Reads back what [`Diagnostics`] wrote, from the keys of a metrics line no other field took:
/// numbers are kept; `null` (older files wrote absent values so) and other values are skipped.
impl<'de> Deserialize<'de> for Diagnostics {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let map = BTreeMap::<String, serde_json::Value>::deserialize(d)?;
        Ok(Self(
            map.into_iter()
                .filter_map(|(k, v)| v.as_f64().map(|x| (k, x)))
                .collect(),
        ))
    }
}

/// What [`RolloutReward::score_experience`] returns.
pub struct Scored<B: Backend> {
    /// One score per row.
    pub scores: Vec<f32>,
    /// `H_last` of each row, `[rows, D_rm]`, when the reward's update needs it (it goes into the
    /// experience, for [`RolloutReward::update`]).
    pub rm_hidden: Option<Tensor<B, 2>>,
}

impl<B: Backend> From<Vec<f32>> for Scored<B> {
    fn from(scores: Vec<f32>) -> Self {
        Self {
            scores,
            rm_hidden: None,
        }
    }
}

/// What the RL loop asks of a reward: one score per experience row, and its own update after the
/// policy's. It keeps no state between the two: everything the update needs is in the
/// experience (its scores and `H_last`) and in the refreshed hidden states `h'`.
pub trait RolloutReward<B: Backend> {
    /// A short name for logs.
    fn name(&self) -> String;
    /// Whether the rollout must keep the policy's hidden states `h` (and the policy update
    /// return the final epoch's `h'`).
    fn wants_hidden(&self) -> bool {
        false
    }
    /// Score every row of `exp`. `t` counts RL steps from 1; `total` is T.
    fn score_experience(
        &mut self,
        exp: &Experience<B>,
        t: usize,
        total: usize,
    ) -> Result<Scored<B>>;
    /// After the policy update: `exp` as scored (its `scores` and `rm_hidden` filled) and the
    /// policy's refreshed hidden states `h'` (`None` unless [`RolloutReward::wants_hidden`]).
    /// Returns the step's diagnostics.
    fn update(
        &mut self,
        _exp: &Experience<B>,
        _refreshed_hidden: Option<&Tensor<B, 3>>,
        _t: usize,
        _total: usize,
    ) -> Result<Diagnostics> {
        Ok(Diagnostics::default())
    }
    /// Save whatever the reward trains (R2M: fusion head, `phi`, optimizer state) into `dir`.
    fn save_state(&self, _dir: &Path) -> Result<()> {
        Ok(())
    }
    /// Restore what [`RolloutReward::save_state`] wrote (a resumed run).
    fn load_state(&mut self, _dir: &Path) -> Result<()> {
        Ok(())
    }
}

impl<B: Backend, R: RewardFn> RolloutReward<B> for R {
    fn name(&self) -> String {
        RewardFn::name(self)
    }

    fn score_experience(
        &mut self,
        exp: &Experience<B>,
        _t: usize,
        _total: usize,
    ) -> Result<Scored<B>> {
        RewardFn::score(self, &exp.reward_inputs()).map(Scored::from)
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
                "unknown variant `{s}`, expected `token-share:ID` or `length:N` (N > 0)"
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

impl std::fmt::Display for RuleReward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TokenShare(id) => write!(f, "token-share:{id}"),
            Self::Length(n) => write!(f, "length:{n}"),
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
        format!("rule {self}")
    }

    fn score(&mut self, batch: &[RewardInput<'_>]) -> Result<Vec<f32>> {
        Ok(batch.iter().map(|x| self.reward(x.response)).collect())
    }
}

/// Check that `policy` maps text to the same token ids as `rm`, as R2M's policy feedback on
/// the RM's token ids requires: the same vocabulary size and the same ids for a few probe texts.
/// The error says what differs.
pub fn check_same_tokenizer(rm: &Tokenizer, policy: &Tokenizer) -> Result<()> {
    let (vr, vp) = (rm.vocab_size(), policy.vocab_size());
    if vr != vp {
        return Err(R2mError::Config(format!(
            "the policy's tokenizer ({vp} tokens) differs from the reward model's ({vr} tokens): \
             R2M feeds the policy the reward model's token ids, so both need the same tokenizer"
        )));
    }
    const PROBES: [&str; 3] = [
        "Human: What is the capital of France?",
        "Assistant: I'm not sure, but I think it's Paris. 123 + 456 = 579!",
        " naïve café \u{1F600} \t tabs and\nnew lines",
    ];
    for probe in PROBES {
        let (a, b) = (rm.encode(probe, false)?, policy.encode(probe, false)?);
        if a != b {
            return Err(R2mError::Config(format!(
                "the policy's tokenizer differs from the reward model's: {probe:?} is {b:?} for \
                 the policy, {a:?} for the reward model; R2M feeds the policy the reward model's \
                 token ids, so both need the same tokenizer"
            )));
        }
    }
    Ok(())
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
    /// Load an RM directory: HF sequence-classification layout, or a head-only directory
    /// (loaded onto the base model it names), with its tokenizer if present.
    pub fn load(dir: &std::path::Path, token_budget: usize, device: &B::Device) -> Result<Self> {
        let model = if r2m_models::reward::is_head_only_dir(dir) {
            let base = RewardModel::<B>::head_only_base(dir)?;
            let backbone = r2m_models::load_model::<B>(&base, device)?.model;
            RewardModel::load_head_only(dir, backbone)?
        } else {
            RewardModel::<B>::load_hf_dir(dir, device)?
        };
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

    /// Rewards (and `H_last` with `keep_last`) of token sequences, in input order.
    ///
    /// Consecutive sequences that share a prefix of at least [`MIN_SHARED_PREFIX`] tokens (the K
    /// responses to one prompt) encode it once: it runs through the model, and each sequence
    /// continues from its KV cache. The rest run whole, batched by padded tokens.
    fn forward_sequences(
        &self,
        seqs: &[Vec<u32>],
        keep_last: bool,
    ) -> (Vec<f32>, Option<Tensor<B, 2>>) {
        let dev = self.model.backbone.device();
        let groups = prefix_groups(seqs);
        let (shared, alone): (Vec<_>, Vec<_>) = groups.into_iter().partition(|g| g.shared > 0);
        let mut out = vec![0f32; seqs.len()];
        let (mut lasts, mut done) = (Vec::new(), Vec::new());
        let mut record = |rows: &[usize], o: r2m_models::reward::RewardOutput<B>| {
            let r: Vec<f32> = o
                .rewards
                .into_data()
                .convert::<f32>()
                .to_vec()
                .expect("f32");
            for (k, &i) in rows.iter().enumerate() {
                out[i] = r[k];
            }
            if keep_last {
                lasts.push(o.last_hidden);
                done.extend_from_slice(rows);
            }
        };
        // Whole sequences, longest first.
        let mut order: Vec<usize> = alone.iter().flat_map(|g| g.rows.clone()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(seqs[i].len()));
        for batch in batches_by_tokens(&order, |i| seqs[i].len(), 1, self.token_budget) {
            let rows: Vec<&[u32]> = batch.iter().map(|&i| seqs[i].as_slice()).collect();
            let (ids, padding, s) = pad_tokens(&rows, 0);
            let tokens = int_tensor::<B>(ids, [batch.len(), s], &dev);
            record(&batch, self.model.forward(tokens, &padding));
        }
        // Shared prefixes: a batch of groups at a time, longest first.
        let mut groups = shared;
        groups.sort_by_key(|g| std::cmp::Reverse(g.shared));
        let mut start = 0;
        while start < groups.len() {
            let end = self.prefix_batch_end(seqs, &groups, start);
            let batch = &groups[start..end];
            let rows: Vec<usize> = batch.iter().flat_map(|g| g.rows.clone()).collect();
            record(&rows, self.forward_shared(seqs, batch));
            start = end;
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

    /// The end of the batch of prefix groups that starts at `start`: as many groups as fit the
    /// token budget (at least one), counting the padded prefixes and the padded continuations.
    fn prefix_batch_end(&self, seqs: &[Vec<u32>], groups: &[PrefixGroup], start: usize) -> usize {
        let (mut prefix, mut rest, mut rows) = (0usize, 0usize, 0usize);
        let mut end = start;
        while end < groups.len() {
            let g = &groups[end];
            let p = prefix.max(g.shared);
            let r = (g.rows.iter())
                .map(|&i| seqs[i].len() - g.shared)
                .fold(rest, usize::max);
            let n = rows + g.rows.len();
            if end > start && (end - start + 1) * p + n * r > self.token_budget {
                break;
            }
            (prefix, rest, rows, end) = (p, r, n, end + 1);
        }
        end
    }

    /// One batch of prefix groups: each shared prefix runs through the model once; each row then
    /// continues from its group's KV cache. Returns the rows' outputs, groups in order.
    fn forward_shared(
        &self,
        seqs: &[Vec<u32>],
        groups: &[PrefixGroup],
    ) -> r2m_models::reward::RewardOutput<B> {
        let body = &self.model.backbone;
        let (dev, n_layers) = (body.device(), body.layers.len());
        let prefixes: Vec<&[u32]> = groups
            .iter()
            .map(|g| &seqs[g.rows[0]][..g.shared])
            .collect();
        let (ids, prefix_pad, ps) = pad_tokens(&prefixes, 0);
        let mut cache = r2m_models::KvCache::new(n_layers);
        let x = body.embed(int_tensor::<B>(ids, [groups.len(), ps], &dev));
        body.forward_layers(x, &prefix_pad, 0..n_layers, Some(&mut cache));
        let (mut of_row, mut rests) = (Vec::new(), Vec::new());
        for (gi, g) in groups.iter().enumerate() {
            for &i in &g.rows {
                of_row.push(gi);
                rests.push(&seqs[i][g.shared..]);
            }
        }
        let mut cache = cache.select_rows(&of_row);
        let (ids, rest_pad, rs) = pad_tokens(&rests, 0);
        let padding = Padding {
            valid: (of_row.iter().zip(&rest_pad.valid))
                .map(|(&gi, r)| [prefix_pad.valid[gi].as_slice(), r].concat())
                .collect(),
        };
        let x = body.embed(int_tensor::<B>(ids, [rests.len(), rs], &dev));
        let x = body.forward_layers(x, &padding, 0..n_layers, Some(&mut cache));
        let last = r2m_models::reward::gather_last(x, &rest_pad);
        let [b, d] = last.dims();
        let last_hidden = body.norm.forward(last.reshape([b, 1, d])).reshape([b, d]);
        r2m_models::reward::RewardOutput {
            rewards: self.model.score_hidden(last_hidden.clone()),
            last_hidden,
        }
    }
}

/// Shortest prefix worth sharing between consecutive sequences, in tokens.
pub const MIN_SHARED_PREFIX: usize = 16;

/// Consecutive sequences that start with the same `shared` tokens (0: a sequence alone).
#[derive(Debug, Clone, PartialEq)]
struct PrefixGroup {
    rows: Vec<usize>,
    shared: usize,
}

/// Split `seqs`, in order, into runs that share a prefix of at least [`MIN_SHARED_PREFIX`]
/// tokens; a sequence joins a run when that saves more tokens than the run's shorter prefix
/// costs its other rows. A group's `shared` leaves at least one token of each sequence to
/// continue with.
fn prefix_groups(seqs: &[Vec<u32>]) -> Vec<PrefixGroup> {
    let common = |a: &[u32], b: &[u32]| a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let mut groups: Vec<PrefixGroup> = Vec::new();
    for (i, s) in seqs.iter().enumerate() {
        if let Some(g) = groups.last_mut() {
            let first = &seqs[g.rows[0]];
            let so_far = match g.rows.len() {
                1 => first.len().saturating_sub(1),
                _ => g.shared,
            };
            let shared = common(first, s).min(so_far).min(s.len().saturating_sub(1));
            // Joining saves `shared` tokens of this sequence and costs the group's other rows
            // what their prefix shrinks by: a sequence that shares only a chat template's system
            // prompt with the group (another prompt) starts a group of its own.
            let others = if g.rows.len() == 1 { 0 } else { g.rows.len() };
            let pays = shared >= (so_far - shared) * others;
            if shared >= MIN_SHARED_PREFIX && pays {
                g.shared = shared;
                g.rows.push(i);
                continue;
            }
        }
        groups.push(PrefixGroup {
            rows: vec![i],
            shared: 0,
        });
    }
    for g in &mut groups {
        if g.rows.len() < 2 {
            g.shared = 0;
        }
    }
    groups
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_sequences_with_a_long_common_prefix_share_it() {
        let prefix: Vec<u32> = (100..120).collect(); // 20 tokens
        let with = |tail: &[u32]| [prefix.as_slice(), tail].concat();
        let seqs = vec![
            with(&[1, 2, 3]),
            with(&[1, 2, 9, 9]),
            with(&[7]),
            (0..30).collect(), // alone: nothing in common with its neighbours
            prefix.clone(),    // a whole sequence is the prefix: one token left to continue with
            with(&[5]),
            (100..110).collect(), // 10 tokens in common: too short to share
            // Two prompts after a common 20-token system prompt, two replies each: two groups,
            // not one sharing the system prompt.
            [prefix.as_slice(), &[1; 30], &[2]].concat(),
            [prefix.as_slice(), &[1; 30], &[3]].concat(),
            [prefix.as_slice(), &[4; 30], &[2]].concat(),
            [prefix.as_slice(), &[4; 30], &[3]].concat(),
            // A short prompt before long replies.
            [prefix.as_slice(), &[6; 40]].concat(),
            [prefix.as_slice(), &[7; 40]].concat(),
        ];
        let groups = prefix_groups(&seqs);
        let rows_shared: Vec<(Vec<usize>, usize)> =
            groups.into_iter().map(|g| (g.rows, g.shared)).collect();
        assert_eq!(
            rows_shared,
            vec![
                (vec![0, 1, 2], 20),
                (vec![3], 0),
                (vec![4, 5], 19),
                (vec![6], 0),
                (vec![7, 8], 50),
                (vec![9, 10], 50),
                (vec![11, 12], 20)
            ]
        );
    }

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
