//! A GGUF writer for tests that records where every structural field sits (hostile.rs
//! corrupts those fields), and synthetic models at real shapes written with it (the GPU
//! tests and the GPU bench write a SmolLM2-shape Q4_1 model instead of shipping one).
//!
//! Shared by the test crates (`mod common;`) and the `gpu_model_bench` example
//! (`#[path]`); each uses a part, so unused items are allowed.
#![allow(dead_code)]
// ---------------------------------------------------------------------------------------
// A GGUF writer that records where every structural field sits.

/// A metadata value as GGUF stores it.
#[derive(Clone, Debug)]
pub enum Val {
    /// Type id and little-endian payload.
    Scalar(u32, Vec<u8>),
    Str(Vec<u8>),
    /// Element type and elements (payloads only).
    Arr(u32, Vec<Val>),
}

impl Val {
    pub fn u32(v: u32) -> Self {
        Val::Scalar(4, v.to_le_bytes().to_vec())
    }
    pub fn i32(v: i32) -> Self {
        Val::Scalar(5, v.to_le_bytes().to_vec())
    }
    pub fn u64(v: u64) -> Self {
        Val::Scalar(10, v.to_le_bytes().to_vec())
    }
    pub fn i64(v: i64) -> Self {
        Val::Scalar(11, v.to_le_bytes().to_vec())
    }
    pub fn f32(v: f32) -> Self {
        Val::Scalar(6, v.to_le_bytes().to_vec())
    }
    pub fn bool(v: bool) -> Self {
        Val::Scalar(7, vec![u8::from(v)])
    }
    pub fn str(s: &str) -> Self {
        Val::Str(s.as_bytes().to_vec())
    }
    pub fn ty(&self) -> u32 {
        match self {
            Val::Scalar(t, _) => *t,
            Val::Str(_) => 8,
            Val::Arr(..) => 9,
        }
    }
}

#[derive(Clone, Debug)]
pub struct TensorSpec {
    pub name: String,
    /// GGUF order: the innermost (row) dimension first.
    pub dims: Vec<u64>,
    pub ty: u32,
    /// The stored bytes; empty for zeros of `size` bytes left as a sparse hole.
    pub data: Vec<u8>,
    pub size: usize,
}

#[derive(Clone, Debug)]
pub struct Gguf {
    pub kvs: Vec<(String, Val)>,
    pub tensors: Vec<TensorSpec>,
}

/// A field of the written header: where, how wide, what.
#[derive(Clone, Debug)]
pub struct Field {
    pub pos: usize,
    pub width: usize,
    pub kind: FieldKind,
    pub label: String,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FieldKind {
    Count,
    Length,
    ValueType,
    ArrayType,
    Dims,
    Dim,
    TensorType,
    Offset,
}

pub struct Written {
    /// The file's first bytes; the rest, up to `len`, is zeros.
    pub bytes: Vec<u8>,
    pub len: usize,
    pub fields: Vec<Field>,
    /// Positions where a structural part starts (truncation points).
    pub boundaries: Vec<usize>,
}

pub const ALIGN: usize = 32;

impl Gguf {
    pub fn set(&mut self, key: &str, v: Val) {
        match self.kvs.iter_mut().find(|(k, _)| k == key) {
            Some(kv) => kv.1 = v,
            None => self.kvs.push((key.to_string(), v)),
        }
    }

    pub fn remove(&mut self, key: &str) {
        self.kvs.retain(|(k, _)| k != key);
    }

    pub fn tensor_mut(&mut self, name: &str) -> &mut TensorSpec {
        self.tensors.iter_mut().find(|t| t.name == name).unwrap()
    }

