//! The one place that names concrete backends. Everything else is generic over `B: Backend`.

use burn::tensor::backend::Backend;
use clap::ValueEnum;
use r2m_core::{R2mError, Result};

/// `--device`: which compiled-in backend runs the command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    /// CUDA if compiled in and a driver is present, else WGPU on a real GPU, else the CPU backend.
    Auto,
    /// The CPU backend (`flex`).
    Cpu,
    /// WGPU (Vulkan/Metal/DX12; on machines without a GPU, Mesa's lavapipe).
    Wgpu,
    /// NVIDIA CUDA.
    Cuda,
    /// burn's ndarray CPU backend (build with `--features ndarray`; slower than `cpu`).
    Ndarray,
}

/// `--dtype`: the float type of weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    F32,
    /// bfloat16 (`--device cuda` only).
    Bf16,
}

/// Work that runs on whichever backend was chosen.
pub trait BackendTask {
    fn run<B: Backend>(self, device: B::Device, backend_name: &str) -> Result<()>;
}

fn not_compiled(name: &str, feature: &str) -> R2mError {
    R2mError::Config(format!(
        "--device {name}: this r2m was built without the `{feature}` feature (rebuild with `--features {feature}`)"
    ))
}

/// `task` on backend `B`, with r2m's custom autodiff ops registered for `Autodiff<B>`.
fn run_on<B: Backend, T: BackendTask>(task: T, device: B::Device, name: &str) -> Result<()> {
    r2m_models::fused::register_autodiff_ops::<B>();
    task.run::<B>(device, name)
}

/// Whether decoding's attention takes r2m's kernel on a GPU backend (`fused::register_cube_ops`):
/// `R2M_ATTENTION_KERNEL=0` or `=1` decides, else `default`. On WGPU it is on by default (the
/// tests check it against the tensor ops); on CUDA it stays off until `r2m bench check` has
/// passed there with it (`scripts/bench-gpu.sh` turns it on, and its `check.txt` is that check).
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn attention_kernel_wanted(default: bool) -> bool {
    std::env::var("R2M_ATTENTION_KERNEL").map_or(default, |v| v != "0")
}

/// Run `task` on the backend `choice` names, with floats of type `dtype`.
pub fn dispatch(choice: DeviceArg, dtype: DtypeArg, task: impl BackendTask) -> Result<()> {
    let choice = if choice == DeviceArg::Auto {
        auto_choice()
    } else {
        choice
    };
    if dtype == DtypeArg::Bf16 && choice != DeviceArg::Cuda {
        return Err(R2mError::Config(format!(
            "--dtype bf16 runs on --device cuda only (this run chose {choice:?})"
        )));
    }
    match choice {
        DeviceArg::Cpu => {
            #[cfg(feature = "flex")]
            return run_on::<burn::backend::Flex, _>(task, Default::default(), "flex (CPU)");
            #[cfg(not(feature = "flex"))]
            return Err(not_compiled("cpu", "flex"));
        }
        DeviceArg::Wgpu => {
            #[cfg(feature = "wgpu")]
            let adapter = wgpu_adapter_name(wgpu_adapters())?;
            #[cfg(feature = "wgpu")]
            if attention_kernel_wanted(true) {
                r2m_models::fused::register_cube_ops::<burn_wgpu::WgpuRuntime, f32, i32, u32>();
            }
            #[cfg(feature = "wgpu")]
            return run_on::<burn::backend::Wgpu, _>(
                task,
                Default::default(),
                &format!("wgpu ({adapter})"),
            );
            #[cfg(not(feature = "wgpu"))]
            return Err(not_compiled("wgpu", "wgpu"));
        }
        DeviceArg::Cuda => {
            #[cfg(feature = "cuda")]
            require_nvidia_driver(std::path::Path::new(NVIDIA_DRIVER))?;
            #[cfg(feature = "cuda")]
            if attention_kernel_wanted(false) {
                use cubecl::cuda::CudaRuntime;
                r2m_models::fused::register_cube_ops::<CudaRuntime, f32, i32, u8>();
                r2m_models::fused::register_cube_ops::<CudaRuntime, burn::tensor::bf16, i32, u8>();
            }
            #[cfg(feature = "cuda")]
            return match dtype {
                DtypeArg::F32 => run_on::<burn::backend::Cuda, _>(task, Default::default(), "cuda"),
                DtypeArg::Bf16 => run_on::<burn::backend::Cuda<burn::tensor::bf16>, _>(
                    task,
                    Default::default(),
                    "cuda bf16",
                ),
            };
            #[cfg(not(feature = "cuda"))]
            return Err(not_compiled("cuda", "cuda"));
        }
        DeviceArg::Ndarray => {
            #[cfg(feature = "ndarray")]
            return run_on::<burn::backend::NdArray, _>(task, Default::default(), "ndarray (CPU)");
            #[cfg(not(feature = "ndarray"))]
            return Err(not_compiled("ndarray", "ndarray"));
        }
        DeviceArg::Auto => unreachable!("resolved above"),
    }
}

