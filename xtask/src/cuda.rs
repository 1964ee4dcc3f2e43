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
    // Both crates in one cargo command: one feature resolution, so candle's CUDA kernels
    // (nvcc, ~15 minutes cold) are built once for both.
    run_logged(
        "kv-backend-cuda and kv-model --features cuda: NVRTC compiles every kernel; unit and \
         GPU tests (the GPU ones skip without a GPU)",
        with_feature(
            &tc,
            "test",
            &["--lib", "--test", "gpu"],
            &["--test-threads=1"],
        ),
    )?;
    // The device code is only compiled with the feature: lint it there too (same profile
    // and target dir, so candle's kernels are not rebuilt).
    crate::run(
        "lints of kv-backend-cuda and kv-model --features cuda (clippy, warnings denied)",
        with_feature(&tc, "clippy", &["--all-targets"], &["-D", "warnings"]),
    )
}

/// `cargo VERB --release` on kv-backend-cuda and kv-model with their `cuda` features,
/// `TARGETS -- ARGS`, with the toolchain.
fn with_feature(tc: &Toolchain, verb: &str, targets: &[&str], args: &[&str]) -> Command {
    let mut cmd = cargo_with(tc);
    cmd.args([
        verb,
        "--release",
        "-p",
        "kv-backend-cuda",
        "-p",
        "kv-model",
        "--features",
        "kv-backend-cuda/cuda,kv-model/cuda",
    ])
    .args(targets)
    .arg("--")
    .args(args);
    cmd
}

/// What a bundled binary is to cargo.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// An integration test target (`tests/NAME.rs`): `cargo test --test NAME --no-run`.
    Test,
    /// An example (`examples/NAME.rs`): `cargo build --example NAME`.
    Example,
    /// The binary of `xtask/candle-peer` (outside the workspace: `--manifest-path`).
    Peer,
}

/// One run of a bundled binary in `run.sh`.
struct Run {
    /// Its name in the summary.
    label: &'static str,
    /// Its arguments; `$OUT` is the folder for logs and results, `$here/tmp` for scratch
    /// files that do not come back (the model).
    args: &'static str,
    /// Seconds `run.sh` gives it (all runs together stay under 8 minutes).
    timeout_s: u32,
}

/// One binary of the GPU bundle and its runs.
struct Bundled {
    package: &'static str,
    kind: Kind,
    name: &'static str,
    runs: &'static [Run],
}

/// The synthetic SmolLM2-shape Q4_1 model kv's bench and the candle peer both run on,
/// written by `gpu_model_bench --write-model` (outside `$OUT`: it would not come back).
const BUNDLE_MODEL: &str = "$here/tmp/smollm2-shape-q4_1.gguf";

/// The end-to-end schedule kv's bench and the peer share: depths, prompt and decode lengths.
const E2E_ARGS: &str = "--depths 0,1024,4096 --decode 64";

/// The binaries of `cargo xtask gpu-bundle`, in the order `run.sh` runs them. An example
/// whose source is not in the tree (yet) is left out with a note: add a line here when a
/// crate gains a GPU binary.
const BUNDLE: &[Bundled] = &[
    Bundled {
        package: "kv-backend-cuda",
        kind: Kind::Test,
        name: "gpu",
        runs: &[Run {
            label: "kv-backend-cuda gpu tests",
            args: "--include-ignored --test-threads=1 --nocapture",
            timeout_s: 110,
        }],
    },
    Bundled {
        package: "kv-model",
        kind: Kind::Test,
        name: "gpu",
        runs: &[Run {
            label: "kv-model gpu tests",
            args: "--test-threads=1 --nocapture",
            timeout_s: 125,
        }],
    },
    Bundled {
        package: "kv-backend-cuda",
        kind: Kind::Example,
        name: "gpu_attention_bench",
        runs: &[Run {
            label: "decode attention bench",
            args: "",
            timeout_s: 80,
        }],
    },
    Bundled {
        package: "kv-model",
        kind: Kind::Example,
        name: "gpu_model_bench",
        runs: &[
            Run {
                label: "write the synthetic model",
                args: "--write-model \"$model\"",
                timeout_s: 20,
            },
            Run {
                label: "kv end to end",
                args: "--model \"$model\" --prefill 256 $e2e --json \"$OUT/kv_e2e.json\"",
                timeout_s: 75,
            },
        ],
    },
    Bundled {
        package: "candle-peer",
        kind: Kind::Peer,
        name: "candle-peer",
        runs: &[Run {
            label: "candle peer end to end",
            args: "--device cuda --skip-kvcache --end-at-depth --model \"$model\" --prompt 256 \
                   $e2e --json \"$OUT/candle_e2e.json\"",
            timeout_s: 45,
        }],
    },
];

