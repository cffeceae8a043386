//! The flex kernels against burn's own ops on the same inputs.

use super::*;
use burn::tensor::module;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Distribution, TensorData};
use r2m_core::testing::{TestAutodiff as AD, TestBackend as B};

fn max_diff<const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
    (a - b).abs().max().into_scalar()
}

#[test]
fn silu_mul_matches_the_tensor_ops() {
    let dev = Default::default();
    // More elements than one rayon chunk, and not a multiple of it.
    let g = Tensor::<B, 3>::random([2, 3, 7001], Distribution::Normal(0.0, 3.0), &dev);
    let u = Tensor::<B, 3>::random([2, 3, 7001], Distribution::Normal(0.0, 1.0), &dev);
    let want = silu(g.clone()) * u.clone();
    let d = max_diff(silu_mul(g, u), want);
    assert!(d < 1e-5, "max |fused - ops| = {d}");
}

/// Gradients of `sum(c * f(inputs))` (random `c`) with respect to each input.
fn grads_of<const N: usize>(
    inputs: [Tensor<B, 3>; N],
    c: &Tensor<B, 3>,
    f: impl Fn(&[Tensor<AD, 3>]) -> Tensor<AD, 3>,
) -> Vec<Tensor<B, 3>> {
    let xs: Vec<Tensor<AD, 3>> = inputs
        .into_iter()
        .map(|x| Tensor::<AD, 3>::from_inner(x).require_grad())
        .collect();
    let grads = (f(&xs) * Tensor::from_inner(c.clone())).sum().backward();
    xs.iter()
        .map(|x| x.grad(&grads).expect("every input gets a gradient"))
        .collect()
}

#[test]
fn silu_mul_and_its_gradient_match_the_tensor_ops_under_autodiff() {
    let dev = Default::default();
    let shape = [2, 3, 7001];
    let g = Tensor::<B, 3>::random(shape, Distribution::Normal(0.0, 3.0), &dev);
    let u = Tensor::<B, 3>::random(shape, Distribution::Normal(0.0, 1.0), &dev);
    let c = Tensor::<B, 3>::random(shape, Distribution::Normal(0.0, 1.0), &dev);
    let got = grads_of([g.clone(), u.clone()], &c, |x| {
        silu_mul(x[0].clone(), x[1].clone())
    });
    let want = grads_of([g, u], &c, |x| silu(x[0].clone()) * x[1].clone());
    for (name, got, want) in [("gate", &got[0], &want[0]), ("up", &got[1], &want[1])] {
        let d = max_diff(got.clone(), want.clone());
        assert!(d < 1e-5, "d/d{name}: max |fused - ops| = {d}");
    }
}

#[test]
fn rms_norm_and_its_gradients_match_the_tensor_ops() {
    let dev = Default::default();
    let (b, s, d, eps) = (3, 50, 576, 1e-5);
    let x = Tensor::<B, 3>::random([b, s, d], Distribution::Normal(0.0, 2.0), &dev);
    let w = Tensor::<B, 1>::random([d], Distribution::Normal(1.0, 0.3), &dev);
    let c = Tensor::<B, 3>::random([b, s, d], Distribution::Normal(0.0, 1.0), &dev);
    let ops = |x: Tensor<AD, 3>, w: Tensor<AD, 1>| {
        let rms = (x.clone().square().mean_dim(2) + eps).sqrt();
        x / rms * w.unsqueeze::<3>()
    };
    // Plain flex (inference).
    let want = ops(Tensor::from_inner(x.clone()), Tensor::from_inner(w.clone())).inner();
    let dist = max_diff(rms_norm(x.clone(), w.clone(), eps), want);
    assert!(dist < 1e-5, "forward: max |fused - ops| = {dist}");
    // Autodiff: the gradients of x and of the weight.
    // Autodiff: the gradients of x and of the weight, through flex's kernel, the custom autodiff
    // op the other backends take (here with flex as the inner backend), and the tensor ops.
    type Norm = fn(Tensor<AD, 3>, Tensor<AD, 1>, f64) -> Tensor<AD, 3>;
    let grads = |f: Norm| {
        let xa = Tensor::<AD, 3>::from_inner(x.clone()).require_grad();
        let wa = Tensor::<AD, 1>::from_inner(w.clone()).require_grad();
        let y = f(xa.clone(), wa.clone(), eps);
        let g = (y * Tensor::from_inner(c.clone())).sum().backward();
        (xa.grad(&g).unwrap(), wa.grad(&g).unwrap())
    };
    let (wx, ww) = grads(|x, w, eps| {
        let rms = (x.clone().square().mean_dim(2) + eps).sqrt();
        x / rms * w.unsqueeze::<3>()
    });
    for (name, f) in [
        ("flex", rms_norm::<AD> as Norm),
        ("custom op", autodiff::rms_norm::<B>),
    ] {
        let (gx, gw) = grads(f);
        let dx = max_diff(gx, wx.clone());
        assert!(dx < 1e-5, "{name}: d/dx: max |fused - ops| = {dx}");
        let dw = (gw - ww.clone()).abs().max().into_scalar();
        assert!(dw < 1e-3, "{name}: d/dw: max |fused - ops| = {dw}");
    }
}