    pub fn write(&self) -> Written {
        let mut w = Written {
            bytes: Vec::new(),
            len: 0,
            fields: Vec::new(),
            boundaries: Vec::new(),
        };
        w.bytes.extend(b"GGUF");
        w.boundaries.push(4);
        w.bytes.extend(3u32.to_le_bytes());
        w.boundaries.push(8);
        w.field(FieldKind::Count, "tensor count", self.tensors.len() as u64);
        w.field(FieldKind::Count, "metadata count", self.kvs.len() as u64);
        for (k, v) in &self.kvs {
            w.boundaries.push(w.bytes.len());
            w.string(&format!("key {k}"), k.as_bytes());
            w.boundaries.push(w.bytes.len());
            let pos = w.bytes.len();
            w.bytes.extend(v.ty().to_le_bytes());
            w.fields.push(Field {
                pos,
                width: 4,
                kind: FieldKind::ValueType,
                label: format!("type of {k}"),
            });
            w.boundaries.push(w.bytes.len());
            w.payload(k, v);
        }
        let mut offset = 0usize;
        let mut offsets = Vec::new();
        for t in &self.tensors {
            w.boundaries.push(w.bytes.len());
            w.string(&format!("tensor name {}", t.name), t.name.as_bytes());
            w.boundaries.push(w.bytes.len());
            let pos = w.bytes.len();
            w.bytes.extend((t.dims.len() as u32).to_le_bytes());
            w.fields.push(Field {
                pos,
                width: 4,
                kind: FieldKind::Dims,
                label: format!("dims of {}", t.name),
            });
            for (i, &d) in t.dims.iter().enumerate() {
                w.boundaries.push(w.bytes.len());
                w.field(FieldKind::Dim, &format!("dim {i} of {}", t.name), d);
            }
            w.boundaries.push(w.bytes.len());
            let pos = w.bytes.len();
            w.bytes.extend(t.ty.to_le_bytes());
            w.fields.push(Field {
                pos,
                width: 4,
                kind: FieldKind::TensorType,
                label: format!("type of {}", t.name),
            });
            w.boundaries.push(w.bytes.len());
            w.field(
                FieldKind::Offset,
                &format!("offset of {}", t.name),
                offset as u64,
            );
            offsets.push(offset);
            offset = (offset + t.size).div_ceil(ALIGN) * ALIGN;
        }
        w.boundaries.push(w.bytes.len());
        let data_start = w.bytes.len().div_ceil(ALIGN) * ALIGN;
        w.bytes.resize(data_start, 0);
        w.len = data_start;
        for (t, off) in self.tensors.iter().zip(offsets) {
            let start = data_start + off;
            if !t.data.is_empty() {
                w.bytes.resize(start, 0);
                w.bytes.extend(&t.data);
            }
            w.len = start + t.size;
            // The start and the middle of every tensor's data.
            w.boundaries.push(start);
            w.boundaries.push(start + t.size / 2);
        }
        w.boundaries.sort_unstable();
        w.boundaries.dedup();
        w
    }
}

impl Written {
    pub fn field(&mut self, kind: FieldKind, label: &str, v: u64) {
        self.fields.push(Field {
            pos: self.bytes.len(),
            width: 8,
            kind,
            label: label.to_string(),
        });
        self.bytes.extend(v.to_le_bytes());
    }

    pub fn string(&mut self, label: &str, s: &[u8]) {
        self.field(
            FieldKind::Length,
            &format!("length of {label}"),
            s.len() as u64,
        );
        self.bytes.extend(s);
    }

