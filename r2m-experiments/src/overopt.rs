//! `r2m experiment overopt`: does R2M reduce reward over-optimization? Measured offline against a
//! gold reward, across seeds (spec §5-§6), in the manner of Gao et al. (2023), "Scaling Laws for
//! Reward Model Overoptimization", at laptop scale.
//!
//! - **Task**: prompts asking the policy for its opinion of a film (made-up titles, so the policy
//!   has no facts to lean on), [`film_prompts`].
//! - **Gold reward** ([`Gold`]): VADER's sentiment compound of the response ([`crate::vader`],
//!   a port of vaderSentiment 3.3.2 checked against the Python reference), alone (`vader`, the
//!   first sweep's) or behind quality gates that degenerate text fails (`quality`,
//!   [`crate::gold`]), or a command of the user's. It stands in for human judgement and never
//!   reaches the policy.
//! - **Proxy RM**: a Bradley-Terry scoring head on the frozen policy backbone, trained on pairs of
//!   responses sampled from the *initial* policy on other films' prompts and labelled by the gold
//!   reward, with `label_noise` of the training labels flipped (`rm-pairs.jsonl`, the file
//!   `r2m train-rm --data` takes; the held-out pairs keep their gold labels).
//! - **Runs**: RLOO against the proxy for every method × seed with otherwise equal settings
//!   ([`run_config`]). The gold reward never reaches the policy; [`GoldTracked`] only measures,
//!   per step, on the same samples: gold, proxy (mapped onto gold's scale, [`Calibration`]), their
//!   gap, and the RM's pairwise agreement with gold before and after the RM's own update.
//! - **Report** ([`crate::report`], after the runs, from their files): gold and proxy against
//!   `sqrt(KL)` with a min-max band over seeds, gold at a KL every run reached, the gap,
//!   agreement and length, as a table and plots, and the held-out verdict.
//!
//! ```text
//! EXP/experiment.toml           this experiment's settings (`--resume EXP` reads them back)
//! EXP/prompts-rl.jsonl          RL prompts;  EXP/prompts-rm.jsonl  prompts of the RM's pairs
//! EXP/rm-pairs.jsonl            proxy RM training pairs (gold-labelled, label noise applied)
//! EXP/rm-eval-pairs.jsonl       held-out pairs (gold labels)
//! EXP/pretrain-pairs.jsonl      gold pairs on the RL prompts (the pretrained-rm control)
//! EXP/proxy-rm/                 the proxy RM (HF layout), eval.json, calibration.json
//! EXP/runs/METHOD-seedS/        one normal run directory per run (see crate::run) + done.json
//! EXP/report.md, report.json    the table;  EXP/plots/*.{png,svg}
//! ```
//!
//! Every stage is skipped when its output exists, and an unfinished run resumes from its newest
//! checkpoint, so an interrupted sweep continues where it stopped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use r2m_core::observe::SILENT;
use r2m_core::{Observer, R2mError, Result};
use r2m_data::{label_noise_rows, read_preferences, tokenize_pairs, ReadOptions};
use r2m_models::{generate, load_model, CausalLm, GenerationConfig, RewardModel, Tokenizer};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use burn::tensor::Tensor;
pub use r2m_rl::config::method_name;
use r2m_rl::config::{RewardKind, RlConfig, RmMethod, SaveFinal};
use r2m_rl::r2m_reward::reward_from_config;
use r2m_rl::reward::{Diagnostics, LearnedRm, RewardFn, RolloutReward, Scored};
use r2m_rl::reward_training::{train_reward_model, RmOutputs, RmTrainConfig};
use r2m_rl::run::{list_checkpoints, train_with, RunControl, RunEnd};
use r2m_rl::{
    load_prompts, Experience, Prompt, R2mReward, RewardInput, RlTrainer, StepMetrics, Trainable,
};

use crate::gold::GoldConfig;
pub use crate::gold::{gold_of, gold_scores, Gold, GoldKind};
use crate::heldout::{evaluate_policy, HeldOutLog};
use crate::jsonl::write_atomic;
pub use crate::jsonl::{read_jsonl, write_jsonl};

/// The seed of the held-out samples at step t is `EVAL_SEED ^ t`: the same for every method and
/// run seed, so held-out curves compare on common random numbers.
const EVAL_SEED: u64 = 0x4e1d_0e7a;

// ---------------------------------------------------------------------------------------------
// Settings
// ---------------------------------------------------------------------------------------------

/// The experiment's settings (`EXP/experiment.toml`). [`OveroptConfig::default`] is the full
/// comparison; [`OveroptConfig::reduced`] the CI-sized one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OveroptConfig {
    /// Policy, reference and proxy-RM backbone: `smollm2` or any model spec.
    pub policy: String,
    /// Methods compared (`r2m.method` values).
    pub methods: Vec<RmMethod>,
    /// One run per method and seed (`run.seed` and `r2m.seed`).
    pub seeds: Vec<u64>,
    /// RL steps per run.
    pub steps: usize,
    pub prompts_per_step: usize,
    pub samples_per_prompt: usize,
    pub max_new_tokens: usize,
    /// Sampling temperature of the RL rollouts and of the RM's pairs.
    pub temperature: f64,
    /// Policy blocks that train (`all` or `top:N`).
    #[serde(with = "r2m_rl::config::as_str")]
    pub trainable: Trainable,
    /// Policy learning rate.
    pub lr: f64,
    /// KL penalty beta (kept small: over-optimization needs room to drift).
    pub kl_coef: f64,
    /// R2M's RM learning rate (`r2m.lr`).
    pub r2m_lr: f64,
    /// Proxy-RM training pairs, and held-out pairs (gold labels) it is evaluated on.
    pub rm_pairs: usize,
    pub rm_eval_pairs: usize,
    /// Share of the proxy's training labels flipped (seeded).
    pub label_noise: f64,
    /// Pairs whose gold scores differ by less than this are ties and are not used.
    pub min_gold_gap: f64,
    /// What trains in the proxy RM (`head`, `top:N`, `all`), epochs, learning rate.
    #[serde(with = "r2m_rl::config::as_str")]
    pub rm_trainable: Trainable,
    pub rm_epochs: usize,
    pub rm_lr: f64,
    /// Gold-labelled pairs on the RL prompts for the `pretrained-rm` control.
    pub pretrain_pairs: usize,
    /// Seed of the prompt split, the pair sampling and the label noise.
    pub data_seed: u64,
    /// The gold reward: VADER's sentiment alone (`vader`, the first sweep's), or sentiment behind
    /// quality gates that degenerate text fails (`quality`, [`crate::gold`]).
    pub gold: GoldKind,
    /// The quality gold's gates and thresholds (with `gold = "quality"`).
    pub gold_gates: GoldConfig,
    /// A gold of your own: this command's score replaces `gold` (one persistent child process,
    /// the protocol of `[reward] kind = "command"`: a JSON line `{"prompt", "response"}` in, a
    /// number out; `--gold command:CMD`).
    pub gold_command: Option<String>,
    /// The `oracle` method: every this many steps, the proxy's head trains on the gold-labelled
    /// pairs within each prompt's samples ([`crate::oracle`]), `oracle_epochs` AdamW steps at
    /// `r2m_lr`.
    pub oracle_every: usize,
    pub oracle_epochs: usize,
    /// Evaluate on the held-out prompts ([`eval_prompts`]) before the first step, every this
    /// many steps and after the last (`RUN/heldout.jsonl`); 0: never.
    pub eval_every: usize,
    /// Held-out prompts evaluated (at most 32), `samples_per_prompt` samples each.
    pub eval_prompts: usize,
    /// Overrides of every run's config (`section.key=value`, as `r2m train --set`).
    pub set: Vec<String>,
    /// Seeds of one method instead of `seeds` (by method name: `iterative-head = [0, 1, 2]`), so
    /// that the methods compared most closely get more seeds.
    pub method_seeds: BTreeMap<String, Vec<u64>>,
    /// Overrides of one method's runs, after `set` (by method name: `r2m = ["r2m.lr=1e-3"]`): a
    /// method's own knobs, as tuned.
    pub method_set: BTreeMap<String, Vec<String>>,
}

