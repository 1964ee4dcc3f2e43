//! The Llama decoder: weights from GGUF, a forward pass over a KV cache, and an
//! independent forward pass that stores nothing.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Tensor, D};
use kv_attention::{PagedCache, SlidingLayers};
use kv_core::{AttentionBatch, CacheBackend, ModelShape, SeqAttention, SeqId, StorageSpec};

use crate::config::{one_line, Family};
use crate::linear::{BlockMatrix, Embeddings, Linear, WeightType};
use crate::mapped::GgufMap;
use crate::rope::Rope;
use crate::{LlamaConfig, ModelError, Result};

/// How the projection weights are held in memory and multiplied.
///
/// The default, [`WeightFormat::Blocks`], keeps the file's Q4_0/Q4_1/Q8_0, Q5_0/Q5_1 and
/// Q4_K/Q5_K/Q6_K blocks (referenced in the mapped file, not copied) and multiplies them with this crate's kernels, which dequantize the weights in registers
/// exactly as candle's `dequantize` does and never round the activations. Measured on
/// SmolLM2-135M Q4_1 (2 shared cores, CPU seconds per token so the load of other processes
/// cancels out): a decode step took 15 ms of CPU against 41 ms with f32 weights (a step
/// reads ~96 MB of blocks instead of 540 MB of f32), a 529-token prefill about the same
/// (4.0-5.0 ms per token either way: both end in the same GEMM), and the weights take 5
/// bits (Q4_1) instead of 32, peak memory of `kv generate` 149 MB instead of 589 MB.
///
/// Why not candle's quantized matmul ([`WeightFormat::Quantized`]):
/// - it rounds each input row to 8 bits (Q8_1) before the dot products. That rounding is
///   discontinuous: a 1e-6 difference in an activation (two attention implementations
///   summing in another order) can move it across a rounding step, and over 30 layers such
///   flips grow to logit differences of 1-2. Greedy tokens then differ at near-ties between
///   computations that are mathematically equal (cached and uncached, block size 1 and
///   16), which would hide real cache bugs behind noise. With exact activations (f32 or
///   block weights) the same comparison differs by under 1e-4.
/// - candle has no SIMD kernel for Q4_1 on x86: it was several times slower than f32.
///
/// [`WeightFormat::F32`] (the default before the block kernels) expands every projection to
/// f32 at load and multiplies with candle's GEMM: the reference the block kernels are
/// checked against, about 0.4 GiB more memory for SmolLM2.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WeightFormat {
    /// Keep Q4_0, Q4_1, Q8_0, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K blocks and multiply with this
    /// crate's kernels (AVX-512, AVX2 or portable), which dequantize in registers and never
    /// round activations; other block types are expanded to f32, as are all weights on a
    /// non-CPU device.
    #[default]
    Blocks,
    /// Expand every projection to f32 at load: exact activations, candle's GEMM, more memory.
    F32,
    /// Keep the file's quantized blocks and use candle's quantized matmul (activations
    /// rounded to 8 bits): also K-quants stay small, but slower and inexact.
    Quantized,
}

/// How the activations meet the block weights of [`WeightFormat::Blocks`]: a named option
/// ([`Model::set_activations`], `kv ... --activations q8`), exact by default.
///
/// [`Activations::Q8`] rounds each activation row to 8 bits per block of 32 values (one
/// f32 scale per block, round to nearest) before the Q4_0, Q4_1 and Q8_0 projections and
/// multiplies with integer dot products (AVX-512 VNNI where the CPU has it), as llama.cpp
/// does: fewer instructions per weight, so decode, and above all batched decode, can run
/// closer to the memory limit. It costs accuracy (perplexity and greedy agreement against
/// exact: `docs/measurements.md`), so it is not the default. Every row is rounded the same
/// way in prefill and decode, alone or in a batch, so cached and uncached runs still agree
/// with each other, and a sequence's greedy tokens do not depend on its batch. Weights of
/// other types (Q5_0/Q5_1, K-quants, f32) keep exact activations under either setting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Activations {
    /// f32 activations, never rounded: block results equal the f32 weights' up to
    /// summation order.
    #[default]
    Exact,
    /// Activations rounded to 8 bits per block of 32 (Q4_0, Q4_1 and Q8_0 weights).
    Q8,
}

/// Which rows of logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's: what generation samples from. Skips the vocabulary
    /// projection of every other row, the largest matrix of a small model.
    Last,
    /// One row per input token: for scoring and teacher-forced checks.
    All,
}

/// One decoder layer's weights: projections in the chosen [`WeightFormat`], norms and
/// biases as small f32 vectors. The optional parts are those of some families
/// ([`Family`]); each is present exactly when its family has it.
#[derive(Debug)]
struct Layer {
    attn_norm: Tensor,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    ffn_norm: Tensor,
    w_gate: Linear,
    w_up: Linear,
    w_down: Linear,
    /// Qwen 2: biases of Q, K and V.
    qkv_bias: Option<[Tensor; 3]>,
    /// Qwen 3, Gemma 3: RMSNorm weights (`[head_dim]`) of each Q and K head, before RoPE.
    qk_norm: Option<[Tensor; 2]>,
    /// Gemma 3: RMSNorm of the attention output and of the FFN output, before each joins
    /// the residual stream.
    post_norms: Option<[Tensor; 2]>,
}

/// The attention batches of one forward pass: the global layers' and, for a model with
/// sliding-window layers, the same batch with the window.
pub(crate) struct LayerBatches {
    global: AttentionBatch,
    local: Option<AttentionBatch>,
}

