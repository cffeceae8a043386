//! Loading a model and its tokenizer from any supported source, and saving back to an HF directory.

use std::path::Path;

use burn::tensor::backend::Backend;
use r2m_core::{R2mError, Result};

use crate::config::ModelConfig;
use crate::gguf::GgufFile;
use crate::hub::{resolve_model, ModelSource};
use crate::model::CausalLm;
use crate::tokenizer::Tokenizer;
use crate::weights::{load_safetensors_dir, save_safetensors, WeightMap};

/// A model with its tokenizer (`None` for a checkpoint directory without `tokenizer.json`).
#[derive(Debug)]
pub struct Loaded<B: Backend> {
    pub model: CausalLm<B>,
    pub tokenizer: Option<Tokenizer>,
}

impl<B: Backend> Loaded<B> {
    /// The tokenizer, or an error naming the checkpoint that lacks one.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| R2mError::Tokenizer {
            path: "model".into(),
            msg: "this checkpoint has no tokenizer.json".into(),
        })
    }
}

/// Load `spec`: `smollm2`, an HF directory, a `.gguf` file, or `random:CONFIG.json` (made-up
/// weights, for benchmarks).
pub fn load_model<B: Backend>(spec: &str, device: &B::Device) -> Result<Loaded<B>> {
    match resolve_model(spec)? {
        ModelSource::HfDir(dir) => load_hf_dir(&dir, device),
        ModelSource::Gguf(path) => load_gguf(&path, device),
        ModelSource::Random(config) => {
            let cfg = ModelConfig::from_hf_file(&config)?;
            let mut weights = WeightMap::random(&config, 0);
            let model = CausalLm::from_weights(&cfg, &mut weights, device)?;
            Ok(Loaded {
                model,
                tokenizer: None,
            })
        }
    }
}

/// Load an HF checkpoint directory (`config.json`, safetensors, optional tokenizer files).
pub fn load_hf_dir<B: Backend>(dir: &Path, device: &B::Device) -> Result<Loaded<B>> {
    let config = ModelConfig::from_hf_file(&dir.join("config.json"))?;
    let mut weights = load_safetensors_dir(dir)?;
    let model = CausalLm::from_weights(&config, &mut weights, device)?;
    let tokenizer = if dir.join("tokenizer.json").exists() {
        Some(Tokenizer::from_hf_dir(dir)?)
    } else {
        None
    };
    Ok(Loaded { model, tokenizer })
}

/// Load a GGUF file (weights dequantised to f32, tokenizer and chat template from its metadata).
pub fn load_gguf<B: Backend>(path: &Path, device: &B::Device) -> Result<Loaded<B>> {
    let gguf = GgufFile::open(path)?;
    let config = gguf.model_config()?;
    let mut weights = gguf.weight_map(&config)?;
    let model = CausalLm::from_weights(&config, &mut weights, device)?;
    let tokenizer = Some(Tokenizer::from_gguf(&gguf)?);
    Ok(Loaded { model, tokenizer })
}

/// Save as an HF directory `transformers` loads unchanged: `config.json`, f32 `model.safetensors`,
/// and the tokenizer files when there is a tokenizer.
pub fn save_hf_dir<B: Backend>(
    model: &CausalLm<B>,
    tokenizer: Option<&Tokenizer>,
    dir: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| R2mError::io(dir, e))?;
    let cfg_path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&model.config.to_hf_json()).expect("json");
    std::fs::write(&cfg_path, text).map_err(|e| R2mError::io(&cfg_path, e))?;
    save_safetensors(&dir.join("model.safetensors"), &model.to_weights())?;
    if let Some(t) = tokenizer {
        t.save_hf(dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reward::RewardModel;
    use crate::weights::RawTensor;
    use r2m_core::testing::TestBackend;

    /// A tiny random Llama ([`ModelConfig::tiny_llama`]).
    fn tiny_model() -> CausalLm<TestBackend> {
        let mut weights = WeightMap::random("tiny-llama", 7);
        CausalLm::from_weights(
            &ModelConfig::tiny_llama(),
            &mut weights,
            &Default::default(),
        )
        .unwrap()
    }

    /// `tensors` with the values of `name` at `bad`'s indices replaced, written over `dir`'s
    /// `model.safetensors`.
    fn write_with(dir: &Path, tensors: &[(String, RawTensor)], name: &str, bad: &[(usize, f32)]) {
        let mut tensors = tensors.to_vec();
        let (_, t) = tensors.iter_mut().find(|(n, _)| n == name).unwrap();
        for &(i, v) in bad {
            t.data[i] = v;
        }
        save_safetensors(&dir.join("model.safetensors"), &tensors).unwrap();
    }

    #[test]
    fn a_checkpoint_holding_a_nan_or_an_infinity_is_refused_naming_the_tensor() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, dev) = (tmp.path(), Default::default());
        let model = tiny_model();
        save_hf_dir(&model, None, dir).unwrap();
        let tensors = model.to_weights();
        // The clean checkpoint loads, with the same weights.
        let loaded = load_hf_dir::<TestBackend>(dir, &dev).unwrap();
        for ((name, want), (got_name, got)) in tensors.iter().zip(loaded.model.to_weights()) {
            assert_eq!((name, &want.data), (&got_name, &got.data));
        }
        // One NaN and one infinity in one tensor: the first of them is named.
        let name = "model.layers.1.mlp.up_proj.weight";
        for (bad, want) in [
            (
                [(1234, f32::NAN), (1500, f32::INFINITY)],
                "NaN at index 1234",
            ),
            (
                [(17, f32::NEG_INFINITY), (1234, f32::NAN)],
                "-inf at index 17",
            ),
        ] {
            write_with(dir, &tensors, name, &bad);
            let err = load_hf_dir::<TestBackend>(dir, &dev).unwrap_err();
            let want = format!("model.safetensors: tensor `{name}` holds {want}");
            assert!(err.to_string().contains(&want), "{err}");
        }
    }

    #[test]
    fn a_reward_model_with_a_nan_in_its_head_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, dev) = (tmp.path(), Default::default());
        let rm = RewardModel::from_backbone(tiny_model(), 0);
        rm.save_hf_dir(None, dir).unwrap();
        RewardModel::<TestBackend>::load_hf_dir(dir, &dev).unwrap();
        let tensors: Vec<(String, RawTensor)> = {
            let path = dir.join("model.safetensors");
            let mut map = WeightMap::new(&path);
            crate::weights::load_safetensors_file(&path, &mut map).unwrap();
            map.tensors.into_iter().collect()
        };
        write_with(dir, &tensors, "score.weight", &[(3, f32::NAN)]);
        let err = RewardModel::<TestBackend>::load_hf_dir(dir, &dev).unwrap_err();
        let want = "model.safetensors: tensor `score.weight` holds NaN at index 3";
        assert!(err.to_string().contains(want), "{err}");
    }
}
