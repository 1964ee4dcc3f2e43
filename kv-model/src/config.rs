//! The hyper-parameters of a Llama-family model, read from GGUF metadata.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Seek, SeekFrom};
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use kv_core::ModelShape;

use crate::{ModelError, Result};

/// Architectures (GGUF `general.architecture`) this crate runs; see [`Family`].
///
/// llama.cpp's converter writes Llama, Llama 2/3, Mistral 7B, TinyLlama and SmolLM as
/// `llama`. Families with another layout (fused QKV, MoE, other attention) are refused with
/// this list rather than run wrongly.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama", "qwen2", "qwen3", "gemma3"];

/// The decoder families this crate runs. They share the pre-norm Llama block and differ
/// in a few parts, each exactly as llama.cpp's graph for the architecture runs it:
///
/// | family | RoPE pairs | Q/K/V | FFN | other |
/// |---|---|---|---|---|
/// | `llama` | interleaved (the converter permuted Q/K) | | SwiGLU | `llama3` RoPE scaling |
/// | `qwen2` | halves (NeoX) | biases | SwiGLU | |
/// | `qwen3` | halves (NeoX) | RMSNorm per head on Q and K | SwiGLU | |
/// | `gemma3` | halves (NeoX) | RMSNorm per head on Q and K | GELU(tanh)-gated | below |
///
/// Gemma 3: embeddings scaled by `sqrt(embedding_length)`; RMSNorm before and after both
/// attention and FFN (the converter already folded Gemma's `1 + w` into the weights);
/// attention scale `1/sqrt(key_length)` (`1/sqrt(embedding_length / head_count)` for the
/// 62-layer 27B, as llama.cpp has it); five of every six layers attend through a sliding
/// window of `attention.sliding_window` tokens with their own RoPE base
/// (`rope.freq_base_swa`, default 10000), every sixth globally with `rope.freq_base` and
/// the file's RoPE scaling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `llama`: Llama 1/2/3, Mistral, TinyLlama, SmolLM.
    Llama,
    /// `qwen2`: biases on the Q, K and V projections.
    Qwen2,
    /// `qwen3`: per-head RMSNorm of Q and K before RoPE.
    Qwen3,
    /// `gemma3`: see above.
    Gemma3,
}

impl Family {
    /// The family named by a GGUF `general.architecture`, if this crate runs it.
    pub fn from_architecture(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Self::Llama),
            "qwen2" => Some(Self::Qwen2),
            "qwen3" => Some(Self::Qwen3),
            "gemma3" => Some(Self::Gemma3),
            _ => None,
        }
    }

    /// Whether RoPE rotates the pairs `(x[i], x[i + d/2])` (NeoX, the Hugging Face layout
    /// the converter keeps for these families) instead of `(x[2i], x[2i + 1])`.
    pub fn rope_halves(self) -> bool {
        !matches!(self, Self::Llama)
    }
}

/// Llama 3.1's RoPE frequency scaling (`rope.scaling.type = "llama3"`), used when a file
/// states it without llama.cpp's precomputed `rope_freqs.weight` tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Rope {
    /// `rope.scaling.factor`: how much the lowest frequencies are divided.
    pub factor: f32,
    /// `rope.scaling.low_freq_factor` (default 1).
    pub low_freq_factor: f32,
    /// `rope.scaling.high_freq_factor` (default 4).
    pub high_freq_factor: f32,
    /// `rope.scaling.original_context_length` (default 8192).
    pub original_context: usize,
}

impl Llama3Rope {
    /// The divisor of each pair's frequency, computed as llama.cpp's converter computes
    /// `rope_freqs.weight`: 1 for wavelengths under `original / high_freq_factor`, `factor`
    /// above `original / low_freq_factor`, and a smooth blend between.
    pub fn freq_factors(&self, base: f32, rope_dim: usize) -> Vec<f32> {
        let (lo, hi) = (
            f64::from(self.low_freq_factor),
            f64::from(self.high_freq_factor),
        );
        let original = self.original_context as f64;
        let factor = f64::from(self.factor);
        (0..rope_dim / 2)
            .map(|i| {
                let freq = f64::from(base).powf(-2.0 * i as f64 / rope_dim as f64);
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                let f = if wavelen < original / hi {
                    1.0
                } else if wavelen > original / lo {
                    factor
                } else {
                    let smooth = (original / wavelen - lo) / (hi - lo);
                    1.0 / ((1.0 - smooth) / factor + smooth)
                };
                f as f32
            })
            .collect()
    }
}