/// CUDA when compiled in and an NVIDIA driver is loaded; WGPU when it finds a real GPU; else CPU.
/// On a machine whose only WGPU adapter is a software rasteriser (lavapipe), the CPU backend is
/// ~10x faster, so it wins.
fn auto_choice() -> DeviceArg {
    if cfg!(feature = "cuda") && std::path::Path::new(NVIDIA_DRIVER).exists() {
        return DeviceArg::Cuda;
    }
    #[cfg(feature = "wgpu")]
    if wgpu_has_hardware_adapter() || (cfg!(not(feature = "flex")) && !wgpu_adapters().is_empty()) {
        return DeviceArg::Wgpu;
    }
    if cfg!(feature = "flex") {
        DeviceArg::Cpu
    } else {
        DeviceArg::Cuda
    }
}

/// The adapters burn's WGPU device can take: the primary APIs (Vulkan, Metal, DX12), not GL,
/// which cubecl does not request.
#[cfg(feature = "wgpu")]
fn wgpu_adapters() -> Vec<wgpu::AdapterInfo> {
    ensure_runtime_dir();
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle());
    futures_lite::future::block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY))
        .into_iter()
        .map(|a| a.get_info())
        .collect()
}

/// Vulkan's window-system layers print "XDG_RUNTIME_DIR is invalid or not set" on headless
/// machines (containers, CI) when probing adapters; give them a private one instead.
#[cfg(all(feature = "wgpu", unix))]
fn ensure_runtime_dir() {
    if std::env::var_os("XDG_RUNTIME_DIR").is_some() {
        return;
    }
    let dir = std::env::temp_dir().join("r2m-xdg-runtime");
    if std::fs::create_dir_all(&dir).is_ok() {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
        // Single-threaded here: backends are chosen before any work starts.
        std::env::set_var("XDG_RUNTIME_DIR", &dir);
    }
}

#[cfg(all(feature = "wgpu", not(unix)))]
fn ensure_runtime_dir() {}

#[cfg(feature = "wgpu")]
fn wgpu_has_hardware_adapter() -> bool {
    wgpu_adapters()
        .iter()
        .any(|a| a.device_type != wgpu::DeviceType::Cpu)
}

/// The adapter burn's default WGPU device takes (through Vulkan where there is one), or, when
/// there is none, the one-line error saying what is missing: burn would panic inside cubecl.
#[cfg(feature = "wgpu")]
fn wgpu_adapter_name(mut adapters: Vec<wgpu::AdapterInfo>) -> Result<String> {
    adapters.sort_by_key(|a| a.backend != wgpu::Backend::Vulkan);
    adapters
        .first()
        .map(|a| format!("{}, {:?}, {:?}", a.name, a.backend, a.device_type))
        .ok_or_else(|| {
            R2mError::Config(
                "--device wgpu: no WGPU adapter found (no Vulkan, Metal or DX12 driver). Install \
                 a GPU driver, or Mesa's CPU rasteriser lavapipe (Debian/Ubuntu: `apt install \
                 mesa-vulkan-drivers libvulkan1`); or use --device cpu"
                    .into(),
            )
        })
}

/// Where the NVIDIA kernel driver says it is loaded.
const NVIDIA_DRIVER: &str = "/proc/driver/nvidia/version";

/// `--device cuda` needs a loaded NVIDIA driver (`driver`, i.e. [`NVIDIA_DRIVER`], exists):
/// without one, a one-line error instead of cubecl's panic.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn require_nvidia_driver(driver: &std::path::Path) -> Result<()> {
    if driver.exists() {
        return Ok(());
    }
    Err(R2mError::Config(format!(
        "--device cuda: no NVIDIA driver is loaded ({} is missing). Install the NVIDIA driver \
         and CUDA 13, or use --device cpu",
        driver.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "wgpu")]
    #[test]
    fn no_wgpu_adapter_is_a_one_line_error_naming_the_package() {
        let e = wgpu_adapter_name(Vec::new()).unwrap_err().to_string();
        assert!(!e.contains('\n'), "{e}");
        assert!(
            e.contains("--device wgpu") && e.contains("mesa-vulkan-drivers"),
            "{e}"
        );
    }

    #[test]
    fn no_nvidia_driver_is_a_one_line_error() {
        let e = require_nvidia_driver(std::path::Path::new("/nonexistent/nvidia/version"))
            .unwrap_err()
            .to_string();
        assert!(!e.contains('\n'), "{e}");
        assert!(
            e.contains("--device cuda") && e.contains("NVIDIA driver"),
            "{e}"
        );
    }
}
