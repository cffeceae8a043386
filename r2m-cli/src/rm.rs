//! `r2m train-rm` and `r2m eval-rm`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use r2m_core::{R2mError, Result};
use r2m_data::{read_preferences, tokenize_pairs, train_eval_split, ReadOptions, TokenizedPair};
use r2m_models::lora::{LoraConfig, LoraTarget};
use r2m_models::{load_model, RewardModel, Tokenizer};
use r2m_rl::reward::check_same_tokenizer;
use r2m_rl::reward_training::summarize;
use r2m_rl::{
    rm_rewards, train_reward_model, LearnedRm, R2mReward, RmOutputs, RmTrainConfig, Trainable,
};

use crate::backends::BackendTask;

/// Which pairs of a file to use: the seeded split shared by `train-rm` and `eval-rm`.
#[derive(clap::Args, Debug, Clone)]
pub struct DataArgs {
    /// Preference pairs: `.jsonl` or `.jsonl.gz` (HH-RLHF or `{prompt, chosen, rejected}`).
    #[arg(long)]
    data: PathBuf,
    /// Skip bad lines (counted and reported) instead of stopping at the first one.
    #[arg(long)]
    skip_bad: bool,
    /// Hold out this many pairs of `--data` (seeded shuffle) for evaluation.
    #[arg(long, default_value_t = 0)]
    eval_count: usize,
    /// Seed of the train/eval split.
    #[arg(long, default_value_t = 0)]
    split_seed: u64,
    /// Longest sequence in tokens (prompt + reply); see the truncation policy in the README.
    #[arg(long, default_value_t = 512)]
    max_len: usize,
}

impl DataArgs {
    /// Read and split; returns `(train, eval)` in the file's terms.
    fn read(&self) -> Result<(Vec<r2m_data::PreferencePair>, Vec<r2m_data::PreferencePair>)> {
        let opts = ReadOptions {
            skip_bad: self.skip_bad,
            limit: None,
        };
        let (pairs, report) = read_preferences(&self.data, opts)?;
        eprintln!("{report}");
        Ok(train_eval_split(pairs, self.eval_count, self.split_seed))
    }
}

fn tokenize(
    tok: &Tokenizer,
    pairs: &[r2m_data::PreferencePair],
    max_len: usize,
    what: &str,
    data: &Path,
) -> Result<Vec<TokenizedPair>> {
    let (out, report) = tokenize_pairs(tok, pairs, max_len)
        .map_err(|e| R2mError::Other(format!("{}: {e}", data.display())))?;
    eprintln!("{what}: {report} (max_len {max_len})");
    Ok(out)
}

/// Load a reward model: an HF sequence-classification directory as it is, or any causal LM
/// (`smollm2`, HF directory, GGUF) with a fresh scoring head.
fn load_rm<B: Backend>(
    spec: &str,
    seed: u64,
    device: &B::Device,
) -> Result<(RewardModel<B>, Tokenizer)> {
    let dir = Path::new(spec);
    let cfg = dir.join("config.json");
    let is_rm = std::fs::read_to_string(&cfg)
        .map(|t| t.contains("ForSequenceClassification"))
        .unwrap_or(false);
    if r2m_models::reward::is_head_only_dir(dir) {
        let base = RewardModel::<B>::head_only_base(dir)?;
        crate::fetch_if_default(&base)?;
        let loaded = load_model::<B>(&base, device)?;
        let tok = loaded.tokenizer()?.clone();
        eprintln!("loaded reward head {spec} on base {base}");
        Ok((RewardModel::load_head_only(dir, loaded.model)?, tok))
    } else if is_rm {
        let rm = RewardModel::load_hf_dir(dir, device)?;
        let tok = Tokenizer::from_hf_dir(dir)?;
        eprintln!("loaded reward model {spec}");
        Ok((rm, tok))
    } else {
        let loaded = load_model::<B>(spec, device)?;
        let tok = loaded.tokenizer()?.clone();
        eprintln!("loaded {spec}; new scoring head (seed {seed})");
        Ok((RewardModel::from_backbone(loaded.model, seed), tok))
    }
}

