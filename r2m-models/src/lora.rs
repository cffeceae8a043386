//! LoRA adapters (Hu et al. 2021) on the decoder's projections, in PEFT's conventions.
//!
//! An adapter on a linear layer `y = x w + b` adds `scale (dropout(x) Aᵀ) Bᵀ`, with `A` `[r,
//! d_in]` and `B` `[d_out, r]` (PEFT's `lora_A.weight` and `lora_B.weight`) and `scale = alpha /
//! r` (`alpha / sqrt(r)` with rsLoRA). [`add_adapters`] puts fresh ones on the projections a
//! [`LoraConfig`] targets and freezes every other parameter: `A` starts as PEFT's (uniform in
//! `±1/sqrt(d_in)`, which is `kaiming_uniform_(a = sqrt(5))`, seeded), `B` at zero, so a fresh
//! adapter changes nothing. The layer's own product is untouched: the adapter is one more term
//! ([`crate::model::Linear::forward`]).
//!
//! Targets are named by role, `q k v o gate up down`, which on Llama/Qwen2 are the projections of
//! those names (`q_proj` ...). GPT-NeoX fuses q, k and v into `query_key_value`: targeting any of
//! them puts one adapter on the three together ([`crate::model::Attention::qkv_lora`]), as PEFT
//! does; `o`, `up` and `down` are its `attention.dense`, `mlp.dense_h_to_4h` and
//! `mlp.dense_4h_to_h`, and it has no `gate`.
//!
//! [`without_adapters`] is the base model (the same weight tensors, no copy), [`merge_adapters`]
//! folds every adapter into its weight (`w' = w + scale Aᵀ Bᵀ` in the `[d_in, d_out]` layout), and
//! [`save_peft_adapter`] / [`load_peft_adapter`] write and read PEFT's adapter directory
//! (`adapter_config.json` and `adapter_model.safetensors`).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::str::FromStr;

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use r2m_core::{R2mError, Result};
use serde_json::{json, Value};

use crate::config::Architecture;
use crate::model::{model_prefix, Block, CausalLm, Linear};
use crate::weights::{load_safetensors_file, save_safetensors, to_tensor, RawTensor, WeightMap};

pub use adapter::LoraAdapter;

/// PEFT's adapter files.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// A projection an adapter can target, by role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LoraTarget {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LoraTarget {
    /// Every target, in block order.
    pub const ALL: [LoraTarget; 7] = [
        Self::Q,
        Self::K,
        Self::V,
        Self::O,
        Self::Gate,
        Self::Up,
        Self::Down,
    ];

    /// The name in configs: `q`, `k`, `v`, `o`, `gate`, `up` or `down`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Q => "q",
            Self::K => "k",
            Self::V => "v",
            Self::O => "o",
            Self::Gate => "gate",
            Self::Up => "up",
            Self::Down => "down",
        }
    }
}

impl FromStr for LoraTarget {
    type Err = R2mError;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| {
                R2mError::Config(format!(
                    "unknown variant `{s}`, expected `q`, `k`, `v`, `o`, `gate`, `up` or `down`"
                ))
            })
    }
}

impl std::fmt::Display for LoraTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Which blocks get adapters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraLayers {
    /// Every block.
    All,
    /// The top N blocks (the lower ones stay plain and frozen).
    Top(usize),
}

impl LoraLayers {
    /// The first block with adapters in a model of `n_layers` blocks (`top:N` past the model is
    /// an error naming `lora.layers`).
    pub fn first_layer(self, n_layers: usize) -> Result<usize> {
        match self {
            Self::All => Ok(0),
            Self::Top(k) if k > n_layers => Err(R2mError::Config(format!(
                "lora.layers = \"top:{k}\", but the model has only {n_layers} blocks"
            ))),
            Self::Top(k) => Ok(n_layers - k),
        }
    }
}

impl FromStr for LoraLayers {
    type Err = R2mError;
    fn from_str(s: &str) -> Result<Self> {
        if s == "all" {
            return Ok(Self::All);
        }
        s.strip_prefix("top:")
            .and_then(|n| n.parse().ok())
            .filter(|&n: &usize| n > 0)
            .map(Self::Top)
            .ok_or_else(|| {
                R2mError::Config(format!(
                    "unknown variant `{s}`, expected `all` or `top:N` (N > 0)"
                ))
            })
    }
}