impl Default for OveroptConfig {
    fn default() -> Self {
        Self {
            policy: "smollm2".into(),
            methods: ALL_METHODS.to_vec(),
            seeds: vec![0, 1, 2],
            steps: 12,
            prompts_per_step: 4,
            samples_per_prompt: 4,
            max_new_tokens: 32,
            temperature: 0.8,
            trainable: Trainable::Top(4),
            lr: 3e-5,
            kl_coef: 0.01,
            r2m_lr: 1e-4,
            rm_pairs: 240,
            rm_eval_pairs: 48,
            label_noise: 0.1,
            min_gold_gap: 0.2,
            rm_trainable: Trainable::Top(2),
            rm_epochs: 3,
            rm_lr: 5e-4,
            pretrain_pairs: 48,
            data_seed: 0,
            gold: GoldKind::Vader,
            gold_gates: GoldConfig::default(),
            gold_command: None,
            oracle_every: 4,
            oracle_epochs: 4,
            eval_every: 4,
            eval_prompts: 32,
            set: Vec::new(),
            method_seeds: BTreeMap::new(),
            method_set: BTreeMap::new(),
        }
    }
}

/// The gold `cfg` names: its `gold_command`, else the built-in `gold`.
pub fn new_gold(cfg: &OveroptConfig) -> Result<Gold> {
    Gold::new(cfg.gold, &cfg.gold_gates, cfg.gold_command.as_deref())
}

/// The methods of issue 7 and the oracle, in report order.
pub const ALL_METHODS: [RmMethod; 7] = [
    RmMethod::Vanilla,
    RmMethod::R2m,
    RmMethod::IterativeHead,
    RmMethod::PretrainedRm,
    RmMethod::R2mNoTrain,
    RmMethod::R2mNoise,
    RmMethod::Oracle,
];

impl OveroptConfig {
    /// The whole path at CI size: every method, one seed, 2 steps, a handful of pairs.
    pub fn reduced() -> Self {
        Self {
            seeds: vec![0],
            steps: 2,
            prompts_per_step: 2,
            samples_per_prompt: 2,
            max_new_tokens: 8,
            rm_pairs: 8,
            rm_eval_pairs: 4,
            pretrain_pairs: 4,
            min_gold_gap: 0.05,
            rm_trainable: Trainable::Head,
            rm_epochs: 2,
            rm_lr: 3e-3,
            eval_every: 1,
            eval_prompts: 2,
            oracle_every: 1,
            ..Self::default()
        }
    }

    /// Read `experiment.toml`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| R2mError::io(path, e))?;
        toml::from_str(&text).map_err(|e| R2mError::format(path, e.to_string()))
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("the experiment config serialises")
    }

    /// The gold in words, for the report: the command, or the built-in gold's name.
    pub fn gold_name(&self) -> String {
        match (&self.gold_command, self.gold) {
            (Some(cmd), _) => format!("command `{cmd}`"),
            (None, GoldKind::Vader) => "VADER".into(),
            (None, GoldKind::Quality) => "VADER behind quality gates".into(),
        }
    }

    /// The seeds `method` runs with: its `method_seeds`, else `seeds`.
    pub fn seeds_of(&self, method: RmMethod) -> &[u64] {
        self.method_seeds
            .get(&method_name(method))
            .map_or(&self.seeds, Vec::as_slice)
    }

    /// Every seed any method runs with, ascending: runs go seed by seed, so that an unfinished
    /// sweep has every method on its first seeds.
    pub fn all_seeds(&self) -> Vec<u64> {
        let mut seeds: Vec<u64> = (self.methods.iter())
            .flat_map(|&m| self.seeds_of(m).iter().copied())
            .collect();
        seeds.sort_unstable();
        seeds.dedup();
        seeds
    }

    fn check(&self) -> Result<()> {
        let bad = |m: &str| Err(R2mError::Config(format!("experiment overopt: {m}")));
        if self.methods.is_empty() || self.seeds.is_empty() {
            return bad("methods and seeds must not be empty");
        }
        let names: Vec<String> = self.methods.iter().map(|&m| method_name(m)).collect();
        for (what, key) in (self.method_seeds.keys().map(|k| ("method_seeds", k)))
            .chain(self.method_set.keys().map(|k| ("method_set", k)))
        {
            if !names.contains(key) {
                return bad(&format!(
                    "{what}.{key}: `{key}` is not one of the methods ({})",
                    names.join(", ")
                ));
            }
        }
        if self.method_seeds.values().any(Vec::is_empty) {
            return bad("method_seeds: a method's seed list must not be empty");
        }
        if self.samples_per_prompt < 2 {
            return bad(
                "samples_per_prompt must be at least 2 (RLOO and the agreement need pairs)",
            );
        }
        if !(0.0..0.5).contains(&self.label_noise) {
            return bad("label_noise must be in [0, 0.5)");
        }
        if self.rm_pairs == 0 || self.rm_eval_pairs == 0 {
            return bad("rm_pairs and rm_eval_pairs must be positive");
        }
        Ok(())
    }
}

