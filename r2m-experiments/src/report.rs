//! The over-optimization experiment's report: every finished run's curves read back from its
//! `metrics.jsonl` and `heldout.jsonl`, summed up over seeds as `EXP/report.md`,
//! `EXP/report.json` and the plots under `EXP/plots/`. The held-out verdict it carries is
//! [`crate::verdict`]'s.

use std::path::{Path, PathBuf};

use r2m_core::{R2mError, Result};
use r2m_rl::config::{method_name, RmMethod};
use r2m_rl::plots::{line_chart, Chart, Series};
use r2m_rl::run::read_step_metrics;
use r2m_rl::StepMetrics;
use serde::Serialize;

use crate::heldout::read_heldout;
use crate::jsonl::write_atomic;
use crate::overopt::{run_dir, OveroptConfig, ProxyRmInfo};
use crate::verdict::HeldOutRun;

/// One run's curves, step by step.
#[derive(Debug, Clone, Serialize)]
pub struct RunCurve {
    pub method: RmMethod,
    pub seed: u64,
    pub sqrt_kl: Vec<f64>,
    pub gold: Vec<f64>,
    pub proxy_cal: Vec<f64>,
    pub gap: Vec<f64>,
    pub agree_before: Vec<f64>,
    pub agree_after: Vec<f64>,
    /// How far the RM's fusion head and `phi` have moved from their start, relative
    /// (`rm_fusion_moved`, `rm_phi_moved`; NaN where a step did not log it).
    pub fusion_moved: Vec<f64>,
    pub phi_moved: Vec<f64>,
    pub length: Vec<f64>,
    /// The oracle's gold-labelled pairs at each of its updates (NaN at other steps).
    pub oracle_pairs: Vec<f64>,
}

impl RunCurve {
    fn from_metrics(method: RmMethod, seed: u64, rows: &[StepMetrics]) -> Self {
        let col = |f: &dyn Fn(&StepMetrics) -> Option<f64>| -> Vec<f64> {
            rows.iter().map(|m| f(m).unwrap_or(f64::NAN)).collect()
        };
        Self {
            method,
            seed,
            sqrt_kl: col(&|m| Some(m.kl.max(0.0).sqrt())),
            gold: col(&|m| m.diagnostics.get("gold_mean")),
            proxy_cal: col(&|m| m.diagnostics.get("proxy_cal_mean")),
            gap: col(&|m| m.diagnostics.get("gold_gap")),
            agree_before: col(&|m| m.diagnostics.get("agree_before")),
            agree_after: col(&|m| m.diagnostics.get("agree_after")),
            fusion_moved: col(&|m| m.diagnostics.get("rm_fusion_moved")),
            phi_moved: col(&|m| m.diagnostics.get("rm_phi_moved")),
            length: col(&|m| Some(m.response_len)),
            oracle_pairs: col(&|m| m.diagnostics.get("oracle_pairs")),
        }
    }

    /// Gold reward where `sqrt(KL)` first reaches `k` (linear between the two steps around it);
    /// `None` when the run never reaches it.
    pub fn gold_at(&self, k: f64) -> Option<f64> {
        let i = self.sqrt_kl.iter().position(|&s| s >= k)?;
        if i == 0 {
            return Some(self.gold[0]);
        }
        let (s0, s1) = (self.sqrt_kl[i - 1], self.sqrt_kl[i]);
        let (g0, g1) = (self.gold[i - 1], self.gold[i]);
        let f = if s1 > s0 { (k - s0) / (s1 - s0) } else { 1.0 };
        Some(g0 + f.clamp(0.0, 1.0) * (g1 - g0))
    }

