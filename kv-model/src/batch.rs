//! Many sequences through one model and one cache: a ragged batched forward pass,
//! continuous batching with greedy decoding, prefix reuse and preemption (`kv batch`).
//!
//! [`Model::forward_batch`] runs the new tokens of several sequences of different lengths
//! as one forward pass: their tokens are concatenated, each keeps its own RoPE positions,
//! and every layer makes one attention call whose [`AttentionBatch`](kv_core::AttentionBatch) holds one
//! [`kv_core::SeqAttention`] per sequence.
//!
//! [`Model::generate_batch`] schedules prompts over such passes:
//! - a prompt joins after its own prefill, which skips the full blocks the prefix cache
//!   already holds ([`PagedCache::create_with_prefix`]); written tokens are committed
//!   ([`PagedCache::commit`]) so later prompts can reuse them;
//! - every step then decodes one token of each running sequence in one pass, and a
//!   sequence leaves as soon as it produces a stop token or reaches `max_tokens`;
//! - when the cache is full, the newest running sequence is preempted (its blocks freed)
//!   and queued first; it resumes later by recomputing its prompt and the tokens it had
//!   generated (reusing whatever of them the prefix cache still holds). A full cache
//!   slows the batch down; it fails only when a single sequence cannot fit alone.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use kv_attention::{CacheUsage, PagedCache, TieredCache};
use kv_core::{CacheBackend, CacheStats, KvError, SeqId, StorageSpec};

use crate::generate::rate;
use crate::{Logits, Model, ModelError, Result, Sampler, SamplingConfig, StopReason};

/// What [`Model::generate_batch`] generates and how many sequences run at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchOptions {
    /// Most new tokens per sequence (a stop token counts as one).
    pub max_tokens: usize,
    /// Tokens that end a sequence when produced; empty: always `max_tokens`.
    pub stop_tokens: Vec<u32>,
    /// Most sequences decoding together; more wait in a queue.
    pub max_batch: usize,
}

impl Default for BatchOptions {
    fn default() -> Self {
        Self {
            max_tokens: 128,
            stop_tokens: Vec::new(),
            max_batch: 16,
        }
    }
}

/// How one sequence of a batch went.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqOutcome {
    /// New tokens, in order (the stop token last if one ended it); greedy.
    pub tokens: Vec<u32>,
    /// Why it ended.
    pub stop: StopReason,
    /// Tokens of its prompt.
    pub prompt_tokens: usize,
    /// Prompt tokens whose K/V came from the prefix cache when it was first admitted.
    pub reused_tokens: usize,
    /// Tokens run through prefill, recomputations after preemption included.
    pub prefilled_tokens: usize,
    /// Time of those prefill passes.
    pub prefill_time: Duration,
    /// Time to first token: from its first admission to its first token (its first
    /// prefill pass and the sampling).
    pub first_token: Duration,
    /// Times it was paused to make room.
    pub preemptions: usize,
    /// When it was first admitted, from the start of the run.
    pub started: Duration,
    /// When it ended, from the start of the run.
    pub finished: Duration,
}

impl SeqOutcome {
    /// Tokens generated per second between its admission and its end.
    pub fn tokens_per_s(&self) -> f64 {
        rate(
            self.tokens.len(),
            self.finished.saturating_sub(self.started),
        )
    }
}

/// The result of [`Model::generate_batch`]: every sequence, in prompt order, and the totals.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchRun {
    /// One per prompt, in the order given.
    pub sequences: Vec<SeqOutcome>,
    /// Time of the whole run.
    pub wall_time: Duration,
    /// Batched decode passes run.
    pub decode_steps: usize,
    /// Most sequences decoding in one pass.
    pub peak_batch: usize,
    /// Most blocks held by sequences at once.
    pub peak_used_blocks: usize,
    /// Most blocks held by two or more sequences at once.
    pub peak_shared_blocks: usize,
    /// The cache's counters when the run ended (all sequences freed).
    pub stats: CacheStats,
    /// Tokens per block of the cache.
    pub block_size: usize,
    /// With sliding-window layers ([`Model::new_batch_cache`]): the cache's usage at the
    /// pass where freeing the window layers' old blocks saved the most bytes.
    pub window: Option<CacheUsage>,
}