#[test]
fn attention_matches_burn_attention_with_padding_masks() {
    let dev = Default::default();
    let (b, h, rows, keys, hd) = (2, 3, 10, 12, 64);
    let q = Tensor::<B, 4>::random([b, h, rows, hd], Distribution::Normal(0.0, 1.0), &dev);
    let k = Tensor::<B, 4>::random([b, h, keys, hd], Distribution::Normal(0.0, 1.0), &dev);
    let v = Tensor::<B, 4>::random([b, h, keys, hd], Distribution::Normal(0.0, 1.0), &dev);
    // Causal over the last `rows` keys, plus two padding keys in batch row 1.
    let mut m = Vec::new();
    for bi in 0..b {
        for _ in 0..h {
            for r in 0..rows {
                for key in 0..keys {
                    let q_pos = keys - rows + r;
                    m.push(key > q_pos || (bi == 1 && key < 2 && key != q_pos));
                }
            }
        }
    }
    let mask = Tensor::<B, 4, Bool>::from_data(TensorData::new(m, [b, h, rows, keys]), &dev);
    let want = module::attention(
        q.clone(),
        k.clone(),
        v.clone(),
        Some(mask.clone()),
        None,
        AttentionModuleOptions::default(),
    );
    let d = max_diff(
        attention(q.clone(), k.clone(), v.clone(), mask.clone()),
        want.clone(),
    );
    assert!(d < 1e-5, "max |fused - burn| = {d}");
    // The tensor-op path the GPU backends take (softmax without burn's clamps).
    let d = max_diff(
        attention_ops(q.clone(), k.clone(), v.clone(), mask.clone()),
        want,
    );
    assert!(d < 1e-5, "max |tensor ops - burn| = {d}");

    // Under autodiff: the gradients of sum(c * attention) with respect to q, k and v.
    let c = Tensor::<B, 4>::random([b, h, rows, hd], Distribution::Normal(0.0, 1.0), &dev);
    // Through flex's kernel, and the custom autodiff op the other backends take (here with flex
    // as the inner backend).
    type Attention =
        fn(Tensor<AD, 4>, Tensor<AD, 4>, Tensor<AD, 4>, Tensor<AD, 4, Bool>) -> Tensor<AD, 4>;
    let grads = |f: Option<Attention>| {
        let [qa, ka, va] =
            [&q, &k, &v].map(|x| Tensor::<AD, 4>::from_inner(x.clone()).require_grad());
        let m = Tensor::<AD, 4, Bool>::from_data(mask.to_data(), &dev);
        let out = match f {
            Some(f) => f(qa.clone(), ka.clone(), va.clone(), m),
            None => {
                let opts = AttentionModuleOptions::default();
                module::attention(qa.clone(), ka.clone(), va.clone(), Some(m), None, opts)
            }
        };
        let g = (out * Tensor::from_inner(c.clone())).sum().backward();
        [qa, ka, va].map(|x| x.grad(&g).expect("q, k and v get gradients"))
    };
    let want = grads(None);
    for (path, f) in [
        ("flex", attention::<AD> as Attention),
        ("custom op", autodiff::attention::<B>),
    ] {
        let got = grads(Some(f));
        for (name, got, want) in [
            ("q", &got[0], &want[0]),
            ("k", &got[1], &want[1]),
            ("v", &got[2], &want[2]),
        ] {
            let d = max_diff(got.clone(), want.clone());
            assert!(d < 1e-5, "{path}: d/d{name}: max |fused - burn| = {d}");
        }
    }
}

