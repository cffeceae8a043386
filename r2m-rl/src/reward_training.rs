//! Bradley-Terry reward-model training and evaluation (`r2m train-rm`, `r2m eval-rm`).
//!
//! What trains is a choice ([`Trainable`]): the scoring head `phi` alone, the top N blocks plus
//! the final norm and `phi`, or everything. When the lower body is frozen its output never
//! changes, so it is computed once ([`frozen_features`]) and training runs only the trainable top:
//! exact, and what makes CPU training feasible. That pass also shares each pair's prompt between
//! its two replies through the KV cache, so a prompt is encoded once.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ElementConversion;
use burn::tensor::{Int, Tensor, TensorData};
use r2m_core::loss::bradley_terry_loss;
use r2m_core::optim::{clip_grad_norm, warmup_cosine_lr};
use r2m_core::{Observer, R2mError, Result};

use crate::optim::AdamW;
use r2m_data::{batches_by_tokens, length_grouped_order, TokenizedPair};
use r2m_models::lora::{add_adapters, LoraConfig};
use r2m_models::reward::gather_last;
use r2m_models::{CausalLm, KvCache, Padding, RewardModel, Tokenizer};
use serde::Serialize;

/// Which part of the reward model trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trainable {
    /// The scoring head `phi` only (a linear probe on frozen features).
    Head,
    /// The top N blocks, the final norm and `phi`.
    Top(usize),
    /// Every parameter.
    All,
    /// LoRA adapters on a frozen model (`[lora]` for a policy; `--lora-*` for a reward model,
    /// whose scoring head trains fully, as PEFT's `modules_to_save`).
    Lora,
}

impl FromStr for Trainable {
    type Err = R2mError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "head" => Ok(Self::Head),
            "all" => Ok(Self::All),
            "lora" => Ok(Self::Lora),
            _ => s
                .strip_prefix("top:")
                .and_then(|n| n.parse().ok())
                .filter(|&n: &usize| n > 0)
                .map(Self::Top)
                .ok_or_else(|| {
                    R2mError::Config(format!(
                        "unknown variant `{s}`, expected `head`, `top:N` (N > 0), `all` or `lora`"
                    ))
                }),
        }
    }
}

impl std::fmt::Display for Trainable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Head => write!(f, "head"),
            Self::Top(n) => write!(f, "top:{n}"),
            Self::All => write!(f, "all"),
            Self::Lora => write!(f, "lora"),
        }
    }
}

/// Reward-model training settings.
#[derive(Debug, Clone, Serialize)]
pub struct RmTrainConfig {
    #[serde(serialize_with = "ser_display")]
    pub trainable: Trainable,
    pub epochs: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Share of the steps spent warming up linearly.
    pub warmup_ratio: f64,
    /// The cosine decays to `lr * min_lr_ratio`.
    pub min_lr_ratio: f64,
    pub weight_decay: f64,
    /// Global gradient-norm clip.
    pub max_grad_norm: f64,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Padded tokens per micro-batch (both sequences of every pair counted).
    pub token_budget: usize,
    pub seed: u64,
    /// Evaluate every this many optimizer steps (0: only at the end).
    pub eval_every: usize,
    /// Write a checkpoint every this many optimizer steps (0: only at the end).
    pub save_every: usize,
    /// The adapters of `trainable = lora`.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "ser_lora")]
    pub lora: Option<LoraConfig>,
}

fn ser_lora<S: serde::Serializer>(
    v: &Option<LoraConfig>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    let v = v.as_ref().map(|l| {
        serde_json::json!({
            "r": l.r,
            "alpha": l.alpha,
            "dropout": l.dropout,
            "targets": l.targets.iter().map(|t| t.name()).collect::<Vec<_>>(),
            "layers": l.layers.to_string(),
            "rslora": l.rslora,
            "seed": l.seed,
        })
    });
    v.serialize(s)
}

fn ser_display<S: serde::Serializer, T: std::fmt::Display>(
    v: &T,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.collect_str(v)
}