#[derive(clap::Args, Debug)]
pub struct TrainRmArgs {
    /// Base model (`smollm2`, HF directory, .gguf) or an existing reward-model directory.
    #[arg(long, default_value = "smollm2")]
    model: String,
    #[command(flatten)]
    data: DataArgs,
    /// Use only the first N training pairs of the split.
    #[arg(long)]
    train_count: Option<usize>,
    /// Flip the label (swap chosen and rejected) of this share of the training pairs, seeded by
    /// `--seed`: a noisier annotator, e.g. for over-optimization studies. Held-out pairs keep
    /// their labels.
    #[arg(long, default_value_t = 0.0)]
    label_noise: f64,
    /// Output directory: the final RM (HF layout), metrics.jsonl, eval.json, checkpoints.
    #[arg(long)]
    out: PathBuf,
    /// What trains: `head`, `top:N` (top N blocks + final norm + head), `all`, or `lora`
    /// (LoRA adapters as the `--lora-*` flags say, plus the head; the rest frozen).
    #[arg(long, default_value = "top:2")]
    trainable: Trainable,
    /// `--trainable lora`: the adapters' rank r.
    #[arg(long, default_value_t = 8)]
    lora_r: usize,
    /// `--trainable lora`: alpha (the update is scaled by alpha / r).
    #[arg(long, default_value_t = 16.0)]
    lora_alpha: f64,
    /// `--trainable lora`: the projections that get adapters, comma-separated, of
    /// `q,k,v,o,gate,up,down`.
    #[arg(long, value_delimiter = ',', default_value = "q,k,v,o,gate,up,down")]
    lora_targets: Vec<String>,
    /// `--trainable lora`: `all` or `top:N` (adapters on the top N blocks only; the frozen
    /// trunk's features are computed once).
    #[arg(long, default_value = "all")]
    lora_layers: String,
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    #[arg(long, default_value_t = 0.05)]
    warmup_ratio: f64,
    /// The cosine decays to lr * this.
    #[arg(long, default_value_t = 0.1)]
    min_lr_ratio: f64,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Padded tokens per micro-batch (both replies of every pair).
    #[arg(long, default_value_t = 4096)]
    token_budget: usize,
    /// Seed of the head initialisation and of batch order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Evaluate every N optimizer steps (0: at the end only).
    #[arg(long, default_value_t = 0)]
    eval_every: usize,
    /// Checkpoint every N optimizer steps (0: at the end only).
    #[arg(long, default_value_t = 0)]
    save_every: usize,
}

pub struct TrainRmTask(pub TrainRmArgs);

/// The adapters of `--trainable lora`; errors name the flag.
fn lora_config(a: &TrainRmArgs) -> Result<LoraConfig> {
    let inner = |e: R2mError| match e {
        R2mError::Config(m) => m,
        e => e.to_string(),
    };
    let flag = |name: &str, e: R2mError| R2mError::Config(format!("{name}: {}", inner(e)));
    let targets = a
        .lora_targets
        .iter()
        .map(|t| t.trim().parse::<LoraTarget>())
        .collect::<Result<Vec<_>>>()
        .map_err(|e| flag("--lora-targets", e))?;
    let cfg = LoraConfig {
        r: a.lora_r,
        alpha: a.lora_alpha,
        targets,
        layers: a
            .lora_layers
            .parse()
            .map_err(|e| flag("--lora-layers", e))?,
        seed: a.seed,
        ..Default::default()
    };
    cfg.validate()
        .map_err(|e| R2mError::Config(inner(e).replace("lora.", "--lora-")))?;
    Ok(cfg)
}

impl BackendTask for TrainRmTask {
    fn run<B: Backend>(self, device: B::Device, backend: &str) -> Result<()> {
        let a = self.0;
        eprintln!("backend: {backend}");
        let cfg = RmTrainConfig {
            trainable: a.trainable,
            epochs: a.epochs,
            lr: a.lr,
            warmup_ratio: a.warmup_ratio,
            min_lr_ratio: a.min_lr_ratio,
            weight_decay: a.weight_decay,
            max_grad_norm: a.max_grad_norm,
            grad_accum: a.grad_accum,
            token_budget: a.token_budget,
            seed: a.seed,
            eval_every: a.eval_every,
            save_every: a.save_every,
            lora: (a.trainable == Trainable::Lora)
                .then(|| lora_config(&a))
                .transpose()?,
        };
        let (mut train, eval) = a.data.read()?;
        if let Some(n) = a.train_count {
            train.truncate(n);
        }
        if !(0.0..=1.0).contains(&a.label_noise) {
            return Err(R2mError::Config(format!(
                "--label-noise must be in [0, 1], got {}",
                a.label_noise
            )));
        }
        let flipped = r2m_data::label_noise_rows(train.len(), a.label_noise, a.seed);
        for &i in &flipped {
            let p = &mut train[i];
            std::mem::swap(&mut p.chosen, &mut p.rejected);
        }
        if a.label_noise > 0.0 {
            eprintln!(
                "label noise {}: {} of {} training labels flipped",
                a.label_noise,
                flipped.len(),
                train.len()
            );
        }
        let t0 = Instant::now();
        let (rm, tok) = load_rm::<Autodiff<B>>(&a.model, a.seed, &device)?;
        eprintln!("model loaded in {:.1}s", t0.elapsed().as_secs_f64());
        let train = tokenize(&tok, &train, a.data.max_len, "train", &a.data.data)?;
        let eval = tokenize(&tok, &eval, a.data.max_len, "eval", &a.data.data)?;
        let term = crate::progress::Terminal::new();
        let out = RmOutputs {
            dir: &a.out,
            tokenizer: Some(&tok),
            head_only_base: None,
            observer: &term,
        };
        let (_, summary) = train_reward_model(rm, &train, &eval, &cfg, out)?;
        eprintln!(
            "{} steps; frozen features {:.0}s, training {:.0}s",
            summary.steps, summary.feature_seconds, summary.train_seconds
        );
        if let Some(e) = &summary.eval_before {
            println!("before: {e}");
        }
        if let Some(e) = &summary.eval_after {
            println!("after:  {e}");
        }
        println!("saved {}", a.out.display());
        Ok(())
    }
}