impl std::fmt::Display for LoraLayers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::All => write!(f, "all"),
            Self::Top(n) => write!(f, "top:{n}"),
        }
    }
}

/// What [`add_adapters`] adds.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// The rank r (> 0).
    pub r: usize,
    /// alpha: the update is scaled by `alpha / r` (`alpha / sqrt(r)` with `rslora`).
    pub alpha: f64,
    /// Dropout probability on each adapter's input, in training only; in `[0, 1)`.
    pub dropout: f64,
    /// The projections that get adapters.
    pub targets: Vec<LoraTarget>,
    pub layers: LoraLayers,
    /// rsLoRA's scale, `alpha / sqrt(r)`.
    pub rslora: bool,
    /// Seed of the `A` matrices' initialisation (each adapter's stream also depends on its name).
    pub seed: u64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: LoraTarget::ALL.to_vec(),
            layers: LoraLayers::All,
            rslora: false,
            seed: 0,
        }
    }
}

impl LoraConfig {
    /// Check the values that do not depend on the model; the error names the key (`lora.r`, ...).
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(R2mError::Config(msg));
        if self.r == 0 {
            return bad("lora.r must be > 0".into());
        }
        if !self.alpha.is_finite() {
            return bad(format!(
                "lora.alpha must be a finite number, got {}",
                self.alpha
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!(
                "lora.dropout must be in [0, 1), got {}",
                self.dropout
            ));
        }
        if self.targets.is_empty() {
            return bad(
                "lora.targets is empty: name at least one of q, k, v, o, gate, up, down".into(),
            );
        }
        Ok(())
    }
}

/// Where an adapter sits in a block: one projection, or GPT-NeoX's fused q/k/v.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Site {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
    Qkv,
}

impl Site {
    /// Every site, whatever the architecture.
    const EVERY: [Site; 8] = [
        Site::Q,
        Site::K,
        Site::V,
        Site::O,
        Site::Gate,
        Site::Up,
        Site::Down,
        Site::Qkv,
    ];

