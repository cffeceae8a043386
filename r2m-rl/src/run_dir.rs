//! A run directory and the files in it, owned by one type, [`RunDir`]:
//!
//! ```text
//! RUN/config.toml          the resolved config (what `--resume` reads back)
//! RUN/metrics.jsonl        one line per step, flushed as it is written
//! RUN/samples.jsonl        `run.log_samples` responses per step
//! RUN/plots/*.{png,svg}    reward, KL, response length, R2M update loss against step
//! RUN/checkpoints/step-NNNNNN/
//!     what trains of the policy: policy.bin (`all`), blocks.bin + norm.bin (`top:N`) or
//!     adapters.bin (`lora`); policy_optim.bin [critic.bin critic_optim.bin]
//!     trainer.json (step, optimizer steps, beta, the base model's spec and weights' sha256)
//!     sampler.json (data position)  r2m/ (R2M fusion state)
//! RUN/r2m/                 the final R2M state
//! RUN/adapter/             the final LoRA adapter in PEFT's format (`model.trainable = "lora"`)
//! RUN/final/               the final policy as an HF directory (adapters merged)
//! ```
//!
//! A checkpoint is written into `checkpoints/.step-NNNNNN.tmp/` and renamed into place once
//! complete, so a crash never leaves a half-written checkpoint under a real name; the newest
//! `run.keep_checkpoints` are kept.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use r2m_core::{R2mError, Result};

use crate::config::{RlConfig, SaveFinal};
use crate::experience::Experience;
use crate::metrics::StepMetrics;
use crate::prompt::PromptSampler;
use crate::reward::RolloutReward;
use crate::trainer::RlTrainer;

type Inner<B> = <B as AutodiffBackend>::InnerBackend;

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

/// Where a resumed run continues from.
pub struct ResumePoint {
    pub step: usize,
    pub checkpoint: PathBuf,
}

/// An open run directory: its logs are open for appending.
pub struct RunDir {
    path: PathBuf,
    metrics: std::fs::File,
    samples: std::fs::File,
}

impl RunDir {
    /// Start a new run in `path`; a directory that already holds checkpoints is refused.
    pub fn create(path: &Path, cfg: &RlConfig) -> Result<Self> {
        std::fs::create_dir_all(path).map_err(io_err(path))?;
        if !list_checkpoints(path)?.is_empty() {
            return Err(R2mError::Config(format!(
                "{} already holds checkpoints: continue it with `r2m train --resume {0}`, or choose another run.out",
                path.display()
            )));
        }
        for name in ["metrics.jsonl", "samples.jsonl"] {
            let p = path.join(name);
            std::fs::write(&p, "").map_err(io_err(&p))?;
        }
        Self::open(path, cfg)
    }

    /// The newest checkpoint of the run in `path`, for `--resume`.
    pub fn resume_point(path: &Path) -> Result<ResumePoint> {
        let (step, checkpoint) = list_checkpoints(path)?.pop().ok_or_else(|| {
            R2mError::Config(format!(
                "--resume {}: no checkpoint in {} (start a new run with --config)",
                path.display(),
                path.join("checkpoints").display()
            ))
        })?;
        Ok(ResumePoint { step, checkpoint })
    }

    /// Continue the run in `path` from `at`: its logs lose the steps after the checkpoint.
    pub fn resume(path: &Path, cfg: &RlConfig, at: &ResumePoint) -> Result<Self> {
        truncate_log(&path.join("metrics.jsonl"), at.step)?;
        truncate_log(&path.join("samples.jsonl"), at.step)?;
        Self::open(path, cfg)
    }

