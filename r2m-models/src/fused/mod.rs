//! The CPU hot spots as single functions, each with a faster kernel for flex.
//!
//! [`silu_mul`] (SwiGLU's gating), [`rms_norm`], [`rope`], [`attention`], [`matmul`] and
//! [`write_positions`] (the KV cache update) are written once with burn tensor ops, which every
//! backend runs. With the `flex` feature a plain `Flex` tensor (inference: generation, log-probs
//! without gradients, reward scoring) takes a kernel here instead, because burn-flex 0.21 leaves a
//! lot on the table there:
//! - element-wise ops and attention run on one thread with scalar code; the kernels here make one
//!   pass over the data, split across the rayon pool, in loops the compiler vectorizes;
//! - a product of a few rows (one per sequence when decoding) by a weight matrix streams the
//!   weights at about a third of the memory bandwidth; [`matmul`]'s AVX-512 kernel reads them in
//!   order with the outputs in registers;
//! - `slice_assign` copies its whole target, which for the KV cache is every layer's cache at
//!   every token; [`write_positions`] writes in place;
//! - every GEMM output is zero-filled and then copied once more before the GEMM writes it;
//!   [`matmul`] calls the same `gemm` crate into a buffer it leaves uninitialized.
//!
//! In training (`Autodiff<Flex>`) [`matmul`], [`rms_norm`], [`rope`], [`silu_mul`],
//! [`attention`], [`swap_heads`] and [`token_log_probs`] (log-softmax + gather over the
//! vocabulary) are custom autodiff ops, each a forward pass and a backward pass of its own in place
//! of burn's chain of single-threaded ops (for [`matmul`]: two GEMMs straight into new buffers);
//! and [`adamw`] is the optimizer's update in one pass. Both paths of every function compute the
//! same thing: the tests (`fused/tests.rs`) hold them, and their gradients,
//! to each other, and the SmolLM2 parity fixtures run through the kernels.
//!
//! Under `Autodiff` of any other backend (the GPU ones), [`rope`], [`rms_norm`] and [`attention`]
//! are custom autodiff ops too, written with tensor ops and a backward pass of their own
//! (`fused/autodiff.rs`), once [`register_autodiff_ops`] was called for that backend. With the
//! `cubecl` feature, decoding's [`attention`] on a GPU backend is one kernel of its own
//! (`fused/cube.rs`), once [`register_cube_ops`] was called for that backend.

use burn::optim::AdamWState;
use burn::tensor::activation::{log_softmax, silu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};
use r2m_core::tensor::{entropy, pick_targets};

/// `silu(gate) * up`, element-wise.
pub fn silu_mul<B: Backend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    #[cfg(feature = "flex")]
    let (gate, up) = match flex::silu_mul(gate, up) {
        Ok(out) => return out,
        Err(inputs) => inputs,
    };
    silu(gate) * up
}

/// RMSNorm, `x / sqrt(mean(x², last dim) + eps) * weight` (Llama, Qwen2).
///
/// Off flex the weight is reshaped first: under burn's fusion a reshape recorded between the
/// divide and the product leaves both to run as kernels of their own; this way they are one.
///
/// # Shapes
/// - `x`: `[batch, seq, hidden]`, `weight`: `[hidden]` -> `[batch, seq, hidden]`
pub fn rms_norm<B: Backend>(x: Tensor<B, 3>, weight: Tensor<B, 1>, eps: f64) -> Tensor<B, 3> {
    #[cfg(feature = "flex")]
    let (x, weight) = match flex::rms_norm(x, weight, eps) {
        Ok(out) => return out,
        Err(inputs) => inputs,
    };
    if let Some(ops) = autodiff::ops::<B>() {
        return (ops.rms_norm)(x, weight, eps);
    }
    rms_norm_ops(x, weight, eps).0
}

/// [`rms_norm`] with tensor ops, and each row's rms (`[batch, seq, 1]`, which the custom autodiff
/// op keeps for its backward pass).
fn rms_norm_ops<B: Backend>(
    x: Tensor<B, 3>,
    weight: Tensor<B, 1>,
    eps: f64,
) -> (Tensor<B, 3>, Tensor<B, 3>) {
    let weight = weight.unsqueeze::<3>();
    let rms = (x.clone().square().mean_dim(2) + eps).sqrt();
    (x / rms.clone() * weight, rms)
}

