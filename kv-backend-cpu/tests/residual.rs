//! KIVI's residual window through `PagedCache`: the blocks it settles as sequences advance
//! never change a result, forks that lag keep their f16 copies, and the windows held stay
//! bounded.

use kv_attention::PagedCache;
use kv_backend_cpu::CpuBackend;
use kv_core::candle::{Device, Tensor};
use kv_core::{AttentionBatch, KvDType, ModelShape, SeqId, StorageSpec};

const QH: usize = 4;
const KVH: usize = 2;
const D: usize = 64;
const BS: usize = 32;

fn shape() -> ModelShape {
    ModelShape::new(1, QH, KVH, D).expect("shape")
}

/// Deterministic values in [-2, 2).
fn data(len: usize, seed: u32) -> Vec<f32> {
    (0..len)
        .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 2000) as f32 / 500.0 - 2.0)
        .collect()
}

fn t3(x: &[f32], heads: usize) -> Tensor {
    let rows = x.len() / (heads * D);
    Tensor::from_vec(x.to_vec(), (rows, heads, D), &Device::Cpu).expect("tensor")
}

/// The tokens `from..to` of one sequence's K, V and Q.
struct Tokens {
    k: Vec<f32>,
    v: Vec<f32>,
    q: Vec<f32>,
}

impl Tokens {
    fn new(n: usize, seed: u32) -> Self {
        Self {
            k: data(n * KVH * D, seed),
            v: data(n * KVH * D, seed + 1),
            q: data(n * QH * D, seed + 2),
        }
    }
}

/// Reserves, writes and attends `tokens[from..to]` of `seq` in one step; returns the
/// attention output.
fn step(
    cache: &mut PagedCache<CpuBackend>,
    seq: SeqId,
    tokens: &Tokens,
    from: usize,
    to: usize,
) -> Vec<f32> {
    let slots = cache.reserve(seq, to - from).expect("reserve");
    let (kv, q) = (KVH * D, QH * D);
    cache
        .write(
            0,
            &slots,
            &t3(&tokens.k[from * kv..to * kv], KVH),
            &t3(&tokens.v[from * kv..to * kv], KVH),
        )
        .expect("write");
    let batch = AttentionBatch::new(vec![cache.seq_attention(seq, to - from).expect("seq")], D);
    cache
        .attend(0, &t3(&tokens.q[from * q..to * q], QH), &batch)
        .and_then(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?))
        .expect("attend")
}

fn cache(dtype: &str, blocks: usize) -> PagedCache<CpuBackend> {
    let dtype: KvDType = dtype.parse().expect("layout");
    let spec = StorageSpec::new(shape(), dtype, BS, blocks).expect("spec");
    PagedCache::new(CpuBackend::with_threads(2).expect("threads"), spec).expect("cache")
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() < 1e-5, "{what}: element {i}: {x} vs {y}");
    }
}

#[test]
fn decoding_with_settles_equals_one_prefill() {
    let n = 230;
    let tokens = Tokens::new(n, 1);
    for (name, residual) in [("kivi2-r32", 32), ("kivi4-r64", 64), ("kivi2-r128", 128)] {
        let mut once = cache(name, 8);
        let seq = once.create_sequence();
        let all = step(&mut once, seq, &tokens, 0, n);

        let mut steps = cache(name, 8);
        let seq = steps.create_sequence();
        let row = QH * D;
        // A prompt of 40, then one token at a time.
        let out = step(&mut steps, seq, &tokens, 0, 40);
        assert_close(&out, &all[..40 * row], name);
        for t in 40..n {
            let out = step(&mut steps, seq, &tokens, t, t + 1);
            assert_close(
                &out,
                &all[t * row..(t + 1) * row],
                &format!("{name} token {t}"),
            );
            // Settled at the reserve: the windows held are those of the last blocks.
            let held = steps.storage().residual_windows();
            assert!(
                held <= (residual + BS) / 32,
                "{name} token {t}: {held} windows"
            );
        }
        assert!(steps.storage().residual_windows() < once.storage().residual_windows());
        // Freeing the only holder settles its full blocks: the filling block's window is
        // all that remains.
        steps.free(seq).expect("free");
        assert!(steps.storage().residual_windows() <= 1, "{name}");
    }
}

