//! `r2m demo`: the whole method on the real default model in a few minutes on a laptop CPU.
//!
//! 1. Load SmolLM2-135M-Instruct (fetched and cached on first use).
//! 2. Prepare a reward model on the same backbone: a Bradley-Terry scoring head on frozen
//!    features of real HH-RLHF pairs (the 160-pair slice shipped in `data/`), evaluated on
//!    held-out pairs before and after. A later demo in the same directory reuses it.
//! 3. RLOO with the R2M reward (fusion head + GREBT update after every step) on the slice's
//!    prompts, writing a normal run directory (see [`r2m_rl::run_dir`]): metrics, plots, samples,
//!    checkpoints, the final policy as an HF directory.
//!
//! The RM is deliberately cheap (head only, tens of pairs): the demo shows the machinery, and its
//! summary prints the RM's held-out accuracy so nobody mistakes it for a good RM.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use burn::tensor::backend::AutodiffBackend;
use r2m_core::{Observer, R2mError, Result};
use r2m_data::{read_preferences, tokenize_pairs, ReadOptions};
use r2m_models::{load_model, RewardModel};
use serde::Serialize;

use r2m_rl::config::{RewardKind, RlConfig, RmMethod};
use r2m_rl::reward_training::{train_reward_model, RmEval, RmOutputs, RmTrainConfig, Trainable};
use r2m_rl::run::{train_with, RlSummary, RunControl};
use r2m_rl::{load_prompts, LearnedRm, R2mReward, RlTrainer};

/// The HH-RLHF slice the demo uses (MIT, see `data/README.md`).
pub const DEMO_DATA: &str = include_str!("../../data/hh-harmless-demo.jsonl");

/// Sizes of a demo run. [`DemoOptions::default`] is the README's demo; tests shrink it.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub out: PathBuf,
    /// `smollm2` or any model spec [`load_model`] takes.
    pub policy: String,
    /// Pairs the RM head trains on, and held-out pairs it is evaluated on.
    pub rm_train_pairs: usize,
    pub rm_eval_pairs: usize,
    pub rm_epochs: usize,
    pub steps: usize,
    pub prompts_per_step: usize,
    pub samples_per_prompt: usize,
    pub max_new_tokens: usize,
    pub seed: u64,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            out: PathBuf::from("runs/demo"),
            policy: "smollm2".into(),
            rm_train_pairs: 48,
            rm_eval_pairs: 32,
            rm_epochs: 4,
            steps: 6,
            prompts_per_step: 4,
            samples_per_prompt: 4,
            max_new_tokens: 32,
            seed: 0,
        }
    }
}

/// What the demo did.
#[derive(Debug, Clone, Serialize)]
pub struct DemoSummary {
    pub rm_dir: PathBuf,
    /// Held-out RM metrics before and after training the head (`None` when reused).
    pub rm_eval_before: Option<RmEval>,
    pub rm_eval_after: Option<RmEval>,
    pub rm_seconds: f64,
    pub run: RlSummary,
}

/// The demo's RL config: RLOO + R2M on SmolLM2 with the top 2 blocks trainable.
pub fn demo_config(o: &DemoOptions, data: &Path, rm: &Path) -> RlConfig {
    let mut c = RlConfig::default();
    c.model.policy = o.policy.clone();
    c.model.trainable = Trainable::Top(2);
    c.data.prompts = Some(data.to_path_buf());
    c.data.max_prompt_len = 160;
    c.rollout.prompts_per_step = o.prompts_per_step;
    c.rollout.samples_per_prompt = o.samples_per_prompt;
    c.rollout.max_new_tokens = o.max_new_tokens;
    c.rollout.temperature = 0.7;
    c.reward.kind = RewardKind::Model;
    c.reward.model = Some(rm.to_path_buf());
    c.algo.kl_coef = 0.01;
    c.optim.lr = 2e-5;
    c.optim.epochs = 2;
    c.optim.mini_batch_size = (o.prompts_per_step * o.samples_per_prompt / 2).max(1);
    c.optim.micro_batch_size = c.optim.mini_batch_size.min(4);
    c.r2m.method = RmMethod::R2m;
    c.r2m.lr = 1e-5;
    c.run.steps = o.steps;
    c.run.seed = o.seed;
    c.run.out = o.out.clone();
    c.run.checkpoint_every = 2;
    c
}

