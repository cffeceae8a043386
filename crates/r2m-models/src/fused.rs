//! The CPU hot spots as single functions, each with a faster kernel for flex.
//!
//! [`silu_mul`] (SwiGLU's gating), [`attention`], [`matmul`] and [`write_positions`] (the KV
//! cache update) are written once with burn tensor ops, which every backend runs. With the `flex`
//! feature a plain `Flex` tensor (inference: generation, log-probs without gradients, reward
//! scoring) takes a kernel here instead, because burn-flex 0.21 leaves a lot on the table there:
//! - element-wise ops and attention run on one thread with scalar code; the kernels here make one
//!   pass over the data, split across the rayon pool;
//! - a product of a few rows (one per sequence when decoding) by a weight matrix streams the
//!   weights at about a third of the memory bandwidth; [`matmul`]'s AVX-512 kernel reads them in
//!   order with the outputs in registers;
//! - `slice_assign` copies its whole target, which for the KV cache is every layer's cache at
//!   every token; [`write_positions`] writes in place.
//!
//! Training (`Autodiff<Flex>`) takes the tensor-op path of those, so their gradients are burn's
//! own, with two exceptions, the largest single-threaded chains of a train step:
//! [`token_log_probs`] (log-softmax + gather over the vocabulary) is a custom autodiff op with its
//! own backward, and [`adamw`] is the optimizer's update in one pass. Both paths of every function
//! compute the same thing; the tests below hold them to each other, and the SmolLM2 parity
//! fixtures run through the kernels.

use burn::optim::AdamWState;
use burn::tensor::activation::{log_softmax, silu};
use burn::tensor::backend::Backend;
use burn::tensor::module;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Int, Tensor};
use r2m_core::tensor::{entropy, pick_targets};

/// `silu(gate) * up`, element-wise.
pub fn silu_mul<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    #[cfg(feature = "flex")]
    let (gate, up) = match flex::silu_mul(gate, up) {
        Ok(out) => return out,
        Err(inputs) => inputs,
    };
    silu(gate) * up
}

/// `x w` for a few rows of `x` (decoding: one row per sequence).
///
/// # Shapes
/// - `x`: `[rows, k]`, `w`: `[k, n]` (row-major, or the transpose of a row-major `[n, k]`, as the
///   tied LM head's `embed_tokens.transpose()` is)
/// - returns `[rows, n]`
pub fn matmul<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>) -> Tensor<B, 2> {
    #[cfg(feature = "flex")]
    let (x, w) = match flex::matmul(x, w) {
        Ok(out) => return out,
        Err(inputs) => inputs,
    };
    x.matmul(w)
}

/// `buf[.., .., at..at + part_len, ..] = part`: new key/value positions written into a cache buffer.
///
/// burn-flex 0.21's `slice_assign` copies the whole buffer every time (its copy-on-write check
/// counts its own temporary clone), which at every decoded token is the whole KV cache; the flex
/// path writes in place when the buffer is not shared.
///
/// # Shapes
/// - `buf`: `[batch, heads, width, head_dim]`, `part`: `[batch, heads, part_len, head_dim]`
pub fn write_positions<B: Backend>(
    buf: Tensor<B, 4>,
    at: usize,
    part: Tensor<B, 4>,
) -> Tensor<B, 4> {
    #[cfg(feature = "flex")]
    let (buf, part) = match flex::write_positions(buf, at, part) {
        Ok(out) => return out,
        Err(inputs) => inputs,
    };
    let [b, h, len, d] = part.dims();
    buf.slice_assign([0..b, 0..h, at..at + len, 0..d], part)
}

/// Scaled dot-product attention, `softmax(q kᵀ / √head_dim, masked) v`.
///
/// # Shapes
/// - `q`: `[batch, heads, rows, head_dim]`; `k`, `v`: `[batch, heads, keys, head_dim]`
/// - `mask`: `[batch, heads, rows, keys]`, `true` = may not attend; no row may be all `true`
/// - returns `[batch, heads, rows, head_dim]`
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Tensor<B, 4, Bool>,
) -> Tensor<B, 4> {
    #[cfg(feature = "flex")]
    let (q, k, v, mask) = match flex::attention(q, k, v, mask) {
        Ok(out) => return out,
        Err(inputs) => inputs,
    };
    module::attention(q, k, v, Some(mask), None, AttentionModuleOptions::default())
}

/// Log-probability of each target token under `logits`, `log_softmax(logits)[.., target]`.
///
/// The log-softmax over a 49k vocabulary is most of a training step's single-threaded work on
/// flex: burn makes about six passes over the `[batch, seq, vocab]` logits forward and as many
/// backward (200 MB each for 8 x 128 tokens). With flex (plain, or under `Autodiff` as a custom op
/// with its own backward) this is one pass over the rows in parallel forward, and one backward,
/// `∂logp/∂logits = onehot(target) - softmax`, written over the saved logits.
///
/// # Shapes
/// - `logits`: `[batch, seq, vocab]`, `targets`: `[batch, seq]`
/// - returns `[batch, seq]`
pub fn token_log_probs<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
) -> Tensor<B, 2> {
    log_probs_and_entropy(logits, targets, false).0
}