/// Seconds `run.sh` allows for what is not a bundled run (unpacking, the summary).
const RUN_SH_OVERHEAD_S: u32 = 20;

impl Bundled {
    /// The file name in `.gpubin/` (xz-compressed) and, without `.xz`, of the unpacked binary.
    fn file(&self) -> String {
        match self.kind {
            Kind::Test => format!("{}-test-{}", self.package, self.name),
            Kind::Example => format!("{}-example-{}", self.package, self.name),
            Kind::Peer => self.name.to_string(),
        }
    }

    fn source(&self) -> PathBuf {
        let root = crate::root();
        match self.kind {
            Kind::Test => root.join(self.package).join("tests"),
            Kind::Example => root.join(self.package).join("examples"),
            Kind::Peer => return peer_manifest().with_file_name("src").join("main.rs"),
        }
        .join(format!("{}.rs", self.name))
    }

    /// `cargo build` (or `test --no-run`) of this binary with the CUDA toolchain.
    fn build(&self, tc: &Toolchain) -> Command {
        let mut build = cargo_with(tc);
        match self.kind {
            Kind::Test => build.args(["test", "--release", "-p", self.package]),
            Kind::Example => build.args(["build", "--release", "-p", self.package]),
            Kind::Peer => build
                .args(["build", "--release", "--manifest-path"])
                .arg(peer_manifest()),
        };
        build.args(["--features", "cuda"]);
        match self.kind {
            Kind::Test => build.args(["--test", self.name, "--no-run"]),
            Kind::Example => build.args(["--example", self.name]),
            Kind::Peer => &mut build,
        };
        build.arg("--message-format=json");
        build
    }
}

/// The candle peer's manifest (its own workspace, its own Cargo.lock with the workspace's
/// versions, so a CUDA build shares candle's CUDA artifacts where features agree).
fn peer_manifest() -> PathBuf {
    crate::root()
        .join("xtask")
        .join("candle-peer")
        .join("Cargo.toml")
}

