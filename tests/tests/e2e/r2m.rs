//! R2M in the RL loop: scoring with policy feedback, the GREBT update, gradient isolation between
//! policy and reward model, the refreshed hidden states, and every control of the paper.

use std::collections::HashMap;

use burn::module::{AutodiffModule, Module};
use r2m_models::{load_hf_dir, CausalLm, RewardModel};
use r2m_rl::advantage::AdvantageKind;
use r2m_rl::config::{R2mConfig, RewardKind, RewardSection, RmMethod};
use r2m_rl::{Diagnostics, Experience, LearnedRm, R2mReward, RlConfig, RlTrainer, RolloutReward};
use r2m_rl::{Scored, Trainable};

use crate::common::*;

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

/// An experience with the old policy's hidden states.
fn rollout(trainer: &mut RlTrainer<AB>, seed: u64) -> Experience<TB> {
    trainer.keep_hidden = true;
    trainer.rollout(tiny_prompts(3), seed).unwrap().0
}

/// Score `exp` with `reward` as the trainer does: the scores and `H_last` go into it.
fn score(reward: &mut dyn RolloutReward<TB>, exp: &mut Experience<TB>, t: usize) -> Vec<f32> {
    let Scored { scores, rm_hidden } = reward.score_experience(exp, t, 4).unwrap();
    exp.scores = scores.clone();
    exp.rm_hidden = rm_hidden;
    scores
}

/// The R2M update after scoring, with the old pass's `h` standing in for `h'`.
fn rm_update(reward: &mut dyn RolloutReward<TB>, exp: &Experience<TB>, t: usize) -> Diagnostics {
    reward.update(exp, exp.hidden.as_ref(), t, 4).unwrap()
}

/// Keeping the old policy's log-probs, `h` and frozen stream from sampling changes nothing in
/// an R2M step (within 1e-4): with every block training, with a frozen trunk, with LoRA, and with
/// K = 1.
#[test]
fn a_step_keeping_the_old_pass_from_sampling_equals_the_step_with_the_pass() {
    for (trainable, k) in [("all", 4), ("top:1", 4), ("top:1", 1), ("lora", 2)] {
        let mut cfg = config(RmMethod::R2m);
        cfg.model.trainable = trainable.parse().unwrap();
        cfg.rollout.samples_per_prompt = k;
        if k == 1 {
            cfg.algo.advantage = AdvantageKind::ReinforcePp;
        }
        cfg.rollout.max_new_tokens = 8;
        // A step that moves the policy without running away (at 1e-2 the tiny policy's second
        // mini-batch amplifies float rounding past 1e-4).
        cfg.optim.lr = 1e-3;
        let reward = || -> Box<dyn RolloutReward<TB>> { Box::new(r2m(RmMethod::R2m, &cfg)) };
        let prompts = tiny_prompts(3);
        crate::rl::assert_old_pass_is_redundant(tiny_policy(), None, &prompts, &cfg, &reward, 1e-4);
    }
}

#[test]
fn zero_output_weights_score_exactly_the_vanilla_reward_times_w() {
    let cfg = config(RmMethod::R2m);
    let mut trainer = RlTrainer::new(tiny_policy(), None, cfg.clone()).unwrap();
    let ro = rollout(&mut trainer, 1);
    let mut vanilla = tiny_rm();
    let v = RolloutReward::<TB>::score_experience(&mut vanilla, &ro, 1, 4)
        .unwrap()
        .scores;
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
        let got = r.score_experience(&ro, t, 4).unwrap().scores;
        let w = r2m_core::r2m::time_step_weight(t, 4, omega) as f32;
        for (g, v) in got.iter().zip(&v) {
            assert!((g - w * v).abs() < 1e-5, "t={t}: {g} vs {w} * {v}");
        }
    }
    // A random W_o (the paper's start) does change the rewards.
    let mut r = r2m(RmMethod::R2m, &cfg);
    let got = r.score_experience(&ro, 4, 4).unwrap().scores;
    assert!(got.iter().zip(&v).any(|(g, v)| (g - 0.7 * v).abs() > 1e-3));
}

