// Paged attention: split-K flash-decoding for decode, query tiles for prefill, one kernel.
//
// A work item (built on the host, plan.rs: plan_attend) is one thread block: a sequence,
// one KV head, `nheads` of the query heads that read it (all of them unless shared memory
// is short), `nq` consecutive queries of the sequence, and a range of keys
// [key_start, key_end). The block reads each K and V row of its range once (dequantized
// into shared memory, straight from the stored bytes) for all its query rows, runs an
// online softmax over tiles of `tile` keys, and writes one partial result per query row:
// its running maximum m, sum l and unnormalized accumulator. kv_merge combines the
// partials of the items that split a query's keys with the log-sum-exp rule.
//
// Causality is by position: query i of a sequence with kv_len tokens and n_queries
// queries sits at kv_len - n_queries + i and sees keys 0..=its position.

#define SEQ_FIELDS 4   // table offset, kv_len, n_queries, first query row
#define ITEM_FIELDS 9  // seq, kv head, first head, heads, first query, queries, key start, key end, partial row
#define THREADS 128
#define KIVI_TOKENS 32u  // tokens of a KIVI key block (kv_core's KvDType::block_tokens)

// Element `d` of the KIVI key in slot `off` of cache block `blk`, KV head `kvh`, as every
// query but those inside a quantized block's window reads it: from the f16 window while
// the key block fills, else dequantized from the quantized block. `win_table` has one
// entry per key block of the layer (block * block_size / 32 + key block).
__device__ __forceinline__ float kivi_key(
    const u8* pool, const u16* wins, const u32* win_table, u32 layer, u32 kvh, u32 blk,
    u32 off, u32 d, u32 kv_heads, u32 num_blocks, u32 block_size, u32 D, u32 row_bytes,
    u32 bits)
{
    const u32 j = off % KIVI_TOKENS;
    const u32 e = win_table[(u64)blk * (block_size / KIVI_TOKENS) + off / KIVI_TOKENS];
    if (e != KIVI_NO_WINDOW && !(e & KIVI_QUANTIZED))
        return h2f(wins[(((u64)e * kv_heads + kvh) * KIVI_TOKENS + j) * D + d]);
    const u8* block = pool + row_offset(layer, 0, kvh, blk, off - j, kv_heads, num_blocks,
                                        block_size, row_bytes);
    return kivi_load(block, D, bits, j, d);
}

// The f16 window row of sequence key `key` when its key block is quantized but keeps its
// window (for the queries inside the block and, with a residual, R tokens past it), else
// null. With `any` set, the row of a filling window too (a residual's values).
__device__ __forceinline__ const u16* kivi_kept_row(
    const u16* wins, const u32* win_table, u32 kvh, const u32* table, u32 key, u32 kv_heads,
    u32 block_size, u32 D, bool any)
{
    const u32 blk = table[key / block_size], off = key % block_size;
    const u32 e = win_table[(u64)blk * (block_size / KIVI_TOKENS) + off / KIVI_TOKENS];
    if (e == KIVI_NO_WINDOW || !(any || (e & KIVI_QUANTIZED))) return 0;
    const u32 w = e & ~KIVI_QUANTIZED;
    return wins + (((u64)w * kv_heads + kvh) * KIVI_TOKENS + off % KIVI_TOKENS) * D;
}

