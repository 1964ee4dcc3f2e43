//! llama.cpp as the peer measured in the same run: `cargo xtask llama-cpp` builds it from the
//! source that the PyPI sdist of llama-cpp-python vendors (the same hash-checked sdist as
//! `fetch-vocab`), with cmake and ninja from PyPI pinned by hash; `cargo xtask bench` runs its
//! llama-bench and llama-batched-bench beside kv, and `cargo xtask ppl-peer` compares
//! perplexity with its llama-perplexity on the same GGUF and text.
//!
//! The build is CPU only with `-DGGML_NATIVE=ON` and lives in
//! `~/.cache/kv/llama-cpp/<commit>/` (`$KV_LLAMA_CPP_DIR` instead of `~/.cache/kv/llama-cpp`),
//! outside the clone, so it survives `cargo clean` and is shared by worktrees.

use std::fmt::Write as _;
use std::fs::File;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};

use crate::bench::{capture, Rec, Results};

/// The llama.cpp commit the sdist vendors (`vendor/llama.cpp`).
pub const COMMIT: &str = "0c1e57098bba";
/// Where llama.cpp's source sits inside the sdist.
const SRC_PREFIX: &str = "llama_cpp_python-0.3.36/vendor/llama.cpp/";
/// cmake and ninja from PyPI, pinned by hash (`pip install --require-hashes`); the hashes
/// are of the manylinux x86_64 wheels.
const TOOLS: &str = "\
cmake==4.1.0 --hash=sha256:dab375932f5962e078da8cf76ca228c21bf4bea9ddeb1308e2b35797fa30f784
ninja==1.13.0 --hash=sha256:fb46acf6b93b8dd0322adc3a4945452a4e774b75b91293bafcc7b7f8e6517dfa
";
/// The programs the bench and `ppl-peer` run.
pub const TARGETS: [&str; 3] = ["llama-bench", "llama-perplexity", "llama-batched-bench"];
/// Some x86 VMs report AMX but refuse its tile instructions: a native build then dies with
/// SIGILL on any batch of more than one token. Harmless where AMX is absent.
const NO_AMX: &str = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16";
/// Written last into the build directory: its presence means the binaries are complete.
const STAMP: &str = "complete";

/// `$KV_LLAMA_CPP_DIR` or `~/.cache/kv/llama-cpp`.
fn cache_root() -> PathBuf {
    crate::fetch::cache_dir("KV_LLAMA_CPP_DIR", "llama-cpp")
}

/// The directory of this commit's source (`src/`), build tree (`build/`) and stamp.
fn commit_dir() -> PathBuf {
    cache_root().join(COMMIT)
}

/// The cmake flags of the build, also written into the stamp.
fn cmake_flags() -> Vec<String> {
    [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DGGML_NATIVE=ON",
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_SERVER=OFF",
        "-DBUILD_SHARED_LIBS=ON",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        format!("-DCMAKE_C_FLAGS={NO_AMX}"),
        format!("-DCMAKE_CXX_FLAGS={NO_AMX}"),
    ])
    .collect()
}

/// The binaries of the cached build, if it is complete.
pub fn installed() -> Option<PathBuf> {
    let dir = commit_dir();
    dir.join(STAMP)
        .is_file()
        .then(|| dir.join("build").join("bin"))
}

/// A directory given with `--llama-cpp DIR`: it, or its `bin/` or `build/bin/`, must hold
/// the three programs.
pub fn check_dir(dir: &Path) -> Result<PathBuf, String> {
    let has_all = |d: &Path| TARGETS.iter().all(|t| d.join(t).is_file());
    [
        dir.to_path_buf(),
        dir.join("bin"),
        dir.join("build").join("bin"),
    ]
    .into_iter()
    .find(|d| has_all(d))
    .ok_or_else(|| {
        format!(
            "{}: no {} there (nor in bin/ or build/bin/); `cargo xtask llama-cpp` builds them",
            dir.display(),
            TARGETS.join(", ")
        )
    })
}

/// `cargo xtask llama-cpp`: the cached build's binaries, building them first when absent
/// (cold: about 12 min on an idle 2-core machine).
pub fn ensure_build() -> Result<PathBuf, String> {
    if let Some(bin) = installed() {
        return Ok(bin);
    }
    let dir = commit_dir();
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let src = dir.join("src");
    if !src.join("CMakeLists.txt").is_file() {
        let sdist = sdist(&dir)?;
        println!("==> extracting llama.cpp {COMMIT} into {}", src.display());
        let _ = std::fs::remove_dir_all(&src);
        extract_source(&sdist, &src)?;
    }
    let tools = cache_root().join("tools");
    let (cmake, ninja) = (
        tools.join("cmake").join("data").join("bin").join("cmake"),
        tools.join("bin").join("ninja"),
    );
    if !cmake.is_file() || !ninja.is_file() {
        let req = cache_root().join("tools-requirements.txt");
        std::fs::write(&req, TOOLS).map_err(|e| format!("writing {}: {e}", req.display()))?;
        let mut pip = Command::new(crate::fetch::python()?);
        pip.args(["-m", "pip", "install", "--require-hashes", "--no-deps"])
            .args(["--only-binary", ":all:", "--upgrade", "--target"])
            .arg(&tools)
            .arg("-r")
            .arg(&req);
        crate::run("pip install cmake and ninja (hashes required)", pip)?;
    }
    let build = dir.join("build");
    let mut configure = Command::new(&cmake);
    configure
        .arg("-S")
        .arg(&src)
        .arg("-B")
        .arg(&build)
        .args(["-G", "Ninja"])
        .arg(format!("-DCMAKE_MAKE_PROGRAM={}", ninja.display()))
        .args(cmake_flags());
    crate::run("configure llama.cpp (CPU only, native)", configure)?;
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut compile = Command::new(&cmake);
    compile
        .arg("--build")
        .arg(&build)
        .args(["-j", &jobs.to_string(), "--target"])
        .args(TARGETS);
    crate::run(
        "build llama-bench, llama-perplexity, llama-batched-bench (cold: 12+ min on 2 cores)",
        compile,
    )?;
    let bin = build.join("bin");
    check_dir(&bin)?;
    std::fs::write(
        dir.join(STAMP),
        format!("{COMMIT}\n{}\n", cmake_flags().join(" ")),
    )
    .map_err(|e| format!("writing the stamp in {}: {e}", dir.display()))?;
    let _ = std::fs::remove_dir_all(dir.join("download"));
    println!("==> llama.cpp {COMMIT}: {}", bin.display());
    Ok(bin)
}

/// `name` (a program the bench does not need, such as llama-simple) beside the others in
/// `bin`, built into the cached build tree when `bin` is that tree's and it is absent.
pub(crate) fn ensure_program(bin: &Path, name: &str) -> Result<PathBuf, String> {
    let path = bin.join(name);
    if path.is_file() {
        return Ok(path);
    }
    let build = commit_dir().join("build");
    if bin != build.join("bin") {
        return Err(format!(
            "{}: no {name} there (build it with llama.cpp's cmake target {name})",
            bin.display()
        ));
    }
    let mut compile = Command::new(
        cache_root()
            .join("tools")
            .join("cmake")
            .join("data")
            .join("bin")
            .join("cmake"),
    );
    compile.arg("--build").arg(&build).args(["--target", name]);
    crate::run(&format!("build llama.cpp's {name}"), compile)?;
    path.is_file()
        .then_some(path)
        .ok_or_else(|| format!("building {name} left no {}", bin.join(name).display()))
}

