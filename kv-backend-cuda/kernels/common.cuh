// Shared by every kernel source of kv-backend-cuda: fixed-width types, half-precision
// conversions written as inline PTX (so NVRTC needs no header and no include path), the
// byte layouts of stored rows (kv-quant's formats) and the pool arithmetic.
//
// This text is prepended to each .cu file by the Rust side (kernels.rs): there is no
// preprocessor inclusion, so NVRTC needs no include path.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

// No math header here: +infinity as a float, from its bits.
#define INFINITY __uint_as_float(0x7f800000u)

// Row formats (kv-quant's RowFormat), as the Rust side numbers them (plan.rs: Fmt).
#define FMT_F32 0
#define FMT_F16 1
#define FMT_BF16 2
#define FMT_INT8 3
#define FMT_INT4 4
#define FMT_INT2 5
// KIVI keys: no rows, 32-token key blocks quantized per channel (kivi.cu), f16 windows.
#define FMT_KIVI 6
// A KIVI window table entry: no window, or the window index with this bit set once the
// key block was quantized (the window then serves only the queries inside the block).
#define KIVI_NO_WINDOW 0xffffffffu
#define KIVI_QUANTIZED 0x80000000u

// Error flags a write or attend kernel raises (plan.rs: flags).
#define FLAG_K_NONFINITE 1u
#define FLAG_V_NONFINITE 2u
#define FLAG_K_RANGE 4u
#define FLAG_V_RANGE 8u
#define FLAG_Q_NONFINITE 16u