impl BatchRun {
    /// Tokens generated over all sequences.
    pub fn generated_tokens(&self) -> usize {
        self.sequences.iter().map(|s| s.tokens.len()).sum()
    }

    /// Tokens generated over all sequences per second of the whole run.
    pub fn tokens_per_s(&self) -> f64 {
        rate(self.generated_tokens(), self.wall_time)
    }

    /// Prompt tokens reused from the prefix cache at first admission, over all sequences.
    pub fn reused_tokens(&self) -> usize {
        self.sequences.iter().map(|s| s.reused_tokens).sum()
    }

    /// Prefill throughput measured in this run (tokens per second), 0 without prefill.
    pub fn prefill_tokens_per_s(&self) -> f64 {
        let tokens = self.sequences.iter().map(|s| s.prefilled_tokens).sum();
        let time = self.sequences.iter().map(|s| s.prefill_time).sum();
        rate(tokens, time)
    }

    /// Prefill time the reused tokens saved: an estimate, [`BatchRun::reused_tokens`]
    /// divided by the prefill rate measured in this run (prefill cost grows a little
    /// faster than linearly with length, so this slightly underestimates).
    pub fn prefill_time_saved(&self) -> Duration {
        let per_s = self.prefill_tokens_per_s();
        if per_s == 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(self.reused_tokens() as f64 / per_s)
        }
    }

    /// Preemptions over all sequences.
    pub fn preemptions(&self) -> usize {
        self.sequences.iter().map(|s| s.preemptions).sum()
    }
}

impl fmt::Display for BatchRun {
    /// A table of sequences and a few lines of totals, for a terminal.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "seq  prompt  reused  tokens  preempted  tokens/s  stop")?;
        for (i, s) in self.sequences.iter().enumerate() {
            let stop = match s.stop {
                StopReason::StopToken(t) => format!("stop token {t}"),
                StopReason::MaxTokens => "max tokens".into(),
            };
            writeln!(
                f,
                "{i:>3}  {:>6}  {:>6}  {:>6}  {:>9}  {:>8.1}  {stop}",
                s.prompt_tokens,
                s.reused_tokens,
                s.tokens.len(),
                s.preemptions,
                s.tokens_per_s()
            )?;
        }
        writeln!(
            f,
            "aggregate        {} tokens in {:.3} s = {:.1} tokens/s ({} decode steps, up to {} sequences per step)",
            self.generated_tokens(),
            self.wall_time.as_secs_f64(),
            self.tokens_per_s(),
            self.decode_steps,
            self.peak_batch
        )?;
        writeln!(
            f,
            "cache blocks     {} total of {} tokens; peak used {}, peak shared {}; {} cached at end, {} evicted",
            self.stats.total_blocks,
            self.block_size,
            self.peak_used_blocks,
            self.peak_shared_blocks,
            self.stats.cached_blocks,
            self.stats.evicted_blocks
        )?;
        writeln!(
            f,
            "prefix reuse     {} prompt tokens reused ({} blocks); prefill time saved ~{:.3} s \
             (estimate: reused tokens / measured prefill rate {:.1} tokens/s)",
            self.reused_tokens(),
            self.reused_tokens() / self.block_size.max(1),
            self.prefill_time_saved().as_secs_f64(),
            self.prefill_tokens_per_s()
        )?;
        write!(f, "preemptions      {}", self.preemptions())?;
        if let Some(line) = self.window.as_ref().and_then(crate::window_saving) {
            write!(f, "\n{line} (at the peak)")?;
        }
        Ok(())
    }
}

/// Whether `e` says the cache had no room (the batch runner's cue to preempt).
fn is_cache_full(e: &ModelError) -> bool {
    matches!(e, ModelError::Cache(KvError::CacheFull { .. }))
}

/// A prompt's progress through [`Model::generate_batch`].
struct Entry<'a> {
    prompt: &'a [u32],
    out: SeqOutcome,
    admitted: bool,
}

impl Entry<'_> {
    /// Prompt and generated tokens: what a (re)admission computes.
    fn context(&self) -> Vec<u32> {
        let mut c = self.prompt.to_vec();
        c.extend_from_slice(&self.out.tokens);
        c
    }
}

