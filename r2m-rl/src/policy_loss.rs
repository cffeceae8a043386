//! The policy loss (spec §3 step 6): the token-level clipped surrogate, KL estimators, entropy and
//! how per-token losses are aggregated.

use burn::tensor::{backend::Backend, Tensor};
use serde::{Deserialize, Serialize};

/// KL(pi_theta || pi_ref) estimators (Schulman, "Approximating KL divergence"), per token, from
/// `logp = log pi_theta(y_t)` and `logp_ref = log pi_ref(y_t)` of a sampled token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KlEstimator {
    /// `logp - logp_ref` (unbiased, can be negative).
    K1,
    /// `(logp - logp_ref)^2 / 2`.
    K2,
    /// `exp(d) - 1 - d` with `d = logp_ref - logp` (unbiased, never negative).
    K3,
}

/// Where the KL penalty goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KlMode {
    /// `beta * KL` added to the loss of every token (GRPO style).
    Loss,
    /// `-beta * KL` added to each token's reward before advantages (PPO / REINFORCE++ style).
    Reward,
}

/// How per-token losses become one number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossAgg {
    /// Mean over every response token of the mini-batch.
    TokenMean,
    /// Mean over sequences of each sequence's token mean.
    SeqMean,
}

/// Largest `d` fed to `exp` in k3: beyond it `exp(d)` overflows f32.
const K3_MAX_D: f32 = 80.0;

/// `exp(x) - 1 - x` without cancellation: `expm1(x) - x`. burn has no `expm1`, so for `|x| < 0.1`
/// the Taylor series is used (relative error < 1e-7); elsewhere the direct formula is exact enough.
fn exp_minus_one_minus_x<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let x = x.clamp_max(K3_MAX_D);
    let small = x.clone().abs().lower_elem(0.1);
    let x2 = x.clone().square();
    // x^2 (1/2 + x/6 + x^2/24 + x^3/120 + x^4/720)
    let poly = x
        .clone()
        .mul_scalar(1.0 / 720.0)
        .add_scalar(1.0 / 120.0)
        .mul(x.clone())
        .add_scalar(1.0 / 24.0)
        .mul(x.clone())
        .add_scalar(1.0 / 6.0)
        .mul(x.clone())
        .add_scalar(0.5);
    let series = x2 * poly;
    let direct = x.clone().exp().sub_scalar(1.0) - x;
    direct.mask_where(small, series)
}

/// Per-token KL estimate.
///
/// # Shapes
/// - `logp`, `logp_ref`: `[batch, seq]` -> `[batch, seq]`
pub fn kl_estimate<B: Backend>(
    logp: Tensor<B, 2>,
    logp_ref: Tensor<B, 2>,
    estimator: KlEstimator,
) -> Tensor<B, 2> {
    match estimator {
        KlEstimator::K1 => logp - logp_ref,
        KlEstimator::K2 => (logp - logp_ref).square().mul_scalar(0.5),
        KlEstimator::K3 => exp_minus_one_minus_x(logp_ref - logp),
    }
}

/// [`kl_estimate`] for one token on the host (f64 `exp_m1`).
pub fn kl_estimate_host(logp: f32, logp_ref: f32, estimator: KlEstimator) -> f32 {
    let (lp, lr) = (logp as f64, logp_ref as f64);
    (match estimator {
        KlEstimator::K1 => lp - lr,
        KlEstimator::K2 => 0.5 * (lp - lr).powi(2),
        KlEstimator::K3 => {
            let d = (lr - lp).min(K3_MAX_D as f64);
            d.exp_m1() - d
        }
    }) as f32
}

/// Clipping of the ratio `rho = pi_theta / pi_old`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Clip {
    /// `rho` is clipped to `[1 - eps_low, 1 + eps_high]`.
    pub eps_low: f32,
    pub eps_high: f32,
    /// Dual clip (Ye et al. 2020): for negative advantages the loss is at most `-c * A` (`c > 1`).
    pub dual_clip: Option<f32>,
}

/// The clipped surrogate per token: `max(-rho A, -clip(rho) A)` (with the dual clip if set), and
/// a 0/1 indicator of the tokens where clipping changed the loss.
///
/// # Shapes
/// - `logp`, `logp_old`, `advantages`: `[batch, seq]` -> both `[batch, seq]`
pub fn clipped_surrogate<B: Backend>(
    logp: Tensor<B, 2>,
    logp_old: Tensor<B, 2>,
    advantages: Tensor<B, 2>,
    clip: Clip,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let ratio = (logp - logp_old).exp();
    let unclipped = -advantages.clone() * ratio.clone();
    let clipped = -advantages.clone() * ratio.clamp(1.0 - clip.eps_low, 1.0 + clip.eps_high);
    let was_clipped = clipped.clone().greater(unclipped.clone()).float();
    let mut loss = unclipped.max_pair(clipped);
    if let Some(c) = clip.dual_clip {
        let cap = -advantages.clone().mul_scalar(c);
        let capped = loss.clone().min_pair(cap);
        loss = loss.mask_where(advantages.lower_elem(0.0), capped);
    }
    (loss, was_clipped)
}