/// `cargo xtask gpu-bundle`: `.gpubin/` (git-ignored) with the xz-compressed GPU binaries of
/// [`BUNDLE`] and a `run.sh` that runs them all on the GPU machine with that machine's
/// CUDA 13 libraries, writes each one's log to `$OUT` and prints one summary.
pub fn gpu_bundle() -> Result<(), String> {
    let tc = setup()?;
    let dir = crate::root().join(".gpubin");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    for (name, text) in [("xz.py", XZ_PY), ("compare.py", COMPARE_PY)] {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    let mut included = Vec::new();
    for item in BUNDLE {
        if !item.source().is_file() {
            println!(
                "==> {} {} is not in this tree: left out of the bundle",
                item.package, item.name
            );
            continue;
        }
        let mut build = item.build(&tc);
        println!(
            "\n==> build {} {:?} {} (release, cuda)",
            item.package, item.kind, item.name
        );
        let out = build
            .stderr(std::process::Stdio::inherit())
            .output()
            .map_err(|e| format!("cargo: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "building {} {} failed ({})",
                item.package, item.name, out.status
            ));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let exe = executable(&stdout, item.name)
            .ok_or_else(|| format!("cargo named no executable for {}", item.name))?;
        // The release profile keeps debug info (about half of a CUDA binary's 118 MB):
        // the bundle carries a copy without it.
        let stripped = dir.join(item.file());
        let mut strip = Command::new("strip");
        strip
            .arg("--strip-debug")
            .arg("-o")
            .arg(&stripped)
            .arg(&exe);
        crate::run("strip the debug info of the bundled copy", strip)?;
        let xz = dir.join(format!("{}.xz", item.file()));
        compress(&dir, &stripped, &xz)?;
        std::fs::remove_file(&stripped)
            .map_err(|e| format!("removing {}: {e}", stripped.display()))?;
        included.push(item);
    }
    let run = dir.join("run.sh");
    std::fs::write(&run, run_script(&included))
        .map_err(|e| format!("writing {}: {e}", run.display()))?;
    let mut total = 0u64;
    println!("\n==> {}:", dir.display());
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .map_err(|e| format!("reading {}: {e}", dir.display()))?
        .filter_map(|e| e.ok())
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let len = e.metadata().map(|m| m.len()).unwrap_or(0);
        total += len;
        println!(
            "    {:>8.1} MiB  {}",
            len as f64 / (1 << 20) as f64,
            e.file_name().to_string_lossy()
        );
    }
    let limits: u32 = included
        .iter()
        .flat_map(|b| b.runs)
        .map(|r| r.timeout_s)
        .sum();
    println!(
        "    {:>8.1} MiB  in all (the GPU machine receives at most 64 MiB with the tree)\n\
         run.sh: {} runs, at most {} s with unpacking\n\
         on the GPU machine: run(command=\"bash .gpubin/run.sh\", carry=[\".gpubin\"])",
        total as f64 / (1 << 20) as f64,
        included.iter().map(|b| b.runs.len()).sum::<usize>(),
        limits + RUN_SH_OVERHEAD_S
    );
    if total > 48 << 20 {
        return Err(format!(
            "the bundle is {:.1} MiB: too close to the 64 MiB the GPU machine receives",
            total as f64 / (1 << 20) as f64
        ));
    }
    Ok(())
}

/// xz at its highest preset through Python's standard `lzma` (Python is on both machines:
/// pip installs the toolchain here, PyTorch's interpreter is on the GPU machine): smaller
/// than gzip on these binaries, whose embedded PTX is text, so that all of them fit the
/// 64 MiB the GPU machine receives. `xz.py` (written into the bundle first) does both ways.
fn compress(dir: &Path, from: &Path, to: &Path) -> Result<(), String> {
    let mut py = Command::new("python3");
    py.arg(dir.join("xz.py")).arg("c").arg(from).arg(to);
    crate::run("xz-compress the bundled copy", py)
}

/// `python3 xz.py c|d SRC DST`: compresses or unpacks SRC into DST.
const XZ_PY: &str = "\
import lzma, shutil, sys

mode, src, dst = sys.argv[1:4]
if mode == 'c':
    i, o = open(src, 'rb'), lzma.open(dst, 'wb', preset=9 | lzma.PRESET_EXTREME)
else:
    i, o = lzma.open(src, 'rb'), open(dst, 'wb')
with i, o:
    shutil.copyfileobj(i, o, 1 << 20)
";

/// The executable of target `name` (a test or an example) in cargo's JSON messages.
fn executable(messages: &str, name: &str) -> Option<String> {
    let needle = format!("\"name\":\"{name}\"");
    messages
        .lines()
        .filter(|l| l.contains("\"reason\":\"compiler-artifact\"") && l.contains(&needle))
        .find_map(|l| {
            let rest = &l[l.find("\"executable\":\"")? + "\"executable\":\"".len()..];
            Some(rest[..rest.find('"')?].to_string())
        })
}

/// `python3 compare.py KV_JSON PEER_JSON`: one table of kv's and the candle peer's
/// end-to-end tokens/s per depth (the JSON of `gpu_model_bench --json` and
/// `candle-peer --json`), the ratios, and whether decode at depth 4096 is at least twice
/// the peer's. Exit status 1 when a file is missing or the two runs differ in schedule.
const COMPARE_PY: &str = r#"import json, sys

TARGET_DEPTH, TARGET_RATIO = 4096, 2.0

def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        print(f"{path}: not measured ({e})")
        return None

kv, peer = load(sys.argv[1]), load(sys.argv[2])
if kv is None or peer is None:
    print("kv vs candle: no comparison (a run above did not finish)")
    sys.exit(1)
