//! `r2m train --config run.toml`: RL on a policy with a learned or rule reward.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use r2m_core::{R2mError, Result};
use r2m_data::ReadOptions;
use r2m_models::{load_model, Tokenizer};
use r2m_rl::config::{RewardKind, RmMethod};
use r2m_rl::{
    load_prompts, train_with, LearnedRm, R2mReward, RlConfig, RlSummary, RlTrainer, RolloutReward,
    RuleReward, RunControl, RunEnd,
};

use crate::backends::BackendTask;

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// The run's TOML config (every key: `r2m config --print-default`).
    #[arg(long, required_unless_present = "resume", conflicts_with = "resume")]
    config: Option<PathBuf>,
    /// Continue the run in this directory from its newest checkpoint (its `config.toml` is the
    /// config; `--steps` extends it).
    #[arg(long, value_name = "RUN_DIR")]
    resume: Option<PathBuf>,
    /// Override `run.steps`.
    #[arg(long)]
    steps: Option<usize>,
    /// Override `run.out`.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Override `run.seed`.
    #[arg(long)]
    seed: Option<u64>,
    /// Override any config key, e.g. `--set rollout.max_new_tokens=32 --set r2m.method=vanilla`.
    #[arg(long, value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
}

impl TrainArgs {
    fn config(&self) -> Result<RlConfig> {
        let mut cfg = match (&self.config, &self.resume) {
            (_, Some(run)) => {
                let p = run.join("config.toml");
                if !p.exists() {
                    return Err(R2mError::Config(format!(
                        "--resume {}: no config.toml there (is it a run directory?)",
                        run.display()
                    )));
                }
                let mut cfg = RlConfig::load(&p)?;
                cfg.run.out = run.clone();
                cfg
            }
            (Some(c), None) => RlConfig::load(c)?,
            (None, None) => unreachable!("clap requires one"),
        };
        if let Some(s) = self.steps {
            cfg.run.steps = s;
        }
        if let (Some(o), None) = (&self.out, &self.resume) {
            cfg.run.out = o.clone();
        }
        if let Some(s) = self.seed {
            cfg.run.seed = s;
        }
        cfg.with_overrides(&self.set)
    }
}

/// A flag that the first Ctrl-C sets (the run then stops after its current step, with a
/// checkpoint); a second Ctrl-C exits at once.
pub fn ctrl_c_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    let installed = ctrlc::set_handler(move || {
        if f.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond Ctrl-C: exiting without saving");
            std::process::exit(130);
        }
        eprintln!("\nCtrl-C: finishing the current step, then saving a checkpoint (Ctrl-C again to quit now)");
    });
    if let Err(e) = installed {
        eprintln!("warning: no Ctrl-C handler ({e}); Ctrl-C will stop without saving");
    }
    flag
}

/// Print how a run ended, with the paths a user wants next.
pub fn report_run(summary: &RlSummary, out: &Path) {
    match summary.end {
        RunEnd::AlreadyFinished => {
            println!(
                "{} already finished all {} steps; nothing to do (raise --steps to extend it)",
                out.display(),
                summary.steps
            );
            return;
        }
        RunEnd::Interrupted => println!(
            "interrupted after step {}; checkpoint {}; continue with `r2m train --resume {}`",
            summary.steps,
            summary
                .checkpoint
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            out.display()
        ),
        RunEnd::Finished => {}
    }
    if let Some(s) = summary.resumed_from {
        println!("resumed from step {s}");
    }
    if let (Some(f), Some(l)) = (&summary.first, &summary.last) {
        println!(
            "steps {}..{} in {:.0}s: reward {:+.4} -> {:+.4}, KL {:.4} -> {:.4}, length {:.1} -> {:.1}",
            f.step,
            l.step,
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
    for p in &summary.plots {
        println!("  {}", p.display());
    }
}

pub struct TrainTask(pub TrainArgs);

impl BackendTask for TrainTask {
    fn run<B: Backend>(self, device: B::Device, backend: &str) -> Result<()> {
        let cfg = self.0.config()?;
        let resume = self.0.resume.is_some();
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
                let pretrained = out.join("pretrained-rm");
                let rm = if cfg.r2m.method == RmMethod::PretrainedRm
                    && resume
                    && pretrained.join("config.json").exists()
                {
                    LearnedRm::<B>::load(&pretrained, cfg.reward.token_budget, &device)?
                } else if cfg.r2m.method == RmMethod::PretrainedRm {
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
        let interrupt = ctrl_c_flag();
        let summary = train_with(
            &mut trainer,
            &prompts,
            reward.as_mut(),
            RunControl {
                out: Some(&out),
                resume,
                interrupt: Some(&interrupt),
                ..Default::default()
            },
        )?;
        report_run(&summary, &out);
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
