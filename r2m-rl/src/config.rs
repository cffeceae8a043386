//! The RL run configuration (`r2m train --config run.toml`).
//!
//! Every section and key is optional except `data.prompts` and the reward; unknown keys are
//! rejected with their name. `configs/rl-default.toml` in the repository lists every key with its
//! default and meaning.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::advantage::AdvantageKind;
use crate::policy_loss::{KlEstimator, KlMode, LossAgg};
use crate::reward::RuleReward;
use crate::reward_training::Trainable;
use r2m_core::{R2mError, Result};
use r2m_models::lora::{LoraConfig, LoraLayers, LoraTarget};

/// A whole RL run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RlConfig {
    pub model: ModelSection,
    pub data: DataSection,
    pub rollout: RolloutConfig,
    pub reward: RewardSection,
    pub algo: AlgoConfig,
    pub optim: OptimConfig,
    pub r2m: R2mConfig,
    pub run: RunSection,
    pub lora: LoraSection,
}

/// `[model]`: the policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// `smollm2`, an HF checkpoint directory, or a .gguf file. The reference policy is a frozen
    /// copy of it.
    pub policy: String,
    /// What trains: `all`, `top:N` (the top N blocks and the final norm; embeddings and LM
    /// head stay frozen, and the frozen lower body runs once per rollout instead of once per
    /// mini-batch), or `lora` (LoRA adapters as `[lora]` says, everything else frozen; the
    /// reference is the same model with the adapters off). `head` is not valid for a policy.
    #[serde(with = "as_str")]
    pub trainable: Trainable,
    /// With `trainable = "lora"`: a PEFT LoRA adapter directory to start from instead of fresh
    /// adapters (its own `adapter_config.json` sets r, alpha, dropout, targets and layers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter: Option<PathBuf>,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            policy: "smollm2".into(),
            trainable: Trainable::All,
            adapter: None,
        }
    }
}

/// `[lora]`: the adapters of `model.trainable = "lora"` (ignored otherwise). See
/// [`r2m_models::lora`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraSection {
    /// The rank r (> 0).
    pub r: usize,
    /// The update is scaled by `alpha / r` (`alpha / sqrt(r)` with `rslora`).
    pub alpha: f64,
    /// Dropout on the adapters' input during the update (0: none), in `[0, 1)`.
    pub dropout: f64,
    /// Projections that get adapters: `q`, `k`, `v`, `o`, `gate`, `up`, `down`. GPT-NeoX fuses
    /// q/k/v (any of them adapts all three) and has no `gate`.
    pub targets: Vec<String>,
    /// `all`, or `top:N`: adapters on the top N blocks only (the plain lower body then runs once
    /// per rollout, as with `model.trainable = "top:N"`).
    #[serde(with = "as_str")]
    pub layers: LoraLayers,
    /// rsLoRA: scale by `alpha / sqrt(r)`.
    pub rslora: bool,
}

impl Default for LoraSection {
    fn default() -> Self {
        let d = LoraConfig::default();
        Self {
            r: d.r,
            alpha: d.alpha,
            dropout: d.dropout,
            targets: d.targets.iter().map(|t| t.name().to_string()).collect(),
            layers: d.layers,
            rslora: d.rslora,
        }
    }
}