/// The largest value [`LlamaConfig::from_metadata`] accepts for each size in the
/// metadata: far above every real model, low enough that nothing sized by them can
/// exhaust memory or overflow before the weights are read.
///
/// A value above its limit is [`ModelError::BadMetadata`] naming the key and the value.
/// Sizes are also checked against each other (`head_count * key_length` must be at most
/// [`MetadataLimits::WIDTH`]).
///
/// ```
/// use kv_model::MetadataLimits;
/// // Llama 3.1 405B: 126 layers, 128 heads, context 131072, vocabulary 128256.
/// assert!(MetadataLimits::LAYERS >= 126 && MetadataLimits::CONTEXT >= 10_000_000);
/// ```
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct MetadataLimits;

impl MetadataLimits {
    /// `block_count`: decoder layers.
    pub const LAYERS: usize = 1 << 10;
    /// `embedding_length`, and query or KV heads times head size.
    pub const WIDTH: usize = 1 << 17;
    /// `feed_forward_length`.
    pub const FEED_FORWARD: usize = 1 << 20;
    /// `attention.head_count` (and `head_count_kv`, which must divide it).
    pub const HEADS: usize = 1 << 10;
    /// `attention.key_length`, `rope.dimension_count`: elements per head.
    pub const HEAD_DIM: usize = 1 << 10;
    /// `context_length`: 2^27 tokens. A 10M-token context is accepted and costs nothing
    /// up front (RoPE angles are computed as positions are used).
    pub const CONTEXT: usize = 1 << 27;
    /// `vocab_size`, or the length of `tokenizer.ggml.tokens`.
    pub const VOCAB: usize = 1 << 22;
    /// `rope.scaling.factor`.
    pub const ROPE_SCALING: f64 = 1e6;
}

/// Hyper-parameters of a Llama-family decoder, as the GGUF metadata states them.
///
/// ```
/// use std::collections::HashMap;
/// use candle_core::quantized::gguf_file::Value;
/// use kv_model::LlamaConfig;
///
/// let mut md = HashMap::new();
/// md.insert("general.architecture".into(), Value::String("llama".into()));
/// for (key, v) in [("block_count", 30), ("embedding_length", 576), ("feed_forward_length", 1536),
///                  ("attention.head_count", 9), ("attention.head_count_kv", 3),
///                  ("context_length", 8192), ("vocab_size", 49152)] {
///     md.insert(format!("llama.{key}"), Value::U32(v));
/// }
/// let config = LlamaConfig::from_metadata(&md)?;
/// assert_eq!(config.head_dim, 64);
/// assert_eq!(config.shape()?.group_size(), 3);
/// # Ok::<(), kv_model::ModelError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// `general.architecture`.
    pub architecture: String,
    /// Decoder layers.
    pub n_layers: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Query heads per layer.
    pub n_heads: usize,
    /// Key/value heads per layer (fewer than `n_heads` for GQA/MQA).
    pub n_kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Leading elements of each head that RoPE rotates (usually all of them).
    pub rope_dim: usize,
    /// RoPE base: the angle of pair `i` at position `p` is `p * base^(-2i/rope_dim)`.
    pub rope_freq_base: f32,
    /// Linear RoPE scaling: positions are multiplied by this (1 without scaling).
    pub rope_position_scale: f32,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Longest sequence the model was trained for.
    pub context_length: usize,
    /// Tokens in the vocabulary.
    pub vocab_size: usize,
    /// Which variant of the block the layers run.
    pub family: Family,
    /// Multiplies q.k before the softmax: `1/sqrt(head_dim)` except where the family says
    /// otherwise (Gemma 3 27B).
    pub attention_scale: f32,
    /// Gemma 3's local layers attend only to the last this many tokens (their own
    /// included); `None`: every layer is global.
    pub sliding_window: Option<usize>,
    /// With a sliding window, layer `i` is global when `i % pattern == pattern - 1` and
    /// local otherwise (Gemma 3: 6, five local to one global).
    pub sliding_window_pattern: usize,
    /// The RoPE base of the local (sliding-window) layers.
    pub rope_freq_base_local: f32,
    /// Llama 3.1 RoPE scaling from the metadata (a `rope_freqs.weight` tensor wins).
    pub llama3_rope: Option<Llama3Rope>,
}