#ifndef KV_HOST_CHECK
extern "C" __global__ void kv_attend(
    const u8* pool, const float* q, const u32* seqs, const u32* tables, const u32* items,
    float* partials, u32* flags,
    u32 layer, u32 kv_heads, u32 num_blocks, u32 block_size, u32 head_dim, u32 row_bytes,
    int k_fmt, int v_fmt, u32 group, int rotate_k, float hadamard_scale,
    u32 q_heads, float scale, u32 tile, u32 max_rows,
    const u16* wins, const u32* win_table, u32 kivi_bits, const u16* wins_v, u32 residual)
{
    extern __shared__ float sm[];
    const u32 D = head_dim;
    float* qs = sm;                        // [max_rows][D]
    float* acc = qs + max_rows * D;        // [max_rows][D]
    float* ks = acc + max_rows * D;        // [tile][D]
    float* vs = ks + tile * D;             // [tile][D]
    float* sc = vs + tile * D;             // [max_rows][tile]
    float* mrow = sc + max_rows * tile;    // [max_rows]
    float* lrow = mrow + max_rows;         // [max_rows]
    float* alpha = lrow + max_rows;        // [max_rows]

    const u32* it = items + (u64)blockIdx.x * ITEM_FIELDS;
    const u32 seq = it[0], kvh = it[1], head0 = it[2], nheads = it[3], q0 = it[4], nq = it[5];
    const u32 key_start = it[6], key_end = it[7], prow = it[8];
    const u32* sq = seqs + (u64)seq * SEQ_FIELDS;
    const u32* table = tables + sq[0];
    const u32 kv_len = sq[1], n_queries = sq[2], q_row0 = sq[3];
    const u32 first_pos = kv_len - n_queries + q0;
    const u32 rows = nq * nheads;
    const u32 tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const u32 per_kv = q_heads / kv_heads;

    // Query rows: row r = query qi * nheads + head hi.
    u32 bad = 0;
    for (u32 i = tid; i < rows * D; i += THREADS) {
        u32 r = i / D, d = i % D, qi = r / nheads, hi = r % nheads;
        u32 head = kvh * per_kv + head0 + hi;
        float e = q[((u64)(q_row0 + q0 + qi) * q_heads + head) * D + d];
        if (!isfinite(e)) { bad = 1; e = 0.0f; }
        qs[i] = e;
        acc[i] = 0.0f;
    }
    if (bad) atomicOr(flags, FLAG_Q_NONFINITE);
    for (u32 r = tid; r < rows; r += THREADS) {
        mrow[r] = -INFINITY;
        lrow[r] = 0.0f;
    }
    __syncthreads();
    if (rotate_k) {
        // Keys were rotated before they were stored; rotating each query the same way
        // leaves q . k unchanged.
        for (u32 r = 0; r < rows; ++r) HADAMARD(qs + r * D, D, tid, THREADS, hadamard_scale, __syncthreads());
    }

    for (u32 t0 = key_start; t0 < key_end; t0 += tile) {
        const u32 n = min(tile, key_end - t0);
        for (u32 i = tid; i < n * D; i += THREADS) {
            u32 t = i / D, d = i % D, key = t0 + t;
            u32 blk = table[key / block_size], off = key % block_size;
            const u8* krow = pool + row_offset(layer, 0, kvh, blk, off, kv_heads, num_blocks,
                                               block_size, row_bytes);
            const u8* vrow = pool + row_offset(layer, 1, kvh, blk, off, kv_heads, num_blocks,
                                               block_size, row_bytes);
            ks[i] = k_fmt == FMT_KIVI ? kivi_key(pool, wins, win_table, layer, kvh, blk, off, d,
                                                 kv_heads, num_blocks, block_size, D,
                                                 row_bytes, kivi_bits)
                                      : load_elem(krow, k_fmt, group, d);
            vs[i] = load_elem(vrow, v_fmt, group, d);
        }
        __syncthreads();
        for (u32 i = tid; i < rows * n; i += THREADS) {
            u32 r = i / n, t = i % n;
            u32 pos = first_pos + r / nheads;
            float s = -INFINITY;
            if (t0 + t <= pos) {
                const float* qr = qs + r * D;
                const float* kr = ks + t * D;
                // KIVI: a query reads the keys of its own key block (and with a residual
                // R, of a block ending after pos - R) in f16 from the block's window, also
                // once the block is quantized (the tile holds the quantized keys then,
                // which the other queries read).
                const u32 block_end = (t0 + t) / KIVI_TOKENS * KIVI_TOKENS + KIVI_TOKENS;
                const u16* wr = k_fmt == FMT_KIVI && pos < block_end + residual
                                    ? kivi_kept_row(wins, win_table, kvh, table, t0 + t,
                                                    kv_heads, block_size, D, false)
                                    : 0;
                float dot = 0.0f;
                if (wr) {
                    for (u32 d = 0; d < D; ++d) dot = fmaf(qr[d], h2f(wr[d]), dot);
                } else {
                    for (u32 d = 0; d < D; ++d) dot = fmaf(qr[d], kr[d], dot);
                }
                s = dot * scale;
            }
            sc[r * tile + t] = s;
        }
        __syncthreads();
        for (u32 r = warp; r < rows; r += THREADS / 32) {
            float mt = -INFINITY;
            for (u32 t = lane; t < n; t += 32) mt = fmaxf(mt, sc[r * tile + t]);
            for (int o = 16; o > 0; o >>= 1) mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, o));
            const float m_old = mrow[r];
            const float m_new = fmaxf(m_old, mt);
            float sum = 0.0f;
            for (u32 t = lane; t < n; t += 32) {
                float s = sc[r * tile + t];
                float p = s == -INFINITY ? 0.0f : expf(s - m_new);
                sc[r * tile + t] = p;
                sum += p;
            }
            for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
            if (lane == 0) {
                float a = m_old == -INFINITY ? 0.0f : expf(m_old - m_new);
                alpha[r] = a;
                lrow[r] = lrow[r] * a + sum;
                mrow[r] = m_new;
            }
        }
        __syncthreads();
        for (u32 i = tid; i < rows * D; i += THREADS) {
            u32 r = i / D, d = i % D;
            float a = acc[i] * alpha[r];
            // Residual KIVI: the values of the last R tokens a query sees (`t + R > pos`)
            // come from their block's window in f16 while it has one.
            const u32 pos = first_pos + r / nheads;
            const u32 f16_from = residual > 0 && pos + 1 > residual ? pos + 1 - residual : 0;
            for (u32 t = 0; t < n; ++t) {
                float vv = vs[t * D + d];
                if (residual > 0 && t0 + t >= f16_from && t0 + t <= pos) {
                    const u16* vr = kivi_kept_row(wins_v, win_table, kvh, table, t0 + t,
                                                  kv_heads, block_size, D, true);
                    if (vr) vv = h2f(vr[d]);
                }
                a = fmaf(sc[r * tile + t], vv, a);
            }
            acc[i] = a;
        }
        __syncthreads();
    }

    for (u32 i = tid; i < rows * (D + 2); i += THREADS) {
        u32 r = i / (D + 2), c = i % (D + 2);
        float val = c == 0 ? mrow[r] : (c == 1 ? lrow[r] : acc[r * D + c - 2]);
        partials[(u64)(prow + r) * (D + 2) + c] = val;
    }
}

// Grid: total query rows x q_heads; block: 128 threads. merge[3 (row * q_heads + head)..]
// = (first partial row, number of partials, stride between them).
extern "C" __global__ void kv_merge(
    const float* partials, const u32* merge, float* out, u32 q_heads, u32 head_dim)
{
    const u64 o = blockIdx.x;
    const u32 first = merge[3 * o], count = merge[3 * o + 1], stride = merge[3 * o + 2];
    const u32 W = head_dim + 2;
    float m = -INFINITY;
    for (u32 s = 0; s < count; ++s) m = fmaxf(m, partials[(u64)(first + s * stride) * W]);
    float l = 0.0f;
    for (u32 s = 0; s < count; ++s) {
        const float* p = partials + (u64)(first + s * stride) * W;
        if (p[0] != -INFINITY) l += p[1] * expf(p[0] - m);
    }
    for (u32 d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float a = 0.0f;
        for (u32 s = 0; s < count; ++s) {
            const float* p = partials + (u64)(first + s * stride) * W;
            if (p[0] != -INFINITY) a += p[2 + d] * expf(p[0] - m);
        }
        out[o * head_dim + d] = l > 0.0f ? a / l : 0.0f;
    }
}
#endif