#[test]
fn rm_update_trains_only_the_head_and_policy_update_leaves_the_head_alone() {
    let cfg = config(RmMethod::R2m);
    let mut trainer = RlTrainer::new(tiny_policy(), None, cfg.clone()).unwrap();
    let mut reward = r2m(RmMethod::R2m, &cfg);
    let mut ro = rollout(&mut trainer, 2);
    let scores = score(&mut reward, &mut ro, 1);
    let policy_before = policy_weights(&trainer.policy);
    let head_before = params(&reward.head.valid());
    let stats = rm_update(&mut reward, &ro, 1);
    assert!(stats.get("rm_loss").unwrap().is_finite());
    assert!(stats.get("rm_grad_norm").unwrap() > 0.0);
    // The RM update moved the head and nothing of the policy.
    assert_ne!(params(&reward.head.valid()), head_before);
    assert_eq!(policy_weights(&trainer.policy), policy_before);
    // The rescored rewards moved toward the update's target.
    let after = reward.score_experience(&ro, 1, 4).unwrap().scores;
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
        fn score_experience(
            &mut self,
            r: &Experience<TB>,
            t: usize,
            n: usize,
        ) -> r2m_core::Result<Scored<TB>> {
            self.at_score = Some(params(&self.inner.head.valid()));
            self.inner.score_experience(r, t, n)
        }
        fn update(
            &mut self,
            r: &Experience<TB>,
            h: Option<&burn::tensor::Tensor<TB, 3>>,
            t: usize,
            n: usize,
        ) -> r2m_core::Result<Diagnostics> {
            self.at_update = Some(params(&self.inner.head.valid()));
            self.inner.update(r, h, t, n)
        }
    }
    let policy_before = policy_weights(&trainer.policy);
    let mut spy = Spy {
        inner: &mut reward,
        at_score: None,
        at_update: None,
    };
    let (m, _) = trainer.step(tiny_prompts(3), &mut spy).unwrap();
    assert_eq!(spy.at_score, spy.at_update);
    assert_ne!(policy_weights(&trainer.policy), policy_before);
    assert!(m.diagnostics.get("rm_loss").is_some());
}

#[test]
fn final_epoch_refreshes_h_with_the_training_forward_passes() {
    // Two epochs of one mini-batch each: the final epoch's forward passes run on the policy
    // after epoch 1's optimizer step, so h' must equal the hidden states of a policy trained
    // for one epoch (recomputed from scratch), and differ from the old pass's h. Micro-batches
    // of 5 rows check that the slices are put back in the right rows and columns.
    let mut cfg = config(RmMethod::R2m);
    cfg.optim.mini_batch_size = 12;
    cfg.optim.micro_batch_size = 5;
    for trainable in [Trainable::All, Trainable::Top(1)] {
        cfg.model.trainable = trainable;
        let mut trainer = RlTrainer::new(tiny_policy(), None, cfg.clone()).unwrap();
        let mut ro = rollout(&mut trainer, 3);
        let [rows, s, d] = ro.hidden.as_ref().unwrap().dims();
        ro.advantages = (0..rows)
            .map(|r| vec![if r % 2 == 0 { 1.0 } else { -1.0 }; ro.response_len(r)])
            .collect();
        let update = trainer.update(&ro, 9).unwrap();
        let fresh = update.hidden.expect("h' with keep_hidden");
        assert_eq!(fresh.dims(), [rows, s, d]);
        // The same first epoch alone.
        let mut one = cfg.clone();
        one.optim.epochs = 1;
        let mut after_one = RlTrainer::new(tiny_policy(), None, one).unwrap();
        after_one.keep_hidden = true;
        after_one.update(&ro, 9).unwrap();
        let policy = after_one.policy.valid();
        let all: Vec<usize> = (0..rows).collect();
        let sl = ro.full_slice(&all);
        let want = r2m_rl::rollout::final_hidden(
            &policy,
            r2m_rl::rollout::Start::Tokens(ro.input_ids::<TB>(&sl, &device())),
            &ro.input_padding(&sl),
        );
        let (old, new, want) = (
            to_vec(ro.hidden.clone().unwrap()),
            to_vec(fresh),
            to_vec(want),
        );
        let mut moved = 0f32;
        for r in 0..rows {
            for c in 0..s {
                if ro.padding.valid[r][c] {
                    let at = (r * s + c) * d..(r * s + c + 1) * d;
                    let diff = max_abs_diff(&new[at.clone()], &want[at.clone()]);
                    assert!(diff < 1e-4, "{trainable}: row {r} col {c}: {diff}");
                    moved = moved.max(max_abs_diff(&new[at.clone()], &old[at]));
                }
            }
        }
        assert!(moved > 1e-3, "{trainable}: h' equals h ({moved})");
    }
}

