//! Advantage estimators (spec §3 step 5), computed on the host.
//!
//! Rollouts are laid out group by group: row `i * k + j` is sample `j` of prompt `i`. Outcome
//! estimators (RLOO, GRPO, ReMax) give one advantage per sequence, which every response token
//! shares; REINFORCE++ and GAE work on per-token rewards ([`token_rewards`]).

use serde::{Deserialize, Serialize};

/// Which advantage estimator the RL loop uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdvantageKind {
    /// REINFORCE leave-one-out: `A_ij = r_ij - mean_{j' != j} r_ij'`.
    Rloo,
    /// Group-relative: `(r_ij - mean_i) / (std_i + eps)` (sample std), or without the division.
    Grpo,
    /// REINFORCE++: KL folded into per-token rewards, returns-to-go, whitened over the batch.
    #[serde(rename = "reinforce++")]
    ReinforcePp,
    /// ReMax: the reward of the greedy response to the same prompt is the baseline.
    Remax,
    /// PPO with a value head and generalised advantage estimation.
    Gae,
}

impl AdvantageKind {
    /// Whether the estimator needs a critic (value head).
    pub fn needs_critic(self) -> bool {
        self == Self::Gae
    }
}

fn check_groups(n: usize, k: usize) {
    assert!(
        k > 0 && n.is_multiple_of(k),
        "{n} rewards are not groups of {k}"
    );
}

/// RLOO advantages; groups of `k >= 2`.
pub fn rloo(rewards: &[f32], k: usize) -> Vec<f32> {
    check_groups(rewards.len(), k);
    assert!(k >= 2, "RLOO needs at least 2 samples per prompt");
    rewards
        .chunks(k)
        .flat_map(|g| {
            let sum: f64 = g.iter().map(|&r| r as f64).sum();
            g.iter()
                .map(move |&r| (r as f64 - (sum - r as f64) / (k - 1) as f64) as f32)
        })
        .collect()
}

/// GRPO advantages: centred by the group mean and, with `scale_by_std`, divided by the group's
/// sample standard deviation (as `torch.std`) plus `eps`. A group of one gets 0.
pub fn grpo(rewards: &[f32], k: usize, scale_by_std: bool, eps: f32) -> Vec<f32> {
    check_groups(rewards.len(), k);
    rewards
        .chunks(k)
        .flat_map(|g| {
            let n = g.len() as f64;
            let mean = g.iter().map(|&r| r as f64).sum::<f64>() / n;
            let var = if g.len() > 1 {
                g.iter().map(|&r| (r as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0)
            } else {
                0.0
            };
            let denom = if scale_by_std {
                var.sqrt() + eps as f64
            } else {
                1.0
            };
            g.iter().map(move |&r| ((r as f64 - mean) / denom) as f32)
        })
        .collect()
}

/// ReMax advantages: `r_ij - b_i`, with `b_i` the reward of prompt `i`'s greedy response.
pub fn remax(rewards: &[f32], k: usize, greedy_rewards: &[f32]) -> Vec<f32> {
    check_groups(rewards.len(), k);
    assert_eq!(
        rewards.len() / k,
        greedy_rewards.len(),
        "one baseline per prompt"
    );
    rewards
        .chunks(k)
        .zip(greedy_rewards)
        .flat_map(|(g, &b)| g.iter().map(move |&r| r - b))
        .collect()
}

/// Per-token rewards of one response: `-kl_coef * kl_t` at each token, plus the sequence reward
/// at the last token.
pub fn token_rewards(reward: f32, kl: &[f32], kl_coef: f32) -> Vec<f32> {
    let mut out: Vec<f32> = kl.iter().map(|&k| -kl_coef * k).collect();
    if let Some(last) = out.last_mut() {
        *last += reward;
    }
    out
}

/// Discounted returns-to-go `G_t = r_t + gamma * G_{t+1}` of each response.
pub fn returns_to_go(token_rewards: &[Vec<f32>], gamma: f32) -> Vec<Vec<f32>> {
    token_rewards
        .iter()
        .map(|r| {
            let mut g = vec![0f32; r.len()];
            let mut acc = 0f32;
            for t in (0..r.len()).rev() {
                acc = r[t] + gamma * acc;
                g[t] = acc;
            }
            g
        })
        .collect()
}

/// REINFORCE++ advantages: returns-to-go (gamma 1) of the per-token rewards, whitened over every
/// token of the batch.
pub fn reinforce_pp(token_rewards: &[Vec<f32>]) -> Vec<Vec<f32>> {
    let mut adv = returns_to_go(token_rewards, 1.0);
    whiten(&mut adv, true);
    adv
}

/// Generalised advantage estimation for each response.
///
/// `values[t]` estimates the return from token `t` on (the state before the token); the state
/// after the last token is terminal (value 0). Returns `(advantages, returns)` with
/// `returns = advantages + values`, the value head's regression target.
pub fn gae(
    token_rewards: &[Vec<f32>],
    values: &[Vec<f32>],
    gamma: f32,
    lambda: f32,
) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    assert_eq!(token_rewards.len(), values.len());
    let mut advs = Vec::with_capacity(values.len());
    let mut rets = Vec::with_capacity(values.len());
    for (r, v) in token_rewards.iter().zip(values) {
        assert_eq!(r.len(), v.len(), "one value per token");
        let n = r.len();
        let mut adv = vec![0f32; n];
        let mut last = 0f32;
        for t in (0..n).rev() {
            let next_v = if t + 1 < n { v[t + 1] } else { 0.0 };
            let delta = r[t] + gamma * next_v - v[t];
            last = delta + gamma * lambda * last;
            adv[t] = last;
        }
        rets.push(adv.iter().zip(v).map(|(a, v)| a + v).collect());
        advs.push(adv);
    }
    (advs, rets)
}

