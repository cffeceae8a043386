//! The same generic model code on a second backend: WGPU (lavapipe on CPU-only machines), with
//! burn's kernel fusion as r2m-cli's `wgpu` feature builds it, against the CPU backend, for
//! inference, decoding with r2m's attention kernel, and a training step's gradients.
//!
//! Each test needs a WGPU adapter (on a machine without a GPU: Mesa's lavapipe, Debian's
//! `mesa-vulkan-drivers`). Without one it is skipped, saying so on stderr even when the harness
//! captures output; `R2M_REQUIRE_WGPU=1` (as `.ci/run` sets) makes a missing adapter a failure.

use burn::backend::{Autodiff, Wgpu};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Bool, Distribution, ElementConversion, Int, Tensor, TensorData};
use burn_wgpu::WgpuRuntime;
use r2m_core::tensor::masked_mean;
use r2m_models::{fused, generate, load_gguf, load_hf_dir, GenerationConfig, Padding};

use crate::common::*;

/// Whether WGPU finds an adapter of the APIs burn's device takes (Vulkan, Metal, DX12; not GL);
/// otherwise `test` is skipped with a line saying why, or fails
/// under `R2M_REQUIRE_WGPU=1`.
fn wgpu_or_skip(test: &str) -> bool {
    static FOUND: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let found = *FOUND.get_or_init(|| {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle());
        !futures_lite::future::block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY))
            .is_empty()
    });
    if found {
        return true;
    }
    let why =
        "WGPU finds no adapter (no Vulkan driver; on Debian: apt install mesa-vulkan-drivers)";
    if std::env::var("R2M_REQUIRE_WGPU").is_ok_and(|v| v == "1") {
        panic!("R2M_REQUIRE_WGPU=1, but {why}");
    }
    // Straight to stderr: the harness captures `eprintln!` of passing tests.
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "skipped {test}: {why}; R2M_REQUIRE_WGPU=1 makes this a failure"
    );
    false
}

#[test]
fn wgpu_forward_matches_cpu_backend_on_tiny_llama3() {
    if !wgpu_or_skip("backends::wgpu_forward_matches_cpu_backend_on_tiny_llama3") {
        return;
    }
    let dir = fixture_dir().join("tiny").join("tiny-llama3");
    let rows = [vec![5i64, 17, 99, 3, 42, 7], vec![1, 2, 3, 4, 5, 6]];
    let cpu = load_hf_dir::<TB>(&dir, &device()).unwrap().model;
    let want = to_vec(
        cpu.forward(
            int_tensor(&[vec![5, 17, 99, 3, 42, 7], vec![1, 2, 3, 4, 5, 6]]),
            &Padding::none(2, 6),
        )
        .logits,
    );

    let dev = Default::default();
    let gpu = load_hf_dir::<Wgpu>(&dir, &dev).unwrap().model;
    let ids = Tensor::<Wgpu, 2, Int>::from_data(TensorData::new(rows.concat(), [2, 6]), &dev);
    let got: Vec<f32> = gpu
        .forward(ids, &Padding::none(2, 6))
        .logits
        .into_data()
        .convert::<f32>()
        .to_vec()
        .unwrap();
    let max_diff = max_abs_diff(&got, &want);
    assert!(max_diff < 1e-3, "wgpu vs cpu: {max_diff}");
}