same = all(kv.get(k) == peer.get(k) for k in ("prefill", "decode", "model"))
if not same:
    print("kv vs candle: the two runs differ in model or schedule:",
          {k: (kv.get(k), peer.get(k)) for k in ("prefill", "decode", "model")})
    sys.exit(1)
rows = lambda j: {r["depth"]: r for r in j.get("rows", [])}
k, p = rows(kv), rows(peer)
print(f"kv ({kv.get('device')}, {kv.get('weights')} weights, {kv.get('dtype')} cache) vs "
      f"candle-transformers quantized Llama ({peer.get('device')}, {peer.get('weights')} weights), "
      f"tokens/s; prefill {kv['prefill']} tokens and decode {kv['decode']} steps, each ending at the depth")
print(f"| {'depth':>5} | {'decode kv':>10} | {'candle':>10} | {'ratio':>6} "
      f"| {'prefill kv':>10} | {'candle':>10} | {'ratio':>6} |")
print("|------:|-----------:|-----------:|-------:|-----------:|-----------:|-------:|")
def ratio(a, b):
    return a / b if a and b else None
def cell(x, fmt):
    return format(x, fmt) if x is not None else "-".rjust(int(fmt.split(".")[0]))
target = None
for depth in sorted(set(k) | set(p)):
    a, b = k.get(depth, {}), p.get(depth, {})
    dk, dp = a.get("decode_tokens_per_s"), b.get("decode_tokens_per_s")
    pk, pp = a.get("prefill_tokens_per_s"), b.get("prefill_tokens_per_s")
    rd, rp = ratio(dk, dp), ratio(pk, pp)
    if depth == TARGET_DEPTH:
        target = rd
    print(f"| {depth:>5} | {cell(dk, '10.1f')} | {cell(dp, '10.1f')} | {cell(rd, '5.2f')}x "
          f"| {cell(pk, '10.1f')} | {cell(pp, '10.1f')} | {cell(rp, '5.2f')}x |"
          .replace(" -x |", "  - |"))
if target is None:
    print(f"target: decode at depth {TARGET_DEPTH} >= {TARGET_RATIO:g}x the candle peer: NOT MEASURED")
    sys.exit(1)
verdict = "MET" if target >= TARGET_RATIO else "NOT MET"
print(f"target: decode at depth {TARGET_DEPTH} >= {TARGET_RATIO:g}x the candle peer: {verdict} ({target:.2f}x)")
"#;

/// The file names of the two end-to-end JSONs in `$OUT` (the runs' `--json`).
const E2E_JSON: [&str; 2] = ["kv_e2e.json", "candle_e2e.json"];

