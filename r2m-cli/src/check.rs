//! `r2m bench check`: is this backend computing the right numbers? Run it before timing a new
//! backend or machine (a GPU, a new dtype): the tests run on the CPU only.
//!
//! Three checks, each printed with its measured difference:
//! 1. the tiny random-weight checkpoints of `tests/fixtures/tiny` against the logits PyTorch
//!    `transformers` computed for them (`scripts/reference/make_fixtures.py`);
//! 2. KV-cache decoding against the full forward pass: a batch with a left-padded row decodes up
//!    to 8 tokens, then one forward pass over prompt + completion must give the same log-probs;
//! 3. sampling on the device ([`r2m_models::generate::sample_on_device`]) against the host's
//!    [`r2m_models::generate::sample`] on the same logits and RNG streams.

use std::path::Path;

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};
use r2m_core::{R2mError, Result};
use r2m_models::generate::{sample, sample_on_device};
use r2m_models::{generate, load_hf_dir, GenerationConfig, Padding};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Largest allowed logit difference, relative to the largest |logit| of the reference: loose
/// enough for bf16 and TF32 rounding, far below what a wrong kernel gives.
const REL_TOL: f32 = 0.05;

fn float_rows(v: &serde_json::Value) -> Vec<f32> {
    match v {
        serde_json::Value::Array(a) => a.iter().flat_map(float_rows).collect(),
        x => vec![x.as_f64().unwrap_or(f64::NAN) as f32],
    }
}

fn to_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("f32 tensor")
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Prints one check's line and turns a failure into an error.
fn verdict(what: &str, ok: bool, detail: String, failures: &mut Vec<String>) {
    println!(
        "check {what}: {detail} {}",
        if ok { "ok" } else { "FAILED" }
    );
    if !ok {
        failures.push(format!("{what}: {detail}"));
    }
}

pub fn run<B: Backend>(fixtures: &Path, device: &B::Device, backend: &str) -> Result<()> {
    eprintln!("check: backend {backend}, fixtures {}", fixtures.display());
    let mut failures = Vec::new();
    let tiny = fixtures.join("tiny");
    for name in ["tiny-llama3", "tiny-qwen2", "tiny-neox", "tiny-neox-seq"] {
        let file = tiny.join(format!("{name}.json"));
        let text = std::fs::read_to_string(&file).map_err(|e| R2mError::io(&file, e))?;
        let fx: serde_json::Value = serde_json::from_str(&text).map_err(|e| R2mError::Format {
            path: file.clone(),
            msg: e.to_string(),
        })?;
        let rows: Vec<Vec<i64>> = fx["input_ids"]
            .as_array()
            .map(|rows| {
                rows.iter()
                    .map(|r| float_rows(r).iter().map(|&x| x as i64).collect())
                    .collect()
            })
            .unwrap_or_default();
        let (b, s) = (rows.len(), rows.first().map_or(0, Vec::len));
        let model = load_hf_dir::<B>(&tiny.join(name), device)?.model;
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(rows.concat(), [b, s]), device);
        let got = to_vec(model.forward(ids, &Padding::none(b, s)).logits);
        let want = float_rows(&fx["logits"]);
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        let diff = max_abs_diff(&got, &want);
        let ok = got.len() == want.len() && diff <= REL_TOL * scale;
        let detail = format!("max |logit diff| vs PyTorch {diff:.2e} (max |logit| {scale:.2})");
        verdict(name, ok, detail, &mut failures);
    }

    // KV cache: decode up to 8 tokens for a batch with a left-padded row, then score prompt +
    // completion in one forward pass; the log-probs of the decoded tokens must agree. (EOS stays
    // allowed: banning it would change the distribution the decoded log-probs are taken under.)
    let model = load_hf_dir::<B>(&tiny.join("tiny-llama3"), device)?.model;
    let prompts = vec![vec![5u32, 17, 99, 3, 42, 7], vec![1, 2, 3, 4]];
    let cfg = GenerationConfig {
        max_new_tokens: 8,
        ..Default::default()
    };
    let gens = generate(&model, None, &prompts, &cfg)?;
    let lens: Vec<usize> = prompts
        .iter()
        .zip(&gens)
        .map(|(p, g)| p.len() + g.tokens.len())
        .collect();
    let width = lens.iter().copied().max().unwrap_or(0);
    let mut ids = Vec::new();
    let mut valid = Vec::new();
    for ((p, g), len) in prompts.iter().zip(&gens).zip(&lens) {
        let pad = width - len;
        ids.extend(std::iter::repeat_n(0i64, pad));
        ids.extend(p.iter().chain(&g.tokens).map(|&t| t as i64));
        valid.push((0..width).map(|i| i >= pad).collect());
    }
    let b = prompts.len();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, width]), device);
    let logits = model.forward(ids, &Padding { valid }).logits;
    let log_probs = to_vec(log_softmax(logits, 2));
    let vocab = model.config.vocab_size;
    let mut diff = 0f32;
    for (r, (g, p)) in gens.iter().zip(&prompts).enumerate() {
        let first = width - lens[r] + p.len(); // the position of the first decoded token
        for (j, (&tok, &lp)) in g.tokens.iter().zip(&g.logprobs).enumerate() {
            let full = log_probs[(r * width + first + j - 1) * vocab + tok as usize];
            diff = diff.max((full - lp).abs());
        }
    }
    let detail = format!("KV-cache vs full forward, max |log-prob diff| {diff:.2e}");
    verdict("kv-cache", diff <= 0.1, detail, &mut failures);

    // Sampling where the logits are against the host, on SmolLM2-sized rows.
    let (b, vocab) = (8, 49_152);
    let mut rng = StdRng::seed_from_u64(0);
    let data: Vec<f32> = (0..b * vocab)
        .map(|_| rng.random_range(-4.0f32..4.0))
        .collect();
    let logits = Tensor::<B, 2>::from_data(
        TensorData::new(data.clone(), [b, vocab]),
        (device, DType::F32),
    );
    let (mut same, mut total, mut lp_diff) = (0, 0, 0f32);
    for temperature in [0.0, 1.0] {
        let cfg = GenerationConfig {
            temperature,
            ..Default::default()
        };
        let mut host: Vec<StdRng> = (0..b).map(|r| StdRng::seed_from_u64(r as u64)).collect();
        let mut dev = host.clone();
        for _ in 0..10 {
            let u: Vec<f32> = dev
                .iter_mut()
                .map(|g| if temperature > 0.0 { g.random() } else { 0.0 })
                .collect();
            let (toks, lps) = sample_on_device(logits.clone(), temperature, &u, None);
            for r in 0..b {
                let (tok, lp) = sample(&data[r * vocab..(r + 1) * vocab], &cfg, &mut host[r]);
                same += usize::from(tok == toks[r]);
                total += 1;
                lp_diff = lp_diff.max((lp - lps[r]).abs());
            }
        }
    }
    let detail = format!(
        "device vs host sampling, {same}/{total} picks equal, max |log-prob diff| {lp_diff:.2e}"
    );
    // Rounding can move a cumulative sum across a row's uniform, rarely.
    verdict(
        "sampling",
        same * 100 >= total * 95 && lp_diff <= 1e-3,
        detail,
        &mut failures,
    );

    if failures.is_empty() {
        Ok(())
    } else {
        Err(R2mError::Other(format!(
            "backend {backend} failed {} check(s): {}",
            failures.len(),
            failures.join("; ")
        )))
    }
}
