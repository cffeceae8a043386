//! `r2m demo`: RLHF that visibly works, on the real default model, in minutes on a laptop CPU.
//!
//! The task is the over-optimization experiment's in miniature ([`crate::overopt`]): the policy
//! is asked for its opinion of made-up films, and a gold reward that degenerate text cannot fool
//! ([`crate::gold`]: VADER sentiment behind quality gates) stands in for the human judge.
//!
//! 1. Load SmolLM2-135M-Instruct (fetched and cached on first use).
//! 2. **Proxy reward model.** Sample pairs of responses from the initial policy on 16 films, label
//!    them with gold, and train a Bradley-Terry scoring head on the frozen backbone. Measure its
//!    agreement with gold on pairs from 8 other films (Wilson 95% interval). Its directory holds
//!    only the head and the base's identity ([`r2m_models::RewardModel::save_head_only`]).
//! 3. **Before.** Greedy responses to 32 held-out prompts (8 films neither the RM nor RL saw),
//!    scored by the proxy and by gold.
//! 4. **RL.** RLOO with the R2M reward (fusion head + GREBT update after every step) against the
//!    proxy, LoRA adapters on the policy, gold measured beside the proxy at every step
//!    ([`crate::overopt::GoldTracked`]; the policy never sees gold).
//! 5. **After.** The same held-out prompts again: the paired change of proxy and gold with
//!    Student-t 95% intervals, and `before_after.jsonl`.
//!
//! ```text
//! RUN/rm/                   the proxy: reward_head.json, score.safetensors, tokenizer, eval.json
//! RUN/rm-pairs.jsonl        its gold-labelled training pairs; RUN/rm-eval-pairs.jsonl held out
//! RUN/prompts-rl.jsonl      the RL prompts
//! RUN/before_after.jsonl    per held-out prompt: greedy response, proxy and gold, before and after
//! RUN/adapter/              the trained LoRA adapter (PEFT); the usual run files (crate r2m-rl)
//! ```

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use burn::module::AutodiffModule;
use burn::tensor::backend::AutodiffBackend;
use r2m_core::{Observer, R2mError, Result};
use r2m_data::{read_preferences, tokenize_pairs, ReadOptions};
use r2m_models::lora::LoraLayers;
use r2m_models::{load_model, RewardModel};
use serde::{Deserialize, Serialize};

use r2m_rl::config::{RewardKind, RlConfig, RmMethod, SaveFinal};
use r2m_rl::reward_training::{train_reward_model, RmEval, RmOutputs, RmTrainConfig, Trainable};
use r2m_rl::run::{train_with, RlSummary, RunControl};
use r2m_rl::{load_prompts, LearnedRm, R2mReward, RlTrainer};

use crate::gold::{Gold, GoldConfig, GoldKind};
use crate::heldout::{HeldOut, HeldOutEval};
use crate::jsonl::write_jsonl;
use crate::overopt::{
    calibrate, eval_prompts, prompts_for, sample_gold_pairs, Calibration, GoldTracked, FILMS,
};
use crate::stats::{paired, wilson, Interval};

/// Sizes of a demo run. [`DemoOptions::default`] is the README's demo; tests shrink it.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub out: PathBuf,
    /// `smollm2` or any model spec [`load_model`] takes.
    pub policy: String,
    /// Gold-labelled pairs the proxy trains on, and held-out pairs (other films) it is
    /// evaluated on.
    pub rm_train_pairs: usize,
    pub rm_eval_pairs: usize,
    pub rm_epochs: usize,
    pub steps: usize,
    pub prompts_per_step: usize,
    pub samples_per_prompt: usize,
    pub max_new_tokens: usize,
    /// The policy's learning rate (LoRA adapters).
    pub lr: f64,
    /// LoRA rank (alpha = 2 r).
    pub lora_r: usize,
    /// Held-out prompts scored before and after (at most 32).
    pub eval_prompts: usize,
    pub seed: u64,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            out: PathBuf::from("runs/demo"),
            policy: "smollm2".into(),
            rm_train_pairs: 160,
            rm_eval_pairs: 120,
            rm_epochs: 8,
            steps: 12,
            prompts_per_step: 4,
            samples_per_prompt: 4,
            max_new_tokens: 40,
            lr: 5e-5,
            lora_r: 16,
            eval_prompts: 32,
            seed: 0,
        }
    }
}

