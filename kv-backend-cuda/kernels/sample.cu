// Sampling with temperature, top-k and top-p where the logits are: one thread block per
// row, one token id and a status copied back (kv-model's device sampling; the host-side
// plan is sample.rs).
//
// The distribution is the host Sampler's (kv-model sampler.rs): tokens in the order
// "larger logit first, lower id on ties"; top-k keeps the first k of that order; the
// probabilities are exp((l - max) / t); top-p keeps the shortest prefix whose mass reaches
// top_p of the (top-k) total; the draw u in [0, 1) picks the first token whose inclusive
// cumulative mass exceeds u times the kept total.
//
// No sort. Each token gets a 56-bit composite key, (order key of the logit << 24) |
// (0xffffff - id), so the host's order is "larger key first" and every key is distinct.
// Each of the three cuts (the k-th token, the nucleus' last token, the drawn token) is one
// weighted radix select: 7 passes of an 8-bit digit histogram over the tokens still kept,
// weights 1 (top-k) or the token's probability mass (top-p, draw). The masses are
// integers, exp(...) in fixed point with `shift` fraction bits (the host picks shift so the
// sum of n masses stays below 2^62): integer sums do not depend on the order the threads
// add them in, so the result is the same on every run and the cuts are exact integer
// comparisons.
//
// Status per row (sample.rs: STATUS_*): 0 token, 1 a NaN or +inf logit, 2 no finite logit.

#define SAMPLE_OK 0u
#define SAMPLE_NON_FINITE 1u
#define SAMPLE_NO_FINITE 2u
#define SAMPLE_BINS 256
#define SAMPLE_ID_BITS 24
#define SAMPLE_ID_MASK 0xffffffull
// Composite keys have 32 + 24 bits: 7 digits of 8 bits.
#define SAMPLE_PASSES 7
// Order key of -FLT_MAX, the smallest finite logit: every finite token's composite key is
// at least SAMPLE_CUT_ALL; -inf's key is below it.
#define SAMPLE_KEY_NEG_INF 0x007fffffu
#define SAMPLE_CUT_ALL (0x00800000ull << SAMPLE_ID_BITS)

