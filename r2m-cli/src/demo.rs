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
    /// RL steps (default: the demo's 12).
    #[arg(long)]
    steps: Option<usize>,
    /// New tokens per response (default 40).
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// The policy's learning rate (LoRA adapters; default 5e-5).
    #[arg(long)]
    lr: Option<f64>,
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
        let d = DemoOptions::default();
        let opts = DemoOptions {
            out: a.out.clone(),
            steps: a.steps.unwrap_or(d.steps),
            max_new_tokens: a.max_new_tokens.unwrap_or(d.max_new_tokens),
            lr: a.lr.unwrap_or(d.lr),
            seed: a.seed,
            ..d
        };
        crate::fetch_if_default(&opts.policy)?;
        let interrupt = ctrl_c_flag();
        let s = run_demo::<Autodiff<B>>(&opts, &device, Some(&interrupt), &Terminal::new())?;

        println!();
        let q = &s.proxy;
        println!(
            "proxy reward model (BT head on frozen SmolLM2, {} gold-labelled pairs): agrees with gold on {:.1}% of {} held-out pairs, 95% CI {:.1}% to {:.1}% ({:.0}s)",
            q.train_pairs,
            100.0 * q.agreement.mean,
            q.agreement.n,
            100.0 * q.agreement.ci95_low,
            100.0 * q.agreement.ci95_high,
            q.seconds
        );
        // Only the summary table: an unreadable file leaves it empty.
        let metrics = read_step_metrics(&a.out.join("metrics.jsonl")).unwrap_or_default();
        if !metrics.is_empty() {
            println!(
                "\n{:>4}  {:>8}  {:>6}  {:>7}  {:>6}  {:>7}  {:>6}  {:>6}",
                "step", "reward", "gold", "KL", "length", "RM loss", "w(t)", "s/step"
            );
            for m in &metrics {
                println!(
                    "{:>4}  {:>+8.4}  {:>+6.3}  {:>7.4}  {:>6.1}  {:>7}  {:>6}  {:>6.1}",
                    m.step,
                    m.reward_mean,
                    m.diagnostics.get("gold_mean").unwrap_or(f64::NAN),
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
        println!(
            "\nheld-out prompts ({} prompts on 8 films nothing trained on; greedy; after - before, paired):",
            s.before.len()
        );
        println!("  gold   {}", s.gold_change);
        println!("  proxy  {}", s.proxy_change);
        for (b, af) in s.before.iter().zip(&s.after).take(2) {
            println!("\n  prompt: {}", b.prompt);
            println!(
                "    before (gold {:+.2}): {}",
                b.gold,
                one_line(&b.response)
            );
            println!(
                "    after  (gold {:+.2}): {}",
                af.gold,
                one_line(&af.response)
            );
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
        println!(
            "  {}  (held-out responses and scores, before and after)",
            out.join("before_after.jsonl").display()
        );
        if out.join("adapter").exists() {
            println!(
                "  {}  (the LoRA adapter: `r2m generate --model smollm2 --adapter {0} --chat --prompt ...`)",
                out.join("adapter").display()
            );
        }
        println!("demo took {:.0}s", t0.elapsed().as_secs_f64());
        Ok(())
    }
}

/// A response on one line (newlines shown as spaces).
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
