//! `cargo xtask bench`: runs the measurement programs in release, reads their `BENCH` lines
//! and writes `target/kv-bench/report.md` with SVG plots.
//!
//! xtask links neither the model nor candle: the numbers come from
//! `kv-model/examples/bench.rs` (kv) and `xtask/candle-peer` (candle-transformers and
//! candle-nn, a crate outside the workspace so CI never compiles it), and llama.cpp's
//! llama-bench and llama-batched-bench when a build is present (see `llama_cpp`). Every
//! claim in the report is a ratio of two numbers measured in this run.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use plotters::prelude::*;

use crate::{cargo, fetch, root, run};

/// What `cargo xtask bench` was asked for.
pub struct Options {
    /// Tiny sizes: proves the harness in well under two minutes.
    pub quick: bool,
    /// Run the candle peer (default: in the full bench, not in `--quick`).
    pub peer: bool,
    /// Threads for kv's backend and candle's matmuls.
    pub threads: usize,
    /// Measure nothing: write the report again from the last run's `results.txt`.
    pub report_only: bool,
    /// Copy the report, its plots and raw lines into `docs/bench/`, the measurements the
    /// README quotes (so docs are regenerated from bench output, never hand-copied).
    pub publish: bool,
    /// llama.cpp as a peer: `None` measures the cached build if there is one,
    /// `Some(None)` (`--llama-cpp`) builds it first when absent, `Some(Some(dir))` uses
    /// the binaries in `dir`.
    pub llama_cpp: Option<Option<PathBuf>>,
    /// `--no-llama-cpp`: never measure llama.cpp.
    pub no_llama_cpp: bool,
}

impl Options {
    /// Parses the arguments after `bench`.
    pub fn parse(args: &[String]) -> Result<Self, String> {
        let quick = args.iter().any(|a| a == "--quick");
        let mut o = Self {
            quick,
            peer: !quick,
            threads: 2,
            report_only: false,
            publish: false,
            llama_cpp: None,
            no_llama_cpp: false,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--quick" => {}
                "--peer" => o.peer = true,
                "--no-peer" => o.peer = false,
                "--report-only" => o.report_only = true,
                "--publish" => o.publish = true,
                "--no-llama-cpp" => o.no_llama_cpp = true,
                "--llama-cpp" => {
                    let dir = it.clone().next().filter(|d| !d.starts_with("--"));
                    if dir.is_some() {
                        it.next();
                    }
                    o.llama_cpp = Some(dir.map(PathBuf::from));
                }
                "--threads" => {
                    let v = it.next().ok_or("--threads needs a number")?;
                    o.threads =
                        v.parse::<usize>().ok().filter(|&n| n > 0).ok_or_else(|| {
                            format!("--threads {v:?}: expected a positive number")
                        })?;
                }
                other => return Err(format!("bench: unknown argument {other:?}")),
            }
        }
        Ok(o)
    }
}

/// The layouts, in the order the bench program measures them.
const LAYOUTS: [&str; 9] = [
    "f32",
    "f16",
    "bf16",
    "int8-g32",
    "int4-g32",
    "int4h-g32",
    "kivi4",
    "kivi2",
    "kivi2-r128",
];

/// Colours of the layouts' lines (and of the peer, last).
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(0, 0, 0),
];

/// One `BENCH key=value ...` line.
pub(crate) struct Rec {
    fields: Vec<(String, String)>,
}

impl Rec {
    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn num(&self, key: &str) -> Option<f64> {
        self.get(key)?.parse().ok()
    }

    fn is(&self, pairs: &[(&str, &str)]) -> bool {
        pairs.iter().all(|(k, v)| self.get(k) == Some(v))
    }
}

fn parse(stdout: &str) -> Vec<Rec> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("BENCH "))
        .map(|l| Rec {
            fields: l
                .split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
        .collect()
}

pub(crate) struct Results {
    recs: Vec<Rec>,
}

impl Results {
    /// The `BENCH` lines of `stdout`.
    pub(crate) fn of(stdout: &str) -> Self {
        Self {
            recs: parse(stdout),
        }
    }

    pub(crate) fn all<'a>(
        &'a self,
        pairs: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Rec> {
        self.recs.iter().filter(move |r| r.is(pairs))
    }

    pub(crate) fn find(&self, pairs: &[(&str, &str)]) -> Option<&Rec> {
        self.recs.iter().find(|r| r.is(pairs))
    }

    pub(crate) fn one(&self, pairs: &[(&str, &str)], key: &str) -> Option<f64> {
        self.find(pairs)?.num(key)
    }
}

/// Runs a built program, streaming its stderr, and returns its stdout.
pub(crate) fn capture(step: &str, mut cmd: Command) -> Result<String, String> {
    println!("\n==> {step}");
    let started = Instant::now();
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("{step}: could not start: {e}"))?;
    if !out.status.success() {
        return Err(format!("{step} failed ({})", out.status));
    }
    println!("<== {step}: ok ({:.0} s)", started.elapsed().as_secs_f64());
    String::from_utf8(out.stdout).map_err(|e| format!("{step}: output is not UTF-8: {e}"))
}

