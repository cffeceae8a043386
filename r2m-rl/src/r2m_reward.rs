//! The R2M reward in the RL loop (spec §2-§4), and the paper's controls.
//!
//! Per RL step t:
//! 1. scoring ([`RolloutReward::score_experience`]): the frozen RM body gives `H_last` of each sequence,
//!    which goes into the experience; the policy's hidden states `h` come from the old-policy
//!    pass; `r = phi(H_fin)`, `H_fin = (1 - w(t)) H_hat + w(t) H_last`, `H_hat` from the fusion
//!    head;
//! 2. after the policy update ([`RolloutReward::update`]): with `h'` from the final epoch's
//!    forward passes and `H_last` from the experience, the GREBT loss on each group's pseudo pair
//!    (ranked by step 1's rewards, the experience's scores) trains the fusion head and `phi`
//!    (AdamW, state kept across steps). Gradients never reach the policy: `h` and `h'` enter as
//!    constants. Nothing is kept between the two calls.

use burn::module::{AutodiffModule, Module, Param};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{GradientsParams, Optimizer};
use burn::record::{BinFileRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Bool, ElementConversion, Int, Tensor, TensorData};
use r2m_core::optim::clip_grad_norm;
use r2m_core::r2m::{default_width, fuse, grebt_loss, pseudo_pair, time_step_weight, FusionHead};
use r2m_core::{Observer, R2mError, Result};
use r2m_models::model::Linear;
use r2m_models::CausalLm;
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::Serialize;

use crate::config::{R2mConfig, RmMethod};
use crate::experience::Experience;
use crate::optim::{adamw, AdamW};
use crate::reward::{Diagnostics, LearnedRm, RolloutReward, Scored};
use crate::reward_training::{int_tensor, pad_tokens};

type Inner<B> = <B as AutodiffBackend>::InnerBackend;

/// Policy feedback for the fusion head: `h` `[rows, seq, D_p]` and its mask of real positions.
pub type Feedback<B> = (Tensor<B, 3>, Tensor<B, 2, Bool>);

/// The trainable part of the R2M reward model: the fusion head and the scoring head `phi`.
#[derive(Module, Debug)]
pub struct R2mHead<B: Backend> {
    pub fusion: FusionHead<B>,
    /// `phi`, initialised from the RM's head.
    pub score: Linear<B>,
}

impl<B: Backend> R2mHead<B> {
    /// `r = phi(H_fin)`, or `phi(H_last)` without feedback.
    ///
    /// # Shapes
    /// - `h_last`: `[batch, D_rm]`; `feedback`: `h` `[batch, seq, D_p]` and its mask `[batch, seq]`
    /// - returns `[batch]`
    pub fn reward(
        &self,
        h_last: Tensor<B, 2>,
        feedback: Option<(Tensor<B, 3>, Tensor<B, 2, Bool>)>,
        w: f64,
    ) -> Tensor<B, 1> {
        let h_fin = match feedback {
            Some((h, valid)) => fuse(self.fusion.forward(h_last.clone(), h, valid), h_last, w),
            None => h_last,
        };
        self.score.forward(h_fin).squeeze_dim::<1>(1)
    }

    /// How far each trained part has moved from `initial`, relative to where it started:
    /// `||theta - theta_0|| / ||theta_0||` over the fusion head's four matrices together, and
    /// over `phi` (weight and bias). The diagnostic of an RM that barely learns, or runs away.
    pub fn moved_from(&self, initial: &R2mHead<B>) -> (f64, f64) {
        let f = (&self.fusion, &initial.fusion);
        let fusion = [
            (f.0.w_q.val(), f.1.w_q.val()),
            (f.0.w_k.val(), f.1.w_k.val()),
            (f.0.w_v.val(), f.1.w_v.val()),
            (f.0.w_o.val(), f.1.w_o.val()),
        ];
        let (phi, phi0) = (&self.score, &initial.score);
        let mut score = vec![(phi.weight.val(), phi0.weight.val())];
        if let (Some(b), Some(b0)) = (&phi.bias, &phi0.bias) {
            let row = |t: Tensor<B, 1>| t.unsqueeze_dim::<2>(0);
            score.push((row(b.val()), row(b0.val())));
        }
        (relative_distance(&fusion), relative_distance(&score))
    }
}