/// A Llama-family decoder loaded from a GGUF file.
///
/// The same weights run two ways: [`Model::forward`] over a [`PagedCache`] (K/V of earlier
/// tokens are read back, only new tokens are computed), and [`Model::forward_uncached`],
/// which recomputes everything with plain attention and stores nothing. They share no
/// attention code, so agreement between them is evidence the cache is right.
///
/// ```no_run
/// use kv_attention::PagedCache;
/// use kv_backend_cpu::CpuBackend;
/// use kv_core::{KvDType, StorageSpec};
/// use kv_model::{Logits, Model};
///
/// let model = Model::load(kv_model::default_model_path())?;
/// let spec = StorageSpec::new(model.shape(), KvDType::F16, 16, 8)?;
/// let mut cache = PagedCache::new(CpuBackend::new(), spec)?;
/// let seq = cache.create_sequence();
/// let prefill = model.forward(&[1, 9690, 198], &mut cache, seq, Logits::Last)?; // [1, vocab]
/// let step = model.forward(&[504], &mut cache, seq, Logits::Last)?; // reuses 3 cached tokens
/// assert_eq!(cache.len(seq)?, 4);
/// # let _ = (prefill, step);
/// # Ok::<(), kv_model::ModelError>(())
/// ```
#[derive(Debug)]
pub struct Model {
    config: LlamaConfig,
    shape: ModelShape,
    device: Device,
    /// `[vocab, hidden]`: a lookup, not a matmul.
    embeddings: Embeddings,
    layers: Vec<Layer>,
    norm: Tensor,
    /// The vocabulary projection; `token_embd.weight` again when the file has no
    /// `output.weight` (tied embeddings).
    output: Linear,
    weights: WeightFormat,
    /// How activations meet block weights.
    activations: Activations,
    rope: Rope,
    /// The sliding-window layers' RoPE (their own base), for a model that has them.
    rope_local: Option<Rope>,
}

/// Reads named tensors from a mapped GGUF file, checking presence and shape.
struct TensorReader<'a> {
    content: &'a Content,
    map: &'a GgufMap,
    path: PathBuf,
    device: &'a Device,
    format: WeightFormat,
}