/// The verified sdist: `$KV_LLAMA_SDIST` or downloaded by pip into `dir/download`.
fn sdist(dir: &Path) -> Result<PathBuf, String> {
    let path = match std::env::var_os("KV_LLAMA_SDIST") {
        Some(p) => PathBuf::from(p),
        None => {
            let download = dir.join("download");
            let _ = std::fs::remove_dir_all(&download);
            crate::fetch::pip_download(crate::vocab::PACKAGE, Some("llama-cpp-python"), &download)?;
            download.join(crate::vocab::SDIST)
        }
    };
    let digest = crate::fetch::file_sha256(&path)?;
    if digest != crate::vocab::SDIST_SHA256 {
        return Err(format!(
            "{}: SHA-256 mismatch: expected {}, got {digest}",
            path.display(),
            crate::vocab::SDIST_SHA256
        ));
    }
    Ok(path)
}

/// Where a member of the sdist goes under `src`: llama.cpp's tree only, plain relative
/// paths only (no `..`, no absolute paths).
fn source_destination(member: &str, src: &Path) -> Option<PathBuf> {
    let rest = Path::new(member.strip_prefix(SRC_PREFIX)?);
    let plain = rest.components().count() > 0
        && rest.components().all(|c| matches!(c, Component::Normal(_)));
    plain.then(|| src.join(rest))
}

/// Unpacks llama.cpp's tree from the gzipped tar `sdist` into `src`.
fn extract_source(sdist: &Path, src: &Path) -> Result<(), String> {
    crate::vocab::for_each_file(sdist, |member, entry| {
        let Some(to) = source_destination(member, src) else {
            return Ok(());
        };
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("creating {}: {e}", parent.display()))?;
        }
        entry
            .unpack(&to)
            .map_err(|e| format!("extracting {member}: {e}"))?;
        Ok(())
    })?;
    if !src.join("CMakeLists.txt").is_file() {
        return Err(format!("{} holds no {SRC_PREFIX}", sdist.display()));
    }
    Ok(())
}

/// The batched run to mirror: kv's prompt and new tokens per sequence, and its batch sizes.
pub struct BatchShape {
    pub prompt: usize,
    pub new: usize,
    pub seqs: Vec<usize>,
}

impl BatchShape {
    /// The shape of kv's `section=batch` lines, if the run has them.
    pub fn of(r: &Results) -> Option<Self> {
        let recs: Vec<&Rec> = r.all(&[("section", "batch")]).collect();
        let first = recs.first()?;
        let mut seqs: Vec<usize> = recs
            .iter()
            .filter_map(|x| x.num("seqs").map(|s| s as usize))
            .collect();
        seqs.sort_unstable();
        seqs.dedup();
        Some(Self {
            prompt: first.num("prompt")? as usize,
            new: first.num("new")? as usize,
            seqs,
        })
    }
}

/// Measures llama.cpp with the binaries in `bin` on `model` and `threads` threads: decode
/// and prefill by depth for its f16, q8_0 and q4_0 caches (llama-bench), and batched decode
/// in kv's shape (llama-batched-bench). Returns `BENCH` lines for `results.txt`.
pub fn measure(
    bin: &Path,
    model: &Path,
    threads: usize,
    quick: bool,
    batch: Option<&BatchShape>,
) -> Result<String, String> {
    let t = threads.to_string();
    let mut lines = format!(
        "BENCH section=llama-cpp commit={COMMIT} bin={}\n",
        bin.display()
    );
    let (prompt, gen, depths, reps) = if quick {
        ("16", "4", "0,32", "1")
    } else {
        ("512", "64", "0,1024,4096", "2")
    };
    // A quantized V cache needs flash attention in llama.cpp, so q8_0/q4_0 run with it
    // only; f16 runs both ways and the report takes the better.
    for (cache, fa) in [("f16", "0,1"), ("q8_0", "1"), ("q4_0", "1")] {
        let mut cmd = Command::new(bin.join("llama-bench"));
        cmd.arg("-m")
            .arg(model)
            .args(["-t", &t, "-p", prompt, "-n", gen, "-d", depths, "-r", reps])
            .args(["-ctk", cache, "-ctv", cache, "-fa", fa, "-o", "csv"]);
        let csv = capture(&format!("llama-bench, {cache} cache"), cmd)?;
        let recs = parse_llama_bench_csv(&csv)?;
        if recs.is_empty() {
            return Err(format!("llama-bench ({cache}) printed no results"));
        }
        for x in recs {
            lines.push_str(&x.bench_line());
            lines.push('\n');
        }
    }
    if let Some(b) = batch.filter(|b| !b.seqs.is_empty()) {
        let most = b.seqs.iter().copied().max().unwrap_or(1);
        let ctx = most
            .checked_mul(b.prompt + b.new)
            .ok_or("batch shape overflows")?;
        let npl = b
            .seqs
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let mut cmd = Command::new(bin.join("llama-batched-bench"));
        cmd.arg("-m")
            .arg(model)
            .args(["-t", &t, "-tb", &t, "-c", &ctx.to_string()])
            .args(["-npp", &b.prompt.to_string(), "-ntg", &b.new.to_string()])
            .args(["-npl", &npl, "--output-format", "jsonl"]);
        let out = capture("llama-batched-bench", cmd)?;
        let rows = parse_batched_jsonl(&out)?;
        if rows.is_empty() {
            return Err("llama-batched-bench printed no results".into());
        }
        for x in rows {
            let _ = writeln!(
                lines,
                "BENCH section=llama-batch seqs={} prompt={} new={} prefill_tokens_per_s={:.3} decode_tokens_per_s={:.3}",
                x.seqs, x.prompt, x.new, x.prefill_tokens_per_s, x.decode_tokens_per_s
            );
        }
    }
    Ok(lines)
}

/// One llama-bench result: a prefill (`prompt` tokens) or decode (`gen` tokens) test.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchRow {
    pub cache: String,
    pub flash_attn: String,
    pub prompt: usize,
    pub gen: usize,
    pub depth: usize,
    pub tokens_per_s: f64,
    pub stddev: f64,
    /// The model's tensor bytes (llama-bench's `model_size`): the weights a step reads.
    pub model_bytes: f64,
}

impl BenchRow {
    fn bench_line(&self) -> String {
        format!(
            "BENCH section=llama-bench cache={} fa={} prompt={} gen={} depth={} tokens_per_s={:.3} stddev={:.3} model_bytes={:.0}",
            self.cache, self.flash_attn, self.prompt, self.gen, self.depth, self.tokens_per_s, self.stddev, self.model_bytes
        )
    }
}

/// Splits one CSV line of llama-bench (every field quoted, `""` for a quote inside).
fn csv_fields(line: &str) -> Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        let mut field = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    Some('"') => break,
                    Some(c) => field.push(c),
                    None => return Err(format!("unterminated quote in CSV line {line:?}")),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                field.push(c);
                chars.next();
            }
        }
        fields.push(field);
        match chars.next() {
            Some(',') => {}
            None => return Ok(fields),
            Some(c) => return Err(format!("unexpected {c:?} after a field in {line:?}")),
        }
    }
}

/// llama-bench's `-o csv` output: a header line, then one line per test.
pub fn parse_llama_bench_csv(csv: &str) -> Result<Vec<BenchRow>, String> {
    let mut lines = csv.lines().filter(|l| !l.trim().is_empty());
    let Some(header) = lines.next() else {
        return Ok(Vec::new());
    };
    let header = csv_fields(header)?;
    let col = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| format!("llama-bench CSV lacks the column {name:?}"))
    };
    let cols = [
        col("type_k")?,
        col("flash_attn")?,
        col("n_prompt")?,
        col("n_gen")?,
        col("n_depth")?,
        col("avg_ts")?,
        col("stddev_ts")?,
        col("model_size")?,
    ];
    lines
        .map(|line| {
            let f = csv_fields(line)?;
            if f.len() != header.len() {
                return Err(format!(
                    "llama-bench CSV line has {} fields, the header {}: {line:?}",
                    f.len(),
                    header.len()
                ));
            }
            let int = |i: usize| {
                f[cols[i]]
                    .parse::<usize>()
                    .map_err(|e| format!("llama-bench CSV: {:?}: {e}", f[cols[i]]))
            };
            let float = |i: usize| {
                f[cols[i]]
                    .parse::<f64>()
                    .map_err(|e| format!("llama-bench CSV: {:?}: {e}", f[cols[i]]))
            };
            Ok(BenchRow {
                cache: f[cols[0]].clone(),
                flash_attn: f[cols[1]].clone(),
                prompt: int(2)?,
                gen: int(3)?,
                depth: int(4)?,
                tokens_per_s: float(5)?,
                stddev: float(6)?,
                model_bytes: float(7)?,
            })
        })
        .collect()
}

