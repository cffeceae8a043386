//! GGUF v2/v3 reader: metadata, tensor directory, and dequantisation of F32, F16, BF16, Q8_0,
//! Q4_0 and Q4_1 tensors to f32 in HF layout.
//!
//! Layout notes (from the GGUF spec and llama.cpp's converter):
//! - tensor dims are stored innermost first (`ne[0]` = columns), so the HF shape is the reverse;
//! - quantised blocks hold 32 values; a Q4 byte holds value `j` in its low nibble and `j + 16` in
//!   its high nibble;
//! - for `llama` files the converter permuted the rows of `attn_q`/`attn_k` so llama.cpp's
//!   adjacent-pair RoPE reproduces HF's rotate-half RoPE; [`unpermute_rope_rows`] undoes it.
//!   (`qwen2` files use rotate-half RoPE in llama.cpp too and are not permuted.)

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use r2m_core::{R2mError, Result};

use crate::config::{Activation, Architecture, ModelConfig};
use crate::weights::{CheckedValues, RawTensor, WeightMap};

/// A metadata value.
#[derive(Debug, Clone)]
pub enum GgufValue {
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
}

impl GgufValue {
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            GgufValue::U64(v) => Some(*v),
            GgufValue::I64(v) if *v >= 0 => Some(*v as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            GgufValue::F64(v) => Some(*v),
            GgufValue::U64(v) => Some(*v as f64),
            GgufValue::I64(v) => Some(*v as f64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// GGML tensor types r2m can dequantise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    BF16,
}

impl GgmlType {
    fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// Bytes taken by `n` values.
    fn byte_size(self, n: usize) -> usize {
        match self {
            GgmlType::F32 => n * 4,
            GgmlType::F16 | GgmlType::BF16 => n * 2,
            GgmlType::Q4_0 => n / 32 * 18,
            GgmlType::Q4_1 => n / 32 * 20,
            GgmlType::Q8_0 => n / 32 * 34,
        }
    }

    fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            _ => 32,
        }
    }
}

/// One entry of the tensor directory.
#[derive(Debug, Clone)]
pub struct GgufTensorInfo {
    pub name: String,
    /// HF order (outermost first).
    pub shape: Vec<usize>,
    pub ggml_type: u32,
    /// Offset from the start of the data section.
    pub offset: u64,
}

/// A parsed GGUF file held in memory.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: HashMap<String, GgufValue>,
    pub tensors: Vec<GgufTensorInfo>,
    data_start: usize,
    bytes: memmap2::Mmap,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if self
            .pos
            .checked_add(n)
            .is_none_or(|end| end > self.buf.len())
        {
            return Err(R2mError::format(
                self.path,
                format!(
                    "truncated GGUF: reading {what} at byte {} needs {n} bytes, file has {}",
                    self.pos,
                    self.buf.len()
                ),
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)? as usize;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| R2mError::format(self.path, format!("{what} is not valid UTF-8")))
    }
    fn value(&mut self, ty: u32, key: &str) -> Result<GgufValue> {
        Ok(match ty {
            0 => GgufValue::U64(self.take(1, key)?[0] as u64),
            1 => GgufValue::I64(self.take(1, key)?[0] as i8 as i64),
            2 => GgufValue::U64(u16::from_le_bytes(self.take(2, key)?.try_into().unwrap()) as u64),
            3 => GgufValue::I64(i16::from_le_bytes(self.take(2, key)?.try_into().unwrap()) as i64),
            4 => GgufValue::U64(self.u32(key)? as u64),
            5 => GgufValue::I64(self.u32(key)? as i32 as i64),
            6 => GgufValue::F64(f32::from_le_bytes(self.take(4, key)?.try_into().unwrap()) as f64),
            7 => GgufValue::Bool(self.take(1, key)?[0] != 0),
            8 => GgufValue::String(self.string(key)?),
            9 => {
                let item_ty = self.u32(key)?;
                let n = self.u64(key)? as usize;
                if n > self.buf.len() {
                    return Err(R2mError::format(
                        self.path,
                        format!("truncated or corrupt GGUF: metadata `{key}` claims {n} items, more than the file holds"),
                    ));
                }
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(item_ty, key)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64(key)?),
            11 => GgufValue::I64(self.u64(key)? as i64),
            12 => GgufValue::F64(f64::from_le_bytes(self.take(8, key)?.try_into().unwrap())),
            other => {
                return Err(R2mError::format(
                    self.path,
                    format!("metadata `{key}` has unknown value type {other} (corrupt file?)"),
                ))
            }
        })
    }
}

