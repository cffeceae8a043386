//! Raw checkpoint tensors on the host, by HF name, before they become burn parameters.
//!
//! Every loader (safetensors, GGUF) produces a [`WeightMap`]: HF tensor names mapped to f32 data in
//! HF layout (row-major, `[out, in]` for linear weights). The model then takes each tensor by name,
//! with the shape its config implies, so one construction path serves every file format.
//!
//! The names the model reads are Llama's (`model.layers.0.self_attn.q_proj.weight`); the mapping
//! from other layouts lives here too: GPT-NeoX's fused `query_key_value` is split into q, k and v
//! on load and fused back on export (`split_neox_weights`, `fuse_neox_weights`). (GGUF names
//! are mapped in `gguf.rs`, as they are read.)

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::tensor::{backend::Backend, Tensor, TensorData};
use r2m_core::{R2mError, Result};

use crate::config::ModelConfig;

/// One tensor in host memory, f32, HF layout.
#[derive(Debug, Clone)]
pub struct RawTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl RawTensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { shape, data }
    }

    /// Transpose a 2-D tensor (`[r, c]` -> `[c, r]`).
    pub fn transposed(&self) -> RawTensor {
        let (r, c) = (self.shape[0], self.shape[1]);
        let mut out = vec![0f32; r * c];
        // 32x32 tiles keep both sides in cache.
        const T: usize = 32;
        for i0 in (0..r).step_by(T) {
            for j0 in (0..c).step_by(T) {
                for i in i0..(i0 + T).min(r) {
                    for j in j0..(j0 + T).min(c) {
                        out[j * r + i] = self.data[i * c + j];
                    }
                }
            }
        }
        RawTensor::new(vec![c, r], out)
    }

    /// Read a burn tensor back to the host.
    pub fn from_tensor<B: Backend, const D: usize>(t: Tensor<B, D>) -> RawTensor {
        let shape = t.dims().to_vec();
        let data = t
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .expect("f32 tensor data");
        RawTensor::new(shape, data)
    }
}

/// Named tensors from one checkpoint; `source` is the file or directory they came from.
#[derive(Debug, Default)]
pub struct WeightMap {
    pub source: PathBuf,
    pub tensors: HashMap<String, RawTensor>,
    /// When set, a tensor the map lacks is made up instead of being an error: norm weights 1,
    /// biases 0, everything else uniform with std 0.02, seeded by this value and the name.
    /// For benchmarks of an architecture without its weights (`random:CONFIG.json`).
    pub random_fill: Option<u64>,
}

impl WeightMap {
    pub fn new(source: impl Into<PathBuf>) -> Self {
        Self {
            source: source.into(),
            tensors: HashMap::new(),
            random_fill: None,
        }
    }

    /// An empty map whose every tensor is made up on request (see [`WeightMap::random_fill`]).
    pub fn random(source: impl Into<PathBuf>, seed: u64) -> Self {
        Self {
            random_fill: Some(seed),
            ..Self::new(source)
        }
    }

    pub fn insert(&mut self, name: impl Into<String>, t: RawTensor) {
        self.tensors.insert(name.into(), t);
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Remove and return the tensor `name`, checking its shape.
    pub fn take_raw(&mut self, name: &str, expected: &[usize]) -> Result<RawTensor> {
        if let (Some(seed), false) = (self.random_fill, self.tensors.contains_key(name)) {
            return Ok(made_up_tensor(name, expected, seed));
        }
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| R2mError::MissingTensor {
                path: self.source.clone(),
                name: name.to_string(),
            })?;
        if t.shape != expected {
            return Err(R2mError::ShapeMismatch {
                path: self.source.clone(),
                name: name.to_string(),
                expected: expected.to_vec(),
                got: t.shape,
            });
        }
        Ok(t)
    }

