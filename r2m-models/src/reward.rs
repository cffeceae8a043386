//! Reward models: a decoder body plus a scalar scoring head `phi` read at the last real token.
//!
//! The layout follows HF `*ForSequenceClassification` with one label (`score.weight`, no bias),
//! so HF reward models (e.g. Llama-based Skywork-Reward) load and r2m reward models save in a form
//! `transformers` loads as a sequence classifier.

use std::path::Path;

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use r2m_core::{R2mError, Result};
use serde_json::json;

use crate::config::ModelConfig;
use crate::model::{CausalLm, Linear, Padding};
use crate::tokenizer::Tokenizer;
use crate::weights::{load_safetensors_dir, save_safetensors, RawTensor};

/// A scalar reward model.
#[derive(Module, Debug)]
pub struct RewardModel<B: Backend> {
    /// The decoder body; its LM head is unused.
    pub backbone: CausalLm<B>,
    /// `phi: R^hidden -> R`, weight `[hidden, 1]`.
    pub score: Linear<B>,
}

/// Output of [`RewardModel::forward`].
#[derive(Debug)]
pub struct RewardOutput<B: Backend> {
    /// `[batch]`
    pub rewards: Tensor<B, 1>,
    /// `H_last`: final-norm hidden state at each row's last real token, `[batch, hidden]`.
    pub last_hidden: Tensor<B, 2>,
}

impl<B: Backend> RewardModel<B> {
    /// A reward model on `backbone` with a freshly initialised head (normal, std `1/sqrt(hidden)`).
    pub fn from_backbone(backbone: CausalLm<B>, seed: u64) -> Self {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let d = backbone.config.hidden_size;
        let mut rng = StdRng::seed_from_u64(seed);
        let std = 1.0 / (d as f32).sqrt();
        // Box-Muller normal samples.
        let w: Vec<f32> = (0..d)
            .map(|_| {
                let (u1, u2): (f32, f32) = (rng.random::<f32>().max(1e-12), rng.random());
                std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
            })
            .collect();
        let dev = backbone.device();
        let score = Linear {
            weight: Param::from_tensor(Tensor::from_data(TensorData::new(w, [d, 1]), &dev)),
            bias: None,
            lora: None,
        };
        Self { backbone, score }
    }

    /// `phi(H)` for hidden states `[batch, hidden]` -> `[batch]`.
    pub fn score_hidden(&self, hidden: Tensor<B, 2>) -> Tensor<B, 1> {
        self.score.forward(hidden).squeeze_dim::<1>(1)
    }

    /// Rewards for right- or left-padded token rows.
    ///
    /// # Shapes
    /// - `tokens`: `[batch, seq]`; `padding` must be `batch x seq`
    pub fn forward(&self, tokens: Tensor<B, 2, Int>, padding: &Padding) -> RewardOutput<B> {
        let x = self.backbone.embed(tokens);
        self.forward_from_layer(x, padding, 0)
    }

    /// Rewards from the residual stream `x` entering block `layer` (the output of blocks
    /// `0..layer`, e.g. cached from a frozen lower body). `layer == num_layers` means `x` is the
    /// last block's output and only the final norm and `phi` remain.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]`; `padding` must be `batch x seq`
    pub fn forward_from_layer(
        &self,
        x: Tensor<B, 3>,
        padding: &Padding,
        layer: usize,
    ) -> RewardOutput<B> {
        let n = self.backbone.layers.len();
        let x = self.backbone.forward_layers(x, padding, layer..n, None);
        // The final norm is per token: apply it at the last real token only.
        let last = gather_last(x, padding);
        let [b, d] = last.dims();
        let last_hidden = self
            .backbone
            .norm
            .forward(last.reshape([b, 1, d]))
            .reshape([b, d]);
        RewardOutput {
            rewards: self.score_hidden(last_hidden.clone()),
            last_hidden,
        }
    }

    /// Load an HF sequence-classification directory (one label).
    pub fn load_hf_dir(dir: &Path, device: &B::Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let config = ModelConfig::from_hf_file(&cfg_path)?;
        let mut w = load_safetensors_dir(dir)?;
        let d = config.hidden_size;
        let score = w.take_raw("score.weight", &[1, d])?;
        if w.contains("score.bias") {
            return Err(R2mError::format(
                dir,
                "`score.bias` is not supported (HF reward heads have none)",
            ));
        }
        let backbone = CausalLm::backbone_from_weights(&config, &mut w, device)?;
        let score = Linear {
            weight: Param::from_tensor(Tensor::from_data(
                TensorData::new(score.data, [d, 1]),
                device,
            )),
            bias: None,
            lora: None,
        };
        Ok(Self { backbone, score })
    }

