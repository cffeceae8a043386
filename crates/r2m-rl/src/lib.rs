//! r2m-rl: reward-model training and the RL engine.
//!
//! - [`reward_training`]: Bradley-Terry reward-model training and evaluation;
//! - [`config`]: the RL run configuration (TOML);
//! - [`rollout`]: sampling, the old-policy and reference passes;
//! - [`reward_fn`]: rewards behind one trait (learned RM, rules);
//! - [`advantage`]: RLOO, GRPO, REINFORCE++, ReMax, GAE;
//! - [`policy_loss`]: the clipped surrogate, KL estimators, entropy, aggregation;
//! - [`r2m_reward`]: the R2M reward (fusion head + GREBT update) and the paper's controls;
//! - [`trainer`]: the RL step;
//! - [`run`]: the run loop with its directory, checkpoints, exact resume and plots;
//! - [`plots`]: line charts as PNG + SVG (plotters, embedded font) and the run plots;
//! - [`vader`]: VADER sentiment (a port of vaderSentiment 3.3.2), the gold reward of `r2m experiment overopt`;
//! - [`overopt`]: `r2m experiment overopt`, reward over-optimization against a gold reward;
//! - [`demo`]: `r2m demo`, the whole method on the real default model in minutes.

pub mod advantage;
pub mod config;
pub mod demo;
pub mod optim;
pub mod overopt;
pub mod plots;
pub mod policy_loss;
pub mod r2m_reward;
pub mod reward_fn;
pub mod reward_training;
pub mod rollout;
pub mod run;
pub mod trainer;
pub mod vader;

pub use config::RlConfig;
pub use r2m_reward::{R2mHead, R2mReward, RmUpdateStats};
pub use reward_fn::{
    load_prompts, LearnedRm, Prompt, RewardFn, RewardInput, RolloutReward, RuleReward,
};
pub use reward_training::{
    evaluate_rm, frozen_features, rm_rewards, train_reward_model, PairFeatures, PairInputs, RmEval,
    RmOutputs, RmTrainConfig, RmTrainSummary, Trainable,
};
pub use run::{train, train_with, RlSummary, RunControl, RunEnd};
pub use trainer::{PromptSampler, RlTrainer, StepMetrics};