    /// The sites of a block of this architecture, in the order their tensors are written.
    fn all(neox: bool) -> &'static [Site] {
        if neox {
            &[Site::Qkv, Site::O, Site::Up, Site::Down]
        } else {
            // Every site but the fused q/k/v.
            &Self::EVERY[..7]
        }
    }

    /// The targets that put an adapter here.
    fn targets(self) -> &'static [LoraTarget] {
        use LoraTarget as T;
        match self {
            Site::Q => &[T::Q],
            Site::K => &[T::K],
            Site::V => &[T::V],
            Site::O => &[T::O],
            Site::Gate => &[T::Gate],
            Site::Up => &[T::Up],
            Site::Down => &[T::Down],
            Site::Qkv => &[T::Q, T::K, T::V],
        }
    }

    /// The HF module path inside a block (`self_attn.q_proj`, `attention.query_key_value`).
    fn module(self, neox: bool) -> &'static str {
        match (self, neox) {
            (Site::Q, _) => "self_attn.q_proj",
            (Site::K, _) => "self_attn.k_proj",
            (Site::V, _) => "self_attn.v_proj",
            (Site::Gate, _) => "mlp.gate_proj",
            (Site::Qkv, _) => "attention.query_key_value",
            (Site::O, false) => "self_attn.o_proj",
            (Site::Up, false) => "mlp.up_proj",
            (Site::Down, false) => "mlp.down_proj",
            (Site::O, true) => "attention.dense",
            (Site::Up, true) => "mlp.dense_h_to_4h",
            (Site::Down, true) => "mlp.dense_4h_to_h",
        }
    }

    /// The name PEFT's `target_modules` lists (the module path's last part).
    fn peft_target(self, neox: bool) -> &'static str {
        let m = self.module(neox);
        m.rsplit('.').next().unwrap_or(m)
    }

    /// The linear layer an adapter here adapts (`None` for the fused q/k/v, and for a gate a
    /// block does not have).
    fn linear<B: Backend>(self, block: &Block<B>) -> Option<&Linear<B>> {
        match self {
            Site::Q => Some(&block.attn.q_proj),
            Site::K => Some(&block.attn.k_proj),
            Site::V => Some(&block.attn.v_proj),
            Site::O => Some(&block.attn.o_proj),
            Site::Gate => block.mlp.gate_proj.as_ref(),
            Site::Up => Some(&block.mlp.up_proj),
            Site::Down => Some(&block.mlp.down_proj),
            Site::Qkv => None,
        }
    }

    /// The adapter here.
    fn adapter<B: Backend>(self, block: &Block<B>) -> Option<&LoraAdapter<B>> {
        match self {
            Site::Qkv => block.attn.qkv_lora.as_ref(),
            s => s.linear(block).and_then(|l| l.lora.as_ref()),
        }
    }

    /// The slot of the adapter here (`None` for a gate a block does not have).
    fn slot<B: Backend>(self, block: &mut Block<B>) -> Option<&mut Option<LoraAdapter<B>>> {
        match self {
            Site::Q => Some(&mut block.attn.q_proj.lora),
            Site::K => Some(&mut block.attn.k_proj.lora),
            Site::V => Some(&mut block.attn.v_proj.lora),
            Site::O => Some(&mut block.attn.o_proj.lora),
            Site::Gate => block.mlp.gate_proj.as_mut().map(|g| &mut g.lora),
            Site::Up => Some(&mut block.mlp.up_proj.lora),
            Site::Down => Some(&mut block.mlp.down_proj.lora),
            Site::Qkv => Some(&mut block.attn.qkv_lora),
        }
    }

    /// `(d_in, d_out)` of an adapter here.
    fn dims<B: Backend>(self, block: &Block<B>) -> Option<(usize, usize)> {
        match self {
            Site::Qkv => {
                let a = &block.attn;
                let d_in = a.q_proj.weight.dims()[0];
                let d_out: usize = [&a.q_proj, &a.k_proj, &a.v_proj]
                    .iter()
                    .map(|l| l.weight.dims()[1])
                    .sum();
                Some((d_in, d_out))
            }
            s => s.linear(block).map(|l| {
                let [d_in, d_out] = l.weight.dims();
                (d_in, d_out)
            }),
        }
    }
}

fn is_neox<B: Backend>(model: &CausalLm<B>) -> bool {
    model.config.arch == Architecture::GptNeoX
}

/// PEFT's name of the adapter at `site` of block `layer`, without the `.lora_A.weight` suffix.
fn peft_prefix<B: Backend>(model: &CausalLm<B>, layer: usize, site: Site) -> String {
    format!(
        "base_model.model.{}.layers.{layer}.{}",
        model_prefix(&model.config),
        site.module(is_neox(model))
    )
}

/// The same model with every LoRA adapter removed: the base model. Its weights are the same
/// tensors as `model`'s (a tensor clone shares its buffer), not a copy.
pub fn without_adapters<B: Backend>(mut model: CausalLm<B>) -> CausalLm<B> {
    for block in &mut model.layers {
        for site in Site::EVERY {
            if let Some(slot) = site.slot(block) {
                *slot = None;
            }
        }
    }
    model
}

/// Whether any block carries an adapter.
pub fn has_adapters<B: Backend>(model: &CausalLm<B>) -> bool {
    first_adapted_layer(model).is_some()
}

/// Every adapter of `model`, block by block in a fixed order of sites: what a checkpoint saves
/// (their records keep their parameter ids, which the optimizer's state is keyed by).
pub fn adapters_in_order<B: Backend>(model: &CausalLm<B>) -> Vec<LoraAdapter<B>> {
    let per_block = |b: &Block<B>| -> Vec<LoraAdapter<B>> {
        Site::EVERY
            .iter()
            .filter_map(|s| s.adapter(b).cloned())
            .collect()
    };
    model.layers.iter().flat_map(per_block).collect()
}