/// `||a - a_0|| / ||a_0||` over several tensors taken together (0 when `a_0` is all zeros).
fn relative_distance<B: Backend>(pairs: &[(Tensor<B, 2>, Tensor<B, 2>)]) -> f64 {
    let sum = |t: Tensor<B, 2>| t.square().sum().into_scalar().elem::<f64>();
    let (mut moved, mut size) = (0.0, 0.0);
    for (a, a0) in pairs {
        moved += sum(a.clone() - a0.clone());
        size += sum(a0.clone());
    }
    if size > 0.0 {
        (moved / size).sqrt()
    } else {
        0.0
    }
}

/// A learned RM with R2M's policy feedback (or one of the controls of [`RmMethod`]).
pub struct R2mReward<B: AutodiffBackend> {
    pub cfg: R2mConfig,
    /// The frozen RM (body and its original `phi`) and how sequences are rendered for it.
    pub rm: LearnedRm<Inner<B>>,
    pub head: R2mHead<B>,
    /// The head as built (before any update or resume): what `rm_fusion_moved` and
    /// `rm_phi_moved` measure from.
    initial: R2mHead<Inner<B>>,
    optim: OptimizerAdaptor<AdamW, R2mHead<B>, B>,
    /// Noise draws so far (w/ Noise control); each draw seeds its own stream from it, so that a
    /// resumed run draws the same noise.
    noise_draws: usize,
    /// RM optimizer steps taken.
    pub updates: usize,
}

/// The fusion state a run saves: `r2m.json` (config and sizes), `r2m_head.bin` (fusion head
/// and `phi`), `r2m_optim.bin` (AdamW state).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct R2mStateInfo {
    pub config: R2mConfig,
    pub d_rm: usize,
    pub d_p: usize,
    pub width: usize,
    pub updates: usize,
    #[serde(default)]
    pub noise_draws: usize,
}

/// Rows scored per fusion-head call.
const SCORE_CHUNK: usize = 16;

impl<B: AutodiffBackend> R2mReward<B> {
    /// R2M on `rm` for a policy of hidden size `policy_hidden`.
    pub fn new(rm: LearnedRm<Inner<B>>, policy_hidden: usize, cfg: R2mConfig) -> Self {
        let d_rm = rm.model.backbone.config.hidden_size;
        let d = cfg
            .width
            .unwrap_or_else(|| default_width(d_rm, policy_hidden));
        let dev = rm.model.backbone.device();
        let fusion = FusionHead::new(d_rm, policy_hidden, d, cfg.zero_init_output, cfg.seed, &dev);
        let phi = &rm.model.score;
        let score = Linear {
            weight: Param::from_tensor(Tensor::from_inner(phi.weight.val())),
            bias: phi
                .bias
                .as_ref()
                .map(|b| Param::from_tensor(Tensor::from_inner(b.val()))),
            lora: None,
        };
        let optim = adamw::<B, R2mHead<B>>(0.0);
        let head = R2mHead { fusion, score };
        Self {
            noise_draws: 0,
            cfg,
            rm,
            initial: head.valid(),
            head,
            optim,
            updates: 0,
        }
    }

    fn recorder_err(path: &std::path::Path, e: impl std::fmt::Display) -> R2mError {
        R2mError::format(path, e.to_string())
    }

