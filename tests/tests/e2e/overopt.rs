//! `r2m experiment overopt` at CI size (issue 7): the whole path on the real SmolLM2, every
//! method, one seed, two steps; interruption and resume; the report.

use std::sync::atomic::AtomicBool;

use r2m_experiments::overopt::{
    method_name, run_dir, run_experiment, ExperimentControl, GoldPair, OveroptConfig, ALL_METHODS,
};
use r2m_experiments::report::report;
use r2m_experiments::vader;
use r2m_rl::config::RmMethod;

use crate::common::*;

fn lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn overopt_reduced_runs_every_method_resumes_and_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let exp = tmp.path().join("exp");
    let cfg = OveroptConfig::reduced();
    assert_eq!(cfg.methods, ALL_METHODS.to_vec());

    // 1. Interrupted from the start: the first run stops after its first step, with a
    //    checkpoint, and nothing after it starts.
    let stop = AtomicBool::new(true);
    let ctl = ExperimentControl {
        interrupt: Some(&stop),
        ..Default::default()
    };
    let s = run_experiment::<AB>(&cfg, &exp, &device(), ctl).unwrap();
    assert!(s.interrupted && s.ran.is_empty());
    assert!(!exp.join("report.md").exists());
    let first = run_dir(&exp, RmMethod::Vanilla, 0);
    assert_eq!(lines(&first.join("metrics.jsonl")).len(), 1);
    // The policy trains its top blocks: the checkpoint holds those (blocks.bin), not the policy.
    assert!(first.join("checkpoints/step-000001/blocks.bin").exists());
    assert!(!run_dir(&exp, RmMethod::R2m, 0).exists());

    // The proxy RM's pairs: gold-labelled samples of the initial policy.
    let eval: Vec<GoldPair> = lines(&exp.join("rm-eval-pairs.jsonl"))
        .into_iter()
        .map(|v| serde_json::from_value(v).unwrap())
        .collect();
    assert_eq!(eval.len(), cfg.rm_eval_pairs);
    for p in &eval {
        assert!(!p.flipped);
        assert_eq!(vader::compound(&p.chosen), p.gold_chosen);
        assert_eq!(vader::compound(&p.rejected), p.gold_rejected);
        assert!(p.gold_chosen >= p.gold_rejected + cfg.min_gold_gap, "{p:?}");
    }
    assert_eq!(lines(&exp.join("rm-pairs.jsonl")).len(), cfg.rm_pairs);
    assert_eq!(
        lines(&exp.join("pretrain-pairs.jsonl")).len(),
        cfg.pretrain_pairs
    );
    assert!(exp.join("proxy-rm/config.json").exists());
    assert_eq!(s.proxy_rm.train_pairs, cfg.rm_pairs);
    assert!(s.proxy_rm.calibration.proxy_std > 0.0);

    let run_quietly = |c: &OveroptConfig| {
        let ctl = ExperimentControl::default();
        run_experiment::<AB>(c, &exp, &device(), ctl)
    };

    // 2. Continued: the interrupted run resumes, the rest run, the report is written.
    let s = run_quietly(&cfg).unwrap();
    assert!(!s.interrupted);
    assert_eq!(s.ran.len(), ALL_METHODS.len());
    for m in ALL_METHODS {
        let dir = run_dir(&exp, m, 0);
        assert!(dir.join("done.json").exists(), "{}", dir.display());
        assert!(
            !dir.join("checkpoints").exists(),
            "finished runs drop their checkpoints"
        );
        let rows = lines(&dir.join("metrics.jsonl"));
        assert_eq!(rows.len(), 2, "{}", dir.display());
        for (i, r) in rows.iter().enumerate() {
            assert_eq!(r["step"].as_u64(), Some(i as u64 + 1));
            let g = r["gold_mean"].as_f64().expect("gold_mean logged");
            assert!((-1.0..=1.0).contains(&g));
            assert!(r["proxy_cal_mean"].as_f64().unwrap().is_finite());
            assert!(r["gold_gap"].as_f64().unwrap().is_finite());
        }
        // Methods that train the RM report an R2M loss; the others none.
        // (The oracle's head trains every step here: `oracle_every = 1` at CI size.)
        let trains = matches!(
            m,
            RmMethod::R2m | RmMethod::R2mNoise | RmMethod::IterativeHead | RmMethod::Oracle
        );
        assert_eq!(rows[1]["rm_loss"].as_f64().is_some(), trains, "{m:?}");
        // The held-out curve: before the first step and after each (eval_every = 1), every
        // sample scored by gold and the fixed proxy, with its KL to the reference. The
        // interrupted run lost nothing and repeated nothing.
        let held = r2m_experiments::heldout::read_heldout(&dir.join("heldout.jsonl")).unwrap();
        let steps: Vec<usize> = held.iter().map(|h| h.step).collect();
        assert_eq!(steps, [0, 1, 2], "{m:?}");
        for h in &held {
            let n = cfg.eval_prompts * cfg.samples_per_prompt;
            assert_eq!((h.k, h.gold.len(), h.proxy.len(), h.kl.len()), (2, n, n, n));
            assert!(h.kl.iter().chain(&h.proxy).all(|x| x.is_finite()));
            // The responses are kept, so another gold can score them again.
            assert_eq!(h.responses.len(), n);
            assert!(
                h.responses.iter().any(|r| !r.is_empty()),
                "{:?}",
                h.responses
            );
        }
        assert!(
            held[0].kl.iter().all(|k| k.abs() < 1e-3),
            "the initial policy is the reference"
        );
    }
    assert!(run_dir(&exp, RmMethod::PretrainedRm, 0)
        .join("pretrained-rm/config.json")
        .exists());
    let rep = report(&exp, &cfg).expect("report");
    assert_eq!(rep.rows.len(), ALL_METHODS.len());
    assert_eq!(rep.runs.len(), ALL_METHODS.len());
    let md = std::fs::read_to_string(exp.join("report.md")).unwrap();
    for m in ALL_METHODS {
        assert!(md.contains(&format!("| {} |", method_name(m))), "{md}");
    }
    for stem in [
        "gold_vs_sqrt_kl",
        "proxy_vs_sqrt_kl",
        "gap",
        "agreement_before",
        "agreement_after",
        "length",
        "heldout_gold_vs_sqrt_kl",
        "heldout_gold_vs_sqrt_kl_main",
        "heldout_proxy_vs_sqrt_kl",
    ] {
        for ext in ["png", "svg"] {
            let p = exp.join("plots").join(format!("{stem}.{ext}"));
            assert!(
                std::fs::metadata(&p).unwrap().len() > 1000,
                "{}",
                p.display()
            );
        }
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(exp.join("report.json")).unwrap()).unwrap();
    assert_eq!(json["rows"].as_array().unwrap().len(), ALL_METHODS.len());
    // How far each RM head moved: R2M's fusion head and phi did, iterative-head's phi alone,
    // vanilla's nothing (no value).
    let row = |m: &str| {
        (json["rows"].as_array().unwrap().iter())
            .find(|r| r["method"] == m)
            .unwrap()
            .clone()
    };
    let moved = |m: &str, part: &str| row(m)[part]["mean"].as_f64();
    assert!(moved("r2m", "fusion_moved_final").unwrap() > 0.0, "{json}");
    assert!(moved("r2m", "phi_moved_final").unwrap() > 0.0, "{json}");
    assert_eq!(moved("iterative-head", "fusion_moved_final"), Some(0.0));
    assert!(moved("iterative-head", "phi_moved_final").unwrap() > 0.0);
    assert_eq!(moved("vanilla", "phi_moved_final"), None);
    // The verdict's fixed keys.
    assert!(json["vanilla_overoptimized"].is_boolean(), "{json}");
    let v = &json["methods"]["vanilla"];
    for key in ["gold_peak", "gold_final"] {
        // One seed: the t-interval is unbounded (null in JSON).
        assert!(
            v[key]["mean"].is_number() && v[key].get("ci95_low").is_some(),
            "{key}: {v}"
        );
    }
    assert_eq!(v["gold_at_matched_kl"].as_array().unwrap().len(), 3);
    assert!(
        json["paired_vs_vanilla"]["r2m"]["mean"].is_number(),
        "{json}"
    );
    let all = &json["paired_vs_vanilla_all"]["r2m"];
    assert!(all["gold_final"]["mean"].is_number(), "{json}");
    assert_eq!(all["gold_at_matched_kl"].as_array().unwrap().len(), 3);
    assert!(md.contains("vanilla_overoptimized"), "{md}");

    // 3. Again: everything is found finished; other settings in the same directory are refused.
    let s = run_quietly(&cfg).unwrap();
    assert!(s.ran.is_empty());
    assert_eq!(s.skipped.len(), ALL_METHODS.len());
    let other = OveroptConfig {
        steps: 3,
        ..cfg.clone()
    };
    let err = run_quietly(&other)
        .expect_err("other settings are refused")
        .to_string();
    assert!(err.contains("steps") && err.contains("--resume"), "{err}");
}

