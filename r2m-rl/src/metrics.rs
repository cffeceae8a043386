//! What one RL step reports: [`StepMetrics`], one line of `metrics.jsonl`.

use r2m_models::generate::FinishReason;
use serde::{Deserialize, Serialize};

use crate::experience::Experience;
use crate::reward::Diagnostics;

/// Sums over one policy update (see [`StepMetrics`] for the per-step means).
#[derive(Debug, Default, Clone)]
pub struct UpdateStats {
    pub clipped: f64,
    pub tokens: f64,
    pub first_tokens: f64,
    pub entropy: f64,
    pub kl_loss: f64,
    pub policy_loss: f64,
    pub value_loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
    pub optimizer_steps: usize,
    /// Cells of the training passes' token grids, and how many of them are padding.
    pub grid_cells: f64,
    pub padding_cells: f64,
}

/// Seconds spent in each stage of a step.
#[derive(Debug, Default, Clone, Copy)]
pub struct StepTimes {
    pub generate: f64,
    pub logprobs: f64,
    pub reward: f64,
    pub update: f64,
    pub rm_update: f64,
    pub step: f64,
}

/// Metrics of one RL step (one line of `metrics.jsonl`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: usize,
    /// Mean and std of the reward the advantages used (after the missing-EOS penalty).
    pub reward_mean: f64,
    pub reward_std: f64,
    /// Mean of the reward function's raw score.
    pub score_mean: f64,
    /// Mean over sequences of `sum_t (log pi_old - log pi_ref)`: the sequence KL to the reference.
    pub kl: f64,
    /// beta used this step.
    pub kl_coef: f64,
    /// Mean per-token KL estimate in the loss (first epoch).
    pub kl_loss: f64,
    /// Mean per-token entropy of the policy (first epoch).
    pub entropy: f64,
    /// Share of tokens whose loss the ratio clip changed (all epochs).
    pub clip_frac: f64,
    pub policy_loss: f64,
    pub value_loss: Option<f64>,
    pub response_len: f64,
    /// Share of responses that ended with EOS.
    pub eos_frac: f64,
    /// Mean pre-clip gradient norm over the step's optimizer steps.
    pub grad_norm: f64,
    pub lr: f64,
    /// Share of padding in the token grids the training passes ran over.
    #[serde(default)]
    pub pad_share: f64,
    pub time_generate: f64,
    pub time_logprobs: f64,
    pub time_reward: f64,
    pub time_update: f64,
    /// The reward model's own update after the policy update (R2M).
    pub time_rm_update: f64,
    pub time_step: f64,
    pub samples: usize,
    /// What the reward reported (R2M: `r2m_w`, `rm_loss`, `rm_bt`, `rm_gre`, `rm_grad_norm`; an
    /// experiment: its gold measurements), flattened into the line.
    #[serde(flatten)]
    pub diagnostics: Diagnostics,
}

/// Mean over sequences of the summed per-token `log pi_old - log pi_ref`.
pub fn sequence_kl<B: burn::tensor::backend::Backend>(exp: &Experience<B>) -> f64 {
    let n = exp.rows().max(1) as f64;
    exp.old_logprobs
        .iter()
        .zip(&exp.ref_logprobs)
        .map(|(o, r)| o.iter().zip(r).map(|(a, b)| (a - b) as f64).sum::<f64>())
        .sum::<f64>()
        / n
}

impl StepMetrics {
    /// The metrics of step `step` from its experience, the update's sums and the reward's
    /// diagnostics. `epochs` and `critic` are the update's settings; `kl_coef` the beta it used.
    #[allow(clippy::too_many_arguments)]
    pub fn new<B: burn::tensor::backend::Backend>(
        step: usize,
        exp: &Experience<B>,
        st: &UpdateStats,
        epochs: usize,
        critic: bool,
        kl_coef: f64,
        times: StepTimes,
        diagnostics: Diagnostics,
    ) -> Self {
        let n = exp.rows().max(1) as f64;
        let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64;
        let reward_mean = mean(&exp.rewards);
        let reward_var = exp
            .rewards
            .iter()
            .map(|&r| (r as f64 - reward_mean).powi(2))
            .sum::<f64>()
            / n;
        let per_mb = (st.optimizer_steps as f64 / epochs as f64).max(1.0);
        let lens = (0..exp.rows()).map(|r| exp.response_len(r) as f64);
        let eos = exp
            .responses
            .iter()
            .filter(|g| g.finish == FinishReason::Eos);
        Self {
            step,
            reward_mean,
            reward_std: reward_var.sqrt(),
            score_mean: mean(&exp.scores),
            kl: sequence_kl(exp),
            kl_coef,
            kl_loss: st.kl_loss / st.first_tokens.max(1.0),
            entropy: st.entropy / st.first_tokens.max(1.0),
            clip_frac: st.clipped / st.tokens.max(1.0),
            policy_loss: st.policy_loss / per_mb,
            value_loss: critic.then(|| st.value_loss / per_mb),
            response_len: lens.sum::<f64>() / n,
            eos_frac: eos.count() as f64 / n,
            grad_norm: st.grad_norm / st.optimizer_steps.max(1) as f64,
            lr: st.lr,
            pad_share: st.padding_cells / st.grid_cells.max(1.0),
            time_generate: times.generate,
            time_logprobs: times.logprobs,
            time_reward: times.reward,
            time_update: times.update,
            time_rm_update: times.rm_update,
            time_step: times.step,
            samples: exp.rows(),
            diagnostics,
        }
    }
}
