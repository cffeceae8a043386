//! A run: the step loop around [`RlTrainer::step`], with its run directory ([`RunDir`]),
//! checkpoints, exact resume, and the ways a run ends (finished, interrupted, non-finite values).
//!
//! Every random stream is derived from the run seed and the step counter, so restoring the step
//! restores them: a resumed run reproduces the metrics of an uninterrupted one exactly (tested on
//! the CPU backend). Progress goes to the [`RunControl::observer`]; nothing is printed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::tensor::backend::AutodiffBackend;
use r2m_core::observe::SILENT;
use r2m_core::{Observer, R2mError, Result};
use serde::Serialize;

use crate::metrics::StepMetrics;
use crate::prompt::{Prompt, PromptSampler};
use crate::reward::RolloutReward;
use crate::run_dir::RunDir;
pub use crate::run_dir::{checkpoint_dir, list_checkpoints, read_step_metrics, write_checkpoint};
use crate::trainer::RlTrainer;

type Inner<B> = <B as AutodiffBackend>::InnerBackend;

/// The per-step hook of [`RunControl`]: the step's metrics and the trainer after the step.
pub type AfterStep<'a, B> = dyn FnMut(&StepMetrics, &RlTrainer<B>) -> Result<()> + 'a;

/// How a run is driven: where it writes, whether it resumes, how it can be stopped, who hears
/// of its progress.
pub struct RunControl<'a, B: AutodiffBackend> {
    /// The run directory; `None` trains without writing anything.
    pub out: Option<&'a Path>,
    /// Continue from the newest checkpoint in `out` (which must hold one).
    pub resume: bool,
    /// Set (by a Ctrl-C handler) to stop after the current step, with a checkpoint.
    pub interrupt: Option<&'a AtomicBool>,
    /// Called after each step, once its metrics and checkpoint are on disk, with the trainer
    /// (e.g. to evaluate the policy on held-out prompts); an error stops the run.
    pub after_step: Option<&'a mut AfterStep<'a, B>>,
    /// Hears of the run's progress: a task of `run.steps` units, one per step.
    pub observer: &'a dyn Observer,
}