impl Model {
    /// Runs the new tokens of several sequences as one forward pass: `items` pairs each
    /// sequence with its next tokens (any number, so prefills and decodes can mix). Each
    /// sequence's positions continue from the tokens it holds; every layer writes all new
    /// K/V and makes one attention call over all sequences. Returns logits in item order:
    /// `[items.len(), vocab]` for [`Logits::Last`], one row per token for [`Logits::All`].
    ///
    /// Token ids are not committed: call [`PagedCache::commit`] for each sequence after.
    ///
    /// ```no_run
    /// use kv_attention::PagedCache;
    /// use kv_backend_cpu::CpuBackend;
    /// use kv_core::{KvDType, StorageSpec};
    /// use kv_model::{Logits, Model};
    ///
    /// let model = Model::load(kv_model::default_model_path())?;
    /// let spec = StorageSpec::new(model.shape(), KvDType::F32, 16, 8)?;
    /// let mut cache = PagedCache::new(CpuBackend::new(), spec)?;
    /// let (a, b) = (cache.create_sequence(), cache.create_sequence());
    /// let logits = model.forward_batch(&[(a, &[1, 9690, 198][..]), (b, &[504][..])], &mut cache, Logits::Last)?;
    /// assert_eq!(logits.dims()[0], 2);
    /// assert_eq!((cache.len(a)?, cache.len(b)?), (3, 1));
    /// # Ok::<(), kv_model::ModelError>(())
    /// ```
    ///
    /// # Errors
    /// [`ModelError::InvalidArgument`] for no items or a sequence named twice, and per item
    /// the errors of [`Model::forward`] (`CacheFull` among them). On error every sequence
    /// is left as it was.
    pub fn forward_batch<B: CacheBackend>(
        &self,
        items: &[(SeqId, &[u32])],
        cache: &mut PagedCache<B>,
        logits: Logits,
    ) -> Result<Tensor> {
        crate::model::on_pool(|| self.forward_batch_here(items, cache, logits))
    }

    /// [`Model::forward_batch`] on the calling thread.
    fn forward_batch_here<B: CacheBackend>(
        &self,
        items: &[(SeqId, &[u32])],
        cache: &mut PagedCache<B>,
        logits: Logits,
    ) -> Result<Tensor> {
        if items.is_empty() {
            return Err(ModelError::InvalidArgument {
                what: "batch",
                expected: "at least one sequence".into(),
                got: "none".into(),
            });
        }
        if cache.spec().shape != self.shape() {
            return Err(ModelError::CacheMismatch {
                expected: format!("{:?}", self.shape()),
                got: format!("{:?}", cache.spec().shape),
            });
        }
        let mut segments = Vec::with_capacity(items.len());
        for (i, (seq, tokens)) in items.iter().enumerate() {
            if items[..i].iter().any(|(other, _)| other == seq) {
                return Err(ModelError::InvalidArgument {
                    what: "batch",
                    expected: "each sequence once".into(),
                    got: format!("sequence {seq} twice"),
                });
            }
            let start = cache.len(*seq)?;
            self.check_tokens(tokens, start)?;
            segments.push((start, tokens.len()));
        }
        let tokens: Vec<u32> = items.iter().flat_map(|(_, t)| t.iter().copied()).collect();
        let mut slots = Vec::with_capacity(tokens.len());
        let mut reserved = 0;
        let mut result = Ok(());
        for (seq, new) in items {
            match cache.reserve(*seq, new.len()) {
                Ok(s) => {
                    slots.extend(s);
                    reserved += 1;
                }
                Err(e) => {
                    result = Err(ModelError::from(e));
                    break;
                }
            }
        }
        let result = result.and_then(|()| {
            let seqs: Vec<(SeqId, usize)> =
                items.iter().map(|(seq, new)| (*seq, new.len())).collect();
            let batches = self.cache_batches(cache, &seqs)?;
            self.run(&tokens, &segments, logits, |layer, q, k, v| {
                cache.write(layer, &slots, k, v)?;
                Ok(cache.attend(layer, q, self.batch_for(&batches, layer))?)
            })
        });
        if result.is_err() {
            for ((seq, _), &(start, _)) in items.iter().zip(&segments).take(reserved) {
                // Cannot fail: `seq` exists and `start` is within its length.
                let _ = cache.truncate(*seq, start);
            }
        }
        result
    }

