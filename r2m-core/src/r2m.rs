//! R2M (arXiv 2601.22664), spec §2 and §3 step 7, each piece named as in the paper:
//!
//! - [`FusionHead`]: sequence-to-token cross-attention from the RM's reward token `H_last` to the
//!   policy's last-layer hidden states `h`, giving `H_hat`;
//! - [`time_step_weight`] `w(t)` and [`fuse`] `H_fin = (1 - w) H_hat + w H_last`;
//! - [`grebt_loss`]: the Group Reward Entropy Bradley-Terry loss that trains the fusion head and
//!   the scoring head after every RL step.

use burn::module::{Module, Param};
use burn::tensor::activation::{log_sigmoid, log_softmax, softmax};
use burn::tensor::{backend::Backend, Bool, Tensor, TensorData};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// The sequence-to-token cross-attention (spec §2.3): one head, no biases, no norm.
///
/// ```text
/// q = H_last W_q          W_q: D_rm x d
/// k = h W_k,  v = h W_v   W_k, W_v: D_p x d
/// H_hat = softmax(q k^T / sqrt(d)) v W_o      W_o: d x D_rm
/// ```
#[derive(Module, Debug)]
pub struct FusionHead<B: Backend> {
    /// `[D_rm, d]`
    pub w_q: Param<Tensor<B, 2>>,
    /// `[D_p, d]`
    pub w_k: Param<Tensor<B, 2>>,
    /// `[D_p, d]`
    pub w_v: Param<Tensor<B, 2>>,
    /// `[d, D_rm]`
    pub w_o: Param<Tensor<B, 2>>,
}

/// The default inner width: `min(2048, max(D_rm, D_p))`.
pub fn default_width(d_rm: usize, d_p: usize) -> usize {
    d_rm.max(d_p).min(2048)
}

fn xavier_uniform<B: Backend>(
    rows: usize,
    cols: usize,
    rng: &mut StdRng,
    dev: &B::Device,
) -> Param<Tensor<B, 2>> {
    let a = (6.0 / (rows + cols) as f64).sqrt() as f32;
    let v: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-a..a)).collect();
    Param::from_tensor(Tensor::from_data(TensorData::new(v, [rows, cols]), dev))
}

impl<B: Backend> FusionHead<B> {
    /// A fusion head with Xavier-uniform weights (seeded); with `zero_init_output`, `W_o = 0`,
    /// so that the head starts out returning `H_hat = 0`.
    pub fn new(
        d_rm: usize,
        d_p: usize,
        d: usize,
        zero_init_output: bool,
        seed: u64,
        dev: &B::Device,
    ) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let w_q = xavier_uniform(d_rm, d, &mut rng, dev);
        let w_k = xavier_uniform(d_p, d, &mut rng, dev);
        let w_v = xavier_uniform(d_p, d, &mut rng, dev);
        let w_o = if zero_init_output {
            Param::from_tensor(Tensor::zeros([d, d_rm], dev))
        } else {
            xavier_uniform(d, d_rm, &mut rng, dev)
        };
        Self { w_q, w_k, w_v, w_o }
    }

    /// The inner width d.
    pub fn width(&self) -> usize {
        self.w_q.dims()[1]
    }

    /// `H_hat` for each sequence.
    ///
    /// # Shapes
    /// - `h_last`: `[batch, D_rm]`, the RM's reward token embedding
    /// - `h`: `[batch, seq, D_p]`, the policy's last-layer hidden states
    /// - `valid`: `[batch, seq]`, `true` at real tokens (padding is masked out of the attention)
    /// - returns `[batch, D_rm]`
    pub fn forward(
        &self,
        h_last: Tensor<B, 2>,
        h: Tensor<B, 3>,
        valid: Tensor<B, 2, Bool>,
    ) -> Tensor<B, 2> {
        let [b, s, d_p] = h.dims();
        let d = self.width();
        let q = h_last.matmul(self.w_q.val()).reshape([b, 1, d]);
        let h2 = h.reshape([b * s, d_p]);
        let k = h2.clone().matmul(self.w_k.val()).reshape([b, s, d]);
        let v = h2.matmul(self.w_v.val()).reshape([b, s, d]);
        let scores = q
            .matmul(k.swap_dims(1, 2))
            .div_scalar((d as f32).sqrt())
            .mask_fill(valid.bool_not().reshape([b, 1, s]), f32::NEG_INFINITY);
        let attn = softmax(scores, 2);
        attn.matmul(v).reshape([b, d]).matmul(self.w_o.val())
    }
}