/// One llama-batched-bench result.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchRow {
    pub seqs: usize,
    pub prompt: usize,
    pub new: usize,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
}

/// The number after `"key": ` in one flat JSON object line.
fn json_number(line: &str, key: &str) -> Result<f64, String> {
    let pat = format!("\"{key}\":");
    let at = line
        .find(&pat)
        .ok_or_else(|| format!("llama-batched-bench JSON lacks {key:?}: {line}"))?;
    let rest = line[at + pat.len()..].trim_start();
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end].trim().parse().map_err(|e| {
        format!(
            "llama-batched-bench JSON: {key:?} = {:?}: {e}",
            &rest[..end]
        )
    })
}

/// llama-batched-bench's `--output-format jsonl`: one object per batch size (other lines,
/// if any, are ignored). `speed_tg` is decode over all sequences, prefill apart.
pub fn parse_batched_jsonl(out: &str) -> Result<Vec<BatchRow>, String> {
    out.lines()
        .map(str::trim)
        .filter(|l| l.starts_with('{'))
        .map(|l| {
            let int = |k: &str| {
                let v = json_number(l, k)?;
                if v >= 0.0 && v.fract() == 0.0 {
                    Ok(v as usize)
                } else {
                    Err(format!(
                        "llama-batched-bench JSON: {k:?} = {v} is not a count"
                    ))
                }
            };
            Ok(BatchRow {
                seqs: int("pl")?,
                prompt: int("pp")?,
                new: int("tg")?,
                prefill_tokens_per_s: json_number(l, "speed_pp")?,
                decode_tokens_per_s: json_number(l, "speed_tg")?,
            })
        })
        .collect()
}

/// llama-perplexity's final line: `Final estimate: PPL = 18.3512 +/- 0.51234`.
pub fn parse_llama_perplexity(log: &str) -> Result<(f64, f64), String> {
    let line = log
        .lines()
        .rev()
        .find_map(|l| l.split_once("Final estimate: PPL = ").map(|(_, r)| r))
        .ok_or("llama-perplexity printed no `Final estimate: PPL = ...` line")?;
    let (ppl, err) = line
        .split_once("+/-")
        .ok_or_else(|| format!("llama-perplexity: unexpected final line {line:?}"))?;
    let num = |s: &str| {
        s.trim()
            .parse::<f64>()
            .map_err(|e| format!("llama-perplexity: {s:?}: {e}"))
    };
    Ok((num(ppl)?, num(err)?))
}

/// The chunk count llama-perplexity logs (`calculating perplexity over 14 chunks, ...`).
pub fn llama_chunks(log: &str) -> Option<usize> {
    log.lines()
        .find_map(|l| l.split_once("calculating perplexity over "))
        .and_then(|(_, r)| r.split_whitespace().next()?.parse().ok())
}

/// `kv ppl`'s output: the token and chunk counts, and the f16 row's perplexity.
pub fn parse_kv_ppl(out: &str) -> Result<(usize, usize, f64), String> {
    let counts = out
        .lines()
        .find(|l| l.contains(" tokens, ") && l.contains(" chunks of "))
        .ok_or("kv ppl printed no `N tokens, M chunks of C` line")?;
    let mut words = counts.split_whitespace();
    let tokens = words.next().and_then(|w| w.parse().ok());
    let chunks = words.nth(1).and_then(|w| w.parse().ok());
    let (Some(tokens), Some(chunks)) = (tokens, chunks) else {
        return Err(format!("kv ppl: unexpected line {counts:?}"));
    };
    let f16 = out
        .lines()
        .find(|l| l.split_whitespace().next() == Some("f16"))
        .ok_or("kv ppl printed no f16 row")?;
    let ppl = f16
        .split_whitespace()
        .nth(3)
        .and_then(|w| w.parse::<f64>().ok())
        .ok_or_else(|| format!("kv ppl: unexpected f16 row {f16:?}"))?;
    Ok((tokens, chunks, ppl))
}

/// The bytes of a GGUF file's tensor data (the file less its header, metadata and tensor
/// table): the weights a decode step reads when the output projection is the tied embedding,
/// as in SmolLM2 and Gemma 3. Walks the header without allocating by its counts.
pub fn gguf_tensor_bytes(path: &Path) -> Result<u64, String> {
    use std::io::{BufReader, Read, Seek};
    let err = |e: std::io::Error| format!("{}: reading the GGUF header: {e}", path.display());
    let file = File::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
    let len = file.metadata().map_err(err)?.len();
    let mut f = BufReader::new(file);
    let mut b8 = [0u8; 8];
    let u32_ = |f: &mut BufReader<File>| -> Result<u32, String> {
        let mut b = [0u8; 4];
        f.read_exact(&mut b).map_err(err)?;
        Ok(u32::from_le_bytes(b))
    };
    let mut magic = [0u8; 4];
    f.read_exact(&mut magic).map_err(err)?;
    if &magic != b"GGUF" {
        return Err(format!("{}: not a GGUF file", path.display()));
    }
    let version = u32_(&mut f)?;
    if version < 2 {
        return Err(format!(
            "{}: GGUF version {version} (need 2 or 3)",
            path.display()
        ));
    }
    let mut u64_ = |f: &mut BufReader<File>| -> Result<u64, String> {
        f.read_exact(&mut b8).map_err(err)?;
        Ok(u64::from_le_bytes(b8))
    };
    let tensors = u64_(&mut f)?;
    let kvs = u64_(&mut f)?;
    let skip = |f: &mut BufReader<File>, n: u64| -> Result<(), String> {
        let n =
            i64::try_from(n).map_err(|_| format!("{}: length {n} overflows", path.display()))?;
        f.seek_relative(n).map_err(err)
    };
    // Fixed sizes of the scalar value types, by GGUF type id.
    let scalar = |t: u32| match t {
        0 | 1 | 7 => Some(1u64),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    };
    let mut alignment = 32u64;
    for _ in 0..kvs {
        let key_len = u64_(&mut f)?;
        let mut key = [0u8; 17];
        let is_alignment = key_len == 17;
        if is_alignment {
            f.read_exact(&mut key).map_err(err)?;
        } else {
            skip(&mut f, key_len)?;
        }
        let ty = u32_(&mut f)?;
        match (ty, scalar(ty)) {
            (_, Some(n)) => {
                if is_alignment && &key == b"general.alignment" && ty == 4 {
                    alignment = u64::from(u32_(&mut f)?);
                } else {
                    skip(&mut f, n)?;
                }
            }
            (8, None) => {
                let n = u64_(&mut f)?;
                skip(&mut f, n)?;
            }
            (9, None) => {
                let et = u32_(&mut f)?;
                let count = u64_(&mut f)?;
                match (et, scalar(et)) {
                    (_, Some(n)) => skip(
                        &mut f,
                        count.checked_mul(n).ok_or("GGUF array size overflows")?,
                    )?,
                    (8, None) => {
                        for _ in 0..count {
                            let n = u64_(&mut f)?;
                            skip(&mut f, n)?;
                        }
                    }
                    _ => return Err(format!("{}: GGUF array of type {et}", path.display())),
                }
            }
            _ => return Err(format!("{}: GGUF value type {ty}", path.display())),
        }
    }
    for _ in 0..tensors {
        let name = u64_(&mut f)?;
        skip(&mut f, name)?;
        let dims = u32_(&mut f)?;
        skip(&mut f, u64::from(dims) * 8 + 4 + 8)?;
    }
    let at = f.stream_position().map_err(err)?;
    if alignment == 0 {
        return Err(format!("{}: general.alignment is 0", path.display()));
    }
    let data = at.div_ceil(alignment) * alignment;
    len.checked_sub(data).ok_or_else(|| {
        format!(
            "{}: the GGUF header runs past the file's end",
            path.display()
        )
    })
}

