//! The rotary position embedding: one parallel pass forward, and its transpose as the backward
//! pass of a custom autodiff op under `Autodiff<Flex>`.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorPrimitive};
use rayon::prelude::*;

use super::{back, cast, dense, dense_f32, rows_per_task, zeros_f32};

/// Rotary embedding of rows of `heads * head_dim` values, each head in the rotate-half layout
/// with `half` rotated pairs, `sin` signed as [`crate::fused::rope`] takes it: `out = x cos +
/// partner(x) sin`, or with `backward` its transpose, `out = x cos + partner(x sin)` (the
/// gradient, for `x` the incoming gradient), rows in parallel. `partner` swaps the halves.
fn rope_into(
    out: &mut [f32],
    x: &[f32],
    (cos, sin): (&[f32], &[f32]),
    (head_dim, half): (usize, usize),
    backward: bool,
) {
    let rows = rows_per_task(head_dim) * head_dim;
    out.par_chunks_mut(rows)
        .zip(x.par_chunks(rows))
        .zip(cos.par_chunks(rows).zip(sin.par_chunks(rows)))
        .for_each(|((out, x), (cos, sin))| {
            let heads = out
                .chunks_mut(head_dim)
                .zip(x.chunks(head_dim))
                .zip(cos.chunks(head_dim).zip(sin.chunks(head_dim)));
            for ((o, x), (c, s)) in heads {
                for (j, o) in o.iter_mut().enumerate() {
                    *o = x[j] * c[j];
                }
                // `s` carries rotate_half's sign (see [`crate::fused::rope`]); the backward pass
                // applies the transposed rotation.
                for j in 0..half {
                    let (a, b) = (x[j], x[j + half]);
                    if backward {
                        o[j] += b * s[j + half];
                        o[j + half] += a * s[j];
                    } else {
                        o[j] += b * s[j];
                        o[j + half] += a * s[j + half];
                    }
                }
            }
        });
}

/// [`rope_into`] of `x` (dense f32, the shape of the tables) into a new tensor.
fn rope_of(
    x: &FlexTensor,
    (cos, sin): (&FlexTensor, &FlexTensor),
    dims: (usize, usize),
    backward: bool,
) -> FlexTensor {
    let n = x.layout().num_elements();
    let mut out = zeros_f32(x.layout().shape().clone());
    rope_into(
        &mut out.storage_mut::<f32>()[..n],
        &x.storage::<f32>()[..n],
        (&cos.storage::<f32>()[..n], &sin.storage::<f32>()[..n]),
        dims,
        backward,
    );
    out
}

/// The backward of [`rope`] under `Autodiff<Flex>`: the transposed rotation of the gradient.
#[derive(Debug)]
struct RopeBackward;

impl Backward<Flex, 1> for RopeBackward {
    /// The `cos` and `sin` tables (dense f32, the shape of `x`), `head_dim` and `half`.
    type State = (FlexTensor, FlexTensor, usize, usize);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        let g = dense(grads.consume::<Flex>(&ops.node));
        if let Some(parent) = parent {
            let (cos, sin, head_dim, half) = ops.state;
            let dx = rope_of(&g, (&cos, &sin), (head_dim, half), true);
            grads.register::<Flex>(parent.id, dx);
        }
    }
}

/// `x cos + rotate_half(x) sin` on flex, plain or under autodiff (one pass forward and one
/// backward); the inputs back unchanged elsewhere, or unless `x`, `cos` and `sin` are dense f32
/// of one shape whose last dim is a multiple of `head_dim`, with `2 half <= head_dim`.
pub fn rope<B: Backend>(
    x: Tensor<B, 3>,
    (cos, sin): (&Tensor<B, 3>, &Tensor<B, 3>),
    (head_dim, half): (usize, usize),
) -> Result<Tensor<B, 3>, Tensor<B, 3>> {
    type AD = Autodiff<Flex>;
    if head_dim == 0 || 2 * half > head_dim {
        return Err(x);
    }
    let table = |t: &Tensor<B, 3>| -> Option<FlexTensor> {
        let t = t.clone();
        let t = match cast::<_, Tensor<Flex, 3>>(t) {
            Ok(t) => t,
            Err(t) => cast::<_, Tensor<AD, 3>>(t).ok()?.inner(),
        };
        Some(t.into_primitive().tensor())
    };
    let (Some(c), Some(s)) = (table(cos), table(sin)) else {
        return Err(x);
    };
    let fits = |t: &FlexTensor| {
        let dims = t.layout().shape().dims::<3>();
        dense_f32(t) && dims == c.layout().shape().dims::<3>() && dims[2] % head_dim == 0
    };
    if !fits(&c) || !fits(&s) {
        return Err(x);
    }
    let run = |x: &FlexTensor| -> Option<FlexTensor> {
        if !fits(x) {
            return None;
        }
        Some(rope_of(x, (&c, &s), (head_dim, half), false))
    };
    let x = match cast::<_, Tensor<Flex, 3>>(x) {
        Ok(x) => {
            let xp = x.clone().into_primitive().tensor();
            return match run(&xp) {
                Some(out) => Ok(back(Tensor::<Flex, 3>::from_primitive(
                    TensorPrimitive::Float(out),
                ))),
                None => Err(back(x)),
            };
        }
        Err(x) => x,
    };
    let xa = cast::<_, Tensor<AD, 3>>(x)?.into_primitive().tensor();
    let Some(out) = run(&xa.primitive) else {
        return Err(back(Tensor::<AD, 3>::from_primitive(
            TensorPrimitive::Float(xa),
        )));
    };
    let out = match RopeBackward
        .prepare::<NoCheckpointing>([xa.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((c, s, head_dim, half), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Ok(back(Tensor::<AD, 3>::from_primitive(
        TensorPrimitive::Float(out),
    )))
}
