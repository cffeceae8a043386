//! The RL loop (spec §3, Algorithm 1 without the R2M update): rollouts, rewards, advantages and
//! the clipped policy update with KL control, for every estimator of [`AdvantageKind`].

use std::path::Path;
use std::time::Instant;

use burn::module::{AutodiffModule, Module};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::record::{BinFileRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor};
use r2m_core::optim::{clip_grad_norm, warmup_cosine_lr};
use r2m_core::{R2mError, Result};
use r2m_models::generate::FinishReason;
use r2m_models::{generate, CausalLm, GenerationConfig, RewardModel, Tokenizer};
use rand::seq::SliceRandom;
use rand::{rngs::StdRng, SeedableRng};
use serde::Serialize;

use crate::advantage::{self, AdvantageKind};
use crate::config::RlConfig;
use crate::optim::{adamw, AdamW};
use crate::policy_loss::{
    aggregate, clipped_surrogate, kl_estimate, kl_estimate_host, Clip, KlMode, LossAgg,
};
use crate::r2m_reward::RmUpdateStats;
use crate::reward_fn::{Prompt, RolloutReward};
use crate::reward_training::Trainable;
use crate::rollout::{final_hidden, response_hidden, response_logprobs, Rollout, RowSlice, Start};

type Inner<B> = <B as AutodiffBackend>::InnerBackend;

/// One vector per response, one value per response token.
pub type PerToken = Vec<Vec<f32>>;

/// Metrics of one RL step (one line of `metrics.jsonl`).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
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
    pub time_generate: f64,
    pub time_logprobs: f64,
    pub time_reward: f64,
    pub time_update: f64,
    /// The reward model's own update after the policy update (R2M).
    pub time_rm_update: f64,
    pub time_step: f64,
    pub samples: usize,
    /// The reward model's update (R2M and the controls that train a head).
    #[serde(flatten)]
    pub rm: Option<RmUpdateStats>,
    /// Measurements against a gold reward (`r2m experiment overopt`).
    #[serde(flatten)]
    pub gold: Option<crate::overopt::GoldStats>,
}

/// Runs RL steps on a policy.
pub struct RlTrainer<B: AutodiffBackend> {
    pub cfg: RlConfig,
    pub policy: CausalLm<B>,
    /// The frozen reference policy (the initial weights).
    pub reference: CausalLm<Inner<B>>,
    /// PPO's critic: a copy of the initial policy body with a scalar value head.
    pub critic: Option<RewardModel<B>>,
    pub tokenizer: Option<Tokenizer>,
    /// First trainable block (0: everything trains).
    pub start_layer: usize,
    /// The current beta.
    pub kl_coef: f64,
    /// Completed RL steps.
    pub step: usize,
    /// Keep the old policy's hidden states `h` in each rollout (R2M).
    pub keep_hidden: bool,
    optim: OptimizerAdaptor<AdamW, CausalLm<B>, B>,
    critic_optim: Option<OptimizerAdaptor<AdamW, RewardModel<B>, B>>,
    optimizer_steps: usize,
    /// True between the first optimizer step of an RL step and its end: the state is then not
    /// at a step boundary, and must not be checkpointed.
    mid_step: bool,
    eos: Vec<u32>,
    pad: u32,
}

fn to_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().expect("f32")
}

fn scalar<B: Backend>(t: Tensor<B, 1>) -> f64 {
    t.into_scalar().elem::<f32>() as f64
}

