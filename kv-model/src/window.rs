//! StreamingLLM: a sliding window with attention sinks, so one sequence runs far past the
//! model's context in a cache of fixed size.
//!
//! The cache keeps the first `sinks` tokens and the most recent `window` (at least; up to a
//! block more), and drops whole blocks in between ([`PagedCache::evict_window`]). As in
//! StreamingLLM, positions are those *within the cache*: a query at cache index `i` sees a
//! key at cache index `j` at distance `i - j`.
//!
//! # Why keys are re-rotated on eviction, and only the sinks
//! RoPE makes a query-key score depend only on the difference of their positions. Each
//! token's K is rotated once, at its position in the text, when it is written. After an
//! eviction the window is still contiguous in the text, so between a query and a window
//! key the text distance equals the cache distance: those keys stay as written. Only the
//! sinks are now too far from the queries by the number of evicted tokens `e`; so on every
//! eviction the sinks' K rows are rewritten rotated to positions `e..e + sinks`, just
//! before the oldest kept window token. Then every distance equals the cache distance,
//! each eviction rewrites `sinks` rows per layer (not the window), and the backend and
//! its attention need no change.
//!
//! The other choice, storing keys before RoPE and rotating at attention time, would
//! change every backend's attention kernel and rotate every key on every step.
//!
//! The sinks' K is kept model-side as first rotated (at positions `0..sinks`), with their
//! V: rotating those keys by `e` more equals rotating the pre-RoPE keys at `j + e`
//! (rotations compose), and a rewrite needs V too (a backend write takes both). That is
//! `2 x layers x sinks` rows of f32, a small fixed cost.
//!
//! Positions grow past the context length; the RoPE table computes angles past it on
//! the spot (in f64). Every other path still refuses tokens past the context.
//!
//! # Layouts
//! Sinks are whole blocks (the rewrite must not touch window tokens, and eviction drops
//! whole blocks). Every per-token layout (f32, f16, bf16, int8, int4, int4h) quantizes
//! each row on its own, so a rewritten sink row is quantized afresh like any write. KIVI
//! layouts are refused: their keys are quantized per channel over 32-token blocks with
//! scales from all 32 keys, and rewriting sinks would need the backend to requantize a
//! whole key block in place, which the backend contract does not offer.

use candle_core::{DType, Tensor};
use kv_attention::PagedCache;
use kv_core::{CacheBackend, KvDType, SeqId};

use crate::rope::Rope;
use crate::{Logits, Model, ModelError, Result};

/// How much of a long sequence the cache keeps: StreamingLLM's attention sinks and window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowConfig {
    /// The first tokens, kept for the whole run (attention sinks); a multiple of the
    /// cache's block size, 0 for a plain sliding window.
    pub sinks: usize,
    /// Recent tokens kept: every query sees at least this many tokens before it (up to a
    /// block, plus the earlier tokens of its own chunk, more), besides the sinks.
    pub window: usize,
}

impl WindowConfig {
    /// Checks the window against a cache layout and the model's context.
    ///
    /// # Errors
    /// [`ModelError::InvalidArgument`] for a zero window, sinks that are not whole blocks,
    /// or sinks + window + a block beyond the context (distances the model never saw);
    /// [`ModelError::Unsupported`] for KIVI layouts (see the [module docs](crate::window)).
    pub fn validate(&self, block_size: usize, dtype: KvDType, context: usize) -> Result<()> {
        if self.window == 0 {
            return Err(ModelError::InvalidArgument {
                what: "window",
                expected: "at least 1 token".into(),
                got: "0".into(),
            });
        }
        if block_size == 0 || !self.sinks.is_multiple_of(block_size) {
            return Err(ModelError::InvalidArgument {
                what: "sinks",
                expected: format!(
                    "a multiple of the block size {block_size} (sinks are whole blocks; \
                     choose --block-size to divide --sinks)"
                ),
                got: self.sinks.to_string(),
            });
        }
        if matches!(dtype, KvDType::Kivi { .. }) {
            return Err(ModelError::Unsupported {
                what: "sliding window",
                detail: format!(
                    "{dtype} quantizes keys per 32-token block with scales shared by the \
                     block, so the sinks' keys cannot be rewritten at new positions row by \
                     row; use a per-token layout (f16, int8-g32, int4h-g32...)"
                ),
            });
        }
        let span = self
            .sinks
            .saturating_add(self.window)
            .saturating_add(block_size);
        if span > context {
            return Err(ModelError::InvalidArgument {
                what: "window",
                expected: format!(
                    "sinks + window + a block of {block_size} within the model's context of \
                     {context} tokens"
                ),
                got: format!("{} + {} + {block_size} = {span}", self.sinks, self.window),
            });
        }
        Ok(())
    }

