//! Adapters against the base model and against their merged form; PEFT files round trip.

use super::*;
use crate::config::{Activation, ModelConfig};
use crate::model::Padding;
use burn::module::{AutodiffModule, ModuleVisitor, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{Distribution, ElementConversion, Int, TensorData};
use r2m_core::testing::{TestAutodiff as AD, TestBackend as TB};

/// A tiny random Llama (2 blocks, GQA, tied head).
fn llama<B: Backend>() -> CausalLm<B> {
    let mut w = WeightMap::random("tiny-llama", 7);
    CausalLm::from_weights(&ModelConfig::tiny_llama(), &mut w, &Default::default()).unwrap()
}

/// A tiny random GPT-NeoX (fused q/k/v in the checkpoint, no gate, biases, untied head).
fn neox<B: Backend>() -> CausalLm<B> {
    let cfg = ModelConfig {
        arch: Architecture::GptNeoX,
        num_kv_heads: 4,
        rotary_dim: 4,
        tie_word_embeddings: false,
        qkv_bias: true,
        out_bias: true,
        parallel_residual: true,
        activation: Activation::Gelu,
        ..ModelConfig::tiny_llama()
    };
    let mut w = WeightMap::random("tiny-neox", 8);
    CausalLm::from_weights(&cfg, &mut w, &Default::default()).unwrap()
}

fn tokens<B: Backend>() -> Tensor<B, 2, Int> {
    let ids: Vec<i64> = (0..14).map(|i| (i * 7 + 3) % 97).collect();
    Tensor::from_data(TensorData::new(ids, [2, 7]), &Default::default())
}

fn logits<B: Backend>(m: &CausalLm<B>) -> Vec<f32> {
    m.forward(tokens(), &Padding::none(2, 7))
        .logits
        .into_data()
        .convert::<f32>()
        .to_vec()
        .unwrap()
}

/// `a == b` exactly, reported by the largest difference.
fn assert_same(a: &[f32], b: &[f32], what: &str) {
    assert!(a == b, "{what}: differ by up to {}", max_diff(a, b));
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Replace every adapter's `A` and `B` with normal noise (std `std`), keeping their params'
/// ids and whether they train.
fn randomize<B: Backend>(mut m: CausalLm<B>, std: f64) -> CausalLm<B> {
    let neox = is_neox(&m);
    for block in &mut m.layers {
        for &site in Site::all(neox) {
            if let Some(Some(a)) = site.slot(block) {
                let noise = |p: Param<Tensor<B, 2>>| {
                    p.map(|t| {
                        let trains = t.is_require_grad();
                        t.random_like(Distribution::Normal(0.0, std))
                            .set_require_grad(trains)
                    })
                };
                a.a = noise(a.a.clone());
                a.b = noise(a.b.clone());
            }
        }
    }
    m
}

fn lora(targets: &[LoraTarget], layers: LoraLayers) -> LoraConfig {
    LoraConfig {
        r: 4,
        alpha: 8.0,
        targets: targets.to_vec(),
        layers,
        seed: 3,
        ..Default::default()
    }
}

#[test]
fn fresh_adapters_leave_the_output_exactly_as_it_was() {
    let base = llama::<TB>();
    let want = logits(&base);
    let m = add_adapters(base, &LoraConfig::default()).unwrap();
    // Every projection of every block carries one; B = 0.
    assert_eq!(adapter_tensors(&m).len(), 2 * 7 * 2);
    assert_same(&logits(&m), &want, "llama");
    let base = neox::<TB>();
    let want = logits(&base);
    let cfg = lora(
        &[LoraTarget::K, LoraTarget::O, LoraTarget::Down],
        LoraLayers::All,
    );
    let m = add_adapters(base, &cfg).unwrap();
    assert!(m.layers[0].attn.qkv_lora.is_some() && m.layers[0].attn.k_proj.lora.is_none());
    assert_same(&logits(&m), &want, "neox");
}

#[test]
fn a_is_seeded_kaiming_uniform_and_b_zero() {
    let m = add_adapters(llama::<TB>(), &lora(&[LoraTarget::Q], LoraLayers::All)).unwrap();
    let again = add_adapters(llama::<TB>(), &lora(&[LoraTarget::Q], LoraLayers::All)).unwrap();
    let t = adapter_tensors(&m);
    let a = &t["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"];
    assert_eq!(a.shape, [4, 32]);
    let bound = 1.0 / 32f32.sqrt();
    assert!(a.data.iter().all(|x| x.abs() <= bound));
    assert!(a.data.iter().any(|x| x.abs() > bound / 2.0));
    let b = &t["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"];
    assert_eq!(b.shape, [32, 4]);
    assert!(b.data.iter().all(|&x| x == 0.0));
    // Same seed, same start; another block's A differs.
    let name = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight";
    assert_eq!(adapter_tensors(&again)[name].data, a.data);
    assert_ne!(
        t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].data,
        a.data
    );
}

/// Every parameter's gradient, by whether it belongs to an adapter.
struct GradCheck<'a> {
    grads: &'a GradientsParams,
    adapters: Vec<ParamId>,
    /// (adapter params with a non-zero gradient, other params with any gradient)
    seen: (usize, usize),
    total: usize,
}