impl Default for RmTrainConfig {
    fn default() -> Self {
        Self {
            trainable: Trainable::Top(2),
            epochs: 1,
            lr: 1e-4,
            warmup_ratio: 0.05,
            min_lr_ratio: 0.1,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            grad_accum: 1,
            token_budget: 4096,
            seed: 0,
            eval_every: 0,
            save_every: 0,
            lora: None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Frozen features
// ---------------------------------------------------------------------------------------------

/// The frozen body's output for one pair.
#[derive(Debug, Clone)]
pub enum PairFeatures {
    /// The residual stream entering the first trainable block, one `hidden`-sized row per token:
    /// for the shared prompt once, then for each reply.
    Stream {
        prompt: Vec<f32>,
        chosen: Vec<f32>,
        rejected: Vec<f32>,
    },
    /// `H_last` (final-norm hidden state at the last token) of each sequence.
    Last {
        chosen: Vec<f32>,
        rejected: Vec<f32>,
    },
}

/// Right-pad `rows` of token ids; returns the ids, the padding and the padded length.
pub(crate) fn pad_tokens(rows: &[&[u32]], pad: u32) -> (Vec<i64>, Padding, usize) {
    let s = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(rows.len() * s);
    let mut valid = Vec::with_capacity(rows.len());
    for r in rows {
        ids.extend(r.iter().map(|&t| t as i64));
        ids.extend(std::iter::repeat_n(pad as i64, s - r.len()));
        valid.push((0..s).map(|i| i < r.len()).collect());
    }
    (ids, Padding { valid }, s)
}

pub(crate) fn int_tensor<B: Backend>(
    ids: Vec<i64>,
    shape: [usize; 2],
    dev: &B::Device,
) -> Tensor<B, 2, Int> {
    Tensor::from_data(TensorData::new(ids, shape), dev)
}

/// One reply per row, continued from the prompts' KV `cache` through blocks `0..upto`: the
/// final-norm state at its last token (`last_only`) or the stream over its tokens, per row.
fn reply_features<B: Backend>(
    body: &CausalLm<B>,
    cache: &KvCache<B>,
    prompt_pad: &Padding,
    replies: &[&[u32]],
    upto: usize,
    last_only: bool,
) -> Vec<Vec<f32>> {
    let (b, d, dev) = (replies.len(), body.config.hidden_size, body.device());
    let (ids, reply_pad, rs) = pad_tokens(replies, 0);
    let mut padding = prompt_pad.clone();
    for (row, r) in padding.valid.iter_mut().zip(&reply_pad.valid) {
        row.extend_from_slice(r);
    }
    let mut c = cache.clone();
    let x = body.embed(int_tensor::<B>(ids, [b, rs], &dev));
    let h = body.forward_layers(x, &padding, 0..upto, Some(&mut c));
    if last_only {
        let last = gather_last(h, &reply_pad);
        let last = body.norm.forward(last.reshape([b, 1, d])).reshape([b, d]);
        let v: Vec<f32> = last.into_data().convert::<f32>().to_vec().expect("f32");
        return v.chunks(d).map(<[f32]>::to_vec).collect();
    }
    let v: Vec<f32> = h.into_data().convert::<f32>().to_vec().expect("f32");
    (replies.iter().enumerate())
        .map(|(row, r)| v[row * rs * d..(row * rs + r.len()) * d].to_vec())
        .collect()
}

/// Run the frozen lower body once over `pairs`.
///
/// With `upto == num_layers` and `last_only`, returns [`PairFeatures::Last`] (for head-only
/// training and for evaluation); otherwise [`PairFeatures::Stream`], the residual stream entering
/// block `upto`. Each pair's prompt goes through the body once; both replies continue from its KV
/// cache. `token_budget` bounds the padded tokens of one batch.
pub fn frozen_features<B: Backend>(
    body: &CausalLm<B>,
    pairs: &[TokenizedPair],
    upto: usize,
    last_only: bool,
    token_budget: usize,
    label: &str,
    observer: &dyn Observer,
) -> Vec<PairFeatures> {
    let d = body.config.hidden_size;
    let dev = body.device();
    let n_layers = body.layers.len();
    let lens: Vec<usize> = pairs.iter().map(|p| p.total_tokens()).collect();
    // Longest first: a batch holds pairs of similar length.
    let mut order: Vec<usize> = (0..pairs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lens[i]));
    let batches = batches_by_tokens(&order, |i| pairs[i].max_len(), 2, token_budget);
    let mut out: Vec<Option<PairFeatures>> = vec![None; pairs.len()];
    observer.begin(label, pairs.len() as u64, 0);
    for batch in batches {
        let b = batch.len();
        let prompts: Vec<&[u32]> = batch.iter().map(|&i| pairs[i].prompt.as_slice()).collect();
        let (ids, prompt_pad, ps) = pad_tokens(&prompts, 0);
        let mut cache = KvCache::new(n_layers);
        let prompt_hidden = (ps > 0).then(|| {
            let x = body.embed(int_tensor::<B>(ids, [b, ps], &dev));
            body.forward_layers(x, &prompt_pad, 0..upto, Some(&mut cache))
        });
        let mut reply_feats: Vec<Vec<Vec<f32>>> = [true, false]
            .into_iter()
            .map(|chosen| {
                let replies: Vec<&[u32]> = batch
                    .iter()
                    .map(|&i| match chosen {
                        true => pairs[i].chosen.as_slice(),
                        false => pairs[i].rejected.as_slice(),
                    })
                    .collect();
                reply_features(body, &cache, &prompt_pad, &replies, upto, last_only)
            })
            .collect();
        let mut prompt_rows: Vec<Vec<f32>> = match (&prompt_hidden, last_only) {
            (Some(h), false) => {
                let v: Vec<f32> = h
                    .clone()
                    .into_data()
                    .convert::<f32>()
                    .to_vec()
                    .expect("f32");
                prompts
                    .iter()
                    .enumerate()
                    .map(|(row, p)| v[row * ps * d..(row * ps + p.len()) * d].to_vec())
                    .collect()
            }
            _ => vec![Vec::new(); b],
        };
        let mut rejected = reply_feats.pop().expect("two replies");
        let mut chosen = reply_feats.pop().expect("two replies");
        for (row, &i) in batch.iter().enumerate().rev() {
            let (c, r) = (chosen.remove(row), rejected.remove(row));
            out[i] = Some(if last_only {
                PairFeatures::Last {
                    chosen: c,
                    rejected: r,
                }
            } else {
                PairFeatures::Stream {
                    prompt: std::mem::take(&mut prompt_rows[row]),
                    chosen: c,
                    rejected: r,
                }
            });
        }
        observer.advance(b as u64, "");
    }
    observer.end();
    out.into_iter().map(|f| f.expect("every pair")).collect()
}

// ---------------------------------------------------------------------------------------------
// Scoring a batch of pairs
// ---------------------------------------------------------------------------------------------

/// Where a batch's inputs come from.
#[derive(Clone, Copy)]
pub enum PairInputs<'a> {
    /// Token ids: the whole model runs.
    Tokens(&'a [TokenizedPair]),
    /// Cached frozen features entering block `layer` (`Last` features: only `phi` runs).
    Features {
        pairs: &'a [TokenizedPair],
        features: &'a [PairFeatures],
        layer: usize,
    },
}

impl PairInputs<'_> {
    fn pairs(&self) -> &[TokenizedPair] {
        match self {
            Self::Tokens(p) | Self::Features { pairs: p, .. } => p,
        }
    }

    /// Rewards of the chosen and of the rejected sequences of `batch`, each `[batch]`.
    pub fn rewards<B: Backend>(
        &self,
        model: &RewardModel<B>,
        batch: &[usize],
    ) -> (Tensor<B, 1>, Tensor<B, 1>) {
        let n = batch.len();
        let dev = model.backbone.device();
        let d = model.backbone.config.hidden_size;
        let rewards = match self {
            Self::Tokens(pairs) => {
                let seqs: Vec<Vec<u32>> = batch
                    .iter()
                    .map(|&i| pairs[i].chosen_ids())
                    .chain(batch.iter().map(|&i| pairs[i].rejected_ids()))
                    .collect();
                let rows: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
                let (ids, padding, s) = pad_tokens(&rows, 0);
                model
                    .forward(int_tensor::<B>(ids, [2 * n, s], &dev), &padding)
                    .rewards
            }
            Self::Features {
                features, layer, ..
            } => {
                let rows: Vec<(&[f32], &[f32])> = batch
                    .iter()
                    .map(|&i| match &features[i] {
                        PairFeatures::Stream { prompt, chosen, .. } => {
                            (prompt.as_slice(), chosen.as_slice())
                        }
                        PairFeatures::Last { chosen, .. } => (&[][..], chosen.as_slice()),
                    })
                    .chain(batch.iter().map(|&i| match &features[i] {
                        PairFeatures::Stream {
                            prompt, rejected, ..
                        } => (prompt.as_slice(), rejected.as_slice()),
                        PairFeatures::Last { rejected, .. } => (&[][..], rejected.as_slice()),
                    }))
                    .collect();
                if matches!(features[batch[0]], PairFeatures::Last { .. }) {
                    let v: Vec<f32> = rows.iter().flat_map(|(_, r)| r.iter().copied()).collect();
                    let h = Tensor::<B, 2>::from_data(TensorData::new(v, [2 * n, d]), &dev);
                    model.score_hidden(h)
                } else {
                    let s = rows
                        .iter()
                        .map(|(p, r)| (p.len() + r.len()) / d)
                        .max()
                        .unwrap_or(0);
                    let mut v = Vec::with_capacity(2 * n * s * d);
                    let mut valid = Vec::with_capacity(2 * n);
                    for (p, r) in &rows {
                        let len = (p.len() + r.len()) / d;
                        v.extend_from_slice(p);
                        v.extend_from_slice(r);
                        v.extend(std::iter::repeat_n(0.0, (s - len) * d));
                        valid.push((0..s).map(|i| i < len).collect());
                    }
                    let x = Tensor::<B, 3>::from_data(TensorData::new(v, [2 * n, s, d]), &dev);
                    model
                        .forward_from_layer(x, &Padding { valid }, *layer)
                        .rewards
                }
            }
        };
        (rewards.clone().slice(0..n), rewards.slice(n..2 * n))
    }
}

// ---------------------------------------------------------------------------------------------
// Evaluation
// ---------------------------------------------------------------------------------------------

/// Held-out quality of a reward model on preference pairs.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct RmEval {
    pub pairs: usize,
    /// Share of pairs with `r(chosen) > r(rejected)`.
    pub accuracy: f64,
    /// Half-width of the 95% normal interval of `accuracy`.
    pub accuracy_ci95: f64,
    /// Mean of `r(chosen) - r(rejected)`.
    pub mean_margin: f64,
    /// Mean BT loss.
    pub loss: f64,
    /// Pearson correlation between reward and reply length in tokens, over all replies.
    pub length_correlation: f64,
    /// Accuracy of the rule "the longer reply wins" on the same pairs, for context.
    pub longer_wins_accuracy: f64,
    pub mean_reward_chosen: f64,
    pub mean_reward_rejected: f64,
}