/// `EXP/runs/METHOD-seedS`.
pub fn run_dir(exp: &Path, method: RmMethod, seed: u64) -> PathBuf {
    exp.join("runs")
        .join(format!("{}-seed{seed}", method_name(method)))
}

// ---------------------------------------------------------------------------------------------
// Task: prompts
// ---------------------------------------------------------------------------------------------

/// Made-up film titles: the policy cannot know them, so its opinion is free text.
pub const FILMS: [&str; 40] = [
    "The Last Lighthouse",
    "Paper Moons",
    "A Winter in Lisbon",
    "Neon Harvest",
    "The Quiet Engine",
    "Salt and Iron",
    "Midnight at the Observatory",
    "The Glass Orchard",
    "Seven Borrowed Days",
    "River of Lanterns",
    "The Cartographer's Daughter",
    "Static Bloom",
    "Under the Copper Sky",
    "The Ninth Passenger",
    "Small Hours",
    "The Velvet Assembly",
    "Hollow Crown Motel",
    "Letters to Nobody",
    "The Weight of Feathers",
    "Distant Signals",
    "A House Made of Rain",
    "The Clockmaker's War",
    "Blue Line Express",
    "The Orchid Protocol",
    "Echoes of Marigold",
    "The Summer We Flew",
    "Iron Meadow",
    "The Forgotten Harbor",
    "Chasing Aurora",
    "The Paper Kingdom",
    "Silent Tides",
    "Brass Hearts",
    "The Long Way North",
    "Ember Street",
    "The Silver Fox Affair",
    "Ghosts of the Valley",
    "The Tin Astronomer",
    "Northern Lights Cafe",
    "Wild Geese Returning",
    "The Lantern Keeper",
];

const TEMPLATES: [&str; 4] = [
    "Write a short review of the movie \"{}\".",
    "What did you think of the film \"{}\"? Answer in two sentences.",
    "Give me your honest opinion of \"{}\".",
    "Describe the movie \"{}\" in a few sentences.",
];

/// Films of the held-out evaluation prompts ([`eval_prompts`]): in neither the RM's pairs nor
/// RL, so the evaluation measures the policy on prompts nothing was trained on.
pub const EVAL_FILMS: [&str; 8] = [
    "The Amber Staircase",
    "Harbor of Small Gods",
    "Tuesday's Comet",
    "The Pale Cartwheel",
    "Orchard of Mirrors",
    "The Last Ferry to Skye",
    "Dust on the Piano",
    "The Kestrel Letters",
];

/// Every template for each of `films`, film by film.
pub fn prompts_for(films: &[&str]) -> Vec<String> {
    films
        .iter()
        .flat_map(|f| TEMPLATES.iter().map(move |t| t.replace("{}", f)))
        .collect()
}

/// The RL prompts and the RM prompts: every template for each film, the films split in two
/// (the first 24 for the RM's pairs, the other 16 for RL), so the proxy is tested on new films.
pub fn film_prompts() -> (Vec<String>, Vec<String>) {
    (prompts_for(&FILMS[24..]), prompts_for(&FILMS[..24]))
}

/// The held-out evaluation prompts: every template for each of [`EVAL_FILMS`] (32 prompts).
pub fn eval_prompts() -> Vec<String> {
    prompts_for(&EVAL_FILMS)
}

// ---------------------------------------------------------------------------------------------
// Pairs from the initial policy, labelled by the gold reward
// ---------------------------------------------------------------------------------------------

/// One gold-labelled pair (a line of `rm-pairs.jsonl`; `r2m train-rm` reads `prompt`, `chosen`,
/// `rejected` and ignores the rest).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GoldPair {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
    pub gold_chosen: f64,
    pub gold_rejected: f64,
    /// The label was flipped by the label noise (`chosen` has the lower gold score).
    pub flipped: bool,
}

/// Sample two responses per prompt from `model` until `n` pairs with a gold difference of at
/// least `min_gap` are found (prompts cycle in a seeded order, each round with fresh samples).
/// Returns the pairs (gold labels, no noise) and the number of ties skipped.
#[allow(clippy::too_many_arguments)]
pub fn sample_gold_pairs<B: Backend>(
    model: &CausalLm<B>,
    tok: &Tokenizer,
    prompts: &[String],
    n: usize,
    max_new_tokens: usize,
    temperature: f64,
    min_gap: f64,
    seed: u64,
    gold: &mut Gold,
    observer: &dyn Observer,
) -> Result<(Vec<GoldPair>, usize)> {
    const BATCH: usize = 16;
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    let mut rng = StdRng::seed_from_u64(seed ^ 0x601d_9a12);
    let mut out = Vec::with_capacity(n);
    let mut ties = 0usize;
    observer.begin("gold pairs", n as u64, 0);
    let mut round = 0u64;
    while out.len() < n {
        if round >= 50 {
            return Err(R2mError::Other(format!(
                "sampled 50 rounds and found {} of {n} pairs whose gold scores differ by {min_gap} or more",
                out.len()
            )));
        }
        // Fisher-Yates with the experiment's rng.
        for i in (1..order.len()).rev() {
            order.swap(i, rng.random_range(0..=i));
        }
        for (c, chunk) in order.chunks(BATCH).enumerate() {
            if out.len() >= n {
                break;
            }
            let mut ids = Vec::with_capacity(2 * chunk.len());
            for &i in chunk {
                let p = tok.encode_user_turn(&prompts[i])?;
                ids.push(p.clone());
                ids.push(p);
            }
            let cfg = GenerationConfig {
                max_new_tokens,
                temperature: temperature as f32,
                seed: seed ^ (round << 32) ^ c as u64,
                ..Default::default()
            };
            let gens = generate(model, Some(tok), &ids, &cfg)?;
            let texts: Vec<String> = gens
                .iter()
                .map(|g| g.text.clone().unwrap_or_default())
                .collect();
            let items: Vec<(&str, &str)> = texts
                .iter()
                .enumerate()
                .map(|(r, t)| (prompts[chunk[r / 2]].as_str(), t.as_str()))
                .collect();
            let golds = gold.score(&items)?;
            for (k, &i) in chunk.iter().enumerate() {
                let (a, b) = (texts[2 * k].clone(), texts[2 * k + 1].clone());
                let (ga, gb) = (golds[2 * k], golds[2 * k + 1]);
                if (ga - gb).abs() < min_gap || a.trim().is_empty() || b.trim().is_empty() {
                    ties += 1;
                    continue;
                }
                let ((chosen, gc), (rejected, gr)) = if ga > gb {
                    ((a, ga), (b, gb))
                } else {
                    ((b, gb), (a, ga))
                };
                out.push(GoldPair {
                    prompt: prompts[i].clone(),
                    chosen,
                    rejected,
                    gold_chosen: gc,
                    gold_rejected: gr,
                    flipped: false,
                });
                observer.advance(1, "");
                if out.len() >= n {
                    break;
                }
            }
        }
        round += 1;
    }
    observer.end();
    Ok((out, ties))
}