    /// Save the fusion head, `phi` and the optimizer state into `dir` (see [`R2mStateInfo`]).
    pub fn save(&self, dir: &std::path::Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| R2mError::io(dir, e))?;
        let rec = BinFileRecorder::<FullPrecisionSettings>::new();
        let head = dir.join("r2m_head");
        Recorder::<B>::record(&rec, self.head.clone().into_record(), head.clone())
            .map_err(|e| Self::recorder_err(&head, e))?;
        let opt = dir.join("r2m_optim");
        Recorder::<B>::record(&rec, self.optim.to_record(), opt.clone())
            .map_err(|e| Self::recorder_err(&opt, e))?;
        let [d_rm, width] = self.head.fusion.w_q.dims();
        let info = R2mStateInfo {
            config: self.cfg.clone(),
            d_rm,
            d_p: self.head.fusion.w_k.dims()[0],
            width,
            updates: self.updates,
            noise_draws: self.noise_draws,
        };
        let p = dir.join("r2m.json");
        std::fs::write(&p, serde_json::to_string_pretty(&info).expect("json"))
            .map_err(|e| R2mError::io(&p, e))
    }

    /// Read `r2m.json` of a saved state.
    pub fn read_info(dir: &std::path::Path) -> Result<R2mStateInfo> {
        let p = dir.join("r2m.json");
        let text = std::fs::read_to_string(&p).map_err(|e| R2mError::io(&p, e))?;
        serde_json::from_str(&text).map_err(|e| R2mError::format(&p, e.to_string()))
    }

    /// Restore a state [`R2mReward::save`] wrote (the head's sizes must match).
    pub fn load_state(&mut self, dir: &std::path::Path) -> Result<()> {
        let info = Self::read_info(dir)?;
        let [d_rm, width] = self.head.fusion.w_q.dims();
        let d_p = self.head.fusion.w_k.dims()[0];
        if (info.d_rm, info.d_p, info.width) != (d_rm, d_p, width) {
            return Err(R2mError::format(
                dir.join("r2m.json"),
                format!(
                    "saved head is D_rm {} / D_p {} / d {}, this one {d_rm} / {d_p} / {width}",
                    info.d_rm, info.d_p, info.width
                ),
            ));
        }
        let dev = self.rm.model.backbone.device();
        let rec = BinFileRecorder::<FullPrecisionSettings>::new();
        let head = dir.join("r2m_head");
        let record = Recorder::<B>::load(&rec, head.clone(), &dev)
            .map_err(|e| Self::recorder_err(&head, e))?;
        self.head = self.head.clone().load_record(record);
        let opt = dir.join("r2m_optim");
        let record = Recorder::<B>::load(&rec, opt.clone(), &dev)
            .map_err(|e| Self::recorder_err(&opt, e))?;
        let fresh = adamw::<B, R2mHead<B>>(0.0);
        self.optim = std::mem::replace(&mut self.optim, fresh).load_record(record);
        self.updates = info.updates;
        self.noise_draws = info.noise_draws;
        Ok(())
    }

    /// Rewards of full token sequences with the policy's feedback at `t = T` (`w = Omega`): the
    /// paper's RM accuracy with policy feedback. `policy` computes `h` over each sequence without
    /// its last token, as in the RL loop. Progress goes to `observer`.
    pub fn score_with_policy(
        &mut self,
        policy: &CausalLm<Inner<B>>,
        seqs: &[Vec<u32>],
        observer: &dyn Observer,
    ) -> Vec<f32> {
        let dev = policy.device();
        let head = self.head.valid();
        let w = self.cfg.omega;
        let mut out = Vec::with_capacity(seqs.len());
        observer.begin("R2M scoring", seqs.len() as u64, 0);
        for chunk in seqs.chunks(SCORE_CHUNK) {
            let h_last = self.rm.last_hidden(chunk);
            // `h` covers each sequence without its last token, as in the RL loop.
            let inputs: Vec<&[u32]> = chunk
                .iter()
                .map(|q| &q[..q.len().saturating_sub(1)])
                .collect();
            let (ids, padding, s) = pad_tokens(&inputs, 0);
            let mask: Vec<bool> = padding.valid.iter().flatten().copied().collect();
            let tokens = int_tensor::<Inner<B>>(ids, [chunk.len(), s], &dev);
            let h = policy.forward_hidden(tokens, &padding, None);
            let mask = Tensor::<Inner<B>, 2, Bool>::from_data(
                TensorData::new(mask, [chunk.len(), s]),
                &dev,
            );
            let fb = self.uses_feedback().then_some((h, mask));
            let r = head.reward(h_last, fb, w);
            out.extend(r.into_data().convert::<f32>().to_vec::<f32>().expect("f32"));
            observer.advance(chunk.len() as u64, "");
        }
        observer.end();
        out
    }

    /// Whether the reward reads the policy's hidden states.
    pub fn uses_feedback(&self) -> bool {
        matches!(
            self.cfg.method,
            RmMethod::R2m | RmMethod::R2mNoTrain | RmMethod::R2mNoise
        )
    }

    /// Whether the head trains after each RL step.
    pub fn trains(&self) -> bool {
        matches!(
            self.cfg.method,
            RmMethod::R2m | RmMethod::R2mNoise | RmMethod::IterativeHead | RmMethod::Oracle
        )
    }

    /// The policy feedback for an experience: the policy's hidden states `h` over its grid (the
    /// old pass's, or the update's `h'`) or, for w/ Noise, Gaussian noise with the mean and
    /// variance of `h`'s real positions; and the mask of real positions.
    ///
    /// # Shapes
    /// - `h`: `[rows, P + R - 1, D_p]`; returns it (or the noise) and `[rows, P + R - 1]`
    pub fn feedback(
        &mut self,
        exp: &Experience<Inner<B>>,
        h: Option<&Tensor<Inner<B>, 3>>,
    ) -> Result<Feedback<Inner<B>>> {
        let h = h.cloned().ok_or_else(|| {
            R2mError::Other("R2M needs the policy's hidden states in the experience".into())
        })?;
        let [rows, s, d] = h.dims();
        let dev = h.device();
        // `h` covers each sequence without its last token (the log-prob pass's inputs): a row
        // shorter than the grid has its last token inside the grid, and it is masked out.
        let p = exp.prompt_cols;
        let valid: Vec<bool> = (0..rows)
            .flat_map(|r| {
                let last = p + exp.response_len(r) - 1;
                exp.padding.valid[r][..s]
                    .iter()
                    .enumerate()
                    .map(move |(c, &v)| v && c != last)
            })
            .collect();
        let mask =
            Tensor::<Inner<B>, 2, Bool>::from_data(TensorData::new(valid.clone(), [rows, s]), &dev);
        if self.cfg.method != RmMethod::R2mNoise {
            return Ok((h, mask));
        }
        let v: Vec<f32> = h.into_data().convert::<f32>().to_vec().expect("f32");
        let mut rng = StdRng::seed_from_u64(
            self.cfg.seed
                ^ 0x0015_e5ee_d000
                ^ (self.noise_draws as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        self.noise_draws += 1;
        let (mut n, mut sum, mut sq) = (0f64, 0f64, 0f64);
        for (p, &ok) in valid.iter().enumerate() {
            if ok {
                for &x in &v[p * d..(p + 1) * d] {
                    n += 1.0;
                    sum += x as f64;
                    sq += (x as f64) * (x as f64);
                }
            }
        }
        let mean = sum / n.max(1.0);
        let std = (sq / n.max(1.0) - mean * mean).max(0.0).sqrt();
        let noise: Vec<f32> = (0..rows * s * d)
            .map(|_| {
                // Box-Muller
                let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-300), rng.random());
                (mean + std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
            })
            .collect();
        Ok((
            Tensor::from_data(TensorData::new(noise, [rows, s, d]), &dev),
            mask,
        ))
    }
}

