//! Generation loops with and without a KV cache, and what they report.

use std::fmt;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use kv_attention::{CacheUsage, PagedCache};
use kv_core::{memory, CacheBackend, KvDType, StorageSpec};

use crate::window::{WindowConfig, WindowReport, WindowedSequence};
use crate::{Logits, Model, ModelError, Result, Sampler, SamplingConfig};

/// How the cache stores K/V: the row layout and the tokens per block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLayout {
    /// Element type of cached rows.
    pub dtype: KvDType,
    /// Tokens per block: 1 is maximally paged, a huge value is one contiguous block.
    pub block_size: usize,
}

impl Default for CacheLayout {
    fn default() -> Self {
        Self {
            dtype: KvDType::F16,
            block_size: 16,
        }
    }
}

/// What to generate and when to stop.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// Most new tokens (a stop token counts as one).
    pub max_tokens: usize,
    /// How tokens are picked.
    pub sampling: SamplingConfig,
    /// Tokens that end generation when produced, usually
    /// [`crate::Tokenizer::stop_tokens`]. Empty: always generate `max_tokens`.
    pub stop_tokens: Vec<u32>,
    /// Keep the logits of every step in [`Generation::logits`] (tests compare them).
    pub keep_logits: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_tokens: 128,
            sampling: SamplingConfig::greedy(),
            stop_tokens: Vec::new(),
            keep_logits: false,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A stop token was produced (it is the last of [`Generation::tokens`]).
    StopToken(u32),
    /// `max_tokens` were produced.
    MaxTokens,
}

/// Which path produced a generation, and with what cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheReport {
    /// No cache: the whole sequence was recomputed at every step.
    None,
    /// A paged KV cache.
    Paged {
        /// [`CacheBackend::name`].
        backend: String,
        /// Layout of cached rows.
        layout: CacheLayout,
        /// Tokens and bytes held when generation ended.
        usage: CacheUsage,
        /// The sliding window, when generation ran with one ([`Model::generate_windowed`]).
        window: Option<WindowReport>,
    },
}

/// The numbers of one generation run.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated (stop token included).
    pub generated_tokens: usize,
    /// Time of the first forward pass over the prompt, sampling the first token included.
    pub prefill_time: Duration,
    /// Forward passes after the prefill (one per generated token after the first).
    pub decode_steps: usize,
    /// Time of those passes.
    pub decode_time: Duration,
    /// The cache used, if any.
    pub cache: CacheReport,
}

impl Summary {
    /// Prompt tokens processed per second during prefill.
    pub fn prefill_tokens_per_s(&self) -> f64 {
        rate(self.prompt_tokens, self.prefill_time)
    }

    /// Tokens generated per second after the first.
    pub fn decode_tokens_per_s(&self) -> f64 {
        rate(self.decode_steps, self.decode_time)
    }

    /// Bytes of K/V held for the sequence (0 without a cache).
    pub fn cache_bytes_in_use(&self) -> u64 {
        match &self.cache {
            CacheReport::None => 0,
            CacheReport::Paged { usage, .. } => usage.bytes_used,
        }
    }

    /// Bytes each cached token costs (0 without a cache).
    pub fn cache_bytes_per_token(&self) -> usize {
        match &self.cache {
            CacheReport::None => 0,
            CacheReport::Paged { usage, .. } => usage.bytes_per_token,
        }
    }
}

/// Items per second, 0 when nothing was timed.
pub(crate) fn rate(n: usize, t: Duration) -> f64 {
    let secs = t.as_secs_f64();
    if n == 0 || secs == 0.0 {
        0.0
    } else {
        n as f64 / secs
    }
}

