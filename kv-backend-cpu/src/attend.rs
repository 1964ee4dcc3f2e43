//! Paged attention over the pools with an online softmax: flash-decoding for single
//! queries, query x key tiles for prefill.
//!
//! **Tasks.** The work of one call splits into independent tasks of (sequence, KV head,
//! chunk of queries, chunk of keys). Queries are chunked so that a task holds at most
//! about [`TASK_LANES`] (query, head) lanes. A chunk of at most [`SPLIT_MAX_QUERIES`]
//! queries (decode, short appends) also splits its keys into chunks of [`KV_SPLIT`]
//! (flash-decoding), so one long sequence, or one KV head, still feeds every core. Each task
//! writes its lanes' running maximum, running sum and unnormalised accumulator; the chunks
//! of one (sequence, KV head, query chunk) are then merged with the log-sum-exp rule:
//! `out = sum_c acc_c e^(m_c - M) / sum_c s_c e^(m_c - M)`, where chunk `c` has maximum
//! `m_c` and sum `s_c`, and `M = max_c m_c`. The split depends only on the batch, never
//! on the thread count, and the merge runs in a fixed order, so results do not depend on
//! how many threads ran them. The quantized layouts' loop (the `quant` module) runs the
//! same split and merge ([`split_attend`]) with its own task body.
//!
//! **Decode path** (one query, a group of at most [`STREAM_MAX_GROUP`] query heads per KV
//! head). A task walks its keys in tiles of at most [`TILE`] rows (made of runs of rows
//! inside blocks). For each run it streams the K rows in their stored format, scoring
//! every row against all query heads of the group while the row is in registers; updates
//! each head's maximum, sum and accumulator once per tile; then streams the V rows, adding
//! each into every head's accumulator. Every K and V row is read from memory once.
//!
//! **Prefill path** (everything else). A task widens a tile of keys to f32 once, K
//! transposed and V as rows, then computes the whole (lanes x keys) score tile and the
//! (lanes x head_dim) update with register-blocked outer-product kernels, masking keys
//! past each query's position (causal by position).
//!
//! **Layouts.** The stored rows reach the kernels through [`RowOps`]: f32, f16 and bf16 rows
//! are read directly by the SIMD kernels; a new codec without kernels of its own can
//! implement `RowOps` with no methods and gets its rows decoded to f32 with its
//! [`RowCodec::decode`], run by run. (The quantized layouts have their own loop in the
//! `quant` module, over `kv-quant`'s fused kernels.)
//!
//! Scratch memory (query tile, scores, widened tiles) is kept per thread and reused across
//! calls; a call allocates its output, its task list and one buffer of partial results.

use std::cell::RefCell;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use kv_core::{AttentionBatch, BlockId, KvError, Result, SeqAttention};

use crate::kernels::{self, Isa};
use crate::storage::{Bf16Rows, F16Rows, F32Rows, Geometry, LayerPools, Pools, RowCodec};

/// Most keys in one tile: bounds the score buffers of a task.
const TILE: usize = 64;
/// Keys per chunk when a task's keys are split (flash-decoding).
const KV_SPLIT: usize = 512;
/// Query chunks of at most this many queries split their keys into chunks of
/// [`KV_SPLIT`]; longer ones (prefill) are already many tasks, and splitting them would
/// multiply the partial results by the sequence length.
const SPLIT_MAX_QUERIES: usize = 16;
/// About how many (query, head) lanes one task holds.
const TASK_LANES: usize = 128;
/// Most queries in one task.
const MAX_QUERY_CHUNK: usize = 64;
/// Largest query-head group the decode path streams; larger groups take the tiled path,
/// whose outer-product kernels use registers better when many heads share a row.
const STREAM_MAX_GROUP: usize = 8;

/// Calls that read fewer K/V bytes than this run on the calling thread: about the work
/// of the few microseconds it takes to wake a thread pool.
const SERIAL_BYTES: usize = 128 << 10;

/// The query side of one attend call.
pub(crate) struct Queries<'a> {
    /// `[total_queries, q_heads, head_dim]`, row-major.
    pub data: &'a [f32],
    pub q_heads: usize,
    pub scale: f32,
}

/// How the attention loop computes with a codec's stored rows.
///
/// `rows` is a run of `rows.len() / ru` stored rows of `ru` units each (`ru` is
/// [`Geometry::row_units`]), each holding `d` values; `ahead` is the run the loop reads
/// next (possibly empty), to prefetch. The provided methods decode the run to f32 with
/// [`RowCodec::decode`] into `scratch` and run the f32 kernels, which is right for any
/// codec; a codec with kernels that read its rows directly overrides them.
pub(crate) trait RowOps: RowCodec {
    /// `scores[h * stride + r] = q[h] . row r` for the `q.len() / d` query rows of `q`.
    #[allow(clippy::too_many_arguments)]
    fn score_run(
        isa: Isa,
        q: &[f32],
        d: usize,
        ru: usize,
        rows: &[Self::Unit],
        scores: &mut [f32],
        stride: usize,
        ahead: &[Self::Unit],
        scratch: &mut Vec<f32>,
    ) {
        kernels::prefetch(ahead);
        let wide = decode_run::<Self>(rows, d, ru, scratch);
        kernels::score_rows(isa, q, d, wide, scores, stride, &[])
    }

    /// `acc[h] += sum_r w[h * stride + r] * row r` for the `acc.len() / d` rows of `acc`.
    #[allow(clippy::too_many_arguments)]
    fn accumulate_run(
        isa: Isa,
        w: &[f32],
        stride: usize,
        d: usize,
        ru: usize,
        rows: &[Self::Unit],
        acc: &mut [f32],
        ahead: &[Self::Unit],
        scratch: &mut Vec<f32>,
    ) {
        kernels::prefetch(ahead);
        let wide = decode_run::<Self>(rows, d, ru, scratch);
        kernels::accumulate_rows(isa, w, stride, d, wide, acc, &[])
    }

    /// Row `r` of the run, as f32, into `dst[r * ld..][..d]`.
    fn widen_run(
        rows: &[Self::Unit],
        d: usize,
        ru: usize,
        dst: &mut [f32],
        ld: usize,
        scratch: &mut Vec<f32>,
    ) {
        let wide = decode_run::<Self>(rows, d, ru, scratch);
        kernels::widen_rows(wide, d, dst, ld)
    }

