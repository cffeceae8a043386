//! The run directory: checkpoints, exact resume after SIGKILL and after an interrupt, the stop on
//! non-finite values, and the demo in a reduced form.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use burn::module::AutodiffModule;
use r2m_core::R2mError;
use r2m_rl::advantage::AdvantageKind;
use r2m_rl::config::{RewardKind, RewardSection, RmMethod};
use r2m_rl::run::checkpoint_dir;
use r2m_rl::{
    train_with, R2mReward, RewardFn, RewardInput, RlConfig, RlSummary, RlTrainer, RuleReward,
    RunControl, RunEnd, StepMetrics,
};

use crate::common::*;

const CHILD_ENV: &str = "R2M_TEST_RESUME_CHILD_DIR";

/// PPO (critic, GAE) with the R2M reward and the adaptive KL controller, so that every piece of
/// state a checkpoint holds changes from step to step.
fn config() -> RlConfig {
    let mut cfg = crate::r2m::config(RmMethod::R2m);
    cfg.rollout.samples_per_prompt = 2;
    cfg.rollout.max_new_tokens = 5;
    cfg.algo.advantage = AdvantageKind::Gae;
    cfg.algo.critic_lr = 1e-2;
    cfg.algo.kl_target = Some(0.5);
    cfg.optim.mini_batch_size = 3;
    cfg.optim.micro_batch_size = 2;
    cfg.run.steps = 6;
    cfg.run.checkpoint_every = 1;
    cfg.run.keep_checkpoints = 2;
    cfg
}

fn tiny_r2m(cfg: &RlConfig) -> R2mReward<AB> {
    crate::r2m::r2m(RmMethod::R2m, cfg)
}

/// Run (or resume) the tiny R2M run in `dir`.
fn run<'a>(
    dir: &'a Path,
    resume: bool,
    interrupt: Option<&'a AtomicBool>,
    after_step: Option<&'a mut r2m_rl::run::AfterStep<'a, AB>>,
) -> r2m_core::Result<RlSummary> {
    let cfg = config();
    let mut reward = tiny_r2m(&cfg);
    let mut trainer = RlTrainer::new(tiny_policy(), None, cfg).unwrap();
    // 5 prompts, 3 per step: the sampler's position and reshuffles are part of the state.
    train_with(
        &mut trainer,
        &tiny_prompts(5),
        &mut reward,
        RunControl {
            out: Some(dir),
            resume,
            interrupt,
            after_step,
            observer: &r2m_core::Silent,
        },
    )
}

/// metrics.jsonl without the wall-clock fields, one JSON object per step.
fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut()
                .unwrap()
                .retain(|k, _| !k.starts_with("time_"));
            v
        })
        .collect()
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Not a test on its own: the child process that the SIGKILL test starts and kills. It trains
/// the same run and sleeps after step 3's checkpoint, where the parent kills it.
#[test]
#[ignore = "run by resume_after_sigkill_reproduces_the_uninterrupted_run"]
fn resume_child() {
    let dir = std::env::var(CHILD_ENV).expect("started by the parent test");
    let mut hook = |m: &StepMetrics, _: &RlTrainer<AB>| {
        if m.step == 3 {
            std::thread::sleep(Duration::from_secs(600));
        }
        Ok(())
    };
    run(Path::new(&dir), false, None, Some(&mut hook)).unwrap();
}

