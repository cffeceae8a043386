//! Custom autodiff ops for every backend under `Autodiff` (the GPU backends, in practice: flex
//! has its own kernels): [`rope`], [`rms_norm`] and [`attention`] with a backward pass of their
//! own.
//!
//! burn differentiates the tensor ops these are written with one by one. Under burn's fusion that
//! backward pass is many small kernels a layer: `select`'s gradient is a zero tensor and a
//! `select_assign` into it (two of each per RoPE, plus the sum), and RMSNorm's is nine kernels,
//! four of them reductions (two to sum the broadcast weight's gradient over batch and sequence);
//! softmax's is five passes over the attention scores. Written by hand, RoPE's backward is the
//! forward's ops on the gradient (no zero tensors, no `select_assign`), RMSNorm's six kernels, and
//! attention's softmax part one reduction over the output (FlashAttention's `rowsum(dO ∘ O)`) and
//! one element-wise pass over the scores. (README, Speed: 94 -> 74 kernels per layer in a WGPU
//! training step, head-major RoPE included.)
//!
//! Model code is generic over `B: Backend` and cannot tell `Autodiff<I>` apart from other
//! backends, nor name `I`. So [`register`] files the ops for `Autodiff<I>` (`registry.rs`; the CLI
//! does it for the backend it picked, see `r2m-cli`'s `backends.rs`), and [`ops`] looks them up. A
//! backend nobody registered runs the tensor ops, which compute the same values.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Tensor, TensorPrimitive};

use super::RopeIndex;

/// [`super::rope`]'s signature.
type RopeFn<B> =
    fn(Tensor<B, 3>, usize, (&Tensor<B, 3>, &Tensor<B, 3>), &RopeIndex<B>) -> Tensor<B, 4>;
/// [`super::rms_norm`]'s signature.
type RmsNormFn<B> = fn(Tensor<B, 3>, Tensor<B, 1>, f64) -> Tensor<B, 3>;
/// [`super::attention`]'s signature (also `cube.rs`'s kernel's).
pub(super) type AttentionFn<B> =
    fn(Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4, Bool>) -> Tensor<B, 4>;

/// The custom ops for one backend `B` (an `Autodiff<I>`).
pub(super) struct AutodiffOps<B: Backend> {
    pub rope: RopeFn<B>,
    pub rms_norm: RmsNormFn<B>,
    pub attention: AttentionFn<B>,
}

// By hand: derived impls would ask for `B: Clone`/`B: Copy`.
impl<B: Backend> Clone for AutodiffOps<B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for AutodiffOps<B> {}

/// Make [`super::rope`], [`super::rms_norm`] and [`super::attention`] take their custom autodiff
/// ops under `Autodiff<I>`. Call it once for the backend a program runs on; calling it again
/// does nothing more.
pub fn register<I: Backend>() {
    super::registry::register(AutodiffOps::<Autodiff<I>> {
        rope: rope::<I>,
        rms_norm: rms_norm::<I>,
        attention: attention::<I>,
    });
}

/// The custom ops registered for `B`, if `B` is an `Autodiff<I>` that [`register`] was called for.
pub(super) fn ops<B: Backend>() -> Option<AutodiffOps<B>> {
    super::registry::lookup::<AutodiffOps<B>>()
}

fn float<I: Backend, const D: usize>(t: I::FloatTensorPrimitive) -> Tensor<I, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// The backward of [`rope`]: for `y = x cos + partner(x) sin` (`partner` an involution),
/// `∂/∂x = g cos + partner(g sin) = g cos + partner(g) partner(sin)`: the forward's tensor ops
/// with `partner(sin)` for `sin`. It reads the head-major gradient as `[batch, seq, heads,
/// head_dim]` and writes it in that order, the input's.
#[derive(Debug)]
struct RopeBackward;

impl<I: Backend> Backward<I, 1> for RopeBackward {
    /// The `cos` and `sin` tables (`[batch, seq, heads * head_dim]`) and the indices.
    type State = (Tensor<I, 3>, Tensor<I, 3>, RopeIndex<I>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        let g: Tensor<I, 4> = float(grads.consume::<I>(&ops.node));
        if let Some(parent) = parent {
            let (cos, sin, index) = ops.state;
            let [b, heads, s, head_dim] = g.dims();
            let by_position = |t: Tensor<I, 3>| t.reshape([b, s, heads, head_dim]);
            let cos = by_position(cos);
            let sin = by_position(sin).select(3, index.partners.clone());
            let dx = super::rope_ops(g.swap_dims(1, 2), (&cos, &sin), &index);
            let dx = dx.reshape([b, s, heads * head_dim]);
            grads.register::<I>(parent.id, dx.into_primitive().tensor());
        }
    }
}

