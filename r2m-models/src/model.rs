//! The decoder: one implementation for Llama/SmolLM2/Llama-3, Qwen2 and GPT-NeoX/Pythia, driven by
//! [`ModelConfig`]. Differences between the families are data (biases, norm kind, MLP kind,
//! residual layout, rotary width), not separate code paths.
//!
//! Weight names follow `transformers`, so the HF name of each parameter sits next to the layer that
//! uses it ([`CausalLm::from_weights`], [`CausalLm::to_weights`]). They are Llama's for every
//! family: other layouts (GPT-NeoX's fused QKV) are mapped to them in [`crate::weights`].

use burn::module::{Module, Param};
use burn::tensor::activation::{gelu, tanh};
use burn::tensor::backend::Backend;
use burn::tensor::module::embedding;
use burn::tensor::{Bool, Int, Tensor, TensorData};
use r2m_core::{R2mError, Result};

use crate::config::{Activation, Architecture, ModelConfig};
use crate::fused;
use crate::lora::adapter::LoraAdapter;
use crate::weights::{fuse_neox_weights, is_buffer, split_neox_weights, RawTensor, WeightMap};

/// A linear layer, weight stored as `[d_in, d_out]`, with an optional LoRA adapter.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    pub weight: Param<Tensor<B, 2>>,
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// A low-rank update added to the layer's output ([`crate::lora`]); `None` for a plain layer.
    pub lora: Option<LoraAdapter<B>>,
}

impl<B: Backend> Linear<B> {
    /// `x w + b`, plus the adapter's `scale (x Aᵀ) Bᵀ` when there is one.
    ///
    /// # Shapes
    /// - `x`: `[..., d_in]` -> `[..., d_out]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        // One 2-D GEMM over all leading dims is much faster on CPU than a batched one.
        let dims = x.dims();
        let d_out = self.weight.dims()[1];
        let rows: usize = dims[..D - 1].iter().product();
        let flat: Tensor<B, 2> = x.reshape([rows, dims[D - 1]]);
        let lora = self.lora.as_ref().map(|a| a.forward(flat.clone()));
        let y = fused::matmul(flat, self.weight.val());
        let y = match &self.bias {
            Some(b) => y + b.val().unsqueeze(),
            None => y,
        };
        // PEFT's order: the base layer's output (bias included), then the update.
        let y = match lora {
            Some(delta) => y + delta,
            None => y,
        };
        let mut out_dims = dims;
        out_dims[D - 1] = d_out;
        y.reshape(out_dims)
    }

    fn load(
        w: &mut WeightMap,
        prefix: &str,
        d_in: usize,
        d_out: usize,
        bias: bool,
        dev: &B::Device,
    ) -> Result<Self> {
        Ok(Self {
            weight: w.linear_weight(&format!("{prefix}.weight"), d_in, d_out, dev)?,
            bias: if bias {
                Some(w.param(&format!("{prefix}.bias"), [d_out], dev)?)
            } else {
                None
            },
            lora: None,
        })
    }

    /// The weight the layer computes with, `[d_in, d_out]`: with an adapter, `w + scale Aᵀ Bᵀ`
    /// (the adapter merged in).
    pub fn merged_weight(&self) -> Tensor<B, 2> {
        match &self.lora {
            Some(a) => self.weight.val() + a.delta_weight(),
            None => self.weight.val(),
        }
    }

    /// HF-named tensors, the adapter (if any) merged into the weight.
    fn save(&self, prefix: &str, out: &mut Vec<(String, RawTensor)>) {
        self.save_as(self.merged_weight(), prefix, out);
    }

    /// HF-named tensors with `weight` (`[d_in, d_out]`) for the layer's own.
    fn save_as(&self, weight: Tensor<B, 2>, prefix: &str, out: &mut Vec<(String, RawTensor)>) {
        out.push((
            format!("{prefix}.weight"),
            RawTensor::from_tensor(weight).transposed(),
        ));
        if let Some(b) = &self.bias {
            out.push((format!("{prefix}.bias"), RawTensor::from_tensor(b.val())));
        }
    }
}

/// RMSNorm (Llama, Qwen2) or LayerNorm (GPT-NeoX, when `bias` is present).
#[derive(Module, Debug)]
pub struct Norm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    /// Present for LayerNorm.
    pub bias: Option<Param<Tensor<B, 1>>>,
    pub eps: f64,
}

