//! One tiny synthetic GGUF per supported architecture (written with candle's
//! `gguf_file::write`): greedy decoding with the paged cache must pick the same tokens as
//! recomputing without one, logits must agree closely, and each architecture's own parts
//! (Qwen 2's biases, Qwen 3's and Gemma 3's per-head Q/K norms, Gemma 3's post-norms,
//! sliding window and local RoPE base, Llama 3's RoPE scaling) must change the result when
//! perturbed, so they are read and used, not ignored.
// Tests unwrap: a panic is how they fail.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use kv_attention::PagedCache;
use kv_backend_cpu::CpuBackend;
use kv_core::{KvDType, StorageSpec};
use kv_model::{Logits, Model, ModelError};

const VOCAB: usize = 40;
const HIDDEN: usize = 32;
const FF: usize = 48;
const CONTEXT: u32 = 96;

/// Shape and family-specific knobs of one synthetic model.
#[derive(Clone)]
struct Spec {
    arch: &'static str,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// Extra metadata (key without the architecture prefix).
    extra: Vec<(&'static str, Value)>,
    /// Multiplies the named tensors' values (to show a part is used).
    scale: Vec<(&'static str, f32)>,
    /// Tensors left out.
    skip: Vec<&'static str>,
}

impl Spec {
    fn new(arch: &'static str, layers: usize, heads: usize, kv_heads: usize, hd: usize) -> Self {
        Self {
            arch,
            layers,
            heads,
            kv_heads,
            head_dim: hd,
            extra: Vec::new(),
            scale: Vec::new(),
            skip: Vec::new(),
        }
    }
}

/// Deterministic values in [-amp, amp).
fn values(n: usize, seed: u64, amp: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp
        })
        .collect()
}

fn write_model(spec: &Spec, path: &Path) {
    let a = spec.arch;
    let (h, q_dim, kv_dim) = (
        HIDDEN,
        spec.heads * spec.head_dim,
        spec.kv_heads * spec.head_dim,
    );
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        (format!("{a}.block_count"), Value::U32(spec.layers as u32)),
        (format!("{a}.context_length"), Value::U32(CONTEXT)),
        (format!("{a}.embedding_length"), Value::U32(h as u32)),
        (format!("{a}.feed_forward_length"), Value::U32(FF as u32)),
        (
            format!("{a}.attention.head_count"),
            Value::U32(spec.heads as u32),
        ),
        (
            format!("{a}.attention.head_count_kv"),
            Value::U32(spec.kv_heads as u32),
        ),
        (
            format!("{a}.attention.key_length"),
            Value::U32(spec.head_dim as u32),
        ),
        (
            format!("{a}.attention.value_length"),
            Value::U32(spec.head_dim as u32),
        ),
        (format!("{a}.rope.freq_base"), Value::F32(1000.0)),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-6),
        ),
        (format!("{a}.vocab_size"), Value::U32(VOCAB as u32)),
    ];
    for (k, v) in &spec.extra {
        md.push((format!("{a}.{k}"), v.clone()));
    }
    let mut tensors: Vec<(String, Vec<usize>)> = vec![
        ("token_embd.weight".into(), vec![VOCAB, h]),
        ("output_norm.weight".into(), vec![h]),
    ];
    for i in 0..spec.layers {
        let mut t = |name: &str, dims: Vec<usize>| tensors.push((format!("blk.{i}.{name}"), dims));
        t("attn_norm.weight", vec![h]);
        t("attn_q.weight", vec![q_dim, h]);
        t("attn_k.weight", vec![kv_dim, h]);
        t("attn_v.weight", vec![kv_dim, h]);
        t("attn_output.weight", vec![h, q_dim]);
        t("ffn_norm.weight", vec![h]);
        t("ffn_gate.weight", vec![FF, h]);
        t("ffn_up.weight", vec![FF, h]);
        t("ffn_down.weight", vec![h, FF]);
        match a {
            "qwen2" => {
                t("attn_q.bias", vec![q_dim]);
                t("attn_k.bias", vec![kv_dim]);
                t("attn_v.bias", vec![kv_dim]);
            }
            "qwen3" => {
                t("attn_q_norm.weight", vec![spec.head_dim]);
                t("attn_k_norm.weight", vec![spec.head_dim]);
            }
            "gemma3" => {
                t("attn_q_norm.weight", vec![spec.head_dim]);
                t("attn_k_norm.weight", vec![spec.head_dim]);
                t("post_attention_norm.weight", vec![h]);
                t("post_ffw_norm.weight", vec![h]);
            }
            _ => {}
        }
    }
    let dev = Device::Cpu;
    let mut qt = Vec::new();
    for (seed, (name, dims)) in tensors.iter().enumerate() {
        if spec.skip.iter().any(|s| name.ends_with(s)) {
            continue;
        }
        let n: usize = dims.iter().product();
        let mut data = if name.contains("norm") {
            // Around 1, so that every norm weight matters.
            values(n, seed as u64 + 7, 0.5)
                .into_iter()
                .map(|x| 1.0 + x)
                .collect()
        } else if name.contains("bias") {
            values(n, seed as u64 + 7, 0.5)
        } else {
            let fan_in = *dims.last().unwrap_or(&1) as f32;
            values(n, seed as u64 + 7, 1.7 / fan_in.sqrt())
        };
        if let Some((_, s)) = spec.scale.iter().find(|(t, _)| name.ends_with(t)) {
            data.iter_mut().for_each(|x| *x *= s);
        }
        let t = Tensor::from_vec(data, dims.as_slice(), &dev).unwrap();
        qt.push((name.clone(), QTensor::quantize(&t, GgmlDType::F32).unwrap()));
    }
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = qt.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
}

fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kv-arch-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn load(spec: &Spec, name: &str) -> Model {
    let path = temp_path(name);
    write_model(spec, &path);
    Model::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Greedy decoding of `steps` tokens after `prompt`, with the cache (prefill, then one
/// token a step) and without (full recompute). Returns both token lists and the largest
/// logit difference seen; also every logit row of the uncached run (for comparisons).
fn greedy(
    model: &Model,
    prompt: &[u32],
    steps: usize,
    dtype: KvDType,
) -> (Vec<u32>, Vec<u32>, f32) {
    let spec = StorageSpec::new(model.shape(), dtype, 4, 64).unwrap();
    let mut cache = PagedCache::new(CpuBackend::new(), spec).unwrap();
    let seq = cache.create_sequence();
    let mut cached = Vec::new();
    let mut tokens = prompt.to_vec();
    let mut logits = model
        .forward(prompt, &mut cache, seq, Logits::Last)
        .unwrap();
    let mut max_diff = 0f32;
    for _ in 0..steps {
        let row: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
        let want: Vec<f32> = model
            .forward_uncached(&tokens, Logits::Last)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (a, b) in row.iter().zip(&want) {
            max_diff = max_diff.max((a - b).abs());
        }
        let next = argmax(&row);
        cached.push(next);
        tokens.push(next);
        logits = model
            .forward(&[next], &mut cache, seq, Logits::Last)
            .unwrap();
    }
    // The uncached greedy run on its own.
    let mut plain = prompt.to_vec();
    for _ in 0..steps {
        let row: Vec<f32> = model
            .forward_uncached(&plain, Logits::Last)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        plain.push(argmax(&row));
    }
    (cached, plain[prompt.len()..].to_vec(), max_diff)
}

/// All rows of logits of `tokens`, uncached.
fn all_logits(model: &Model, tokens: &[u32]) -> Vec<f32> {
    model
        .forward_uncached(tokens, Logits::All)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

const PROMPT: [u32; 6] = [3, 17, 5, 29, 11, 8];

fn check_cache_agrees(spec: &Spec, name: &str) -> Model {
    let model = load(spec, name);
    for dtype in [KvDType::F32, KvDType::F16] {
        let (cached, plain, diff) = greedy(&model, &PROMPT, 30, dtype);
        assert_eq!(cached, plain, "{name} {dtype}: greedy tokens differ");
        let tol = if dtype == KvDType::F32 { 1e-4 } else { 2e-2 };
        assert!(diff < tol, "{name} {dtype}: logits differ by {diff}");
        // Not a degenerate model: it does not repeat one token.
        assert!(
            plain.iter().any(|&t| t != plain[0]),
            "{name}: degenerate output {plain:?}"
        );
    }
    model
}

/// The architecture's part named by `tensor` matters: scaling it changes the logits.
fn part_matters(spec: &Spec, tensor: &'static str, name: &str) {
    let base = all_logits(&load(spec, &format!("{name}-base.gguf")), &PROMPT);
    let mut changed = spec.clone();
    changed.scale.push((tensor, 0.3));
    let other = all_logits(&load(&changed, &format!("{name}-{tensor}.gguf")), &PROMPT);
    assert!(
        max_abs_diff(&base, &other) > 1e-3,
        "{name}: scaling {tensor} changed nothing"
    );
}

#[test]
fn llama_gqa_cached_equals_uncached() {
    let spec = Spec::new("llama", 2, 4, 2, 8);
    check_cache_agrees(&spec, "llama.gguf");
}

#[test]
fn llama3_rope_scaling_from_metadata_equals_the_rope_freqs_tensor() {
    let mut spec = Spec::new("llama", 2, 4, 2, 8);
    spec.extra = vec![
        ("rope.scaling.type", Value::String("llama3".into())),
        ("rope.scaling.factor", Value::F32(8.0)),
        ("rope.scaling.original_context_length", Value::U32(64)),
    ];
    let scaled = check_cache_agrees(&spec, "llama3.gguf");
    // The factors really change the model (positions are far enough apart to matter).
    let long: Vec<u32> = (0..40).map(|i| (i * 7 % VOCAB) as u32).collect();
    let plain = Spec::new("llama", 2, 4, 2, 8);
    let unscaled = load(&plain, "llama3-unscaled.gguf");
    assert!(max_abs_diff(&all_logits(&scaled, &long), &all_logits(&unscaled, &long)) > 1e-3);
    // The same factors as llama.cpp's precomputed `rope_freqs.weight` tensor give the same
    // model: write them as that tensor into a file without the metadata.
    let factors = kv_model::Llama3Rope {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_context: 64,
    }
    .freq_factors(1000.0, 8);
    // Wavelengths 6.3, 35, 199, 1117 against 64/4 and 64/1: kept, blended, divided twice.
    let wavelen = 2.0 * std::f64::consts::PI * 1000f64.powf(0.25);
    let smooth = (64.0 / wavelen - 1.0) / 3.0;
    let blended = (1.0 / ((1.0 - smooth) / 8.0 + smooth)) as f32;
    assert!(
        factors[0] == 1.0 && factors[2] == 8.0 && factors[3] == 8.0,
        "{factors:?}"
    );
    assert!(
        (factors[1] - blended).abs() < 1e-3,
        "{factors:?} vs {blended}"
    );
    let path = temp_path("llama3-tensor.gguf");
    write_model(&plain, &path);
    let bytes = std::fs::read(&path).unwrap();
    let mut reader = std::io::Cursor::new(&bytes);
    let content = gguf_file::Content::read(&mut reader).unwrap();
    let mut md: Vec<(String, Value)> = content.metadata.clone().into_iter().collect();
    md.sort_by(|a, b| a.0.cmp(&b.0));
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for name in content.tensor_infos.keys() {
        tensors.push((
            name.clone(),
            content.tensor(&mut reader, name, &Device::Cpu).unwrap(),
        ));
    }
    let f = Tensor::from_vec(factors, 4, &Device::Cpu).unwrap();
    tensors.push((
        "rope_freqs.weight".into(),
        QTensor::quantize(&f, GgmlDType::F32).unwrap(),
    ));
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut out = std::fs::File::create(&path).unwrap();
    gguf_file::write(&mut out, &md_refs, &t_refs).unwrap();
    drop(out);
    let from_tensor = Model::load(&path).unwrap();
    let d = max_abs_diff(
        &all_logits(&scaled, &long),
        &all_logits(&from_tensor, &long),
    );
    assert!(d < 1e-5, "metadata and tensor factors differ by {d}");
}

#[test]
fn qwen2_biases_are_used_and_cached_equals_uncached() {
    let spec = Spec::new("qwen2", 2, 4, 2, 8);
    check_cache_agrees(&spec, "qwen2.gguf");
    part_matters(&spec, "attn_k.bias", "qwen2");
    part_matters(&spec, "attn_v.bias", "qwen2");
    // A qwen2 file without its biases is refused by name.
    let mut missing = spec.clone();
    missing.skip.push("blk.1.attn_q.bias");
    let path = temp_path("qwen2-missing.gguf");
    write_model(&missing, &path);
    let e = Model::load(&path).unwrap_err();
    assert!(
        matches!(&e, ModelError::MissingTensor { name } if name == "blk.1.attn_q.bias"),
        "{e}"
    );
}

#[test]
fn qwen3_qk_norms_are_used_and_cached_equals_uncached() {
    let spec = Spec::new("qwen3", 2, 4, 1, 16);
    check_cache_agrees(&spec, "qwen3.gguf");
    part_matters(&spec, "attn_q_norm.weight", "qwen3");
    part_matters(&spec, "attn_k_norm.weight", "qwen3");
}

/// Gemma 3 in small: 7 layers (0-4 and 6 local, 5 global), a 5-token window, MQA with 4
/// query heads, head_dim 16 (not hidden / heads = 8: the attention scale must come from
/// key_length).
fn gemma_spec() -> Spec {
    let mut spec = Spec::new("gemma3", 7, 4, 1, 16);
    spec.extra = vec![
        ("attention.sliding_window", Value::U32(5)),
        ("rope.freq_base_swa", Value::F32(50.0)),
    ];
    spec
}

#[test]
fn gemma3_cached_equals_uncached_through_the_window() {
    let spec = gemma_spec();
    let model = check_cache_agrees(&spec, "gemma3.gguf");
    let c = model.config();
    assert_eq!(c.sliding_window, Some(5));
    assert_eq!(
        (0..7)
            .map(|l| c.layer_window(l).is_some())
            .collect::<Vec<_>>(),
        [true, true, true, true, true, false, true]
    );
    assert_eq!(c.attention_scale, 0.25);
    for part in [
        "post_attention_norm.weight",
        "post_ffw_norm.weight",
        "attn_q_norm.weight",
        "attn_k_norm.weight",
    ] {
        part_matters(&spec, part, "gemma3");
    }
}

#[test]
fn gemma3_window_and_local_rope_base_change_the_model() {
    let spec = gemma_spec();
    let base = load(&spec, "gemma3-w5.gguf");
    let long: Vec<u32> = (0..30).map(|i| (i * 11 % VOCAB) as u32).collect();
    let base_logits = all_logits(&base, &long);
    // Positions inside the window agree with a wider window; later ones do not.
    let mut wide = spec.clone();
    wide.extra[0].1 = Value::U32(64);
    let wide_logits = all_logits(&load(&wide, "gemma3-w64.gguf"), &long);
    let row = VOCAB;
    assert!(max_abs_diff(&base_logits[..5 * row], &wide_logits[..5 * row]) < 1e-5);
    assert!(max_abs_diff(&base_logits[5 * row..], &wide_logits[5 * row..]) > 1e-3);
    // The local layers' own RoPE base is used.
    let mut other_base = spec.clone();
    other_base.extra[1].1 = Value::F32(10_000.0);
    let other_logits = all_logits(&load(&other_base, "gemma3-base.gguf"), &long);
    assert!(max_abs_diff(&base_logits, &other_logits) > 1e-3);
}

#[test]
fn gemma3_batched_decoding_matches_single_sequences() {
    let model = load(&gemma_spec(), "gemma3-batch.gguf");
    let spec = StorageSpec::new(model.shape(), KvDType::F32, 4, 64).unwrap();
    let mut cache = PagedCache::new(CpuBackend::new(), spec).unwrap();
    let (a, b) = (cache.create_sequence(), cache.create_sequence());
    let pa: Vec<u32> = (0..12).map(|i| (i * 5 % VOCAB) as u32).collect();
    let pb: Vec<u32> = (0..7).map(|i| (i * 3 % VOCAB) as u32 + 1).collect();
    let out = model
        .forward_batch(&[(a, &pa[..]), (b, &pb[..])], &mut cache, Logits::Last)
        .unwrap();
    let got: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
    let want_a = model.forward_uncached(&pa, Logits::Last).unwrap();
    let want_b = model.forward_uncached(&pb, Logits::Last).unwrap();
    let want: Vec<f32> = Tensor::cat(&[want_a, want_b], 0)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let d = max_abs_diff(&got, &want);
    assert!(d < 1e-4, "batched logits differ by {d}");
}

#[test]
fn unsupported_architectures_name_the_supported_ones() {
    let mut md = HashMap::new();
    md.insert(
        "general.architecture".to_string(),
        Value::String("phi3".into()),
    );
    let e = kv_model::LlamaConfig::from_metadata(&md).unwrap_err();
    let msg = e.to_string();
    for arch in ["llama", "qwen2", "qwen3", "gemma3"] {
        assert!(msg.contains(arch), "{msg}");
    }
    assert!(!msg.contains('\n'));
}

/// `kv batch`'s cache on a model with window layers ([`Model::new_batch_cache`]): two
/// groups, the window layers' blocks freed as each sequence slides, and every sequence's
/// tokens those of generating it alone; a second run on the same cache, reusing what the
/// prefix index still holds in both groups, gives the same tokens again.
#[test]
fn gemma3_batch_on_two_groups_equals_each_alone_and_reuse_changes_nothing() {
    use kv_model::{BatchOptions, CacheLayout, GenerateOptions};
    let model = load(&gemma_spec(), "gemma3-batch-groups.gguf");
    let shared: Vec<u32> = (0..13).map(|i| (i * 7 % VOCAB) as u32).collect();
    let prompts: Vec<Vec<u32>> = vec![
        shared.iter().copied().chain([3, 9]).collect(),
        shared.iter().copied().chain([5]).collect(),
        (0..6).map(|i| (i * 3 % VOCAB) as u32 + 1).collect(),
    ];
    let options = BatchOptions {
        max_tokens: 20,
        stop_tokens: Vec::new(),
        max_batch: 3,
    };
    let spec = StorageSpec::new(model.shape(), KvDType::F32, 4, 40).unwrap();
    let mut cache = model
        .new_batch_cache(CpuBackend::new(), spec, 15 + 20, 3, 5)
        .unwrap();
    assert!(cache.sliding_layers().is_some());
    let first = model
        .generate_batch(&mut cache, &prompts, &options)
        .unwrap();
    let layout = CacheLayout {
        dtype: KvDType::F32,
        block_size: 4,
    };
    for (i, prompt) in prompts.iter().enumerate() {
        let alone = model
            .generate(
                CpuBackend::new(),
                layout,
                prompt,
                &GenerateOptions {
                    max_tokens: 20,
                    ..GenerateOptions::default()
                },
                |_| Ok(()),
            )
            .unwrap();
        assert_eq!(first.sequences[i].tokens, alone.tokens, "sequence {i}");
    }
    let window = first.window.unwrap().sliding.unwrap();
    assert!(
        window.freed_blocks > 0 && window.bytes_saved > 0,
        "{window:?}"
    );
    assert!(first.to_string().contains("sliding window"));
    let again = model
        .generate_batch(&mut cache, &prompts, &options)
        .unwrap();
    for (a, b) in first.sequences.iter().zip(&again.sequences) {
        assert_eq!(a.tokens, b.tokens);
    }
    assert_eq!(cache.manager().audit(), Ok(()));
    assert_eq!(
        cache.sliding_manager().map(kv_core::CacheManager::audit),
        Some(Ok(()))
    );
}

/// A follow-up prompt in `kv batch` (a conversation sent again with the reply and a new
/// turn) on a window model: the first run's sequence slid its window while decoding, and
/// its window layers kept indexing what it committed after that (the hash chain goes on
/// across the blocks they let go of). So the second run reuses the whole first sequence,
/// prompt and reply, not only the prompt, and gives the tokens of generating alone.
#[test]
fn gemma3_batch_reuses_a_prefix_whose_window_slid_while_decoding() {
    use kv_model::{BatchOptions, CacheLayout, GenerateOptions};
    let model = load(&gemma_spec(), "gemma3-batch-slid.gguf");
    let first: Vec<u32> = (0..13).map(|i| (i * 5 % (VOCAB - 1)) as u32 + 1).collect();
    let options = BatchOptions {
        max_tokens: 20,
        stop_tokens: Vec::new(),
        max_batch: 1,
    };
    let spec = StorageSpec::new(model.shape(), KvDType::F32, 4, 40).unwrap();
    let mut cache = model
        .new_batch_cache(CpuBackend::new(), spec, 34 + 20, 1, 5)
        .unwrap();
    let run = model
        .generate_batch(&mut cache, std::slice::from_ref(&first), &options)
        .unwrap();
    let reply = &run.sequences[0].tokens;
    // The 13 prompt tokens and 19 of the reply were written: 32 tokens, 8 full blocks.
    let follow_up: Vec<u32> = first
        .iter()
        .chain(&reply[..19])
        .copied()
        .chain([7, 2])
        .collect();
    let again = model
        .generate_batch(&mut cache, std::slice::from_ref(&follow_up), &options)
        .unwrap();
    // A query at 32 reads keys from 28 on (window 5): block 7, which the first sequence
    // committed long after its window first slid. Before, only the prompt's 12 were reused.
    assert_eq!(again.sequences[0].reused_tokens, 32, "{again}");
    let alone = model
        .generate(
            CpuBackend::new(),
            CacheLayout {
                dtype: KvDType::F32,
                block_size: 4,
            },
            &follow_up,
            &GenerateOptions {
                max_tokens: 20,
                ..GenerateOptions::default()
            },
            |_| Ok(()),
        )
        .unwrap();
    assert_eq!(again.sequences[0].tokens, alone.tokens);
    assert_eq!(cache.manager().audit(), Ok(()));
    assert_eq!(
        cache.sliding_manager().map(kv_core::CacheManager::audit),
        Some(Ok(()))
    );
}

/// A fresh directory for a disk tier.
fn tier_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kv-arch-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn disk(dir: &Path) -> Box<dyn kv_attention::store::BlockStore> {
    Box::new(kv_attention::store::DiskStore::open(dir, 1 << 30).unwrap())
}

/// `--store` on a window model: two cache groups whose blocks the disk tier keeps apart.
/// A run with the tier equals one without (tokens and every step's logits); a second
/// cache over the same directory (another process, as far as the tier knows) restores the
/// global blocks and the window blocks the first new query reads, and prefills only the
/// tail; hostile values (a block of the other group under a global key, a block of the
/// wrong size) are typed rejections that leave the cache as it was, and the tokens stay.
#[test]
fn gemma3_store_on_two_groups_restores_only_what_the_window_reads() {
    use kv_attention::cache_file::{decode_value, encode_value};
    use kv_attention::store::BlockStore;
    use kv_attention::TieredCache;
    use kv_core::content::{chain_keys, Fingerprint};
    use kv_model::{CacheLayout, GenerateOptions};

    let model = load(&gemma_spec(), "gemma3-store.gguf");
    let layout = CacheLayout {
        dtype: KvDType::F32,
        block_size: 4,
    };
    let prompt: Vec<u32> = (0..23).map(|i| (i * 7 % (VOCAB - 1)) as u32 + 1).collect();
    let options = GenerateOptions {
        max_tokens: 12,
        ..GenerateOptions::default()
    };
    let plain = model
        .generate(CpuBackend::new(), layout, &prompt, &options, |_| Ok(()))
        .unwrap();
    let fp = Fingerprint::of_parts(&[("test", b"gemma3 store")]);
    let dir = tier_dir("gemma3-store");
    let run = |dir: &Path| {
        model
            .generate_with_store(
                CpuBackend::new(),
                layout,
                fp,
                vec![disk(dir)],
                &prompt,
                &options,
                |_| Ok(()),
            )
            .unwrap()
    };
    let same = |g: &kv_model::Generation, what: &str| {
        assert_eq!(g.tokens, plain.tokens, "{what}");
        assert_eq!(g.logits.len(), plain.logits.len(), "{what}");
        for (a, b) in g.logits.iter().zip(&plain.logits) {
            let d = max_abs_diff(a, b);
            assert!(d < 1e-4, "{what}: logits differ by {d}");
        }
    };
    let (first, r1) = run(&dir);
    same(&first, "first run");
    assert_eq!(r1.reused_tokens, 0);
    assert!(
        r1.stats.window_bytes_saved > 0 && r1.stats.bytes_saved > r1.stats.window_bytes_saved,
        "{:?}",
        r1.stats
    );
    // 22 tokens before the last give 5 full blocks; a query after 20 tokens reads keys
    // from 16 on (window 5): the global blocks 0..5 and the window block 4.
    let (second, r2) = run(&dir);
    same(&second, "restored run");
    assert_eq!(r2.reused_tokens, 20, "{:?}", r2.stats);
    assert_eq!((r2.stats.hits, r2.stats.window_blocks_loaded), (5, 1));
    assert_eq!(r2.stats.rejected, 0);

    // Hostile values, checked on a cache directly: it must be left as it was.
    let spec = StorageSpec::new(model.shape(), KvDType::F32, 4, 16).unwrap();
    let new_tiered = |dir: &Path| {
        let cache = model
            .new_batch_cache(CpuBackend::new(), spec, 8, 1, 0)
            .unwrap();
        TieredCache::new(cache, fp, vec![disk(dir)])
    };
    let probe = new_tiered(&dir);
    let (global_fp, sliding_fp) =
        TieredCache::group_fingerprints(probe.cache(), &fp).expect("two groups");
    drop(probe);
    let usable = &prompt[..20];
    let global_keys = chain_keys(usable, 4, &global_fp, KvDType::F32);
    let sliding_keys = chain_keys(usable, 4, &sliding_fp, KvDType::F32);
    let mut store = kv_attention::store::DiskStore::open(&dir, 1 << 30).unwrap();
    let window_value = store
        .get(&sliding_keys[4])
        .unwrap()
        .expect("window block saved");
    let window_bytes = decode_value(&sliding_fp, &sliding_keys[4], &window_value)
        .unwrap()
        .to_vec();
    let global_value = store
        .get(&global_keys[0])
        .unwrap()
        .expect("global block saved");
    let global_bytes = decode_value(&global_fp, &global_keys[0], &global_value)
        .unwrap()
        .to_vec();
    assert_ne!(
        global_bytes.len(),
        window_bytes.len(),
        "groups differ in size"
    );
    let hostile: [(&str, usize, Vec<u8>); 2] = [
        ("window block as global block 0", 0, window_bytes.clone()),
        (
            "short window block",
            4,
            window_bytes[..window_bytes.len() - 4].to_vec(),
        ),
    ];
    for (what, block, bytes) in hostile {
        let (fp_used, key) = if block == 0 {
            (&global_fp, global_keys[0])
        } else {
            (&sliding_fp, sliding_keys[4])
        };
        let mut store = kv_attention::store::DiskStore::open(&dir, 1 << 30).unwrap();
        store
            .put(&key, &encode_value(fp_used, &key, &bytes))
            .unwrap();
        drop(store);
        let mut tiered = new_tiered(&dir);
        let (seq, reused) = tiered.create_with_prefix(&prompt);
        assert_eq!(reused, 0, "{what}");
        assert_eq!(tiered.cache().len(seq).unwrap(), 0, "{what}");
        // Nothing held or indexed in either group: only the empty sequence exists.
        for s in [
            tiered.cache().stats(),
            tiered.cache().sliding_stats().unwrap(),
        ] {
            assert_eq!(
                (
                    s.used_blocks,
                    s.cached_blocks,
                    s.indexed_blocks,
                    s.sequences
                ),
                (0, 0, 0, 1),
                "{what}: {s:?}"
            );
        }
        assert_eq!(tiered.cache().manager().audit(), Ok(()), "{what}");
        assert_eq!(
            tiered
                .cache()
                .sliding_manager()
                .map(kv_core::CacheManager::audit),
            Some(Ok(())),
            "{what}"
        );
        let stats = tiered.stats();
        assert!(stats.rejected > 0, "{what}: {stats:?}");
        assert!(tiered.last_error().is_some(), "{what}");
        drop(tiered);
        // The rejected values left the tier; a run then prefills and gives the same tokens.
        let mut store = kv_attention::store::DiskStore::open(&dir, 1 << 30).unwrap();
        assert!(!store.contains(&key).unwrap(), "{what}");
        drop(store);
        let (again, _) = run(&dir);
        same(&again, what);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `kv batch --store` on a window model: two cache groups with a disk tier give every
/// sequence the tokens of the batch without a tier, and the blocks still cached at the end
/// (the decoded ones too) are written down; a second cache over the same directory
/// restores blocks of both groups and gives the same tokens again.
#[test]
fn gemma3_batch_with_store_on_two_groups_equals_without() {
    use kv_attention::TieredCache;
    use kv_core::content::Fingerprint;
    use kv_model::BatchOptions;
    let model = load(&gemma_spec(), "gemma3-batch-store.gguf");
    let shared: Vec<u32> = (0..17).map(|i| (i * 7 % (VOCAB - 1)) as u32 + 1).collect();
    let prompts: Vec<Vec<u32>> = vec![
        shared.iter().copied().chain([3, 9]).collect(),
        shared.iter().copied().chain([5]).collect(),
    ];
    let options = BatchOptions {
        max_tokens: 10,
        stop_tokens: Vec::new(),
        max_batch: 2,
    };
    let spec = StorageSpec::new(model.shape(), KvDType::F32, 4, 40).unwrap();
    let cache = || {
        model
            .new_batch_cache(CpuBackend::new(), spec, 19 + 10, 2, 5)
            .unwrap()
    };
    let plain = model
        .generate_batch(&mut cache(), &prompts, &options)
        .unwrap();
    let dir = tier_dir("gemma3-batch-store");
    let fp = Fingerprint::of_parts(&[("test", b"gemma3 batch store")]);
    for round in 0..2 {
        let mut tiered = TieredCache::new(cache(), fp, vec![disk(&dir)]);
        assert!(tiered.cache().sliding_layers().is_some());
        let run = model
            .generate_batch_with_store(&mut tiered, &prompts, &options)
            .unwrap();
        for (a, b) in run.sequences.iter().zip(&plain.sequences) {
            assert_eq!(a.tokens, b.tokens, "round {round}");
        }
        let stats = tiered.stats();
        assert_eq!(stats.rejected, 0, "{stats:?}");
        if round == 0 {
            assert!(stats.window_bytes_saved > 0, "{stats:?}");
            // The decoded tokens' blocks (of both groups) go down at the end of the run.
            assert!(stats.blocks_spilled > 0, "{stats:?}");
        } else {
            assert!(
                stats.hits > 0 && stats.window_blocks_loaded > 0,
                "{stats:?}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