impl TensorReader<'_> {
    fn has(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    fn info(
        &self,
        name: &str,
        expected: &[usize],
    ) -> Result<&candle_core::quantized::gguf_file::TensorInfo> {
        let info =
            self.content
                .tensor_infos
                .get(name)
                .ok_or_else(|| ModelError::MissingTensor {
                    name: name.to_string(),
                })?;
        if info.shape.dims() != expected {
            return Err(ModelError::TensorShape {
                name: name.to_string(),
                expected: format!("{expected:?}"),
                got: format!("{:?}", info.shape.dims()),
            });
        }
        Ok(info)
    }

    /// A 2-D weight as the file's blocks referenced in the map (no copy), when the format
    /// keeps blocks on this device and its type has our kernels.
    fn mapped_blocks(&self, name: &str, expected: &[usize]) -> Result<Option<BlockMatrix>> {
        let info = self.info(name, expected)?;
        let ty = match WeightType::from_ggml(info.ggml_dtype) {
            Some(ty) if self.format == WeightFormat::Blocks && self.device.is_cpu() => ty,
            _ => return Ok(None),
        };
        let range = self.map.range(self.content, name, info)?;
        if !finite_bytes(info.ggml_dtype, &self.map.bytes()[range.clone()]).unwrap_or(true) {
            return Err(ModelError::NonFiniteWeights {
                what: format!("tensor {name:?}"),
            });
        }
        let (rows, cols) = info.shape.dims2()?;
        BlockMatrix::mapped(ty, rows, cols, self.map.map().clone(), range)
            .map(Some)
            .ok_or_else(|| ModelError::InvalidGguf {
                path: self.path.clone(),
                detail: format!("tensor {name:?}: not whole blocks of {:?}", info.ggml_dtype),
            })
    }

    fn qtensor(&mut self, name: &str, expected: &[usize]) -> Result<QTensor> {
        let info = self.info(name, expected)?;
        let t = info
            .read(
                &mut Cursor::new(self.map.bytes()),
                self.content.tensor_data_offset,
                self.device,
            )
            .map_err(|e| ModelError::InvalidGguf {
                path: self.path.clone(),
                detail: format!("tensor {name:?}: {}", one_line(&e.to_string())),
            })?;
        if !all_finite(&t)? {
            return Err(ModelError::NonFiniteWeights {
                what: format!("tensor {name:?}"),
            });
        }
        Ok(t)
    }

    fn matmul(&mut self, name: &str, expected: &[usize]) -> Result<Linear> {
        if let Some(m) = self.mapped_blocks(name, expected)? {
            return Ok(Linear::Blocks(Arc::new(m)));
        }
        let t = self.qtensor(name, expected)?;
        self.to_matmul(t)
    }

    /// The weight in the chosen format. Float tensors in the file are always expanded
    /// (neither candle nor we have a quantized matmul for them), and so is every block type
    /// without our kernels (K-quants etc.) under [`WeightFormat::Blocks`], and every weight
    /// on a device other than the CPU: any Llama-family GGUF still loads.
    fn to_matmul(&self, t: QTensor) -> Result<Linear> {
        let float = matches!(t.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
        if self.format == WeightFormat::Blocks && self.device.is_cpu() && !float {
            if let Some(m) = BlockMatrix::from_qtensor(&t)? {
                return Ok(Linear::Blocks(Arc::new(m)));
            }
        }
        Ok(Linear::Candle(
            if self.format != WeightFormat::Quantized || float {
                QMatMul::Tensor(t.dequantize(self.device)?.to_dtype(DType::F32)?)
            } else {
                QMatMul::QTensor(Arc::new(t))
            },
        ))
    }

    fn vector(&mut self, name: &str, len: usize) -> Result<Tensor> {
        let t = self.qtensor(name, &[len])?;
        Ok(t.dequantize(self.device)?.to_dtype(DType::F32)?)
    }
}

impl Model {
    /// Loads the model in `path` onto the CPU with the default [`WeightFormat`] (the file's
    /// blocks, multiplied by this crate's kernels).
    ///
    /// # Errors
    /// [`ModelError::ModelNotFound`], [`ModelError::InvalidGguf`] for a corrupt or truncated
    /// file, [`ModelError::UnsupportedArchitecture`], missing or misshapen tensors and
    /// metadata.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        Self::load_with(path, &Device::Cpu, WeightFormat::default())
    }

    /// Loads the model in `path` onto `device` with weights in `format`.
    ///
    /// # Errors
    /// As [`Model::load`].
    pub fn load_with(
        path: impl AsRef<Path>,
        device: &Device,
        format: WeightFormat,
    ) -> Result<Self> {
        let path = path.as_ref();
        let (content, map) = GgufMap::open(path)?;
        Self::from_content(&content, &map, path, device, format)
    }

    pub(crate) fn from_content(
        content: &Content,
        map: &GgufMap,
        path: &Path,
        device: &Device,
        format: WeightFormat,
    ) -> Result<Self> {
        let config = LlamaConfig::from_metadata(&content.metadata)?;
        let shape = config.shape()?;
        let mut r = TensorReader {
            content,
            map,
            path: path.to_path_buf(),
            device,
            format,
        };
        let (h, ff, vocab) = (
            config.hidden_size,
            config.intermediate_size,
            config.vocab_size,
        );
        let q_dim = config.n_heads * config.head_dim;
        let kv_dim = config.n_kv_heads * config.head_dim;

        let blocks = r
            .mapped_blocks("token_embd.weight", &[vocab, h])?
            .map(Arc::new);
        // Tied output: the same blocks or f32 tensor serve both, no second copy.
        let (embeddings, tied) = match blocks {
            Some(b) => (Embeddings::Blocks(b.clone()), Linear::Blocks(b)),
            None => {
                let embd = r.qtensor("token_embd.weight", &[vocab, h])?;
                let t = embd.dequantize(device)?.to_dtype(DType::F32)?;
                let tied = if format == WeightFormat::Quantized {
                    r.to_matmul(embd)?
                } else {
                    Linear::Candle(QMatMul::Tensor(t.clone()))
                };
                (Embeddings::F32(t), tied)
            }
        };
        let output = if r.has("output.weight") {
            r.matmul("output.weight", &[vocab, h])?
        } else {
            tied
        };
        let norm = r.vector("output_norm.weight", h)?;
        let freq_factors = if r.has("rope_freqs.weight") {
            let t = r.vector("rope_freqs.weight", config.rope_dim / 2)?;
            Some(t.to_vec1::<f32>()?)
        } else {
            config
                .llama3_rope
                .map(|l3| l3.freq_factors(config.rope_freq_base, config.rope_dim))
        };
        let rope = Rope::new(&config, freq_factors.as_deref(), device)?;
        let rope_local = match config.sliding_window {
            Some(_) => Some(Rope::local(&config, device)?),
            None => None,
        };
        let hd = config.head_dim;

        let mut layers = Vec::with_capacity(config.n_layers);
        for i in 0..config.n_layers {
            let name = |t: &str| format!("blk.{i}.{t}.weight");
            let bias = |t: &str| format!("blk.{i}.{t}.bias");
            let qkv_bias = match config.family {
                Family::Qwen2 => Some([
                    r.vector(&bias("attn_q"), q_dim)?,
                    r.vector(&bias("attn_k"), kv_dim)?,
                    r.vector(&bias("attn_v"), kv_dim)?,
                ]),
                _ => None,
            };
            let qk_norm = match config.family {
                Family::Qwen3 | Family::Gemma3 => Some([
                    r.vector(&name("attn_q_norm"), hd)?,
                    r.vector(&name("attn_k_norm"), hd)?,
                ]),
                _ => None,
            };
            let post_norms = match config.family {
                Family::Gemma3 => Some([
                    r.vector(&name("post_attention_norm"), h)?,
                    r.vector(&name("post_ffw_norm"), h)?,
                ]),
                _ => None,
            };
            layers.push(Layer {
                qkv_bias,
                qk_norm,
                post_norms,
                attn_norm: r.vector(&name("attn_norm"), h)?,
                wq: r.matmul(&name("attn_q"), &[q_dim, h])?,
                wk: r.matmul(&name("attn_k"), &[kv_dim, h])?,
                wv: r.matmul(&name("attn_v"), &[kv_dim, h])?,
                wo: r.matmul(&name("attn_output"), &[h, q_dim])?,
                ffn_norm: r.vector(&name("ffn_norm"), h)?,
                w_gate: r.matmul(&name("ffn_gate"), &[ff, h])?,
                w_up: r.matmul(&name("ffn_up"), &[ff, h])?,
                w_down: r.matmul(&name("ffn_down"), &[h, ff])?,
            });
        }
        Ok(Self {
            config,
            shape,
            device: device.clone(),
            embeddings,
            layers,
            norm,
            output,
            weights: format,
            activations: Activations::Exact,
            rope,
            rope_local,
        })
    }

    /// The hyper-parameters read from the file.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Layers and heads: what a cache for this model is shaped by.
    pub fn shape(&self) -> ModelShape {
        self.shape
    }

    /// How the projection weights are held.
    pub fn weight_format(&self) -> WeightFormat {
        self.weights
    }

    /// How activations meet block weights (see [`Activations`]).
    pub fn activations(&self) -> Activations {
        self.activations
    }

    /// Sets how activations meet block weights from the next forward pass on; a cache
    /// filled under one setting should not be continued under the other (its K/V were
    /// computed with the other rounding).
    ///
    /// ```no_run
    /// use kv_model::{Activations, Model};
    /// let mut model = Model::load("SmolLM2-135M-Instruct.Q4_1.gguf")?;
    /// model.set_activations(Activations::Q8);
    /// assert_eq!(model.activations(), Activations::Q8);
    /// # Ok::<(), kv_model::ModelError>(())
    /// ```
    pub fn set_activations(&mut self, activations: Activations) {
        self.activations = activations;
    }

    /// Where the weights live; caches must use a backend on the same device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs `tokens` as the next tokens of `seq`, reading the K/V of its earlier tokens from
    /// `cache` and appending theirs. Returns logits `[rows, vocab]` in f32.
    ///
    /// One call is one step: prefill passes the whole prompt, decode passes one token.
    /// Positions continue from the tokens `seq` already holds.
    ///
    /// # Errors
    /// [`ModelError::EmptyPrompt`] for no tokens, [`ModelError::ContextOverflow`] past the
    /// model's context, [`ModelError::CacheMismatch`] for a cache of another shape,
    /// [`ModelError::TokenOutOfRange`], and the cache's errors (e.g. `CacheFull`). On error
    /// the sequence is left as it was.
    pub fn forward<B: CacheBackend>(
        &self,
        tokens: &[u32],
        cache: &mut PagedCache<B>,
        seq: SeqId,
        logits: Logits,
    ) -> Result<Tensor> {
        on_pool(|| self.forward_here(tokens, cache, seq, logits))
    }

    /// [`Model::forward`] on the calling thread.
    fn forward_here<B: CacheBackend>(
        &self,
        tokens: &[u32],
        cache: &mut PagedCache<B>,
        seq: SeqId,
        logits: Logits,
    ) -> Result<Tensor> {
        if cache.spec().shape != self.shape {
            return Err(ModelError::CacheMismatch {
                expected: format!("{:?}", self.shape),
                got: format!("{:?}", cache.spec().shape),
            });
        }
        let start = cache.len(seq)?;
        self.check_tokens(tokens, start)?;
        let n = tokens.len();
        let slots = cache.reserve(seq, n)?;
        let result = self.cache_batches(cache, &[(seq, n)]).and_then(|batches| {
            self.run(tokens, &[(start, n)], logits, |layer, q, k, v| {
                cache.write(layer, &slots, k, v)?;
                Ok(cache.attend(layer, q, self.batch_for(&batches, layer))?)
            })
        });
        if result.is_err() {
            // Forget the half-written tokens so the sequence is as before the call. Cannot
            // fail: `seq` exists and `start` is within its length.
            let _ = cache.truncate(seq, start);
        }
        result
    }

    /// Runs the whole sequence `tokens` from position 0 with plain causal attention over
    /// K/V computed in this call, storing nothing. Returns logits `[rows, vocab]` in f32.
    ///
    /// This is "no cache" generation's forward pass and the oracle the cached path is tested
    /// against.
    ///
    /// # Errors
    /// [`ModelError::EmptyPrompt`], [`ModelError::ContextOverflow`],
    /// [`ModelError::TokenOutOfRange`], tensor errors.
    pub fn forward_uncached(&self, tokens: &[u32], logits: Logits) -> Result<Tensor> {
        self.check_tokens(tokens, 0)?;
        let scale = f64::from(self.config.attention_scale);
        on_pool(|| {
            self.run(tokens, &[(0, tokens.len())], logits, |layer, q, k, v| {
                plain_attention(q, k, v, scale, self.config.layer_window(layer))
            })
        })
    }

    pub(crate) fn check_tokens(&self, tokens: &[u32], start: usize) -> Result<()> {
        if tokens.is_empty() {
            return Err(ModelError::EmptyPrompt);
        }
        if start + tokens.len() > self.config.context_length {
            return Err(ModelError::ContextOverflow {
                what: "sequence",
                needed: start + tokens.len(),
                context: self.config.context_length,
            });
        }
        if let Some(&id) = tokens
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            return Err(ModelError::TokenOutOfRange {
                id,
                vocab: self.config.vocab_size,
            });
        }
        Ok(())
    }

    /// The decoder with attention supplied by the caller: `attention(layer, q, k, v)` gets
    /// RoPE'd `q` `[n, q_heads, head_dim]`, `k` and `v` `[n, kv_heads, head_dim]` of the new
    /// tokens and returns `[n, q_heads, head_dim]`.
    ///
    /// `segments` splits `tokens` into sequences, in order: `(start, len)` says the next
    /// `len` tokens sit at positions `start..start + len` of their own sequence (RoPE).
    /// [`Logits::Last`] returns the last row of each segment.
    pub(crate) fn run<F>(
        &self,
        tokens: &[u32],
        segments: &[(usize, usize)],
        logits: Logits,
        mut attention: F,
    ) -> Result<Tensor>
    where
        F: FnMut(usize, &Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    {
        let c = &self.config;
        let n = tokens.len();
        let eps = c.rms_norm_eps;
        let mut x = self.embeddings.lookup(tokens, &self.device)?;
        if c.family == Family::Gemma3 {
            // Gemma scales its embeddings by sqrt(width) (in f32, as llama.cpp does).
            x = (x * f64::from((c.hidden_size as f32).sqrt()))?;
        }
        // Each layer's input norm; from the second layer on made together with the
        // residual add that ends the layer before (`add_rms_norm`).
        let mut h = match self.layers.first() {
            Some(first) => rms_norm(&x, &first.attn_norm, eps)?,
            None => x.clone(),
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let [mut q, mut k, mut v]: [Tensor; 3] =
                Linear::forward_many(&[&layer.wq, &layer.wk, &layer.wv], &h, self.activations)?
                    .try_into()
                    .map_err(|_| candle_core::Error::Msg("one tensor per projection".into()))?;
            if let Some([bq, bk, bv]) = &layer.qkv_bias {
                q = q.broadcast_add(bq)?;
                k = k.broadcast_add(bk)?;
                v = v.broadcast_add(bv)?;
            }
            let mut q = q.reshape((n, c.n_heads, c.head_dim))?;
            let mut k = k.reshape((n, c.n_kv_heads, c.head_dim))?;
            let v = v.reshape((n, c.n_kv_heads, c.head_dim))?;
            if let Some([nq, nk]) = &layer.qk_norm {
                // RMSNorm over each head's elements (the last dimension).
                q = rms_norm(&q, nq, eps)?;
                k = rms_norm(&k, nk, eps)?;
            }
            let rope = match (&self.rope_local, c.layer_window(i)) {
                (Some(local), Some(_)) => local,
                _ => &self.rope,
            };
            let q = rope_segments(rope, &q, segments)?;
            let k = rope_segments(rope, &k, segments)?;
            // Weights are finite (checked at load), so NaN or infinity here comes from what
            // the weights compute: a model-file problem, not the cache's.
            let attn = attention(i, &q, &k, &v).map_err(|e| match e {
                ModelError::Cache(kv_core::KvError::NonFinite { what }) => {
                    ModelError::NonFiniteWeights {
                        what: format!("layer {i} (its attention's {what})"),
                    }
                }
                e => e,
            })?;
            let attn = attn
                .to_dtype(DType::F32)?
                .reshape((n, c.n_heads * c.head_dim))?
                .contiguous()?;
            let mut out = layer.wo.forward(&attn, self.activations)?;
            if let Some([post_attn, _]) = &layer.post_norms {
                out = rms_norm(&out, post_attn, eps)?;
            }
            let (sum, normed) = add_rms_norm(&x, &out, &layer.ffn_norm, eps)?;
            x = sum;
            let [gate, up]: [Tensor; 2] =
                Linear::forward_many(&[&layer.w_gate, &layer.w_up], &normed, self.activations)?
                    .try_into()
                    .map_err(|_| candle_core::Error::Msg("one tensor per projection".into()))?;
            let act = match c.family {
                Family::Gemma3 => gelu_tanh_gated(&gate, &up)?,
                _ => swiglu(&gate, &up)?,
            };
            let mut out = layer.w_down.forward(&act, self.activations)?;
            if let Some([_, post_ffn]) = &layer.post_norms {
                out = rms_norm(&out, post_ffn, eps)?;
            }
            match self.layers.get(i + 1) {
                Some(next) => (x, h) = add_rms_norm(&x, &out, &next.attn_norm, eps)?,
                None => x = (x + out)?,
            }
        }
        let x = match logits {
            Logits::Last if segments.len() == 1 => x.narrow(0, n - 1, 1)?,
            Logits::Last => {
                let mut last = Vec::with_capacity(segments.len());
                let mut end = 0;
                for &(_, len) in segments {
                    end += len;
                    last.push(end as u32 - 1);
                }
                x.index_select(&Tensor::new(last, &self.device)?, 0)?
            }
            Logits::All => x,
        };
        let x = rms_norm(&x, &self.norm, eps)?;
        self.output.forward(&x, self.activations)
    }
}