/// Per-step seeds derived from the run seed.
fn step_seed(seed: u64, step: usize, stream: u64) -> u64 {
    let mut x = seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ stream.rotate_left(32);
    // splitmix64 finaliser
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl<B: AutodiffBackend> RlTrainer<B> {
    /// Set up RL on `policy`. The reference is a frozen copy of it; with `top:N`, the embeddings,
    /// the LM head and the lower blocks are frozen.
    pub fn new(policy: CausalLm<B>, tokenizer: Option<Tokenizer>, cfg: RlConfig) -> Result<Self> {
        cfg.validate().map_err(R2mError::Config)?;
        let n_layers = policy.layers.len();
        let trainable: Trainable = cfg.model.trainable.parse()?;
        let (start_layer, policy) = match trainable {
            Trainable::All => (0, policy),
            Trainable::Top(k) if k > n_layers => {
                return Err(R2mError::Config(format!(
                    "model.trainable = \"top:{k}\", but the policy has only {n_layers} blocks"
                )))
            }
            Trainable::Top(k) => (n_layers - k, policy.with_frozen_embeddings_and_head()),
            Trainable::Head => {
                return Err(R2mError::Config(
                    "model.trainable = \"head\" is not valid for a policy".into(),
                ))
            }
        };
        let reference = policy.valid();
        let critic = cfg.algo.advantage.needs_critic().then(|| {
            let mut c = RewardModel::from_backbone(policy.clone(), cfg.run.seed);
            // Values start at 0.
            c.score.weight = c.score.weight.map(|w| w.zeros_like());
            c
        });
        let critic_optim = critic.as_ref().map(|_| adamw::<B, RewardModel<B>>(0.0));
        let mut eos: Vec<u32> = policy.config.eos_token_id.into_iter().collect();
        if let Some(t) = tokenizer.as_ref().and_then(Tokenizer::eos_id) {
            if !eos.contains(&t) {
                eos.push(t);
            }
        }
        let pad = eos.first().copied().unwrap_or(0);
        Ok(Self {
            kl_coef: cfg.algo.kl_coef,
            optim: adamw::<B, CausalLm<B>>(cfg.optim.weight_decay),
            cfg,
            policy,
            reference,
            critic,
            critic_optim,
            tokenizer,
            start_layer,
            step: 0,
            keep_hidden: false,
            optimizer_steps: 0,
            mid_step: false,
            eos,
            pad,
        })
    }

    /// Optimizer steps of the whole run (for the LR schedule).
    pub fn total_optimizer_steps(&self) -> usize {
        let rows = self.cfg.rollout.prompts_per_step * self.cfg.rollout.samples_per_prompt;
        self.cfg.run.steps * self.cfg.optim.epochs * rows.div_ceil(self.cfg.optim.mini_batch_size)
    }

    fn generation_config(&self, temperature: f32, seed: u64) -> GenerationConfig {
        let r = &self.cfg.rollout;
        GenerationConfig {
            max_new_tokens: r.max_new_tokens,
            temperature,
            top_k: if temperature > 0.0 { r.top_k } else { None },
            top_p: if temperature > 0.0 { r.top_p } else { None },
            seed,
            stop_strings: Vec::new(),
            eos_token_ids: self.eos.clone(),
            min_new_tokens: r.min_new_tokens,
        }
    }

    /// Generate for `rows` prompt indices in batches of `generation_batch_size`.
    fn sample(
        &self,
        model: &CausalLm<Inner<B>>,
        prompts: &[Prompt],
        rows: &[usize],
        temperature: f32,
        seed: u64,
    ) -> Result<Vec<r2m_models::Generation>> {
        let mut out = Vec::with_capacity(rows.len());
        let bs = self.cfg.rollout.generation_batch_size.max(1);
        for (chunk, idx) in rows.chunks(bs).enumerate() {
            let ids: Vec<Vec<u32>> = idx.iter().map(|&i| prompts[i].ids.clone()).collect();
            let cfg = self.generation_config(temperature, step_seed(seed, chunk, 1));
            out.extend(generate(model, self.tokenizer.as_ref(), &ids, &cfg)?);
        }
        Ok(out)
    }

    /// Sample K responses per prompt from the current policy and run the old-policy and
    /// reference passes (spec §3 steps 2-3). Returns the rollout and the seconds spent sampling.
    pub fn rollout(&self, prompts: Vec<Prompt>, seed: u64) -> Result<(Rollout<Inner<B>>, f64)> {
        if let Some(i) = prompts.iter().position(|p| p.ids.is_empty()) {
            return Err(R2mError::Config(format!("prompt {i} has no tokens")));
        }
        let k = self.cfg.rollout.samples_per_prompt;
        let old = self.policy.valid();
        let t0 = Instant::now();
        let rows: Vec<usize> = (0..prompts.len() * k).map(|r| r / k).collect();
        let gens = self.sample(&old, &prompts, &rows, self.cfg.rollout.temperature, seed)?;
        let gen_secs = t0.elapsed().as_secs_f64();
        let mut rollout = Rollout::new(prompts, k, gens, self.pad);
        self.old_and_ref_pass(&old, &mut rollout);
        Ok((rollout, gen_secs))
    }

    /// One pass of the old policy (log-probs, `h`, the frozen stream) and one of the reference,
    /// in micro-batches over the full grid.
    fn old_and_ref_pass(&self, old: &CausalLm<Inner<B>>, rollout: &mut Rollout<Inner<B>>) {
        let dev = old.device();
        let temp = self.cfg.rollout.temperature;
        let rows: Vec<usize> = (0..rollout.rows()).collect();
        let critic = self.critic.as_ref().map(|c| c.valid());
        let (mut streams, mut hiddens) = (Vec::new(), Vec::new());
        let (mut old_lp, mut ref_lp, mut values) = (Vec::new(), Vec::new(), Vec::new());
        for chunk in rows.chunks(self.cfg.optim.micro_batch_size.max(1)) {
            let s = rollout.full_slice(chunk);
            let padding = rollout.input_padding(&s);
            let ids = rollout.input_ids::<Inner<B>>(&s, &dev);
            let targets = rollout.targets::<Inner<B>>(&s, &dev);
            let stream = (self.start_layer > 0).then(|| {
                old.forward_layers(old.embed(ids.clone()), &padding, 0..self.start_layer, None)
            });
            let start = |m: &CausalLm<Inner<B>>| match &stream {
                Some(x) => final_hidden(m, Start::Stream(x.clone(), self.start_layer), &padding),
                None => final_hidden(m, Start::Tokens(ids.clone()), &padding),
            };
            let h = start(old);
            let (lp, _) = response_logprobs(
                old,
                response_hidden(h.clone(), &s, rollout.prompt_cols),
                targets.clone(),
                temp,
                false,
            );
            old_lp.extend(rollout.split_rows(&s, &to_vec(lp)));
            let h_ref = start(&self.reference);
            let (lp, _) = response_logprobs(
                &self.reference,
                response_hidden(h_ref, &s, rollout.prompt_cols),
                targets,
                temp,
                false,
            );
            ref_lp.extend(rollout.split_rows(&s, &to_vec(lp)));
            if let Some(c) = &critic {
                let hc = start(&c.backbone);
                let v = c
                    .score
                    .forward(response_hidden(hc, &s, rollout.prompt_cols))
                    .squeeze_dim::<2>(2);
                values.extend(rollout.split_rows(&s, &to_vec(v)));
            }
            if self.keep_hidden {
                hiddens.push(h);
            }
            if let Some(x) = stream {
                streams.push(x);
            }
        }
        rollout.old_logprobs = old_lp;
        rollout.ref_logprobs = ref_lp;
        rollout.values = critic.is_some().then_some(values);
        rollout.stream = (!streams.is_empty()).then(|| Tensor::cat(streams, 0));
        rollout.hidden = (!hiddens.is_empty()).then(|| Tensor::cat(hiddens, 0));
    }

    /// Rewards of a rollout: the raw scores and the rewards after the missing-EOS penalty.
    pub fn score(
        &self,
        rollout: &Rollout<Inner<B>>,
        reward: &mut dyn RolloutReward<Inner<B>>,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let raw = reward.score_rollout(rollout, self.step + 1, self.cfg.run.steps)?;
        if let Some(i) = raw.iter().position(|r| !r.is_finite()) {
            return Err(R2mError::non_finite(
                self.step + 1,
                format!("reward of row {i} ({})", reward.name()),
                raw[i] as f64,
            ));
        }
        let penalised = raw
            .iter()
            .zip(&rollout.responses)
            .map(
                |(&r, g)| match (self.cfg.reward.missing_eos_penalty, g.finish) {
                    (Some(p), f) if f != FinishReason::Eos => r - p,
                    _ => r,
                },
            )
            .collect();
        Ok((raw, penalised))
    }

    /// Per-token advantages (and PPO returns) for a scored rollout.
    pub fn advantages(
        &self,
        rollout: &Rollout<Inner<B>>,
        rewards: &[f32],
        greedy_rewards: Option<&[f32]>,
    ) -> Result<(PerToken, Option<PerToken>)> {
        let a = &self.cfg.algo;
        let k = rollout.k;
        let beta = self.kl_coef as f32;
        let in_reward = a.kl_mode == KlMode::Reward;
        let kl: Vec<Vec<f32>> = rollout
            .old_logprobs
            .iter()
            .zip(&rollout.ref_logprobs)
            .map(|(o, r)| {
                o.iter()
                    .zip(r)
                    .map(|(&lo, &lr)| {
                        if in_reward {
                            kl_estimate_host(lo, lr, a.kl_estimator)
                        } else {
                            0.0
                        }
                    })
                    .collect()
            })
            .collect();
        let lens: Vec<usize> = (0..rollout.rows())
            .map(|r| rollout.response_len(r))
            .collect();
        let broadcast = |seq: Vec<f32>| -> Vec<Vec<f32>> {
            seq.iter().zip(&lens).map(|(&x, &n)| vec![x; n]).collect()
        };
        let outcome: Vec<f32> = rewards
            .iter()
            .zip(&kl)
            .map(|(&r, k)| r - beta * k.iter().sum::<f32>())
            .collect();
        Ok(match a.advantage {
            AdvantageKind::Rloo => (broadcast(advantage::rloo(&outcome, k)), None),
            AdvantageKind::Grpo => (
                broadcast(advantage::grpo(
                    &outcome,
                    k,
                    a.grpo_scale_by_std,
                    a.grpo_eps,
                )),
                None,
            ),
            AdvantageKind::Remax => {
                let g = greedy_rewards.ok_or_else(|| {
                    R2mError::Other("ReMax needs the greedy responses' rewards".into())
                })?;
                (broadcast(advantage::remax(&outcome, k, g)), None)
            }
            AdvantageKind::ReinforcePp => {
                let tr: Vec<Vec<f32>> = rewards
                    .iter()
                    .zip(&kl)
                    .map(|(&r, k)| advantage::token_rewards(r, k, beta))
                    .collect();
                (advantage::reinforce_pp(&tr), None)
            }
            AdvantageKind::Gae => {
                let values = rollout
                    .values
                    .as_ref()
                    .ok_or_else(|| R2mError::Other("GAE needs the critic's values".into()))?;
                let tr: Vec<Vec<f32>> = rewards
                    .iter()
                    .zip(&kl)
                    .map(|(&r, k)| advantage::token_rewards(r, k, beta))
                    .collect();
                let (mut adv, ret) = advantage::gae(&tr, values, a.gamma, a.lambda);
                if a.whiten_advantages {
                    advantage::whiten(&mut adv, true);
                }
                (adv, Some(ret))
            }
        })
    }

    /// The forward pass of `model` (policy or critic body) over a slice.
    fn trunk<M: Backend>(
        model: &CausalLm<M>,
        start: Start<M>,
        rollout: &Rollout<Inner<B>>,
        s: &RowSlice,
    ) -> Tensor<M, 3> {
        let h = final_hidden(model, start, &rollout.input_padding(s));
        response_hidden(h, s, rollout.prompt_cols)
    }

    fn start_of(&self, rollout: &Rollout<Inner<B>>, s: &RowSlice) -> Start<B> {
        let dev = self.policy.device();
        match rollout.stream_of(s) {
            Some(x) => Start::Stream(Tensor::from_inner(x), self.start_layer),
            None => Start::Tokens(rollout.input_ids::<B>(s, &dev)),
        }
    }

    /// The policy update (spec §3 step 6): `epochs` passes over the rollout in shuffled
    /// mini-batches. Returns the update's statistics.
    pub fn update(
        &mut self,
        rollout: &mut Rollout<Inner<B>>,
        adv: &[Vec<f32>],
        returns: Option<&[Vec<f32>]>,
        seed: u64,
    ) -> Result<UpdateStats> {
        let o = self.cfg.optim.clone();
        let a = self.cfg.algo.clone();
        let temp = self.cfg.rollout.temperature;
        let clip = Clip {
            eps_low: a.clip_eps,
            eps_high: a.clip_eps_high.unwrap_or(a.clip_eps),
            dual_clip: a.dual_clip,
        };
        let beta = self.kl_coef as f32;
        let dev = self.policy.device();
        let total = self.total_optimizer_steps();
        let warmup = (total as f64 * o.warmup_ratio).round() as usize;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut st = UpdateStats::default();
        let rows = rollout.rows();
        // The final epoch's hidden states `h'` (R2M), per micro-batch.
        let mut fresh: Vec<(RowSlice, Tensor<Inner<B>, 3>)> = Vec::new();
        for epoch in 0..o.epochs {
            let mut order: Vec<usize> = (0..rows).collect();
            order.shuffle(&mut rng);
            for mb in order.chunks(o.mini_batch_size) {
                let mb_tokens: usize = mb.iter().map(|&r| rollout.response_len(r)).sum();
                let mut acc = GradientsAccumulator::<CausalLm<B>>::new();
                let mut cacc = GradientsAccumulator::<RewardModel<B>>::new();
                for micro in mb.chunks(o.micro_batch_size) {
                    let s = rollout.slice(micro);
                    let mask = rollout.response_mask::<B>(&s, &dev);
                    let n_tok = mask.clone().sum().into_scalar().elem::<f32>() as f64;
                    let old = rollout.per_token::<B>(&s, &rollout.old_logprobs, &dev);
                    let advt = rollout.per_token::<B>(&s, adv, &dev);
                    let full = final_hidden(
                        &self.policy,
                        self.start_of(rollout, &s),
                        &rollout.input_padding(&s),
                    );
                    if self.keep_hidden && epoch + 1 == o.epochs {
                        fresh.push((s.clone(), full.clone().detach().inner()));
                    }
                    let hidden = response_hidden(full, &s, rollout.prompt_cols);
                    let (logp, ent) = response_logprobs(
                        &self.policy,
                        hidden,
                        rollout.targets::<B>(&s, &dev),
                        temp,
                        a.entropy_coef != 0.0,
                    );
                    let (pg, clipped) = clipped_surrogate(logp.clone(), old, advt, clip);
                    let agg = |v: Tensor<B, 2>| {
                        aggregate(v, mask.clone(), a.loss_agg, mb_tokens, mb.len())
                    };
                    let pg_loss = agg(pg);
                    let mut loss = pg_loss.clone();
                    let kl = kl_estimate(
                        logp,
                        rollout.per_token::<B>(&s, &rollout.ref_logprobs, &dev),
                        a.kl_estimator,
                    );
                    if a.kl_mode == KlMode::Loss && beta != 0.0 {
                        loss = loss + agg(kl.clone()).mul_scalar(beta);
                    }
                    let ent = if a.entropy_coef != 0.0 {
                        loss = loss - agg(ent.clone()).mul_scalar(a.entropy_coef as f32);
                        ent.detach()
                    } else {
                        ent
                    };
                    let loss_v = scalar(loss.clone());
                    if !loss_v.is_finite() {
                        return Err(R2mError::Other(format!(
                            "step {}: policy loss is {loss_v} (epoch {epoch})",
                            self.step + 1
                        )));
                    }
                    acc.accumulate(
                        &self.policy,
                        GradientsParams::from_grads(loss.backward(), &self.policy),
                    );
                    let tok_sum = |v: Tensor<B, 2>| scalar((v * mask.clone()).sum());
                    st.clipped += tok_sum(clipped);
                    st.tokens += n_tok;
                    if epoch == 0 {
                        st.entropy += tok_sum(ent);
                        st.kl_loss += tok_sum(kl.detach());
                        st.first_tokens += n_tok;
                        st.policy_loss += scalar(pg_loss.detach());
                    }
                    if let (Some(critic), Some(ret)) = (&self.critic, returns) {
                        let values = rollout.values.as_ref().expect("values with a critic");
                        let start = self.start_of(rollout, &s);
                        let h = Self::trunk(&critic.backbone, start, rollout, &s);
                        let v = critic.score.forward(h).squeeze_dim::<2>(2);
                        let old_v = rollout.per_token::<B>(&s, values, &dev);
                        let ret = rollout.per_token::<B>(&s, ret, &dev);
                        let v_clip =
                            old_v.clone() + (v.clone() - old_v).clamp(-a.value_clip, a.value_clip);
                        let l = (v - ret.clone())
                            .square()
                            .max_pair((v_clip - ret).square())
                            .mul_scalar(0.5);
                        let vloss =
                            aggregate(l, mask.clone(), LossAgg::TokenMean, mb_tokens, mb.len());
                        if epoch == 0 {
                            st.value_loss += scalar(vloss.clone().detach());
                        }
                        cacc.accumulate(
                            critic,
                            GradientsParams::from_grads(vloss.backward(), critic),
                        );
                    }
                }
                let mut grads = acc.grads();
                let gn = clip_grad_norm::<B, _>(&self.policy, &mut grads, o.max_grad_norm);
                if !gn.is_finite() {
                    return Err(R2mError::non_finite(
                        self.step + 1,
                        format!(
                            "policy gradient norm (epoch {}, optimizer step {})",
                            epoch + 1,
                            st.optimizer_steps + 1
                        ),
                        gn,
                    ));
                }
                st.grad_norm += gn;
                let lr =
                    warmup_cosine_lr(self.optimizer_steps, total, warmup, o.lr, o.min_lr_ratio);
                self.policy = self.optim.step(lr, self.policy.clone(), grads);
                if let (Some(critic), Some(opt)) = (self.critic.take(), self.critic_optim.as_mut())
                {
                    let mut cg = cacc.grads();
                    clip_grad_norm::<B, _>(&critic, &mut cg, o.max_grad_norm);
                    let clr = warmup_cosine_lr(
                        self.optimizer_steps,
                        total,
                        warmup,
                        a.critic_lr,
                        o.min_lr_ratio,
                    );
                    self.critic = Some(opt.step(clr, critic, cg));
                }
                self.optimizer_steps += 1;
                self.mid_step = true;
                st.optimizer_steps += 1;
                st.lr = lr;
            }
        }
        if !fresh.is_empty() {
            rollout.hidden = Some(assemble_hidden(rollout, fresh));
        }
        Ok(st)
    }

    /// Whether the trainer sits between two RL steps (so that its state can be checkpointed).
    pub fn at_step_boundary(&self) -> bool {
        !self.mid_step
    }

    /// Save what a resumed run needs from the trainer into `dir`: the policy (full precision),
    /// its AdamW state, the critic and its optimizer (PPO), and `trainer.json` (step, optimizer
    /// steps, KL coefficient). Every random stream is derived from the run seed and the step, so
    /// the step counter restores them.
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        let rec = BinFileRecorder::<FullPrecisionSettings>::new();
        save_record::<B, _>(&rec, self.policy.clone().into_record(), dir, "policy")?;
        save_record::<B, _>(&rec, self.optim.to_record(), dir, "policy_optim")?;
        if let (Some(c), Some(o)) = (&self.critic, &self.critic_optim) {
            save_record::<B, _>(&rec, c.clone().into_record(), dir, "critic")?;
            save_record::<B, _>(&rec, o.to_record(), dir, "critic_optim")?;
        }
        let state = TrainerState {
            step: self.step,
            optimizer_steps: self.optimizer_steps,
            kl_coef: self.kl_coef,
            kl_coef_bits: self.kl_coef.to_bits(),
        };
        let p = dir.join("trainer.json");
        std::fs::write(&p, serde_json::to_string_pretty(&state).expect("json"))
            .map_err(|e| R2mError::io(&p, e))
    }

    /// Restore what [`RlTrainer::save_checkpoint`] wrote. The trainer must have been built from
    /// the same config and initial policy (the reference is the initial policy).
    pub fn load_checkpoint(&mut self, dir: &Path) -> Result<()> {
        let p = dir.join("trainer.json");
        let text = std::fs::read_to_string(&p).map_err(|e| R2mError::io(&p, e))?;
        let state: TrainerState =
            serde_json::from_str(&text).map_err(|e| R2mError::format(&p, e.to_string()))?;
        let rec = BinFileRecorder::<FullPrecisionSettings>::new();
        let dev = self.policy.device();
        let policy = load_record::<B, _>(&rec, dir, "policy", &dev)?;
        self.policy = self.policy.clone().load_record(policy);
        let optim = load_record::<B, _>(&rec, dir, "policy_optim", &dev)?;
        let fresh = adamw::<B, CausalLm<B>>(self.cfg.optim.weight_decay);
        self.optim = std::mem::replace(&mut self.optim, fresh).load_record(optim);
        if let Some(c) = self.critic.take() {
            let record = load_record::<B, _>(&rec, dir, "critic", &dev)?;
            self.critic = Some(c.load_record(record));
            let record = load_record::<B, _>(&rec, dir, "critic_optim", &dev)?;
            let fresh = adamw::<B, RewardModel<B>>(0.0);
            let old = self.critic_optim.take().unwrap_or(fresh);
            self.critic_optim = Some(old.load_record(record));
        }
        self.step = state.step;
        self.optimizer_steps = state.optimizer_steps;
        self.kl_coef = f64::from_bits(state.kl_coef_bits);
        self.mid_step = false;
        Ok(())
    }

    /// One RL step on `prompts`: sample, score, compute advantages, update.
    pub fn step(
        &mut self,
        prompts: Vec<Prompt>,
        reward: &mut dyn RolloutReward<Inner<B>>,
    ) -> Result<(StepMetrics, Rollout<Inner<B>>, Vec<f32>)> {
        let t_step = Instant::now();
        self.keep_hidden = reward.wants_hidden();
        let seed = step_seed(self.cfg.run.seed, self.step, 0);
        let (mut rollout, mut t_gen) = self.rollout(prompts, seed)?;
        let t_logprobs = t_step.elapsed().as_secs_f64() - t_gen;
        let mut t_reward = 0.0;
        // ReMax's baseline: the greedy response to each prompt, scored the same way. It is
        // scored first, so that the last rollout the reward saw is the one the policy trains on
        // (R2M caches that rollout's `H_last` for its update).
        let greedy = if self.cfg.algo.advantage == AdvantageKind::Remax {
            let t0 = Instant::now();
            let old = self.policy.valid();
            let rows: Vec<usize> = (0..rollout.prompts.len()).collect();
            let gens = self.sample(&old, &rollout.prompts, &rows, 0.0, seed)?;
            t_gen += t0.elapsed().as_secs_f64();
            let t0 = Instant::now();
            let mut g = Rollout::<Inner<B>>::new(rollout.prompts.clone(), 1, gens, self.pad);
            if self.keep_hidden {
                self.old_and_ref_pass(&old, &mut g);
            }
            let (_, r) = self.score(&g, reward)?;
            t_reward += t0.elapsed().as_secs_f64();
            Some(r)
        } else {
            None
        };
        let t0 = Instant::now();
        let (raw, rewards) = self.score(&rollout, reward)?;
        t_reward += t0.elapsed().as_secs_f64();
        let (adv, returns) = self.advantages(&rollout, &rewards, greedy.as_deref())?;
        let t0 = Instant::now();
        let st = self.update(
            &mut rollout,
            &adv,
            returns.as_deref(),
            step_seed(self.cfg.run.seed, self.step, 2),
        )?;
        let t_update = t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let rm = reward.after_policy_update(&rollout, &raw, self.step + 1, self.cfg.run.steps)?;
        let t_rm_update = t0.elapsed().as_secs_f64();
        let gold = reward.gold_stats();

        let n = rollout.rows() as f64;
        let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64;
        let reward_mean = mean(&rewards);
        let reward_std = (rewards
            .iter()
            .map(|&r| (r as f64 - reward_mean).powi(2))
            .sum::<f64>()
            / n)
            .sqrt();
        let seq_kl: f64 = rollout
            .old_logprobs
            .iter()
            .zip(&rollout.ref_logprobs)
            .map(|(o, r)| o.iter().zip(r).map(|(a, b)| (a - b) as f64).sum::<f64>())
            .sum::<f64>()
            / n;
        let kl_coef = self.kl_coef;
        if let Some(target) = self.cfg.algo.kl_target {
            self.kl_coef =
                adaptive_kl_coef(self.kl_coef, seq_kl, target, n, self.cfg.algo.kl_horizon);
        }
        for (name, v) in [
            ("policy loss", st.policy_loss),
            ("value loss", st.value_loss),
        ] {
            if !v.is_finite() {
                return Err(R2mError::non_finite(self.step + 1, name, v));
            }
        }
        if let Some(v) = rm
            .as_ref()
            .and_then(|r| r.rm_loss)
            .filter(|v| !v.is_finite())
        {
            return Err(R2mError::non_finite(self.step + 1, "R2M update loss", v));
        }
        self.step += 1;
        self.mid_step = false;
        let per_mb = (st.optimizer_steps as f64 / self.cfg.optim.epochs as f64).max(1.0);
        let m = StepMetrics {
            step: self.step,
            reward_mean,
            reward_std,
            score_mean: mean(&raw),
            kl: seq_kl,
            kl_coef,
            kl_loss: st.kl_loss / st.first_tokens.max(1.0),
            entropy: st.entropy / st.first_tokens.max(1.0),
            clip_frac: st.clipped / st.tokens.max(1.0),
            policy_loss: st.policy_loss / per_mb,
            value_loss: self.critic.as_ref().map(|_| st.value_loss / per_mb),
            response_len: (0..rollout.rows())
                .map(|r| rollout.response_len(r) as f64)
                .sum::<f64>()
                / n,
            eos_frac: rollout
                .responses
                .iter()
                .filter(|g| g.finish == FinishReason::Eos)
                .count() as f64
                / n,
            grad_norm: st.grad_norm / st.optimizer_steps.max(1) as f64,
            lr: st.lr,
            time_generate: t_gen,
            time_logprobs: t_logprobs,
            time_reward: t_reward,
            time_update: t_update,
            time_rm_update: t_rm_update,
            time_step: t_step.elapsed().as_secs_f64(),
            samples: rollout.rows(),
            rm,
            gold,
        };
        Ok((m, rollout, rewards))
    }
}

