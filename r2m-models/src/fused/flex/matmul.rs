//! `x w` on flex: the few-row AVX-512 kernel ([`super::small_rows`]), else the `gemm` crate
//! straight into the output ([`super::product`]), a custom autodiff op under `Autodiff<Flex>`.

use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorPrimitive};

use super::{back, cast2, product, small_rows};

pub fn matmul<B: Backend>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
) -> Result<Tensor<B, 2>, (Tensor<B, 2>, Tensor<B, 2>)> {
    let (x, w) = match cast2::<_, Tensor<Flex, 2>>(x, w) {
        Ok(pair) => pair,
        Err(inputs) => {
            let (x, w) = cast2::<_, Tensor<Autodiff<Flex>, 2>>(inputs.0, inputs.1)?;
            return Ok(back(product::matmul_autodiff(x, w)));
        }
    };
    if let Some(y) = small_rows::matmul(&x, &w) {
        return Ok(back(y));
    }
    let y = product::matmul(
        &x.clone().into_primitive().tensor(),
        &w.clone().into_primitive().tensor(),
    );
    Ok(back(match y {
        Some(y) => Tensor::<Flex, 2>::from_primitive(TensorPrimitive::Float(y)),
        None => x.matmul(w),
    }))
}