/// SmolLM2-135M's layer count: the bench's attention points time one layer, a step reads 30.
const SMOLLM2_LAYERS: f64 = 30.0;

/// K/V bytes one SmolLM2 layer holds per token in kv's `layout`, from the bench's attention
/// points (`kv_bytes` over `tokens` at the longest point).
fn kv_bytes_per_token(r: &Results, layout: &str) -> Option<f64> {
    r.all(&[
        ("section", "attn"),
        ("shape", "smollm2-135m"),
        ("layout", layout),
    ])
    .filter_map(|a| Some((a.num("tokens")?, a.num("kv_bytes")?)))
    .filter(|(t, _)| *t > 0.0)
    .max_by(|a, b| a.0.total_cmp(&b.0))
    .map(|(t, b)| b / t)
}

/// llama.cpp's bytes per element of a cache type relative to f16's 2 (q8_0: 34 bytes per 32,
/// q4_0: 18 per 32).
fn llama_cache_ratio(cache: &str) -> Option<f64> {
    match cache {
        "f16" => Some(1.0),
        "q8_0" => Some(34.0 / 32.0 / 2.0),
        "q4_0" => Some(18.0 / 32.0 / 2.0),
        _ => None,
    }
}

/// The share of the physical limit a decode rate reaches: `tokens_per_s` times the bytes a
/// step reads (`weights` plus every layer's K/V at `depth`) over the probe's bytes/s.
pub fn limit_share(
    tokens_per_s: f64,
    weights: f64,
    kv_per_token_layer: f64,
    depth: f64,
    probe: f64,
) -> f64 {
    tokens_per_s * (weights + SMOLLM2_LAYERS * depth * kv_per_token_layer) / probe
}

/// The share of the physical limit a kv decode line reaches against the probe read in its
/// own rounds: the line's `key` (`tokens_per_probe_gb`: the median over rounds of tokens/s
/// per GB/s of the probe read just before that round's steps; `cpu_tokens_per_probe_gb`:
/// the same per CPU second of each, which leaves out time other processes took the cores)
/// times the bytes a step reads. This VM's bandwidth moves by half from second to second,
/// so this is the yardstick; `None` for lines of a bench that predates the per-round probe.
pub(crate) fn round_share(
    decode: &Rec,
    key: &str,
    weights: f64,
    kv_per_token_layer: f64,
    depth: f64,
) -> Option<f64> {
    let per_gb = decode.num(key)?;
    Some(per_gb * (weights + SMOLLM2_LAYERS * depth * kv_per_token_layer) / 1e9)
}

/// The highest memory-probe reading of the run (the attention section's and every decode
/// round's; not the store section's, which reads with other sizes): the strictest limit.
fn max_probe(r: &Results) -> f64 {
    let sections = r
        .all(&[("section", "probe")])
        .filter(|p| p.get("when") != Some("store"))
        .filter_map(|p| p.num("bytes_per_s"));
    let rounds = r
        .all(&[("section", "decode")])
        .filter_map(|d| d.num("probe_max_bytes_per_s"));
    sections.chain(rounds).fold(0.0, f64::max)
}

/// A share as a whole percentage, or `-`.
fn pct(share: Option<f64>) -> String {
    share.map_or_else(|| "-".into(), |s| format!("{:.0}%", 100.0 * s))
}

/// llama.cpp's best rate over flash attention on/off for one test: (tokens/s, fa).
fn best_llama(
    r: &Results,
    cache: &str,
    prompt: &str,
    gen: &str,
    depth: &str,
) -> Option<(f64, String)> {
    let want = [
        ("cache", cache),
        ("prompt", prompt),
        ("gen", gen),
        ("depth", depth),
    ];
    r.all(&[("section", "llama-bench")])
        .filter(|x| want.iter().all(|(k, v)| x.get(k) == Some(*v)))
        .filter_map(|x| Some((x.num("tokens_per_s")?, x.get("fa")?.to_string())))
        .max_by(|a, b| a.0.total_cmp(&b.0))
}