impl LlamaConfig {
    /// Reads the configuration from GGUF metadata, keys prefixed by the architecture name.
    ///
    /// # Errors
    /// [`ModelError::UnsupportedArchitecture`] for a family other than
    /// [`SUPPORTED_ARCHITECTURES`]; [`ModelError::MissingMetadata`] or
    /// [`ModelError::BadMetadata`] for absent, mistyped or inconsistent values;
    /// [`ModelError::Unsupported`] for a RoPE scaling this crate does not implement.
    pub fn from_metadata(md: &HashMap<String, Value>) -> Result<Self> {
        let architecture = string(md, "general.architecture")?.to_string();
        let Some(family) = Family::from_architecture(&architecture) else {
            return Err(ModelError::UnsupportedArchitecture {
                got: architecture,
                supported: SUPPORTED_ARCHITECTURES,
            });
        };
        let key = |k: &str| format!("{architecture}.{k}");

        let n_layers = positive(md, &key("block_count"), MetadataLimits::LAYERS)?;
        let hidden_size = positive(md, &key("embedding_length"), MetadataLimits::WIDTH)?;
        let intermediate_size = positive(
            md,
            &key("feed_forward_length"),
            MetadataLimits::FEED_FORWARD,
        )?;
        let n_heads = positive(md, &key("attention.head_count"), MetadataLimits::HEADS)?;
        let n_kv_heads = match md.get(&key("attention.head_count_kv")) {
            Some(_) => positive(md, &key("attention.head_count_kv"), MetadataLimits::HEADS)?,
            None => n_heads,
        };
        if n_heads % n_kv_heads != 0 {
            return Err(ModelError::BadMetadata {
                key: key("attention.head_count_kv"),
                expected: format!("a divisor of the {n_heads} query heads"),
                got: n_kv_heads.to_string(),
            });
        }
        let head_dim = match md.get(&key("attention.key_length")) {
            Some(_) => positive(md, &key("attention.key_length"), MetadataLimits::HEAD_DIM)?,
            None => {
                if hidden_size % n_heads != 0 {
                    return Err(ModelError::BadMetadata {
                        key: key("embedding_length"),
                        expected: format!("a multiple of the {n_heads} heads"),
                        got: hidden_size.to_string(),
                    });
                }
                hidden_size / n_heads
            }
        };
        for (heads, k) in [
            (n_heads, "attention.head_count"),
            (n_kv_heads, "attention.head_count_kv"),
        ] {
            if heads
                .checked_mul(head_dim)
                .is_none_or(|w| w > MetadataLimits::WIDTH)
            {
                return Err(ModelError::BadMetadata {
                    key: key(k),
                    expected: format!(
                        "heads of {head_dim} elements totalling at most {}",
                        MetadataLimits::WIDTH
                    ),
                    got: heads.to_string(),
                });
            }
        }
        if let Some(v) = md.get(&key("attention.value_length")) {
            let value_len = integer(v, &key("attention.value_length"))?;
            if value_len != head_dim {
                return Err(ModelError::Unsupported {
                    what: "head sizes",
                    detail: format!(
                        "value heads of {value_len} differ from key heads of {head_dim}"
                    ),
                });
            }
        }
        let rope_dim = match md.get(&key("rope.dimension_count")) {
            Some(_) => positive(md, &key("rope.dimension_count"), MetadataLimits::HEAD_DIM)?,
            None => head_dim,
        };
        if rope_dim > head_dim || rope_dim % 2 != 0 {
            return Err(ModelError::BadMetadata {
                key: key("rope.dimension_count"),
                expected: format!("an even number of at most the head size {head_dim}"),
                got: rope_dim.to_string(),
            });
        }
        let rope_freq_base = match md.get(&key("rope.freq_base")) {
            Some(v) => float(v, &key("rope.freq_base"))? as f32,
            None => 10_000.0,
        };
        if !(rope_freq_base.is_finite() && rope_freq_base > 1.0) {
            return Err(ModelError::BadMetadata {
                key: key("rope.freq_base"),
                expected: "a finite number above 1".into(),
                got: rope_freq_base.to_string(),
            });
        }
        let (rope_position_scale, llama3_rope) = rope_scaling(md, &architecture)?;
        let rms_norm_eps = match md.get(&key("attention.layer_norm_rms_epsilon")) {
            Some(v) => float(v, &key("attention.layer_norm_rms_epsilon"))?,
            None => 1e-5,
        };
        if !(rms_norm_eps.is_finite() && rms_norm_eps > 0.0 && rms_norm_eps < 1.0) {
            return Err(ModelError::BadMetadata {
                key: key("attention.layer_norm_rms_epsilon"),
                expected: "a small positive number".into(),
                got: rms_norm_eps.to_string(),
            });
        }
        let context_length = positive(md, &key("context_length"), MetadataLimits::CONTEXT)?;
        let vocab_size = match md.get(&key("vocab_size")) {
            Some(_) => positive(md, &key("vocab_size"), MetadataLimits::VOCAB)?,
            None => match md.get("tokenizer.ggml.tokens") {
                Some(Value::Array(tokens))
                    if !tokens.is_empty() && tokens.len() <= MetadataLimits::VOCAB =>
                {
                    tokens.len()
                }
                Some(other) => {
                    return Err(ModelError::BadMetadata {
                        key: "tokenizer.ggml.tokens".into(),
                        expected: "a non-empty array of strings".into(),
                        got: describe(other),
                    })
                }
                None => {
                    return Err(ModelError::MissingMetadata {
                        key: key("vocab_size"),
                    })
                }
            },
        };
        let (sliding_window, sliding_window_pattern, rope_freq_base_local) = match family {
            Family::Gemma3 => {
                let w = positive(
                    md,
                    &key("attention.sliding_window"),
                    MetadataLimits::CONTEXT,
                )?;
                let base = match md.get(&key("rope.freq_base_swa")) {
                    Some(v) => float(v, &key("rope.freq_base_swa"))? as f32,
                    None => 10_000.0,
                };
                if !(base.is_finite() && base > 1.0) {
                    return Err(ModelError::BadMetadata {
                        key: key("rope.freq_base_swa"),
                        expected: "a finite number above 1".into(),
                        got: base.to_string(),
                    });
                }
                (Some(w), 6, base)
            }
            _ => (None, 1, rope_freq_base),
        };
        // llama.cpp: Gemma 3 27B (62 layers) scales by the embedding width per head.
        let attention_scale = match family {
            Family::Gemma3 if n_layers == 62 => 1.0 / ((hidden_size / n_heads) as f32).sqrt(),
            _ => 1.0 / (head_dim as f32).sqrt(),
        };
        Ok(Self {
            architecture,
            family,
            attention_scale,
            sliding_window,
            sliding_window_pattern,
            rope_freq_base_local,
            llama3_rope,
            n_layers,
            hidden_size,
            intermediate_size,
            n_heads,
            n_kv_heads,
            head_dim,
            rope_dim,
            rope_freq_base,
            rope_position_scale,
            rms_norm_eps,
            context_length,
            vocab_size,
        })
    }