    /// Row `r` of the run, as f32, into column `col0 + r` of a transposed tile:
    /// `dst[k * ld + col0 + r]`.
    #[allow(clippy::too_many_arguments)]
    fn widen_run_transposed(
        rows: &[Self::Unit],
        d: usize,
        ru: usize,
        dst: &mut [f32],
        ld: usize,
        col0: usize,
        scratch: &mut Vec<f32>,
    ) {
        let wide = decode_run::<Self>(rows, d, ru, scratch);
        kernels::widen_rows_transposed(wide, d, dst, ld, col0)
    }
}

/// A run of stored rows decoded to f32 rows of `d` in `scratch`.
fn decode_run<'s, C: RowCodec + ?Sized>(
    rows: &[C::Unit],
    d: usize,
    ru: usize,
    scratch: &'s mut Vec<f32>,
) -> &'s [f32] {
    if ru == 0 || d == 0 {
        return &[];
    }
    let n = rows.len() / ru;
    let wide = sized(scratch, n * d);
    for (row, out) in rows.chunks_exact(ru).zip(wide.chunks_exact_mut(d)) {
        C::decode(row, out);
    }
    wide
}

/// Codecs whose units every kernel level reads directly.
macro_rules! direct_row_ops {
    ($($codec:ty),*) => {$(
        impl RowOps for $codec {
            fn score_run(
                isa: Isa,
                q: &[f32],
                d: usize,
                _ru: usize,
                rows: &[Self::Unit],
                scores: &mut [f32],
                stride: usize,
                ahead: &[Self::Unit],
                _scratch: &mut Vec<f32>,
            ) {
                kernels::score_rows(isa, q, d, rows, scores, stride, ahead)
            }

            fn accumulate_run(
                isa: Isa,
                w: &[f32],
                stride: usize,
                d: usize,
                _ru: usize,
                rows: &[Self::Unit],
                acc: &mut [f32],
                ahead: &[Self::Unit],
                _scratch: &mut Vec<f32>,
            ) {
                kernels::accumulate_rows(isa, w, stride, d, rows, acc, ahead)
            }

            fn widen_run(
                rows: &[Self::Unit],
                d: usize,
                _ru: usize,
                dst: &mut [f32],
                ld: usize,
                _scratch: &mut Vec<f32>,
            ) {
                kernels::widen_rows(rows, d, dst, ld)
            }

            fn widen_run_transposed(
                rows: &[Self::Unit],
                d: usize,
                _ru: usize,
                dst: &mut [f32],
                ld: usize,
                col0: usize,
                _scratch: &mut Vec<f32>,
            ) {
                kernels::widen_rows_transposed(rows, d, dst, ld, col0)
            }
        }
    )*};
}

direct_row_ops!(F32Rows, F16Rows, Bf16Rows);

/// Which loop a task runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// The streaming decode loop where it applies, else tiled.
    Auto,
    /// The tiled loop for every task (tests compare it with the streaming one).
    #[cfg_attr(not(test), allow(dead_code))]
    Tiled,
}

/// One unit of parallel work: queries `begin..end` of a sequence against its keys
/// `k0..k1`, for the query heads of one KV head. The quantized loop runs the same tasks.
pub(crate) struct Task<'a> {
    pub(crate) seq: &'a SeqAttention,
    /// First query row of the sequence in the batch.
    pub(crate) row_offset: usize,
    pub(crate) kv_head: usize,
    pub(crate) begin: usize,
    pub(crate) end: usize,
    pub(crate) k0: usize,
    pub(crate) k1: usize,
    /// The batch's sliding window (see [`AttentionBatch::window`]).
    pub(crate) window: Option<NonZeroUsize>,
}

impl Task<'_> {
    /// The first key a query at `position` sees: 0, or the start of its window.
    pub(crate) fn first_visible(&self, position: usize) -> usize {
        match self.window {
            None => 0,
            Some(w) => position.saturating_add(1).saturating_sub(w.get()),
        }
    }
}

/// The tasks whose partial results merge into one output tile.
struct Group {
    /// Index of its first task; its tasks are consecutive.
    first: usize,
    tasks: usize,
}

/// Attention of every query over `layer`; returns `[total_queries, q_heads, head_dim]`.
/// The batch, layer and query shape have been checked by the caller.
pub(crate) fn attend<C: RowOps>(
    pools: &Pools<C>,
    layer: usize,
    queries: &Queries<'_>,
    batch: &AttentionBatch,
    thread_pool: Option<&rayon::ThreadPool>,
    isa: Isa,
) -> Result<Vec<f32>> {
    attend_with(pools, layer, queries, batch, thread_pool, isa, Path::Auto)
}

fn attend_with<C: RowOps>(
    pools: &Pools<C>,
    layer: usize,
    queries: &Queries<'_>,
    batch: &AttentionBatch,
    thread_pool: Option<&rayon::ThreadPool>,
    isa: Isa,
    path: Path,
) -> Result<Vec<f32>> {
    let g = pools.geom;
    let layer_pools = pools.layers.get(layer).ok_or(KvError::OutOfRange {
        what: "layer",
        index: layer,
        len: pools.layers.len(),
    })?;
    let key_bytes = 2 * g.row_units * std::mem::size_of::<C::Unit>();
    let shape = SplitShape {
        kv_heads: g.kv_heads,
        q_heads: queries.q_heads,
        head_dim: g.head_dim,
        key_bytes,
        key_align: 1,
    };
    split_attend(batch, shape, thread_pool, |task, part| {
        run_task::<C>(layer_pools, g, isa, queries, task, part, path)
    })
}

/// What [`split_attend`] needs to know of the cache and the queries.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SplitShape {
    pub(crate) kv_heads: usize,
    pub(crate) q_heads: usize,
    pub(crate) head_dim: usize,
    /// Bytes of K and V stored per key (decides whether a call is worth a thread pool).
    pub(crate) key_bytes: usize,
    /// Tasks start at multiples of this many keys (1, or KIVI's key block): under a
    /// sliding window, the keys before a query chunk's window are skipped down to it.
    pub(crate) key_align: usize,
}

