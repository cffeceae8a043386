//! SwiGLU's gate, `silu(gate) * up`: one parallel pass on flex, and a custom autodiff op with a
//! one-pass backward under `Autodiff<Flex>`.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, Flex};
use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorPrimitive};
use rayon::prelude::*;

use super::{back, cast2, dense, dense_f32, zeros_f32, CHUNK};
use crate::fused::lanes;

pub fn silu_mul<B: Backend, const D: usize>(
    gate: Tensor<B, D>,
    up: Tensor<B, D>,
) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, D>)> {
    let (gate, up) = match cast2::<_, Tensor<Flex, D>>(gate, up) {
        Ok(pair) => pair,
        Err((gate, up)) => return silu_mul_autodiff(gate, up),
    };
    let (mut g, u) = (gate.into_primitive().tensor(), up.into_primitive().tensor());
    if !dense_f32(&g) || !dense_f32(&u) || g.layout().shape() != u.layout().shape() {
        let f = |t| Tensor::<Flex, D>::from_primitive(TensorPrimitive::Float(t));
        return Ok(back(silu(f(g)) * f(u)));
    }
    let n = g.layout().num_elements();
    // `storage_mut` writes in place when `gate` is not shared (it is a fresh projection).
    g.storage_mut::<f32>()[..n]
        .par_chunks_mut(CHUNK)
        .zip(u.storage::<f32>()[..n].par_chunks(CHUNK))
        .for_each(|(g, u)| {
            for (g, &u) in g.iter_mut().zip(u) {
                *g = silu_times(*g, u);
            }
        });
    Ok(back(Tensor::<Flex, D>::from_primitive(
        TensorPrimitive::Float(g),
    )))
}

/// `silu(g) u = g σ(g) u`.
#[inline(always)]
fn silu_times(g: f32, u: f32) -> f32 {
    g / (1.0 + lanes::exp(-g)) * u
}

/// `silu(gate) * up` into a new buffer, elements in parallel.
fn silu_mul_into(out: &mut [f32], gate: &[f32], up: &[f32]) {
    out.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .for_each(|(o, (g, u))| {
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                *o = silu_times(g, u);
            }
        });
}

/// The backward of [`silu_mul`] under `Autodiff<Flex>`: with `s = σ(gate)`,
/// `∂/∂gate = g up s (1 + gate (1 - s))` and `∂/∂up = g gate s`, one pass over the saved
/// inputs, written over them and the incoming gradient.
#[derive(Debug)]
struct SiluMulBackward;

impl Backward<Flex, 2> for SiluMulBackward {
    /// `gate` and `up` (dense f32).
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [p_gate, p_up] = ops.parents;
        let g = grads.consume::<Flex>(&ops.node);
        let (mut gate, up) = ops.state;
        let mut g = dense(g);
        let n = up.layout().num_elements();
        // In place when the buffers are not shared; a copy otherwise.
        let (xs, gs) = (
            &mut gate.storage_mut::<f32>()[..n],
            &mut g.storage_mut::<f32>()[..n],
        );
        xs.par_chunks_mut(CHUNK)
            .zip(gs.par_chunks_mut(CHUNK))
            .zip(up.storage::<f32>()[..n].par_chunks(CHUNK))
            .for_each(|((xs, gs), us)| {
                for ((x, g), &u) in xs.iter_mut().zip(gs.iter_mut()).zip(us) {
                    let s = 1.0 / (1.0 + lanes::exp(-*x));
                    let dy = *g;
                    *g = dy * *x * s;
                    *x = dy * u * s * (1.0 + *x * (1.0 - s));
                }
            });
        if let Some(p) = p_gate {
            grads.register::<Flex>(p.id, gate);
        }
        if let Some(p) = p_up {
            grads.register::<Flex>(p.id, g);
        }
    }
}

/// [`silu_mul`] under `Autodiff<Flex>`: one forward pass and [`SiluMulBackward`] instead of
/// burn's sigmoid, multiply and their backward ops.
fn silu_mul_autodiff<B: Backend, const D: usize>(
    gate: Tensor<B, D>,
    up: Tensor<B, D>,
) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, D>)> {
    type AD = Autodiff<Flex>;
    let (gate, up) = cast2::<_, Tensor<AD, D>>(gate, up)?;
    let (ga, ua) = (gate.into_primitive().tensor(), up.into_primitive().tensor());
    let (gp, up_) = (&ga.primitive, &ua.primitive);
    if !dense_f32(gp) || !dense_f32(up_) || gp.layout().shape() != up_.layout().shape() {
        let f = |t| Tensor::<AD, D>::from_primitive(TensorPrimitive::Float(t));
        return Ok(back(silu(f(ga)) * f(ua)));
    }
    let n = gp.layout().num_elements();
    let mut out = zeros_f32(gp.layout().shape().clone());
    silu_mul_into(
        &mut out.storage_mut::<f32>()[..n],
        &gp.storage::<f32>()[..n],
        &up_.storage::<f32>()[..n],
    );
    let out = match SiluMulBackward
        .prepare::<NoCheckpointing>([ga.node.clone(), ua.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((ga.primitive, ua.primitive), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Ok(back(Tensor::<AD, D>::from_primitive(
        TensorPrimitive::Float(out),
    )))
}
