//! The KV cache update: new positions written into a cache buffer in place.

use burn::backend::Flex;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorPrimitive};

use super::{back, cast2, dense, dense_f32};

pub fn write_positions<B: Backend>(
    buf: Tensor<B, 4>,
    at: usize,
    part: Tensor<B, 4>,
) -> Result<Tensor<B, 4>, (Tensor<B, 4>, Tensor<B, 4>)> {
    let (buf, part) = cast2::<_, Tensor<Flex, 4>>(buf, part)?;
    let [b, h, len, d] = part.dims();
    let width = buf.dims()[2];
    let (mut dst, src) = (
        buf.into_primitive().tensor(),
        part.into_primitive().tensor(),
    );
    let src = dense(src);
    if !dense_f32(&dst) || !dense_f32(&src) || !dst.is_unique() || at + len > width {
        let f = |t| Tensor::<Flex, 4>::from_primitive(TensorPrimitive::Float(t));
        let out = f(dst).slice_assign([0..b, 0..h, at..at + len, 0..d], f(src));
        return Ok(back(out));
    }
    let s = src.storage::<f32>();
    let out = dst.storage_mut::<f32>();
    // One contiguous run of len * d values per (batch, head).
    for (i, part) in s[..b * h * len * d].chunks_exact(len * d).enumerate() {
        let start = (i * width + at) * d;
        out[start..start + len * d].copy_from_slice(part);
    }
    Ok(back(Tensor::<Flex, 4>::from_primitive(
        TensorPrimitive::Float(dst),
    )))
}