#[test]
fn write_positions_matches_slice_assign_for_unique_and_shared_buffers() {
    let dev = Default::default();
    let buf = Tensor::<B, 4>::random([2, 3, 9, 8], Distribution::Default, &dev);
    let part = Tensor::<B, 4>::random([2, 3, 2, 8], Distribution::Default, &dev);
    let before = buf.clone().into_data();
    let want = buf
        .clone()
        .slice_assign([0..2, 0..3, 5..7, 0..8], part.clone());
    // `buf` is shared here (a copy is kept), so this takes the copying path...
    let shared = write_positions(buf.clone(), 5, part.clone());
    assert_eq!(max_diff(shared, want.clone()), 0.0);
    // ...and the kept copy is unchanged.
    assert_eq!(buf.clone().into_data(), before);
    // A unique buffer is written in place.
    let unique = write_positions(buf, 5, part.clone());
    assert_eq!(max_diff(unique, want), 0.0);
    // A non-contiguous part (a narrowed view) is written the same.
    let wide = Tensor::<B, 4>::random([2, 3, 4, 8], Distribution::Default, &dev);
    let base = Tensor::<B, 4>::from_data(before, &dev);
    let want = base
        .clone()
        .slice_assign([0..2, 0..3, 0..2, 0..8], wide.clone().narrow(2, 1, 2));
    let got = write_positions(base, 0, wide.narrow(2, 1, 2));
    assert_eq!(max_diff(got, want), 0.0);
}

#[test]
fn small_row_matmul_matches_the_gemm_in_both_weight_layouts() {
    let dev = Default::default();
    let (k, n) = (576, 96);
    let w = Tensor::<B, 2>::random([k, n], Distribution::Normal(0.0, 0.1), &dev);
    // The tied LM head's layout: the transpose of a row-major [n, k].
    let wt = Tensor::<B, 2>::random([n, k], Distribution::Normal(0.0, 0.1), &dev).transpose();
    // 2..=8 rows are one kernel call, 11 two (padded), 1 and 40 go to the GEMM library.
    for rows in [1, 2, 8, 11, 40] {
        let x = Tensor::<B, 2>::random([rows, k], Distribution::Normal(0.0, 1.0), &dev);
        for (layout, w) in [("row-major", &w), ("transposed", &wt)] {
            let want = x.clone().matmul(w.clone());
            let got = matmul(x.clone(), w.clone());
            assert_eq!(got.dims(), [rows, n]);
            let d = max_diff(got, want);
            assert!(
                d < 1e-4,
                "{rows} rows, {layout} weight: max |fused - gemm| = {d}"
            );
        }
    }
}

