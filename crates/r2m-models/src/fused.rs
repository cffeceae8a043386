//! The decoder's CPU hot spots as single functions, each with a faster kernel for flex.
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
//! Anything else, including `Autodiff<Flex>` in training, takes the tensor-op path, so gradients
//! are burn's own. Both paths compute the same function; the tests below hold them to each other,
//! and the SmolLM2 parity fixtures run through the kernels.

use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::module;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Tensor};

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

/// The flex kernels: they take the generic tensors and give them back unchanged (`Err`) unless
/// the backend is plain `Flex`.
#[cfg(feature = "flex")]
mod flex {
    use std::any::Any;

    use burn::backend::flex::FlexTensor;
    use burn::backend::Flex;
    use burn::tensor::activation::silu;
    use burn::tensor::backend::Backend;
    use burn::tensor::module;
    use burn::tensor::ops::AttentionModuleOptions;
    use burn::tensor::{Bool, DType, Tensor, TensorPrimitive};
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
}