    pub fn payload(&mut self, key: &str, v: &Val) {
        match v {
            Val::Scalar(_, b) => self.bytes.extend(b),
            Val::Str(s) => self.string(&format!("string {key}"), s),
            Val::Arr(t, items) => {
                let pos = self.bytes.len();
                self.bytes.extend(t.to_le_bytes());
                self.fields.push(Field {
                    pos,
                    width: 4,
                    kind: FieldKind::ArrayType,
                    label: format!("element type of {key}"),
                });
                self.boundaries.push(self.bytes.len());
                self.field(
                    FieldKind::Length,
                    &format!("array length of {key}"),
                    items.len() as u64,
                );
                // The first elements only: structure, not thousands of tokens.
                for (i, item) in items.iter().enumerate() {
                    if i < 2 {
                        self.boundaries.push(self.bytes.len());
                        self.payload(&format!("{key}[{i}]"), item);
                    } else {
                        let fields = self.fields.len();
                        self.payload(key, item);
                        self.fields.truncate(fields);
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Synthetic models at real shapes.

/// GPT-2's byte-to-character map: every byte is a printable character.
pub fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let mut map = vec!['\0'; 256];
    for &b in &printable {
        map[b as usize] = char::from_u32(b).unwrap();
    }
    let mut next = 256;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            map[b as usize] = char::from_u32(next).unwrap();
            next += 1;
            printable.push(b);
        }
    }
    map
}

/// The hyper-parameters of a synthetic Llama.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub hidden: u64,
    pub ff: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub layers: u64,
    pub vocab: u64,
    pub context: u32,
    pub rope_base: f32,
}

/// SmolLM2-135M's shape (tied embeddings, GQA 9:3, head dim 64).
pub const SMOLLM2: Shape = Shape {
    hidden: 576,
    ff: 1536,
    heads: 9,
    kv_heads: 3,
    layers: 30,
    vocab: 49152,
    context: 8192,
    rope_base: 100_000.0,
};

/// GGML's type id of Q4_1 blocks.
pub const Q4_1: u32 = 3;

/// SplitMix64: the synthetic weights' random source (deterministic by seed).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// `n` weights (a multiple of 32) as Q4_1 blocks, uniform in `[-s, s]` on 16 levels:
/// per block `d = 2s/15`, `m = -s` (f16) and 32 random nibbles.
pub fn q4_1_data(n: u64, s: f32, seed: u64) -> Vec<u8> {
    assert_eq!(n % 32, 0, "Q4_1 rows are whole blocks of 32");
    let d = half::f16::from_f32(2.0 * s / 15.0).to_bits().to_le_bytes();
    let m = half::f16::from_f32(-s).to_bits().to_le_bytes();
    let mut rng = Rng(seed);
    let blocks = n / 32;
    let mut out = Vec::with_capacity(blocks as usize * 20);
    for _ in 0..blocks {
        out.extend(d);
        out.extend(m);
        let (a, b) = (rng.next(), rng.next());
        out.extend(a.to_le_bytes());
        out.extend(b.to_le_bytes());
    }
    out
}

/// A Llama GGUF of `shape` with Q4_1 projections and embeddings (tied, as SmolLM2's),
/// f32 norms of 1, each projection's weights of standard deviation `1/sqrt(fan_in)`, and
/// a byte-level vocabulary padded with `<unused N>` tokens to `shape.vocab`.
pub fn q4_1_llama(shape: &Shape, seed: u64) -> Gguf {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    tokens.extend(byte_chars().iter().map(|c| c.to_string()));
    tokens.push("hi".into());
    assert!(shape.vocab as usize >= tokens.len(), "vocabulary too small");
    let mut i = 0;
    while tokens.len() < shape.vocab as usize {
        tokens.push(format!("<unused {i}>"));
        i += 1;
    }
    let mut types = vec![3i32; 3];
    types.extend(std::iter::repeat_n(1, tokens.len() - 3));
    let head_dim = shape.hidden / shape.heads;
    let u32v = |v: u64| Val::u32(u32::try_from(v).unwrap());
    let kvs = vec![
        ("general.architecture".into(), Val::str("llama")),
        ("general.alignment".into(), Val::u32(ALIGN as u32)),
        ("llama.block_count".into(), u32v(shape.layers)),
        ("llama.context_length".into(), Val::u32(shape.context)),
        ("llama.embedding_length".into(), u32v(shape.hidden)),
        ("llama.feed_forward_length".into(), u32v(shape.ff)),
        ("llama.attention.head_count".into(), u32v(shape.heads)),
        ("llama.attention.head_count_kv".into(), u32v(shape.kv_heads)),
        ("llama.rope.dimension_count".into(), u32v(head_dim)),
        ("llama.rope.freq_base".into(), Val::f32(shape.rope_base)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Val::f32(1e-5),
        ),
        ("llama.vocab_size".into(), u32v(shape.vocab)),
        ("tokenizer.ggml.model".into(), Val::str("gpt2")),
        ("tokenizer.ggml.pre".into(), Val::str("gpt2")),
        (
            "tokenizer.ggml.tokens".into(),
            Val::Arr(8, tokens.iter().map(|t| Val::str(t)).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Val::Arr(5, types.iter().map(|&t| Val::i32(t)).collect()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Val::Arr(8, vec![Val::str("h i")]),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Val::u32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Val::u32(2)),
        (
            "tokenizer.chat_template".into(),
            Val::str("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"),
        ),
    ];
    let mut seed = seed;
    let mut q = |name: &str, fan_in: u64, out: u64, s: f32| {
        seed += 1;
        let data = q4_1_data(fan_in * out, s, seed);
        TensorSpec {
            name: name.into(),
            dims: vec![fan_in, out],
            ty: Q4_1,
            size: data.len(),
            data,
        }
    };
    // Uniform on [-s, s] has standard deviation s / sqrt(3).
    let s = |fan_in: u64| (3.0 / fan_in as f32).sqrt();
    let ones = |name: &str, n: u64| {
        let data: Vec<u8> = (0..n).flat_map(|_| 1f32.to_le_bytes()).collect();
        TensorSpec {
            name: name.into(),
            dims: vec![n],
            ty: 0,
            size: data.len(),
            data,
        }
    };
    let (h, ff) = (shape.hidden, shape.ff);
    let (qd, kvd) = (shape.heads * head_dim, shape.kv_heads * head_dim);
    let mut tensors = vec![
        q("token_embd.weight", h, shape.vocab, 1.0),
        ones("output_norm.weight", h),
    ];
    for l in 0..shape.layers {
        let n = |t: &str| format!("blk.{l}.{t}.weight");
        tensors.push(ones(&n("attn_norm"), h));
        tensors.push(q(&n("attn_q"), h, qd, s(h)));
        tensors.push(q(&n("attn_k"), h, kvd, s(h)));
        tensors.push(q(&n("attn_v"), h, kvd, s(h)));
        tensors.push(q(&n("attn_output"), qd, h, s(qd)));
        tensors.push(ones(&n("ffn_norm"), h));
        tensors.push(q(&n("ffn_gate"), h, ff, s(h)));
        tensors.push(q(&n("ffn_up"), h, ff, s(h)));
        tensors.push(q(&n("ffn_down"), ff, h, s(ff)));
    }
    Gguf { kvs, tensors }
}

/// Writes `g` to `path` (zeros where a tensor's data is left empty).
pub fn write_gguf(g: &Gguf, path: &std::path::Path) -> std::io::Result<()> {
    let w = g.write();
    let mut f = std::fs::File::create(path)?;
    std::io::Write::write_all(&mut f, &w.bytes[..w.bytes.len().min(w.len)])?;
    f.set_len(w.len as u64)
}

// ---------------------------------------------------------------------------------------
// Small synthetic models of each architecture, with a real vocabulary when given one
// (`cargo xtask arch-peer` runs them in kv and llama.cpp alike).

/// GGML's type ids of the weight types the architecture models are written in.
pub const F32: u32 = 0;
pub const F16: u32 = 1;
pub const Q8_0: u32 = 8;

/// An architecture and the features it exercises.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arch {
    /// `llama`, interleaved RoPE (SentencePiece vocabulary in the peer run).
    Llama,
    /// `llama` with Llama 3.1's RoPE scaling stored as `rope_freqs.weight`, as llama.cpp's
    /// converter writes it (llama.cpp reads the tensor, not the scaling metadata).
    Llama3,
    /// `qwen2`: biases on Q, K and V; NeoX RoPE.
    Qwen2,
    /// `qwen3`: per-head RMSNorm of Q and K; NeoX RoPE.
    Qwen3,
}

impl Arch {
    pub const ALL: [Arch; 4] = [Arch::Llama, Arch::Llama3, Arch::Qwen2, Arch::Qwen3];

    /// The name the command line and file names use.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Llama3 => "llama3",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
        }
    }

    pub fn parse(s: &str) -> Option<Arch> {
        Arch::ALL.into_iter().find(|a| a.name() == s)
    }

    /// `general.architecture`.
    pub fn gguf(self) -> &'static str {
        match self {
            Arch::Llama | Arch::Llama3 => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
        }
    }

