//! Locating NVRTC, compiling kernel sources, and the compile cache.

use std::collections::HashMap;
use std::ffi::{c_char, CString};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::nvrtc::{result, sys};

use super::guarded;
use super::kernels::{self, KernelModule};
use crate::error::{Error, Result};

/// Compiled code for one architecture: a cubin for `sm_XY`, PTX text for `compute_XY`.
#[derive(Debug, Clone)]
pub(crate) enum Image {
    Cubin(Vec<u8>),
    Ptx(String),
}

impl Image {
    pub(crate) fn len(&self) -> usize {
        match self {
            Image::Cubin(b) => b.len(),
            Image::Ptx(s) => s.len(),
        }
    }
}

/// Compile cache key: (source hash, arch, options, NVRTC version).
type CacheKey = (u64, String, Vec<String>, (i32, i32));

fn cache() -> &'static Mutex<HashMap<CacheKey, Arc<Image>>> {
    static CACHE: OnceLock<Mutex<HashMap<CacheKey, Arc<Image>>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Loads every `libnvrtc*` under `SLIMFORGE_NVRTC` (a file or a directory) with RTLD_GLOBAL:
/// libnvrtc later dlopens `libnvrtc-builtins.so.<ver>` by name, which then resolves to the loaded copy.
fn preload_from_env() -> Result<()> {
    let Some(path) = std::env::var_os("SLIMFORGE_NVRTC") else {
        return Ok(());
    };
    let path = PathBuf::from(path);
    let dir = if path.is_dir() {
        path.clone()
    } else {
        path.parent().map(Path::to_path_buf).unwrap_or_default()
    };
    let mut libs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| {
            Error::runtime(format!(
                "SLIMFORGE_NVRTC={}: cannot read {}: {e}",
                path.display(),
                dir.display()
            ))
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.starts_with("libnvrtc") && name.contains(".so")
        })
        .collect();
    // Builtins first, so libnvrtc's own dlopen of them succeeds.
    libs.sort_by_key(|p| !p.to_string_lossy().contains("builtins"));
    if !libs
        .iter()
        .any(|p| !p.to_string_lossy().contains("builtins"))
    {
        return Err(Error::runtime(format!(
            "SLIMFORGE_NVRTC={}: no libnvrtc.so.* found in {}",
            path.display(),
            dir.display()
        )));
    }
    for lib in libs {
        let flags = libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL;
        // SAFETY: NVRTC's initialisers have no preconditions; the handle is kept for the process.
        let handle = unsafe { libloading::os::unix::Library::open(Some(&lib), flags) }
            .map_err(|e| Error::runtime(format!("cannot load {}: {e}", lib.display())))?;
        std::mem::forget(handle);
    }
    Ok(())
}

/// Checks that NVRTC can be loaded (after honouring `SLIMFORGE_NVRTC`); never panics.
pub(crate) fn ensure_nvrtc() -> Result<()> {
    static FOUND: AtomicBool = AtomicBool::new(false);
    if FOUND.load(Ordering::Acquire) {
        return Ok(());
    }
    preload_from_env()?;
    // SAFETY: only probes dlopen on the candidate names.
    if unsafe { sys::is_culib_present() } {
        FOUND.store(true, Ordering::Release);
        Ok(())
    } else {
        Err(Error::runtime(
            "NVRTC not found (libnvrtc.so.13 or .12): install the nvidia-cuda-nvrtc wheel (it comes \
             with torch's CUDA builds), put its lib directory on LD_LIBRARY_PATH, or set \
             SLIMFORGE_NVRTC to the library or its directory",
        ))
    }
}

/// NVRTC's (major, minor) version.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    guarded("nvrtc_version", || {
        ensure_nvrtc()?;
        version_unchecked()
    })
}

fn version_unchecked() -> Result<(i32, i32)> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: plain out-parameters.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| Error::runtime(format!("nvrtcVersion failed: {e}")))?;
    Ok((major, minor))
}

fn c_chars_to_string(v: &[c_char]) -> String {
    let bytes: Vec<u8> = v
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Validates an architecture name: `sm_XY` (cubin) or `compute_XY` (PTX).
fn parse_arch(arch: &str) -> Result<bool> {
    let (cubin, digits) = if let Some(d) = arch.strip_prefix("sm_") {
        (true, d)
    } else if let Some(d) = arch.strip_prefix("compute_") {
        (false, d)
    } else {
        return Err(Error::value(format!(
            "expected an architecture like 'compute_90' (PTX) or 'sm_90' (cubin), got {arch:?}"
        )));
    };
    let digits = digits.trim_end_matches(['a', 'f']);
    if digits.len() < 2 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::value(format!("malformed architecture {arch:?}")));
    }
    Ok(cubin)
}