/// The one-pass AdamW against burn's `AdamW` over a few steps, with weight decay: the same
/// parameters and state (up to rounding: flex may divide by a scalar as a product).
#[test]
fn adamw_matches_burns_adamw() {
    use burn::optim::{AdamWConfig, SimpleOptimizer};
    let dev = Default::default();
    let hyper = AdamWParams {
        beta_1: 0.9,
        beta_2: 0.999,
        epsilon: 1e-8,
        weight_decay: 0.1,
    };
    let reference = AdamWConfig::new()
        .with_beta_1(hyper.beta_1)
        .with_beta_2(hyper.beta_2)
        .with_epsilon(hyper.epsilon)
        .with_weight_decay(hyper.weight_decay)
        .init::<AD, burn::nn::Linear<AD>>()
        .optim()
        .clone();
    // More elements than one rayon chunk, and not a multiple of it.
    let p0 = Tensor::<B, 2>::random([37, 1001], Distribution::Normal(0.0, 1.0), &dev);
    let (mut p_ref, mut s_ref) = (p0.clone(), None);
    let (mut p_new, mut s_new) = (p0.clone(), None);
    for step in 0..4 {
        let g = Tensor::<B, 2>::random([37, 1001], Distribution::Normal(0.0, 0.01), &dev);
        let lr = 1e-2 * (step + 1) as f64;
        let (p, s) = reference.step(lr, p_ref, g.clone(), s_ref);
        (p_ref, s_ref) = (p, s);
        let (p, s) =
            adamw(&hyper, lr, p_new, g, s_new).unwrap_or_else(|_| panic!("flex has the kernel"));
        (p_new, s_new) = (p, Some(s));
        let (r, n) = (s_ref.as_ref().unwrap(), s_new.as_ref().unwrap());
        assert_eq!(r.momentum.time, n.momentum.time);
        let dm = max_diff(r.momentum.moment_1.clone(), n.momentum.moment_1.clone());
        let dv = max_diff(r.momentum.moment_2.clone(), n.momentum.moment_2.clone());
        let dp = max_diff(p_ref.clone(), p_new.clone());
        assert!(
            dm < 1e-9 && dv < 1e-11 && dp < 1e-6,
            "step {step}: m {dm} v {dv} p {dp}"
        );
    }
    // The parameters did move (Adam's steps are about lr each).
    let moved = max_diff(p_new, p0);
    assert!(moved > 0.05, "moved {moved}");
}

/// The fused log-prob op against burn's `log_softmax` + `gather`: values and entropy on plain
/// flex, and the gradient of a weighted sum of the log-probs under `Autodiff<Flex>`.
#[test]
fn token_log_probs_and_their_gradient_match_the_tensor_ops() {
    let dev = Default::default();
    let (b, s, vocab) = (2, 3, 1000);
    let logits = Tensor::<B, 3>::random([b, s, vocab], Distribution::Normal(0.0, 3.0), &dev);
    let ids = TensorData::new(vec![0i64, 999, 5, 17, 999, 0], [b, s]);
    let targets = Tensor::<B, 2, Int>::from_data(ids.clone(), &dev);
    let reference = |l: Tensor<B, 3>| {
        let lp = log_softmax(l, 2);
        let h = (lp.clone().exp() * lp.clone())
            .sum_dim(2)
            .squeeze_dim::<2>(2)
            .neg();
        let g = lp
            .gather(2, targets.clone().unsqueeze_dim::<3>(2))
            .squeeze_dim::<2>(2);
        (g, h)
    };
    let (lp, h) = token_log_probs_with_entropy(logits.clone(), targets.clone());
    let (lp_ref, h_ref) = reference(logits.clone());
    assert!(max_diff(lp, lp_ref) < 1e-5);
    assert!(max_diff(h, h_ref) < 1e-4);

    // Gradient of sum(w * logp) with respect to the logits.
    let w = Tensor::<AD, 2>::random([b, s], Distribution::Normal(0.0, 1.0), &dev);
    let grad_of = |fused: bool| {
        let l = Tensor::<AD, 3>::from_inner(logits.clone()).require_grad();
        let t = Tensor::<AD, 2, Int>::from_data(ids.clone(), &dev);
        let lp = if fused {
            token_log_probs(l.clone(), t)
        } else {
            log_softmax(l.clone(), 2)
                .gather(2, t.unsqueeze_dim::<3>(2))
                .squeeze_dim::<2>(2)
        };
        let grads = (lp * w.clone()).sum().backward();
        l.grad(&grads).expect("logits get a gradient")
    };
    let (got, want) = (grad_of(true), grad_of(false));
    assert!(max_diff(got, want) < 1e-6);
}