pub use r2m_core::tensor::entropy;

/// Aggregate per-token `values` of a micro-batch so that summing over the micro-batches of a
/// mini-batch gives the mini-batch's aggregate.
///
/// - [`LossAgg::TokenMean`]: `sum(values * mask) / minibatch_tokens`;
/// - [`LossAgg::SeqMean`]: `sum_rows(sum_t(values * mask) / len_row) / minibatch_rows`.
///
/// # Shapes
/// - `values`, `mask`: `[batch, seq]` -> `[1]`
pub fn aggregate<B: Backend>(
    values: Tensor<B, 2>,
    mask: Tensor<B, 2>,
    agg: LossAgg,
    minibatch_tokens: usize,
    minibatch_rows: usize,
) -> Tensor<B, 1> {
    match agg {
        LossAgg::TokenMean => (values * mask)
            .sum()
            .div_scalar(minibatch_tokens.max(1) as f32),
        LossAgg::SeqMean => {
            let lens = mask.clone().sum_dim(1).clamp_min(1.0);
            ((values * mask).sum_dim(1) / lens)
                .sum()
                .div_scalar(minibatch_rows.max(1) as f32)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;
    use r2m_core::testing::{TestAutodiff as AB, TestBackend as B};

    fn t2<Bk: Backend>(v: &[f32]) -> Tensor<Bk, 2> {
        Tensor::from_data(
            TensorData::new(v.to_vec(), [1, v.len()]),
            &Default::default(),
        )
    }

    fn vec_of<Bk: Backend>(t: Tensor<Bk, 2>) -> Vec<f32> {
        t.into_data().convert::<f32>().to_vec().unwrap()
    }

    #[test]
    fn kl_estimators_match_closed_forms() {
        let logp = [-1.0f32, -2.0, -0.5, -3.0, -0.001, -10.0, -60.0, -0.2];
        let logp_ref = [
            -1.5f32,
            -1.0,
            -0.5,
            -0.1,
            -0.0011,
            -60.0,
            -10.0,
            -0.2 + 1e-4,
        ];
        for est in [KlEstimator::K1, KlEstimator::K2, KlEstimator::K3] {
            let got = vec_of(kl_estimate(t2::<B>(&logp), t2::<B>(&logp_ref), est));
            for i in 0..logp.len() {
                let (lp, lr) = (logp[i] as f64, logp_ref[i] as f64);
                let want = match est {
                    KlEstimator::K1 => lp - lr,
                    KlEstimator::K2 => 0.5 * (lp - lr) * (lp - lr),
                    KlEstimator::K3 => (lr - lp).exp_m1() - (lr - lp),
                };
                let tol = 1e-5 * want.abs().max(1e-3);
                assert!(
                    (got[i] as f64 - want).abs() <= tol.max(1e-9),
                    "{est:?} at {i}: {} vs {want}",
                    got[i]
                );
                assert!(got[i].is_finite());
                let host = kl_estimate_host(logp[i], logp_ref[i], est) as f64;
                assert!((host - want).abs() <= tol.max(1e-9), "host {est:?} at {i}");
            }
        }
    }

    #[test]
    fn k3_is_finite_with_finite_gradient_up_to_50_nats() {
        for d in [-50.0f32, -20.0, 20.0, 50.0] {
            let dev = Default::default();
            let logp = Tensor::<AB, 2>::from_data(TensorData::new(vec![0.0f32], [1, 1]), &dev)
                .require_grad();
            let logp_ref = Tensor::<AB, 2>::from_data(TensorData::new(vec![d], [1, 1]), &dev);
            let k = kl_estimate(logp.clone(), logp_ref, KlEstimator::K3);
            let v: f32 = k.clone().sum().into_scalar();
            let want = ((d as f64).exp_m1() - d as f64) as f32;
            assert!(
                v.is_finite() && ((v - want) / want).abs() < 1e-5,
                "{d}: {v}"
            );
            let g = k.sum().backward();
            let grad: f32 = logp.grad(&g).unwrap().sum().into_scalar();
            // d k3 / d logp = -expm1(d)
            let want_g = -(d as f64).exp_m1() as f32;
            assert!(grad.is_finite() && ((grad - want_g) / want_g).abs() < 1e-5);
        }
    }

    /// Loss value and gradient w.r.t. `logp` of the surrogate at one token.
    fn surrogate_at(ratio: f32, adv: f32, clip: Clip) -> (f32, f32, f32) {
        let dev = Default::default();
        let logp = Tensor::<AB, 2>::from_data(TensorData::new(vec![ratio.ln()], [1, 1]), &dev)
            .require_grad();
        let old = Tensor::<AB, 2>::zeros([1, 1], &dev);
        let a = Tensor::<AB, 2>::from_data(TensorData::new(vec![adv], [1, 1]), &dev);
        let (loss, clipped) = clipped_surrogate(logp.clone(), old, a, clip);
        let v: f32 = loss.clone().sum().into_scalar();
        let c: f32 = clipped.sum().into_scalar();
        let grads = loss.sum().backward();
        let g: f32 = logp.grad(&grads).unwrap().sum().into_scalar();
        (v, g, c)
    }

    #[test]
    fn clipped_surrogate_values_and_gradients() {
        let clip = Clip {
            eps_low: 0.2,
            eps_high: 0.2,
            dual_clip: None,
        };
        // Inside the range: -rho A, gradient -rho A (d rho / d logp = rho).
        let (v, g, c) = surrogate_at(1.1, 2.0, clip);
        assert!((v + 2.2).abs() < 1e-5 && (g + 2.2).abs() < 1e-5 && c == 0.0);
        // A > 0, rho above 1 + eps: clipped, constant, zero gradient.
        let (v, g, c) = surrogate_at(1.5, 2.0, clip);
        assert!(
            (v + 2.4).abs() < 1e-5 && g.abs() < 1e-7 && c == 1.0,
            "{v} {g}"
        );
        // A > 0, rho below 1 - eps: the unclipped term is larger, gradient flows.
        let (v, g, c) = surrogate_at(0.5, 2.0, clip);
        assert!((v + 1.0).abs() < 1e-5 && (g + 1.0).abs() < 1e-5 && c == 0.0);
        // A < 0, rho below 1 - eps: clipped at 0.8, zero gradient.
        let (v, g, c) = surrogate_at(0.5, -1.0, clip);
        assert!((v - 0.8).abs() < 1e-5 && g.abs() < 1e-7 && c == 1.0);
        // A < 0, rho above 1 + eps: unclipped -rho A = 3, gradient 3.
        let (v, g, _) = surrogate_at(3.0, -1.0, clip);
        assert!((v - 3.0).abs() < 1e-5 && (g - 3.0).abs() < 1e-4);
        // Dual clip 2: that loss is capped at -c A = 2, with zero gradient.
        let dual = Clip {
            dual_clip: Some(2.0),
            ..clip
        };
        let (v, g, _) = surrogate_at(3.0, -1.0, dual);
        assert!((v - 2.0).abs() < 1e-5 && g.abs() < 1e-7);
        // The dual clip leaves positive advantages alone.
        let (v, _, _) = surrogate_at(3.0, 1.0, dual);
        assert!((v + 1.2).abs() < 1e-5);
    }

    #[test]
    fn entropy_of_uniform_and_peaked() {
        let dev = Default::default();
        let lp = Tensor::<B, 3>::from_data(TensorData::new(vec![0.25f32.ln(); 4], [1, 1, 4]), &dev);
        let h: f32 = entropy(lp).into_scalar();
        assert!((h - 4f32.ln()).abs() < 1e-6);
        let lp =
            Tensor::<B, 3>::from_data(TensorData::new(vec![0.0f32, -1e9, -1e9], [1, 1, 3]), &dev);
        let h: f32 = entropy(lp).into_scalar();
        assert!(h.abs() < 1e-6);
    }

    #[test]
    fn aggregation_by_hand() {
        let dev = Default::default();
        let v = Tensor::<B, 2>::from_data(
            TensorData::from([[1.0f32, 2.0, 3.0], [4.0, 9.0, 9.0]]),
            &dev,
        );
        let m = Tensor::<B, 2>::from_data(
            TensorData::from([[1.0f32, 1.0, 1.0], [1.0, 0.0, 0.0]]),
            &dev,
        );
        let tok: f32 = aggregate(v.clone(), m.clone(), LossAgg::TokenMean, 4, 2).into_scalar();
        assert!((tok - 10.0 / 4.0).abs() < 1e-6);
        let seq: f32 = aggregate(v, m, LossAgg::SeqMean, 4, 2).into_scalar();
        assert!((seq - (2.0 + 4.0) / 2.0).abs() < 1e-6);
    }
}
