//! AdamW for every trainer here: burn's `AdamW`, with the whole update of a parameter tensor done
//! in one multi-threaded pass on the flex CPU backend ([`r2m_models::fused::adamw`]).
//!
//! The optimizer state is burn's own `AdamWState`, so checkpoints are the same as with
//! `burn::optim::AdamWConfig`, and every other backend runs burn's `AdamW` unchanged.

use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamWConfig, AdamWState, LearningRate, SimpleOptimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use r2m_models::fused::{self, AdamWParams};

/// burn's `AdamW` settings, with a one-pass kernel where there is one.
#[derive(Clone)]
pub struct AdamW {
    params: AdamWParams,
    /// burn's optimizer with the same settings, for backends without a kernel.
    burn: burn::optim::AdamW,
}

/// AdamW with β = (0.9, 0.999), ε = 1e-8 and decoupled weight decay `weight_decay`, for a module
/// `M` trained on `B`.
pub fn adamw<B: AutodiffBackend, M: AutodiffModule<B>>(
    weight_decay: f64,
) -> OptimizerAdaptor<AdamW, M, B> {
    let params = AdamWParams {
        beta_1: 0.9,
        beta_2: 0.999,
        epsilon: 1e-8,
        weight_decay: weight_decay as f32,
    };
    let burn = AdamWConfig::new()
        .with_beta_1(params.beta_1)
        .with_beta_2(params.beta_2)
        .with_epsilon(params.epsilon)
        .with_weight_decay(params.weight_decay)
        .init::<B, M>()
        .optim()
        .clone();
    OptimizerAdaptor::from(AdamW { params, burn })
}

impl<B: Backend> SimpleOptimizer<B> for AdamW {
    type State<const D: usize> = AdamWState<B, D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<B, D>, Option<Self::State<D>>) {
        match fused::adamw(&self.params, lr, tensor, grad, state) {
            Ok((tensor, state)) => (tensor, Some(state)),
            Err((tensor, grad, state)) => self.burn.step(lr, tensor, grad, state),
        }
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &B::Device) -> Self::State<D> {
        <burn::optim::AdamW as SimpleOptimizer<B>>::to_device(state, device)
    }
}