    /// A parameter of `D` dims with the given shape.
    pub fn param<B: Backend, const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
        device: &B::Device,
    ) -> Result<Param<Tensor<B, D>>> {
        let t = self.take_raw(name, &shape)?;
        Ok(Param::from_tensor(to_tensor(t, device)))
    }

    /// A linear layer's weight stored by HF as `[out, in]`, returned as burn's `[in, out]`.
    pub fn linear_weight<B: Backend>(
        &mut self,
        name: &str,
        d_in: usize,
        d_out: usize,
        device: &B::Device,
    ) -> Result<Param<Tensor<B, 2>>> {
        let t = self.take_raw(name, &[d_out, d_in])?.transposed();
        Ok(Param::from_tensor(to_tensor(t, device)))
    }

    /// Names of tensors nobody took: a checkpoint with leftovers is probably not what the config says.
    pub fn leftover_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.tensors.keys().cloned().collect();
        names.sort();
        names
    }
}

/// A stand-in tensor for `name`: norm weights 1, biases 0, else uniform with std 0.02.
fn made_up_tensor(name: &str, shape: &[usize], seed: u64) -> RawTensor {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    let n: usize = shape.iter().product();
    let data = if name.ends_with(".bias") {
        vec![0.0; n]
    } else if name.contains("norm") {
        vec![1.0; n]
    } else {
        // FNV-1a of the name, so each tensor gets its own stream.
        let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        let mut rng = StdRng::seed_from_u64(seed ^ h);
        let a = 0.02 * 3f32.sqrt();
        (0..n).map(|_| rng.random_range(-a..a)).collect()
    };
    RawTensor::new(shape.to_vec(), data)
}

/// Upload a host tensor to `device`.
pub fn to_tensor<B: Backend, const D: usize>(t: RawTensor, device: &B::Device) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(t.data, t.shape), device)
}

/// A tensor's f32 values as a loader converts them, and whether every one of them is finite,
/// noted as they are converted: a block at a time, while the block is still in cache, so the check
/// adds no pass over the weights in memory.
///
/// A NaN or an infinity in a checkpoint (a bad export, a run saved after it diverged) would load
/// and generate without a word; [`CheckedValues::finish`] refuses it instead, naming the file, the
/// tensor and the first value that is not finite.
#[derive(Debug)]
pub(crate) struct CheckedValues {
    data: Vec<f32>,
    /// How many of `data`'s values were checked.
    checked: usize,
    /// Whether those were all finite.
    finite: bool,
}

impl CheckedValues {
    /// Values checked at a time: 16 KiB of f32, which stay in the L1 cache from their conversion
    /// to their check.
    const BLOCK: usize = 4096;

    pub(crate) fn with_capacity(n: usize) -> Self {
        Self {
            data: Vec::with_capacity(n),
            checked: 0,
            finite: true,
        }
    }

    /// Append `values` (at most a few thousand: they are checked once a block has come in).
    #[inline]
    pub(crate) fn extend(&mut self, values: impl IntoIterator<Item = f32>) {
        self.data.extend(values);
        if self.data.len() - self.checked >= Self::BLOCK {
            self.check();
        }
    }

    /// Append the values of `raw`, little-endian words of `N` bytes each converted by `convert`,
    /// a block at a time.
    pub(crate) fn extend_from_words<const N: usize>(
        &mut self,
        raw: &[u8],
        convert: impl Fn([u8; N]) -> f32,
    ) {
        let (words, _) = raw.as_chunks::<N>();
        for block in words.chunks(Self::BLOCK) {
            self.extend(block.iter().map(|&w| convert(w)));
        }
    }

    /// Check the values appended since the last check.
    fn check(&mut self) {
        // Without an early exit, so that the loop vectorizes.
        let finite = self.data[self.checked..]
            .iter()
            .fold(true, |all, v| all & v.is_finite());
        self.finite &= finite;
        self.checked = self.data.len();
    }

    /// The values, or an error naming `path`, the tensor `name` (as the file names it) and the
    /// first value that is not finite, with its index in the tensor's row-major order.
    pub(crate) fn finish(mut self, path: &Path, name: &str) -> Result<Vec<f32>> {
        self.check();
        if self.finite {
            return Ok(self.data);
        }
        let (i, v) = self
            .data
            .iter()
            .enumerate()
            .find(|(_, v)| !v.is_finite())
            .expect("a value that is not finite was seen");
        Err(R2mError::format(
            path,
            format!(
                "tensor `{name}` holds {v} at index {i}: refusing weights that are not finite \
                 (a bad export, or a checkpoint saved after training diverged)"
            ),
        ))
    }