impl Model {
    /// The rotary tables (the sliding window re-rotates its sinks with them).
    pub(crate) fn rope(&self) -> &Rope {
        &self.rope
    }

    /// The attention batches of a forward pass over `seqs`: the file's attention scale,
    /// and a windowed copy when the model has sliding-window layers.
    pub(crate) fn layer_batches(&self, seqs: Vec<SeqAttention>) -> LayerBatches {
        let mut global = AttentionBatch::new(seqs, self.config.head_dim);
        global.scale = self.config.attention_scale;
        let local = self
            .config
            .sliding_window
            .and_then(std::num::NonZeroUsize::new)
            .map(|w| global.clone().with_window(w));
        LayerBatches { global, local }
    }

    /// [`Model::layer_batches`] of `seqs` (each with its count of new tokens) in `cache`:
    /// with a sliding-window group, the local layers' batch describes that group's
    /// sequences (their freed blocks left out).
    pub(crate) fn cache_batches<B: CacheBackend>(
        &self,
        cache: &PagedCache<B>,
        seqs: &[(SeqId, usize)],
    ) -> Result<LayerBatches> {
        let global = seqs
            .iter()
            .map(|&(seq, n)| cache.seq_attention(seq, n))
            .collect::<kv_core::Result<Vec<_>>>()?;
        let mut batches = self.layer_batches(global);
        if let (Some(local), Some(_)) = (&mut batches.local, cache.sliding_layers()) {
            local.seqs = seqs
                .iter()
                .map(|&(seq, n)| cache.sliding_seq_attention(seq, n))
                .collect::<kv_core::Result<Vec<_>>>()?;
        }
        Ok(batches)
    }

