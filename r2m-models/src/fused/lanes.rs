//! Row arithmetic the compiler can vectorize. A float sum taken in order cannot be reordered
//! into SIMD lanes, so the reductions keep [`N`] partial results; and `exp` is a
//! branch-free polynomial instead of a libm call per element.

/// Partial results per reduction (one AVX-512 register of f32).
pub const N: usize = 16;

/// `e^x`, within 3 ulp of `f32::exp` on `[-87, 88]`; 0 below (libm returns subnormals
/// down to -103, which make any GEMM that reads them many times slower), and `x` is
/// clamped to 88 above.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // 1.5 * 2^23: adding it rounds to an integer, held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let below = x < -87.0;
    let x = x.clamp(-87.0, 88.0);
    let k = x * std::f32::consts::LOG2_E + ROUND;
    let n = k - ROUND;
    // x - n ln2, with ln2 in two parts so the product is exact.
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    // e^r on |r| <= ln2 / 2: Taylor to degree 6 (error below 2e-7 relative).
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // 2^n from n's bits: k's mantissa holds n + 2^22.
    let n_bits = (k.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let e = p * f32::from_bits(((n_bits + 127) << 23) as u32);
    if below {
        0.0
    } else {
        e
    }
}

/// Largest element (`-inf` for an empty slice).
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; N];
    let mut chunks = x.chunks_exact(N);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = a.max(v);
        }
    }
    let tail = chunks.remainder().iter().copied();
    acc.into_iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, f32::max)
}

/// `Σ f(x_i)` with `N` partial sums.
#[inline(always)]
fn sum_of(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; N];
    let mut chunks = x.chunks_exact(N);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().map(|&v| f(v)).sum::<f32>()
}

pub fn sum(x: &[f32]) -> f32 {
    sum_of(x, |v| v)
}

/// `Σ x_i²`.
pub fn sum_squares(x: &[f32]) -> f32 {
    sum_of(x, |v| v * v)
}

/// `(Σ e^(x_i - shift), Σ e^(x_i - shift) (x_i - shift))`, for a log-sum-exp and an
/// entropy in one pass.
pub fn sum_exp(x: &[f32], shift: f32) -> (f32, f32) {
    let (mut z, mut zx) = ([0f32; N], [0f32; N]);
    let mut chunks = x.chunks_exact(N);
    for c in &mut chunks {
        for ((z, zx), &v) in z.iter_mut().zip(zx.iter_mut()).zip(c) {
            let d = v - shift;
            let e = exp(d);
            *z += e;
            *zx += e * d;
        }
    }
    let (mut z, mut zx) = (z.iter().sum::<f32>(), zx.iter().sum::<f32>());
    for &v in chunks.remainder() {
        let d = v - shift;
        z += exp(d);
        zx += exp(d) * d;
    }
    (z, zx)
}

/// `Σ a_i b_i`.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; N];
    let (mut ca, mut cb) = (a.chunks_exact(N), b.chunks_exact(N));
    for (x, y) in (&mut ca).zip(&mut cb) {
        for ((s, &x), &y) in acc.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    acc.iter().sum::<f32>() + tail
}

/// `Σ a_i b_i c_i`.
pub fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    let mut acc = [0f32; N];
    let (mut ca, mut cb, mut cc) = (a.chunks_exact(N), b.chunks_exact(N), c.chunks_exact(N));
    for ((x, y), z) in (&mut ca).zip(&mut cb).zip(&mut cc) {
        for (((s, &x), &y), &z) in acc.iter_mut().zip(x).zip(y).zip(z) {
            *s += x * y * z;
        }
    }
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .zip(cc.remainder())
        .map(|((x, y), z)| x * y * z)
        .sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_3_ulp_and_reductions_match_f64() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let want = (x as f64).exp();
            worst = worst.max(((exp(x) as f64 - want) / want).abs());
        }
        assert!(
            worst < 3.0 * f32::EPSILON as f64,
            "max relative error {worst:e}"
        );
        assert_eq!((exp(f32::NEG_INFINITY), exp(-87.5)), (0.0, 0.0));
        assert!(exp(f32::NAN).is_nan());
        // Lengths around the lane count, values of both signs.
        for len in [0, 1, 15, 16, 17, 100, 49_152] {
            let x: Vec<f32> = (0..len)
                .map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 5.0)
                .collect();
            let y: Vec<f32> = x.iter().map(|v| v * 0.5 - 1.0).collect();
            // Within 1e-5 of the f64 sum, relative to the sum of the terms' magnitudes.
            let close = |got: f32, f: &dyn Fn(usize) -> f64| {
                let want: f64 = (0..len).map(f).sum();
                let mass: f64 = (0..len).map(|i| f(i).abs()).sum();
                (got as f64 - want).abs() <= 1e-5 * (1.0 + mass)
            };
            let (xf, yf) = (|i: usize| x[i] as f64, |i: usize| y[i] as f64);
            let want_max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&x), want_max, "max, len {len}");
            assert!(close(sum(&x), &xf), "sum, len {len}");
            assert!(
                close(sum_squares(&x), &|i| xf(i).powi(2)),
                "squares, len {len}"
            );
            assert!(close(dot(&x, &y), &|i| xf(i) * yf(i)), "dot, len {len}");
            let d3 = |i| xf(i) * yf(i) * xf(i);
            assert!(close(dot3(&x, &y, &x), &d3), "dot3, len {len}");
            let (z, zx) = sum_exp(&x, 1.0);
            assert!(close(z, &|i| (xf(i) - 1.0).exp()), "z, len {len}");
            let zx_want = |i| (xf(i) - 1.0).exp() * (xf(i) - 1.0);
            assert!(close(zx, &zx_want), "zx, len {len}");
        }
    }
}
