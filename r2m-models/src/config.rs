//! Model configuration: one runtime [`ModelConfig`] for every supported architecture, read from an HF
//! `config.json` or from GGUF metadata, and written back as an HF `config.json`.

use std::path::Path;

use r2m_core::{R2mError, Result};
use serde::Deserialize;
use serde_json::{json, Value};

/// The decoder families r2m implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Architecture {
    /// Llama, Llama-3, SmolLM2, Mistral-style: RMSNorm, SwiGLU, GQA, no biases.
    Llama,
    /// Qwen2 / Qwen2.5: Llama plus q/k/v biases.
    Qwen2,
    /// GPT-NeoX / Pythia: LayerNorm, fused QKV with biases, partial rotary, GELU MLP,
    /// (optionally) parallel residual.
    GptNeoX,
}

impl Architecture {
    /// The HF `model_type` string.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
            Architecture::GptNeoX => "gpt_neox",
        }
    }

    /// The HF `architectures[0]` class name for a causal LM.
    pub fn causal_lm_class(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::GptNeoX => "GPTNeoXForCausalLM",
        }
    }

    /// Parse an HF `model_type` or GGUF `general.architecture`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "llama" | "mistral" | "smollm" => Some(Architecture::Llama),
            "qwen2" => Some(Architecture::Qwen2),
            "gpt_neox" | "gptneox" => Some(Architecture::GptNeoX),
            _ => None,
        }
    }

    /// Names accepted by [`Architecture::parse`], for error messages.
    pub const SUPPORTED: &'static str = "llama, mistral, qwen2, gpt_neox";
}

/// Llama-3 RoPE frequency scaling (`rope_scaling.rope_type = "llama3"`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// The hidden activation of the MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Activation {
    /// SiLU-gated (SwiGLU) MLP: `down(silu(gate(x)) * up(x))`.
    Silu,
    /// Exact (erf) GELU in a plain two-layer MLP.
    Gelu,
    /// tanh-approximated GELU in a plain two-layer MLP.
    GeluTanh,
}

/// Everything the forward pass needs to know about a checkpoint.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModelConfig {
    pub arch: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Number of leading dimensions of each head that RoPE rotates (`head_dim` unless partial).
    pub rotary_dim: usize,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry biases (Qwen2, GPT-NeoX).
    pub qkv_bias: bool,
    /// The output projection and the MLP carry biases (GPT-NeoX).
    pub out_bias: bool,
    /// GPT-NeoX parallel residual: `x + attn(ln1(x)) + mlp(ln2(x))`.
    pub parallel_residual: bool,
    pub activation: Activation,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

/// The subset of HF `config.json` fields r2m reads. Names follow `transformers`.
#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    rms_norm_eps: Option<f64>,
    layer_norm_eps: Option<f64>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    hidden_act: Option<String>,
    // GPT-NeoX
    rotary_pct: Option<f64>,
    partial_rotary_factor: Option<f64>,
    rotary_emb_base: Option<f64>,
    use_parallel_residual: Option<bool>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
}

fn first_id(v: &Option<Value>) -> Option<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| x as u32),
        Some(Value::Array(a)) => a.first().and_then(|x| x.as_u64()).map(|x| x as u32),
        _ => None,
    }
}