impl<B: Backend> Norm<B> {
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]` -> same
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.bias {
            None => fused::rms_norm(x, self.weight.val(), self.eps),
            Some(b) => {
                let (var, mean) = x.clone().var_mean_bias(2);
                let w = self.weight.val().unsqueeze::<3>();
                (x - mean) / (var + self.eps).sqrt() * w + b.val().unsqueeze::<3>()
            }
        }
    }

    fn load(w: &mut WeightMap, prefix: &str, cfg: &ModelConfig, dev: &B::Device) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            weight: w.param(&format!("{prefix}.weight"), [d], dev)?,
            bias: if cfg.arch == Architecture::GptNeoX {
                Some(w.param(&format!("{prefix}.bias"), [d], dev)?)
            } else {
                None
            },
            eps: cfg.norm_eps,
        })
    }

    fn save(&self, prefix: &str, out: &mut Vec<(String, RawTensor)>) {
        out.push((
            format!("{prefix}.weight"),
            RawTensor::from_tensor(self.weight.val()),
        ));
        if let Some(b) = &self.bias {
            out.push((format!("{prefix}.bias"), RawTensor::from_tensor(b.val())));
        }
    }
}

/// Rotary position embedding in HF's rotate-half layout, on the first `rotary_dim` dims of each head.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
    head_dim: usize,
}

/// The per-forward tables [`Rope::apply`] uses, laid out like the q and k projections'
/// outputs (`[batch, seq, heads * head_dim]`) so every product is between same-shape contiguous
/// tensors (broadcasting is a slow strided path on some CPU backends).
#[derive(Debug, Clone)]
pub struct RopeTables<B: Backend> {
    /// `(cos, sin)` for the query heads, `sin` signed as [`fused::rope`] takes it; cos 1 and sin 0
    /// on dims past `rotary_dim`.
    q: (Tensor<B, 3>, Tensor<B, 3>),
    /// The same for the key/value heads.
    k: (Tensor<B, 3>, Tensor<B, 3>),
    /// The indices [`fused::rope`] reads a head by.
    index: fused::RopeIndex<B>,
}

impl Rope {
    pub fn new(cfg: &ModelConfig) -> Self {
        Self {
            inv_freq: cfg.rope_inv_freq(),
            head_dim: cfg.head_dim,
        }
    }

    /// Tables for integer positions `[batch][seq]`, for `heads` query and `kv_heads` key heads.
    pub fn tables<B: Backend>(
        &self,
        positions: &[Vec<usize>],
        heads: usize,
        kv_heads: usize,
        dev: &B::Device,
    ) -> RopeTables<B> {
        let b = positions.len();
        let s = positions.first().map_or(0, Vec::len);
        let (half, hd) = (self.inv_freq.len(), self.head_dim);
        // One head's angles per position.
        let mut cos = Vec::with_capacity(b * s * hd);
        let mut sin = Vec::with_capacity(b * s * hd);
        for row in positions {
            for &p in row {
                // f32 like transformers: freqs = inv_freq * position, emb = cat(freqs, freqs);
                // rotate_half's sign goes into sin (negative on the first half).
                for sign in [-1.0, 1.0] {
                    for &f in &self.inv_freq {
                        let a = f * p as f32;
                        cos.push(a.cos());
                        sin.push(sign * a.sin());
                    }
                }
                // Dims past rotary_dim pass through unchanged.
                cos.extend(std::iter::repeat_n(1.0, hd - 2 * half));
                sin.extend(std::iter::repeat_n(0.0, hd - 2 * half));
            }
        }
        let per_heads = |t: &[f32], n: usize| -> Tensor<B, 3> {
            let mut v = Vec::with_capacity(t.len() * n);
            for pos in t.chunks(hd) {
                for _ in 0..n {
                    v.extend_from_slice(pos);
                }
            }
            Tensor::from_data(TensorData::new(v, [b, s, n * hd]), dev)
        };
        RopeTables {
            q: (per_heads(&cos, heads), per_heads(&sin, heads)),
            k: (per_heads(&cos, kv_heads), per_heads(&sin, kv_heads)),
            index: fused::RopeIndex::new(hd, half, dev),
        }
    }

    /// Rotate the projections `x` (`[batch, seq, heads * head_dim]`) by the angles in
    /// `(cos, sin)` (one of `tables`' pairs), read through `index` (see [`fused::rope`]); returns
    /// `[batch, heads, seq, head_dim]`.
    pub fn apply<B: Backend>(
        x: Tensor<B, 3>,
        heads: usize,
        (cos, sin): &(Tensor<B, 3>, Tensor<B, 3>),
        index: &fused::RopeIndex<B>,
    ) -> Tensor<B, 4> {
        fused::rope(x, heads, (cos, sin), index)
    }
}

/// Per-layer key/value cache for incremental decoding.
///
/// Each layer keeps one `[batch, kv_heads, width, head_dim]` buffer for keys and one for
/// values; positions `0..len` hold data and the rest are zeros that the attention mask hides.
/// With a capacity ([`KvCache::with_capacity`]) the buffers have room to spare (see
/// `width_after`) and new positions are written into them in place by
/// [`fused::write_positions`] (the buffers are uniquely owned between steps), instead of
/// concatenating and so reallocating and copying the whole cache at every token. Without a
/// capacity, or past it, a layer's buffers grow by concatenation to exactly what is needed.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    /// `(k, v)` per layer.
    layers: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    /// Filled positions per layer.
    lens: Vec<usize>,
    /// Most positions the buffers grow to by doubling (0: grow exactly, by concatenation).
    capacity: usize,
}

impl<B: Backend> KvCache<B> {
    /// A cache that grows by concatenation.
    pub fn new(num_layers: usize) -> Self {
        Self::with_capacity(num_layers, 0)
    }

    /// A cache for up to `capacity` positions (prompt plus new tokens) that grows by doubling.
    pub fn with_capacity(num_layers: usize, capacity: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
            lens: vec![0; num_layers],
            capacity,
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len_at(0)
    }

    /// Number of cached positions of one layer.
    pub fn len_at(&self, layer: usize) -> usize {
        self.lens.get(layer).copied().unwrap_or(0)
    }

    /// Positions a layer's buffers hold (filled or not): the key length attention sees.
    pub fn width_at(&self, layer: usize) -> usize {
        self.layers
            .get(layer)
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.dims()[2])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The cache of a new batch whose row `i` is row `rows[i]` of this one (rows may repeat): how
    /// the K samples of a prompt continue from its one prefill.
    pub fn select_rows(&self, rows: &[usize]) -> Self {
        let idx: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
        let layers = self
            .layers
            .iter()
            .map(|l| {
                l.as_ref().map(|(k, v)| {
                    let i = Tensor::<B, 1, Int>::from_data(
                        TensorData::new(idx.clone(), [rows.len()]),
                        &k.device(),
                    );
                    (k.clone().select(0, i.clone()), v.clone().select(0, i))
                })
            })
            .collect();
        Self {
            layers,
            lens: self.lens.clone(),
            capacity: self.capacity,
        }
    }

    /// The key length attention will see after appending `new` positions to `layer`.
    ///
    /// With a capacity, buffers start at twice what the first append needs and double when full,
    /// up to the capacity (like a `Vec`): few reallocations, and attention never reads more than
    /// twice the filled length even when `max_new_tokens` is large and rows stop early. Past the
    /// capacity, or without one, they grow to exactly what is needed.
    fn width_after(&self, layer: usize, new: usize) -> usize {
        let need = self.len_at(layer) + new;
        let width = self.width_at(layer);
        let grown = match &self.layers[layer] {
            Some(_) if need <= width => return width,
            Some(_) => 2 * width,
            None => 2 * need,
        };
        need.max(grown.min(self.capacity))
    }

    /// Append `k`, `v` (`[batch, kv_heads, new, head_dim]`) to `layer`; returns the layer's whole
    /// buffers (`[batch, kv_heads, width, head_dim]`, positions past the filled ones are zeros).
    fn append(
        &mut self,
        layer: usize,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [b, kvh, new, hd] = k.dims();
        let len = self.len_at(layer);
        let width = self.width_after(layer, new);
        let (k, v) = match self.layers[layer].take() {
            // Room left: write in place.
            Some((pk, pv)) if pk.dims()[2] == width => (
                fused::write_positions(pk, len, k),
                fused::write_positions(pv, len, v),
            ),
            // Past the capacity, or without one: grow to exactly what is needed.
            Some((pk, pv)) if width == len + new => (
                Tensor::cat(vec![pk.narrow(2, 0, len), k], 2),
                Tensor::cat(vec![pv.narrow(2, 0, len), v], 2),
            ),
            None if width == new => (k, v),
            // First append, or full: new buffers with room to spare, the filled part moved over.
            old => {
                let dev = k.device();
                let (pk, pv) = old.unzip();
                let fill = |old: Option<Tensor<B, 4>>, part: Tensor<B, 4>| {
                    let buf = Tensor::<B, 4>::zeros([b, kvh, width, hd], &dev);
                    let buf = match old {
                        Some(o) => fused::write_positions(buf, 0, o.narrow(2, 0, len)),
                        None => buf,
                    };
                    fused::write_positions(buf, len, part)
                };
                (fill(pk, k), fill(pv, v))
            }
        };
        self.lens[layer] = len + new;
        self.layers[layer] = Some((k.clone(), v.clone()));
        (k, v)
    }
}

/// Multi-head attention with grouped-query K/V heads.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    /// One LoRA adapter on the q, k and v projections together, as on GPT-NeoX's fused
    /// `query_key_value` (one `A`; `B`'s rows are q's, then k's, then v's): its output is split
    /// into three and added to theirs. Llama-style models put adapters on each projection
    /// instead ([`Linear::lora`]).
    pub qkv_lora: Option<LoraAdapter<B>>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl<B: Backend> Attention<B> {
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]`
    /// - `mask`: `[batch, heads, seq, kv_len]`, `true` = may not attend (`kv_len` is the cache's
    ///   width when a cache is given)
    /// - returns `[batch, seq, hidden]`
    fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        mask: Tensor<B, 4, Bool>,
        cache: Option<(&mut KvCache<B>, usize)>,
    ) -> Tensor<B, 3> {
        let [b, s, _] = x.dims();
        let (h, kvh, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        // The three projections before either RoPE: under burn's fusion, ops that start with
        // the key projection's reshape of x, recorded while the query's RoPE is still being
        // fused, would run unfused, the key's RoPE included.
        let qkv_lora = self.qkv_lora.as_ref().map(|a| a.forward(x.clone()));
        let (q, k, v) = (
            self.q_proj.forward(x.clone()),
            self.k_proj.forward(x.clone()),
            self.v_proj.forward(x),
        );
        let (q, k, v) = match qkv_lora {
            Some(delta) => {
                let (qd, kd) = (h * hd, kvh * hd);
                (
                    q + delta.clone().narrow(2, 0, qd),
                    k + delta.clone().narrow(2, qd, kd),
                    v + delta.narrow(2, qd + kd, kd),
                )
            }
            None => (q, k, v),
        };
        // RoPE on the projections, which also splits them into heads: [batch, heads, seq,
        // head_dim]; v is split by a swap.
        let q = Rope::apply(q, h, &rope.q, &rope.index);
        let k = Rope::apply(k, kvh, &rope.k, &rope.index);
        let v = fused::swap_heads(v.reshape([b, s, kvh, hd]));
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, k, v),
            None => (k, v),
        };
        // Grouped-query attention without repeating K/V: the `n_rep` query heads that share a
        // K/V head are consecutive, so `[batch, heads, seq, hd]` is `[batch, kv_heads,
        // n_rep * seq, hd]` (and likewise the mask): each K/V head attends for n_rep * seq rows.
        let n_rep = h / kvh;
        let kv_len = k.dims()[2];
        let q = q.reshape([b, kvh, n_rep * s, hd]);
        let mask = mask.reshape([b, kvh, n_rep * s, kv_len]);
        let out = fused::attention(q, k, v, mask);
        // [batch, heads, seq, head_dim] -> [batch, seq, hidden]
        let out = fused::swap_heads(out.reshape([b, h, s, hd])).reshape([b, s, h * hd]);
        self.o_proj.forward(out)
    }
}