#[derive(clap::Args, Debug)]
pub struct EvalRmArgs {
    /// Reward-model directory (HF sequence-classification layout).
    #[arg(long)]
    rm: String,
    #[command(flatten)]
    data: DataArgs,
    /// Evaluate the held-out part of the split only (what `train-rm --eval-count` held out);
    /// without it, every pair of `--data`.
    #[arg(long)]
    held_out_only: bool,
    /// Padded tokens per batch.
    #[arg(long, default_value_t = 4096)]
    token_budget: usize,
    /// Also write the metrics as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write one JSON line per pair (line, token ids, both rewards) to this file, e.g. for
    /// `scripts/reference/check_rm.py check`.
    #[arg(long)]
    scores: Option<PathBuf>,
    /// Score with R2M's policy feedback (the paper's Table 3): the policy whose hidden states feed
    /// the fusion head (`smollm2`, an HF directory such as a run's `final/`, or a .gguf file).
    #[arg(long, requires = "r2m")]
    policy: Option<String>,
    /// The saved R2M state (a run's `r2m/` directory); rewards use w = Omega (t = T).
    #[arg(long, requires = "policy")]
    r2m: Option<PathBuf>,
    /// A PEFT LoRA adapter for `--policy` (a LoRA run's `RUN/adapter/`), merged into it.
    #[arg(long, value_name = "DIR", requires = "policy")]
    adapter: Option<PathBuf>,
}

pub struct EvalRmTask(pub EvalRmArgs);

impl BackendTask for EvalRmTask {
    fn run<B: Backend>(self, device: B::Device, backend: &str) -> Result<()> {
        let a = self.0;
        eprintln!("backend: {backend}");
        let (rm, tok) = load_rm::<B>(&a.rm, 0, &device)?;
        let (train, eval) = a.data.read()?;
        let pairs = if a.held_out_only {
            eval
        } else {
            train.into_iter().chain(eval).collect()
        };
        let pairs = tokenize(&tok, &pairs, a.data.max_len, "eval", &a.data.data)?;
        let t0 = Instant::now();
        let (chosen, rejected) = match (&a.policy, &a.r2m) {
            (Some(policy), Some(state)) => {
                let loaded = load_model::<B>(policy, &device)?;
                if let Some(ptok) = &loaded.tokenizer {
                    check_same_tokenizer(&tok, ptok)
                        .map_err(|e| R2mError::Config(format!("--policy {policy}: {e}")))?;
                }
                let policy = match &a.adapter {
                    Some(dir) => r2m_models::lora::merge_adapters(
                        r2m_models::lora::load_peft_adapter(loaded.model, dir)?,
                    ),
                    None => loaded.model,
                };
                let info = R2mReward::<Autodiff<B>>::read_info(state)?;
                let learned = LearnedRm {
                    model: rm,
                    tokenizer: None,
                    token_budget: a.token_budget,
                    name: a.rm.clone(),
                };
                let mut r2m =
                    R2mReward::<Autodiff<B>>::new(learned, policy.config.hidden_size, info.config);
                r2m.load_state(state)?;
                eprintln!(
                    "R2M ({} RM updates), policy feedback at w = Omega = {}",
                    info.updates, r2m.cfg.omega
                );
                let c: Vec<Vec<u32>> = pairs.iter().map(|p| p.chosen_ids()).collect();
                let r: Vec<Vec<u32>> = pairs.iter().map(|p| p.rejected_ids()).collect();
                let term = crate::progress::Terminal::new();
                (
                    r2m.score_with_policy(&policy, &c, &term),
                    r2m.score_with_policy(&policy, &r, &term),
                )
            }
            _ => rm_rewards(
                &rm,
                &pairs,
                a.token_budget,
                &crate::progress::Terminal::new(),
            ),
        };
        eprintln!("scored in {:.1}s", t0.elapsed().as_secs_f64());
        let e = summarize(&pairs, &chosen, &rejected);
        if let Some(path) = &a.scores {
            let mut text = String::new();
            for (i, p) in pairs.iter().enumerate() {
                let line = serde_json::json!({
                    "line": p.line,
                    "chosen_ids": p.chosen_ids(),
                    "rejected_ids": p.rejected_ids(),
                    "chosen": chosen[i],
                    "rejected": rejected[i],
                });
                text.push_str(&line.to_string());
                text.push('\n');
            }
            std::fs::write(path, text).map_err(|err| R2mError::io(path, err))?;
        }
        println!("{e}");
        let json = serde_json::to_string(&e).expect("json");
        println!("{json}");
        if let Some(p) = &a.json {
            std::fs::write(p, &json).map_err(|err| R2mError::io(p, err))?;
        }
        Ok(())
    }
}