impl<B: AutodiffBackend> RolloutReward<Inner<B>> for R2mReward<B> {
    fn name(&self) -> String {
        let m = crate::config::method_name(self.cfg.method);
        format!("{} ({m})", self.rm.name)
    }

    fn wants_hidden(&self) -> bool {
        self.uses_feedback()
    }

    fn score_experience(
        &mut self,
        exp: &Experience<Inner<B>>,
        t: usize,
        total: usize,
    ) -> Result<Scored<Inner<B>>> {
        let seqs = exp
            .reward_inputs()
            .iter()
            .map(|x| self.rm.sequence(x))
            .collect::<Result<Vec<_>>>()?;
        let h_last = self.rm.last_hidden(&seqs);
        let w = time_step_weight(t, total, self.cfg.omega);
        let feedback = if self.uses_feedback() {
            Some(self.feedback(exp, exp.hidden.as_ref())?)
        } else {
            None
        };
        let head = self.head.valid();
        let rows = exp.rows();
        let mut scores = Vec::with_capacity(rows);
        for start in (0..rows).step_by(SCORE_CHUNK) {
            let n = SCORE_CHUNK.min(rows - start);
            let fb = feedback
                .as_ref()
                .map(|(h, m)| (h.clone().narrow(0, start, n), m.clone().narrow(0, start, n)));
            let r = head.reward(h_last.clone().narrow(0, start, n), fb, w);
            scores.extend(r.into_data().convert::<f32>().to_vec::<f32>().expect("f32"));
        }
        let rm_hidden = self.trains().then_some(h_last);
        Ok(Scored { scores, rm_hidden })
    }