/// [`token_log_probs`] and the entropy of each position's distribution (without gradient): on flex
/// the same pass computes both.
pub fn token_log_probs_with_entropy<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let (logp, entropy) = log_probs_and_entropy(logits, targets, true);
    (logp, entropy.expect("asked for"))
}

fn log_probs_and_entropy<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
    with_entropy: bool,
) -> (Tensor<B, 2>, Option<Tensor<B, 2>>) {
    #[cfg(feature = "flex")]
    let (logits, targets) = match flex::token_log_probs(logits, targets) {
        Ok((logp, entropy)) => return (logp, Some(entropy)),
        Err(inputs) => inputs,
    };
    let log_probs = log_softmax(logits, 2);
    let entropy = with_entropy.then(|| entropy(log_probs.clone().detach()));
    (pick_targets(log_probs, targets), entropy)
}

/// AdamW's hyper-parameters for [`adamw`] (burn's `AdamWConfig` without AMSGrad and cautious
/// weight decay).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub beta_1: f32,
    pub beta_2: f32,
    pub epsilon: f32,
    pub weight_decay: f32,
}

/// The inputs of [`adamw`], handed back when there is no kernel for the backend.
pub type AdamWInputs<B, const D: usize> = (Tensor<B, D>, Tensor<B, D>, Option<AdamWState<B, D>>);

/// One AdamW step of one parameter tensor in one pass, as burn's `AdamW` computes it:
/// `m = β1 m + (1-β1) g`, `v = β2 v + (1-β2) g²`, `p = p (1 - lr λ) - lr m̂ / (√v̂ + ε)` with the
/// bias corrections `m̂ = m / (1-β1ᵗ)`, `v̂ = v / (1-β2ᵗ)`; the state is burn's (checkpoints do not
/// change). burn's optimizer makes about a dozen single-threaded passes over each tensor for this
/// (about a second per step for SmolLM2 on 2 cores); the flex kernel makes one, over the rayon pool,
/// in place. Other backends get their inputs back (`Err`), for burn's `AdamW`.
pub fn adamw<B: Backend, const D: usize>(
    hyper: &AdamWParams,
    lr: f64,
    param: Tensor<B, D>,
    grad: Tensor<B, D>,
    state: Option<AdamWState<B, D>>,
) -> Result<(Tensor<B, D>, AdamWState<B, D>), AdamWInputs<B, D>> {
    #[cfg(feature = "flex")]
    return flex::adamw(hyper, lr, param, grad, state);
    #[cfg(not(feature = "flex"))]
    {
        let _ = (hyper, lr);
        Err((param, grad, state))
    }
}

/// The flex kernels: they take the generic tensors and give them back unchanged (`Err`) unless
/// the backend is plain `Flex`.
#[cfg(feature = "flex")]
mod flex {
    use std::any::Any;

    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::backend::flex::FlexTensor;
    use burn::backend::{Autodiff, Flex};
    use burn::optim::AdamWState;
    use burn::tensor::activation::silu;
    use burn::tensor::backend::Backend;
    use burn::tensor::module;
    use burn::tensor::ops::AttentionModuleOptions;
    use burn::tensor::{Bool, DType, Int, Tensor, TensorData, TensorPrimitive};
    use rayon::prelude::*;

    /// Elements per rayon task: enough work that scheduling costs little.
    const CHUNK: usize = 16 * 1024;

    /// `t` as a `U` when `T` and `U` are the same type (the backend check, without `unsafe`).
    fn cast<T: 'static, U: 'static>(t: T) -> Result<U, T> {
        let mut slot = Some(t);
        match (&mut slot as &mut dyn Any).downcast_mut::<Option<U>>() {
            Some(u) => Ok(u.take().expect("just filled")),
            None => Err(slot.expect("not taken")),
        }
    }

    /// The way back from a successful `cast`.
    fn back<T: 'static, U: 'static>(t: T) -> U {
        cast(t).unwrap_or_else(|_| unreachable!("only called after a successful cast"))
    }

    /// Both `a` and `b` as `U`s, or both back unchanged.
    fn cast2<T: 'static, U: 'static>(a: T, b: T) -> Result<(U, U), (T, T)> {
        match (cast(a), cast(b)) {
            (Ok(a), Ok(b)) => Ok((a, b)),
            (a, b) => Err((a.map_or_else(|t| t, back), b.map_or_else(|t| t, back))),
        }
    }

    /// The f32 buffer of `t` in row-major order, if it has one.
    fn dense_f32(t: &FlexTensor) -> bool {
        t.dtype() == DType::F32 && t.layout().is_contiguous() && t.layout().start_offset() == 0
    }