impl LoraSection {
    /// The adapters' settings, `A` seeded by `seed`; errors name the key (`lora.targets`, ...).
    pub fn to_lora_config(&self, seed: u64) -> Result<LoraConfig> {
        let targets = (self.targets.iter())
            .map(|t| {
                t.parse::<LoraTarget>().map_err(|e| match e {
                    R2mError::Config(msg) => {
                        R2mError::Config(format!("lora.targets: {}", with_suggestion(&msg)))
                    }
                    other => other,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let cfg = LoraConfig {
            r: self.r,
            alpha: self.alpha,
            dropout: self.dropout,
            targets,
            layers: self.layers,
            rslora: self.rslora,
            seed,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// `[data]`: where prompts come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataSection {
    /// `.jsonl` / `.jsonl.gz`: `{"prompt": ...}` records or preference records (HH-RLHF or
    /// prompt/chosen/rejected), whose prompts are used. Required.
    pub prompts: Option<PathBuf>,
    /// Prompts longer than this many tokens (after the chat template) are skipped and counted.
    pub max_prompt_len: usize,
    /// Skip malformed records (counted) instead of stopping at the first one.
    pub skip_bad: bool,
    /// Read at most this many records.
    pub limit: Option<usize>,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            prompts: None,
            max_prompt_len: 256,
            skip_bad: true,
            limit: None,
        }
    }
}

/// `[rollout]`: sampling (spec §3 steps 1-2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RolloutConfig {
    /// n: prompts per RL step.
    pub prompts_per_step: usize,
    /// K: responses sampled per prompt.
    pub samples_per_prompt: usize,
    pub max_new_tokens: usize,
    /// EOS cannot be sampled before this many new tokens (HF's `min_new_tokens`); 0 = no floor.
    /// `r2m bench rl-step` sets it to `max_new_tokens`, so every arm generates the same lengths.
    pub min_new_tokens: usize,
    /// Sampling temperature (> 0). Log-probs in the loss use the same temperature.
    pub temperature: f32,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    /// Rows generated in one batch.
    pub generation_batch_size: usize,
    /// Run a separate forward pass of the old policy for its log-probs (and R2M's `h`, and the
    /// frozen trunk's output) instead of keeping them from sampling. The step is on-policy, so
    /// both give the same values within float rounding; the pass is the reference behaviour and
    /// the check.
    pub recompute_old_logprobs: bool,
}

impl Default for RolloutConfig {
    fn default() -> Self {
        Self {
            prompts_per_step: 8,
            samples_per_prompt: 4,
            max_new_tokens: 64,
            min_new_tokens: 0,
            temperature: 0.7,
            top_k: None,
            top_p: None,
            generation_batch_size: 64,
            recompute_old_logprobs: false,
        }
    }
}

/// What scores a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RewardKind {
    /// A learned reward model (`reward.model`).
    Model,
    /// A rule (`reward.rule`).
    Rule,
    /// An external command (`reward.command`), one JSON line per response
    /// ([`crate::command`]).
    Command,
}

/// `[reward]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RewardSection {
    pub kind: RewardKind,
    /// Reward-model directory (HF `*ForSequenceClassification` layout, e.g. `r2m train-rm`'s
    /// output).
    pub model: Option<PathBuf>,
    /// A rule: `token-share:ID` (share of response tokens equal to token ID) or `length:N`
    /// (`-|len - N| / N`).
    #[serde(with = "opt_as_str", skip_serializing_if = "Option::is_none")]
    pub rule: Option<RuleReward>,
    /// Subtracted from the reward of a response that ends without EOS (cut at `max_new_tokens`).
    pub missing_eos_penalty: Option<f32>,
    /// Padded tokens per reward-model batch.
    pub token_budget: usize,
    /// The command of `kind = "command"`, run once as `sh -c COMMAND` for the whole run: it
    /// reads one `{"prompt":...,"response":...}` line per response on stdin and writes one
    /// number per line on stdout ([`crate::command`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Seconds the command may take to answer one request before the run stops.
    pub timeout_s: f64,
}

impl Default for RewardSection {
    fn default() -> Self {
        Self {
            kind: RewardKind::Model,
            model: None,
            rule: None,
            missing_eos_penalty: None,
            token_budget: 4096,
            command: None,
            timeout_s: 60.0,
        }
    }
}

/// `[algo]`: advantages and the policy loss (spec §3 steps 5-6).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlgoConfig {
    /// `rloo`, `grpo`, `reinforce++`, `remax` or `gae` (PPO with a value head).
    pub advantage: AdvantageKind,
    /// GRPO: divide by the group's standard deviation.
    pub grpo_scale_by_std: bool,
    /// GRPO: added to the standard deviation.
    pub grpo_eps: f32,
    /// GAE discount.
    pub gamma: f32,
    /// GAE lambda.
    pub lambda: f32,
    /// Whiten GAE advantages over the batch (REINFORCE++ always whitens).
    pub whiten_advantages: bool,
    /// Ratio clip: `[1 - clip_eps, 1 + clip_eps_high]`.
    pub clip_eps: f32,
    /// Upper clip; `clip_eps` when unset.
    pub clip_eps_high: Option<f32>,
    /// Dual clip constant c > 1 for negative advantages; off when unset.
    pub dual_clip: Option<f32>,
    /// `token-mean` or `seq-mean`.
    pub loss_agg: LossAgg,
    /// `k1`, `k2` or `k3`.
    pub kl_estimator: KlEstimator,
    /// `loss` (beta * KL in the loss, with `kl_estimator`) or `reward` (-beta * k1 in each
    /// token's reward). Unset: `reward` for `reinforce++` and `gae` (as those algorithms are
    /// defined), `loss` otherwise ([`AlgoConfig::kl_mode`]).
    pub kl_mode: Option<KlMode>,
    /// beta.
    pub kl_coef: f64,
    /// Adaptive KL (Ziegler et al. 2019): when set, beta moves so that the mean sequence KL
    /// approaches this target.
    pub kl_target: Option<f64>,
    /// Adaptive KL horizon in samples.
    pub kl_horizon: f64,
    /// Entropy bonus coefficient (0: none).
    pub entropy_coef: f64,
    /// PPO: value clip range around the old values.
    pub value_clip: f32,
    /// PPO: critic learning rate.
    pub critic_lr: f64,
}

