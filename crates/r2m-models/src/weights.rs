//! Raw checkpoint tensors on the host, by HF name, before they become burn parameters.
//!
//! Every loader (safetensors, GGUF) produces a [`WeightMap`]: HF tensor names mapped to f32 data in
//! HF layout (row-major, `[out, in]` for linear weights). The model then takes each tensor by name,
//! with the shape its config implies, so one construction path serves every file format.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::tensor::{backend::Backend, Tensor, TensorData};
use r2m_core::{R2mError, Result};

/// One tensor in host memory, f32, HF layout.
#[derive(Debug, Clone)]
pub struct RawTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl RawTensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { shape, data }
    }

    /// Transpose a 2-D tensor (`[r, c]` -> `[c, r]`).
    pub fn transposed(&self) -> RawTensor {
        let (r, c) = (self.shape[0], self.shape[1]);
        let mut out = vec![0f32; r * c];
        // 32x32 tiles keep both sides in cache.
        const T: usize = 32;
        for i0 in (0..r).step_by(T) {
            for j0 in (0..c).step_by(T) {
                for i in i0..(i0 + T).min(r) {
                    for j in j0..(j0 + T).min(c) {
                        out[j * r + i] = self.data[i * c + j];
                    }
                }
            }
        }
        RawTensor::new(vec![c, r], out)
    }

    /// Read a burn tensor back to the host.
    pub fn from_tensor<B: Backend, const D: usize>(t: Tensor<B, D>) -> RawTensor {
        let shape = t.dims().to_vec();
        let data = t
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .expect("f32 tensor data");
        RawTensor::new(shape, data)
    }
}

/// Named tensors from one checkpoint; `source` is the file or directory they came from.
#[derive(Debug, Default)]
pub struct WeightMap {
    pub source: PathBuf,
    pub tensors: HashMap<String, RawTensor>,
    /// When set, a tensor the map lacks is made up instead of being an error: norm weights 1,
    /// biases 0, everything else uniform with std 0.02, seeded by this value and the name.
    /// For benchmarks of an architecture without its weights (`random:CONFIG.json`).
    pub random_fill: Option<u64>,
}

impl WeightMap {
    pub fn new(source: impl Into<PathBuf>) -> Self {
        Self {
            source: source.into(),
            tensors: HashMap::new(),
            random_fill: None,
        }
    }

    /// An empty map whose every tensor is made up on request (see [`WeightMap::random_fill`]).
    pub fn random(source: impl Into<PathBuf>, seed: u64) -> Self {
        Self {
            random_fill: Some(seed),
            ..Self::new(source)
        }
    }

    pub fn insert(&mut self, name: impl Into<String>, t: RawTensor) {
        self.tensors.insert(name.into(), t);
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Remove and return the tensor `name`, checking its shape.
    pub fn take_raw(&mut self, name: &str, expected: &[usize]) -> Result<RawTensor> {
        if let (Some(seed), false) = (self.random_fill, self.tensors.contains_key(name)) {
            return Ok(made_up_tensor(name, expected, seed));
        }
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| R2mError::MissingTensor {
                path: self.source.clone(),
                name: name.to_string(),
            })?;
        if t.shape != expected {
            return Err(R2mError::ShapeMismatch {
                path: self.source.clone(),
                name: name.to_string(),
                expected: expected.to_vec(),
                got: t.shape,
            });
        }
        Ok(t)
    }

    /// A parameter of `D` dims with the given shape.
    pub fn param<B: Backend, const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
        device: &B::Device,
    ) -> Result<Param<Tensor<B, D>>> {
        let t = self.take_raw(name, &shape)?;
        Ok(Param::from_tensor(to_tensor(t, device)))
    }

    /// A linear layer's weight stored by HF as `[out, in]`, returned as burn's `[in, out]`.
    pub fn linear_weight<B: Backend>(
        &mut self,
        name: &str,
        d_in: usize,
        d_out: usize,
        device: &B::Device,
    ) -> Result<Param<Tensor<B, 2>>> {
        let t = self.take_raw(name, &[d_out, d_in])?.transposed();
        Ok(Param::from_tensor(to_tensor(t, device)))
    }

    /// Names of tensors nobody took: a checkpoint with leftovers is probably not what the config says.
    pub fn leftover_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.tensors.keys().cloned().collect();
        names.sort();
        names
    }
}