    fn update(
        &mut self,
        exp: &Experience<Inner<B>>,
        refreshed_hidden: Option<&Tensor<Inner<B>, 3>>,
        t: usize,
        total: usize,
    ) -> Result<Diagnostics> {
        let w = time_step_weight(t, total, self.cfg.omega);
        let mut stats = Diagnostics::default();
        stats.set("r2m_w", w);
        // The oracle's head trains on the labelled pairs it is given (`update_on_pairs`).
        if !self.trains() || self.cfg.method == RmMethod::Oracle {
            return Ok(stats);
        }
        let h_last = exp.rm_hidden.clone().ok_or_else(|| {
            R2mError::Other("the R2M update needs H_last in the experience (score it first)".into())
        })?;
        let k = exp.k;
        let groups = exp.rows() / k;
        // Pseudo pairs from the rewards that ranked the experience (before the policy update).
        let pairs: Vec<Option<(usize, usize)>> = exp.scores.chunks(k).map(pseudo_pair).collect();
        let feedback = if self.uses_feedback() {
            Some(self.feedback(exp, refreshed_hidden)?)
        } else {
            None
        };
        for u in 0..self.cfg.updates_per_step.max(1) {
            let fb = feedback
                .as_ref()
                .map(|(h, m)| (Tensor::from_inner(h.clone()), Tensor::from_inner(m.clone())));
            let r = self.head.reward(Tensor::from_inner(h_last.clone()), fb, w);
            let (loss, parts) = grebt_loss(r.reshape([groups, k]), &pairs, self.cfg.alpha);
            let loss_v = loss.clone().into_scalar().elem::<f32>() as f64;
            if !loss_v.is_finite() {
                return Err(R2mError::non_finite(t, "the R2M GREBT loss", loss_v));
            }
            let mut grads = GradientsParams::from_grads(loss.backward(), &self.head);
            let gn = clip_grad_norm::<B, _>(&self.head, &mut grads, self.cfg.max_grad_norm);
            self.head = self.optim.step(self.cfg.lr, self.head.clone(), grads);
            self.updates += 1;
            if u == 0 {
                stats.set("rm_loss", loss_v);
                stats.set("rm_bt", parts.bt);
                stats.set("rm_gre", parts.gre);
                stats.set("rm_grad_norm", gn);
            }
        }
        self.record_movement(&mut stats);
        Ok(stats)
    }

    fn save_state(&self, dir: &std::path::Path) -> Result<()> {
        self.save(dir)
    }

    fn load_state(&mut self, dir: &std::path::Path) -> Result<()> {
        R2mReward::load_state(self, dir)
    }
}