/// Flip the label of each pair with probability `p` (seeded, [`label_noise_rows`]); returns how
/// many were flipped.
pub fn apply_label_noise(pairs: &mut [GoldPair], p: f64, seed: u64) -> usize {
    let rows = label_noise_rows(pairs.len(), p, seed);
    for &i in &rows {
        let pair = &mut pairs[i];
        std::mem::swap(&mut pair.chosen, &mut pair.rejected);
        std::mem::swap(&mut pair.gold_chosen, &mut pair.gold_rejected);
        pair.flipped = !pair.flipped;
    }
    rows.len()
}

// ---------------------------------------------------------------------------------------------
// Measuring against gold during RL
// ---------------------------------------------------------------------------------------------

/// The proxy's scale mapped onto gold's: `gold_mean + gold_std * (proxy - proxy_mean) /
/// proxy_std`, with both moments taken on the initial policy's held-out responses. The gap
/// `proxy_cal - gold` is then about 0 for the initial policy, and grows when the policy finds
/// what the proxy overrates.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    pub proxy_mean: f64,
    pub proxy_std: f64,
    pub gold_mean: f64,
    pub gold_std: f64,
    /// Responses the moments came from.
    pub responses: usize,
    /// Pearson correlation of proxy and gold on those responses.
    pub correlation: f64,
}

impl Calibration {
    /// From paired proxy and gold scores.
    pub fn fit(proxy: &[f64], gold: &[f64]) -> Self {
        let (mp, sp) = mean_std(proxy);
        let (mg, sg) = mean_std(gold);
        Self {
            proxy_mean: mp,
            proxy_std: sp,
            gold_mean: mg,
            gold_std: sg,
            responses: proxy.len(),
            correlation: r2m_rl::reward_training::pearson(proxy, gold),
        }
    }

    /// A proxy score on gold's scale.
    pub fn apply(&self, proxy: f64) -> f64 {
        self.gold_mean + self.gold_std * (proxy - self.proxy_mean) / self.proxy_std.max(1e-12)
    }
}

/// Population mean and standard deviation.
fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let m = v.iter().sum::<f64>() / n;
    (
        m,
        (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n).sqrt(),
    )
}

/// What [`GoldTracked`] measured in one RL step, reported as the step's diagnostics (so
/// flattened into `metrics.jsonl` under these names).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GoldStats {
    /// Mean and std of the gold reward (VADER compound) of the step's responses.
    pub gold_mean: f64,
    pub gold_std: f64,
    /// Mean proxy score on gold's scale ([`Calibration`]).
    pub proxy_cal_mean: f64,
    /// `proxy_cal_mean - gold_mean`.
    pub gold_gap: f64,
    /// Share of same-prompt response pairs (gold differing by at least `min_gold_gap`) that the
    /// reward orders as gold does, with the RM as it scored the step, and after its own update
    /// (equal to before for methods whose RM does not train).
    pub agree_before: Option<f64>,
    pub agree_after: Option<f64>,
    /// Pairs the agreement counts.
    pub agree_pairs: usize,
}

/// Share of pairs within each group of `k` rows ordered by `proxy` as by `gold`, over pairs
/// whose gold differs by at least `min_gap` (ties in the proxy count as half). `None` without
/// such pairs.
pub fn pairwise_agreement(
    k: usize,
    proxy: &[f32],
    gold: &[f64],
    min_gap: f64,
) -> (Option<f64>, usize) {
    let (mut agree, mut n) = (0.0, 0usize);
    for (p, g) in proxy.chunks(k).zip(gold.chunks(k)) {
        for i in 0..p.len() {
            for j in i + 1..p.len() {
                let dg = g[i] - g[j];
                if dg.abs() < min_gap {
                    continue;
                }
                let dp = (p[i] - p[j]) as f64;
                n += 1;
                agree += if dp == 0.0 {
                    0.5
                } else if dp.signum() == dg.signum() {
                    1.0
                } else {
                    0.0
                };
            }
        }
    }
    ((n > 0).then(|| agree / n as f64), n)
}

impl GoldStats {
    /// The stats as named diagnostics (`gold_mean`, `gold_std`, `proxy_cal_mean`, `gold_gap`,
    /// `agree_before`, `agree_after`, `agree_pairs`).
    pub fn to_diagnostics(&self) -> Diagnostics {
        let mut d = Diagnostics::default();
        d.set("gold_mean", self.gold_mean);
        d.set("gold_std", self.gold_std);
        d.set("proxy_cal_mean", self.proxy_cal_mean);
        d.set("gold_gap", self.gold_gap);
        d.set("agree_before", self.agree_before);
        d.set("agree_after", self.agree_after);
        d.set("agree_pairs", self.agree_pairs as f64);
        d
    }
}

/// Wraps the reward a run optimizes and measures it against the gold reward on every
/// experience, after the reward's own update. The policy only ever sees the inner reward's
/// scores.
pub struct GoldTracked<B: Backend> {
    pub inner: Box<dyn RolloutReward<B>>,
    pub calibration: Calibration,
    pub min_gap: f64,
    pub gold: Gold,
}

impl<B: Backend> GoldTracked<B> {
    pub fn new(inner: Box<dyn RolloutReward<B>>, calibration: Calibration, min_gap: f64) -> Self {
        Self {
            inner,
            calibration,
            min_gap,
            gold: Gold::Builtin(GoldKind::Vader, GoldConfig::default()),
        }
    }

    /// Measure against `gold`.
    pub fn with_gold(mut self, gold: Gold) -> Self {
        self.gold = gold;
        self
    }

    /// Gold, calibrated proxy and agreement of the scores the step was trained on.
    fn measure(&mut self, exp: &Experience<B>) -> Result<(GoldStats, Vec<f64>)> {
        let proxy = &exp.scores;
        let gold = gold_scores(exp, &mut self.gold)?;
        let cal: Vec<f64> = proxy
            .iter()
            .map(|&p| self.calibration.apply(p as f64))
            .collect();
        let (gold_mean, gold_std) = mean_std(&gold);
        let (proxy_cal_mean, _) = mean_std(&cal);
        let (agree, pairs) = pairwise_agreement(exp.k, proxy, &gold, self.min_gap);
        let stats = GoldStats {
            gold_mean,
            gold_std,
            proxy_cal_mean,
            gold_gap: proxy_cal_mean - gold_mean,
            agree_before: agree,
            agree_after: agree,
            agree_pairs: pairs,
        };
        Ok((stats, gold))
    }
}

