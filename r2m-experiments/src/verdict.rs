//! The over-optimization experiment's verdict, from the held-out curves (`RUN/heldout.jsonl`,
//! [`crate::heldout`]) rather than the training batches.
//!
//! - **Did vanilla over-optimize?** In each run, the peak step is chosen on one half of the
//!   held-out prompts (even indices) and measured on the other half (odd), so that noise does not
//!   make the peak. The drop is gold at that step minus gold at the last evaluation, on the odd
//!   half, with a paired bootstrap 95% interval over those prompts. A run over-optimized when the
//!   interval lies above 0; `vanilla_overoptimized` needs every vanilla run to.
//! - **Per method**: peak gold (measured as above), final gold (all prompts) and gold at three
//!   matched sqrt(KL) levels (25%, 50%, 75% of the smallest maximum any run reached), each as a
//!   mean over seeds with a Student-t 95% interval.
//! - **Paired by seed**: each method's gold at the middle matched KL minus vanilla's, same seed
//!   (the fixed key `paired_vs_vanilla`); and, beside it, the same difference at every matched
//!   level, at the peak and at the end (`paired_vs_vanilla_all`), since the middle level can lie
//!   before vanilla's peak, where nothing has been over-optimized yet.

use std::collections::BTreeMap;
use std::path::Path;

use r2m_core::Result;
use r2m_rl::config::{method_name, RmMethod};
use serde::{Deserialize, Serialize};

use crate::heldout::HeldOutStep;
use crate::stats::{bootstrap, t_interval, Interval};

/// One run's held-out verdict.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunVerdict {
    pub seed: u64,
    /// The step whose gold was highest on the even-index prompts.
    pub peak_step: usize,
    pub peak_sqrt_kl: f64,
    /// Gold at the peak step and at the last evaluation, on the odd-index prompts.
    pub gold_peak: f64,
    pub gold_final_half: f64,
    /// `gold_peak - gold_final_half` with its paired bootstrap interval over the odd prompts.
    pub drop: Interval,
    pub overoptimized: bool,
    /// Gold over all prompts at the last evaluation, and at each matched sqrt(KL).
    pub gold_final: f64,
    pub gold_at_matched_kl: Vec<f64>,
    /// Proxy (raw score of the fixed proxy) at the last evaluation, and sqrt(KL) there.
    pub proxy_final: f64,
    pub sqrt_kl_final: f64,
}

/// One method over its seeds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MethodVerdict {
    pub gold_peak: Interval,
    pub gold_final: Interval,
    pub gold_at_matched_kl: Vec<Interval>,
    pub runs: Vec<RunVerdict>,
}

/// `report.json`'s verdict keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Verdict {
    pub vanilla_overoptimized: bool,
    /// The three sqrt(KL) levels gold is compared at.
    pub matched_sqrt_kl: Vec<f64>,
    pub methods: BTreeMap<String, MethodVerdict>,
    /// Gold at the middle matched sqrt(KL), method minus vanilla, paired by seed.
    pub paired_vs_vanilla: BTreeMap<String, Interval>,
    /// Every paired difference to vanilla, per method.
    pub paired_vs_vanilla_all: BTreeMap<String, PairedVsVanilla>,
}

/// A method's gold minus vanilla's, paired by seed, each with a Student-t 95% interval.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PairedVsVanilla {
    pub gold_at_matched_kl: Vec<Interval>,
    pub gold_peak: Interval,
    pub gold_final: Interval,
}

/// Gold (mean over all prompts) at `level` of sqrt(KL), linearly interpolated along the
/// evaluations where sqrt(KL) first reaches it; `None` if it never does.
pub fn gold_at_sqrt_kl(points: &[HeldOutStep], level: f64) -> Option<f64> {
    let xy: Vec<(f64, f64)> = points
        .iter()
        .map(|p| (p.sqrt_kl(), p.gold_mean()))
        .collect();
    if xy.first().is_some_and(|&(x, _)| x >= level) {
        return Some(xy[0].1);
    }
    xy.windows(2).find_map(|w| {
        let ((x0, y0), (x1, y1)) = (w[0], w[1]);
        (x0 < level && x1 >= level).then(|| y0 + (y1 - y0) * (level - x0) / (x1 - x0))
    })
}