/// Splits the work of one attend call into [`Task`]s (see the module docs), runs `run` on
/// each, in parallel where worth it, and merges the partial results of each (sequence,
/// KV head, query chunk) with the log-sum-exp rule, in a fixed order. Returns
/// `[total_queries, q_heads, head_dim]`.
///
/// `run(task, part)` fills `part`, `[max; lanes][sum; lanes][acc; lanes * head_dim]` for
/// the task's `lanes = (end - begin) * group` lanes (lane `i * group + h`: query `i`, head
/// `h` of the group): each lane's running maximum and sum of `e^(s - max)` over the keys
/// `k0..k1` it sees, and its unnormalised accumulator. A lane that sees none of them
/// leaves maximum -inf and sum 0. Both the float and the quantized loops run through here,
/// so both split the same way and are bit-identical across thread counts.
pub(crate) fn split_attend<'b, F>(
    batch: &'b AttentionBatch,
    shape: SplitShape,
    thread_pool: Option<&rayon::ThreadPool>,
    run: F,
) -> Result<Vec<f32>>
where
    F: Fn(&Task<'b>, &mut [f32]) -> Result<()> + Sync,
{
    if shape.q_heads.checked_rem(shape.kv_heads) != Some(0) {
        return Err(KvError::InvalidArgument {
            what: "query heads",
            detail: format!(
                "{} query heads do not share {} KV heads evenly",
                shape.q_heads, shape.kv_heads
            ),
        });
    }
    let d = shape.head_dim;
    let group = shape.q_heads / shape.kv_heads;
    let chunk = (TASK_LANES / group).clamp(1, MAX_QUERY_CHUNK);

    let mut tasks = Vec::new();
    let mut groups = Vec::new();
    let mut row_offset = 0;
    for seq in &batch.seqs {
        for kv_head in 0..shape.kv_heads {
            for begin in (0..seq.n_queries()).step_by(chunk) {
                let end = (begin + chunk).min(seq.n_queries());
                // Keys the chunk's last query sees.
                let n_keys = seq.first_query_position() + end;
                // Keys before the chunk's first query's window are seen by none of its
                // queries: no task reads them (whole aligned units are skipped).
                let align = shape.key_align.max(1);
                let k_start =
                    batch.first_visible_key(seq.first_query_position() + begin) / align * align;
                let split = if end - begin <= SPLIT_MAX_QUERIES {
                    KV_SPLIT
                } else {
                    n_keys - k_start
                };
                let first = tasks.len();
                for k0 in (k_start..n_keys).step_by(split.max(1)) {
                    tasks.push(Task {
                        seq,
                        row_offset,
                        kv_head,
                        begin,
                        end,
                        k0,
                        k1: (k0 + split).min(n_keys),
                        window: batch.window,
                    });
                }
                groups.push(Group {
                    first,
                    tasks: tasks.len() - first,
                });
            }
        }
        row_offset += seq.n_queries();
    }

    // Partial results, one slice per task: [max; lanes][sum; lanes][acc; lanes * d].
    let part_len = |t: &Task<'_>| (t.end - t.begin) * group * (d + 2);
    let mut partials = vec![0.0f32; tasks.iter().map(part_len).sum()];
    let mut parts: Vec<&mut [f32]> = Vec::with_capacity(tasks.len());
    let mut rest = &mut partials[..];
    for t in &tasks {
        let (part, tail) = std::mem::take(&mut rest).split_at_mut(part_len(t));
        parts.push(part);
        rest = tail;
    }
    // Waking a pool costs microseconds: a call with one thread, or too little to read to
    // be worth sharing, runs on the calling thread (the same tasks, so the same result).
    let threads = thread_pool.map_or_else(rayon::current_num_threads, |p| p.current_num_threads());
    let bytes: usize = tasks.iter().map(|t| (t.k1 - t.k0) * shape.key_bytes).sum();
    let one = |(task, part): (&Task<'b>, &mut [f32])| run(task, part);
    if threads <= 1 || bytes < SERIAL_BYTES {
        tasks.iter().zip(parts).try_for_each(one)?;
    } else {
        run_shared(&tasks, parts, threads, thread_pool, &run)?;
    }

    let mut out = vec![0.0f32; row_offset * shape.q_heads * d];
    let mut offsets = Vec::with_capacity(tasks.len());
    let mut at = 0;
    for t in &tasks {
        offsets.push(at);
        at += part_len(t);
    }
    for grp in &groups {
        let lead = &tasks[grp.first];
        let lanes = (lead.end - lead.begin) * group;
        let chunks = grp.first..grp.first + grp.tasks;
        for lane in 0..lanes {
            let (i, h) = (lane / group, lane % group);
            let field = |task: usize, f: usize| partials[offsets[task] + f * lanes + lane];
            let m = chunks
                .clone()
                .map(|c| field(c, 0))
                .fold(f32::NEG_INFINITY, f32::max);
            let total: f32 = chunks
                .clone()
                .map(|c| merge_weight(field(c, 0), m) * field(c, 1))
                .sum();
            let q_row = lead.row_offset + lead.begin + i;
            let start = (q_row * shape.q_heads + lead.kv_head * group + h) * d;
            let dst = &mut out[start..start + d];
            for c in chunks.clone() {
                let w = merge_weight(field(c, 0), m);
                if w > 0.0 {
                    let acc = offsets[c] + 2 * lanes + lane * d;
                    kernels::axpy_f32(w / total, &partials[acc..acc + d], dst);
                }
            }
        }
    }
    Ok(out)
}

/// Runs every task on the calling thread and `threads - 1` pool threads, each taking the
/// next task not yet taken. The caller starts at once instead of sleeping while the pool
/// wakes (waking a sleeping pool thread takes tens of microseconds on this VM, a sizeable
/// part of a 100-200 us decode step); a helper that wakes late simply takes fewer tasks.
/// Which thread runs a task does not change its result.
fn run_shared<'b, F>(
    tasks: &[Task<'b>],
    parts: Vec<&mut [f32]>,
    threads: usize,
    thread_pool: Option<&rayon::ThreadPool>,
    run: &F,
) -> Result<()>
where
    F: Fn(&Task<'b>, &mut [f32]) -> Result<()> + Sync,
{
    let slots: Vec<Mutex<Option<&mut [f32]>>> =
        parts.into_iter().map(|p| Mutex::new(Some(p))).collect();
    let next = AtomicUsize::new(0);
    let failed: Mutex<Option<KvError>> = Mutex::new(None);
    let work = || loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let (Some(task), Some(slot)) = (tasks.get(i), slots.get(i)) else {
            return;
        };
        let part = slot.lock().ok().and_then(|mut p| p.take());
        let Some(part) = part else { continue };
        if let Err(e) = run(task, part) {
            // No further task starts; the first error is the one reported.
            next.store(tasks.len(), Ordering::Relaxed);
            if let Ok(mut f) = failed.lock() {
                f.get_or_insert(e);
            }
            return;
        }
    };
    let helpers = threads.min(tasks.len()).saturating_sub(1);
    let work = &work;
    match thread_pool {
        Some(p) => p.in_place_scope(|s| spawn_and_work(s, helpers, work)),
        None => rayon::in_place_scope(|s| spawn_and_work(s, helpers, work)),
    }
    match failed.into_inner() {
        Ok(Some(e)) => Err(e),
        _ => Ok(()),
    }
}

/// Hands `work` to `helpers` pool threads and runs it on this thread too.
fn spawn_and_work<'s, W: Fn() + Sync>(s: &rayon::Scope<'s>, helpers: usize, work: &'s W) {
    for _ in 0..helpers {
        s.spawn(move |_| work());
    }
    work();
}

/// `e^(m_c - m)`: how much a chunk whose running maximum is `m_c` counts once the overall
/// maximum is `m`; 0 for a chunk its lane saw no key of.
fn merge_weight(m_c: f32, m: f32) -> f32 {
    if m_c == f32::NEG_INFINITY {
        0.0
    } else {
        (m_c - m).exp()
    }
}

/// Per-thread buffers a task reuses across calls (float and quantized tasks alike): a
/// decode step runs a few dozen tasks per layer, and allocating them each time is waste on
/// the hot path.
#[derive(Default)]
pub(crate) struct Scratch {
    pub(crate) q: Vec<f32>,
    pub(crate) scores: Vec<f32>,
    pub(crate) kt: Vec<f32>,
    v: Vec<f32>,
    acc: Vec<f32>,
    /// Rows widened (or dequantized) to f32.
    pub(crate) wide: Vec<f32>,
    /// A KIVI key block's scores for one lane.
    pub(crate) block_scores: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Runs `f` with this thread's scratch (or a fresh one, were it ever in use already).
pub(crate) fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut s) => f(&mut s),
        Err(_) => f(&mut Scratch::default()),
    })
}

