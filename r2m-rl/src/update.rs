//! The policy update (spec §3 step 6) in its named phases, for one micro-batch of an
//! [`Experience`]:
//!
//! 1. [`policy_loss`]: the policy's forward pass, the clipped surrogate, the KL penalty in the
//!    loss and the entropy bonus; the pass's last-layer hidden states are R2M's `h'` in the final
//!    epoch;
//! 2. [`value_loss`]: PPO's clipped value loss on the critic;
//! 3. [`optimizer_step`]: gradient-norm clipping and one AdamW step.
//!
//! The loop over epochs, mini-batches and micro-batches that calls them is
//! [`crate::trainer::RlTrainer::update`].

use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor};
use r2m_core::optim::clip_grad_norm;
use r2m_models::{CausalLm, RewardModel};

use crate::config::AlgoConfig;
use crate::experience::{Experience, RowSlice};
use crate::optim::AdamW;
use crate::policy_loss::{aggregate, clipped_surrogate, kl_estimate, Clip, KlMode, LossAgg};
use crate::rollout::{response_hidden, response_logprobs, slice_hidden, Start};

type Inner<B> = <B as AutodiffBackend>::InnerBackend;

/// The micro-batches of one mini-batch: its rows sorted by length, so that each micro-batch
/// pads little, in chunks of `micro` (with `sort` off, in the order given). Exact either way: the
/// loss sums over the mini-batch's tokens and divides by their count, whatever the grouping.
pub fn micro_batches<B: Backend>(
    exp: &Experience<B>,
    rows: &[usize],
    micro: usize,
    sort: bool,
) -> Vec<Vec<usize>> {
    let rows = match sort {
        true => exp.by_length(rows),
        false => rows.to_vec(),
    };
    rows.chunks(micro.max(1)).map(<[usize]>::to_vec).collect()
}

/// Cells of the `[rows, columns]` grid a forward pass over `rows` runs on, and how many of them
/// are padding.
pub fn grid_padding<B: Backend>(exp: &Experience<B>, rows: &[usize]) -> (usize, usize) {
    let s = exp.slice(rows);
    let cells = rows.len() * (s.hi - 1 - s.lo);
    let real: usize = (rows.iter())
        .map(|&r| exp.prompt_of(r).ids.len() + exp.response_len(r) - 1)
        .sum();
    (cells, cells - real)
}

/// One micro-batch of an experience, with what its losses are normalised by.
pub struct MicroBatch<'a, B: AutodiffBackend> {
    pub exp: &'a Experience<Inner<B>>,
    pub slice: RowSlice,
    /// 1.0 at real response tokens, `[rows, hi - P]`.
    pub mask: Tensor<B, 2>,
    /// Real response tokens in this micro-batch.
    pub tokens: f64,
    /// Real response tokens and rows of the mini-batch it belongs to (loss aggregation).
    pub minibatch_tokens: usize,
    pub minibatch_rows: usize,
}

impl<'a, B: AutodiffBackend> MicroBatch<'a, B> {
    pub fn new(
        exp: &'a Experience<Inner<B>>,
        rows: &[usize],
        minibatch_tokens: usize,
        minibatch_rows: usize,
        dev: &B::Device,
    ) -> Self {
        let slice = exp.slice(rows);
        let mask = exp.response_mask::<B>(&slice, dev);
        let tokens = mask.clone().sum().into_scalar().elem::<f32>() as f64;
        Self {
            exp,
            slice,
            mask,
            tokens,
            minibatch_tokens,
            minibatch_rows,
        }
    }

    /// Where a forward pass of this micro-batch starts: the frozen trunk's cached output when
    /// there is one (`top:N`, trainable from block `start_layer`), else the token ids.
    pub fn start(&self, start_layer: usize) -> Start<B> {
        match self.exp.stream_of(&self.slice) {
            Some(x) => Start::Stream(Tensor::from_inner(x), start_layer),
            None => Start::Tokens(self.exp.input_ids::<B>(&self.slice, &self.mask.device())),
        }
    }

    /// Host per-token values of these rows as a tensor.
    pub fn per_token(&self, values: &[Vec<f32>]) -> Tensor<B, 2> {
        self.exp
            .per_token::<B>(&self.slice, values, &self.mask.device())
    }

    /// `aggregate` of per-token values over this micro-batch's share of its mini-batch.
    pub fn aggregate(&self, values: Tensor<B, 2>, agg: LossAgg) -> Tensor<B, 1> {
        aggregate(
            values,
            self.mask.clone(),
            agg,
            self.minibatch_tokens,
            self.minibatch_rows,
        )
    }

    /// Sum of per-token values over the real tokens.
    pub fn token_sum(&self, values: Tensor<B, 2>) -> f64 {
        (values * self.mask.clone())
            .sum()
            .into_scalar()
            .elem::<f32>() as f64
    }
}

/// What the policy loss of a micro-batch needs besides the data.
#[derive(Debug, Clone, Copy)]
pub struct LossSettings {
    pub clip: Clip,
    /// beta, and where the KL goes.
    pub kl_coef: f32,
    pub kl_mode: KlMode,
    pub kl_estimator: crate::policy_loss::KlEstimator,
    pub entropy_coef: f64,
    pub loss_agg: LossAgg,
    /// The sampling temperature (log-probs use it too).
    pub temperature: f32,
}