/// The trainer's scalars in a checkpoint (`trainer.json`).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
struct TrainerState {
    step: usize,
    optimizer_steps: usize,
    /// For people; `kl_coef_bits` is what is restored (JSON floats need not round-trip exactly).
    kl_coef: f64,
    kl_coef_bits: u64,
}

fn save_record<B: Backend, R: burn::record::Record<B>>(
    rec: &BinFileRecorder<FullPrecisionSettings>,
    record: R,
    dir: &Path,
    name: &str,
) -> Result<()> {
    let p = dir.join(name);
    Recorder::<B>::record(rec, record, p.clone()).map_err(|e| R2mError::format(&p, e.to_string()))
}

fn load_record<B: Backend, R: burn::record::Record<B>>(
    rec: &BinFileRecorder<FullPrecisionSettings>,
    dir: &Path,
    name: &str,
    dev: &B::Device,
) -> Result<R> {
    let p = dir.join(name);
    Recorder::<B>::load(rec, p.clone(), dev).map_err(|e| R2mError::format(&p, e.to_string()))
}

/// Put the final epoch's per-micro-batch hidden states back into one `[rows, P + R - 1, hidden]`
/// grid (columns outside a micro-batch's slice are padding for its rows and stay zero).
fn assemble_hidden<Bk: Backend>(
    rollout: &Rollout<Bk>,
    fresh: Vec<(RowSlice, Tensor<Bk, 3>)>,
) -> Tensor<Bk, 3> {
    let width = rollout.prompt_cols + rollout.response_cols - 1;
    let mut order = Vec::with_capacity(rollout.rows());
    let mut parts = Vec::with_capacity(fresh.len());
    for (s, h) in fresh {
        let [n, w, d] = h.dims();
        let dev = h.device();
        let mut cols = Vec::with_capacity(3);
        if s.lo > 0 {
            cols.push(Tensor::zeros([n, s.lo, d], &dev));
        }
        cols.push(h);
        if s.lo + w < width {
            cols.push(Tensor::zeros([n, width - s.lo - w, d], &dev));
        }
        parts.push(Tensor::cat(cols, 1));
        order.extend(s.rows);
    }
    let mut pos = vec![0i64; rollout.rows()];
    for (k, &r) in order.iter().enumerate() {
        pos[r] = k as i64;
    }
    let all = Tensor::cat(parts, 0);
    let idx = Tensor::<Bk, 1, burn::tensor::Int>::from_data(
        burn::tensor::TensorData::new(pos, [rollout.rows()]),
        &all.device(),
    );
    all.select(0, idx)
}