impl std::fmt::Display for RmEval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pairs {}  accuracy {:.4} (±{:.4} 95%)  mean margin {:.4}  BT loss {:.4}  \
             length correlation {:+.3}  (longer-wins rule: {:.4})",
            self.pairs,
            self.accuracy,
            self.accuracy_ci95,
            self.mean_margin,
            self.loss,
            self.length_correlation,
            self.longer_wins_accuracy
        )
    }
}

/// Pearson correlation (0 when either side is constant).
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    if sxx == 0.0 || syy == 0.0 {
        0.0
    } else {
        sxy / (sxx * syy).sqrt()
    }
}

/// Summarise rewards of chosen and rejected replies.
pub fn summarize(pairs: &[TokenizedPair], chosen: &[f32], rejected: &[f32]) -> RmEval {
    let n = pairs.len().max(1) as f64;
    let margins: Vec<f64> = chosen
        .iter()
        .zip(rejected)
        .map(|(c, r)| (c - r) as f64)
        .collect();
    let accuracy = margins.iter().filter(|&&m| m > 0.0).count() as f64 / n;
    let loss = margins
        .iter()
        .map(|&m| (1.0 + (-m).exp()).ln())
        .sum::<f64>()
        / n;
    let lens: Vec<f64> = pairs
        .iter()
        .map(|p| p.chosen.len() as f64)
        .chain(pairs.iter().map(|p| p.rejected.len() as f64))
        .collect();
    let rewards: Vec<f64> = chosen.iter().chain(rejected).map(|&r| r as f64).collect();
    let longer = pairs
        .iter()
        .map(|p| match p.chosen.len().cmp(&p.rejected.len()) {
            std::cmp::Ordering::Greater => 1.0,
            std::cmp::Ordering::Equal => 0.5,
            std::cmp::Ordering::Less => 0.0,
        })
        .sum::<f64>()
        / n;
    RmEval {
        pairs: pairs.len(),
        accuracy,
        accuracy_ci95: 1.96 * (accuracy * (1.0 - accuracy) / n).sqrt(),
        mean_margin: margins.iter().sum::<f64>() / n,
        loss,
        length_correlation: pearson(&rewards, &lens),
        longer_wins_accuracy: longer,
        mean_reward_chosen: chosen.iter().map(|&r| r as f64).sum::<f64>() / n,
        mean_reward_rejected: rejected.iter().map(|&r| r as f64).sum::<f64>() / n,
    }
}