#[test]
fn noise_control_feeds_noise_of_matched_mean_and_variance() {
    let cfg = config(RmMethod::R2mNoise);
    let mut trainer = RlTrainer::new(tiny_policy(), None, cfg.clone()).unwrap();
    let ro = rollout(&mut trainer, 4);
    let mut noisy = r2m(RmMethod::R2mNoise, &cfg);
    let (noise, mask) = noisy.feedback(&ro, ro.hidden.as_ref()).unwrap();
    let mut real = r2m(RmMethod::R2m, &cfg);
    let (h, _) = real.feedback(&ro, ro.hidden.as_ref()).unwrap();
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
        let initial = reward.head.valid();
        let mut last = None;
        for _ in 0..2 {
            let (m, _) = trainer.step(tiny_prompts(3), &mut reward).unwrap();
            last = Some(m.clone());
            assert!(m.reward_mean.is_finite(), "{name}");
            let d = &m.diagnostics;
            let w = d.get("r2m_w").expect("w(t)");
            assert_eq!(d.get("rm_loss").is_some(), reward.trains(), "{name}");
            assert!((0.7..=1.0).contains(&w), "{name}");
            // The GREBT loss is (1 - alpha) BT + alpha GRE: alpha = 0 is BT alone, 1 GRE alone.
            if let (Some(loss), Some(bt), Some(gre)) =
                (d.get("rm_loss"), d.get("rm_bt"), d.get("rm_gre"))
            {
                let mix = (1.0 - alpha) * bt + alpha * gre;
                assert!((loss - mix).abs() < 1e-5, "{name}: {loss} vs {mix}");
                assert!((bt - gre).abs() > 1e-3, "{name}: BT and GRE coincide");
            }
        }
        let fusion_moved = params(&reward.head.fusion.valid()) != fusion0;
        let phi_moved = params(&reward.head.score.valid()) != phi0;
        let (want_fusion, want_phi) = match method {
            RmMethod::R2m | RmMethod::R2mNoise => (true, true),
            RmMethod::IterativeHead => (false, true),
            // The oracle's head trains only on labelled pairs it is given (not in `update`).
            RmMethod::Vanilla
            | RmMethod::R2mNoTrain
            | RmMethod::PretrainedRm
            | RmMethod::Oracle => (false, false),
        };
        assert_eq!((fusion_moved, phi_moved), (want_fusion, want_phi), "{name}");
        // The logged movement says the same, and measures it from where the head started.
        let (fusion, phi) = reward.head.valid().moved_from(&initial);
        assert_eq!((fusion > 0.0, phi > 0.0), (want_fusion, want_phi), "{name}");
        let d = &last.expect("two steps").diagnostics;
        if reward.trains() {
            assert!(
                (d.get("rm_fusion_moved").unwrap() - fusion).abs() < 1e-9,
                "{name}"
            );
            assert!(
                (d.get("rm_phi_moved").unwrap() - phi).abs() < 1e-9,
                "{name}"
            );
        } else {
            assert!(d.get("rm_phi_moved").is_none(), "{name}");
        }
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
        let (m, ro) = trainer.step(tiny_prompts(3), &mut reward).unwrap();
        assert!(m.diagnostics.get("rm_loss").unwrap().is_finite(), "{adv:?}");
        assert!(ro.hidden.is_some() && ro.rm_hidden.is_some());
    }
}

#[test]
fn saved_state_resumes_the_head_and_its_optimizer_exactly() {
    let cfg = config(RmMethod::R2m);
    let mut trainer = RlTrainer::new(tiny_policy(), None, cfg.clone()).unwrap();
    let mut ro = rollout(&mut trainer, 5);
    let mut a = r2m(RmMethod::R2m, &cfg);
    score(&mut a, &mut ro, 1);
    rm_update(&mut a, &ro, 1);
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
        score(r, &mut ro, 2);
        rm_update(r, &ro, 2);
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
    let in_loop = r.score_experience(&ro, 4, 4).unwrap().scores;
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
    let offline = r.score_with_policy(&trainer.policy.valid(), &seqs, &r2m_core::Silent);
    assert!(
        max_abs_diff(&in_loop, &offline) < 1e-4,
        "{in_loop:?} vs {offline:?}"
    );
}

#[test]
fn the_oracle_trains_phi_toward_the_pairs_it_is_given_and_nothing_else() {
    let cfg = config(RmMethod::Oracle);
    let trainer = RlTrainer::new(tiny_policy(), None, cfg.clone()).unwrap();
    let mut reward = r2m(RmMethod::Oracle, &cfg);
    let (mut exp, _) = trainer.rollout(tiny_prompts(3), 1).unwrap();
    let scored = reward.score_experience(&exp, 1, 2).unwrap();
    exp.scores = scored.scores.clone();
    exp.rm_hidden = scored.rm_hidden;
    assert!(
        exp.rm_hidden.is_some(),
        "the oracle keeps H_last for its update"
    );
    // In every group, sample 1 over sample 0.
    let k = exp.k;
    let pairs: Vec<(usize, usize)> = (0..exp.rows() / k).map(|g| (g * k + 1, g * k)).collect();
    let margin = |s: &[f32]| {
        pairs
            .iter()
            .map(|&(c, r)| (s[c] - s[r]) as f64)
            .sum::<f64>()
    };
    // Its own update (GREBT on pseudo pairs) leaves phi alone ...
    let phi0 = params(&reward.head.score.valid());
    let d = reward.update(&exp, None, 1, 2).unwrap();
    assert!(d.get("rm_loss").is_none());
    assert_eq!(params(&reward.head.score.valid()), phi0);
    // ... the labelled pairs move it their way.
    let d = reward.update_on_pairs(&exp, &pairs, 10, 1, 2).unwrap();
    assert_eq!(d.get("oracle_pairs"), Some(pairs.len() as f64));
    assert!(d.get("rm_loss").unwrap().is_finite());
    let after = reward.score_experience(&exp, 1, 2).unwrap().scores;
    assert!(
        margin(&after) > margin(&exp.scores) + 1e-3,
        "{} -> {}",
        margin(&exp.scores),
        margin(&after)
    );
    // No pairs, no update.
    let phi1 = params(&reward.head.score.valid());
    reward.update_on_pairs(&exp, &[], 10, 1, 2).unwrap();
    assert_eq!(params(&reward.head.score.valid()), phi1);
}