/// Put `adapters`, as [`adapters_in_order`] listed them, back into `model`'s adapter slots (the
/// model must carry adapters at the same sites).
pub fn replace_adapters<B: Backend>(
    mut model: CausalLm<B>,
    adapters: Vec<LoraAdapter<B>>,
) -> Result<CausalLm<B>> {
    let n = adapters.len();
    let mut it = adapters.into_iter();
    for block in model.layers.iter_mut() {
        for site in Site::EVERY {
            if let Some(slot) = site.slot(block).filter(|slot| slot.is_some()) {
                *slot = Some(it.next().ok_or_else(|| {
                    R2mError::Other(format!(
                        "{n} adapters, but the model has more adapter sites"
                    ))
                })?);
            }
        }
    }
    match it.next() {
        Some(_) => Err(R2mError::Other(format!(
            "{n} adapters, but the model has fewer adapter sites"
        ))),
        None => Ok(model),
    }
}

/// The lowest block with an adapter (`None` without adapters): every block below it is plain.
pub fn first_adapted_layer<B: Backend>(model: &CausalLm<B>) -> Option<usize> {
    (model.layers.iter()).position(|block| Site::EVERY.iter().any(|s| s.adapter(block).is_some()))
}

/// Put fresh adapters on the projections `cfg` targets (replacing any the model had) and freeze
/// every other parameter: only the adapters' `A` and `B` train. `A` is uniform in
/// `±1/sqrt(d_in)` (PEFT's `kaiming_uniform_(a = sqrt(5))`), seeded by `cfg.seed` and the
/// adapter's name; `B` is zero, so the model computes what it did.
///
/// Errors name the config key: an invalid value, `top:N` past the model, or a target the
/// architecture does not have (`gate` on GPT-NeoX).
pub fn add_adapters<B: Backend>(model: CausalLm<B>, cfg: &LoraConfig) -> Result<CausalLm<B>> {
    cfg.validate()?;
    let neox = is_neox(&model);
    let first = cfg.layers.first_layer(model.layers.len())?;
    if let Some(t) =
        (cfg.targets.iter()).find(|t| !Site::all(neox).iter().any(|s| s.targets().contains(t)))
    {
        return Err(R2mError::Config(format!(
            "lora.targets: `{t}` is not a projection of this {} model (its MLP has no gate); \
             use some of `q`, `k`, `v`, `o`, `up`, `down`",
            model.config.arch.model_type()
        )));
    }
    let dev = model.device();
    let mut model = without_adapters(model).no_grad();
    for layer in first..model.layers.len() {
        for &site in Site::all(neox) {
            if !site.targets().iter().any(|t| cfg.targets.contains(t)) {
                continue;
            }
            let Some((d_in, d_out)) = site.dims(&model.layers[layer]) else {
                continue;
            };
            let name = peft_prefix(&model, layer, site);
            let a = kaiming_uniform(&name, cfg.r, d_in, cfg.seed);
            let adapter = LoraAdapter::new(
                to_tensor(a, &dev),
                Tensor::zeros([d_out, cfg.r], &dev),
                cfg.alpha,
                cfg.rslora,
                cfg.dropout,
            );
            if let Some(slot) = site.slot(&mut model.layers[layer]) {
                *slot = Some(adapter);
            }
        }
    }
    Ok(model)
}

/// `[r, d_in]` uniform in `±1/sqrt(d_in)`: `kaiming_uniform_(a = sqrt(5))`, whose bound is
/// `sqrt(6 / ((1 + a²) d_in))`. The stream is seeded by `seed` and `name` (FNV-1a), so an
/// adapter's start does not depend on which others exist.
fn kaiming_uniform(name: &str, r: usize, d_in: usize, seed: u64) -> RawTensor {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    let mut rng = StdRng::seed_from_u64(seed ^ h);
    let bound = 1.0 / (d_in as f32).sqrt();
    let data = (0..r * d_in)
        .map(|_| rng.random_range(-bound..bound))
        .collect();
    RawTensor::new(vec![r, d_in], data)
}