    /// The llama.cpp vocabulary file a model of this family ships with.
    pub fn vocab_file(self) -> &'static str {
        match self {
            Arch::Llama => "ggml-vocab-llama-spm.gguf",
            Arch::Llama3 => "ggml-vocab-llama-bpe.gguf",
            Arch::Qwen2 | Arch::Qwen3 => "ggml-vocab-qwen2.gguf",
        }
    }

    /// RoPE base: Llama 3's 500000 makes the long wavelengths that its scaling stretches.
    fn rope_base(self) -> f32 {
        match self {
            Arch::Llama3 => 500_000.0,
            Arch::Llama => 10_000.0,
            Arch::Qwen2 | Arch::Qwen3 => 1_000_000.0,
        }
    }
}

/// The architecture models' shape: GQA 4:2, head dim 16 (so Q8_0 rows are whole blocks).
pub const ARCH_HIDDEN: u64 = 64;
pub const ARCH_HEADS: u64 = 4;
pub const ARCH_KV_HEADS: u64 = 2;
pub const ARCH_HEAD_DIM: u64 = 16;
pub const ARCH_FF: u64 = 128;
pub const ARCH_LAYERS: u64 = 3;
pub const ARCH_CONTEXT: u32 = 4096;

/// A GGUF metadata value read by candle, as this writer stores it.
fn val_of(v: &candle_core::quantized::gguf_file::Value) -> Val {
    use candle_core::quantized::gguf_file::Value as V;
    match v {
        V::U8(x) => Val::Scalar(0, vec![*x]),
        V::I8(x) => Val::Scalar(1, x.to_le_bytes().to_vec()),
        V::U16(x) => Val::Scalar(2, x.to_le_bytes().to_vec()),
        V::I16(x) => Val::Scalar(3, x.to_le_bytes().to_vec()),
        V::U32(x) => Val::u32(*x),
        V::I32(x) => Val::i32(*x),
        V::F32(x) => Val::f32(*x),
        V::Bool(x) => Val::bool(*x),
        V::String(s) => Val::str(s),
        V::U64(x) => Val::u64(*x),
        V::I64(x) => Val::i64(*x),
        V::F64(x) => Val::Scalar(12, x.to_le_bytes().to_vec()),
        V::Array(items) => {
            let vals: Vec<Val> = items.iter().map(val_of).collect();
            Val::Arr(vals.first().map_or(8, Val::ty), vals)
        }
    }
}