impl Default for AlgoConfig {
    fn default() -> Self {
        Self {
            advantage: AdvantageKind::Rloo,
            grpo_scale_by_std: true,
            grpo_eps: 1e-6,
            gamma: 1.0,
            lambda: 0.95,
            whiten_advantages: true,
            clip_eps: 0.2,
            clip_eps_high: None,
            dual_clip: None,
            loss_agg: LossAgg::TokenMean,
            kl_estimator: KlEstimator::K3,
            kl_mode: None,
            kl_coef: 0.01,
            kl_target: None,
            kl_horizon: 10_000.0,
            entropy_coef: 0.0,
            value_clip: 0.2,
            critic_lr: 1e-5,
        }
    }
}

impl AlgoConfig {
    /// Where the KL penalty goes: `kl_mode` when set, else `reward` for REINFORCE++ and PPO
    /// (GAE), which are defined with the KL in the token rewards, and `loss` for the others.
    pub fn kl_mode(&self) -> KlMode {
        self.kl_mode.unwrap_or(match self.advantage {
            AdvantageKind::ReinforcePp | AdvantageKind::Gae => KlMode::Reward,
            _ => KlMode::Loss,
        })
    }
}

/// `[optim]`: the policy update (spec §3 step 6).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    /// Peak policy learning rate (AdamW 0.9 / 0.999 / 1e-8).
    pub lr: f64,
    /// Share of all optimizer steps spent warming up linearly.
    pub warmup_ratio: f64,
    /// The cosine decays to `lr * min_lr_ratio` (1.0: constant after warm-up).
    pub min_lr_ratio: f64,
    pub weight_decay: f64,
    /// Global gradient-norm clip.
    pub max_grad_norm: f64,
    /// k: passes over each step's rollouts.
    pub epochs: usize,
    /// Sequences per optimizer step.
    pub mini_batch_size: usize,
    /// Sequences per forward/backward pass (gradients accumulate over a mini-batch).
    pub micro_batch_size: usize,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 1e-6,
            warmup_ratio: 0.0,
            min_lr_ratio: 1.0,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            epochs: 2,
            mini_batch_size: 16,
            micro_batch_size: 4,
        }
    }
}

/// Which reward the RL loop uses with a learned RM (spec §4: R2M and the paper's controls).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RmMethod {
    /// The frozen RM: `r = phi(H_last)`.
    Vanilla,
    /// R2M: `r = phi(H_fin)` with the policy's hidden states, fusion head and `phi` trained
    /// after every RL step with GREBT.
    R2m,
    /// Control: GREBT on the vanilla rewards (no feedback) updates `phi` only.
    IterativeHead,
    /// Control: the fusion head applied but never trained.
    R2mNoTrain,
    /// Control: `h` replaced by Gaussian noise of the same mean and variance.
    R2mNoise,
    /// Control: before RL, the RM is fine-tuned with Bradley-Terry on gold preference pairs for
    /// the RL prompts (`r2m.pretrain_pairs`); then frozen, as vanilla.
    PretrainedRm,
    /// Upper bound of the over-optimization experiment: `phi` keeps training with Bradley-Terry
    /// on pairs of the current policy's samples that a gold reward labels
    /// ([`crate::R2mReward::update_on_pairs`]). It needs a gold, so only `r2m experiment
    /// overopt` runs it.
    Oracle,
}

/// `vanilla`, `r2m`, ... as written in `r2m.method`.
pub fn method_name(m: RmMethod) -> String {
    serde_json::to_value(m)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{m:?}"))
}

/// The estimator's name in logs (`gae` is shown as `ppo`).
pub fn advantage_name(a: AdvantageKind) -> &'static str {
    match a {
        AdvantageKind::Rloo => "rloo",
        AdvantageKind::Grpo => "grpo",
        AdvantageKind::ReinforcePp => "reinforce++",
        AdvantageKind::Remax => "remax",
        AdvantageKind::Gae => "ppo",
    }
}