/// Fold every adapter into the weight it adapts (`w' = w + scale Aᵀ Bᵀ`, `[d_in, d_out]`) and
/// drop it: a plain model computing what the adapted one did. Each weight keeps whether it
/// trains.
pub fn merge_adapters<B: Backend>(mut model: CausalLm<B>) -> CausalLm<B> {
    fn add<B: Backend>(p: Param<Tensor<B, 2>>, delta: Tensor<B, 2>) -> Param<Tensor<B, 2>> {
        let trains = p.is_require_grad();
        p.map(|w| (w + delta).detach().set_require_grad(trains))
    }
    fn merge_linear<B: Backend>(l: &mut Linear<B>) {
        if let Some(a) = l.lora.take() {
            l.weight = add(l.weight.clone(), a.delta_weight());
        }
    }
    for block in &mut model.layers {
        let attn = &mut block.attn;
        if let Some(a) = attn.qkv_lora.take() {
            let delta = a.delta_weight();
            let mut col = 0;
            for l in [&mut attn.q_proj, &mut attn.k_proj, &mut attn.v_proj] {
                let n = l.weight.dims()[1];
                l.weight = add(l.weight.clone(), delta.clone().narrow(1, col, n));
                col += n;
            }
        }
        for l in [
            &mut attn.q_proj,
            &mut attn.k_proj,
            &mut attn.v_proj,
            &mut attn.o_proj,
        ] {
            merge_linear(l);
        }
        let mlp = &mut block.mlp;
        if let Some(g) = mlp.gate_proj.as_mut() {
            merge_linear(g);
        }
        merge_linear(&mut mlp.up_proj);
        merge_linear(&mut mlp.down_proj);
    }
    model
}

/// GPT-NeoX's fused q/k/v rows are `[heads, 3, head_dim]`; r2m's adapter keeps q's rows, then
/// k's, then v's (`[3, heads, head_dim]`). Reorder the rows of a `[3 heads head_dim, cols]`
/// tensor from r2m's order to HF's (`to_hf`) or back.
fn neox_rows(t: &RawTensor, heads: usize, head_dim: usize, to_hf: bool) -> RawTensor {
    let cols = t.shape[1];
    let block = head_dim * cols;
    let mut out = Vec::with_capacity(t.data.len());
    for i in 0..3 * heads {
        // Output row block i: HF's (head, j) = (i / 3, i % 3), or r2m's (j, head) = (i / h, i % h).
        let src = if to_hf {
            let (head, j) = (i / 3, i % 3);
            j * heads + head
        } else {
            let (j, head) = (i / heads, i % heads);
            head * 3 + j
        };
        out.extend_from_slice(&t.data[src * block..(src + 1) * block]);
    }
    RawTensor::new(t.shape.clone(), out)
}