impl<B: AutodiffBackend> R2mReward<B> {
    /// Train `phi` with Bradley-Terry on given `(chosen, rejected)` pairs of the experience's
    /// rows (labelled from outside, e.g. by a gold reward), `epochs` full-batch AdamW steps at
    /// `r2m.lr`: the oracle control's update. Reports `rm_loss` (the first epoch's) and
    /// `rm_grad_norm`; nothing happens without pairs.
    pub fn update_on_pairs(
        &mut self,
        exp: &Experience<Inner<B>>,
        pairs: &[(usize, usize)],
        epochs: usize,
        t: usize,
        total: usize,
    ) -> Result<Diagnostics> {
        let mut stats = Diagnostics::default();
        stats.set("oracle_pairs", pairs.len() as f64);
        if pairs.is_empty() {
            return Ok(stats);
        }
        let h_last = exp.rm_hidden.clone().ok_or_else(|| {
            R2mError::Other("the oracle update needs H_last in the experience".into())
        })?;
        let w = time_step_weight(t, total, self.cfg.omega);
        let dev = h_last.device();
        let index = |f: fn(&(usize, usize)) -> usize| {
            let v: Vec<i64> = pairs.iter().map(|p| f(p) as i64).collect();
            Tensor::<B, 1, Int>::from_data(TensorData::new(v, [pairs.len()]), &dev)
        };
        let (chosen, rejected) = (index(|p| p.0), index(|p| p.1));
        for e in 0..epochs.max(1) {
            let r = self
                .head
                .reward(Tensor::from_inner(h_last.clone()), None, w);
            let loss = r2m_core::loss::bradley_terry_loss(
                r.clone().select(0, chosen.clone()),
                r.select(0, rejected.clone()),
            );
            let loss_v = loss.clone().into_scalar().elem::<f32>() as f64;
            if !loss_v.is_finite() {
                return Err(R2mError::non_finite(
                    t,
                    "the oracle's Bradley-Terry loss",
                    loss_v,
                ));
            }
            let mut grads = GradientsParams::from_grads(loss.backward(), &self.head);
            let gn = clip_grad_norm::<B, _>(&self.head, &mut grads, self.cfg.max_grad_norm);
            self.head = self.optim.step(self.cfg.lr, self.head.clone(), grads);
            self.updates += 1;
            if e == 0 {
                stats.set("rm_loss", loss_v);
                stats.set("rm_grad_norm", gn);
            }
        }
        self.record_movement(&mut stats);
        Ok(stats)
    }

    /// `rm_fusion_moved` and `rm_phi_moved`: how far the head is from where it started
    /// ([`R2mHead::moved_from`]), after this step's update.
    fn record_movement(&self, stats: &mut Diagnostics) {
        let (fusion, phi) = self.head.valid().moved_from(&self.initial);
        stats.set("rm_fusion_moved", fusion);
        stats.set("rm_phi_moved", phi);
    }
}

