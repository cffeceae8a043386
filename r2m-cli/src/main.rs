//! The `r2m` command.

mod alloc;
mod backends;
mod bench;
mod check;
mod demo;
mod experiment;
mod progress;
mod rm;
mod train;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use burn::tensor::backend::Backend;
use clap::{Parser, Subcommand};
use r2m_core::Result;
use r2m_models::{generate, load_model, lora, save_hf_dir, GenerationConfig};

use backends::{dispatch, BackendTask, DeviceArg, DtypeArg};

#[derive(Parser, Debug)]
#[command(
    name = "r2m",
    version,
    about = "RLHF with a real-time aligned reward model (R2M), on burn"
)]
struct Cli {
    /// Backend to run on.
    #[arg(long, value_enum, default_value = "auto", global = true)]
    device: DeviceArg,
    /// Float type of weights and activations.
    #[arg(long, value_enum, default_value = "f32", global = true)]
    dtype: DtypeArg,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The whole method in a few minutes: fetch SmolLM2, prepare a reward model on real HH-RLHF
    /// pairs, run RLOO with the R2M reward; writes a run directory with metrics, plots, samples,
    /// checkpoints and the final policy.
    Demo(demo::DemoArgs),
    /// Generate a completion for one or more prompts (batched).
    Generate(GenerateArgs),
    /// Save a model (e.g. the GGUF default) as an HF directory that `transformers` loads.
    Export {
        /// `smollm2`, an HF checkpoint directory, or a .gguf file.
        #[arg(long, default_value = "smollm2")]
        model: String,
        /// A PEFT LoRA adapter directory for the model (e.g. `RUN/adapter`); needs `--merge`.
        #[arg(long, value_name = "DIR", requires = "merge")]
        adapter: Option<PathBuf>,
        /// Fold `--adapter` into the base weights: the export is one plain HF directory.
        #[arg(long, requires = "adapter")]
        merge: bool,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Fetch the default model into the cache and print its path.
    Fetch,
    /// Train a Bradley-Terry reward model on preference pairs.
    TrainRm(rm::TrainRmArgs),
    /// Evaluate a reward model on preference pairs: accuracy, margin, length correlation.
    EvalRm(rm::EvalRmArgs),
    /// Reinforcement learning on a policy (RLOO, GRPO, REINFORCE++, ReMax, PPO) from a TOML config.
    Train(train::TrainArgs),
    /// Experiments that measure the method (`overopt`: reward over-optimization against a gold
    /// reward, across methods and seeds).
    #[command(subcommand)]
    Experiment(experiment::ExperimentCommand),
    /// Benchmarks (tokens/s), printed as text and one JSON line each.
    Bench(bench::BenchArgs),
    /// Print the default RL config with every key documented, or check a config file.
    Config(ConfigArgs),
}

#[derive(clap::Args, Debug)]
#[command(group = clap::ArgGroup::new("what").required(true))]
struct ConfigArgs {
    /// Print `configs/rl-default.toml`: every key, its default and what it does.
    #[arg(long, group = "what")]
    print_default: bool,
    /// Check a config file (with `--set` overrides) and print it resolved.
    #[arg(long, group = "what", value_name = "FILE")]
    check: Option<PathBuf>,
    /// Override a key, e.g. `--set rollout.max_new_tokens=32`.
    #[arg(long, value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
}

#[derive(clap::Args, Debug)]
struct GenerateArgs {
    /// `smollm2`, an HF checkpoint directory, or a .gguf file.
    #[arg(long, default_value = "smollm2")]
    model: String,
    /// A PEFT LoRA adapter directory for the model (merged into its weights before generating).
    #[arg(long, value_name = "DIR")]
    adapter: Option<PathBuf>,
    /// Prompt text; repeat for a batch.
    #[arg(long, required = true)]
    prompt: Vec<String>,
    /// Wrap each prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when the completion contains this string; repeatable.
    #[arg(long)]
    stop: Vec<String>,
}

struct GenerateTask(GenerateArgs);

impl BackendTask for GenerateTask {
    fn run<B: Backend>(self, device: B::Device, backend: &str) -> Result<()> {
        let a = self.0;
        eprintln!("backend: {backend}");
        B::seed(&device, a.seed);
        let t0 = Instant::now();
        fetch_if_default(&a.model)?;
        let mut loaded = load_model::<B>(&a.model, &device)?;
        if let Some(dir) = &a.adapter {
            loaded.model = lora::merge_adapters(lora::load_peft_adapter(loaded.model, dir)?);
        }
        let tok = loaded.tokenizer()?;
        eprintln!("loaded {} in {:.1}s", a.model, t0.elapsed().as_secs_f64());
        let prompts: Vec<Vec<u32>> = a
            .prompt
            .iter()
            .map(|p| {
                if a.chat {
                    tok.encode_user_turn(p)
                } else {
                    tok.encode(p, true)
                }
            })
            .collect::<Result<_>>()?;
        let cfg = GenerationConfig {
            max_new_tokens: a.max_new_tokens,
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            seed: a.seed,
            stop_strings: a.stop.clone(),
            eos_token_ids: Vec::new(),
            min_new_tokens: 0,
        };
        let t0 = Instant::now();
        let outs = generate(&loaded.model, Some(tok), &prompts, &cfg)?;
        let secs = t0.elapsed().as_secs_f64();
        let n_new: usize = outs.iter().map(|g| g.tokens.len()).sum();
        for (p, g) in a.prompt.iter().zip(&outs) {
            if outs.len() > 1 {
                println!("### {p}");
            }
            println!("{}", g.text.as_deref().unwrap_or_default());
        }
        eprintln!(
            "{n_new} new tokens in {secs:.2}s: {:.1} tokens/s (batch {}, prefill included)",
            n_new as f64 / secs,
            outs.len()
        );
        Ok(())
    }
}

struct ExportTask {
    model: String,
    adapter: Option<PathBuf>,
    out: PathBuf,
}

impl BackendTask for ExportTask {
    fn run<B: Backend>(self, device: B::Device, backend: &str) -> Result<()> {
        eprintln!("backend: {backend}");
        let mut loaded = load_model::<B>(&self.model, &device)?;
        if let Some(dir) = &self.adapter {
            loaded.model = lora::merge_adapters(lora::load_peft_adapter(loaded.model, dir)?);
        }
        save_hf_dir(&loaded.model, loaded.tokenizer.as_ref(), &self.out)?;
        println!("{}", self.out.display());
        Ok(())
    }
}

/// Fetch the default model now if `spec` names it and it is not cached, with pip's progress
/// and the checksum check shown (loading it later would fetch it silently).
pub fn fetch_if_default(spec: &str) -> Result<()> {
    if spec == r2m_models::hub::DEFAULT_MODEL {
        r2m_models::hub::fetch_smollm2_with(&mut |msg| eprintln!("{msg}"), true)?;
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(a) => dispatch(cli.device, cli.dtype, GenerateTask(a)),
        Command::Export {
            model,
            adapter,
            merge: _,
            out,
        } => dispatch(
            cli.device,
            cli.dtype,
            ExportTask {
                model,
                adapter,
                out,
            },
        ),
        Command::Fetch => {
            let path = r2m_models::hub::fetch_smollm2_with(&mut |msg| eprintln!("{msg}"), true)?;
            println!("{}", path.display());
            Ok(())
        }
        Command::TrainRm(a) => dispatch(cli.device, cli.dtype, rm::TrainRmTask(a)),
        Command::EvalRm(a) => dispatch(cli.device, cli.dtype, rm::EvalRmTask(a)),
        Command::Train(a) => dispatch(cli.device, cli.dtype, train::TrainTask(a)),
        Command::Bench(a) => bench::run(cli.device, cli.dtype, a),
        Command::Demo(a) => dispatch(cli.device, cli.dtype, demo::DemoTask(a)),
        Command::Experiment(a) => dispatch(cli.device, cli.dtype, experiment::ExperimentTask(a)),
        Command::Config(a) => {
            if a.print_default {
                print!("{}", r2m_rl::config::DEFAULT_CONFIG_TOML);
            } else if let Some(path) = a.check {
                let cfg = r2m_rl::RlConfig::load(&path)?.with_overrides(&a.set)?;
                print!("{}", cfg.to_toml());
                eprintln!("{}: ok", path.display());
            }
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    alloc::keep_freed_memory();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
