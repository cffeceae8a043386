//! Preference losses.

use burn::tensor::{activation::log_sigmoid, backend::Backend, Tensor};

/// Bradley-Terry loss: `mean(-log sigmoid(r_chosen - r_rejected))`.
///
/// # Shapes
/// - `chosen`, `rejected`: `[batch]` -> `[1]`
pub fn bradley_terry_loss<B: Backend>(
    chosen: Tensor<B, 1>,
    rejected: Tensor<B, 1>,
) -> Tensor<B, 1> {
    log_sigmoid(chosen - rejected).mean().neg()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestAutodiff;
    use burn::tensor::TensorData;

    #[test]
    fn bt_loss_and_gradient_match_hand_computed_values() {
        let dev = Default::default();
        let c = Tensor::<TestAutodiff, 1>::from_data(TensorData::from([2.0f32, 0.0]), &dev)
            .require_grad();
        let r = Tensor::<TestAutodiff, 1>::from_data(TensorData::from([1.0f32, 0.5]), &dev)
            .require_grad();
        let loss = bradley_terry_loss(c.clone(), r.clone());
        // margins 1 and -0.5: loss = (ln(1 + e^-1) + ln(1 + e^0.5)) / 2
        let want = ((1.0f64 + (-1.0f64).exp()).ln() + (1.0f64 + 0.5f64.exp()).ln()) / 2.0;
        let got: f32 = loss.clone().into_scalar();
        assert!((got as f64 - want).abs() < 1e-6, "{got} vs {want}");
        let grads = loss.backward();
        // d/dc_i = -(1 - sigmoid(m_i)) / 2, d/dr_i = +(1 - sigmoid(m_i)) / 2
        let sig = |m: f64| 1.0 / (1.0 + (-m).exp());
        let gc = c.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap();
        let gr = r.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap();
        for (i, m) in [1.0f64, -0.5].into_iter().enumerate() {
            let g = -(1.0 - sig(m)) / 2.0;
            assert!((gc[i] as f64 - g).abs() < 1e-6);
            assert!((gr[i] as f64 + g).abs() < 1e-6);
        }
    }
}
