//! Perplexity with the KV cache in each layout: what a cache layout costs in quality.
//!
//! Scoring follows llama.cpp's `perplexity` tool, so numbers compare across engines: the
//! tokens of the text are cut into non-overlapping chunks of `ctx` tokens (a shorter tail
//! is dropped); the first token of each chunk is replaced by BOS when the vocabulary asks
//! for BOS (SmolLM2's does not); each chunk is run from an empty cache, and only its second
//! half is scored: the logits at positions `ctx/2 .. ctx-2` predicting tokens
//! `ctx/2 + 1 .. ctx-1`, so every scored token has at least `ctx/2` tokens of context.
//! Perplexity is `exp` of the mean negative log-likelihood over all scored tokens.
//!
//! Every layout runs the same chunks through a [`PagedCache`] exactly as generation does:
//! each sub-batch of `batch` tokens is written into the cache (quantized on write) by
//! [`Model::forward`] before its attention reads the cache, so every query attends over the
//! stored, quantized K and V of all earlier tokens and of its own sub-batch. For layouts
//! that store each row on its own (f16, INT8, INT4) the sub-batch size changes nothing but
//! speed, and for KIVI too: a query reads the keys of its own 32-token block (and, with a
//! residual `R`, those of the blocks ending within `R` tokens and the values of the last `R`
//! tokens) in f16 however many tokens were written with it, so a sub-batch computes what
//! generation's decode loop computes.
//!
//! Against the f16 cache (always run, as the reference) every other layout reports the
//! change of perplexity, the mean KL divergence `KL(p_f16 || p_layout)` of the next-token
//! distributions at the scored positions, and how often both put the same token first.
//!
//! [`PagedCache`]: kv_attention::PagedCache

use std::fmt;

use candle_core::Tensor;
use kv_core::{memory, CacheBackend, KvDType, StorageSpec};

use crate::{Logits, Model, ModelError, Result};

/// A layout whose perplexity is more than this fraction above f16's is reported as
/// unsuitable for the model (`0.10`: 10%).
pub const UNSUITABLE_INCREASE: f64 = 0.10;

/// What [`Model::perplexity`] evaluates, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PerplexityOptions {
    /// Tokens per chunk (llama.cpp's `--ctx-size`).
    pub ctx: usize,
    /// Layouts to evaluate; f16 is added first if missing (it is the reference).
    pub layouts: Vec<KvDType>,
    /// Tokens per cache block (a multiple of 32 for KIVI).
    pub block_size: usize,
    /// Tokens written and attended per forward pass within a chunk.
    pub batch: usize,
    /// Evaluate at most this many chunks (all when `None`).
    pub max_chunks: Option<usize>,
}

impl Default for PerplexityOptions {
    /// ctx 512, the f16, INT8, INT4 and KIVI layouts, blocks of 32, sub-batches of 64.
    fn default() -> Self {
        Self {
            ctx: 512,
            layouts: ["f16", "int8-g32", "int4-g32", "kivi4", "kivi2"]
                .iter()
                .filter_map(|n| n.parse().ok())
                .collect(),
            block_size: 32,
            batch: 64,
            max_chunks: None,
        }
    }
}

/// Where a run is, for progress display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerplexityProgress {
    /// Forward passes done so far.
    pub done: usize,
    /// Forward passes of the whole run.
    pub total: usize,
    /// Chunk being evaluated (0-based) and how many there are.
    pub chunk: usize,
    /// Chunks of the run.
    pub chunks: usize,
    /// Layout being evaluated.
    pub layout: KvDType,
}

/// The scores of one layout.
#[derive(Debug, Clone, PartialEq)]
pub struct LayoutScore {
    /// The cache layout.
    pub dtype: KvDType,
    /// Bytes one token costs in the cache (all layers, K and V).
    pub bytes_per_token: usize,
    /// Bytes of the f16 windows one decoding sequence holds on top, all layers
    /// ([`memory::sequence_window_bytes`]; 0 for layouts without windows).
    pub window_bytes: usize,
    /// Mean negative log-likelihood of the scored tokens (nats).
    pub mean_nll: f64,
    /// `exp(mean_nll)`.
    pub perplexity: f64,
    /// `perplexity / f16's - 1` (0 for f16).
    pub change: f64,
    /// Mean `KL(p_f16 || p_layout)` over the scored positions (nats; 0 for f16).
    pub mean_kl: f64,
    /// Fraction of scored positions where the most likely token equals f16's.
    pub top1: f64,
}

