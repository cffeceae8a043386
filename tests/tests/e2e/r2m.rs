//! R2M in the RL loop: scoring with policy feedback, the GREBT update, gradient isolation between
//! policy and reward model, the refreshed hidden states, and every control of the paper.

use std::collections::HashMap;

use burn::backend::Autodiff;
use burn::module::{AutodiffModule, Module};
use r2m_models::{load_hf_dir, CausalLm, RewardModel};
use r2m_rl::advantage::AdvantageKind;
use r2m_rl::config::{R2mConfig, RewardKind, RewardSection, RmMethod};
use r2m_rl::rollout::Rollout;
use r2m_rl::{LearnedRm, R2mReward, RlConfig, RlTrainer, RmUpdateStats, RolloutReward};

use crate::common::*;

type AB = Autodiff<TB>;

/// A reward model on the tiny body with a seeded head (token ids are shared with the policy).
fn tiny_rm() -> LearnedRm<TB> {
    let body = load_hf_dir::<TB>(&fixture_dir().join("tiny/tiny-llama3"), &device())
        .unwrap()
        .model;
    LearnedRm {
        model: RewardModel::from_backbone(body, 5),
        tokenizer: None,
        token_budget: 4096,
        name: "tiny rm".into(),
    }
}

pub fn config(method: RmMethod) -> RlConfig {
    let mut cfg = RlConfig {
        reward: RewardSection {
            kind: RewardKind::Model,
            model: Some("unused".into()),
            ..Default::default()
        },
        r2m: R2mConfig {
            method,
            lr: 1e-2,
            ..Default::default()
        },
        ..Default::default()
    };
    cfg.rollout.prompts_per_step = 3;
    cfg.rollout.samples_per_prompt = 4;
    cfg.rollout.max_new_tokens = 6;
    cfg.rollout.temperature = 1.0;
    cfg.optim.lr = 1e-2;
    cfg.optim.mini_batch_size = 6;
    cfg.optim.micro_batch_size = 4;
    cfg.run.steps = 4;
    cfg
}

pub fn r2m(method: RmMethod, cfg: &RlConfig) -> R2mReward<AB> {
    R2mReward::<AB>::new(
        tiny_rm(),
        64,
        R2mConfig {
            method,
            ..cfg.r2m.clone()
        },
    )
}

fn params<M: Module<TB>>(m: &M) -> Vec<f32> {
    struct Collect(Vec<f32>);
    impl burn::module::ModuleVisitor<TB> for Collect {
        fn visit_float<const D: usize>(
            &mut self,
            p: &burn::module::Param<burn::tensor::Tensor<TB, D>>,
        ) {
            self.0.extend(to_vec(p.val()));
        }
    }
    let mut c = Collect(Vec::new());
    m.visit(&mut c);
    c.0
}

fn policy_weights(p: &CausalLm<AB>) -> HashMap<String, Vec<f32>> {
    p.valid()
        .to_weights()
        .into_iter()
        .map(|(n, t)| (n, t.data))
        .collect()
}

/// A rollout with the old policy's hidden states.
fn rollout(trainer: &mut RlTrainer<AB>, seed: u64) -> Rollout<TB> {
    trainer.keep_hidden = true;
    trainer.rollout(tiny_prompts(3), seed).unwrap().0
}

#[test]
fn zero_output_weights_score_exactly_the_vanilla_reward_times_w() {
    let cfg = config(RmMethod::R2m);
    let mut trainer = RlTrainer::new(tiny_policy(), None, cfg.clone()).unwrap();
    let ro = rollout(&mut trainer, 1);
    let mut vanilla = tiny_rm();
    let v = RolloutReward::<TB>::score_rollout(&mut vanilla, &ro, 1, 4).unwrap();
    for (t, omega) in [(4, 0.7), (1, 1.0)] {
        let mut r = R2mReward::<AB>::new(
            tiny_rm(),
            64,
            R2mConfig {
                method: RmMethod::R2m,
                zero_init_output: true,
                omega,
                ..Default::default()
            },
        );
        let got = r.score_rollout(&ro, t, 4).unwrap();
        let w = r2m_core::r2m::time_step_weight(t, 4, omega) as f32;
        for (g, v) in got.iter().zip(&v) {
            assert!((g - w * v).abs() < 1e-5, "t={t}: {g} vs {w} * {v}");
        }
    }
    // A random W_o (the paper's start) does change the rewards.
    let mut r = r2m(RmMethod::R2m, &cfg);
    let got = r.score_rollout(&ro, 4, 4).unwrap();
    assert!(got.iter().zip(&v).any(|(g, v)| (g - 0.7 * v).abs() > 1e-3));
}

