//! Prompt cache files (`kv generate --prompt-cache FILE`, as llama.cpp's `--prompt-cache`):
//! the first run saves the K/V of the prompt's full blocks; a later run whose prompt starts
//! with the same tokens loads them and prefills only the rest.
//!
//! A file is only ever used by the model and cache configuration that wrote it: its header
//! carries the [`model_fingerprint`] (architecture and configuration, every weight tensor's
//! name, type, shape and offset, the tokenizer's vocabulary, the weight format, the cache
//! layout and block size, the backend). Anything else, or a damaged file, is refused with
//! the reason and the prompt is prefilled as if there were no file.

use std::path::Path;

use kv_attention::cache_file::{self, BlockSet, CacheFile, Header};
use kv_attention::PagedCache;
use kv_core::content::{chain_keys, Fingerprint};
use kv_core::CacheBackend;

use crate::generate::{run_loop, CacheReport, PREFILL_CHUNK};
use crate::{
    CacheLayout, GenerateOptions, Generation, Logits, Model, ModelError, Result, Tokenizer,
};

/// The fingerprint of `model` (loaded from the GGUF file at `path`) with `tokenizer`,
/// cached in `layout` on the backend named `backend`: the configuration, every weight
/// tensor's name, type, shape and offset, the vocabulary, the weight format, the layout,
/// the block size and the backend. Saved blocks are used only under an equal fingerprint.
///
/// # Errors
/// What reading the file's header returns.
pub fn model_fingerprint(
    path: &Path,
    model: &Model,
    tokenizer: &Tokenizer,
    layout: CacheLayout,
    backend: &str,
) -> Result<Fingerprint> {
    let (content, _) = crate::config::read_header(path)?;
    let mut tensors: Vec<_> = content.tensor_infos.iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(b.0));
    let mut infos = String::new();
    for (name, info) in tensors {
        infos.push_str(&format!(
            "{name}:{:?}:{:?}:{}\n",
            info.ggml_dtype,
            info.shape.dims(),
            info.offset
        ));
    }
    let mut vocab = Vec::new();
    for id in 0..tokenizer.vocab_size() {
        let piece = u32::try_from(id)
            .ok()
            .and_then(|id| tokenizer.id_to_token(id))
            .unwrap_or_default();
        vocab.extend_from_slice(&(piece.len() as u64).to_le_bytes());
        vocab.extend_from_slice(piece.as_bytes());
    }
    let config = format!("{:?}", model.config());
    let weights = format!("{:?}", model.weight_format());
    let shape = format!("{:?}", model.shape());
    let dtype = layout.dtype.to_string();
    let block = (layout.block_size as u64).to_le_bytes();
    Ok(Fingerprint::of_parts(&[
        ("config", config.as_bytes()),
        ("shape", shape.as_bytes()),
        ("weight format", weights.as_bytes()),
        ("tensors", infos.as_bytes()),
        ("vocabulary", &vocab),
        ("layout", dtype.as_bytes()),
        ("block size", &block),
        ("backend", backend.as_bytes()),
    ]))
}

/// What the prompt cache file did in one run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PromptCacheReport {
    /// Prompt tokens whose K/V came from the file (not prefilled).
    pub loaded_tokens: usize,
    /// Bytes of block data read from the file.
    pub loaded_bytes: u64,
    /// Prompt tokens saved to the file at the end of the run (0: the file already held
    /// them all, or saving failed).
    pub saved_tokens: usize,
    /// Why an existing file was not used (another model, a damaged file...).
    pub load_error: Option<String>,
    /// Why the file could not be written (a full disk...); the run itself succeeded.
    pub save_error: Option<String>,
}