impl<B: Backend> RolloutReward<B> for GoldTracked<B> {
    fn name(&self) -> String {
        format!(
            "{} [measured against gold: {}]",
            self.inner.name(),
            self.gold.name()
        )
    }

    fn wants_hidden(&self) -> bool {
        self.inner.wants_hidden()
    }

    fn score_experience(
        &mut self,
        exp: &Experience<B>,
        t: usize,
        total: usize,
    ) -> Result<Scored<B>> {
        self.inner.score_experience(exp, t, total)
    }

    fn update(
        &mut self,
        exp: &Experience<B>,
        refreshed_hidden: Option<&Tensor<B, 3>>,
        t: usize,
        total: usize,
    ) -> Result<Diagnostics> {
        let mut diagnostics = self.inner.update(exp, refreshed_hidden, t, total)?;
        let (mut stats, gold) = self.measure(exp)?;
        // The RM changed: score the same experience again to see whether it now agrees with
        // gold more (or less) often.
        if diagnostics.get("rm_loss").is_some() {
            let again = self.inner.score_experience(exp, t, total)?.scores;
            stats.agree_after = pairwise_agreement(exp.k, &again, &gold, self.min_gap).0;
        }
        diagnostics.extend(stats.to_diagnostics());
        Ok(diagnostics)
    }

    fn save_state(&self, dir: &Path) -> Result<()> {
        self.inner.save_state(dir)
    }

    fn load_state(&mut self, dir: &Path) -> Result<()> {
        self.inner.load_state(dir)
    }
}

// ---------------------------------------------------------------------------------------------
// The sweep
// ---------------------------------------------------------------------------------------------

/// The config of one run: everything equal across runs except `r2m.method` and the seed.
pub fn run_config(
    cfg: &OveroptConfig,
    exp: &Path,
    method: RmMethod,
    seed: u64,
) -> Result<RlConfig> {
    let mut c = RlConfig::default();
    c.model.policy = cfg.policy.clone();
    c.model.trainable = cfg.trainable;
    c.data.prompts = Some(exp.join("prompts-rl.jsonl"));
    c.data.max_prompt_len = 128;
    c.rollout.prompts_per_step = cfg.prompts_per_step;
    c.rollout.samples_per_prompt = cfg.samples_per_prompt;
    c.rollout.max_new_tokens = cfg.max_new_tokens;
    c.rollout.temperature = cfg.temperature as f32;
    c.reward.kind = RewardKind::Model;
    c.reward.model = Some(exp.join("proxy-rm"));
    c.algo.kl_coef = cfg.kl_coef;
    c.optim.lr = cfg.lr;
    c.optim.epochs = 2;
    let rows = cfg.prompts_per_step * cfg.samples_per_prompt;
    c.optim.mini_batch_size = (rows / 2).max(1);
    c.optim.micro_batch_size = c.optim.mini_batch_size.min(8);
    c.r2m.method = method;
    c.r2m.lr = cfg.r2m_lr;
    c.r2m.seed = seed;
    if method == RmMethod::PretrainedRm {
        c.r2m.pretrain_pairs = Some(exp.join("pretrain-pairs.jsonl"));
        c.r2m.pretrain_trainable = cfg.rm_trainable;
        c.r2m.pretrain_epochs = cfg.rm_epochs;
        c.r2m.pretrain_lr = cfg.rm_lr;
    }
    c.run.steps = cfg.steps;
    c.run.seed = seed;
    c.run.out = run_dir(exp, method, seed);
    c.run.log_samples = 4;
    c.run.save_final = SaveFinal::No;
    c.run.checkpoint_every = 2;
    c.run.keep_checkpoints = 1;
    let own = cfg.method_set.get(&method_name(method));
    c.with_overrides(&cfg.set)?
        .with_overrides(own.map_or(&[][..], Vec::as_slice))
}

/// How [`run_experiment`] is driven.
pub struct ExperimentControl<'a> {
    pub interrupt: Option<&'a AtomicBool>,
    /// Hears of the experiment's stages and every run's progress.
    pub observer: &'a dyn Observer,
}

impl Default for ExperimentControl<'_> {
    fn default() -> Self {
        Self {
            interrupt: None,
            observer: &SILENT,
        }
    }
}

/// What [`run_experiment`] did.
#[derive(Debug, Clone, Serialize)]
pub struct ExperimentSummary {
    pub dir: PathBuf,
    /// Runs finished now, and runs found finished.
    pub ran: Vec<String>,
    pub skipped: Vec<String>,
    /// Stopped by the interrupt flag (rerun the same command to continue).
    pub interrupted: bool,
    pub proxy_rm: ProxyRmInfo,
}

/// How good the proxy RM is, on held-out pairs from the initial policy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProxyRmInfo {
    pub train_pairs: usize,
    pub eval_pairs: usize,
    pub flipped_labels: usize,
    pub ties_skipped: usize,
    /// Held-out accuracy against gold labels, before and after training.
    pub accuracy_before: Option<f64>,
    pub accuracy_after: Option<f64>,
    pub calibration: Calibration,
}