impl LayoutScore {
    /// Whether the layout loses more than [`UNSUITABLE_INCREASE`] of perplexity against f16
    /// on this model and text.
    pub fn is_unsuitable(&self) -> bool {
        self.change > UNSUITABLE_INCREASE
    }
}

/// The result of [`Model::perplexity`]; [`fmt::Display`] prints the table.
#[derive(Debug, Clone, PartialEq)]
pub struct PerplexityReport {
    /// Tokens of the text.
    pub tokens: usize,
    /// Tokens per chunk.
    pub ctx: usize,
    /// Chunks evaluated.
    pub chunks: usize,
    /// Tokens scored over all chunks.
    pub scored: usize,
    /// Tokens per cache block.
    pub block_size: usize,
    /// Tokens per forward pass.
    pub batch: usize,
    /// One entry per layout, f16 (the reference) first.
    pub layouts: Vec<LayoutScore>,
}

impl PerplexityReport {
    /// The score of `dtype`, if it was evaluated.
    pub fn get(&self, dtype: KvDType) -> Option<&LayoutScore> {
        self.layouts.iter().find(|l| l.dtype == dtype)
    }
}

impl fmt::Display for PerplexityReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} tokens, {} chunks of {} (each scored on its second half: {} tokens), cache \
             blocks of {}, {} tokens per forward pass",
            self.tokens, self.chunks, self.ctx, self.scored, self.block_size, self.batch
        )?;
        writeln!(
            f,
            "{:<10} {:>11} {:>10} {:>11} {:>9} {:>10} {:>8}  verdict",
            "layout", "bytes/token", "window", "perplexity", "vs f16", "mean KL", "top-1"
        )?;
        for l in &self.layouts {
            let reference = l.dtype == KvDType::F16;
            let (change, kl, top1) = if reference {
                ("-".to_string(), "-".to_string(), "-".to_string())
            } else {
                (
                    format!("{:+.2}%", 100.0 * l.change),
                    format!("{:.2e}", l.mean_kl),
                    format!("{:.1}%", 100.0 * l.top1),
                )
            };
            let verdict = if reference {
                "reference".to_string()
            } else if l.is_unsuitable() {
                format!(
                    "UNSUITABLE for this model (loses more than {:.0}%)",
                    100.0 * UNSUITABLE_INCREASE
                )
            } else {
                "ok".to_string()
            };
            writeln!(
                f,
                "{:<10} {:>11} {:>10} {:>11.4} {:>9} {:>10} {:>8}  {verdict}",
                l.dtype.name(),
                l.bytes_per_token,
                if l.window_bytes == 0 {
                    "-".to_string()
                } else {
                    memory::format_bytes(l.window_bytes as u64)
                },
                l.perplexity,
                change,
                kl,
                top1
            )?;
        }
        Ok(())
    }
}

/// Sums of one layout over the scored tokens.
#[derive(Debug, Default, Clone, Copy)]
struct Sums {
    nll: f64,
    kl: f64,
    agree: usize,
    count: usize,
}

