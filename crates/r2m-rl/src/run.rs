//! A run on disk: the step loop around [`RlTrainer::step`] with its run directory, checkpoints,
//! exact resume, plots, and the ways a run ends (finished, interrupted, non-finite values).
//!
//! ```text
//! RUN/config.toml          the resolved config (what `--resume` reads back)
//! RUN/metrics.jsonl        one line per step, flushed as it is written
//! RUN/samples.jsonl        `run.log_samples` responses per step
//! RUN/plots/*.{png,svg}    reward, KL, response length, R2M update loss against step
//! RUN/checkpoints/step-NNNNNN/
//!     policy.bin policy_optim.bin [critic.bin critic_optim.bin] trainer.json
//!     sampler.json (data position)  r2m/ (R2M fusion state)
//! RUN/r2m/                 the final R2M state
//! RUN/final/               the final policy as an HF directory
//! ```
//!
//! A checkpoint is written into `checkpoints/.step-NNNNNN.tmp/` and renamed into place once
//! complete, so a crash never leaves a half-written checkpoint under a real name; the newest
//! `run.keep_checkpoints` are kept. Every random stream is derived from the run seed and the step
//! counter, so restoring the step restores them: a resumed run reproduces the metrics of an
//! uninterrupted one exactly (tested on the CPU backend).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use indicatif::{ProgressBar, ProgressStyle};
use r2m_core::{R2mError, Result};
use serde::Serialize;

use crate::advantage::AdvantageKind;
use crate::reward_fn::{Prompt, RolloutReward};
use crate::trainer::{PromptSampler, RlTrainer, StepMetrics};

type Inner<B> = <B as AutodiffBackend>::InnerBackend;

/// How a run is driven: where it writes, whether it resumes, how it can be stopped.
#[derive(Default)]
pub struct RunControl<'a> {
    /// The run directory; `None` trains without writing anything.
    pub out: Option<&'a Path>,
    /// Continue from the newest checkpoint in `out` (which must hold one).
    pub resume: bool,
    /// Set (by a Ctrl-C handler) to stop after the current step, with a checkpoint.
    pub interrupt: Option<&'a AtomicBool>,
    /// Called after each step, once its metrics and checkpoint are on disk.
    pub after_step: Option<&'a mut dyn FnMut(&StepMetrics)>,
    /// Draw progress bars (off in tests).
    pub quiet: bool,
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

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> R2mError + '_ {
    move |e| R2mError::io(path, e)
}

/// `RUN/checkpoints/step-NNNNNN`.
pub fn checkpoint_dir(run: &Path, step: usize) -> PathBuf {
    run.join("checkpoints").join(format!("step-{step:06}"))
}

/// The complete checkpoints of a run, oldest first (temporary directories are ignored).
pub fn list_checkpoints(run: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let dir = run.join("checkpoints");
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
        let path = entry.map_err(io_err(&dir))?.path();
        let step = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("step-"))
            .and_then(|n| n.parse::<usize>().ok());
        if let (Some(step), true) = (step, path.is_dir()) {
            out.push((step, path));
        }
    }
    out.sort();
    Ok(out)
}

/// Write a checkpoint of the trainer, the reward's state and the data position for the
/// trainer's current step, atomically; then delete all but the newest `keep`.
pub fn write_checkpoint<B: AutodiffBackend>(
    run: &Path,
    trainer: &RlTrainer<B>,
    reward: &dyn RolloutReward<Inner<B>>,
    sampler: &PromptSampler,
    keep: usize,
) -> Result<PathBuf> {
    let step = trainer.step;
    let fin = checkpoint_dir(run, step);
    let tmp = run.join("checkpoints").join(format!(".step-{step:06}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    trainer.save_checkpoint(&tmp)?;
    reward.save_state(&tmp.join("r2m"))?;
    let p = tmp.join("sampler.json");
    std::fs::write(&p, serde_json::to_string(sampler).expect("json")).map_err(io_err(&p))?;
    if fin.exists() {
        std::fs::remove_dir_all(&fin).map_err(io_err(&fin))?;
    }
    std::fs::rename(&tmp, &fin).map_err(io_err(&fin))?;
    let all = list_checkpoints(run)?;
    for (_, old) in all.iter().take(all.len().saturating_sub(keep.max(1))) {
        std::fs::remove_dir_all(old).map_err(io_err(old))?;
    }
    Ok(fin)
}

/// Keep the lines of a JSONL log whose `step` is at most `step` (a resumed run rewrites the
/// steps after its checkpoint).
fn truncate_log(path: &Path, step: usize) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut keep = String::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(io_err(path))?;
        let v: serde_json::Value = serde_json::from_str(&line)
            .map_err(|e| R2mError::format(path, format!("line {}: {e}", i + 1)))?;
        if v["step"].as_u64().is_some_and(|s| s as usize <= step) {
            keep.push_str(&line);
            keep.push('\n');
        }
    }
    std::fs::write(path, keep).map_err(io_err(path))
}