    /// Reads only the header of a GGUF file (no weights) and its configuration: what
    /// `kv mem --model` needs.
    ///
    /// # Errors
    /// [`ModelError::ModelNotFound`], [`ModelError::InvalidGguf`], and those of
    /// [`LlamaConfig::from_metadata`].
    pub fn from_gguf_file(path: impl AsRef<Path>) -> Result<Self> {
        let (content, _) = read_header(path.as_ref())?;
        Self::from_metadata(&content.metadata)
    }

    /// The attention geometry the cache is sized by.
    ///
    /// # Errors
    /// Never for a configuration built by [`LlamaConfig::from_metadata`], which checks the
    /// same rules; a hand-built one may be invalid.
    pub fn shape(&self) -> Result<ModelShape> {
        Ok(ModelShape::new(
            self.n_layers,
            self.n_heads,
            self.n_kv_heads,
            self.head_dim,
        )?)
    }

    /// The sliding window of layer `layer`: `Some(W)` for a local layer, `None` for a
    /// global one.
    ///
    /// ```
    /// # use std::collections::HashMap;
    /// # use candle_core::quantized::gguf_file::Value;
    /// # use kv_model::LlamaConfig;
    /// # let mut md = HashMap::new();
    /// # md.insert("general.architecture".into(), Value::String("gemma3".into()));
    /// # for (key, v) in [("block_count", 18), ("embedding_length", 640), ("feed_forward_length", 2048),
    /// #                  ("attention.head_count", 4), ("attention.head_count_kv", 1),
    /// #                  ("attention.key_length", 256), ("attention.sliding_window", 512),
    /// #                  ("context_length", 32768), ("vocab_size", 262144)] {
    /// #     md.insert(format!("gemma3.{key}"), Value::U32(v));
    /// # }
    /// let gemma = LlamaConfig::from_metadata(&md)?; // Gemma 3 270M's metadata
    /// assert_eq!(gemma.layer_window(0), Some(512));
    /// assert_eq!(gemma.layer_window(5), None); // every sixth layer is global
    /// assert_eq!(gemma.attention_scale, 1.0 / 16.0);
    /// # Ok::<(), kv_model::ModelError>(())
    /// ```
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        let p = self.sliding_window_pattern.max(1);
        self.sliding_window.filter(|_| layer % p < p - 1)
    }
}

