//! The same generic model code on a second backend: WGPU (lavapipe on CPU-only machines) against
//! the CPU backend.

use burn::backend::Wgpu;
use burn::tensor::{Int, Tensor, TensorData};
use r2m_models::{load_hf_dir, Padding};

use crate::common::*;

#[test]
fn wgpu_forward_matches_cpu_backend_on_tiny_llama3() {
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