    /// Save as an HF `*ForSequenceClassification` directory with one label.
    pub fn save_hf_dir(&self, tokenizer: Option<&Tokenizer>, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| R2mError::io(dir, e))?;
        let cfg = &self.backbone.config;
        let mut hf = cfg.to_hf_json();
        let class = cfg
            .arch
            .causal_lm_class()
            .replace("ForCausalLM", "ForSequenceClassification");
        hf["architectures"] = json!([class]);
        hf["num_labels"] = json!(1);
        hf["id2label"] = json!({"0": "LABEL_0"});
        hf["label2id"] = json!({"LABEL_0": 0});
        if let Some(pad) = tokenizer.and_then(Tokenizer::eos_id).or(cfg.eos_token_id) {
            hf["pad_token_id"] = json!(pad);
        }
        let cfg_path = dir.join("config.json");
        std::fs::write(&cfg_path, serde_json::to_string_pretty(&hf).expect("json"))
            .map_err(|e| R2mError::io(&cfg_path, e))?;
        let mut tensors: Vec<(String, RawTensor)> = self
            .backbone
            .to_weights()
            .into_iter()
            .filter(|(n, _)| n != "lm_head.weight" && n != "embed_out.weight")
            .collect();
        tensors.push((
            "score.weight".into(),
            RawTensor::from_tensor(self.score.weight.val()).transposed(),
        ));
        save_safetensors(&dir.join("model.safetensors"), &tensors)?;
        if let Some(t) = tokenizer {
            t.save_hf(dir)?;
        }
        Ok(())
    }
}

/// The file that marks a head-only reward-model directory ([`RewardModel::save_head_only`]).
pub const HEAD_ONLY_FILE: &str = "reward_head.json";

/// Whether `dir` holds a head-only reward model.
pub fn is_head_only_dir(dir: &Path) -> bool {
    dir.join(HEAD_ONLY_FILE).exists()
}

impl<B: Backend> RewardModel<B> {
    /// Save only the scoring head, for a reward model whose backbone is an unchanged base model
    /// (`trainable = head`): `reward_head.json` (the base's spec, `smollm2` or a path, and the
    /// sha256 of its weights), `score.safetensors` (`score.weight`, `[1, hidden]`) and the
    /// tokenizer. A few KB instead of a copy of the base; [`RewardModel::load_head_only`] loads
    /// it back onto the base.
    pub fn save_head_only(
        &self,
        base: &str,
        tokenizer: Option<&Tokenizer>,
        dir: &Path,
    ) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| R2mError::io(dir, e))?;
        let meta = json!({
            "format": "r2m reward head",
            "base": base,
            "base_sha256": self.backbone.weights_sha256(),
            "hidden_size": self.backbone.config.hidden_size,
        });
        let path = dir.join(HEAD_ONLY_FILE);
        std::fs::write(&path, serde_json::to_string_pretty(&meta).expect("json"))
            .map_err(|e| R2mError::io(&path, e))?;
        let score = RawTensor::from_tensor(self.score.weight.val()).transposed();
        save_safetensors(
            &dir.join("score.safetensors"),
            &[("score.weight".into(), score)],
        )?;
        if let Some(t) = tokenizer {
            t.save_hf(dir)?;
        }
        Ok(())
    }

    /// Load a directory [`RewardModel::save_head_only`] wrote onto `backbone`, which must be the
    /// base it names (same weights sha256; the error says which differs).
    pub fn load_head_only(dir: &Path, backbone: CausalLm<B>) -> Result<Self> {
        let path = dir.join(HEAD_ONLY_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| R2mError::io(&path, e))?;
        let meta: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| R2mError::format(&path, e.to_string()))?;
        let field = |k: &str| meta[k].as_str().unwrap_or_default().to_string();
        let (base, sha) = (field("base"), field("base_sha256"));
        let here = backbone.weights_sha256();
        if sha != here {
            return Err(R2mError::format(
                &path,
                format!(
                    "this head was trained on base `{base}` (weights sha256 {sha}), but the \
                     backbone given has sha256 {here}: load it onto the same base"
                ),
            ));
        }
        let d = backbone.config.hidden_size;
        let mut w = crate::weights::WeightMap::new(dir);
        crate::weights::load_safetensors_file(&dir.join("score.safetensors"), &mut w)?;
        let score = w.take_raw("score.weight", &[1, d])?;
        let device = backbone.devices()[0].clone();
        let score = Linear {
            weight: Param::from_tensor(Tensor::from_data(
                TensorData::new(score.data, [d, 1]),
                &device,
            )),
            bias: None,
            lora: None,
        };
        Ok(Self { backbone, score })
    }

    /// The base model a head-only directory names (`smollm2` or a path).
    pub fn head_only_base(dir: &Path) -> Result<String> {
        let path = dir.join(HEAD_ONLY_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| R2mError::io(&path, e))?;
        let meta: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| R2mError::format(&path, e.to_string()))?;
        meta["base"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| R2mError::format(&path, "no `base`"))
    }
}

/// Index of each row's last real token.
pub fn last_positions(padding: &Padding) -> Vec<usize> {
    padding
        .valid
        .iter()
        .map(|row| row.iter().rposition(|&v| v).unwrap_or(0))
        .collect()
}

/// `x[b, last_b, :]` for each row's last real token.
///
/// # Shapes
/// - `x`: `[batch, seq, hidden]` -> `[batch, hidden]`
pub fn gather_last<B: Backend>(x: Tensor<B, 3>, padding: &Padding) -> Tensor<B, 2> {
    let [b, _, d] = x.dims();
    let last: Vec<i64> = last_positions(padding)
        .into_iter()
        .map(|i| i as i64)
        .collect();
    let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(last, [b]), &x.device())
        .reshape([b, 1, 1])
        .expand([b, 1, d]);
    x.gather(1, idx).reshape([b, d])
}