    /// Cache blocks one windowed sequence needs when it is given at most `chunk` tokens
    /// per forward pass: the sinks, then a window of up to `window + block_size - 1`
    /// tokens before eviction, plus the chunk.
    ///
    /// Saturates at `usize::MAX` for sizes no cache can have (the cache then refuses them).
    pub fn blocks_needed(&self, block_size: usize, chunk: usize) -> usize {
        let bs = block_size.max(1);
        let tail = self
            .window
            .saturating_add(bs - 1)
            .saturating_add(chunk)
            .div_ceil(bs);
        (self.sinks / bs).saturating_add(tail)
    }
}

/// What a windowed run did, for reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowReport {
    /// The window it ran with.
    pub config: WindowConfig,
    /// Tokens dropped from the cache.
    pub evicted_tokens: usize,
    /// Most tokens the cache held at once.
    pub peak_tokens: usize,
    /// Most blocks the cache held at once.
    pub peak_blocks: usize,
}

/// One sequence under a sliding window: its id in the cache plus the sinks' K/V, kept here
/// to rewrite them on eviction (see the [module docs](crate::window)).
#[derive(Debug)]
pub struct WindowedSequence {
    seq: SeqId,
    config: WindowConfig,
    /// Per layer: the sinks' K as rotated at positions `0..rows` (`[rows, kv_heads,
    /// head_dim]`, f32), rows growing to `sinks` while the first tokens are written.
    sink_k: Vec<Option<Tensor>>,
    /// Per layer: the sinks' V, same shape.
    sink_v: Vec<Option<Tensor>>,
}

impl WindowedSequence {
    /// Starts an empty sequence in `cache` under `config`, for `model`.
    ///
    /// # Errors
    /// What [`WindowConfig::validate`] returns for the cache's layout and the model's
    /// context; [`ModelError::CacheMismatch`] for a cache of another shape.
    pub fn new<B: CacheBackend>(
        model: &Model,
        cache: &mut PagedCache<B>,
        config: WindowConfig,
    ) -> Result<Self> {
        if cache.spec().shape != model.shape() {
            return Err(ModelError::CacheMismatch {
                expected: format!("{:?}", model.shape()),
                got: format!("{:?}", cache.spec().shape),
            });
        }
        let spec = cache.spec();
        config.validate(spec.block_size, spec.dtype, model.config().context_length)?;
        Ok(Self::unchecked(cache, config))
    }

    /// A new sequence without the checks of [`WindowedSequence::new`].
    fn unchecked<B: CacheBackend>(cache: &mut PagedCache<B>, config: WindowConfig) -> Self {
        let layers = cache.spec().shape.n_layers();
        Self {
            seq: cache.create_sequence(),
            config,
            sink_k: vec![None; layers],
            sink_v: vec![None; layers],
        }
    }

    /// The sequence in the cache.
    pub fn seq(&self) -> SeqId {
        self.seq
    }

    /// The window it runs with.
    pub fn config(&self) -> WindowConfig {
        self.config
    }

    /// Sink rows captured in `layer`.
    fn captured(&self, layer: usize) -> usize {
        self.sink_k
            .get(layer)
            .and_then(Option::as_ref)
            .map_or(0, |t| t.dims().first().copied().unwrap_or(0))
    }

