//! A multi-turn conversation that keeps its KV cache between turns (`kv chat`).
//!
//! Each turn renders the whole conversation with the chat template and tokenizes it, as a
//! stateless server would; the cache already holds the K/V of the tokens of earlier turns,
//! so only the tokens after the longest prefix the cache shares with the new prompt are
//! computed. A template that renders earlier turns differently once a later one exists (some
//! drop an earlier reply's reasoning, or re-tokenize a reply differently from the tokens
//! that were generated) costs only the tokens from the first difference on: the cache is
//! truncated there and recomputed, never trusted past it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kv_attention::cache_file::{self, BlockSet, CacheFile, Header};
use kv_attention::PagedCache;
use kv_core::content::{chain_keys, Fingerprint};
use kv_core::{CacheBackend, SeqId, StorageSpec};

use crate::generate::{CacheLayout, StopReason, INITIAL_TOKENS, PREFILL_CHUNK};
use crate::{
    ChatMessage, ChatTemplate, Logits, Model, ModelError, Result, Sampler, SamplingConfig,
    Tokenizer,
};

/// What every turn of a [`ChatSession`] may generate, and the cache it keeps.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatOptions {
    /// Most new tokens per reply (a stop token counts as one).
    pub max_tokens: usize,
    /// How tokens are picked; one seeded sampler serves the whole conversation.
    pub sampling: SamplingConfig,
    /// Tokens that end a reply, usually [`Tokenizer::stop_tokens`].
    pub stop_tokens: Vec<u32>,
    /// A system turn that opens the conversation.
    pub system: Option<String>,
    /// Most tokens the conversation may hold (rendered prompt plus reply); the cache is
    /// sized for them up front. Capped at the model's context.
    pub context_tokens: usize,
}

impl Default for ChatOptions {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            sampling: SamplingConfig::greedy(),
            stop_tokens: Vec::new(),
            system: None,
            context_tokens: 4096,
        }
    }
}

/// What one turn cost, as `kv chat` prints it on stderr.
#[derive(Debug, Clone, PartialEq)]
pub struct TurnReport {
    /// Which turn of the conversation (1 for the first).
    pub turn: usize,
    /// Tokens of the rendered conversation up to the assistant's new turn.
    pub prompt_tokens: usize,
    /// Of those, tokens whose K/V the cache already held from earlier turns.
    pub reused_tokens: usize,
    /// Of those, tokens computed by this turn's prefill (`prompt_tokens - reused_tokens`).
    pub prefilled_tokens: usize,
    /// Tokens of the reply (the stop token included).
    pub generated_tokens: usize,
    /// Time of the prefill, sampling the first token included.
    pub prefill_time: Duration,
    /// Time of the decode steps after it.
    pub decode_time: Duration,
    /// Why the reply ended.
    pub stop: StopReason,
}

impl fmt::Display for TurnReport {
    /// One line: `[turn 2] reused 41, prefilled 18, generated 25 tokens in 0.412 s
    /// (prefill 0.031 s, decode 0.381 s)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[turn {}] reused {}, prefilled {}, generated {} tokens in {:.3} s (prefill {:.3} s, decode {:.3} s)",
            self.turn,
            self.reused_tokens,
            self.prefilled_tokens,
            self.generated_tokens,
            (self.prefill_time + self.decode_time).as_secs_f64(),
            self.prefill_time.as_secs_f64(),
            self.decode_time.as_secs_f64(),
        )
    }
}

/// The assistant's answer to one user turn.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatTurn {
    /// The reply's text (the stop token left out), as added to the conversation.
    pub reply: String,
    /// The reply's tokens (the stop token last if one ended it).
    pub tokens: Vec<u32>,
    /// What the turn cost.
    pub report: TurnReport,
}

/// Tokens of `prompt` whose cached K/V can be kept: the longest common prefix of the
/// tokens the cache holds and the new prompt, but never the whole prompt, because the last
/// prompt token must run through the model for its logits.
///
/// ```
/// use kv_model::reusable_prefix;
/// assert_eq!(reusable_prefix(&[1, 2, 3], &[1, 2, 3, 4, 5]), 3); // a plain continuation
/// assert_eq!(reusable_prefix(&[1, 2, 9, 9], &[1, 2, 3, 4]), 2); // re-rendered from token 2
/// assert_eq!(reusable_prefix(&[1, 2, 3], &[1, 2, 3]), 2); // the last token is recomputed
/// assert_eq!(reusable_prefix(&[], &[7]), 0);
/// ```
pub fn reusable_prefix(cached: &[u32], prompt: &[u32]) -> usize {
    let common = cached
        .iter()
        .zip(prompt)
        .take_while(|(a, b)| a == b)
        .count();
    common.min(prompt.len().saturating_sub(1))
}