/// `[r2m]`: the reward model's side of R2M (spec §2-§3). `alpha = 1` is the paper's "w/o BT",
/// `alpha = 0` its "w/o GRE".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct R2mConfig {
    /// `vanilla`, `r2m`, `iterative-head`, `r2m-no-train` or `r2m-noise`.
    pub method: RmMethod,
    /// Inner width d of the fusion head (unset: `min(2048, max(D_rm, D_p))`).
    pub width: Option<usize>,
    /// Omega, the floor of w(t).
    pub omega: f64,
    /// alpha: the GRE share of the GREBT loss.
    pub alpha: f64,
    /// RM learning rate (AdamW 0.9 / 0.999, no weight decay).
    pub lr: f64,
    /// RM optimizer steps after each RL step.
    pub updates_per_step: usize,
    /// Global gradient-norm clip of the RM update.
    pub max_grad_norm: f64,
    /// Start `W_o` at 0 (the paper starts it random, Xavier-uniform).
    pub zero_init_output: bool,
    /// Seed of the fusion head's initialisation and of the w/ Noise control.
    pub seed: u64,
    /// `pretrained-rm`: gold preference pairs (`.jsonl[.gz]`) for the BT fine-tune before RL.
    pub pretrain_pairs: Option<PathBuf>,
    /// `pretrained-rm`: what trains (`head`, `top:N`, `all`), epochs, peak LR, longest sequence.
    #[serde(with = "as_str")]
    pub pretrain_trainable: Trainable,
    pub pretrain_epochs: usize,
    pub pretrain_lr: f64,
    pub pretrain_max_len: usize,
}

impl Default for R2mConfig {
    fn default() -> Self {
        Self {
            method: RmMethod::Vanilla,
            width: None,
            omega: 0.7,
            alpha: 0.3,
            lr: 1e-6,
            updates_per_step: 1,
            max_grad_norm: 1.0,
            zero_init_output: false,
            seed: 0,
            pretrain_pairs: None,
            pretrain_trainable: Trainable::Head,
            pretrain_epochs: 1,
            pretrain_lr: 1e-4,
            pretrain_max_len: 512,
        }
    }
}

/// `run.save_final`: `true`, `false` or `"adapter"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveFinal {
    /// `true`: the policy as an HF directory `RUN/final/` (adapters merged).
    Merged,
    /// `"adapter"`: a LoRA run's PEFT adapter `RUN/adapter/` and no merged copy.
    Adapter,
    /// `false`: no final policy (a LoRA run still writes its small `RUN/adapter/`).
    No,
}

impl Serialize for SaveFinal {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Self::Merged => s.serialize_bool(true),
            Self::No => s.serialize_bool(false),
            Self::Adapter => s.serialize_str("adapter"),
        }
    }
}

impl<'de> Deserialize<'de> for SaveFinal {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(true) => Ok(Self::Merged),
            Raw::Bool(false) => Ok(Self::No),
            Raw::Str(s) if s == "adapter" => Ok(Self::Adapter),
            Raw::Str(s) => Err(serde::de::Error::custom(format!(
                "unknown variant `{s}`, expected `true`, `false` or `\"adapter\"`"
            ))),
        }
    }
}

/// `[run]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunSection {
    /// T: RL steps.
    pub steps: usize,
    pub seed: u64,
    /// Run directory.
    pub out: PathBuf,
    /// Responses per step written to `samples.jsonl`.
    pub log_samples: usize,
    /// What a finished run writes of the policy: `true`, the merged HF directory `RUN/final/`;
    /// `"adapter"`, only the PEFT adapter `RUN/adapter/` (LoRA runs, which always write it);
    /// `false`, neither beyond what LoRA always writes.
    pub save_final: SaveFinal,
    /// Write a checkpoint (`RUN/checkpoints/step-NNNNNN/`) every N steps; 0 = only at the end
    /// (and on Ctrl-C). `r2m train --resume RUN` continues from the newest one.
    pub checkpoint_every: usize,
    /// Checkpoints kept; older ones are deleted once a newer one is complete.
    pub keep_checkpoints: usize,
}

impl Default for RunSection {
    fn default() -> Self {
        Self {
            steps: 20,
            seed: 0,
            out: PathBuf::from("runs/rl"),
            log_samples: 2,
            save_final: SaveFinal::Merged,
            checkpoint_every: 5,
            keep_checkpoints: 2,
        }
    }
}

/// `configs/rl-default.toml`: every key with its default and what it does
/// (`r2m config --print-default`).
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../../configs/rl-default.toml");

