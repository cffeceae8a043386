//! One AdamW step of a parameter tensor in one parallel pass, in place.

use burn::backend::Flex;
use burn::optim::AdamWState;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorPrimitive};
use rayon::prelude::*;

use super::{back, cast, cast2, dense_f32, CHUNK};
use crate::fused::{AdamWInputs, AdamWParams};

pub fn adamw<B: Backend, const D: usize>(
    h: &AdamWParams,
    lr: f64,
    param: Tensor<B, D>,
    grad: Tensor<B, D>,
    state: Option<AdamWState<B, D>>,
) -> Result<(Tensor<B, D>, AdamWState<B, D>), AdamWInputs<B, D>> {
    let (param, grad) = match cast2::<_, Tensor<Flex, D>>(param, grad) {
        Ok(pg) => pg,
        Err((p, g)) => return Err((p, g, state)),
    };
    let state: Option<AdamWState<Flex, D>> = match cast(state) {
        Ok(s) => s,
        Err(s) => return Err((back(param), back(grad), s)),
    };
    let same = |t: &Tensor<Flex, D>| {
        let p = t.clone().into_primitive().tensor();
        dense_f32(&p) && t.shape() == param.shape()
    };
    let fits = same(&grad)
        && same(&param)
        && state.as_ref().is_none_or(|s| {
            let m = &s.momentum;
            m.max_moment_2.is_none() && same(&m.moment_1) && same(&m.moment_2)
        });
    if !fits {
        return Err((back(param), back(grad), back(state)));
    }
    let dev = param.device();
    let (time, m, v) = match state {
        Some(s) => (
            s.momentum.time + 1,
            s.momentum.moment_1,
            s.momentum.moment_2,
        ),
        None => (
            1,
            Tensor::zeros(param.shape(), &dev),
            Tensor::zeros(param.shape(), &dev),
        ),
    };
    let (mut p, g) = (
        param.into_primitive().tensor(),
        grad.into_primitive().tensor(),
    );
    let (mut m, mut v) = (m.into_primitive().tensor(), v.into_primitive().tensor());
    let n = p.layout().num_elements();
    // The scalars as burn's AdamW rounds them.
    let (b1, b2, eps) = (h.beta_1, h.beta_2, h.epsilon);
    let (f1, f2) = (1.0 - b1, 1.0 - b2);
    let (c1, c2) = (1.0 - b1.powi(time as i32), 1.0 - b2.powi(time as i32));
    let decay = lr * h.weight_decay as f64;
    let keep = (1.0 - decay) as f32;
    let lr = lr as f32;
    p.storage_mut::<f32>()[..n]
        .par_chunks_mut(CHUNK)
        .zip(m.storage_mut::<f32>()[..n].par_chunks_mut(CHUNK))
        .zip(v.storage_mut::<f32>()[..n].par_chunks_mut(CHUNK))
        .zip(g.storage::<f32>()[..n].par_chunks(CHUNK))
        .for_each(move |(((p, m), v), g)| {
            // Indexing slices of one length (no bounds checks) lets the loop vectorize.
            let k = p.len();
            let (m, v, g) = (&mut m[..k], &mut v[..k], &g[..k]);
            for i in 0..k {
                m[i] = m[i] * b1 + g[i] * f1;
                v[i] = v[i] * b2 + (g[i] * g[i]) * f2;
                let delta = (m[i] / c1) / ((v[i] / c2).sqrt() + eps);
                let decayed = if decay == 0.0 { p[i] } else { p[i] * keep };
                p[i] = decayed - delta * lr;
            }
        });
    let f = |t| Tensor::<Flex, D>::from_primitive(TensorPrimitive::Float(t));
    let state = AdamWState::new(burn::optim::AdaptiveMomentumState::new(time, f(m), f(v)));
    Ok((back(f(p)), back(state)))
}