    pub fn silu_mul<B: Backend, const D: usize>(
        gate: Tensor<B, D>,
        up: Tensor<B, D>,
    ) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, D>)> {
        let (gate, up) = cast2::<_, Tensor<Flex, D>>(gate, up)?;
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
                    *g = *g / (1.0 + (-*g).exp()) * u;
                }
            });
        Ok(back(Tensor::<Flex, D>::from_primitive(
            TensorPrimitive::Float(g),
        )))
    }

    pub fn matmul<B: Backend>(
        x: Tensor<B, 2>,
        w: Tensor<B, 2>,
    ) -> Result<Tensor<B, 2>, (Tensor<B, 2>, Tensor<B, 2>)> {
        let (x, w) = cast2::<_, Tensor<Flex, 2>>(x, w)?;
        match small_rows::matmul(&x, &w) {
            Some(y) => Ok(back(y)),
            None => Ok(back(x.matmul(w))),
        }
    }

    pub fn write_positions<B: Backend>(
        buf: Tensor<B, 4>,
        at: usize,
        part: Tensor<B, 4>,
    ) -> Result<Tensor<B, 4>, (Tensor<B, 4>, Tensor<B, 4>)> {
        let (buf, part) = cast2::<_, Tensor<Flex, 4>>(buf, part)?;
        let [b, h, len, d] = part.dims();
        let width = buf.dims()[2];
        let (mut dst, src) = (
            buf.into_primitive().tensor(),
            part.into_primitive().tensor(),
        );
        let src = if dense_f32(&src) {
            src
        } else {
            src.to_contiguous()
        };
        if !dense_f32(&dst) || !dense_f32(&src) || !dst.is_unique() || at + len > width {
            let f = |t| Tensor::<Flex, 4>::from_primitive(TensorPrimitive::Float(t));
            let out = f(dst).slice_assign([0..b, 0..h, at..at + len, 0..d], f(src));
            return Ok(back(out));
        }
        let s = src.storage::<f32>();
        let out = dst.storage_mut::<f32>();
        // One contiguous run of len * d values per (batch, head).
        for (i, part) in s[..b * h * len * d].chunks_exact(len * d).enumerate() {
            let start = (i * width + at) * d;
            out[start..start + len * d].copy_from_slice(part);
        }
        Ok(back(Tensor::<Flex, 4>::from_primitive(
            TensorPrimitive::Float(dst),
        )))
    }

    type AttentionInputs<B> = (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4, Bool>);

    /// Attention as two batched GEMMs (flex spreads the batch over the pool) around a masked
    /// softmax done in place, rows in parallel.
    pub fn attention<B: Backend>(
        q: Tensor<B, 4>,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
        mask: Tensor<B, 4, Bool>,
    ) -> Result<Tensor<B, 4>, AttentionInputs<B>> {
        let (q, k, v, mask): (Tensor<Flex, 4>, Tensor<Flex, 4>, Tensor<Flex, 4>, _) = match (
            cast(q),
            cast(k),
            cast(v),
            cast::<_, Tensor<Flex, 4, Bool>>(mask),
        ) {
            (Ok(q), Ok(k), Ok(v), Ok(m)) => (q, k, v, m),
            (q, k, v, m) => {
                return Err((
                    q.map_or_else(|t| t, back),
                    k.map_or_else(|t| t, back),
                    v.map_or_else(|t| t, back),
                    m.map_or_else(|t| t, back),
                ))
            }
        };
        let (head_dim, keys) = (q.dims()[3], k.dims()[2]);
        let scores = q.clone().matmul(k.clone().swap_dims(2, 3));
        let n = scores.shape().num_elements();
        let mut s = scores.into_primitive().tensor();
        let m = mask.clone().into_primitive();
        // One byte per mask entry, in row-major order.
        let m_dense =
            m.layout().is_contiguous() && m.layout().start_offset() == 0 && m.bytes().len() == n;
        if !dense_f32(&s) || !m_dense {
            let out =
                module::attention(q, k, v, Some(mask), None, AttentionModuleOptions::default());
            return Ok(back(out));
        }
        let scale = 1.0 / (head_dim as f32).sqrt();
        let rows = (CHUNK / keys.max(1)).max(1) * keys;
        s.storage_mut::<f32>()[..n]
            .par_chunks_mut(rows)
            .zip(m.bytes()[..n].par_chunks(rows))
            .for_each(|(s, m)| {
                for (row, m) in s.chunks_mut(keys).zip(m.chunks(keys)) {
                    masked_softmax(row, m, scale);
                }
            });
        let probs = Tensor::<Flex, 4>::from_primitive(TensorPrimitive::Float(s));
        Ok(back(probs.matmul(v)))
    }

    /// Per row of `vocab` logits: `(logit[target] - lse, lse, entropy)`, rows in parallel; `None`
    /// when the logits are not a dense f32 buffer or a target is out of range.
    fn rows_log_softmax(
        logits: &FlexTensor,
        targets: &[i64],
        vocab: usize,
    ) -> Option<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let rows = targets.len();
        if rows == 0 || !dense_f32(logits) || logits.layout().num_elements() != rows * vocab {
            return None;
        }
        if targets.iter().any(|&t| t < 0 || t as usize >= vocab) {
            return None;
        }
        let x = &logits.storage::<f32>()[..rows * vocab];
        let per_row: Vec<(f32, (f32, f32))> = x
            .par_chunks(vocab)
            .zip(targets.par_iter())
            .map(|(row, &t)| {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let (mut z, mut zx) = (0f32, 0f32);
                for &v in row {
                    let e = (v - max).exp();
                    z += e;
                    zx += e * (v - max);
                }
                let lse = max + z.ln();
                // H = lse - E[x] = ln z - E[x - max].
                (row[t as usize] - lse, (lse, z.ln() - zx / z))
            })
            .collect();
        let (lp, rest): (Vec<f32>, Vec<(f32, f32)>) = per_row.into_iter().unzip();
        let (lse, h) = rest.into_iter().unzip();
        Some((lp, lse, h))
    }

    fn targets_of<B2: Backend>(t: Tensor<B2, 2, Int>) -> Vec<i64> {
        t.into_data()
            .convert::<i64>()
            .to_vec::<i64>()
            .expect("int targets")
    }

    /// The backward of [`token_log_probs`] under `Autodiff<Flex>`: `g (onehot(target) -
    /// softmax)` per row, written over the logits saved by the forward pass.
    #[derive(Debug)]
    struct TokenLogProbsBackward;

    impl Backward<Flex, 1> for TokenLogProbsBackward {
        /// The logits, each row's log-sum-exp, and the targets.
        type State = (FlexTensor, Vec<f32>, Vec<i64>);

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let [parent] = ops.parents;
            let g = grads.consume::<Flex>(&ops.node);
            let Some(parent) = parent else { return };
            let (mut logits, lse, targets) = ops.state;
            let g = if dense_f32(&g) { g } else { g.to_contiguous() };
            let g = &g.storage::<f32>()[..targets.len()];
            let vocab = logits.layout().num_elements() / targets.len();
            // In place when the saved logits are not shared (they are not, once the forward's
            // caller has dropped them); a copy otherwise.
            logits.storage_mut::<f32>()[..targets.len() * vocab]
                .par_chunks_mut(vocab)
                .zip(g.par_iter().zip(&lse).zip(&targets))
                .for_each(|(row, ((&g, &lse), &t))| {
                    for v in row.iter_mut() {
                        *v = -g * (*v - lse).exp();
                    }
                    row[t as usize] += g;
                });
            grads.register::<Flex>(parent.id, logits);
        }
    }

    type TokenLogProbs<B> = (Tensor<B, 2>, Tensor<B, 2>);
    type LogitsAndTargets<B> = (Tensor<B, 3>, Tensor<B, 2, Int>);

    pub fn token_log_probs<B: Backend>(
        logits: Tensor<B, 3>,
        targets: Tensor<B, 2, Int>,
    ) -> Result<TokenLogProbs<B>, LogitsAndTargets<B>> {
        let [b, s, vocab] = logits.dims();
        let two_d = |v: Vec<f32>| TensorData::new(v, [b, s]);
        // Plain flex: inference (old and reference log-probs).
        let logits = match cast::<_, Tensor<Flex, 3>>(logits) {
            Ok(l) => {
                let t: Tensor<Flex, 2, Int> = cast(targets).unwrap_or_else(|_| unreachable!());
                let prim = l.clone().into_primitive().tensor();
                let tg = targets_of(t.clone());
                return match rows_log_softmax(&prim, &tg, vocab) {
                    Some((lp, _, h)) => {
                        let dev = l.device();
                        Ok((
                            back(Tensor::<Flex, 2>::from_data(two_d(lp), &dev)),
                            back(Tensor::<Flex, 2>::from_data(two_d(h), &dev)),
                        ))
                    }
                    None => Err((back(l), back(t))),
                };
            }
            Err(l) => l,
        };
        // Autodiff<Flex>: training.
        type AD = Autodiff<Flex>;
        let l = match cast::<_, Tensor<AD, 3>>(logits) {
            Ok(l) => l,
            Err(l) => return Err((l, targets)),
        };
        let t: Tensor<AD, 2, Int> = cast(targets).unwrap_or_else(|_| unreachable!());
        let tg = targets_of(t.clone());
        let ad = l.into_primitive().tensor();
        let Some((lp, lse, h)) = rows_log_softmax(&ad.primitive, &tg, vocab) else {
            let l = Tensor::<AD, 3>::from_primitive(TensorPrimitive::Float(ad));
            return Err((back(l), back(t)));
        };
        let out = Tensor::<Flex, 2>::from_data(two_d(lp), &Default::default())
            .into_primitive()
            .tensor();
        let logp = match TokenLogProbsBackward
            .prepare::<NoCheckpointing>([ad.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((ad.primitive, lse, tg), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        let logp = Tensor::<AD, 2>::from_primitive(TensorPrimitive::Float(logp));
        let entropy = Tensor::<AD, 2>::from_data(two_d(h), &Default::default());
        Ok((back(logp), back(entropy)))
    }

    pub fn adamw<B: Backend, const D: usize>(
        h: &super::AdamWParams,
        lr: f64,
        param: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<AdamWState<B, D>>,
    ) -> Result<(Tensor<B, D>, AdamWState<B, D>), super::AdamWInputs<B, D>> {
        let (param, grad) = match cast2::<_, Tensor<Flex, D>>(param, grad) {
            Ok(pg) => pg,
            Err((p, g)) => return Err((p, g, state)),
        };
        let state: Option<AdamWState<Flex, D>> = match cast(state) {
            Ok(s) => s,
            Err(s) => return Err((back(param), back(grad), s)),
        };
        let same = |t: &Tensor<Flex, D>| {
            let p = t.clone().into_primitive().tensor();
            dense_f32(&p) && t.shape() == param.shape()
        };
        let fits = same(&grad)
            && same(&param)
            && state.as_ref().is_none_or(|s| {
                let m = &s.momentum;
                m.max_moment_2.is_none() && same(&m.moment_1) && same(&m.moment_2)
            });
        if !fits {
            return Err((back(param), back(grad), back(state)));
        }
        let dev = param.device();
        let (time, m, v) = match state {
            Some(s) => (
                s.momentum.time + 1,
                s.momentum.moment_1,
                s.momentum.moment_2,
            ),
            None => (
                1,
                Tensor::zeros(param.shape(), &dev),
                Tensor::zeros(param.shape(), &dev),
            ),
        };
        let (mut p, g) = (
            param.into_primitive().tensor(),
            grad.into_primitive().tensor(),
        );
        let (mut m, mut v) = (m.into_primitive().tensor(), v.into_primitive().tensor());
        let n = p.layout().num_elements();
        // The scalars as burn's AdamW rounds them.
        let (b1, b2, eps) = (h.beta_1, h.beta_2, h.epsilon);
        let (f1, f2) = (1.0 - b1, 1.0 - b2);
        let (c1, c2) = (1.0 - b1.powi(time as i32), 1.0 - b2.powi(time as i32));
        let decay = lr * h.weight_decay as f64;
        let keep = (1.0 - decay) as f32;
        let lr = lr as f32;
        p.storage_mut::<f32>()[..n]
            .par_chunks_mut(CHUNK)
            .zip(m.storage_mut::<f32>()[..n].par_chunks_mut(CHUNK))
            .zip(v.storage_mut::<f32>()[..n].par_chunks_mut(CHUNK))
            .zip(g.storage::<f32>()[..n].par_chunks(CHUNK))
            .for_each(|(((p, m), v), g)| {
                for (((p, m), v), &g) in p.iter_mut().zip(m).zip(v).zip(g) {
                    *m = *m * b1 + g * f1;
                    *v = *v * b2 + (g * g) * f2;
                    let delta = (*m / c1) / ((*v / c2).sqrt() + eps);
                    let decayed = if decay == 0.0 { *p } else { *p * keep };
                    *p = decayed - delta * lr;
                }
            });
        let f = |t| Tensor::<Flex, D>::from_primitive(TensorPrimitive::Float(t));
        let state = AdamWState::new(burn::optim::AdaptiveMomentumState::new(time, f(m), f(v)));
        Ok((back(f(p)), back(state)))
    }

    /// `row = softmax(row * scale)` over the entries where `masked` is 0; masked entries get 0.
    fn masked_softmax(row: &mut [f32], masked: &[u8], scale: f32) {
        let mut max = f32::NEG_INFINITY;
        for (x, &m) in row.iter_mut().zip(masked) {
            *x = if m != 0 {
                f32::NEG_INFINITY
            } else {
                *x * scale
            };
            max = max.max(*x);
        }
        if max == f32::NEG_INFINITY {
            row.fill(0.0);
            return;
        }
        let mut sum = 0.0;
        for x in row.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        let inv = 1.0 / sum;
        for x in row.iter_mut() {
            *x *= inv;
        }
    }

    /// `x w` for at most [`small_rows::MAX_ROWS`] rows with AVX-512, the weights read once.
    ///
    /// A decoding step multiplies a few rows by every weight matrix of the model. That is bound
    /// by reading the weights, which the GEMM library (made for large products) streams at
    /// about a third of the memory bandwidth here. These kernels read the weights in order, as
    /// rows, keep the eight output rows in registers, and split the work over the rayon pool.
    mod small_rows {
        use super::*;
        use burn::tensor::TensorData;

        /// Rows per kernel call; fewer are padded with zeros.
        const R: usize = 8;
        /// Most rows of `x` for which these kernels beat the GEMM library.
        pub const MAX_ROWS: usize = 16;
        /// Fewest weight rows per rayon task in the row-major form (one task per thread).
        const K_PER_TASK: usize = 64;
        /// Output columns per rayon task in the transposed form.
        const N_PER_TASK: usize = 512;

        /// `None` when the shapes, layout or CPU do not fit; the caller then uses flex's GEMM.
        pub fn matmul(x: &Tensor<Flex, 2>, w: &Tensor<Flex, 2>) -> Option<Tensor<Flex, 2>> {
            #[cfg(target_arch = "x86_64")]
            {
                let ([rows, k], [_, n]) = (x.dims(), w.dims());
                if !(2..=MAX_ROWS).contains(&rows) || !std::is_x86_feature_detected!("avx512f") {
                    return None;
                }
                let (xt, wt) = (
                    x.clone().into_primitive().tensor(),
                    w.clone().into_primitive().tensor(),
                );
                let wl = wt.layout();
                let row_major = wl.strides() == [n as isize, 1];
                let transposed = wl.strides() == [1, k as isize];
                if !dense_f32(&xt) || wt.dtype() != DType::F32 || wl.start_offset() != 0 {
                    return None;
                }
                let (xs, ws) = (
                    &xt.storage::<f32>()[..rows * k],
                    &wt.storage::<f32>()[..k * n],
                );
                let mut y = vec![0f32; rows * n];
                for (r0, x8) in (0..rows).step_by(R).zip(xs.chunks(R * k)) {
                    // Up to R rows, zero-padded.
                    let mut xb = vec![0f32; R * k];
                    xb[..x8.len()].copy_from_slice(x8);
                    let yb = if row_major && n % 32 == 0 {
                        row_major_product(&xb, ws, k, n)
                    } else if transposed && k % 16 == 0 {
                        transposed_product(&xb, ws, k, n)
                    } else {
                        return None;
                    };
                    let used = (rows - r0).min(R);
                    y[r0 * n..(r0 + used) * n].copy_from_slice(&yb[..used * n]);
                }
                Some(Tensor::from_data(
                    TensorData::new(y, [rows, n]),
                    &x.device(),
                ))
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                let _ = (x, w);
                None
            }
        }

        /// `y[R, n] = x[R, k] w[k, n]`: tasks take bands of `w`'s rows and their partial sums are
        /// added.
        #[cfg(target_arch = "x86_64")]
        fn row_major_product(x: &[f32], w: &[f32], k: usize, n: usize) -> Vec<f32> {
            let per_task = k.div_ceil(rayon::current_num_threads()).max(K_PER_TASK);
            let partial: Vec<Vec<f32>> = (0..k.div_ceil(per_task))
                .into_par_iter()
                .map(|t| {
                    let p = t * per_task..((t + 1) * per_task).min(k);
                    let mut y = vec![0f32; R * n];
                    // SAFETY: `matmul` checked that the CPU has AVX-512F; slice lengths are
                    // R * k (x), k * n (w) and R * n (y), with n a multiple of 32.
                    unsafe { avx512::row_major_band(x, w, k, n, p, &mut y) };
                    y
                })
                .collect();
            let mut parts = partial.into_iter();
            let mut y = parts.next().unwrap_or_else(|| vec![0f32; R * n]);
            for part in parts {
                for (a, b) in y.iter_mut().zip(part) {
                    *a += b;
                }
            }
            y
        }

        /// `y[R, n] = x[R, k] wtᵀ` for `wt: [n, k]` row-major: tasks take blocks of `wt`'s rows.
        #[cfg(target_arch = "x86_64")]
        fn transposed_product(x: &[f32], wt: &[f32], k: usize, n: usize) -> Vec<f32> {
            // Each task fills y's columns j0..j1 as a [cols, R] block; transposed at the end.
            let mut yt = vec![0f32; n * R];
            yt.par_chunks_mut(N_PER_TASK * R)
                .enumerate()
                .for_each(|(t, out)| {
                    let j0 = t * N_PER_TASK;
                    let rows = &wt[j0 * k..(j0 + out.len() / R) * k];
                    // SAFETY: `matmul` checked that the CPU has AVX-512F; k is a multiple of 16,
                    // `rows` holds out.len() / R rows of k and x holds R rows of k.
                    unsafe { avx512::dot_rows(x, rows, k, out) };
                });
            let mut y = vec![0f32; R * n];
            for (j, col) in yt.chunks_exact(R).enumerate() {
                for (r, &v) in col.iter().enumerate() {
                    y[r * n + j] = v;
                }
            }
            y
        }

        #[cfg(target_arch = "x86_64")]
        mod avx512 {
            use super::R;
            use std::arch::x86_64::*;

            /// `y += x[:, p] w[p, :]` over the weight rows `p`, 32 columns at a time with the
            /// R x 32 block of `y` in registers.
            #[target_feature(enable = "avx512f")]
            pub unsafe fn row_major_band(
                x: &[f32],
                w: &[f32],
                k: usize,
                n: usize,
                p: std::ops::Range<usize>,
                y: &mut [f32],
            ) {
                debug_assert!(x.len() >= R * k && w.len() >= k * n && y.len() >= R * n);
                let (x, w, y) = (x.as_ptr(), w.as_ptr(), y.as_mut_ptr());
                // Four weight rows per pass over the columns: y is loaded and stored once per
                // four rows, and four sequential read streams keep the prefetcher busy.
                const P: usize = 4;
                let mut p0 = p.start;
                while p0 < p.end {
                    let pn = P.min(p.end - p0);
                    for c in (0..n).step_by(32) {
                        let mut acc = [[_mm512_setzero_ps(); 2]; R];
                        for (r, a) in acc.iter_mut().enumerate() {
                            a[0] = _mm512_loadu_ps(y.add(r * n + c));
                            a[1] = _mm512_loadu_ps(y.add(r * n + c + 16));
                        }
                        for q in p0..p0 + pn {
                            let w0 = _mm512_loadu_ps(w.add(q * n + c));
                            let w1 = _mm512_loadu_ps(w.add(q * n + c + 16));
                            for (r, a) in acc.iter_mut().enumerate() {
                                let xv = _mm512_set1_ps(*x.add(r * k + q));
                                a[0] = _mm512_fmadd_ps(xv, w0, a[0]);
                                a[1] = _mm512_fmadd_ps(xv, w1, a[1]);
                            }
                        }
                        for (r, a) in acc.iter().enumerate() {
                            _mm512_storeu_ps(y.add(r * n + c), a[0]);
                            _mm512_storeu_ps(y.add(r * n + c + 16), a[1]);
                        }
                    }
                    p0 += pn;
                }
            }

            /// `out[j, r] = dot(wt[j, :], x[r, :])` for the rows `j` of `wt`, 16 lanes at a time.
            #[target_feature(enable = "avx512f")]
            pub unsafe fn dot_rows(x: &[f32], wt: &[f32], k: usize, out: &mut [f32]) {
                debug_assert!(x.len() >= R * k && wt.len() * R >= out.len() * k);
                let (x, wt) = (x.as_ptr(), wt.as_ptr());
                for (j, o) in out.chunks_exact_mut(R).enumerate() {
                    let mut acc = [_mm512_setzero_ps(); R];
                    for c in (0..k).step_by(16) {
                        let wv = _mm512_loadu_ps(wt.add(j * k + c));
                        for (r, a) in acc.iter_mut().enumerate() {
                            *a = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x.add(r * k + c)), *a);
                        }
                    }
                    for (o, a) in o.iter_mut().zip(acc) {
                        *o = _mm512_reduce_add_ps(a);
                    }
                }
            }
        }
    }
}