/// The first `n` elements of `v`, grown (with zeros) to hold them.
pub(crate) fn sized(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

/// Runs one task into its partial result `part` (`[max; lanes][sum; lanes][acc; lanes*d]`).
fn run_task<C: RowOps>(
    pools: &LayerPools<C::Unit>,
    g: Geometry,
    isa: Isa,
    queries: &Queries<'_>,
    task: &Task<'_>,
    part: &mut [f32],
    path: Path,
) -> Result<()> {
    let d = g.head_dim;
    let group = queries.q_heads / g.kv_heads;
    let n_q = task.end - task.begin;
    let lanes = n_q * group;
    with_scratch(|scratch| {
        // This task's query rows, contiguous and pre-multiplied by the softmax scale: the
        // rows of one query's group of heads are contiguous in `q`.
        let q = sized(&mut scratch.q, lanes * d);
        for i in 0..n_q {
            let q_row = task.row_offset + task.begin + i;
            let src = (q_row * queries.q_heads + task.kv_head * group) * d;
            let rows =
                queries
                    .data
                    .get(src..src + group * d)
                    .ok_or_else(|| KvError::OutOfRange {
                        what: "query row",
                        index: q_row,
                        len: queries.data.len() / (queries.q_heads * d).max(1),
                    })?;
            for (dst, &x) in q[i * group * d..(i + 1) * group * d].iter_mut().zip(rows) {
                *dst = x * queries.scale;
            }
        }
        let (max, rest) = part.split_at_mut(lanes);
        let (sum, acc) = rest.split_at_mut(lanes);
        max.fill(f32::NEG_INFINITY);
        sum.fill(0.0);
        acc.fill(0.0);
        let lanes_state = Lanes { max, sum, acc };
        let Scratch {
            q,
            scores,
            kt,
            v,
            acc: tile_acc,
            wide,
            ..
        } = scratch;
        let q = &q[..lanes * d];
        if n_q == 1 && group <= STREAM_MAX_GROUP && path == Path::Auto {
            stream::<C>(pools, g, isa, task, q, lanes_state, scores, wide)
        } else {
            let bufs = TileBufs {
                scores,
                kt,
                v,
                acc: tile_acc,
                wide,
            };
            tiled::<C>(pools, g, isa, task, group, q, lanes_state, bufs)
        }
    })
}

/// The online-softmax state of a task's lanes, in its partial-result slice.
struct Lanes<'a> {
    max: &'a mut [f32],
    sum: &'a mut [f32],
    /// `[lanes][head_dim]`.
    acc: &'a mut [f32],
}

/// Folds one tile of raw scores `s` (turned into weights in place) into a lane's running
/// maximum and sum, rescaling its accumulator `acc` when the maximum grows.
fn softmax_update(
    isa: Isa,
    s: &mut [f32],
    max: &mut f32,
    sum: &mut f32,
    acc: &mut [f32],
) -> Result<()> {
    let new_max = max.max(kernels::max(isa, s));
    if !new_max.is_finite() {
        return Err(KvError::NonFinite {
            what: "attention scores (q.k overflows f32)",
        });
    }
    if new_max > *max && *max > f32::NEG_INFINITY {
        let correction = (*max - new_max).exp();
        *sum *= correction;
        kernels::scale(acc, correction);
    }
    *max = new_max;
    *sum += kernels::exp_sum(isa, s, new_max);
    if !sum.is_finite() {
        return Err(KvError::NonFinite {
            what: "attention scores (q.k overflows f32)",
        });
    }
    Ok(())
}