/// The proxy RM's quality: its agreement with gold on held-out pairs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProxyQuality {
    /// Held-out metrics with the fresh head and after training.
    pub eval_before: Option<RmEval>,
    pub eval_after: Option<RmEval>,
    /// Share of held-out pairs the trained proxy orders as gold does, Wilson 95% interval.
    pub agreement: Interval,
    pub calibration: Calibration,
    pub train_pairs: usize,
    pub seconds: f64,
}

/// What the demo did.
#[derive(Debug, Clone, Serialize)]
pub struct DemoSummary {
    pub rm_dir: PathBuf,
    pub proxy: ProxyQuality,
    /// Held-out prompts before the first step and after the last.
    pub before: Vec<HeldOut>,
    pub after: Vec<HeldOut>,
    /// Paired change (after - before) over the held-out prompts.
    pub gold_change: Interval,
    pub proxy_change: Interval,
    pub run: RlSummary,
}

/// The films of the proxy's training pairs, and of its held-out pairs. RL uses the other 16
/// ([`crate::overopt::film_prompts`]) and the held-out evaluation 8 more
/// ([`crate::overopt::EVAL_FILMS`]).
fn rm_prompts() -> (Vec<String>, Vec<String>) {
    (prompts_for(&FILMS[..16]), prompts_for(&FILMS[16..24]))
}

