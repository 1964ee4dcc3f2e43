// KIVI key blocks (kv-quant's KiviKeyFormat): the keys of 32 tokens of one KV head,
// quantized per channel once the block is full.
//
// Block bytes (D = head_dim, T = block tokens, b = 2 or 4 bits):
//   [0, 2D)            per-channel scale s[c], f16 little-endian
//   [2D, 4D)           per-channel minimum m[c], f16 little-endian
//   [4D + t D b / 8)   token t's codes, channel order, low bits first
// k[t][c] = m[c] + s[c] * code[t][c]. A key block of cache block `block` starts where the
// row of its first slot would (T x row_bytes = block bytes), so row_offset finds it.
//
// Work is split by *code byte column*: column j holds channels j * 8 / b .. (j + 1) * 8 / b
// of every token, so the thread that owns a column writes whole bytes and no two threads
// share one. kivi_levels and kivi_load are in common.cuh (attend.cu reads key blocks).

// Scale and minimum of channel `c` of a key block (`t_n` f16 rows of `head_dim`, token-major,
// as the f16 window holds them), over its tokens as kv-quant's quantize_block. False when
// one does not fit f16 (never for finite f16 keys).
__device__ bool kivi_channel_params(const u16* rows, u32 t_n, u32 head_dim, u32 c, u32 levels,
                                    u16* s, u16* m) {
    float lo = INFINITY, hi = -INFINITY;
    for (u32 t = 0; t < t_n; ++t) {
        float x = h2f(rows[(u64)t * head_dim + c]);
        lo = fminf(lo, x);
        hi = fmaxf(hi, x);
    }
    return asym_params(lo, hi, levels, s, m);
}

// Quantizes code byte column `j` of one key block from its f16 keys `rows` into `out` (the
// block's bytes), operation for operation as kv-quant's quantize_block: the channels'
// parameters, then codes rint((x - m) / s) clamped to 0..=L in f32. Returns false, having
// written nothing, when a channel's parameters do not fit f16.
__device__ bool kivi_quantize_column(const u16* rows, u32 t_n, u32 head_dim, u32 bits, u32 j,
                                     u8* out) {
    const u32 per = 8u / bits, levels = kivi_levels(bits);
    const u32 stride = head_dim / 8u * bits;
    u16 s[4], m[4];
    for (u32 k = 0; k < per; ++k) {
        if (!kivi_channel_params(rows, t_n, head_dim, j * per + k, levels, &s[k], &m[k]))
            return false;
    }
    for (u32 k = 0; k < per; ++k) {
        const u32 c = j * per + k;
        store_u16(out + 2u * c, s[k]);
        store_u16(out + 2u * head_dim + 2u * c, m[k]);
    }
    for (u32 t = 0; t < t_n; ++t) {
        u32 byte = 0;
        for (u32 k = 0; k < per; ++k) {
            const float sf = h2f(s[k]), mf = h2f(m[k]);
            const float x = h2f(rows[(u64)t * head_dim + j * per + k]);
            byte |= asym_code(x, sf, mf, levels) << (k * bits);
        }
        out[4u * head_dim + (u64)t * stride + j] = (u8)byte;
    }
    return true;
}


// A window's f16 of a float key: clamped to f16's range, rounded to nearest even (the CPU
// backend's encode_f16; only a dequantized key can exceed 65504, by half a step).
__device__ __forceinline__ u16 kivi_window_f16(float x) {
    return f2h_rn(fminf(fmaxf(x, -65504.0f), 65504.0f));
}

#ifndef KV_HOST_CHECK
// Grid: (windows, kv_heads); block: 32 threads. Opens window `windows[i]` of `wins` with
// the stored keys of key block (`key_blocks[2i]`, `key_blocks[2i + 1]`), dequantized and
// in f16, so the slots a write leaves alone keep what they held.
extern "C" __global__ void kv_kivi_window_open(
    const u8* pool, u16* wins, const u32* windows, const u32* key_blocks,
    u32 layer, u32 kv_heads, u32 num_blocks, u32 block_size, u32 head_dim, u32 row_bytes,
    u32 block_tokens, u32 bits)
{
    const u32 i = blockIdx.x, head = blockIdx.y, lane = threadIdx.x;
    const u8* block = pool + row_offset(layer, 0, head, key_blocks[2 * i],
                                        key_blocks[2 * i + 1] * block_tokens, kv_heads,
                                        num_blocks, block_size, row_bytes);
    u16* rows = wins + ((u64)windows[i] * kv_heads + head) * block_tokens * head_dim;
    for (u32 e = lane; e < block_tokens * head_dim; e += 32)
        rows[e] = kivi_window_f16(kivi_load(block, head_dim, bits, e / head_dim, e % head_dim));
}