/// `run.sh`: unpack and run every bundled binary's runs with their time limits, one log per
/// binary in `$OUT`, then one summary with the kv vs candle table (exit status 1 when any
/// run failed, timed out or skipped). `$OUT` gets at most 8 files (the most that come back
/// from the GPU machine): a log per binary, two JSONs and `summary.txt`.
fn run_script(items: &[&Bundled]) -> String {
    let mut s = format!(
        "#!/usr/bin/env bash\n\
         # Runs kv's GPU binaries (written by cargo xtask gpu-bundle); logs go to $OUT.\n\
         # The CUDA 13 libraries come from the GPU machine's torch install; libcuda from its driver.\n\
         set -uo pipefail\n\
         here=\"$(cd \"$(dirname \"$0\")\" && pwd)\"\n\
         OUT=\"${{OUT:-$here/out}}\"\n\
         mkdir -p \"$OUT\" \"$here/bin\" \"$here/tmp\"\n\
         rm -f \"$OUT\"/*.log \"$OUT\"/*.json \"$OUT/summary.txt\"\n\
         CU_LIB=\"${{KV_CUDA_LIB:-{GPU_LIB_DIR}}}\"\n\
         export LD_LIBRARY_PATH=\"$CU_LIB:/usr/local/nvidia/lib64:${{LD_LIBRARY_PATH:-}}\"\n\
         # A GPU test that finds no device fails here instead of skipping.\n\
         export KV_REQUIRE_GPU=1\n\
         model=\"{BUNDLE_MODEL}\"\n\
         e2e=\"{E2E_ARGS}\"\n\
         started=$(date +%s)\n\
         {{ nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv; \
         git -C \"$here/..\" rev-parse HEAD 2>/dev/null; }} 2>&1 | tee \"$OUT/summary.txt\"\n\
         summary=()\n\
         failed=0\n\
         # run_one FILE LABEL LIMIT ARGS...: unpacks FILE once, runs it, appends to its log.\n\
         run_one() {{\n\
         \x20 local name=$1 label=$2 limit=$3; shift 3\n\
         \x20 local log=\"$OUT/$name.log\" run=\"$here/tmp/run.log\"\n\
         \x20 if [ ! -x \"$here/bin/$name\" ]; then\n\
         \x20   python3 \"$here/xz.py\" d \"$here/$name.xz\" \"$here/bin/$name\" && chmod +x \"$here/bin/$name\"\n\
         \x20   ldd \"$here/bin/$name\" >> \"$log\" 2>&1; grep 'not found' \"$log\"\n\
         \x20 fi\n\
         \x20 local t0=$(date +%s)\n\
         \x20 echo \"==> $label: $name $*\" | tee -a \"$log\"\n\
         \x20 timeout \"$limit\" \"$here/bin/$name\" \"$@\" > \"$run\" 2>&1\n\
         \x20 local rc=$? t=$(( $(date +%s) - t0 ))\n\
         \x20 cat \"$run\" >> \"$log\"\n\
         \x20 local skipped=$(grep -c SKIPPED \"$run\")\n\
         \x20 local status=ok\n\
         \x20 if [ $rc -eq 124 ]; then status=\"TIMED OUT after ${{limit}} s\"; failed=1;\n\
         \x20 elif [ $rc -ne 0 ]; then status=\"FAILED (exit $rc)\"; failed=1; fi\n\
         \x20 if [ \"$skipped\" -gt 0 ]; then status=\"$status, $skipped SKIPPED\"; failed=1; fi\n\
         \x20 summary+=(\"$label: $status in ${{t}} s\")\n\
         \x20 tail -n 40 \"$run\"\n\
         }}\n"
    );
    for item in items {
        for run in item.runs {
            s.push_str(&format!(
                "run_one {} '{}' {} {}\n",
                item.file(),
                run.label,
                run.timeout_s,
                run.args
            ));
        }
    }
    let [kv_json, peer_json] = E2E_JSON;
    s.push_str(&format!(
        "echo\n\
         echo \"==== summary ($(( $(date +%s) - started )) s; logs in $OUT)\" | tee -a \"$OUT/summary.txt\"\n\
         printf '%s\\n' \"${{summary[@]}}\" | tee -a \"$OUT/summary.txt\"\n\
         grep -h -E '^test result|GB/s' \"$OUT\"/*.log | tee -a \"$OUT/summary.txt\"\n\
         echo | tee -a \"$OUT/summary.txt\"\n\
         python3 \"$here/compare.py\" \"$OUT/{kv_json}\" \"$OUT/{peer_json}\" 2>&1 | tee -a \"$OUT/summary.txt\"\n\
         exit $failed\n"
    ));
    s
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
        assert_eq!(executable(msgs, "gpu").as_deref(), Some("/t/deps/gpu-abc"));
        assert_eq!(executable(msgs, "gpu_model_bench"), None);
        assert_eq!(executable("{}", "gpu"), None);
    }

    #[test]
    fn the_bundle_fits_the_time_limit_and_names_each_binary_once() {
        let runs: u32 = BUNDLE
            .iter()
            .flat_map(|b| b.runs)
            .map(|r| r.timeout_s)
            .sum();
        let total = runs + RUN_SH_OVERHEAD_S;
        assert!(total < 8 * 60, "{total} s");
        let mut files: Vec<String> = BUNDLE.iter().map(Bundled::file).collect();
        files.sort();
        files.dedup();
        assert_eq!(files.len(), BUNDLE.len());
        // What comes back from the GPU machine: at most 8 files in $OUT.
        assert!(BUNDLE.len() + E2E_JSON.len() < 8);
        let items: Vec<&Bundled> = BUNDLE.iter().collect();
        let script = run_script(&items);
        for b in BUNDLE {
            for r in b.runs {
                let line = format!("run_one {} '{}' {} ", b.file(), r.label, r.timeout_s);
                assert!(script.contains(&line), "{line}");
            }
        }
        assert!(script.contains("KV_REQUIRE_GPU=1"));
        for json in E2E_JSON {
            assert!(script.contains(&format!("$OUT/{json}")), "{json}");
        }
    }

    #[test]
    fn kv_and_the_peer_run_the_same_model_and_schedule() {
        let args = |name: &str| -> Vec<&str> {
            BUNDLE
                .iter()
                .filter(|b| b.name == name)
                .flat_map(|b| b.runs)
                .map(|r| r.args)
                .filter(|a| a.contains("--json"))
                .collect()
        };
        let (kv, peer) = (args("gpu_model_bench"), args("candle-peer"));
        assert_eq!((kv.len(), peer.len()), (1, 1));
        for a in [kv[0], peer[0]] {
            assert!(a.contains("--model \"$model\""), "{a}");
            assert!(a.contains("$e2e"), "{a}");
        }
        // kv's --prefill and the peer's --prompt are the same length.
        assert!(kv[0].contains("--prefill 256") && peer[0].contains("--prompt 256"));
        assert!(peer[0].contains("--device cuda") && peer[0].contains("--end-at-depth"));
        let writes = BUNDLE
            .iter()
            .flat_map(|b| b.runs)
            .filter(|r| r.args.contains("--write-model \"$model\""))
            .count();
        assert_eq!(writes, 1);
    }

    /// Runs compare.py on two JSON files in a scratch folder; returns (status, stdout).
    fn compare(kv: &str, peer: &str) -> (i32, String) {
        let dir = std::env::temp_dir().join(format!("kv-compare-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (script, a, b) = (
            dir.join("compare.py"),
            dir.join("kv.json"),
            dir.join("peer.json"),
        );
        std::fs::write(&script, COMPARE_PY).unwrap();
        std::fs::write(&a, kv).unwrap();
        if !peer.is_empty() {
            std::fs::write(&b, peer).unwrap();
        }
        let out = Command::new("python3")
            .arg(&script)
            .arg(&a)
            .arg(&b)
            .output()
            .expect("python3 (cuda-setup needs it too)");
        let _ = std::fs::remove_dir_all(&dir);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    #[test]
    fn compare_prints_the_ratios_and_the_decode_target() {
        let head = r#""model":"m.gguf","prefill":256,"decode":64,"device":"cuda:0""#;
        let kv = format!(
            r#"{{"impl":"kv",{head},"rows":[{{"depth":0,"prefill_tokens_per_s":9000,"decode_tokens_per_s":500}},{{"depth":4096,"prefill_tokens_per_s":6000,"decode_tokens_per_s":450}}]}}"#
        );
        let peer = |decode: f64| {
            format!(
                r#"{{"impl":"candle-transformers",{head},"rows":[{{"depth":0,"prefill_tokens_per_s":3000,"decode_tokens_per_s":250}},{{"depth":4096,"prefill_tokens_per_s":2000,"decode_tokens_per_s":{decode}}}]}}"#
            )
        };
        let (rc, out) = compare(&kv, &peer(180.0));
        assert_eq!(rc, 0, "{out}");
        assert!(
            out.contains("|  4096 |      450.0 |      180.0 |  2.50x |"),
            "{out}"
        );
        assert!(
            out.contains(
                "|     0 |      500.0 |      250.0 |  2.00x |     9000.0 |     3000.0 |  3.00x |"
            ),
            "{out}"
        );
        assert!(out.contains(": MET (2.50x)"), "{out}");
        let (rc, out) = compare(&kv, &peer(300.0));
        assert_eq!(rc, 0, "{out}");
        assert!(out.contains(": NOT MET (1.50x)"), "{out}");
        // A missing peer file and a schedule mismatch are no comparison.
        let (rc, out) = compare(&kv, "");
        assert_eq!(rc, 1, "{out}");
        assert!(out.contains("not measured"), "{out}");
        let (rc, out) = compare(&kv, &peer(180.0).replace("\"decode\":64", "\"decode\":32"));
        assert_eq!(rc, 1, "{out}");
        assert!(out.contains("differ"), "{out}");
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
