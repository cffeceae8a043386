//! Reward models: the HF sequence-classification layout, reading at the last real token, and
//! Bradley-Terry training that can fit a small set of pairs.

use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::{Int, Tensor, TensorData};
use r2m_core::loss::bradley_terry_loss;
use r2m_data::TokenizedPair;
use r2m_models::{load_hf_dir, Padding, RewardModel};
use r2m_rl::reward_training::score_pairs;
use r2m_rl::{
    evaluate_rm, frozen_features, train_reward_model, PairInputs, RmOutputs, RmTrainConfig,
    Trainable,
};

use crate::common::*;

fn tiny_rm<B: burn::tensor::backend::Backend>(dev: &B::Device) -> RewardModel<B> {
    let backbone = load_hf_dir::<B>(&fixture_dir().join("tiny/tiny-llama3"), dev)
        .unwrap()
        .model;
    RewardModel::from_backbone(backbone, 0)
}

/// Right-pad `rows` with token 0.
fn right_padded<B: burn::tensor::backend::Backend>(
    rows: &[Vec<u32>],
    dev: &B::Device,
) -> (Tensor<B, 2, Int>, Padding) {
    let len = rows.iter().map(Vec::len).max().unwrap();
    let mut ids = Vec::new();
    let mut valid = Vec::new();
    for r in rows {
        ids.extend(r.iter().map(|&t| t as i64));
        ids.extend(std::iter::repeat_n(0i64, len - r.len()));
        valid.push((0..len).map(|i| i < r.len()).collect());
    }
    (
        Tensor::from_data(TensorData::new(ids, [rows.len(), len]), dev),
        Padding { valid },
    )
}

/// Sequences that share a prompt (an RL step's K responses) encode it once and continue from its
/// KV cache: the same rewards and `H_last` as each sequence alone, whatever the padding.
#[test]
fn shared_prompt_prefixes_score_what_each_sequence_scores_alone() {
    let rm = r2m_rl::LearnedRm::<TB> {
        model: tiny_rm::<TB>(&device()),
        tokenizer: None,
        token_budget: 64,
        name: "tiny".into(),
    };
    let prompt = |n: usize, salt: u32| (0..n as u32).map(move |i| 3 + (i * 7 + salt) % 200);
    let mut seqs: Vec<Vec<u32>> = Vec::new();
    for (len, salt, tails) in [(24, 0, 3), (17, 5, 2), (40, 9, 4), (30, 11, 1)] {
        for t in 0..tails {
            let tail = (0..2 + 3 * t as u32).map(move |i| 50 + (i * 13 + t as u32) % 150);
            seqs.push(prompt(len, salt).chain(tail).collect());
        }
    }
    let scores = rm.score_sequences(&seqs);
    let last = to_vec(rm.last_hidden(&seqs));
    let d = rm.model.backbone.config.hidden_size;
    for (i, s) in seqs.iter().enumerate() {
        let (ids, pad) = right_padded::<TB>(std::slice::from_ref(s), &device());
        let alone = rm.model.forward(ids, &pad);
        let r = to_vec(alone.rewards)[0];
        assert!(
            (r - scores[i]).abs() < 1e-5,
            "row {i}: {r} vs {}",
            scores[i]
        );
        let h = to_vec(alone.last_hidden);
        let diff = max_abs_diff(&h, &last[i * d..(i + 1) * d]);
        assert!(diff < 1e-5, "row {i}: H_last differs by {diff}");
    }
    assert!(
        (scores[0] - scores[1]).abs() > 1e-6,
        "different replies, different rewards"
    );
}

#[test]
fn reward_is_read_at_the_last_real_token_and_survives_save_reload() {
    let rm = tiny_rm::<TB>(&device());
    let rows = vec![vec![3u32, 9, 27, 81, 5], vec![1, 2, 3, 4, 5, 6, 7, 8]];
    let (ids, pad) = right_padded::<TB>(&rows, &device());
    let batch = to_vec(rm.forward(ids, &pad).rewards);
    for (i, r) in rows.iter().enumerate() {
        let (ids, pad) = right_padded::<TB>(std::slice::from_ref(r), &device());
        let alone = to_vec(rm.forward(ids, &pad).rewards)[0];
        assert!(
            (alone - batch[i]).abs() < 1e-5,
            "row {i}: {alone} vs {}",
            batch[i]
        );
    }
    assert!(
        (batch[0] - batch[1]).abs() > 1e-6,
        "different inputs, different rewards"
    );

    let tmp = tempfile::tempdir().unwrap();
    rm.save_hf_dir(None, tmp.path()).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["architectures"][0], "LlamaForSequenceClassification");
    assert_eq!(cfg["num_labels"], 1);
    let again = RewardModel::<TB>::load_hf_dir(tmp.path(), &device()).unwrap();
    let (ids, pad) = right_padded::<TB>(&rows, &device());
    assert_eq!(to_vec(again.forward(ids, &pad).rewards), batch);
}