/// The reward a run's config asks for (`reward.kind`, `r2m.method`), on the policy's backend.
///
/// `policy_hidden` is the policy's hidden size (the fusion head's `D_p`). The `pretrained-rm`
/// control fine-tunes the RM on `r2m.pretrain_pairs` first and saves it in `RUN/pretrained-rm/`;
/// a resumed run reloads that directory instead of training again.
pub fn reward_from_config<B: AutodiffBackend>(
    cfg: &crate::config::RlConfig,
    policy_hidden: usize,
    resume: bool,
    device: &B::Device,
    observer: &dyn Observer,
) -> Result<Box<dyn RolloutReward<Inner<B>>>> {
    use crate::config::RewardKind;
    match cfg.reward.kind {
        RewardKind::Model => {
            let dir = cfg.reward.model.as_deref().ok_or_else(|| {
                R2mError::Config("reward.kind = \"model\" needs reward.model".into())
            })?;
            let pretrained = cfg.run.out.join("pretrained-rm");
            let rm = if cfg.r2m.method == RmMethod::PretrainedRm
                && resume
                && pretrained.join("config.json").exists()
            {
                LearnedRm::<Inner<B>>::load(&pretrained, cfg.reward.token_budget, device)?
            } else if cfg.r2m.method == RmMethod::PretrainedRm {
                pretrain_rm::<B>(cfg, dir, &pretrained, device, observer)?
            } else {
                LearnedRm::<Inner<B>>::load(dir, cfg.reward.token_budget, device)?
            };
            Ok(match cfg.r2m.method {
                RmMethod::Vanilla | RmMethod::PretrainedRm => Box::new(rm),
                RmMethod::Oracle => {
                    return Err(R2mError::Config(
                        "r2m.method = \"oracle\" needs a gold reward to label pairs: only \
                         `r2m experiment overopt` runs it"
                            .into(),
                    ))
                }
                _ => Box::new(R2mReward::<B>::new(rm, policy_hidden, cfg.r2m.clone())),
            })
        }
        RewardKind::Rule => {
            let rule = cfg.reward.rule.clone().ok_or_else(|| {
                R2mError::Config("reward.kind = \"rule\" needs reward.rule".into())
            })?;
            Ok(Box::new(rule))
        }
        RewardKind::Command => {
            let command = cfg.reward.command.as_deref().ok_or_else(|| {
                R2mError::Config("reward.kind = \"command\" needs reward.command".into())
            })?;
            let timeout = std::time::Duration::try_from_secs_f64(cfg.reward.timeout_s)
                .map_err(|e| R2mError::Config(format!("reward.timeout_s: {e}")))?;
            Ok(Box::new(crate::command::CommandReward::new(
                command, timeout,
            )?))
        }
    }
}

/// The "Pretrained RM" control: fine-tune the RM in `rm_dir` with Bradley-Terry on
/// `r2m.pretrain_pairs` (saved to `out`), then use it frozen.
fn pretrain_rm<B: AutodiffBackend>(
    cfg: &crate::config::RlConfig,
    rm_dir: &std::path::Path,
    out: &std::path::Path,
    device: &B::Device,
    observer: &dyn Observer,
) -> Result<LearnedRm<Inner<B>>> {
    use crate::reward_training::{train_reward_model, RmOutputs, RmTrainConfig};
    use r2m_data::{read_preferences, tokenize_pairs, ReadOptions};
    use r2m_models::{RewardModel, Tokenizer};
    let r = &cfg.r2m;
    let path = r.pretrain_pairs.as_deref().ok_or_else(|| {
        R2mError::Config("r2m.method = \"pretrained-rm\" needs r2m.pretrain_pairs".into())
    })?;
    let tok = Tokenizer::from_hf_dir(rm_dir)?;
    let opts = ReadOptions {
        skip_bad: cfg.data.skip_bad,
        limit: None,
    };
    let (pairs, report) = read_preferences(path, opts)?;
    observer.message(&format!("pretrained-rm: {report}"));
    let (pairs, report) = tokenize_pairs(&tok, &pairs, r.pretrain_max_len)?;
    observer.message(&format!("pretrained-rm: {report}"));
    let rm = RewardModel::<B>::load_hf_dir(rm_dir, device)?;
    let rm_cfg = RmTrainConfig {
        trainable: r.pretrain_trainable,
        epochs: r.pretrain_epochs,
        lr: r.pretrain_lr,
        seed: r.seed,
        ..Default::default()
    };
    let outputs = RmOutputs {
        dir: out,
        tokenizer: Some(&tok),
        head_only_base: None,
        observer,
    };
    let (rm, summary) = train_reward_model(rm, &pairs, &[], &rm_cfg, outputs)?;
    observer.message(&format!(
        "pretrained-rm: {} BT steps on {} pairs, saved {}",
        summary.steps,
        summary.train_pairs,
        out.display()
    ));
    Ok(LearnedRm {
        model: rm.valid(),
        tokenizer: Some(tok),
        token_budget: cfg.reward.token_budget,
        name: format!("pretrained rm {}", out.display()),
    })
}