/// Splits keys `t0..t1` of `blocks` into runs of rows contiguous in the pools, for KV head
/// `kv_head`: `(first unit, rows)` into `runs`; returns how many. Blocks with consecutive
/// ids join into one run, as the head-major pools store them back to back.
fn runs_of(
    blocks: &[BlockId],
    g: Geometry,
    kv_head: usize,
    t0: usize,
    t1: usize,
    runs: &mut [(usize, usize); TILE],
) -> Result<usize> {
    let mut n = 0usize;
    let mut t = t0;
    while t < t1 {
        let index = t / g.block_size;
        let end = t1.min((index + 1) * g.block_size);
        let block = blocks
            .get(index)
            .ok_or_else(|| KvError::OutOfRange {
                what: "block of sequence",
                index,
                len: blocks.len(),
            })?
            .index();
        if block >= g.num_blocks {
            return Err(KvError::OutOfRange {
                what: "block",
                index: block,
                len: g.num_blocks,
            });
        }
        let start = g.row_start(block, kv_head, t % g.block_size);
        match n.checked_sub(1).and_then(|last| runs.get_mut(last)) {
            Some(prev) if prev.0 + prev.1 * g.row_units == start => prev.1 += end - t,
            _ => {
                let slot = runs.get_mut(n).ok_or_else(|| KvError::InvalidArgument {
                    what: "attention tile",
                    detail: format!("keys {t0}..{t1} exceed a tile of {TILE}"),
                })?;
                *slot = (start, end - t);
                n += 1;
            }
        }
        t = end;
    }
    Ok(n)
}

/// The stored rows of a run.
fn run_rows<U>(pool: &[U], g: Geometry, (start, rows): (usize, usize)) -> Result<&[U]> {
    pool.get(start..start + rows * g.row_units)
        .ok_or_else(|| KvError::OutOfRange {
            what: "pool row",
            index: start + rows * g.row_units,
            len: pool.len(),
        })
}

/// The decode loop: one query, its group's heads as lanes, keys `k0..k1` all visible (a
/// task starts at its query's window, `key_align` being 1 here).
///
/// Rows of one KV head are contiguous over blocks with consecutive ids (one run), but a
/// sequence's blocks may be scattered (runs of `block_size` rows, often a page or less), so
/// the loop looks one tile ahead instead of relying on the hardware prefetchers: before a
/// tile it requests the first line of every run of the next tile, K and V, which gets the
/// address translation of those pages under way; then, while the kernels read the K (or V)
/// rows of the tile, they prefetch the matching rows of the next one, a row per row read.
#[allow(clippy::too_many_arguments)]
fn stream<C: RowOps>(
    pools: &LayerPools<C::Unit>,
    g: Geometry,
    isa: Isa,
    task: &Task<'_>,
    q: &[f32],
    lanes: Lanes<'_>,
    scores: &mut Vec<f32>,
    wide: &mut Vec<f32>,
) -> Result<()> {
    let (d, ru) = (g.head_dim, g.row_units);
    let heads = lanes.max.len();
    let scores = sized(scores, heads * TILE);
    let blocks = task.seq.blocks();
    let tile_end = |t: usize| task.k1.min(t + TILE);
    let mut runs = [(0usize, 0usize); TILE];
    let mut next = [(0usize, 0usize); TILE];
    let mut t = task.k0;
    let mut n_runs = runs_of(blocks, g, task.kv_head, t, tile_end(t), &mut runs)?;
    // Nothing prefetched the first tile while an earlier one was read: ask for all of it
    // at once, so its misses overlap instead of arriving one row after another.
    for &run in &runs[..n_runs] {
        kernels::prefetch(run_rows(&pools.k, g, run)?);
        kernels::prefetch(run_rows(&pools.v, g, run)?);
    }
    while t < task.k1 {
        let t1 = tile_end(t);
        let n_next = runs_of(blocks, g, task.kv_head, t1, tile_end(t1), &mut next)?;
        for &(start, _) in &next[..n_next] {
            kernels::prefetch(pools.k.get(start..start + 1).unwrap_or(&[]));
            kernels::prefetch(pools.v.get(start..start + 1).unwrap_or(&[]));
        }
        let mut col = 0;
        for (j, &run) in runs[..n_runs].iter().enumerate() {
            let ahead = match next[..n_next].get(j) {
                Some(&a) => run_rows(&pools.k, g, a)?,
                None => &[],
            };
            let rows = run_rows(&pools.k, g, run)?;
            C::score_run(isa, q, d, ru, rows, &mut scores[col..], TILE, ahead, wide);
            col += run.1;
        }
        for h in 0..heads {
            softmax_update(
                isa,
                &mut scores[h * TILE..h * TILE + (t1 - t)],
                &mut lanes.max[h],
                &mut lanes.sum[h],
                &mut lanes.acc[h * d..(h + 1) * d],
            )?;
        }
        col = 0;
        for (j, &run) in runs[..n_runs].iter().enumerate() {
            let ahead = match next[..n_next].get(j) {
                Some(&a) => run_rows(&pools.v, g, a)?,
                None => &[],
            };
            let rows = run_rows(&pools.v, g, run)?;
            C::accumulate_run(
                isa,
                &scores[col..],
                TILE,
                d,
                ru,
                rows,
                lanes.acc,
                ahead,
                wide,
            );
            col += run.1;
        }
        std::mem::swap(&mut runs, &mut next);
        n_runs = n_next;
        t = t1;
    }
    Ok(())
}

/// Scratch of the tiled loop.
struct TileBufs<'a> {
    scores: &'a mut Vec<f32>,
    kt: &'a mut Vec<f32>,
    v: &'a mut Vec<f32>,
    acc: &'a mut Vec<f32>,
    wide: &'a mut Vec<f32>,
}

