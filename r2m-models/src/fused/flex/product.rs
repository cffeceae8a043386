//! Matrix products on flex through the `gemm` crate, written straight into their output, and
//! `x w` as a custom autodiff op.
//!
//! burn-flex 0.21 runs the same `gemm` crate, but creates every output with `FlexTensor::empty`,
//! which zero-fills a byte vector and then copies it into a 16-byte aligned one: two passes over
//! memory that the GEMM overwrites anyway. For the LM head's `[tokens, vocab]` logits that is
//! 2 x 200 MB at 8 x 128 tokens. In a training step these passes (and the page faults of the
//! second buffer) ran on the main thread while the GEMM threads waited: about 9% of the step's
//! samples. Here the output is allocated once, left uninitialized, and written by the GEMM.

use std::mem::MaybeUninit;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::{FlexTensor, Layout};
use burn::backend::{Autodiff, Flex};
use burn::tensor::{Bytes, DType, Tensor, TensorPrimitive};
use rayon::prelude::*;

/// Fewest multiply-adds for which a product is split over the rayon pool (burn-flex's
/// threshold): below it the GEMM runs on the calling thread.
const PARALLEL_FROM: usize = 192 * 192 * 192;

/// A 2-D f32 operand: where its element `[0, 0]` is and how far apart its rows and columns
/// are (in elements).
#[derive(Clone, Copy)]
struct Operand {
    ptr: *const f32,
    row_stride: isize,
    col_stride: isize,
}

impl Operand {
    /// The last two dims of `t` (f32, of rank `rank`) as an operand at `t`'s first element, or
    /// `None` for another dtype or rank.
    fn first_of(t: &FlexTensor, rank: usize) -> Option<Self> {
        let l = t.layout();
        if t.dtype() != DType::F32 || l.num_dims() != rank || rank < 2 {
            return None;
        }
        let s = l.strides();
        Some(Self {
            // SAFETY: `start_offset` is within the buffer of a valid tensor.
            ptr: unsafe { t.storage::<f32>().as_ptr().add(l.start_offset()) },
            row_stride: s[rank - 2],
            col_stride: s[rank - 1],
        })
    }

    /// `t` as an operand, or `None` unless it is 2-D f32.
    fn of(t: &FlexTensor) -> Option<Self> {
        Self::first_of(t, 2)
    }