/// Score every pair of `inputs` (no gradients); returns the chosen and rejected rewards.
pub fn score_pairs<B: Backend>(
    model: &RewardModel<B>,
    inputs: PairInputs<'_>,
    token_budget: usize,
) -> (Vec<f32>, Vec<f32>) {
    let pairs = inputs.pairs();
    let mut order: Vec<usize> = (0..pairs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(pairs[i].max_len()));
    let (mut c, mut r) = (vec![0f32; pairs.len()], vec![0f32; pairs.len()]);
    for batch in batches_by_tokens(&order, |i| pairs[i].max_len(), 2, token_budget) {
        let (tc, tr) = inputs.rewards(model, &batch);
        let vc: Vec<f32> = tc.into_data().convert::<f32>().to_vec().expect("f32");
        let vr: Vec<f32> = tr.into_data().convert::<f32>().to_vec().expect("f32");
        for (k, &i) in batch.iter().enumerate() {
            c[i] = vc[k];
            r[i] = vr[k];
        }
    }
    (c, r)
}

/// Rewards of every pair's chosen and rejected sequence: the frozen-feature path, with each
/// prompt encoded once for both replies.
pub fn rm_rewards<B: Backend>(
    model: &RewardModel<B>,
    pairs: &[TokenizedPair],
    token_budget: usize,
    observer: &dyn Observer,
) -> (Vec<f32>, Vec<f32>) {
    let n = model.backbone.layers.len();
    let feats = frozen_features(
        &model.backbone,
        pairs,
        n,
        true,
        token_budget,
        "scoring",
        observer,
    );
    let inputs = PairInputs::Features {
        pairs,
        features: &feats,
        layer: n,
    };
    score_pairs(model, inputs, token_budget)
}