impl fmt::Display for Summary {
    /// A few aligned lines for a terminal.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.cache {
            CacheReport::None => writeln!(
                f,
                "cache            none (whole sequence recomputed every step)"
            )?,
            CacheReport::Paged {
                backend,
                layout,
                window,
                ..
            } => {
                writeln!(
                    f,
                    "cache            {backend}, {}, paged in blocks of {} tokens",
                    layout.dtype, layout.block_size
                )?;
                if let Some(w) = window {
                    writeln!(
                        f,
                        "window           {} sinks + {} recent tokens; {} tokens evicted; peak {} tokens in {} blocks",
                        w.config.sinks, w.config.window, w.evicted_tokens, w.peak_tokens, w.peak_blocks
                    )?;
                }
            }
        }
        writeln!(f, "prompt tokens    {}", self.prompt_tokens)?;
        writeln!(f, "generated tokens {}", self.generated_tokens)?;
        writeln!(
            f,
            "prefill          {} tokens in {:.3} s = {:.1} tokens/s",
            self.prompt_tokens,
            self.prefill_time.as_secs_f64(),
            self.prefill_tokens_per_s()
        )?;
        writeln!(
            f,
            "decode           {} tokens in {:.3} s = {:.1} tokens/s",
            self.decode_steps,
            self.decode_time.as_secs_f64(),
            self.decode_tokens_per_s()
        )?;
        match &self.cache {
            CacheReport::None => write!(f, "cache in use     0 B"),
            CacheReport::Paged { usage, .. } => {
                write!(
                    f,
                    "cache in use     {} for {} tokens ({} per token); {} reserved in blocks, {} allocated",
                    memory::format_bytes(usage.bytes_used),
                    usage.tokens,
                    memory::format_bytes(usage.bytes_per_token as u64),
                    memory::format_bytes(usage.bytes_reserved),
                    memory::format_bytes(usage.bytes_allocated),
                )?;
                if let Some(line) = window_saving(usage) {
                    write!(f, "\n{line}")?;
                }
                Ok(())
            }
        }
    }
}

/// The tokens of one run and how it went.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// New tokens, in order (the stop token last if one ended the run).
    pub tokens: Vec<u32>,
    /// Why it ended.
    pub stop: StopReason,
    /// Timings, sizes, cache.
    pub summary: Summary,
    /// With [`GenerateOptions::keep_logits`]: the logits each token was picked from.
    pub logits: Vec<Vec<f32>>,
}

impl Model {
    /// Generates from `prompt` with a paged KV cache on `backend`: one forward pass over the
    /// prompt, then one per token, each reading earlier K/V from the cache. `on_token` sees
    /// every token as it is chosen; its error stops generation.
    ///
    /// The cache is sized for `prompt.len() + max_tokens` tokens rounded up to whole blocks,
    /// so it never fills or truncates.
    ///
    /// ```no_run
    /// use kv_backend_cpu::CpuBackend;
    /// use kv_model::{CacheLayout, GenerateOptions, Model, Tokenizer};
    ///
    /// let path = kv_model::default_model_path();
    /// let (model, tokenizer) = (Model::load(&path)?, Tokenizer::from_gguf_file(&path)?);
    /// let prompt = tokenizer.encode("The capital of France is")?;
    /// let options = GenerateOptions { max_tokens: 16, ..GenerateOptions::default() };
    /// let run = model.generate(CpuBackend::new(), CacheLayout::default(), &prompt, &options, |_| Ok(()))?;
    /// println!("{}\n{}", tokenizer.decode(&run.tokens)?, run.summary);
    /// # Ok::<(), kv_model::ModelError>(())
    /// ```
    ///
    /// # Errors
    /// [`ModelError::EmptyPrompt`], [`ModelError::ContextOverflow`] when the prompt or the
    /// prompt plus `max_tokens` exceed the context, [`ModelError::InvalidArgument`] for zero
    /// `max_tokens` or block size or bad sampling, the cache's and the callback's errors.
    pub fn generate<B: CacheBackend>(
        &self,
        backend: B,
        layout: CacheLayout,
        prompt: &[u32],
        options: &GenerateOptions,
        on_token: impl FnMut(u32) -> Result<()>,
    ) -> Result<Generation> {
        let spec = self.request_spec(layout, prompt, options)?;
        // With sliding-window layers the prompt runs in chunks, so their blocks behind the
        // window are freed during the prefill too and their pool stays small.
        let chunk = prompt.len().clamp(1, PREFILL_CHUNK);
        let mut cache = self.new_cache(backend, spec, chunk, true)?;
        let seq = cache.create_sequence();
        let sliding = cache.sliding_layers().is_some();
        let run = run_loop(prompt, options, on_token, |new, _| {
            if !sliding {
                return self.forward(new, &mut cache, seq, Logits::Last);
            }
            let mut last = None;
            for part in new.chunks(chunk) {
                last = Some(self.forward(part, &mut cache, seq, Logits::Last)?);
            }
            last.ok_or(ModelError::EmptyPrompt)
        })?;
        Ok(run.finish(CacheReport::Paged {
            backend: cache.backend().name().to_string(),
            layout,
            usage: cache.usage(),
            window: None,
        }))
    }