/// One training step's loss and gradients for `rows` (right-padded where `valid` says so): the
/// mean negative log-probability of each next token, backpropagated through the whole tiny model. Returns
/// the loss and the gradients of the embedding, layer 0's input norm, query, key, value and down
/// projections, and the final norm, flattened in that order.
fn loss_and_gradients<B: AutodiffBackend>(
    dev: &B::Device,
    rows: &[Vec<i64>],
    valid: &[Vec<bool>],
) -> (f32, Vec<f32>) {
    let dir = fixture_dir().join("tiny").join("tiny-llama3");
    let model = load_hf_dir::<B>(&dir, dev).unwrap().model;
    let (b, s) = (rows.len(), rows[0].len());
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(rows.concat(), [b, s]), dev);
    let padding = Padding {
        valid: valid.to_vec(),
    };
    let logits = model.forward(ids.clone(), &padding).logits;
    let vocab = logits.dims()[2];
    let logp = fused::token_log_probs(
        logits.slice([0..b, 0..s - 1, 0..vocab]),
        ids.slice([0..b, 1..s]),
    );
    let targets_valid: Vec<f32> = valid
        .iter()
        .flat_map(|r| r[1..].iter().map(|&v| if v { 1.0 } else { 0.0 }))
        .collect();
    let mask = Tensor::<B, 2>::from_data(TensorData::new(targets_valid, [b, s - 1]), dev);
    let loss = -masked_mean(logp, mask);
    let grads = loss.backward();
    let layer = &model.layers[0];
    let mut all = Vec::new();
    for g in [
        model.embed_tokens.grad(&grads).unwrap().into_data(),
        layer.input_norm.weight.grad(&grads).unwrap().into_data(),
        layer.attn.q_proj.weight.grad(&grads).unwrap().into_data(),
        layer.attn.k_proj.weight.grad(&grads).unwrap().into_data(),
        layer.attn.v_proj.weight.grad(&grads).unwrap().into_data(),
        layer.mlp.down_proj.weight.grad(&grads).unwrap().into_data(),
        model.norm.weight.grad(&grads).unwrap().into_data(),
    ] {
        all.extend(g.convert::<f32>().to_vec::<f32>().unwrap());
    }
    (loss.into_scalar().elem::<f32>(), all)
}

#[test]
fn wgpu_training_gradients_match_cpu_backend_on_tiny_llama3() {
    if !wgpu_or_skip("backends::wgpu_training_gradients_match_cpu_backend_on_tiny_llama3") {
        return;
    }
    // The second row is right-padded: its last two positions take no part in the loss.
    let rows = [vec![5i64, 17, 99, 3, 42, 7, 11], vec![1, 2, 3, 4, 5, 6, 0]];
    let valid = [
        vec![true; 7],
        vec![true, true, true, true, true, false, false],
    ];
    let (want_loss, want) = loss_and_gradients::<AB>(&device(), &rows, &valid);
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(scale > 1e-3, "gradients too small to compare: {scale}");
    // First with burn's backward of every tensor op, then with the custom autodiff ops that
    // `r2m` registers for the backend it runs on (RoPE, RMSNorm, attention). No other test
    // registers them for `Autodiff<Wgpu>`.
    for path in ["tensor ops", "custom autodiff ops"] {
        if path == "custom autodiff ops" {
            fused::register_autodiff_ops::<Wgpu>();
        }
        let (got_loss, got) =
            loss_and_gradients::<Autodiff<Wgpu>>(&Default::default(), &rows, &valid);
        assert!(
            (got_loss - want_loss).abs() < 1e-4,
            "{path}: loss: wgpu {got_loss} vs cpu {want_loss}"
        );
        let max_diff = max_abs_diff(&got, &want);
        assert!(
            max_diff < 1e-3 * scale,
            "{path}: gradients: wgpu vs cpu differ by {max_diff} (largest {scale})"
        );
    }
}

/// `r2m` files its decoding attention kernel for WGPU (`fused::register_cube_ops`), so that
/// `fused::attention` takes it for up to 16 query rows per head.
fn register_attention_kernel() {
    fused::register_cube_ops::<WgpuRuntime, f32, i32, u32>();
}