/// `w(t) = max(0.5 cos(pi t / T) + 0.5, Omega)` (spec §2.4): the weight of `H_last` in `H_fin`,
/// from 1 at t = 0 down to the floor `Omega`. `t` counts RL steps from 1; offline evaluation
/// uses `t = T` (so `w = Omega`).
pub fn time_step_weight(t: usize, total: usize, omega: f64) -> f64 {
    let total = total.max(1) as f64;
    (0.5 * (std::f64::consts::PI * t as f64 / total).cos() + 0.5).max(omega)
}

/// `H_fin = (1 - w) H_hat + w H_last`.
pub fn fuse<B: Backend>(h_hat: Tensor<B, 2>, h_last: Tensor<B, 2>, w: f64) -> Tensor<B, 2> {
    h_hat.mul_scalar(1.0 - w) + h_last.mul_scalar(w)
}

/// The parts of the GREBT loss, as host numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct GrebtParts {
    /// Mean BT term over the groups that have a pseudo pair.
    pub bt: f64,
    /// Mean Group Reward Entropy over all groups.
    pub gre: f64,
    /// Groups with a pseudo pair.
    pub pairs: usize,
}

/// The pseudo pair of a group from the rewards that ranked it: `(argmax, argmin)`, or `None` when
/// every reward is equal (spec §3 step 7: the BT term is skipped for that group).
pub fn pseudo_pair(rewards: &[f32]) -> Option<(usize, usize)> {
    let (mut hi, mut lo) = (0, 0);
    for (j, &r) in rewards.iter().enumerate() {
        if r > rewards[hi] {
            hi = j;
        }
        if r < rewards[lo] {
            lo = j;
        }
    }
    (rewards[hi] > rewards[lo]).then_some((hi, lo))
}

/// Group Reward Entropy of each group: standardise within the group with the **population**
/// std, `z = (r - mean) / (std + 1e-6)`, `p = softmax(z)`, `-sum p log p`.
///
/// `std` is computed as `sqrt(var + 1e-12)` so that its gradient stays finite when all rewards
/// are equal (the value changes by less than 1e-6 there).
///
/// # Shapes
/// - `rewards`: `[groups, K]` -> `[groups]`
pub fn group_reward_entropy<B: Backend>(rewards: Tensor<B, 2>) -> Tensor<B, 1> {
    let mean = rewards.clone().mean_dim(1);
    let centred = rewards - mean;
    let var = centred.clone().square().mean_dim(1);
    let std = var.add_scalar(1e-12).sqrt();
    let z = centred / std.add_scalar(1e-6);
    let log_p = log_softmax(z, 1);
    (log_p.clone().exp() * log_p)
        .sum_dim(1)
        .squeeze_dim::<1>(1)
        .neg()
}

