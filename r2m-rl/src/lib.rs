//! r2m-rl: the RL engine, and reward-model training.
//!
//! One RL step is [`trainer::RlTrainer::step`], read next to the paper's Algorithm 1. Its data
//! flows one way through an [`experience::Experience`]:
//!
//! ```text
//! rollout -> reward -> advantage -> policy update -> reward-model update
//! (rollout)  (reward,  (advantage)   (update)          (reward::RolloutReward::update,
//!             r2m_reward)                                r2m_reward for R2M)
//! ```
//!
//! - [`config`]: the RL run configuration (TOML), typed;
//! - [`prompt`]: RL prompts and their per-step sampler;
//! - [`experience`]: the step's one value, filled stage by stage;
//! - [`rollout`]: sampling, the old-policy, reference and critic passes;
//! - [`reward`]: rewards behind one trait (learned RM, rules) and their diagnostics;
//! - [`command`]: a reward computed by an external command (one JSON line per response);
//! - [`r2m_reward`]: the R2M reward (fusion head + GREBT update) and the paper's controls;
//! - [`advantage`]: RLOO, GRPO, REINFORCE++, ReMax, GAE;
//! - [`policy_loss`]: the clipped surrogate, KL estimators, entropy, aggregation;
//! - [`update`]: the policy update's phases (policy loss, value loss, optimizer step);
//! - [`trainer`]: the RL step;
//! - [`metrics`]: what a step reports;
//! - [`run`] and [`run_dir`]: the run loop, its directory, checkpoints and exact resume;
//! - [`plots`]: line charts as PNG + SVG (plotters, embedded font) and the run plots;
//! - [`reward_training`]: Bradley-Terry reward-model training and evaluation;
//! - [`optim`]: AdamW with a one-pass kernel; [`seed`]: the run's random streams.
//!
//! Experiments built on the engine (reward over-optimization, the demo) live in the
//! `r2m-experiments` crate. Nothing here prints: progress goes to an [`r2m_core::Observer`].

pub mod advantage;
pub mod command;
pub mod config;
pub mod experience;
pub mod metrics;
pub mod optim;
pub mod plots;
pub mod policy_loss;
pub mod prompt;
pub mod r2m_reward;
pub mod reward;
pub mod reward_training;
pub mod rollout;
pub mod run;
pub mod run_dir;
pub mod seed;
pub mod trainer;
pub mod update;

pub use config::RlConfig;
pub use experience::{Experience, RewardInput};
pub use metrics::StepMetrics;
pub use prompt::{load_prompts, Prompt, PromptSampler};
pub use r2m_reward::{R2mHead, R2mReward};
pub use reward::{Diagnostics, LearnedRm, RewardFn, RolloutReward, RuleReward, Scored};
pub use reward_training::{
    evaluate_rm, frozen_features, rm_rewards, train_reward_model, PairFeatures, PairInputs, RmEval,
    RmOutputs, RmTrainConfig, RmTrainSummary, Trainable,
};
pub use run::{train, train_with, RlSummary, RunControl, RunEnd};
pub use trainer::RlTrainer;