#[test]
fn rm_update_trains_only_the_head_and_policy_update_leaves_the_head_alone() {
    let cfg = config(RmMethod::R2m);
    let mut trainer = RlTrainer::new(tiny_policy(), None, cfg.clone()).unwrap();
    let mut reward = r2m(RmMethod::R2m, &cfg);
    let ro = rollout(&mut trainer, 2);
    let scores = reward.score_rollout(&ro, 1, 4).unwrap();
    let policy_before = policy_weights(&trainer.policy);
    let head_before = params(&reward.head.valid());
    let stats = reward
        .after_policy_update(&ro, &scores, 1, 4)
        .unwrap()
        .unwrap();
    assert!(stats.rm_loss.unwrap().is_finite() && stats.rm_grad_norm.unwrap() > 0.0);
    // The RM update moved the head and nothing of the policy.
    assert_ne!(params(&reward.head.valid()), head_before);
    assert_eq!(policy_weights(&trainer.policy), policy_before);
    // The rescored rewards moved toward the update's target.
    let after = reward.score_rollout(&ro, 1, 4).unwrap();
    assert_ne!(after, scores);

    // During a full RL step, the policy update (which runs before the RM update) leaves the
    // head as it was when the rollout was scored.
    struct Spy<'a> {
        inner: &'a mut R2mReward<AB>,
        at_score: Option<Vec<f32>>,
        at_update: Option<Vec<f32>>,
    }
    impl RolloutReward<TB> for Spy<'_> {
        fn name(&self) -> String {
            "spy".into()
        }
        fn wants_hidden(&self) -> bool {
            true
        }
        fn score_rollout(
            &mut self,
            r: &Rollout<TB>,
            t: usize,
            n: usize,
        ) -> r2m_core::Result<Vec<f32>> {
            self.at_score = Some(params(&self.inner.head.valid()));
            self.inner.score_rollout(r, t, n)
        }
        fn after_policy_update(
            &mut self,
            r: &Rollout<TB>,
            s: &[f32],
            t: usize,
            n: usize,
        ) -> r2m_core::Result<Option<RmUpdateStats>> {
            self.at_update = Some(params(&self.inner.head.valid()));
            self.inner.after_policy_update(r, s, t, n)
        }
    }
    let policy_before = policy_weights(&trainer.policy);
    let mut spy = Spy {
        inner: &mut reward,
        at_score: None,
        at_update: None,
    };
    let (m, _, _) = trainer.step(tiny_prompts(3), &mut spy).unwrap();
    assert_eq!(spy.at_score, spy.at_update);
    assert_ne!(policy_weights(&trainer.policy), policy_before);
    assert!(m.rm.as_ref().unwrap().rm_loss.is_some());
}

