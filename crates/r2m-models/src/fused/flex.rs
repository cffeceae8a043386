//! The flex kernels: they take the generic tensors and give them back unchanged (`Err`) unless
//! the backend is plain `Flex`.

use std::any::Any;

use super::lanes;

mod product;

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

/// `t` in row-major order from offset 0: itself when it already is, else a copy.
fn dense(t: FlexTensor) -> FlexTensor {
    if t.layout().is_contiguous() && t.layout().start_offset() == 0 {
        t
    } else {
        t.to_contiguous()
    }
}

/// A new zero-filled f32 tensor of `shape`, for a kernel to write.
///
/// `FlexTensor::empty` zero-fills a byte vector and then copies it into an aligned one; an f32
/// vector needs no copy.
fn zeros_f32(shape: burn::tensor::Shape) -> FlexTensor {
    let n = shape.num_elements();
    FlexTensor::new(
        burn::tensor::Bytes::from_elems(vec![0f32; n]),
        burn::backend::flex::Layout::contiguous(shape),
        DType::F32,
    )
}

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

/// Rows of `x` per rayon task for a row-wise kernel over rows of `width`.
fn rows_per_task(width: usize) -> usize {
    (CHUNK / width.max(1)).max(1)
}

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

/// Rotary embedding of rows of `heads * head_dim` values, each head in the rotate-half layout
/// with `half` rotated pairs, `sin` signed as [`super::rope`] takes it: `out = x cos +
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
                // `s` carries rotate_half's sign (see [`super::rope`]); the backward pass
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

pub fn matmul<B: Backend>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
) -> Result<Tensor<B, 2>, (Tensor<B, 2>, Tensor<B, 2>)> {
    let (x, w) = match cast2::<_, Tensor<Flex, 2>>(x, w) {
        Ok(pair) => pair,
        Err(inputs) => {
            let (x, w) = cast2::<_, Tensor<Autodiff<Flex>, 2>>(inputs.0, inputs.1)?;
            return Ok(back(product::matmul_autodiff(x, w)));
        }
    };
    if let Some(y) = small_rows::matmul(&x, &w) {
        return Ok(back(y));
    }
    let y = product::matmul(
        &x.clone().into_primitive().tensor(),
        &w.clone().into_primitive().tensor(),
    );
    Ok(back(match y {
        Some(y) => Tensor::<Flex, 2>::from_primitive(TensorPrimitive::Float(y)),
        None => x.matmul(w),
    }))
}

/// `x` (`[a, b, c, d]`, f32) as a new dense `[a, c, b, d]`: runs of `d` copied in parallel;
/// other dtypes back unchanged.
fn swap_dims_1_2(x: FlexTensor) -> Result<FlexTensor, FlexTensor> {
    if x.dtype() != DType::F32 {
        return Err(x);
    }
    let x = dense(x);
    let [a, b, c, d] = x.layout().shape().dims::<4>();
    let mut out = zeros_f32([a, c, b, d].into());
    let src = &x.storage::<f32>()[..a * b * c * d];
    // One task per output row `(i, k)`: its `b` runs of `d` come from rows `(i, j, k)`.
    out.storage_mut::<f32>()[..a * b * c * d]
        .par_chunks_mut(b * d)
        .enumerate()
        .for_each(|(row, dst)| {
            let (i, k) = (row / c, row % c);
            for (j, run) in dst.chunks_mut(d).enumerate() {
                let at = ((i * b + j) * c + k) * d;
                run.copy_from_slice(&src[at..at + d]);
            }
        });
    Ok(out)
}

/// The backward of [`swap_heads`] under `Autodiff<Flex>`: the same copy, back.
#[derive(Debug)]
struct SwapHeadsBackward;

impl Backward<Flex, 1> for SwapHeadsBackward {
    type State = ();

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        let g = grads.consume::<Flex>(&ops.node);
        if let Some(parent) = parent {
            let g = swap_dims_1_2(g).expect("the gradient of an f32 op is f32");
            grads.register::<Flex>(parent.id, g);
        }
    }
}

pub fn swap_heads<B: Backend>(x: Tensor<B, 4>) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    let f = |t| Tensor::<Flex, 4>::from_primitive(TensorPrimitive::Float(t));
    let x = match cast::<_, Tensor<Flex, 4>>(x) {
        Ok(x) => {
            return match swap_dims_1_2(x.into_primitive().tensor()) {
                Ok(out) => Ok(back(f(out))),
                Err(x) => Err(back(f(x))),
            }
        }
        Err(x) => x,
    };
    type AD = Autodiff<Flex>;
    let xa = cast::<_, Tensor<AD, 4>>(x)?.into_primitive().tensor();
    let out = match swap_dims_1_2(xa.primitive.clone()) {
        Ok(out) => out,
        Err(_) => {
            let x = Tensor::<AD, 4>::from_primitive(TensorPrimitive::Float(xa));
            return Err(back(x));
        }
    };
    let out = match SwapHeadsBackward
        .prepare::<NoCheckpointing>([xa.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Ok(back(Tensor::<AD, 4>::from_primitive(
        TensorPrimitive::Float(out),
    )))
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
    let src = dense(src);
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
            let max = lanes::max(row);
            let (z, zx) = lanes::sum_exp(row, max);
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
        let g = dense(g);
        let g = &g.storage::<f32>()[..targets.len()];
        let vocab = logits.layout().num_elements() / targets.len();
        // In place when the saved logits are not shared (they are not, once the forward's
        // caller has dropped them); a copy otherwise.
        logits.storage_mut::<f32>()[..targets.len() * vocab]
            .par_chunks_mut(vocab)
            .zip(g.par_iter().zip(&lse).zip(&targets))
            .for_each(|(row, ((&g, &lse), &t))| {
                for v in row.iter_mut() {
                    *v = -g * lanes::exp(*v - lse);
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
        .for_each(move |(((p, m), v), g)| {
            // Indexing slices of one length (no bounds checks) lets the loop vectorize.
            let k = p.len();
            let (m, v, g) = (&mut m[..k], &mut v[..k], &g[..k]);
            for i in 0..k {
                m[i] = m[i] * b1 + g[i] * f1;
                v[i] = v[i] * b2 + (g[i] * g[i]) * f2;
                let delta = (m[i] / c1) / ((v[i] / c2).sqrt() + eps);
                let decayed = if decay == 0.0 { p[i] } else { p[i] * keep };
                p[i] = decayed - delta * lr;
            }
        });
    let f = |t| Tensor::<Flex, D>::from_primitive(TensorPrimitive::Float(t));
    let state = AdamWState::new(burn::optim::AdaptiveMomentumState::new(time, f(m), f(v)));
    Ok((back(f(p)), back(state)))
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