    /// A prefix-caching cache of `spec` (salt `cache_salt`) for [`Model::generate_batch`]:
    /// for a model with sliding-window layers (Gemma 3), two groups
    /// ([`PagedCache::with_sliding_window`]) whose window layers free their blocks as each
    /// sequence's window slides, their pool sized for `max_batch` sequences while one
    /// prefills `longest` tokens at once (the longest prompt plus `max_tokens`: a preempted
    /// sequence prefills what it generated too); otherwise one group, as
    /// [`PagedCache::with_prefix_cache`] makes. `kv batch` uses it, with `--store` too
    /// ([`TieredCache`] keeps each group's blocks under keys of their own).
    ///
    /// # Errors
    /// [`ModelError::InvalidArgument`] for zero `max_batch`; the cache's errors (a zero
    /// `longest`, sizes that overflow, a layout the backend does not store).
    pub fn new_batch_cache<B: CacheBackend>(
        &self,
        backend: B,
        spec: StorageSpec,
        longest: usize,
        max_batch: usize,
        cache_salt: u64,
    ) -> Result<PagedCache<B>> {
        let sliding = self.sliding_layers(
            spec.dtype,
            spec.block_size,
            longest,
            max_batch,
            spec.num_blocks,
        )?;
        Ok(match sliding {
            Some(s) => PagedCache::with_sliding_window(backend, spec, s, Some(cache_salt))?,
            None => PagedCache::with_prefix_cache(backend, spec, cache_salt)?,
        })
    }

    /// Generates greedily from every prompt with continuous batching over `cache` (see the
    /// [module documentation](crate::batch)). Create the cache with
    /// [`PagedCache::with_prefix_cache`] for prefix reuse; it may be smaller than all
    /// prompts need at once, down to what the longest sequence needs alone (its prompt
    /// plus `max_tokens - 1` tokens: the last token is sampled, never written). Every sequence
    /// is freed when the run ends (indexed blocks stay cached for the next run).
    ///
    /// ```no_run
    /// use kv_attention::PagedCache;
    /// use kv_backend_cpu::CpuBackend;
    /// use kv_core::{KvDType, StorageSpec};
    /// use kv_model::{BatchOptions, Model, Tokenizer};
    ///
    /// let path = kv_model::default_model_path();
    /// let (model, tokenizer) = kv_model::load(&path)?;
    /// let prompts = vec![tokenizer.encode("The sky is")?, tokenizer.encode("Two plus two is")?];
    /// let spec = StorageSpec::new(model.shape(), KvDType::F16, 16, 64)?;
    /// let mut cache = PagedCache::with_prefix_cache(CpuBackend::new(), spec, 1)?;
    /// let options = BatchOptions { max_tokens: 16, ..BatchOptions::default() };
    /// let run = model.generate_batch(&mut cache, &prompts, &options)?;
    /// for seq in &run.sequences {
    ///     println!("{}", tokenizer.decode(&seq.tokens)?);
    /// }
    /// println!("{run}");
    /// # Ok::<(), kv_model::ModelError>(())
    /// ```
    ///
    /// # Errors
    /// [`ModelError::EmptyPrompt`], [`ModelError::ContextOverflow`] when a prompt plus
    /// `max_tokens` exceeds the context, [`ModelError::InvalidArgument`] for zero
    /// `max_tokens` or `max_batch`, a cache error (`CacheFull`) when one sequence cannot fit
    /// even alone, and the model's errors. Sequences already created are freed on error.
    pub fn generate_batch<B: CacheBackend>(
        &self,
        cache: &mut PagedCache<B>,
        prompts: &[Vec<u32>],
        options: &BatchOptions,
    ) -> Result<BatchRun> {
        self.run_batch(cache, prompts, options)
    }