#[test]
fn swap_heads_matches_swap_dims_and_so_does_its_gradient() {
    let dev = Default::default();
    let random = |dims| Tensor::<B, 4>::random(dims, Distribution::Normal(0.0, 1.0), &dev);
    let inputs = [
        random([2, 5, 3, 7]),
        // A strided input too (a view of the transpose).
        random([2, 3, 5, 7]).swap_dims(1, 2),
        // One position (decoding) or one head: a reshape, also of a strided view.
        random([2, 1, 3, 7]),
        random([2, 5, 1, 7]),
        random([2, 3, 1, 7]).swap_dims(1, 2),
    ];
    for x in inputs {
        let [b, d1, d2, d3] = x.dims();
        let d = max_diff(swap_heads(x.clone()), x.clone().swap_dims(1, 2));
        assert_eq!(d, 0.0, "forward, {:?}", x.dims());
        let c = random([b, d2, d1, d3]);
        let grad = |fused: bool| {
            let xa = Tensor::<AD, 4>::from_inner(x.clone()).require_grad();
            let y = if fused {
                swap_heads(xa.clone())
            } else {
                xa.clone().swap_dims(1, 2)
            };
            let g = (y * Tensor::from_inner(c.clone())).sum().backward();
            xa.grad(&g).expect("x gets a gradient")
        };
        assert_eq!(max_diff(grad(true), grad(false)), 0.0, "gradient");
    }
}

/// The GEMM path of [`matmul`] (more rows than the small-row kernel takes) against flex's own
/// `matmul`: the product on plain flex, and both gradients under `Autodiff<Flex>`, for row-major
/// and transposed operands; the gradient that reaches a transposed weight's source (the tied LM
/// head's embedding) comes out row-major.
#[test]
fn matmul_and_its_gradients_match_flex_matmul_in_every_layout() {
    let dev = Default::default();
    // 40 rows run on one thread, 300 rows above the threshold on the rayon pool.
    for (m, k, n) in [(40, 48, 24), (300, 200, 130)] {
        let random = |rows, cols, transposed: bool| {
            let dims = if transposed {
                [cols, rows]
            } else {
                [rows, cols]
            };
            Tensor::<B, 2>::random(dims, Distribution::Normal(0.0, 1.0), &dev)
        };
        let c = random(m, n, false);
        for (x_t, w_t) in [(false, false), (false, true), (true, false), (true, true)] {
            let (x0, w0) = (random(m, k, x_t), random(k, n, w_t));
            let view = |t: Tensor<B, 2>, transposed| if transposed { t.transpose() } else { t };
            let want = view(x0.clone(), x_t).matmul(view(w0.clone(), w_t));
            let got = matmul(view(x0.clone(), x_t), view(w0.clone(), w_t));
            let case = format!("{m}x{k}x{n}, x transposed {x_t}, w transposed {w_t}");
            assert!(max_diff(got, want) < 1e-4, "{case}: forward");
            // Gradients with respect to the stored tensors, through the views.
            let grads = |fused: bool| {
                let (xa, wa) = (
                    Tensor::<AD, 2>::from_inner(x0.clone()).require_grad(),
                    Tensor::<AD, 2>::from_inner(w0.clone()).require_grad(),
                );
                let (xv, wv) = (
                    if x_t {
                        xa.clone().transpose()
                    } else {
                        xa.clone()
                    },
                    if w_t {
                        wa.clone().transpose()
                    } else {
                        wa.clone()
                    },
                );
                let y = if fused { matmul(xv, wv) } else { xv.matmul(wv) };
                let g = (y * Tensor::from_inner(c.clone())).sum().backward();
                (xa.grad(&g).expect("x"), wa.grad(&g).expect("w"))
            };
            let ((gx, gw), (wx, ww)) = (grads(true), grads(false));
            assert!(max_diff(gx, wx) < 1e-3, "{case}: d/dx");
            let layout = gw.clone().into_primitive().tensor().layout().clone();
            assert!(max_diff(gw, ww) < 1e-3, "{case}: d/dw");
            assert!(layout.is_contiguous(), "{case}: d/dw is not row-major");
        }
    }
}