/// Compiles `source` for `arch` with `options` (NVRTC must be loaded), through the cache.
pub(crate) fn compile(
    name: &str,
    source: &str,
    arch: &str,
    options: &[String],
) -> Result<Arc<Image>> {
    let cubin = parse_arch(arch)?;
    let version = version_unchecked()?;
    let key: CacheKey = (
        xxhash_rust::xxh3::xxh3_64(source.as_bytes()),
        arch.to_string(),
        options.to_vec(),
        version,
    );
    if let Some(img) = cache().lock().map_err(|_| poisoned())?.get(&key) {
        return Ok(img.clone());
    }
    let image = Arc::new(compile_uncached(name, source, arch, cubin, options)?);
    cache()
        .lock()
        .map_err(|_| poisoned())?
        .insert(key, image.clone());
    Ok(image)
}

fn poisoned() -> Error {
    Error::runtime("CUDA compile cache lock poisoned by an earlier panic")
}

fn compile_uncached(
    name: &str,
    source: &str,
    arch: &str,
    cubin: bool,
    options: &[String],
) -> Result<Image> {
    let src = CString::new(source).map_err(|_| Error::runtime("kernel source contains NUL"))?;
    let cname =
        CString::new(format!("{name}.cu")).map_err(|_| Error::runtime("bad kernel name"))?;
    let prog = result::create_program(&src, Some(&cname))
        .map_err(|e| Error::runtime(format!("nvrtcCreateProgram({name}) failed: {e}")))?;
    let mut opts = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
    ];
    opts.extend(options.iter().cloned());
    // SAFETY: `prog` is live until destroy_program below; `src`/`cname` outlive it.
    let out = unsafe {
        let compiled = result::compile_program(prog, &opts);
        let out = match compiled {
            Ok(()) if cubin => get_cubin(prog).map(Image::Cubin),
            Ok(()) => result::get_ptx(prog)
                .map(|p| Image::Ptx(c_chars_to_string(&p)))
                .map_err(|e| Error::runtime(format!("nvrtcGetPTX failed: {e}"))),
            Err(e) => {
                let log = result::get_program_log(prog)
                    .map(|l| c_chars_to_string(&l))
                    .unwrap_or_default();
                Err(Error::runtime(format!(
                    "NVRTC failed to compile {name} for {arch} with {options:?}: {e}\n{log}"
                )))
            }
        };
        let _ = result::destroy_program(prog);
        out
    };
    out
}

/// # Safety
/// `prog` must be a live, successfully compiled program.
unsafe fn get_cubin(prog: sys::nvrtcProgram) -> Result<Vec<u8>> {
    let mut size = 0usize;
    sys::nvrtcGetCUBINSize(prog, &mut size)
        .result()
        .map_err(|e| Error::runtime(format!("nvrtcGetCUBINSize failed: {e}")))?;
    let mut buf = vec![0u8; size];
    sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr().cast())
        .result()
        .map_err(|e| Error::runtime(format!("nvrtcGetCUBIN failed: {e}")))?;
    Ok(buf)
}

/// Compiles every kernel module, in every configuration the launchers use for common head sizes,
/// for `arch` (`compute_XY` gives PTX, `sm_XY` a cubin). Needs NVRTC but no GPU or driver.
/// Returns (module description, image size in bytes).
pub fn compile_check(arch: &str) -> Result<Vec<(String, usize)>> {
    guarded("compile_check", || {
        parse_arch(arch)?;
        ensure_nvrtc()?;
        let mut out = Vec::new();
        for module in kernels::check_modules() {
            let KernelModule {
                label,
                name,
                source,
                options,
            } = module;
            let image = compile(name, source, arch, &options)?;
            out.push((label, image.len()));
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_names_are_validated() {
        assert!(parse_arch("sm_90").unwrap());
        assert!(!parse_arch("compute_80").unwrap());
        assert!(parse_arch("sm_90a").unwrap());
        assert!(parse_arch("gfx90a").is_err());
        assert!(parse_arch("sm_").is_err());
        assert!(matches!(compile_check("ampere"), Err(Error::Value(_))));
    }

    /// Compiles every kernel when NVRTC is reachable (set SLIMFORGE_NVRTC to torch's
    /// nvidia/cu13/lib); the Python suite runs the same check with NVRTC located automatically.
    #[test]
    fn every_kernel_compiles_to_ptx_when_nvrtc_is_present() {
        if ensure_nvrtc().is_err() {
            eprintln!("NVRTC not found: set SLIMFORGE_NVRTC to run this check");
            return;
        }
        let modules = compile_check("compute_80").unwrap();
        assert_eq!(modules.len(), kernels::check_modules().len());
        assert!(modules.iter().all(|(_, bytes)| *bytes > 1000));
    }
}