#[test]
fn a_fork_that_lags_keeps_the_f16_copies_it_reads() {
    let name = "kivi2-r64";
    let (prompt, more) = (100, 90);
    let shared = Tokens::new(prompt, 10);
    // Two continuations: the parent's and the child's tokens after the prompt.
    let parent_next = Tokens::new(prompt + more, 20);
    let child_next = Tokens::new(prompt + more, 30);
    let with = |tail: &Tokens| Tokens {
        k: [&shared.k[..], &tail.k[prompt * KVH * D..]].concat(),
        v: [&shared.v[..], &tail.v[prompt * KVH * D..]].concat(),
        q: [&shared.q[..], &tail.q[prompt * QH * D..]].concat(),
    };
    let (parent_tokens, child_tokens) = (with(&parent_next), with(&child_next));

    let mut c = cache(name, 16);
    let parent = c.create_sequence();
    step(&mut c, parent, &parent_tokens, 0, prompt);
    let child = c.fork(parent).expect("fork");
    // The parent runs ahead; its settles must spare what the child still reads in f16.
    for t in prompt..prompt + more {
        step(&mut c, parent, &parent_tokens, t, t + 1);
    }
    let mut lagging = Vec::new();
    for t in prompt..prompt + more {
        lagging.extend(step(&mut c, child, &child_tokens, t, t + 1));
    }

    // The same tokens in a cache of their own.
    let mut alone = cache(name, 16);
    let seq = alone.create_sequence();
    step(&mut alone, seq, &child_tokens, 0, prompt);
    let mut want = Vec::new();
    for t in prompt..prompt + more {
        want.extend(step(&mut alone, seq, &child_tokens, t, t + 1));
    }
    assert_close(&lagging, &want, "the lagging fork");
}

#[test]
fn truncating_back_into_the_residual_keeps_working() {
    let name = "kivi4-r32";
    let tokens = Tokens::new(200, 40);
    let mut c = cache(name, 8);
    let seq = c.create_sequence();
    step(&mut c, seq, &tokens, 0, 64);
    for t in 64..200 {
        step(&mut c, seq, &tokens, t, t + 1);
    }
    // Back to 100: blocks 0..1 were settled (read quantized from now on); the block cut
    // into is written again from token 100.
    c.truncate(seq, 100).expect("truncate");
    let mut again = Vec::new();
    for t in 100..140 {
        again.extend(step(&mut c, seq, &tokens, t, t + 1));
    }
    // The same tokens decoded afresh, with the residual and without: the tokens moved
    // back within the residual read as stored (quantized) instead of f16, so the result
    // lies between the two, no further from the residual's than the layout without one.
    let fresh = |layout: &str| {
        let mut fresh = cache(layout, 8);
        let s = fresh.create_sequence();
        step(&mut fresh, s, &tokens, 0, 100);
        let mut out = Vec::new();
        for t in 100..140 {
            out.extend(step(&mut fresh, s, &tokens, t, t + 1));
        }
        out
    };
    let (want, plain) = (fresh(name), fresh("kivi4"));
    let distance = |a: &[f32]| -> f32 { a.iter().zip(&want).map(|(x, y)| (x - y).powi(2)).sum() };
    let (moved, without) = (distance(&again), distance(&plain));
    assert!(moved.is_finite() && moved > 0.0, "{moved}");
    assert!(moved < without, "truncated {moved}, kivi4 {without}");
    // The residual's windows, and the one of the partly filled block the truncate let go
    // of (a block still filling has no quantized keys to fall back on; it is dropped when
    // the block is filled again).
    assert!(c.storage().residual_windows() <= (32 + BS) / 32 + 1);
}