    /// The transpose: the same elements with rows and columns swapped.
    fn t(self) -> Self {
        Self {
            ptr: self.ptr,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }
}

/// Memory order of a product's output.
#[derive(Clone, Copy)]
enum Order {
    /// Row-major `[m, n]`.
    Rows,
    /// Column-major: the buffer is a row-major `[n, m]`, the tensor its transpose.
    Columns,
}

/// `dst = a b` (`[m, k] x [k, n]`), `dst`'s rows and columns `dst_strides` apart.
///
/// # Safety
/// `dst` must have room for `m x n` elements at those strides (they are all written, none read,
/// when `k > 0`), and `a` and `b` must point at `[m, k]` and `[k, n]` readable elements at theirs.
unsafe fn gemm_into(
    dst: *mut f32,
    dst_strides: (isize, isize),
    a: Operand,
    b: Operand,
    [m, k, n]: [usize; 3],
    parallelism: gemm::Parallelism,
) {
    let (dst_rs, dst_cs) = dst_strides;
    // SAFETY: the caller's guarantees; `read_dst = false` makes `dst` write-only.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dst_cs,
            dst_rs,
            false,
            a.ptr,
            a.col_stride,
            a.row_stride,
            b.ptr,
            b.col_stride,
            b.row_stride,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `a b` (`[m, k] x [k, n]`) as a new f32 tensor laid out in `order`, the operands' values read
/// through their strides (the tensors they point into are borrowed by the caller while it runs).
fn product(a: Operand, b: Operand, [m, k, n]: [usize; 3], order: Order) -> FlexTensor {
    let len = m * n;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    if k == 0 {
        out.resize(len, 0.0);
    } else if len > 0 {
        let dst_strides = match order {
            Order::Rows => (n as isize, 1),
            Order::Columns => (1, m as isize),
        };
        let parallelism = if m * n * k >= PARALLEL_FROM {
            gemm::Parallelism::Rayon(0)
        } else {
            gemm::Parallelism::None
        };
        let spare: &mut [MaybeUninit<f32>] = &mut out.spare_capacity_mut()[..len];
        // SAFETY: `spare` holds `m x n` elements, all of which the GEMM writes (k > 0); `a` and
        // `b` are the caller's `[m, k]` and `[k, n]` operands.
        unsafe {
            gemm_into(
                spare.as_mut_ptr().cast::<f32>(),
                dst_strides,
                a,
                b,
                [m, k, n],
                parallelism,
            );
            out.set_len(len);
        }
    }
    let layout = match order {
        Order::Rows => Layout::contiguous([m, n].into()),
        Order::Columns => Layout::new([m, n].into(), vec![1, m as isize], 0),
    };
    FlexTensor::new(Bytes::from_elems(out), layout, DType::F32)
}

/// `x w` for 2-D f32 tensors of any strides, row-major; `None` for other dtypes or ranks.
pub(super) fn matmul(x: &FlexTensor, w: &FlexTensor) -> Option<FlexTensor> {
    let (a, b) = (Operand::of(x)?, Operand::of(w)?);
    let ([m, k], [k2, n]) = (
        x.layout().shape().dims::<2>(),
        w.layout().shape().dims::<2>(),
    );
    assert_eq!(k, k2, "matmul: [{m}, {k}] x [{k2}, {n}]");
    Some(product(a, b, [m, k, n], Order::Rows))
}

/// The backward of [`matmul_autodiff`]: `∂/∂x = g wᵀ` and `∂/∂w = xᵀ g`, each one GEMM into a
/// new buffer. `∂/∂w` takes the memory order of `w` (the tied LM head's `w` is the transpose of
/// the embedding), so that the gradient reaching the parameter is row-major.
#[derive(Debug)]
struct MatmulBackward;

impl Backward<Flex, 2> for MatmulBackward {
    /// `x` and `w` (2-D f32).
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [p_x, p_w] = ops.parents;
        let g = grads.consume::<Flex>(&ops.node);
        let (x, w) = ops.state;
        let ([m, k], [_, n]) = (
            x.layout().shape().dims::<2>(),
            w.layout().shape().dims::<2>(),
        );
        let go = Operand::of(&g).expect("the gradient of a 2-D f32 product is 2-D f32");
        let (xo, wo) = (
            Operand::of(&x).expect("2-D f32"),
            Operand::of(&w).expect("2-D f32"),
        );
        if let Some(p) = p_x {
            grads.register::<Flex>(p.id, product(go, wo.t(), [m, n, k], Order::Rows));
        }
        if let Some(p) = p_w {
            let order = if w.layout().strides()[0] == 1 && n > 1 {
                Order::Columns
            } else {
                Order::Rows
            };
            grads.register::<Flex>(p.id, product(xo.t(), go, [k, m, n], order));
        }
    }
}

/// `x w` under `Autodiff<Flex>` as one op whose backward is two GEMMs (see [`MatmulBackward`]);
/// burn's `matmul` for other dtypes.
pub(super) fn matmul_autodiff(
    x: Tensor<Autodiff<Flex>, 2>,
    w: Tensor<Autodiff<Flex>, 2>,
) -> Tensor<Autodiff<Flex>, 2> {
    type AD = Autodiff<Flex>;
    let (xa, wa) = (x.into_primitive().tensor(), w.into_primitive().tensor());
    let Some(out) = matmul(&xa.primitive, &wa.primitive) else {
        let f = |t| Tensor::<AD, 2>::from_primitive(TensorPrimitive::Float(t));
        return f(xa).matmul(f(wa));
    };
    let out = match MatmulBackward
        .prepare::<NoCheckpointing>([xa.node.clone(), wa.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((xa.primitive, wa.primitive), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Tensor::<AD, 2>::from_primitive(TensorPrimitive::Float(out))
}

/// A 4-D f32 tensor `[b0, b1, rows, cols]` as `b0 x b1` matrices: each one's [`Operand`] (with
/// rows and columns swapped when `transposed`).
struct Batch {
    first: Operand,
    dims: [usize; 4],
    /// Elements between consecutive matrices along `b0` and along `b1`.
    batch_strides: [isize; 2],
}

// SAFETY: the pointers in a `Batch` are only read, while the tensor they point into is borrowed
// by the caller of `batched`.
unsafe impl Sync for Batch {}

impl Batch {
    fn of(t: &FlexTensor, transposed: bool) -> Option<Self> {
        let mut first = Operand::first_of(t, 4)?;
        let mut dims = t.layout().shape().dims::<4>();
        if transposed {
            first = first.t();
            dims.swap(2, 3);
        }
        let s = t.layout().strides();
        Some(Self {
            first,
            dims,
            batch_strides: [s[0], s[1]],
        })
    }

    /// The `i`-th matrix (row-major order over the two batch dims).
    fn matrix(&self, i: usize) -> Operand {
        let (i0, i1) = (i / self.dims[1], i % self.dims[1]);
        let offset = i0 as isize * self.batch_strides[0] + i1 as isize * self.batch_strides[1];
        Operand {
            // SAFETY: `i < b0 * b1`, so the offset stays within the tensor.
            ptr: unsafe { self.first.ptr.offset(offset) },
            ..self.first
        }
    }
}

/// `a b` per matrix of two `[b0, b1, ., .]` f32 tensors (each transposed first where asked),
/// the matrices in parallel, each GEMM on one thread, into one new row-major output; `None` for
/// other dtypes, ranks or batch shapes.
pub(super) fn batched(
    a: &FlexTensor,
    a_transposed: bool,
    b: &FlexTensor,
    b_transposed: bool,
) -> Option<FlexTensor> {
    let (a, b) = (Batch::of(a, a_transposed)?, Batch::of(b, b_transposed)?);
    let ([b0, b1, m, k], [b0_, b1_, k_, n]) = (a.dims, b.dims);
    if (b0, b1, k) != (b0_, b1_, k_) {
        return None;
    }
    let (count, size) = (b0 * b1, m * n);
    let mut out: Vec<f32> = Vec::with_capacity(count * size);
    if k == 0 || size == 0 {
        out.resize(count * size, 0.0);
    } else {
        out.spare_capacity_mut()[..count * size]
            .par_chunks_mut(size)
            .enumerate()
            .for_each(|(i, dst)| {
                // SAFETY: `dst` holds `m x n` elements, all written (k > 0); the `i`-th
                // matrices of `a` and `b` are `[m, k]` and `[k, n]` within their tensors.
                unsafe {
                    gemm_into(
                        dst.as_mut_ptr().cast::<f32>(),
                        (n as isize, 1),
                        a.matrix(i),
                        b.matrix(i),
                        [m, k, n],
                        gemm::Parallelism::None,
                    );
                }
            });
        // SAFETY: every chunk was written above.
        unsafe { out.set_len(count * size) };
    }
    Some(FlexTensor::new(
        Bytes::from_elems(out),
        Layout::contiguous([b0, b1, m, n].into()),
        DType::F32,
    ))
}
