//! `r2m bench`: SmolLM2 throughput, printed as text and as one JSON line per scenario.
//!
//! Run `scripts/reference/bench_torch.py` on the same machine for the PyTorch side; the README
//! gives the command that runs both.

use std::time::Instant;

use burn::backend::Autodiff;
use burn::module::{AutodiffModule, Module};
use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use clap::ValueEnum;
use r2m_core::Result;
use r2m_models::{fused, generate, load_model, CausalLm, GenerationConfig, Padding};
use r2m_rl::rollout::{final_hidden, Start};
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::backends::{dispatch, BackendTask, DeviceArg, DtypeArg};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Forward pass only (no autodiff).
    Forward,
    /// Forward pass to the last hidden states, without the LM head (what a reward model runs).
    Hidden,
    /// Forward + backward + AdamW step, all layers trainable (or the top `--train-top` blocks).
    Train,
    /// KV-cache generation: `--gen-prompt` random prompt tokens, exactly `--gen-new` new tokens,
    /// for each of `--gen-batches`, greedy and sampled.
    Generate,
    /// The GEMMs of a training step at `batch x seq` tokens (GFLOP/s calibration), through
    /// `fused::matmul` as the model runs them: the MLP's, attention projections' and LM head's
    /// products forward, and both of their gradients with the transposed operands the backward
    /// pass hands over.
    Gemm,
    /// RL steps of the `--config` run, vanilla and R2M alternating on the same prompts, every
    /// response `max_new_tokens` long: per-step time split and the R2M / vanilla ratio.
    RlStep,
    /// Correctness on this backend, to run before timing it: the tiny fixtures' logits against
    /// PyTorch (`--fixtures`), KV-cache decoding against the full forward pass, sampling on the
    /// device against the host. Fails when one is off (see `check.rs`).
    Check,
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
    /// `rl-step`: RL steps of each method.
    #[arg(long, default_value_t = 3)]
    rl_steps: usize,
    /// `rl-step`: the methods timed, alternating step by step on the same prompts (one alone
    /// gives that arm's peak memory).
    #[arg(long, value_delimiter = ',', default_value = "vanilla,r2m")]
    methods: Vec<String>,
    /// `rl-step`: override a key of `--config` (`--set model.trainable=lora --set lora.r=16`);
    /// repeatable, as `r2m train --set`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// `train`: LoRA adapters of rank R on every projection (alpha = 2R) instead of trainable
    /// weights, on the top `--train-top` blocks (all blocks without it).
    #[arg(long, value_name = "R")]
    lora: Option<usize>,
    /// `train`: only the top N blocks trainable (embeddings, LM head and lower blocks frozen, as
    /// `model.trainable = "top:N"`: the frozen part runs without autodiff).
    #[arg(long)]
    train_top: Option<usize>,
    /// `generate`: prompt length (random token ids).
    #[arg(long, default_value_t = 64)]
    gen_prompt: usize,
    /// `generate`: new tokens per row (EOS is masked until then, so every row runs to the end).
    #[arg(long, default_value_t = 128)]
    gen_new: usize,
    /// `generate`: batch sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    gen_batches: Vec<usize>,
    /// `generate`: `greedy`, `sampled` (temperature 1, no top-k/top-p), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "greedy,sampled")]
    gen_modes: Vec<String>,
    /// `train`: the accelerator's dense peak in TFLOP/s for the dtype (e.g. 989 for bf16 on an
    /// H100/H200); when given, MFU is reported.
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// `train`: wait for the device after each phase (body forward, LM head + log-probs, backward,
    /// optimizer) and report each phase's median time; the step time then includes the waits.
    #[arg(long)]
    split: bool,
    /// `check`: the folder of PyTorch fixtures (the repository's `tests/fixtures`).
    #[arg(long, default_value = "tests/fixtures")]
    fixtures: std::path::PathBuf,
}