    /// The two cache groups of this model when it has sliding-window layers (Gemma 3's
    /// local layers) and `layout` can be freed by window: which layers slide, and a pool
    /// for `sequences` sequences that add at most `chunk` tokens a step, no larger than
    /// `max_blocks` (the global pool: a sliding sequence never holds more). `None` for a
    /// model without such layers or a layout with an f16 residual (kept in one group).
    ///
    /// # Errors
    /// [`ModelError::InvalidArgument`] for a zero block size, chunk or sequence count;
    /// the pool size overflowing.
    pub fn sliding_layers(
        &self,
        dtype: kv_core::KvDType,
        block_size: usize,
        chunk: usize,
        sequences: usize,
        max_blocks: usize,
    ) -> Result<Option<SlidingLayers>> {
        let c = &self.config;
        let Some(window) = c.sliding_window.and_then(std::num::NonZeroUsize::new) else {
            return Ok(None);
        };
        let sliding: Vec<bool> = (0..c.n_layers)
            .map(|l| c.layer_window(l).is_some())
            .collect();
        if dtype.residual_tokens() > 0 || sliding.iter().all(|&s| s) || !sliding.contains(&true) {
            return Ok(None);
        }
        if sequences == 0 {
            return Err(ModelError::InvalidArgument {
                what: "sequences",
                expected: "at least 1".into(),
                got: "0".into(),
            });
        }
        let per_seq = SlidingLayers::blocks_per_sequence(window, block_size, chunk)?;
        let blocks = per_seq
            .checked_mul(sequences)
            .ok_or(kv_core::KvError::Overflow {
                what: "sliding blocks",
                detail: format!("{per_seq} blocks times {sequences} sequences"),
            })?
            .min(max_blocks);
        Ok(Some(SlidingLayers::new(window, sliding, blocks)?))
    }

