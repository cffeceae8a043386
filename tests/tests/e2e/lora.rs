//! LoRA: PEFT's adapters computed as PEFT computes them, r2m's adapter files read back by PEFT's
//! names, and RL with `model.trainable = "lora"`: only the adapters train, the reference is the
//! base, and RLOO raises a rule reward on the tiny policy.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use burn::module::AutodiffModule;
use r2m_models::lora::{self, ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use r2m_models::weights::{load_safetensors_file, WeightMap};
use r2m_models::{load_hf_dir, CausalLm, Padding};
use r2m_rl::advantage::AdvantageKind;
use r2m_rl::{RlConfig, RlTrainer, RuleReward};
use serde_json::Value;

use crate::common::*;

/// The token the tiny policy is rewarded for emitting.
const TARGET: u32 = 42;

/// PEFT's logits match to this (f32, the same weights).
const TOL: f32 = 1e-4;

/// `rl.rs`'s token-share reward on the tiny policy, with `trainable = "lora"` (r 4, alpha 8).
fn rule_config(advantage: AdvantageKind) -> RlConfig {
    let mut cfg = crate::rl::rule_config(advantage, "lora");
    cfg.lora.r = 4;
    cfg.lora.alpha = 8.0;
    cfg
}

/// Weights by name, on the host.
fn weights<B: burn::tensor::backend::Backend>(model: &CausalLm<B>) -> HashMap<String, Vec<f32>> {
    model
        .to_weights()
        .into_iter()
        .map(|(n, t)| (n, t.data))
        .collect()
}

/// The adapters' tensors by PEFT name.
fn adapters<B: burn::tensor::backend::Backend>(model: &CausalLm<B>) -> HashMap<String, Vec<f32>> {
    lora::adapter_tensors(model)
        .into_iter()
        .map(|(n, t)| (n, t.data))
        .collect()
}

fn fixture_rows(fx: &Value) -> Vec<Vec<u32>> {
    fx["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids_of)
        .collect()
}

fn fixture_logits(fx: &Value) -> Vec<f32> {
    fx["logits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().flat_map(floats_of))
        .collect()
}

fn logits_of(model: &CausalLm<TB>, rows: &[Vec<u32>]) -> Vec<f32> {
    let (b, s) = (rows.len(), rows[0].len());
    to_vec(model.forward(int_tensor(rows), &Padding::none(b, s)).logits)
}

/// A safetensors file's tensors by name.
fn read_tensors(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let mut w = WeightMap::new(path);
    load_safetensors_file(path, &mut w).unwrap();
    w.tensors
        .into_iter()
        .map(|(n, t)| (n, (t.shape, t.data)))
        .collect()
}

fn read_config(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join(ADAPTER_CONFIG)).unwrap()).unwrap()
}

/// PEFT's adapter (`scripts/reference/make_lora_fixture.py`) on the tiny base gives PEFT's
/// logits, unmerged and merged; written back by r2m it is the same files' content.
fn check_peft_fixture(name: &str) {
    let fx = read_json(&format!("lora/{name}.json"));
    let base_dir = fixture_dir().join(fx["base"].as_str().unwrap());
    let adapter_dir = fixture_dir().join("lora").join(name);
    let base = load_hf_dir::<TB>(&base_dir, &device()).unwrap().model;
    let model = lora::load_peft_adapter(base.clone(), &adapter_dir).unwrap();
    let rows = fixture_rows(&fx);
    let (want, got) = (fixture_logits(&fx), logits_of(&model, &rows));
    let d = max_abs_diff(&got, &want);
    eprintln!("{name}: max |logit diff| vs PEFT = {d:e}");
    assert!(d <= TOL, "{name}: max |logit diff| vs PEFT {d}");
    let merged = lora::merge_adapters(model.clone());
    let d = max_abs_diff(&logits_of(&merged, &rows), &want);
    assert!(d <= TOL, "{name}: merged, max |logit diff| vs PEFT {d}");
    // The base alone is far from it: the adapter does something.
    assert!(max_abs_diff(&logits_of(&base, &rows), &want) > 1e-2);

    // r2m's own files: the same tensors under the same names, and the config PEFT reads.
    let tmp = tempfile::tempdir().unwrap();
    lora::save_peft_adapter(&model, tmp.path(), fx["base"].as_str().unwrap()).unwrap();
    assert_eq!(
        read_tensors(&tmp.path().join(ADAPTER_WEIGHTS)),
        read_tensors(&adapter_dir.join(ADAPTER_WEIGHTS)),
        "{name}: adapter_model.safetensors"
    );
    let (ours, peft) = (read_config(tmp.path()), read_config(&adapter_dir));
    for key in [
        "peft_type",
        "task_type",
        "r",
        "lora_alpha",
        "lora_dropout",
        "use_rslora",
        "bias",
        "layers_to_transform",
        "layers_pattern",
        "base_model_name_or_path",
    ] {
        assert_eq!(ours[key], peft[key], "{name}: {key}");
    }
    let set = |v: &Value| -> BTreeSet<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(set(&ours["target_modules"]), set(&peft["target_modules"]));
    // And back: exactly the logits of the adapter it was read from.
    let again = lora::load_peft_adapter(base, tmp.path()).unwrap();
    assert_eq!(logits_of(&again, &rows), got, "{name}: save -> load");
}

#[test]
fn peft_llama_adapter_on_the_top_block_matches_pytorch() {
    check_peft_fixture("tiny-llama3-lora");
}

#[test]
fn peft_neox_adapter_on_the_fused_qkv_matches_pytorch() {
    check_peft_fixture("tiny-neox-lora");
}

#[test]
fn lora_training_moves_only_the_adapters_and_the_reference_is_the_base() {
    for layers in ["all", "top:1"] {
        let mut cfg = rule_config(AdvantageKind::Grpo);
        cfg.lora.layers = layers.parse().unwrap();
        cfg.run.steps = 2;
        let base = weights(&tiny_policy().valid());
        let mut trainer = RlTrainer::new(tiny_policy(), None, cfg).unwrap();
        assert_eq!(trainer.start_layer, if layers == "all" { 0 } else { 1 });
        let n_adapters = adapters(&trainer.policy).len();
        // 7 projections, A and B, per adapted block.
        assert_eq!(n_adapters, 14 * if layers == "all" { 2 } else { 1 });
        let before = adapters(&trainer.policy);
        // B = 0: the old policy and the reference agree at step 0.
        let (rollout, _) = trainer.rollout(tiny_prompts(2), 5).unwrap();
        for row in 0..rollout.rows() {
            let d = max_abs_diff(&rollout.old_logprobs[row], &rollout.ref_logprobs[row]);
            assert!(d < 1e-5, "{layers} row {row}: old vs ref at step 0: {d}");
        }
        let mut reward = RuleReward::TokenShare(TARGET);
        trainer.step(tiny_prompts(4), &mut reward).unwrap();
        // The base never moves: not in the policy, not in the reference.
        let policy = trainer.policy.valid();
        assert_eq!(
            weights(&lora::without_adapters(policy.clone())),
            base,
            "{layers}"
        );
        assert_eq!(weights(&trainer.reference), base, "{layers}");
        assert!(!lora::has_adapters(&trainer.reference));
        // Every B moved off zero.
        let after = adapters(&policy);
        for (name, b) in &after {
            if name.ends_with("lora_B.weight") {
                assert_ne!(b, &before[name], "{layers}: {name} did not train");
            }
        }
        // Sampling (with the KV cache) and the old-policy pass agree with the adapters on; the
        // reference is now another model.
        let (rollout, _) = trainer.rollout(tiny_prompts(3), 7).unwrap();
        let mut apart = 0f32;
        for row in 0..rollout.rows() {
            let sampled = &rollout.responses[row].logprobs;
            let d = max_abs_diff(sampled, &rollout.old_logprobs[row]);
            assert!(d < 1e-4, "{layers} row {row}: sampled vs old pass {d}");
            apart = apart.max(max_abs_diff(
                &rollout.old_logprobs[row],
                &rollout.ref_logprobs[row],
            ));
        }
        assert!(
            apart > 1e-4,
            "{layers}: the policy left the reference ({apart})"
        );
    }
}

/// The mean reward of each of `steps` seeded steps.
fn learn(advantage: AdvantageKind, steps: usize, lr: f64) -> Vec<f64> {
    let mut cfg = rule_config(advantage);
    cfg.optim.lr = lr;
    let mut trainer = RlTrainer::new(tiny_policy(), None, cfg).unwrap();
    let mut reward = RuleReward::TokenShare(TARGET);
    let prompts = tiny_prompts(4);
    let mut curve = Vec::new();
    for _ in 0..steps {
        let (m, _) = trainer.step(prompts.clone(), &mut reward).unwrap();
        assert!(m.kl.is_finite() && m.grad_norm.is_finite());
        curve.push(m.reward_mean);
    }
    curve
}

/// As `rl.rs`'s learning tests: the last 5 steps' reward, on average, is at least 0.2 above the
/// first 5's (an untrained policy emits the target token about 0.4% of the time). At rank 4 the
/// adapters want a larger learning rate than full fine-tuning's 1e-2, with which the reward only
/// starts to rise by step 15; at 3e-2 it is near 1 from step 9 on.
#[test]
fn lora_rloo_raises_a_rule_reward() {
    let curve = learn(AdvantageKind::Rloo, 15, 3e-2);
    eprintln!("LoRA RLOO: {curve:?}");
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (head, tail) = (mean(&curve[..5]), mean(&curve[curve.len() - 5..]));
    assert!(
        tail > head + 0.2,
        "LoRA RLOO did not raise the reward (first 5 steps {head:.3}, last 5 {tail:.3}): {curve:?}"
    );
}

#[test]
fn a_saved_adapter_is_a_starting_point() {
    let mut cfg = rule_config(AdvantageKind::Grpo);
    cfg.lora.layers = "top:1".parse().unwrap();
    let mut trainer = RlTrainer::new(tiny_policy(), None, cfg.clone()).unwrap();
    let mut reward = RuleReward::TokenShare(TARGET);
    trainer.step(tiny_prompts(4), &mut reward).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let trained = trainer.policy.valid();
    lora::save_peft_adapter(&trained, tmp.path(), "tiny/tiny-llama3").unwrap();
    let v = read_config(tmp.path());
    assert_eq!(v["layers_to_transform"], serde_json::json!([1]));
    cfg.model.adapter = Some(tmp.path().to_path_buf());
    let resumed = RlTrainer::new(tiny_policy(), None, cfg).unwrap();
    assert_eq!(resumed.start_layer, 1);
    let rows = vec![vec![1, 5, 9, 42, 7]];
    assert_eq!(
        logits_of(&resumed.policy.valid(), &rows),
        logits_of(&trained, &rows)
    );
    assert_eq!(
        logits_of(&resumed.reference, &rows),
        logits_of(&tiny_policy().valid(), &rows),
        "the reference is the base, not the starting adapter"
    );
}

/// A finished LoRA run writes its adapter in PEFT's format (`RUN/adapter/`) beside the merged
/// `RUN/final/`; loaded onto the base, it gives the trained policy's logits.
#[test]
fn a_lora_run_writes_its_peft_adapter() {
    let mut cfg = rule_config(AdvantageKind::Rloo);
    cfg.run.steps = 2;
    let mut trainer = RlTrainer::new(tiny_policy(), None, cfg).unwrap();
    let mut reward = RuleReward::TokenShare(TARGET);
    let tmp = tempfile::tempdir().unwrap();
    r2m_rl::train(
        &mut trainer,
        &tiny_prompts(4),
        &mut reward,
        Some(tmp.path()),
    )
    .unwrap();
    let dir = tmp.path().join("adapter");
    assert_eq!(read_config(&dir)["peft_type"], "LORA");
    let loaded = lora::load_peft_adapter(tiny_policy().valid(), &dir).unwrap();
    let rows = vec![vec![1, 5, 9, 42, 7]];
    let trained = logits_of(&trainer.policy.valid(), &rows);
    assert_eq!(logits_of(&loaded, &rows), trained);
    assert_ne!(logits_of(&tiny_policy().valid(), &rows), trained);
    assert!(tmp.path().join("final").join("config.json").exists());
}

/// Every estimator takes LoRA steps (PPO's critic is the adapted body too, its base frozen), and
/// a checkpoint restores the adapters and their optimizer exactly.
#[test]
fn every_estimator_steps_with_lora_and_a_checkpoint_restores_it() {
    for advantage in [
        AdvantageKind::Gae,
        AdvantageKind::Remax,
        AdvantageKind::ReinforcePp,
    ] {
        let mut cfg = rule_config(advantage);
        cfg.lora.layers = "top:1".parse().unwrap();
        let mut trainer = RlTrainer::new(tiny_policy(), None, cfg).unwrap();
        let mut reward = RuleReward::TokenShare(TARGET);
        let (m, _) = trainer.step(tiny_prompts(4), &mut reward).unwrap();
        assert!(
            m.grad_norm.is_finite() && m.grad_norm > 0.0,
            "{advantage:?}"
        );
    }
    let cfg = rule_config(AdvantageKind::Rloo);
    let mut trainer = RlTrainer::new(tiny_policy(), None, cfg.clone()).unwrap();
    let mut reward = RuleReward::TokenShare(TARGET);
    trainer.step(tiny_prompts(4), &mut reward).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    trainer.save_checkpoint(tmp.path()).unwrap();
    let mut resumed = RlTrainer::new(tiny_policy(), None, cfg).unwrap();
    resumed.load_checkpoint(tmp.path()).unwrap();
    assert_eq!(adapters(&resumed.policy), adapters(&trainer.policy));
    // The next step is the same step.
    let (a, _) = trainer.step(tiny_prompts(4), &mut reward).unwrap();
    let (b, _) = resumed.step(tiny_prompts(4), &mut reward).unwrap();
    assert_eq!(a.reward_mean, b.reward_mean);
    assert_eq!(adapters(&resumed.policy), adapters(&trainer.policy));
}

#[test]
fn lora_config_errors_name_the_key() {
    let err = |cfg: RlConfig, policy| {
        RlTrainer::new(policy, None, cfg)
            .err()
            .expect("an error")
            .to_string()
    };
    let mut cfg = rule_config(AdvantageKind::Rloo);
    cfg.lora.targets = vec!["q".into(), "qkv".into()];
    let e = err(cfg, tiny_policy());
    assert!(e.contains("lora.targets") && e.contains("`qkv`"), "{e}");
    let mut cfg = rule_config(AdvantageKind::Rloo);
    cfg.lora.r = 0;
    let e = err(cfg, tiny_policy());
    assert!(e.contains("lora.r"), "{e}");
    let mut cfg = rule_config(AdvantageKind::Rloo);
    cfg.lora.layers = "top:3".parse().unwrap();
    let e = err(cfg, tiny_policy());
    assert!(e.contains("lora.layers") && e.contains("2 blocks"), "{e}");
    // GPT-NeoX has no gate projection (the default targets name it).
    let neox = || {
        load_hf_dir::<AB>(&fixture_dir().join("tiny/tiny-neox"), &device())
            .unwrap()
            .model
    };
    let e = err(rule_config(AdvantageKind::Rloo), neox());
    assert!(e.contains("lora.targets") && e.contains("`gate`"), "{e}");
    let mut cfg = rule_config(AdvantageKind::Rloo);
    cfg.lora.targets = ["q", "o", "up", "down"].map(String::from).to_vec();
    RlTrainer::new(neox(), None, cfg).unwrap();
}

/// Writes `target/lora-peft-check/`: a LoRA adapter r2m trained for two RL steps on the tiny
/// policy, and r2m's logits with it (`r2m_logits.json`), for
/// `python3 scripts/reference/make_lora_fixture.py --check target/lora-peft-check` (PEFT loads
/// the adapter onto the base and compares its logits with r2m's).
#[test]
#[ignore = "writes a directory for the PyTorch/PEFT check"]
fn write_an_adapter_for_the_peft_check() {
    let mut cfg = rule_config(AdvantageKind::Rloo);
    cfg.lora.targets = ["q", "k", "v", "o", "gate", "up", "down"]
        .map(String::from)
        .to_vec();
    cfg.lora.rslora = true;
    let mut trainer = RlTrainer::new(tiny_policy(), None, cfg).unwrap();
    let mut reward = RuleReward::TokenShare(TARGET);
    for _ in 0..2 {
        trainer.step(tiny_prompts(4), &mut reward).unwrap();
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/lora-peft-check");
    let _ = std::fs::remove_dir_all(&dir);
    let policy = trainer.policy.valid();
    lora::save_peft_adapter(&policy, &dir, "tiny/tiny-llama3").unwrap();
    let fx = read_json("tiny/tiny-llama3.json");
    let rows = fixture_rows(&fx);
    let logits = logits_of(&policy, &rows);
    let vocab = policy.config.vocab_size;
    let nested: Vec<Vec<&[f32]>> = logits
        .chunks(rows[0].len() * vocab)
        .map(|r| r.chunks(vocab).collect())
        .collect();
    let out = serde_json::json!({
        "base": "tiny/tiny-llama3",
        "input_ids": fx["input_ids"],
        "logits": nested,
    });
    std::fs::write(dir.join("r2m_logits.json"), out.to_string()).unwrap();
    eprintln!("wrote {}", dir.display());
}