/// A conversation with a model, keeping the K/V of everything said in one cache sequence.
///
/// ```no_run
/// use kv_backend_cpu::CpuBackend;
/// use kv_model::{CacheLayout, ChatOptions, ChatSession};
///
/// let (model, tokenizer) = kv_model::load(kv_model::default_model_path())?;
/// let template = tokenizer.chat_template().expect("an instruct model");
/// let options = ChatOptions {
///     stop_tokens: tokenizer.stop_tokens().to_vec(),
///     ..ChatOptions::default()
/// };
/// let mut chat =
///     ChatSession::new(&model, &tokenizer, template, CpuBackend::new(), CacheLayout::default(), options)?;
/// for question in ["What is the capital of France?", "And of Italy?"] {
///     let turn = chat.turn(question, |_| Ok(()))?;
///     println!("{}\n{}", turn.reply, turn.report);
/// }
/// # Ok::<(), kv_model::ModelError>(())
/// ```
pub struct ChatSession<'a, B: CacheBackend> {
    model: &'a Model,
    tokenizer: &'a Tokenizer,
    template: &'a ChatTemplate,
    options: ChatOptions,
    cache: PagedCache<B>,
    seq: SeqId,
    /// The tokens whose K/V `seq` holds, in order: always exactly the cache's content.
    cached: Vec<u32>,
    messages: Vec<ChatMessage>,
    sampler: Sampler,
    /// Most tokens the conversation holds: `options.context_tokens` capped at the context.
    capacity: usize,
    turns: usize,
}

impl<B: CacheBackend> fmt::Debug for ChatSession<'_, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatSession")
            .field("options", &self.options)
            .field("cached_tokens", &self.cached.len())
            .field("messages", &self.messages)
            .field("turns", &self.turns)
            .finish_non_exhaustive()
    }
}

impl<'a, B: CacheBackend> ChatSession<'a, B> {
    /// An empty conversation (only `options.system`, if given) with a cache on `backend`
    /// sized for `options.context_tokens` (at most the model's context) in `layout`.
    ///
    /// # Errors
    /// [`ModelError::InvalidArgument`] for zero `max_tokens`, `context_tokens` or block
    /// size, or bad sampling; the cache's errors (a layout the backend does not store).
    pub fn new(
        model: &'a Model,
        tokenizer: &'a Tokenizer,
        template: &'a ChatTemplate,
        backend: B,
        layout: CacheLayout,
        options: ChatOptions,
    ) -> Result<Self> {
        let sampler = Sampler::new(options.sampling)?;
        for (what, value) in [
            ("max tokens", options.max_tokens),
            ("context tokens", options.context_tokens),
            ("block size", layout.block_size),
        ] {
            if value == 0 {
                return Err(ModelError::InvalidArgument {
                    what,
                    expected: "at least 1".into(),
                    got: "0".into(),
                });
            }
        }
        let capacity = options.context_tokens.min(model.config().context_length);
        let spec = StorageSpec::new(
            model.shape(),
            layout.dtype,
            layout.block_size,
            capacity.div_ceil(layout.block_size),
        )?;
        // With sliding-window layers (Gemma 3) the conversation keeps two cache groups, as
        // `kv generate` does: the local layers free their blocks behind the window; prompts
        // run in chunks of at most `PREFILL_CHUNK` tokens so their pool stays that small.
        let mut cache = model.new_cache(backend, spec, PREFILL_CHUNK, true)?;
        let seq = cache.create_sequence();
        let messages = options
            .system
            .iter()
            .map(|s| ChatMessage::new("system", s.as_str()))
            .collect();
        Ok(Self {
            model,
            tokenizer,
            template,
            options,
            cache,
            seq,
            cached: Vec::new(),
            messages,
            sampler,
            capacity,
            turns: 0,
        })
    }