/// The demo's RL config: RLOO + R2M on SmolLM2 with LoRA adapters on every block, the proxy
/// as the reward, the adapter as the final output.
pub fn demo_config(o: &DemoOptions, prompts: &Path, rm: &Path) -> RlConfig {
    let mut c = RlConfig::default();
    c.model.policy = o.policy.clone();
    c.model.trainable = Trainable::Lora;
    c.lora.r = o.lora_r;
    c.lora.alpha = 2.0 * o.lora_r as f64;
    c.lora.layers = LoraLayers::All;
    c.data.prompts = Some(prompts.to_path_buf());
    c.data.max_prompt_len = 128;
    c.rollout.prompts_per_step = o.prompts_per_step;
    c.rollout.samples_per_prompt = o.samples_per_prompt;
    c.rollout.max_new_tokens = o.max_new_tokens;
    c.rollout.temperature = 0.7;
    c.reward.kind = RewardKind::Model;
    c.reward.model = Some(rm.to_path_buf());
    c.algo.kl_coef = 0.01;
    c.optim.lr = o.lr;
    c.optim.warmup_ratio = 0.0;
    c.optim.epochs = 2;
    c.optim.mini_batch_size = (o.prompts_per_step * o.samples_per_prompt / 2).max(1);
    c.optim.micro_batch_size = c.optim.mini_batch_size.min(8);
    c.r2m.method = RmMethod::R2m;
    c.r2m.lr = 1e-4;
    c.run.steps = o.steps;
    c.run.seed = o.seed;
    c.run.out = o.out.clone();
    c.run.log_samples = 4;
    c.run.save_final = SaveFinal::Adapter;
    c.run.checkpoint_every = 4;
    c.run.keep_checkpoints = 1;
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
    let (rl_prompts, _) = crate::overopt::film_prompts();
    let prompts_path = o.out.join("prompts-rl.jsonl");
    let rows: Vec<_> = rl_prompts
        .iter()
        .map(|p| serde_json::json!({ "prompt": p }))
        .collect();
    write_jsonl(&prompts_path, &rows)?;
    let gates = GoldConfig::default();

    say(format!("[1/4] policy: {}", o.policy));
    let loaded = load_model::<B>(&o.policy, device)?;
    let tok = loaded.tokenizer()?.clone();

    let rm_dir = o.out.join("rm");
    let proxy = prepare_proxy::<B>(o, &rm_dir, &loaded.model, &tok, &gates, device, observer)?;
    say(format!(
        "      proxy agrees with gold on {:.1}% of {} held-out pairs (95% CI {:.1}% to {:.1}%; \
         {:.1}% with the untrained head); proxy-gold correlation {:+.2}",
        100.0 * proxy.agreement.mean,
        proxy.agreement.n,
        100.0 * proxy.agreement.ci95_low,
        100.0 * proxy.agreement.ci95_high,
        100.0 * proxy.eval_before.as_ref().map_or(f64::NAN, |e| e.accuracy),
        proxy.calibration.correlation
    ));

    // The proxy as it was trained, fixed: it scores the held-out prompts before and after.
    let rm_budget = 4096;
    let mut fixed_proxy = LearnedRm::<B::InnerBackend>::load(&rm_dir, rm_budget, device)?;
    let held_out: Vec<String> = eval_prompts().into_iter().take(o.eval_prompts).collect();
    let mut eval_gold = Gold::Builtin(GoldKind::Quality, gates.clone());
    let mut eval = HeldOutEval {
        tokenizer: &tok,
        proxy: &mut fixed_proxy,
        max_new_tokens: o.max_new_tokens,
        temperature: 0.0,
        seed: o.seed,
        gold: &mut eval_gold,
    };
    say(format!(
        "[3/4] before RL: greedy responses to {} held-out prompts (8 films nothing trains on)",
        held_out.len()
    ));
    let before = eval.score(&loaded.model.valid(), &held_out)?;

    say(format!(
        "[4/4] RL: RLOO + R2M against the proxy, LoRA r={}, {} steps x {} prompts x {} samples, \
         {} new tokens; gold is measured beside it and never reaches the policy",
        o.lora_r, o.steps, o.prompts_per_step, o.samples_per_prompt, o.max_new_tokens
    ));
    let cfg = demo_config(o, &prompts_path, &rm_dir);
    let opts = ReadOptions {
        skip_bad: cfg.data.skip_bad,
        limit: cfg.data.limit,
    };
    let prompts = load_prompts(&prompts_path, opts, cfg.data.max_prompt_len, &tok, observer)?;
    let rm = LearnedRm::<B::InnerBackend>::load(&rm_dir, cfg.reward.token_budget, device)?;
    let d_p = loaded.model.config.hidden_size;
    let r2m = R2mReward::<B>::new(rm, d_p, cfg.r2m.clone());
    let mut reward = GoldTracked::new(Box::new(r2m), proxy.calibration, 0.1)
        .with_gold(Gold::Builtin(GoldKind::Quality, gates.clone()));
    let mut trainer = RlTrainer::new(loaded.model, Some(tok.clone()), cfg)?;
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

    let after = eval.score(&trainer.policy.valid(), &held_out)?;
    let column = |v: &[HeldOut], f: fn(&HeldOut) -> f64| v.iter().map(f).collect::<Vec<_>>();
    let gold_change = paired(&column(&before, |h| h.gold), &column(&after, |h| h.gold));
    let proxy_change = paired(&column(&before, |h| h.proxy), &column(&after, |h| h.proxy));
    let rows: Vec<_> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| {
            let side = |h: &HeldOut| {
                serde_json::json!({"response": h.response, "proxy": h.proxy, "gold": h.gold})
            };
            serde_json::json!({"prompt": b.prompt, "before": side(b), "after": side(a)})
        })
        .collect();
    write_jsonl(&o.out.join("before_after.jsonl"), &rows)?;
    Ok(DemoSummary {
        rm_dir,
        proxy,
        before,
        after,
        gold_change,
        proxy_change,
        run,
    })
}

