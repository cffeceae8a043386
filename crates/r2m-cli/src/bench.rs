//! `r2m bench`: SmolLM2 throughput, printed as text and as one JSON line per scenario.
//!
//! Run `scripts/reference/bench_torch.py` on the same machine for the PyTorch side; the README
//! gives the command that runs both.

use std::time::Instant;

use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use clap::ValueEnum;
use r2m_core::tensor::gather_log_probs;
use r2m_core::Result;
use r2m_models::{load_model, CausalLm, Padding};
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::backends::{dispatch, BackendTask, DeviceArg};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Forward pass only (no autodiff).
    Forward,
    /// Forward pass to the last hidden states, without the LM head (what a reward model runs).
    Hidden,
    /// Forward + backward + AdamW step, all layers trainable.
    Train,
    /// One MLP-sized GEMM, `[batch*seq, hidden] x [hidden, intermediate]` (GFLOP/s calibration).
    Gemm,
    /// RL steps of the `--config` run, vanilla and R2M alternating on the same prompts: per-step
    /// time split and the R2M / vanilla ratio.
    RlStep,
}

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Scenarios to run.
    #[arg(value_enum, num_args = 1.., default_values_t = [Scenario::Forward, Scenario::Train])]
    scenarios: Vec<Scenario>,
    #[arg(long, default_value = "smollm2")]
    model: String,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 128)]
    seq: usize,
    /// Timed iterations (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// `rl-step`: the RL run config (with a learned reward model).
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// `rl-step`: RL steps of each of vanilla and R2M.
    #[arg(long, default_value_t = 3)]
    rl_steps: usize,
}

pub fn run(device: DeviceArg, args: BenchArgs) -> Result<()> {
    dispatch(device, BenchTask(args))
}

struct BenchTask(BenchArgs);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Peak resident memory of this process (Linux), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn random_tokens<B: Backend>(
    batch: usize,
    seq: usize,
    vocab: usize,
    dev: &B::Device,
) -> Tensor<B, 2, Int> {
    let mut rng = StdRng::seed_from_u64(0);
    let ids: Vec<i64> = (0..batch * seq)
        .map(|_| rng.random_range(0..vocab as i64))
        .collect();
    Tensor::from_data(TensorData::new(ids, [batch, seq]), dev)
}

/// Mean next-token cross-entropy of `tokens` under `model`.
fn lm_loss<B: Backend>(model: &CausalLm<B>, tokens: Tensor<B, 2, Int>) -> Tensor<B, 1> {
    let [b, s] = tokens.dims();
    let inputs = tokens.clone().narrow(1, 0, s - 1);
    let targets = tokens.narrow(1, 1, s - 1);
    let out = model.forward(inputs, &Padding::none(b, s - 1));
    gather_log_probs(out.logits, targets).mean().neg()
}