pub fn run(device: DeviceArg, dtype: DtypeArg, args: BenchArgs) -> Result<()> {
    dispatch(device, dtype, BenchTask(args))
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

impl BackendTask for BenchTask {
    fn run<B: Backend>(self, device: B::Device, backend: &str) -> Result<()> {
        let a = self.0;
        eprintln!("backend: {backend}");
        let model = load_model::<B>(&a.model, &device)?.model;
        let vocab = model.config.vocab_size;
        let tokens_per_iter = (a.batch * a.seq) as f64;
        for scenario in &a.scenarios {
            let mut times = Vec::new();
            let mut split: Option<Vec<(&str, f64)>> = None;
            match scenario {
                Scenario::RlStep => {
                    rl_step::<B>(&a, &device, backend)?;
                    continue;
                }
                Scenario::Generate => {
                    bench_generate(&model, &a, backend)?;
                    continue;
                }
                Scenario::Check => {
                    crate::check::run::<B>(&a.fixtures, &device, backend)?;
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
                    bench_gemm::<B>(&model.config, &a, &device, backend);
                    continue;
                }
                Scenario::Train => {
                    let phases;
                    (times, phases) = bench_train::<B>(&a, &device)?;
                    split = phases;
                }
            }
            let secs = median(times);
            let name = match scenario {
                Scenario::Forward => "forward",
                Scenario::Hidden => "hidden",
                Scenario::Gemm | Scenario::RlStep | Scenario::Generate | Scenario::Check => {
                    unreachable!("reported above")
                }
                Scenario::Train => "train",
            };
            let tps = tokens_per_iter / secs;
            let peak = peak_rss_mib();
            // Training FLOPs per token (PaLM appendix B): 6 x (non-embedding params + LM head)
            // + 12 x layers x hidden x seq for attention. Only meaningful with all layers trainable.
            let full = a.train_top.is_none() && a.lora.is_none();
            let train_flops = (*scenario == Scenario::Train && full).then(|| {
                let c = &model.config;
                let p_body = (model.num_params() - c.vocab_size * c.hidden_size) as f64;
                let p_head = (c.vocab_size * c.hidden_size) as f64;
                let per_token =
                    6.0 * (p_body + p_head) + 12.0 * (c.num_layers * c.hidden_size * a.seq) as f64;
                per_token * tps
            });
            let mfu = train_flops.zip(a.peak_tflops).map(|(f, p)| f / (p * 1e12));
            let top = a.train_top.filter(|_| *scenario == Scenario::Train);
            let lora = a.lora.filter(|_| *scenario == Scenario::Train);
            println!(
                "r2m {name:<8} backend={backend} batch={}x{}{}{} {:.1} ms/iter {:.1} tokens/s{}{} peak_rss={:.0} MiB",
                a.batch,
                a.seq,
                top.map(|n| format!(" top:{n}")).unwrap_or_default(),
                lora.map(|r| format!(" lora r{r}")).unwrap_or_default(),
                secs * 1e3,
                tps,
                train_flops.map(|f| format!(" {:.2} TFLOP/s", f / 1e12)).unwrap_or_default(),
                mfu.map(|m| format!(" MFU {:.1}%", 100.0 * m)).unwrap_or_default(),
                peak.unwrap_or(f64::NAN)
            );
            if let Some(phases) = &split {
                let line: Vec<String> = phases
                    .iter()
                    .map(|(phase, s)| format!("{phase} {:.1} ms", s * 1e3))
                    .collect();
                println!("    split (median): {}", line.join(" | "));
            }
            let split_ms = split.map(|p| {
                p.into_iter()
                    .map(|(phase, s)| (phase.to_string(), serde_json::json!(s * 1e3)))
                    .collect::<serde_json::Map<_, _>>()
            });
            println!(
                "{}",
                serde_json::json!({"impl": "r2m", "backend": backend, "scenario": name, "batch": a.batch,
                    "seq": a.seq, "train_top": top, "lora_r": lora, "ms_per_iter": secs * 1e3, "tokens_per_s": tps,
                    "tflops": train_flops.map(|f| f / 1e12), "mfu": mfu, "peak_rss_mib": peak,
                    "split_ms": split_ms})
            );
        }
        Ok(())
    }
}

/// One product of [`bench_gemm`]: `[m, k] x [k, n]`, each operand either row-major or the
/// transpose of a row-major tensor (as the backward pass passes them).
struct GemmCase {
    name: &'static str,
    m: usize,
    k: usize,
    n: usize,
    lhs_transposed: bool,
    rhs_transposed: bool,
}

/// Times each GEMM of a training step (the median of `10 x --iters` runs after a warm-up) and
/// prints its GFLOP/s, with one JSON line per product.
fn bench_gemm<B: Backend>(
    c: &r2m_models::ModelConfig,
    a: &BenchArgs,
    device: &B::Device,
    backend: &str,
) {
    let t = a.batch * a.seq;
    let (h, i, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let case = |name, m, k, n, lhs_transposed, rhs_transposed| GemmCase {
        name,
        m,
        k,
        n,
        lhs_transposed,
        rhs_transposed,
    };
    // Forward `x w`; backward `dy wᵀ` and `xᵀ dy` (w stored `[d_in, d_out]`, the tied head as
    // `embedᵀ`).
    let cases = [
        case("mlp up x.w", t, h, i, false, false),
        case("mlp up dy.wT", t, i, h, false, true),
        case("mlp up xT.dy", h, t, i, true, false),
        case("mlp down x.w", t, i, h, false, false),
        case("mlp down dy.wT", t, h, i, false, true),
        case("mlp down xT.dy", i, t, h, true, false),
        case("q/o x.w", t, h, h, false, false),
        case("q/o dy.wT", t, h, h, false, true),
        case("q/o xT.dy", h, t, h, true, false),
        case("head x.eT", t, h, v, false, true),
        case("head dy.e", t, v, h, false, false),
        case("head xT.dy", h, t, v, true, false),
    ];
    let random = |rows, cols, transposed: bool| {
        let dims = if transposed {
            [cols, rows]
        } else {
            [rows, cols]
        };
        let x = Tensor::<B, 2>::random(dims, burn::tensor::Distribution::Default, device);
        if transposed {
            x.transpose()
        } else {
            x
        }
    };
    for g in cases {
        let x = random(g.m, g.k, g.lhs_transposed);
        let w = random(g.k, g.n, g.rhs_transposed);
        // Large products run fewer times.
        let reps = (a.iters * 10).min((4e11 / (2 * g.m * g.k * g.n) as f64).ceil() as usize);
        let mut times = Vec::new();
        for r in 0..=reps.max(1) {
            let t0 = Instant::now();
            // The product the model runs (`fused::matmul`: on flex the gemm crate directly).
            let _ = fused::matmul(x.clone(), w.clone())
                .narrow(0, 0, 1)
                .sum()
                .into_scalar();
            if r > 0 {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
        let gflops = 2.0 * (g.m * g.k * g.n) as f64 / median(times) / 1e9;
        let (m, k, n) = (g.m, g.k, g.n);
        println!(
            "r2m gemm     backend={backend} {:<16} {m}x{k}x{n} {gflops:.1} GFLOP/s",
            g.name
        );
        println!(
            "{}",
            serde_json::json!({"impl": "r2m", "backend": backend, "scenario": "gemm",
                "product": g.name, "m": m, "k": k, "n": n,
                "lhs_transposed": g.lhs_transposed, "rhs_transposed": g.rhs_transposed,
                "gflops": gflops})
        );
    }
}

/// The phases of one training step, as `--split` reports them.
const TRAIN_PHASES: [&str; 4] = ["body forward", "head forward", "backward", "optimizer"];

/// Seconds of each timed step, and with `--split` the median seconds of each phase.
type TrainTimes = (Vec<f64>, Option<Vec<(&'static str, f64)>>);

/// Forward + backward + AdamW on `batch x seq` random tokens; the seconds of each timed step.
/// With `--train-top N`, the frozen lower blocks run on the inner backend (no autodiff graph) and
/// only the top N blocks train, as the RL trainer does.
fn bench_train<B: Backend>(a: &BenchArgs, device: &B::Device) -> Result<TrainTimes> {
    let mut m: CausalLm<Autodiff<B>> = load_model::<Autodiff<B>>(&a.model, device)?.model;
    let n_layers = m.layers.len();
    let start = match a.train_top {
        Some(k) if k > n_layers => {
            return Err(r2m_core::R2mError::Config(format!(
                "--train-top {k}: the model has only {n_layers} blocks"
            )))
        }
        Some(k) => {
            m = m.with_frozen_embeddings_and_head();
            n_layers - k
        }
        None => 0,
    };
    if let Some(r) = a.lora {
        // Adapters on every projection of the same blocks; every base weight frozen.
        let cfg = r2m_models::lora::LoraConfig {
            r,
            alpha: 2.0 * r as f64,
            layers: match a.train_top {
                Some(k) => r2m_models::lora::LoraLayers::Top(k),
                None => r2m_models::lora::LoraLayers::All,
            },
            ..Default::default()
        };
        m = r2m_models::lora::add_adapters(m, &cfg)?;
    }
    // The trainers' AdamW (one pass per tensor on flex), with burn's default weight decay.
    let mut optim = r2m_rl::optim::adamw::<Autodiff<B>, CausalLm<Autodiff<B>>>(1e-4);
    let vocab = m.config.vocab_size;
    let tokens = random_tokens::<Autodiff<B>>(a.batch, a.seq + 1, vocab, device);
    let (inputs, targets) = (
        tokens.clone().narrow(1, 0, a.seq),
        tokens.narrow(1, 1, a.seq),
    );
    let padding = Padding::none(a.batch, a.seq);
    let mut times = Vec::new();
    let mut phase_times = vec![Vec::new(); TRAIN_PHASES.len()];
    // With `--split`: wait for the device and note the time since the last mark.
    let mut mark = |phase: usize, since: &mut Instant, timed: bool| -> Result<()> {
        if a.split {
            B::sync(device)
                .map_err(|e| r2m_core::R2mError::Other(format!("waiting for the device: {e:?}")))?;
            if timed {
                phase_times[phase].push(since.elapsed().as_secs_f64());
            }
            *since = Instant::now();
        }
        Ok(())
    };
    for i in 0..=a.iters {
        let t0 = Instant::now();
        let mut since = t0;
        // As the trainer does: the frozen lower blocks run once without autodiff.
        let from = if start > 0 {
            let frozen = m.valid();
            let x = frozen.embed(inputs.clone().inner());
            let x = frozen.forward_layers(x, &padding, 0..start, None);
            Start::Stream(Tensor::from_inner(x), start)
        } else {
            Start::Tokens(inputs.clone())
        };
        let h = final_hidden(&m, from, &padding);
        mark(0, &mut since, i > 0)?;
        let loss = fused::token_log_probs(m.lm_head(h), targets.clone())
            .mean()
            .neg();
        mark(1, &mut since, i > 0)?;
        let grads = GradientsParams::from_grads(loss.backward(), &m);
        mark(2, &mut since, i > 0)?;
        m = optim.step(1e-5, m, grads);
        // Wait for the update to finish before stopping the clock.
        let _ = m.layers[n_layers - 1]
            .mlp
            .down_proj
            .weight
            .val()
            .narrow(0, 0, 1)
            .sum()
            .into_scalar();
        mark(3, &mut since, i > 0)?;
        if i > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let split = a.split.then(|| {
        TRAIN_PHASES
            .iter()
            .zip(phase_times)
            .map(|(phase, t)| (*phase, median(t)))
            .collect()
    });
    Ok((times, split))
}

/// KV-cache generation throughput: new tokens x batch / wall time (prefill included).
fn bench_generate<B: Backend>(model: &CausalLm<B>, a: &BenchArgs, backend: &str) -> Result<()> {
    let vocab = model.config.vocab_size;
    for mode in &a.gen_modes {
        let temperature = match mode.as_str() {
            "greedy" => 0.0,
            "sampled" => 1.0,
            other => {
                return Err(r2m_core::R2mError::Config(format!(
                    "--gen-modes: unknown mode `{other}` (greedy, sampled)"
                )))
            }
        };
        for &batch in &a.gen_batches {
            let mut rng = StdRng::seed_from_u64(batch as u64);
            let prompts: Vec<Vec<u32>> = (0..batch)
                .map(|_| {
                    (0..a.gen_prompt)
                        .map(|_| rng.random_range(0..vocab as u32))
                        .collect()
                })
                .collect();
            let cfg = GenerationConfig {
                max_new_tokens: a.gen_new,
                min_new_tokens: a.gen_new,
                temperature,
                ..Default::default()
            };
            let mut times = Vec::new();
            for i in 0..=a.iters {
                let t0 = Instant::now();
                let out = generate(model, None, &prompts, &cfg)?;
                debug_assert!(out.iter().all(|g| g.tokens.len() == a.gen_new));
                if i > 0 {
                    times.push(t0.elapsed().as_secs_f64());
                }
            }
            let secs = median(times);
            let tps = (batch * a.gen_new) as f64 / secs;
            let peak = peak_rss_mib();
            println!(
                "r2m generate backend={backend} batch={batch} {mode} prompt={} new={} {:.1} ms {:.1} tokens/s peak_rss={:.0} MiB",
                a.gen_prompt,
                a.gen_new,
                secs * 1e3,
                tps,
                peak.unwrap_or(f64::NAN)
            );
            println!(
                "{}",
                serde_json::json!({"impl": "r2m", "backend": backend, "scenario": "generate",
                    "mode": mode, "batch": batch, "prompt_len": a.gen_prompt, "new_tokens": a.gen_new,
                    "ms_per_iter": secs * 1e3, "tokens_per_s": tps, "peak_rss_mib": peak})
            );
        }
    }
    Ok(())
}

/// Vanilla and R2M RL steps, alternating so that both see the same machine load.
fn rl_step<B: Backend>(a: &BenchArgs, device: &B::Device, backend: &str) -> Result<()> {
    use r2m_rl::config::RmMethod;
    use r2m_rl::{PromptSampler, RlConfig, RlTrainer, RolloutReward, StepMetrics};
    let path = a.config.as_ref().ok_or_else(|| {
        r2m_core::R2mError::Config(
            "rl-step needs --config RUN.toml (with a learned reward model)".into(),
        )
    })?;
    let mut cfg = RlConfig::load(path)?.with_overrides(&a.set)?;
    // Every response runs to max_new_tokens (EOS masked until then) in every arm, so they do the
    // same generation and scoring work and the ratio measures the methods, not sampled lengths.
    cfg.rollout.min_new_tokens = cfg.rollout.max_new_tokens;
    cfg.validate()?;
    if cfg.reward.model.is_none() {
        return Err(r2m_core::R2mError::Config(format!(
            "{}: rl-step needs reward.model",
            path.display()
        )));
    }
    let loaded = load_model::<Autodiff<B>>(&cfg.model.policy, device)?;
    let tok = loaded.tokenizer()?.clone();
    let term = crate::progress::Terminal::new();
    let prompts = crate::train::read_rl_prompts(&cfg, &tok, &term)?;
    let d_p = loaded.model.config.hidden_size;
    struct Arm<B: burn::tensor::backend::AutodiffBackend> {
        name: String,
        trainer: RlTrainer<B>,
        reward: Box<dyn RolloutReward<B::InnerBackend>>,
        steps: Vec<StepMetrics>,
        /// The padding share the training passes would have had without sorting micro-batches.
        unsorted_pad: Vec<f64>,
    }
    let mut arms = Vec::new();
    for name in &a.methods {
        let mut c = cfg.clone();
        c.r2m.method = match name.as_str() {
            "vanilla" => RmMethod::Vanilla,
            "r2m" => RmMethod::R2m,
            other => {
                return Err(r2m_core::R2mError::Config(format!(
                    "--methods: `{other}`, expected `vanilla` or `r2m`"
                )))
            }
        };
        let reward =
            r2m_rl::r2m_reward::reward_from_config::<Autodiff<B>>(&c, d_p, false, device, &term)?;
        let trainer = RlTrainer::new(loaded.model.clone(), Some(tok.clone()), c)?;
        arms.push(Arm {
            name: name.clone(),
            trainer,
            reward,
            steps: Vec::new(),
            unsorted_pad: Vec::new(),
        });
    }
    drop(loaded);
    let mut sampler = PromptSampler::new(prompts.len(), cfg.run.seed);
    for i in 0..a.rl_steps {
        let batch: Vec<_> = sampler
            .next_batch(cfg.rollout.prompts_per_step)
            .into_iter()
            .map(|j| prompts[j].clone())
            .collect();
        let mut line = format!("step {}:", i + 1);
        for arm in &mut arms {
            let (m, exp) = arm.trainer.step(batch.clone(), arm.reward.as_mut())?;
            arm.unsorted_pad
                .push(unsorted_pad_share(&exp, &cfg.optim, i as u64));
            line += &format!(
                " {} {:.1}s (generate {:.1}, log-probs {:.1}, reward {:.2}, update {:.1}, rm update {:.2})",
                arm.name, m.time_step, m.time_generate, m.time_logprobs, m.time_reward,
                m.time_update, m.time_rm_update
            );
            arm.steps.push(m);
        }
        eprintln!("{line}");
    }
    let mean = |m: &[StepMetrics], f: fn(&StepMetrics) -> f64| {
        m.iter().map(f).sum::<f64>() / m.len().max(1) as f64
    };
    // The checkpoint each arm writes (what trains + AdamW state + R2M state), in MiB.
    let tmp = std::env::temp_dir().join(format!("r2m-bench-ckpt-{}", std::process::id()));
    let mut rows = serde_json::Map::new();
    for arm in &arms {
        let dir = tmp.join(&arm.name);
        arm.trainer.save_checkpoint(&dir)?;
        arm.reward.save_state(&dir.join("r2m"))?;
        let ckpt_mib = dir_bytes(&dir) as f64 / (1024.0 * 1024.0);
        let m = &arm.steps;
        let row = serde_json::json!({
            "step_s": mean(m, |x| x.time_step),
            "generate_s": mean(m, |x| x.time_generate),
            "logprobs_s": mean(m, |x| x.time_logprobs),
            "reward_s": mean(m, |x| x.time_reward),
            "update_s": mean(m, |x| x.time_update),
            "rm_update_s": mean(m, |x| x.time_rm_update),
            "response_len": mean(m, |x| x.response_len),
            "checkpoint_mib": ckpt_mib,
            "pad_share": mean(m, |x| x.pad_share),
            "pad_share_unsorted": arm.unsorted_pad.iter().sum::<f64>() / m.len().max(1) as f64,
        });
        println!(
            "r2m rl-step backend={backend} trainable={} method={} steps={} rows={}: {:.2}s/step (generate {:.2}, log-probs {:.2}, reward {:.2}, update {:.2}, rm update {:.2}); checkpoint {:.1} MiB; training grid {:.1}% padding ({:.1}% unsorted)",
            cfg.model.trainable, arm.name, a.rl_steps,
            cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt,
            row["step_s"].as_f64().unwrap_or(0.0), row["generate_s"].as_f64().unwrap_or(0.0),
            row["logprobs_s"].as_f64().unwrap_or(0.0), row["reward_s"].as_f64().unwrap_or(0.0),
            row["update_s"].as_f64().unwrap_or(0.0), row["rm_update_s"].as_f64().unwrap_or(0.0),
            ckpt_mib, 100.0 * row["pad_share"].as_f64().unwrap_or(0.0),
            100.0 * row["pad_share_unsorted"].as_f64().unwrap_or(0.0)
        );
        rows.insert(arm.name.clone(), row);
    }
    let _ = std::fs::remove_dir_all(&tmp);
    let step = |n: &str| rows.get(n).and_then(|r| r["step_s"].as_f64());
    let ratio = step("r2m").zip(step("vanilla")).map(|(r, v)| r / v);
    if let Some(r) = ratio {
        println!("r2m / vanilla step time: {r:.3}");
    }
    let lora = (cfg.model.trainable == r2m_rl::Trainable::Lora)
        .then(|| serde_json::json!({"r": cfg.lora.r, "layers": cfg.lora.layers.to_string()}));
    println!(
        "{}",
        serde_json::json!({"impl": "r2m", "backend": backend, "scenario": "rl-step",
            "trainable": cfg.model.trainable.to_string(), "lora": lora, "methods": rows,
            "ratio": ratio, "peak_rss_mib": peak_rss_mib()})
    );
    Ok(())
}

/// The share of padding in the training passes' grids of `exp` with mini-batches in a shuffled
/// order and micro-batches cut without sorting (how the update ran before it sorted them).
fn unsorted_pad_share<B: Backend>(
    exp: &r2m_rl::Experience<B>,
    optim: &r2m_rl::config::OptimConfig,
    seed: u64,
) -> f64 {
    use r2m_rl::update::{grid_padding, micro_batches};
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let (mut cells, mut padding) = (0, 0);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for _ in 0..optim.epochs {
        let mut order: Vec<usize> = (0..exp.rows()).collect();
        order.shuffle(&mut rng);
        for mb in order.chunks(optim.mini_batch_size) {
            for micro in micro_batches(exp, mb, optim.micro_batch_size, false) {
                let (c, p) = grid_padding(exp, &micro);
                (cells, padding) = (cells + c, padding + p);
            }
        }
    }
    padding as f64 / cells.max(1) as f64
}

/// Bytes of the files under `dir`.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => dir_bytes(&e.path()),
                    _ => e.metadata().map(|m| m.len()).unwrap_or(0),
                })
                .sum()
        })
        .unwrap_or(0)
}