/// Write the model's adapters as a PEFT adapter directory `dir`: `adapter_config.json` (LoRA,
/// causal LM, `base_model_name_or_path = base_name`, `layers_to_transform` when not every
/// block has adapters) and `adapter_model.safetensors` (f32, PEFT's key names:
/// `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`, `[r, d_in]`, and
/// `lora_B.weight`, `[d_out, r]`). `peft.PeftModel.from_pretrained(base, dir)` loads it.
///
/// Fails when the model has no adapters, or adapters PEFT's config cannot describe (ranks,
/// alphas or dropouts that differ, or targets that differ between blocks).
pub fn save_peft_adapter<B: Backend>(
    model: &CausalLm<B>,
    dir: &Path,
    base_name: &str,
) -> Result<()> {
    let neox = is_neox(model);
    let (h, hd) = (model.config.num_heads, model.config.head_dim);
    let mut tensors = Vec::new();
    let mut layers = BTreeSet::new();
    let mut modules = BTreeSet::new();
    let mut present = BTreeSet::new();
    let mut hyper: Option<(usize, f64, bool, f64)> = None;
    for (i, block) in model.layers.iter().enumerate() {
        for &site in Site::all(neox) {
            let Some(a) = site.adapter(block) else {
                continue;
            };
            let this = (a.rank(), a.alpha, a.rslora, a.dropout);
            if hyper.is_some_and(|h| h != this) {
                return Err(R2mError::Other(format!(
                    "{}: adapters with different r, alpha, rslora or dropout ({hyper:?} and {this:?}) \
                     do not fit one PEFT config",
                    dir.display()
                )));
            }
            hyper = Some(this);
            let name = peft_prefix(model, i, site);
            let b = RawTensor::from_tensor(a.b.val());
            let b = if site == Site::Qkv {
                neox_rows(&b, h, hd, true)
            } else {
                b
            };
            tensors.push((
                format!("{name}.lora_A.weight"),
                RawTensor::from_tensor(a.a.val()),
            ));
            tensors.push((format!("{name}.lora_B.weight"), b));
            layers.insert(i);
            modules.insert(site.peft_target(neox));
            present.insert((i, site.peft_target(neox)));
        }
    }
    let Some((r, alpha, rslora, dropout)) = hyper else {
        return Err(R2mError::Other(format!(
            "{}: the model has no LoRA adapters to save",
            dir.display()
        )));
    };
    if present.len() != layers.len() * modules.len() {
        return Err(R2mError::Other(format!(
            "{}: the blocks carry adapters on different projections, which one PEFT config \
             (target_modules, layers_to_transform) cannot describe",
            dir.display()
        )));
    }
    let every_layer = layers.len() == model.layers.len();
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": r,
        "lora_alpha": json_number(alpha),
        "lora_dropout": dropout,
        "target_modules": modules.iter().collect::<Vec<_>>(),
        "use_rslora": rslora,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_to_transform": if every_layer { Value::Null } else { json!(layers) },
        "layers_pattern": if every_layer { Value::Null } else { json!("layers") },
        "modules_to_save": Value::Null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": false,
    });
    std::fs::create_dir_all(dir).map_err(|e| R2mError::io(dir, e))?;
    let path = dir.join(ADAPTER_CONFIG);
    let text = serde_json::to_string_pretty(&config).expect("json") + "\n";
    std::fs::write(&path, text).map_err(|e| R2mError::io(&path, e))?;
    save_safetensors(&dir.join(ADAPTER_WEIGHTS), &tensors)
}

/// An integral alpha as a JSON integer (PEFT's type for it), any other as a float.
fn json_number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        json!(x as i64)
    } else {
        json!(x)
    }
}