// Grid: (windows, kv_heads); block: 32 threads. Residual layouts (`kivi*-rR`): opens the
// value half of window `windows[i]` (`wins_v`, shaped as `wins`) with the stored value rows
// (`v_fmt` rows in groups of `group`) of key block (`key_blocks[2i]`, `key_blocks[2i + 1]`),
// dequantized and in f16, as the key half is opened.
extern "C" __global__ void kv_kivi_window_open_values(
    const u8* pool, u16* wins_v, const u32* windows, const u32* key_blocks,
    u32 layer, u32 kv_heads, u32 num_blocks, u32 block_size, u32 head_dim, u32 row_bytes,
    u32 block_tokens, int v_fmt, u32 group)
{
    const u32 i = blockIdx.x, head = blockIdx.y, lane = threadIdx.x;
    const u32 block = key_blocks[2 * i], first = key_blocks[2 * i + 1] * block_tokens;
    u16* rows = wins_v + ((u64)windows[i] * kv_heads + head) * block_tokens * head_dim;
    for (u32 e = lane; e < block_tokens * head_dim; e += 32) {
        const u8* row = pool + row_offset(layer, 1, head, block, first + e / head_dim, kv_heads,
                                          num_blocks, block_size, row_bytes);
        rows[e] = kivi_window_f16(load_elem(row, v_fmt, group, e % head_dim));
    }
}

// Grid: (rows, kv_heads); block: 32 threads. Stores input key row `src[r]` ([rows,
// kv_heads, head_dim] f32, already checked finite and below 65520 in magnitude) into slot
// `slots[r]` of window `windows[r]` in f16. Residual layouts store value rows into the
// value windows with it too.
extern "C" __global__ void kv_kivi_window_store(
    u16* wins, const float* k, const u32* src, const u32* windows, const u32* slots,
    u32 kv_heads, u32 head_dim, u32 block_tokens)
{
    const u32 r = blockIdx.x, head = blockIdx.y, lane = threadIdx.x;
    const float* in = k + ((u64)src[r] * kv_heads + head) * head_dim;
    u16* row = wins + (((u64)windows[r] * kv_heads + head) * block_tokens + slots[r]) * head_dim;
    for (u32 c = lane; c < head_dim; c += 32) row[c] = kivi_window_f16(in[c]);
}

// Grid: (key blocks, kv_heads); block: 32 threads. Quantizes key block i of `layer`, head
// `blockIdx.y`: its keys are window `windows[i]` of `wins` ([window][kv_head][32][head_dim]
// f16), its place is cache block `key_blocks[2i]`, key block `key_blocks[2i + 1]`. The
// write's keys were checked (finite, below 65520 in magnitude) before anything was stored,
// and the channel parameters of f16 keys always fit f16, so FLAG_K_RANGE raised here means
// an internal error, not bad input.
extern "C" __global__ void kv_kivi_quantize(
    u8* pool, const u16* wins, const u32* windows, const u32* key_blocks,
    u32 layer, u32 kv_heads, u32 num_blocks, u32 block_size, u32 head_dim, u32 row_bytes,
    u32 block_tokens, u32 bits, u32* flags)
{
    const u32 i = blockIdx.x, head = blockIdx.y, lane = threadIdx.x;
    const u16* rows = wins + ((u64)windows[i] * kv_heads + head) * block_tokens * head_dim;
    const u32 block = key_blocks[2 * i], kb = key_blocks[2 * i + 1];
    u8* out = pool + row_offset(layer, 0, head, block, kb * block_tokens, kv_heads, num_blocks,
                                block_size, row_bytes);
    const u32 columns = head_dim / 8u * bits;
    for (u32 j = lane; j < columns; j += 32) {
        if (!kivi_quantize_column(rows, block_tokens, head_dim, bits, j, out))
            atomicOr(flags, FLAG_K_RANGE);
    }
}

// Grid: (slots, kv_heads); block: 32 threads. K rows [slots, kv_heads, head_dim] f32 of
// `k_out` (for read): from window `slot_windows[r]` of `wins` in f16 where the slot's key
// block is still filling, else dequantized from its quantized block (KIVI_NO_WINDOW).
extern "C" __global__ void kv_kivi_read(
    const u8* pool, const u16* wins, float* k_out, const u32* slot_blocks,
    const u32* slot_offsets, const u32* slot_windows,
    u32 layer, u32 kv_heads, u32 num_blocks, u32 block_size, u32 head_dim, u32 row_bytes,
    u32 block_tokens, u32 bits)
{
    const u32 r = blockIdx.x, head = blockIdx.y, lane = threadIdx.x;
    const u32 slot = slot_offsets[r], t = slot % block_tokens, w = slot_windows[r];
    float* out = k_out + ((u64)r * kv_heads + head) * head_dim;
    if (w != KIVI_NO_WINDOW) {
        const u16* row = wins + (((u64)w * kv_heads + head) * block_tokens + t) * head_dim;
        for (u32 c = lane; c < head_dim; c += 32) out[c] = h2f(row[c]);
        return;
    }
    const u8* block = pool + row_offset(layer, 0, head, slot_blocks[r], slot - t, kv_heads,
                                        num_blocks, block_size, row_bytes);
    for (u32 c = lane; c < head_dim; c += 32) out[c] = kivi_load(block, head_dim, bits, t, c);
}

// Grid: (ceil(elems / 256)); block: 256 threads. Copies window `from` of `wins` over window
// `to` (`elems` f16 each): copy_blocks giving a copied block its source's filling window.
// One launch per copy, in order, so a chain of moves sees each copy done.
extern "C" __global__ void kv_kivi_window_copy(u16* wins, u32 from, u32 to, u32 elems)
{
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < elems) wins[(u64)to * elems + i] = wins[(u64)from * elems + i];
}
#endif