#[test]
fn final_epoch_refreshes_h_with_the_training_forward_passes() {
    // With lr 0 the policy does not move, so h' must equal the old pass's h at every real
    // position: checks the per-micro-batch slices are put back in the right rows and columns.
    let mut cfg = config(RmMethod::R2m);
    cfg.optim.lr = 0.0;
    cfg.optim.micro_batch_size = 5;
    for trainable in ["all", "top:1"] {
        cfg.model.trainable = trainable.into();
        let mut trainer = RlTrainer::new(tiny_policy(), None, cfg.clone()).unwrap();
        let mut ro = rollout(&mut trainer, 3);
        let old = to_vec(ro.hidden.clone().unwrap());
        let [rows, s, d] = ro.hidden.as_ref().unwrap().dims();
        let adv: Vec<Vec<f32>> = (0..rows).map(|r| vec![0.1; ro.response_len(r)]).collect();
        trainer.update(&mut ro, &adv, None, 9).unwrap();
        let new = to_vec(ro.hidden.clone().unwrap());
        assert_eq!(ro.hidden.as_ref().unwrap().dims(), [rows, s, d]);
        for r in 0..rows {
            for c in 0..s {
                if ro.padding.valid[r][c] {
                    let (a, b) = (
                        &old[(r * s + c) * d..(r * s + c + 1) * d],
                        &new[(r * s + c) * d..(r * s + c + 1) * d],
                    );
                    assert!(max_abs_diff(a, b) < 1e-4, "{trainable}: row {r} col {c}");
                }
            }
        }
    }
}

#[test]
fn noise_control_feeds_noise_of_matched_mean_and_variance() {
    let cfg = config(RmMethod::R2mNoise);
    let mut trainer = RlTrainer::new(tiny_policy(), None, cfg.clone()).unwrap();
    let ro = rollout(&mut trainer, 4);
    let mut noisy = r2m(RmMethod::R2mNoise, &cfg);
    let (noise, mask) = noisy.feedback(&ro).unwrap();
    let mut real = r2m(RmMethod::R2m, &cfg);
    let (h, _) = real.feedback(&ro).unwrap();
    let [rows, s, d] = h.dims();
    let mask: Vec<bool> = mask.into_data().to_vec().unwrap();
    let stats = |v: &[f32]| {
        let xs: Vec<f64> = (0..rows * s)
            .filter(|&p| mask[p])
            .flat_map(|p| v[p * d..(p + 1) * d].iter().map(|&x| x as f64))
            .collect();
        let n = xs.len() as f64;
        let m = xs.iter().sum::<f64>() / n;
        (m, xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n, n)
    };
    let (hv, nv) = (to_vec(h), to_vec(noise));
    let (hm, hvar, n) = stats(&hv);
    let (nm, nvar, _) = stats(&nv);
    assert!(n > 1000.0);
    // Means agree within a few standard errors; variances within 5%.
    assert!((hm - nm).abs() < 4.0 * (hvar / n).sqrt(), "{hm} vs {nm}");
    assert!((hvar / nvar - 1.0).abs() < 0.05, "{hvar} vs {nvar}");
    assert!(max_abs_diff(&hv, &nv) > 0.1, "the noise is h itself");
}

#[test]
fn every_control_runs_and_trains_what_it_should() {
    let controls: Vec<(&str, RmMethod, f64)> = vec![
        ("vanilla", RmMethod::Vanilla, 0.3),
        ("r2m", RmMethod::R2m, 0.3),
        ("iterative-head", RmMethod::IterativeHead, 0.3),
        ("r2m-no-train", RmMethod::R2mNoTrain, 0.3),
        ("r2m-noise", RmMethod::R2mNoise, 0.3),
        ("r2m w/o BT", RmMethod::R2m, 1.0),
        ("r2m w/o GRE", RmMethod::R2m, 0.0),
    ];
    for (name, method, alpha) in controls {
        let mut cfg = config(method);
        cfg.r2m.alpha = alpha;
        let mut trainer = RlTrainer::new(tiny_policy(), None, cfg.clone()).unwrap();
        let mut reward = r2m(method, &cfg);
        let fusion0 = params(&reward.head.fusion.valid());
        let phi0 = params(&reward.head.score.valid());
        for _ in 0..2 {
            let (m, _, _) = trainer.step(tiny_prompts(3), &mut reward).unwrap();
            assert!(m.reward_mean.is_finite(), "{name}");
            let rm = m.rm.expect("stats");
            assert_eq!(rm.rm_loss.is_some(), reward.trains(), "{name}");
            assert!(rm.r2m_w <= 1.0 && rm.r2m_w >= 0.7, "{name}");
        }
        let fusion_moved = params(&reward.head.fusion.valid()) != fusion0;
        let phi_moved = params(&reward.head.score.valid()) != phi0;
        let (want_fusion, want_phi) = match method {
            RmMethod::R2m | RmMethod::R2mNoise => (true, true),
            RmMethod::IterativeHead => (false, true),
            RmMethod::Vanilla | RmMethod::R2mNoTrain | RmMethod::PretrainedRm => (false, false),
        };
        assert_eq!((fusion_moved, phi_moved), (want_fusion, want_phi), "{name}");
    }
}