/// The report's llama.cpp section: llama-bench beside kv's end-to-end rows (same GGUF,
/// same threads), kv / llama.cpp, and both as a share of the physical limit.
pub fn report(r: &Results, w: &mut String, quick: bool) {
    let _ = writeln!(w, "## llama.cpp, measured in this run\n");
    let probe = max_probe(r);
    let weights = r
        .one(&[("section", "model")], "weight_bytes")
        .or_else(|| r.find(&[("section", "llama-bench")])?.num("model_bytes"));
    let Some(meta) = r.find(&[("section", "llama-cpp")]) else {
        let _ = writeln!(
            w,
            "Not measured in this run: no llama.cpp build (`cargo xtask llama-cpp` builds \
             one into ~/.cache/kv/llama-cpp; `cargo xtask bench --llama-cpp [DIR]`).\n"
        );
        limit_table(r, w, weights, probe);
        return;
    };
    let tests: Vec<&Rec> = r.all(&[("section", "llama-bench")]).collect();
    let (Some(prompt), Some(gen)) = (
        tests
            .iter()
            .filter_map(|x| x.get("prompt"))
            .find(|p| *p != "0"),
        tests
            .iter()
            .filter_map(|x| x.get("gen"))
            .find(|g| *g != "0"),
    ) else {
        let _ = writeln!(w, "llama-bench printed no results.\n");
        return;
    };
    let mut llama_depths: Vec<usize> = tests
        .iter()
        .filter_map(|x| x.num("depth").map(|d| d as usize))
        .collect();
    llama_depths.sort_unstable();
    llama_depths.dedup();
    let mut kv_depths: Vec<usize> = r
        .all(&[("section", "decode"), ("weights", "blocks")])
        .filter_map(|d| d.num("depth").map(|x| x as usize))
        .collect();
    kv_depths.sort_unstable();
    kv_depths.dedup();
    // llama-bench's depths are kv's, except the deepest: kv ends its steps at 4096.
    let kv_depth = |ld: usize| {
        if kv_depths.contains(&ld) {
            Some(ld)
        } else if Some(&ld) == llama_depths.last() {
            kv_depths.last().copied().filter(|&d| d > 0)
        } else {
            None
        }
    };
    let _ = writeln!(
        w,
        "llama.cpp {} (built by `cargo xtask llama-cpp` from the llama-cpp-python 0.3.36 \
         sdist, CPU, `GGML_NATIVE`), `llama-bench -p {prompt} -n {gen} -d {}` on the same \
         GGUF with the same threads, in this run. Its cache types beside kv's nearest layouts \
         (q8_0: 32 int8 + one f16 scale per 32 values, as kv's int8-g32; q4_0 as int4-g32); \
         f16 is the better of flash attention off and on (the `fa` column), q8_0/q4_0 need \
         it on. kv: the file's blocks as weights (`blocks`). kv's deepest depth ends at 4096 \
         where llama.cpp's starts there. Ratio: kv / llama.cpp. `% limit`: decode tokens/s \
         times the bytes a step must read (weights{} plus 30 layers' K/V at that depth) over \
         memory-probe bandwidth: the share of the physical limit reached. kv's `rounds` \
         column divides each decode round by the probe read just before it (same threads, \
         same buffer far above the L3) and takes the median over rounds: this VM's bandwidth \
         moves by half between seconds; `rounds, CPU` does the same per CPU second of each \
         (the time they ran: on a loaded machine other processes take the cores for \
         different shares of each; rayon's spinning counts against kv). The `max` columns divide by the run's highest probe \
         reading ({:.2} GB/s) instead: the strictest figure, and the only one for llama.cpp, \
         whose runs have no probe beside them. Single numbers move 10-20% on a shared \
         machine; the ratios come from one run.\n",
        meta.get("commit").unwrap_or("?"),
        llama_depths
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(","),
        weights.map_or(String::new(), |b| format!(
            ": {:.1} MiB",
            b / f64::from(1u32 << 20)
        )),
        probe / 1e9,
    );
    let _ = writeln!(
        w,
        "| llama.cpp cache | test | llama.cpp tokens/s (fa) | kv layout | kv tokens/s | kv / llama.cpp | % limit llama.cpp (max) | % limit kv (rounds) | % limit kv (rounds, CPU) | % limit kv (max) |\n|---|---|---:|---|---:|---:|---:|---:|---:|---:|"
    );
    let f16_kv = kv_bytes_per_token(r, "f16");
    for (cache, layout) in [("f16", "f16"), ("q8_0", "int8-g32"), ("q4_0", "int4-g32")] {
        let key = [("layout", layout), ("weights", "blocks")];
        for &ld in &llama_depths {
            let ds = ld.to_string();
            let Some(kd) = kv_depth(ld) else { continue };
            let kds = kd.to_string();
            // Prefill at depth 0 and the deepest only (the rows kv measures).
            let prefill_kv = if ld == 0 {
                r.one(&[("section", "prefill"), key[0], key[1]], "tokens_per_s")
            } else if Some(&ld) == llama_depths.last() {
                r.one(
                    &[("section", "prefill-depth"), key[0], key[1]],
                    "tokens_per_s",
                )
            } else {
                None
            };
            if let Some((l, fa)) = best_llama(r, cache, prompt, "0", &ds) {
                if prefill_kv.is_some() || ld == 0 {
                    let _ = writeln!(
                        w,
                        "| {cache} | pp{prompt} @ d{ld} | {l:.1} ({fa}) | {layout} | {} | {} | | | | |",
                        fmt1(prefill_kv),
                        ratio(prefill_kv, Some(l)),
                    );
                }
            }
            let Some((l, fa)) = best_llama(r, cache, "0", gen, &ds) else {
                continue;
            };
            let kv_line = r.find(&[("section", "decode"), key[0], key[1], ("depth", &kds)]);
            let kv = kv_line.and_then(|d| d.num("tokens_per_s"));
            let kv_per_token = kv_bytes_per_token(r, layout);
            let kv_rounds = |key: &str| match (kv_line, weights, kv_per_token) {
                (Some(d), Some(wb), Some(p)) => round_share(d, key, wb, p, kd as f64),
                _ => None,
            };
            let share = |tps: Option<f64>, per_token: Option<f64>, depth: usize| match (
                tps, weights, per_token,
            ) {
                (Some(t), Some(wb), Some(p)) if probe > 0.0 => {
                    format!("{:.0}%", 100.0 * limit_share(t, wb, p, depth as f64, probe))
                }
                _ => "-".into(),
            };
            let llama_per_token = f16_kv.zip(llama_cache_ratio(cache)).map(|(b, q)| b * q);
            let _ = writeln!(
                w,
                "| {cache} | tg{gen} @ d{ld} | {l:.1} ({fa}) | {layout} (d{kd}) | {} | {} | {} | {} | {} | {} |",
                fmt1(kv),
                ratio(kv, Some(l)),
                share(Some(l), llama_per_token, ld),
                pct(kv_rounds("tokens_per_probe_gb")),
                pct(kv_rounds("cpu_tokens_per_probe_gb")),
                share(kv, kv_per_token, kd),
            );
        }
    }
    if quick {
        let _ = writeln!(
            w,
            "\n(Quick mode: tiny prompts and depths on both sides; the numbers mean little.)"
        );
    }
    let _ = writeln!(w);
}

/// kv's decode as a share of the physical limit when llama.cpp was not measured.
fn limit_table(r: &Results, w: &mut String, weights: Option<f64>, probe: f64) {
    let Some(wb) = weights.filter(|_| probe > 0.0) else {
        return;
    };
    let _ = writeln!(
        w,
        "kv's decode as a share of the physical limit: tokens/s times the bytes a step must \
         read (the GGUF's {:.1} MiB of tensors plus 30 layers' K/V at that depth) over the \
         memory probe: `rounds`, each decode round over the probe read just before it (median \
         over rounds; this VM's bandwidth moves by half between seconds); `rounds, CPU`, the \
         same per CPU second of each (what other processes on a loaded machine take is left \
         out); `max`, over the run's highest probe reading ({:.2} GB/s), the strictest \
         figure.\n\n| layout | depth | decode tokens/s | % limit (rounds) | % limit (rounds, CPU) | % limit (max) |\n|---|---:|---:|---:|---:|---:|",
        wb / f64::from(1u32 << 20),
        probe / 1e9
    );
    for layout in ["f16", "int8-g32", "int4-g32"] {
        let per_token = kv_bytes_per_token(r, layout);
        for d in r.all(&[
            ("section", "decode"),
            ("layout", layout),
            ("weights", "blocks"),
        ]) {
            let (Some(depth), Some(tps), Some(p)) =
                (d.num("depth"), d.num("tokens_per_s"), per_token)
            else {
                continue;
            };
            let _ = writeln!(
                w,
                "| {layout} | {depth} | {tps:.1} | {} | {} | {:.0}% |",
                pct(round_share(d, "tokens_per_probe_gb", wb, p, depth)),
                pct(round_share(d, "cpu_tokens_per_probe_gb", wb, p, depth)),
                100.0 * limit_share(tps, wb, p, depth, probe)
            );
        }
    }
    let _ = writeln!(w);
}

fn fmt1(x: Option<f64>) -> String {
    x.map_or_else(|| "-".into(), |v| format!("{v:.1}"))
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    }
}

/// llama-batched-bench's decode rates by batch size, `(sequences, tokens/s)`, for the
/// batch table and plot.
pub fn batch_points(r: &Results) -> Vec<(f64, f64, f64)> {
    r.all(&[("section", "llama-batch")])
        .filter_map(|x| {
            Some((
                x.num("seqs")?,
                x.num("decode_tokens_per_s")?,
                x.num("prefill_tokens_per_s")?,
            ))
        })
        .collect()
}

/// What `cargo xtask ppl-peer` was asked for.
pub struct PplOptions {
    /// `(model, context sizes)`; empty: SmolLM2 at 512 and Gemma 3 270M at 512 and 2048.
    pub runs: Vec<(PathBuf, Vec<usize>)>,
    pub text: Option<PathBuf>,
    pub threads: usize,
    pub llama_cpp: Option<PathBuf>,
    /// Score only the first N chunks on both sides (`--chunks`).
    pub chunks: Option<usize>,
}