impl ModuleVisitor<AD> for GradCheck<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AD, D>>) {
        self.total += 1;
        let g = self.grads.get::<TB, D>(param.id);
        if self.adapters.contains(&param.id) {
            let g = g.expect("an adapter parameter gets a gradient");
            let norm: f32 = g.abs().sum().into_scalar().elem();
            if norm > 0.0 {
                self.seen.0 += 1;
            }
        } else if g.is_some() {
            self.seen.1 += 1;
        }
    }
}

#[test]
fn gradients_reach_only_the_adapters() {
    for (model, targets) in [
        (llama::<AD>(), LoraTarget::ALL.to_vec()),
        (
            neox::<AD>(),
            vec![
                LoraTarget::Q,
                LoraTarget::O,
                LoraTarget::Up,
                LoraTarget::Down,
            ],
        ),
    ] {
        let m = add_adapters(model, &lora(&targets, LoraLayers::All)).unwrap();
        // B random, so that A's gradient is not zero.
        let m = randomize(m, 0.05);
        let neox = is_neox(&m);
        let mut adapters = Vec::new();
        for block in &m.layers {
            for &site in Site::all(neox) {
                if let Some(a) = site.adapter(block) {
                    adapters.extend([a.a.id, a.b.id]);
                }
            }
        }
        let loss = m
            .forward(tokens(), &Padding::none(2, 7))
            .logits
            .powi_scalar(2)
            .mean();
        let grads = GradientsParams::from_grads(loss.backward(), &m);
        let n = adapters.len();
        let mut check = GradCheck {
            grads: &grads,
            adapters,
            seen: (0, 0),
            total: 0,
        };
        m.visit(&mut check);
        assert_eq!(check.seen, (n, 0), "of {} params", check.total);
        assert!(check.total > n);
    }
}

#[test]
fn merged_and_unmerged_agree_and_adapters_off_is_the_base() {
    for (base, targets) in [
        (llama::<TB>(), LoraTarget::ALL.to_vec()),
        (
            neox::<TB>(),
            vec![
                LoraTarget::V,
                LoraTarget::O,
                LoraTarget::Up,
                LoraTarget::Down,
            ],
        ),
    ] {
        let want_base = logits(&base);
        let m = randomize(
            add_adapters(base, &lora(&targets, LoraLayers::All)).unwrap(),
            0.2,
        );
        let adapted = logits(&m);
        assert!(
            max_diff(&adapted, &want_base) > 1e-2,
            "the adapters do something"
        );
        let merged = merge_adapters(m.clone());
        assert!(!has_adapters(&merged));
        let d = max_diff(&logits(&merged), &adapted);
        assert!(d < 1e-5, "merged vs unmerged: {d}");
        // The HF export of an adapted model is the merged model.
        let (a, b) = (m.to_weights(), merged.to_weights());
        for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
            assert_eq!(na, nb);
            assert!(max_diff(&ta.data, &tb.data) < 1e-6, "{na}");
        }
        assert_same(&logits(&without_adapters(m)), &want_base, "adapters off");
    }
}

#[test]
fn rslora_scales_by_the_square_root_of_r() {
    let m = add_adapters(
        llama::<TB>(),
        &LoraConfig {
            r: 16,
            alpha: 8.0,
            rslora: true,
            ..Default::default()
        },
    )
    .unwrap();
    let a = m.layers[0].attn.q_proj.lora.as_ref().unwrap();
    assert_eq!(a.scale(), 2.0);
    let m = add_adapters(
        llama::<TB>(),
        &LoraConfig {
            r: 16,
            alpha: 8.0,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(m.layers[0].attn.q_proj.lora.as_ref().unwrap().scale(), 0.5);
}

#[test]
fn peft_files_round_trip_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        (
            llama::<TB>(),
            lora(
                &[LoraTarget::Q, LoraTarget::V, LoraTarget::Gate],
                LoraLayers::Top(1),
            ),
        ),
        (
            llama::<TB>(),
            LoraConfig {
                rslora: true,
                alpha: 3.5,
                ..lora(&LoraTarget::ALL, LoraLayers::All)
            },
        ),
        (
            neox::<TB>(),
            lora(&[LoraTarget::K, LoraTarget::Up], LoraLayers::All),
        ),
    ];
    for (i, (base, cfg)) in cases.into_iter().enumerate() {
        let dir = tmp.path().join(format!("adapter-{i}"));
        let m = randomize(add_adapters(base.clone(), &cfg).unwrap(), 0.2);
        save_peft_adapter(&m, &dir, "tiny").unwrap();
        let v: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(ADAPTER_CONFIG)).unwrap())
                .unwrap();
        assert_eq!(v["peft_type"], "LORA");
        assert_eq!(v["task_type"], "CAUSAL_LM");
        assert_eq!(v["r"], 4);
        assert_eq!(v["use_rslora"], cfg.rslora);
        assert_eq!(v["lora_alpha"].as_f64(), Some(cfg.alpha));
        let loaded = load_peft_adapter(base, &dir).unwrap();
        assert_same(&logits(&loaded), &logits(&m), &format!("case {i}"));
        match i {
            0 => {
                assert_eq!(v["layers_to_transform"], json!([1]));
                assert_eq!(
                    v["target_modules"],
                    json!(["gate_proj", "q_proj", "v_proj"])
                );
                assert_eq!(first_adapted_layer(&loaded), Some(1));
            }
            1 => assert!(v["layers_to_transform"].is_null()),
            _ => {
                assert_eq!(
                    v["target_modules"],
                    json!(["dense_h_to_4h", "query_key_value"])
                );
                // HF's fused rows, [heads, 3, head_dim]: head 0's k rows are rows 8..16 of B.
                let path = dir.join(ADAPTER_WEIGHTS);
                let mut w = WeightMap::new(&path);
                load_safetensors_file(&path, &mut w).unwrap();
                let name = "base_model.model.gpt_neox.layers.0.attention.query_key_value";
                let hf = &w.tensors[&format!("{name}.lora_B.weight")];
                assert_eq!(hf.shape, [96, 4]);
                let ours = &adapter_tensors(&m)[&format!("{name}.lora_B.weight")];
                // r2m's rows: q (0..32), k (32..64), v (64..96).
                assert_eq!(hf.data[8 * 4..16 * 4], ours.data[32 * 4..40 * 4]);
            }
        }
    }
}

