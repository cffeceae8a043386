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

/// Work that runs on whichever backend was chosen.
pub trait BackendTask {
    fn run<B: Backend>(self, device: B::Device, backend_name: &str) -> Result<()>;
}

fn not_compiled(name: &str, feature: &str) -> R2mError {
    R2mError::Config(format!(
        "--device {name}: this r2m was built without the `{feature}` feature (rebuild with `--features {feature}`)"
    ))
}

/// Run `task` on the backend `choice` names.
pub fn dispatch(choice: DeviceArg, task: impl BackendTask) -> Result<()> {
    let choice = if choice == DeviceArg::Auto {
        auto_choice()
    } else {
        choice
    };
    match choice {
        DeviceArg::Cpu => {
            #[cfg(feature = "flex")]
            return task.run::<burn::backend::Flex>(Default::default(), "flex (CPU)");
            #[cfg(not(feature = "flex"))]
            return Err(not_compiled("cpu", "flex"));
        }
        DeviceArg::Wgpu => {
            #[cfg(feature = "wgpu")]
            return task.run::<burn::backend::Wgpu>(
                Default::default(),
                &format!("wgpu ({})", wgpu_adapter_name()),
            );
            #[cfg(not(feature = "wgpu"))]
            return Err(not_compiled("wgpu", "wgpu"));
        }
        DeviceArg::Cuda => {
            #[cfg(feature = "cuda")]
            return task.run::<burn::backend::Cuda>(Default::default(), "cuda");
            #[cfg(not(feature = "cuda"))]
            return Err(not_compiled("cuda", "cuda"));
        }
        DeviceArg::Ndarray => {
            #[cfg(feature = "ndarray")]
            return task.run::<burn::backend::NdArray>(Default::default(), "ndarray (CPU)");
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
    if cfg!(feature = "cuda") && std::path::Path::new("/proc/driver/nvidia/version").exists() {
        return DeviceArg::Cuda;
    }
    #[cfg(feature = "wgpu")]
    if wgpu_has_hardware_adapter() || cfg!(not(feature = "flex")) {
        return DeviceArg::Wgpu;
    }
    if cfg!(feature = "flex") {
        DeviceArg::Cpu
    } else {
        DeviceArg::Cuda
    }
}

#[cfg(feature = "wgpu")]
fn wgpu_adapters() -> Vec<wgpu::AdapterInfo> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle());
    futures_lite::future::block_on(instance.enumerate_adapters(wgpu::Backends::all()))
        .into_iter()
        .map(|a| a.get_info())
        .collect()
}

#[cfg(feature = "wgpu")]
fn wgpu_has_hardware_adapter() -> bool {
    wgpu_adapters()
        .iter()
        .any(|a| a.device_type != wgpu::DeviceType::Cpu)
}

#[cfg(feature = "wgpu")]
fn wgpu_adapter_name() -> String {
    // burn's default WGPU device goes through Vulkan where there is one.
    let mut adapters = wgpu_adapters();
    adapters.sort_by_key(|a| a.backend != wgpu::Backend::Vulkan);
    adapters
        .first()
        .map(|a| format!("{}, {:?}, {:?}", a.name, a.backend, a.device_type))
        .unwrap_or_else(|| "no adapter found".into())
}
