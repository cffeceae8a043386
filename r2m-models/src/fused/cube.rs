//! Decoding attention as one cubecl kernel, for the GPU backends (WGPU, CUDA; with or without
//! burn's fusion).
//!
//! With tensor ops, attention is six kernels per layer however few queries there are: the product
//! `q kᵀ` (scale and mask fused in), softmax's max, its subtract-and-exp, its sum and its divide
//! (burn-cubecl-fusion 0.21 runs a reduction followed by broadcast ops unfused without autotune),
//! and the product by `v`. When decoding, each sequence has one query per head, the whole product
//! is a few thousand multiply-adds per head, and a GPU's time goes to launching those kernels. The
//! kernel here does all of it in one launch: one cube per query row and head, which computes the
//! row's scores into shared memory, the softmax over them and the weighted sum of `v`, a chunk of
//! keys at a time with FlashAttention's running max and sum, in f32 whatever the tensors' type.
//!
//! [`register`] files it for one cubecl backend (`registry.rs`); [`super::attention`] takes it for
//! up to [`MAX_ROWS`] query rows per head (decoding; prefill and training keep the matmuls, which
//! use the GPU far better on many rows). `Autodiff` backends never see it: the rollouts generate
//! on the inner backend.

use std::marker::PhantomData;

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Shape, Tensor, TensorPrimitive};
use burn_cubecl::cubecl;
use burn_cubecl::fusion::FusionCubeRuntime;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionRuntime};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};

use super::autodiff::AttentionFn;
use cubecl::prelude::{CubeCount, CubeDim};

/// The most query rows per (sequence, K/V head) that take the kernel: one position times the
/// query heads sharing a K/V head (3 for SmolLM2, up to 8 in common grouped-query models).
pub const MAX_ROWS: usize = 16;
/// The largest head dimension the kernel takes: one thread per output element.
pub const MAX_HEAD_DIM: usize = 256;
/// Keys scored per pass through shared memory.
const CHUNK: u32 = 256;

/// The kernel, apart: cubecl's prelude names `Tensor` too.
mod kernel {
    use burn_cubecl::cubecl;
    use cubecl::prelude::*;

    /// Score of a masked key: far below any real one, and finite (WGSL has no infinity literal).
    const MASKED: f32 = -1.0e30;