/// Run (or continue) the whole experiment in `exp`: the proxy RM, then every run. The report
/// reads what the runs wrote ([`crate::report::report`]).
pub fn run_experiment<B: AutodiffBackend>(
    cfg: &OveroptConfig,
    exp: &Path,
    device: &B::Device,
    ctl: ExperimentControl<'_>,
) -> Result<ExperimentSummary> {
    cfg.check()?;
    std::fs::create_dir_all(exp).map_err(|e| R2mError::io(exp, e))?;
    let cfg_path = exp.join("experiment.toml");
    if cfg_path.exists() {
        let old = OveroptConfig::load(&cfg_path)?;
        if &old != cfg {
            return Err(R2mError::Config(format!(
                "{} holds an experiment with other settings ({}): continue it with `r2m experiment overopt --resume {}`, or choose another --out",
                exp.display(),
                config_diff(&old, cfg).join(", "),
                exp.display()
            )));
        }
    } else {
        write_atomic(&cfg_path, &cfg.to_toml())?;
    }
    let say = |m: String| ctl.observer.message(&m);

    // 1. Prompts.
    let (rl_prompts, rm_prompts) = film_prompts();
    let prompt_rows = |ps: &[String]| -> Vec<serde_json::Value> {
        ps.iter()
            .map(|p| serde_json::json!({ "prompt": p }))
            .collect()
    };
    write_jsonl(&exp.join("prompts-rl.jsonl"), &prompt_rows(&rl_prompts))?;
    write_jsonl(&exp.join("prompts-rm.jsonl"), &prompt_rows(&rm_prompts))?;
    let held_out: Vec<String> = eval_prompts().into_iter().take(cfg.eval_prompts).collect();
    write_jsonl(&exp.join("prompts-eval.jsonl"), &prompt_rows(&held_out))?;

    // 2. Gold-labelled pairs from the initial policy and the proxy RM.
    let proxy_rm = prepare_proxy_rm::<B>(cfg, exp, &rl_prompts, &rm_prompts, device, ctl.observer)?;

    // 3. The runs.
    let mut summary = ExperimentSummary {
        dir: exp.to_path_buf(),
        ran: Vec::new(),
        skipped: Vec::new(),
        interrupted: false,
        proxy_rm,
    };
    let total: usize = cfg.methods.iter().map(|&m| cfg.seeds_of(m).len()).sum();
    let mut i = 0;
    for seed in cfg.all_seeds() {
        for &method in &cfg.methods {
            if !cfg.seeds_of(method).contains(&seed) {
                continue;
            }
            i += 1;
            let name = format!("{}-seed{seed}", method_name(method));
            let dir = run_dir(exp, method, seed);
            if dir.join("done.json").exists() {
                summary.skipped.push(name);
                continue;
            }
            say(format!("run {i}/{total}: {name}"));
            let end = one_run::<B>(cfg, exp, method, seed, &summary.proxy_rm, device, &ctl)?;
            if end == RunEnd::Interrupted {
                summary.interrupted = true;
                say(format!(
                    "interrupted in {name}; continue with `r2m experiment overopt --resume {}`",
                    exp.display()
                ));
                return Ok(summary);
            }
            summary.ran.push(name);
        }
    }

    Ok(summary)
}