/// The flex kernels against burn's own ops on the same inputs.
#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::{Distribution, TensorData};

    type B = Flex;

    fn max_diff<const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    #[test]
    fn silu_mul_matches_the_tensor_ops() {
        let dev = Default::default();
        // More elements than one rayon chunk, and not a multiple of it.
        let g = Tensor::<B, 3>::random([2, 3, 7001], Distribution::Normal(0.0, 3.0), &dev);
        let u = Tensor::<B, 3>::random([2, 3, 7001], Distribution::Normal(0.0, 1.0), &dev);
        let want = silu(g.clone()) * u.clone();
        let d = max_diff(silu_mul(g, u), want);
        assert!(d < 1e-5, "max |fused - ops| = {d}");
    }

    #[test]
    fn attention_matches_burn_attention_with_padding_masks() {
        let dev = Default::default();
        let (b, h, rows, keys, hd) = (2, 3, 10, 12, 64);
        let q = Tensor::<B, 4>::random([b, h, rows, hd], Distribution::Normal(0.0, 1.0), &dev);
        let k = Tensor::<B, 4>::random([b, h, keys, hd], Distribution::Normal(0.0, 1.0), &dev);
        let v = Tensor::<B, 4>::random([b, h, keys, hd], Distribution::Normal(0.0, 1.0), &dev);
        // Causal over the last `rows` keys, plus two padding keys in batch row 1.
        let mut m = Vec::new();
        for bi in 0..b {
            for _ in 0..h {
                for r in 0..rows {
                    for key in 0..keys {
                        let q_pos = keys - rows + r;
                        m.push(key > q_pos || (bi == 1 && key < 2 && key != q_pos));
                    }
                }
            }
        }
        let mask = Tensor::<B, 4, Bool>::from_data(TensorData::new(m, [b, h, rows, keys]), &dev);
        let want = module::attention(
            q.clone(),
            k.clone(),
            v.clone(),
            Some(mask.clone()),
            None,
            AttentionModuleOptions::default(),
        );
        let d = max_diff(attention(q, k, v, mask), want);
        assert!(d < 1e-5, "max |fused - burn| = {d}");
    }

    #[test]
    fn write_positions_matches_slice_assign_for_unique_and_shared_buffers() {
        let dev = Default::default();
        let buf = Tensor::<B, 4>::random([2, 3, 9, 8], Distribution::Default, &dev);
        let part = Tensor::<B, 4>::random([2, 3, 2, 8], Distribution::Default, &dev);
        let before = buf.clone().into_data();
        let want = buf
            .clone()
            .slice_assign([0..2, 0..3, 5..7, 0..8], part.clone());
        // `buf` is shared here (a copy is kept), so this takes the copying path...
        let shared = write_positions(buf.clone(), 5, part.clone());
        assert_eq!(max_diff(shared, want.clone()), 0.0);
        // ...and the kept copy is unchanged.
        assert_eq!(buf.clone().into_data(), before);
        // A unique buffer is written in place.
        let unique = write_positions(buf, 5, part.clone());
        assert_eq!(max_diff(unique, want), 0.0);
        // A non-contiguous part (a narrowed view) is written the same.
        let wide = Tensor::<B, 4>::random([2, 3, 4, 8], Distribution::Default, &dev);
        let base = Tensor::<B, 4>::from_data(before, &dev);
        let want = base
            .clone()
            .slice_assign([0..2, 0..3, 0..2, 0..8], wide.clone().narrow(2, 1, 2));
        let got = write_positions(base, 0, wide.narrow(2, 1, 2));
        assert_eq!(max_diff(got, want), 0.0);
    }

    #[test]
    fn small_row_matmul_matches_the_gemm_in_both_weight_layouts() {
        let dev = Default::default();
        let (k, n) = (576, 96);
        let w = Tensor::<B, 2>::random([k, n], Distribution::Normal(0.0, 0.1), &dev);
        // The tied LM head's layout: the transpose of a row-major [n, k].
        let wt = Tensor::<B, 2>::random([n, k], Distribution::Normal(0.0, 0.1), &dev).transpose();
        // 2..=8 rows are one kernel call, 11 two (padded), 1 and 40 go to the GEMM library.
        for rows in [1, 2, 8, 11, 40] {
            let x = Tensor::<B, 2>::random([rows, k], Distribution::Normal(0.0, 1.0), &dev);
            for (layout, w) in [("row-major", &w), ("transposed", &wt)] {
                let want = x.clone().matmul(w.clone());
                let got = matmul(x.clone(), w.clone());
                assert_eq!(got.dims(), [rows, n]);
                let d = max_diff(got, want);
                assert!(
                    d < 1e-4,
                    "{rows} rows, {layout} weight: max |fused - gemm| = {d}"
                );
            }
        }
    }

    /// The one-pass AdamW against burn's `AdamW` over a few steps, with weight decay: the same
    /// parameters and state (up to rounding: flex may divide by a scalar as a product).
    #[test]
    fn adamw_matches_burns_adamw() {
        use burn::optim::{AdamWConfig, SimpleOptimizer};
        type AD = burn::backend::Autodiff<B>;
        let dev = Default::default();
        let hyper = AdamWParams {
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-8,
            weight_decay: 0.1,
        };
        let reference = AdamWConfig::new()
            .with_beta_1(hyper.beta_1)
            .with_beta_2(hyper.beta_2)
            .with_epsilon(hyper.epsilon)
            .with_weight_decay(hyper.weight_decay)
            .init::<AD, burn::nn::Linear<AD>>()
            .optim()
            .clone();
        // More elements than one rayon chunk, and not a multiple of it.
        let p0 = Tensor::<B, 2>::random([37, 1001], Distribution::Normal(0.0, 1.0), &dev);
        let (mut p_ref, mut s_ref) = (p0.clone(), None);
        let (mut p_new, mut s_new) = (p0.clone(), None);
        for step in 0..4 {
            let g = Tensor::<B, 2>::random([37, 1001], Distribution::Normal(0.0, 0.01), &dev);
            let lr = 1e-2 * (step + 1) as f64;
            let (p, s) = reference.step(lr, p_ref, g.clone(), s_ref);
            (p_ref, s_ref) = (p, s);
            let (p, s) = adamw(&hyper, lr, p_new, g, s_new)
                .unwrap_or_else(|_| panic!("flex has the kernel"));
            (p_new, s_new) = (p, Some(s));
            let (r, n) = (s_ref.as_ref().unwrap(), s_new.as_ref().unwrap());
            assert_eq!(r.momentum.time, n.momentum.time);
            let dm = max_diff(r.momentum.moment_1.clone(), n.momentum.moment_1.clone());
            let dv = max_diff(r.momentum.moment_2.clone(), n.momentum.moment_2.clone());
            let dp = max_diff(p_ref.clone(), p_new.clone());
            assert!(
                dm < 1e-9 && dv < 1e-11 && dp < 1e-6,
                "step {step}: m {dm} v {dv} p {dp}"
            );
        }
        // The parameters did move (Adam's steps are about lr each).
        let moved = max_diff(p_new, p0);
        assert!(moved > 0.05, "moved {moved}");
    }

    /// The fused log-prob op against burn's `log_softmax` + `gather`: values and entropy on plain
    /// flex, and the gradient of a weighted sum of the log-probs under `Autodiff<Flex>`.
    #[test]
    fn token_log_probs_and_their_gradient_match_the_tensor_ops() {
        type AD = burn::backend::Autodiff<B>;
        let dev = Default::default();
        let (b, s, vocab) = (2, 3, 1000);
        let logits = Tensor::<B, 3>::random([b, s, vocab], Distribution::Normal(0.0, 3.0), &dev);
        let ids = TensorData::new(vec![0i64, 999, 5, 17, 999, 0], [b, s]);
        let targets = Tensor::<B, 2, Int>::from_data(ids.clone(), &dev);
        let reference = |l: Tensor<B, 3>| {
            let lp = log_softmax(l, 2);
            let h = (lp.clone().exp() * lp.clone())
                .sum_dim(2)
                .squeeze_dim::<2>(2)
                .neg();
            let g = lp
                .gather(2, targets.clone().unsqueeze_dim::<3>(2))
                .squeeze_dim::<2>(2);
            (g, h)
        };
        let (lp, h) = token_log_probs_with_entropy(logits.clone(), targets.clone());
        let (lp_ref, h_ref) = reference(logits.clone());
        assert!(max_diff(lp, lp_ref) < 1e-5);
        assert!(max_diff(h, h_ref) < 1e-4);

        // Gradient of sum(w * logp) with respect to the logits.
        let w = Tensor::<AD, 2>::random([b, s], Distribution::Normal(0.0, 1.0), &dev);
        let grad_of = |fused: bool| {
            let l = Tensor::<AD, 3>::from_inner(logits.clone()).require_grad();
            let t = Tensor::<AD, 2, Int>::from_data(ids.clone(), &dev);
            let lp = if fused {
                token_log_probs(l.clone(), t)
            } else {
                log_softmax(l.clone(), 2)
                    .gather(2, t.unsqueeze_dim::<3>(2))
                    .squeeze_dim::<2>(2)
            };
            let grads = (lp * w.clone()).sum().backward();
            l.grad(&grads).expect("logits get a gradient")
        };
        let (got, want) = (grad_of(true), grad_of(false));
        assert!(max_diff(got, want) < 1e-6);
    }
}
