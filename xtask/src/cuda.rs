//! The CUDA toolchain and builds of kv-backend-cuda on machines without a GPU or a CUDA
//! install: `cargo xtask cuda-setup`, the test-all step and `cargo xtask gpu-bundle`.
//!
//! The toolchain is NVIDIA's CUDA 13.0 wheels from PyPI (nvcc, NVRTC, cuBLAS, cuRAND: what
//! candle-core's `cuda` feature builds and links against), pinned by version and SHA-256
//! (pip's `--require-hashes`), installed into `~/.cache/kv/cuda13` (`KV_CUDA_ROOT`), plus
//! a libcuda stub that answers "no device" so CUDA binaries start on a machine without a
//! driver. CUDA 13.0 exactly: newer NVRTC/nvcc emit PTX that a 13.0 driver refuses.
//!
//! CUDA builds use one persistent target directory outside the clone,
//! `~/.cache/kv/cuda-target` (`KV_CUDA_TARGET`), release profile only: candle-kernels'
//! build script runs nvcc for about ten minutes on 2 cores, once; later builds are
//! incremental.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The pinned wheels, `name==version --hash=sha256:...`, for `pip install --require-hashes`.
/// The hashes were computed once from the files PyPI serves (manylinux x86-64).
const REQUIREMENTS: &[(&str, &str)] = &[
    (
        "nvidia-cuda-nvcc==13.0.88",
        "56fe502eb77625a12f25172caa3cdddb4e4c8ba2c8c17dba44b164761b380f03",
    ),
    (
        "nvidia-cuda-crt==13.0.88",
        "2c8043c7c9e02492716426e9919fc78d2c5b3b2a7a768a88e952676b08aa55a4",
    ),
    (
        "nvidia-nvvm==13.0.88",
        "c5f41ffeb6466944a026dfa5317d7d85355c119bbec279205d22f1869d1054e0",
    ),
    (
        "nvidia-cuda-runtime==13.0.96",
        "7f82250d7782aa23b6cfe765ecc7db554bd3c2870c43f3d1821f1d18aebf0548",
    ),
    (
        "nvidia-cuda-cccl==13.0.85",
        "e0da7ad981f3a8aff08241b5bfc1af868742a63e2762f53a5171c492ef242649",
    ),
    (
        "nvidia-cuda-nvrtc==13.0.88",
        "ad9b6d2ead2435f11cbb6868809d2adeeee302e9bb94bcf0539c7a40d80e8575",
    ),
    (
        "nvidia-cublas==13.1.0.3",
        "ee8722c1f0145ab246bccb9e452153b5e0515fd094c3678df50b2a0888b8b171",
    ),
    (
        "nvidia-curand==10.4.0.35",
        "1aee33a5da6e1db083fe2b90082def8915f30f3248d5896bcec36a579d941bfc",
    ),
];

/// Unversioned names the linker needs, and the versioned files the wheels ship.
const LINKS: &[(&str, &str)] = &[
    ("libnvrtc.so", "libnvrtc.so.13"),
    ("libcublas.so", "libcublas.so.13"),
    ("libcublasLt.so", "libcublasLt.so.13"),
    ("libcurand.so", "libcurand.so.10"),
    ("libcudart.so", "libcudart.so.13"),
];

/// The cudarc version candle-core 0.11.1 resolves to: the stub exports every driver symbol
/// its loader names.
const CUDARC: &str = "cudarc-0.19.10";

/// Written last into the root: its presence (with the same pins) means the install is done.
const STAMP: &str = "kv-cuda-setup.txt";

/// The GPU machine's CUDA 13 libraries (torch's pip packages), for `run.sh`.
const GPU_LIB_DIR: &str = "/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib";

/// An installed toolchain.
pub struct Toolchain {
    /// `<root>/nvidia/cu13`: bin/ (nvcc), lib/ (and lib/stubs), include/.
    pub cuda_home: PathBuf,
}

fn root() -> PathBuf {
    crate::fetch::cache_dir("KV_CUDA_ROOT", "cuda13")
}

/// The persistent target directory of CUDA builds.
pub fn target_dir() -> PathBuf {
    crate::fetch::cache_dir("KV_CUDA_TARGET", "cuda-target")
}

fn stamp_text() -> String {
    let mut s = String::from("CUDA 13.0 toolchain for kv (cargo xtask cuda-setup)\n");
    for (pin, hash) in REQUIREMENTS {
        s.push_str(&format!("{pin} sha256:{hash}\n"));
    }
    s.push_str(&format!("libcuda stub from {CUDARC}\n"));
    s
}