/// Evaluate a reward model on tokenized pairs (see [`rm_rewards`]).
pub fn evaluate_rm<B: Backend>(
    model: &RewardModel<B>,
    pairs: &[TokenizedPair],
    token_budget: usize,
    observer: &dyn Observer,
) -> RmEval {
    let (c, r) = rm_rewards(model, pairs, token_budget, observer);
    summarize(pairs, &c, &r)
}

// ---------------------------------------------------------------------------------------------
// Training
// ---------------------------------------------------------------------------------------------

/// One line of `metrics.jsonl`.
#[derive(Debug, Serialize)]
struct StepMetrics {
    step: usize,
    epoch: f64,
    lr: f64,
    loss: f64,
    accuracy: f64,
    grad_norm: f64,
    pairs: usize,
    elapsed_s: f64,
}

/// What [`train_reward_model`] reports.
#[derive(Debug, Clone, Serialize)]
pub struct RmTrainSummary {
    pub config: RmTrainConfig,
    pub train_pairs: usize,
    pub eval_pairs: usize,
    pub steps: usize,
    /// Seconds spent computing frozen features (0 when everything trains).
    pub feature_seconds: f64,
    pub train_seconds: f64,
    /// Held-out metrics before training (same inputs, initial head).
    pub eval_before: Option<RmEval>,
    pub eval_after: Option<RmEval>,
    pub out_dir: PathBuf,
}

