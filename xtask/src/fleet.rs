//! `cargo xtask fleet`: several engine processes on this machine sharing one Redis.
//!
//! Builds `kv` (release, feature `redis`), starts a `redis-server` (the one `cargo xtask
//! redis` provides) on a free port with a temporary directory, and runs N `kv batch`
//! processes at once (default 4) twice: without a store, then with `--store redis://...`.
//! Every engine serves prompts made of one of a few system prompts, a few-shot prefix and a
//! question; engine `i` starts with system prompt `i`, so by the time another engine needs
//! it, engine `i` has written its blocks to the store. Each engine writes a summary
//! (`kv batch --summary-json`); the report (`target/kv-fleet/report.md`, plot
//! `fleet.svg`) gives prefill tokens computed and saved, time to first token (mean over
//! sequences: from a sequence's admission to its first token) with and without the store,
//! and the store's traffic. Bounded: a fixed number of prompts per engine, a few new
//! tokens each, and a time limit per phase after which the engines are killed.

use std::fmt::Write as _;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use plotters::prelude::*;

use crate::{cargo, root};

/// What `cargo xtask fleet` runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// Engine processes.
    pub engines: usize,
    /// Prompts each engine serves.
    pub prompts: usize,
    /// New tokens per prompt.
    pub max_tokens: usize,
    /// Time limit of each phase.
    pub limit: Duration,
}

impl Options {
    /// Parses `--engines N --prompts N --max-tokens N --seconds N`.
    pub fn parse(args: &[String]) -> Result<Self, String> {
        let mut o = Self {
            engines: 4,
            prompts: 6,
            max_tokens: 4,
            limit: Duration::from_secs(600),
        };
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let value = it
                .next()
                .ok_or_else(|| format!("{flag} needs a value"))?
                .parse::<u64>()
                .map_err(|e| format!("{flag}: {e}"))?;
            if value == 0 || value > 64 && flag != "--seconds" {
                return Err(format!("{flag} {value}: expected 1..=64"));
            }
            let v = value as usize;
            match flag.as_str() {
                "--engines" => o.engines = v,
                "--prompts" => o.prompts = v,
                "--max-tokens" => o.max_tokens = v,
                "--seconds" => o.limit = Duration::from_secs(value.min(3600)),
                other => return Err(format!("unknown fleet option {other:?}")),
            }
        }
        Ok(o)
    }
}

const SYSTEMS: [&str; 4] = [
    "You are a geography tutor. Answer with the name only, no sentence, and never guess: \
     if you do not know, say so.",
    "You are a chemistry assistant for high-school students. Give the element or compound \
     asked for, in one or two words, and nothing else.",
    "You are a concise historian. Reply with a single year or a single name, as the \
     question asks, without explanation.",
    "You are a helpful math checker. Reply with the number only, computed exactly, \
     without units or words.",
];

const SHOTS: [&str; 4] = [
    "Examples. Q: Capital of Spain? A: Madrid. Q: Longest river in Africa? A: Nile. \
     Q: Largest ocean? A: Pacific. Q: Highest mountain? A: Everest.",
    "Examples. Q: Symbol of gold? A: Au. Q: Water? A: H2O. Q: Lightest element? \
     A: Hydrogen. Q: Table salt? A: NaCl.",
    "Examples. Q: Fall of the Berlin Wall? A: 1989. Q: First man on the Moon? \
     A: Armstrong. Q: Who painted the Mona Lisa? A: Leonardo.",
    "Examples. Q: 7 times 8? A: 56. Q: 144 divided by 12? A: 12. Q: 15 plus 27? A: 42. \
     Q: 2 to the 10th? A: 1024.",
];

const QUESTIONS: [&str; 8] = [
    "Q: Capital of Japan? A:",
    "Q: Symbol of iron? A:",
    "Q: End of World War II? A:",
    "Q: 9 times 9? A:",
    "Q: Capital of Canada? A:",
    "Q: Symbol of sodium? A:",
    "Q: Who wrote Hamlet? A:",
    "Q: 100 minus 37? A:",
];

/// Engine `e`'s prompts: system prompt and few-shot prefix rotate from `e`, questions vary.
fn prompts_of(e: usize, n: usize) -> Vec<String> {
    (0..n)
        .map(|k| {
            let s = (e + k) % SYSTEMS.len();
            let q = (e * 3 + k) % QUESTIONS.len();
            format!("{} {} {}", SYSTEMS[s], SHOTS[s], QUESTIONS[q])
        })
        .collect()
}