/// Installs the toolchain when absent (idempotent: a finished install with the same pins
/// is reused as is) and returns where it is.
pub fn setup() -> Result<Toolchain, String> {
    let root = root();
    let cuda_home = root.join("nvidia").join("cu13");
    let stamp = root.join(STAMP);
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == stamp_text()) {
        return Ok(Toolchain { cuda_home });
    }
    println!(
        "==> installing the pinned CUDA 13.0 wheels (about 680 MB download, 1.2 GB installed) into {}",
        root.display()
    );
    let tmp = root.with_extension("partial");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| format!("creating {}: {e}", tmp.display()))?;
    let req = tmp.join("requirements.txt");
    let text: String = REQUIREMENTS
        .iter()
        .map(|(pin, hash)| format!("{pin} --hash=sha256:{hash}\n"))
        .collect();
    std::fs::write(&req, text).map_err(|e| format!("writing {}: {e}", req.display()))?;
    let mut pip = Command::new(crate::fetch::python()?);
    pip.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        "--require-hashes",
        "--target",
    ])
    .arg(&tmp)
    .arg("-r")
    .arg(&req);
    if let Some(links) = std::env::var_os("KV_CUDA_WHEELS") {
        // Already downloaded wheels (checked against the same hashes).
        pip.arg("--no-index").arg("--find-links").arg(links);
    }
    crate::run("pip install of the CUDA 13.0 wheels (hashes required)", pip)?;
    let home = tmp.join("nvidia").join("cu13");
    for tool in ["bin/nvcc", "lib/libnvrtc.so.13", "include/cuda_fp16.h"] {
        if !home.join(tool).is_file() {
            return Err(format!(
                "the wheels installed no {tool} under {}",
                home.display()
            ));
        }
    }
    let lib = home.join("lib");
    for (link, target) in LINKS {
        let path = lib.join(link);
        let _ = std::fs::remove_file(&path);
        std::os::unix::fs::symlink(target, &path)
            .map_err(|e| format!("linking {} -> {target}: {e}", path.display()))?;
    }
    build_stub(&lib.join("stubs"))?;
    std::fs::write(tmp.join(STAMP), stamp_text()).map_err(|e| format!("writing the stamp: {e}"))?;
    let _ = std::fs::remove_dir_all(&root);
    std::fs::rename(&tmp, &root)
        .map_err(|e| format!("moving {} to {}: {e}", tmp.display(), root.display()))?;
    println!("==> CUDA 13.0 toolchain ready in {}", root.display());
    Ok(Toolchain { cuda_home })
}