    /// A cache of `spec` for this model: for a model with sliding-window layers, two
    /// groups ([`PagedCache::with_sliding_window`]) whose local layers free their blocks
    /// as the window slides, sized for one sequence adding at most `chunk` tokens a step;
    /// otherwise (or with `free_window` false) one group holding every token, as before.
    ///
    /// # Errors
    /// What [`Model::sliding_layers`] and the cache constructors return.
    pub fn new_cache<B: CacheBackend>(
        &self,
        backend: B,
        spec: StorageSpec,
        chunk: usize,
        free_window: bool,
    ) -> Result<PagedCache<B>> {
        let sliding = if free_window {
            self.sliding_layers(spec.dtype, spec.block_size, chunk, 1, spec.num_blocks)?
        } else {
            None
        };
        Ok(match sliding {
            Some(sliding) => PagedCache::with_sliding_window(backend, spec, sliding, None)?,
            None => PagedCache::new(backend, spec)?,
        })
    }

    /// The batch layer `layer` attends with.
    pub(crate) fn batch_for<'a>(
        &self,
        batches: &'a LayerBatches,
        layer: usize,
    ) -> &'a AttentionBatch {
        match (&batches.local, self.config.layer_window(layer)) {
            (Some(local), Some(_)) => local,
            _ => &batches.global,
        }
    }
}

