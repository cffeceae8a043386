//! r2m-rl: training loops.
//!
//! - [`reward_training`]: Bradley-Terry reward-model training and evaluation, with the frozen
//!   lower body computed once.

pub mod reward_training;

pub use reward_training::{
    evaluate_rm, frozen_features, rm_rewards, train_reward_model, PairFeatures, PairInputs, RmEval,
    RmOutputs, RmTrainConfig, RmTrainSummary, Trainable,
};