impl BackendTask for BenchTask {
    fn run<B: Backend>(self, device: B::Device, backend: &str) -> Result<()> {
        let a = self.0;
        eprintln!("backend: {backend}");
        let model = load_model::<B>(&a.model, &device)?.model;
        let vocab = model.config.vocab_size;
        let tokens_per_iter = (a.batch * a.seq) as f64;
        for scenario in &a.scenarios {
            let mut times = Vec::new();
            match scenario {
                Scenario::RlStep => {
                    rl_step::<B>(&a, &device, backend)?;
                    continue;
                }
                Scenario::Forward => {
                    let tokens = random_tokens::<B>(a.batch, a.seq, vocab, &device);
                    for i in 0..=a.iters {
                        let t0 = Instant::now();
                        let out = model.forward(tokens.clone(), &Padding::none(a.batch, a.seq));
                        let _ = out.logits.sum().into_scalar();
                        if i > 0 {
                            times.push(t0.elapsed().as_secs_f64());
                        }
                    }
                }
                Scenario::Hidden => {
                    let tokens = random_tokens::<B>(a.batch, a.seq, vocab, &device);
                    for i in 0..=a.iters {
                        let t0 = Instant::now();
                        let h = model.forward_hidden(
                            tokens.clone(),
                            &Padding::none(a.batch, a.seq),
                            None,
                        );
                        let _ = h.sum().into_scalar();
                        if i > 0 {
                            times.push(t0.elapsed().as_secs_f64());
                        }
                    }
                }
                Scenario::Gemm => {
                    let (m, k, n) = (
                        a.batch * a.seq,
                        model.config.hidden_size,
                        model.config.intermediate_size,
                    );
                    let x = Tensor::<B, 2>::random(
                        [m, k],
                        burn::tensor::Distribution::Default,
                        &device,
                    );
                    let w = Tensor::<B, 2>::random(
                        [k, n],
                        burn::tensor::Distribution::Default,
                        &device,
                    );
                    for i in 0..=a.iters * 10 {
                        let t0 = Instant::now();
                        let _ = x
                            .clone()
                            .matmul(w.clone())
                            .narrow(0, 0, 1)
                            .sum()
                            .into_scalar();
                        if i > 0 {
                            times.push(t0.elapsed().as_secs_f64());
                        }
                    }
                    let gflops = 2.0 * (m * k * n) as f64 / median(times) / 1e9;
                    println!("r2m gemm     backend={backend} {m}x{k}x{n} {gflops:.1} GFLOP/s");
                    println!(
                        "{}",
                        serde_json::json!({"impl": "r2m", "backend": backend, "scenario": "gemm",
                            "m": m, "k": k, "n": n, "gflops": gflops})
                    );
                    continue;
                }
                Scenario::Train => {
                    let mut m: CausalLm<Autodiff<B>> =
                        load_model::<Autodiff<B>>(&a.model, &device)?.model;
                    let mut optim = AdamWConfig::new().init::<Autodiff<B>, CausalLm<Autodiff<B>>>();
                    let tokens = random_tokens::<Autodiff<B>>(a.batch, a.seq + 1, vocab, &device);
                    for i in 0..=a.iters {
                        let t0 = Instant::now();
                        let loss = lm_loss(&m, tokens.clone());
                        let grads = GradientsParams::from_grads(loss.backward(), &m);
                        m = optim.step(1e-5, m, grads);
                        // Wait for the update to finish before stopping the clock.
                        let _ = m
                            .valid()
                            .embed_tokens
                            .val()
                            .narrow(0, 0, 1)
                            .sum()
                            .into_scalar();
                        if i > 0 {
                            times.push(t0.elapsed().as_secs_f64());
                        }
                    }
                }
            }
            let secs = median(times);
            let name = match scenario {
                Scenario::Forward => "forward",
                Scenario::Hidden => "hidden",
                Scenario::Gemm | Scenario::RlStep => unreachable!("reported above"),
                Scenario::Train => "train",
            };
            let tps = tokens_per_iter / secs;
            let peak = peak_rss_mib();
            println!(
                "r2m {name:<8} backend={backend} batch={}x{} {:.1} ms/iter {:.1} tokens/s peak_rss={:.0} MiB",
                a.batch,
                a.seq,
                secs * 1e3,
                tps,
                peak.unwrap_or(f64::NAN)
            );
            println!(
                "{}",
                serde_json::json!({"impl": "r2m", "backend": backend, "scenario": name, "batch": a.batch,
                    "seq": a.seq, "ms_per_iter": secs * 1e3, "tokens_per_s": tps, "peak_rss_mib": peak})
            );
        }
        Ok(())
    }
}