/// `cargo xtask bench [--quick] [--peer | --no-peer] [--threads N]`.
pub fn bench(o: &Options) -> Result<(), String> {
    let started = Instant::now();
    let target = root().join("target");
    let out_dir = target.join("kv-bench");
    let raw = out_dir.join("results.txt");
    if o.report_only {
        let stdout =
            std::fs::read_to_string(&raw).map_err(|e| format!("reading {}: {e}", raw.display()))?;
        let recs = parse(&stdout);
        let run = recs.iter().find(|r| r.get("section") == Some("run"));
        let meta = Meta {
            quick: run.and_then(|r| r.get("quick")) == Some("true"),
            peer: recs.iter().any(|r| r.get("section") == Some("kvcache")),
            threads: run
                .and_then(|r| r.num("threads"))
                .map_or(o.threads, |t| t as usize),
            peer_build_s: recs
                .iter()
                .find(|r| r.get("section") == Some("peer-build"))
                .and_then(|r| r.num("secs")),
            elapsed_s: recs
                .iter()
                .find(|r| r.get("section") == Some("elapsed"))
                .and_then(|r| r.num("secs"))
                .unwrap_or(0.0),
        };
        let report = write_report(&Results { recs }, &meta, &out_dir)?;
        println!("bench: report rewritten in {}", report.display());
        if o.publish && meta.quick {
            return Err("--publish: the last run was --quick; publish a full run".into());
        }
        return if o.publish { publish(&out_dir) } else { Ok(()) };
    }
    let model = fetch::ensure_model()?;
    std::fs::create_dir_all(&out_dir)
        .map_err(|e| format!("creating {}: {e}", out_dir.display()))?;

    let mut build = cargo();
    build.args(["build", "--release", "-p", "kv-model", "--example", "bench"]);
    run("build the bench program (release)", build)?;

    let threads = o.threads.to_string();
    let mut cmd = Command::new(target.join("release").join("examples").join("bench"));
    cmd.arg("--model")
        .arg(&model)
        .args(["--threads", &threads])
        .env("RAYON_NUM_THREADS", &threads);
    if o.quick {
        cmd.arg("--quick");
    }
    // Gemma 3 270M (sliding-window layers): fetched for a full run; a quick run uses it
    // only when KV_GEMMA_PATH names it.
    let gemma = match std::env::var_os("KV_GEMMA_PATH") {
        Some(p) => Some(PathBuf::from(p)),
        None if !o.quick => Some(crate::gemma::ensure_gemma()?),
        None => None,
    };
    if let Some(g) = &gemma {
        cmd.arg("--gemma").arg(g);
    }
    let mut stdout = capture("measure kv (memory probe, attention, model)", cmd)?;

    let mut peer_build_s = None;
    if o.peer {
        let build_started = Instant::now();
        let mut build = cargo();
        build
            .args(["build", "--release", "--manifest-path"])
            .arg(root().join("xtask").join("candle-peer").join("Cargo.toml"))
            .env("CARGO_TARGET_DIR", &target);
        run(
            "build the candle peer (release, outside the workspace)",
            build,
        )?;
        peer_build_s = Some(build_started.elapsed().as_secs_f64());
        // The file's Q4_1 blocks (candle-transformers' default, as kv's) at every depth;
        // then f32 weights (`CANDLE_DEQUANTIZE_ALL=1`), short, plus the KvCache step.
        let q_args: &[&str] = if o.quick {
            &[
                "--skip-kvcache",
                "--prompt",
                "32",
                "--depths",
                "0,64,128",
                "--decode",
                "3",
            ]
        } else {
            &["--skip-kvcache"]
        };
        let f32_args: &[&str] = if o.quick {
            &[
                "--prompt",
                "8",
                "--depths",
                "0",
                "--decode",
                "2",
                "--attn-tokens",
                "256",
                "--attn-steps",
                "5",
            ]
        } else {
            &["--prompt", "64", "--depths", "0", "--decode", "8"]
        };
        for (label, dequantize, args) in [
            ("quantized weights", "0", q_args),
            ("f32 weights, KvCache step", "1", f32_args),
        ] {
            let mut cmd = Command::new(target.join("release").join("candle-peer"));
            cmd.arg("--model")
                .arg(&model)
                .args(["--threads", &threads])
                .args(args)
                .env("RAYON_NUM_THREADS", &threads)
                .env("CANDLE_DEQUANTIZE_ALL", dequantize);
            stdout.push_str(&capture(
                &format!("measure the peer (candle-transformers, candle-nn): {label}"),
                cmd,
            )?);
        }
    }

    // llama.cpp on the same file and threads, batched in kv's batch shape.
    let llama = match (&o.llama_cpp, o.no_llama_cpp) {
        (_, true) => None,
        (None, false) => crate::llama_cpp::installed(),
        (Some(None), false) => Some(crate::llama_cpp::ensure_build()?),
        (Some(Some(dir)), false) => Some(crate::llama_cpp::check_dir(dir)?),
    };
    match &llama {
        Some(bin) => {
            let shape = crate::llama_cpp::BatchShape::of(&Results::of(&stdout));
            stdout.push_str(&crate::llama_cpp::measure(
                bin,
                &model,
                o.threads,
                o.quick,
                shape.as_ref(),
            )?);
        }
        None => println!(
            "\n==> llama.cpp: not measured (no build in ~/.cache/kv/llama-cpp; \
             `cargo xtask llama-cpp` or `--llama-cpp [DIR]`)"
        ),
    }

    // What the report needs to be written again with --report-only.
    let _ = writeln!(
        stdout,
        "BENCH section=elapsed secs={:.1}",
        started.elapsed().as_secs_f64()
    );
    let _ = writeln!(stdout, "BENCH section=meta commit={}", git_commit());
    // The weights a decode step reads, for the share of the physical limit.
    if let Ok(bytes) = crate::llama_cpp::gguf_tensor_bytes(&model) {
        let _ = writeln!(stdout, "BENCH section=model weight_bytes={bytes}");
    }
    if let Some(s) = peer_build_s {
        let _ = writeln!(stdout, "BENCH section=peer-build secs={s:.1}");
    }
    std::fs::write(&raw, &stdout).map_err(|e| format!("writing {}: {e}", raw.display()))?;
    let results = Results {
        recs: parse(&stdout),
    };
    let meta = Meta {
        quick: o.quick,
        peer: o.peer,
        threads: o.threads,
        peer_build_s,
        elapsed_s: started.elapsed().as_secs_f64(),
    };
    let report = write_report(&results, &meta, &out_dir)?;
    println!(
        "\nbench: report in {} ({:.1} min)",
        report.display(),
        started.elapsed().as_secs_f64() / 60.0
    );
    if o.publish {
        if o.quick {
            return Err(
                "--publish: a --quick run compares unlike sizes; publish a full run".into(),
            );
        }
        publish(&out_dir)?;
    }
    Ok(())
}

struct Meta {
    quick: bool,
    peer: bool,
    threads: usize,
    peer_build_s: Option<f64>,
    elapsed_s: f64,
}

pub(crate) fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn git_commit() -> String {
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| {
            let dirty = Command::new("git")
                .args(["status", "--porcelain", "--untracked-files=no"])
                .current_dir(root())
                .output()
                .is_ok_and(|o| !o.stdout.is_empty());
            format!("{}{}", s.trim(), if dirty { "-dirty" } else { "" })
        })
        .unwrap_or_else(|| "unknown".into())
}

fn pct(x: f64) -> String {
    format!("{:.0}%", x * 100.0)
}

fn opt(x: Option<f64>, f: impl Fn(f64) -> String) -> String {
    x.map(f).unwrap_or_else(|| "-".into())
}