/// Read a PEFT LoRA adapter directory (as [`save_peft_adapter`] or PEFT's `save_pretrained`
/// writes it) onto `model`, replacing any adapters it had, and freeze every other parameter, as
/// [`add_adapters`] does. Which projections of which blocks get adapters follows the tensors in
/// `adapter_model.safetensors`; `r`, `lora_alpha`, `lora_dropout` and `use_rslora` come from
/// `adapter_config.json`.
///
/// Refused, naming the file: another PEFT type, DoRA, trained biases, per-module ranks or
/// alphas, `modules_to_save`, and any tensor that does not fit the model (shape, name).
pub fn load_peft_adapter<B: Backend>(model: CausalLm<B>, dir: &Path) -> Result<CausalLm<B>> {
    let cfg_path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| R2mError::io(&cfg_path, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| R2mError::format(&cfg_path, format!("line {}: {e}", e.line())))?;
    let bad = |msg: String| R2mError::format(&cfg_path, msg);
    let get = |k: &str| v.get(k).filter(|x| !x.is_null());
    let peft_type = get("peft_type").and_then(Value::as_str).unwrap_or("");
    if peft_type != "LORA" {
        return Err(bad(format!(
            "peft_type is `{peft_type}`; only LORA adapters load"
        )));
    }
    let r = get("r")
        .and_then(Value::as_u64)
        .filter(|&r| r > 0)
        .ok_or_else(|| bad("`r` must be a positive integer".into()))? as usize;
    let alpha = get("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| bad("no numeric `lora_alpha`".into()))?;
    let dropout = get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0);
    let rslora = get("use_rslora").and_then(Value::as_bool).unwrap_or(false);
    if get("use_dora").and_then(Value::as_bool).unwrap_or(false) {
        return Err(bad(
            "DoRA adapters (use_dora = true) are not supported".into()
        ));
    }
    if get("fan_in_fan_out")
        .and_then(Value::as_bool)
        .unwrap_or(false)
    {
        return Err(bad(
            "fan_in_fan_out = true (GPT-2's Conv1D layout) is not supported".into(),
        ));
    }
    let bias = get("bias").and_then(Value::as_str).unwrap_or("none");
    if bias != "none" {
        return Err(bad(format!(
            "bias = \"{bias}\" (trained biases) is not supported; only \"none\""
        )));
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if get(key)
            .and_then(Value::as_object)
            .is_some_and(|m| !m.is_empty())
        {
            return Err(bad(format!(
                "`{key}` (per-module ranks or alphas) is not supported"
            )));
        }
    }
    if get("modules_to_save")
        .and_then(Value::as_array)
        .is_some_and(|m| !m.is_empty())
    {
        return Err(bad(
            "`modules_to_save` (fully trained modules) is not supported".into(),
        ));
    }
    // Variants that change what the adapter computes or where it sits.
    for key in [
        "lora_bias",
        "layer_replication",
        "trainable_token_indices",
        "target_parameters",
        "alora_invocation_tokens",
        "use_qalora",
        "use_bdlora",
    ] {
        let set = get(key).is_some_and(|x| match x {
            Value::Bool(b) => *b,
            Value::Array(a) => !a.is_empty(),
            Value::Object(o) => !o.is_empty(),
            _ => true,
        });
        if set {
            return Err(bad(format!(
                "`{key}` is set: that LoRA variant is not supported"
            )));
        }
    }
    let weights_path = dir.join(ADAPTER_WEIGHTS);
    if !weights_path.exists() {
        return Err(R2mError::format(
            dir,
            format!("no {ADAPTER_WEIGHTS} in this directory (adapter_model.bin is not read)"),
        ));
    }
    let mut w = WeightMap::new(&weights_path);
    load_safetensors_file(&weights_path, &mut w)?;
    let neox = is_neox(&model);
    let (h, hd) = (model.config.num_heads, model.config.head_dim);
    let dev = model.device();
    let mut model = without_adapters(model).no_grad();
    let mut found = 0;
    for layer in 0..model.layers.len() {
        for &site in Site::all(neox) {
            let name = peft_prefix(&model, layer, site);
            let a_name = format!("{name}.lora_A.weight");
            if !w.contains(&a_name) {
                continue;
            }
            let Some((d_in, d_out)) = site.dims(&model.layers[layer]) else {
                continue;
            };
            let a = w.take_raw(&a_name, &[r, d_in])?;
            let b = w.take_raw(&format!("{name}.lora_B.weight"), &[d_out, r])?;
            let b = if site == Site::Qkv {
                neox_rows(&b, h, hd, false)
            } else {
                b
            };
            let adapter = LoraAdapter::new(
                to_tensor(a, &dev),
                to_tensor(b, &dev),
                alpha,
                rslora,
                dropout,
            );
            if let Some(slot) = site.slot(&mut model.layers[layer]) {
                *slot = Some(adapter);
                found += 1;
            }
        }
    }
    let leftover = w.leftover_names();
    if let Some(name) = leftover.first() {
        return Err(R2mError::format(
            &weights_path,
            format!(
                "{} tensor(s) this {} model has no place for, e.g. `{name}`: adapter and model disagree",
                leftover.len(),
                model.config.arch.model_type()
            ),
        ));
    }
    if found == 0 {
        return Err(R2mError::format(
            &weights_path,
            "no LoRA tensors in this file",
        ));
    }
    Ok(model)
}

/// Per-adapter tensors of a model, by PEFT name, on the host (for tests and tools): `A` as
/// `[r, d_in]` and `B` as `[d_out, r]` in r2m's row order.
pub fn adapter_tensors<B: Backend>(model: &CausalLm<B>) -> HashMap<String, RawTensor> {
    let neox = is_neox(model);
    let mut out = HashMap::new();
    for (i, block) in model.layers.iter().enumerate() {
        for &site in Site::all(neox) {
            if let Some(a) = site.adapter(block) {
                let name = peft_prefix(model, i, site);
                out.insert(
                    format!("{name}.lora_A.weight"),
                    RawTensor::from_tensor(a.a.val()),
                );
                out.insert(
                    format!("{name}.lora_B.weight"),
                    RawTensor::from_tensor(a.b.val()),
                );
            }
        }
    }
    out
}

pub mod adapter;
#[cfg(test)]
mod tests;