    /// The conversation so far (the system turn first, if any).
    pub fn messages(&self) -> &[ChatMessage] {
        &self.messages
    }

    /// The tokens whose K/V the cache holds.
    pub fn cached_tokens(&self) -> &[u32] {
        &self.cached
    }

    /// What the session's cache holds now; with sliding-window layers, what they saved
    /// ([`crate::window_saving`] prints it).
    pub fn cache_usage(&self) -> kv_attention::CacheUsage {
        self.cache.usage()
    }

    /// Most tokens the conversation may hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets the conversation (the system turn stays) and starts counting turns again.
    /// The cache keeps its tokens: the next turn reuses what the new conversation shares
    /// with the old one (the template's opening, the system turn) and truncates the rest.
    pub fn reset(&mut self) {
        self.messages
            .truncate(usize::from(self.options.system.is_some()));
        self.turns = 0;
    }

    /// Answers `user`: renders the conversation with it and the opening of the assistant's
    /// turn, prefills the tokens the cache does not hold yet ([`reusable_prefix`]), and
    /// generates until a stop token, `max_tokens`, or the session's capacity. `on_token`
    /// sees each reply token as it is chosen; its error stops the turn.
    ///
    /// On error the conversation is as before the call (the user turn is not added) and the
    /// cache holds a prefix of what it held, or of this turn's tokens: the next turn reuses
    /// what still matches.
    ///
    /// # Errors
    /// [`ModelError::EmptyPrompt`] for an empty `user`, [`ModelError::ConversationFull`] when
    /// the rendered conversation leaves no room for a reply, the template's, tokenizer's,
    /// model's and callback's errors.
    pub fn turn(
        &mut self,
        user: &str,
        mut on_token: impl FnMut(u32) -> Result<()>,
    ) -> Result<ChatTurn> {
        if user.is_empty() {
            return Err(ModelError::EmptyPrompt);
        }
        let mut messages = self.messages.clone();
        messages.push(ChatMessage::new("user", user));
        let text = self.template.render_messages(&messages, true)?;
        let prompt = self.tokenizer.encode(&text)?;
        if prompt.is_empty() {
            return Err(ModelError::EmptyPrompt);
        }
        if prompt.len() >= self.capacity {
            return Err(ModelError::ConversationFull {
                needed: prompt.len() + 1,
                capacity: self.capacity,
            });
        }
        // The last reply token is sampled but never run, so the cache holds at most
        // `capacity - 1` tokens after a reply of this length.
        let max_new = self.options.max_tokens.min(self.capacity - prompt.len());
        let mut reused = reusable_prefix(&self.cached, &prompt);
        if !self.cache.can_truncate(self.seq, reused)? {
            // The sliding-window layers freed keys the first new query would read (the
            // conversation changed more than a window back): recompute it all rather than
            // attend to a window with a hole.
            reused = 0;
        }
        self.cache.truncate(self.seq, reused)?;
        self.cached.truncate(reused);

        let mut tokens = Vec::with_capacity(max_new.min(INITIAL_TOKENS));
        let mut stop = StopReason::MaxTokens;
        let (mut prefill_time, mut decode_time) = (Duration::ZERO, Duration::ZERO);
        let mut new: Vec<u32> = prompt[reused..].to_vec();
        loop {
            let started = Instant::now();
            let mut last = None;
            // Chunks only with window layers (their pool is sized for one); otherwise one
            // pass, as before.
            let chunk = if self.cache.sliding_layers().is_some() {
                PREFILL_CHUNK
            } else {
                new.len().max(1)
            };
            for part in new.chunks(chunk) {
                let logits = self
                    .model
                    .forward(part, &mut self.cache, self.seq, Logits::Last)?;
                // The forward pass appended `part` to the cache: mirror it before anything
                // else can fail.
                self.cached.extend_from_slice(part);
                // Their ids are the cache's too (what `save` exports is checked against
                // them).
                self.cache.commit(self.seq, part)?;
                last = Some(logits);
            }
            let logits = last.ok_or(ModelError::EmptyPrompt)?;
            // On a GPU the token is picked there and one id comes back, not the logits.
            let token = self.sampler.sample_tensor(&logits)?;
            if tokens.is_empty() {
                prefill_time = started.elapsed();
            } else {
                decode_time += started.elapsed();
            }
            tokens.push(token);
            on_token(token)?;
            if self.options.stop_tokens.contains(&token) {
                stop = StopReason::StopToken(token);
                break;
            }
            if tokens.len() >= max_new {
                break;
            }
            new.clear();
            new.push(token);
        }
        let text_tokens = match stop {
            StopReason::StopToken(_) => &tokens[..tokens.len() - 1],
            StopReason::MaxTokens => &tokens[..],
        };
        let reply = self.tokenizer.decode(text_tokens)?;
        messages.push(ChatMessage::new("assistant", reply.as_str()));
        self.messages = messages;
        self.turns += 1;
        Ok(ChatTurn {
            report: TurnReport {
                turn: self.turns,
                prompt_tokens: prompt.len(),
                reused_tokens: reused,
                prefilled_tokens: prompt.len() - reused,
                generated_tokens: tokens.len(),
                prefill_time,
                decode_time,
                stop,
            },
            reply,
            tokens,
        })
    }
}

