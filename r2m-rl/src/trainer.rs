//! The RL step (spec §3, Algorithm 1): rollout, reward, advantages, the policy update, and the
//! reward model's own update (R2M), for every estimator of [`AdvantageKind`].
//!
//! Data flows one way through an [`Experience`]: the rollout stage creates it, the reward and
//! advantage stages fill it, the policy update reads it and returns the refreshed hidden states
//! `h'`, and the reward's update reads both.

use std::path::Path;
use std::time::Instant;

use burn::module::{AutodiffModule, Module};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::record::{BinFileRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor};
use r2m_core::optim::warmup_cosine_lr;
use r2m_core::{R2mError, Result};
use r2m_models::generate::FinishReason;
use r2m_models::{lora, CausalLm, GenerationConfig, RewardModel, Tokenizer};
use rand::seq::SliceRandom;
use rand::{rngs::StdRng, SeedableRng};
use serde::Serialize;

use crate::advantage::{self, AdvantageKind};
use crate::config::RlConfig;
use crate::experience::{widen, Experience, PerToken, RowSlice};
use crate::metrics::{sequence_kl, StepMetrics, StepTimes, UpdateStats};
use crate::optim::{adamw, AdamW};
use crate::policy_loss::KlMode;
use crate::prompt::Prompt;
use crate::reward::RolloutReward;
use crate::reward_training::Trainable;
use crate::rollout::{self, RolloutModels, RolloutOptions};
use crate::seed::{step_seed, stream};
use crate::update::{
    grid_padding, micro_batches, optimizer_step, policy_loss, value_loss, LossSettings, MicroBatch,
};

type Inner<B> = <B as AutodiffBackend>::InnerBackend;

/// One micro-batch's final-norm hidden states over its slice of the grid.
type HiddenSlice<B> = (RowSlice, Tensor<B, 3>);

/// What the policy update returns besides the new weights.
pub struct PolicyUpdate<B: Backend> {
    pub stats: UpdateStats,
    /// `h'`: the final epoch's last-layer hidden states, `[rows, P + R - 1, hidden]` (only when
    /// the trainer keeps hidden states, for R2M).
    pub hidden: Option<Tensor<B, 3>>,
}

/// Runs RL steps on a policy.
pub struct RlTrainer<B: AutodiffBackend> {
    pub cfg: RlConfig,
    pub policy: CausalLm<B>,
    /// The frozen reference policy: the initial weights; with `trainable = "lora"`, the policy
    /// without its adapters (the same base tensors as the policy's, not a copy).
    pub reference: CausalLm<Inner<B>>,
    /// PPO's critic: a copy of the initial policy body with a scalar value head.
    pub critic: Option<RewardModel<B>>,
    pub tokenizer: Option<Tokenizer>,
    /// First trainable block (0: everything trains); the blocks below it are a frozen trunk
    /// whose output the rollout keeps (`top:N`, and `lora` with `lora.layers = "top:N"`).
    pub start_layer: usize,
    /// The current beta.
    pub kl_coef: f64,
    /// Completed RL steps.
    pub step: usize,
    /// Keep the old policy's hidden states `h` in each experience and return `h'` from the
    /// update (R2M); [`RlTrainer::step`] sets it from the reward.
    pub keep_hidden: bool,
    optim: OptimizerAdaptor<AdamW, CausalLm<B>, B>,
    critic_optim: Option<OptimizerAdaptor<AdamW, RewardModel<B>, B>>,
    optimizer_steps: usize,
    /// True between the first optimizer step of an RL step and its end: the state is then not
    /// at a step boundary, and must not be checkpointed.
    mid_step: bool,
    eos: Vec<u32>,
    pad: u32,
    /// sha256 of the base's weights, computed at the first checkpoint.
    base_sha256: std::sync::OnceLock<String>,
}

fn scalar<B: Backend>(t: Tensor<B, 1>) -> f64 {
    t.into_scalar().elem::<f32>() as f64
}

