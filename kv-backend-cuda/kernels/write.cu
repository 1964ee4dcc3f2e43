// Scatter K and V rows into their slots, converting or quantizing on the way.
//
// One warp per (row, KV head, K or V). A write runs twice: first with `dry_run` set, which
// checks every value (finite, in the layout's range, group scales that fit f16) and raises
// flags without storing; the host reads the flags and only then launches the storing run.
// So a refused write stores nothing (all or nothing), as the trait demands.
//
// Quantization reproduces kv-quant's scalar quantizer operation for operation (f64 scale
// arithmetic with directed f16 rounding, f32 division, round half to even), so the bytes
// are the ones kv-quant writes.

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ float warp_min(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ u32 warp_or(u32 v) {
    for (int o = 16; o > 0; o >>= 1) v |= __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Grid: (rows, kv_heads, 2); block: 32 threads; dynamic shared memory: head_dim floats.
// `src[r]` is the input row (token) stored into slot `slot_blocks[r]`, `slot_offsets[r]`.
extern "C" __global__ void kv_write(
    u8* pool, const float* k, const float* v,
    const u32* src, const u32* slot_blocks, const u32* slot_offsets,
    u32 layer, u32 kv_heads, u32 num_blocks, u32 block_size, u32 head_dim,
    u32 row_bytes, int k_fmt, int v_fmt, u32 group, int rotate_k, float hadamard_scale,
    int dry_run, u32* flags)
{
    extern __shared__ float x[];
    const u32 r = blockIdx.x, head = blockIdx.y, which = blockIdx.z, lane = threadIdx.x;
    const int fmt = which == 0 ? k_fmt : v_fmt;
    const float* in = (which == 0 ? k : v) + ((u64)src[r] * kv_heads + head) * head_dim;
    const u32 nonfinite = which == 0 ? FLAG_K_NONFINITE : FLAG_V_NONFINITE;
    const u32 range = which == 0 ? FLAG_K_RANGE : FLAG_V_RANGE;

    u32 bad = 0;
    for (u32 d = lane; d < head_dim; d += 32) {
        float e = in[d];
        x[d] = e;
        u32 bits = __float_as_uint(e) & 0x7fffffffu;
        if (bits >= 0x7f800000u) bad |= nonfinite;
        else if (fmt == FMT_BF16) { if (bits >= 0x7f7f8000u) bad |= range; }
        else if (fmt != FMT_F32) { if (fabsf(e) >= 65520.0f) bad |= range; }
    }
    bad = warp_or(bad);
    __syncwarp();
    if (bad) {
        if (lane == 0) atomicOr(flags, bad);
        return;
    }
    // KIVI keys were checked as f16 values (what a window holds); kivi.cu stores them.
    if (fmt == FMT_KIVI) return;
    if (which == 0 && rotate_k) HADAMARD(x, head_dim, lane, 32u, hadamard_scale, __syncwarp());

    u8* row = pool + row_offset(layer, which, head, slot_blocks[r], slot_offsets[r], kv_heads,
                                num_blocks, block_size, row_bytes);
    if (fmt == FMT_F32 || fmt == FMT_F16 || fmt == FMT_BF16) {
        if (dry_run) return;
        for (u32 d = lane; d < head_dim; d += 32) {
            if (fmt == FMT_F32) ((float*)row)[d] = x[d];
            else if (fmt == FMT_F16) ((u16*)row)[d] = f2h_rn(x[d]);
            else ((u16*)row)[d] = f2bf_rn(x[d]);
        }
        return;
    }

    const u32 gb = group_bytes(fmt, group);
    for (u32 g0 = 0; g0 < head_dim; g0 += group) {
        const float* xg = x + g0;
        u8* out = row + (u64)(g0 / group) * gb;
        if (fmt == FMT_INT8) {
            float amax = 0.0f;
            for (u32 i = lane; i < group; i += 32) amax = fmaxf(amax, fabsf(xg[i]));
            amax = warp_max(amax);
            u16 s = f16_ceil((double)amax / 127.0);
            if (!f16_is_finite(s)) { bad = range; break; }
            if (dry_run) continue;
            float sf = h2f(s);
            if (lane == 0) store_u16(out, s);
            for (u32 i = lane; i < group; i += 32) {
                float c = sf == 0.0f ? 0.0f : fminf(fmaxf(rintf(xg[i] / sf), -127.0f), 127.0f);
                out[2 + i] = (u8)(signed char)c;
            }
        } else {
            float lo = INFINITY, hi = -INFINITY;
            for (u32 i = lane; i < group; i += 32) {
                lo = fminf(lo, xg[i]);
                hi = fmaxf(hi, xg[i]);
            }
            lo = warp_min(lo);
            hi = warp_max(hi);
            const u32 bits = asym_bits(fmt), levels = (1u << bits) - 1u, per = 8u / bits;
            u16 s, m;
            if (!asym_params(lo, hi, levels, &s, &m)) { bad = range; break; }
            if (dry_run) continue;
            float sf = h2f(s), mf = h2f(m);
            if (lane == 0) {
                store_u16(out, s);
                store_u16(out + 2, m);
            }
            // One code byte per lane step: `per` codes, low bits first.
            for (u32 b = lane; b < group / per; b += 32) {
                u32 byte = 0;
                for (u32 k = 0; k < per; ++k)
                    byte |= asym_code(xg[per * b + k], sf, mf, levels) << (k * bits);
                out[4 + b] = (u8)byte;
            }
        }
    }
    // Every lane saw the same reduced values, so `bad` is uniform over the warp.
    if (bad && lane == 0) atomicOr(flags, bad);
}
