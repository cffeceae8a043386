//! Tensor helpers shared by models, losses and the RL loop.

use burn::tensor::{activation::log_softmax, backend::Backend, Int, Tensor};

/// Mean of `values` over the positions where `mask` is 1.
///
/// # Shapes
/// - `values`, `mask`: `[batch, seq]` (mask holds 0.0 / 1.0)
/// - returns: `[1]`
pub fn masked_mean<B: Backend>(values: Tensor<B, 2>, mask: Tensor<B, 2>) -> Tensor<B, 1> {
    let total = mask.clone().sum().clamp_min(1.0);
    (values * mask).sum() / total
}

/// Log-probability of each `target` token under `logits`.
///
/// # Shapes
/// - `logits`: `[batch, seq, vocab]`
/// - `targets`: `[batch, seq]`
/// - returns: `[batch, seq]`
pub fn gather_log_probs<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
) -> Tensor<B, 2> {
    pick_targets(log_softmax(logits, 2), targets)
}

/// The entry of each `target` token in a row of `log_probs` (a log-softmax over the vocabulary).
///
/// # Shapes
/// - `log_probs`: `[batch, seq, vocab]`, `targets`: `[batch, seq]` -> `[batch, seq]`
pub fn pick_targets<B: Backend>(
    log_probs: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
) -> Tensor<B, 2> {
    log_probs
        .gather(2, targets.unsqueeze_dim::<3>(2))
        .squeeze_dim::<2>(2)
}

/// Entropy of each position's distribution from its log-probabilities.
///
/// # Shapes
/// - `log_probs`: `[batch, seq, vocab]` -> `[batch, seq]`
pub fn entropy<B: Backend>(log_probs: Tensor<B, 3>) -> Tensor<B, 2> {
    (log_probs.clone().exp() * log_probs)
        .sum_dim(2)
        .squeeze_dim::<2>(2)
        .neg()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestBackend;
    use burn::tensor::TensorData;

    #[test]
    fn masked_mean_ignores_masked_positions() {
        let dev = Default::default();
        let v = Tensor::<TestBackend, 2>::from_data(
            TensorData::from([[1.0f32, 2.0, 100.0], [3.0, -50.0, 4.0]]),
            &dev,
        );
        let m = Tensor::<TestBackend, 2>::from_data(
            TensorData::from([[1.0f32, 1.0, 0.0], [1.0, 0.0, 1.0]]),
            &dev,
        );
        let got: f32 = masked_mean(v, m).into_scalar();
        assert!((got - 2.5).abs() < 1e-6, "{got}");
    }

    #[test]
    fn gather_log_probs_matches_hand_computed() {
        let dev = Default::default();
        // logits [0, ln 3] -> probs [1/4, 3/4]
        let logits = Tensor::<TestBackend, 3>::from_data(
            TensorData::from([[[0.0f32, 3f32.ln()], [0.0, 0.0]]]),
            &dev,
        );
        let targets = Tensor::<TestBackend, 2, Int>::from_data(TensorData::from([[1i32, 0]]), &dev);
        let got = gather_log_probs(logits, targets)
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        assert!((got[0] - 0.75f32.ln()).abs() < 1e-6);
        assert!((got[1] - 0.5f32.ln()).abs() < 1e-6);
    }
}