/// Where [`train_reward_model`] writes.
pub struct RmOutputs<'a> {
    pub dir: &'a Path,
    pub tokenizer: Option<&'a Tokenizer>,
    /// With `trainable = head`, write only the head and the identity of this base model (its
    /// spec, e.g. `smollm2`): [`RewardModel::save_head_only`]. `None`: the whole RM in HF layout.
    pub head_only_base: Option<&'a str>,
    /// Where progress and evaluation lines go.
    pub observer: &'a dyn Observer,
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("json");
    std::fs::write(path, text).map_err(|e| R2mError::io(path, e))
}

/// One Bradley-Terry optimizer step over the micro-batches of `group`: their gradients
/// accumulate (each weighted by its share of the step's pairs), then gradient-norm clipping and
/// AdamW at `lr`. Returns the updated model and the step's loss, training accuracy and pre-clip
/// gradient norm (`step`, `epoch` and `elapsed_s` are the caller's to fill).
fn bt_step<B: AutodiffBackend>(
    model: RewardModel<B>,
    optim: &mut OptimizerAdaptor<AdamW, RewardModel<B>, B>,
    inputs: PairInputs<'_>,
    group: &[Vec<usize>],
    lr: f64,
    max_grad_norm: f64,
) -> (RewardModel<B>, StepMetrics) {
    let step_pairs: usize = group.iter().map(Vec::len).sum();
    let mut acc = GradientsAccumulator::<RewardModel<B>>::new();
    let (mut loss_sum, mut correct) = (0f64, 0usize);
    for batch in group {
        let (c, r) = inputs.rewards(&model, batch);
        let margins: Vec<f32> = (c.clone() - r.clone())
            .into_data()
            .convert::<f32>()
            .to_vec()
            .expect("f32");
        correct += margins.iter().filter(|&&m| m > 0.0).count();
        let loss = bradley_terry_loss(c, r).mul_scalar(batch.len() as f32 / step_pairs as f32);
        loss_sum += loss.clone().into_scalar().elem::<f32>() as f64;
        acc.accumulate(&model, GradientsParams::from_grads(loss.backward(), &model));
    }
    let mut grads = acc.grads();
    let grad_norm = clip_grad_norm::<B, _>(&model, &mut grads, max_grad_norm);
    let model = optim.step(lr, model, grads);
    let m = StepMetrics {
        step: 0,
        epoch: 0.0,
        lr,
        loss: loss_sum,
        accuracy: correct as f64 / step_pairs as f64,
        grad_norm,
        pairs: step_pairs,
        elapsed_s: 0.0,
    };
    (model, m)
}

/// The micro-batches of RM training's epoch `epoch`: length-grouped, then shuffled, seeded by
/// the epoch.
fn epoch_batches(lens: &[usize], cfg: &RmTrainConfig, epoch: usize) -> Vec<Vec<usize>> {
    let seed = cfg.seed.wrapping_add(epoch as u64);
    let order = length_grouped_order(lens, 64, seed);
    let mut b = batches_by_tokens(&order, |i| lens[i], 2, cfg.token_budget);
    r2m_data::tokenize::shuffle_batches(&mut b, seed ^ 0x5eed);
    b
}