impl<B: AutodiffBackend> Default for RunControl<'_, B> {
    fn default() -> Self {
        Self {
            out: None,
            resume: false,
            interrupt: None,
            after_step: None,
            observer: &SILENT,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunEnd {
    /// All `run.steps` steps done.
    Finished,
    /// Stopped by [`RunControl::interrupt`] after a checkpoint.
    Interrupted,
    /// `--resume` of a run that had already finished: nothing was trained.
    AlreadyFinished,
}

/// What [`train`] returns.
#[derive(Debug, Clone, Serialize)]
pub struct RlSummary {
    /// Completed steps (counting those before a resume).
    pub steps: usize,
    /// The step a resumed run continued from.
    pub resumed_from: Option<usize>,
    pub end: RunEnd,
    /// First and last step of this invocation.
    pub first: Option<StepMetrics>,
    pub last: Option<StepMetrics>,
    pub seconds: f64,
    pub out_dir: Option<PathBuf>,
    /// The newest checkpoint written.
    pub checkpoint: Option<PathBuf>,
    /// Plot files written.
    pub plots: Vec<PathBuf>,
}

impl RlSummary {
    /// A run starting at `steps` completed steps, writing into `out`.
    fn start(steps: usize, out: Option<&Path>) -> Self {
        Self {
            steps,
            resumed_from: None,
            end: RunEnd::Finished,
            first: None,
            last: None,
            seconds: 0.0,
            out_dir: out.map(Path::to_path_buf),
            checkpoint: None,
            plots: Vec::new(),
        }
    }
}

/// Run `cfg.run.steps` RL steps over `prompts`, writing into `out` (see [`RunDir`]).
pub fn train<B: AutodiffBackend>(
    trainer: &mut RlTrainer<B>,
    prompts: &[Prompt],
    reward: &mut dyn RolloutReward<Inner<B>>,
    out: Option<&Path>,
) -> Result<RlSummary> {
    let ctl = RunControl {
        out,
        ..Default::default()
    };
    train_with(trainer, prompts, reward, ctl)
}

/// [`train`] with resume, interruption, a per-step hook and an observer.
pub fn train_with<B: AutodiffBackend>(
    trainer: &mut RlTrainer<B>,
    prompts: &[Prompt],
    reward: &mut dyn RolloutReward<Inner<B>>,
    mut ctl: RunControl<'_, B>,
) -> Result<RlSummary> {
    if prompts.is_empty() {
        return Err(R2mError::Config("no prompts".into()));
    }
    let cfg = trainer.cfg.clone();
    let t0 = Instant::now();
    let mut sampler = PromptSampler::new(prompts.len(), cfg.run.seed);
    let mut summary = RlSummary::start(trainer.step, ctl.out);
    let mut dir = match open_run(trainer, reward, &ctl, &mut sampler, &mut summary)? {
        Some(Opened::Dir(d)) => Some(d),
        Some(Opened::AlreadyFinished) => return Ok(summary),
        None => None,
    };
    let obs = ctl.observer;
    let name = format!(
        "{} + {}",
        crate::config::advantage_name(cfg.algo.advantage),
        reward.name()
    );
    obs.begin(
        &format!("RL {name}"),
        cfg.run.steps as u64,
        trainer.step as u64,
    );
    let (every, keep) = (cfg.run.checkpoint_every, cfg.run.keep_checkpoints);
    while trainer.step < cfg.run.steps {
        let idx = sampler.next_batch(cfg.rollout.prompts_per_step);
        let batch: Vec<Prompt> = idx.iter().map(|&i| prompts[i].clone()).collect();
        let (m, exp) = match trainer.step(batch, reward) {
            Ok(x) => x,
            Err(e) => {
                obs.end();
                return Err(stopped(e, dir.as_ref(), every, &mut summary));
            }
        };
        let mut checkpointed = false;
        if let Some(d) = dir.as_mut() {
            d.log_step(&m, &exp, cfg.run.log_samples)?;
            if trainer.step == cfg.run.steps || (every > 0 && trainer.step.is_multiple_of(every)) {
                summary.checkpoint = Some(d.checkpoint(trainer, &*reward, &sampler, keep)?);
                checkpointed = true;
            }
        }
        obs.advance(1, &step_status(&m));
        if let Some(f) = ctl.after_step.as_mut() {
            if let Err(e) = f(&m, trainer) {
                obs.end();
                return Err(e);
            }
        }
        summary.first.get_or_insert_with(|| m.clone());
        summary.last = Some(m);
        if ctl.interrupt.is_some_and(|f| f.load(Ordering::SeqCst)) && trainer.step < cfg.run.steps {
            if let (Some(d), false) = (dir.as_ref(), checkpointed) {
                summary.checkpoint = Some(d.checkpoint(trainer, &*reward, &sampler, keep)?);
            }
            summary.end = RunEnd::Interrupted;
            break;
        }
    }
    obs.end();
    summary.steps = trainer.step;
    if let Some(d) = dir.as_ref() {
        summary.plots = d.plots()?;
        if summary.end == RunEnd::Finished {
            d.write_final(trainer, &*reward, cfg.run.save_final)?;
        }
    }
    summary.seconds = t0.elapsed().as_secs_f64();
    Ok(summary)
}

/// What [`open_run`] found.
enum Opened {
    Dir(RunDir),
    /// `--resume` of a run that had already finished (the summary says so).
    AlreadyFinished,
}

/// Open the run directory of `ctl.out`: a new run, or (with `ctl.resume`) the newest checkpoint
/// restored into the trainer, the reward and the prompt sampler. `None` without a directory.
fn open_run<B: AutodiffBackend>(
    trainer: &mut RlTrainer<B>,
    reward: &mut dyn RolloutReward<Inner<B>>,
    ctl: &RunControl<'_, B>,
    sampler: &mut PromptSampler,
    summary: &mut RlSummary,
) -> Result<Option<Opened>> {
    let cfg = trainer.cfg.clone();
    let Some(path) = ctl.out else {
        return Ok(None);
    };
    if !ctl.resume {
        return Ok(Some(Opened::Dir(RunDir::create(path, &cfg)?)));
    }
    let at = RunDir::resume_point(path)?;
    summary.checkpoint = Some(at.checkpoint.clone());
    if at.step >= cfg.run.steps {
        summary.steps = at.step;
        summary.end = RunEnd::AlreadyFinished;
        return Ok(Some(Opened::AlreadyFinished));
    }
    *sampler = RunDir::load_checkpoint(&at.checkpoint, trainer, reward)?;
    summary.resumed_from = Some(at.step);
    Ok(Some(Opened::Dir(RunDir::resume(path, &cfg, &at)?)))
}

/// The one-line status of a finished step.
fn step_status(m: &StepMetrics) -> String {
    format!(
        "reward {:+.3}  kl {:.3}  len {:.0}  {:.1}s/step",
        m.reward_mean, m.kl, m.response_len, m.time_step
    )
}

/// The error a failed step ends the run with. A non-finite value gets what the run left (its
/// metrics, plots and newest checkpoint), so the user knows where to resume from.
fn stopped(e: R2mError, dir: Option<&RunDir>, every: usize, summary: &mut RlSummary) -> R2mError {
    let R2mError::NonFinite {
        step,
        tensor,
        value,
        ..
    } = e
    else {
        return e;
    };
    let saved = match dir {
        Some(d) => {
            summary.plots = d.plots().unwrap_or_default();
            d.saved_note(step, every)
                .unwrap_or_else(|e| format!("(could not list checkpoints: {e})"))
        }
        None => "nothing saved (no run directory)".into(),
    };
    R2mError::NonFinite {
        step,
        tensor,
        value,
        saved,
    }
}