/// The format tag of a saved conversation file.
const SAVED_FORMAT: &str = "kv-chat-v1";

/// The K/V file saved beside conversation file `path`: `path` with `.kvc` appended.
pub fn saved_kv_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".kvc");
    PathBuf::from(name)
}

/// Where [`ChatSession::save`] puts the blocks the sliding-window layers hold, beside
/// `path` (`FILE.window.kvc`; none for a model without window layers).
pub fn saved_window_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".window.kvc");
    PathBuf::from(name)
}

/// What [`ChatSession::save`] wrote or [`ChatSession::resume`] read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SavedChat {
    /// Messages of the conversation (the system turn included).
    pub messages: usize,
    /// Tokens whose K/V the file holds (the full blocks of the cached tokens).
    pub tokens: usize,
}

/// Saving and resuming a conversation.
impl<B: CacheBackend> ChatSession<'_, B> {
    /// The cache file header of this session's cache under `fingerprint`.
    fn header(&self, fingerprint: Fingerprint) -> Header {
        let spec = self.cache.spec();
        Header {
            fingerprint,
            backend: self.cache.backend().name().to_string(),
            dtype: spec.dtype,
            block_size: spec.block_size,
            shape: spec.shape,
        }
    }

    /// Saves the conversation to `path` (its messages and turn count, JSON) and the K/V of
    /// the full blocks of its cached tokens to [`saved_kv_path`]`(path)`, a cache file
    /// ([`kv_attention::cache_file`]) under `fingerprint` (see [`crate::model_fingerprint`]).
    /// Both are written atomically, the K/V first: a reader sees whole files. With
    /// sliding-window layers the file holds both cache groups
    /// ([`PagedCache::export_groups`]): every full block of the global layers, then the
    /// blocks the window layers still hold (the last ones, keyed as those positions), so a
    /// resumed session holds exactly what this one held and continues identically.
    ///
    /// # Errors
    /// [`ModelError::SavedChat`] when a file cannot be written (nothing half-written is
    /// visible); the backend's export errors; [`ModelError::Cache`] (`InvalidArgument`)
    /// when the window layers already freed keys the cached tokens' full blocks would need
    /// (a window not a multiple of the block size can leave that window short).
    pub fn save(&self, path: &Path, fingerprint: Fingerprint) -> Result<SavedChat> {
        let header = self.header(fingerprint);
        let bs = header.block_size;
        let n_blocks = self.cached.len() / bs;
        let groups = self.cache.export_groups(self.seq, n_blocks)?;
        let tokens = &self.cached[..n_blocks * bs];
        let keys = chain_keys(tokens, bs, &fingerprint, header.dtype);
        // The sliding group's blocks (the last ones, under the same keys) go to a file of
        // their own, so each file holds a whole number of blocks for its tokens.
        let window_path = saved_window_path(path);
        if groups.sliding.is_empty() {
            // A window file of an earlier save would not match this one.
            let _ = std::fs::remove_file(&window_path);
        } else {
            let first = groups.sliding_first;
            let window = BlockSet {
                header: header.clone(),
                tokens: tokens[first * bs..].to_vec(),
                blocks: keys[first..].iter().copied().zip(groups.sliding).collect(),
            };
            cache_file::write_file(&window_path, &window).map_err(|source| {
                ModelError::SavedChat {
                    path: window_path.clone(),
                    source,
                }
            })?;
        }
        let set = BlockSet {
            header,
            tokens: tokens.to_vec(),
            blocks: keys.into_iter().zip(groups.global).collect(),
        };
        let kv_path = saved_kv_path(path);
        cache_file::write_file(&kv_path, &set).map_err(|source| ModelError::SavedChat {
            path: kv_path,
            source,
        })?;
        let messages: Vec<serde_json::Value> = self
            .messages
            .iter()
            .map(|m| serde_json::json!({ "role": m.role, "content": m.content }))
            .collect();
        let doc = serde_json::json!({
            "format": SAVED_FORMAT,
            "fingerprint": fingerprint.to_string(),
            "turns": self.turns,
            "messages": messages,
        });
        let text =
            serde_json::to_string_pretty(&doc).map_err(|e| ModelError::SavedChatInvalid {
                path: path.to_path_buf(),
                detail: e.to_string(),
            })?;
        cache_file::write_atomic(path, text.as_bytes()).map_err(|source| {
            ModelError::SavedChat {
                path: path.to_path_buf(),
                source,
            }
        })?;
        Ok(SavedChat {
            messages: self.messages.len(),
            tokens: n_blocks * bs,
        })
    }

    /// Continues the conversation saved at `path` by [`ChatSession::save`]: its messages
    /// replace this session's, and the saved K/V replaces its cache, so the next turn
    /// prefills only what follows (as if the session had never stopped). Use a session
    /// made with the same options; the saved system turn, if any, is the one kept.
    ///
    /// Everything is checked before anything changes: on error the conversation is as
    /// before, and only a failing backend import (after every check) leaves the cache empty
    /// (the next turn then prefills everything).
    ///
    /// # Errors
    /// [`ModelError::SavedChat`] for a K/V file saved by another model, layout, block size
    /// or backend ([`kv_attention::cache_file::CacheFileError::Mismatch`]), damaged or
    /// unreadable; [`ModelError::SavedChatInvalid`] for a conversation file that is not one,
    /// or one saved under another fingerprint; the cache's errors (a saved conversation
    /// longer than this session's capacity).
    pub fn resume(&mut self, path: &Path, fingerprint: Fingerprint) -> Result<SavedChat> {
        let invalid = |detail: String| ModelError::SavedChatInvalid {
            path: path.to_path_buf(),
            detail,
        };
        let text = crate::read_text(path)?;
        let doc: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        if doc["format"] != SAVED_FORMAT {
            return Err(invalid(format!("not a {SAVED_FORMAT} conversation")));
        }
        if doc["fingerprint"] != fingerprint.to_string().as_str() {
            return Err(invalid(format!(
                "saved for the model and cache configuration {}, this one is {fingerprint}",
                doc["fingerprint"]
            )));
        }
        let turns = doc["turns"]
            .as_u64()
            .and_then(|t| usize::try_from(t).ok())
            .ok_or_else(|| invalid("no turn count".into()))?;
        let mut messages = Vec::new();
        for m in doc["messages"]
            .as_array()
            .ok_or_else(|| invalid("no messages".into()))?
        {
            match (m["role"].as_str(), m["content"].as_str()) {
                (Some(role), Some(content)) => messages.push(ChatMessage::new(role, content)),
                _ => return Err(invalid("a message without a role or content".into())),
            }
        }
        let kv_path = saved_kv_path(path);
        let header = self.header(fingerprint);
        let file = CacheFile::open(&kv_path, &header).map_err(|source| ModelError::SavedChat {
            path: kv_path.clone(),
            source,
        })?;
        let tokens = file.tokens().to_vec();
        if tokens.len() >= self.capacity {
            return Err(ModelError::ConversationFull {
                needed: tokens.len() + 1,
                capacity: self.capacity,
            });
        }
        let keys = chain_keys(&tokens, header.block_size, &fingerprint, header.dtype);
        // The global blocks, then the sliding group's last blocks from their own file
        // (see `save`).
        let n_blocks = keys.len();
        let malformed = |path: &Path, detail: String| ModelError::SavedChat {
            path: path.to_path_buf(),
            source: cache_file::CacheFileError::Malformed {
                what: "block table",
                detail,
            },
        };
        if file.len() != n_blocks {
            return Err(malformed(
                &kv_path,
                format!("{} blocks for {} tokens", file.len(), tokens.len()),
            ));
        }
        let window_path = saved_window_path(path);
        let window = if window_path.is_file() {
            Some(CacheFile::open(&window_path, &header).map_err(|source| {
                ModelError::SavedChat {
                    path: window_path.clone(),
                    source,
                }
            })?)
        } else {
            None
        };
        let sliding = window.as_ref().map_or(0, CacheFile::len);
        let sliding_first = n_blocks.checked_sub(sliding).ok_or_else(|| {
            malformed(
                &window_path,
                format!("{sliding} window blocks for {n_blocks} blocks"),
            )
        })?;
        if let Some(w) = &window {
            if w.tokens() != &tokens[sliding_first * header.block_size..] {
                return Err(malformed(
                    &window_path,
                    "its tokens are not the conversation's last ones".into(),
                ));
            }
        }
        self.cache.check_groups(n_blocks, sliding_first, sliding)?;
        let from_window = window
            .iter()
            .flat_map(|w| (0..w.len()).map(move |i| (w, i)));
        let mut blocks = Vec::with_capacity(n_blocks + sliding);
        let sources = (0..n_blocks)
            .map(|i| (&file, i, &kv_path))
            .chain(from_window.map(|(w, i)| (w, i, &window_path)));
        let want_keys = keys.iter().chain(&keys[sliding_first..]);
        for ((f, i, at), want) in sources.zip(want_keys) {
            let (key, bytes) = f.block(i).map_err(|source| ModelError::SavedChat {
                path: at.clone(),
                source,
            })?;
            if key != *want {
                return Err(malformed(
                    at,
                    format!("block {i} is keyed {key}, its tokens give {want}"),
                ));
            }
            blocks.push(bytes);
        }
        // Everything checked: replace the cache's content. Only the backend's import can
        // fail now; the cache is then empty, which costs the next turn a full prefill.
        self.cache.truncate(self.seq, 0)?;
        self.cached.clear();
        let (global, sliding) = blocks.split_at(n_blocks);
        self.cache
            .import_groups(self.seq, &tokens, global, sliding_first, sliding)?;
        self.cached = tokens;
        self.messages = messages;
        self.turns = turns;
        Ok(SavedChat {
            messages: self.messages.len(),
            tokens: self.cached.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuse_is_the_common_prefix_short_of_the_last_prompt_token() {
        // Nothing cached yet: everything is prefilled.
        assert_eq!(reusable_prefix(&[], &[1, 2, 3]), 0);
        // The next turn extends the cached tokens: all of them are kept.
        assert_eq!(reusable_prefix(&[1, 2, 3], &[1, 2, 3, 4, 5, 6]), 3);
        // The cache holds more than the prompt shares (a reply the template re-renders):
        // kept up to the first difference only.
        assert_eq!(reusable_prefix(&[1, 2, 3, 4, 5], &[1, 2, 3, 9, 5, 6]), 3);
        // The cache runs past the prompt: truncated to the prompt, less its last token.
        assert_eq!(reusable_prefix(&[1, 2, 3, 4, 5], &[1, 2, 3]), 2);
        assert_eq!(reusable_prefix(&[1, 2, 3], &[1, 2, 3]), 2);
        // A prompt differing from its first token reuses nothing.
        assert_eq!(reusable_prefix(&[7, 2, 3], &[1, 2, 3]), 0);
        // A one-token prompt always runs.
        assert_eq!(reusable_prefix(&[1], &[1]), 0);
        assert_eq!(reusable_prefix(&[1, 2], &[]), 0);
    }

    #[test]
    fn turn_report_prints_one_line_with_every_count() {
        let r = TurnReport {
            turn: 2,
            prompt_tokens: 59,
            reused_tokens: 41,
            prefilled_tokens: 18,
            generated_tokens: 25,
            prefill_time: Duration::from_millis(31),
            decode_time: Duration::from_millis(381),
            stop: StopReason::MaxTokens,
        };
        assert_eq!(
            r.to_string(),
            "[turn 2] reused 41, prefilled 18, generated 25 tokens in 0.412 s (prefill 0.031 s, decode 0.381 s)"
        );
    }
}