/// The verdict of one run's evaluations (at least two).
pub fn run_verdict(seed: u64, points: &[HeldOutStep], levels: &[f64]) -> RunVerdict {
    let n = points[0].prompts();
    let even: Vec<usize> = (0..n).step_by(2).collect();
    let odd: Vec<usize> = (1..n).step_by(2).collect();
    let peak = points
        .iter()
        .max_by(|a, b| {
            a.mean_over(&a.gold, &even)
                .total_cmp(&b.mean_over(&b.gold, &even))
        })
        .expect("points");
    let last = points.last().expect("points");
    // Per odd prompt: gold at the peak minus gold at the end (each the mean of its k samples).
    let per_prompt: Vec<f64> = odd
        .iter()
        .map(|&i| peak.mean_over(&peak.gold, &[i]) - last.mean_over(&last.gold, &[i]))
        .collect();
    let drop = bootstrap(per_prompt.len(), 2000, seed ^ 0xb007, |idx| {
        idx.iter().map(|&i| per_prompt[i]).sum::<f64>() / idx.len().max(1) as f64
    });
    RunVerdict {
        seed,
        peak_step: peak.step,
        peak_sqrt_kl: peak.sqrt_kl(),
        gold_peak: peak.mean_over(&peak.gold, &odd),
        gold_final_half: last.mean_over(&last.gold, &odd),
        overoptimized: drop.ci95_low > 0.0,
        drop,
        gold_final: last.gold_mean(),
        gold_at_matched_kl: levels
            .iter()
            .map(|&l| gold_at_sqrt_kl(points, l).unwrap_or(f64::NAN))
            .collect(),
        proxy_final: last.proxy_mean(),
        sqrt_kl_final: last.sqrt_kl(),
    }
}

/// One finished run's held-out evaluations.
#[derive(Debug, Clone)]
pub struct HeldOutRun {
    pub method: RmMethod,
    pub seed: u64,
    pub points: Vec<HeldOutStep>,
}

/// The verdict of finished runs (in report order) with at least two held-out evaluations each;
/// `None` without any.
pub fn verdict(runs: &[HeldOutRun]) -> Option<Verdict> {
    let runs: Vec<&HeldOutRun> = runs.iter().filter(|r| r.points.len() >= 2).collect();
    if runs.is_empty() {
        return None;
    }
    let mut order: Vec<RmMethod> = Vec::new();
    for r in &runs {
        if !order.contains(&r.method) {
            order.push(r.method);
        }
    }
    let reach = runs
        .iter()
        .map(|r| {
            r.points
                .iter()
                .map(HeldOutStep::sqrt_kl)
                .fold(0.0, f64::max)
        })
        .fold(f64::INFINITY, f64::min);
    let levels: Vec<f64> = [0.25, 0.5, 0.75].iter().map(|f| f * reach).collect();
    let mut methods = BTreeMap::new();
    let mut per_run: BTreeMap<(String, u64), RunVerdict> = BTreeMap::new();
    for &m in &order {
        let rv: Vec<RunVerdict> = runs
            .iter()
            .filter(|r| r.method == m)
            .map(|r| run_verdict(r.seed, &r.points, &levels))
            .collect();
        if rv.is_empty() {
            continue;
        }
        let over =
            |f: &dyn Fn(&RunVerdict) -> f64| t_interval(&rv.iter().map(f).collect::<Vec<_>>());
        let mv = MethodVerdict {
            gold_peak: over(&|r| r.gold_peak),
            gold_final: over(&|r| r.gold_final),
            gold_at_matched_kl: (0..levels.len())
                .map(|i| over(&|r| r.gold_at_matched_kl[i]))
                .collect(),
            runs: rv.clone(),
        };
        for r in rv {
            per_run.insert((method_name(m).to_string(), r.seed), r);
        }
        methods.insert(method_name(m).to_string(), mv);
    }
    let vanilla_overoptimized = methods
        .get("vanilla")
        .is_some_and(|v| !v.runs.is_empty() && v.runs.iter().all(|r| r.overoptimized));
    let mut paired_vs_vanilla_all = BTreeMap::new();
    for name in methods.keys().filter(|n| *n != "vanilla") {
        let pairs: Vec<(&RunVerdict, &RunVerdict)> = per_run
            .iter()
            .filter(|((n, _), _)| n == name)
            .filter_map(|((_, seed), r)| Some((r, per_run.get(&("vanilla".to_string(), *seed))?)))
            .collect();
        if pairs.is_empty() {
            continue;
        }
        let diff = |f: &dyn Fn(&RunVerdict) -> f64| {
            t_interval(&pairs.iter().map(|(r, v)| f(r) - f(v)).collect::<Vec<_>>())
        };
        let all = PairedVsVanilla {
            gold_at_matched_kl: (0..levels.len())
                .map(|i| diff(&|r| r.gold_at_matched_kl[i]))
                .collect(),
            gold_peak: diff(&|r| r.gold_peak),
            gold_final: diff(&|r| r.gold_final),
        };
        paired_vs_vanilla_all.insert(name.clone(), all);
    }
    let paired_vs_vanilla = paired_vs_vanilla_all
        .iter()
        .map(|(n, p)| (n.clone(), p.gold_at_matched_kl[1]))
        .collect();
    Some(Verdict {
        vanilla_overoptimized,
        matched_sqrt_kl: levels,
        methods,
        paired_vs_vanilla,
        paired_vs_vanilla_all,
    })
}