    /// [`Model::generate_batch`] over a cache backed by block tiers
    /// ([`kv_attention::store`]): a prompt's full blocks the device lacks are restored from
    /// the tiers (counted as reused), a prompt's full blocks are written to the tiers
    /// lacking them once prefilled ([`TieredCache::save`], so engines running beside this
    /// one find them), blocks the device evicts to make room and the blocks
    /// of preempted sequences are copied down to the first tier, and a preempted sequence
    /// resumes from the device and the tiers before anything is recomputed (the restore
    /// rule of [`TieredCache`] decides, fed with the prefill rate measured in this run). At
    /// the end every full block still cached on the device is written down
    /// ([`TieredCache::flush`]), so a later run or another engine sharing the tier restores
    /// it. What the tiers did: [`TieredCache::stats`].
    ///
    /// # Errors
    /// As [`Model::generate_batch`]; a failing tier is not an error (it costs the prefill it
    /// would have saved).
    pub fn generate_batch_with_store<B: CacheBackend>(
        &self,
        cache: &mut TieredCache<B>,
        prompts: &[Vec<u32>],
        options: &BatchOptions,
    ) -> Result<BatchRun> {
        let mut pool = Tiered {
            cache,
            prefilled: (0, Duration::ZERO),
        };
        let run = self.run_batch(&mut pool, prompts, options)?;
        if pool.cache.cache().backend().supports_block_bytes() {
            pool.cache.flush();
        }
        Ok(run)
    }

    fn run_batch<B: CacheBackend, P: Pool<B>>(
        &self,
        pool: &mut P,
        prompts: &[Vec<u32>],
        options: &BatchOptions,
    ) -> Result<BatchRun> {
        self.check_batch(prompts, options)?;
        let mut running: Vec<(usize, SeqId)> = Vec::new();
        let result = self.schedule(pool, prompts, options, &mut running);
        if result.is_err() {
            for &(_, seq) in &running {
                // Cleanup on the error path: the sequence exists, freeing cannot fail.
                let _ = pool.release(seq);
            }
        }
        result
    }

    fn check_batch(&self, prompts: &[Vec<u32>], options: &BatchOptions) -> Result<()> {
        for (what, value) in [
            ("max tokens", options.max_tokens),
            ("max batch", options.max_batch),
        ] {
            if value == 0 {
                return Err(ModelError::InvalidArgument {
                    what,
                    expected: "at least 1".into(),
                    got: "0".into(),
                });
            }
        }
        let context = self.config().context_length;
        for prompt in prompts {
            if prompt.is_empty() {
                return Err(ModelError::EmptyPrompt);
            }
            let total = prompt.len().saturating_add(options.max_tokens);
            if total > context {
                return Err(ModelError::ContextOverflow {
                    what: "prompt plus max tokens",
                    needed: total,
                    context,
                });
            }
            self.check_tokens(prompt, 0)?;
        }
        Ok(())
    }

    /// The scheduler behind [`Model::generate_batch`]; `running` (prompt index, sequence),
    /// oldest first, is the caller's so it can free what is left on error.
    fn schedule<B: CacheBackend, P: Pool<B>>(
        &self,
        pool: &mut P,
        prompts: &[Vec<u32>],
        options: &BatchOptions,
        running: &mut Vec<(usize, SeqId)>,
    ) -> Result<BatchRun> {
        let begin = Instant::now();
        let mut sampler = Sampler::new(SamplingConfig::greedy())?;
        let mut entries: Vec<Entry<'_>> = prompts
            .iter()
            .map(|p| Entry {
                prompt: p,
                admitted: false,
                out: SeqOutcome {
                    tokens: Vec::with_capacity(
                        options.max_tokens.min(crate::generate::INITIAL_TOKENS),
                    ),
                    stop: StopReason::MaxTokens,
                    prompt_tokens: p.len(),
                    reused_tokens: 0,
                    prefilled_tokens: 0,
                    prefill_time: Duration::ZERO,
                    first_token: Duration::ZERO,
                    preemptions: 0,
                    started: Duration::ZERO,
                    finished: Duration::ZERO,
                },
            })
            .collect();
        let mut queue: VecDeque<usize> = (0..prompts.len()).collect();
        let mut run = BatchRun {
            sequences: Vec::new(),
            wall_time: Duration::ZERO,
            decode_steps: 0,
            peak_batch: 0,
            peak_used_blocks: 0,
            peak_shared_blocks: 0,
            stats: pool.paged().stats(),
            block_size: pool.paged().spec().block_size,
            window: None,
        };
        // Records a token; true when the sequence is finished.
        let push = |entry: &mut Entry<'_>, token: u32| -> bool {
            entry.out.tokens.push(token);
            let done = if options.stop_tokens.contains(&token) {
                entry.out.stop = StopReason::StopToken(token);
                true
            } else {
                entry.out.tokens.len() == options.max_tokens
            };
            if done {
                entry.out.finished = begin.elapsed();
            }
            done
        };