impl<B: Backend> Attention<B> {
    /// HF-named tensors of the four projections, every adapter merged in (the fused q/k/v
    /// adapter's update split between q, k and v as its output is).
    fn save(&self, prefix: &str, out: &mut Vec<(String, RawTensor)>) {
        let delta = self.qkv_lora.as_ref().map(LoraAdapter::delta_weight);
        let mut col = 0;
        for (name, p) in [
            ("q_proj", &self.q_proj),
            ("k_proj", &self.k_proj),
            ("v_proj", &self.v_proj),
        ] {
            let w = p.merged_weight();
            let n = w.dims()[1];
            let w = match &delta {
                Some(d) => w + d.clone().narrow(1, col, n),
                None => w,
            };
            col += n;
            p.save_as(w, &format!("{prefix}.{name}"), out);
        }
        self.o_proj.save(&format!("{prefix}.o_proj"), out);
    }
}

/// The feed-forward block: SwiGLU when `gate_proj` is present, else `down(act(up(x)))`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: Option<Linear<B>>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
    #[module(skip)]
    pub activation: Activation,
}

impl<B: Backend> Mlp<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let up = self.up_proj.forward(x.clone());
        let hidden = match (&self.gate_proj, self.activation) {
            (Some(gate), _) => fused::silu_mul(gate.forward(x), up),
            (None, Activation::Gelu | Activation::Silu) => gelu(up),
            (None, Activation::GeluTanh) => gelu_tanh(up),
        };
        self.down_proj.forward(hidden)
    }
}