/// The optimizer steps of RM training: `grad_accum` micro-batches a step, the learning rate on
/// the warm-up + cosine schedule, a line of `metrics.jsonl` each, evaluation every `eval_every`
/// and a checkpoint every `save_every` steps. Returns the model, the number of steps and the
/// newest evaluation.
fn fit<B: AutodiffBackend>(
    mut model: RewardModel<B>,
    train: &[TokenizedPair],
    train_in: PairInputs<'_>,
    run_eval: &dyn Fn(&RewardModel<B>) -> Option<RmEval>,
    cfg: &RmTrainConfig,
    out: &RmOutputs<'_>,
) -> Result<(RewardModel<B>, usize, Option<RmEval>)> {
    let lens: Vec<usize> = train.iter().map(TokenizedPair::max_len).collect();
    let accum = cfg.grad_accum.max(1);
    let steps_per_epoch: Vec<usize> = (0..cfg.epochs)
        .map(|e| epoch_batches(&lens, cfg, e).len().div_ceil(accum))
        .collect();
    let total_steps: usize = steps_per_epoch.iter().sum();
    let warmup = ((total_steps as f64) * cfg.warmup_ratio).round() as usize;
    let mut optim = crate::optim::adamw::<B, RewardModel<B>>(cfg.weight_decay);
    let metrics_path = out.dir.join("metrics.jsonl");
    let io = |e| R2mError::io(&metrics_path, e);
    let mut metrics = std::fs::File::create(&metrics_path).map_err(io)?;
    let obs = out.observer;
    obs.begin(
        &format!("train-rm ({})", cfg.trainable),
        total_steps as u64,
        0,
    );
    let (t_train, mut step, mut last_eval) = (Instant::now(), 0usize, None);
    for (epoch, &epoch_steps) in steps_per_epoch.iter().enumerate() {
        for (k, group) in epoch_batches(&lens, cfg, epoch).chunks(accum).enumerate() {
            let lr = warmup_cosine_lr(step, total_steps, warmup, cfg.lr, cfg.min_lr_ratio);
            let (next, mut m) = bt_step(model, &mut optim, train_in, group, lr, cfg.max_grad_norm);
            model = next;
            step += 1;
            m.step = step;
            m.epoch = epoch as f64 + (k + 1) as f64 / epoch_steps as f64;
            m.elapsed_s = t_train.elapsed().as_secs_f64();
            writeln!(metrics, "{}", serde_json::to_string(&m).expect("json"))
                .and_then(|_| metrics.flush())
                .map_err(io)?;
            obs.advance(1, &format!("loss {:.4} acc {:.2}", m.loss, m.accuracy));
            let due = |every: usize| every > 0 && step.is_multiple_of(every) && step < total_steps;
            if due(cfg.eval_every) {
                last_eval = run_eval(&model);
                if let Some(e) = &last_eval {
                    obs.message(&format!("step {step}: eval {e}"));
                    let line = serde_json::json!({"step": step, "eval": e});
                    writeln!(metrics, "{line}").map_err(io)?;
                }
            }
            if due(cfg.save_every) {
                let dir = out.dir.join(format!("checkpoint-{step}"));
                model.valid().save_hf_dir(out.tokenizer, &dir)?;
                obs.message(&format!("saved {}", dir.display()));
            }
        }
    }
    obs.end();
    Ok((model, total_steps, last_eval))
}