/// Step 2: the proxy RM, trained on gold-labelled pairs of the initial policy's responses (or
/// reused from `rm_dir`), with its held-out agreement and its calibration onto gold's scale.
fn prepare_proxy<B: AutodiffBackend>(
    o: &DemoOptions,
    rm_dir: &Path,
    policy: &r2m_models::CausalLm<B>,
    tok: &r2m_models::Tokenizer,
    gates: &GoldConfig,
    device: &B::Device,
    observer: &dyn Observer,
) -> Result<ProxyQuality> {
    let say = |msg: String| observer.message(&msg);
    let quality_path = rm_dir.join("proxy_quality.json");
    if quality_path.exists() {
        say(format!(
            "[2/4] proxy reward model: reusing {}",
            rm_dir.display()
        ));
        let text =
            std::fs::read_to_string(&quality_path).map_err(|e| R2mError::io(&quality_path, e))?;
        return serde_json::from_str(&text)
            .map_err(|e| R2mError::format(&quality_path, e.to_string()));
    }
    let t0 = std::time::Instant::now();
    let (train_prompts, eval_prompts) = rm_prompts();
    say(format!(
        "[2/4] proxy reward model: {} + {} pairs of the initial policy's responses, labelled \
         by gold (sentiment behind quality gates)",
        o.rm_train_pairs, o.rm_eval_pairs
    ));
    let inner = policy.valid();
    let mut gold = Gold::Builtin(GoldKind::Quality, gates.clone());
    let mut sample = |prompts: &[String], n: usize, seed: u64| {
        sample_gold_pairs(
            &inner,
            tok,
            prompts,
            n,
            o.max_new_tokens,
            1.0,
            0.1,
            seed,
            &mut gold,
            observer,
        )
    };
    let (train, _) = sample(&train_prompts, o.rm_train_pairs, o.seed)?;
    let (held, _) = sample(&eval_prompts, o.rm_eval_pairs, o.seed ^ 0xe7a1)?;
    let (train_path, eval_path) = (
        o.out.join("rm-pairs.jsonl"),
        o.out.join("rm-eval-pairs.jsonl"),
    );
    write_jsonl(&train_path, &train)?;
    write_jsonl(&eval_path, &held)?;
    let read = |p: &Path| -> Result<Vec<r2m_data::TokenizedPair>> {
        let (pairs, _) = read_preferences(p, ReadOptions::default())?;
        Ok(tokenize_pairs(tok, &pairs, 256)?.0)
    };
    let (train, held) = (read(&train_path)?, read(&eval_path)?);
    let rm = RewardModel::from_backbone(policy.clone(), o.seed);
    let cfg = RmTrainConfig {
        trainable: Trainable::Head,
        epochs: o.rm_epochs,
        lr: 3e-3,
        seed: o.seed,
        ..Default::default()
    };
    let outputs = RmOutputs {
        dir: rm_dir,
        tokenizer: Some(tok),
        head_only_base: Some(&o.policy),
        observer,
    };
    let (rm, s) = train_reward_model(rm, &train, &held, &cfg, outputs)?;
    let mut learned = LearnedRm {
        model: rm.valid(),
        tokenizer: Some(tok.clone()),
        token_budget: 4096,
        name: "proxy".into(),
    };
    let calibration = calibrate(&mut learned, &eval_path)?;
    let after = s
        .eval_after
        .clone()
        .ok_or_else(|| R2mError::Other("the proxy's held-out evaluation is missing".into()))?;
    let quality = ProxyQuality {
        agreement: wilson(after.accuracy * after.pairs as f64, after.pairs),
        eval_before: s.eval_before,
        eval_after: s.eval_after,
        calibration,
        train_pairs: s.train_pairs,
        seconds: t0.elapsed().as_secs_f64(),
    };
    let text = serde_json::to_string_pretty(&quality).expect("json");
    std::fs::write(&quality_path, text).map_err(|e| R2mError::io(&quality_path, e))?;
    let _ = device;
    Ok(quality)
}