    /// Evicts the window blocks that `n` new tokens no longer need (each new token keeps at
    /// least `window` tokens before it), rewrites the sinks at their new positions, and
    /// returns the RoPE position of the first new token.
    ///
    /// The rotated keys are computed before anything changes; the backend writes after the
    /// eviction are of valid rows into valid slots. Should one fail anyway, the sinks are
    /// left at mixed positions and the sequence should be freed.
    pub(crate) fn make_room<B: CacheBackend>(
        &mut self,
        rope: &Rope,
        cache: &mut PagedCache<B>,
    ) -> Result<usize> {
        let (seq, s, w) = (self.seq, self.config.sinks, self.config.window);
        let bs = cache.spec().block_size;
        let len = cache.len(seq)?;
        let evict = len.saturating_sub(s + w) / bs;
        if evict > 0 {
            let shift = cache.evicted_tokens(seq)? + evict * bs;
            let mut rewrites = Vec::new();
            if s > 0 {
                for layer in 0..self.sink_k.len() {
                    let (Some(k), Some(v)) = (&self.sink_k[layer], &self.sink_v[layer]) else {
                        return Err(missing_sinks(layer, 0, s));
                    };
                    if self.captured(layer) != s {
                        return Err(missing_sinks(layer, self.captured(layer), s));
                    }
                    rewrites.push((rope.shift(k, shift)?, v.clone()));
                }
            }
            cache.evict_window(seq, s / bs, evict)?;
            if s > 0 {
                let table = cache.manager().table(seq)?;
                let slots = (0..s)
                    .map(|i| table.slot(i, bs))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| missing_sinks(0, table.len(), s))?;
                for (layer, (k, v)) in rewrites.iter().enumerate() {
                    cache.write(layer, &slots, k, v)?;
                }
            }
        }
        Ok(cache.len(seq)? + cache.evicted_tokens(seq)?)
    }

    /// Keeps the rows of `k`/`v` (the new tokens of `layer`, the first at cache index
    /// `first`) that are sinks, while nothing has been evicted.
    pub(crate) fn capture(
        &mut self,
        layer: usize,
        first: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<()> {
        let s = self.config.sinks;
        let have = self.captured(layer);
        if first >= s || have != first {
            return Ok(());
        }
        let rows = (s - first).min(k.dim(0)?);
        let take = |t: &Tensor, old: &Option<Tensor>| -> Result<Tensor> {
            let new = t.narrow(0, 0, rows)?.to_dtype(DType::F32)?;
            Ok(match old {
                Some(old) => Tensor::cat(&[old, &new], 0)?,
                None => new.contiguous()?,
            })
        };
        let k_all = take(k, &self.sink_k[layer])?;
        let v_all = take(v, &self.sink_v[layer])?;
        self.sink_k[layer] = Some(k_all);
        self.sink_v[layer] = Some(v_all);
        Ok(())
    }

    /// Forgets captured sink rows from cache index `len` on (a failed forward pass).
    pub(crate) fn forget_from(&mut self, len: usize) -> Result<()> {
        for t in self.sink_k.iter_mut().chain(self.sink_v.iter_mut()) {
            let kept = match t.as_ref() {
                Some(_) if len == 0 => None,
                Some(x) if x.dim(0)? > len => Some(x.narrow(0, 0, len)?),
                _ => continue,
            };
            *t = kept;
        }
        Ok(())
    }
}

fn missing_sinks(layer: usize, have: usize, want: usize) -> ModelError {
    ModelError::InvalidArgument {
        what: "windowed sequence",
        expected: format!("the K/V of all {want} sinks kept for layer {layer}"),
        got: format!("{have} rows (the sequence was changed outside its window)"),
    }
}

