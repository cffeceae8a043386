//! Reward models: the HF sequence-classification layout, reading at the last real token, and
//! Bradley-Terry training that can fit a small set of pairs.

use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::{Int, Tensor, TensorData};
use r2m_core::loss::bradley_terry_loss;
use r2m_models::{load_hf_dir, Padding, RewardModel};

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
    type AB = Autodiff<TB>;
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