/// Opens a GGUF file (regular files only), checks its header with the pre-flight walk
/// ([`crate::check_gguf_file`]), then parses it with candle: metadata and tensor directory.
pub(crate) fn read_header(path: &Path) -> Result<(Content, BufReader<File>)> {
    let file = crate::files::open_regular(path)?;
    crate::gguf_check::check_open_file(&file, path)?;
    let mut reader = BufReader::new(file);
    reader
        .seek(SeekFrom::Start(0))
        .map_err(|e| ModelError::io(path, e))?;
    let content = Content::read(&mut reader).map_err(|e| ModelError::InvalidGguf {
        path: path.to_path_buf(),
        detail: one_line(&e.to_string()),
    })?;
    Ok((content, reader))
}

/// Collapses a multi-line message into one line, control characters escaped.
pub(crate) fn one_line(s: &str) -> String {
    let line = s
        .split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    crate::escape::escape(&line).into_owned()
}

/// The linear position scale and the Llama 3 frequency scaling the metadata states.
fn rope_scaling(md: &HashMap<String, Value>, arch: &str) -> Result<(f32, Option<Llama3Rope>)> {
    let type_key = format!("{arch}.rope.scaling.type");
    let factor_key = format!("{arch}.rope.scaling.factor");
    let kind = match md.get(&type_key) {
        None => return Ok((1.0, None)),
        Some(Value::String(s)) => s.as_str(),
        Some(other) => {
            return Err(ModelError::BadMetadata {
                key: type_key,
                expected: "a string".into(),
                got: describe(other),
            })
        }
    };
    let factor = || -> Result<f32> {
        let factor = match md.get(&factor_key) {
            Some(v) => float(v, &factor_key)? as f32,
            None => {
                return Err(ModelError::MissingMetadata {
                    key: factor_key.clone(),
                })
            }
        };
        if !(factor.is_finite()
            && factor > 0.0
            && f64::from(factor) <= MetadataLimits::ROPE_SCALING)
        {
            return Err(ModelError::BadMetadata {
                key: factor_key.clone(),
                expected: format!(
                    "a positive number of at most {}",
                    MetadataLimits::ROPE_SCALING
                ),
                got: factor.to_string(),
            });
        }
        Ok(factor)
    };
    match kind {
        "none" => Ok((1.0, None)),
        "llama3" => {
            let opt = |name: &str, default: f64| -> Result<f64> {
                let k = format!("{arch}.rope.scaling.{name}");
                match md.get(&k) {
                    Some(v) => float(v, &k),
                    None => Ok(default),
                }
            };
            let (lo, hi) = (opt("low_freq_factor", 1.0)?, opt("high_freq_factor", 4.0)?);
            if !(lo.is_finite() && hi.is_finite() && lo > 0.0 && hi > lo && hi <= 1e6) {
                return Err(ModelError::BadMetadata {
                    key: format!("{arch}.rope.scaling.high_freq_factor"),
                    expected: "0 < low_freq_factor < high_freq_factor".into(),
                    got: format!("{lo} and {hi}"),
                });
            }
            let original = match md.get(&format!("{arch}.rope.scaling.original_context_length")) {
                Some(_) => positive(
                    md,
                    &format!("{arch}.rope.scaling.original_context_length"),
                    MetadataLimits::CONTEXT,
                )?,
                None => 8192,
            };
            Ok((
                1.0,
                Some(Llama3Rope {
                    factor: factor()?,
                    low_freq_factor: lo as f32,
                    high_freq_factor: hi as f32,
                    original_context: original,
                }),
            ))
        }
        "linear" => Ok((1.0 / factor()?, None)),
        other => Err(ModelError::Unsupported {
            what: "RoPE scaling",
            detail: format!("{other:?} (supported: none, linear, llama3)"),
        }),
    }
}