/// The kernel against the CPU backend's attention on the same random inputs: one and several
/// query rows, a key count past one shared-memory chunk (256), keys read through the strides of
/// a wider buffer (as from the KV cache), and masks that hide whole chunks before any visible key.
#[test]
fn wgpu_attention_kernel_matches_cpu_attention() {
    if !wgpu_or_skip("backends::wgpu_attention_kernel_matches_cpu_attention") {
        return;
    }
    register_attention_kernel();
    let dev = Default::default();
    for (rows, keys, hidden_before) in [(1, 7, 0), (3, 40, 5), (16, 300, 0), (2, 600, 520)] {
        let (b, h, d, width) = (2, 3, 64, keys + 9);
        let q = Tensor::<TB, 4>::random([b, h, rows, d], Distribution::Normal(0.0, 2.0), &device());
        let k =
            Tensor::<TB, 4>::random([b, h, width, d], Distribution::Normal(0.0, 2.0), &device());
        let v =
            Tensor::<TB, 4>::random([b, h, width, d], Distribution::Normal(0.0, 1.0), &device());
        // Row 0 of batch 1 sees only keys from `hidden_before` on; every other row every third
        // key hidden; no row sees nothing.
        let mut m = Vec::new();
        for bi in 0..b {
            for _ in 0..h {
                for r in 0..rows {
                    for key in 0..keys {
                        m.push(if bi == 1 && r == 0 {
                            key < hidden_before
                        } else {
                            key % 3 == 1 && key != r
                        });
                    }
                }
            }
        }
        let mask = TensorData::new(m, [b, h, rows, keys]);
        let want = to_vec(fused::attention(
            q.clone(),
            k.clone().narrow(2, 0, keys),
            v.clone().narrow(2, 0, keys),
            Tensor::<TB, 4, Bool>::from_data(mask.clone(), &device()),
        ));
        let gpu = |t: Tensor<TB, 4>| Tensor::<Wgpu, 4>::from_data(t.into_data(), &dev);
        let got: Vec<f32> = fused::attention(
            gpu(q),
            gpu(k).narrow(2, 0, keys),
            gpu(v).narrow(2, 0, keys),
            Tensor::<Wgpu, 4, Bool>::from_data(mask, &dev),
        )
        .into_data()
        .convert::<f32>()
        .to_vec()
        .unwrap();
        let max_diff = max_abs_diff(&got, &want);
        assert!(
            max_diff < 1e-4,
            "{rows} rows, {keys} keys: kernel vs cpu differ by {max_diff}"
        );
    }
}

/// SmolLM2 decoding on WGPU through the kernel: a batch of two left-padded prompts gives
/// PyTorch's greedy continuation for the fixture's prompt, and the CPU backend's tokens and
/// log-probs for the other.
#[test]
fn wgpu_smollm2_decoding_with_the_attention_kernel_matches_pytorch_and_cpu() {
    if !wgpu_or_skip(
        "backends::wgpu_smollm2_decoding_with_the_attention_kernel_matches_pytorch_and_cpu",
    ) {
        return;
    }
    register_attention_kernel();
    let fx = read_json("smollm2_parity.json");
    let case = &fx["cases"][1]; // no EOS in its first 6 greedy tokens
    let cpu = smollm2();
    let tok = cpu.tokenizer().unwrap();
    let prompts = vec![ids_of(&case["input_ids"]), tok.encode("Hi", false).unwrap()];
    let cfg = GenerationConfig {
        max_new_tokens: 6,
        ..Default::default()
    };
    let want = generate(&cpu.model, None, &prompts, &cfg).unwrap();

    let path = r2m_models::hub::fetch_smollm2(&mut |m| eprintln!("{m}")).expect("fetch smollm2");
    let gpu = load_gguf::<Wgpu>(&path, &Default::default()).expect("load smollm2");
    let got = generate(&gpu.model, None, &prompts, &cfg).unwrap();
    assert_eq!(
        got[0].tokens,
        ids_of(&case["greedy_ids"])[..6],
        "wgpu vs PyTorch's greedy continuation of {}",
        case["name"]
    );
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.tokens, w.tokens, "wgpu vs cpu tokens");
        let max_diff = max_abs_diff(&g.logprobs, &w.logprobs);
        assert!(
            max_diff < 1e-3,
            "wgpu vs cpu log-probs differ by {max_diff}"
        );
    }
}
