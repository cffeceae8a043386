//! Small statistics for the experiments' reports: Student-t and Wilson intervals, and a paired
//! bootstrap. Every interval is 95%, two-sided.

use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// A mean with its 95% interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub mean: f64,
    pub ci95_low: f64,
    pub ci95_high: f64,
    /// Observations behind it.
    pub n: usize,
}

impl Interval {
    /// Whether the interval excludes `x`.
    pub fn excludes(&self, x: f64) -> bool {
        x < self.ci95_low || x > self.ci95_high
    }
}

impl std::fmt::Display for Interval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:+.3} (95% CI {:+.3} to {:+.3}, n = {})",
            self.mean, self.ci95_low, self.ci95_high, self.n
        )
    }
}

/// The 97.5% quantile of Student's t with `df` degrees of freedom (exact to 3 decimals for
/// `df <= 30`, then the Cornish-Fisher expansion; 1.96 in the limit).
pub fn t975(df: usize) -> f64 {
    const TABLE: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::INFINITY,
        1..=30 => TABLE[df - 1],
        _ => {
            let (z, v) = (1.959_964f64, df as f64);
            z + (z.powi(3) + z) / (4.0 * v)
                + (5.0 * z.powi(5) + 16.0 * z.powi(3) + 3.0 * z) / (96.0 * v * v)
        }
    }
}

/// The mean of `x` with its Student-t 95% interval (infinite with fewer than 2 values).
pub fn t_interval(x: &[f64]) -> Interval {
    let n = x.len();
    let mean = x.iter().sum::<f64>() / n.max(1) as f64;
    let half = if n < 2 {
        f64::INFINITY
    } else {
        let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        t975(n - 1) * (var / n as f64).sqrt()
    };
    Interval {
        mean,
        ci95_low: mean - half,
        ci95_high: mean + half,
        n,
    }
}

/// The paired differences `after - before`, with their t interval.
pub fn paired(before: &[f64], after: &[f64]) -> Interval {
    let d: Vec<f64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
    t_interval(&d)
}

/// `k` successes of `n` as a share, with Wilson's 95% score interval.
pub fn wilson(k: f64, n: usize) -> Interval {
    let nf = n.max(1) as f64;
    let (p, z) = (k / nf, 1.959_964f64);
    let denom = 1.0 + z * z / nf;
    let centre = (p + z * z / (2.0 * nf)) / denom;
    let half = z * (p * (1.0 - p) / nf + z * z / (4.0 * nf * nf)).sqrt() / denom;
    Interval {
        mean: p,
        ci95_low: centre - half,
        ci95_high: centre + half,
        n,
    }
}

/// The 95% percentile-bootstrap interval of `stat` over resamples of the indices `0..n`
/// (paired: one resample of the units serves every quantity `stat` computes), seeded.
pub fn bootstrap(
    n: usize,
    resamples: usize,
    seed: u64,
    stat: impl Fn(&[usize]) -> f64,
) -> Interval {
    let all: Vec<usize> = (0..n).collect();
    let mean = stat(&all);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut v: Vec<f64> = (0..resamples)
        .map(|_| {
            let idx: Vec<usize> = (0..n).map(|_| rng.random_range(0..n)).collect();
            stat(&idx)
        })
        .collect();
    v.sort_by(f64::total_cmp);
    let q = |p: f64| v[((p * (resamples - 1) as f64).round() as usize).min(resamples - 1)];
    Interval {
        mean,
        ci95_low: q(0.025),
        ci95_high: q(0.975),
        n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t_quantiles_match_the_table_and_the_normal_limit() {
        assert_eq!(t975(2), 4.303);
        assert!((t975(40) - 2.021).abs() < 2e-3, "{}", t975(40));
        assert!((t975(120) - 1.980).abs() < 2e-3, "{}", t975(120));
        assert!((t975(100_000) - 1.96).abs() < 1e-3);
    }

    #[test]
    fn t_interval_of_known_values() {
        // mean 2, sd 1, n 3: half-width 4.303 / sqrt(3).
        let i = t_interval(&[1.0, 2.0, 3.0]);
        assert!((i.mean - 2.0).abs() < 1e-12);
        assert!((i.ci95_high - (2.0 + 4.303 / 3f64.sqrt())).abs() < 1e-9);
        assert!(i.excludes(-1.0) && !i.excludes(2.5));
        assert!(t_interval(&[1.0]).ci95_high.is_infinite());
        let d = paired(&[0.0, 0.0, 0.0], &[1.0, 2.0, 3.0]);
        assert_eq!(d, i);
    }

    #[test]
    fn wilson_interval_of_known_values() {
        // 60 of 100: Wilson gives [0.502, 0.691].
        let w = wilson(60.0, 100);
        assert!(
            (w.ci95_low - 0.502).abs() < 1e-3 && (w.ci95_high - 0.691).abs() < 1e-3,
            "{w}"
        );
        let w = wilson(0.0, 10);
        assert!(w.ci95_low.abs() < 1e-12 && w.ci95_high > 0.2);
    }

    #[test]
    fn bootstrap_of_a_mean_brackets_it() {
        let x: Vec<f64> = (0..50).map(|i| (i % 7) as f64).collect();
        let mean = |idx: &[usize]| idx.iter().map(|&i| x[i]).sum::<f64>() / idx.len() as f64;
        let b = bootstrap(x.len(), 2000, 1, mean);
        let t = t_interval(&x);
        assert!(b.ci95_low < b.mean && b.mean < b.ci95_high);
        assert!((b.ci95_low - t.ci95_low).abs() < 0.25 && (b.ci95_high - t.ci95_high).abs() < 0.25);
    }
}