/// Run the demo on backend `B` (see the module docs).
pub fn run_demo<B: AutodiffBackend>(
    o: &DemoOptions,
    device: &B::Device,
    interrupt: Option<&AtomicBool>,
    observer: &dyn Observer,
) -> Result<DemoSummary> {
    let say = |msg: String| observer.message(&msg);
    std::fs::create_dir_all(&o.out).map_err(|e| R2mError::io(&o.out, e))?;
    let data = o.out.join("hh-harmless-demo.jsonl");
    std::fs::write(&data, DEMO_DATA).map_err(|e| R2mError::io(&data, e))?;

    say(format!("[1/3] policy: {}", o.policy));
    let loaded = load_model::<B>(&o.policy, device)?;
    let tok = loaded.tokenizer()?.clone();

    let rm_dir = o.out.join("rm");
    let t_rm = std::time::Instant::now();
    let (before, after) = if rm_dir.join("config.json").exists() {
        say(format!("[2/3] reward model: reusing {}", rm_dir.display()));
        (None, None)
    } else {
        let need = o.rm_train_pairs + o.rm_eval_pairs;
        let (pairs, _) = read_preferences(
            &data,
            ReadOptions {
                skip_bad: true,
                limit: Some(need),
            },
        )?;
        let (pairs, report) = tokenize_pairs(&tok, &pairs, 256)?;
        if pairs.len() < need {
            return Err(R2mError::Config(format!(
                "demo: {} usable pairs, {need} needed ({report})",
                pairs.len()
            )));
        }
        let (train, eval) = pairs.split_at(o.rm_train_pairs);
        say(format!(
            "[2/3] reward model: BT head on frozen SmolLM2 features, {} pairs, {} held out",
            train.len(),
            eval.len()
        ));
        let rm = RewardModel::from_backbone(loaded.model.clone(), o.seed);
        let cfg = RmTrainConfig {
            trainable: Trainable::Head,
            epochs: o.rm_epochs,
            lr: 3e-3,
            seed: o.seed,
            ..Default::default()
        };
        let outputs = RmOutputs {
            dir: &rm_dir,
            tokenizer: Some(&tok),
            observer,
        };
        let (_, s) = train_reward_model(rm, train, eval, &cfg, outputs)?;
        (s.eval_before, s.eval_after)
    };
    let rm_seconds = t_rm.elapsed().as_secs_f64();

    say(format!(
        "[3/3] RL: RLOO + R2M, {} steps x {} prompts x {} samples, {} new tokens",
        o.steps, o.prompts_per_step, o.samples_per_prompt, o.max_new_tokens
    ));
    let cfg = demo_config(o, &data, &rm_dir);
    let opts = ReadOptions {
        skip_bad: cfg.data.skip_bad,
        limit: cfg.data.limit,
    };
    let prompts = load_prompts(&data, opts, cfg.data.max_prompt_len, &tok, observer)?;
    let rm = LearnedRm::<B::InnerBackend>::load(&rm_dir, cfg.reward.token_budget, device)?;
    let d_p = loaded.model.config.hidden_size;
    let mut reward = R2mReward::<B>::new(rm, d_p, cfg.r2m.clone());
    let mut trainer = RlTrainer::new(loaded.model, Some(tok), cfg)?;
    // A crashed or interrupted demo continues; a finished one starts over (reusing the RM).
    let last = r2m_rl::run::list_checkpoints(&o.out)?
        .last()
        .map(|(s, _)| *s);
    if last.is_some_and(|s| s >= o.steps) {
        let ck = o.out.join("checkpoints");
        std::fs::remove_dir_all(&ck).map_err(|e| R2mError::io(&ck, e))?;
    }
    let resume = last.is_some_and(|s| s < o.steps);
    let run = train_with(
        &mut trainer,
        &prompts,
        &mut reward,
        RunControl {
            out: Some(&o.out),
            resume,
            interrupt,
            observer,
            ..Default::default()
        },
    )?;
    Ok(DemoSummary {
        rm_dir,
        rm_eval_before: before,
        rm_eval_after: after,
        rm_seconds,
        run,
    })
}