    /// `out[b, h, r] = softmax(scale · q[b, h, r] · k[b, h]ᵀ, masked) · v[b, h]`, one cube per
    /// `(r, h, b)`; `threads` (a power of two, at least the head dim) threads per cube. Every
    /// tensor is read through its strides.
    #[cube(launch)]
    pub(super) fn attention_rows_kernel<F: Float, M: Numeric>(
        q: &Tensor<F>,    // [batch, heads, rows, head_dim]
        k: &Tensor<F>,    // [batch, heads, keys, head_dim]
        v: &Tensor<F>,    // [batch, heads, keys, head_dim]
        mask: &Tensor<M>, // [batch, heads, rows, keys], non-zero = may not attend
        out: &mut Tensor<F>,
        scale: f32,
        #[comptime] threads: u32,
        #[comptime] chunk: u32,
        #[define(F, M)] _dtypes: [StorageType; 2],
    ) {
        let t = UNIT_POS_X as usize;
        let nt = threads as usize;
        let row = CUBE_POS_X as usize;
        let head = CUBE_POS_Y as usize;
        let batch = CUBE_POS_Z as usize;
        let head_dim = q.shape(3);
        let keys = k.shape(2);

        let q_at = batch * q.stride(0) + head * q.stride(1) + row * q.stride(2);
        let k_at = batch * k.stride(0) + head * k.stride(1);
        let v_at = batch * v.stride(0) + head * v.stride(1);
        let m_at = batch * mask.stride(0) + head * mask.stride(1) + row * mask.stride(2);
        let (q_d, k_j, k_d) = (q.stride(3), k.stride(2), k.stride(3));
        let (v_j, v_d, m_j) = (v.stride(2), v.stride(3), mask.stride(3));

        // The scaled query row, shared by every thread.
        let mut q_row = SharedMemory::<f32>::new(threads as usize);
        // One chunk's scores, then their exponentials.
        let mut p = SharedMemory::<f32>::new(chunk as usize);
        // Partial maxima and sums, one per thread.
        let mut partial = SharedMemory::<f32>::new(threads as usize);

        if t < head_dim {
            q_row[t] = f32::cast_from(q[q_at + t * q_d]) * scale;
        }
        sync_cube();

        let masked = f32::new(MASKED);
        // Running max and sum over the chunks so far, and this thread's output element. (Variables
        // that change at run time start as `.runtime()`: cubecl makes constants of the others.)
        let mut run_max = MASKED.runtime();
        let mut run_sum = 0.0f32.runtime();
        let mut acc = 0.0f32.runtime();
        let mut start = 0usize.runtime();
        while start < keys {
            let mut n = keys - start;
            if n > chunk as usize {
                n = chunk as usize;
            }

            // Scores, and this thread's max over its keys.
            let mut local_max = MASKED.runtime();
            let mut j = t;
            while j < n {
                let key = start + j;
                let mut s = MASKED.runtime();
                if u32::cast_from(mask[m_at + key * m_j]) == 0u32 {
                    let mut dot = 0.0f32.runtime();
                    for i in 0..head_dim {
                        dot += q_row[i] * f32::cast_from(k[k_at + key * k_j + i * k_d]);
                    }
                    s = dot;
                }
                p[j] = s;
                if s > local_max {
                    local_max = s;
                }
                j += nt;
            }
            partial[t] = local_max;
            sync_cube();
            let mut half = (nt / 2).runtime();
            while half > 0 {
                if t < half && partial[t + half] > partial[t] {
                    partial[t] = partial[t + half];
                }
                sync_cube();
                half /= 2;
            }
            let chunk_max = partial[0];
            sync_cube();

            let mut new_max = run_max;
            if chunk_max > new_max {
                new_max = chunk_max;
            }
            // Exponentials (masked keys: 0, also when the whole chunk so far is masked) and their sum.
            let mut local_sum = 0.0f32.runtime();
            let mut j = t;
            while j < n {
                let mut e = 0.0f32.runtime();
                if p[j] > masked {
                    e = f32::exp(p[j] - new_max);
                }
                p[j] = e;
                local_sum += e;
                j += nt;
            }
            partial[t] = local_sum;
            sync_cube();
            let mut half = (nt / 2).runtime();
            while half > 0 {
                if t < half {
                    partial[t] += partial[t + half];
                }
                sync_cube();
                half /= 2;
            }
            let chunk_sum = partial[0];

            // Rescale what the earlier chunks summed to the new max, then add this chunk's keys.
            let correction = f32::exp(run_max - new_max);
            run_sum = run_sum * correction + chunk_sum;
            if t < head_dim {
                let mut a = acc * correction;
                for j in 0..n {
                    a += p[j] * f32::cast_from(v[v_at + (start + j) * v_j + t * v_d]);
                }
                acc = a;
            }
            run_max = new_max;
            // Every thread is done with `p` and `partial` before the next chunk writes them.
            sync_cube();
            start += chunk as usize;
        }

        if t < head_dim {
            let o_at = batch * out.stride(0) + head * out.stride(1) + row * out.stride(2);
            out[o_at + t * out.stride(3)] = F::cast_from(acc / run_sum);
        }
    }
}

/// Launch [`kernel::attention_rows_kernel`] on cubecl tensors; returns `[batch, heads, rows,
/// head_dim]` in `q`'s type.
fn attention_rows<R: CubeRuntime>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    mask: CubeTensor<R>,
) -> CubeTensor<R> {
    let [batch, heads, rows, head_dim] = q.meta.shape.dims::<4>();
    let threads = head_dim.next_power_of_two().max(32) as u32;
    let client = q.client.clone();
    let (f_dtype, m_dtype) = (q.dtype, mask.dtype);
    let out = empty_device_dtype::<R>(
        client.clone(),
        q.device.clone(),
        Shape::new([batch, heads, rows, head_dim]),
        f_dtype,
    );
    kernel::attention_rows_kernel::launch::<R>(
        &client,
        CubeCount::Static(rows as u32, heads as u32, batch as u32),
        CubeDim::new_1d(threads),
        q.into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        mask.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        1.0 / (head_dim as f32).sqrt(),
        threads,
        CHUNK,
        [f_dtype.into(), m_dtype.into()],
    );
    out
}