    /// Generates from `prompt` with StreamingLLM's sliding window ([`crate::window`]): the
    /// cache keeps the first `window.sinks` tokens and the last `window.window` (up to a
    /// block more), so generation runs past the model's context in a cache of fixed size,
    /// [`WindowConfig::blocks_needed`] blocks. The prompt runs in chunks of at most
    /// `window.window` tokens (and 256), each evicting what the next no longer needs.
    ///
    /// While nothing is evicted this is [`Model::generate`]: same positions, same cache
    /// contents, same tokens.
    ///
    /// # Errors
    /// [`ModelError::EmptyPrompt`], [`ModelError::InvalidArgument`] for zero `max_tokens`,
    /// bad sampling, or a window [`WindowConfig::validate`] refuses,
    /// [`ModelError::Unsupported`] for KIVI layouts, the cache's and the callback's errors.
    /// Neither the prompt nor `max_tokens` is limited by the context.
    pub fn generate_windowed<B: CacheBackend>(
        &self,
        backend: B,
        layout: CacheLayout,
        window: WindowConfig,
        prompt: &[u32],
        options: &GenerateOptions,
        on_token: impl FnMut(u32) -> Result<()>,
    ) -> Result<Generation> {
        check_options(prompt, options)?;
        window.validate(
            layout.block_size,
            layout.dtype,
            self.config().context_length,
        )?;
        let chunk = window.window.clamp(1, PREFILL_CHUNK);
        let spec = StorageSpec::new(
            self.shape(),
            layout.dtype,
            layout.block_size,
            window.blocks_needed(layout.block_size, chunk),
        )?;
        let mut cache = PagedCache::new(backend, spec)?;
        let mut seq = WindowedSequence::new(self, &mut cache, window)?;
        let (mut peak_tokens, mut peak_blocks) = (0, 0);
        let run = run_loop(prompt, options, on_token, |new, _| {
            let mut last = None;
            for part in new.chunks(chunk) {
                last = Some(self.forward_windowed(part, &mut cache, &mut seq, Logits::Last)?);
                peak_tokens = peak_tokens.max(cache.len(seq.seq())?);
                peak_blocks = peak_blocks.max(cache.stats().used_blocks);
            }
            last.ok_or(ModelError::EmptyPrompt)
        })?;
        let report = WindowReport {
            config: window,
            evicted_tokens: cache.evicted_tokens(seq.seq())?,
            peak_tokens,
            peak_blocks,
        };
        Ok(run.finish(CacheReport::Paged {
            backend: cache.backend().name().to_string(),
            layout,
            usage: cache.usage(),
            window: Some(report),
        }))
    }

    /// Generates from `prompt` without a cache: every step runs
    /// [`Model::forward_uncached`] over the prompt and all tokens generated so far. Slow by
    /// design (quadratic); it measures what the cache saves and checks it.
    ///
    /// # Errors
    /// As [`Model::generate`], less the cache's.
    pub fn generate_uncached(
        &self,
        prompt: &[u32],
        options: &GenerateOptions,
        on_token: impl FnMut(u32) -> Result<()>,
    ) -> Result<Generation> {
        self.check_request(prompt, options)?;
        let run = run_loop(prompt, options, on_token, |_, all| {
            self.forward_uncached(all, Logits::Last)
        })?;
        Ok(run.finish(CacheReport::None))
    }

    /// Checks a one-sequence request and sizes its cache: the prompt plus `max_tokens`, in
    /// blocks of `layout.block_size`.
    pub(crate) fn request_spec(
        &self,
        layout: CacheLayout,
        prompt: &[u32],
        options: &GenerateOptions,
    ) -> Result<StorageSpec> {
        self.check_request(prompt, options)?;
        if layout.block_size == 0 {
            return Err(ModelError::InvalidArgument {
                what: "block size",
                expected: "at least 1 token".into(),
                got: "0".into(),
            });
        }
        // Both are within the context (check_request), so no overflow.
        let capacity = prompt.len() + options.max_tokens;
        Ok(StorageSpec::new(
            self.shape(),
            layout.dtype,
            layout.block_size,
            capacity.div_ceil(layout.block_size),
        )?)
    }

    pub(crate) fn check_request(&self, prompt: &[u32], options: &GenerateOptions) -> Result<()> {
        check_options(prompt, options)?;
        let context = self.config().context_length;
        if prompt.len() > context {
            return Err(ModelError::ContextOverflow {
                what: "prompt",
                needed: prompt.len(),
                context,
            });
        }
        let total = prompt.len().saturating_add(options.max_tokens);
        if total > context {
            return Err(ModelError::ContextOverflow {
                what: "prompt plus max tokens",
                needed: total,
                context,
            });
        }
        Ok(())
    }
}

/// Capacity reserved up front for generated tokens; more grow on use, so a huge
/// `max_tokens` allocates nothing in proportion to itself.
pub(crate) const INITIAL_TOKENS: usize = 1024;