    /// Gold at `sqrt(KL) = k` from a least-squares line of gold on `sqrt(KL)` over all steps:
    /// less noisy than [`RunCurve::gold_at`], which rests on the two steps around the crossing.
    pub fn gold_fit_at(&self, k: f64) -> Option<f64> {
        let pts: Vec<(f64, f64)> = self
            .sqrt_kl
            .iter()
            .zip(&self.gold)
            .map(|(&x, &y)| (x, y))
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        let n = pts.len() as f64;
        let mx = pts.iter().map(|p| p.0).sum::<f64>() / n;
        let my = pts.iter().map(|p| p.1).sum::<f64>() / n;
        let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
        let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
        (pts.len() >= 2 && sxx > 0.0).then(|| my + sxy / sxx * (k - mx))
    }

    /// The last finite value (NaN when there is none).
    fn last(v: &[f64]) -> f64 {
        v.iter()
            .rev()
            .copied()
            .find(|x| x.is_finite())
            .unwrap_or(f64::NAN)
    }

    /// Mean of the last quarter of the steps (at least one): "final" values, less noisy than
    /// the last step alone.
    fn tail(v: &[f64]) -> f64 {
        let n = v.len().div_ceil(4).max(1);
        let t: Vec<f64> = v[v.len().saturating_sub(n)..]
            .iter()
            .copied()
            .filter(|x| x.is_finite())
            .collect();
        t.iter().sum::<f64>() / t.len().max(1) as f64
    }
}

/// Mean and sample standard deviation (0 for one value) of the finite values.
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct Spread {
    pub mean: f64,
    pub std: f64,
    pub n: usize,
}

impl Spread {
    pub fn of(v: &[f64]) -> Self {
        let v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
        let n = v.len();
        if n == 0 {
            return Self {
                mean: f64::NAN,
                std: f64::NAN,
                n,
            };
        }
        let mean = v.iter().sum::<f64>() / n as f64;
        let std = if n > 1 {
            (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        Self { mean, std, n }
    }
}

impl Spread {
    /// `mean ± std` without a sign (for quantities that are never negative).
    pub fn plain(&self) -> String {
        if self.n == 0 {
            "-".into()
        } else {
            format!("{:.3} ± {:.3}", self.mean, self.std)
        }
    }
}

impl std::fmt::Display for Spread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.n == 0 {
            write!(f, "-")
        } else {
            write!(f, "{:+.3} ± {:.3}", self.mean, self.std)
        }
    }
}

/// One method's row of the table (spreads over seeds).
#[derive(Debug, Clone, Serialize)]
pub struct MethodRow {
    pub method: String,
    pub seeds: usize,
    /// Gold at the matched `sqrt(KL)`.
    pub gold_at_kl: Spread,
    /// Gold at the matched KL minus vanilla's, paired by seed.
    pub vs_vanilla_at_kl: Spread,
    /// The same two from a line fitted to all steps ([`RunCurve::gold_fit_at`]).
    pub gold_at_kl_fit: Spread,
    pub vs_vanilla_at_kl_fit: Spread,
    pub gold_first: Spread,
    pub gold_final: Spread,
    pub proxy_final: Spread,
    pub gap_final: Spread,
    pub agree_before: Spread,
    pub agree_after: Spread,
    /// How far the fusion head and `phi` had moved from their start at the end of the run.
    pub fusion_moved_final: Spread,
    pub phi_moved_final: Spread,
    pub sqrt_kl_final: Spread,
    pub length_final: Spread,
}

/// The experiment's result.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The matched `sqrt(KL)`: the largest value every run reached.
    pub matched_sqrt_kl: Option<f64>,
    pub rows: Vec<MethodRow>,
    /// R2M minus vanilla gold at the matched KL, paired by seed (interpolated, and fitted).
    pub r2m_vs_vanilla: Option<Spread>,
    pub r2m_vs_vanilla_fit: Option<Spread>,
    pub runs: Vec<RunCurve>,
    pub plots: Vec<PathBuf>,
    /// `report.md`.
    pub markdown: String,
    /// The verdict from the held-out curves (`vanilla_overoptimized`, `methods`,
    /// `paired_vs_vanilla` at the top level of `report.json`), when the runs evaluated.
    #[serde(flatten)]
    pub held_out: Option<crate::verdict::Verdict>,
}