/// Modes written as one string with a parameter (`top:N`, `length:N`): serialised with
/// `Display`, read with `FromStr`, whose error names the accepted forms. For
/// `#[serde(with = "r2m_rl::config::as_str")]`.
pub mod as_str {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer, T: std::fmt::Display>(
        v: &T,
        s: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, D, T>(d: D) -> std::result::Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: std::str::FromStr<Err = r2m_core::R2mError>,
    {
        let text = String::deserialize(d)?;
        text.parse().map_err(|e: r2m_core::R2mError| match e {
            r2m_core::R2mError::Config(msg) => D::Error::custom(msg),
            other => D::Error::custom(other),
        })
    }
}

/// [`as_str`] for an optional value.
mod opt_as_str {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer, T: std::fmt::Display>(
        v: &Option<T>,
        s: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.collect_str(v),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D, T>(d: D) -> std::result::Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: std::str::FromStr<Err = r2m_core::R2mError>,
    {
        #[derive(Deserialize)]
        struct Wrap<T: std::str::FromStr<Err = r2m_core::R2mError>>(
            #[serde(with = "super::as_str")] T,
        );
        Ok(Option::<Wrap<T>>::deserialize(d)?.map(|w| w.0))
    }
}

/// serde's "unknown field `x`, expected one of `a`, `b`" (and "unknown variant `x`, expected
/// ...", and the forms of [`as_str`]'s values) plus the nearest valid key or value.
fn with_suggestion(msg: &str) -> String {
    let Some(rest) = ["unknown field `", "unknown variant `"]
        .iter()
        .find_map(|p| msg.strip_prefix(p))
    else {
        return msg.to_string();
    };
    let Some((unknown, expected)) = rest.split_once('`') else {
        return msg.to_string();
    };
    let nearest = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|k| (edit_distance(unknown, k), k))
        .min();
    match nearest {
        Some((d, k)) if d <= unknown.len().max(3) => format!("{msg}; did you mean `{k}`?"),
        _ => msg.to_string(),
    }
}

/// Levenshtein distance.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

impl RlConfig {
    /// Parse TOML text; `origin` names the source in errors.
    pub fn from_toml_str(text: &str, origin: &Path) -> Result<Self> {
        let cfg: Self = toml::from_str(text).map_err(|e| {
            let msg = with_suggestion(e.message());
            let at = e
                .span()
                .map(|s| {
                    let line = text[..s.start].matches('\n').count() + 1;
                    let src = text.lines().nth(line - 1).unwrap_or("").trim();
                    format!(" (line {line}: `{src}`)")
                })
                .unwrap_or_default();
            R2mError::format(origin, format!("{msg}{at}"))
        })?;
        cfg.validate().map_err(|e| match e {
            R2mError::Config(msg) => R2mError::format(origin, msg),
            other => other,
        })?;
        Ok(cfg)
    }

    /// Read and check a TOML file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| R2mError::io(path, e))?;
        Self::from_toml_str(&text, path)
    }