/// Train `model` with the Bradley-Terry loss on `train`, evaluating on `eval`.
///
/// Writes to `out.dir`: `metrics.jsonl` (one line per optimizer step, flushed), `eval.json`,
/// `train_config.json`, checkpoints `checkpoint-STEP/` every `save_every` steps and the final RM
/// (HF sequence-classification layout) in the directory itself.
pub fn train_reward_model<B: AutodiffBackend>(
    mut model: RewardModel<B>,
    train: &[TokenizedPair],
    eval: &[TokenizedPair],
    cfg: &RmTrainConfig,
    out: RmOutputs<'_>,
) -> Result<(RewardModel<B>, RmTrainSummary)> {
    if train.is_empty() {
        return Err(R2mError::Config("no training pairs".into()));
    }
    let n_layers = model.backbone.layers.len();
    let (start_layer, last_only) = match cfg.trainable {
        Trainable::Head => (n_layers, true),
        Trainable::Top(k) if k > n_layers => {
            return Err(R2mError::Config(format!(
                "--trainable top:{k}, but the model has only {n_layers} blocks"
            )))
        }
        Trainable::Top(k) => (n_layers - k, false),
        Trainable::All => (0, false),
        Trainable::Lora => {
            let lora = cfg.lora.as_ref().ok_or_else(|| {
                R2mError::Config(
                    "trainable = lora needs the adapters' settings (--lora-r ...)".into(),
                )
            })?;
            // Adapters on the backbone, every base weight frozen; the head stays trainable.
            model.backbone = add_adapters(model.backbone, lora)?;
            (lora.layers.first_layer(n_layers)?, false)
        }
    };
    std::fs::create_dir_all(out.dir).map_err(|e| R2mError::io(out.dir, e))?;
    write_json(&out.dir.join("train_config.json"), cfg)?;

    // Frozen features, computed once on the inner (no-autodiff) backend.
    let t0 = Instant::now();
    let frozen = |pairs: &[TokenizedPair], label: &str| -> Vec<PairFeatures> {
        let budget = cfg.token_budget;
        let body = model.backbone.valid();
        frozen_features(
            &body,
            pairs,
            start_layer,
            last_only,
            budget,
            label,
            out.observer,
        )
    };
    // Everything runs from the tokens when the first trainable block is the first block.
    let all = start_layer == 0;
    let train_feats = if all {
        Vec::new()
    } else {
        frozen(train, "features (train)")
    };
    let eval_feats = if all {
        Vec::new()
    } else {
        frozen(eval, "features (eval)")
    };
    let feature_seconds = t0.elapsed().as_secs_f64();
    let inputs = |pairs, features| match all {
        true => PairInputs::Tokens(pairs),
        false => PairInputs::Features {
            pairs,
            features,
            layer: start_layer,
        },
    };
    let (train_in, eval_in) = (inputs(train, &train_feats), inputs(eval, &eval_feats));
    let run_eval = |m: &RewardModel<B>| -> Option<RmEval> {
        (!eval.is_empty()).then(|| {
            let (c, r) = score_pairs(&m.valid(), eval_in, cfg.token_budget);
            summarize(eval, &c, &r)
        })
    };
    let eval_before = run_eval(&model);
    if let Some(e) = &eval_before {
        out.observer.message(&format!("eval before training: {e}"));
    }

    let t_train = Instant::now();
    let (model, total_steps, last_eval) = fit(model, train, train_in, &run_eval, cfg, &out)?;
    let train_seconds = t_train.elapsed().as_secs_f64();
    let last_eval = last_eval.or(eval_before.clone());
    let eval_after = if total_steps > 0 {
        run_eval(&model)
    } else {
        last_eval
    };
    match out.head_only_base {
        Some(base) if cfg.trainable == Trainable::Head => {
            model.valid().save_head_only(base, out.tokenizer, out.dir)?
        }
        _ => model.valid().save_hf_dir(out.tokenizer, out.dir)?,
    }
    let summary = RmTrainSummary {
        config: cfg.clone(),
        train_pairs: train.len(),
        eval_pairs: eval.len(),
        steps: total_steps,
        feature_seconds,
        train_seconds,
        eval_before,
        eval_after,
        out_dir: out.dir.to_path_buf(),
    };
    write_json(&out.dir.join("eval.json"), &summary)?;
    Ok((model, summary))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trainable_parses() {
        assert_eq!("head".parse::<Trainable>().unwrap(), Trainable::Head);
        assert_eq!("top:3".parse::<Trainable>().unwrap(), Trainable::Top(3));
        assert_eq!("all".parse::<Trainable>().unwrap(), Trainable::All);
        assert_eq!("lora".parse::<Trainable>().unwrap(), Trainable::Lora);
        for bad in ["top:0", "top", "top:x", "everything"] {
            let e = bad.parse::<Trainable>().unwrap_err().to_string();
            // The value and every accepted form (the config and `--trainable` both show it).
            assert!(
                e.contains(&format!("`{bad}`")) && e.contains("`top:N`"),
                "{e}"
            );
        }
    }

    #[test]
    fn pearson_of_a_line_is_one() {
        let x = [1.0, 2.0, 3.0, 4.0];
        let y = [2.0, 4.0, 6.0, 8.0];
        assert!((pearson(&x, &y) - 1.0).abs() < 1e-12);
        assert!((pearson(&x, &[8.0, 6.0, 4.0, 2.0]) + 1.0).abs() < 1e-12);
        assert_eq!(pearson(&x, &[1.0; 4]), 0.0);
    }
}