#[test]
fn tiny_reward_model_overfits_16_pairs() {
    let dev = device();
    let mut rm = tiny_rm::<AB>(&dev);
    // 16 pairs of random sequences; the label is arbitrary, so fitting it needs real learning.
    let mut seed = 12345u64;
    let mut next = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 33) % 256) as u32
    };
    let mut chosen = Vec::new();
    let mut rejected = Vec::new();
    for i in 0..16 {
        chosen.push((0..6 + i % 3).map(|_| next()).collect::<Vec<u32>>());
        rejected.push((0..5 + i % 4).map(|_| next()).collect::<Vec<u32>>());
    }
    let (c_ids, c_pad) = right_padded::<AB>(&chosen, &dev);
    let (r_ids, r_pad) = right_padded::<AB>(&rejected, &dev);
    let accuracy = |rm: &RewardModel<TB>| {
        let (c, cp) = right_padded::<TB>(&chosen, &device());
        let (r, rp) = right_padded::<TB>(&rejected, &device());
        let c = to_vec(rm.forward(c, &cp).rewards);
        let r = to_vec(rm.forward(r, &rp).rewards);
        c.iter().zip(&r).filter(|(a, b)| a > b).count() as f32 / 16.0
    };
    let before = accuracy(&rm.valid());
    let mut optim = AdamWConfig::new().with_weight_decay(0.0).init();
    let mut losses = Vec::new();
    for _ in 0..60 {
        let rc = rm.forward(c_ids.clone(), &c_pad).rewards;
        let rr = rm.forward(r_ids.clone(), &r_pad).rewards;
        let loss = bradley_terry_loss(rc, rr);
        losses.push(loss.clone().into_scalar());
        let grads = GradientsParams::from_grads(loss.backward(), &rm);
        rm = optim.step(3e-3, rm, grads);
    }
    let after = accuracy(&rm.valid());
    assert_eq!(
        after, 1.0,
        "accuracy before {before}, after {after}; losses {losses:?}"
    );
    assert!(losses.last().unwrap() < &0.1, "{losses:?}");
}

/// 16 pairs of random token rows that share a prompt, as the tokenizer would produce them.
fn random_pairs(n: usize, vocab: u32, seed: u64) -> Vec<TokenizedPair> {
    let mut s = seed;
    let mut next = move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 33) % vocab as u64) as u32
    };
    (0..n)
        .map(|i| TokenizedPair {
            prompt: (0..3 + i % 5).map(|_| next()).collect(),
            chosen: (0..2 + i % 3).map(|_| next()).collect(),
            rejected: (0..1 + i % 4).map(|_| next()).collect(),
            line: i + 1,
            truncated: false,
        })
        .collect()
}

/// Rewards of `prompt ++ reply` computed the plain way: each sequence alone, full forward.
fn plain_rewards(rm: &RewardModel<TB>, pairs: &[TokenizedPair]) -> (Vec<f32>, Vec<f32>) {
    let one = |ids: Vec<u32>| {
        let (t, p) = right_padded::<TB>(&[ids], &device());
        to_vec(rm.forward(t, &p).rewards)[0]
    };
    (
        pairs.iter().map(|p| one(p.chosen_ids())).collect(),
        pairs.iter().map(|p| one(p.rejected_ids())).collect(),
    )
}