/// GELU with the tanh approximation (`gelu_new`).
fn gelu_tanh<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let c = (2.0f64 / std::f64::consts::PI).sqrt();
    let inner = (x.clone() + x.clone().powi_scalar(3) * 0.044715) * c;
    x * (tanh(inner) + 1.0) * 0.5
}

/// One decoder block.
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    pub input_norm: Norm<B>,
    pub attn: Attention<B>,
    pub post_attn_norm: Norm<B>,
    pub mlp: Mlp<B>,
    pub parallel_residual: bool,
}

impl<B: Backend> Block<B> {
    fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        mask: Tensor<B, 4, Bool>,
        cache: Option<(&mut KvCache<B>, usize)>,
    ) -> Tensor<B, 3> {
        let attn = self
            .attn
            .forward(self.input_norm.forward(x.clone()), rope, mask, cache);
        if self.parallel_residual {
            // GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x))
            let mlp = self.mlp.forward(self.post_attn_norm.forward(x.clone()));
            x + attn + mlp
        } else {
            let x = x + attn;
            x.clone() + self.mlp.forward(self.post_attn_norm.forward(x))
        }
    }
}

/// Which positions of a batch hold real tokens (`true`) and which are padding.
///
/// Rows may be left-padded (generation) or right-padded (training); position ids count real tokens
/// only, as in HF (`cumsum(mask) - 1`).
#[derive(Debug, Clone)]
pub struct Padding {
    /// `[batch][len]`
    pub valid: Vec<Vec<bool>>,
}