/// `x w`: the linear layers and the tied LM head. On flex, a few rows of `x` (decoding: one row
/// per sequence) take an AVX-512 kernel and more rows the `gemm` crate, written straight into the
/// output (a custom autodiff op under `Autodiff<Flex>`).
///
/// # Shapes
/// - `x`: `[rows, k]`, `w`: `[k, n]` (row-major, or the transpose of a row-major `[n, k]`, as the
///   tied LM head's `embed_tokens.transpose()` is)
/// - returns `[rows, n]`
pub fn matmul<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>) -> Tensor<B, 2> {
    #[cfg(feature = "flex")]
    let (x, w) = match flex::matmul(x, w) {
        Ok(out) => return out,
        Err(inputs) => inputs,
    };
    x.matmul(w)
}

/// Rotary position embedding in HF's rotate-half layout, `x cos + rotate_half(x) sin`, per head
/// of `head_dim` values of which the first `2 half` rotate in pairs `(j, j + half)`; the result
/// comes out head-major, as attention takes it.
///
/// It is computed as `x cos + partner(x) sin`, where `partner` swaps a head's two rotated halves
/// and the `sin` table carries rotate_half's sign: `-sin` on the first `half` values of a head,
/// `sin` on the next `half`, 0 past `2 half` (where `cos` is 1).
///
/// Off flex that is two `select`s by [`RopeIndex`] and an element-wise sum, which burn's fusion
/// can make into one kernel. `x` is read through `select` both times, `x cos` included, because
/// a fused kernel cannot read one tensor both by index and element-wise. (A product by a
/// rotation matrix, as this was written before, is a matmul kernel more per call.) The input and
/// the tables are read as `[batch, heads, seq, head_dim]` views (a reshape and a swap of dims,
/// no copy) and the kernel writes its output in that order, so the split into heads costs no
/// kernel: burn's matmul copies a key with swapped dims before multiplying by it, and a reshape
/// copies a query with swapped dims. On flex: flex's kernel, then [`swap_heads`].
///
/// # Shapes
/// - `x`, `cos`, `sin`: `[batch, seq, heads * head_dim]` (the tables repeated per head)
/// - returns `[batch, heads, seq, head_dim]`
pub fn rope<B: Backend>(
    x: Tensor<B, 3>,
    heads: usize,
    (cos, sin): (&Tensor<B, 3>, &Tensor<B, 3>),
    index: &RopeIndex<B>,
) -> Tensor<B, 4> {
    #[cfg(feature = "flex")]
    let x = match flex::rope(x, (cos, sin), (index.head_dim, index.half)) {
        Ok(out) => {
            let [b, s, width] = out.dims();
            return swap_heads(out.reshape([b, s, heads, width / heads]));
        }
        Err(x) => x,
    };
    if let Some(ops) = autodiff::ops::<B>() {
        return (ops.rope)(x, heads, (cos, sin), index);
    }
    rope_heads_ops(x, heads, (cos, sin), index)
}

/// [`rope`] with tensor ops on head-major views of `x` and the tables: what every backend but
/// flex runs.
fn rope_heads_ops<B: Backend>(
    x: Tensor<B, 3>,
    heads: usize,
    (cos, sin): (&Tensor<B, 3>, &Tensor<B, 3>),
    index: &RopeIndex<B>,
) -> Tensor<B, 4> {
    let view = |t: Tensor<B, 3>| heads_view(t, heads);
    rope_ops(view(x), (&view(cos.clone()), &view(sin.clone())), index)
}

/// `[batch, seq, heads * head_dim]` viewed as `[batch, heads, seq, head_dim]`: a reshape and a
/// swap of dims, no copy.
fn heads_view<B: Backend>(x: Tensor<B, 3>, heads: usize) -> Tensor<B, 4> {
    let [b, s, width] = x.dims();
    x.reshape([b, s, heads, width / heads]).swap_dims(1, 2)
}

/// [`rope`] with tensor ops, over heads of `head_dim` values along the last dim: what every
/// backend but flex runs.
fn rope_ops<B: Backend>(
    x: Tensor<B, 4>,
    (cos, sin): (&Tensor<B, 4>, &Tensor<B, 4>),
    index: &RopeIndex<B>,
) -> Tensor<B, 4> {
    let same = x.clone().select(3, index.ids.clone());
    let partner = x.select(3, index.partners.clone());
    same * cos.clone() + partner * sin.clone()
}

/// The indices [`rope`] reads a head by.
#[derive(Debug, Clone)]
pub struct RopeIndex<B: Backend> {
    /// `[head_dim]`: `0..head_dim`.
    ids: Tensor<B, 1, Int>,
    /// `[head_dim]`: the index of each value's rotation partner, `half` away (itself past
    /// `2 half`).
    partners: Tensor<B, 1, Int>,
    /// Values per head (flex's kernel reads this and `half` instead of the indices).
    head_dim: usize,
    /// Rotated pairs per head.
    half: usize,
}