    fn open(path: &Path, cfg: &RlConfig) -> Result<Self> {
        // The resolved config (a resumed run may have been extended with --steps).
        let p = path.join("config.toml");
        std::fs::write(&p, cfg.to_toml()).map_err(io_err(&p))?;
        Ok(Self {
            path: path.to_path_buf(),
            metrics: open_append(&path.join("metrics.jsonl"))?,
            samples: open_append(&path.join("samples.jsonl"))?,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metrics_path(&self) -> PathBuf {
        self.path.join("metrics.jsonl")
    }

    /// Restore the trainer, the reward's state and the data position from a checkpoint.
    pub fn load_checkpoint<B: AutodiffBackend>(
        dir: &Path,
        trainer: &mut RlTrainer<B>,
        reward: &mut dyn RolloutReward<Inner<B>>,
    ) -> Result<PromptSampler> {
        trainer.load_checkpoint(dir)?;
        if dir.join("r2m").exists() {
            reward.load_state(&dir.join("r2m"))?;
        }
        let p = dir.join("sampler.json");
        let text = std::fs::read_to_string(&p).map_err(io_err(&p))?;
        serde_json::from_str(&text).map_err(|e| R2mError::format(&p, e.to_string()))
    }

    /// Append a step's metrics line and its first `log_samples` responses, flushed.
    pub fn log_step<B: burn::tensor::backend::Backend>(
        &mut self,
        m: &StepMetrics,
        exp: &Experience<B>,
        log_samples: usize,
    ) -> Result<()> {
        let mp = self.metrics_path();
        writeln!(self.metrics, "{}", serde_json::to_string(m).expect("json"))
            .and_then(|_| self.metrics.flush())
            .map_err(io_err(&mp))?;
        let sp = self.path.join("samples.jsonl");
        for (row, g) in exp.responses.iter().enumerate().take(log_samples) {
            let prompt = exp
                .prompt_of(row)
                .messages
                .as_ref()
                .and_then(|ms| ms.last());
            let line = serde_json::json!({
                "step": m.step,
                "row": row,
                "prompt": prompt.map(|m| m.content.clone()),
                "response": g.text,
                "tokens": g.tokens.len(),
                "finish": g.finish,
                "reward": exp.rewards[row],
            });
            writeln!(self.samples, "{line}").map_err(io_err(&sp))?;
        }
        self.samples.flush().map_err(io_err(&sp))
    }

    /// Write a checkpoint of the trainer's current step (see [`write_checkpoint`]).
    pub fn checkpoint<B: AutodiffBackend>(
        &self,
        trainer: &RlTrainer<B>,
        reward: &dyn RolloutReward<Inner<B>>,
        sampler: &PromptSampler,
        keep: usize,
    ) -> Result<PathBuf> {
        write_checkpoint(&self.path, trainer, reward, sampler, keep)
    }

    /// Draw the run's plots from its metrics (`RUN/plots/`).
    pub fn plots(&self) -> Result<Vec<PathBuf>> {
        crate::plots::plot_run(&self.metrics_path(), &self.path.join("plots"))
    }

    /// What a stopped run left: where its metrics are and which checkpoint to resume from.
    pub fn saved_note(&self, failed_step: usize, checkpoint_every: usize) -> Result<String> {
        let metrics = self.metrics_path();
        Ok(match list_checkpoints(&self.path)?.pop() {
            Some((s, p)) => format!(
                "metrics up to step {} are in {}; the last checkpoint (step {s}, {}) is intact: resume from it with a lower learning rate or fix the data",
                failed_step - 1,
                metrics.display(),
                p.display()
            ),
            None => format!(
                "metrics up to step {} are in {}; no checkpoint was written yet (run.checkpoint_every = {checkpoint_every})",
                failed_step - 1,
                metrics.display()
            ),
        })
    }

    /// A finished run's outputs: the reward's final state (`RUN/r2m/`), the policy's LoRA
    /// adapter in PEFT's format when it has one (`RUN/adapter/`, always: it is small) and, with
    /// `save_final = true`, the policy as an HF directory (`RUN/final/`, adapters merged).
    pub fn write_final<B: AutodiffBackend>(
        &self,
        trainer: &RlTrainer<B>,
        reward: &dyn RolloutReward<Inner<B>>,
        save_final: SaveFinal,
    ) -> Result<()> {
        reward.save_state(&self.path.join("r2m"))?;
        let policy = trainer.policy.valid();
        if r2m_models::lora::has_adapters(&policy) {
            let base = &trainer.cfg.model.policy;
            r2m_models::lora::save_peft_adapter(&policy, &self.path.join("adapter"), base)?;
        }
        if save_final == SaveFinal::Merged {
            r2m_models::save_hf_dir(
                &policy,
                trainer.tokenizer.as_ref(),
                &self.path.join("final"),
            )?;
        }
        Ok(())
    }
}