/// [`super::rope`] under `Autodiff<I>`: the tensor ops on `I`, and [`RopeBackward`].
pub(super) fn rope<I: Backend>(
    x: Tensor<Autodiff<I>, 3>,
    heads: usize,
    (cos, sin): (&Tensor<Autodiff<I>, 3>, &Tensor<Autodiff<I>, 3>),
    index: &RopeIndex<Autodiff<I>>,
) -> Tensor<Autodiff<I>, 4> {
    let (cos, sin) = (cos.clone().inner(), sin.clone().inner());
    let index = RopeIndex {
        ids: index.ids.clone().inner(),
        partners: index.partners.clone().inner(),
        head_dim: index.head_dim,
        half: index.half,
    };
    let xa = x.into_primitive().tensor();
    let out = super::rope_heads_ops(float(xa.primitive.clone()), heads, (&cos, &sin), &index);
    let out = out.into_primitive().tensor();
    let out = match RopeBackward
        .prepare::<NoCheckpointing>([xa.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((cos, sin, index), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    float(out)
}

/// The backward of [`rms_norm`], `y = x r w` with `r = 1 / rms` per row of `d` values: with
/// `a = g w`, `∂/∂x = r (a - x r² (a·x) / d)` and `∂/∂w = Σ_rows g x r`.
#[derive(Debug)]
struct RmsNormBackward;

impl<I: Backend> Backward<I, 2> for RmsNormBackward {
    /// `x`, the weight and each row's `rms` (`[batch, seq, 1]`).
    type State = (Tensor<I, 3>, Tensor<I, 1>, Tensor<I, 3>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [p_x, p_w] = ops.parents;
        let g: Tensor<I, 3> = float(grads.consume::<I>(&ops.node));
        let (x, w, rms) = ops.state;
        let [b, s, d] = x.dims();
        if let Some(p) = p_w {
            // Rows first, so that the sum is one reduction over one axis.
            let (g, x, rms) = (
                g.clone().reshape([b * s, d]),
                x.clone().reshape([b * s, d]),
                rms.clone().reshape([b * s, 1]),
            );
            let dw = (g * x / rms).sum_dim(0).reshape([d]);
            grads.register::<I>(p.id, dw.into_primitive().tensor());
        }
        if let Some(p) = p_x {
            let a = g * w.reshape([1, 1, d]);
            let dot = (a.clone() * x.clone()).sum_dim(2);
            let dx = (a - x * dot / (rms.clone().square() * d as f64)) / rms;
            grads.register::<I>(p.id, dx.into_primitive().tensor());
        }
    }
}

/// [`super::rms_norm`] under `Autodiff<I>`: the tensor ops on `I`, and [`RmsNormBackward`].
pub(super) fn rms_norm<I: Backend>(
    x: Tensor<Autodiff<I>, 3>,
    weight: Tensor<Autodiff<I>, 1>,
    eps: f64,
) -> Tensor<Autodiff<I>, 3> {
    let (xa, wa) = (
        x.into_primitive().tensor(),
        weight.into_primitive().tensor(),
    );
    let (x, w): (Tensor<I, 3>, Tensor<I, 1>) =
        (float(xa.primitive.clone()), float(wa.primitive.clone()));
    let (out, rms) = super::rms_norm_ops(x.clone(), w.clone(), eps);
    let out = out.into_primitive().tensor();
    let out = match RmsNormBackward
        .prepare::<NoCheckpointing>([xa.node.clone(), wa.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((x, w, rms), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    float(out)
}

/// The backward of [`attention`], `O = P v` with `P = softmax(q kᵀ s, masked)`, `s = 1/√head_dim`:
/// `∂/∂v = Pᵀ dO`, `dP = dO vᵀ`, `dS = P (dP - rowsum(dO ∘ O)) s` (the row sum of `dP ∘ P`,
/// taken over `head_dim` values instead of every key), `∂/∂q = dS k`, `∂/∂k = dSᵀ q`. Masked
/// scores have `P = 0`, so they get no gradient.
#[derive(Debug)]
struct AttentionBackward;

impl<I: Backend> Backward<I, 3> for AttentionBackward {
    /// `q`, `k`, `v`, the probabilities `P` and the output `O`.
    type State = [Tensor<I, 4>; 5];

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [p_q, p_k, p_v] = ops.parents;
        let d_out: Tensor<I, 4> = float(grads.consume::<I>(&ops.node));
        let [q, k, v, probs, out] = ops.state;
        let scale = 1.0 / (q.dims()[3] as f64).sqrt();
        if let Some(p) = p_v {
            let dv = probs.clone().swap_dims(2, 3).matmul(d_out.clone());
            grads.register::<I>(p.id, dv.into_primitive().tensor());
        }
        if p_q.is_none() && p_k.is_none() {
            return;
        }
        let row_dot = (d_out.clone() * out).sum_dim(3);
        let d_probs = d_out.matmul(v.swap_dims(2, 3));
        let d_scores = probs * (d_probs - row_dot) * scale;
        if let Some(p) = p_q {
            let dq = d_scores.clone().matmul(k);
            grads.register::<I>(p.id, dq.into_primitive().tensor());
        }
        if let Some(p) = p_k {
            let dk = d_scores.swap_dims(2, 3).matmul(q);
            grads.register::<I>(p.id, dk.into_primitive().tensor());
        }
    }
}

/// [`super::attention`] under `Autodiff<I>`: the tensor ops on `I`, and [`AttentionBackward`].
pub(super) fn attention<I: Backend>(
    q: Tensor<Autodiff<I>, 4>,
    k: Tensor<Autodiff<I>, 4>,
    v: Tensor<Autodiff<I>, 4>,
    mask: Tensor<Autodiff<I>, 4, Bool>,
) -> Tensor<Autodiff<I>, 4> {
    let [qa, ka, va] = [q, k, v].map(|t| t.into_primitive().tensor());
    let [qi, ki, vi]: [Tensor<I, 4>; 3] = [&qa, &ka, &va].map(|t| float(t.primitive.clone()));
    let probs = super::attention_probs(qi.clone(), ki.clone(), mask.inner());
    let out = probs.clone().matmul(vi.clone());
    let out_primitive = out.clone().into_primitive().tensor();
    let out = match AttentionBackward
        .prepare::<NoCheckpointing>([qa.node.clone(), ka.node.clone(), va.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish([qi, ki, vi, probs, out], out_primitive),
        OpsKind::UnTracked(prep) => prep.finish(out_primitive),
    };
    float(out)
}