impl ModelConfig {
    /// Read an HF `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| R2mError::io(path, e))?;
        Self::from_hf_json(&text, path)
    }

    /// Parse the text of an HF `config.json`; `path` is used in error messages.
    pub fn from_hf_json(text: &str, path: &Path) -> Result<Self> {
        let hf: HfConfig = serde_json::from_str(text)
            .map_err(|e| R2mError::format(path, format!("line {}: {e}", e.line())))?;
        let arch_name = hf
            .model_type
            .clone()
            .or_else(|| hf.architectures.as_ref().and_then(|a| a.first().cloned()))
            .unwrap_or_default();
        let arch =
            Architecture::parse(&arch_name).ok_or_else(|| R2mError::UnknownArchitecture {
                path: path.to_path_buf(),
                arch: arch_name.clone(),
                supported: Architecture::SUPPORTED.into(),
            })?;
        let head_dim = hf
            .head_dim
            .unwrap_or(hf.hidden_size / hf.num_attention_heads);
        // transformers 5 moved rope settings into `rope_parameters`; accept both.
        let rope = hf.rope_parameters.as_ref().or(hf.rope_scaling.as_ref());
        let rope_theta = hf
            .rope_theta
            .or(hf.rotary_emb_base)
            .or_else(|| {
                rope.and_then(|r| r.get("rope_theta"))
                    .and_then(Value::as_f64)
            })
            .unwrap_or(10_000.0);
        let rope_scaling = match rope {
            Some(r) => {
                let kind = r
                    .get("rope_type")
                    .or_else(|| r.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                match kind {
                    "default" => None,
                    "llama3" => Some(serde_json::from_value::<Llama3RopeScaling>(r.clone()).map_err(
                        |e| R2mError::format(path, format!("rope_scaling (llama3): {e}")),
                    )?),
                    other => {
                        return Err(R2mError::format(
                            path,
                            format!("rope_scaling type `{other}` is not supported (supported: default, llama3)"),
                        ))
                    }
                }
            }
            None => None,
        };
        let rotary_pct = hf
            .rotary_pct
            .or(hf.partial_rotary_factor)
            .or_else(|| {
                rope.and_then(|r| r.get("partial_rotary_factor"))
                    .and_then(Value::as_f64)
            })
            .unwrap_or(1.0);
        let activation = match hf.hidden_act.as_deref() {
            None | Some("silu") | Some("swish") if arch != Architecture::GptNeoX => {
                Activation::Silu
            }
            None | Some("gelu") => Activation::Gelu,
            Some("gelu_new") | Some("gelu_pytorch_tanh") | Some("gelu_fast") => {
                Activation::GeluTanh
            }
            Some(other) => {
                return Err(R2mError::format(
                    path,
                    format!(
                        "hidden_act `{other}` is not supported for {}",
                        arch.model_type()
                    ),
                ))
            }
        };
        let neox = arch == Architecture::GptNeoX;
        Ok(ModelConfig {
            arch,
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            num_kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            head_dim,
            rotary_dim: ((head_dim as f64) * rotary_pct) as usize,
            rope_theta,
            rope_scaling,
            norm_eps: if neox {
                hf.layer_norm_eps.unwrap_or(1e-5)
            } else {
                hf.rms_norm_eps.unwrap_or(1e-6)
            },
            max_position_embeddings: hf.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: hf
                .tie_word_embeddings
                .unwrap_or(!neox && arch != Architecture::Llama),
            qkv_bias: match arch {
                Architecture::Qwen2 | Architecture::GptNeoX => true,
                Architecture::Llama => hf.attention_bias.unwrap_or(false),
            },
            out_bias: neox || (arch == Architecture::Llama && hf.attention_bias.unwrap_or(false)),
            parallel_residual: neox && hf.use_parallel_residual.unwrap_or(true),
            activation,
            bos_token_id: first_id(&hf.bos_token_id),
            eos_token_id: first_id(&hf.eos_token_id),
        })
    }

    /// The HF `config.json` that describes this model (what `transformers` needs to load it).
    pub fn to_hf_json(&self) -> Value {
        let mut v = json!({
            "architectures": [self.arch.causal_lm_class()],
            "model_type": self.arch.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": "float32",
        });
        let m = v.as_object_mut().expect("object");
        if let Some(id) = self.bos_token_id {
            m.insert("bos_token_id".into(), json!(id));
        }
        if let Some(id) = self.eos_token_id {
            m.insert("eos_token_id".into(), json!(id));
        }
        match self.arch {
            Architecture::GptNeoX => {
                m.insert("layer_norm_eps".into(), json!(self.norm_eps));
                m.insert(
                    "rotary_pct".into(),
                    json!(self.rotary_dim as f64 / self.head_dim as f64),
                );
                m.insert("rotary_emb_base".into(), json!(self.rope_theta));
                m.insert(
                    "use_parallel_residual".into(),
                    json!(self.parallel_residual),
                );
                m.insert("attention_bias".into(), json!(true));
                let act = match self.activation {
                    Activation::GeluTanh => "gelu_new",
                    _ => "gelu",
                };
                m.insert("hidden_act".into(), json!(act));
            }
            Architecture::Llama | Architecture::Qwen2 => {
                m.insert("num_key_value_heads".into(), json!(self.num_kv_heads));
                m.insert("head_dim".into(), json!(self.head_dim));
                m.insert("rms_norm_eps".into(), json!(self.norm_eps));
                m.insert("rope_theta".into(), json!(self.rope_theta));
                m.insert("hidden_act".into(), json!("silu"));
                if self.arch == Architecture::Llama {
                    m.insert("attention_bias".into(), json!(self.qkv_bias));
                    m.insert("mlp_bias".into(), json!(false));
                }
                if let Some(s) = &self.rope_scaling {
                    m.insert(
                        "rope_scaling".into(),
                        json!({
                            "rope_type": "llama3",
                            "factor": s.factor,
                            "low_freq_factor": s.low_freq_factor,
                            "high_freq_factor": s.high_freq_factor,
                            "original_max_position_embeddings": s.original_max_position_embeddings,
                        }),
                    );
                }
            }
        }
        v
    }

    /// RoPE inverse frequencies, `[rotary_dim / 2]`, in f32 exactly as `transformers` computes them
    /// (including Llama-3 frequency scaling).
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let dim = self.rotary_dim;
        let base = self.rope_theta as f32;
        let inv: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1.0 / base.powf(i as f32 / dim as f32))
            .collect();
        let Some(s) = &self.rope_scaling else {
            return inv;
        };
        let old = s.original_max_position_embeddings as f32;
        let (factor, low, high) = (
            s.factor as f32,
            s.low_freq_factor as f32,
            s.high_freq_factor as f32,
        );
        let low_freq_wavelen = old / low;
        let high_freq_wavelen = old / high;
        inv.into_iter()
            .map(|f| {
                let wavelen = 2.0 * std::f32::consts::PI / f;
                if wavelen < high_freq_wavelen {
                    f
                } else if wavelen > low_freq_wavelen {
                    f / factor
                } else {
                    let smooth = (old / wavelen - low) / (high - low);
                    (1.0 - smooth) * f / factor + smooth * f
                }
            })
            .collect()
    }

    /// A tiny random-weight Llama config for fast unit tests (never proof that a feature works).
    pub fn tiny_llama() -> Self {
        ModelConfig {
            arch: Architecture::Llama,
            vocab_size: 97,
            hidden_size: 32,
            intermediate_size: 64,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 8,
            rotary_dim: 8,
            rope_theta: 10_000.0,
            rope_scaling: None,
            norm_eps: 1e-5,
            max_position_embeddings: 256,
            tie_word_embeddings: true,
            qkv_bias: false,
            out_bias: false,
            parallel_residual: false,
            activation: Activation::Silu,
            bos_token_id: Some(1),
            eos_token_id: Some(2),
        }
    }
}
