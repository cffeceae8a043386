//! The LoRA adapter module itself: what a [`crate::model::Linear`] carries. It imports nothing of
//! the model, so the model can hold it without an import circle.

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};

use crate::fused;

/// A LoRA adapter: `scale (dropout(x) Aᵀ) Bᵀ`, added to a linear layer's output.
#[derive(Module, Debug)]
pub struct LoraAdapter<B: Backend> {
    /// `A`, `[r, d_in]` (PEFT's `lora_A.weight`).
    pub a: Param<Tensor<B, 2>>,
    /// `B`, `[d_out, r]` (PEFT's `lora_B.weight`).
    pub b: Param<Tensor<B, 2>>,
    /// The update is scaled by `alpha / r`, or `alpha / sqrt(r)` with `rslora`.
    pub alpha: f64,
    pub rslora: bool,
    /// Dropout probability on the adapter's input; applied only with gradients (training).
    pub dropout: f64,
}

impl<B: Backend> LoraAdapter<B> {
    /// An adapter with these `A` (`[r, d_in]`) and `B` (`[d_out, r]`), both trainable.
    pub fn new(a: Tensor<B, 2>, b: Tensor<B, 2>, alpha: f64, rslora: bool, dropout: f64) -> Self {
        debug_assert_eq!(a.dims()[0], b.dims()[1], "A is [r, d_in] and B [d_out, r]");
        Self {
            a: Param::from_tensor(a),
            b: Param::from_tensor(b),
            alpha,
            rslora,
            dropout,
        }
    }

    /// The rank r.
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }

    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self) -> f64 {
        scale(self.alpha, self.rank(), self.rslora)
    }

    /// The update `scale (dropout(x) Aᵀ) Bᵀ` (dropout only under autodiff, and never at 0).
    ///
    /// # Shapes
    /// - `x`: `[..., d_in]` -> `[..., d_out]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dims = x.dims();
        let d_out = self.b.dims()[0];
        let rows: usize = dims[..D - 1].iter().product();
        let flat: Tensor<B, 2> = self.drop(x.reshape([rows, dims[D - 1]]));
        // The scale on the `[rows, r]` product, the smaller of the two.
        let h = fused::matmul(flat, self.a.val().transpose()).mul_scalar(self.scale());
        let y = fused::matmul(h, self.b.val().transpose());
        let mut out_dims = dims;
        out_dims[D - 1] = d_out;
        y.reshape(out_dims)
    }

    /// Inverted dropout on the adapter's input, as `torch.nn.Dropout` in training mode.
    fn drop(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        if self.dropout == 0.0 || !B::ad_enabled(&x.device()) {
            return x;
        }
        let keep = 1.0 - self.dropout;
        let mask = x.random_like(Distribution::Bernoulli(keep));
        (x * mask).div_scalar(keep)
    }

    /// The update as a weight, `scale Aᵀ Bᵀ`, `[d_in, d_out]` (the layout of
    /// [`Linear::weight`]).
    pub fn delta_weight(&self) -> Tensor<B, 2> {
        self.a
            .val()
            .transpose()
            .matmul(self.b.val().transpose())
            .mul_scalar(self.scale())
    }
}

/// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
fn scale(alpha: f64, r: usize, rslora: bool) -> f64 {
    if rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}