/// Read every finished run of `cfg` in `exp`, write `report.md`, `report.json` and the plots.
pub fn report(exp: &Path, cfg: &OveroptConfig) -> Result<Report> {
    // Every finished run: its step curves (`metrics.jsonl`) and held-out evaluations.
    let (mut runs, mut held) = (Vec::new(), Vec::new());
    for &method in &cfg.methods {
        for &seed in cfg.seeds_of(method) {
            let dir = run_dir(exp, method, seed);
            if !dir.join("done.json").exists() {
                continue;
            }
            let p = dir.join("metrics.jsonl");
            if p.exists() {
                runs.push(RunCurve::from_metrics(
                    method,
                    seed,
                    &read_step_metrics(&p)?,
                ));
            }
            held.push(HeldOutRun {
                method,
                seed,
                points: read_heldout(&dir.join("heldout.jsonl"))?,
            });
        }
    }
    if runs.is_empty() {
        return Err(R2mError::Config(format!(
            "{}: no finished run to report on",
            exp.display()
        )));
    }
    let matched = runs
        .iter()
        .map(|r| r.sqrt_kl.iter().copied().fold(0.0, f64::max))
        .fold(f64::INFINITY, f64::min);
    let matched = (matched.is_finite() && matched > 0.0).then_some(matched);
    let at_kl = |r: &RunCurve| matched.and_then(|k| r.gold_at(k)).unwrap_or(f64::NAN);
    let at_kl_fit = |r: &RunCurve| matched.and_then(|k| r.gold_fit_at(k)).unwrap_or(f64::NAN);
    let vanilla: Vec<&RunCurve> = runs
        .iter()
        .filter(|r| r.method == RmMethod::Vanilla)
        .collect();
    let paired = |m: RmMethod, f: &dyn Fn(&RunCurve) -> f64| -> Spread {
        let d: Vec<f64> = runs
            .iter()
            .filter(|r| r.method == m)
            .filter_map(|r| {
                let v = vanilla.iter().find(|v| v.seed == r.seed)?;
                Some(f(r) - f(v))
            })
            .collect();
        Spread::of(&d)
    };
    let mut rows = Vec::new();
    for &m in &cfg.methods {
        let rs: Vec<&RunCurve> = runs.iter().filter(|r| r.method == m).collect();
        if rs.is_empty() {
            continue;
        }
        let over =
            |f: &dyn Fn(&RunCurve) -> f64| Spread::of(&rs.iter().map(|r| f(r)).collect::<Vec<_>>());
        let mean_of = |v: &[f64]| Spread::of(v).mean;
        rows.push(MethodRow {
            method: method_name(m),
            seeds: rs.len(),
            gold_at_kl: over(&at_kl),
            vs_vanilla_at_kl: paired(m, &at_kl),
            gold_at_kl_fit: over(&at_kl_fit),
            vs_vanilla_at_kl_fit: paired(m, &at_kl_fit),
            gold_first: over(&|r| r.gold[0]),
            gold_final: over(&|r| RunCurve::tail(&r.gold)),
            proxy_final: over(&|r| RunCurve::tail(&r.proxy_cal)),
            gap_final: over(&|r| RunCurve::tail(&r.gap)),
            agree_before: over(&|r| mean_of(&r.agree_before)),
            agree_after: over(&|r| mean_of(&r.agree_after)),
            fusion_moved_final: over(&|r| RunCurve::last(&r.fusion_moved)),
            phi_moved_final: over(&|r| RunCurve::last(&r.phi_moved)),
            sqrt_kl_final: over(&|r| RunCurve::tail(&r.sqrt_kl)),
            length_final: over(&|r| RunCurve::tail(&r.length)),
        });
    }
    let r2m = rows.iter().find(|r| r.method == "r2m");
    let r2m_vs_vanilla = r2m.map(|r| r.vs_vanilla_at_kl).filter(|s| s.n > 0);
    let r2m_vs_vanilla_fit = r2m.map(|r| r.vs_vanilla_at_kl_fit).filter(|s| s.n > 0);
    let mut plots = report_plots(exp, cfg, &runs)?;
    plots.extend(crate::verdict::held_out_plots(&exp.join("plots"), &held)?);
    let proxy: Option<ProxyRmInfo> = std::fs::read_to_string(exp.join("proxy-rm/proxy_rm.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let mut rep = Report {
        matched_sqrt_kl: matched,
        rows,
        r2m_vs_vanilla,
        r2m_vs_vanilla_fit,
        runs,
        plots,
        markdown: String::new(),
        held_out: crate::verdict::verdict(&held),
    };
    rep.markdown = markdown(cfg, &rep, proxy.as_ref());
    write_atomic(&exp.join("report.md"), &rep.markdown)?;
    write_atomic(
        &exp.join("report.json"),
        &serde_json::to_string_pretty(&rep).expect("json"),
    )?;
    Ok(rep)
}

fn markdown(cfg: &OveroptConfig, rep: &Report, proxy: Option<&ProxyRmInfo>) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Reward over-optimization: gold ({}) vs proxy RM\n",
        cfg.gold_name()
    );
    let _ = writeln!(
        s,
        "Policy `{}` ({} trainable), RLOO, {} steps × {} prompts × {} samples × {} new tokens, lr {}, KL beta {}; seeds {:?}.",
        cfg.policy,
        cfg.trainable,
        cfg.steps,
        cfg.prompts_per_step,
        cfg.samples_per_prompt,
        cfg.max_new_tokens,
        cfg.lr,
        cfg.kl_coef,
        cfg.seeds
    );
    let mut own = String::new();
    for &m in &cfg.methods {
        let name = method_name(m);
        let set = cfg.method_set.get(&name).filter(|v| !v.is_empty());
        let oracle = (m == RmMethod::Oracle).then(|| {
            let pairs: Vec<f64> = (rep.runs.iter().filter(|r| r.method == m))
                .flat_map(|r| r.oracle_pairs.iter().copied())
                .collect();
            let pairs = Spread::of(&pairs);
            format!(
                "; every {} steps the proxy's head trains {} AdamW steps on the gold-labelled pairs \
                 within each prompt's samples of that step{}",
                cfg.oracle_every,
                cfg.oracle_epochs,
                if pairs.n > 0 {
                    format!(" ({:.1} pairs per update, mean)", pairs.mean)
                } else {
                    String::new()
                }
            )
        });
        if set.is_some() || oracle.is_some() || cfg.method_seeds.contains_key(&name) {
            let _ = writeln!(
                own,
                "- `{name}`: seeds {:?}{}{}",
                cfg.seeds_of(m),
                set.map(|v| format!(", `{}`", v.join("`, `")))
                    .unwrap_or_default(),
                oracle.unwrap_or_default()
            );
        }
    }
    if !own.is_empty() {
        let _ = writeln!(s, "\n{own}");
    }
    if let Some(p) = proxy {
        let _ = writeln!(
            s,
            "Proxy RM: BT `{}` on {} initial-policy pairs labelled by gold ({} labels flipped, noise {}); held-out accuracy against gold {:.3} → {:.3} on {} pairs; proxy/gold correlation {:+.3}.",
            cfg.rm_trainable,
            p.train_pairs,
            p.flipped_labels,
            cfg.label_noise,
            p.accuracy_before.unwrap_or(f64::NAN),
            p.accuracy_after.unwrap_or(f64::NAN),
            p.eval_pairs,
            p.calibration.correlation
        );
    }
    let _ = writeln!(
        s,
        "\nValues are mean ± std over seeds. \"final\" is the mean of the last quarter of the steps. \
         Proxy is on gold's scale (mean/std matched on the initial policy's held-out responses); \
         gap = proxy − gold. Agreement: same-prompt response pairs ordered as gold orders them, \
         before and after the RM's own update in each step, averaged over steps. Moved: how far \
         the RM's fusion head and its head phi are from where they started, \
         ||theta - theta_0|| / ||theta_0||, at the end of the run (- where nothing trains)."
    );
    match rep.matched_sqrt_kl {
        Some(k) => {
            let _ = writeln!(
                s,
                "\nMatched sqrt(KL) = {k:.3} (the largest value every run reached).\n"
            );
        }
        None => {
            let _ = writeln!(
                s,
                "\nNo KL was reached by every run; gold at matched KL is undefined.\n"
            );
        }
    }
    let _ = writeln!(
        s,
        "| method | seeds | gold @ matched KL | Δ vs vanilla (paired) | gold @ matched KL, fit | Δ vs vanilla, fit | gold first | gold final | proxy final | gap final | agree before | agree after | fusion moved | phi moved | sqrt KL final | length final |"
    );
    let _ = writeln!(
        s,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for r in &rep.rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} ± {:.1} |",
            r.method,
            r.seeds,
            r.gold_at_kl,
            r.vs_vanilla_at_kl,
            r.gold_at_kl_fit,
            r.vs_vanilla_at_kl_fit,
            r.gold_first,
            r.gold_final,
            r.proxy_final,
            r.gap_final,
            r.agree_before.plain(),
            r.agree_after.plain(),
            r.fusion_moved_final.plain(),
            r.phi_moved_final.plain(),
            r.sqrt_kl_final.plain(),
            r.length_final.mean,
            r.length_final.std
        );
    }
    if let Some(k) = rep.matched_sqrt_kl {
        for (d, how) in [
            (rep.r2m_vs_vanilla, "interpolated at the crossing"),
            (rep.r2m_vs_vanilla_fit, "line fitted to all steps"),
        ] {
            if let Some(d) = d {
                let _ = writeln!(
                    s,
                    "\n**R2M − vanilla, gold at sqrt(KL) = {k:.3} ({how}): {:+.4} ± {:.4} over {} paired seeds ({}).**",
                    d.mean,
                    d.std,
                    d.n,
                    verdict(&d)
                );
            }
        }
    }
    if let Some(v) = &rep.held_out {
        held_out_markdown(&mut s, v);
    }
    s
}

