//! Shared helpers: the test backend, fixtures, and the SmolLM2 model loaded once per test binary.

use std::path::PathBuf;
use std::sync::OnceLock;

use burn::tensor::{Int, Tensor, TensorData};
use r2m_models::{load_gguf, Loaded};
use serde_json::Value;

/// The CPU backend every test runs on, and it with gradients: the workspace's one test-backend
/// alias (`r2m_core::testing`).
pub use r2m_core::testing::{TestAutodiff as AB, TestBackend as TB};

pub fn device() -> burn::backend::flex::FlexDevice {
    Default::default()
}

pub fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

pub fn read_json(name: &str) -> Value {
    let path = fixture_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

pub fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn floats_of(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

pub fn int_tensor(rows: &[Vec<u32>]) -> Tensor<TB, 2, Int> {
    let (b, s) = (rows.len(), rows[0].len());
    let data: Vec<i64> = rows.iter().flatten().map(|&x| x as i64).collect();
    Tensor::from_data(TensorData::new(data, [b, s]), &device())
}

pub fn to_vec<const D: usize>(t: Tensor<TB, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

/// Largest elementwise |a - b|.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "compared slices differ in length");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// SmolLM2-135M-Instruct from the cached (or freshly fetched) GGUF, loaded once.
pub fn smollm2() -> &'static Loaded<TB> {
    static MODEL: OnceLock<Loaded<TB>> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path =
            r2m_models::hub::fetch_smollm2(&mut |m| eprintln!("{m}")).expect("fetch smollm2");
        load_gguf::<TB>(&path, &device()).expect("load smollm2")
    })
}

/// The tiny random-weight Llama-3 fixture as a trainable policy (vocab 256, EOS 2).
pub fn tiny_policy() -> r2m_models::CausalLm<AB> {
    r2m_models::load_hf_dir(&fixture_dir().join("tiny/tiny-llama3"), &device())
        .unwrap()
        .model
}

/// `n` token-id prompts of different lengths for the tiny policy (BOS = 1).
pub fn tiny_prompts(n: usize) -> Vec<r2m_rl::Prompt> {
    (0..n)
        .map(|i| r2m_rl::Prompt {
            ids: std::iter::once(1)
                .chain((0..2 + i % 3).map(|j| (10 + 7 * i + 3 * j) as u32))
                .collect(),
            messages: None,
        })
        .collect()
}