fn write_report(r: &Results, m: &Meta, dir: &Path) -> Result<PathBuf, String> {
    let mut md = String::new();
    let w = &mut md;
    let mode = if m.quick {
        "quick (tiny sizes: proves the harness, the numbers mean little)"
    } else {
        "full"
    };
    let _ = writeln!(w, "# kv benchmark report\n");
    let _ = writeln!(
        w,
        "Produced by `cargo xtask bench{}` at commit {} in {:.1} min: {mode}; {} threads for \
         kv's backend and candle's matmuls (`RAYON_NUM_THREADS`); {}; {} cores. Model: \
         SmolLM2-135M-Instruct Q4_1 (GGUF). Raw lines: `results.txt`.\n",
        if m.quick { " --quick" } else { "" },
        r.find(&[("section", "meta")])
            .and_then(|x| x.get("commit"))
            .map_or_else(git_commit, str::to_string),
        m.elapsed_s / 60.0,
        m.threads,
        cpu_model(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    let _ = writeln!(
        w,
        "Every comparison below is a ratio of two numbers measured in this run (llama.cpp's \
         included, when a build was present).\n"
    );

    // 1. Probe and attention.
    let probes: Vec<f64> = r
        .all(&[("section", "probe")])
        .filter_map(|p| p.num("bytes_per_s"))
        .collect();
    let limit = probes.iter().copied().fold(0.0, f64::max);
    let _ = writeln!(w, "## 1. Decode attention against the memory-read probe\n");
    let _ = writeln!(
        w,
        "The probe sums a large buffer with the same threads (the limit a decode step can \
         reach); it ran before and after the attention points: {} GB/s; the limit used is \
         the higher, {:.2} GB/s. One decode step of one layer reads every cached K/V byte \
         once; {} Cells: K/V bytes read per second, and \
         the percentage of the probe.\n",
        probes
            .iter()
            .map(|p| format!("{:.2}", p / 1e9))
            .collect::<Vec<_>>()
            .join(" and "),
        limit / 1e9,
        if m.quick {
            "in quick mode the bench holds only 4 MiB of K/V, so steps read from the CPU \
             caches and can exceed the probe."
        } else {
            "the bench cycles through enough identical layers (96 MiB or more) that each \
             step reads from memory, as a model's does."
        }
    );
    let mut tokens: Vec<usize> = r
        .all(&[("section", "attn")])
        .filter_map(|a| a.num("tokens").map(|t| t as usize))
        .collect();
    tokens.sort_unstable();
    tokens.dedup();
    let mut target_lines = Vec::new();
    for shape in ["smollm2-135m", "llama-2-7b"] {
        let (title, short) = match shape {
            "smollm2-135m" => (
                "SmolLM2-135M layer (9 query heads, 3 KV heads of 64)",
                "SmolLM2-135M layer",
            ),
            _ => ("Llama-2-7B layer (32 heads of 128)", "Llama-2-7B layer"),
        };
        let _ = writeln!(w, "### {title}\n");
        let mut header = "| layout |".to_string();
        let mut rule = "|---|".to_string();
        for t in &tokens {
            let _ = write!(header, " {t} tokens |");
            rule.push_str("---:|");
        }
        let _ = writeln!(w, "{header}\n{rule}");
        let mut series = Vec::new();
        for (i, layout) in LAYOUTS.iter().enumerate() {
            let mut row = format!("| {layout} |");
            let mut points = Vec::new();
            for &t in &tokens {
                let ts = t.to_string();
                let rec = r.find(&[
                    ("section", "attn"),
                    ("shape", shape),
                    ("layout", layout),
                    ("tokens", &ts),
                ]);
                match rec.and_then(|a| Some((a.num("bytes_per_s")?, a.num("secs")?))) {
                    Some((bps, secs)) => {
                        let _ = write!(
                            row,
                            " {:.2} GB/s ({}; {:.0} us) |",
                            bps / 1e9,
                            pct(bps / limit),
                            secs * 1e6
                        );
                        points.push(((t as f64).log2(), 100.0 * bps / limit));
                        if t >= 4096 {
                            let ok = bps >= 0.8 * limit;
                            target_lines.push((shape, *layout, t, bps / limit, ok));
                        }
                    }
                    None => row.push_str(" - |"),
                }
            }
            let _ = writeln!(w, "{row}");
            series.push(Series {
                name: (*layout).to_string(),
                points,
                color: COLORS[i],
                dashed: false,
            });
        }
        series.push(Series {
            name: "80% target".into(),
            points: tokens.iter().map(|&t| ((t as f64).log2(), 80.0)).collect(),
            color: COLORS[9],
            dashed: true,
        });
        let file = format!("attention_{shape}.svg");
        line_chart(
            &dir.join(&file),
            &format!("Decode attention, {short}: % of the memory probe"),
            "cached tokens",
            "K/V bytes/s, % of probe",
            &series,
            true,
        )?;
        let _ = writeln!(w, "\n![{title}]({file})\n");
    }
    let met = target_lines.iter().filter(|t| t.4).count();
    let _ = writeln!(
        w,
        "**Target: decode attention at 4096 tokens or more reaches 80% of the probe.** \
         Met by {met} of {} points.",
        target_lines.len()
    );
    let misses: Vec<String> = target_lines
        .iter()
        .filter(|t| !t.4)
        .map(|(s, l, t, f, _)| format!("{s} {l} at {t} ({})", pct(*f)))
        .collect();
    if !misses.is_empty() {
        let _ = writeln!(w, "Below it: {}.", misses.join(", "));
    }
    if let Some(line) = kivi_window_line(r) {
        let _ = writeln!(w, "\n{line}");
    }
    let _ = writeln!(w);

    // 2. Cache versus no cache.
    let _ = writeln!(w, "## 2. Cache versus no cache (SmolLM2, f16 cache)\n");
    let _ = writeln!(
        w,
        "Time to produce one token with n tokens of context: without a cache the model \
         recomputes all n (median of up to 3 runs; no further run once they took 20 s); \
         with it, the n-th token goes through the model alone and attends to the n - 1 \
         cached ones (median of 8). The recompute uses kv's uncached forward pass (plain \
         tensor attention over the whole sequence). That path is much slower than the \
         cached prefill of the same tokens, so the last two columns also give the recompute \
         at the cached path's prefill rate (section 3, f16 cache, a 512-token prompt): a \
         fairer estimate of what a fast recompute would cost.\n"
    );
    let _ = writeln!(
        w,
        "| context n | no cache, ms/token (runs) | cache, ms/token | no cache / cache | n / cached prefill rate, ms | that / cache |\n|---:|---:|---:|---:|---:|---:|"
    );
    let prefill_rate = r.one(
        &[
            ("section", "prefill"),
            ("layout", "f16"),
            ("weights", "blocks"),
        ],
        "tokens_per_s",
    );
    let mut unc = Vec::new();
    let mut cac = Vec::new();
    for rec in r.all(&[("section", "nocache")]) {
        if let (Some(n), Some(u), Some(c)) = (
            rec.num("n"),
            rec.num("uncached_secs"),
            rec.num("cached_secs"),
        ) {
            // What recomputing n tokens would cost at the cached path's prefill speed.
            let est = prefill_rate.map(|p| n / p);
            let _ = writeln!(
                w,
                "| {n} | {:.1} ({}) | {:.2} | {:.1}x | {} | {} |",
                u * 1e3,
                rec.get("uncached_runs").unwrap_or("?"),
                c * 1e3,
                u / c,
                opt(est, |e| format!("{:.1}", e * 1e3)),
                opt(est, |e| format!("{:.1}x", e / c)),
            );
            unc.push((n, u * 1e3));
            cac.push((n, c * 1e3));
        }
    }
    line_chart(
        &dir.join("cache_vs_nocache.svg"),
        "Time per generated token, SmolLM2-135M",
        "context n (tokens)",
        "ms per token",
        &[
            Series {
                name: "no cache (recompute n tokens)".into(),
                points: unc,
                color: COLORS[3],
                dashed: false,
            },
            Series {
                name: "KV cache (one token)".into(),
                points: cac,
                color: COLORS[0],
                dashed: false,
            },
        ],
        false,
    )?;
    let _ = writeln!(w, "\n![cache versus no cache](cache_vs_nocache.svg)\n");

    // 3. End to end.
    let mut depths: Vec<usize> = r
        .all(&[("section", "decode")])
        .filter_map(|d| d.num("depth").map(|x| x as usize))
        .collect();
    depths.sort_unstable();
    depths.dedup();
    let prompt = r
        .one(&[("section", "prefill")], "tokens")
        .map_or(0, |t| t as usize);
    let _ = writeln!(
        w,
        "## 3. End to end on SmolLM2-135M ({} threads)\n",
        m.threads
    );
    let _ = writeln!(
        w,
        "Prefill: a {prompt}-token prompt in one forward pass into an empty cache (best of \
         two); `prefill @ dN`: the same length with N tokens already cached (a long \
         conversation's next turn, llama-bench's `-p 512 -d 4096`). Decode: tokens/s of greedy steps with `depth` tokens already cached (depth 0: \
         from an empty cache). The deepest point ends its steps at position 4096, \
         candle-transformers' longest sequence, so the peer runs at the same depths. \
         Weights: kv's `blocks` keeps the file's Q4_1/Q8_0 blocks and multiplies with kv's \
         own kernels (the default; activations stay f32), `blocks-q8` the same blocks with \
         activations rounded to 8 bits and integer dot products (`--activations q8`, a \
         named option that costs accuracy), `f32` expands them at load; the \
         peer's `quantized` is candle's quantized matmul on the same blocks (its default), \
         its `f32` is `CANDLE_DEQUANTIZE_ALL=1`. llama.cpp's figures are with the file's \
         blocks.\n"
    );
    // The prefill on top of a long context, when the run has it.
    let prefill_depth = r
        .one(&[("section", "prefill-depth")], "depth")
        .map(|d| d as usize);
    let mut header = "| layout | weights | prefill tokens/s |".to_string();
    let mut rule = "|---|---|---:|".to_string();
    if let Some(pd) = prefill_depth {
        let _ = write!(header, " prefill @ d{pd} |");
        rule.push_str("---:|");
    }
    for d in &depths {
        let _ = write!(header, " decode d{d} |");
        rule.push_str("---:|");
    }
    let _ = writeln!(w, "{header}\n{rule}");
    let mut rows: Vec<(String, String)> = r
        .all(&[("section", "prefill")])
        .filter_map(|p| Some((p.get("layout")?.to_string(), p.get("weights")?.to_string())))
        .collect();
    rows.dedup();
    let mut series = Vec::new();
    for (i, (layout, weights)) in rows.iter().enumerate() {
        let key = [("layout", layout.as_str()), ("weights", weights.as_str())];
        let prefill = r.one(&[("section", "prefill"), key[0], key[1]], "tokens_per_s");
        let mut row = format!(
            "| {layout} | {weights} | {} |",
            opt(prefill, |x| format!("{x:.1}"))
        );
        if prefill_depth.is_some() {
            let v = r.one(
                &[("section", "prefill-depth"), key[0], key[1]],
                "tokens_per_s",
            );
            let _ = write!(row, " {} |", opt(v, |x| format!("{x:.1}")));
        }
        let mut points = Vec::new();
        for d in &depths {
            let ds = d.to_string();
            let v = r.one(
                &[("section", "decode"), key[0], key[1], ("depth", &ds)],
                "tokens_per_s",
            );
            let _ = write!(row, " {} |", opt(v, |x| format!("{x:.1}")));
            if let Some(v) = v {
                points.push((*d as f64, v));
            }
        }
        let _ = writeln!(w, "{row}");
        series.push(Series {
            name: format!("kv {layout} ({weights} weights)"),
            points,
            color: COLORS[i % 9],
            dashed: false,
        });
    }
    // The peer's rows, by weight format: (prefill, [(depth, decode)]).
    let peer = |weights: &str| {
        let prefill = r.find(&[("section", "peer-prefill"), ("weights", weights)]);
        let decode: Vec<(f64, f64)> = r
            .all(&[("section", "peer-decode")])
            .filter(|x| x.get("weights") == Some(weights))
            .filter_map(|x| Some((x.num("depth")?, x.num("tokens_per_s")?)))
            .collect();
        (prefill, decode)
    };
    for (i, weights) in ["quantized", "f32"].iter().enumerate() {
        let (prefill, decode) = peer(weights);
        if prefill.is_none() && decode.is_empty() {
            continue;
        }
        let mut row = format!(
            "| candle-transformers (peer) | {weights} | {} |",
            opt(prefill.and_then(|p| p.num("tokens_per_s")), |x| format!(
                "{x:.1}"
            ))
        );
        if prefill_depth.is_some() {
            row.push_str(" - |");
        }
        for d in &depths {
            let v = decode.iter().find(|p| p.0 == *d as f64).map(|p| p.1);
            let _ = write!(row, " {} |", opt(v, |x| format!("{x:.1}")));
        }
        let _ = writeln!(w, "{row}");
        if i == 0 {
            series.push(Series {
                name: "candle-transformers (peer, quantized weights)".into(),
                points: decode,
                color: COLORS[9],
                dashed: true,
            });
        }
    }
    let q_prompt = r
        .one(&[("section", "prefill"), ("weights", "f32")], "tokens")
        .map_or(0, |t| t as usize);
    if q_prompt > 0 {
        let _ = writeln!(
            w,
            "\nRows with f32 weights: prefill of a {q_prompt}-token prompt and depth 0 only \
             (for comparison; a step reads 4x the weight bytes of the blocks)."
        );
    }
    line_chart(
        &dir.join("decode_by_depth.svg"),
        "Decode tokens/s by depth, SmolLM2-135M",
        "depth (tokens already cached)",
        "tokens/s",
        &series,
        false,
    )?;
    let _ = writeln!(w, "\n![decode by depth](decode_by_depth.svg)\n");

    // 4. The peer.
    let _ = writeln!(
        w,
        "## 4. The Rust peer: candle-transformers and candle-nn\n"
    );
    if !m.peer {
        let _ = writeln!(
            w,
            "Not run: `--quick` skips the peer unless given `--peer` (its first build \
             compiles candle-transformers and candle-nn, minutes on 2 cores). The full \
             `cargo xtask bench` runs it.\n"
        );
    } else {
        if let Some(s) = m.peer_build_s {
            let _ = writeln!(
                w,
                "The peer (`xtask/candle-peer`, outside the workspace) was built in {s:.0} s \
                 this run (seconds once built; its first build compiles candle-transformers \
                 and candle-nn).\n"
            );
        }
        let _ = writeln!(
            w,
            "candle-transformers' `quantized_llama::ModelWeights::from_gguf` on the same file \
             and token ids, with its own cache (f32 K/V grown by concatenation). Compared \
             with the same weights on both sides: the file's Q4_1 blocks (candle's quantized \
             matmul, its default; kv's own block kernels, kv's default), and f32 \
             (`CANDLE_DEQUANTIZE_ALL=1`; kv `--weights f32`). kv's cache: f16. Ratio: kv's \
             tokens/s over the peer's.\n"
        );
        let _ = writeln!(
            w,
            "| weights | measure | candle-transformers | kv | kv / candle-transformers |\n|---|---|---:|---:|---:|"
        );
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
            _ => "-".into(),
        };
        let f1 = |x: f64| format!("{x:.1}");
        let mut goal = Vec::new();
        for weights in ["quantized", "f32"] {
            let (prefill, decode) = peer(weights);
            // The peer's quantized matmul and kv's block kernels read the same blocks.
            let ours_weights = if weights == "quantized" {
                "blocks"
            } else {
                weights
            };
            if let Some(p) = prefill {
                let tokens = p.get("tokens").unwrap_or("?");
                let ours = r
                    .find(&[
                        ("section", "prefill"),
                        ("layout", "f16"),
                        ("weights", ours_weights),
                        ("tokens", tokens),
                    ])
                    .and_then(|x| x.num("tokens_per_s"));
                let theirs = p.num("tokens_per_s");
                let _ = writeln!(
                    w,
                    "| {weights} | prefill {tokens} tokens, tokens/s | {} | {} | {} |",
                    opt(theirs, f1),
                    opt(ours, f1),
                    ratio(ours, theirs)
                );
            }
            for (d, theirs) in decode {
                let ds = format!("{d:.0}");
                let ours = r.one(
                    &[
                        ("section", "decode"),
                        ("layout", "f16"),
                        ("weights", ours_weights),
                        ("depth", &ds),
                    ],
                    "tokens_per_s",
                );
                let _ = writeln!(
                    w,
                    "| {weights} | decode d{ds}, tokens/s | {theirs:.1} | {} | {} |",
                    opt(ours, f1),
                    ratio(ours, Some(theirs))
                );
                if let (Some(o), "quantized") = (ours, weights) {
                    goal.push((ds, o / theirs));
                }
            }
        }
        if let Some((deep, x)) = goal.last() {
            let ahead = goal.iter().all(|g| g.1 > 1.0);
            let _ = writeln!(
                w,
                "\n**Goal: at least 4x the peer at depth 4096 and ahead at every depth** \
                 (the file's blocks on both sides): {x:.2}x at depth {deep} ({}); {} \
                 ({}).\n",
                if *x >= 4.0 { "met" } else { "not met" },
                if ahead {
                    "ahead at every depth"
                } else {
                    "not ahead at every depth"
                },
                goal.iter()
                    .map(|(d, x)| format!("d{d} {x:.2}x"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }

        let _ = writeln!(w, "### The attention step alone: candle-nn's KvCache\n");
        let _ = writeln!(
            w,
            "One decode step of one SmolLM2 layer (9 query heads, 3 KV heads of 64) with n \
             cached tokens, in one process, same inputs: candle-nn's `KvCache::append` plus \
             the attention candle-transformers computes over it (repeat K/V per query head, \
             two matmuls, softmax), against kv's CPU backend writing the token into its paged \
             cache and attending. The layer stays in the CPU caches on both sides. kv's f32 \
             answer is checked against candle's.\n"
        );
        let _ = writeln!(
            w,
            "| n | candle-nn f32, us | kv f32, us | ratio | kv f16, us | ratio |\n|---:|---:|---:|---:|---:|---:|"
        );
        let mut ns: Vec<String> = r
            .all(&[("section", "kvcache")])
            .filter_map(|k| k.get("tokens").map(str::to_string))
            .collect();
        ns.dedup();
        for n in ns {
            let t = |imp: &str, dt: &str| {
                r.one(
                    &[
                        ("section", "kvcache"),
                        ("impl", imp),
                        ("dtype", dt),
                        ("tokens", &n),
                    ],
                    "secs",
                )
            };
            let (c, k32, k16) = (t("candle-nn", "f32"), t("kv", "f32"), t("kv", "f16"));
            let us = |x: f64| format!("{:.1}", x * 1e6);
            let _ = writeln!(
                w,
                "| {n} | {} | {} | {} | {} | {} |",
                opt(c, us),
                opt(k32, us),
                ratio(c, k32),
                opt(k16, us),
                ratio(c, k16)
            );
        }
        let _ = writeln!(w, "\nRatio: candle-nn's time over kv's.\n");
    }

    // Block tiers: restoring a saved prefix against prefilling it.
    let tiers: Vec<&Rec> = r.all(&[("section", "store")]).collect();
    if !tiers.is_empty() {
        let _ = writeln!(
            w,
            "## Restoring a prefix from a block tier (SmolLM2, f16 cache)\n"
        );
        let _ = writeln!(
            w,
            "A prefix is prefilled, its blocks saved to a tier (host memory; a directory on \
             local disk, files written atomically), then restored into a fresh cache through \
             `TieredCache` (read, checksum, import) instead of being prefilled again. Best of \
             two of each. GB/s: bytes of stored values per second, against the memory-read \
             probe of section 1 ({:.2} GB/s).\n",
            limit / 1e9
        );
        let _ = writeln!(
            w,
            "| tier | tokens | MiB | prefill, ms | restore, ms | prefill / restore | save GB/s | restore GB/s | restore / probe |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for t in tiers {
            let (Some(n), Some(b), Some(p), Some(rs), Some(sv), Some(ld)) = (
                t.num("tokens"),
                t.num("bytes"),
                t.num("prefill_secs"),
                t.num("restore_secs"),
                t.num("save_bytes_per_s"),
                t.num("load_bytes_per_s"),
            ) else {
                continue;
            };
            let _ = writeln!(
                w,
                "| {} | {n} | {:.1} | {:.1} | {:.2} | {:.1}x | {:.2} | {:.2} | {} |",
                t.get("tier").unwrap_or("?"),
                b / f64::from(1u32 << 20),
                p * 1e3,
                rs * 1e3,
                p / rs,
                sv / 1e9,
                ld / 1e9,
                if limit > 0.0 {
                    format!("{:.0}%", 100.0 * ld / limit)
                } else {
                    "-".into()
                }
            );
        }
        let _ = writeln!(w);
    }

    crate::llama_cpp::report(r, w, m.quick);

    batch_report(r, w, dir)?;
    gemma_report(r, w);

    let path = dir.join("report.md");
    std::fs::write(&path, md).map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(path)
}

/// The batched-decode section (`section=batch` lines): decode tokens/s over all sequences
/// at each batch size, prefill apart, the ratio to one sequence, and a plot.
fn batch_report(r: &Results, w: &mut String, dir: &Path) -> Result<(), String> {
    let recs: Vec<&Rec> = r.all(&[("section", "batch")]).collect();
    let Some(first) = recs.first() else {
        return Ok(());
    };
    let llama = crate::llama_cpp::batch_points(r);
    let _ = writeln!(
        w,
        "\n## Batched decode on SmolLM2-135M\n\n{} sequences of {}-token prompts, {} new \
         tokens each, greedy, f16 cache, all decoding in one batch (`Model::generate_batch`). \
         `shared`: the prompts share a first 48 tokens, kept once by the prefix cache; \
         `distinct`: no common prefix. Decode tokens/s: tokens generated over all \
         sequences per second of the run less its prefill time; prefill apart. Ratio: to \
         one sequence in this run. {}\n",
        {
            let mut seqs: Vec<&str> = Vec::new();
            for s in recs.iter().filter_map(|x| x.get("seqs")) {
                if !seqs.contains(&s) {
                    seqs.push(s);
                }
            }
            seqs.join("/")
        },
        first.get("prompt").unwrap_or("?"),
        first.get("new").unwrap_or("?"),
        if llama.is_empty() {
            "llama.cpp's batched bench: not measured in this run (no build)."
        } else {
            "llama.cpp: `llama-batched-bench` in the same shape (its prompts are distinct, \
             each prefilled; `S_TG`, decode over all sequences, prefill apart), same GGUF \
             and threads, in this run; `kv / llama.cpp` sets kv's distinct prompts beside it, \
             with each kind of activations: llama.cpp rounds activations to 8 bits for its \
             quantized matrix products (`q8_1` against Q4_1 weights, `q8_0` against Q8_0), so \
             kv's `q8` is the like-for-like comparison and `exact` is kv's default."
        },
    );
    let _ = writeln!(
        w,
        "Activations: `exact` (f32, the default) or `q8` (rounded to 8 bits per block of 32, \
         integer dot products: `--activations q8`, a named option); ratios are to one \
         sequence with the same activations.\n\n\
         | prompts | activations | sequences | decode tokens/s | x 1 sequence | prefill tokens/s | reused prompt tokens |\n|---|---|---:|---:|---:|---:|---:|"
    );
    let mut series = Vec::new();
    let pairs = ["shared", "distinct"]
        .into_iter()
        .flat_map(|p| ["exact", "q8"].map(|a| (p, a)));
    for (i, (prefix, act)) in pairs.enumerate() {
        let mut points = Vec::new();
        // Runs from before the option have no `activations` field: exact.
        for x in r
            .all(&[("section", "batch"), ("prefix", prefix)])
            .filter(|x| x.get("activations").unwrap_or("exact") == act)
        {
            let (Some(seqs), Some(tps)) = (x.num("seqs"), x.num("decode_tokens_per_s")) else {
                continue;
            };
            let _ = writeln!(
                w,
                "| {prefix} | {act} | {seqs} | {tps:.1} | {} | {} | {} |",
                opt(x.num("ratio_1"), |v| format!("{v:.2}x")),
                opt(x.num("prefill_tokens_per_s"), |v| format!("{v:.1}")),
                x.get("reused_tokens").unwrap_or("?"),
            );
            points.push((seqs.log2(), tps));
        }
        if points.is_empty() {
            continue;
        }
        series.push(Series {
            name: format!("kv, {prefix} prompts, {act} activations"),
            points,
            color: COLORS[i % 9],
            dashed: prefix == "distinct",
        });
    }
    let llama_one = llama.iter().find(|p| p.0 == 1.0).map(|p| p.1);
    for &(seqs, tps, prefill) in &llama {
        let _ = writeln!(
            w,
            "| llama.cpp (distinct) | {seqs} | {tps:.1} | {} | {prefill:.1} | - |",
            opt(llama_one, |one| format!("{:.2}x", tps / one)),
        );
    }
    if !llama.is_empty() {
        let _ = writeln!(
            w,
            "\n| sequences | kv exact / llama.cpp decode | kv q8 / llama.cpp decode |\n|---:|---:|---:|"
        );
        for &(seqs, tps, _) in &llama {
            let s = format!("{seqs}");
            let kv = |act: &str| {
                r.all(&[("section", "batch"), ("prefix", "distinct"), ("seqs", &s)])
                    .find(|x| x.get("activations").unwrap_or("exact") == act)
                    .and_then(|x| x.num("decode_tokens_per_s"))
            };
            let _ = writeln!(
                w,
                "| {seqs} | {} | {} |",
                opt(kv("exact"), |k| format!("{:.2}x", k / tps)),
                opt(kv("q8"), |k| format!("{:.2}x", k / tps)),
            );
        }
        series.push(Series {
            name: "llama.cpp (llama-batched-bench)".into(),
            points: llama.iter().map(|p| (p.0.log2(), p.1)).collect(),
            color: COLORS[9],
            dashed: true,
        });
    }
    line_chart(
        &dir.join("batch_decode.svg"),
        "Batched decode, SmolLM2-135M",
        "sequences",
        "decode tokens/s (all sequences)",
        &series,
        true,
    )?;
    let _ = writeln!(w, "\n![batched decode](batch_decode.svg)\n");
    Ok(())
}

/// The Gemma 3 section (`section=gemma` lines): its 15 sliding-window layers freeing
/// their blocks behind the window against every layer keeping every token, in one run.
fn gemma_report(r: &Results, w: &mut String) {
    if r.find(&[("section", "gemma")]).is_none() {
        return;
    }
    let _ = writeln!(
        w,
        "\n## Gemma 3 270M: sliding-window layers freeing their blocks\n\n\
         f16 cache, blocks of 32 tokens. `free`: the 15 local layers keep only the blocks \
         their 512-token window reads (`PagedCache::with_sliding_window`); `all`: every \
         layer keeps every token. Decode: a fork of the sequence filled to the depth \
         decodes, median of interleaved rounds. Ratio: free over all, same run.\n"
    );
    let _ = writeln!(
        w,
        "| measure | all layers global | sliding layers free | ratio |\n|---|---:|---:|---:|"
    );
    let row = |w: &mut String, label: String, what: &[(&str, &str)], key: &str| {
        let get = |free: &str| {
            let mut pairs = what.to_vec();
            pairs.push(("section", "gemma"));
            pairs.push(("free", free));
            r.one(&pairs, key)
        };
        let (all, free) = (get("false"), get("true"));
        let ratio = all.zip(free).map(|(a, f)| f / a);
        let _ = writeln!(
            w,
            "| {label} | {} | {} | {} |",
            opt(all, |v| format!("{v:.1}")),
            opt(free, |v| format!("{v:.1}")),
            opt(ratio, |v| format!("{v:.2}x")),
        );
    };
    if let Some(p) = r.find(&[("section", "gemma"), ("what", "prefill")]) {
        let tokens = p.get("tokens").unwrap_or("?").to_string();
        row(
            w,
            format!("prefill {tokens} tokens/s"),
            &[("what", "prefill")],
            "tokens_per_s",
        );
    }
    let depths: Vec<String> = r
        .all(&[("section", "gemma"), ("what", "decode"), ("free", "true")])
        .filter_map(|x| x.get("depth").map(str::to_string))
        .collect();
    for d in &depths {
        row(
            w,
            format!("decode tokens/s at depth {d}"),
            &[("what", "decode"), ("depth", d)],
            "tokens_per_s",
        );
    }
    let mib = |v: f64| v / f64::from(1u32 << 20);
    for (label, key) in [
        (
            "cache MiB reserved at the deepest point",
            "peak_reserved_bytes",
        ),
        ("cache MiB allocated (pools)", "allocated_bytes"),
    ] {
        let get = |free: &str| {
            r.one(
                &[("section", "gemma"), ("what", "memory"), ("free", free)],
                key,
            )
            .map(mib)
        };
        let (all, free) = (get("false"), get("true"));
        let _ = writeln!(
            w,
            "| {label} | {} | {} | {} |",
            opt(all, |v| format!("{v:.1}")),
            opt(free, |v| format!("{v:.1}")),
            opt(all.zip(free).map(|(a, f)| f / a), |v| format!("{v:.2}x")),
        );
    }
}

/// Copies the report, its SVG plots and `results.txt` from `out_dir` into `docs/bench/`,
/// replacing what an earlier run published there.
fn publish(out_dir: &Path) -> Result<(), String> {
    let docs = root().join("docs").join("bench");
    if docs.is_dir() {
        std::fs::remove_dir_all(&docs).map_err(|e| format!("clearing {}: {e}", docs.display()))?;
    }
    std::fs::create_dir_all(&docs).map_err(|e| format!("creating {}: {e}", docs.display()))?;
    let entries =
        std::fs::read_dir(out_dir).map_err(|e| format!("reading {}: {e}", out_dir.display()))?;
    for entry in entries {
        let path = entry
            .map_err(|e| format!("reading {}: {e}", out_dir.display()))?
            .path();
        let keep = path
            .extension()
            .is_some_and(|x| x == "svg" || x == "md" || x == "txt");
        if let (true, Some(name)) = (keep, path.file_name()) {
            std::fs::copy(&path, docs.join(name))
                .map_err(|e| format!("copying {} into {}: {e}", path.display(), docs.display()))?;
        }
    }
    println!("bench: published into {}", docs.display());
    Ok(())
}

/// One line of a chart.
struct Series {
    name: String,
    points: Vec<(f64, f64)>,
    color: RGBColor,
    dashed: bool,
}

/// A line chart as SVG. With `log2_x` the x values are already log2 of the real ones and
/// the axis labels show the real values. Text is written as SVG `<text>` (no fonts read).
fn line_chart(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
    log2_x: bool,
) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| format!("plotting {}: {e}", path.display());
    let pts = || series.iter().flat_map(|s| s.points.iter());
    if pts().next().is_none() {
        return Ok(());
    }
    let (mut x0, mut x1) = pts().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let y1 = pts().fold(0.0_f64, |a, p| a.max(p.1)) * 1.1;
    if x1 <= x0 {
        x0 -= 1.0;
        x1 += 1.0;
    }
    let pad = (x1 - x0) * 0.03;
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 26))
        .margin(15)
        .x_label_area_size(55)
        .y_label_area_size(80)
        .build_cartesian_2d((x0 - pad)..(x1 + pad), 0.0..y1.max(1e-9))
        .map_err(|e| err(&e))?;
    // On a log2 axis, one label per doubling.
    let x_labels = if log2_x {
        (x1 - x0).round() as usize + 1
    } else {
        10
    };
    let x_fmt = |v: &f64| {
        if log2_x {
            format!("{:.0}", v.exp2())
        } else {
            format!("{v:.0}")
        }
    };
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .label_style(("sans-serif", 17))
        .axis_desc_style(("sans-serif", 18))
        .x_labels(x_labels)
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&|v| format!("{v:.1}"))
        .draw()
        .map_err(|e| err(&e))?;
    for s in series {
        let style = s.color.stroke_width(2);
        let color = s.color;
        let drawn = if s.dashed {
            chart.draw_series(DashedLineSeries::new(s.points.iter().copied(), 8, 6, style))
        } else {
            chart.draw_series(LineSeries::new(s.points.iter().copied(), style))
        }
        .map_err(|e| err(&e))?;
        drawn.label(s.name.clone()).legend(move |(x, y)| {
            PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
        });
        chart
            .draw_series(
                s.points
                    .iter()
                    .map(|&p| Circle::new(p, 3, s.color.filled())),
            )
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Issue 20's target line: what the KIVI residual window (`kivi2-r128`) costs a decode step
/// at 4096 tokens, as a ratio to `kivi2` measured in the same (interleaved) run, per shape.
/// `None` when the run has no such pair.
fn kivi_window_line(r: &Results) -> Option<String> {
    let ratios: Vec<String> = [
        ("smollm2-135m", "SmolLM2-135M layer"),
        ("llama-2-7b", "Llama-2-7B layer"),
    ]
    .iter()
    .filter_map(|(shape, title)| {
        let secs = |layout| {
            r.one(
                &[
                    ("section", "attn"),
                    ("shape", shape),
                    ("layout", layout),
                    ("tokens", "4096"),
                ],
                "secs",
            )
        };
        let (with, without) = (secs("kivi2-r128")?, secs("kivi2")?);
        Some(format!(
            "{:.2}x on the {title} ({:.0} vs {:.0} us)",
            with / without,
            with * 1e6,
            without * 1e6
        ))
    })
    .collect();
    (!ratios.is_empty()).then(|| {
        format!(
            "**Target: decode attention with the KIVI residual window at 4096 tokens is not \
             slower than kivi2.** kivi2-r128 takes {} of kivi2's time (same run, interleaved \
             rounds).",
            ratios.join("; ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The residual-window line compares kivi2-r128 with kivi2 at 4096 tokens per shape,
    /// and is left out of a run without both.
    #[test]
    fn kivi_window_line_is_the_ratio_at_4096_tokens() {
        let lines = "BENCH section=attn shape=smollm2-135m layout=kivi2 tokens=4096 secs=0.000200\n\
                     BENCH section=attn shape=smollm2-135m layout=kivi2-r128 tokens=4096 secs=0.000190\n\
                     BENCH section=attn shape=smollm2-135m layout=kivi2-r128 tokens=1024 secs=0.000100\n\
                     BENCH section=attn shape=llama-2-7b layout=kivi2 tokens=4096 secs=0.004000\n";
        let line = kivi_window_line(&Results { recs: parse(lines) }).unwrap();
        assert!(
            line.contains("0.95x on the SmolLM2-135M layer (190 vs 200 us)"),
            "{line}"
        );
        assert!(!line.contains("Llama"), "{line}");
        let none = "BENCH section=attn shape=llama-2-7b layout=kivi2 tokens=4096 secs=0.004\n";
        assert!(kivi_window_line(&Results { recs: parse(none) }).is_none());
    }

    /// The Gemma section gives each measure in both modes and their ratio; a run without
    /// its lines adds nothing.
    #[test]
    fn gemma_report_tabulates_both_modes_and_their_ratio() {
        let lines = "BENCH section=gemma what=prefill free=false layout=f16 tokens=512 tokens_per_s=80.0\n\
                     BENCH section=gemma what=prefill free=true layout=f16 tokens=512 tokens_per_s=40.0\n\
                     BENCH section=gemma what=decode free=false layout=f16 depth=4096 tokens_per_s=9.0\n\
                     BENCH section=gemma what=decode free=true layout=f16 depth=4096 tokens_per_s=9.9\n\
                     BENCH section=gemma what=memory free=false layout=f16 tokens=4112 peak_reserved_bytes=4194304 allocated_bytes=4194304\n\
                     BENCH section=gemma what=memory free=true layout=f16 tokens=4112 peak_reserved_bytes=1048576 allocated_bytes=2097152\n";
        let r = Results { recs: parse(lines) };
        let mut w = String::new();
        gemma_report(&r, &mut w);
        assert!(
            w.contains("| prefill 512 tokens/s | 80.0 | 40.0 | 0.50x |"),
            "{w}"
        );
        assert!(
            w.contains("| decode tokens/s at depth 4096 | 9.0 | 9.9 | 1.10x |"),
            "{w}"
        );
        assert!(
            w.contains("| cache MiB reserved at the deepest point | 4.0 | 1.0 | 0.25x |"),
            "{w}"
        );
        assert!(
            w.contains("| cache MiB allocated (pools) | 4.0 | 2.0 | 0.50x |"),
            "{w}"
        );
        let mut empty = String::new();
        gemma_report(&Results { recs: Vec::new() }, &mut empty);
        assert!(empty.is_empty());
    }

    /// The batched-decode section turns the bench's lines into one table row per line and
    /// a plot; a run without them adds nothing.
    #[test]
    fn batch_report_tabulates_and_plots_the_batch_lines() {
        let dir = std::env::temp_dir().join(format!("kv-xtask-batch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let lines = "BENCH section=batch prefix=shared seqs=1 prompt=64 new=64 reused_tokens=0 prefill_tokens_per_s=150.0 decode_tokens_per_s=50.0 ratio_1=1.000\n\
                     BENCH section=batch prefix=shared seqs=16 prompt=64 new=64 reused_tokens=480 prefill_tokens_per_s=160.0 decode_tokens_per_s=300.0 ratio_1=6.000\n\
                     BENCH section=batch prefix=distinct seqs=1 prompt=64 new=64 reused_tokens=0 prefill_tokens_per_s=300.0 decode_tokens_per_s=55.0 ratio_1=1.000\n\
                     BENCH section=batch prefix=shared activations=q8 seqs=16 prompt=64 new=64 reused_tokens=480 prefill_tokens_per_s=170.0 decode_tokens_per_s=420.0 ratio_1=7.000\n";
        let r = Results { recs: parse(lines) };
        let mut w = String::new();
        batch_report(&r, &mut w, &dir).unwrap();
        assert!(
            w.contains("| shared | exact | 16 | 300.0 | 6.00x | 160.0 | 480 |"),
            "{w}"
        );
        assert!(
            w.contains("| distinct | exact | 1 | 55.0 | 1.00x | 300.0 | 0 |"),
            "{w}"
        );
        assert!(
            w.contains("| shared | q8 | 16 | 420.0 | 7.00x | 170.0 | 480 |"),
            "{w}"
        );
        assert!(dir.join("batch_decode.svg").is_file());
        let mut empty = String::new();
        batch_report(&Results { recs: Vec::new() }, &mut empty, &dir).unwrap();
        assert!(empty.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