#[test]
fn config_errors_name_the_key() {
    let err = |m: CausalLm<TB>, cfg: LoraConfig| add_adapters(m, &cfg).unwrap_err().to_string();
    let e = err(
        neox(),
        lora(&[LoraTarget::Q, LoraTarget::Gate], LoraLayers::All),
    );
    assert!(e.contains("lora.targets") && e.contains("`gate`"), "{e}");
    let e = err(
        llama(),
        LoraConfig {
            r: 0,
            ..Default::default()
        },
    );
    assert!(e.contains("lora.r"), "{e}");
    let e = err(llama(), lora(&[LoraTarget::Q], LoraLayers::Top(3)));
    assert!(e.contains("lora.layers") && e.contains("top:3"), "{e}");
    let e = err(
        llama(),
        LoraConfig {
            dropout: 1.0,
            ..Default::default()
        },
    );
    assert!(e.contains("lora.dropout"), "{e}");
    let e = "qq".parse::<LoraTarget>().unwrap_err().to_string();
    assert!(e.contains("`qq`") && e.contains("`gate`"), "{e}");
    assert_eq!("top:2".parse::<LoraLayers>().unwrap(), LoraLayers::Top(2));
    assert!("top:0".parse::<LoraLayers>().is_err());
}

#[test]
fn dropout_is_off_without_gradients_and_at_zero() {
    let cfg = LoraConfig {
        dropout: 0.5,
        ..Default::default()
    };
    let m = randomize(add_adapters(llama::<AD>(), &cfg).unwrap(), 0.2);
    let plain = m.valid();
    // The inner backend never drops; two passes agree.
    assert_same(&logits(&plain), &logits(&plain), "no gradients");
    // Under autodiff the adapters' input is dropped: two passes differ, and differ from the
    // pass without dropout.
    let (a, b) = (logits(&m), logits(&m));
    assert!(max_diff(&a, &b) > 1e-3 && max_diff(&a, &logits(&plain)) > 1e-3);
    // At 0, training computes what inference does (to rounding: the kernels differ).
    let m = randomize(
        add_adapters(llama::<AD>(), &LoraConfig::default()).unwrap(),
        0.2,
    );
    let d = max_diff(&logits(&m), &logits(&m.valid()));
    assert!(d < 1e-5, "{d}");
    assert_same(&logits(&m), &logits(&m), "dropout 0 under autodiff");
}

#[test]
fn a_bad_adapter_file_is_refused_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let m = randomize(
        add_adapters(llama::<TB>(), &lora(&[LoraTarget::Q], LoraLayers::All)).unwrap(),
        0.1,
    );
    save_peft_adapter(&m, dir, "tiny").unwrap();
    // Onto a model with other shapes.
    let e = load_peft_adapter(neox::<TB>(), dir)
        .unwrap_err()
        .to_string();
    assert!(e.contains(ADAPTER_WEIGHTS) && e.contains("disagree"), "{e}");
    let text = std::fs::read_to_string(dir.join(ADAPTER_CONFIG)).unwrap();
    std::fs::write(
        dir.join(ADAPTER_CONFIG),
        text.replace("\"use_dora\": false", "\"use_dora\": true"),
    )
    .unwrap();
    let e = load_peft_adapter(llama::<TB>(), dir)
        .unwrap_err()
        .to_string();
    assert!(e.contains("DoRA") && e.contains(ADAPTER_CONFIG), "{e}");
    let e = save_peft_adapter(&llama::<TB>(), &dir.join("x"), "tiny")
        .unwrap_err()
        .to_string();
    assert!(e.contains("no LoRA adapters"), "{e}");
}