/// RoPE over `x` (`[n, heads, head_dim]`) split into `segments` (see [`Model::run`]).
fn rope_segments(rope: &Rope, x: &Tensor, segments: &[(usize, usize)]) -> Result<Tensor> {
    if let [(start, _)] = segments {
        return rope.apply(x, *start);
    }
    let mut parts = Vec::with_capacity(segments.len());
    let mut row = 0;
    for &(start, len) in segments {
        parts.push(rope.apply(&x.narrow(0, row, len)?, start)?);
        row += len;
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// Whether every weight of `t` is finite, read from its stored bytes: the scales (and
/// minima) of Q4/Q5/Q8 blocks, every element of float tensors; other block types are
/// dequantized and checked.
/// Whether the stored bytes of a tensor of `dtype` hold only finite weights, read from the
/// blocks' f16 fields (the other fields are small integers, so a block with finite fields
/// has finite weights) or the float elements; `None` for a type without a rule here.
fn finite_bytes(dtype: GgmlDType, data: &[u8]) -> Option<bool> {
    let f16_ok = |b: &[u8]| u16::from_le_bytes([b[0], b[1]]) & 0x7c00 != 0x7c00;
    let bf16_ok = |b: &[u8]| u16::from_le_bytes([b[0], b[1]]) & 0x7f80 != 0x7f80;
    // (bytes per block, offsets of the f16 fields in it)
    let blocks: Option<(usize, &[usize])> = match dtype {
        GgmlDType::Q4_0 => Some((18, &[0])),
        GgmlDType::Q4_1 => Some((20, &[0, 2])),
        GgmlDType::Q5_0 => Some((22, &[0])),
        GgmlDType::Q5_1 => Some((24, &[0, 2])),
        GgmlDType::Q8_0 => Some((34, &[0])),
        GgmlDType::Q8_1 => Some((36, &[0, 2])),
        GgmlDType::Q4K => Some((144, &[0, 2])),
        GgmlDType::Q5K => Some((176, &[0, 2])),
        GgmlDType::Q6K => Some((210, &[208])),
        GgmlDType::F16 => Some((2, &[0])),
        _ => None,
    };
    match (dtype, blocks) {
        (_, Some((size, fields))) => Some(
            data.chunks_exact(size)
                .all(|b| fields.iter().all(|&o| f16_ok(&b[o..o + 2]))),
        ),
        (GgmlDType::BF16, _) => Some(data.chunks_exact(2).all(bf16_ok)),
        (GgmlDType::F32, _) => Some(
            data.chunks_exact(4)
                .all(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite()),
        ),
        _ => None,
    }
}

fn all_finite(t: &QTensor) -> Result<bool> {
    match finite_bytes(t.dtype(), &t.data()?) {
        Some(ok) => Ok(ok),
        None => {
            let x = t.dequantize(&Device::Cpu)?.flatten_all()?;
            // The sum of squares of finite weights can overflow; check element by element.
            Ok(x.to_vec1::<f32>()?.iter().all(|v| v.is_finite()))
        }
    }
}

/// `x / sqrt(mean(x^2) + eps) * weight` over the last dimension.
///
/// One pass per row on the CPU: as seven candle ops it made seven tensors per call, and a
/// decode step makes 61 calls. `x` and `weight` are read in place; the result is the one
/// allocation.
fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if !x.device().is_cpu() {
        let mean_sq = x.sqr()?.mean_keepdim(D::Minus1)?;
        let inv = (mean_sq + eps)?.sqrt()?.recip()?;
        return Ok(x.broadcast_mul(&inv)?.broadcast_mul(weight)?);
    }
    let h = x.dim(D::Minus1)?;
    let v = host_f32(weight, |w| {
        check_norm_weight(x, weight, w, h)?;
        host_f32(x, |x| {
            let mut v = x.to_vec();
            norm_rows(&mut v, w, eps);
            v
        })
    })??;
    Ok(Tensor::from_vec(v, x.shape(), x.device())?)
}

/// The residual add `x + out` and the RMSNorm of its result in one pass on the CPU:
/// `(x + out, rms_norm(x + out))`, bit for bit what the two operations give (the sum is
/// rounded once per element, the norm is [`rms_norm`]'s loop). Every layer ends two
/// residual adds each followed by a norm; as separate operations each add was a candle
/// tensor of its own and the norm copied it again.
fn add_rms_norm(x: &Tensor, out: &Tensor, weight: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    if !x.device().is_cpu() || x.shape() != out.shape() || x.dtype() != out.dtype() {
        let x = (x + out)?;
        let h = rms_norm(&x, weight, eps)?;
        return Ok((x, h));
    }
    let h = x.dim(D::Minus1)?;
    let (sum, normed) = host_f32(weight, |w| {
        check_norm_weight(x, weight, w, h)?;
        host_f32(x, |xs| {
            host_f32(out, |os| {
                let sum: Vec<f32> = xs.iter().zip(os).map(|(a, b)| a + b).collect();
                let mut normed = sum.clone();
                norm_rows(&mut normed, w, eps);
                (sum, normed)
            })
        })?
    })??;
    Ok((
        Tensor::from_vec(sum, x.shape(), x.device())?,
        Tensor::from_vec(normed, x.shape(), x.device())?,
    ))
}

/// A norm weight of `h` elements for `x`, or the shape error candle's ops would give.
fn check_norm_weight(x: &Tensor, weight: &Tensor, w: &[f32], h: usize) -> Result<()> {
    if w.len() == h {
        return Ok(());
    }
    Err(candle_core::Error::ShapeMismatchBinaryOp {
        lhs: x.shape().clone(),
        rhs: weight.shape().clone(),
        op: "rms_norm",
    }
    .into())
}

/// Each row of `w.len()` elements of `v` scaled by `1 / sqrt(mean(row^2) + eps)` and `w`.
fn norm_rows(v: &mut [f32], w: &[f32], eps: f64) {
    let h = w.len().max(1);
    for row in v.chunks_exact_mut(h) {
        let mean_sq = row.iter().map(|a| a * a).sum::<f32>() / h as f32;
        let inv = 1.0 / (mean_sq + eps as f32).sqrt();
        for (a, w) in row.iter_mut().zip(w) {
            *a = *a * inv * w;
        }
    }
}

/// Calls `f` with `t`'s elements as contiguous host f32, copying only when they are not
/// already (another dtype, a strided view).
fn host_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.to_dtype(DType::F32)?.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    if let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) =
        (&*storage, layout.contiguous_offsets())
    {
        return Ok(f(&v[a..b]));
    }
    drop(storage);
    Ok(f(&t.flatten_all()?.to_vec1::<f32>()?))
}

/// SwiGLU's `silu(gate) * up` in one pass on the CPU (three candle ops otherwise).
fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !gate.device().is_cpu() || gate.shape() != up.shape() {
        return Ok((gate.silu()? * up)?);
    }
    let mut g = gate.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    host_f32(up, |u| {
        for (g, u) in g.iter_mut().zip(u) {
            *g = *g / (1.0 + (-*g).exp()) * u;
        }
    })?;
    Ok(Tensor::from_vec(g, gate.shape(), gate.device())?)
}

/// Gemma's gated FFN activation `gelu(gate) * up`, GELU in its tanh form
/// (`0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, as llama.cpp's `ggml_gelu`).
fn gelu_tanh_gated(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !gate.device().is_cpu() || gate.shape() != up.shape() {
        return Ok((gate.gelu()? * up)?);
    }
    let mut g = gate.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let c = (2.0f32 / std::f32::consts::PI).sqrt();
    host_f32(up, |u| {
        for (g, u) in g.iter_mut().zip(u) {
            let x = *g;
            *g = 0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh()) * u;
        }
    })?;
    Ok(Tensor::from_vec(g, gate.shape(), gate.device())?)
}