impl Model {
    /// [`Model::generate`] with a prompt cache file at `file`: loads the longest full-block
    /// prefix of `prompt` it holds (never the last prompt token), prefills the rest,
    /// generates, and saves the prompt's full blocks when the file did not hold them all.
    /// A file that cannot be used or written is reported, not fatal: the same tokens come
    /// out as without it.
    ///
    /// # Errors
    /// What [`Model::generate`] returns, and [`kv_core::KvError::Unsupported`] for a
    /// backend without block export.
    #[allow(clippy::too_many_arguments)]
    pub fn generate_with_prompt_cache<B: CacheBackend>(
        &self,
        backend: B,
        layout: CacheLayout,
        fingerprint: Fingerprint,
        file: &Path,
        prompt: &[u32],
        options: &GenerateOptions,
        on_token: impl FnMut(u32) -> Result<()>,
    ) -> Result<(Generation, PromptCacheReport)> {
        let spec = self.request_spec(layout, prompt, options)?;
        if !backend.supports_block_bytes() {
            return Err(kv_core::KvError::Unsupported {
                backend: backend.name().to_string(),
                what: "block export (needed by --prompt-cache)".into(),
            }
            .into());
        }
        let mut cache = PagedCache::new(backend, spec)?;
        let header = Header {
            fingerprint,
            backend: cache.backend().name().to_string(),
            dtype: layout.dtype,
            block_size: layout.block_size,
            shape: self.shape(),
        };
        let seq = cache.create_sequence();
        let mut report = PromptCacheReport::default();
        let bs = layout.block_size;
        // Full blocks of the prompt, and those that may be loaded (the last token's block is
        // always computed: its logits are needed).
        let full = prompt.len() / bs;
        let usable = (prompt.len() - 1) / bs;
        let keys = chain_keys(&prompt[..full * bs], bs, &fingerprint, layout.dtype);
        let mut file_blocks = 0;
        if file.exists() {
            match load(&mut cache, seq, &header, file, prompt, &keys[..usable]) {
                Ok((loaded, bytes, in_file)) => {
                    report.loaded_tokens = loaded * bs;
                    report.loaded_bytes = bytes;
                    file_blocks = in_file;
                }
                Err(e) => report.load_error = Some(e),
            }
        }
        let loaded = report.loaded_tokens;
        let mut first = true;
        let run = run_loop(prompt, options, on_token, |new, _| {
            let new = if first { &new[loaded..] } else { new };
            let logits = self.forward(new, &mut cache, seq, Logits::Last)?;
            if first {
                cache.commit(seq, new)?;
                first = false;
            }
            Ok(logits)
        })?;
        if full > file_blocks {
            match save(&cache, seq, &header, file, prompt, &keys) {
                Ok(()) => report.saved_tokens = full * bs,
                Err(e) => report.save_error = Some(e),
            }
        }
        let generation = run.finish(CacheReport::Paged {
            backend: cache.backend().name().to_string(),
            layout,
            usage: cache.usage(),
            window: None,
        });
        Ok((generation, report))
    }
}

/// Loads the blocks of `file` that match the start of `prompt` into `seq`. Returns blocks
/// loaded, their bytes, and how many of the prompt's full blocks the file holds.
fn load<B: CacheBackend>(
    cache: &mut PagedCache<B>,
    seq: kv_core::SeqId,
    header: &Header,
    file: &Path,
    prompt: &[u32],
    keys: &[kv_core::content::BlockKey],
) -> std::result::Result<(usize, u64, usize), String> {
    let f = CacheFile::open(file, header).map_err(|e| e.to_string())?;
    let bs = header.block_size;
    // Blocks whose tokens (hence keys) agree with the prompt.
    let same = f
        .tokens()
        .chunks_exact(bs)
        .zip(prompt.chunks_exact(bs))
        .take_while(|(a, b)| a == b)
        .count();
    let n = same.min(keys.len());
    let mut blocks = Vec::with_capacity(n);
    let mut bytes = 0u64;
    for (i, key) in keys.iter().enumerate().take(n) {
        let (stored_key, data) = f.block(i).map_err(|e| e.to_string())?;
        if stored_key != *key {
            return Err(format!(
                "block {i} of the file is keyed {stored_key}, its tokens give {key}"
            ));
        }
        bytes += data.len() as u64;
        blocks.push(data);
    }
    cache
        .import_blocks(seq, &prompt[..n * bs], &blocks)
        .map_err(|e| e.to_string())?;
    Ok((n, bytes, same.min(prompt.len() / bs)))
}

