//! The flex kernels: they take the generic tensors and give them back unchanged (`Err`) unless
//! the backend is plain `Flex` (or `Autodiff<Flex>`, for the ops with a custom backward).
//!
//! One file per op, each with its forward kernel and, where it has one, its backward pass:
//! - `silu_mul.rs`: SwiGLU's gate, `silu(gate) * up`;
//! - `rms_norm.rs`: RMSNorm;
//! - `rope.rs`: the rotary position embedding;
//! - `matmul.rs`: `x w`, through `small_rows.rs` (a few rows by a weight matrix, AVX-512) or
//!   `product.rs` (the `gemm` crate into an uninitialized output; also attention's batched
//!   products);
//! - `swap_heads.rs`: the split into heads and back (`swap_dims(1, 2)` as one parallel copy);
//! - `write_positions.rs`: the KV cache update, in place;
//! - `attention.rs`: scaled dot-product attention;
//! - `token_log_probs.rs`: log-softmax + gather over the vocabulary, with each row's entropy;
//! - `adamw.rs`: the optimizer's update.
//!
//! This file holds what they share: the backend check ([`cast`]) and the buffer helpers.

use std::any::Any;

use burn::backend::flex::FlexTensor;
use burn::tensor::DType;

mod adamw;
mod attention;
mod matmul;
mod product;
mod rms_norm;
mod rope;
mod silu_mul;
mod small_rows;
mod swap_heads;
mod token_log_probs;
mod write_positions;

pub use adamw::adamw;
pub use attention::attention;
pub use matmul::matmul;
pub use rms_norm::rms_norm;
pub use rope::rope;
pub use silu_mul::silu_mul;
pub use swap_heads::swap_heads;
pub use token_log_probs::token_log_probs;
pub use write_positions::write_positions;

/// Elements per rayon task: enough work that scheduling costs little.
const CHUNK: usize = 16 * 1024;

/// `t` as a `U` when `T` and `U` are the same type (the backend check, without `unsafe`).
fn cast<T: 'static, U: 'static>(t: T) -> Result<U, T> {
    let mut slot = Some(t);
    match (&mut slot as &mut dyn Any).downcast_mut::<Option<U>>() {
        Some(u) => Ok(u.take().expect("just filled")),
        None => Err(slot.expect("not taken")),
    }
}

/// The way back from a successful `cast`.
fn back<T: 'static, U: 'static>(t: T) -> U {
    cast(t).unwrap_or_else(|_| unreachable!("only called after a successful cast"))
}

/// Both `a` and `b` as `U`s, or both back unchanged.
fn cast2<T: 'static, U: 'static>(a: T, b: T) -> Result<(U, U), (T, T)> {
    match (cast(a), cast(b)) {
        (Ok(a), Ok(b)) => Ok((a, b)),
        (a, b) => Err((a.map_or_else(|t| t, back), b.map_or_else(|t| t, back))),
    }
}

/// The f32 buffer of `t` in row-major order, if it has one.
fn dense_f32(t: &FlexTensor) -> bool {
    t.dtype() == DType::F32 && t.layout().is_contiguous() && t.layout().start_offset() == 0
}

/// `t` in row-major order from offset 0: itself when it already is, else a copy.
fn dense(t: FlexTensor) -> FlexTensor {
    if t.layout().is_contiguous() && t.layout().start_offset() == 0 {
        t
    } else {
        t.to_contiguous()
    }
}

/// A new zero-filled f32 tensor of `shape`, for a kernel to write.
///
/// `FlexTensor::empty` zero-fills a byte vector and then copies it into an aligned one; an f32
/// vector needs no copy.
fn zeros_f32(shape: burn::tensor::Shape) -> FlexTensor {
    let n = shape.num_elements();
    FlexTensor::new(
        burn::tensor::Bytes::from_elems(vec![0f32; n]),
        burn::backend::flex::Layout::contiguous(shape),
        DType::F32,
    )
}

/// Rows of `x` per rayon task for a row-wise kernel over rows of `width`.
fn rows_per_task(width: usize) -> usize {
    (CHUNK / width.max(1)).max(1)
}