/// The names of the settings that differ.
fn config_diff(a: &OveroptConfig, b: &OveroptConfig) -> Vec<String> {
    let (Ok(toml::Value::Table(ta)), Ok(toml::Value::Table(tb))) =
        (toml::Value::try_from(a), toml::Value::try_from(b))
    else {
        return vec!["?".into()];
    };
    let mut keys: Vec<String> = ta
        .keys()
        .chain(tb.keys())
        .filter(|k| ta.get(*k) != tb.get(*k))
        .cloned()
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

fn prepare_proxy_rm<B: AutodiffBackend>(
    cfg: &OveroptConfig,
    exp: &Path,
    rl_prompts: &[String],
    rm_prompts: &[String],
    device: &B::Device,
    observer: &dyn Observer,
) -> Result<ProxyRmInfo> {
    let say = |m: String| observer.message(&m);
    let rm_dir = exp.join("proxy-rm");
    let info_path = rm_dir.join("proxy_rm.json");
    if info_path.exists() {
        let text = std::fs::read_to_string(&info_path).map_err(|e| R2mError::io(&info_path, e))?;
        say(format!("proxy RM: reusing {}", rm_dir.display()));
        return serde_json::from_str(&text)
            .map_err(|e| R2mError::format(&info_path, e.to_string()));
    }
    let loaded = load_model::<B>(&cfg.policy, device)?;
    let tok = loaded.tokenizer()?.clone();
    let policy = loaded.model.valid();
    let (train_p, eval_p, pre_p) = (
        exp.join("rm-pairs.jsonl"),
        exp.join("rm-eval-pairs.jsonl"),
        exp.join("pretrain-pairs.jsonl"),
    );
    let mut ties = 0;
    let mut flipped = 0;
    if !(train_p.exists() && eval_p.exists()) {
        let n = cfg.rm_pairs + cfg.rm_eval_pairs;
        say(format!(
            "sampling {n} gold-labelled pairs from the initial policy ({} prompts)",
            rm_prompts.len()
        ));
        let (mut pairs, t) = sample_gold_pairs(
            &policy,
            &tok,
            rm_prompts,
            n,
            cfg.max_new_tokens,
            cfg.temperature,
            cfg.min_gold_gap,
            cfg.data_seed,
            &mut new_gold(cfg)?,
            observer,
        )?;
        ties += t;
        let mut train = pairs.split_off(cfg.rm_eval_pairs);
        flipped = apply_label_noise(&mut train, cfg.label_noise, cfg.data_seed);
        write_jsonl(&eval_p, &pairs)?;
        write_jsonl(&train_p, &train)?;
    }
    if cfg.methods.contains(&RmMethod::PretrainedRm) && !pre_p.exists() {
        say(format!(
            "sampling {} gold-labelled pairs on the RL prompts (pretrained-rm control)",
            cfg.pretrain_pairs
        ));
        let (mut pairs, t) = sample_gold_pairs(
            &policy,
            &tok,
            rl_prompts,
            cfg.pretrain_pairs,
            cfg.max_new_tokens,
            cfg.temperature,
            cfg.min_gold_gap,
            cfg.data_seed ^ 0x9e37,
            &mut new_gold(cfg)?,
            observer,
        )?;
        ties += t;
        apply_label_noise(&mut pairs, cfg.label_noise, cfg.data_seed ^ 0x9e37);
        write_jsonl(&pre_p, &pairs)?;
    }

    let opts = ReadOptions::default();
    let (train, _) = read_preferences(&train_p, opts)?;
    let (eval, _) = read_preferences(&eval_p, opts)?;
    let (train, _) = tokenize_pairs(&tok, &train, 512)?;
    let (eval, _) = tokenize_pairs(&tok, &eval, 512)?;
    say(format!(
        "proxy RM: Bradley-Terry ({}) on {} pairs, {} held out",
        cfg.rm_trainable,
        train.len(),
        eval.len()
    ));
    let rm = RewardModel::from_backbone(loaded.model, cfg.data_seed);
    let rm_cfg = RmTrainConfig {
        trainable: cfg.rm_trainable,
        epochs: cfg.rm_epochs,
        lr: cfg.rm_lr,
        seed: cfg.data_seed,
        ..Default::default()
    };
    let outputs = RmOutputs {
        dir: &rm_dir,
        tokenizer: Some(&tok),
        head_only_base: None,
        observer,
    };
    let (rm, s) = train_reward_model(rm, &train, &eval, &rm_cfg, outputs)?;

    let mut learned = LearnedRm {
        model: rm.valid(),
        tokenizer: Some(tok.clone()),
        token_budget: 4096,
        name: "proxy".into(),
    };
    let calibration = calibrate(&mut learned, &eval_p)?;
    let info = ProxyRmInfo {
        train_pairs: s.train_pairs,
        eval_pairs: s.eval_pairs,
        flipped_labels: flipped,
        ties_skipped: ties,
        accuracy_before: s.eval_before.as_ref().map(|e| e.accuracy),
        accuracy_after: s.eval_after.as_ref().map(|e| e.accuracy),
        calibration,
    };
    say(format!(
        "proxy RM: held-out accuracy against gold {:.3} -> {:.3}; proxy-gold correlation {:+.3}",
        info.accuracy_before.unwrap_or(f64::NAN),
        info.accuracy_after.unwrap_or(f64::NAN),
        info.calibration.correlation
    ));
    write_atomic(
        &info_path,
        &serde_json::to_string_pretty(&info).expect("json"),
    )?;
    Ok(info)
}

/// [`Calibration`] of `rm` on the held-out pairs' responses (the initial policy's), scored
/// exactly as the RL loop scores them.
pub fn calibrate<B: Backend>(rm: &mut LearnedRm<B>, eval_pairs: &Path) -> Result<Calibration> {
    let golds = read_gold_pairs(eval_pairs)?;
    // A string prompt is one user message, as `read_preferences` reads it for training.
    let prompts: Vec<Prompt> = golds.iter().map(|p| Prompt::user(&p.prompt)).collect();
    let mut inputs = Vec::new();
    let mut gold = Vec::new();
    for (g, pr) in golds.iter().zip(&prompts) {
        for (text, gv) in [(&g.chosen, g.gold_chosen), (&g.rejected, g.gold_rejected)] {
            inputs.push(RewardInput {
                prompt: pr,
                response: &[],
                text: Some(text.as_str()),
                finish: r2m_models::generate::FinishReason::Eos,
            });
            gold.push(gv);
        }
    }
    let proxy: Vec<f64> = rm.score(&inputs)?.into_iter().map(f64::from).collect();
    Ok(Calibration::fit(&proxy, &gold))
}

fn read_gold_pairs(path: &Path) -> Result<Vec<GoldPair>> {
    read_jsonl(path)
}

#[allow(clippy::too_many_arguments)]
fn one_run<B: AutodiffBackend>(
    cfg: &OveroptConfig,
    exp: &Path,
    method: RmMethod,
    seed: u64,
    proxy: &ProxyRmInfo,
    device: &B::Device,
    ctl: &ExperimentControl<'_>,
) -> Result<RunEnd> {
    let rc = run_config(cfg, exp, method, seed)?;
    let dir = rc.run.out.clone();
    let resume = !list_checkpoints(&dir)?.is_empty();
    if !resume && dir.exists() {
        // Started but no checkpoint yet: start over.
        std::fs::remove_dir_all(&dir).map_err(|e| R2mError::io(&dir, e))?;
    }
    B::seed(device, seed);
    let loaded = load_model::<B>(&rc.model.policy, device)?;
    let tok = loaded.tokenizer()?.clone();
    let prompts = load_prompts(
        rc.data
            .prompts
            .as_deref()
            .expect("run_config sets data.prompts"),
        ReadOptions {
            skip_bad: rc.data.skip_bad,
            limit: rc.data.limit,
        },
        rc.data.max_prompt_len,
        &tok,
        ctl.observer,
    )?;
    let d_p = loaded.model.config.hidden_size;
    let inner: Box<dyn RolloutReward<B::InnerBackend>> = if method == RmMethod::Oracle {
        let rm = LearnedRm::<B::InnerBackend>::load(&exp.join("proxy-rm"), 4096, device)?;
        Box::new(crate::oracle::OracleReward {
            inner: R2mReward::<B>::new(rm, d_p, rc.r2m.clone()),
            gold: new_gold(cfg)?,
            every: cfg.oracle_every,
            min_gap: cfg.min_gold_gap,
            epochs: cfg.oracle_epochs,
        })
    } else {
        reward_from_config::<B>(&rc, d_p, resume, device, ctl.observer)?
    };
    // The pretrained-rm control starts from a fine-tuned RM: its own scale.
    let calibration = if method == RmMethod::PretrainedRm {
        let mut rm = LearnedRm::<B::InnerBackend>::load(&dir.join("pretrained-rm"), 4096, device)?;
        calibrate(&mut rm, &exp.join("rm-eval-pairs.jsonl"))?
    } else {
        proxy.calibration
    };
    let mut reward =
        GoldTracked::new(inner, calibration, cfg.min_gold_gap).with_gold(new_gold(cfg)?);
    let max_prompt_len = rc.data.max_prompt_len;
    let steps = rc.run.steps;
    let mut trainer = RlTrainer::new(loaded.model, Some(tok.clone()), rc)?;

    // The held-out curve: before the first step, every `eval_every` steps and after the last,
    // scored by the fixed proxy (not the run's own, possibly adapted, reward).
    let mut held_out = None;
    if cfg.eval_every > 0 {
        let opts = ReadOptions::default();
        let path = exp.join("prompts-eval.jsonl");
        let prompts = load_prompts(&path, opts, max_prompt_len, &tok, &SILENT)?;
        let proxy_rm = LearnedRm::<B::InnerBackend>::load(&exp.join("proxy-rm"), 4096, device)?;
        let newest = list_checkpoints(&dir)?.last().cloned();
        std::fs::create_dir_all(&dir).map_err(|e| R2mError::io(&dir, e))?;
        let log = HeldOutLog::open(
            &dir.join("heldout.jsonl"),
            newest.as_ref().map_or(0, |c| c.0),
        )?;
        held_out = Some((prompts, proxy_rm, log, new_gold(cfg)?));
    }
    let due =
        |step: usize| cfg.eval_every > 0 && (step.is_multiple_of(cfg.eval_every) || step == steps);
    let mut evaluate = |t: &RlTrainer<B>| -> Result<()> {
        let Some((prompts, proxy_rm, log, gold)) = held_out.as_mut() else {
            return Ok(());
        };
        if !due(t.step) || log.has(t.step)? {
            return Ok(());
        }
        let s = evaluate_policy(t, prompts, proxy_rm, gold, EVAL_SEED ^ t.step as u64)?;
        log.append(&s)
    };
    // Step 0, or the step a resumed run continues from when its evaluation was lost.
    if let Some((step, ck)) = list_checkpoints(&dir)?.last().cloned().filter(|_| resume) {
        if due(step) {
            trainer.load_checkpoint(&ck)?;
        }
    }
    evaluate(&trainer)?;
    let mut hook = |_: &StepMetrics, t: &RlTrainer<B>| evaluate(t);
    let s = train_with(
        &mut trainer,
        &prompts,
        &mut reward,
        RunControl {
            out: Some(&dir),
            resume,
            interrupt: ctl.interrupt,
            observer: ctl.observer,
            after_step: Some(&mut hook),
        },
    )?;
    if s.end != RunEnd::Interrupted {
        write_atomic(
            &dir.join("done.json"),
            &serde_json::to_string_pretty(&s).expect("json"),
        )?;
        // The metrics are what the report needs; the checkpoints (hundreds of MB each) go.
        let ck = dir.join("checkpoints");
        if ck.exists() {
            std::fs::remove_dir_all(&ck).map_err(|e| R2mError::io(&ck, e))?;
        }
    }
    Ok(s.end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_get_their_own_seeds_and_overrides() {
        let toml = r#"
methods = ["vanilla", "r2m", "oracle"]
seeds = [0, 1, 2, 3]
[method_seeds]
oracle = [0, 1]
[method_set]
r2m = ["r2m.lr=1e-3"]
"#;
        let cfg: OveroptConfig = toml::from_str(toml).unwrap();
        cfg.check().unwrap();
        assert_eq!(cfg.seeds_of(RmMethod::Oracle), &[0, 1]);
        assert_eq!(cfg.seeds_of(RmMethod::R2m), &[0, 1, 2, 3]);
        assert_eq!(cfg.all_seeds(), vec![0, 1, 2, 3]);
        let exp = Path::new("/tmp/exp");
        let lr = |m| run_config(&cfg, exp, m, 0).unwrap().r2m.lr;
        assert_eq!(lr(RmMethod::R2m), 1e-3);
        assert_eq!(lr(RmMethod::Oracle), cfg.r2m_lr);
        // It survives experiment.toml.
        assert_eq!(
            toml::from_str::<OveroptConfig>(&cfg.to_toml()).unwrap(),
            cfg
        );
        let bad: OveroptConfig =
            toml::from_str(&toml.replace("oracle = [0, 1]", "iterative-head = [0]")).unwrap();
        let e = bad.check().unwrap_err().to_string();
        assert!(e.contains("method_seeds.iterative-head"), "{e}");
    }

    #[test]
    fn the_committed_experiment_configs_parse_and_pass_the_check() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/overopt");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let text = std::fs::read_to_string(&path).unwrap();
                let cfg: OveroptConfig =
                    toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                cfg.check()
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                n += 1;
            }
        }
        assert!(
            n >= 3,
            "regime, tune and sweep configs in {}",
            dir.display()
        );
        // The sweep with the picks scripts/overopt_pick.py appends.
        let sweep = std::fs::read_to_string(dir.join("sweep.toml")).unwrap()
            + "\n[method_set]\nr2m = [\"r2m.lr=0.001\"]\niterative-head = [\"r2m.lr=0.0001\"]\n";
        let cfg: OveroptConfig = toml::from_str(&sweep).unwrap();
        cfg.check().unwrap();
        assert_eq!(cfg.seeds_of(RmMethod::R2m).len(), 5);
        assert_eq!(cfg.seeds_of(RmMethod::Oracle).len(), 3);
        let lr = |m| {
            run_config(&cfg, Path::new("/tmp/exp"), m, 0)
                .unwrap()
                .r2m
                .lr
        };
        assert_eq!(lr(RmMethod::R2m), 1e-3);
        assert_eq!(lr(RmMethod::IterativeHead), 1e-4);
    }

    #[test]
    fn agreement_counts_pairs_within_groups_only() {
        // Two groups of 3. Group 1: proxy agrees on all 3 pairs; group 2: on 1 of 3.
        let proxy = [3.0, 2.0, 1.0, 1.0, 2.0, 3.0];
        let gold = [0.9, 0.5, 0.1, 0.8, 0.5, 0.6];
        let (a, n) = pairwise_agreement(3, &proxy, &gold, 0.05);
        assert_eq!(n, 6);
        // Group 2 pairs: (0.8,0.5): proxy 1<2 disagrees; (0.8,0.6): disagrees; (0.5,0.6): agrees.
        assert!((a.unwrap() - 4.0 / 6.0).abs() < 1e-12);
        // Gold ties are not counted; proxy ties count half.
        let (a, n) = pairwise_agreement(2, &[1.0, 1.0, 0.0, 5.0], &[0.5, 0.1, 0.3, 0.31], 0.05);
        assert_eq!((a, n), (Some(0.5), 1));
        assert_eq!(
            pairwise_agreement(2, &[1.0, 2.0], &[0.2, 0.2], 0.05),
            (None, 0)
        );
    }

    #[test]
    fn calibration_maps_moments() {
        let proxy = [1.0, 3.0, 5.0];
        let gold = [0.0, 0.2, 0.4];
        let c = Calibration::fit(&proxy, &gold);
        assert!((c.apply(3.0) - 0.2).abs() < 1e-12);
        assert!((c.apply(5.0) - 0.4).abs() < 1e-12);
        assert!((c.correlation - 1.0).abs() < 1e-12);
    }

    #[test]
    fn label_noise_swaps_replies_and_their_gold_scores() {
        let pair = GoldPair {
            prompt: "p".into(),
            chosen: "good".into(),
            rejected: "bad".into(),
            gold_chosen: 0.5,
            gold_rejected: -0.5,
            flipped: false,
        };
        let mut pairs = vec![pair; 200];
        let n = apply_label_noise(&mut pairs, 0.3, 7);
        let flipped: Vec<&GoldPair> = pairs.iter().filter(|p| p.flipped).collect();
        assert!(n > 0 && flipped.len() == n);
        assert!(flipped
            .iter()
            .all(|p| p.chosen == "bad" && p.gold_chosen < p.gold_rejected));
    }

    #[test]
    fn prompts_split_films_between_rm_and_rl() {
        let (rl, rm) = film_prompts();
        assert_eq!((rl.len(), rm.len()), (64, 96));
        assert!(rl.iter().all(|p| !rm.contains(p)));
        assert!(rl.iter().all(|p| !p.contains("{}")));
    }

    #[test]
    fn reduced_config_round_trips_through_toml() {
        let c = OveroptConfig::reduced();
        let back: OveroptConfig = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back, c);
        let d = config_diff(&c, &OveroptConfig::default());
        assert!(d.contains(&"steps".to_string()), "{d:?}");
        assert!(!d.contains(&"policy".to_string()));
    }
}