/// The `tokenizer.*` metadata of a GGUF file (a llama.cpp vocabulary), sorted by key.
pub fn vocab_kvs(path: &std::path::Path) -> Result<Vec<(String, Val)>, String> {
    let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut f)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut kvs: Vec<(String, Val)> = content
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .map(|(k, v)| (k.clone(), val_of(v)))
        .collect();
    kvs.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(kvs)
}

/// A byte-level (`gpt2`) vocabulary of 3 specials, the 256 bytes and `<unused N>` up to
/// `n` tokens, for tests without llama.cpp's files.
pub fn byte_vocab_kvs(n: usize) -> Vec<(String, Val)> {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    tokens.extend(byte_chars().iter().map(|c| c.to_string()));
    let mut i = 0;
    while tokens.len() < n {
        tokens.push(format!("<unused {i}>"));
        i += 1;
    }
    let mut types = vec![3i32; 3];
    types.extend(std::iter::repeat_n(1, tokens.len() - 3));
    vec![
        ("tokenizer.ggml.model".into(), Val::str("gpt2")),
        ("tokenizer.ggml.pre".into(), Val::str("gpt2")),
        (
            "tokenizer.ggml.tokens".into(),
            Val::Arr(8, tokens.iter().map(|t| Val::str(t)).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Val::Arr(5, types.iter().map(|&t| Val::i32(t)).collect()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Val::Arr(8, vec![Val::str("h i")]),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Val::u32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Val::u32(0)),
    ]
}

/// `values` stored as GGML type `ty` (F32, F16 or Q8_0: per 32 values an f16 scale
/// `max|x| / 127` and 32 rounded int8s, as ggml's reference quantizer makes them).
pub fn encode(values: &[f32], ty: u32) -> Vec<u8> {
    match ty {
        F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        F16 => values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_bits().to_le_bytes())
            .collect(),
        Q8_0 => {
            assert_eq!(values.len() % 32, 0, "Q8_0 rows are whole blocks of 32");
            let mut out = Vec::with_capacity(values.len() / 32 * 34);
            for block in values.chunks(32) {
                let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
                out.extend(half::f16::from_f32(d).to_bits().to_le_bytes());
                out.extend(block.iter().map(|v| (v * inv).round() as i8 as u8));
            }
            out
        }
        other => panic!("encode: type {other} not written here"),
    }
}

/// `n` deterministic values uniform in `[centre - s, centre + s)`.
pub fn uniform(n: u64, centre: f32, s: f32, seed: u64) -> Vec<f32> {
    let mut rng = Rng(seed);
    (0..n)
        .map(|_| centre + s * ((rng.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0))
        .collect()
}

/// Llama 3.1's frequency factors for `head_dim` at `base` (factor 8, low/high frequency
/// factors 1 and 4, original context 8192): what `rope_freqs.weight` holds.
pub fn llama3_rope_freqs(head_dim: u64, base: f32) -> Vec<f32> {
    let (factor, low, high, original) = (8.0f32, 1.0f32, 4.0f32, 8192.0f32);
    let (low_wavelen, high_wavelen) = (original / low, original / high);
    (0..head_dim / 2)
        .map(|i| {
            let freq = base.powf(-2.0 * i as f32 / head_dim as f32);
            let wavelen = 2.0 * std::f32::consts::PI / freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (original / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect()
}

/// A model of `arch` with the tokenizer metadata `vocab` (from [`vocab_kvs`] or
/// [`byte_vocab_kvs`]), matrices in `ty` (F32, F16 or Q8_0; norms, biases and frequency
/// factors in f32) and deterministic weights chosen so its next-token distribution is
/// peaked rather than flat: the output projection's logits have a standard deviation of
/// about 6, queries are scaled up so attention is selective, norm weights vary around 1.
pub fn arch_model(arch: Arch, vocab: &[(String, Val)], ty: u32, seed: u64) -> Gguf {
    let n_vocab = vocab
        .iter()
        .find(|(k, _)| k == "tokenizer.ggml.tokens")
        .and_then(|(_, v)| match v {
            Val::Arr(_, items) => Some(items.len() as u64),
            _ => None,
        })
        .expect("the vocabulary has tokenizer.ggml.tokens");
    let a = arch.gguf();
    let (h, ff, hd) = (ARCH_HIDDEN, ARCH_FF, ARCH_HEAD_DIM);
    let (qd, kvd) = (ARCH_HEADS * hd, ARCH_KV_HEADS * hd);
    let mut kvs: Vec<(String, Val)> = vec![
        ("general.architecture".into(), Val::str(a)),
        (
            "general.name".into(),
            Val::str(&format!("kv synthetic {}", arch.name())),
        ),
        ("general.alignment".into(), Val::u32(ALIGN as u32)),
        (format!("{a}.block_count"), Val::u32(ARCH_LAYERS as u32)),
        (format!("{a}.context_length"), Val::u32(ARCH_CONTEXT)),
        (format!("{a}.embedding_length"), Val::u32(h as u32)),
        (format!("{a}.feed_forward_length"), Val::u32(ff as u32)),
        (
            format!("{a}.attention.head_count"),
            Val::u32(ARCH_HEADS as u32),
        ),
        (
            format!("{a}.attention.head_count_kv"),
            Val::u32(ARCH_KV_HEADS as u32),
        ),
        (format!("{a}.attention.key_length"), Val::u32(hd as u32)),
        (format!("{a}.attention.value_length"), Val::u32(hd as u32)),
        (format!("{a}.rope.dimension_count"), Val::u32(hd as u32)),
        (format!("{a}.rope.freq_base"), Val::f32(arch.rope_base())),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Val::f32(1e-6),
        ),
        (format!("{a}.vocab_size"), Val::u32(n_vocab as u32)),
    ];
    kvs.extend(vocab.iter().cloned());
    let mut seed = seed;
    let mut tensor = |name: &str, dims: Vec<u64>, ty: u32, centre: f32, s: f32| {
        seed += 1;
        let data = encode(&uniform(dims.iter().product(), centre, s, seed), ty);
        TensorSpec {
            name: name.into(),
            dims,
            ty,
            size: data.len(),
            data,
        }
    };
    // Uniform on [-s, s] has standard deviation s / sqrt(3).
    let s = |fan_in: u64| (3.0 / fan_in as f32).sqrt();
    let mut tensors = vec![
        tensor("token_embd.weight", vec![h, n_vocab], ty, 0.0, 1.0),
        tensor("output_norm.weight", vec![h], F32, 1.0, 0.2),
        // Logits of standard deviation ~6 over unit-RMS inputs: a confident model.
        tensor("output.weight", vec![h, n_vocab], ty, 0.0, 6.0 * s(h)),
    ];
    if arch == Arch::Llama3 {
        let data = encode(&llama3_rope_freqs(hd, arch.rope_base()), F32);
        tensors.push(TensorSpec {
            name: "rope_freqs.weight".into(),
            dims: vec![hd / 2],
            ty: F32,
            size: data.len(),
            data,
        });
    }
    for l in 0..ARCH_LAYERS {
        let n = |t: &str| format!("blk.{l}.{t}");
        tensors.push(tensor(&n("attn_norm.weight"), vec![h], F32, 1.0, 0.2));
        // Queries scaled so scores spread: attention picks positions.
        tensors.push(tensor(
            &n("attn_q.weight"),
            vec![h, qd],
            ty,
            0.0,
            3.0 * s(h),
        ));
        tensors.push(tensor(&n("attn_k.weight"), vec![h, kvd], ty, 0.0, s(h)));
        tensors.push(tensor(&n("attn_v.weight"), vec![h, kvd], ty, 0.0, s(h)));
        tensors.push(tensor(
            &n("attn_output.weight"),
            vec![qd, h],
            ty,
            0.0,
            s(qd),
        ));
        match arch {
            Arch::Qwen2 => {
                tensors.push(tensor(&n("attn_q.bias"), vec![qd], F32, 0.0, 1.0));
                tensors.push(tensor(&n("attn_k.bias"), vec![kvd], F32, 0.0, 1.0));
                tensors.push(tensor(&n("attn_v.bias"), vec![kvd], F32, 0.0, 0.5));
            }
            Arch::Qwen3 => {
                tensors.push(tensor(&n("attn_q_norm.weight"), vec![hd], F32, 1.5, 1.0));
                tensors.push(tensor(&n("attn_k_norm.weight"), vec![hd], F32, 1.0, 0.5));
            }
            Arch::Llama | Arch::Llama3 => {}
        }
        tensors.push(tensor(&n("ffn_norm.weight"), vec![h], F32, 1.0, 0.2));
        tensors.push(tensor(&n("ffn_gate.weight"), vec![h, ff], ty, 0.0, s(h)));
        tensors.push(tensor(&n("ffn_up.weight"), vec![h, ff], ty, 0.0, s(h)));
        tensors.push(tensor(&n("ffn_down.weight"), vec![ff, h], ty, 0.0, s(ff)));
    }
    Gguf { kvs, tensors }
}
