//! Device contexts (the primary context, shared with PyTorch), loaded modules and launches.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute, CUstream};
use cudarc::driver::{result as dresult, CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;

use super::kernels::KernelModule;
use super::nvrtc::{self, Image};
use crate::error::{Error, Result};

/// Checks that the CUDA driver library can be loaded; never panics.
pub(crate) fn ensure_driver() -> Result<()> {
    static FOUND: AtomicBool = AtomicBool::new(false);
    if FOUND.load(Ordering::Acquire) {
        return Ok(());
    }
    // SAFETY: only probes dlopen on the candidate names.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        FOUND.store(true, Ordering::Release);
        Ok(())
    } else {
        Err(Error::runtime(
            "CUDA driver (libcuda.so.1) not found: no NVIDIA driver is installed",
        ))
    }
}

fn driver_err(what: &str) -> impl Fn(dresult::DriverError) -> Error + '_ {
    move |e| Error::runtime(format!("{what}: {e}"))
}

/// The primary context of `device` (retained once, kept for the process), bound to this thread.
pub(crate) fn context(device: usize) -> Result<Arc<CudaContext>> {
    ensure_driver()?;
    static CONTEXTS: OnceLock<Mutex<HashMap<usize, Arc<CudaContext>>>> = OnceLock::new();
    let contexts = CONTEXTS.get_or_init(|| Mutex::new(HashMap::new()));
    let mut map = contexts
        .lock()
        .map_err(|_| Error::runtime("CUDA context lock poisoned"))?;
    if let Some(ctx) = map.get(&device) {
        let ctx = ctx.clone();
        drop(map);
        // Work may arrive on any Python thread: make the context current here.
        ctx.bind_to_thread()
            .map_err(driver_err("binding the CUDA context"))?;
        return Ok(ctx);
    }
    let count = CudaContext::device_count().map_err(driver_err("cuDeviceGetCount"))?;
    if device >= count.max(0) as usize {
        return Err(Error::runtime(format!(
            "CUDA device {device} does not exist ({count} visible)"
        )));
    }
    let ctx = CudaContext::new(device).map_err(driver_err("retaining the primary CUDA context"))?;
    map.insert(device, ctx.clone());
    Ok(ctx)
}

/// `sm_XY` for `device`.
pub fn device_arch(device: usize) -> Result<String> {
    super::guarded("device_arch", || {
        let ctx = context(device)?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(driver_err("compute capability"))?;
        Ok(format!("sm_{major}{minor}"))
    })
}

/// The most dynamic shared memory one block may opt into on this device.
pub(crate) fn max_smem(ctx: &CudaContext) -> Result<usize> {
    let v = ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .map_err(driver_err("shared memory limit"))?;
    Ok(v.max(0) as usize)
}

type ModuleKey = (usize, u64, Vec<String>);

struct LoadedModule {
    module: Arc<CudaModule>,
    functions: HashMap<String, Arc<CudaFunction>>,
}

/// `function` from `module`, compiled for this device (cubin, else PTX) and loaded once.
pub(crate) fn function(
    ctx: &Arc<CudaContext>,
    module: &KernelModule,
    function: &str,
) -> Result<Arc<CudaFunction>> {
    static MODULES: OnceLock<Mutex<HashMap<ModuleKey, LoadedModule>>> = OnceLock::new();
    let modules = MODULES.get_or_init(|| Mutex::new(HashMap::new()));
    let key: ModuleKey = (
        ctx.ordinal(),
        xxhash_rust::xxh3::xxh3_64(module.source.as_bytes()),
        module.options.clone(),
    );
    let mut map = modules
        .lock()
        .map_err(|_| Error::runtime("CUDA module lock poisoned"))?;
    if !map.contains_key(&key) {
        nvrtc::ensure_nvrtc()?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(driver_err("compute capability"))?;
        let image = nvrtc::compile(
            module.name,
            module.source,
            &format!("sm_{major}{minor}"),
            &module.options,
        )
        .or_else(|_| {
            nvrtc::compile(
                module.name,
                module.source,
                &format!("compute_{major}{minor}"),
                &module.options,
            )
        })?;
        let ptx = match image.as_ref() {
            Image::Cubin(bytes) => Ptx::from_binary(bytes.clone()),
            Image::Ptx(text) => Ptx::from_src(text.clone()),
        };
        let loaded = ctx.load_module(ptx).map_err(driver_err(&format!(
            "loading {} ({})",
            module.label, module.name
        )))?;
        map.insert(
            key.clone(),
            LoadedModule {
                module: loaded,
                functions: HashMap::new(),
            },
        );
    }
    let entry = map.get_mut(&key).expect("inserted above");
    if let Some(f) = entry.functions.get(function) {
        return Ok(f.clone());
    }
    let f = Arc::new(
        entry
            .module
            .load_function(function)
            .map_err(driver_err(&format!(
                "kernel {function} in {}",
                module.label
            )))?,
    );
    entry.functions.insert(function.to_string(), f.clone());
    Ok(f)
}

/// Launch geometry of one kernel call.
pub(crate) struct Launch {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub smem: u32,
}

/// Launches `f` on the raw stream `stream` (0: the legacy default stream).
///
/// # Safety
/// `params` must point to values whose types match the kernel's parameters, and every device
/// pointer inside them must be valid for the accesses the kernel makes.
pub(crate) unsafe fn launch(
    f: &CudaFunction,
    geometry: &Launch,
    stream: u64,
    params: &mut [*mut c_void],
) -> Result<()> {
    if geometry.grid.0 == 0 || geometry.grid.1 == 0 || geometry.grid.2 == 0 {
        return Ok(());
    }
    if geometry.grid.1 > 65535 || geometry.grid.2 > 65535 {
        return Err(Error::value(format!(
            "launch grid {:?} exceeds CUDA's 65535 limit on y/z (too many heads or sequences)",
            geometry.grid
        )));
    }
    if geometry.smem > 48 * 1024 {
        f.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            geometry.smem as i32,
        )
        .map_err(driver_err("raising the dynamic shared memory limit"))?;
    }
    dresult::launch_kernel(
        f.cu_function(),
        geometry.grid,
        geometry.block,
        geometry.smem,
        stream as usize as CUstream,
        params,
    )
    .map_err(driver_err("cuLaunchKernel"))
}
