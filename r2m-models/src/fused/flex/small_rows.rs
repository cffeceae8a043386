//! `x w` for at most [`MAX_ROWS`] rows with AVX-512, the weights read once.
//!
//! A decoding step multiplies a few rows by every weight matrix of the model. That is bound
//! by reading the weights, which the GEMM library (made for large products) streams at
//! about a third of the memory bandwidth here. These kernels read the weights in order, as
//! rows, keep the eight output rows in registers, and split the work over the rayon pool.

use burn::backend::Flex;
use burn::tensor::Tensor;
#[cfg(target_arch = "x86_64")]
use burn::tensor::{DType, TensorData};
#[cfg(target_arch = "x86_64")]
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::dense_f32;

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
