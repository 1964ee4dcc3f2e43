// Read (gather and dequantize) and copy_blocks.

// Grid: (slots, kv_heads, 2); block: 32 threads; dynamic shared memory: head_dim floats.
// Writes f32 rows [slots, kv_heads, head_dim] of K into `k_out` and of V into `v_out`;
// rotated keys are rotated back (the normalized transform is its own inverse).
extern "C" __global__ void kv_read(
    const u8* pool, float* k_out, float* v_out,
    const u32* slot_blocks, const u32* slot_offsets,
    u32 layer, u32 kv_heads, u32 num_blocks, u32 block_size, u32 head_dim,
    u32 row_bytes, int k_fmt, int v_fmt, u32 group, int rotate_k, float hadamard_scale)
{
    extern __shared__ float x[];
    const u32 r = blockIdx.x, head = blockIdx.y, which = blockIdx.z, lane = threadIdx.x;
    const int fmt = which == 0 ? k_fmt : v_fmt;
    // KIVI keys are read by kv_kivi_read.
    if (fmt == FMT_KIVI) return;
    const u8* row = pool + row_offset(layer, which, head, slot_blocks[r], slot_offsets[r],
                                      kv_heads, num_blocks, block_size, row_bytes);
    for (u32 d = lane; d < head_dim; d += 32) x[d] = load_elem(row, fmt, group, d);
    __syncwarp();
    if (which == 0 && rotate_k) HADAMARD(x, head_dim, lane, 32u, hadamard_scale, __syncwarp());
    float* out = (which == 0 ? k_out : v_out) + ((u64)r * kv_heads + head) * head_dim;
    for (u32 d = lane; d < head_dim; d += 32) out[d] = x[d];
}

// Grid: (moves, layers * 2 * kv_heads); block: 256 threads. Copies block `moves[2i]` over
// block `moves[2i + 1]`: one contiguous range of `block_size * row_bytes` bytes per layer,
// K or V, and KV head. The host launches moves that depend on each other (a chain, a
// target copied again) in separate launches, in order (plan.rs: copy_batches).
extern "C" __global__ void kv_copy_blocks(
    u8* pool, const u32* moves, u32 kv_heads, u32 num_blocks, u32 block_size, u32 row_bytes)
{
    const u32 from = moves[2 * blockIdx.x], to = moves[2 * blockIdx.x + 1];
    if (from == to) return;
    const u32 range = blockIdx.y;                   // (layer * 2 + which) * kv_heads + head
    const u64 bytes = (u64)block_size * row_bytes;
    const u64 base = (u64)range * num_blocks * bytes;
    const u8* s = pool + base + (u64)from * bytes;
    u8* d = pool + base + (u64)to * bytes;
    if ((bytes & 3u) == 0) {
        const u32* s4 = (const u32*)s;
        u32* d4 = (u32*)d;
        for (u64 i = threadIdx.x; i < bytes / 4; i += blockDim.x) d4[i] = s4[i];
    } else {
        for (u64 i = threadIdx.x; i < bytes; i += blockDim.x) d[i] = s[i];
    }
}