    /// The values, finite or not.
    pub(crate) fn unchecked(self) -> Vec<f32> {
        self.data
    }
}

/// The values so far.
impl std::ops::Deref for CheckedValues {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        &self.data
    }
}

// ---------------------------------------------------------------------------------------------
// safetensors
// ---------------------------------------------------------------------------------------------

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| R2mError::io(path, e))
}

/// Load one `.safetensors` file into `map`, converting bf16/f16/f32 to f32; a tensor holding a NaN
/// or an infinity is refused (see [`CheckedValues`]).
pub fn load_safetensors_file(path: &Path, map: &mut WeightMap) -> Result<()> {
    use safetensors::{Dtype, SafeTensors};
    let bytes = read_file(path)?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| R2mError::format(path, format!("not a valid safetensors file: {e}")))?;
    for (name, view) in st.tensors() {
        let raw = view.data();
        let mut values = CheckedValues::with_capacity(view.shape().iter().product());
        match view.dtype() {
            Dtype::F32 => values.extend_from_words(raw, f32::from_le_bytes),
            Dtype::F16 => values.extend_from_words(raw, |b| half::f16::from_le_bytes(b).to_f32()),
            Dtype::BF16 => values.extend_from_words(raw, |b| half::bf16::from_le_bytes(b).to_f32()),
            other => {
                return Err(R2mError::format(
                    path,
                    format!("tensor `{name}` has dtype {other:?}; supported: F32, F16, BF16"),
                ))
            }
        };
        // Buffers are dropped unread (`is_buffer`): what they hold does not matter.
        let data = if is_buffer(&name) {
            values.unchecked()
        } else {
            values.finish(path, &name)?
        };
        map.insert(name, RawTensor::new(view.shape().to_vec(), data));
    }
    Ok(())
}

/// Load the weights of an HF directory: `model.safetensors`, or the shards listed in
/// `model.safetensors.index.json`.
pub fn load_safetensors_dir(dir: &Path) -> Result<WeightMap> {
    let mut map = WeightMap::new(dir);
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if single.exists() {
        load_safetensors_file(&single, &mut map)?;
    } else if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| R2mError::io(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| R2mError::format(&index, format!("line {}: {e}", e.line())))?;
        let wm = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| R2mError::format(&index, "no `weight_map` object"))?;
        let mut shards: Vec<&str> = wm.values().filter_map(|s| s.as_str()).collect();
        shards.sort();
        shards.dedup();
        for shard in shards {
            load_safetensors_file(&dir.join(shard), &mut map)?;
        }
        for name in wm.keys() {
            if !map.contains(name) {
                return Err(R2mError::MissingTensor {
                    path: index.clone(),
                    name: name.clone(),
                });
            }
        }
    } else {
        return Err(R2mError::format(
            dir,
            "no model.safetensors or model.safetensors.index.json in this directory",
        ));
    }
    map.source = dir.to_path_buf();
    Ok(map)
}

/// Write `tensors` as one f32 `model.safetensors` file.
pub fn save_safetensors(path: &Path, tensors: &[(String, RawTensor)]) -> Result<()> {
    use safetensors::{tensor::TensorView, Dtype};
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(n, t)| {
            let b: Vec<u8> = t.data.iter().flat_map(|x| x.to_le_bytes()).collect();
            (n.clone(), b, t.shape.clone())
        })
        .collect();
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(n, b, s)| {
            let view = TensorView::new(Dtype::F32, s.clone(), b).expect("consistent view");
            (n.clone(), view)
        })
        .collect();
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    safetensors::serialize_to_file(views, Some(meta), path)
        .map_err(|e| R2mError::format(path, format!("writing safetensors: {e}")))
}

// ---------------------------------------------------------------------------------------------
// HF names the model does not read as they are: exporters' buffers, GPT-NeoX's layout
// ---------------------------------------------------------------------------------------------