impl PplOptions {
    /// Parses the arguments after `ppl-peer`.
    pub fn parse(args: &[String]) -> Result<Self, String> {
        let mut o = Self {
            runs: Vec::new(),
            text: None,
            threads: 2,
            llama_cpp: None,
            chunks: None,
        };
        let (mut model, mut ctx) = (None, Vec::new());
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = || it.next().ok_or_else(|| format!("{a} needs a value"));
            match a.as_str() {
                "--model" => model = Some(PathBuf::from(value()?)),
                "--text" => o.text = Some(PathBuf::from(value()?)),
                "--llama-cpp" => o.llama_cpp = Some(PathBuf::from(value()?)),
                "--chunks" => {
                    let v = value()?;
                    o.chunks =
                        Some(v.parse::<usize>().ok().filter(|&n| n > 0).ok_or_else(|| {
                            format!("--chunks {v:?}: expected a positive number")
                        })?);
                }
                "--ctx" => {
                    for c in value()?.split(',') {
                        ctx.push(c.parse::<usize>().ok().filter(|&c| c >= 4).ok_or_else(|| {
                            format!("--ctx {c:?}: expected a number of tokens >= 4")
                        })?);
                    }
                }
                "--threads" => {
                    let v = value()?;
                    o.threads =
                        v.parse::<usize>().ok().filter(|&n| n > 0).ok_or_else(|| {
                            format!("--threads {v:?}: expected a positive number")
                        })?;
                }
                other => return Err(format!("ppl-peer: unknown argument {other:?}")),
            }
        }
        match model {
            Some(m) => o
                .runs
                .push((m, if ctx.is_empty() { vec![512] } else { ctx })),
            None if !ctx.is_empty() => return Err("--ctx goes with --model".into()),
            None => {}
        }
        Ok(o)
    }
}