/// The kernels filed for one cubecl backend `B`.
pub(super) struct CubeOps<B: Backend> {
    /// Attention for at most [`MAX_ROWS`] rows per head and [`MAX_HEAD_DIM`].
    pub attention_rows: AttentionFn<B>,
}

// By hand: derived impls would ask for `B: Clone`/`B: Copy`.
impl<B: Backend> Clone for CubeOps<B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for CubeOps<B> {}

/// The cubecl backend without fusion.
type Cube<R, F, I, BT> = CubeBackend<R, F, I, BT>;

/// Make [`super::attention`] take the kernel on the cubecl backend with runtime `R` and these
/// element types, with and without burn's fusion. Call it once for the backend a program runs on.
pub fn register<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>() {
    super::registry::register(CubeOps::<Cube<R, F, I, BT>> {
        attention_rows: attention_plain::<R, F, I, BT>,
    });
    super::registry::register(CubeOps::<Fusion<Cube<R, F, I, BT>>> {
        attention_rows: attention_fused::<R, F, I, BT>,
    });
}

/// The kernels filed for `B`, if [`register`] was called for it.
pub(super) fn ops<B: Backend>() -> Option<CubeOps<B>> {
    super::registry::lookup::<CubeOps<B>>()
}

fn attention_plain<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    q: Tensor<Cube<R, F, I, BT>, 4>,
    k: Tensor<Cube<R, F, I, BT>, 4>,
    v: Tensor<Cube<R, F, I, BT>, 4>,
    mask: Tensor<Cube<R, F, I, BT>, 4, Bool>,
) -> Tensor<Cube<R, F, I, BT>, 4> {
    let out = attention_rows(
        q.into_primitive().tensor(),
        k.into_primitive().tensor(),
        v.into_primitive().tensor(),
        mask.into_primitive(),
    );
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// Under fusion the kernel is a custom operation in the stream: fusion runs what was queued
/// before it, then the kernel on the inner backend's tensors.
fn attention_fused<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    q: Tensor<Fusion<Cube<R, F, I, BT>>, 4>,
    k: Tensor<Fusion<Cube<R, F, I, BT>>, 4>,
    v: Tensor<Fusion<Cube<R, F, I, BT>>, 4>,
    mask: Tensor<Fusion<Cube<R, F, I, BT>>, 4, Bool>,
) -> Tensor<Fusion<Cube<R, F, I, BT>>, 4> {
    let shape = Shape::new(q.dims());
    let (q, k, v) = (
        q.into_primitive().tensor(),
        k.into_primitive().tensor(),
        v.into_primitive().tensor(),
    );
    let mask = mask.into_primitive();
    // The streams the inputs come from, before `into_ir` consumes them.
    let streams = OperationStreams::with_inputs([&q, &k, &v, &mask]);
    let client = q.client.clone();
    let out = TensorIr::uninit(client.create_empty_handle(), shape, q.dtype);
    let desc = CustomOpIr::new(
        "r2m_attention_rows",
        &[q.into_ir(), k.into_ir(), v.into_ir(), mask.into_ir()],
        &[out],
    );
    let out = client
        .register(
            streams,
            OperationIr::Custom(desc.clone()),
            AttentionRowsOp::<R, F, I, BT> {
                desc,
                _backend: PhantomData,
            },
        )
        .output();
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

#[derive(Debug)]
struct AttentionRowsOp<R, F, I, BT> {
    desc: CustomOpIr,
    _backend: PhantomData<(R, F, I, BT)>,
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>
    Operation<FusionCubeRuntime<R>> for AttentionRowsOp<R, F, I, BT>
{
    fn execute(
        &self,
        handles: &mut HandleContainer<<FusionCubeRuntime<R> as FusionRuntime>::FusionHandle>,
    ) {
        let ([q, k, v, mask], [out]) = self.desc.as_fixed();
        let result = attention_rows(
            handles.get_float_tensor::<Cube<R, F, I, BT>>(q),
            handles.get_float_tensor::<Cube<R, F, I, BT>>(k),
            handles.get_float_tensor::<Cube<R, F, I, BT>>(v),
            handles.get_bool_tensor::<Cube<R, F, I, BT>>(mask),
        );
        handles.register_float_tensor::<Cube<R, F, I, BT>>(&out.id, result);
    }
}