/// Whether `name` is a buffer some exporters store next to the weights (rotary tables, attention
/// masks): not a parameter, so the model drops it.
pub(crate) fn is_buffer(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
        || name.ends_with(".attention.bias")
        || name.ends_with(".attention.masked_bias")
}

/// GPT-NeoX HF names -> the Llama-style names
/// [`CausalLm::from_weights`](crate::model::CausalLm::from_weights) reads, splitting the fused
/// `query_key_value` (output rows laid out `[heads, 3, head_dim]`) into q/k/v.
pub(crate) fn split_neox_weights(cfg: &ModelConfig, w: &mut WeightMap) -> Result<()> {
    let (h, hd, d) = (cfg.num_heads, cfg.head_dim, cfg.hidden_size);
    let renames = [
        ("gpt_neox.embed_in.weight", "gpt_neox.embed_tokens.weight"),
        ("gpt_neox.final_layer_norm.weight", "gpt_neox.norm.weight"),
        ("gpt_neox.final_layer_norm.bias", "gpt_neox.norm.bias"),
        ("embed_out.weight", "lm_head.weight"),
    ];
    for (from, to) in renames {
        if let Some(t) = w.tensors.remove(from) {
            w.insert(to, t);
        }
    }
    for i in 0..cfg.num_layers {
        let l = format!("gpt_neox.layers.{i}");
        for (from, to) in [
            ("attention.dense", "self_attn.o_proj"),
            ("mlp.dense_h_to_4h", "mlp.up_proj"),
            ("mlp.dense_4h_to_h", "mlp.down_proj"),
        ] {
            for suffix in ["weight", "bias"] {
                if let Some(t) = w.tensors.remove(&format!("{l}.{from}.{suffix}")) {
                    w.insert(format!("{l}.{to}.{suffix}"), t);
                }
            }
        }
        let qkv_w = w.take_raw(
            &format!("{l}.attention.query_key_value.weight"),
            &[3 * h * hd, d],
        )?;
        let qkv_b = w.take_raw(
            &format!("{l}.attention.query_key_value.bias"),
            &[3 * h * hd],
        )?;
        for (j, name) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
            let (mut wd, mut bd) = (Vec::with_capacity(h * hd * d), Vec::with_capacity(h * hd));
            for head in 0..h {
                let row0 = head * 3 * hd + j * hd;
                wd.extend_from_slice(&qkv_w.data[row0 * d..(row0 + hd) * d]);
                bd.extend_from_slice(&qkv_b.data[row0..row0 + hd]);
            }
            w.insert(
                format!("{l}.self_attn.{name}.weight"),
                RawTensor::new(vec![h * hd, d], wd),
            );
            w.insert(
                format!("{l}.self_attn.{name}.bias"),
                RawTensor::new(vec![h * hd], bd),
            );
        }
    }
    Ok(())
}