/// Causal softmax attention over exactly the K/V given, with each KV head repeated for its
/// group of query heads; with `window = Some(W)` the query at `i` sees only keys
/// `i - W + 1 ..= i`. Stores nothing; O(n^2) in the sequence length.
fn plain_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    window: Option<usize>,
) -> Result<Tensor> {
    let (n, q_heads, d) = q.dims3()?;
    let kv_heads = k.dim(1)?;
    let group = q_heads / kv_heads;
    // [n, kv_heads, d] -> [q_heads, n, d]: query head h reads KV head h / group.
    let repeat = |t: &Tensor| -> Result<Tensor> {
        Ok(t.transpose(0, 1)?
            .unsqueeze(1)?
            .broadcast_as((kv_heads, group, n, d))?
            .reshape((q_heads, n, d))?)
    };
    let q = q.transpose(0, 1)?.contiguous()?;
    let k = repeat(k)?;
    let v = repeat(v)?;
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| {
            (0..n).map(move |j| {
                let too_old = window.is_some_and(|w| j + w <= i);
                if j > i || too_old {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    let mask = Tensor::from_vec(mask, (n, n), q.device())?;
    let scores = scores.broadcast_add(&mask)?;
    let max = scores.max_keepdim(D::Minus1)?;
    let e = scores.broadcast_sub(&max)?.exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    Ok(p.matmul(&v)?.transpose(0, 1)?.contiguous()?)
}

/// Runs `f` on a worker of rayon's global pool (inline when the caller is one already).
///
/// A forward pass makes a few hundred parallel loops (matmuls, attention). Called from a
/// thread outside the pool, each loop hands its work over and sleeps until the pool is
/// done: on SmolLM2 with 2 threads that cost a third of decode speed. On a worker, the
/// loops share work with the calling thread; one hand-over per forward pass remains.
pub(crate) fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attention written out with loops, in f64.
    fn naive(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        n: usize,
        qh: usize,
        kvh: usize,
        d: usize,
    ) -> Vec<f32> {
        let g = qh / kvh;
        let scale = 1.0 / (d as f64).sqrt();
        let mut out = vec![0f32; n * qh * d];
        for i in 0..n {
            for h in 0..qh {
                let kh = h / g;
                let qrow = &q[(i * qh + h) * d..][..d];
                let scores: Vec<f64> = (0..=i)
                    .map(|j| {
                        let krow = &k[(j * kvh + kh) * d..][..d];
                        qrow.iter()
                            .zip(krow)
                            .map(|(a, b)| f64::from(a * b))
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = w.iter().sum();
                for (j, wj) in w.iter().enumerate() {
                    let vrow = &v[(j * kvh + kh) * d..][..d];
                    for e in 0..d {
                        out[(i * qh + h) * d + e] += (wj / z * f64::from(vrow[e])) as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn plain_attention_is_causal_gqa() {
        let (n, qh, kvh, d) = (40, 9, 3, 64);
        let gen = |len: usize, seed: usize| -> Vec<f32> {
            (0..len)
                .map(|i| (((i + seed) * 7919 % 101) as f32 - 50.0) / 25.0)
                .collect()
        };
        let (q, k, v) = (gen(n * qh * d, 1), gen(n * kvh * d, 2), gen(n * kvh * d, 3));
        let dev = Device::Cpu;
        let t = |x: &Vec<f32>, h| Tensor::from_vec(x.clone(), (n, h, d), &dev).unwrap();
        let got = plain_attention(
            &t(&q, qh),
            &t(&k, kvh),
            &t(&v, kvh),
            1.0 / (d as f64).sqrt(),
            None,
        )
        .unwrap();
        assert_eq!(got.dims(), &[n, qh, d]);
        let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
        let want = naive(&q, &k, &v, n, qh, kvh, d);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "{g} vs {w}");
        }
    }

    #[test]
    fn swiglu_matches_candle_ops() {
        let dev = Device::Cpu;
        let g = Tensor::new(&[[-3f32, -0.5, 0.0, 0.7], [2.0, 9.0, -20.0, 1e-3]], &dev).unwrap();
        let u = Tensor::new(&[[1f32, 2.0, -3.0, 4.0], [0.5, -1.0, 2.0, 3.0]], &dev).unwrap();
        let got: Vec<f32> = swiglu(&g, &u)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want: Vec<f32> = (g.silu().unwrap() * &u)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    /// The fused residual add and norm give the bits of the add and the norm apart, and
    /// refuse a weight of the wrong width as the norm does.
    #[test]
    fn add_rms_norm_equals_the_add_then_the_norm_bit_for_bit() {
        let dev = Device::Cpu;
        let (n, h) = (3, 40);
        let gen = |seed: usize| -> Vec<f32> {
            (0..n * h)
                .map(|i| (((i + seed) * 7919 % 211) as f32 - 105.0) / 13.0)
                .collect()
        };
        let x = Tensor::from_vec(gen(1), (n, h), &dev).unwrap();
        let out = Tensor::from_vec(gen(2), (n, h), &dev).unwrap();
        let w: Vec<f32> = (0..h).map(|i| 0.5 + i as f32 / 17.0).collect();
        let w = Tensor::from_vec(w, h, &dev).unwrap();
        let (sum, normed) = add_rms_norm(&x, &out, &w, 1e-6).unwrap();
        let want_sum = (&x + &out).unwrap();
        let want_normed = rms_norm(&want_sum, &w, 1e-6).unwrap();
        let bits = |t: &Tensor| -> Vec<u32> {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        };
        assert_eq!(bits(&sum), bits(&want_sum));
        assert_eq!(bits(&normed), bits(&want_normed));
        let short = Tensor::from_vec(vec![1f32; h - 1], h - 1, &dev).unwrap();
        assert!(add_rms_norm(&x, &out, &short, 1e-6).is_err());
        assert!(rms_norm(&x, &short, 1e-6).is_err());
    }

    #[test]
    fn rms_norm_matches_definition() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1f32, 2.0, 3.0, 4.0]], &dev).unwrap();
        let w = Tensor::new(&[1f32, 0.5, 2.0, 1.0], &dev).unwrap();
        let got: Vec<f32> = rms_norm(&x, &w, 1e-5)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let rms = ((1.0 + 4.0 + 9.0 + 16.0) / 4.0 + 1e-5f64).sqrt();
        let want = [1.0 / rms, 2.0 * 0.5 / rms, 3.0 * 2.0 / rms, 4.0 / rms];
        for (g, w) in got.iter().zip(want) {
            assert!((f64::from(*g) - w).abs() < 1e-6);
        }
    }
}