/// The held-out section of `report.md` (see [`crate::verdict`]).
fn held_out_markdown(s: &mut String, v: &crate::verdict::Verdict) {
    use std::fmt::Write;
    let ci = |i: &crate::stats::Interval| {
        format!("{:+.3} [{:+.3}, {:+.3}]", i.mean, i.ci95_low, i.ci95_high)
    };
    let _ = writeln!(
        s,
        "\n## On held-out prompts\n\nGold of samples on the held-out prompts (films nothing \
         trains on), evaluated every few steps. Mean over seeds [95% t-interval]. Matched \
         sqrt(KL): {}.\n",
        v.matched_sqrt_kl
            .iter()
            .map(|k| format!("{k:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        s,
        "| method | seeds | gold peak | gold final | gold @ KL 1 | gold @ KL 2 | gold @ KL 3 |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    for (name, m) in &v.methods {
        let at: Vec<String> = m.gold_at_matched_kl.iter().map(ci).collect();
        let _ = writeln!(
            s,
            "| {name} | {} | {} | {} | {} |",
            m.runs.len(),
            ci(&m.gold_peak),
            ci(&m.gold_final),
            at.join(" | ")
        );
    }
    let _ = writeln!(s, "\nPer run (peak chosen on the even prompts, measured on the odd; drop = peak − final with a paired bootstrap interval over the odd prompts):\n");
    for (name, m) in &v.methods {
        for r in &m.runs {
            let _ = writeln!(
                s,
                "- {name} seed {}: peak at step {} (sqrt KL {:.2}), gold {:+.3} → final {:+.3}, drop {} → {}",
                r.seed,
                r.peak_step,
                r.peak_sqrt_kl,
                r.gold_peak,
                r.gold_final_half,
                ci(&r.drop),
                if r.overoptimized { "over-optimized" } else { "no significant fall" }
            );
        }
    }
    let _ = writeln!(
        s,
        "\n**vanilla_overoptimized: {}** (true when every vanilla run's drop interval lies above 0).",
        v.vanilla_overoptimized
    );
    let _ = writeln!(
        s,
        "\nMethod − vanilla, paired by seed (mean [95% t-interval]), at each matched sqrt(KL), at \
         the peak and at the last evaluation:\n\n\
         | method | pairs | @ KL 1 | @ KL 2 | @ KL 3 | peak | final |\n|---|---|---|---|---|---|---|"
    );
    for (name, p) in &v.paired_vs_vanilla_all {
        let at: Vec<String> = p.gold_at_matched_kl.iter().map(ci).collect();
        let _ = writeln!(
            s,
            "| {name} | {} | {} | {} | {} |",
            p.gold_peak.n,
            at.join(" | "),
            ci(&p.gold_peak),
            ci(&p.gold_final)
        );
    }
    for (name, d) in &v.paired_vs_vanilla {
        let _ = writeln!(
            s,
            "\n**{name} − vanilla, gold at sqrt(KL) = {:.3}, paired by seed: {}** (n = {}).",
            v.matched_sqrt_kl.get(1).copied().unwrap_or(f64::NAN),
            ci(d),
            d.n
        );
    }
}

/// A difference over seeds in words: beyond one standard deviation or not.
fn verdict(d: &Spread) -> &'static str {
    if d.n < 2 {
        "one seed: no spread, no conclusion"
    } else if d.mean - d.std > 0.0 {
        "R2M above vanilla by more than one std over seeds"
    } else if d.mean + d.std < 0.0 {
        "R2M below vanilla by more than one std over seeds"
    } else {
        "within one std over seeds: no clear difference"
    }
}

/// The y column of a run in a chart.
type YOf = fn(&RunCurve) -> &Vec<f64>;

/// Bins of `sqrt(KL)` in the charts against KL: per-step KL estimates are noisy, so points are
/// pooled into equal-width bins rather than joined in step order.
const KL_BINS: usize = 6;

/// A run's `(x, y)` in each cell of a chart (`None`: no point there).
type Cells = Vec<Option<(f64, f64)>>;

/// One method's series over seeds: `cells(run)` gives each run's `(x, y)` per cell (a step, or a
/// KL bin); a cell's point is the mean over the runs that have it, its band their min..max.
fn method_series(
    m: RmMethod,
    runs: &[RunCurve],
    cells: &dyn Fn(&RunCurve) -> Cells,
) -> Option<Series> {
    let per_run: Vec<Cells> = runs.iter().filter(|r| r.method == m).map(cells).collect();
    let n_cells = per_run.iter().map(Vec::len).max()?;
    let (mut points, mut band) = (Vec::new(), Vec::new());
    for c in 0..n_cells {
        let got: Vec<(f64, f64)> = per_run
            .iter()
            .filter_map(|v| v.get(c).copied().flatten())
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        if got.is_empty() {
            continue;
        }
        let n = got.len() as f64;
        let x = got.iter().map(|p| p.0).sum::<f64>() / n;
        let y = got.iter().map(|p| p.1).sum::<f64>() / n;
        let lo = got.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let hi = got.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
        points.push((x, y));
        band.push((x, lo, hi));
    }
    Some(Series {
        name: method_name(m),
        points,
        band: (per_run.len() > 1).then_some(band),
    })
}

fn report_plots(exp: &Path, cfg: &OveroptConfig, runs: &[RunCurve]) -> Result<Vec<PathBuf>> {
    let dir = exp.join("plots");
    let mut out = Vec::new();
    let max_kl = runs
        .iter()
        .flat_map(|r| r.sqrt_kl.iter().copied())
        .filter(|x| x.is_finite())
        .fold(0.0, f64::max)
        .max(1e-9);
    let width = max_kl / KL_BINS as f64;
    // Each run's mean sqrt(KL) and mean y over its steps in each KL bin.
    let kl_cells = |y: YOf| {
        move |r: &RunCurve| -> Cells {
            let mut sums = vec![(0.0, 0.0, 0usize); KL_BINS];
            for (&x, &v) in r.sqrt_kl.iter().zip(y(r)) {
                if x.is_finite() && v.is_finite() {
                    let b = ((x / width) as usize).min(KL_BINS - 1);
                    sums[b] = (sums[b].0 + x, sums[b].1 + v, sums[b].2 + 1);
                }
            }
            sums.into_iter()
                .map(|(sx, sy, n)| (n > 0).then(|| (sx / n as f64, sy / n as f64)))
                .collect()
        }
    };
    let step_cells = |y: YOf| {
        move |r: &RunCurve| -> Cells {
            y(r).iter()
                .enumerate()
                .map(|(t, &v)| Some(((t + 1) as f64, v)))
                .collect()
        }
    };
    let kl_label = format!("sqrt(KL to the reference), {KL_BINS} bins");
    // (file stem, title, x label, y label, against KL (else step), y column)
    type Spec<'a> = (&'a str, &'a str, &'a str, &'a str, bool, YOf);
    let charts: [Spec; 6] = [
        (
            "gold_vs_sqrt_kl",
            "Gold reward vs sqrt(KL)",
            &kl_label,
            "gold",
            true,
            |r| &r.gold,
        ),
        (
            "proxy_vs_sqrt_kl",
            "Proxy reward (on gold's scale) vs sqrt(KL)",
            &kl_label,
            "proxy",
            true,
            |r| &r.proxy_cal,
        ),
        ("gap", "Proxy − gold", "step", "gap", false, |r| &r.gap),
        (
            "agreement_before",
            "RM agreement with gold on current samples (before its update)",
            "step",
            "agreement",
            false,
            |r| &r.agree_before,
        ),
        (
            "agreement_after",
            "RM agreement with gold on current samples (after its update)",
            "step",
            "agreement",
            false,
            |r| &r.agree_after,
        ),
        ("length", "Response length", "step", "tokens", false, |r| {
            &r.length
        }),
    ];
    for (stem, title, xl, yl, against_kl, y) in charts {
        let series = cfg
            .methods
            .iter()
            .filter_map(|&m| {
                if against_kl {
                    method_series(m, runs, &kl_cells(y))
                } else {
                    method_series(m, runs, &step_cells(y))
                }
            })
            .collect();
        let chart = Chart {
            title: format!("{title} (mean, min-max over seeds)"),
            x_label: xl.into(),
            y_label: yl.into(),
            series,
        };
        out.extend(line_chart(&dir, stem, &chart)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gold_at_interpolates_the_first_crossing() {
        let r = RunCurve {
            method: RmMethod::Vanilla,
            seed: 0,
            sqrt_kl: vec![0.0, 0.2, 0.4, 0.3],
            gold: vec![0.0, 0.1, 0.5, 0.9],
            proxy_cal: vec![],
            gap: vec![],
            agree_before: vec![],
            agree_after: vec![],
            fusion_moved: vec![],
            phi_moved: vec![],
            length: vec![],
            oracle_pairs: vec![],
        };
        assert!((r.gold_at(0.3).unwrap() - 0.3).abs() < 1e-12);
        assert_eq!(r.gold_at(0.0), Some(0.0));
        assert_eq!(r.gold_at(0.5), None);
        // On the line gold = 0.1 + 2 sqrt(KL) the fit is exact.
        let line = RunCurve {
            sqrt_kl: vec![0.0, 0.1, 0.2, 0.4],
            gold: vec![0.1, 0.3, 0.5, 0.9],
            ..r.clone()
        };
        assert!((line.gold_fit_at(0.3).unwrap() - 0.7).abs() < 1e-12);
        let flat = RunCurve {
            sqrt_kl: vec![0.0, 0.0],
            ..line.clone()
        };
        assert_eq!(flat.gold_fit_at(0.3), None);
    }
}