/// The methods of the README's figure.
const MAIN_METHODS: [RmMethod; 3] = [RmMethod::Vanilla, RmMethod::R2m, RmMethod::Oracle];

/// `DIR/heldout_gold_vs_sqrt_kl.{png,svg}` and `heldout_proxy_vs_sqrt_kl`: per method, the
/// held-out gold (and the fixed proxy's raw score) at each evaluation against sqrt(KL), the mean
/// over seeds with a min-max band; `heldout_gold_vs_sqrt_kl_main` the same gold for vanilla, R2M
/// and the oracle alone, when other methods ran too. Nothing is drawn without held-out
/// evaluations.
pub fn held_out_plots(dir: &Path, all: &[HeldOutRun]) -> Result<Vec<std::path::PathBuf>> {
    use r2m_rl::plots::{line_chart, Chart, Series};
    let mut golds = Vec::new();
    let mut proxies = Vec::new();
    let mut order: Vec<RmMethod> = Vec::new();
    for r in all.iter().filter(|r| !r.points.is_empty()) {
        if !order.contains(&r.method) {
            order.push(r.method);
        }
    }
    for m in order {
        let runs: Vec<&Vec<HeldOutStep>> = all
            .iter()
            .filter(|r| r.method == m && !r.points.is_empty())
            .map(|r| &r.points)
            .collect();
        let Some(n) = runs.iter().map(|p| p.len()).min() else {
            continue;
        };
        // Evaluation i of every seed: mean sqrt(KL) as x, mean and min..max of y.
        let series = |y: fn(&HeldOutStep) -> f64| {
            let mut points = Vec::new();
            let mut band = Vec::new();
            for i in 0..n {
                let xs: Vec<f64> = runs.iter().map(|r| r[i].sqrt_kl()).collect();
                let ys: Vec<f64> = runs.iter().map(|r| y(&r[i])).collect();
                let x = xs.iter().sum::<f64>() / xs.len() as f64;
                let lo = ys.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = ys.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                points.push((x, ys.iter().sum::<f64>() / ys.len() as f64));
                band.push((x, lo, hi));
            }
            Series {
                name: match runs.len() {
                    1 => format!("{} (1 seed)", method_name(m)),
                    n => format!("{} ({n} seeds)", method_name(m)),
                },
                points,
                band: (runs.len() > 1).then_some(band),
            }
        };
        golds.push((m, series(HeldOutStep::gold_mean)));
        proxies.push(series(HeldOutStep::proxy_mean));
    }
    if golds.is_empty() {
        return Ok(Vec::new());
    }
    let x_label = "sqrt(KL to the reference) on the held-out samples".to_string();
    let gold_chart = |title: &str, series: Vec<Series>| Chart {
        title: title.into(),
        x_label: x_label.clone(),
        y_label: "gold".into(),
        series,
    };
    // The comparison that matters, without the controls' bands on top: vanilla, R2M and the
    // oracle (when there are other methods too).
    let main: Vec<Series> = (golds.iter())
        .filter(|(m, _)| MAIN_METHODS.contains(m))
        .map(|(_, s)| s.clone())
        .collect();
    let mut out = Vec::new();
    if main.len() >= 2 && main.len() < golds.len() {
        out.extend(line_chart(
            dir,
            "heldout_gold_vs_sqrt_kl_main",
            &gold_chart(
                "Held-out gold vs sqrt(KL): vanilla, R2M, oracle (mean over seeds, band min-max)",
                main,
            ),
        )?);
    }
    out.extend(line_chart(
        dir,
        "heldout_gold_vs_sqrt_kl",
        &gold_chart(
            "Held-out gold vs sqrt(KL) (mean over seeds, band min-max)",
            golds.into_iter().map(|(_, s)| s).collect(),
        ),
    )?);
    out.extend(line_chart(
        dir,
        "heldout_proxy_vs_sqrt_kl",
        &Chart {
            title: "Held-out proxy (fixed, raw score) vs sqrt(KL)".into(),
            x_label,
            y_label: "proxy".into(),
            series: proxies,
        },
    )?);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An evaluation at `step` with `kl` for every sample and gold `g(prompt)` for each of 2
    /// samples of 8 prompts.
    fn point(step: usize, kl: f64, g: impl Fn(usize) -> f64) -> HeldOutStep {
        let gold: Vec<f64> = (0..16)
            .map(|r| g(r / 2) + if r % 2 == 0 { 0.01 } else { -0.01 })
            .collect();
        HeldOutStep {
            step,
            k: 2,
            proxy: gold.clone(),
            kl: vec![kl; 16],
            gold,
            responses: vec![],
        }
    }

    #[test]
    fn a_rise_and_fall_is_over_optimization_and_a_rise_is_not() {
        // Gold rises to step 4, then falls well below its peak on every prompt.
        let rise_fall = [
            point(0, 0.0, |i| 0.1 * i as f64),
            point(4, 1.0, |i| 1.0 + 0.1 * i as f64),
            point(8, 4.0, |i| -1.0 + 0.1 * i as f64),
        ];
        let v = run_verdict(0, &rise_fall, &[0.5, 1.0, 1.5]);
        assert_eq!(v.peak_step, 4);
        assert!(v.overoptimized && (v.drop.mean - 2.0).abs() < 1e-9, "{v:?}");
        // sqrt(KL) 0.5 lies halfway between steps 0 and 4 (sqrt KL 0 and 1).
        let mean_at = |p: &HeldOutStep| p.gold_mean();
        let want = 0.5 * (mean_at(&rise_fall[0]) + mean_at(&rise_fall[1]));
        assert!((v.gold_at_matched_kl[0] - want).abs() < 1e-9);
        assert!((v.gold_at_matched_kl[1] - mean_at(&rise_fall[1])).abs() < 1e-9);
        // Gold that keeps rising peaks at the end: no drop.
        let rising = [
            point(0, 0.0, |i| 0.1 * i as f64),
            point(4, 1.0, |i| 0.5 + 0.1 * i as f64),
            point(8, 4.0, |i| 1.0 + 0.1 * i as f64),
        ];
        let v = run_verdict(0, &rising, &[0.5, 1.0, 1.5]);
        assert_eq!(v.peak_step, 8);
        assert!(!v.overoptimized && v.drop.mean.abs() < 1e-12);
    }

    #[test]
    fn the_peak_is_chosen_on_the_even_prompts_and_measured_on_the_odd() {
        // At step 4 only the even prompts are high: the odd half sees no peak there.
        let points = [
            point(0, 0.0, |_| 0.0),
            point(4, 1.0, |i| if i % 2 == 0 { 2.0 } else { 0.0 }),
            point(8, 2.0, |_| 0.0),
        ];
        let v = run_verdict(0, &points, &[0.5, 1.0, 1.5]);
        assert_eq!(v.peak_step, 4);
        assert!(v.gold_peak.abs() < 1e-9 && !v.overoptimized, "{v:?}");
    }

    #[test]
    fn differences_to_vanilla_pair_runs_of_the_same_seed() {
        // Vanilla rises to 1 + s and falls to s; R2M of the same seed sits `d` above it at every
        // evaluation, with d = 0.1 for seed 0, 0.3 for seed 1 (and a seed vanilla lacks).
        let curve = |seed: u64, d: f64| {
            let s = seed as f64;
            vec![
                point(0, 0.0, |_| s + d),
                point(4, 1.0, |_| 1.0 + s + d),
                point(8, 2.0, |_| s + d),
            ]
        };
        let run = |method, seed, d| HeldOutRun {
            method,
            seed,
            points: curve(seed, d),
        };
        let runs = [
            run(RmMethod::Vanilla, 0, 0.0),
            run(RmMethod::Vanilla, 1, 0.0),
            run(RmMethod::R2m, 1, 0.3),
            run(RmMethod::R2m, 0, 0.1),
            run(RmMethod::R2m, 7, 5.0),
        ];
        let v = verdict(&runs).expect("verdict");
        assert!(v.vanilla_overoptimized);
        let p = &v.paired_vs_vanilla_all["r2m"];
        for i in [&p.gold_peak, &p.gold_final]
            .into_iter()
            .chain(&p.gold_at_matched_kl)
        {
            assert_eq!(i.n, 2, "{p:?}");
            assert!((i.mean - 0.2).abs() < 1e-9, "{p:?}");
            // t(1) = 12.706 times the standard error 0.1.
            assert!(
                (i.ci95_high - i.ci95_low - 2.0 * 12.706 * 0.1).abs() < 1e-6,
                "{p:?}"
            );
        }
        assert_eq!(v.paired_vs_vanilla["r2m"], p.gold_at_matched_kl[1]);
        assert!(!v.paired_vs_vanilla_all.contains_key("vanilla"));
    }

    #[test]
    fn gold_at_a_kl_never_reached_is_none() {
        let points = [point(0, 0.0, |_| 0.0), point(4, 1.0, |_| 1.0)];
        assert_eq!(gold_at_sqrt_kl(&points, 2.0), None);
        assert_eq!(gold_at_sqrt_kl(&points, 0.0), Some(points[0].gold_mean()));
    }
}
