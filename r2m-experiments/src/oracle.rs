//! The `oracle` method of the over-optimization experiment: how much could any adaptation of
//! the reward model gain? Every `every` steps, the proxy's head `phi` continues training with
//! Bradley-Terry on pairs of the current policy's samples labelled by the gold reward: every
//! pair of a prompt's K samples whose gold scores differ by at least `min_gap`
//! ([`r2m_rl::R2mReward::update_on_pairs`]). Between those steps it is the frozen proxy, as
//! vanilla.

use std::path::Path;

use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;
use r2m_core::Result;
use r2m_rl::{Diagnostics, Experience, R2mReward, RolloutReward, Scored};

use crate::gold::{gold_scores, Gold};

type Inner<B> = <B as AutodiffBackend>::InnerBackend;

/// The proxy with a gold-labelled head update every `every` steps.
pub struct OracleReward<B: AutodiffBackend> {
    /// An [`R2mReward`] with `r2m.method = "oracle"` (no feedback; `phi` trains on given pairs).
    pub inner: R2mReward<B>,
    pub gold: Gold,
    pub every: usize,
    pub min_gap: f64,
    /// Full-batch AdamW steps on each update's pairs.
    pub epochs: usize,
}

/// The `(chosen, rejected)` rows of every pair within each group of `k` rows whose gold differs
/// by at least `min_gap`.
pub fn gold_pairs(k: usize, gold: &[f64], min_gap: f64) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for g in 0..gold.len() / k.max(1) {
        for i in g * k..(g + 1) * k {
            for j in i + 1..(g + 1) * k {
                let d = gold[i] - gold[j];
                if d.abs() >= min_gap {
                    out.push(if d > 0.0 { (i, j) } else { (j, i) });
                }
            }
        }
    }
    out
}

impl<B: AutodiffBackend> RolloutReward<Inner<B>> for OracleReward<B> {
    fn name(&self) -> String {
        format!(
            "{} (oracle: gold-labelled pairs every {} steps)",
            self.inner.name(),
            self.every
        )
    }

    fn wants_hidden(&self) -> bool {
        false
    }

    fn score_experience(
        &mut self,
        exp: &Experience<Inner<B>>,
        t: usize,
        total: usize,
    ) -> Result<Scored<Inner<B>>> {
        self.inner.score_experience(exp, t, total)
    }

    fn update(
        &mut self,
        exp: &Experience<Inner<B>>,
        refreshed_hidden: Option<&Tensor<Inner<B>, 3>>,
        t: usize,
        total: usize,
    ) -> Result<Diagnostics> {
        let mut d = self.inner.update(exp, refreshed_hidden, t, total)?;
        if self.every > 0 && t.is_multiple_of(self.every) {
            let gold = gold_scores(exp, &mut self.gold)?;
            let pairs = gold_pairs(exp.k, &gold, self.min_gap);
            d.extend(
                self.inner
                    .update_on_pairs(exp, &pairs, self.epochs, t, total)?,
            );
        }
        Ok(d)
    }

    fn save_state(&self, dir: &Path) -> Result<()> {
        self.inner.save_state(dir)
    }

    fn load_state(&mut self, dir: &Path) -> Result<()> {
        RolloutReward::load_state(&mut self.inner, dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gold_pairs_are_the_clear_pairs_within_each_group() {
        // Two groups of 3; in the first, rows 0 and 2 tie within the gap.
        let gold = [0.5, -1.0, 0.55, 2.0, 0.0, 1.0];
        let pairs = gold_pairs(3, &gold, 0.2);
        assert_eq!(pairs, [(0, 1), (2, 1), (3, 4), (3, 5), (5, 4)]);
        assert!(gold_pairs(3, &gold, 10.0).is_empty());
    }
}