#[test]
fn frozen_features_with_a_shared_prompt_are_exact() {
    let rm = tiny_rm::<TB>(&device());
    let vocab = rm.backbone.config.vocab_size as u32;
    let pairs = random_pairs(12, vocab, 7);
    let (want_c, want_r) = plain_rewards(&rm, &pairs);
    let n = rm.backbone.layers.len();
    // A small budget forces several batches of mixed lengths.
    for (upto, last_only) in [(n, true), (n - 1, false), (0, false)] {
        let feats = frozen_features(
            &rm.backbone,
            &pairs,
            upto,
            last_only,
            40,
            "test",
            &r2m_core::Silent,
        );
        let inputs = PairInputs::Features {
            pairs: &pairs,
            features: &feats,
            layer: upto,
        };
        let (c, r) = score_pairs(&rm, inputs, 40);
        assert!(
            max_abs_diff(&c, &want_c) < 1e-4,
            "upto {upto}: {c:?} vs {want_c:?}"
        );
        assert!(
            max_abs_diff(&r, &want_r) < 1e-4,
            "upto {upto}: {r:?} vs {want_r:?}"
        );
    }
    let (c, r) = score_pairs(&rm, PairInputs::Tokens(&pairs), 40);
    assert!(max_abs_diff(&c, &want_c) < 1e-4 && max_abs_diff(&r, &want_r) < 1e-4);
}

/// Train the tiny RM on `pairs` (also the eval set) into a fresh temporary directory.
fn train_tiny(
    pairs: &[TokenizedPair],
    cfg: &RmTrainConfig,
) -> (tempfile::TempDir, RewardModel<AB>, r2m_rl::RmTrainSummary) {
    let tmp = tempfile::tempdir().unwrap();
    let out = RmOutputs {
        dir: tmp.path(),
        tokenizer: None,
        head_only_base: None,
        observer: &r2m_core::Silent,
    };
    let (rm, summary) =
        train_reward_model(tiny_rm::<AB>(&device()), pairs, pairs, cfg, out).unwrap();
    (tmp, rm, summary)
}

#[test]
fn train_rm_fits_16_pairs_in_every_trainable_setting_and_saves() {
    let rm0 = tiny_rm::<AB>(&device());
    let vocab = rm0.backbone.config.vocab_size as u32;
    let pairs = random_pairs(16, vocab, 99);
    for (trainable, lr, epochs) in [(Trainable::Top(1), 3e-3, 40), (Trainable::All, 3e-3, 40)] {
        let cfg = RmTrainConfig {
            trainable,
            epochs,
            lr,
            warmup_ratio: 0.0,
            token_budget: 64,
            ..RmTrainConfig::default()
        };
        let (tmp, rm, summary) = train_tiny(&pairs, &cfg);
        let after = summary.eval_after.as_ref().unwrap();
        assert_eq!(after.accuracy, 1.0, "{trainable}: {after}");
        assert!(after.loss < summary.eval_before.as_ref().unwrap().loss);
        // One metrics line per optimizer step.
        let metrics = std::fs::read_to_string(tmp.path().join("metrics.jsonl")).unwrap();
        assert_eq!(metrics.lines().count(), summary.steps, "{trainable}");
        // The saved RM scores what the trained one scores.
        let saved = RewardModel::<TB>::load_hf_dir(tmp.path(), &device()).unwrap();
        let (c0, r0) = plain_rewards(&rm.valid(), &pairs);
        let (c1, r1) = plain_rewards(&saved, &pairs);
        assert!(max_abs_diff(&c0, &c1) < 1e-5 && max_abs_diff(&r0, &r1) < 1e-5);
        let e = evaluate_rm(&saved, &pairs, 64, &r2m_core::Silent);
        assert_eq!(e.accuracy, 1.0, "{e}");
        if trainable == Trainable::Top(1) {
            // Only the top block, the final norm and the head moved.
            let before = tiny_rm::<TB>(&device());
            let w = |m: &RewardModel<TB>, l: usize| {
                to_vec(m.backbone.layers[l].mlp.down_proj.weight.val())
            };
            assert_eq!(w(&before, 0), w(&saved, 0));
            assert!(max_abs_diff(&w(&before, 1), &w(&saved, 1)) > 1e-4);
        }
    }
}

