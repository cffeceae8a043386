//! RMSNorm: rows in parallel on flex, and a custom autodiff op under `Autodiff<Flex>`.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use rayon::prelude::*;

use super::{back, cast, dense, dense_f32, rows_per_task, zeros_f32};
use crate::fused::lanes;

/// RMSNorm forward, rows of `x` in parallel: `x r w` with `r = 1 / sqrt(mean(x²) + eps)` per
/// row, and each row's `r`; `None` unless `x` and `w` are dense f32 with `w` as long as a
/// (non-empty) row.
fn rms_norm_forward(x: &FlexTensor, w: &FlexTensor, eps: f64) -> Option<(FlexTensor, Vec<f32>)> {
    let d = *x.layout().shape().dims::<3>().last()?;
    if d == 0 || !dense_f32(x) || !dense_f32(w) || w.layout().num_elements() != d {
        return None;
    }
    let n = x.layout().num_elements();
    let mut out = zeros_f32(x.layout().shape().clone());
    let (x, w, eps) = (
        &x.storage::<f32>()[..n],
        &w.storage::<f32>()[..d],
        eps as f32,
    );
    let mut r = vec![0f32; n / d];
    let rows = rows_per_task(d);
    out.storage_mut::<f32>()[..n]
        .par_chunks_mut(rows * d)
        .zip(x.par_chunks(rows * d))
        .zip(r.par_chunks_mut(rows))
        .for_each(move |((out, x), r)| {
            for ((out, x), r) in out.chunks_mut(d).zip(x.chunks(d)).zip(r) {
                let ms = lanes::sum_squares(x) / d as f32;
                *r = 1.0 / (ms + eps).sqrt();
                for ((o, &v), &w) in out.iter_mut().zip(x).zip(w) {
                    *o = v * *r * w;
                }
            }
        });
    Some((out, r))
}

/// The inputs of [`rms_norm`], handed back.
type NormInputs<B> = (Tensor<B, 3>, Tensor<B, 1>);

pub fn rms_norm<B: Backend>(
    x: Tensor<B, 3>,
    weight: Tensor<B, 1>,
    eps: f64,
) -> Result<Tensor<B, 3>, NormInputs<B>> {
    let (x, weight) = match (
        cast::<_, Tensor<Flex, 3>>(x),
        cast::<_, Tensor<Flex, 1>>(weight),
    ) {
        (Ok(x), Ok(w)) => (x, w),
        (x, w) => {
            let x = x.map_or_else(|t| t, back);
            let w = w.map_or_else(|t| t, back);
            return rms_norm_autodiff(x, w, eps);
        }
    };
    let (xp, wp) = (
        x.clone().into_primitive().tensor(),
        weight.clone().into_primitive().tensor(),
    );
    match rms_norm_forward(&xp, &wp, eps) {
        Some((out, _)) => Ok(back(Tensor::<Flex, 3>::from_primitive(
            TensorPrimitive::Float(out),
        ))),
        None => Err((back(x), back(weight))),
    }
}

/// The backward of [`rms_norm`] under `Autodiff<Flex>`, per row with `a = g w`:
/// `∂/∂x = r a - r³ x (a·x) / d`, and `∂/∂w = Σ_rows g x r`.
#[derive(Debug)]
struct RmsNormBackward;

impl Backward<Flex, 2> for RmsNormBackward {
    /// `x` and the weight (dense f32), each row's `r`.
    type State = (FlexTensor, FlexTensor, Vec<f32>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [p_x, p_w] = ops.parents;
        let g = grads.consume::<Flex>(&ops.node);
        let (x, w, r) = ops.state;
        let mut g = dense(g);
        let d = w.layout().num_elements();
        let n = x.layout().num_elements();
        let rows = rows_per_task(d);
        // ∂/∂w's partial sums per task, then ∂/∂x written over the incoming gradient.
        let w = &w.storage::<f32>()[..d];
        let dw = g.storage_mut::<f32>()[..n]
            .par_chunks_mut(rows * d)
            .zip(x.storage::<f32>()[..n].par_chunks(rows * d))
            .zip(r.par_chunks(rows))
            .map(move |((gs, xs), rs)| {
                let mut dw = vec![0f32; d];
                for ((g, x), &r) in gs.chunks_mut(d).zip(xs.chunks(d)).zip(rs) {
                    for ((dw, &g), &x) in dw.iter_mut().zip(g.iter()).zip(x) {
                        *dw += g * x * r;
                    }
                    let dot = lanes::dot3(g, w, x);
                    let c = r * r * r * dot / d as f32;
                    for ((g, &x), &w) in g.iter_mut().zip(x).zip(w) {
                        *g = r * *g * w - c * x;
                    }
                }
                dw
            })
            .reduce(
                || vec![0f32; d],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                    a
                },
            );
        if let Some(p) = p_x {
            grads.register::<Flex>(p.id, g);
        }
        if let Some(p) = p_w {
            grads.register::<Flex>(p.id, FlexTensor::from_data(TensorData::new(dw, [d])));
        }
    }
}

/// [`rms_norm`] under `Autodiff<Flex>`: one forward pass and [`RmsNormBackward`] instead of
/// burn's square, mean, sqrt, divide and multiply and their backward ops.
fn rms_norm_autodiff<B: Backend>(
    x: Tensor<B, 3>,
    weight: Tensor<B, 1>,
    eps: f64,
) -> Result<Tensor<B, 3>, NormInputs<B>> {
    type AD = Autodiff<Flex>;
    let (x, weight) = match (
        cast::<_, Tensor<AD, 3>>(x),
        cast::<_, Tensor<AD, 1>>(weight),
    ) {
        (Ok(x), Ok(w)) => (x, w),
        (x, w) => return Err((x.map_or_else(|t| t, back), w.map_or_else(|t| t, back))),
    };
    let (xa, wa) = (
        x.into_primitive().tensor(),
        weight.into_primitive().tensor(),
    );
    let Some((out, r)) = rms_norm_forward(&xa.primitive, &wa.primitive, eps) else {
        let x = Tensor::<AD, 3>::from_primitive(TensorPrimitive::Float(xa));
        let w = Tensor::<AD, 1>::from_primitive(TensorPrimitive::Float(wa));
        return Err((back(x), back(w)));
    };
    let out = match RmsNormBackward
        .prepare::<NoCheckpointing>([xa.node.clone(), wa.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((xa.primitive, wa.primitive, r), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Ok(back(Tensor::<AD, 3>::from_primitive(
        TensorPrimitive::Float(out),
    )))
}