/// Whiten values over every token of the batch: divide by the (sample) standard deviation and,
/// with `shift_mean`, subtract the mean.
pub fn whiten(values: &mut [Vec<f32>], shift_mean: bool) {
    let n: usize = values.iter().map(Vec::len).sum();
    if n < 2 {
        return;
    }
    let mean = values.iter().flatten().map(|&x| x as f64).sum::<f64>() / n as f64;
    let var = values
        .iter()
        .flatten()
        .map(|&x| (x as f64 - mean).powi(2))
        .sum::<f64>()
        / (n - 1) as f64;
    let inv = 1.0 / (var.sqrt() + 1e-8);
    for x in values.iter_mut().flatten() {
        let centred = *x as f64 - mean;
        *x = if shift_mean {
            (centred * inv) as f32
        } else {
            ((centred * inv) + mean) as f32
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < tol, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn rloo_by_hand() {
        // Group 1: [1, 2, 3]: 1 - 2.5, 2 - 2, 3 - 1.5. Group 2: [0, 4, 4]: 0 - 4, 4 - 2, 4 - 2.
        let a = rloo(&[1.0, 2.0, 3.0, 0.0, 4.0, 4.0], 3);
        close(&a, &[-1.5, 0.0, 1.5, -4.0, 2.0, 2.0], 1e-6);
        // RLOO's advantages sum to zero in each group.
        assert!(a[..3].iter().sum::<f32>().abs() < 1e-6);
    }

    #[test]
    fn grpo_by_hand() {
        // [1, 2, 3]: mean 2, sample std 1.
        close(
            &grpo(&[1.0, 2.0, 3.0], 3, true, 0.0),
            &[-1.0, 0.0, 1.0],
            1e-6,
        );
        // [0, 0, 4, 4]: mean 2, sample std sqrt(16/3) = 2.3094.
        let s = (16.0f32 / 3.0).sqrt();
        close(
            &grpo(&[0.0, 0.0, 4.0, 4.0], 4, true, 0.0),
            &[-2.0 / s, -2.0 / s, 2.0 / s, 2.0 / s],
            1e-6,
        );
        close(
            &grpo(&[0.0, 0.0, 4.0, 4.0], 4, false, 0.0),
            &[-2.0, -2.0, 2.0, 2.0],
            1e-6,
        );
        // Equal rewards: zero advantage, not NaN.
        close(&grpo(&[5.0, 5.0], 2, true, 1e-6), &[0.0, 0.0], 1e-6);
    }

    #[test]
    fn remax_subtracts_the_greedy_reward() {
        close(
            &remax(&[1.0, 3.0, 0.0, 2.0], 2, &[2.0, -1.0]),
            &[-1.0, 1.0, 1.0, 3.0],
            1e-6,
        );
    }

    #[test]
    fn token_rewards_and_returns_by_hand() {
        let r = token_rewards(2.0, &[0.5, -1.0, 1.0], 0.1);
        close(&r, &[-0.05, 0.1, 1.9], 1e-6);
        let g = returns_to_go(std::slice::from_ref(&r), 1.0);
        close(&g[0], &[1.95, 2.0, 1.9], 1e-6);
        let g = returns_to_go(&[r], 0.5);
        // 1.9; 0.1 + 0.95 = 1.05; -0.05 + 0.525 = 0.475
        close(&g[0], &[0.475, 1.05, 1.9], 1e-6);
    }

    #[test]
    fn reinforce_pp_whitens_returns() {
        let a = reinforce_pp(&[vec![0.0, 1.0], vec![0.0, 0.0, 3.0]]);
        let flat: Vec<f32> = a.iter().flatten().copied().collect();
        // Returns [1, 1] and [3, 3, 3]: mean 2.2, sample std sqrt(1.2).
        let s = 1.2f32.sqrt();
        close(
            &flat,
            &[-1.2 / s, -1.2 / s, 0.8 / s, 0.8 / s, 0.8 / s],
            1e-5,
        );
    }

    #[test]
    fn gae_by_hand() {
        // r = [0, 1], V = [0.5, 0.2], gamma 0.9, lambda 0.8.
        // delta_1 = 1 - 0.2 = 0.8 (terminal); A_1 = 0.8.
        // delta_0 = 0 + 0.9 * 0.2 - 0.5 = -0.32; A_0 = -0.32 + 0.72 * 0.8 = 0.256.
        let (a, ret) = gae(&[vec![0.0, 1.0]], &[vec![0.5, 0.2]], 0.9, 0.8);
        close(&a[0], &[0.256, 0.8], 1e-6);
        close(&ret[0], &[0.756, 1.0], 1e-6);
        // lambda = 1, gamma = 1: advantages are returns-to-go minus values.
        let (a, _) = gae(&[vec![1.0, 2.0, 3.0]], &[vec![1.0, 1.0, 1.0]], 1.0, 1.0);
        close(&a[0], &[5.0, 4.0, 2.0], 1e-6);
        // lambda = 0: one-step TD errors.
        let (a, _) = gae(&[vec![1.0, 2.0, 3.0]], &[vec![1.0, 1.0, 1.0]], 1.0, 0.0);
        close(&a[0], &[1.0, 2.0, 2.0], 1e-6);
    }

    #[test]
    fn whiten_gives_zero_mean_unit_std() {
        let mut v = vec![vec![1.0, 2.0], vec![3.0, 4.0, 10.0]];
        whiten(&mut v, true);
        let flat: Vec<f64> = v.iter().flatten().map(|&x| x as f64).collect();
        let mean = flat.iter().sum::<f64>() / 5.0;
        let var = flat.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 4.0;
        assert!(
            mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-5,
            "{mean} {var}"
        );
    }
}
