//! `swap_dims(1, 2)` as one parallel copy, forward and (under `Autodiff<Flex>`) backward.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorPrimitive};
use rayon::prelude::*;

use super::{back, cast, dense, zeros_f32};

/// `x` (`[a, b, c, d]`, f32) as a new dense `[a, c, b, d]`: runs of `d` copied in parallel;
/// other dtypes back unchanged.
fn swap_dims_1_2(x: FlexTensor) -> Result<FlexTensor, FlexTensor> {
    if x.dtype() != DType::F32 {
        return Err(x);
    }
    let x = dense(x);
    let [a, b, c, d] = x.layout().shape().dims::<4>();
    let mut out = zeros_f32([a, c, b, d].into());
    let src = &x.storage::<f32>()[..a * b * c * d];
    // One task per output row `(i, k)`: its `b` runs of `d` come from rows `(i, j, k)`.
    out.storage_mut::<f32>()[..a * b * c * d]
        .par_chunks_mut(b * d)
        .enumerate()
        .for_each(|(row, dst)| {
            let (i, k) = (row / c, row % c);
            for (j, run) in dst.chunks_mut(d).enumerate() {
                let at = ((i * b + j) * c + k) * d;
                run.copy_from_slice(&src[at..at + d]);
            }
        });
    Ok(out)
}

/// The backward of [`swap_heads`] under `Autodiff<Flex>`: the same copy, back.
#[derive(Debug)]
struct SwapHeadsBackward;

impl Backward<Flex, 1> for SwapHeadsBackward {
    type State = ();

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        let g = grads.consume::<Flex>(&ops.node);
        if let Some(parent) = parent {
            let g = swap_dims_1_2(g).expect("the gradient of an f32 op is f32");
            grads.register::<Flex>(parent.id, g);
        }
    }
}

pub fn swap_heads<B: Backend>(x: Tensor<B, 4>) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    let f = |t| Tensor::<Flex, 4>::from_primitive(TensorPrimitive::Float(t));
    let x = match cast::<_, Tensor<Flex, 4>>(x) {
        Ok(x) => {
            return match swap_dims_1_2(x.into_primitive().tensor()) {
                Ok(out) => Ok(back(f(out))),
                Err(x) => Err(back(f(x))),
            }
        }
        Err(x) => x,
    };
    type AD = Autodiff<Flex>;
    let xa = cast::<_, Tensor<AD, 4>>(x)?.into_primitive().tensor();
    let out = match swap_dims_1_2(xa.primitive.clone()) {
        Ok(out) => out,
        Err(_) => {
            let x = Tensor::<AD, 4>::from_primitive(TensorPrimitive::Float(xa));
            return Err(back(x));
        }
    };
    let out = match SwapHeadsBackward
        .prepare::<NoCheckpointing>([xa.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    Ok(back(Tensor::<AD, 4>::from_primitive(
        TensorPrimitive::Float(out),
    )))
}