/// The command that runs fixture script `name` of `tests/fixtures/reward_cmd`.
fn gold_script(name: &str) -> String {
    let path = fixture_dir().join("reward_cmd").join(name);
    format!("sh '{}'", path.display())
}

#[test]
fn overopt_with_a_command_gold_measures_with_it_and_stops_when_it_fails() {
    // `length.sh` answers each request with its length: a gold no built-in one can give
    // (VADER is in [-1, 1]; a request line is dozens of characters).
    let tmp = tempfile::tempdir().unwrap();
    let exp = tmp.path().join("exp");
    let cfg = OveroptConfig {
        methods: vec![RmMethod::Vanilla],
        steps: 1,
        gold_command: Some(gold_script("length.sh")),
        ..OveroptConfig::reduced()
    };
    let s = run_experiment::<AB>(&cfg, &exp, &device(), ExperimentControl::default()).unwrap();
    assert_eq!(s.ran.len(), 1);
    // The proxy's pairs are labelled by the command ...
    for p in lines(&exp.join("rm-pairs.jsonl")) {
        let (mut c, mut r) = (
            p["gold_chosen"].as_f64().unwrap(),
            p["gold_rejected"].as_f64().unwrap(),
        );
        if p["flipped"].as_bool().unwrap() {
            // Label noise swapped this one.
            std::mem::swap(&mut c, &mut r);
        }
        assert!(c > 20.0 && r > 20.0 && c >= r + cfg.min_gold_gap, "{p}");
        assert_eq!(c.fract(), 0.0);
    }
    // ... and so are the training steps and the held-out evaluations.
    let dir = run_dir(&exp, RmMethod::Vanilla, 0);
    let m = lines(&dir.join("metrics.jsonl"));
    assert!(m[0]["gold_mean"].as_f64().unwrap() > 20.0, "{}", m[0]);
    let held = r2m_experiments::heldout::read_heldout(&dir.join("heldout.jsonl")).unwrap();
    assert_eq!(held.len(), 2);
    assert!(held
        .iter()
        .flat_map(|h| &h.gold)
        .all(|g| *g > 20.0 && g.fract() == 0.0));

    // A gold command that crashes stops the experiment with its name and its stderr.
    let cfg = OveroptConfig {
        gold_command: Some(gold_script("crash.sh")),
        ..cfg
    };
    let e = run_experiment::<AB>(
        &cfg,
        &tmp.path().join("crash"),
        &device(),
        ExperimentControl::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("crash.sh") && e.contains("cannot score this request"),
        "{e}"
    );
}
