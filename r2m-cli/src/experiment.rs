//! `r2m experiment overopt`: see [`r2m_experiments::overopt`].

use std::path::PathBuf;
use std::time::Instant;

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use r2m_core::{R2mError, Result};
use r2m_experiments::overopt::{run_experiment, ExperimentControl, GoldKind, OveroptConfig};
use r2m_experiments::report::report;
use r2m_rl::config::RmMethod;

use crate::backends::BackendTask;
use crate::train::ctrl_c_flag;

#[derive(clap::Subcommand, Debug)]
pub enum ExperimentCommand {
    /// Reward over-optimization against a gold reward (VADER, VADER behind quality gates, or a
    /// command): a proxy RM trained on gold-labelled samples of the initial policy, then RLOO
    /// runs for each method x seed, with a table and plots of gold and proxy reward against
    /// sqrt(KL). Resumable: rerun with `--resume EXP` after an interruption.
    Overopt(OveroptArgs),
}

#[derive(clap::Args, Debug)]
pub struct OveroptArgs {
    /// Experiment directory.
    #[arg(long, default_value = "runs/overopt", conflicts_with = "resume")]
    out: PathBuf,
    /// Continue the experiment in this directory with its saved settings (experiment.toml).
    #[arg(long, value_name = "EXP")]
    resume: Option<PathBuf>,
    /// Settings file (TOML; keys as in EXP/experiment.toml). Flags below override it.
    #[arg(long, conflicts_with = "resume")]
    config: Option<PathBuf>,
    /// Start from the CI-sized settings (1 seed, 2 steps, a few pairs) instead of the full ones.
    #[arg(long, conflicts_with = "resume")]
    reduced: bool,
    /// Methods, comma-separated: vanilla, r2m, iterative-head, pretrained-rm, r2m-no-train,
    /// r2m-noise.
    #[arg(long, value_delimiter = ',', conflicts_with = "resume")]
    methods: Vec<String>,
    /// Seeds, comma-separated.
    #[arg(long, value_delimiter = ',', conflicts_with = "resume")]
    seeds: Vec<u64>,
    /// RL steps per run.
    #[arg(long, conflicts_with = "resume")]
    steps: Option<usize>,
    /// Proxy-RM training pairs.
    #[arg(long, conflicts_with = "resume")]
    rm_pairs: Option<usize>,
    /// Share of the proxy's training labels flipped.
    #[arg(long, conflicts_with = "resume")]
    label_noise: Option<f64>,
    /// The gold reward: `vader`, `quality` (VADER behind quality gates) or `command:CMD`, your
    /// own judge (one persistent child process: a JSON line `{"prompt", "response"}` in, a
    /// number out, as `[reward] kind = "command"`).
    #[arg(
        long,
        value_name = "vader|quality|command:CMD",
        conflicts_with = "resume"
    )]
    gold: Option<String>,
    /// Override a key of every run's RL config, e.g. `--set optim.lr=1e-5`.
    #[arg(long, value_name = "SECTION.KEY=VALUE", conflicts_with = "resume")]
    set: Vec<String>,
    /// Only rebuild the report from the finished runs in the directory.
    #[arg(long)]
    report_only: bool,
}

impl OveroptArgs {
    fn settings(&self) -> Result<(OveroptConfig, PathBuf)> {
        if let Some(exp) = &self.resume {
            let p = exp.join("experiment.toml");
            if !p.exists() {
                return Err(R2mError::Config(format!(
                    "--resume {}: no experiment.toml there",
                    exp.display()
                )));
            }
            return Ok((OveroptConfig::load(&p)?, exp.clone()));
        }
        let mut c = match (&self.config, self.reduced) {
            (Some(p), _) => OveroptConfig::load(p)?,
            (None, true) => OveroptConfig::reduced(),
            (None, false) => OveroptConfig::default(),
        };
        if !self.methods.is_empty() {
            c.methods = self
                .methods
                .iter()
                .map(|m| {
                    serde_json::from_value::<RmMethod>(serde_json::Value::String(m.trim().into()))
                        .map_err(|_| {
                            R2mError::Config(format!(
                                "--methods: unknown method `{m}` (vanilla, r2m, iterative-head, pretrained-rm, r2m-no-train, r2m-noise)"
                            ))
                        })
                })
                .collect::<Result<_>>()?;
        }
        if !self.seeds.is_empty() {
            c.seeds = self.seeds.clone();
        }
        if let Some(s) = self.steps {
            c.steps = s;
        }
        if let Some(n) = self.rm_pairs {
            c.rm_pairs = n;
        }
        if let Some(p) = self.label_noise {
            c.label_noise = p;
        }
        match self.gold.as_deref() {
            None => {}
            Some("vader") => c.gold = GoldKind::Vader,
            Some("quality") => c.gold = GoldKind::Quality,
            Some(g) => match g.strip_prefix("command:").map(str::trim) {
                Some(cmd) if !cmd.is_empty() => c.gold_command = Some(cmd.to_string()),
                _ => {
                    return Err(R2mError::Config(format!(
                        "--gold: `{g}`, expected `vader`, `quality` or `command:CMD`"
                    )))
                }
            },
        }
        c.set.extend(self.set.iter().cloned());
        Ok((c, self.out.clone()))
    }
}

pub struct ExperimentTask(pub ExperimentCommand);

impl BackendTask for ExperimentTask {
    fn run<B: Backend>(self, device: B::Device, backend: &str) -> Result<()> {
        let ExperimentCommand::Overopt(a) = self.0;
        let (cfg, exp) = a.settings()?;
        if a.report_only {
            let rep = report(&exp, &cfg)?;
            println!("{}", rep.markdown);
            println!("wrote {}", exp.join("report.md").display());
            return Ok(());
        }
        eprintln!("backend: {backend}");
        let t0 = Instant::now();
        let interrupt = ctrl_c_flag();
        let s = run_experiment::<Autodiff<B>>(
            &cfg,
            &exp,
            &device,
            ExperimentControl {
                interrupt: Some(&interrupt),
                observer: &crate::progress::Terminal::new(),
            },
        )?;
        if s.interrupted {
            println!(
                "interrupted; continue with `r2m experiment overopt --resume {}`",
                exp.display()
            );
            return Ok(());
        }
        let rep = report(&exp, &cfg)?;
        println!("{}", rep.markdown);
        for p in &rep.plots {
            println!("  {}", p.display());
        }
        println!(
            "{} runs now, {} already finished; {:.0}s; wrote {}",
            s.ran.len(),
            s.skipped.len(),
            t0.elapsed().as_secs_f64(),
            exp.join("report.md").display()
        );
        Ok(())
    }
}