    /// Apply command-line overrides `section.key=value` (the value in TOML syntax; a bare word
    /// is taken as a string), checked like the file: unknown keys are named with the nearest
    /// valid one, and the result is validated.
    pub fn with_overrides(&self, sets: &[String]) -> Result<Self> {
        if sets.is_empty() {
            return Ok(self.clone());
        }
        let mut root = toml::Table::try_from(self).expect("config serialises");
        for set in sets {
            let bad = |msg: String| R2mError::Config(format!("--set {set}: {msg}"));
            let (key, raw) = set
                .split_once('=')
                .ok_or_else(|| bad("expected section.key=value".into()))?;
            let (key, raw) = (key.trim(), raw.trim());
            let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(raw.to_string()));
            let path: Vec<&str> = key.split('.').collect();
            let (last, parents) = path.split_last().expect("split yields one item");
            let mut table = &mut root;
            for p in parents {
                table = table
                    .entry(p.to_string())
                    .or_insert_with(|| toml::Value::Table(Default::default()))
                    .as_table_mut()
                    .ok_or_else(|| bad(format!("`{p}` is not a section")))?;
            }
            table.insert(last.to_string(), value);
        }
        let cfg: Self = root.try_into().map_err(|e: toml::de::Error| {
            R2mError::Config(format!("--set: {}", with_suggestion(e.message())))
        })?;
        cfg.validate().map_err(|e| match e {
            R2mError::Config(msg) => R2mError::Config(format!("--set: {msg}")),
            other => other,
        })?;
        Ok(cfg)
    }

    /// The resolved config as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }

    /// Check values serde cannot. The error names the key.
    pub fn validate(&self) -> Result<()> {
        let (r, a, o) = (&self.rollout, &self.algo, &self.optim);
        let bad = |msg: String| Err(R2mError::Config(msg));
        if r.prompts_per_step == 0 || r.samples_per_prompt == 0 {
            return bad(
                "rollout.prompts_per_step and rollout.samples_per_prompt must be > 0".into(),
            );
        }
        if matches!(a.advantage, AdvantageKind::Rloo) && r.samples_per_prompt < 2 {
            return bad("algo.advantage = \"rloo\" needs rollout.samples_per_prompt >= 2".into());
        }
        if r.temperature <= 0.0 {
            return bad("rollout.temperature must be > 0 (RL samples)".into());
        }
        if r.max_new_tokens == 0 {
            return bad("rollout.max_new_tokens must be > 0".into());
        }
        if r.min_new_tokens > r.max_new_tokens {
            return bad(format!(
                "rollout.min_new_tokens ({}) must be <= rollout.max_new_tokens ({})",
                r.min_new_tokens, r.max_new_tokens
            ));
        }
        if o.epochs == 0 || o.mini_batch_size == 0 || o.micro_batch_size == 0 {
            return bad(
                "optim.epochs, optim.mini_batch_size and optim.micro_batch_size must be > 0".into(),
            );
        }
        if !(0.0..1.0).contains(&a.clip_eps) {
            return bad(format!(
                "algo.clip_eps must be in [0, 1), got {}",
                a.clip_eps
            ));
        }
        if a.dual_clip.is_some_and(|c| c <= 1.0) {
            return bad("algo.dual_clip must be > 1".into());
        }
        if self.model.trainable == Trainable::Head {
            return bad(
                "model.trainable = \"head\" is not valid for a policy: use `all`, `top:N` or `lora`"
                    .into(),
            );
        }
        if self.model.adapter.is_some() && self.model.trainable != Trainable::Lora {
            return bad("model.adapter needs model.trainable = \"lora\"".into());
        }
        if self.run.save_final == SaveFinal::Adapter && self.model.trainable != Trainable::Lora {
            return bad(
                "run.save_final = \"adapter\" needs model.trainable = \"lora\" (only a LoRA run \
                 has an adapter): use true or false"
                    .into(),
            );
        }
        if self.r2m.pretrain_trainable == Trainable::Lora {
            return bad(
                "r2m.pretrain_trainable = \"lora\": LoRA is not yet supported for reward models"
                    .into(),
            );
        }
        self.lora.to_lora_config(self.run.seed)?;
        self.validate_reward()
    }

    /// The checks of `[reward]` and `[r2m]`.
    fn validate_reward(&self) -> Result<()> {
        let bad = |msg: &str| Err(R2mError::Config(msg.into()));
        if self.r2m.method != RmMethod::Vanilla && self.reward.kind != RewardKind::Model {
            return bad("r2m.method other than \"vanilla\" needs reward.kind = \"model\"");
        }
        if self.r2m.method == RmMethod::PretrainedRm && self.r2m.pretrain_pairs.is_none() {
            return bad(
                "r2m.method = \"pretrained-rm\" needs r2m.pretrain_pairs (gold preference pairs)",
            );
        }
        if !(0.0..=1.0).contains(&self.r2m.alpha) || !(0.0..=1.0).contains(&self.r2m.omega) {
            return bad("r2m.alpha and r2m.omega must be in [0, 1]");
        }
        match self.reward.kind {
            RewardKind::Model if self.reward.model.is_none() => {
                bad("reward.kind = \"model\" needs reward.model (a reward-model directory)")
            }
            RewardKind::Rule if self.reward.rule.is_none() => {
                bad("reward.kind = \"rule\" needs reward.rule")
            }
            RewardKind::Command
                if self
                    .reward
                    .command
                    .as_deref()
                    .is_none_or(|c| c.trim().is_empty()) =>
            {
                bad("reward.kind = \"command\" needs reward.command (e.g. \"python3 reward.py\")")
            }
            RewardKind::Command
                if self.reward.timeout_s <= 0.0
                    || std::time::Duration::try_from_secs_f64(self.reward.timeout_s).is_err() =>
            {
                bad("reward.timeout_s must be a positive number of seconds")
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default config with a rule reward (valid without any file).
    fn rule_config() -> RlConfig {
        RlConfig {
            reward: RewardSection {
                kind: RewardKind::Rule,
                rule: Some(RuleReward::Length(10)),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn defaults_round_trip_through_toml() {
        let cfg = rule_config();
        let text = cfg.to_toml();
        let back = RlConfig::from_toml_str(&text, Path::new("x.toml")).unwrap();
        assert_eq!(cfg, back);
    }

    #[test]
    fn unknown_keys_are_named_with_their_line() {
        let text = "[rollout]\nsamples_per_prompt = 4\ntemprature = 0.7\n";
        let e = RlConfig::from_toml_str(text, Path::new("run.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("temprature") && e.contains("run.toml") && e.contains("line 3"),
            "{e}"
        );
        assert!(e.contains("did you mean `temperature`?"), "{e}");
        let e = RlConfig::from_toml_str("[algo]\nadvantage = \"ppo\"\n", Path::new("r.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ppo") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn wrong_types_and_missing_files_are_one_line_errors_naming_them() {
        let e = RlConfig::from_toml_str("[run]\n\nsteps = \"ten\"\n", Path::new("run.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("run.toml") && e.contains("line 3: `steps = \"ten\"`") && !e.contains('\n'),
            "{e}"
        );
        let e = RlConfig::load(Path::new("no/such/run.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no/such/run.toml") && !e.contains('\n'), "{e}");
        let e = RlConfig::from_toml_str("[rollot]\n", Path::new("r.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("did you mean `rollout`?"), "{e}");
    }

    #[test]
    fn command_line_overrides_are_checked_like_the_file() {
        let cfg = rule_config();
        let o = cfg
            .with_overrides(&[
                "rollout.max_new_tokens=32".into(),
                "r2m.method=vanilla".into(),
                "run.out = \"runs/x\"".into(),
                "optim.lr=3e-6".into(),
            ])
            .unwrap();
        assert_eq!(o.rollout.max_new_tokens, 32);
        assert_eq!(o.r2m.method, RmMethod::Vanilla);
        assert_eq!(o.run.out, PathBuf::from("runs/x"));
        assert_eq!(o.optim.lr, 3e-6);
        let e = cfg
            .with_overrides(&["rollout.max_new_tokns=3".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("max_new_tokns") && e.contains("did you mean `max_new_tokens`?"),
            "{e}"
        );
        let e = cfg
            .with_overrides(&["rollout.max_new_tokens=many".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--set"), "{e}");
        assert!(cfg.with_overrides(&["no-equals-sign".into()]).is_err());
    }

    #[test]
    fn the_default_config_file_documents_every_key() {
        // Every key of the resolved default config appears in rl-default.toml, set or commented.
        let resolved: toml::Table = toml::from_str(&RlConfig::default().to_toml()).unwrap();
        let doc = DEFAULT_CONFIG_TOML;
        for (section, v) in &resolved {
            let Some(t) = v.as_table() else { continue };
            let header = format!("[{section}]");
            let start = doc
                .find(&header)
                .unwrap_or_else(|| panic!("{header} missing"));
            let body = &doc[start..];
            let body = &body[..body[1..].find("\n[").map_or(body.len(), |i| i + 1)];
            for key in t.keys() {
                let set = format!("\n{key} =");
                let commented = format!("\n# {key} =");
                assert!(
                    body.contains(&set) || body.contains(&commented),
                    "{section}.{key} is not documented in configs/rl-default.toml"
                );
            }
        }
    }

    #[test]
    fn invalid_values_are_explained() {
        let e = RlConfig::from_toml_str(
            "[rollout]\nsamples_per_prompt = 1\n[reward]\nkind = \"rule\"\nrule = \"length:5\"\n",
            Path::new("r.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("samples_per_prompt >= 2"), "{e}");
        let e = RlConfig::from_toml_str(
            "[rollout]\nmax_new_tokens = 8\nmin_new_tokens = 9\n[reward]\nkind = \"rule\"\nrule = \"length:5\"\n",
            Path::new("r.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("min_new_tokens (9) must be <= rollout.max_new_tokens (8)"),
            "{e}"
        );
        let e = RlConfig::from_toml_str("", Path::new("r.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("reward.model"), "{e}");
        let e = RlConfig::from_toml_str(
            "[reward]\nmodel = \"rm\"\n[r2m]\nmethod = \"pretrained-rm\"\n",
            Path::new("r.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("r2m.pretrain_pairs"), "{e}");
        let e = RlConfig::from_toml_str(
            "[reward]\nkind = \"rule\"\nrule = \"length:3\"\n[r2m]\nmethod = \"r2m\"\n",
            Path::new("r.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("reward.kind"), "{e}");
    }

    #[test]
    fn a_command_reward_needs_its_command_and_round_trips() {
        let e = RlConfig::from_toml_str("[reward]\nkind = \"command\"\n", Path::new("r.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("reward.command"), "{e}");
        let e = RlConfig::from_toml_str(
            "[reward]\nkind = \"command\"\ncommand = \"sh r.sh\"\ntimeout_s = 0\n",
            Path::new("r.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("reward.timeout_s"), "{e}");
        let cfg = RlConfig::from_toml_str(
            "[reward]\nkind = \"command\"\ncommand = \"python3 my_reward.py --x 1\"\ntimeout_s = 2.5\n",
            Path::new("r.toml"),
        )
        .unwrap();
        assert_eq!(cfg.reward.kind, RewardKind::Command);
        assert_eq!(
            cfg.reward.command.as_deref(),
            Some("python3 my_reward.py --x 1")
        );
        assert_eq!(cfg.reward.timeout_s, 2.5);
        let back = RlConfig::from_toml_str(&cfg.to_toml(), Path::new("x")).unwrap();
        assert_eq!(back, cfg);
        // The default timeout.
        let cfg = RlConfig::from_toml_str(
            "[reward]\nkind = \"command\"\ncommand = \"sh r.sh\"\n",
            Path::new("r.toml"),
        )
        .unwrap();
        assert_eq!(cfg.reward.timeout_s, 60.0);
        // R2M trains a learned reward model: a command cannot be one.
        let e = RlConfig::from_toml_str(
            "[reward]\nkind = \"command\"\ncommand = \"sh r.sh\"\n[r2m]\nmethod = \"r2m\"\n",
            Path::new("r.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("reward.kind = \"model\""), "{e}");
    }

    #[test]
    fn modes_are_typed_and_unknown_values_get_a_suggestion() {
        let parse = |extra: &str| {
            RlConfig::from_toml_str(
                &format!("[reward]\nkind = \"rule\"\nrule = \"length:5\"\n{extra}"),
                Path::new("run.toml"),
            )
        };
        let cfg = parse("[model]\ntrainable = \"top:3\"\n").unwrap();
        assert_eq!(cfg.model.trainable, Trainable::Top(3));
        assert_eq!(cfg.reward.rule, Some(RuleReward::Length(5)));
        let e = parse("[model]\ntrainable = \"tpo:3\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("run.toml") && e.contains("tpo:3"), "{e}");
        assert!(e.contains("did you mean `top:N`?"), "{e}");
        let e = parse("[r2m]\npretrain_trainable = \"haed\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("did you mean `head`?"), "{e}");
        let e = RlConfig::from_toml_str(
            "[reward]\nkind = \"rule\"\nrule = \"lenght:5\"\n",
            Path::new("run.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("did you mean `length:N`?"), "{e}");
        let e = parse("[algo]\nadvantage = \"rlo\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("did you mean `rloo`?"), "{e}");
        // Typed values survive the round trip through TOML.
        let back = RlConfig::from_toml_str(&cfg.to_toml(), Path::new("x")).unwrap();
        assert_eq!(back, cfg);
    }

    #[test]
    fn the_lora_section_is_typed_and_its_errors_name_the_key() {
        let parse = |extra: &str| {
            RlConfig::from_toml_str(
                &format!("[reward]\nkind = \"rule\"\nrule = \"length:5\"\n{extra}"),
                Path::new("run.toml"),
            )
        };
        let cfg = parse(
            "[model]\ntrainable = \"lora\"\n[lora]\nr = 4\nalpha = 8\ntargets = [\"q\", \"v\"]\n\
             layers = \"top:2\"\nrslora = true\n",
        )
        .unwrap();
        assert_eq!(cfg.model.trainable, Trainable::Lora);
        let lora = cfg.lora.to_lora_config(7).unwrap();
        assert_eq!(
            (lora.r, lora.alpha, lora.rslora, lora.seed),
            (4, 8.0, true, 7)
        );
        assert_eq!(lora.targets, [LoraTarget::Q, LoraTarget::V]);
        assert_eq!(lora.layers, LoraLayers::Top(2));
        let back = RlConfig::from_toml_str(&cfg.to_toml(), Path::new("x")).unwrap();
        assert_eq!(back, cfg);
        // The defaults: every projection of every block.
        let d = RlConfig::default().lora.to_lora_config(0).unwrap();
        assert_eq!(d.targets, LoraTarget::ALL);
        assert_eq!(d.layers, LoraLayers::All);
        let e = parse("[lora]\ntargets = [\"q\", \"gat\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("run.toml") && e.contains("lora.targets") && e.contains("`gat`"),
            "{e}"
        );
        assert!(e.contains("did you mean `gate`?"), "{e}");
        let e = parse("[lora]\nr = 0\n").unwrap_err().to_string();
        assert!(e.contains("lora.r must be > 0"), "{e}");
        let e = parse("[lora]\nlayers = \"top:0\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("top:0") && e.contains("`top:N`"), "{e}");
        let e = parse("[lora]\ndropout = 1.5\n").unwrap_err().to_string();
        assert!(e.contains("lora.dropout"), "{e}");
        let e = parse("[model]\nadapter = \"a\"\n").unwrap_err().to_string();
        assert!(e.contains("model.adapter"), "{e}");
        let e = parse("[r2m]\npretrain_trainable = \"lora\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not yet supported for reward models"), "{e}");
        let e = cfg
            .with_overrides(&["lora.targets=[\"up\", \"dwn\"]".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--set") && e.contains("lora.targets"), "{e}");
    }

    #[test]
    fn kl_goes_into_the_reward_for_reinforce_pp_and_ppo_unless_set() {
        let mut a = AlgoConfig::default();
        for (adv, want) in [
            (AdvantageKind::Rloo, KlMode::Loss),
            (AdvantageKind::Grpo, KlMode::Loss),
            (AdvantageKind::Remax, KlMode::Loss),
            (AdvantageKind::ReinforcePp, KlMode::Reward),
            (AdvantageKind::Gae, KlMode::Reward),
        ] {
            a.advantage = adv;
            a.kl_mode = None;
            assert_eq!(a.kl_mode(), want, "{adv:?}");
            a.kl_mode = Some(KlMode::Loss);
            assert_eq!(a.kl_mode(), KlMode::Loss, "{adv:?}");
        }
    }
}
