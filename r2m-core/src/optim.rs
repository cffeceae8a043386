//! Optimisation helpers shared by the RM trainer and the RL loop: the learning-rate schedule and
//! global gradient-norm clipping (burn's own clipping is per parameter tensor; users of PyTorch
//! expect `clip_grad_norm_` over all parameters together).

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ElementConversion;
use burn::tensor::Tensor;

/// Linear warm-up from 0 to `peak` over `warmup` steps, then cosine decay to `peak * min_ratio`
/// at `total` steps. `step` counts from 0.
pub fn warmup_cosine_lr(
    step: usize,
    total: usize,
    warmup: usize,
    peak: f64,
    min_ratio: f64,
) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let decay_steps = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / decay_steps as f64).min(1.0);
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    peak * (min_ratio + (1.0 - min_ratio) * cosine)
}

struct SquaredNorm<'a> {
    grads: &'a GradientsParams,
    sum: f64,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for SquaredNorm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
            let s: f32 = g.powi_scalar(2).sum().into_scalar().elem();
            self.sum += s as f64;
        }
    }
}

struct Scale<'a> {
    grads: &'a mut GradientsParams,
    factor: f32,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Scale<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            self.grads.register(param.id, g.mul_scalar(self.factor));
        }
    }
}

/// The L2 norm of all of `module`'s gradients together.
pub fn grad_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &GradientsParams,
) -> f64 {
    let mut v = SquaredNorm { grads, sum: 0.0 };
    module.visit(&mut v);
    v.sum.sqrt()
}

/// Scale all gradients so their global L2 norm is at most `max_norm` (as PyTorch's
/// `clip_grad_norm_`). Returns the norm before clipping.
pub fn clip_grad_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &mut GradientsParams,
    max_norm: f64,
) -> f64 {
    let norm = grad_norm::<B, M>(module, grads);
    if norm > max_norm && norm.is_finite() {
        let mut s = Scale {
            grads,
            factor: (max_norm / (norm + 1e-6)) as f32,
        };
        module.visit(&mut s);
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{TestAutodiff, TestBackend};
    use burn::module::Module;
    use burn::tensor::TensorData;

    #[derive(Module, Debug)]
    struct Two<B: burn::tensor::backend::Backend> {
        a: Param<Tensor<B, 1>>,
        b: Param<Tensor<B, 2>>,
    }

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let lr = |s| warmup_cosine_lr(s, 100, 10, 1.0, 0.1);
        assert!((lr(0) - 0.1).abs() < 1e-12);
        assert!((lr(9) - 1.0).abs() < 1e-12);
        assert!((lr(10) - 1.0).abs() < 1e-12);
        assert!((lr(55) - 0.55).abs() < 1e-9, "{}", lr(55));
        assert!((lr(100) - 0.1).abs() < 1e-12);
        assert!((1..100).all(|s| lr(s + 10) <= lr(s + 9) + 1e-12));
    }

    #[test]
    fn clipping_scales_the_global_norm() {
        let dev = Default::default();
        let m = Two::<TestAutodiff> {
            a: Param::from_tensor(Tensor::from_data(TensorData::from([1.0f32, 2.0]), &dev)),
            b: Param::from_tensor(Tensor::from_data(TensorData::from([[1.0f32], [1.0]]), &dev)),
        };
        // loss = 3*a0 + 4*a1 + 0*b  -> grads (3, 4) and (0, 0): norm 5
        let loss =
            m.a.val()
                .mul(Tensor::from_data(TensorData::from([3.0f32, 4.0]), &dev))
                .sum()
                + m.b.val().sum().mul_scalar(0.0);
        let mut grads = GradientsParams::from_grads(loss.backward(), &m);
        let before = clip_grad_norm::<TestAutodiff, _>(&m, &mut grads, 1.0);
        assert!((before - 5.0).abs() < 1e-5);
        assert!((grad_norm::<TestAutodiff, _>(&m, &grads) - 1.0).abs() < 1e-4);
        let ga: Vec<f32> = grads
            .get::<TestBackend, 1>(m.a.id)
            .unwrap()
            .into_data()
            .to_vec()
            .unwrap();
        assert!((ga[0] - 0.6).abs() < 1e-4 && (ga[1] - 0.8).abs() < 1e-4);
    }
}