        while !queue.is_empty() || !running.is_empty() {
            // Admit waiting sequences (preempted ones first) while they fit with a block
            // of headroom per running sequence for the next decode step.
            while running.len() < options.max_batch {
                let Some(&i) = queue.front() else { break };
                let context = entries[i].context();
                let cache = pool.paged();
                let need = cache.prefix_match(&context, 0).blocks_needed;
                if !running.is_empty() && need + running.len() > cache.manager().free_blocks() {
                    break;
                }
                queue.pop_front();
                let (seq, reused) = pool.admit(&context);
                let entry = &mut entries[i];
                if !entry.admitted {
                    entry.admitted = true;
                    entry.out.started = begin.elapsed();
                    entry.out.reused_tokens = reused;
                }
                let new = &context[reused..];
                let t0 = Instant::now();
                pool.before_pass(&[(seq, new.len())]);
                let logits = match self.forward_batch(&[(seq, new)], pool.paged(), Logits::Last) {
                    Ok(l) => l,
                    Err(e) => {
                        // The sequence is empty of new work; it exists, so freeing succeeds.
                        let _ = pool.release(seq);
                        if is_cache_full(&e) && !running.is_empty() {
                            queue.push_front(i);
                            break;
                        }
                        return Err(e);
                    }
                };
                pool.paged().commit(seq, new)?;
                // On a GPU the argmax is taken there: one id comes back, not the logits.
                let token = if logits.device().is_cpu() {
                    sampler.sample(&logits.squeeze(0)?.to_vec1::<f32>()?)?
                } else {
                    crate::greedy_token(&logits)?
                };
                let took = t0.elapsed();
                if entry.out.first_token.is_zero() {
                    entry.out.first_token = took;
                }
                entry.out.prefill_time += took;
                entry.out.prefilled_tokens += new.len();
                pool.prefilled(seq, new.len(), took);
                if push(entry, token) {
                    pool.release(seq)?;
                } else {
                    running.push((i, seq));
                }
                track(&mut run, pool.paged(), 0);
            }
            if running.is_empty() {
                continue;
            }

            // One decode pass over every running sequence; preempt the newest while full.
            let logits = loop {
                let inputs: Vec<[u32; 1]> = running
                    .iter()
                    .map(|&(i, _)| [*entries[i].out.tokens.last().unwrap_or(&0)])
                    .collect();
                let items: Vec<(SeqId, &[u32])> = running
                    .iter()
                    .zip(&inputs)
                    .map(|(&(_, seq), t)| (seq, &t[..]))
                    .collect();
                let sizes: Vec<(SeqId, usize)> = items.iter().map(|&(s, _)| (s, 1)).collect();
                pool.before_pass(&sizes);
                match self.forward_batch(&items, pool.paged(), Logits::Last) {
                    Ok(l) => break l,
                    Err(e) if is_cache_full(&e) && running.len() > 1 => {
                        if let Some((i, seq)) = running.pop() {
                            pool.pause(seq)?;
                            entries[i].out.preemptions += 1;
                            queue.push_front(i);
                        }
                    }
                    Err(e) => return Err(e),
                }
            };
            run.decode_steps += 1;
            track(&mut run, pool.paged(), running.len());
            let tokens: Vec<u32> = if logits.device().is_cpu() {
                let rows: Vec<Vec<f32>> = logits.to_vec2()?;
                rows.iter()
                    .map(|row| sampler.sample(row))
                    .collect::<Result<_>>()?
            } else {
                crate::greedy_rows(&logits)?
            };
            let mut still = Vec::with_capacity(running.len());
            for (&(i, seq), &token) in running.iter().zip(&tokens) {
                let entry = &mut entries[i];
                let input = *entry.out.tokens.last().unwrap_or(&0);
                pool.paged().commit(seq, &[input])?;
                if push(entry, token) {
                    pool.release(seq)?;
                } else {
                    still.push((i, seq));
                }
            }
            *running = still;
        }
        run.wall_time = begin.elapsed();
        run.stats = pool.paged().stats();
        run.sequences = entries.into_iter().map(|e| e.out).collect();
        Ok(run)
    }
}

