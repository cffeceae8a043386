//! Target-token log-probabilities (log-softmax + gather over the vocabulary) and each row's
//! entropy in one parallel pass, and a custom autodiff op under `Autodiff<Flex>`.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData, TensorPrimitive};
use rayon::prelude::*;

use super::{back, cast, dense, dense_f32};
use crate::fused::lanes;

/// Per row of `vocab` logits: `(logit[target] - lse, lse, entropy)`, rows in parallel; `None`
/// when the logits are not a dense f32 buffer or a target is out of range.
fn rows_log_softmax(
    logits: &FlexTensor,
    targets: &[i64],
    vocab: usize,
) -> Option<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let rows = targets.len();
    if rows == 0 || !dense_f32(logits) || logits.layout().num_elements() != rows * vocab {
        return None;
    }
    if targets.iter().any(|&t| t < 0 || t as usize >= vocab) {
        return None;
    }
    let x = &logits.storage::<f32>()[..rows * vocab];
    let per_row: Vec<(f32, (f32, f32))> = x
        .par_chunks(vocab)
        .zip(targets.par_iter())
        .map(|(row, &t)| {
            let max = lanes::max(row);
            let (z, zx) = lanes::sum_exp(row, max);
            let lse = max + z.ln();
            // H = lse - E[x] = ln z - E[x - max].
            (row[t as usize] - lse, (lse, z.ln() - zx / z))
        })
        .collect();
    let (lp, rest): (Vec<f32>, Vec<(f32, f32)>) = per_row.into_iter().unzip();
    let (lse, h) = rest.into_iter().unzip();
    Some((lp, lse, h))
}

fn targets_of<B2: Backend>(t: Tensor<B2, 2, Int>) -> Vec<i64> {
    t.into_data()
        .convert::<i64>()
        .to_vec::<i64>()
        .expect("int targets")
}

/// The backward of [`token_log_probs`] under `Autodiff<Flex>`: `g (onehot(target) -
/// softmax)` per row, written over the logits saved by the forward pass.
#[derive(Debug)]
struct TokenLogProbsBackward;

impl Backward<Flex, 1> for TokenLogProbsBackward {
    /// The logits, each row's log-sum-exp, and the targets.
    type State = (FlexTensor, Vec<f32>, Vec<i64>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        let g = grads.consume::<Flex>(&ops.node);
        let Some(parent) = parent else { return };
        let (mut logits, lse, targets) = ops.state;
        let g = dense(g);
        let g = &g.storage::<f32>()[..targets.len()];
        let vocab = logits.layout().num_elements() / targets.len();
        // In place when the saved logits are not shared (they are not, once the forward's
        // caller has dropped them); a copy otherwise.
        logits.storage_mut::<f32>()[..targets.len() * vocab]
            .par_chunks_mut(vocab)
            .zip(g.par_iter().zip(&lse).zip(&targets))
            .for_each(|(row, ((&g, &lse), &t))| {
                for v in row.iter_mut() {
                    *v = -g * lanes::exp(*v - lse);
                }
                row[t as usize] += g;
            });
        grads.register::<Flex>(parent.id, logits);
    }
}

type TokenLogProbs<B> = (Tensor<B, 2>, Tensor<B, 2>);
type LogitsAndTargets<B> = (Tensor<B, 3>, Tensor<B, 2, Int>);

pub fn token_log_probs<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
) -> Result<TokenLogProbs<B>, LogitsAndTargets<B>> {
    let [b, s, vocab] = logits.dims();
    let two_d = |v: Vec<f32>| TensorData::new(v, [b, s]);
    // Plain flex: inference (old and reference log-probs).
    let logits = match cast::<_, Tensor<Flex, 3>>(logits) {
        Ok(l) => {
            let t: Tensor<Flex, 2, Int> = cast(targets).unwrap_or_else(|_| unreachable!());
            let prim = l.clone().into_primitive().tensor();
            let tg = targets_of(t.clone());
            return match rows_log_softmax(&prim, &tg, vocab) {
                Some((lp, _, h)) => {
                    let dev = l.device();
                    Ok((
                        back(Tensor::<Flex, 2>::from_data(two_d(lp), &dev)),
                        back(Tensor::<Flex, 2>::from_data(two_d(h), &dev)),
                    ))
                }
                None => Err((back(l), back(t))),
            };
        }
        Err(l) => l,
    };
    // Autodiff<Flex>: training.
    type AD = Autodiff<Flex>;
    let l = match cast::<_, Tensor<AD, 3>>(logits) {
        Ok(l) => l,
        Err(l) => return Err((l, targets)),
    };
    let t: Tensor<AD, 2, Int> = cast(targets).unwrap_or_else(|_| unreachable!());
    let tg = targets_of(t.clone());
    let ad = l.into_primitive().tensor();
    let Some((lp, lse, h)) = rows_log_softmax(&ad.primitive, &tg, vocab) else {
        let l = Tensor::<AD, 3>::from_primitive(TensorPrimitive::Float(ad));
        return Err((back(l), back(t)));
    };
    let out = Tensor::<Flex, 2>::from_data(two_d(lp), &Default::default())
        .into_primitive()
        .tensor();
    let logp = match TokenLogProbsBackward
        .prepare::<NoCheckpointing>([ad.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((ad.primitive, lse, tg), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    };
    let logp = Tensor::<AD, 2>::from_primitive(TensorPrimitive::Float(logp));
    let entropy = Tensor::<AD, 2>::from_data(two_d(h), &Default::default());
    Ok((back(logp), back(entropy)))
}