/// Driver symbols cudarc's loader names (`load::<_F>("cuXxx")` in its driver bindings).
fn driver_symbols(src: &str) -> Vec<String> {
    let mut names: Vec<String> = src
        .split("load::<_F>(\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .filter(|n| n.starts_with("cu") && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The C source of a `libcuda.so.1` whose `cuInit` reports "no device" (100) and whose
/// every other entry point reports a stub library (34), so a binary linked against libcuda
/// starts and candle's `Device::new_cuda` fails cleanly.
fn stub_source(symbols: &[String]) -> String {
    let mut c = String::from(
        "/* libcuda stub written by cargo xtask cuda-setup: no NVIDIA driver here. */\n\
         static const char* msg = \"libcuda stub: no NVIDIA driver on this machine\";\n\
         int cuInit(unsigned f) { (void)f; return 100; }\n\
         int cuGetErrorString(int e, const char** p) { (void)e; *p = msg; return 0; }\n\
         int cuGetErrorName(int e, const char** p) {\n\
         \x20   *p = e == 100 ? \"CUDA_ERROR_NO_DEVICE\" : \"CUDA_ERROR_STUB_LIBRARY\";\n\
         \x20   return 0;\n}\n",
    );
    for s in symbols {
        if !matches!(s.as_str(), "cuInit" | "cuGetErrorString" | "cuGetErrorName") {
            c.push_str(&format!("int {s}(void) {{ return 34; }}\n"));
        }
    }
    c
}

fn build_stub(dir: &Path) -> Result<(), String> {
    let mut fetch = crate::cargo();
    fetch.args(["fetch", "--quiet"]);
    crate::run(
        "cargo fetch (cudarc's sources name the driver symbols)",
        fetch,
    )?;
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .ok_or("neither CARGO_HOME nor HOME is set")?;
    let registry = cargo_home.join("registry").join("src");
    let sys = std::fs::read_dir(&registry)
        .map_err(|e| format!("reading {}: {e}", registry.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join(CUDARC).join("src/driver/sys/mod.rs"))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("{CUDARC}'s sources are not in {}", registry.display()))?;
    let src =
        std::fs::read_to_string(&sys).map_err(|e| format!("reading {}: {e}", sys.display()))?;
    let symbols = driver_symbols(&src);
    if symbols.len() < 100 {
        return Err(format!(
            "found only {} driver symbols in {}: cudarc's layout changed",
            symbols.len(),
            sys.display()
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let c = dir.join("libcuda_stub.c");
    std::fs::write(&c, stub_source(&symbols))
        .map_err(|e| format!("writing {}: {e}", c.display()))?;
    let mut cc = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()));
    cc.args(["-shared", "-fPIC", "-O1", "-Wl,-soname,libcuda.so.1", "-o"])
        .arg(dir.join("libcuda.so.1"))
        .arg(&c);
    crate::run("compile the libcuda stub", cc)?;
    let link = dir.join("libcuda.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink("libcuda.so.1", &link)
        .map_err(|e| format!("linking {}: {e}", link.display()))
}

/// A cargo command with the toolchain's environment and the persistent target directory:
/// nvcc on PATH, CUDA 13.0, compute capability 9.0 for candle's own kernels (H100/H200;
/// this crate's kernels are compiled at run time for the device at hand), the stub on the
/// library path so test binaries start.
pub fn cargo_with(tc: &Toolchain) -> Command {
    let mut cmd = crate::cargo();
    let home = &tc.cuda_home;
    let mut path = std::ffi::OsString::from(home.join("bin"));
    if let Some(p) = std::env::var_os("PATH") {
        path.push(":");
        path.push(p);
    }
    let mut ld = std::ffi::OsString::from(home.join("lib"));
    ld.push(":");
    ld.push(home.join("lib").join("stubs"));
    cmd.env("CUDA_HOME", home)
        .env("PATH", path)
        .env("CUDA_COMPUTE_CAP", "90")
        .env("CUDARC_CUDA_VERSION", "13000")
        .env("LD_LIBRARY_PATH", ld)
        .env("CARGO_TARGET_DIR", target_dir());
    cmd
}

/// `cargo xtask cuda-setup [--build]`: the toolchain, its environment for your shell, and
/// with `--build` a release build of the backend with the `cuda` feature (the cold one
/// takes about 15 minutes on 2 cores).
pub fn cuda_setup(args: &[String]) -> Result<(), String> {
    let build = match args {
        [] => false,
        [flag] if flag == "--build" => true,
        other => return Err(format!("cuda-setup takes only --build, not {other:?}")),
    };
    let tc = setup()?;
    let home = tc.cuda_home.display();
    println!("# the environment CUDA builds of kv use:");
    println!("export CUDA_HOME={home}");
    println!("export PATH=$CUDA_HOME/bin:$PATH CUDA_COMPUTE_CAP=90 CUDARC_CUDA_VERSION=13000");
    println!("export LD_LIBRARY_PATH=$CUDA_HOME/lib:$CUDA_HOME/lib/stubs");
    println!("export CARGO_TARGET_DIR={}", target_dir().display());
    if build {
        let mut cmd = cargo_with(&tc);
        cmd.args([
            "build",
            "--release",
            "-p",
            "kv-backend-cuda",
            "--features",
            "cuda",
        ]);
        run_logged("build kv-backend-cuda --features cuda (release)", cmd)?;
    }
    Ok(())
}

fn run_logged(step: &str, cmd: Command) -> Result<(), String> {
    println!(
        "    (a cold CUDA build compiles candle's kernels with nvcc: about 15 minutes on 2 cores; \
         incremental afterwards in {})",
        target_dir().display()
    );
    crate::run(step, cmd)
}

/// The test-all step: the toolchain, then the backend's tests with the `cuda` feature in
/// release. Without a GPU that compiles every kernel with NVRTC for compute_80 and
/// compute_90 (a kernel that does not compile fails here) and the GPU tests skip, saying
/// why; on a GPU they run the conformance suite.
pub fn test_all_step() -> Result<(), String> {
    let tc = setup()?;
    let mut test = cargo_with(&tc);
    test.args([
        "test",
        "--release",
        "-p",
        "kv-backend-cuda",
        "--features",
        "cuda",
        "--",
        "--test-threads=1",
    ]);
    run_logged(
        "kv-backend-cuda --features cuda: NVRTC compiles every kernel; GPU tests (skip without a GPU)",
        test,
    )?;
    // The device code is only compiled with the feature: lint it there too (same profile
    // and target dir, so candle's kernels are not rebuilt).
    let mut clippy = cargo_with(&tc);
    clippy.args([
        "clippy",
        "--release",
        "-p",
        "kv-backend-cuda",
        "--features",
        "cuda",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    crate::run(
        "lints of kv-backend-cuda --features cuda (clippy, warnings denied)",
        clippy,
    )
}

/// `cargo xtask gpu-bundle`: `.gpubin/` (git-ignored) with the gzipped GPU test binary and
/// a `run.sh` that runs it on the GPU machine with that machine's CUDA 13 libraries.
pub fn gpu_bundle() -> Result<(), String> {
    let tc = setup()?;
    let mut build = cargo_with(&tc);
    build.args([
        "test",
        "--release",
        "-p",
        "kv-backend-cuda",
        "--features",
        "cuda",
        "--test",
        "gpu",
        "--no-run",
        "--message-format=json",
    ]);
    println!("\n==> build the GPU test binary (release)");
    let out = build
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("cargo: {e}"))?;
    if !out.status.success() {
        return Err(format!("building the GPU tests failed ({})", out.status));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let exe = gpu_executable(&stdout).ok_or("cargo named no executable for the `gpu` test")?;
    let dir = crate::root().join(".gpubin");
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let gz = dir.join("gpu.gz");
    let input = std::fs::File::open(&exe).map_err(|e| format!("opening {exe}: {e}"))?;
    let output =
        std::fs::File::create(&gz).map_err(|e| format!("creating {}: {e}", gz.display()))?;
    let mut enc = flate2::write::GzEncoder::new(output, flate2::Compression::best());
    std::io::copy(&mut std::io::BufReader::new(input), &mut enc)
        .map_err(|e| format!("compressing {exe}: {e}"))?;
    enc.finish()
        .map_err(|e| format!("writing {}: {e}", gz.display()))?;
    let run = dir.join("run.sh");
    std::fs::write(&run, run_script()).map_err(|e| format!("writing {}: {e}", run.display()))?;
    let size = std::fs::metadata(&gz).map(|m| m.len()).unwrap_or(0);
    println!(
        "==> {} ({:.1} MiB) and {}: on the GPU machine run `bash .gpubin/run.sh` from the repository root",
        gz.display(),
        size as f64 / (1 << 20) as f64,
        run.display()
    );
    Ok(())
}

/// The executable of the `gpu` test target in cargo's JSON messages.
fn gpu_executable(messages: &str) -> Option<String> {
    messages
        .lines()
        .filter(|l| {
            l.contains("\"reason\":\"compiler-artifact\"") && l.contains("\"name\":\"gpu\"")
        })
        .find_map(|l| {
            let rest = &l[l.find("\"executable\":\"")? + "\"executable\":\"".len()..];
            Some(rest[..rest.find('"')?].to_string())
        })
}

fn run_script() -> String {
    format!(
        "#!/usr/bin/env bash\n\
         # Runs kv-backend-cuda's GPU tests (written by cargo xtask gpu-bundle).\n\
         # The CUDA 13 libraries come from the GPU machine's torch install; libcuda from its driver.\n\
         set -euo pipefail\n\
         here=\"$(cd \"$(dirname \"$0\")\" && pwd)\"\n\
         CU_LIB=\"${{KV_CUDA_LIB:-{GPU_LIB_DIR}}}\"\n\
         nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv || true\n\
         gunzip -c \"$here/gpu.gz\" > \"$here/gpu-tests\"\n\
         chmod +x \"$here/gpu-tests\"\n\
         export LD_LIBRARY_PATH=\"$CU_LIB:/usr/local/nvidia/lib64:${{LD_LIBRARY_PATH:-}}\"\n\
         ldd \"$here/gpu-tests\" | grep -E 'cuda|nvrtc|cublas|curand|cudart|not found' || true\n\
         \"$here/gpu-tests\" --include-ignored --test-threads=1 --nocapture 2>&1 | tee \"${{OUT:-$here}}/gpu.log\"\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_symbols_are_read_from_cudarcs_loader() {
        let src = r#"let cuInit = __library.get(b"x"); load::<_F>("cuInit"), load::<_F>("cuMemAlloc_v2") load::<_F>("cuInit") load::<_F>("bad name")"#;
        assert_eq!(driver_symbols(src), ["cuInit", "cuMemAlloc_v2"]);
        let c = stub_source(&driver_symbols(src));
        assert!(c.contains("int cuMemAlloc_v2(void) { return 34; }"));
        assert_eq!(c.matches("int cuInit(").count(), 1);
    }

    #[test]
    fn the_gpu_test_executable_is_found_in_cargos_messages() {
        let msgs = concat!(
            r#"{"reason":"compiler-artifact","target":{"name":"kv_backend_cuda"},"executable":"/t/lib-1"}"#,
            "\n",
            r#"{"reason":"compiler-artifact","target":{"kind":["test"],"name":"gpu"},"executable":"/t/deps/gpu-abc"}"#,
        );
        assert_eq!(gpu_executable(msgs).as_deref(), Some("/t/deps/gpu-abc"));
        assert_eq!(gpu_executable("{}"), None);
    }

    #[test]
    fn every_pin_is_exact_and_hashed() {
        for (pin, hash) in REQUIREMENTS {
            assert!(pin.contains("=="), "{pin}");
            assert_eq!(hash.len(), 64, "{pin}");
            assert!(hash.chars().all(|c| c.is_ascii_hexdigit()), "{pin}");
        }
    }
}