impl<B: AutodiffBackend> RlTrainer<B> {
    /// Set up RL on `policy`. The reference is a frozen copy of it; with `top:N`, the embeddings,
    /// the LM head and the lower blocks are frozen. With `lora`, adapters go on (fresh, as
    /// `[lora]` says, or read from `model.adapter`), every other parameter is frozen, the
    /// reference is the base model (the adapters off, sharing its weights), and the blocks below
    /// the first adapted one are a frozen trunk whose output is reused as with `top:N`.
    pub fn new(policy: CausalLm<B>, tokenizer: Option<Tokenizer>, cfg: RlConfig) -> Result<Self> {
        cfg.validate()?;
        let n_layers = policy.layers.len();
        let lora = cfg.model.trainable == Trainable::Lora;
        let (start_layer, policy) = match cfg.model.trainable {
            Trainable::All => (0, policy),
            Trainable::Top(k) if k > n_layers => {
                return Err(R2mError::Config(format!(
                    "model.trainable = \"top:{k}\", but the policy has only {n_layers} blocks"
                )))
            }
            Trainable::Top(k) => (n_layers - k, policy.with_frozen_embeddings_and_head()),
            Trainable::Lora => {
                let policy = match &cfg.model.adapter {
                    Some(dir) => lora::load_peft_adapter(policy, dir)?,
                    None => lora::add_adapters(policy, &cfg.lora.to_lora_config(cfg.run.seed)?)?,
                };
                let start = lora::first_adapted_layer(&policy).unwrap_or(n_layers);
                (start, policy)
            }
            Trainable::Head => {
                return Err(R2mError::Config(
                    "model.trainable = \"head\" is not valid for a policy".into(),
                ))
            }
        };
        let reference = match lora {
            true => lora::without_adapters(policy.valid()),
            false => policy.valid(),
        };
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
            base_sha256: std::sync::OnceLock::new(),
        })
    }

    /// Optimizer steps of the whole run (for the LR schedule).
    pub fn total_optimizer_steps(&self) -> usize {
        let rows = self.cfg.rollout.prompts_per_step * self.cfg.rollout.samples_per_prompt;
        self.cfg.run.steps * self.cfg.optim.epochs * rows.div_ceil(self.cfg.optim.mini_batch_size)
    }

    /// The sampling settings at `temperature` (0: greedy, without top-k/top-p).
    fn generation_config(&self, temperature: f32) -> GenerationConfig {
        let r = &self.cfg.rollout;
        GenerationConfig {
            max_new_tokens: r.max_new_tokens,
            temperature,
            top_k: if temperature > 0.0 { r.top_k } else { None },
            top_p: if temperature > 0.0 { r.top_p } else { None },
            seed: 0,
            stop_strings: Vec::new(),
            eos_token_ids: self.eos.clone(),
            min_new_tokens: r.min_new_tokens,
        }
    }

    fn rollout_options(&self, temperature: f32) -> RolloutOptions {
        RolloutOptions {
            generation: self.generation_config(temperature),
            generation_batch_size: self.cfg.rollout.generation_batch_size,
            micro_batch_size: self.cfg.optim.micro_batch_size,
            keep_hidden: self.keep_hidden,
            recompute_old: self.cfg.rollout.recompute_old_logprobs,
            pad: self.pad,
        }
    }

    /// Sample K responses per prompt from the current policy and run the old-policy, reference
    /// and critic passes (spec §3 steps 2-3). Returns the experience and the seconds spent
    /// sampling.
    pub fn rollout(&self, prompts: Vec<Prompt>, seed: u64) -> Result<(Experience<Inner<B>>, f64)> {
        let old = self.policy.valid();
        let critic = self.critic.as_ref().map(|c| c.valid());
        let models = self.rollout_models(&old, critic.as_ref());
        let opts = self.rollout_options(self.cfg.rollout.temperature);
        rollout::rollout(
            &models,
            prompts,
            self.cfg.rollout.samples_per_prompt,
            &opts,
            seed,
        )
    }

    fn rollout_models<'a>(
        &'a self,
        old: &'a CausalLm<Inner<B>>,
        critic: Option<&'a RewardModel<Inner<B>>>,
    ) -> RolloutModels<'a, Inner<B>> {
        RolloutModels {
            old,
            reference: &self.reference,
            critic,
            tokenizer: self.tokenizer.as_ref(),
            start_layer: self.start_layer,
        }
    }

    /// Score `exp` with `reward`: its raw scores, `H_last` when the reward keeps it, and the
    /// rewards after the missing-EOS penalty.
    pub fn score(
        &self,
        exp: &mut Experience<Inner<B>>,
        reward: &mut dyn RolloutReward<Inner<B>>,
    ) -> Result<()> {
        let scored = reward.score_experience(exp, self.step + 1, self.cfg.run.steps)?;
        if let Some(i) = scored.scores.iter().position(|r| !r.is_finite()) {
            return Err(R2mError::non_finite(
                self.step + 1,
                format!("reward of row {i} ({})", reward.name()),
                scored.scores[i] as f64,
            ));
        }
        let penalty = self.cfg.reward.missing_eos_penalty;
        exp.rewards = (scored.scores.iter().zip(&exp.responses))
            .map(|(&r, g)| match penalty {
                Some(p) if g.finish != FinishReason::Eos => r - p,
                _ => r,
            })
            .collect();
        exp.scores = scored.scores;
        exp.rm_hidden = scored.rm_hidden;
        Ok(())
    }

    /// ReMax's baseline: the reward of each prompt's greedy response, scored as the samples are.
    /// Returns it and the seconds spent generating and scoring.
    fn greedy_rewards(
        &self,
        exp: &Experience<Inner<B>>,
        reward: &mut dyn RolloutReward<Inner<B>>,
        seed: u64,
    ) -> Result<(Vec<f32>, f64, f64)> {
        let t0 = Instant::now();
        let old = self.policy.valid();
        let models = self.rollout_models(&old, None);
        let opts = self.rollout_options(0.0);
        let rows: Vec<usize> = (0..exp.prompts.len()).collect();
        let gens = rollout::sample(&models, &exp.prompts, &rows, &opts, seed)?;
        let t_gen = t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let mut greedy = Experience::new(exp.prompts.clone(), 1, gens, self.pad);
        if self.keep_hidden {
            rollout::old_and_ref_pass(&models, &mut greedy, &opts);
        }
        self.score(&mut greedy, reward)?;
        Ok((greedy.rewards, t_gen, t0.elapsed().as_secs_f64()))
    }

    /// Per-token advantages (and PPO's returns) of a scored experience (spec §3 step 5). With
    /// the KL in the reward, each token's reward carries `-beta k1`, `k1 = log pi_old - log
    /// pi_ref` (the spec's decision); the outcome estimators take the sequence's sum.
    pub fn advantages(&self, exp: &mut Experience<Inner<B>>) -> Result<()> {
        let a = &self.cfg.algo;
        let (k, beta) = (exp.k, self.kl_coef as f32);
        let in_reward = a.kl_mode() == KlMode::Reward;
        let kl: PerToken = (exp.old_logprobs.iter().zip(&exp.ref_logprobs))
            .map(|(o, r)| {
                let k1 = |(&lo, &lr): (&f32, &f32)| if in_reward { lo - lr } else { 0.0 };
                o.iter().zip(r).map(k1).collect()
            })
            .collect();
        let outcome: Vec<f32> = (exp.rewards.iter().zip(&kl))
            .map(|(&r, k)| r - beta * k.iter().sum::<f32>())
            .collect();
        let token_rewards = || -> PerToken {
            (exp.rewards.iter().zip(&kl))
                .map(|(&r, k)| advantage::token_rewards(r, k, beta))
                .collect()
        };
        let per_seq = match a.advantage {
            AdvantageKind::Rloo => Some(advantage::rloo(&outcome, k)),
            AdvantageKind::Grpo => Some(advantage::grpo(
                &outcome,
                k,
                a.grpo_scale_by_std,
                a.grpo_eps,
            )),
            AdvantageKind::Remax => {
                let g = exp.greedy_rewards.as_deref().ok_or_else(|| {
                    R2mError::Other("ReMax needs the greedy responses' rewards".into())
                })?;
                Some(advantage::remax(&outcome, k, g))
            }
            AdvantageKind::ReinforcePp | AdvantageKind::Gae => None,
        };
        let (adv, returns) = match (per_seq, a.advantage) {
            (Some(seq), _) => {
                let lens = (0..exp.rows()).map(|r| exp.response_len(r));
                (
                    seq.iter().zip(lens).map(|(&x, n)| vec![x; n]).collect(),
                    None,
                )
            }
            (None, AdvantageKind::ReinforcePp) => (advantage::reinforce_pp(&token_rewards()), None),
            (None, _) => {
                let values = exp
                    .values
                    .as_ref()
                    .ok_or_else(|| R2mError::Other("GAE needs the critic's values".into()))?;
                let (mut adv, ret) = advantage::gae(&token_rewards(), values, a.gamma, a.lambda);
                if a.whiten_advantages {
                    advantage::whiten(&mut adv, true);
                }
                (adv, Some(ret))
            }
        };
        exp.advantages = adv;
        exp.returns = returns;
        Ok(())
    }

    /// The policy update (spec §3 step 6): `epochs` passes over the experience in shuffled
    /// mini-batches. In the final epoch, each micro-batch's forward pass also yields `h'`.
    pub fn update(
        &mut self,
        exp: &Experience<Inner<B>>,
        seed: u64,
    ) -> Result<PolicyUpdate<Inner<B>>> {
        let epochs = self.cfg.optim.epochs;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut st = UpdateStats::default();
        let mut fresh: Vec<HiddenSlice<Inner<B>>> = Vec::new();
        for epoch in 0..epochs {
            let mut order: Vec<usize> = (0..exp.rows()).collect();
            order.shuffle(&mut rng);
            let keep = self.keep_hidden && epoch + 1 == epochs;
            for mb in order.chunks(self.cfg.optim.mini_batch_size) {
                self.minibatch_step(exp, mb, epoch, &mut st, keep.then_some(&mut fresh))?;
            }
        }
        let hidden = (!fresh.is_empty()).then(|| assemble_hidden(exp, fresh));
        Ok(PolicyUpdate { stats: st, hidden })
    }

    /// One optimizer step of the policy (and the critic) on the mini-batch `rows`: phases 1 and
    /// 2 on each micro-batch, their gradients accumulated, then phase 3. With `sink`, each
    /// micro-batch's hidden states (`h'`) are kept.
    fn minibatch_step(
        &mut self,
        exp: &Experience<Inner<B>>,
        rows: &[usize],
        epoch: usize,
        st: &mut UpdateStats,
        mut sink: Option<&mut Vec<HiddenSlice<Inner<B>>>>,
    ) -> Result<()> {
        let dev = self.policy.device();
        let settings =
            LossSettings::new(&self.cfg.algo, self.kl_coef, self.cfg.rollout.temperature);
        let minibatch_tokens: usize = rows.iter().map(|&r| exp.response_len(r)).sum();
        let mut acc = GradientsAccumulator::<CausalLm<B>>::new();
        let mut critic_acc = GradientsAccumulator::<RewardModel<B>>::new();
        for micro in micro_batches(exp, rows, self.cfg.optim.micro_batch_size, true) {
            let (cells, padding) = grid_padding(exp, &micro);
            st.grid_cells += cells as f64;
            st.padding_cells += padding as f64;
            let mb = MicroBatch::<B>::new(exp, &micro, minibatch_tokens, rows.len(), &dev);
            let pl = policy_loss(&self.policy, mb.start(self.start_layer), &mb, &settings);
            let loss = scalar(pl.loss.clone());
            if !loss.is_finite() {
                let what = format!("policy loss (epoch {})", epoch + 1);
                return Err(R2mError::non_finite(self.step + 1, what, loss));
            }
            let grads = GradientsParams::from_grads(pl.loss.backward(), &self.policy);
            acc.accumulate(&self.policy, grads);
            st.clipped += mb.token_sum(pl.clipped);
            st.tokens += mb.tokens;
            if epoch == 0 {
                st.entropy += mb.token_sum(pl.entropy);
                st.kl_loss += mb.token_sum(pl.kl);
                st.first_tokens += mb.tokens;
                st.policy_loss += scalar(pl.surrogate);
            }
            if let Some(critic) = &self.critic {
                let start = mb.start(self.start_layer);
                let vloss = value_loss(critic, start, &mb, self.cfg.algo.value_clip);
                if epoch == 0 {
                    st.value_loss += scalar(vloss.clone().detach());
                }
                critic_acc.accumulate(
                    critic,
                    GradientsParams::from_grads(vloss.backward(), critic),
                );
            }
            if let Some(sink) = sink.as_mut() {
                sink.push((mb.slice, pl.hidden));
            }
        }
        self.apply_gradients(acc, critic_acc, epoch, st)
    }

    /// Phase 3 for the policy and the critic, at this optimizer step's learning rates.
    fn apply_gradients(
        &mut self,
        acc: GradientsAccumulator<CausalLm<B>>,
        mut critic_acc: GradientsAccumulator<RewardModel<B>>,
        epoch: usize,
        st: &mut UpdateStats,
    ) -> Result<()> {
        let o = &self.cfg.optim;
        let total = self.total_optimizer_steps();
        let warmup = (total as f64 * o.warmup_ratio).round() as usize;
        let lr_at =
            |peak| warmup_cosine_lr(self.optimizer_steps, total, warmup, peak, o.min_lr_ratio);
        let (lr, critic_lr, max_norm) =
            (lr_at(o.lr), lr_at(self.cfg.algo.critic_lr), o.max_grad_norm);
        let mut acc = acc;
        let (policy, norm) = optimizer_step(
            self.policy.clone(),
            &mut self.optim,
            acc.grads(),
            lr,
            max_norm,
        );
        if !norm.is_finite() {
            let what = format!(
                "policy gradient norm (epoch {}, optimizer step {})",
                epoch + 1,
                st.optimizer_steps + 1
            );
            return Err(R2mError::non_finite(self.step + 1, what, norm));
        }
        self.policy = policy;
        if let (Some(critic), Some(opt)) = (self.critic.take(), self.critic_optim.as_mut()) {
            let grads = critic_acc.grads();
            self.critic = Some(optimizer_step(critic, opt, grads, critic_lr, max_norm).0);
        }
        self.optimizer_steps += 1;
        self.mid_step = true;
        st.optimizer_steps += 1;
        st.grad_norm += norm;
        st.lr = lr;
        Ok(())
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
        self.save_trainable(&rec, dir)?;
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
            base: Some(self.base_identity()),
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
        if let Some(saved) = &state.base {
            let here = self.base_identity();
            if saved.sha256 != here.sha256 {
                return Err(R2mError::format(
                    &p,
                    format!(
                        "the checkpoint trained base `{}` (weights sha256 {}), but this run's base `{}` has sha256 {}: resume with the same base model",
                        saved.model, saved.sha256, here.model, here.sha256
                    ),
                ));
            }
        }
        let rec = BinFileRecorder::<FullPrecisionSettings>::new();
        let dev = self.policy.device();
        self.load_trainable(&rec, dir, &dev)?;
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

    /// The base model a checkpoint trains on: the config's model spec and the sha256 of the
    /// reference's weights (the initial policy; with LoRA, the base without adapters). Computed
    /// once.
    fn base_identity(&self) -> BaseIdentity {
        let sha256 = self
            .base_sha256
            .get_or_init(|| self.reference.weights_sha256())
            .clone();
        BaseIdentity {
            model: self.cfg.model.policy.clone(),
            sha256,
        }
    }

    /// Write what trains of the policy: with LoRA its adapters (`adapters.bin`), with `top:N` the
    /// trained blocks and the final norm (`blocks.bin`, `norm.bin`), else the whole policy
    /// (`policy.bin`). Records keep their parameter ids, which the optimizer state is keyed by.
    fn save_trainable(
        &self,
        rec: &BinFileRecorder<FullPrecisionSettings>,
        dir: &Path,
    ) -> Result<()> {
        match self.cfg.model.trainable {
            Trainable::Lora => {
                let adapters = r2m_models::lora::adapters_in_order(&self.policy);
                let records: Vec<_> = adapters.into_iter().map(Module::into_record).collect();
                save_record::<B, _>(rec, records, dir, "adapters")
            }
            Trainable::Top(_) => {
                let blocks = &self.policy.layers[self.start_layer..];
                let records: Vec<_> = blocks.iter().map(|b| b.clone().into_record()).collect();
                save_record::<B, _>(rec, records, dir, "blocks")?;
                save_record::<B, _>(rec, self.policy.norm.clone().into_record(), dir, "norm")
            }
            _ => save_record::<B, _>(rec, self.policy.clone().into_record(), dir, "policy"),
        }
    }

    /// Restore what [`RlTrainer::save_trainable`] wrote onto this trainer's policy.
    fn load_trainable(
        &mut self,
        rec: &BinFileRecorder<FullPrecisionSettings>,
        dir: &Path,
        dev: &B::Device,
    ) -> Result<()> {
        let policy = self.policy.clone();
        self.policy = match self.cfg.model.trainable {
            Trainable::Lora => {
                let records: Vec<_> = load_record::<B, _>(rec, dir, "adapters", dev)?;
                let current = r2m_models::lora::adapters_in_order(&policy);
                if records.len() != current.len() {
                    let what = format!(
                        "{} adapters, this policy has {}",
                        records.len(),
                        current.len()
                    );
                    return Err(R2mError::format(dir.join("adapters.bin"), what));
                }
                let loaded = current
                    .into_iter()
                    .zip(records)
                    .map(|(a, r)| a.load_record(r));
                r2m_models::lora::replace_adapters(policy, loaded.collect())?
            }
            Trainable::Top(_) => {
                let records: Vec<_> = load_record::<B, _>(rec, dir, "blocks", dev)?;
                let mut policy = policy;
                if records.len() != policy.layers.len() - self.start_layer {
                    let what = format!(
                        "{} trained blocks, this run trains {}",
                        records.len(),
                        policy.layers.len() - self.start_layer
                    );
                    return Err(R2mError::format(dir.join("blocks.bin"), what));
                }
                for (block, r) in policy.layers[self.start_layer..].iter_mut().zip(records) {
                    *block = block.clone().load_record(r);
                }
                let norm = load_record::<B, _>(rec, dir, "norm", dev)?;
                policy.norm = policy.norm.clone().load_record(norm);
                policy
            }
            _ => policy.load_record(load_record::<B, _>(rec, dir, "policy", dev)?),
        };
        Ok(())
    }

    /// One RL step on `prompts` (Algorithm 1, one iteration of its loop over t). Returns the
    /// step's metrics and its experience.
    pub fn step(
        &mut self,
        prompts: Vec<Prompt>,
        reward: &mut dyn RolloutReward<Inner<B>>,
    ) -> Result<(StepMetrics, Experience<Inner<B>>)> {
        let t_step = Instant::now();
        let (t, total) = (self.step + 1, self.cfg.run.steps);
        let mut times = StepTimes::default();
        self.keep_hidden = reward.wants_hidden();
        let seed = step_seed(self.cfg.run.seed, self.step, stream::SAMPLE);
        // Steps 1-3 (spec §3; Algorithm 1): snapshot pi_old; sample K responses per prompt; one pass of pi_old over each
        // x ++ y keeps its log-probs and the hidden states h; one pass of pi_ref.
        let (mut exp, t_gen) = self.rollout(prompts, seed)?;
        (times.generate, times.logprobs) = (t_gen, t_step.elapsed().as_secs_f64() - t_gen);
        // Step 4: the reward, r = phi(H_fin(t)) with w(t) for R2M; H_last kept in the experience.
        let t0 = Instant::now();
        self.score(&mut exp, reward)?;
        times.reward = t0.elapsed().as_secs_f64();
        if self.cfg.algo.advantage == AdvantageKind::Remax {
            let (greedy, t_gen, t_reward) = self.greedy_rewards(&exp, reward, seed)?;
            exp.greedy_rewards = Some(greedy);
            (times.generate, times.reward) = (times.generate + t_gen, times.reward + t_reward);
        }
        // Step 5: advantages per group.
        self.advantages(&mut exp)?;
        // Step 6: the policy update (k epochs); its final epoch yields h'.
        let t0 = Instant::now();
        let update = self.update(
            &exp,
            step_seed(self.cfg.run.seed, self.step, stream::UPDATE),
        )?;
        times.update = t0.elapsed().as_secs_f64();
        // Step 7: the reward model's update (R2M: GREBT on each group's pseudo pair, with h').
        let t0 = Instant::now();
        let diagnostics = reward.update(&exp, update.hidden.as_ref(), t, total)?;
        times.rm_update = t0.elapsed().as_secs_f64();
        if let Some((key, v)) = diagnostics.non_finite() {
            return Err(R2mError::non_finite(t, format!("reward update's {key}"), v));
        }
        self.finish_step(&exp, &update.stats, diagnostics, times, t_step)
            .map(|m| (m, exp))
    }

    /// Close a step: check the losses, move beta (adaptive KL), count the step, make its metrics.
    fn finish_step(
        &mut self,
        exp: &Experience<Inner<B>>,
        st: &UpdateStats,
        diagnostics: crate::reward::Diagnostics,
        mut times: StepTimes,
        t_step: Instant,
    ) -> Result<StepMetrics> {
        for (name, v) in [
            ("policy loss", st.policy_loss),
            ("value loss", st.value_loss),
        ] {
            if !v.is_finite() {
                return Err(R2mError::non_finite(self.step + 1, name, v));
            }
        }
        let kl_coef = self.kl_coef;
        if let Some(target) = self.cfg.algo.kl_target {
            let (n, horizon) = (exp.rows() as f64, self.cfg.algo.kl_horizon);
            self.kl_coef = adaptive_kl_coef(self.kl_coef, sequence_kl(exp), target, n, horizon);
        }
        self.step += 1;
        self.mid_step = false;
        times.step = t_step.elapsed().as_secs_f64();
        let (epochs, critic) = (self.cfg.optim.epochs, self.critic.is_some());
        Ok(StepMetrics::new(
            self.step,
            exp,
            st,
            epochs,
            critic,
            kl_coef,
            times,
            diagnostics,
        ))
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
    /// The base model trained on (absent in checkpoints written before it was recorded).
    #[serde(default)]
    base: Option<BaseIdentity>,
}

/// Which base model a checkpoint trains: the model spec (for people) and its weights' sha256.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
struct BaseIdentity {
    model: String,
    sha256: String,
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
    exp: &Experience<Bk>,
    fresh: Vec<HiddenSlice<Bk>>,
) -> Tensor<Bk, 3> {
    let width = exp.prompt_cols + exp.response_cols - 1;
    let mut order = Vec::with_capacity(exp.rows());
    let mut parts = Vec::with_capacity(fresh.len());
    for (s, h) in fresh {
        parts.push(widen(h, s.lo, width));
        order.extend(s.rows);
    }
    let mut pos = vec![0i64; exp.rows()];
    for (k, &r) in order.iter().enumerate() {
        pos[r] = k as i64;
    }
    let all = Tensor::cat(parts, 0);
    let idx = Tensor::<Bk, 1, burn::tensor::Int>::from_data(
        burn::tensor::TensorData::new(pos, [exp.rows()]),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adaptive_kl_by_hand() {
        // KL 1.5x the target: error clipped to 0.2; 100 samples over horizon 1000 -> +2%.
        assert!((adaptive_kl_coef(0.1, 9.0, 6.0, 100.0, 1000.0) - 0.102).abs() < 1e-12);
        // KL at 0.9x the target: -10% * 0.1 -> -1%.
        assert!((adaptive_kl_coef(0.1, 5.4, 6.0, 100.0, 1000.0) - 0.099).abs() < 1e-12);
        assert_eq!(adaptive_kl_coef(0.1, 6.0, 6.0, 100.0, 1000.0), 0.1);
    }
}