impl Model {
    /// Runs `tokens` as the next tokens of the windowed sequence `window`: first evicts the
    /// window blocks they no longer need (rewriting the sinks), then runs them at their
    /// positions in the text, which may be past the model's context. Returns logits as
    /// [`Model::forward`] does.
    ///
    /// ```no_run
    /// use kv_attention::PagedCache;
    /// use kv_backend_cpu::CpuBackend;
    /// use kv_core::{KvDType, StorageSpec};
    /// use kv_model::{Logits, Model, WindowConfig, WindowedSequence};
    ///
    /// let model = Model::load(kv_model::default_model_path())?;
    /// let config = WindowConfig { sinks: 16, window: 512 };
    /// let blocks = config.blocks_needed(16, 1);
    /// let spec = StorageSpec::new(model.shape(), KvDType::F16, 16, blocks)?;
    /// let mut cache = PagedCache::new(CpuBackend::new(), spec)?;
    /// let mut seq = WindowedSequence::new(&model, &mut cache, config)?;
    /// for _ in 0..10_000 {
    ///     // one token at a time, in a cache that never grows past `blocks`
    ///     model.forward_windowed(&[504], &mut cache, &mut seq, Logits::Last)?;
    /// }
    /// # Ok::<(), kv_model::ModelError>(())
    /// ```
    ///
    /// # Errors
    /// [`ModelError::EmptyPrompt`], [`ModelError::TokenOutOfRange`],
    /// [`ModelError::ContextOverflow`] when the cache plus `tokens` would span more than the
    /// context, [`ModelError::CacheMismatch`], and the cache's errors (`CacheFull` when the
    /// cache is smaller than [`WindowConfig::blocks_needed`]). On error the new tokens are
    /// forgotten; an eviction done before stays (it is valid on its own).
    pub fn forward_windowed<B: CacheBackend>(
        &self,
        tokens: &[u32],
        cache: &mut PagedCache<B>,
        window: &mut WindowedSequence,
        logits: Logits,
    ) -> Result<Tensor> {
        if cache.spec().shape != self.shape() {
            return Err(ModelError::CacheMismatch {
                expected: format!("{:?}", self.shape()),
                got: format!("{:?}", cache.spec().shape),
            });
        }
        self.check_tokens(tokens, 0)?;
        if self.config().sliding_window.is_some() {
            // Its local layers rotate with another RoPE base, and their own window would
            // apply to cache positions, which eviction makes differ from text positions.
            return Err(ModelError::Unsupported {
                what: "StreamingLLM window",
                detail: format!(
                    "{} models have sliding-window layers of their own; use the full cache",
                    self.config().architecture
                ),
            });
        }
        let position = window.make_room(self.rope(), cache)?;
        let seq = window.seq;
        let start = cache.len(seq)?;
        let n = tokens.len();
        let context = self.config().context_length;
        if start + n > context {
            return Err(ModelError::ContextOverflow {
                what: "window plus new tokens",
                needed: start + n,
                context,
            });
        }
        let slots = cache.reserve(seq, n)?;
        let result = cache
            .seq_attention(seq, n)
            .map_err(ModelError::from)
            .and_then(|seq_attn| {
                let batches = self.layer_batches(vec![seq_attn]);
                self.run(tokens, &[(position, n)], logits, |layer, q, k, v| {
                    cache.write(layer, &slots, k, v)?;
                    window.capture(layer, start, k, v)?;
                    Ok(cache.attend(layer, q, self.batch_for(&batches, layer))?)
                })
            });
        if result.is_err() {
            // Cannot fail: `seq` exists and `start` is within its length.
            let _ = cache.truncate(seq, start);
            let _ = window.forget_from(start);
        }
        result
    }
}

/// Perplexity of a text fed through one cache in chunks, as generation feeds it
/// ([`Model::perplexity_streaming`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StreamingScore {
    /// The window, `None` for a full cache.
    pub window: Option<WindowConfig>,
    /// Tokens scored.
    pub scored: usize,
    /// Mean negative log-likelihood of the scored tokens (nats).
    pub mean_nll: f64,
    /// Most blocks the cache held at once.
    pub peak_blocks: usize,
    /// Tokens evicted by the window.
    pub evicted_tokens: usize,
}

impl StreamingScore {
    /// `exp(mean_nll)`.
    pub fn perplexity(&self) -> f64 {
        self.mean_nll.exp()
    }
}

