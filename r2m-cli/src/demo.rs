//! `r2m demo`: see [`r2m_experiments::demo`].

use std::path::PathBuf;
use std::time::Instant;

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use r2m_core::Result;
use r2m_experiments::demo::{run_demo, DemoOptions};
use r2m_rl::run::read_step_metrics;

use crate::backends::BackendTask;
use crate::progress::Terminal;
use crate::train::{ctrl_c_flag, report_run};

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Run directory.
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    /// RL steps.
    #[arg(long, default_value_t = 6)]
    steps: usize,
    /// New tokens per response.
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub struct DemoTask(pub DemoArgs);

impl BackendTask for DemoTask {
    fn run<B: Backend>(self, device: B::Device, backend: &str) -> Result<()> {
        let a = self.0;
        eprintln!("backend: {backend}");
        B::seed(&device, a.seed);
        let t0 = Instant::now();
        let opts = DemoOptions {
            out: a.out.clone(),
            steps: a.steps,
            max_new_tokens: a.max_new_tokens,
            seed: a.seed,
            ..Default::default()
        };
        crate::fetch_if_default(&opts.policy)?;
        let interrupt = ctrl_c_flag();
        let s = run_demo::<Autodiff<B>>(&opts, &device, Some(&interrupt), &Terminal::new())?;

        println!();
        match (&s.rm_eval_before, &s.rm_eval_after) {
            (Some(b), Some(e)) => println!(
                "reward model (BT head on frozen SmolLM2, {} held-out HH pairs): accuracy {:.1}% -> {:.1}% (±{:.1}), {:.0}s",
                e.pairs,
                100.0 * b.accuracy,
                100.0 * e.accuracy,
                100.0 * e.accuracy_ci95,
                s.rm_seconds
            ),
            _ => println!("reward model: reused {}", s.rm_dir.display()),
        }
        // Only the summary table: an unreadable file leaves it empty.
        let metrics = read_step_metrics(&a.out.join("metrics.jsonl")).unwrap_or_default();
        if !metrics.is_empty() {
            println!(
                "\n{:>4}  {:>8}  {:>7}  {:>6}  {:>7}  {:>6}  {:>6}",
                "step", "reward", "KL", "length", "RM loss", "w(t)", "s/step"
            );
            for m in &metrics {
                println!(
                    "{:>4}  {:>+8.4}  {:>7.4}  {:>6.1}  {:>7}  {:>6}  {:>6.1}",
                    m.step,
                    m.reward_mean,
                    m.kl,
                    m.response_len,
                    (m.diagnostics.get("rm_loss"))
                        .map(|v| format!("{v:.4}"))
                        .unwrap_or_else(|| "-".into()),
                    (m.diagnostics.get("r2m_w"))
                        .map(|v| format!("{v:.3}"))
                        .unwrap_or_else(|| "-".into()),
                    m.time_step
                );
            }
        }
        println!();
        report_run(&s.run, &a.out);
        let out = &a.out;
        println!(
            "  {}  (the resolved config)",
            out.join("config.toml").display()
        );
        println!("  {}", out.join("metrics.jsonl").display());
        println!(
            "  {}  (sample generations)",
            out.join("samples.jsonl").display()
        );
        if let Some(c) = &s.run.checkpoint {
            println!("  {}  (newest checkpoint)", c.display());
        }
        if out.join("final").exists() {
            println!(
                "  {}  (final policy: `r2m generate --model {0} --chat --prompt ...`)",
                out.join("final").display()
            );
        }
        println!("demo took {:.0}s", t0.elapsed().as_secs_f64());
        Ok(())
    }
}