/// `log softmax(row)` in f64, and the index of the largest entry.
pub(crate) fn log_softmax(row: &[f32]) -> (Vec<f64>, usize) {
    let (mut best, mut max) = (0, f32::NEG_INFINITY);
    for (i, &x) in row.iter().enumerate() {
        if x > max {
            (best, max) = (i, x);
        }
    }
    let max = f64::from(max);
    let log_z = row
        .iter()
        .map(|&x| (f64::from(x) - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    (row.iter().map(|&x| f64::from(x) - log_z).collect(), best)
}

impl Model {
    /// Perplexity of `tokens` with the KV cache in each of `options.layouts`, scored the way
    /// llama.cpp's perplexity tool scores (see the [module docs](crate::ppl)), with the f16
    /// layout as the reference for the change, KL divergence and top-1 agreement. `bos` is
    /// the token that replaces the first token of each chunk, `None` when the vocabulary
    /// does not ask for BOS. `progress` is called after every forward pass.
    ///
    /// ```no_run
    /// use kv_backend_cpu::CpuBackend;
    /// use kv_model::ppl::PerplexityOptions;
    ///
    /// let (model, tokenizer) = kv_model::load(kv_model::default_model_path())?;
    /// let text = std::fs::read_to_string("../shared/corpus/gpl-3.txt").expect("a text");
    /// let tokens = tokenizer.encode(&text)?;
    /// let options = PerplexityOptions { ctx: 512, ..PerplexityOptions::default() };
    /// let report = model.perplexity(&CpuBackend::new(), &tokens, tokenizer.bos_to_add(), &options, |_| {})?;
    /// println!("{report}");
    /// # Ok::<(), kv_model::ModelError>(())
    /// ```
    ///
    /// # Errors
    /// [`ModelError::InvalidArgument`] for a `ctx` below 3 or above the model's context, a
    /// zero batch, no layouts, or fewer tokens than one chunk; the cache's errors (a block
    /// size the layout refuses, a layout the backend lacks); [`ModelError::NonFiniteLogits`].
    pub fn perplexity<B: CacheBackend>(
        &self,
        backend: &B,
        tokens: &[u32],
        bos: Option<u32>,
        options: &PerplexityOptions,
        mut progress: impl FnMut(&PerplexityProgress),
    ) -> Result<PerplexityReport> {
        let ctx = options.ctx;
        let context = self.config().context_length;
        if ctx < 3 || ctx > context {
            return Err(ModelError::InvalidArgument {
                what: "ctx",
                expected: format!("3..={context} tokens per chunk"),
                got: ctx.to_string(),
            });
        }
        if options.batch == 0 {
            return Err(ModelError::InvalidArgument {
                what: "batch",
                expected: "at least 1 token per forward pass".into(),
                got: "0".into(),
            });
        }
        let mut layouts = vec![KvDType::F16];
        for &d in &options.layouts {
            if !layouts.contains(&d) {
                layouts.push(d);
            }
        }
        let mut chunks = tokens.len() / ctx;
        if let Some(max) = options.max_chunks {
            chunks = chunks.min(max);
        }
        if chunks == 0 {
            return Err(ModelError::InvalidArgument {
                what: "text",
                expected: format!("at least one chunk of {ctx} tokens"),
                got: format!("{} tokens", tokens.len()),
            });
        }
        // Every layout must fit before hours are spent on the others.
        let num_blocks = ctx.div_ceil(options.block_size.max(1));
        let specs = layouts
            .iter()
            .map(|&d| {
                Ok(StorageSpec::new(
                    self.shape(),
                    d,
                    options.block_size,
                    num_blocks,
                )?)
            })
            .collect::<Result<Vec<_>>>()?;
        for spec in &specs {
            if !backend.supports(spec.dtype) {
                return Err(kv_core::KvError::Unsupported {
                    backend: backend.name().to_string(),
                    what: format!("the {} cache layout", spec.dtype),
                }
                .into());
            }
        }

        let first = ctx / 2;
        let scored = ctx - 1 - first;
        let passes = ctx.div_ceil(options.batch);
        let mut sums = vec![Sums::default(); layouts.len()];
        let mut done = 0;
        for c in 0..chunks {
            let mut chunk = tokens[c * ctx..(c + 1) * ctx].to_vec();
            if let Some(b) = bos {
                chunk[0] = b;
            }
            let targets = &chunk[first + 1..];
            // Log-probabilities of the f16 run at the scored positions.
            let mut reference: Vec<Vec<f64>> = Vec::new();
            let mut reference_top: Vec<usize> = Vec::new();
            for (li, spec) in specs.iter().enumerate() {
                let rows =
                    self.scored_logits(backend, *spec, &chunk, first, options.batch, |_| {
                        done += 1;
                        progress(&PerplexityProgress {
                            done,
                            total: chunks * layouts.len() * passes,
                            chunk: c,
                            chunks,
                            layout: spec.dtype,
                        });
                    })?;
                for (i, row) in rows.chunks_exact(self.config().vocab_size).enumerate() {
                    if row.iter().any(|x| !x.is_finite()) {
                        return Err(ModelError::NonFiniteLogits);
                    }
                    let (logp, top) = log_softmax(row);
                    let s = &mut sums[li];
                    s.nll -= logp[targets[i] as usize];
                    s.count += 1;
                    if li == 0 {
                        reference.push(logp);
                        reference_top.push(top);
                    } else {
                        let p = &reference[i];
                        s.kl += p
                            .iter()
                            .zip(&logp)
                            .map(|(&lp, &lq)| lp.exp() * (lp - lq))
                            .sum::<f64>();
                        s.agree += usize::from(top == reference_top[i]);
                    }
                }
            }
        }

        let shape = self.shape();
        let reference_ppl = (sums[0].nll / sums[0].count.max(1) as f64).exp();
        let layouts = layouts
            .iter()
            .zip(&sums)
            .enumerate()
            .map(|(i, (&dtype, s))| {
                let n = s.count.max(1) as f64;
                let perplexity = (s.nll / n).exp();
                Ok(LayoutScore {
                    dtype,
                    bytes_per_token: memory::bytes_per_token(&shape, dtype)?,
                    window_bytes: memory::sequence_window_bytes(&shape, dtype, options.block_size)?,
                    mean_nll: s.nll / n,
                    perplexity,
                    change: perplexity / reference_ppl - 1.0,
                    mean_kl: s.kl / n,
                    top1: if i == 0 { 1.0 } else { s.agree as f64 / n },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(PerplexityReport {
            tokens: tokens.len(),
            ctx,
            chunks,
            scored: chunks * scored,
            block_size: options.block_size,
            batch: options.batch,
            layouts,
        })
    }

    /// Runs one chunk through a fresh cache of `spec` in sub-batches of `batch` tokens and
    /// returns the logits of positions `first..chunk.len() - 1`, row after row.
    fn scored_logits<B: CacheBackend>(
        &self,
        backend: &B,
        spec: StorageSpec,
        chunk: &[u32],
        first: usize,
        batch: usize,
        mut on_pass: impl FnMut(usize),
    ) -> Result<Vec<f32>> {
        // Sliding-window layers free their blocks behind the window between passes.
        let mut cache = self.new_cache(backend, spec, batch, true)?;
        let seq = cache.create_sequence();
        let last = chunk.len() - 1; // the last token is only a target
        let mut out = Vec::with_capacity((last - first) * self.config().vocab_size);
        for start in (0..chunk.len()).step_by(batch) {
            let end = (start + batch).min(chunk.len());
            // Rows start..end; the scored ones are first..last.
            let (lo, hi) = (first.max(start), last.min(end));
            let mode = if lo < hi { Logits::All } else { Logits::Last };
            let logits: Tensor = self.forward(&chunk[start..end], &mut cache, seq, mode)?;
            if lo < hi {
                let rows = logits.narrow(0, lo - start, hi - lo)?;
                out.extend(rows.flatten_all()?.to_vec1::<f32>()?);
            }
            on_pass(start);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_normalises_and_finds_the_top() {
        let (lp, top) = log_softmax(&[1.0, 3.0, 2.0, -1.0]);
        assert_eq!(top, 1);
        let total: f64 = lp.iter().map(|x| x.exp()).sum();
        assert!((total - 1.0).abs() < 1e-12);
        assert!((lp[1] - lp[2] - 1.0).abs() < 1e-12);
    }

    #[test]
    fn the_table_flags_unsuitable_layouts() {
        let score = |name: &str, ppl: f64| LayoutScore {
            dtype: name.parse().unwrap(),
            bytes_per_token: 1,
            window_bytes: if name.contains("-r") { 3 << 20 } else { 0 },
            mean_nll: ppl.ln(),
            perplexity: ppl,
            change: ppl / 10.0 - 1.0,
            mean_kl: 0.01,
            top1: 0.9,
        };
        let report = PerplexityReport {
            tokens: 1000,
            ctx: 100,
            chunks: 10,
            scored: 490,
            block_size: 32,
            batch: 64,
            layouts: vec![
                score("f16", 10.0),
                score("int8", 10.05),
                score("kivi2", 11.5),
                score("kivi2-r128", 10.2),
            ],
        };
        let text = report.to_string();
        let line = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .unwrap()
                .to_string()
        };
        assert!(line("f16").ends_with("reference"), "{text}");
        assert!(line("kivi2-r128").contains(" 3 MiB ") && line("kivi2-r128").ends_with("ok"));
        assert!(line("int8-g32").contains("+0.50%") && line("int8-g32").ends_with("ok"));
        assert!(line("kivi2").contains("UNSUITABLE"), "{text}");
        assert!(report
            .get("kivi2".parse().unwrap())
            .unwrap()
            .is_unsuitable());
        assert!(!report.get(KvDType::F16).unwrap().is_unsuitable());
    }
}