/// Largest prompt chunk of a windowed run: bounds the cache a chunk adds to the window.
pub(crate) const PREFILL_CHUNK: usize = 256;

/// What a cache's sliding-window layers saved, as `kv generate`, `kv chat` and `kv batch`
/// print it; `None` for a cache without a sliding-window group.
///
/// ```
/// use kv_attention::CacheUsage;
/// let usage = CacheUsage {
///     tokens: 0, bytes_used: 0, bytes_reserved: 0, bytes_allocated: 0,
///     bytes_per_token: 0, sliding: None,
/// };
/// assert_eq!(kv_model::window_saving(&usage), None);
/// ```
pub fn window_saving(usage: &CacheUsage) -> Option<String> {
    let s = usage.sliding.as_ref()?;
    Some(format!(
        "sliding window   {} layers keep their last {} tokens ({} held, {} blocks freed): \
         {} reserved instead of {} with every layer global, {} saved",
        s.layers,
        s.window,
        s.tokens,
        s.freed_blocks,
        memory::format_bytes(usage.bytes_reserved),
        memory::format_bytes(s.bytes_all_global),
        memory::format_bytes(s.bytes_saved),
    ))
}

/// What every generation needs, whatever its cache: a prompt, tokens to make, valid
/// sampling.
fn check_options(prompt: &[u32], options: &GenerateOptions) -> Result<()> {
    if prompt.is_empty() {
        return Err(ModelError::EmptyPrompt);
    }
    options.sampling.validate()?;
    if options.max_tokens == 0 {
        return Err(ModelError::InvalidArgument {
            what: "max tokens",
            expected: "at least 1".into(),
            got: "0".into(),
        });
    }
    Ok(())
}

/// A finished loop before the cache report is attached.
pub(crate) struct Run {
    tokens: Vec<u32>,
    stop: StopReason,
    logits: Vec<Vec<f32>>,
    prompt_tokens: usize,
    prefill_time: Duration,
    decode_steps: usize,
    decode_time: Duration,
}

impl Run {
    pub(crate) fn finish(self, cache: CacheReport) -> Generation {
        Generation {
            summary: Summary {
                prompt_tokens: self.prompt_tokens,
                generated_tokens: self.tokens.len(),
                prefill_time: self.prefill_time,
                decode_steps: self.decode_steps,
                decode_time: self.decode_time,
                cache,
            },
            tokens: self.tokens,
            stop: self.stop,
            logits: self.logits,
        }
    }
}

/// The loop both paths share: `step(new_tokens, whole_sequence)` returns `[1, vocab]`
/// logits for the last token.
pub(crate) fn run_loop(
    prompt: &[u32],
    options: &GenerateOptions,
    mut on_token: impl FnMut(u32) -> Result<()>,
    mut step: impl FnMut(&[u32], &[u32]) -> Result<Tensor>,
) -> Result<Run> {
    let mut sampler = Sampler::new(options.sampling)?;
    let mut sequence = prompt.to_vec();
    let mut run = Run {
        // Grown as tokens come: with a window, max_tokens is not bounded by the context.
        tokens: Vec::with_capacity(options.max_tokens.min(INITIAL_TOKENS)),
        stop: StopReason::MaxTokens,
        logits: Vec::new(),
        prompt_tokens: prompt.len(),
        prefill_time: Duration::ZERO,
        decode_steps: 0,
        decode_time: Duration::ZERO,
    };
    let mut new: &[u32] = prompt;
    let mut last;
    loop {
        let started = Instant::now();
        let out = step(new, &sequence)?;
        // On a GPU the token is picked there (argmax, or the sampling kernel) and one id
        // comes back, not the logits.
        let (token, logits) = if !out.device().is_cpu() && !options.keep_logits {
            (sampler.sample_tensor(&out)?, Vec::new())
        } else {
            let logits: Vec<f32> = out.squeeze(0)?.to_vec1()?;
            (sampler.sample(&logits)?, logits)
        };
        let took = started.elapsed();
        if run.tokens.is_empty() {
            run.prefill_time = took;
        } else {
            run.decode_steps += 1;
            run.decode_time += took;
        }
        if options.keep_logits {
            run.logits.push(logits);
        }
        run.tokens.push(token);
        sequence.push(token);
        on_token(token)?;
        if options.stop_tokens.contains(&token) {
            run.stop = StopReason::StopToken(token);
            break;
        }
        if run.tokens.len() == options.max_tokens {
            break;
        }
        last = [token];
        new = &last;
    }
    Ok(run)
}
