//! `r2m train --config run.toml`: RL on a policy with a learned or rule reward.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use r2m_core::{R2mError, Result};
use r2m_data::ReadOptions;
use r2m_models::load_model;
use r2m_rl::r2m_reward::reward_from_config;
use r2m_rl::{load_prompts, train_with, RlConfig, RlSummary, RlTrainer, RunControl, RunEnd};

use crate::backends::BackendTask;
use crate::progress::Terminal;

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

/// The prompts of `data.prompts`, read as the config says.
pub fn read_rl_prompts(
    cfg: &RlConfig,
    tok: &r2m_models::Tokenizer,
    observer: &dyn r2m_core::Observer,
) -> Result<Vec<r2m_rl::Prompt>> {
    let path = cfg
        .data
        .prompts
        .as_deref()
        .ok_or_else(|| R2mError::Config("data.prompts is required".into()))?;
    let opts = ReadOptions {
        skip_bad: cfg.data.skip_bad,
        limit: cfg.data.limit,
    };
    load_prompts(path, opts, cfg.data.max_prompt_len, tok, observer)
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
        crate::fetch_if_default(&cfg.model.policy)?;
        let loaded = load_model::<Autodiff<B>>(&cfg.model.policy, &device)?;
        let tok = loaded.tokenizer()?.clone();
        eprintln!(
            "policy {} loaded in {:.1}s",
            cfg.model.policy,
            t0.elapsed().as_secs_f64()
        );
        let term = Terminal::new();
        let prompts = read_rl_prompts(&cfg, &tok, &term)?;
        let out = cfg.run.out.clone();
        let d_p = loaded.model.config.hidden_size;
        let mut reward = reward_from_config::<Autodiff<B>>(&cfg, d_p, resume, &device, &term)?;
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
                observer: &term,
                ..Default::default()
            },
        )?;
        report_run(&summary, &out);
        Ok(())
    }
}