#[test]
fn r2m_works_with_every_advantage_estimator() {
    for adv in [
        AdvantageKind::Rloo,
        AdvantageKind::Grpo,
        AdvantageKind::ReinforcePp,
        AdvantageKind::Remax,
        AdvantageKind::Gae,
    ] {
        let mut cfg = config(RmMethod::R2m);
        cfg.algo.advantage = adv;
        let mut trainer = RlTrainer::new(tiny_policy(), None, cfg.clone()).unwrap();
        let mut reward = r2m(RmMethod::R2m, &cfg);
        let (m, ro, _) = trainer.step(tiny_prompts(3), &mut reward).unwrap();
        assert!(m.rm.unwrap().rm_loss.unwrap().is_finite(), "{adv:?}");
        assert!(ro.hidden.is_some());
    }
}

#[test]
fn saved_state_resumes_the_head_and_its_optimizer_exactly() {
    let cfg = config(RmMethod::R2m);
    let mut trainer = RlTrainer::new(tiny_policy(), None, cfg.clone()).unwrap();
    let ro = rollout(&mut trainer, 5);
    let mut a = r2m(RmMethod::R2m, &cfg);
    let scores = a.score_rollout(&ro, 1, 4).unwrap();
    a.after_policy_update(&ro, &scores, 1, 4).unwrap();
    let dir = tempfile::tempdir().unwrap();
    a.save(dir.path()).unwrap();
    let mut b = R2mReward::<AB>::new(
        tiny_rm(),
        64,
        R2mConfig {
            seed: 99,
            ..a.cfg.clone()
        },
    );
    assert_ne!(params(&b.head.valid()), params(&a.head.valid()));
    b.load_state(dir.path()).unwrap();
    assert_eq!(params(&b.head.valid()), params(&a.head.valid()));
    assert_eq!(b.updates, 1);
    // The next update is identical only if AdamW's moments and step count came back too.
    for r in [&mut a, &mut b] {
        let s = r.score_rollout(&ro, 2, 4).unwrap();
        r.after_policy_update(&ro, &s, 2, 4).unwrap();
    }
    assert_eq!(params(&b.head.valid()), params(&a.head.valid()));
    // A head of another size is refused with the file named.
    let mut other = R2mReward::<AB>::new(
        tiny_rm(),
        64,
        R2mConfig {
            width: Some(8),
            ..Default::default()
        },
    );
    let e = other.load_state(dir.path()).unwrap_err().to_string();
    assert!(e.contains("r2m.json"), "{e}");
}

#[test]
fn offline_scoring_with_the_policy_equals_the_rl_loop_at_t_equals_t() {
    let cfg = config(RmMethod::R2m);
    let mut trainer = RlTrainer::new(tiny_policy(), None, cfg.clone()).unwrap();
    let ro = rollout(&mut trainer, 6);
    let mut r = r2m(RmMethod::R2m, &cfg);
    let in_loop = r.score_rollout(&ro, 4, 4).unwrap();
    let seqs: Vec<Vec<u32>> = (0..ro.rows())
        .map(|row| {
            ro.prompt_of(row)
                .ids
                .iter()
                .chain(&ro.responses[row].tokens)
                .copied()
                .collect()
        })
        .collect();
    let offline = r.score_with_policy(&trainer.policy.valid(), &seqs);
    assert!(
        max_abs_diff(&in_loop, &offline) < 1e-4,
        "{in_loop:?} vs {offline:?}"
    );
}
