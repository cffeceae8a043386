//! Scaled dot-product attention: two batched GEMMs around a masked softmax done in place, rows in
//! parallel, and a custom autodiff op under `Autodiff<Flex>`.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::module;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Tensor, TensorPrimitive};
use rayon::prelude::*;

use super::{back, cast, dense, dense_f32, product, rows_per_task};
use crate::fused::lanes;

type AttentionInputs<B> = (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4, Bool>);

/// The attention inputs as `T`'s tensors, or all four back unchanged.
fn cast_attention<B: Backend, T: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Tensor<B, 4, Bool>,
) -> Result<AttentionInputs<T>, AttentionInputs<B>> {
    match (cast(q), cast(k), cast(v), cast(mask)) {
        (Ok(q), Ok(k), Ok(v), Ok(m)) => Ok((q, k, v, m)),
        (q, k, v, m) => Err((
            q.map_or_else(|t| t, back),
            k.map_or_else(|t| t, back),
            v.map_or_else(|t| t, back),
            m.map_or_else(|t| t, back),
        )),
    }
}

/// Attention as two batched GEMMs (the matrices spread over the pool) around a masked
/// softmax done in place, rows in parallel.
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Tensor<B, 4, Bool>,
) -> Result<Tensor<B, 4>, AttentionInputs<B>> {
    let (q, k, v, mask) = match cast_attention::<B, Flex>(q, k, v, mask) {
        Ok(inputs) => inputs,
        Err((q, k, v, mask)) => return attention_autodiff(q, k, v, mask),
    };
    match attention_probs(&q, &k, &mask) {
        Some(probs) => Ok(back(bmm(&probs, false, &v, false))),
        None => Ok(back(module::attention(
            q,
            k,
            v,
            Some(mask),
            None,
            AttentionModuleOptions::default(),
        ))),
    }
}

/// `a b` per matrix of `[b0, b1, ., .]` tensors, `a` and `b` transposed first where asked (a
/// view, not a copy): [`product::batched`], or flex's `matmul` for other dtypes.
fn bmm(a: &Tensor<Flex, 4>, a_t: bool, b: &Tensor<Flex, 4>, b_t: bool) -> Tensor<Flex, 4> {
    let prim = |t: &Tensor<Flex, 4>| t.clone().into_primitive().tensor();
    match product::batched(&prim(a), a_t, &prim(b), b_t) {
        Some(y) => Tensor::from_primitive(TensorPrimitive::Float(y)),
        None => {
            let view = |t: &Tensor<Flex, 4>, tr| {
                if tr {
                    t.clone().swap_dims(2, 3)
                } else {
                    t.clone()
                }
            };
            view(a, a_t).matmul(view(b, b_t))
        }
    }
}

/// `1 / √head_dim`, the scores' scale.
fn attention_scale(q: &Tensor<Flex, 4>) -> f32 {
    1.0 / (q.dims()[3] as f32).sqrt()
}

/// `softmax(q kᵀ / √head_dim, masked)`: one batched GEMM, then the masked softmax in place,
/// rows in parallel; `None` when the scores or the mask are not dense.
fn attention_probs(
    q: &Tensor<Flex, 4>,
    k: &Tensor<Flex, 4>,
    mask: &Tensor<Flex, 4, Bool>,
) -> Option<Tensor<Flex, 4>> {
    let keys = k.dims()[2];
    let scores = bmm(q, false, k, true);
    let n = scores.shape().num_elements();
    let mut s = scores.into_primitive().tensor();
    let m = mask.clone().into_primitive();
    // One byte per mask entry, in row-major order.
    let m_dense =
        m.layout().is_contiguous() && m.layout().start_offset() == 0 && m.bytes().len() == n;
    if !dense_f32(&s) || !m_dense {
        return None;
    }
    let scale = attention_scale(q);
    s.storage_mut::<f32>()[..n]
        .par_chunks_mut(rows_per_task(keys) * keys)
        .zip(m.bytes()[..n].par_chunks(rows_per_task(keys) * keys))
        .for_each(move |(s, m)| {
            for (row, m) in s.chunks_mut(keys).zip(m.chunks(keys)) {
                masked_softmax(row, m, scale);
            }
        });
    Some(Tensor::<Flex, 4>::from_primitive(TensorPrimitive::Float(s)))
}