/// The rotary embedding (flex's kernel, and the `select` path every other backend runs) against
/// its definition, `x cos + rotate_half(x) sin` with rotate_half a product by a rotation matrix,
/// values and gradient, with part of each head left unrotated (`2 half < head_dim`). The tables
/// are random, `sin` unsigned; `rope` takes it with rotate_half's sign.
#[test]
fn rope_and_its_gradient_match_the_tensor_ops() {
    let dev = Default::default();
    let (b, s, heads, hd, half) = (2, 5, 3, 12, 4);
    let shape = [b, s, heads * hd];
    let x = Tensor::<B, 3>::random(shape, Distribution::Normal(0.0, 1.0), &dev);
    let cos = Tensor::<B, 3>::random(shape, Distribution::Normal(0.0, 1.0), &dev);
    let sin = Tensor::<B, 3>::random(shape, Distribution::Normal(0.0, 1.0), &dev);
    let c = Tensor::<B, 3>::random(shape, Distribution::Normal(0.0, 1.0), &dev);
    // rotate_half(x) = cat(-x[half..2 half], x[..half], 0) per head, as a matrix; and the sign it
    // puts on sin.
    let mut rot = vec![0f32; hd * hd];
    let mut sign = vec![0f32; hd];
    for j in 0..half {
        rot[(j + half) * hd + j] = -1.0;
        rot[j * hd + j + half] = 1.0;
        (sign[j], sign[j + half]) = (-1.0, 1.0);
    }
    let rot = TensorData::new(rot, [hd, hd]);
    let sign = Tensor::<B, 1>::from_data(TensorData::new(sign.repeat(heads), [heads * hd]), &dev);
    let signed_sin = sin.clone() * sign.unsqueeze::<3>();
    let reference = |x: Tensor<AD, 3>, cos: Tensor<AD, 3>, sin: Tensor<AD, 3>| {
        let r = Tensor::<AD, 2>::from_data(rot.clone(), &dev);
        let rotated = x
            .clone()
            .reshape([b * s * heads, hd])
            .matmul(r)
            .reshape(shape);
        x * cos + rotated * sin
    };
    let ad = |t: &Tensor<B, 3>| Tensor::<AD, 3>::from_inner(t.clone());
    // rope's output is head-major.
    let heads_major = |t: Tensor<B, 3>| t.reshape([b, s, heads, hd]).swap_dims(1, 2);
    let want = heads_major(reference(ad(&x), ad(&cos), ad(&sin)).inner());
    // Plain flex, and the tensor-op path.
    let index = RopeIndex::<B>::new(hd, half, &dev);
    let got = rope(x.clone(), heads, (&cos, &signed_sin), &index);
    assert!(max_diff(got, want.clone()) < 1e-5, "forward");
    let got = rope_heads_ops(x.clone(), heads, (&cos, &signed_sin), &index);
    assert!(max_diff(got, want) < 1e-5, "forward, tensor ops");
    // Under autodiff: the gradient of sum(c * rope(x)) (c head-major too).
    type Rope =
        fn(Tensor<AD, 3>, usize, (&Tensor<AD, 3>, &Tensor<AD, 3>), &RopeIndex<AD>) -> Tensor<AD, 4>;
    let grad = |f: Option<Rope>| {
        let xa = ad(&x).require_grad();
        let g = match f {
            Some(f) => {
                let index = RopeIndex::<AD>::new(hd, half, &dev);
                let y = f(xa.clone(), heads, (&ad(&cos), &ad(&signed_sin)), &index);
                let c = ad(&c).reshape([b, s, heads, hd]).swap_dims(1, 2);
                (y * c).sum().backward()
            }
            None => (reference(xa.clone(), ad(&cos), ad(&sin)) * ad(&c))
                .sum()
                .backward(),
        };
        xa.grad(&g).expect("x gets a gradient")
    };
    let want = grad(None);
    assert!(
        max_diff(grad(Some(rope::<AD>)), want.clone()) < 1e-5,
        "gradient"
    );
    assert!(
        max_diff(grad(Some(rope_heads_ops::<AD>)), want.clone()) < 1e-5,
        "gradient, tensor ops"
    );
    // The custom autodiff op the other backends take (here with flex as the inner backend).
    assert!(
        max_diff(grad(Some(autodiff::rope::<B>)), want) < 1e-5,
        "gradient, custom autodiff op"
    );
}