impl LossSettings {
    pub fn new(a: &AlgoConfig, kl_coef: f64, temperature: f32) -> Self {
        Self {
            clip: Clip {
                eps_low: a.clip_eps,
                eps_high: a.clip_eps_high.unwrap_or(a.clip_eps),
                dual_clip: a.dual_clip,
            },
            kl_coef: kl_coef as f32,
            kl_mode: a.kl_mode(),
            kl_estimator: a.kl_estimator,
            entropy_coef: a.entropy_coef,
            loss_agg: a.loss_agg,
            temperature,
        }
    }
}

/// The policy loss of one micro-batch and what the step's statistics read from it.
pub struct PolicyLoss<B: AutodiffBackend> {
    /// What the backward pass runs on: surrogate + beta KL (in the loss) - entropy bonus.
    pub loss: Tensor<B, 1>,
    /// The clipped surrogate alone.
    pub surrogate: Tensor<B, 1>,
    /// Per-token KL estimate to the reference, entropy, and 1.0 where the clip changed the loss.
    pub kl: Tensor<B, 2>,
    pub entropy: Tensor<B, 2>,
    pub clipped: Tensor<B, 2>,
    /// The forward pass's last-layer hidden states over the slice's input columns, without
    /// gradient: R2M's `h'` in the final epoch.
    pub hidden: Tensor<Inner<B>, 3>,
}

/// Phase 1: the token-level clipped surrogate of the policy on one micro-batch, with the KL
/// penalty (when it is in the loss) and the entropy bonus.
pub fn policy_loss<B: AutodiffBackend>(
    policy: &CausalLm<B>,
    start: Start<B>,
    mb: &MicroBatch<'_, B>,
    s: &LossSettings,
) -> PolicyLoss<B> {
    let (exp, slice) = (mb.exp, &mb.slice);
    let dev = mb.mask.device();
    let full = slice_hidden(policy, start, exp, slice);
    let hidden = full.clone().detach().inner();
    let entropy_grad = s.entropy_coef != 0.0;
    let (logp, entropy) = response_logprobs(
        policy,
        response_hidden(full, slice, exp.prompt_cols),
        exp.targets::<B>(slice, &dev),
        s.temperature,
        entropy_grad,
    );
    let (pg, clipped) = clipped_surrogate(
        logp.clone(),
        mb.per_token(&exp.old_logprobs),
        mb.per_token(&exp.advantages),
        s.clip,
    );
    let surrogate = mb.aggregate(pg, s.loss_agg);
    let kl = kl_estimate(logp, mb.per_token(&exp.ref_logprobs), s.kl_estimator);
    let mut loss = surrogate.clone();
    if s.kl_mode == KlMode::Loss && s.kl_coef != 0.0 {
        loss = loss + mb.aggregate(kl.clone(), s.loss_agg).mul_scalar(s.kl_coef);
    }
    if entropy_grad {
        loss = loss
            - mb.aggregate(entropy.clone(), s.loss_agg)
                .mul_scalar(s.entropy_coef as f32);
    }
    PolicyLoss {
        loss,
        surrogate: surrogate.detach(),
        kl: kl.detach(),
        entropy: entropy.detach(),
        clipped,
        hidden,
    }
}

/// Phase 2: PPO's value loss on one micro-batch, `0.5 max((V - R)^2, (V_clip - R)^2)` with
/// `V_clip` within `value_clip` of the rollout's values, averaged over tokens.
pub fn value_loss<B: AutodiffBackend>(
    critic: &RewardModel<B>,
    start: Start<B>,
    mb: &MicroBatch<'_, B>,
    value_clip: f32,
) -> Tensor<B, 1> {
    let (exp, slice) = (mb.exp, &mb.slice);
    let h = slice_hidden(&critic.backbone, start, exp, slice);
    let v = critic
        .score
        .forward(response_hidden(h, slice, exp.prompt_cols))
        .squeeze_dim::<2>(2);
    let old_v = mb.per_token(exp.values.as_ref().expect("values with a critic"));
    let ret = mb.per_token(exp.returns.as_ref().expect("returns with a critic"));
    let v_clip = old_v.clone() + (v.clone() - old_v).clamp(-value_clip, value_clip);
    let l = (v - ret.clone())
        .square()
        .max_pair((v_clip - ret).square())
        .mul_scalar(0.5);
    mb.aggregate(l, LossAgg::TokenMean)
}

/// Phase 3: clip the accumulated gradients to `max_grad_norm` and take one AdamW step at `lr`.
/// Returns the updated module and the pre-clip gradient norm.
pub fn optimizer_step<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: M,
    optim: &mut OptimizerAdaptor<AdamW, M, B>,
    mut grads: GradientsParams,
    lr: f64,
    max_grad_norm: f64,
) -> (M, f64) {
    let norm = clip_grad_norm::<B, _>(&module, &mut grads, max_grad_norm);
    (optim.step(lr, module, grads), norm)
}