// An order key: a u32 whose unsigned order is the float's order (-0 below +0, as Rust's
// total_cmp orders them).
__device__ __forceinline__ u32 sample_order_key(float f) {
    u32 b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// The float of an order key.
__device__ __forceinline__ float sample_key_float(u32 k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// The composite key of token `id` (< 2^24) with logit `f`: larger = earlier in the order.
__device__ __forceinline__ u64 sample_composite(float f, u32 id) {
    return ((u64)sample_order_key(f) << SAMPLE_ID_BITS) | (SAMPLE_ID_MASK - (u64)id);
}

// The token id of a composite key.
__device__ __forceinline__ u32 sample_id(u64 key) {
    return (u32)(SAMPLE_ID_MASK - (key & SAMPLE_ID_MASK));
}

// A probability in [0, 1] in fixed point with `shift` fraction bits, rounded half up.
__device__ __forceinline__ u64 sample_fixed(double p, u32 shift) {
    return (u64)(p * (double)(1ull << shift) + 0.5);
}

// The mass of a token with logit `f` (finite, at most `max`) at temperature `t`, as the host
// computes it before normalising: exp((l - max) / t) in f64.
__device__ __forceinline__ u64 sample_mass(float f, double max, double t, u32 shift) {
    return sample_fixed(exp(((double)f - max) / t), shift);
}

// The top-p cut's target: the nucleus ends at the first token whose inclusive cumulative
// mass is >= top_p * total, i.e. > ceil(top_p * total) - 1 (masses are integers).
__device__ __forceinline__ u64 sample_top_p_target(float top_p, u64 total) {
    double need = (double)top_p * (double)total;
    u64 c = (u64)need;
    if ((double)c < need) c += 1;
    if (c == 0) c = 1;
    if (c > total) c = total;
    return c - 1;
}

// The draw's target: the first token whose inclusive cumulative mass exceeds u * total,
// i.e. floor(u * total) for integer masses; u just below 1 stays inside the total.
__device__ __forceinline__ u64 sample_draw_target(double u, u64 total) {
    double x = u * (double)total;
    u64 r = x > 0.0 ? (u64)x : 0;
    return r >= total ? total - 1 : r;
}

// One step of a radix select: in `hist` (weights per digit of the keys still in the running),
// the digit, scanning from the largest, whose bin holds the token whose inclusive cumulative
// weight first exceeds `*remaining`; `*remaining` becomes the weight still to skip inside that
// bin. Returns SAMPLE_BINS when the bins hold no more than `*remaining` in all.
__device__ u32 sample_pick_digit(const u64* hist, u64* remaining) {
    u64 acc = 0;
    for (int b = SAMPLE_BINS - 1; b >= 0; b--) {
        if (acc + hist[b] > *remaining) {
            *remaining -= acc;
            return (u32)b;
        }
        acc += hist[b];
    }
    return SAMPLE_BINS;
}

// What a block shares while it samples one row.
typedef struct SampleShared {
    u64 hist[SAMPLE_BINS];
    u64 total;
    u64 remaining;
    u64 prefix;
    u32 max_key;
    u32 bad;
    u32 found;
} SampleShared;

#ifndef KV_HOST_CHECK
#define SAMPLE_SYNC() __syncthreads()
#define SAMPLE_ADD(p, v) atomicAdd((p), (v))
#define SAMPLE_MAX(p, v) atomicMax((p), (v))
#define SAMPLE_OR(p, v) atomicOr((p), (v))
#else
// The CPU tests run a row with one "thread": the same code, sequentially (kernels.rs).
#define SAMPLE_SYNC() ((void)0)
#define SAMPLE_ADD(p, v) (*(p) += (v))
#define SAMPLE_MAX(p, v) (*(p) = *(p) > (v) ? *(p) : (v))
#define SAMPLE_OR(p, v) (*(p) |= (v))
#endif

// The weight of a token in a select or a sum: 1 for top-k (`mass` 0), its mass otherwise.
__device__ __forceinline__ u64 sample_weight(
    float f, int mass, double max, double t, u32 shift) {
    return mass ? sample_mass(f, max, t, shift) : 1ull;
}

// Sum of the weights of the tokens at or before `cut` (composite keys >= cut).
__device__ u64 sample_total(
    const float* x, u32 n, u64 cut, double max, double t, u32 shift,
    SampleShared* sh, u32 tid, u32 nth) {
    if (tid == 0) sh->total = 0;
    SAMPLE_SYNC();
    u64 mine = 0;
    for (u32 i = tid; i < n; i += nth) {
        float f = x[i];
        if (sample_composite(f, i) >= cut) mine += sample_mass(f, max, t, shift);
    }
    SAMPLE_ADD(&sh->total, mine);
    SAMPLE_SYNC();
    u64 total = sh->total;
    SAMPLE_SYNC();
    return total;
}

// The composite key of the first token (in the host order, among those at or before `cut`)
// whose inclusive cumulative weight exceeds `target`; 0 when their total is <= target.
__device__ u64 sample_select(
    const float* x, u32 n, u64 cut, u64 target, int mass, double max, double t, u32 shift,
    SampleShared* sh, u32 tid, u32 nth) {
    if (tid == 0) {
        sh->remaining = target;
        sh->prefix = 0;
        sh->found = 1;
    }
    for (int pass = SAMPLE_PASSES - 1; pass >= 0; pass--) {
        u32 low = (u32)pass * 8;
        for (u32 b = tid; b < SAMPLE_BINS; b += nth) sh->hist[b] = 0;
        SAMPLE_SYNC();
        u64 prefix = sh->prefix;
        for (u32 i = tid; i < n; i += nth) {
            float f = x[i];
            u64 key = sample_composite(f, i);
            // Keys that agree with the digits chosen so far (all above `low + 8`).
            if (key >= cut && (key >> (low + 8)) == (prefix >> (low + 8))) {
                SAMPLE_ADD(&sh->hist[(key >> low) & 0xff], sample_weight(f, mass, max, t, shift));
            }
        }
        SAMPLE_SYNC();
        if (tid == 0) {
            u64 remaining = sh->remaining;
            u32 digit = sample_pick_digit(sh->hist, &remaining);
            if (digit == SAMPLE_BINS) {
                sh->found = 0;
            } else {
                sh->remaining = remaining;
                sh->prefix = prefix | ((u64)digit << low);
            }
        }
        SAMPLE_SYNC();
        u32 found = sh->found;
        prefix = sh->prefix;
        // Every thread has read the shared result before the next select resets it.
        SAMPLE_SYNC();
        if (!found) return 0;
        if (pass == 0) return prefix;
    }
    return 0;  // not reached: pass 0 returns
}

// Samples row `x` (`n` logits, n <= 2^24) for draw `u`: writes the status and the token to
// out[0], out[1] (thread 0). `top_k` 0 means no top-k; `top_p` <= 0 means no top-p.
__device__ void sample_row(
    const float* x, u32 n, float temperature, u32 top_k, float top_p, u32 shift, double u,
    u32* out, SampleShared* sh, u32 tid, u32 nth) {
    if (tid == 0) {
        sh->max_key = 0;
        sh->bad = 0;
    }
    SAMPLE_SYNC();
    u32 max_key = 0, bad = 0;
    for (u32 i = tid; i < n; i += nth) {
        float f = x[i];
        if (f != f || f == INFINITY) bad = 1;
        u32 k = sample_order_key(f);
        if (k > max_key) max_key = k;
    }
    if (bad) SAMPLE_OR(&sh->bad, 1u);
    SAMPLE_MAX(&sh->max_key, max_key);
    SAMPLE_SYNC();
    if (sh->bad || sh->max_key <= SAMPLE_KEY_NEG_INF) {
        if (tid == 0) {
            out[0] = sh->bad ? SAMPLE_NON_FINITE : SAMPLE_NO_FINITE;
            out[1] = 0;
        }
        return;
    }
    double max = (double)sample_key_float(sh->max_key);
    double t = (double)temperature;
    u64 cut = SAMPLE_CUT_ALL;
    if (top_k > 0) {
        u64 kth = sample_select(x, n, cut, (u64)top_k - 1, 0, max, t, shift, sh, tid, nth);
        // Fewer finite tokens than k: all of them stay.
        if (kth != 0) cut = kth;
    }
    if (top_p > 0.0f) {
        u64 total = sample_total(x, n, cut, max, t, shift, sh, tid, nth);
        u64 last = sample_select(
            x, n, cut, sample_top_p_target(top_p, total), 1, max, t, shift, sh, tid, nth);
        if (last != 0) cut = last;
    }
    u64 total = sample_total(x, n, cut, max, t, shift, sh, tid, nth);
    u64 drawn = sample_select(
        x, n, cut, sample_draw_target(u, total), 1, max, t, shift, sh, tid, nth);
    if (tid == 0) {
        // The target is below the total, so a token is always found; the cut (the last kept
        // token) stands in should rounding ever say otherwise.
        out[0] = SAMPLE_OK;
        out[1] = sample_id(drawn != 0 ? drawn : cut);
    }
}

#ifndef KV_HOST_CHECK
// One block per row: rows of `n` logits `row_stride` floats apart, one draw per row,
// out[2 * row] the status and out[2 * row + 1] the token.
extern "C" __global__ void kv_sample(
    const float* logits, u32 n, u64 row_stride, float temperature, u32 top_k, float top_p,
    u32 shift, const double* draws, u32* out) {
    __shared__ SampleShared sh;
    u32 row = blockIdx.x;
    sample_row(
        logits + (u64)row * row_stride, n, temperature, top_k, top_p, shift, draws[row],
        out + 2 * (u64)row, &sh, threadIdx.x, blockDim.x);
}
#endif