fn save<B: CacheBackend>(
    cache: &PagedCache<B>,
    seq: kv_core::SeqId,
    header: &Header,
    file: &Path,
    prompt: &[u32],
    keys: &[kv_core::content::BlockKey],
) -> std::result::Result<(), String> {
    let blocks = cache
        .export_blocks(seq, keys.len())
        .map_err(|e| e.to_string())?;
    let set = BlockSet {
        header: header.clone(),
        tokens: prompt[..keys.len() * header.block_size].to_vec(),
        blocks: keys.iter().copied().zip(blocks).collect(),
    };
    cache_file::write_file(file, &set).map_err(|e| e.to_string())
}

/// What the tiers did in one [`Model::generate_with_store`] run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreReport {
    /// The tiers' counters ([`kv_attention::store::TierStats`]).
    pub stats: kv_attention::store::TierStats,
    /// Prompt tokens restored from the tiers (prefill saved).
    pub reused_tokens: usize,
    /// The last store error (the run went on without the store).
    pub last_error: Option<String>,
}

impl Model {
    /// [`Model::generate`] with block tiers ([`kv_attention::store`]): the prompt's full
    /// blocks found in a tier (keyed by content address under `fingerprint`) are restored
    /// instead of prefilled, and once the prompt is prefilled its full blocks are written to
    /// every tier that lacks them. A model with sliding-window layers runs on two cache
    /// groups here as in [`Model::generate`]; the tiers keep each group's blocks apart
    /// ([`kv_attention::TieredCache`]'s "Two cache groups"). A tier that fails or holds bad
    /// values costs only the prefill it would have saved: the same tokens come out.
    ///
    /// # Errors
    /// What [`Model::generate`] returns.
    #[allow(clippy::too_many_arguments)]
    pub fn generate_with_store<B: CacheBackend>(
        &self,
        backend: B,
        layout: CacheLayout,
        fingerprint: Fingerprint,
        tiers: Vec<Box<dyn kv_attention::store::BlockStore>>,
        prompt: &[u32],
        options: &GenerateOptions,
        on_token: impl FnMut(u32) -> Result<()>,
    ) -> Result<(Generation, StoreReport)> {
        let spec = self.request_spec(layout, prompt, options)?;
        // The device's own prefix index is empty in a fresh cache; its salt is unused. With
        // sliding-window layers, two groups (the tiers store each group's blocks) and the
        // prompt in chunks, as `Model::generate` runs it.
        let chunk = prompt.len().clamp(1, PREFILL_CHUNK);
        let cache = self.new_batch_cache(backend, spec, chunk, 1, 0)?;
        let sliding = cache.sliding_layers().is_some();
        let mut tiered = kv_attention::TieredCache::new(cache, fingerprint, tiers);
        let (seq, reused) = tiered.create_with_prefix(prompt);
        let mut first = true;
        let run = run_loop(prompt, options, on_token, |new, _| {
            let new = if first { &new[reused..] } else { new };
            let logits = if sliding {
                let mut last = None;
                for part in new.chunks(chunk) {
                    last = Some(self.forward(part, tiered.cache_mut(), seq, Logits::Last)?);
                }
                last.ok_or(ModelError::EmptyPrompt)?
            } else {
                self.forward(new, tiered.cache_mut(), seq, Logits::Last)?
            };
            if first {
                tiered.cache_mut().commit(seq, new)?;
                first = false;
                // Only the prompt is committed, so only its blocks are saved; saved now,
                // before decoding slides the window past the sliding blocks a restore needs.
                if tiered.cache().backend().supports_block_bytes() {
                    tiered.save(seq)?;
                }
            }
            Ok(logits)
        })?;
        let report = StoreReport {
            stats: tiered.stats(),
            reused_tokens: reused,
            last_error: tiered.last_error().map(str::to_string),
        };
        let cache = tiered.cache();
        let generation = run.finish(CacheReport::Paged {
            backend: cache.backend().name().to_string(),
            layout,
            usage: cache.usage(),
            window: None,
        });
        Ok((generation, report))
    }
}