/// The GREBT loss (spec §3 step 7):
/// `L = mean_i [ (1 - alpha) L_BT(i) + alpha L_GRE(i) ]`, with
/// `L_BT(i) = -log sigmoid(r_w - r_l)` on the pseudo pair `pairs[i]` (omitted when `None`).
///
/// # Shapes
/// - `rewards`: `[groups, K]`, the re-scored rewards (with gradient)
/// - returns the loss `[1]` and its parts
pub fn grebt_loss<B: Backend>(
    rewards: Tensor<B, 2>,
    pairs: &[Option<(usize, usize)>],
    alpha: f64,
) -> (Tensor<B, 1>, GrebtParts) {
    let [g, k] = rewards.dims();
    assert_eq!(pairs.len(), g, "one pseudo pair (or None) per group");
    let dev = rewards.device();
    let gre = group_reward_entropy(rewards.clone());
    // One-hot selectors of winners and losers; groups without a pair select nothing.
    let (mut win, mut lose, mut has) = (vec![0f32; g * k], vec![0f32; g * k], vec![0f32; g]);
    for (i, p) in pairs.iter().enumerate() {
        if let Some((w, l)) = *p {
            win[i * k + w] = 1.0;
            lose[i * k + l] = 1.0;
            has[i] = 1.0;
        }
    }
    let n_pairs = has.iter().filter(|&&x| x > 0.0).count();
    let sel = |v: Vec<f32>| Tensor::<B, 2>::from_data(TensorData::new(v, [g, k]), &dev);
    let margin = (rewards.clone() * sel(win)).sum_dim(1) - (rewards * sel(lose)).sum_dim(1);
    let has = Tensor::<B, 1>::from_data(TensorData::new(has, [g]), &dev);
    let bt = log_sigmoid(margin.squeeze_dim::<1>(1)).neg() * has;
    let loss = (bt.clone().mul_scalar(1.0 - alpha) + gre.clone().mul_scalar(alpha))
        .sum()
        .div_scalar(g as f32);
    let host = |t: Tensor<B, 1>| -> f64 {
        t.into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .expect("f32")
            .iter()
            .map(|&x| x as f64)
            .sum()
    };
    let parts = GrebtParts {
        bt: host(bt) / n_pairs.max(1) as f64,
        gre: host(gre) / g as f64,
        pairs: n_pairs,
    };
    (loss, parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{TestAutodiff as AB, TestBackend as B};

    fn t2<Bk: Backend>(v: &[f32], shape: [usize; 2]) -> Tensor<Bk, 2> {
        Tensor::from_data(TensorData::new(v.to_vec(), shape), &Default::default())
    }

    fn host<Bk: Backend, const D: usize>(t: Tensor<Bk, D>) -> Vec<f32> {
        t.into_data().convert::<f32>().to_vec().unwrap()
    }

    #[test]
    fn time_step_weight_by_hand() {
        // T = 100, Omega = 0.7: 0.5 cos(pi t / 100) + 0.5, floored at 0.7.
        let w = |t| time_step_weight(t, 100, 0.7);
        assert!((w(1) - 0.999_753_29).abs() < 1e-8, "{}", w(1));
        assert!((w(10) - 0.975_528_26).abs() < 1e-8, "{}", w(10));
        assert!((w(25) - 0.853_553_39).abs() < 1e-8, "{}", w(25));
        // t = 37: 0.5 cos(0.37 pi) + 0.5 = 0.694... < 0.7, so the floor.
        assert_eq!(w(37), 0.7);
        assert_eq!(w(100), 0.7);
    }

    #[test]
    fn fusion_head_on_a_two_token_example() {
        // D_rm = D_p = d = 2, identity W_q, W_k, W_v, W_o.
        let dev = Default::default();
        let eye = || Param::from_tensor(t2::<B>(&[1.0, 0.0, 0.0, 1.0], [2, 2]));
        let head = FusionHead::<B> {
            w_q: eye(),
            w_k: eye(),
            w_v: eye(),
            w_o: eye(),
        };
        let h_last = t2::<B>(&[1.0, 0.0], [1, 2]);
        let h = Tensor::<B, 3>::from_data(
            TensorData::new(vec![1.0f32, 0.0, 0.0, 1.0], [1, 2, 2]),
            &dev,
        );
        let valid =
            Tensor::<B, 2, Bool>::from_data(TensorData::new(vec![true, true], [1, 2]), &dev);
        let out = host(head.forward(h_last, h, valid));
        // scores = [1, 0] / sqrt(2); softmax -> a = [s, 1 - s], s = 1 / (1 + e^{-1/sqrt 2}).
        let s = 1.0 / (1.0 + (-1.0f32 / 2f32.sqrt()).exp());
        assert!(
            (out[0] - s).abs() < 1e-6 && (out[1] - (1.0 - s)).abs() < 1e-6,
            "{out:?}"
        );
    }

    #[test]
    fn padding_positions_do_not_change_the_output() {
        let dev = Default::default();
        let head = FusionHead::<B>::new(6, 4, 5, false, 3, &dev);
        let h_last = t2::<B>(&[0.3, -0.2, 0.5, 0.1, 0.0, 1.0], [1, 6]);
        let real: Vec<f32> = (0..12).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut padded = real.clone();
        padded.extend([9.0f32, -7.0, 100.0, 3.0]);
        let h1 = Tensor::<B, 3>::from_data(TensorData::new(real, [1, 3, 4]), &dev);
        let h2 = Tensor::<B, 3>::from_data(TensorData::new(padded, [1, 4, 4]), &dev);
        let v1 = Tensor::<B, 2, Bool>::from_data(TensorData::new(vec![true; 3], [1, 3]), &dev);
        let v2 = Tensor::<B, 2, Bool>::from_data(
            TensorData::new(vec![true, true, true, false], [1, 4]),
            &dev,
        );
        let a = host(head.forward(h_last.clone(), h1, v1));
        let b = host(head.forward(h_last, h2, v2));
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-6, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn zero_output_weights_give_back_the_vanilla_embedding() {
        let dev = Default::default();
        let head = FusionHead::<B>::new(6, 4, 5, true, 0, &dev);
        let h_last = t2::<B>(&[0.3, -0.2, 0.5, 0.1, 0.0, 1.0], [1, 6]);
        let h = Tensor::<B, 3>::random([1, 3, 4], burn::tensor::Distribution::Default, &dev);
        let valid = Tensor::<B, 2, Bool>::from_data(TensorData::new(vec![true; 3], [1, 3]), &dev);
        let h_hat = head.forward(h_last.clone(), h, valid);
        let h_fin = fuse(h_hat, h_last.clone(), 0.7);
        // H_fin = 0.7 H_last exactly: the reward is phi(0.7 H_last), and w = 1 returns H_last.
        let want: Vec<f32> = host(h_last.clone()).iter().map(|x| x * 0.7).collect();
        assert_eq!(host(h_fin), want);
    }

    #[test]
    fn gre_of_equal_rewards_is_ln_k_with_zero_gradient() {
        let r = Tensor::<AB, 2>::from_data(
            TensorData::new(vec![0.4f32; 8], [1, 8]),
            &Default::default(),
        )
        .require_grad();
        let gre = group_reward_entropy(r.clone());
        let v: f32 = gre.clone().sum().into_scalar();
        assert!((v - 8f32.ln()).abs() < 1e-6, "{v}");
        let g = gre.sum().backward();
        let grad = host(r.grad(&g).unwrap());
        assert!(
            grad.iter().all(|x| x.abs() < 1e-6 && x.is_finite()),
            "{grad:?}"
        );
    }

    #[test]
    fn gre_minimum_is_one_high_outlier_at_about_1_061_nats() {
        let gre = |v: &[f32]| -> f32 { group_reward_entropy(t2::<B>(v, [1, 8])).into_scalar() };
        let outlier = gre(&[5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        assert!((outlier - 1.061).abs() < 1e-3, "{outlier}");
        // Scale and shift do not matter after standardisation.
        assert!((gre(&[-3.0, -4.0, -4.0, -4.0, -4.0, -4.0, -4.0, -4.0]) - outlier).abs() < 1e-4);
        // Other shapes have more entropy: two high, one low outlier, spread.
        for v in [
            [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
            [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0],
        ] {
            assert!(gre(&v) > outlier + 0.05, "{v:?}: {}", gre(&v));
        }
    }

    #[test]
    fn bt_term_on_a_known_pair_and_the_alpha_mix() {
        // One group [2, 1, 1.5]: pair (0, 1), BT = -log sigmoid(1) = ln(1 + e^-1).
        let r = t2::<B>(&[2.0, 1.0, 1.5], [1, 3]);
        let pair = pseudo_pair(&[2.0, 1.0, 1.5]);
        assert_eq!(pair, Some((0, 1)));
        let bt = (1.0 + (-1.0f64).exp()).ln();
        let (loss, parts) = grebt_loss(r.clone(), &[pair], 0.0);
        assert!((parts.bt - bt).abs() < 1e-6 && parts.pairs == 1);
        assert!((loss.into_scalar() as f64 - bt).abs() < 1e-6);
        let gre: f32 = group_reward_entropy(r.clone()).into_scalar();
        let (loss, _) = grebt_loss(r.clone(), &[pair], 0.3);
        let want = 0.7 * bt + 0.3 * gre as f64;
        assert!((loss.into_scalar() as f64 - want).abs() < 1e-6);
        // A group of equal rewards has no pair: only its GRE term counts.
        assert_eq!(pseudo_pair(&[1.0, 1.0]), None);
        let (loss, parts) = grebt_loss(t2::<B>(&[1.0, 1.0], [1, 2]), &[None], 0.3);
        assert!((loss.into_scalar() as f64 - 0.3 * 2f64.ln()).abs() < 1e-6);
        assert_eq!(parts.pairs, 0);
    }
}