/// The inverse of [`split_neox_weights`], for saving in GPT-NeoX's own layout.
pub(crate) fn fuse_neox_weights(
    cfg: &ModelConfig,
    tensors: Vec<(String, RawTensor)>,
) -> Vec<(String, RawTensor)> {
    let (h, hd, d) = (cfg.num_heads, cfg.head_dim, cfg.hidden_size);
    let mut map: HashMap<String, RawTensor> = tensors.into_iter().collect();
    let mut out = Vec::new();
    fn mv(
        map: &mut HashMap<String, RawTensor>,
        out: &mut Vec<(String, RawTensor)>,
        from: &str,
        to: &str,
    ) {
        if let Some(t) = map.remove(from) {
            out.push((to.to_string(), t));
        }
    }
    mv(
        &mut map,
        &mut out,
        "gpt_neox.embed_tokens.weight",
        "gpt_neox.embed_in.weight",
    );
    for i in 0..cfg.num_layers {
        let l = format!("gpt_neox.layers.{i}");
        for s in ["weight", "bias"] {
            mv(
                &mut map,
                &mut out,
                &format!("{l}.input_layernorm.{s}"),
                &format!("{l}.input_layernorm.{s}"),
            );
            mv(
                &mut map,
                &mut out,
                &format!("{l}.post_attention_layernorm.{s}"),
                &format!("{l}.post_attention_layernorm.{s}"),
            );
        }
        let take = |map: &mut HashMap<String, RawTensor>, n: &str| {
            map.remove(&format!("{l}.self_attn.{n}"))
                .expect("q/k/v present")
        };
        let ws = [
            take(&mut map, "q_proj.weight"),
            take(&mut map, "k_proj.weight"),
            take(&mut map, "v_proj.weight"),
        ];
        let bs = [
            take(&mut map, "q_proj.bias"),
            take(&mut map, "k_proj.bias"),
            take(&mut map, "v_proj.bias"),
        ];
        let (mut wd, mut bd) = (
            Vec::with_capacity(3 * h * hd * d),
            Vec::with_capacity(3 * h * hd),
        );
        for head in 0..h {
            for j in 0..3 {
                wd.extend_from_slice(&ws[j].data[head * hd * d..(head + 1) * hd * d]);
                bd.extend_from_slice(&bs[j].data[head * hd..(head + 1) * hd]);
            }
        }
        out.push((
            format!("{l}.attention.query_key_value.weight"),
            RawTensor::new(vec![3 * h * hd, d], wd),
        ));
        out.push((
            format!("{l}.attention.query_key_value.bias"),
            RawTensor::new(vec![3 * h * hd], bd),
        ));
        for s in ["weight", "bias"] {
            mv(
                &mut map,
                &mut out,
                &format!("{l}.self_attn.o_proj.{s}"),
                &format!("{l}.attention.dense.{s}"),
            );
            mv(
                &mut map,
                &mut out,
                &format!("{l}.mlp.up_proj.{s}"),
                &format!("{l}.mlp.dense_h_to_4h.{s}"),
            );
            mv(
                &mut map,
                &mut out,
                &format!("{l}.mlp.down_proj.{s}"),
                &format!("{l}.mlp.dense_4h_to_h.{s}"),
            );
        }
    }
    mv(
        &mut map,
        &mut out,
        "gpt_neox.norm.weight",
        "gpt_neox.final_layer_norm.weight",
    );
    mv(
        &mut map,
        &mut out,
        "gpt_neox.norm.bias",
        "gpt_neox.final_layer_norm.bias",
    );
    mv(&mut map, &mut out, "lm_head.weight", "embed_out.weight");
    debug_assert!(
        map.is_empty(),
        "unmapped: {:?}",
        map.keys().collect::<Vec<_>>()
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::{tensor::TensorView, Dtype};

    /// Write `(name, dtype, shape, little-endian bytes)` tensors as one safetensors file.
    fn write(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
        let views: Vec<(String, TensorView)> = tensors
            .iter()
            .map(|(n, dtype, shape, bytes)| {
                let view = TensorView::new(*dtype, shape.clone(), bytes).expect("valid view");
                (n.to_string(), view)
            })
            .collect();
        safetensors::serialize_to_file(views, None, path).expect("written");
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn a_nan_or_an_infinity_is_refused_in_every_stored_dtype_naming_the_first() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("model.safetensors");
        let f16 = |v: [f32; 4]| -> Vec<u8> {
            v.iter()
                .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                .collect()
        };
        let bf16 = |v: [f32; 4]| -> Vec<u8> {
            v.iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                .collect()
        };
        let (nan, inf) = (f32::NAN, f32::INFINITY);
        let cases = [
            (
                Dtype::F32,
                f32_bytes(&[1.0, -2.0, nan, inf]),
                "NaN at index 2",
            ),
            (Dtype::F16, f16([1.0, -inf, nan, 0.0]), "-inf at index 1"),
            (Dtype::BF16, bf16([1.0, 2.0, 3.0, inf]), "inf at index 3"),
        ];
        for (dtype, bytes, want) in cases {
            let name = "model.layers.0.mlp.up_proj.weight";
            write(
                &path,
                &[
                    (
                        "model.norm.weight",
                        Dtype::F32,
                        vec![2],
                        f32_bytes(&[0.5, 1.5]),
                    ),
                    (name, dtype, vec![2, 2], bytes),
                ],
            );
            let err = load_safetensors_file(&path, &mut WeightMap::new(&path))
                .unwrap_err()
                .to_string();
            let want = format!("model.safetensors: tensor `{name}` holds {want}");
            assert!(err.contains(&want), "{dtype:?}: {err}");
        }
    }

    /// GPT-NeoX's fused QKV (rows `[heads, 3, head_dim]`) splits into q, k and v by head, and
    /// fusing them back (with every other name mapped back) gives the checkpoint's tensors.
    #[test]
    fn neox_qkv_split_and_fuse_are_inverse() {
        use crate::config::Architecture;
        let cfg = ModelConfig {
            arch: Architecture::GptNeoX,
            num_layers: 1,
            num_heads: 2,
            num_kv_heads: 2,
            head_dim: 3,
            hidden_size: 6,
            ..ModelConfig::tiny_llama()
        };
        let (h, hd, d) = (2, 3, 6);
        let counting = |shape: Vec<usize>, from: usize| {
            let n = shape.iter().product::<usize>();
            RawTensor::new(shape, (from..from + n).map(|x| x as f32).collect())
        };
        let l = "gpt_neox.layers.0";
        let hf: Vec<(String, RawTensor)> = [
            ("gpt_neox.embed_in.weight".to_string(), vec![5, d]),
            (format!("{l}.input_layernorm.weight"), vec![d]),
            (
                format!("{l}.attention.query_key_value.weight"),
                vec![3 * h * hd, d],
            ),
            (
                format!("{l}.attention.query_key_value.bias"),
                vec![3 * h * hd],
            ),
            (format!("{l}.attention.dense.weight"), vec![d, h * hd]),
            (format!("{l}.mlp.dense_h_to_4h.bias"), vec![4]),
            ("gpt_neox.final_layer_norm.weight".to_string(), vec![d]),
            ("embed_out.weight".to_string(), vec![5, d]),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape))| (name, counting(shape, 1000 * i)))
        .collect();
        let mut map = WeightMap::new("neox");
        for (name, t) in &hf {
            map.insert(name.clone(), t.clone());
        }
        split_neox_weights(&cfg, &mut map).unwrap();
        // Head 1's key: rows 3 hd + hd .. 3 hd + 2 hd of the fused weight.
        let qkv = &hf[2].1.data;
        let k = &map.tensors[&format!("{l}.self_attn.k_proj.weight")];
        assert_eq!(k.shape, [h * hd, d]);
        assert_eq!(
            k.data[hd * d..],
            qkv[(3 * hd + hd) * d..(3 * hd + 2 * hd) * d]
        );
        assert!(map.contains(&format!("{l}.mlp.up_proj.bias")));
        assert!(map.contains("lm_head.weight") && map.contains("gpt_neox.norm.weight"));
        let fused = fuse_neox_weights(&cfg, map.tensors.into_iter().collect());
        let mut got: Vec<(String, Vec<usize>, Vec<f32>)> = fused
            .into_iter()
            .map(|(n, t)| (n, t.shape, t.data))
            .collect();
        let mut want: Vec<(String, Vec<usize>, Vec<f32>)> =
            hf.into_iter().map(|(n, t)| (n, t.shape, t.data)).collect();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        want.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(got, want);
    }

    #[test]
    fn finite_tensors_load_and_so_do_buffers_the_model_drops() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("model.safetensors");
        let halves: Vec<u8> = [0.5f32, -1.0]
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect();
        let mask = "gpt_neox.layers.0.attention.masked_bias";
        write(
            &path,
            &[
                ("a", Dtype::F32, vec![3], f32_bytes(&[1.0, -2.0, 3.5])),
                ("b", Dtype::BF16, vec![2], halves),
                (mask, Dtype::F32, vec![1], f32_bytes(&[f32::NEG_INFINITY])),
            ],
        );
        let mut map = WeightMap::new(&path);
        load_safetensors_file(&path, &mut map).unwrap();
        assert_eq!(map.tensors["a"].data, [1.0, -2.0, 3.5]);
        assert_eq!(map.tensors["b"].data, [0.5, -1.0]);
        assert!(is_buffer(mask) && map.contains(mask));
    }
}