impl<B: Backend> RopeIndex<B> {
    /// Indices for heads of `head_dim` values with `half` rotated pairs each
    /// (`2 half <= head_dim`).
    pub fn new(head_dim: usize, half: usize, dev: &B::Device) -> Self {
        assert!(
            2 * half <= head_dim,
            "{half} rotated pairs in a head of {head_dim}"
        );
        let partner = |j: usize| match j {
            j if j < half => j + half,
            j if j < 2 * half => j - half,
            j => j,
        };
        let ints = |v: Vec<i64>| Tensor::from_data(TensorData::new(v, [head_dim]), dev);
        Self {
            ids: ints((0..head_dim as i64).collect()),
            partners: ints((0..head_dim).map(|j| partner(j) as i64).collect()),
            head_dim,
            half,
        }
    }
}

/// `x.swap_dims(1, 2)` as a contiguous tensor: `[batch, seq, heads, head_dim]` to `[batch, heads,
/// seq, head_dim]` before attention, and back after it.
///
/// On flex the copy that the following `reshape` would make goes through a single-threaded
/// strided iterator, forward and in the backward pass; here it is one parallel copy of
/// `head_dim`-long runs (a custom autodiff op under `Autodiff<Flex>`, whose backward is the same
/// copy). Other backends get burn's `swap_dims`.
///
/// When either swapped dim is 1 (decoding: one position per sequence), the swap keeps every
/// value's place in row-major order, so it is a `reshape` and copies nothing; burn's `swap_dims`
/// would leave strides that make the next `reshape` copy (a kernel per call on the GPU).
pub fn swap_heads<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, d1, d2, d3] = x.dims();
    if d1 == 1 || d2 == 1 {
        return x.reshape([b, d2, d1, d3]);
    }
    #[cfg(feature = "flex")]
    let x = match flex::swap_heads(x) {
        Ok(out) => return out,
        Err(x) => x,
    };
    x.swap_dims(1, 2)
}

/// `buf[.., .., at..at + part_len, ..] = part`: new key/value positions written into a cache buffer.
///
/// burn-flex 0.21's `slice_assign` copies the whole buffer every time (its copy-on-write check
/// counts its own temporary clone), which at every decoded token is the whole KV cache; the flex
/// path writes in place when the buffer is not shared.
///
/// # Shapes
/// - `buf`: `[batch, heads, width, head_dim]`, `part`: `[batch, heads, part_len, head_dim]`
pub fn write_positions<B: Backend>(
    buf: Tensor<B, 4>,
    at: usize,
    part: Tensor<B, 4>,
) -> Tensor<B, 4> {
    #[cfg(feature = "flex")]
    let (buf, part) = match flex::write_positions(buf, at, part) {
        Ok(out) => return out,
        Err(inputs) => inputs,
    };
    let [b, h, len, d] = part.dims();
    buf.slice_assign([0..b, 0..h, at..at + len, 0..d], part)
}

/// Scaled dot-product attention, `softmax(q kᵀ / √head_dim, masked) v`.
///
/// On the cubecl backends [`register_cube_ops`] was called for, a few query rows per head
/// (decoding) take one kernel (`fused/cube.rs`) instead of six. Otherwise backends other than flex
/// compute it with tensor ops: the two products around a plain softmax.
/// burn's own `attention` (whose fallback cubecl takes unless autotune is on) also clamps each
/// row's max and sum so that fully masked rows give zeros instead of NaN: two comparisons and two
/// masked fills more per layer, none of which burn's fusion merges. Our masks never mask a whole
/// row (a padding query attends to itself), so the clamps are dropped here.
///
/// # Shapes
/// - `q`: `[batch, heads, rows, head_dim]`; `k`, `v`: `[batch, heads, keys, head_dim]`
/// - `mask`: `[batch, heads, rows, keys]`, `true` = may not attend; no row may be all `true`
/// - returns `[batch, heads, rows, head_dim]`
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Tensor<B, 4, Bool>,
) -> Tensor<B, 4> {
    #[cfg(feature = "flex")]
    let (q, k, v, mask) = match flex::attention(q, k, v, mask) {
        Ok(out) => return out,
        Err(inputs) => inputs,
    };
    #[cfg(feature = "cubecl")]
    if let Some(ops) = cube::ops::<B>() {
        let [_, _, rows, head_dim] = q.dims();
        if rows <= cube::MAX_ROWS && head_dim <= cube::MAX_HEAD_DIM {
            return (ops.attention_rows)(q, k, v, mask);
        }
    }
    if let Some(ops) = autodiff::ops::<B>() {
        return (ops.attention)(q, k, v, mask);
    }
    attention_ops(q, k, v, mask)
}

/// [`attention`] with tensor ops: what every backend but flex runs.
fn attention_ops<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Tensor<B, 4, Bool>,
) -> Tensor<B, 4> {
    attention_probs(q, k, mask).matmul(v)
}

