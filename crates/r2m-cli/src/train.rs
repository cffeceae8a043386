//! `r2m train --config run.toml`: RL on a policy with a learned or rule reward.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use r2m_core::{R2mError, Result};
use r2m_data::{read_prompts, ReadOptions};
use r2m_models::{load_model, Tokenizer};
use r2m_rl::config::{RewardKind, RmMethod};
use r2m_rl::{train, LearnedRm, Prompt, R2mReward, RlConfig, RlTrainer, RolloutReward, RuleReward};

use crate::backends::BackendTask;

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// The run's TOML config (every key: `configs/rl-default.toml`).
    #[arg(long)]
    config: PathBuf,
    /// Override `run.steps`.
    #[arg(long)]
    steps: Option<usize>,
    /// Override `run.out`.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Override `run.seed`.
    #[arg(long)]
    seed: Option<u64>,
}

impl TrainArgs {
    fn config(&self) -> Result<RlConfig> {
        let mut cfg = RlConfig::load(&self.config)?;
        if let Some(s) = self.steps {
            cfg.run.steps = s;
        }
        if let Some(o) = &self.out {
            cfg.run.out = o.clone();
        }
        if let Some(s) = self.seed {
            cfg.run.seed = s;
        }
        Ok(cfg)
    }
}

/// Read the prompts of `cfg.data`, render them with the chat template (ending with the generation
/// prompt) and drop those longer than `max_prompt_len` tokens.
pub fn load_prompts(cfg: &RlConfig, tok: &Tokenizer) -> Result<Vec<Prompt>> {
    let path: &Path = cfg
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

pub struct TrainTask(pub TrainArgs);

impl BackendTask for TrainTask {
    fn run<B: Backend>(self, device: B::Device, backend: &str) -> Result<()> {
        let cfg = self.0.config()?;
        eprintln!("backend: {backend}");
        B::seed(&device, cfg.run.seed);
        let t0 = Instant::now();
        let loaded = load_model::<Autodiff<B>>(&cfg.model.policy, &device)?;
        let tok = loaded.tokenizer()?.clone();
        eprintln!(
            "policy {} loaded in {:.1}s",
            cfg.model.policy,
            t0.elapsed().as_secs_f64()
        );
        let prompts = load_prompts(&cfg, &tok)?;
        let out = cfg.run.out.clone();
        let mut reward: Box<dyn RolloutReward<B>> = match cfg.reward.kind {
            RewardKind::Model => {
                let dir = cfg.reward.model.as_deref().expect("validated");
                let rm = if cfg.r2m.method == RmMethod::PretrainedRm {
                    pretrain_rm::<B>(&cfg, dir, &out, &device)?
                } else {
                    LearnedRm::<B>::load(dir, cfg.reward.token_budget, &device)?
                };
                if matches!(cfg.r2m.method, RmMethod::Vanilla | RmMethod::PretrainedRm) {
                    Box::new(rm)
                } else {
                    let d_p = loaded.model.config.hidden_size;
                    Box::new(R2mReward::<Autodiff<B>>::new(rm, d_p, cfg.r2m.clone()))
                }
            }
            RewardKind::Rule => Box::new(
                cfg.reward
                    .rule
                    .as_deref()
                    .expect("validated")
                    .parse::<RuleReward>()?,
            ),
        };
        let mut trainer = RlTrainer::new(loaded.model, Some(tok), cfg)?;
        let summary = train(&mut trainer, &prompts, reward.as_mut(), Some(&out))?;
        if let (Some(f), Some(l)) = (&summary.first, &summary.last) {
            println!(
                "{} steps in {:.0}s: reward {:+.4} -> {:+.4}, KL {:.4} -> {:.4}, length {:.1} -> {:.1}",
                summary.steps,
                summary.seconds,
                f.reward_mean,
                l.reward_mean,
                f.kl,
                l.kl,
                f.response_len,
                l.response_len
            );
        }
        println!("wrote {}", out.display());
        Ok(())
    }
}

/// The "Pretrained RM" control: fine-tune the RM with Bradley-Terry on `r2m.pretrain_pairs`
/// before RL (written to `RUN/pretrained-rm/`), then use it frozen.
fn pretrain_rm<B: Backend>(
    cfg: &RlConfig,
    rm_dir: &Path,
    out: &Path,
    device: &B::Device,
) -> Result<LearnedRm<B>> {
    use burn::module::AutodiffModule;
    use r2m_data::{read_preferences, tokenize_pairs};
    use r2m_models::RewardModel;
    use r2m_rl::{train_reward_model, RmOutputs, RmTrainConfig};
    let r = &cfg.r2m;
    let path = r.pretrain_pairs.as_deref().expect("validated");
    let tok = Tokenizer::from_hf_dir(rm_dir)?;
    let opts = ReadOptions {
        skip_bad: cfg.data.skip_bad,
        limit: None,
    };
    let (pairs, report) = read_preferences(path, opts)?;
    eprintln!("pretrained-rm: {report}");
    let (pairs, report) = tokenize_pairs(&tok, &pairs, r.pretrain_max_len)?;
    eprintln!("pretrained-rm: {report}");
    let rm = RewardModel::<Autodiff<B>>::load_hf_dir(rm_dir, device)?;
    let rm_cfg = RmTrainConfig {
        trainable: r.pretrain_trainable.parse()?,
        epochs: r.pretrain_epochs,
        lr: r.pretrain_lr,
        seed: r.seed,
        ..Default::default()
    };
    let dir = out.join("pretrained-rm");
    let outputs = RmOutputs {
        dir: &dir,
        tokenizer: Some(&tok),
    };
    let (rm, summary) = train_reward_model(rm, &pairs, &[], &rm_cfg, outputs)?;
    eprintln!(
        "pretrained-rm: {} BT steps on {} pairs, saved {}",
        summary.steps,
        summary.train_pairs,
        dir.display()
    );
    Ok(LearnedRm {
        model: rm.valid(),
        tokenizer: Some(tok),
        token_budget: cfg.reward.token_budget,
        name: format!("pretrained rm {}", dir.display()),
    })
}