#[test]
fn head_only_training_moves_only_the_head() {
    let vocab = tiny_rm::<TB>(&device()).backbone.config.vocab_size as u32;
    let pairs = random_pairs(16, vocab, 5);
    let cfg = RmTrainConfig {
        trainable: Trainable::Head,
        epochs: 30,
        lr: 1e-2,
        token_budget: 64,
        ..RmTrainConfig::default()
    };
    let (_tmp, rm, s) = train_tiny(&pairs, &cfg);
    let (before, after) = (s.eval_before.unwrap(), s.eval_after.unwrap());
    assert!(after.loss < before.loss - 0.05, "{before} -> {after}");
    let b = tiny_rm::<TB>(&device());
    let rm = rm.valid();
    assert_eq!(
        to_vec(b.backbone.norm.weight.val()),
        to_vec(rm.backbone.norm.weight.val())
    );
    assert!(
        max_abs_diff(
            &to_vec(b.score.weight.val()),
            &to_vec(rm.score.weight.val())
        ) > 1e-3
    );
}

#[test]
fn lora_rm_training_moves_only_adapters_and_head_and_saves_merged() {
    use r2m_models::lora::{LoraConfig, LoraLayers, LoraTarget};
    let vocab = tiny_rm::<TB>(&device()).backbone.config.vocab_size as u32;
    let pairs = random_pairs(16, vocab, 7);
    for layers in [LoraLayers::Top(1), LoraLayers::All] {
        let cfg = RmTrainConfig {
            trainable: Trainable::Lora,
            epochs: 40,
            lr: 1e-2,
            warmup_ratio: 0.0,
            token_budget: 64,
            lora: Some(LoraConfig {
                r: 4,
                alpha: 8.0,
                targets: vec![LoraTarget::Q, LoraTarget::V, LoraTarget::Down],
                layers,
                ..Default::default()
            }),
            ..RmTrainConfig::default()
        };
        let (tmp, rm, s) = train_tiny(&pairs, &cfg);
        let (before, after) = (s.eval_before.unwrap(), s.eval_after.unwrap());
        assert!(
            after.loss < before.loss - 0.05,
            "{layers}: {before} -> {after}"
        );
        let rm = rm.valid();
        let b = tiny_rm::<TB>(&device());
        // The base weights and the final norm did not move; the adapters and the head did.
        let base = |m: &RewardModel<TB>| to_vec(m.backbone.layers[1].mlp.down_proj.weight.val());
        assert_eq!(base(&b), base(&rm), "{layers}");
        assert_eq!(
            to_vec(b.backbone.norm.weight.val()),
            to_vec(rm.backbone.norm.weight.val())
        );
        let lora = rm.backbone.layers[1].mlp.down_proj.lora.as_ref().unwrap();
        assert!(to_vec(lora.b.val()).iter().any(|x| x.abs() > 1e-4));
        assert!(
            max_abs_diff(
                &to_vec(b.score.weight.val()),
                &to_vec(rm.score.weight.val())
            ) > 1e-3
        );
        // Lower blocks get adapters only with `all`.
        let low = rm.backbone.layers[0].mlp.down_proj.lora.is_some();
        assert_eq!(low, layers == LoraLayers::All);
        // The saved directory is the merged RM: it scores what the adapted one scores.
        let saved = RewardModel::<TB>::load_hf_dir(tmp.path(), &device()).unwrap();
        let (c0, r0) = plain_rewards(&rm, &pairs);
        let (c1, r1) = plain_rewards(&saved, &pairs);
        assert!(max_abs_diff(&c0, &c1) < 1e-4 && max_abs_diff(&r0, &r1) < 1e-4);
        let json = std::fs::read_to_string(tmp.path().join("train_config.json")).unwrap();
        assert!(json.contains("\"r\": 4"), "{json}");
    }
}

#[test]
fn hf_sequence_classifier_checkpoint_scores_match_transformers() {
    // Written by scripts/reference/check_rm.py fixture: transformers'
    // LlamaForSequenceClassification, each sequence scored alone.
    let fx = read_json("tiny/tiny-llama3-rm.json");
    let rm = RewardModel::<TB>::load_hf_dir(&fixture_dir().join("tiny/tiny-llama3-rm"), &device())
        .unwrap();
    let seqs: Vec<Vec<u32>> = fx["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids_of)
        .collect();
    let want = floats_of(&fx["rewards"]);
    // Scored together, right-padded: padding must not change anything.
    let (ids, pad) = right_padded::<TB>(&seqs, &device());
    let got = to_vec(rm.forward(ids, &pad).rewards);
    assert!(max_abs_diff(&got, &want) < 1e-4, "{got:?} vs {want:?}");
}