#ifndef KV_HOST_CHECK
__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f2h_rn(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#else
// The CPU tests compile the scalar helpers below with the host C compiler (kernels.rs:
// host_check); they supply h2f in plain C.
float h2f(u16 h);
#endif

// bfloat16 of a finite f32, round to nearest even (as half::bf16::from_f32).
__device__ __forceinline__ u16 f2bf_rn(float f) {
    u32 b = __float_as_uint(f);
    return (u16)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

__device__ __forceinline__ float bf2f(u16 h) { return __uint_as_float(((u32)h) << 16); }

// f16 bits of a finite double, rounded to nearest even (as half::f16::from_f64: one
// rounding from the double, no detour through f32).
__device__ u16 f64_to_f16_rn(double v) {
    unsigned long long b = (unsigned long long)__double_as_longlong(v);
    u16 sign = (u16)((b >> 48) & 0x8000u);
    int exp = (int)((b >> 52) & 0x7ff);
    unsigned long long mant = b & ((1ull << 52) - 1);
    if (exp == 0x7ff) return sign | 0x7c00u;   // not reached: callers pass finite values
    if (exp == 0) return sign;                  // f64 zero or subnormal: below every f16
    int e = exp - 1023;
    if (e > 15) return sign | 0x7c00u;          // overflows to infinity
    if (e >= -14) {
        unsigned long long m = mant >> 42;
        unsigned long long rem = mant & ((1ull << 42) - 1);
        unsigned long long half = 1ull << 41;
        if (rem > half || (rem == half && (m & 1ull))) m += 1;
        // A carry out of the mantissa moves to the next exponent (or to infinity): right.
        return (u16)(sign | (u16)((((unsigned long long)(e + 15)) << 10) + m));
    }
    if (e < -25) return sign;                   // below half the smallest subnormal
    unsigned long long sig = mant | (1ull << 52);
    int shift = 28 - e;                         // in 43..=53: units of 2^-24
    unsigned long long m = sig >> shift;
    unsigned long long rem = sig & ((1ull << shift) - 1);
    unsigned long long half = 1ull << (shift - 1);
    if (rem > half || (rem == half && (m & 1ull))) m += 1;
    return (u16)(sign | (u16)m);
}

__device__ __forceinline__ double f16_to_f64(u16 h) { return (double)h2f(h); }

__device__ __forceinline__ bool f16_is_finite(u16 h) { return (h & 0x7c00u) != 0x7c00u; }

__device__ u16 f16_next_up(u16 b) {
    if ((b & 0x7fffu) == 0) return 0x0001u;
    return (b & 0x8000u) == 0 ? (u16)(b + 1) : (u16)(b - 1);
}

__device__ u16 f16_next_down(u16 b) {
    if ((b & 0x7fffu) == 0) return 0x8001u;
    return (b & 0x8000u) == 0 ? (u16)(b - 1) : (u16)(b + 1);
}

// The smallest f16 >= v (kv-quant's f16_ceil).
__device__ u16 f16_ceil(double v) {
    u16 h = f64_to_f16_rn(v);
    return f16_to_f64(h) >= v ? h : f16_next_up(h);
}

// The largest f16 <= v (kv-quant's f16_floor).
__device__ u16 f16_floor(double v) {
    u16 h = f64_to_f16_rn(v);
    return f16_to_f64(h) <= v ? h : f16_next_down(h);
}

__device__ __forceinline__ u16 load_u16(const u8* p) { return (u16)(p[0] | (p[1] << 8)); }

__device__ __forceinline__ void store_u16(u8* p, u16 v) {
    p[0] = (u8)(v & 0xff);
    p[1] = (u8)(v >> 8);
}

// Code bits of an asymmetric format (INT4 or INT2).
__device__ __forceinline__ u32 asym_bits(int fmt) { return fmt == FMT_INT4 ? 4u : 2u; }

// Bytes of one quantization group of `g` elements.
__device__ __forceinline__ u32 group_bytes(int fmt, u32 g) {
    return fmt == FMT_INT8 ? 2u + g : 4u + g / 8u * asym_bits(fmt);
}

// Scale and minimum of asymmetric codes over values in [lo, hi] with `levels` steps, as
// kv-quant's asym_params: the f16 floor of the minimum, then the f16 ceiling of
// (hi - m) / levels, in f64 (`+ 0.0` makes a -0.0 minimum +0.0). False when either does not
// fit f16.
__device__ bool asym_params(float lo, float hi, u32 levels, u16* s, u16* m) {
    *m = f16_floor((double)lo + 0.0);
    if (!f16_is_finite(*m)) return false;
    *s = f16_ceil(((double)hi - f16_to_f64(*m)) / (double)levels + 0.0);
    return f16_is_finite(*s);
}

// Asymmetric code of `x` for stored scale `sf` and minimum `mf` (as f32), as kv-quant's
// asym_code: round half to even of (x - m) / s in f32, clamped to 0..=levels.
__device__ __forceinline__ u32 asym_code(float x, float sf, float mf, u32 levels) {
    if (sf == 0.0f) return 0;
    return (u32)fminf(fmaxf(rintf(__fdiv_rn(__fsub_rn(x, mf), sf)), 0.0f), (float)levels);
}

// Element `d` of a stored row, dequantized exactly as kv-quant defines it
// (`m + s * c`, one product and one sum in f32, no fused multiply-add).
__device__ __forceinline__ float load_elem(const u8* row, int fmt, u32 g, u32 d) {
    switch (fmt) {
    case FMT_F32: return __uint_as_float(((const u32*)row)[d]);
    case FMT_F16: return h2f(((const u16*)row)[d]);
    case FMT_BF16: return bf2f(((const u16*)row)[d]);
    case FMT_INT8: {
        const u8* grp = row + (u64)(d / g) * (2u + g);
        float s = h2f(load_u16(grp));
        signed char c = (signed char)grp[2 + d % g];
        return __fmul_rn(s, (float)c);
    }
    default: {
        // INT4 / INT2: scale, minimum, codes low bits first.
        const u32 bits = asym_bits(fmt);
        const u8* grp = row + (u64)(d / g) * group_bytes(fmt, g);
        float s = h2f(load_u16(grp));
        float m = h2f(load_u16(grp + 2));
        u32 i = d % g;
        u32 c = (grp[4 + i * bits / 8u] >> ((i * bits) % 8u)) & ((1u << bits) - 1u);
        return __fadd_rn(m, __fmul_rn(s, (float)c));
    }
    }
}

// Byte offset of the row of (`layer`, `which` 0 = K / 1 = V, `head`, `block`, `slot`) in a
// storage allocation: [layer][K, V][kv_head][block][slot][row bytes] (plan.rs: Geometry).
__device__ __forceinline__ u64 row_offset(u32 layer, u32 which, u32 head, u32 block, u32 slot,
                                          u32 kv_heads, u32 num_blocks, u32 block_size,
                                          u32 row_bytes) {
    u64 r = ((u64)layer * 2u + which) * kv_heads + head;
    r = (r * num_blocks + block) * block_size + slot;
    return r * row_bytes;
}

// The normalized Walsh-Hadamard transform of `x[0..n]` (n a power of two) by the threads
// `lane` of `lanes`, in kv-quant's order (butterflies h = 1, 2, 4, ...: (u + v, u - v),
// then one product by `scale` = 1 / sqrt(n) in f32), so results are bit-identical to
// kv_quant::hadamard_in_place. The caller synchronizes before and after; `sync` is
// __syncwarp for a warp and __syncthreads for a block.
#define HADAMARD(x, n, lane, lanes, scale, sync)                                           \
    do {                                                                                   \
        for (u32 h_ = 1; h_ < (n); h_ *= 2) {                                              \
            for (u32 p_ = (lane); p_ < (n) / 2; p_ += (lanes)) {                           \
                u32 i_ = (p_ / h_) * 2 * h_ + p_ % h_;                                     \
                float u_ = (x)[i_], v_ = (x)[i_ + h_];                                     \
                (x)[i_] = __fadd_rn(u_, v_);                                               \
                (x)[i_ + h_] = __fsub_rn(u_, v_);                                          \
            }                                                                              \
            sync;                                                                          \
        }                                                                                  \
        for (u32 p_ = (lane); p_ < (n); p_ += (lanes)) (x)[p_] = __fmul_rn((x)[p_], (scale)); \
        sync;                                                                              \
    } while (0)

// KIVI key blocks (kivi.cu has their layout), read by attend.cu too.

// Largest code of `bits`-bit KIVI codes.
__device__ __forceinline__ u32 kivi_levels(u32 bits) { return (1u << bits) - 1u; }

// Key `t`, channel `c` of a quantized block, dequantized as kv-quant does (`m + s * code`,
// one product and one sum in f32, unfused).
__device__ __forceinline__ float kivi_load(const u8* block, u32 head_dim, u32 bits, u32 t,
                                           u32 c) {
    const float s = h2f(load_u16(block + 2u * c));
    const float m = h2f(load_u16(block + 2u * head_dim + 2u * c));
    const u8 byte = block[4u * head_dim + (u64)t * (head_dim / 8u * bits) + c * bits / 8u];
    const u32 code = (byte >> ((c * bits) % 8u)) & kivi_levels(bits);
    return __fadd_rn(m, __fmul_rn(s, (float)code));
}