/// The backward of [`attention`] under `Autodiff<Flex>`, from the saved probabilities `P`:
/// `∂V = Pᵀ g`, `∂P = g Vᵀ`, `∂S = P ∘ (∂P - rowsum(∂P ∘ P)) / √head_dim` (in place, rows in
/// parallel), `∂Q = ∂S K`, `∂K = ∂Sᵀ Q`.
#[derive(Debug)]
struct AttentionBackward;

impl Backward<Flex, 3> for AttentionBackward {
    /// `q`, `k`, `v` and the probabilities (dense f32).
    type State = (FlexTensor, FlexTensor, FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [p_q, p_k, p_v] = ops.parents;
        let t = |x| Tensor::<Flex, 4>::from_primitive(TensorPrimitive::Float(x));
        let g = t(grads.consume::<Flex>(&ops.node));
        let (q, k, v, probs) = ops.state;
        let (q, k, v, probs) = (t(q), t(k), t(v), t(probs));
        if let Some(p) = p_v {
            let dv = bmm(&probs, true, &g, false);
            grads.register::<Flex>(p.id, dv.into_primitive().tensor());
        }
        let scale = attention_scale(&q);
        let keys = k.dims()[2];
        let mut ds = dense(bmm(&g, false, &v, true).into_primitive().tensor());
        let n = ds.layout().num_elements();
        let probs = probs.into_primitive().tensor();
        let rows = rows_per_task(keys) * keys;
        ds.storage_mut::<f32>()[..n]
            .par_chunks_mut(rows)
            .zip(probs.storage::<f32>()[..n].par_chunks(rows))
            .for_each(move |(ds, ps)| {
                for (d, p) in ds.chunks_mut(keys).zip(ps.chunks(keys)) {
                    let dot = lanes::dot(d, p);
                    for (d, &p) in d.iter_mut().zip(p) {
                        *d = p * (*d - dot) * scale;
                    }
                }
            });
        let ds = t(ds);
        if let Some(p) = p_q {
            let dq = bmm(&ds, false, &k, false);
            grads.register::<Flex>(p.id, dq.into_primitive().tensor());
        }
        if let Some(p) = p_k {
            let dk = bmm(&ds, true, &q, false);
            grads.register::<Flex>(p.id, dk.into_primitive().tensor());
        }
    }
}

/// [`attention`] under `Autodiff<Flex>`: the inference kernel's forward, keeping the
/// probabilities for [`AttentionBackward`], instead of burn's scale, mask, softmax (seven ops)
/// and their backward ops.
fn attention_autodiff<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Tensor<B, 4, Bool>,
) -> Result<Tensor<B, 4>, AttentionInputs<B>> {
    type AD = Autodiff<Flex>;
    let (q, k, v, mask) = cast_attention::<B, AD>(q, k, v, mask)?;
    let inner = Tensor::<Flex, 4, Bool>::from_primitive(mask.clone().into_primitive());
    let (qi, ki, vi) = (q.clone().inner(), k.clone().inner(), v.clone().inner());
    let Some(probs) = attention_probs(&qi, &ki, &inner) else {
        let out = module::attention(q, k, v, Some(mask), None, AttentionModuleOptions::default());
        return Ok(back(out));
    };
    let out = bmm(&probs, false, &vi, false).into_primitive().tensor();
    let (qa, ka, va) = (
        q.into_primitive().tensor(),
        k.into_primitive().tensor(),
        v.into_primitive().tensor(),
    );
    let prim = |t: Tensor<Flex, 4>| t.into_primitive().tensor();
    let out = match AttentionBackward
        .prepare::<NoCheckpointing>([qa.node.clone(), ka.node.clone(), va.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((prim(qi), prim(ki), prim(vi), prim(probs)), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Ok(back(Tensor::<AD, 4>::from_primitive(
        TensorPrimitive::Float(out),
    )))
}

/// `row = softmax(row * scale)` over the entries where `masked` is 0; masked entries get 0.
fn masked_softmax(row: &mut [f32], masked: &[u8], scale: f32) {
    for (x, &m) in row.iter_mut().zip(masked) {
        *x = if m != 0 {
            f32::NEG_INFINITY
        } else {
            *x * scale
        };
    }
    let max = lanes::max(row);
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    for x in row.iter_mut() {
        *x = lanes::exp(*x - max);
    }
    let inv = 1.0 / lanes::sum(row);
    for x in row.iter_mut() {
        *x *= inv;
    }
}