impl GgufFile {
    /// Open and parse the header, metadata and tensor directory of a GGUF file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| R2mError::io(path, e))?;
        // SAFETY: the file is opened read-only and not modified while mapped by this process.
        let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| R2mError::io(path, e))?;
        let mut r = Reader {
            buf: &bytes,
            pos: 0,
            path,
        };
        let magic = r.take(4, "magic")?;
        if magic != b"GGUF" {
            return Err(R2mError::format(path, "not a GGUF file (bad magic)"));
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(R2mError::format(
                path,
                format!("GGUF version {version} is not supported (2 and 3 are)"),
            ));
        }
        let n_tensors = r.u64("tensor count")? as usize;
        let n_kv = r.u64("metadata count")? as usize;
        let mut metadata = HashMap::new();
        for _ in 0..n_kv {
            let key = r.string("metadata key")?;
            let ty = r.u32(&key)?;
            let value = r.value(ty, &key)?;
            metadata.insert(key, value);
        }
        let mut tensors = Vec::with_capacity(n_tensors.min(1 << 16));
        for _ in 0..n_tensors {
            let name = r.string("tensor name")?;
            let n_dims = r.u32(&name)? as usize;
            if n_dims > 4 {
                return Err(R2mError::format(
                    path,
                    format!("tensor `{name}` has {n_dims} dims"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(r.u64(&name)? as usize);
            }
            dims.reverse();
            let ggml_type = r.u32(&name)?;
            let offset = r.u64(&name)?;
            tensors.push(GgufTensorInfo {
                name,
                shape: dims,
                ggml_type,
                offset,
            });
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(GgufValue::as_u64)
            .unwrap_or(32) as usize;
        let data_start = r.pos.div_ceil(alignment) * alignment;
        let file = GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            data_start,
            bytes,
        };
        // Check every tensor lies inside the file now, so a truncated download fails here.
        for t in &file.tensors {
            if let Some(ty) = GgmlType::from_id(t.ggml_type) {
                let n: usize = t.shape.iter().product();
                let end = file.data_start + t.offset as usize + ty.byte_size(n);
                if end > file.bytes.len() {
                    return Err(R2mError::format(
                        path,
                        format!(
                            "truncated GGUF: tensor `{}` ends at byte {end}, file has {} bytes",
                            t.name,
                            file.bytes.len()
                        ),
                    ));
                }
            }
        }
        Ok(file)
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    fn req_u64(&self, key: &str) -> Result<u64> {
        self.get(key)
            .and_then(GgufValue::as_u64)
            .ok_or_else(|| R2mError::format(&self.path, format!("metadata `{key}` is missing")))
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(GgufValue::as_str)
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> &str {
        self.get_str("general.architecture").unwrap_or("")
    }

    /// Dequantise one tensor to f32 (HF layout); one holding a NaN or an infinity is an error
    /// naming it (by its GGUF name) and the first such value.
    pub fn tensor(&self, info: &GgufTensorInfo) -> Result<RawTensor> {
        let ty = GgmlType::from_id(info.ggml_type).ok_or_else(|| {
            R2mError::format(
                &self.path,
                format!(
                    "tensor `{}` has GGML type {}; supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1",
                    info.name, info.ggml_type
                ),
            )
        })?;
        let n: usize = info.shape.iter().product();
        if !n.is_multiple_of(ty.block_size()) {
            return Err(R2mError::format(
                &self.path,
                format!(
                    "tensor `{}`: {n} values is not a multiple of the block size",
                    info.name
                ),
            ));
        }
        let start = self.data_start + info.offset as usize;
        let bytes = &self.bytes[start..start + ty.byte_size(n)];
        let data = dequantize(ty, bytes, n).finish(&self.path, &info.name)?;
        Ok(RawTensor::new(info.shape.clone(), data))
    }

    /// The model config implied by the metadata.
    pub fn model_config(&self) -> Result<ModelConfig> {
        let arch_name = self.architecture().to_string();
        let arch = match Architecture::parse(&arch_name) {
            Some(a @ (Architecture::Llama | Architecture::Qwen2)) => a,
            _ => {
                return Err(R2mError::UnknownArchitecture {
                    path: self.path.clone(),
                    arch: arch_name,
                    supported: "llama, qwen2 (GGUF)".into(),
                })
            }
        };
        let p = |k: &str| format!("{arch_name}.{k}");
        let hidden = self.req_u64(&p("embedding_length"))? as usize;
        let heads = self.req_u64(&p("attention.head_count"))? as usize;
        let kv_heads = self
            .get(&p("attention.head_count_kv"))
            .and_then(GgufValue::as_u64)
            .unwrap_or(heads as u64) as usize;
        let head_dim = self
            .get(&p("attention.key_length"))
            .and_then(GgufValue::as_u64)
            .map(|v| v as usize)
            .unwrap_or(hidden / heads);
        let vocab = match self.get(&p("vocab_size")).and_then(GgufValue::as_u64) {
            Some(v) => v as usize,
            None => self
                .get("tokenizer.ggml.tokens")
                .and_then(GgufValue::as_array)
                .map(|a| a.len())
                .ok_or_else(|| {
                    R2mError::format(&self.path, "neither vocab_size nor tokenizer.ggml.tokens")
                })?,
        };
        let tied = !self.tensors.iter().any(|t| t.name == "output.weight");
        Ok(ModelConfig {
            arch,
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: self.req_u64(&p("feed_forward_length"))? as usize,
            num_layers: self.req_u64(&p("block_count"))? as usize,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            rotary_dim: self
                .get(&p("rope.dimension_count"))
                .and_then(GgufValue::as_u64)
                .map(|v| v as usize)
                .unwrap_or(head_dim),
            rope_theta: self
                .get(&p("rope.freq_base"))
                .and_then(GgufValue::as_f64)
                .unwrap_or(10_000.0),
            rope_scaling: None,
            norm_eps: self
                .get(&p("attention.layer_norm_rms_epsilon"))
                .and_then(GgufValue::as_f64)
                .unwrap_or(1e-6),
            max_position_embeddings: self
                .get(&p("context_length"))
                .and_then(GgufValue::as_u64)
                .unwrap_or(2048) as usize,
            tie_word_embeddings: tied,
            qkv_bias: arch == Architecture::Qwen2,
            out_bias: false,
            parallel_residual: false,
            activation: Activation::Silu,
            bos_token_id: self
                .get("tokenizer.ggml.bos_token_id")
                .and_then(GgufValue::as_u64)
                .map(|v| v as u32),
            eos_token_id: self
                .get("tokenizer.ggml.eos_token_id")
                .and_then(GgufValue::as_u64)
                .map(|v| v as u32),
        })
    }

    /// All tensors, dequantised and renamed to HF names (`model.layers.0.self_attn.q_proj.weight`),
    /// with llama's Q/K RoPE permutation undone.
    pub fn weight_map(&self, config: &ModelConfig) -> Result<WeightMap> {
        let mut map = WeightMap::new(&self.path);
        for info in &self.tensors {
            let name = hf_name(&info.name).ok_or_else(|| {
                R2mError::format(&self.path, format!("unexpected tensor `{}`", info.name))
            })?;
            let mut t = self.tensor(info)?;
            if config.arch == Architecture::Llama {
                if name.ends_with("self_attn.q_proj.weight") {
                    t = unpermute_rope_rows(&t, config.num_heads);
                } else if name.ends_with("self_attn.k_proj.weight") {
                    t = unpermute_rope_rows(&t, config.num_kv_heads);
                }
            }
            map.insert(name, t);
        }
        Ok(map)
    }
}

/// GGUF tensor name -> HF name (llama/qwen2 layout).
fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (part, suffix) = rest.rsplit_once('.')?;
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// Undo llama.cpp's row permutation of a Q or K projection (`[n_heads * head_dim, in]`).
///
/// Within each head, the converter moved row `j * head_dim/2 + i` (HF, rotate-half) to row
/// `2 i + j` (llama.cpp, adjacent pairs). This puts them back.
pub fn unpermute_rope_rows(t: &RawTensor, n_heads: usize) -> RawTensor {
    let rows = t.shape[0];
    let cols: usize = t.shape[1..].iter().product();
    let head_dim = rows / n_heads;
    let half = head_dim / 2;
    let mut out = vec![0f32; t.data.len()];
    for h in 0..n_heads {
        for i in 0..half {
            for j in 0..2 {
                let src = h * head_dim + 2 * i + j;
                let dst = h * head_dim + j * half + i;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&t.data[src * cols..(src + 1) * cols]);
            }
        }
    }
    RawTensor::new(t.shape.clone(), out)
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantise `n` values of type `ty` from `bytes`, noting whether all are finite as they are
/// converted.
fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> CheckedValues {
    let mut out = CheckedValues::with_capacity(n);
    match ty {
        GgmlType::F32 => out.extend_from_words(bytes, f32::from_le_bytes),
        GgmlType::F16 => out.extend_from_words(bytes, |b| half::f16::from_le_bytes(b).to_f32()),
        GgmlType::BF16 => out.extend_from_words(bytes, |b| half::bf16::from_le_bytes(b).to_f32()),
        GgmlType::Q8_0 => {
            for blk in bytes.chunks_exact(34) {
                let d = f16_at(blk, 0);
                out.extend(blk[2..].iter().map(|&q| q as i8 as f32 * d));
            }
        }
        GgmlType::Q4_0 => {
            for blk in bytes.chunks_exact(18) {
                let d = f16_at(blk, 0);
                let qs = &blk[2..];
                out.extend(qs.iter().map(|&q| ((q & 0x0F) as i32 - 8) as f32 * d));
                out.extend(qs.iter().map(|&q| ((q >> 4) as i32 - 8) as f32 * d));
            }
        }
        GgmlType::Q4_1 => {
            for blk in bytes.chunks_exact(20) {
                let d = f16_at(blk, 0);
                let m = f16_at(blk, 2);
                let qs = &blk[4..];
                out.extend(qs.iter().map(|&q| (q & 0x0F) as f32 * d + m));
                out.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_1_block_dequantises_low_then_high_nibbles() {
        let mut blk = Vec::new();
        blk.extend(half::f16::from_f32(0.5).to_le_bytes());
        blk.extend(half::f16::from_f32(-1.0).to_le_bytes());
        blk.extend((0..16u8).map(|i| i | ((15 - i) << 4)));
        let v = dequantize(GgmlType::Q4_1, &blk, 32);
        assert_eq!(v[0], -1.0);
        assert_eq!(v[3], 0.5);
        assert_eq!(v[16], 15.0 * 0.5 - 1.0);
        assert_eq!(v[31], -1.0);
    }

    #[test]
    fn q8_0_and_q4_0_blocks() {
        let mut blk = Vec::new();
        blk.extend(half::f16::from_f32(0.25).to_le_bytes());
        blk.extend((0..32i8).map(|i| (i - 16) as u8));
        let v = dequantize(GgmlType::Q8_0, &blk, 32);
        assert_eq!(v[0], -4.0);
        assert_eq!(v[31], 15.0 * 0.25);
        let mut blk = Vec::new();
        blk.extend(half::f16::from_f32(2.0).to_le_bytes());
        blk.extend(std::iter::repeat_n(0x9 | (0x7 << 4), 16));
        let v = dequantize(GgmlType::Q4_0, &blk, 32);
        assert_eq!(v[0], 2.0);
        assert_eq!(v[16], -2.0);
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // Two heads of head_dim 4, one column: HF rows [0..8).
        let hf: Vec<f32> = (0..8).map(|x| x as f32).collect();
        // llama.cpp permutation: per head, rows reshape(2, hd/2).T -> [0, 2, 1, 3].
        let permuted = vec![0., 2., 1., 3., 4., 6., 5., 7.];
        let back = unpermute_rope_rows(&RawTensor::new(vec![8, 1], permuted), 2);
        assert_eq!(back.data, hf);
    }

    /// A GGUF v3 file without metadata holding `(name, HF shape, GGML type id, data)` tensors.
    fn gguf_bytes(tensors: &[(&str, Vec<usize>, u32, Vec<u8>)]) -> Vec<u8> {
        let padded = |n: usize| n.div_ceil(32) * 32;
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((tensors.len() as u64).to_le_bytes());
        b.extend(0u64.to_le_bytes());
        let mut offset = 0;
        for (name, shape, ty, data) in tensors {
            b.extend((name.len() as u64).to_le_bytes());
            b.extend(name.as_bytes());
            b.extend((shape.len() as u32).to_le_bytes());
            for &d in shape.iter().rev() {
                b.extend((d as u64).to_le_bytes());
            }
            b.extend(ty.to_le_bytes());
            b.extend((offset as u64).to_le_bytes());
            offset += padded(data.len());
        }
        for (.., data) in tensors {
            b.resize(padded(b.len()), 0);
            b.extend(data);
        }
        b
    }

    #[test]
    fn a_tensor_holding_a_nan_or_an_infinity_is_refused_naming_it() {
        let f32_bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        let mut with_nan = vec![0.25f32; 8];
        with_nan[5] = f32::NAN;
        // Two Q8_0 blocks, the second with an infinite scale: its first value is 0 x inf = NaN.
        let mut q8 = Vec::new();
        for scale in [0.5, f32::INFINITY] {
            q8.extend(half::f16::from_f32(scale).to_le_bytes());
            q8.extend((0..32i8).map(|q| q as u8));
        }
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("model.gguf");
        let file = gguf_bytes(&[
            ("blk.0.ffn_up.weight", vec![2, 4], 0, f32_bytes(&with_nan)),
            ("blk.0.ffn_down.weight", vec![2, 32], 8, q8),
            (
                "output_norm.weight",
                vec![4],
                0,
                f32_bytes(&[1.0, 2.0, 3.0, 4.0]),
            ),
        ]);
        std::fs::write(&path, file).unwrap();
        let gguf = GgufFile::open(&path).unwrap();
        let err = |i: usize| gguf.tensor(&gguf.tensors[i]).unwrap_err().to_string();
        let want = "model.gguf: tensor `blk.0.ffn_up.weight` holds NaN at index 5";
        assert!(err(0).contains(want), "{}", err(0));
        let want = "model.gguf: tensor `blk.0.ffn_down.weight` holds NaN at index 32";
        assert!(err(1).contains(want), "{}", err(1));
        let clean = gguf.tensor(&gguf.tensors[2]).unwrap();
        assert_eq!(
            (clean.shape, clean.data),
            (vec![4], vec![1.0, 2.0, 3.0, 4.0])
        );
    }

    #[test]
    fn gguf_names_map_to_hf() {
        assert_eq!(
            hf_name("blk.3.attn_q.bias").unwrap(),
            "model.layers.3.self_attn.q_proj.bias"
        );
        assert_eq!(
            hf_name("token_embd.weight").unwrap(),
            "model.embed_tokens.weight"
        );
        assert!(hf_name("blk.3.mystery.weight").is_none());
    }
}
