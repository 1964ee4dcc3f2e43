//! Paged attention over the pools with an online softmax.
//!
//! The work splits into independent tasks of (sequence, KV head, chunk of queries). A task
//! walks the sequence's keys in tiles (a run of rows inside one block, at most [`TILE`]
//! long). For each tile it reads every K row once, scoring it against all queries of the
//! chunk and all query heads of the KV head's group; updates each (query, head)'s running
//! maximum, running sum and rescaled accumulator once per tile; then reads every V row
//! once, adding it into every accumulator with its weight. Memory per task is bounded by
//! the chunk and tile sizes, never by the sequence length.

use kv_core::{AttentionBatch, KvError, Result, SeqAttention};
use rayon::prelude::*;

use crate::kernels;
use crate::storage::{Geometry, LayerPools, Pools, RowCodec};

/// Most key rows scored at once: bounds the score buffer of a task.
const TILE: usize = 64;
/// Most queries of one sequence in one task: a long prefill becomes several tasks so both
/// the memory of a task and the parallelism do not depend on the prompt length.
const QUERY_CHUNK: usize = 64;

/// The query side of one attend call.
pub(crate) struct Queries<'a> {
    /// `[total_queries, q_heads, head_dim]`, row-major.
    pub data: &'a [f32],
    pub q_heads: usize,
    pub scale: f32,
}

/// One unit of parallel work.
struct Task<'a> {
    seq: &'a SeqAttention,
    /// First query row of the sequence in the batch.
    row_offset: usize,
    kv_head: usize,
    /// Queries `begin..end` of the sequence (0 is its first query).
    begin: usize,
    end: usize,
}

/// Attention of every query over `layer`; returns `[total_queries, q_heads, head_dim]`.
/// The batch, layer and query shape have been checked by the caller.
pub(crate) fn attend<C: RowCodec>(
    pools: &Pools<C>,
    layer: usize,
    queries: &Queries<'_>,
    batch: &AttentionBatch,
    thread_pool: Option<&rayon::ThreadPool>,
) -> Result<Vec<f32>> {
    let g = pools.geom;
    let layer_pools = pools.layers.get(layer).ok_or(KvError::OutOfRange {
        what: "layer",
        index: layer,
        len: pools.layers.len(),
    })?;
    let mut tasks = Vec::new();
    let mut row_offset = 0;
    for seq in &batch.seqs {
        for kv_head in 0..g.kv_heads {
            for begin in (0..seq.n_queries()).step_by(QUERY_CHUNK) {
                tasks.push(Task {
                    seq,
                    row_offset,
                    kv_head,
                    begin,
                    end: (begin + QUERY_CHUNK).min(seq.n_queries()),
                });
            }
        }
        row_offset += seq.n_queries();
    }
    let run = || {
        tasks
            .par_iter()
            .map(|t| run_task::<C>(layer_pools, g, queries, t))
            .collect::<Vec<_>>()
    };
    let results = match thread_pool {
        Some(p) => p.install(run),
        None => run(),
    };

    let d = g.head_dim;
    let group = queries.q_heads / g.kv_heads;
    let mut out = vec![0.0f32; row_offset * queries.q_heads * d];
    for (task, result) in tasks.iter().zip(results) {
        let result = result?;
        for (i, rows) in result.chunks_exact(group * d).enumerate() {
            let q_row = task.row_offset + task.begin + i;
            let start = (q_row * queries.q_heads + task.kv_head * group) * d;
            out[start..start + group * d].copy_from_slice(rows);
        }
    }
    Ok(out)
}

/// Runs one task; returns its outputs as `[end - begin, group, head_dim]`.
fn run_task<C: RowCodec>(
    pools: &LayerPools<C::Unit>,
    g: Geometry,
    queries: &Queries<'_>,
    task: &Task<'_>,
) -> Result<Vec<f32>> {
    let d = g.head_dim;
    let ru = g.row_units;
    let group = queries.q_heads / g.kv_heads;
    let n_q = task.end - task.begin;
    let lanes = n_q * group; // one (query, head) pair per lane
                             // Position of the task's first query: it sees keys 0..=first_pos, later ones one more.
    let first_pos = task.seq.first_query_position() + task.begin;
    let n_keys = first_pos + n_q;

    // This task's query rows, contiguous and pre-multiplied by the softmax scale.
    let mut q = vec![0.0f32; lanes * d];
    for i in 0..n_q {
        let q_row = task.row_offset + task.begin + i;
        let src = (q_row * queries.q_heads + task.kv_head * group) * d;
        for (dst, &x) in q[i * group * d..(i + 1) * group * d]
            .iter_mut()
            .zip(&queries.data[src..src + group * d])
        {
            *dst = x * queries.scale;
        }
    }
    let mut max = vec![f32::NEG_INFINITY; lanes];
    let mut sum = vec![0.0f32; lanes];
    let mut acc = vec![0.0f32; lanes * d];
    // scores[lane * TILE + r]: score, then weight, of row r of the current tile.
    let mut scores = vec![0.0f32; lanes * TILE];
    // A stored row widened to f32, once for all lanes that read it.
    let mut row_buf = vec![0.0f32; d];

    let blocks = task.seq.blocks();
    let mut t0 = 0;
    while t0 < n_keys {
        let block_index = t0 / g.block_size;
        let offset = t0 % g.block_size;
        let t1 = n_keys.min((block_index + 1) * g.block_size).min(t0 + TILE);
        let block = *blocks.get(block_index).ok_or(KvError::OutOfRange {
            what: "block of sequence",
            index: block_index,
            len: blocks.len(),
        })? as usize;
        let base = g.row_start(block, task.kv_head, offset);
        let rows = t1 - t0;
        // Query i sees key t when first_pos + i >= t.
        let first_seeing = |t: usize| t.saturating_sub(first_pos);

        for r in 0..rows {
            let k = C::widen(&pools.k[base + r * ru..base + (r + 1) * ru], &mut row_buf);
            for lane in first_seeing(t0 + r) * group..lanes {
                scores[lane * TILE + r] = kernels::dot_f32(&q[lane * d..(lane + 1) * d], k);
            }
        }

        for i in first_seeing(t0)..n_q {
            let visible = rows.min(first_pos + i + 1 - t0);
            for lane in i * group..(i + 1) * group {
                let s = &mut scores[lane * TILE..lane * TILE + visible];
                let tile_max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let new_max = max[lane].max(tile_max);
                if !new_max.is_finite() {
                    return Err(KvError::NonFinite {
                        what: "attention scores (q.k overflows f32)",
                    });
                }
                if new_max > max[lane] && max[lane] > f32::NEG_INFINITY {
                    let correction = (max[lane] - new_max).exp();
                    sum[lane] *= correction;
                    kernels::scale(&mut acc[lane * d..(lane + 1) * d], correction);
                }
                max[lane] = new_max;
                for x in s.iter_mut() {
                    *x = (*x - new_max).exp();
                    sum[lane] += *x;
                }
            }
        }

        for r in 0..rows {
            let v = C::widen(&pools.v[base + r * ru..base + (r + 1) * ru], &mut row_buf);
            for lane in first_seeing(t0 + r) * group..lanes {
                kernels::axpy_f32(
                    scores[lane * TILE + r],
                    v,
                    &mut acc[lane * d..(lane + 1) * d],
                );
            }
        }
        t0 = t1;
    }

    for (lane, a) in acc.chunks_exact_mut(d).enumerate() {
        // Every query sees key 0, so every sum holds at least exp(0) = 1.
        kernels::scale(a, 1.0 / sum[lane]);
    }
    Ok(acc)
}