/// Vanilla and R2M RL steps, alternating so that both see the same machine load.
fn rl_step<B: Backend>(a: &BenchArgs, device: &B::Device, backend: &str) -> Result<()> {
    use r2m_rl::config::RmMethod;
    use r2m_rl::{LearnedRm, PromptSampler, R2mReward, RlConfig, RlTrainer, StepMetrics};
    let path = a.config.as_ref().ok_or_else(|| {
        r2m_core::R2mError::Config(
            "rl-step needs --config RUN.toml (with a learned reward model)".into(),
        )
    })?;
    let cfg = RlConfig::load(path)?;
    let rm_dir = cfg.reward.model.clone().ok_or_else(|| {
        r2m_core::R2mError::Config(format!("{}: rl-step needs reward.model", path.display()))
    })?;
    let loaded = load_model::<Autodiff<B>>(&cfg.model.policy, device)?;
    let tok = loaded.tokenizer()?.clone();
    let prompts = crate::train::load_prompts(&cfg, &tok)?;
    let d_p = loaded.model.config.hidden_size;
    let mut vanilla_cfg = cfg.clone();
    vanilla_cfg.r2m.method = RmMethod::Vanilla;
    let mut r2m_cfg = cfg.clone();
    r2m_cfg.r2m.method = RmMethod::R2m;
    let budget = cfg.reward.token_budget;
    let mut vanilla = RlTrainer::new(loaded.model.clone(), Some(tok.clone()), vanilla_cfg)?;
    let mut r2m = RlTrainer::new(loaded.model, Some(tok), r2m_cfg.clone())?;
    let mut rm_v = LearnedRm::<B>::load(&rm_dir, budget, device)?;
    let mut rm_r = R2mReward::<Autodiff<B>>::new(
        LearnedRm::<B>::load(&rm_dir, budget, device)?,
        d_p,
        r2m_cfg.r2m.clone(),
    );
    let head_params = {
        use burn::module::Module;
        rm_r.head.num_params()
    };
    let mut sampler = PromptSampler::new(prompts.len(), cfg.run.seed);
    let (mut mv, mut mr): (Vec<StepMetrics>, Vec<StepMetrics>) = (Vec::new(), Vec::new());
    for i in 0..a.rl_steps {
        let batch: Vec<_> = sampler
            .next_batch(cfg.rollout.prompts_per_step)
            .into_iter()
            .map(|j| prompts[j].clone())
            .collect();
        let (v, _, _) = vanilla.step(batch.clone(), &mut rm_v)?;
        let (r, _, _) = r2m.step(batch, &mut rm_r)?;
        eprintln!(
            "step {}: vanilla {:.1}s (len {:.1}), r2m {:.1}s (len {:.1}; reward {:.2}s, rm update {:.2}s)",
            i + 1, v.time_step, v.response_len, r.time_step, r.response_len, r.time_reward, r.time_rm_update
        );
        mv.push(v);
        mr.push(r);
    }
    let mean = |m: &[StepMetrics], f: fn(&StepMetrics) -> f64| {
        m.iter().map(f).sum::<f64>() / m.len().max(1) as f64
    };
    let row = |name: &str, m: &[StepMetrics]| {
        serde_json::json!({
            "method": name,
            "step_s": mean(m, |x| x.time_step),
            "generate_s": mean(m, |x| x.time_generate),
            "logprobs_s": mean(m, |x| x.time_logprobs),
            "reward_s": mean(m, |x| x.time_reward),
            "update_s": mean(m, |x| x.time_update),
            "rm_update_s": mean(m, |x| x.time_rm_update),
            "response_len": mean(m, |x| x.response_len),
        })
    };
    let (rv, rr) = (row("vanilla", &mv), row("r2m", &mr));
    // R2M's own work: the extra reward time (fusion head) and the RM update.
    let own = mean(&mr, |x| x.time_reward + x.time_rm_update) - mean(&mv, |x| x.time_reward);
    let ratio = rr["step_s"].as_f64().unwrap_or(0.0) / rv["step_s"].as_f64().unwrap_or(1.0);
    println!(
        "r2m rl-step backend={backend} steps={} rows={}: vanilla {:.1}s/step, r2m {:.1}s/step, ratio {:.3}; R2M's own work {:.2}s/step ({:.1}%); head {:.2}M params",
        a.rl_steps,
        cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt,
        rv["step_s"].as_f64().unwrap_or(0.0),
        rr["step_s"].as_f64().unwrap_or(0.0),
        ratio,
        own,
        100.0 * own / rv["step_s"].as_f64().unwrap_or(1.0),
        head_params as f64 / 1e6
    );
    println!(
        "{}",
        serde_json::json!({"impl": "r2m", "backend": backend, "scenario": "rl-step", "vanilla": rv,
            "r2m": rr, "ratio": ratio, "r2m_own_s": own, "head_params": head_params,
            "peak_rss_mib": peak_rss_mib()})
    );
    Ok(())
}