impl Model {
    /// Feeds `tokens` through one sequence, `chunk` tokens per forward pass, in a full
    /// cache (`window` `None`; the text must fit the context) or a windowed one, and scores
    /// every prediction of a token at index `score_from` or later. This is how StreamingLLM
    /// compares windows: with sinks, as a plain window (`sinks: 0`), and against the full
    /// context.
    ///
    /// # Errors
    /// [`ModelError::InvalidArgument`] for a zero chunk, a chunk longer than the window, or
    /// nothing to score,
    /// [`ModelError::ContextOverflow`] for a full cache longer than the context, what
    /// [`WindowConfig::validate`] and the forward passes return.
    pub fn perplexity_streaming<B: CacheBackend>(
        &self,
        backend: B,
        layout: crate::CacheLayout,
        window: Option<WindowConfig>,
        tokens: &[u32],
        chunk: usize,
        score_from: usize,
    ) -> Result<StreamingScore> {
        if chunk == 0 || score_from.max(1) >= tokens.len() {
            return Err(ModelError::InvalidArgument {
                what: "streaming perplexity",
                expected: "a chunk of at least 1 token and tokens to score after score_from".into(),
                got: format!(
                    "chunk {chunk}, {} tokens, scoring from {score_from}",
                    tokens.len()
                ),
            });
        }
        let bs = layout.block_size;
        let blocks = match window {
            Some(w) => {
                w.validate(bs, layout.dtype, self.config().context_length)?;
                // A pass of more tokens than the window attends over all of them: the
                // window would not apply inside the pass.
                if chunk > w.window {
                    return Err(ModelError::InvalidArgument {
                        what: "chunk",
                        expected: format!("at most the window of {} tokens", w.window),
                        got: chunk.to_string(),
                    });
                }
                w.blocks_needed(bs, chunk)
            }
            None => {
                let context = self.config().context_length;
                if tokens.len() > context {
                    return Err(ModelError::ContextOverflow {
                        what: "text in a full cache",
                        needed: tokens.len(),
                        context,
                    });
                }
                tokens.len().div_ceil(bs.max(1))
            }
        };
        let spec = kv_core::StorageSpec::new(self.shape(), layout.dtype, bs, blocks)?;
        let mut cache = PagedCache::new(backend, spec)?;
        let mut windowed = match window {
            Some(w) => Some(WindowedSequence::new(self, &mut cache, w)?),
            None => None,
        };
        let plain = cache.create_sequence();
        let (mut nll, mut scored, mut peak_blocks) = (0f64, 0usize, 0usize);
        for (c, part) in tokens.chunks(chunk).enumerate() {
            let first = c * chunk;
            let logits = match &mut windowed {
                Some(w) => self.forward_windowed(part, &mut cache, w, Logits::All)?,
                None => self.forward(part, &mut cache, plain, Logits::All)?,
            };
            peak_blocks = peak_blocks.max(cache.stats().used_blocks);
            let rows: Vec<Vec<f32>> = logits.to_vec2()?;
            for (r, row) in rows.iter().enumerate() {
                let target = first + r + 1;
                if target < score_from || target >= tokens.len() {
                    continue;
                }
                let (logp, _) = crate::ppl::log_softmax(row);
                let lp = logp.get(tokens[target] as usize).copied().ok_or(
                    ModelError::TokenOutOfRange {
                        id: tokens[target],
                        vocab: row.len(),
                    },
                )?;
                if !lp.is_finite() {
                    return Err(ModelError::NonFiniteLogits);
                }
                nll -= lp;
                scored += 1;
            }
        }
        let evicted_tokens = match &windowed {
            Some(w) => cache.evicted_tokens(w.seq())?,
            None => 0,
        };
        Ok(StreamingScore {
            window,
            scored,
            mean_nll: nll / scored.max(1) as f64,
            peak_blocks,
            evicted_tokens,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LlamaConfig;
    use candle_core::Device;
    use kv_backend_cpu::CpuBackend;
    use kv_core::{AttentionBatch, ModelShape, StorageSpec};

    const LAYERS: usize = 2;
    const Q_HEADS: usize = 4;
    const KV_HEADS: usize = 2;
    const D: usize = 32;

    fn rope_config() -> LlamaConfig {
        LlamaConfig {
            architecture: "llama".into(),
            n_layers: LAYERS,
            hidden_size: Q_HEADS * D,
            intermediate_size: 4,
            n_heads: Q_HEADS,
            n_kv_heads: KV_HEADS,
            head_dim: D,
            rope_dim: D,
            rope_freq_base: 10_000.0,
            rope_position_scale: 1.0,
            rms_norm_eps: 1e-5,
            // Shorter than the run: positions past it use angles computed on the spot.
            context_length: 32,
            vocab_size: 10,
            family: crate::config::Family::Llama,
            attention_scale: 1.0 / (D as f32).sqrt(),
            sliding_window: None,
            sliding_window_pattern: 1,
            rope_freq_base_local: 10_000.0,
            llama3_rope: None,
        }
    }

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Row `t` (`[heads, D]`) of a `[tokens, heads, D]` tensor of pre-RoPE values.
    fn rows(data: &[f32], heads: usize, from: usize, n: usize) -> Tensor {
        let w = heads * D;
        Tensor::from_vec(
            data[from * w..(from + n) * w].to_vec(),
            (n, heads, D),
            &Device::Cpu,
        )
        .unwrap()
    }

    /// Softmax attention of one query head over keys/values, in f64.
    fn reference(q: &[f32], keys: &[Vec<f32>], vals: &[Vec<f32>]) -> Vec<f64> {
        let scale = 1.0 / (D as f64).sqrt();
        let scores: Vec<f64> = keys
            .iter()
            .map(|k| {
                q.iter()
                    .zip(k)
                    .map(|(a, b)| f64::from(*a) * f64::from(*b))
                    .sum::<f64>()
                    * scale
            })
            .collect();
        let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
        let z: f64 = w.iter().sum();
        let mut out = vec![0f64; D];
        for (wj, v) in w.iter().zip(vals) {
            for (o, x) in out.iter_mut().zip(v) {
                *o += wj / z * f64::from(*x);
            }
        }
        out
    }

    /// Runs `total` tokens through a windowed cache (chunks from `chunks`, then one at a
    /// time) as the model does, and checks every query's attention output against plain
    /// attention over the kept tokens, their pre-RoPE keys rotated at their cache positions
    /// and the query at its own cache position (StreamingLLM's definition).
    fn windowed_attention_matches_reference(dtype: KvDType, tol: f64) {
        let (bs, sinks, window, total) = (4, 4, 10, 60);
        let rope = Rope::new(&rope_config(), None, &Device::Cpu).unwrap();
        let config = WindowConfig { sinks, window };
        let chunk = 5;
        let blocks = config.blocks_needed(bs, chunk);
        let shape = ModelShape::new(LAYERS, Q_HEADS, KV_HEADS, D).unwrap();
        let spec = StorageSpec::new(shape, dtype, bs, blocks).unwrap();
        let mut cache = PagedCache::new(CpuBackend::new(), spec).unwrap();
        let mut w = WindowedSequence::unchecked(&mut cache, config);
        let seq = w.seq();
        let data = |layer: usize, what: u64, heads: usize| {
            values(total * heads * D, 100 * layer as u64 + what)
        };
        let (k_raw, v_raw, q_raw): (Vec<_>, Vec<_>, Vec<_>) = (
            (0..LAYERS).map(|l| data(l, 1, KV_HEADS)).collect(),
            (0..LAYERS).map(|l| data(l, 2, KV_HEADS)).collect(),
            (0..LAYERS).map(|l| data(l, 3, Q_HEADS)).collect(),
        );
        // The text index of each token the cache holds, in cache order.
        let mut held: Vec<usize> = Vec::new();
        let mut next = 0;
        let mut evicted_seen = 0;
        let mut peak_blocks = 0;
        while next < total {
            let n = if next == 0 { chunk } else { 1 };
            let position = w.make_room(&rope, &mut cache).unwrap();
            let evicted = cache.evicted_tokens(seq).unwrap();
            if evicted > evicted_seen {
                held.drain(sinks..sinks + (evicted - evicted_seen));
            }
            evicted_seen = evicted;
            assert_eq!(position, next, "RoPE position is the text position");
            let start = cache.len(seq).unwrap();
            assert_eq!(start, held.len());
            if next >= sinks + window {
                // At least `window` tokens before the new one, less than a block more.
                let kept = start - sinks;
                assert!((window..window + bs).contains(&kept), "kept {kept}");
            }
            let slots = cache.reserve(seq, n).unwrap();
            held.extend(next..next + n);
            let attn = cache.seq_attention(seq, n).unwrap();
            let batch = AttentionBatch::new(vec![attn], D);
            for layer in 0..LAYERS {
                let k = rope
                    .apply(&rows(&k_raw[layer], KV_HEADS, next, n), position)
                    .unwrap();
                let v = rows(&v_raw[layer], KV_HEADS, next, n);
                cache.write(layer, &slots, &k, &v).unwrap();
                w.capture(layer, start, &k, &v).unwrap();
                let q = rope
                    .apply(&rows(&q_raw[layer], Q_HEADS, next, n), position)
                    .unwrap();
                let out: Vec<f32> = cache
                    .attend(layer, &q, &batch)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                for r in 0..n {
                    let qi = start + r; // the query's cache index
                    let q_rot: Vec<f32> = rope
                        .apply(&rows(&q_raw[layer], Q_HEADS, next + r, 1), qi)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    for h in 0..Q_HEADS {
                        let kh = h / (Q_HEADS / KV_HEADS);
                        let (mut keys, mut vals) = (Vec::new(), Vec::new());
                        for (j, &t) in held[..=qi].iter().enumerate() {
                            let k: Vec<f32> = rope
                                .apply(&rows(&k_raw[layer], KV_HEADS, t, 1), j)
                                .unwrap()
                                .flatten_all()
                                .unwrap()
                                .to_vec1()
                                .unwrap();
                            keys.push(k[kh * D..(kh + 1) * D].to_vec());
                            let v = &v_raw[layer][(t * KV_HEADS + kh) * D..][..D];
                            vals.push(v.to_vec());
                        }
                        let want = reference(&q_rot[h * D..(h + 1) * D], &keys, &vals);
                        let got = &out[(r * Q_HEADS + h) * D..][..D];
                        for (g, w) in got.iter().zip(&want) {
                            assert!(
                                (f64::from(*g) - w).abs() < tol,
                                "{dtype}: token {} layer {layer} head {h}: {g} vs {w}",
                                next + r
                            );
                        }
                    }
                }
            }
            peak_blocks = peak_blocks.max(cache.stats().used_blocks);
            next += n;
        }
        assert!(
            evicted_seen >= total - sinks - window - bs,
            "evicted {evicted_seen}"
        );
        assert!(peak_blocks <= blocks);
        assert_eq!(cache.manager().audit(), Ok(()));
    }

    #[test]
    fn windowed_attention_f32_matches_streaming_llm() {
        windowed_attention_matches_reference(KvDType::F32, 1e-4);
    }

    #[test]
    fn windowed_attention_quantized_rewrites_sinks() {
        windowed_attention_matches_reference(KvDType::F16, 5e-3);
        windowed_attention_matches_reference(
            KvDType::Int8 {
                group: kv_core::QuantGroup::G32,
            },
            5e-2,
        );
    }

    #[test]
    fn config_is_checked() {
        let ok = WindowConfig {
            sinks: 16,
            window: 100,
        };
        assert!(ok.validate(16, KvDType::F16, 8192).is_ok());
        assert!(ok.validate(32, KvDType::F16, 8192).is_err()); // sinks not whole blocks
        assert!(matches!(
            ok.validate(16, KvDType::kivi(kv_core::KiviBits::B4), 8192),
            Err(ModelError::Unsupported { .. })
        ));
        assert!(ok.validate(16, KvDType::F16, 100).is_err()); // beyond the context
        let zero = WindowConfig {
            sinks: 0,
            window: 0,
        };
        assert!(zero.validate(16, KvDType::F16, 8192).is_err());
        // sinks 16 = 1 block, window up to 100 + 15, chunk 1: ceil(116 / 16) = 8 more.
        assert_eq!(ok.blocks_needed(16, 1), 9);
    }
}