pub(crate) fn string<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<&'a str> {
    match md.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(ModelError::BadMetadata {
            key: key.into(),
            expected: "a string".into(),
            got: describe(other),
        }),
        None => Err(ModelError::MissingMetadata { key: key.into() }),
    }
}

/// An integer in `1..=max`.
fn positive(md: &HashMap<String, Value>, key: &str, max: usize) -> Result<usize> {
    let v = md
        .get(key)
        .ok_or_else(|| ModelError::MissingMetadata { key: key.into() })?;
    match integer(v, key)? {
        n if (1..=max).contains(&n) => Ok(n),
        n => Err(ModelError::BadMetadata {
            key: key.into(),
            expected: format!("an integer from 1 to {max}"),
            got: n.to_string(),
        }),
    }
}

/// Any non-negative integer type GGUF writers use.
pub(crate) fn integer(v: &Value, key: &str) -> Result<usize> {
    let n: Option<u64> = match *v {
        Value::U8(x) => Some(x.into()),
        Value::U16(x) => Some(x.into()),
        Value::U32(x) => Some(x.into()),
        Value::U64(x) => Some(x),
        Value::I8(x) => u64::try_from(x).ok(),
        Value::I16(x) => u64::try_from(x).ok(),
        Value::I32(x) => u64::try_from(x).ok(),
        Value::I64(x) => u64::try_from(x).ok(),
        _ => None,
    };
    n.and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| ModelError::BadMetadata {
            key: key.into(),
            expected: "a non-negative integer".into(),
            got: describe(v),
        })
}

fn float(v: &Value, key: &str) -> Result<f64> {
    match *v {
        Value::F32(x) => Ok(x.into()),
        Value::F64(x) => Ok(x),
        _ => integer(v, key)
            .map(|n| n as f64)
            .map_err(|_| ModelError::BadMetadata {
                key: key.into(),
                expected: "a number".into(),
                got: describe(v),
            }),
    }
}