#[test]
fn resume_after_sigkill_reproduces_the_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (straight, killed, stopped) = (
        tmp.path().join("straight"),
        tmp.path().join("killed"),
        tmp.path().join("stopped"),
    );
    let s = run(&straight, false, None, None).unwrap();
    assert_eq!((s.steps, s.end), (6, RunEnd::Finished));
    let want = metrics(&straight);
    assert_eq!(want.len(), 6);
    // Only the newest `keep_checkpoints` survive.
    let kept = r2m_rl::run::list_checkpoints(&straight).unwrap();
    assert_eq!(kept.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![5, 6]);

    // A run killed with SIGKILL after step 3, then resumed.
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "run::resume_child",
            "--exact",
            "--ignored",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &killed)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !checkpoint_dir(&killed, 3).exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("child exited early ({status})");
        }
        assert!(t0.elapsed() < Duration::from_secs(600), "child too slow");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
    assert_eq!(metrics(&killed).len(), 3);
    assert!(!checkpoint_dir(&killed, 4).exists());
    let s = run(&killed, true, None, None).unwrap();
    assert_eq!(
        (s.resumed_from, s.steps, s.end),
        (Some(3), 6, RunEnd::Finished)
    );
    assert_eq!(metrics(&killed), want, "resumed after SIGKILL");
    // The final policies are bit-identical (checkpoint files also hold random parameter ids,
    // so they are compared through the exported weights).
    let weights = |d: &Path| read(&d.join("final/model.safetensors"));
    assert!(
        weights(&killed) == weights(&straight),
        "final policy differs"
    );

    // Interrupted (as Ctrl-C does) after step 2, then resumed.
    let flag = AtomicBool::new(false);
    let mut hook = |m: &StepMetrics, _: &RlTrainer<AB>| {
        if m.step == 2 {
            flag.store(true, Ordering::SeqCst);
        }
        Ok(())
    };
    let s = run(&stopped, false, Some(&flag), Some(&mut hook)).unwrap();
    assert_eq!((s.steps, s.end), (2, RunEnd::Interrupted));
    assert_eq!(
        s.checkpoint.as_deref(),
        Some(checkpoint_dir(&stopped, 2).as_path())
    );
    let s = run(&stopped, true, None, None).unwrap();
    assert_eq!((s.resumed_from, s.steps), (Some(2), 6));
    assert_eq!(metrics(&stopped), want, "resumed after an interrupt");
    assert!(
        weights(&stopped) == weights(&straight),
        "final policy differs"
    );

    // Resuming a finished run trains nothing and says so.
    let before = read(&straight.join("metrics.jsonl"));
    let s = run(&straight, true, None, None).unwrap();
    assert_eq!((s.end, s.steps), (RunEnd::AlreadyFinished, 6));
    assert!(s.first.is_none());
    assert_eq!(read(&straight.join("metrics.jsonl")), before);

    // A fresh run into a directory with checkpoints is refused rather than mixed with it.
    let e = run(&straight, false, None, None).unwrap_err().to_string();
    assert!(e.contains("--resume"), "{e}");
    // Resuming where there is no checkpoint is an error naming the directory.
    let empty = tmp.path().join("empty");
    let e = run(&empty, true, None, None).unwrap_err().to_string();
    assert!(e.contains("no checkpoint") && e.contains("empty"), "{e}");

    // Plots of the run, as PNG and SVG.
    for name in ["reward", "kl", "response_len", "rm_loss"] {
        for ext in ["png", "svg"] {
            let p = straight.join("plots").join(format!("{name}.{ext}"));
            assert!(p.exists() && read(&p).len() > 100, "{}", p.display());
        }
    }
}

/// A reward that turns NaN at one step.
struct NanAt(usize, usize);