/// The tiled loop: lanes `i * group + h` for query `i` of the chunk and head `h` of the
/// group; query `i` sits at position `first + i` and sees keys `0..=first + i` (from the
/// start of its window under a sliding window).
#[allow(clippy::too_many_arguments)]
fn tiled<C: RowOps>(
    pools: &LayerPools<C::Unit>,
    g: Geometry,
    isa: Isa,
    task: &Task<'_>,
    group: usize,
    q: &[f32],
    lanes: Lanes<'_>,
    bufs: TileBufs<'_>,
) -> Result<()> {
    let (d, ru) = (g.head_dim, g.row_units);
    // Accumulator and value rows padded to whole registers.
    let dp = d.div_ceil(8) * 8;
    let n_lanes = lanes.max.len();
    let n_q = task.end - task.begin;
    let first = task.seq.first_query_position() + task.begin;
    let s = sized(bufs.scores, n_lanes * TILE);
    let kt = sized(bufs.kt, d * TILE);
    let vt = sized(bufs.v, TILE * dp);
    let acc = sized(bufs.acc, n_lanes * dp);
    acc.fill(0.0);
    let mut runs = [(0usize, 0usize); TILE];
    let mut t = task.k0;
    while t < task.k1 {
        let t1 = task.k1.min(t + TILE);
        let rows = t1 - t;
        let cols = rows.div_ceil(8) * 8;
        // Queries before `i0` sit before key t and see none of this tile (nor later ones).
        let i0 = t.saturating_sub(first);
        if i0 >= n_q {
            break;
        }
        let l0 = i0 * group;
        let n_runs = runs_of(task.seq.blocks(), g, task.kv_head, t, t1, &mut runs)?;
        let mut col = 0;
        for &run in &runs[..n_runs] {
            let k_rows = run_rows(&pools.k, g, run)?;
            C::widen_run_transposed(k_rows, d, ru, kt, TILE, col, bufs.wide);
            let v_rows = run_rows(&pools.v, g, run)?;
            C::widen_run(v_rows, d, ru, &mut vt[col * dp..], dp, bufs.wide);
            col += run.1;
        }
        if dp > d {
            for row in vt[..rows * dp].chunks_exact_mut(dp) {
                row[d..].fill(0.0);
            }
        }
        kernels::qk_tile(
            isa,
            &q[l0 * d..],
            d,
            n_lanes - l0,
            d,
            kt,
            TILE,
            cols,
            &mut s[l0 * TILE..],
            TILE,
        );
        for lane in l0..n_lanes {
            let position = first + lane / group;
            let visible = rows.min(position + 1 - t);
            // Keys before the query's window (sliding-window layers) weigh nothing either.
            let lo = task.first_visible(position).saturating_sub(t).min(visible);
            let row = &mut s[lane * TILE..lane * TILE + rows];
            if lo < visible {
                softmax_update(
                    isa,
                    &mut row[lo..visible],
                    &mut lanes.max[lane],
                    &mut lanes.sum[lane],
                    &mut acc[lane * dp..(lane + 1) * dp],
                )?;
            }
            row[..lo].fill(0.0);
            row[visible..].fill(0.0);
        }
        kernels::pv_tile(
            isa,
            &s[l0 * TILE..],
            TILE,
            n_lanes - l0,
            rows,
            vt,
            dp,
            dp,
            &mut acc[l0 * dp..],
            dp,
        );
        t = t1;
    }
    for (out, a) in lanes.acc.chunks_exact_mut(d).zip(acc.chunks_exact(dp)) {
        out.copy_from_slice(&a[..d]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::SplitMix;
    use crate::storage::{with_pools, CpuStorage, Which};
    use kv_core::{KvDType, ModelShape, Slot, StorageSpec};

    /// A batch of sequences over scattered blocks, its queries, and the f64 reference
    /// output computed from the stored (rounded) K/V.
    struct Fixture {
        storage: CpuStorage,
        batch: AttentionBatch,
        q: Vec<f32>,
        q_heads: usize,
        want: Vec<f64>,
        v_max: f64,
    }

    fn fixture(
        heads: (usize, usize, usize),
        dtype: KvDType,
        block_size: usize,
        seqs: &[(usize, usize)],
        seed: u64,
    ) -> Result<Fixture> {
        windowed_fixture(heads, dtype, block_size, seqs, seed, None)
    }

    /// [`fixture`] attending through a sliding window of `window` tokens.
    fn windowed_fixture(
        (q_heads, kv_heads, d): (usize, usize, usize),
        dtype: KvDType,
        block_size: usize,
        seqs: &[(usize, usize)],
        seed: u64,
        window: Option<NonZeroUsize>,
    ) -> Result<Fixture> {
        let mut rng = SplitMix(seed);
        let blocks_needed: usize = seqs.iter().map(|(len, _)| len.div_ceil(block_size)).sum();
        // Spare blocks, and a count coprime with 7 for the scattering below.
        let num_blocks = (blocks_needed + 3..).find(|n| n % 7 != 0).unwrap_or(1);
        let spec = StorageSpec::new(
            ModelShape::new(1, q_heads, kv_heads, d)?,
            dtype,
            block_size,
            num_blocks,
        )?;
        let mut storage = CpuStorage::allocate(&spec)?;
        // A fixed scattering of block ids (a permutation, as 7 is coprime with the count).
        let order: Vec<BlockId> = (0..num_blocks)
            .map(|i| BlockId::new(((i * 7 + 2) % num_blocks) as u32))
            .collect();
        let mut next = 0;
        let mut seq_attn = Vec::new();
        let mut kv = Vec::new();
        for &(len, n_q) in seqs {
            let n_blocks = len.div_ceil(block_size);
            let table = order[next..next + n_blocks].to_vec();
            next += n_blocks;
            let slots: Vec<Slot> = (0..len)
                .map(|t| Slot {
                    block: table[t / block_size],
                    offset: (t % block_size) as u32,
                })
                .collect();
            let k: Vec<f32> = (0..len * kv_heads * d)
                .map(|_| rng.next_unit() * 2.0)
                .collect();
            let v: Vec<f32> = (0..len * kv_heads * d).map(|_| rng.next_unit()).collect();
            with_pools!(&mut storage.pools, p => p.store(0, Which::K, &slots, &k))?;
            with_pools!(&mut storage.pools, p => p.store(0, Which::V, &slots, &v))?;
            kv.push(with_pools!(&storage.pools, p => p.read(0, &slots))?);
            seq_attn.push(SeqAttention::new(table, len, n_q)?);
        }
        finish(
            storage,
            seq_attn,
            &kv,
            (q_heads, kv_heads, d),
            &mut rng,
            window,
        )
    }

    /// The fixture of sequences `seq_attn` over `storage`, whose K and V rows (as stored)
    /// are `kv`: random queries and the f64 reference output (written out here, with the
    /// window as `(p - W, p]`, not through kv-core's reference).
    fn finish(
        storage: CpuStorage,
        seq_attn: Vec<SeqAttention>,
        kv: &[(Vec<f32>, Vec<f32>)],
        (q_heads, kv_heads, d): (usize, usize, usize),
        rng: &mut SplitMix,
        window: Option<NonZeroUsize>,
    ) -> Result<Fixture> {
        let mut batch = AttentionBatch::new(seq_attn, d);
        batch.window = window;
        let total_q = batch.total_queries();
        let q: Vec<f32> = (0..total_q * q_heads * d)
            .map(|_| rng.next_unit())
            .collect();
        let group = q_heads / kv_heads;
        let mut want = vec![0.0f64; q.len()];
        let mut v_max = 0.0f64;
        let mut row = 0;
        for (seq, (k, v)) in batch.seqs.iter().zip(kv) {
            v_max = v.iter().fold(v_max, |m, x| m.max(x.abs() as f64));
            for i in 0..seq.n_queries() {
                let pos = seq.first_query_position() + i;
                for h in 0..q_heads {
                    let kvh = h / group;
                    let qv = &q[((row + i) * q_heads + h) * d..][..d];
                    let lo = window.map_or(0, |w| (pos + 1).saturating_sub(w.get()));
                    let scores: Vec<f64> = (lo..=pos)
                        .map(|t| {
                            let kt = &k[(t * kv_heads + kvh) * d..][..d];
                            batch.scale as f64
                                * qv.iter()
                                    .zip(kt)
                                    .map(|(&a, &b)| a as f64 * b as f64)
                                    .sum::<f64>()
                        })
                        .collect();
                    let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                    let total: f64 = w.iter().sum();
                    let out = &mut want[((row + i) * q_heads + h) * d..][..d];
                    for (t, wt) in (lo..).zip(&w) {
                        let vt = &v[(t * kv_heads + kvh) * d..][..d];
                        for (o, &x) in out.iter_mut().zip(vt) {
                            *o += wt / total * x as f64;
                        }
                    }
                }
            }
            row += seq.n_queries();
        }
        Ok(Fixture {
            storage,
            batch,
            q,
            q_heads,
            want,
            v_max,
        })
    }

    fn run(
        f: &Fixture,
        isa: Isa,
        path: Path,
        threads: Option<&rayon::ThreadPool>,
    ) -> Result<Vec<f32>> {
        let queries = Queries {
            data: &f.q,
            q_heads: f.q_heads,
            scale: f.batch.scale,
        };
        let quant = |p| {
            let queries = crate::quant::QuantQueries {
                data: &f.q,
                q_heads: f.q_heads,
                scale: f.batch.scale,
            };
            crate::quant::attend(p, 0, &queries, &f.batch, threads)
        };
        with_pools!(&f.storage.pools, p => attend_with(p, 0, &queries, &f.batch, threads, isa, path),
            quant p => quant(p))
    }

    /// A private pool of `n` threads, so thread counts are what the test says.
    fn pool(n: usize) -> Result<rayon::ThreadPool> {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .map_err(|e| KvError::InvalidArgument {
                what: "pool",
                detail: e.to_string(),
            })
    }

    /// Every level and both loops agree with the f64 reference; the result does not depend
    /// on the thread count.
    fn check(f: &Fixture, what: &str) -> Result<()> {
        let one = pool(1)?;
        let three = pool(3)?;
        let tol = 2e-5 * (1.0 + f.v_max);
        for &isa in &Isa::available() {
            for path in [Path::Auto, Path::Tiled] {
                let got = run(f, isa, path, Some(&one))?;
                for (i, (g, w)) in got.iter().zip(&f.want).enumerate() {
                    assert!(
                        (*g as f64 - w).abs() <= tol,
                        "{what} {isa} {path:?} [{i}]: {g} vs {w}"
                    );
                }
                assert_eq!(
                    run(f, isa, path, Some(&three))?,
                    got,
                    "{what} {isa} {path:?}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn long_decode_split_over_key_chunks_matches_the_reference() -> Result<()> {
        // SmolLM2's head layout; 1300 keys make three key chunks, merged by log-sum-exp.
        let f = fixture((9, 3, 64), KvDType::F16, 16, &[(1300, 1), (7, 1)], 1)?;
        check(&f, "smollm2 decode")
    }

    #[test]
    fn short_appends_split_with_queries_that_see_no_key_of_a_chunk() -> Result<()> {
        // 16 queries at positions 504..=519: in the key chunk 512..520 the first eight see
        // nothing. 17 queries do not split. Head dim 13 exercises every SIMD tail.
        let f = fixture(
            (6, 2, 13),
            KvDType::BF16,
            5,
            &[(520, 16), (40, 17), (3, 3)],
            2,
        )?;
        check(&f, "gqa append")
    }

    #[test]
    fn quantized_layouts_split_keys_like_the_float_path() -> Result<()> {
        // The quantized loop runs the same tasks and merge: SmolLM2's heads, 1300 keys in
        // three key chunks, and a short append whose 8 queries sit in a partly filled
        // block (where a KIVI query reads its own keys in f16, as `read` returns them). The
        // reference attends over the keys and values as stored (dequantized).
        for dtype in ["int8-g32", "int4-g64", "int4h-g32", "kivi4", "kivi2"] {
            let f = fixture((9, 3, 64), dtype.parse()?, 32, &[(1300, 1), (1100, 8)], 5)?;
            check(&f, dtype)?;
        }
        // MHA decode (one head per KV head) and a prefill chunk, head dim 128.
        let f = fixture(
            (4, 4, 128),
            "int8-g64".parse()?,
            32,
            &[(700, 1), (70, 70)],
            6,
        )?;
        check(&f, "int8 mha")
    }

    #[test]
    fn sliding_windows_hide_older_keys_in_every_loop_and_layout() -> Result<()> {
        // Windows shorter than a tile, across tiles and key chunks, and longer than the
        // context; decode, short appends and prefill chunks; Gemma 3's MQA with head dim 256.
        let seqs = [(1300, 1), (600, 16), (130, 130), (5, 5)];
        for w in [1, 7, 64, 100, 513, 2000] {
            let window = NonZeroUsize::new(w);
            let f = windowed_fixture((4, 1, 256), KvDType::F16, 16, &seqs, 11, window)?;
            check(&f, &format!("mqa 256 window {w}"))?;
            let f = windowed_fixture((6, 2, 13), KvDType::BF16, 5, &seqs, 12, window)?;
            check(&f, &format!("gqa 13 window {w}"))?;
            for dtype in ["int8-g32", "int4h-g32"] {
                let f = windowed_fixture((9, 3, 64), dtype.parse()?, 32, &seqs, 13, window)?;
                check(&f, &format!("{dtype} window {w}"))?;
            }
            // KIVI: decode and an append inside a partly filled block, where the reference
            // (the keys as `read` returns them) is what a KIVI query reads (see
            // `quantized_layouts_split_keys_like_the_float_path`).
            let kivi = [(1300, 1), (1100, 8)];
            let f = windowed_fixture((9, 3, 64), "kivi4".parse()?, 32, &kivi, 14, window)?;
            check(&f, &format!("kivi4 window {w}"))?;
        }
        Ok(())
    }

    #[test]
    fn large_groups_and_prefill_take_the_tiled_loop_and_match() -> Result<()> {
        // MQA with 12 heads per KV head: even decode runs tiled; prefill chunks of 10.
        let f = fixture((12, 1, 32), KvDType::F32, 16, &[(600, 1), (70, 70)], 3)?;
        check(&f, "mqa")?;
        // MHA, head dim 128, one token per block.
        let f = fixture((4, 4, 128), KvDType::F32, 1, &[(100, 1), (65, 65)], 4)?;
        check(&f, "mha")
    }

    /// Sequences over consecutive block ids (joined into long runs), over scattered ones, and
    /// a fork whose shared prefix is the parent's blocks and whose partial last block was
    /// copied on write and then written past the fork point.
    fn forked_fixture(
        (q_heads, kv_heads, d): (usize, usize, usize),
        dtype: KvDType,
        block_size: usize,
        seed: u64,
    ) -> Result<Fixture> {
        let mut rng = SplitMix(seed);
        let bs = block_size;
        let spec = StorageSpec::new(ModelShape::new(1, q_heads, kv_heads, d)?, dtype, bs, 24)?;
        let mut storage = CpuStorage::allocate(&spec)?;
        let mut write = |storage: &mut CpuStorage, table: &[BlockId], t0: usize, t1: usize| {
            let slots: Vec<Slot> = (t0..t1)
                .map(|t| Slot {
                    block: table[t / bs],
                    offset: (t % bs) as u32,
                })
                .collect();
            let n = slots.len() * kv_heads * d;
            let k: Vec<f32> = (0..n).map(|_| rng.next_unit() * 2.0).collect();
            let v: Vec<f32> = (0..n).map(|_| rng.next_unit()).collect();
            with_pools!(&mut storage.pools, p => p.store(0, Which::K, &slots, &k))?;
            with_pools!(&mut storage.pools, p => p.store(0, Which::V, &slots, &v))
        };
        // Parent: consecutive blocks 0..5, the last one partly filled.
        let parent: Vec<BlockId> = (0..5).map(BlockId::new).collect();
        let parent_len = 4 * bs + bs / 2 + 1;
        write(&mut storage, &parent, 0, parent_len)?;
        // Fork at the parent's length: blocks 0..4 shared, block 4 copied to 10, then more
        // tokens into 10, 11 (consecutive) and the scattered 7, 12.
        let child: Vec<BlockId> = [0, 1, 2, 3, 10, 11, 7, 12].map(BlockId::new).to_vec();
        with_pools!(&mut storage.pools, p => p.copy_blocks(&[(BlockId::new(4), BlockId::new(10))]));
        let child_len = 7 * bs + 3;
        write(&mut storage, &child, parent_len, child_len)?;
        // The parent goes on in its own block 4 after the fork.
        write(&mut storage, &parent, parent_len, parent_len + 2)?;
        // Scattered blocks, descending ids.
        let scattered: Vec<BlockId> = [23, 21, 19, 17, 15].map(BlockId::new).to_vec();
        let scattered_len = 4 * bs + 1;
        write(&mut storage, &scattered, 0, scattered_len)?;
        let seqs = [
            (parent, parent_len + 2, 1),
            (child, child_len, 1),
            (scattered, scattered_len, 1),
        ];
        let mut seq_attn = Vec::new();
        let mut kv = Vec::new();
        for (table, len, n_q) in seqs {
            let slots: Vec<Slot> = (0..len)
                .map(|t| Slot {
                    block: table[t / bs],
                    offset: (t % bs) as u32,
                })
                .collect();
            kv.push(with_pools!(&storage.pools, p => p.read(0, &slots))?);
            seq_attn.push(SeqAttention::new(table, len, n_q)?);
        }
        // The fork reads the parent's tokens before the fork point, copied block included
        // (KIVI: but for the copied key block, which the child's writes filled and quantized).
        let shared = if dtype.block_tokens() > 1 {
            4 * bs
        } else {
            parent_len
        };
        let shared = shared * kv_heads * d;
        assert!(
            kv[1].0[..shared] == kv[0].0[..shared],
            "{dtype}: forked keys"
        );
        assert!(
            kv[1].1[..shared] == kv[0].1[..shared],
            "{dtype}: forked values"
        );
        finish(
            storage,
            seq_attn,
            &kv,
            (q_heads, kv_heads, d),
            &mut rng,
            None,
        )
    }

    #[test]
    fn consecutive_scattered_and_forked_blocks_match_the_reference() -> Result<()> {
        for dtype in [KvDType::F32, KvDType::F16, KvDType::BF16] {
            // Blocks shorter than a tile (runs join across them) and longer ones; head dim
            // 13 exercises every SIMD tail.
            for (shape, bs) in [((9, 3, 64), 16), ((6, 2, 13), 5), ((4, 2, 32), 96)] {
                let f = forked_fixture(shape, dtype, bs, 7)?;
                check(&f, &format!("{dtype} block {bs}"))?;
            }
        }
        for dtype in ["int8-g32", "int4h-g32", "kivi4"] {
            let f = forked_fixture((9, 3, 64), dtype.parse()?, 32, 8)?;
            check(&f, dtype)?;
        }
        // Quantized rows join consecutive blocks into tiles too: 16-token blocks, up to 4
        // to a tile, broken where the table jumps.
        for dtype in ["int8-g64", "int4-g32"] {
            let f = forked_fixture((9, 3, 64), dtype.parse()?, 16, 9)?;
            check(&f, &format!("{dtype} block 16"))?;
        }
        Ok(())
    }

    #[test]
    fn scores_that_overflow_are_a_typed_error() -> Result<()> {
        let three = pool(3)?;
        // A short call runs on the calling thread; 3000 keys (over 128 KiB) run as tasks
        // shared with the pool, where the error must come back the same.
        for (len, pool) in [(9, None), (3000, Some(&three))] {
            let mut f = fixture((2, 1, 8), KvDType::F32, 4, &[(len, 1)], 5)?;
            f.q.iter_mut().for_each(|x| *x = 3.0e38);
            for &isa in &Isa::available() {
                for path in [Path::Auto, Path::Tiled] {
                    assert!(matches!(
                        run(&f, isa, path, pool),
                        Err(KvError::NonFinite { .. })
                    ));
                }
            }
        }
        Ok(())
    }
}