/// The steps of a run's `metrics.jsonl`; a step written twice (a resumed run re-doing steps)
/// keeps its last line. A malformed line is an error naming the file and the line.
pub fn read_step_metrics(path: &Path) -> Result<Vec<StepMetrics>> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let mut rows: Vec<StepMetrics> = Vec::new();
    for (i, l) in text.lines().enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        let m: StepMetrics = serde_json::from_str(l)
            .map_err(|e| R2mError::format(path, format!("line {}: {e}", i + 1)))?;
        rows.retain(|r| r.step < m.step);
        rows.push(m);
    }
    Ok(rows)
}

fn open_append(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_err(path))
}

/// Run `cfg.run.steps` RL steps over `prompts`, writing into `out` (see the module docs).
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

/// [`train`] with resume, interruption and a per-step hook.
pub fn train_with<B: AutodiffBackend>(
    trainer: &mut RlTrainer<B>,
    prompts: &[Prompt],
    reward: &mut dyn RolloutReward<Inner<B>>,
    mut ctl: RunControl<'_>,
) -> Result<RlSummary> {
    if prompts.is_empty() {
        return Err(R2mError::Config("no prompts".into()));
    }
    let cfg = trainer.cfg.clone();
    let t0 = Instant::now();
    let mut sampler = PromptSampler::new(prompts.len(), cfg.run.seed);
    let mut summary = RlSummary {
        steps: trainer.step,
        resumed_from: None,
        end: RunEnd::Finished,
        first: None,
        last: None,
        seconds: 0.0,
        out_dir: ctl.out.map(Path::to_path_buf),
        checkpoint: None,
        plots: Vec::new(),
    };
    let mut files = None;
    if let Some(dir) = ctl.out {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let (mp, sp) = (dir.join("metrics.jsonl"), dir.join("samples.jsonl"));
        if ctl.resume {
            let (step, ckpt) = list_checkpoints(dir)?.pop().ok_or_else(|| {
                R2mError::Config(format!(
                    "--resume {}: no checkpoint in {} (start a new run with --config)",
                    dir.display(),
                    dir.join("checkpoints").display()
                ))
            })?;
            if step >= cfg.run.steps {
                summary.steps = step;
                summary.end = RunEnd::AlreadyFinished;
                summary.checkpoint = Some(ckpt);
                return Ok(summary);
            }
            trainer.load_checkpoint(&ckpt)?;
            if ckpt.join("r2m").exists() {
                reward.load_state(&ckpt.join("r2m"))?;
            }
            let p = ckpt.join("sampler.json");
            let text = std::fs::read_to_string(&p).map_err(io_err(&p))?;
            sampler =
                serde_json::from_str(&text).map_err(|e| R2mError::format(&p, e.to_string()))?;
            truncate_log(&mp, step)?;
            truncate_log(&sp, step)?;
            summary.resumed_from = Some(step);
            summary.checkpoint = Some(ckpt);
        } else if !list_checkpoints(dir)?.is_empty() {
            return Err(R2mError::Config(format!(
                "{} already holds checkpoints: continue it with `r2m train --resume {0}`, or choose another run.out",
                dir.display()
            )));
        } else {
            std::fs::write(dir.join("metrics.jsonl"), "").map_err(io_err(&mp))?;
            std::fs::write(dir.join("samples.jsonl"), "").map_err(io_err(&sp))?;
        }
        // The resolved config (a resumed run may have been extended with --steps).
        let p = dir.join("config.toml");
        std::fs::write(&p, cfg.to_toml()).map_err(io_err(&p))?;
        files = Some((open_append(&mp)?, mp, open_append(&sp)?, sp));
    }
    let pb = if ctl.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(cfg.run.steps as u64)
    };
    pb.set_style(
        ProgressStyle::with_template(
            "RL {pos}/{len} [{elapsed_precise}<{eta_precise}] {wide_bar} {msg}",
        )
        .expect("template"),
    );
    pb.set_position(trainer.step as u64);
    pb.set_message(format!(
        "{} + {}",
        match cfg.algo.advantage {
            AdvantageKind::Rloo => "rloo",
            AdvantageKind::Grpo => "grpo",
            AdvantageKind::ReinforcePp => "reinforce++",
            AdvantageKind::Remax => "remax",
            AdvantageKind::Gae => "ppo",
        },
        RolloutReward::name(reward)
    ));
    let every = cfg.run.checkpoint_every;
    let keep = cfg.run.keep_checkpoints;
    while trainer.step < cfg.run.steps {
        let idx = sampler.next_batch(cfg.rollout.prompts_per_step);
        let batch: Vec<Prompt> = idx.iter().map(|&i| prompts[i].clone()).collect();
        let (m, rollout, rewards) = match trainer.step(batch, reward) {
            Ok(x) => x,
            Err(R2mError::NonFinite {
                step,
                tensor,
                value,
                ..
            }) => {
                let saved = match ctl.out {
                    Some(dir) => {
                        summary.plots =
                            crate::plots::plot_run(&dir.join("metrics.jsonl"), &dir.join("plots"))
                                .unwrap_or_default();
                        match list_checkpoints(dir)?.pop() {
                            Some((s, p)) => format!(
                                "metrics up to step {} are in {}; the last checkpoint (step {s}, {}) is intact: resume from it with a lower learning rate or fix the data",
                                step - 1,
                                dir.join("metrics.jsonl").display(),
                                p.display()
                            ),
                            None => format!(
                                "metrics up to step {} are in {}; no checkpoint was written yet (run.checkpoint_every = {every})",
                                step - 1,
                                dir.join("metrics.jsonl").display()
                            ),
                        }
                    }
                    None => "nothing saved (no run directory)".into(),
                };
                pb.abandon();
                return Err(R2mError::NonFinite {
                    step,
                    tensor,
                    value,
                    saved,
                });
            }
            Err(e) => return Err(e),
        };
        let mut checkpointed = false;
        if let Some((mf, mp, sf, sp)) = files.as_mut() {
            writeln!(mf, "{}", serde_json::to_string(&m).expect("json"))
                .and_then(|_| mf.flush())
                .map_err(io_err(mp))?;
            let n_log = cfg.run.log_samples.min(rollout.rows());
            for (row, g) in rollout.responses.iter().enumerate().take(n_log) {
                let line = serde_json::json!({
                    "step": m.step,
                    "row": row,
                    "prompt": rollout.prompt_of(row).messages.as_ref().and_then(|ms| ms.last()).map(|m| m.content.clone()),
                    "response": g.text,
                    "tokens": g.tokens.len(),
                    "finish": g.finish,
                    "reward": rewards[row],
                });
                writeln!(sf, "{line}").map_err(io_err(sp))?;
            }
            sf.flush().map_err(io_err(sp))?;
            let dir = ctl.out.expect("files imply out");
            let last = trainer.step == cfg.run.steps;
            if last || (every > 0 && trainer.step.is_multiple_of(every)) {
                summary.checkpoint =
                    Some(write_checkpoint(dir, trainer, &*reward, &sampler, keep)?);
                checkpointed = true;
            }
        }
        pb.set_message(format!(
            "reward {:+.3}  kl {:.3}  len {:.0}  {:.1}s/step",
            m.reward_mean, m.kl, m.response_len, m.time_step
        ));
        pb.inc(1);
        if let Some(f) = ctl.after_step.as_mut() {
            f(&m);
        }
        if summary.first.is_none() {
            summary.first = Some(m.clone());
        }
        summary.last = Some(m);
        if ctl.interrupt.is_some_and(|f| f.load(Ordering::SeqCst)) && trainer.step < cfg.run.steps {
            if let (Some(dir), false) = (ctl.out, checkpointed) {
                summary.checkpoint =
                    Some(write_checkpoint(dir, trainer, &*reward, &sampler, keep)?);
            }
            summary.end = RunEnd::Interrupted;
            break;
        }
    }
    pb.finish();
    summary.steps = trainer.step;
    if let Some(dir) = ctl.out {
        summary.plots = crate::plots::plot_run(&dir.join("metrics.jsonl"), &dir.join("plots"))?;
        if summary.end == RunEnd::Finished {
            reward.save_state(&dir.join("r2m"))?;
            if cfg.run.save_final {
                r2m_models::save_hf_dir(
                    &trainer.policy.valid(),
                    trainer.tokenizer.as_ref(),
                    &dir.join("final"),
                )?;
            }
        }
    }
    summary.seconds = t0.elapsed().as_secs_f64();
    Ok(summary)
}