/// A stand-in tensor for `name`: norm weights 1, biases 0, else uniform with std 0.02.
fn made_up_tensor(name: &str, shape: &[usize], seed: u64) -> RawTensor {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    let n: usize = shape.iter().product();
    let data = if name.ends_with(".bias") {
        vec![0.0; n]
    } else if name.contains("norm") {
        vec![1.0; n]
    } else {
        // FNV-1a of the name, so each tensor gets its own stream.
        let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        let mut rng = StdRng::seed_from_u64(seed ^ h);
        let a = 0.02 * 3f32.sqrt();
        (0..n).map(|_| rng.random_range(-a..a)).collect()
    };
    RawTensor::new(shape.to_vec(), data)
}

/// Upload a host tensor to `device`.
pub fn to_tensor<B: Backend, const D: usize>(t: RawTensor, device: &B::Device) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(t.data, t.shape), device)
}

// ---------------------------------------------------------------------------------------------
// safetensors
// ---------------------------------------------------------------------------------------------

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| R2mError::io(path, e))
}

/// Load one `.safetensors` file into `map`, converting bf16/f16/f32 to f32.
pub fn load_safetensors_file(path: &Path, map: &mut WeightMap) -> Result<()> {
    use safetensors::{Dtype, SafeTensors};
    let bytes = read_file(path)?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| R2mError::format(path, format!("not a valid safetensors file: {e}")))?;
    for (name, view) in st.tensors() {
        let raw = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => raw
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => raw
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => raw
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(R2mError::format(
                    path,
                    format!("tensor `{name}` has dtype {other:?}; supported: F32, F16, BF16"),
                ))
            }
        };
        map.insert(name, RawTensor::new(view.shape().to_vec(), data));
    }
    Ok(())
}

/// Load the weights of an HF directory: `model.safetensors`, or the shards listed in
/// `model.safetensors.index.json`.
pub fn load_safetensors_dir(dir: &Path) -> Result<WeightMap> {
    let mut map = WeightMap::new(dir);
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if single.exists() {
        load_safetensors_file(&single, &mut map)?;
    } else if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| R2mError::io(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| R2mError::format(&index, format!("line {}: {e}", e.line())))?;
        let wm = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| R2mError::format(&index, "no `weight_map` object"))?;
        let mut shards: Vec<&str> = wm.values().filter_map(|s| s.as_str()).collect();
        shards.sort();
        shards.dedup();
        for shard in shards {
            load_safetensors_file(&dir.join(shard), &mut map)?;
        }
        for name in wm.keys() {
            if !map.contains(name) {
                return Err(R2mError::MissingTensor {
                    path: index.clone(),
                    name: name.clone(),
                });
            }
        }
    } else {
        return Err(R2mError::format(
            dir,
            "no model.safetensors or model.safetensors.index.json in this directory",
        ));
    }
    map.source = dir.to_path_buf();
    Ok(map)
}

/// Write `tensors` as one f32 `model.safetensors` file.
pub fn save_safetensors(path: &Path, tensors: &[(String, RawTensor)]) -> Result<()> {
    use safetensors::{tensor::TensorView, Dtype};
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(n, t)| {
            let b: Vec<u8> = t.data.iter().flat_map(|x| x.to_le_bytes()).collect();
            (n.clone(), b, t.shape.clone())
        })
        .collect();
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(n, b, s)| {
            let view = TensorView::new(Dtype::F32, s.clone(), b).expect("consistent view");
            (n.clone(), view)
        })
        .collect();
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    safetensors::serialize_to_file(views, Some(meta), path)
        .map_err(|e| R2mError::format(path, format!("writing safetensors: {e}")))
}