/// Attention's probabilities, `softmax(q kᵀ / √head_dim, masked)` (`[batch, heads, rows, keys]`),
/// which the custom autodiff op keeps for its backward pass.
fn attention_probs<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    mask: Tensor<B, 4, Bool>,
) -> Tensor<B, 4> {
    let head_dim = q.dims()[3];
    let scores = q.matmul(k.swap_dims(2, 3)) * (1.0 / (head_dim as f64).sqrt());
    softmax(scores.mask_fill(mask, f32::NEG_INFINITY), 3)
}

/// Log-probability of each target token under `logits`, `log_softmax(logits)[.., target]`.
///
/// The log-softmax over a 49k vocabulary is most of a training step's single-threaded work on
/// flex: burn makes about six passes over the `[batch, seq, vocab]` logits forward and as many
/// backward (200 MB each for 8 x 128 tokens). With flex (plain, or under `Autodiff` as a custom op
/// with its own backward) this is one pass over the rows in parallel forward, and one backward,
/// `∂logp/∂logits = onehot(target) - softmax`, written over the saved logits.
///
/// # Shapes
/// - `logits`: `[batch, seq, vocab]`, `targets`: `[batch, seq]`
/// - returns `[batch, seq]`
pub fn token_log_probs<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
) -> Tensor<B, 2> {
    log_probs_and_entropy(logits, targets, false).0
}

/// [`token_log_probs`] and the entropy of each position's distribution (without gradient): on flex
/// the same pass computes both.
pub fn token_log_probs_with_entropy<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let (logp, entropy) = log_probs_and_entropy(logits, targets, true);
    (logp, entropy.expect("asked for"))
}

fn log_probs_and_entropy<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
    with_entropy: bool,
) -> (Tensor<B, 2>, Option<Tensor<B, 2>>) {
    #[cfg(feature = "flex")]
    let (logits, targets) = match flex::token_log_probs(logits, targets) {
        Ok((logp, entropy)) => return (logp, Some(entropy)),
        Err(inputs) => inputs,
    };
    let log_probs = log_softmax(logits, 2);
    let entropy = with_entropy.then(|| entropy(log_probs.clone().detach()));
    (pick_targets(log_probs, targets), entropy)
}

/// AdamW's hyper-parameters for [`adamw`] (burn's `AdamWConfig` without AMSGrad and cautious
/// weight decay).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub beta_1: f32,
    pub beta_2: f32,
    pub epsilon: f32,
    pub weight_decay: f32,
}

/// The inputs of [`adamw`], handed back when there is no kernel for the backend.
pub type AdamWInputs<B, const D: usize> = (Tensor<B, D>, Tensor<B, D>, Option<AdamWState<B, D>>);

/// One AdamW step of one parameter tensor in one pass, as burn's `AdamW` computes it:
/// `m = β1 m + (1-β1) g`, `v = β2 v + (1-β2) g²`, `p = p (1 - lr λ) - lr m̂ / (√v̂ + ε)` with the
/// bias corrections `m̂ = m / (1-β1ᵗ)`, `v̂ = v / (1-β2ᵗ)`; the state is burn's (checkpoints do not
/// change). burn's optimizer makes about a dozen single-threaded passes over each tensor for this
/// (about a second per step for SmolLM2 on 2 cores); the flex kernel makes one, over the rayon pool,
/// in place. Other backends get their inputs back (`Err`), for burn's `AdamW`.
pub fn adamw<B: Backend, const D: usize>(
    hyper: &AdamWParams,
    lr: f64,
    param: Tensor<B, D>,
    grad: Tensor<B, D>,
    state: Option<AdamWState<B, D>>,
) -> Result<(Tensor<B, D>, AdamWState<B, D>), AdamWInputs<B, D>> {
    #[cfg(feature = "flex")]
    return flex::adamw(hyper, lr, param, grad, state);
    #[cfg(not(feature = "flex"))]
    {
        let _ = (hyper, lr);
        Err((param, grad, state))
    }
}

pub use autodiff::register as register_autodiff_ops;
#[cfg(feature = "cubecl")]
pub use cube::register as register_cube_ops;

// Custom autodiff ops for the other backends (autodiff.rs), the cubecl kernels (cube.rs), and
// where the backend-specific ops are filed (registry.rs).
mod autodiff;
#[cfg(feature = "cubecl")]
mod cube;
mod registry;
// The kernels (flex/, one file per op), the vectorizable row arithmetic they share (lanes.rs),
// and the tests that hold each kernel and its gradient to burn's own ops (tests.rs).
#[cfg(feature = "flex")]
mod flex;
#[cfg(feature = "flex")]
mod lanes;
#[cfg(all(test, feature = "flex"))]
mod tests;