impl RewardFn for NanAt {
    fn name(&self) -> String {
        "nan-at".into()
    }
    fn score(&mut self, batch: &[RewardInput<'_>]) -> r2m_core::Result<Vec<f32>> {
        self.1 += 1;
        let bad = self.1 == self.0;
        Ok((0..batch.len())
            .map(|i| {
                if bad && i == 1 {
                    f32::NAN
                } else {
                    0.5 * i as f32
                }
            })
            .collect())
    }
}

/// The tiny run's config with plain RLOO on a length rule (no R2M, no critic).
fn rule_config() -> RlConfig {
    let mut cfg = config();
    cfg.reward = RewardSection {
        kind: RewardKind::Rule,
        rule: Some(RuleReward::Length(3)),
        ..Default::default()
    };
    cfg.r2m.method = RmMethod::Vanilla;
    cfg.algo.advantage = AdvantageKind::Rloo;
    cfg
}

/// Train a rule-reward RLOO run with `reward` until it stops; the error must be NonFinite at
/// `want_step`, naming `what`. Returns the error and the run directory.
fn run_until_non_finite(
    reward: &mut dyn r2m_rl::RolloutReward<TB>,
    want_step: usize,
    what: &str,
) -> (R2mError, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = rule_config();
    let mut trainer = RlTrainer::new(tiny_policy(), None, cfg).unwrap();
    let e = train_with(
        &mut trainer,
        &tiny_prompts(5),
        reward,
        RunControl {
            out: Some(tmp.path()),
            ..Default::default()
        },
    )
    .unwrap_err();
    match &e {
        R2mError::NonFinite { step, tensor, .. } => {
            assert_eq!(*step, want_step, "{e}");
            assert!(tensor.contains(what), "{tensor}");
        }
        other => panic!("expected NonFinite, got {other}"),
    }
    (e, tmp)
}

#[test]
fn a_nan_reward_stops_the_run_naming_the_step_and_keeps_the_last_checkpoint() {
    let (e, tmp) = run_until_non_finite(&mut NanAt(3, 0), 3, "reward of row 1");
    let msg = e.to_string();
    assert!(
        msg.contains("step 3") && msg.contains("step-000002"),
        "{msg}"
    );
    assert_eq!(metrics(tmp.path()).len(), 2);
    assert!(checkpoint_dir(tmp.path(), 2).join("policy.bin").exists());
}

#[test]
fn demo_runs_end_to_end_in_a_reduced_form() {
    use r2m_experiments::demo::{run_demo, DemoOptions};
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    let opts = DemoOptions {
        out: out.clone(),
        rm_train_pairs: 8,
        rm_eval_pairs: 4,
        rm_epochs: 1,
        steps: 2,
        prompts_per_step: 2,
        samples_per_prompt: 2,
        max_new_tokens: 6,
        lora_r: 4,
        eval_prompts: 3,
        ..Default::default()
    };
    let s = run_demo::<AB>(&opts, &device(), None, &r2m_core::Silent).unwrap();
    assert_eq!((s.run.steps, s.run.end), (2, RunEnd::Finished));
    assert!(s.proxy.eval_after.is_some(), "a fresh demo trains its RM");
    let a = s.proxy.agreement;
    assert_eq!(a.n, 4);
    assert!(a.ci95_low <= a.mean && a.mean <= a.ci95_high);
    let lines = metrics(&out);
    assert_eq!(lines.len(), 2);
    assert!(lines[1]["rm_loss"].as_f64().unwrap().is_finite());
    // Gold is measured beside the proxy at every step.
    assert!(lines[1]["gold_mean"].as_f64().unwrap().is_finite());
    for p in [
        "config.toml",
        "samples.jsonl",
        "rm-pairs.jsonl",
        "rm-eval-pairs.jsonl",
        "rm/reward_head.json",
        "rm/score.safetensors",
        // LoRA trains: the checkpoint holds the adapters, not the policy.
        "checkpoints/step-000002/adapters.bin",
        "r2m/r2m_head.bin",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "plots/reward.png",
        "plots/rm_loss.png",
    ] {
        assert!(out.join(p).exists(), "{p}");
    }
    // Only what trained is written: no copy of the base for the RM, the policy or a checkpoint.
    for p in [
        "rm/model.safetensors",
        "final",
        "checkpoints/step-000002/policy.bin",
    ] {
        assert!(!out.join(p).exists(), "{p}");
    }
    // Before and after on the same held-out prompts, in the summary and in the file.
    assert_eq!((s.before.len(), s.after.len(), s.gold_change.n), (3, 3, 3));
    let rows = std::fs::read_to_string(out.join("before_after.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = rows
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["prompt"], s.before[0].prompt.as_str());
    assert_eq!(rows[0]["after"]["gold"].as_f64().unwrap(), s.after[0].gold);
    let mean_change = s
        .after
        .iter()
        .zip(&s.before)
        .map(|(a, b)| a.gold - b.gold)
        .sum::<f64>()
        / 3.0;
    assert!((s.gold_change.mean - mean_change).abs() < 1e-12);
    let cfg = RlConfig::load(&out.join("config.toml")).unwrap();
    assert_eq!(cfg.r2m.method, RmMethod::R2m);
    // A second demo in the same directory reuses the RM and starts the RL run over.
    let s2 = run_demo::<AB>(&opts, &device(), None, &r2m_core::Silent).unwrap();
    assert_eq!(s2.proxy.agreement, s.proxy.agreement);
    assert_eq!((s2.run.steps, s2.run.resumed_from), (2, None));
    assert_eq!(metrics(&out).len(), 2);
    // The greedy "before" responses come from the same initial policy both times.
    assert_eq!(s2.before, s.before);
}

/// A reward of `scale` times the row's index within its group of `k` (rows alternate sign).
struct Huge(f32, usize);

impl RewardFn for Huge {
    fn name(&self) -> String {
        "huge".into()
    }
    fn score(&mut self, batch: &[RewardInput<'_>]) -> r2m_core::Result<Vec<f32>> {
        let (scale, k) = (self.0, self.1);
        Ok((0..batch.len())
            .map(|i| {
                let j = (i % k) as f32;
                if i % 2 == 0 {
                    scale * j
                } else {
                    -scale * j
                }
            })
            .collect())
    }
}

#[test]
fn a_non_finite_loss_or_gradient_norm_stops_the_run_naming_it() {
    // Rewards of +-3e38 are finite, but their leave-one-out advantages overflow f32: the
    // surrogate loss is not finite. Rewards of +-1e25 give a finite loss whose gradients'
    // squares overflow: the gradient norm is not finite.
    let k = config().rollout.samples_per_prompt;
    for (scale, what) in [(3e38, "policy loss"), (1e25, "policy gradient norm")] {
        let (e, _) = run_until_non_finite(&mut Huge(scale, k), 1, what);
        assert!(
            e.to_string().contains("no checkpoint was written yet"),
            "{e}"
        );
    }
}

/// With `top:N` and LoRA a checkpoint holds only what trains (no `policy.bin`), resumes to the
/// same next step, and refuses a trainer built on another base model.
#[test]
fn checkpoints_hold_only_what_trains_resume_exactly_and_refuse_another_base() {
    use r2m_rl::Trainable;
    for (trainable, kept) in [
        (Trainable::Top(1), "blocks.bin"),
        (Trainable::Lora, "adapters.bin"),
    ] {
        let mut cfg = rule_config();
        cfg.model.trainable = trainable;
        let mut reward = RuleReward::Length(3);
        let mut a = RlTrainer::new(tiny_policy(), None, cfg.clone()).unwrap();
        a.step(tiny_prompts(3), &mut reward).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        a.save_checkpoint(tmp.path()).unwrap();
        assert!(!tmp.path().join("policy.bin").exists(), "{trainable}");
        assert!(tmp.path().join(kept).exists(), "{trainable}");
        let mut b = RlTrainer::new(tiny_policy(), None, cfg.clone()).unwrap();
        b.load_checkpoint(tmp.path()).unwrap();
        let (ma, _) = a.step(tiny_prompts(3), &mut reward).unwrap();
        let (mb, _) = b.step(tiny_prompts(3), &mut reward).unwrap();
        assert_eq!(
            (ma.policy_loss, ma.grad_norm, ma.kl),
            (mb.policy_loss, mb.grad_norm, mb.kl),
            "{trainable}"
        );
        let weights = |t: &RlTrainer<AB>| t.policy.valid().to_weights();
        let (wa, wb) = (weights(&a), weights(&b));
        assert!(
            wa.iter()
                .zip(&wb)
                .all(|(x, y)| x.0 == y.0 && x.1.data == y.1.data),
            "{trainable}: weights differ after the resumed step"
        );
        // Another base model: refused, saying why.
        let mut other = tiny_policy();
        other.embed_tokens = other.embed_tokens.map(|w| w.mul_scalar(1.01));
        let mut c = RlTrainer::new(other, None, cfg).unwrap();
        let e = c.load_checkpoint(tmp.path()).unwrap_err().to_string();
        assert!(e.contains("sha256") && e.contains("same base"), "{e}");
    }
}