impl Padding {
    /// No padding at all.
    pub fn none(batch: usize, len: usize) -> Self {
        Self {
            valid: vec![vec![true; len]; batch],
        }
    }

    /// From an HF-style 0/1 attention mask.
    pub fn from_mask(mask: &[Vec<u8>]) -> Self {
        Self {
            valid: mask
                .iter()
                .map(|r| r.iter().map(|&m| m != 0).collect())
                .collect(),
        }
    }

    pub fn batch(&self) -> usize {
        self.valid.len()
    }

    pub fn len(&self) -> usize {
        self.valid.first().map_or(0, Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Extend every row by `n` real positions.
    pub fn push_valid(&mut self, n: usize) {
        for r in &mut self.valid {
            r.extend(std::iter::repeat_n(true, n));
        }
    }

    /// HF position ids: number of real tokens before each position (padding gets 0).
    pub fn positions(&self, start: usize, len: usize) -> Vec<Vec<usize>> {
        self.valid
            .iter()
            .map(|row| {
                let mut seen = 0usize;
                let mut out = Vec::with_capacity(len);
                for (i, &v) in row.iter().enumerate().take(start + len) {
                    if i >= start {
                        out.push(if v { seen } else { 0 });
                    }
                    if v {
                        seen += 1;
                    }
                }
                out
            })
            .collect()
    }

    /// Attention mask for queries at key positions `start..start+len` over keys `0..width`
    /// (`width >= start + len`; keys from `start + len` on are unfilled cache slots):
    /// `true` where a query may **not** attend (a later key, or a padding key other than itself).
    fn attention_mask<B: Backend>(
        &self,
        start: usize,
        len: usize,
        width: usize,
        heads: usize,
        dev: &B::Device,
    ) -> Tensor<B, 4, Bool> {
        let b = self.batch();
        let kv = width;
        debug_assert!(width >= start + len);
        // Built per head on the host: an `expand`ed mask costs a slow strided copy inside the
        // attention kernel of some backends (flex).
        let mut m = Vec::with_capacity(b * heads * len * kv);
        for row in &self.valid {
            let tile = m.len();
            for qi in 0..len {
                let q = start + qi;
                for (k, &valid) in row.iter().enumerate().take(start + len) {
                    // A padding query attends to itself only, so no softmax row is empty.
                    m.push(k > q || (!valid && k != q));
                }
                m.extend(std::iter::repeat_n(true, kv - (start + len)));
            }
            for _ in 1..heads {
                m.extend_from_within(tile..tile + len * kv);
            }
        }
        Tensor::<B, 4, Bool>::from_data(TensorData::new(m, [b, heads, len, kv]), dev)
    }
}

/// The output of a forward pass.
#[derive(Debug)]
pub struct ForwardOutput<B: Backend> {
    /// `[batch, seq, vocab]`
    pub logits: Tensor<B, 3>,
    /// Last-layer hidden states after the final norm, `[batch, seq, hidden]` (what R2M feeds the RM).
    pub hidden: Tensor<B, 3>,
}

/// A decoder-only causal language model.
#[derive(Module, Debug)]
pub struct CausalLm<B: Backend> {
    /// `[vocab, hidden]`
    pub embed_tokens: Param<Tensor<B, 2>>,
    pub layers: Vec<Block<B>>,
    pub norm: Norm<B>,
    /// `None` when the output projection is tied to `embed_tokens`.
    pub lm_head: Option<Linear<B>>,
    #[module(skip)]
    pub config: ModelConfig,
    #[module(skip)]
    pub rope: Rope,
}

impl<B: Backend> CausalLm<B> {
    /// Build the model from HF-named tensors; fails naming any missing, misshapen or leftover tensor.
    pub fn from_weights(cfg: &ModelConfig, w: &mut WeightMap, dev: &B::Device) -> Result<Self> {
        Self::load(cfg, w, dev, true)
    }

    /// Build only the decoder body (no LM head), as stored in HF `*ForSequenceClassification`
    /// checkpoints. [`CausalLm::lm_head`] must not be called on the result unless the config ties
    /// the head to the embedding.
    pub fn backbone_from_weights(
        cfg: &ModelConfig,
        w: &mut WeightMap,
        dev: &B::Device,
    ) -> Result<Self> {
        Self::load(cfg, w, dev, false)
    }

    fn load(
        cfg: &ModelConfig,
        w: &mut WeightMap,
        dev: &B::Device,
        with_lm_head: bool,
    ) -> Result<Self> {
        let (d, hd) = (cfg.hidden_size, cfg.head_dim);
        if !cfg.num_heads.is_multiple_of(cfg.num_kv_heads)
            || cfg.rotary_dim > hd
            || !cfg.rotary_dim.is_multiple_of(2)
        {
            return Err(R2mError::format(
                &w.source,
                format!(
                    "inconsistent config: {} heads, {} kv heads, head_dim {hd}, rotary_dim {}",
                    cfg.num_heads, cfg.num_kv_heads, cfg.rotary_dim
                ),
            ));
        }
        let neox = cfg.arch == Architecture::GptNeoX;
        if neox {
            split_neox_weights(cfg, w)?;
        }
        let (p, q_dim, kv_dim) = (model_prefix(cfg), cfg.num_heads * hd, cfg.num_kv_heads * hd);
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let l = format!("{p}.layers.{i}");
            let attn = format!("{l}.self_attn");
            let mlp = format!("{l}.mlp");
            layers.push(Block {
                input_norm: Norm::load(w, &format!("{l}.input_layernorm"), cfg, dev)?,
                attn: Attention {
                    q_proj: Linear::load(
                        w,
                        &format!("{attn}.q_proj"),
                        d,
                        q_dim,
                        cfg.qkv_bias,
                        dev,
                    )?,
                    k_proj: Linear::load(
                        w,
                        &format!("{attn}.k_proj"),
                        d,
                        kv_dim,
                        cfg.qkv_bias,
                        dev,
                    )?,
                    v_proj: Linear::load(
                        w,
                        &format!("{attn}.v_proj"),
                        d,
                        kv_dim,
                        cfg.qkv_bias,
                        dev,
                    )?,
                    o_proj: Linear::load(
                        w,
                        &format!("{attn}.o_proj"),
                        q_dim,
                        d,
                        cfg.out_bias,
                        dev,
                    )?,
                    qkv_lora: None,
                    num_heads: cfg.num_heads,
                    num_kv_heads: cfg.num_kv_heads,
                    head_dim: hd,
                },
                post_attn_norm: Norm::load(w, &format!("{l}.post_attention_layernorm"), cfg, dev)?,
                mlp: Mlp {
                    gate_proj: if neox {
                        None
                    } else {
                        Some(Linear::load(
                            w,
                            &format!("{mlp}.gate_proj"),
                            d,
                            cfg.intermediate_size,
                            false,
                            dev,
                        )?)
                    },
                    up_proj: Linear::load(
                        w,
                        &format!("{mlp}.up_proj"),
                        d,
                        cfg.intermediate_size,
                        cfg.out_bias,
                        dev,
                    )?,
                    down_proj: Linear::load(
                        w,
                        &format!("{mlp}.down_proj"),
                        cfg.intermediate_size,
                        d,
                        cfg.out_bias,
                        dev,
                    )?,
                    activation: cfg.activation,
                },
                parallel_residual: cfg.parallel_residual,
            });
        }
        let embed_tokens = w.param(
            &format!("{p}.embed_tokens.weight"),
            [cfg.vocab_size, d],
            dev,
        )?;
        let norm = Norm::load(w, &format!("{p}.norm"), cfg, dev)?;
        let lm_head = if cfg.tie_word_embeddings || !with_lm_head {
            // Some tied checkpoints still store a copy of the head; it is the embedding.
            w.tensors.remove("lm_head.weight");
            None
        } else {
            Some(Linear::load(w, "lm_head", d, cfg.vocab_size, false, dev)?)
        };
        // Buffers some exporters keep (rotary tables, attention masks) carry no weights.
        w.tensors.retain(|n, _| !is_buffer(n));
        let leftover = w.leftover_names();
        if !leftover.is_empty() {
            return Err(R2mError::format(
                &w.source,
                format!(
                    "{} tensor(s) the {} config does not use, e.g. `{}`: config and weights disagree",
                    leftover.len(),
                    cfg.arch.model_type(),
                    leftover[0]
                ),
            ));
        }
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            config: cfg.clone(),
            rope: Rope::new(cfg),
        })
    }

    /// sha256 of the weights as [`CausalLm::to_weights`] lists them (names, shapes and f32
    /// bytes): the identity of a base model, which a checkpoint records so that a resume onto
    /// another base is refused.
    pub fn weights_sha256(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for (name, t) in self.to_weights() {
            h.update(name.as_bytes());
            for d in &t.shape {
                h.update((*d as u64).to_le_bytes());
            }
            for x in &t.data {
                h.update(x.to_le_bytes());
            }
        }
        format!("{:x}", h.finalize())
    }

    /// All parameters as HF-named host tensors (the inverse of [`CausalLm::from_weights`]).
    /// LoRA adapters ([`crate::lora`]) are merged into the weights they adapt, so an HF export of
    /// an adapted model is the merged model.
    pub fn to_weights(&self) -> Vec<(String, RawTensor)> {
        let cfg = &self.config;
        let p = model_prefix(cfg);
        let mut out = vec![(
            format!("{p}.embed_tokens.weight"),
            RawTensor::from_tensor(self.embed_tokens.val()),
        )];
        for (i, l) in self.layers.iter().enumerate() {
            let n = format!("{p}.layers.{i}");
            l.input_norm.save(&format!("{n}.input_layernorm"), &mut out);
            l.attn.save(&format!("{n}.self_attn"), &mut out);
            l.post_attn_norm
                .save(&format!("{n}.post_attention_layernorm"), &mut out);
            if let Some(g) = &l.mlp.gate_proj {
                g.save(&format!("{n}.mlp.gate_proj"), &mut out);
            }
            l.mlp.up_proj.save(&format!("{n}.mlp.up_proj"), &mut out);
            l.mlp
                .down_proj
                .save(&format!("{n}.mlp.down_proj"), &mut out);
        }
        self.norm.save(&format!("{p}.norm"), &mut out);
        if let Some(h) = &self.lm_head {
            h.save("lm_head", &mut out);
        }
        if cfg.arch == Architecture::GptNeoX {
            out = fuse_neox_weights(cfg, out);
        }
        out
    }

    pub fn device(&self) -> B::Device {
        self.embed_tokens.val().device()
    }

    /// Full forward pass over `tokens` (no cache).
    ///
    /// # Shapes
    /// - `tokens`: `[batch, seq]`; `padding` must be `batch x seq`
    pub fn forward(&self, tokens: Tensor<B, 2, Int>, padding: &Padding) -> ForwardOutput<B> {
        let hidden = self.forward_hidden(tokens, padding, None);
        ForwardOutput {
            logits: self.lm_head(hidden.clone()),
            hidden,
        }
    }

    /// Last-layer hidden states (after the final norm) for `tokens`, which occupy the last
    /// `seq` positions of `padding`. With a `cache`, keys/values of earlier positions come from it
    /// and the new ones are appended.
    ///
    /// # Shapes
    /// - `tokens`: `[batch, seq]` -> `[batch, seq, hidden]`
    pub fn forward_hidden(
        &self,
        tokens: Tensor<B, 2, Int>,
        padding: &Padding,
        cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        let x = self.embed(tokens);
        let x = self.forward_layers(x, padding, 0..self.layers.len(), cache);
        self.norm.forward(x)
    }

    /// Token embeddings: the residual stream entering layer 0.
    ///
    /// # Shapes
    /// - `tokens`: `[batch, seq]` -> `[batch, seq, hidden]`
    pub fn embed(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        embedding(self.embed_tokens.val(), tokens)
    }

    /// Run the residual stream `x` through the blocks `layers` (no final norm). `x` occupies the
    /// last `seq` positions of `padding`; a `cache` holds the earlier ones (indexed by absolute
    /// layer number). Running `0..k` and then `k..L` on the result equals running `0..L`, which is
    /// what lets a trainer cache the frozen lower layers' output exactly.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]` -> `[batch, seq, hidden]`
    pub fn forward_layers(
        &self,
        x: Tensor<B, 3>,
        padding: &Padding,
        layers: std::ops::Range<usize>,
        mut cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        let dev = x.device();
        let [_, s, _] = x.dims();
        let start = padding.len() - s;
        debug_assert!(
            layers.is_empty()
                || cache
                    .as_ref()
                    .is_none_or(|c| c.len_at(layers.start) == start),
            "cache length does not match the padding"
        );
        let rope = self.rope.tables::<B>(
            &padding.positions(start, s),
            self.config.num_heads,
            self.config.num_kv_heads,
            &dev,
        );
        // Keys attention sees: the cache's buffers (filled or not) or just these positions.
        let width = match (&cache, layers.is_empty()) {
            (Some(c), false) => c.width_after(layers.start, s),
            _ => start + s,
        };
        let mask = padding.attention_mask::<B>(start, s, width, self.config.num_heads, &dev);
        let mut x = x;
        for i in layers {
            let c = cache.as_deref_mut().map(|c| (c, i));
            x = self.layers[i].forward(x, &rope, mask.clone(), c);
        }
        x
    }

    /// The same model with the token embeddings and the LM head frozen (no gradients), as
    /// `trainable = "top:N"` wants: only the blocks (and final norm) can then train.
    pub fn with_frozen_embeddings_and_head(mut self) -> Self {
        self.embed_tokens = self.embed_tokens.set_require_grad(false);
        if let Some(h) = self.lm_head.take() {
            self.lm_head = Some(Linear {
                weight: h.weight.set_require_grad(false),
                bias: h.bias.map(|b| b.set_require_grad(false)),
                lora: h.lora,
            });
        }
        self
    }

    /// Project hidden states to vocabulary logits.
    ///
    /// # Shapes
    /// - `hidden`: `[batch, seq, hidden]` -> `[batch, seq, vocab]`
    pub fn lm_head(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => {
                let [b, s, d] = hidden.dims();
                let vocab = self.config.vocab_size;
                let flat = hidden.reshape([b * s, d]);
                fused::matmul(flat, self.embed_tokens.val().transpose()).reshape([b, s, vocab])
            }
        }
    }
}

pub(crate) fn model_prefix(cfg: &ModelConfig) -> &'static str {
    match cfg.arch {
        Architecture::GptNeoX => "gpt_neox",
        _ => "model",
    }
}