/// The adaptive KL controller of Ziegler et al. (2019): beta moves toward the value that brings
/// the sequence KL to `target`, by at most 20% of `samples / horizon` per step.
pub fn adaptive_kl_coef(beta: f64, kl: f64, target: f64, samples: f64, horizon: f64) -> f64 {
    let err = (kl / target - 1.0).clamp(-0.2, 0.2);
    beta * (1.0 + err * samples / horizon)
}

/// Sums over one policy update (see [`StepMetrics`] for the per-step means).
#[derive(Debug, Default)]
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
}

/// Hands out prompt indices for each step: a seeded shuffle, reshuffled on every pass. Its state
/// (the data position) is part of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct PromptSampler {
    order: Vec<usize>,
    pos: usize,
    pass: u64,
    seed: u64,
}

impl PromptSampler {
    pub fn new(len: usize, seed: u64) -> Self {
        let mut s = Self {
            order: (0..len).collect(),
            pos: 0,
            pass: 0,
            seed,
        };
        s.shuffle();
        s
    }

    fn shuffle(&mut self) {
        let mut rng = StdRng::seed_from_u64(step_seed(self.seed, self.pass as usize, 3));
        self.order.shuffle(&mut rng);
    }

    /// The next `n` prompt indices.
    pub fn next_batch(&mut self, n: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n && !self.order.is_empty() {
            if self.pos == self.order.len() {
                self.pass += 1;
                self.pos = 0;
                self.shuffle();
            }
            out.push(self.order[self.pos]);
            self.pos += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_sampler_covers_every_prompt_per_pass() {
        let mut s = PromptSampler::new(5, 1);
        let mut a = s.next_batch(3);
        a.extend(s.next_batch(2));
        a.sort();
        assert_eq!(a, vec![0, 1, 2, 3, 4]);
        let b = s.next_batch(5);
        assert_eq!(b.len(), 5);
        let again: Vec<usize> = PromptSampler::new(5, 1).next_batch(5);
        let mut first = PromptSampler::new(5, 1);
        assert_eq!(first.next_batch(5), again);
    }

    #[test]
    fn adaptive_kl_by_hand() {
        // KL 1.5x the target: error clipped to 0.2; 100 samples over horizon 1000 -> +2%.
        assert!((adaptive_kl_coef(0.1, 9.0, 6.0, 100.0, 1000.0) - 0.102).abs() < 1e-12);
        // KL at 0.9x the target: -10% * 0.1 -> -1%.
        assert!((adaptive_kl_coef(0.1, 5.4, 6.0, 100.0, 1000.0) - 0.099).abs() < 1e-12);
        assert_eq!(adaptive_kl_coef(0.1, 6.0, 6.0, 100.0, 1000.0), 0.1);
    }

    #[test]
    fn step_seeds_differ() {
        assert_ne!(step_seed(0, 0, 0), step_seed(0, 1, 0));
        assert_ne!(step_seed(0, 0, 0), step_seed(0, 0, 1));
        assert_eq!(step_seed(3, 4, 5), step_seed(3, 4, 5));
    }
}