/// `cargo xtask ppl-peer`: `kv ppl --dtype f16 --bos-first` and llama-perplexity on the
/// same GGUF, text and context, both scoring the second half of each chunk of the same
/// tokens (BOS first when the vocabulary adds it); prints both and their difference and
/// writes `target/kv-bench/ppl-peer.md`.
pub fn ppl_peer(o: &PplOptions) -> Result<(), String> {
    let bin = match &o.llama_cpp {
        Some(dir) => check_dir(dir)?,
        None => ensure_build()?,
    };
    let text = match &o.text {
        Some(t) => t.clone(),
        None => crate::root()
            .join("..")
            .join("shared")
            .join("corpus")
            .join("gpl-3.txt"),
    };
    if !text.is_file() {
        return Err(format!(
            "{}: no such text file (--text FILE)",
            text.display()
        ));
    }
    let runs = if o.runs.is_empty() {
        vec![
            (crate::fetch::ensure_model()?, vec![512]),
            (crate::gemma::ensure_gemma()?, vec![512, 2048]),
        ]
    } else {
        o.runs.clone()
    };
    let mut build = crate::cargo();
    build.args(["build", "--release", "-p", "kv-model", "--bin", "kv"]);
    crate::run("build kv (release)", build)?;
    let kv = crate::root().join("target").join("release").join("kv");
    let threads = o.threads.to_string();
    let mut md = format!(
        "# Perplexity: kv against llama.cpp {COMMIT}\n\nText: `{}`; {threads} threads. kv: `kv \
         ppl --dtype f16 --bos-first` (f16 cache, the file's weight blocks); llama.cpp: \
         `llama-perplexity -c CTX -b CTX` (f16 cache). Both cut the text's tokens, BOS first \
         when the vocabulary adds it, into chunks of CTX tokens and score the second half of \
         each.\n\n| model | ctx | chunks kv / llama.cpp | kv tokens | kv ppl | llama.cpp ppl (+/-) | kv / llama.cpp - 1 |\n|---|---:|---:|---:|---:|---:|---:|\n",
        text.file_name().map_or_else(|| text.display().to_string(), |n| n.to_string_lossy().into_owned())
    );
    for (model, ctxs) in &runs {
        let name = model.file_name().map_or_else(
            || model.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        for ctx in ctxs {
            let PplPair {
                tokens,
                chunks,
                kv_ppl,
                l_ppl,
                l_err,
                l_chunks,
            } = ppl_pair(&kv, &bin, model, &text, *ctx, o.threads, o.chunks, &[])?;
            let line = format!(
                "| {name} | {ctx} | {chunks} / {} | {tokens} | {kv_ppl:.4} | {l_ppl:.4} (+/- {l_err:.4}) | {:+.2}% |\n",
                l_chunks.map_or_else(|| "?".into(), |c| c.to_string()),
                100.0 * (kv_ppl / l_ppl - 1.0)
            );
            print!("{line}");
            md.push_str(&line);
        }
    }
    let dir = crate::root().join("target").join("kv-bench");
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let path = dir.join("ppl-peer.md");
    std::fs::write(&path, &md).map_err(|e| format!("writing {}: {e}", path.display()))?;
    println!("\n{md}\nppl-peer: {}", path.display());
    Ok(())
}

/// Both engines' perplexity of one model, text and context (see [`ppl_pair`]).
pub(crate) struct PplPair {
    /// kv's token count, chunk count and perplexity.
    pub tokens: usize,
    pub chunks: usize,
    pub kv_ppl: f64,
    /// llama-perplexity's estimate, its +/- and the chunk count it logged.
    pub l_ppl: f64,
    pub l_err: f64,
    pub l_chunks: Option<usize>,
}

/// `kv ppl --dtype f16 --bos-first` (the binary `kv`) and llama-perplexity (in `bin`) on
/// the same model, text and context, the first `chunks` chunks when given, `kv_args` added
/// to kv's; warns when the chunk counts differ (the token streams then differ).
#[allow(clippy::too_many_arguments)]
pub(crate) fn ppl_pair(
    kv: &Path,
    bin: &Path,
    model: &Path,
    text: &Path,
    ctx: usize,
    threads: usize,
    first_chunks: Option<usize>,
    kv_args: &[&str],
) -> Result<PplPair, String> {
    let name = model.file_name().map_or_else(
        || model.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let (c, threads) = (ctx.to_string(), threads.to_string());
    let mut cmd = Command::new(kv);
    cmd.args([
        "--threads",
        &threads,
        "ppl",
        "--dtype",
        "f16",
        "--bos-first",
    ])
    .args(kv_args)
    .args(["--ctx", &c, "--model"])
    .arg(model)
    .arg("--text")
    .arg(text);
    if let Some(n) = first_chunks {
        cmd.args(["--chunks", &n.to_string()]);
    }
    let out = capture(&format!("kv ppl, {name}, ctx {ctx}"), cmd)?;
    print!("{out}");
    let (tokens, chunks, kv_ppl) = parse_kv_ppl(&out)?;
    // Its last log lines are sometimes lost at exit (the logger's thread races it): run it
    // again, up to three times, until the final estimate is there.
    let mut attempt = 0;
    let (log, l_ppl, l_err) = loop {
        attempt += 1;
        let mut cmd = Command::new(bin.join("llama-perplexity"));
        cmd.arg("-m")
            .arg(model)
            .arg("-f")
            .arg(text)
            .args(["-c", &c, "-b", &c, "-t", &threads, "-tb", &threads]);
        if let Some(n) = first_chunks {
            cmd.args(["--chunks", &n.to_string()]);
        }
        let out = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| format!("llama-perplexity: could not start: {e}"))?;
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            return Err(format!("llama-perplexity failed ({}):\n{log}", out.status));
        }
        match parse_llama_perplexity(&log) {
            Ok((p, e)) => break (log, p, e),
            Err(e) if attempt >= 3 => return Err(e),
            Err(_) => println!("llama-perplexity: no final estimate in its log; again"),
        }
    };
    let l_chunks = llama_chunks(&log);
    if l_chunks != Some(chunks) {
        println!(
            "ppl-peer: kv scored {chunks} chunks, llama-perplexity {}: the token \
             streams differ (tokenization?)",
            l_chunks.map_or_else(|| "an unknown number of".into(), |c| c.to_string())
        );
    }
    Ok(PplPair {
        tokens,
        chunks,
        kv_ppl,
        l_ppl,
        l_err,
        l_chunks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama-bench's CSV header (its `get_fields`) and two lines in its quoting.
    const CSV: &str = "build_commit,build_number,cpu_info,gpu_info,backends,model_filename,model_type,model_size,model_n_params,n_batch,n_ubatch,n_threads,cpu_mask,cpu_strict,poll,type_k,type_v,n_gpu_layers,n_cpu_moe,split_mode,main_gpu,no_kv_offload,flash_attn,devices,tensor_split,tensor_buft_overrides,load_mode,lazy_mode,embeddings,no_op_offload,no_host,repack,fit_target,fit_min_ctx,n_prompt,n_gen,n_depth,test_time,avg_ns,stddev_ns,avg_ts,stddev_ts
\"0c1e570\",\"1\",\"AMD EPYC\",\"\",\"CPU\",\"/m/SmolLM2.gguf\",\"llama ?B Q4_1, \"\"x\"\"\",\"96504576\",\"134515008\",\"2048\",\"512\",\"2\",\"0x0\",\"0\",\"50\",\"f16\",\"f16\",\"99\",\"0\",\"layer\",\"0\",\"0\",\"0\",\"auto\",\"0.00\",\"none\",\"0\",\"0\",\"0\",\"0\",\"0\",\"1\",\"1024\",\"4096\",\"512\",\"0\",\"0\",\"2026-12-07T14:00:00Z\",\"1753424000\",\"1000\",\"292.100000\",\"3.500000\"
\"0c1e570\",\"1\",\"AMD EPYC\",\"\",\"CPU\",\"/m/SmolLM2.gguf\",\"llama ?B Q4_1, \"\"x\"\"\",\"96504576\",\"134515008\",\"2048\",\"512\",\"2\",\"0x0\",\"0\",\"50\",\"q8_0\",\"q8_0\",\"99\",\"0\",\"layer\",\"0\",\"0\",\"1\",\"auto\",\"0.00\",\"none\",\"0\",\"0\",\"0\",\"0\",\"0\",\"1\",\"1024\",\"4096\",\"0\",\"64\",\"4096\",\"2026-12-07T14:00:00Z\",\"2300000000\",\"1000\",\"27.700000\",\"0.400000\"
";

    #[test]
    fn llama_bench_csv_is_read_by_column_name() {
        let rows = parse_llama_bench_csv(CSV).expect("parses");
        assert_eq!(rows.len(), 2);
        assert_eq!(
            rows[0],
            BenchRow {
                cache: "f16".into(),
                flash_attn: "0".into(),
                prompt: 512,
                gen: 0,
                depth: 0,
                tokens_per_s: 292.1,
                stddev: 3.5,
                model_bytes: 96_504_576.0,
            }
        );
        assert_eq!(
            (rows[1].cache.as_str(), rows[1].gen, rows[1].depth),
            ("q8_0", 64, 4096)
        );
        assert_eq!(rows[1].flash_attn, "1");
        assert!(rows[1].bench_line().contains("tokens_per_s=27.700"));
    }

    #[test]
    fn bad_llama_bench_csv_is_an_error() {
        assert!(parse_llama_bench_csv("")
            .expect("empty is no rows")
            .is_empty());
        let header = CSV.lines().next().unwrap_or_default();
        assert!(parse_llama_bench_csv(&format!("{header}\n\"1\",\"2\"\n")).is_err());
        let no_col = header.replace("avg_ts", "avg");
        assert!(parse_llama_bench_csv(&no_col).is_err());
        assert!(csv_fields("\"open").is_err());
        assert_eq!(
            csv_fields("\"a\"\"b\",c,\"\"").expect("splits"),
            vec!["a\"b", "c", ""]
        );
    }

    #[test]
    fn batched_bench_jsonl_gives_decode_apart_from_prefill() {
        let out = "main: n_kv_max = 8192\n\
            {\"n_kv_max\": 8192, \"n_batch\": 2048, \"n_ubatch\": 512, \"flash_attn\": -1, \"is_pp_shared\": 0, \"n_gpu_layers\": -1, \"n_threads\": 2, \"n_threads_batch\": 2, \"pp\": 64, \"tg\": 64, \"pl\": 16, \"n_kv\": 2048, \"t_pp\": 3.200000, \"speed_pp\": 320.000000, \"t_tg\": 4.000000, \"speed_tg\": 256.000000, \"t\": 7.200000, \"speed\": 284.444444}\n";
        let rows = parse_batched_jsonl(out).expect("parses");
        assert_eq!(
            rows,
            vec![BatchRow {
                seqs: 16,
                prompt: 64,
                new: 64,
                prefill_tokens_per_s: 320.0,
                decode_tokens_per_s: 256.0,
            }]
        );
        assert!(parse_batched_jsonl("{\"pl\": 1}").is_err());
        assert!(parse_batched_jsonl(
            "{\"pl\": 1.5, \"pp\": 1, \"tg\": 1, \"speed_pp\": 1, \"speed_tg\": 1}"
        )
        .is_err());
    }

    #[test]
    fn perplexity_outputs_are_read() {
        let log = "[1]17.2,[2]18.0,\nFinal estimate: PPL = 18.3512 +/- 0.51234\n";
        assert_eq!(parse_llama_perplexity(log), Ok((18.3512, 0.51234)));
        assert!(parse_llama_perplexity("no estimate").is_err());
        let log = "perplexity: calculating perplexity over 14 chunks, n_ctx=512, batch_size=512, n_seq=1\n";
        assert_eq!(llama_chunks(log), Some(14));
        assert_eq!(llama_chunks("nothing"), None);
        let kv = "m.gguf on t.txt, Blocks weights, BOS not added\n\
            8102 tokens, 15 chunks of 512 (each scored on its second half: 255 tokens), cache blocks of 32, 64 tokens per forward pass\n\
            layout     bytes/token     window  perplexity    vs f16    mean KL    top-1  verdict\n\
            f16              23040          -     18.4021         -          -        -  reference\n";
        assert_eq!(parse_kv_ppl(kv), Ok((8102, 15, 18.4021)));
        assert!(parse_kv_ppl("8102 tokens, 15 chunks of 512\n").is_err());
    }

    #[test]
    fn sdist_members_outside_llama_cpp_are_skipped() {
        let src = Path::new("/s");
        let m = |s: &str| format!("{SRC_PREFIX}{s}");
        assert_eq!(
            source_destination(&m("ggml/src/ggml.c"), src),
            Some(src.join("ggml/src/ggml.c"))
        );
        assert_eq!(source_destination(&m("../x"), src), None);
        assert_eq!(source_destination(&m(""), src), None);
        assert_eq!(
            source_destination("llama_cpp_python-0.3.36/setup.py", src),
            None
        );
    }

    #[test]
    fn the_report_sets_llama_cpp_beside_kv_with_ratios_and_limit_shares() {
        let r = Results::of(
            "BENCH section=probe when=before buffer_bytes=1 threads=2 bytes_per_s=10000000000\n\
             BENCH section=attn shape=smollm2-135m layout=f16 tokens=1000 steps=1 rounds=1 secs=1 kv_bytes=768000 bytes_per_s=1\n\
             BENCH section=prefill layout=f16 weights=blocks tokens=512 secs=1 tokens_per_s=500.0\n\
             BENCH section=prefill-depth layout=f16 weights=blocks depth=4064 tokens=512 secs=1 tokens_per_s=250.0\n\
             BENCH section=decode layout=f16 weights=blocks depth=0 steps=1 rounds=1 secs=1 tokens_per_s=80.0 probe_bytes_per_s=8000000000 probe_max_bytes_per_s=20000000000 tokens_per_probe_gb=10.0 cpu_tokens_per_probe_gb=5.0\n\
             BENCH section=decode layout=f16 weights=blocks depth=4064 steps=1 rounds=1 secs=1 tokens_per_s=45.0\n\
             BENCH section=llama-cpp commit=0c1e57098bba bin=/b\n\
             BENCH section=llama-bench cache=f16 fa=0 prompt=512 gen=0 depth=0 tokens_per_s=300.000 stddev=1 model_bytes=100000000\n\
             BENCH section=llama-bench cache=f16 fa=1 prompt=512 gen=0 depth=0 tokens_per_s=250.000 stddev=1 model_bytes=100000000\n\
             BENCH section=llama-bench cache=f16 fa=0 prompt=0 gen=64 depth=0 tokens_per_s=100.000 stddev=1 model_bytes=100000000\n\
             BENCH section=llama-bench cache=f16 fa=0 prompt=0 gen=64 depth=4096 tokens_per_s=30.000 stddev=1 model_bytes=100000000\n\
             BENCH section=llama-bench cache=f16 fa=1 prompt=0 gen=64 depth=4096 tokens_per_s=20.000 stddev=1 model_bytes=100000000\n",
        );
        let mut w = String::new();
        report(&r, &mut w, false);
        // Prefill: best of fa (300 with fa 0) against kv's 500.
        assert!(
            w.contains("| f16 | pp512 @ d0 | 300.0 (0) | f16 | 500.0 | 1.67x | | | | |"),
            "{w}"
        );
        // The run's highest probe is a decode round's (2e10, above the attention section's
        // 1e10). Decode at depth 0: 80 / 100; against that probe llama.cpp 100 * 1e8 / 2e10 =
        // 50%, kv 80 * 1e8 / 2e10 = 40%; against its own rounds kv 10 tokens/s per GB/s
        // times 1e8 bytes = 100%, per CPU second 5 * 1e8 / 1e9 = 50%.
        assert!(
            w.contains(
                "| f16 | tg64 @ d0 | 100.0 (0) | f16 (d0) | 80.0 | 0.80x | 50% | 100% | 50% | 40% |"
            ),
            "{w}"
        );
        // The deepest point: kv's 4064 against llama.cpp's 4096; 45 / 30 = 1.5x. llama.cpp:
        // 30 * (1e8 + 30 * 4096 * 768) / 2e10 = 29.2%; kv (no per-round probe on its line):
        // 45 * (1e8 + 30 * 4064 * 768) / 2e10 = 43.6%.
        assert!(
            w.contains(
                "| f16 | tg64 @ d4096 | 30.0 (0) | f16 (d4064) | 45.0 | 1.50x | 29% | - | - | 44% |"
            ),
            "{w}"
        );
        // llama.cpp measured no prefill at depth: no row.
        assert!(!w.contains("pp512 @ d4096"), "{w}");
        let mut none = String::new();
        report(&Results::of(""), &mut none, false);
        assert!(none.contains("Not measured in this run"));
        // Without llama.cpp: kv's own table, the same two shares.
        let kv_only = Results::of(
            "BENCH section=probe when=before buffer_bytes=1 threads=2 bytes_per_s=10000000000\n\
             BENCH section=model weight_bytes=100000000\n\
             BENCH section=attn shape=smollm2-135m layout=f16 tokens=1000 steps=1 rounds=1 secs=1 kv_bytes=768000 bytes_per_s=1\n\
             BENCH section=decode layout=f16 weights=blocks depth=0 steps=1 rounds=1 secs=1 tokens_per_s=80.0 probe_bytes_per_s=4000000000 probe_max_bytes_per_s=5000000000 tokens_per_probe_gb=20.0\n",
        );
        let mut w = String::new();
        report(&kv_only, &mut w, false);
        // Rounds: 20 * 1e8 / 1e9 = 200% (a probe reading below what decode reached is
        // shown as it is); max: the section's 1e10 is the highest, 80 * 1e8 / 1e10 = 80%.
        // No CPU-time field on this line: `-`.
        assert!(w.contains("| f16 | 0 | 80.0 | 200% | - | 80% |"), "{w}");
    }

    #[test]
    fn the_llama_cpp_options_parse() {
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let o =
            crate::bench::Options::parse(&args(&["--llama-cpp", "/b", "--quick"])).expect("parses");
        assert_eq!(o.llama_cpp, Some(Some(PathBuf::from("/b"))));
        let o = crate::bench::Options::parse(&args(&["--llama-cpp", "--quick"])).expect("parses");
        assert_eq!(o.llama_cpp, Some(None));
        assert!(o.quick);
        let o = crate::bench::Options::parse(&args(&["--no-llama-cpp"])).expect("parses");
        assert!(o.no_llama_cpp && o.llama_cpp.is_none());

        let p =
            PplOptions::parse(&args(&["--model", "m.gguf", "--ctx", "512,2048"])).expect("parses");
        assert_eq!(p.runs, vec![(PathBuf::from("m.gguf"), vec![512, 2048])]);
        assert!(PplOptions::parse(&args(&["--ctx", "512"])).is_err());
        assert!(PplOptions::parse(&args(&["--model", "m", "--ctx", "2"])).is_err());
        assert!(PplOptions::parse(&args(&["--threads", "0"])).is_err());
        assert!(PplOptions::parse(&args(&["--text"])).is_err());
        assert!(PplOptions::parse(&args(&["--chunks", "0"])).is_err());
        assert_eq!(
            PplOptions::parse(&args(&["--chunks", "3"]))
                .expect("parses")
                .chunks,
            Some(3)
        );
        assert!(PplOptions::parse(&[]).expect("defaults").runs.is_empty());
    }

    #[test]
    fn gguf_tensor_bytes_skips_the_header_and_honours_the_alignment() {
        let mut g = Vec::new();
        g.extend_from_slice(b"GGUF");
        g.extend_from_slice(&3u32.to_le_bytes());
        g.extend_from_slice(&1u64.to_le_bytes()); // tensors
        g.extend_from_slice(&2u64.to_le_bytes()); // key/values
        let key = |g: &mut Vec<u8>, k: &str| {
            g.extend_from_slice(&(k.len() as u64).to_le_bytes());
            g.extend_from_slice(k.as_bytes());
        };
        key(&mut g, "general.alignment");
        g.extend_from_slice(&4u32.to_le_bytes());
        g.extend_from_slice(&64u32.to_le_bytes());
        key(&mut g, "tokenizer.ggml.tokens");
        g.extend_from_slice(&9u32.to_le_bytes());
        g.extend_from_slice(&8u32.to_le_bytes());
        g.extend_from_slice(&2u64.to_le_bytes());
        key(&mut g, "a");
        key(&mut g, "bcd");
        key(&mut g, "token_embd.weight");
        g.extend_from_slice(&2u32.to_le_bytes());
        g.extend_from_slice(&4u64.to_le_bytes());
        g.extend_from_slice(&25u64.to_le_bytes());
        g.extend_from_slice(&0u32.to_le_bytes());
        g.extend_from_slice(&0u64.to_le_bytes());
        let header = g.len();
        g.resize(header.div_ceil(64) * 64, 0);
        g.extend_from_slice(&[7u8; 400]);
        let path = std::env::temp_dir().join(format!("kv-xtask-gguf-{}.gguf", std::process::id()));
        std::fs::write(&path, &g).expect("writes");
        let got = gguf_tensor_bytes(&path);
        std::fs::write(&path, &g[..header - 3]).expect("writes");
        let truncated = gguf_tensor_bytes(&path);
        std::fs::write(&path, b"GGML").expect("writes");
        let not_gguf = gguf_tensor_bytes(&path);
        let _ = std::fs::remove_file(&path);
        assert_eq!(got, Ok(400));
        assert!(truncated.is_err());
        assert!(not_gguf.is_err());
    }
}