/// Updates the peaks of `run` from the cache now, with `batch` sequences in the last pass.
fn track<B: CacheBackend>(run: &mut BatchRun, cache: &PagedCache<B>, batch: usize) {
    let stats = cache.stats();
    run.peak_batch = run.peak_batch.max(batch);
    run.peak_used_blocks = run.peak_used_blocks.max(stats.used_blocks);
    run.peak_shared_blocks = run.peak_shared_blocks.max(stats.shared_blocks);
    let usage = cache.usage();
    let saved = |u: &CacheUsage| u.sliding.map_or(0, |s| s.bytes_saved);
    if usage.sliding.is_some() && run.window.as_ref().is_none_or(|w| saved(&usage) > saved(w)) {
        run.window = Some(usage);
    }
}

/// The cache a batch runs on: a [`PagedCache`], or one backed by tiers that writes blocks
/// down before the device evicts them and restores them on admission.
trait Pool<B: CacheBackend> {
    fn paged(&mut self) -> &mut PagedCache<B>;
    /// Starts a sequence for `context`, reusing what the caches hold.
    fn admit(&mut self, context: &[u32]) -> (SeqId, usize);
    fn release(&mut self, seq: SeqId) -> kv_core::Result<()>;
    fn pause(&mut self, seq: SeqId) -> kv_core::Result<()>;
    /// Called before a pass that appends these tokens to these sequences.
    fn before_pass(&mut self, appends: &[(SeqId, usize)]);
    /// `seq`'s prefill of `tokens` (now committed) took `time`.
    fn prefilled(&mut self, seq: SeqId, tokens: usize, time: Duration);
}

impl<B: CacheBackend> Pool<B> for PagedCache<B> {
    fn paged(&mut self) -> &mut PagedCache<B> {
        self
    }
    fn admit(&mut self, context: &[u32]) -> (SeqId, usize) {
        self.create_with_prefix(context)
    }
    fn release(&mut self, seq: SeqId) -> kv_core::Result<()> {
        self.free(seq)
    }
    fn pause(&mut self, seq: SeqId) -> kv_core::Result<()> {
        self.preempt(seq).map(|_| ())
    }
    fn before_pass(&mut self, _: &[(SeqId, usize)]) {}
    fn prefilled(&mut self, _: SeqId, _: usize, _: Duration) {}
}

/// A [`TieredCache`] and the prefill measured so far (tokens, time) for its restore rule.
struct Tiered<'a, B: CacheBackend> {
    cache: &'a mut TieredCache<B>,
    prefilled: (usize, Duration),
}

impl<B: CacheBackend> Pool<B> for Tiered<'_, B> {
    fn paged(&mut self) -> &mut PagedCache<B> {
        self.cache.cache_mut()
    }
    fn admit(&mut self, context: &[u32]) -> (SeqId, usize) {
        self.cache.create_with_prefix(context)
    }
    fn release(&mut self, seq: SeqId) -> kv_core::Result<()> {
        self.cache.free(seq)
    }
    fn pause(&mut self, seq: SeqId) -> kv_core::Result<()> {
        self.cache.preempt(seq).map(|_| ())
    }
    fn before_pass(&mut self, appends: &[(SeqId, usize)]) {
        // Both groups' victims on a window model. An unknown sequence makes the pass
        // itself fail; nothing is written down then.
        self.cache.make_room_for(appends);
    }
    fn prefilled(&mut self, seq: SeqId, tokens: usize, time: Duration) {
        self.prefilled.0 += tokens;
        self.prefilled.1 += time;
        self.cache
            .set_prefill_rate(rate(self.prefilled.0, self.prefilled.1));
        // Write-through of the prompt's blocks, so that engines running now beside this
        // one find them (a store failure is counted by the cache, not returned).
        if self.cache.cache().backend().supports_block_bytes() {
            let _ = self.cache.save(seq);
        }
    }
}