/// A short description of a metadata value for error messages.
pub(crate) fn describe(v: &Value) -> String {
    match v {
        Value::String(s) if s.len() > 40 => format!("a string of {} bytes", s.len()),
        Value::String(s) => format!("the string {:?}", crate::escape::escape(s)),
        Value::Array(a) => format!("an array of {} values", a.len()),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::U8(x) => format!("u8 {x}"),
        Value::I8(x) => format!("i8 {x}"),
        Value::U16(x) => format!("u16 {x}"),
        Value::I16(x) => format!("i16 {x}"),
        Value::U32(x) => format!("u32 {x}"),
        Value::I32(x) => format!("i32 {x}"),
        Value::U64(x) => format!("u64 {x}"),
        Value::I64(x) => format!("i64 {x}"),
        Value::F32(x) => format!("f32 {x}"),
        Value::F64(x) => format!("f64 {x}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm2() -> HashMap<String, Value> {
        let mut md = HashMap::new();
        md.insert("general.architecture".into(), Value::String("llama".into()));
        let ints = [
            ("block_count", 30),
            ("embedding_length", 576),
            ("feed_forward_length", 1536),
            ("attention.head_count", 9),
            ("attention.head_count_kv", 3),
            ("rope.dimension_count", 64),
            ("context_length", 8192),
        ];
        for (k, v) in ints {
            md.insert(format!("llama.{k}"), Value::U32(v));
        }
        md.insert("llama.rope.freq_base".into(), Value::F32(100_000.0));
        md.insert(
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(1e-5),
        );
        md.insert(
            "tokenizer.ggml.tokens".into(),
            Value::Array(vec![Value::String("a".into()); 100]),
        );
        md
    }

    #[test]
    fn reads_smollm2_metadata() {
        let c = LlamaConfig::from_metadata(&smollm2()).unwrap();
        assert_eq!(c.n_layers, 30);
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.n_kv_heads, 3);
        assert_eq!(c.rope_dim, 64);
        assert_eq!(c.rope_freq_base, 100_000.0);
        assert_eq!(c.rope_position_scale, 1.0);
        assert_eq!(c.vocab_size, 100);
        assert_eq!(c.shape().unwrap(), ModelShape::new(30, 9, 3, 64).unwrap());
    }

    #[test]
    fn defaults_for_optional_keys() {
        let mut md = smollm2();
        md.remove("llama.attention.head_count_kv");
        md.remove("llama.rope.freq_base");
        md.remove("llama.rope.dimension_count");
        md.remove("llama.attention.layer_norm_rms_epsilon");
        let c = LlamaConfig::from_metadata(&md).unwrap();
        assert_eq!(c.n_kv_heads, 9);
        assert_eq!(c.rope_freq_base, 10_000.0);
        assert_eq!(c.rope_dim, 64);
        assert_eq!(c.rms_norm_eps, 1e-5);
    }

    #[test]
    fn refuses_other_architectures() {
        let mut md = smollm2();
        md.insert("general.architecture".into(), Value::String("gpt2".into()));
        let e = LlamaConfig::from_metadata(&md).unwrap_err();
        assert!(
            matches!(&e, ModelError::UnsupportedArchitecture { got, .. } if got == "gpt2"),
            "{e}"
        );
        assert!(e.to_string().contains("llama"), "{e}");
    }

    #[test]
    fn missing_and_mistyped_keys_are_named() {
        let mut md = smollm2();
        md.remove("llama.block_count");
        let e = LlamaConfig::from_metadata(&md).unwrap_err();
        assert!(matches!(&e, ModelError::MissingMetadata { key } if key == "llama.block_count"));

        let mut md = smollm2();
        md.insert(
            "llama.embedding_length".into(),
            Value::String("wide".into()),
        );
        let e = LlamaConfig::from_metadata(&md).unwrap_err();
        assert!(
            matches!(&e, ModelError::BadMetadata { key, got, .. }
                if key == "llama.embedding_length" && got.contains("wide")),
            "{e}"
        );

        let mut md = smollm2();
        md.insert("llama.block_count".into(), Value::I32(-3));
        assert!(matches!(
            LlamaConfig::from_metadata(&md),
            Err(ModelError::BadMetadata { .. })
        ));

        let mut md = smollm2();
        md.remove("general.architecture");
        assert!(matches!(
            LlamaConfig::from_metadata(&md),
            Err(ModelError::MissingMetadata { .. })
        ));
    }

    #[test]
    fn inconsistent_heads_are_refused() {
        let mut md = smollm2();
        md.insert("llama.attention.head_count_kv".into(), Value::U32(4));
        let e = LlamaConfig::from_metadata(&md).unwrap_err();
        assert!(
            matches!(&e, ModelError::BadMetadata { key, .. } if key.ends_with("head_count_kv")),
            "{e}"
        );

        let mut md = smollm2();
        md.insert("llama.rope.dimension_count".into(), Value::U32(65));
        assert!(LlamaConfig::from_metadata(&md).is_err());

        let mut md = smollm2();
        md.insert("llama.attention.head_count".into(), Value::U32(7));
        md.insert("llama.attention.head_count_kv".into(), Value::U32(7));
        assert!(LlamaConfig::from_metadata(&md).is_err()); // 576 is not a multiple of 7
    }

    #[test]
    fn rope_scaling_kinds() {
        let mut md = smollm2();
        md.insert(
            "llama.rope.scaling.type".into(),
            Value::String("linear".into()),
        );
        md.insert("llama.rope.scaling.factor".into(), Value::F32(4.0));
        let c = LlamaConfig::from_metadata(&md).unwrap();
        assert_eq!(c.rope_position_scale, 0.25);

        md.insert(
            "llama.rope.scaling.type".into(),
            Value::String("yarn".into()),
        );
        assert!(matches!(
            LlamaConfig::from_metadata(&md),
            Err(ModelError::Unsupported { .. })
        ));
    }

    #[test]
    fn messages_are_one_line() {
        assert_eq!(one_line("a\n  b\n\nc"), "a; b; c");
    }
}