/// A redis-server on a free port, killed on drop.
struct Redis {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Redis {
    fn start(bin: &Path, out: &Path) -> Result<Self, String> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port: {e}"))?
            .port();
        let dir = out.join(format!("redis-{port}"));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let child = Command::new(bin)
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let redis = Self { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err(format!("redis-server did not listen on {port}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(redis)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One engine's numbers from its summary.
#[derive(Debug, Default, Clone, PartialEq)]
struct Engine {
    prompt_tokens: u64,
    reused_tokens: u64,
    prefilled_tokens: u64,
    first_token_ms: Vec<f64>,
    wall_ms: f64,
    hits: u64,
    bytes_loaded: u64,
    bytes_saved: u64,
    store_errors: u64,
}

/// A number from `"key":value` in a flat JSON text (the summaries `kv batch` writes).
fn numbers(json: &str, key: &str) -> Vec<f64> {
    let pat = format!("\"{key}\":");
    json.match_indices(&pat)
        .filter_map(|(at, _)| {
            let rest = &json[at + pat.len()..];
            let end = rest
                .find(|c: char| !(c.is_ascii_digit() || ".-+eE".contains(c)))
                .unwrap_or(rest.len());
            rest[..end].parse().ok()
        })
        .collect()
}

fn parse_summary(json: &str) -> Engine {
    let sum = |k| numbers(json, k).iter().sum::<f64>() as u64;
    Engine {
        prompt_tokens: sum("prompt_tokens"),
        reused_tokens: sum("reused_tokens"),
        prefilled_tokens: sum("prefilled_tokens"),
        first_token_ms: numbers(json, "first_token_ms"),
        wall_ms: numbers(json, "wall_ms").first().copied().unwrap_or(0.0),
        hits: sum("hits"),
        bytes_loaded: sum("bytes_loaded"),
        bytes_saved: sum("bytes_saved"),
        store_errors: sum("store_errors"),
    }
}

/// Runs every engine at once; kills them all past the limit.
fn phase(
    kv: &Path,
    out: &Path,
    o: &Options,
    name: &str,
    store: Option<&str>,
) -> Result<(Vec<Engine>, Duration), String> {
    let started = Instant::now();
    let mut children = Vec::new();
    for e in 0..o.engines {
        let prompts = out.join(format!("engine-{e}.txt"));
        let summary = out.join(format!("{name}-{e}.json"));
        let _ = std::fs::remove_file(&summary);
        let mut cmd = Command::new(kv);
        cmd.args([
            "--threads",
            "1",
            "batch",
            "--max-batch",
            "2",
            "--max-tokens",
        ])
        .arg(o.max_tokens.to_string())
        .arg("--prompts")
        .arg(&prompts)
        .arg("--summary-json")
        .arg(&summary)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        if let Some(url) = store {
            cmd.args(["--store", url]);
        }
        let child = cmd.spawn().map_err(|e| format!("{}: {e}", kv.display()))?;
        children.push((child, summary));
    }
    let mut engines = Vec::new();
    for (mut child, summary) in children {
        loop {
            match child.try_wait().map_err(|e| e.to_string())? {
                Some(status) if status.success() => break,
                Some(status) => {
                    let mut err = String::new();
                    if let Some(mut s) = child.stderr.take() {
                        let _ = std::io::Read::read_to_string(&mut s, &mut err);
                    }
                    return Err(format!("an engine failed ({status}): {err}"));
                }
                None if started.elapsed() > o.limit => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("phase {name} ran past {:?}", o.limit));
                }
                None => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        let json =
            std::fs::read_to_string(&summary).map_err(|e| format!("{}: {e}", summary.display()))?;
        engines.push(parse_summary(&json));
    }
    Ok((engines, started.elapsed()))
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Builds, runs both phases and writes the report.
pub fn fleet(o: &Options) -> Result<(), String> {
    let server = crate::redis::ensure_redis()?;
    let status = cargo()
        .args([
            "build",
            "--release",
            "-p",
            "kv-model",
            "--features",
            "redis",
            "--bin",
            "kv",
        ])
        .status()
        .map_err(|e| e.to_string())?;
    if !status.success() {
        return Err("building kv failed".into());
    }
    let kv = root().join("target/release/kv");
    let out = root().join("target/kv-fleet");
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    for e in 0..o.engines {
        let path = out.join(format!("engine-{e}.txt"));
        std::fs::write(&path, prompts_of(e, o.prompts).join("\n"))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    println!(
        "fleet: {} engines x {} prompts, without a store",
        o.engines, o.prompts
    );
    let (plain, plain_wall) = phase(&kv, &out, o, "plain", None)?;
    let redis = Redis::start(&server, &out)?;
    let url = format!("redis://127.0.0.1:{}/", redis.port);
    println!("fleet: the same with --store {url}");
    let (shared, shared_wall) = phase(&kv, &out, o, "store", Some(&url))?;
    drop(redis);
    let report = report(o, &plain, plain_wall, &shared, shared_wall, &out)?;
    println!("{report}");
    Ok(())
}

fn report(
    o: &Options,
    plain: &[Engine],
    plain_wall: Duration,
    shared: &[Engine],
    shared_wall: Duration,
    out: &Path,
) -> Result<String, String> {
    let total = |v: &[Engine], f: fn(&Engine) -> u64| v.iter().map(f).sum::<u64>();
    let ttft = |v: &[Engine]| -> Vec<f64> {
        v.iter()
            .flat_map(|e| e.first_token_ms.iter().copied())
            .collect()
    };
    let mut r = String::new();
    let cpu = crate::bench::cpu_model();
    let _ = writeln!(r, "# kv fleet: {} engines sharing one Redis\n", o.engines);
    let _ = writeln!(
        r,
        "{cpu}, {} logical CPUs; {} engine processes at once, each `kv batch` (SmolLM2-135M \
         Q4_1, f16 cache, 1 thread) over {} prompts of {} new tokens; prompts are one of {} \
         system prompts + its few-shot prefix + a question. Other processes shared the \
         machine.\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        o.engines,
        o.prompts,
        o.max_tokens,
        SYSTEMS.len()
    );
    let _ = writeln!(
        r,
        "| | prompt tokens | prefilled | reused (device + store) | store hits (blocks) | \
         mean time to first token | wall |"
    );
    let _ = writeln!(r, "|---|---:|---:|---:|---:|---:|---:|");
    for (name, v, wall) in [
        ("no store", plain, plain_wall),
        ("Redis store", shared, shared_wall),
    ] {
        let _ = writeln!(
            r,
            "| {name} | {} | {} | {} | {} | {:.0} ms | {:.1} s |",
            total(v, |e| e.prompt_tokens),
            total(v, |e| e.prefilled_tokens),
            total(v, |e| e.reused_tokens),
            total(v, |e| e.hits),
            mean(&ttft(v)),
            wall.as_secs_f64()
        );
    }
    let saved =
        total(plain, |e| e.prefilled_tokens) as i64 - total(shared, |e| e.prefilled_tokens) as i64;
    let _ = writeln!(
        r,
        "\nPrefill tokens saved by the store: {saved}. Store traffic: {} bytes read, {} bytes \
         written, {} store errors. Time to first token: {:.2}x with the store.",
        total(shared, |e| e.bytes_loaded),
        total(shared, |e| e.bytes_saved),
        total(shared, |e| e.store_errors),
        if mean(&ttft(plain)) > 0.0 {
            mean(&ttft(shared)) / mean(&ttft(plain))
        } else {
            0.0
        }
    );
    let plot = out.join("fleet.svg");
    plot_ttft(&plot, &ttft(plain), &ttft(shared))?;
    let _ = writeln!(r, "\n![time to first token](fleet.svg)");
    let path = out.join("report.md");
    std::fs::write(&path, &r).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(r)
}

/// Time to first token of every sequence, sorted, without and with the store.
fn plot_ttft(path: &Path, plain: &[f64], shared: &[f64]) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| format!("plotting {}: {e}", path.display());
    let sorted = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v
    };
    let (a, b) = (sorted(plain), sorted(shared));
    let n = a.len().max(b.len()).max(1);
    let top = a.iter().chain(&b).fold(1.0_f64, |m, &x| m.max(x)) * 1.1;
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Time to first token per sequence (sorted)",
            ("sans-serif", 26),
        )
        .margin(15)
        .x_label_area_size(55)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..n as f64, 0.0..top)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("sequences, fastest first")
        .y_desc("ms")
        .label_style(("sans-serif", 17))
        .draw()
        .map_err(|e| err(&e))?;
    for (name, v, color) in [("no store", &a, RED), ("Redis store", &b, BLUE)] {
        chart
            .draw_series(LineSeries::new(
                v.iter().enumerate().map(|(i, &y)| (i as f64 + 0.5, y)),
                color.stroke_width(2),
            ))
            .map_err(|e| err(&e))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_parse_and_prompts_rotate() {
        let json = r#"{"wall_ms":12.5,"generated_tokens":4,"sequences":[{"prompt_tokens":10,"reused_tokens":0,"prefilled_tokens":10,"generated_tokens":2,"first_token_ms":3.5},{"prompt_tokens":12,"reused_tokens":8,"prefilled_tokens":4,"generated_tokens":2,"first_token_ms":1.25}],"store":{"hits":1,"misses":0,"tokens_loaded":8,"bytes_loaded":100,"bytes_saved":300,"blocks_spilled":0,"restores_skipped":0,"rejected":0,"store_errors":0}}"#;
        let e = parse_summary(json);
        assert_eq!(
            (e.prompt_tokens, e.reused_tokens, e.prefilled_tokens),
            (22, 8, 14)
        );
        assert_eq!(e.first_token_ms, [3.5, 1.25]);
        assert_eq!((e.hits, e.bytes_loaded, e.bytes_saved), (1, 100, 300));
        assert_eq!(e.wall_ms, 12.5);
        // Engine 1 starts with the second system prompt, engine 0 reaches it next.
        assert!(prompts_of(1, 1)[0].starts_with(SYSTEMS[1]));
        assert!(prompts_of(0, 2)[1].starts_with(SYSTEMS[1]));
        assert!(Options::parse(&["--engines".into(), "0".into()]).is_err());
        assert_eq!(Options::parse(&[]).unwrap().engines, 4);
    }
}
