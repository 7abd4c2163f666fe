// Paged attention for the engine's CPU path (kernels/cpu/paged_attention.py builds and loads it).
//
// One call per layer computes the attention of every query row of the step (decode tokens and
// prefill chunks alike), reading keys/values from the paged KV cache in place. A "sequence" of
// the call is n_q query rows at positions ctx - n_q .. ctx - 1 of a sequence whose first ctx
// tokens are in the cache; row r attends to positions 0 .. ctx - n_q + r (causal). That covers
// decodes (n_q = 1), fresh prompts (n_q = ctx), chunked-prefill continuations and prefix hits.
// A layer with a sliding window W lets the row at position p see only p - W < k <= p (as
// transformers' sliding-window mask): keys before the window are neither read nor scored, so
// blocks wholly before every row's window may be freed (the table entry is then never read).
// Attention logit soft-capping (Gemma 2) replaces each score s by cap * tanh(s / cap).
// Plain C ABI over raw pointers. Queries, outputs and all arithmetic are float32; the cache holds
// keys/values as float32, bfloat16, float16, fp8 e4m3fn or fp8 e5m2 (the `cache_dtype` code,
// CacheDtype below), converted to float32 as they are loaded (exactly: every one of those values is
// a float32), so a row's result on a 16-bit cache equals its result on a float32 cache holding the
// same (rounded) values. qs_write_kv rounds float32 to the cache dtype as torch's .to() does
// (nearest, ties to even; fp8 e4m3fn saturates at +-448 as torch does). Built with
//   g++ -O3 -std=c++17 -fPIC -shared -fopenmp -ffp-contract=off
// and no -march / -ffast-math: AVX-512 code is compiled per function (target attributes) and
// chosen at run time; the portable functions are target_clones (AVX-512, AVX2+FMA, baseline).
//
// Layouts: q [T, H, D] (row / head strides given; dims dense), out [T, H, D] (row stride given);
// k_cache [num_blocks, KVH, D, block_size] (keys transposed within a block); v_cache [num_blocks,
// block_size, KVH, D]; seqs [S, 4] int64: (first row, n_q, ctx, offset of its block table in
// tables). The query heads of kv head h are h*G .. h*G+G-1 with G = H / KVH.
//
// Work items, one OpenMP region, dynamic schedule, largest items first (2 cores stay balanced):
// - decode rows (n_q = 1): (sequence, all kv heads) when there are many, else (sequence, kv
//   head); a few long decodes are also split over key ranges and merged (flash-decoding), so
//   that every thread has work. Keys in vector lanes, 32 keys a step: each K vector loaded feeds
//   the G query heads of its kv head, each query broadcast two blocks. Decoding is bound by
//   reading the cache from memory, so the point is to issue those reads early and once.
// - prefill rows: (sequence, kv head, tile of up to 32 query vectors), a query vector being one
//   (row, query head) pair of the kv head. Queries in vector lanes: a tile against 16 keys is a
//   small GEMM on registers, the softmax's max / sum over keys are vertical ops (no horizontal
//   reductions), and each K/V element loaded feeds 16-32 query vectors.
// Both keep an online softmax (running max, sum, unnormalized output) per query vector, with an
// exp of ~1 ulp (results within float32 rounding of sdpa's).
//
// Fast paths (AVX-512 intrinsics): block_size and head_dim multiples of 16. Anything else (or a
// CPU without AVX-512, or qs_set_fast(0)) takes portable loops over the same decomposition.

#include <limits>
#include <vector>

#include "common.h"

namespace {

constexpr int kMaxHeadDim = 256;
constexpr int kMaxBlock = 256;  // tokens per block
constexpr int kLanes = 16;      // query vectors per portable prefill tile (AVX-512: up to 2 x 16)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int kMaxDecodeHeads = 256;  // query heads of one decode item
constexpr int kDecodeGroups = 2;      // groups of 16 keys per decode step

thread_local std::vector<float> t_decode;  // decode scratch: scaled queries, output accumulators

int g_allow_fast = 1;  // qs_set_fast(0): portable code only (tests exercise it on AVX-512 machines)

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define QS_CLONES __attribute__((target_clones("avx512f", "avx2,fma", "default")))
#else
#define QS_CLONES
#endif

struct Args {
    const float* q;
    i64 q_row, q_head;  // strides of q (floats)
    const void* k_cache;  // elements of type `dtype`
    const void* v_cache;
    float* out;
    i64 out_row;
    const i64* seqs;
    const i64* tables;
    i64 H, KVH, D, BS;
    int G;
    float scale;
    i64 window;     // sliding window in tokens, 0: none
    float softcap;  // logit soft-capping, 0: none
    float* partial;  // split decodes: per part and query head, (m, l, acc[D])
    int dtype;       // CacheDtype of k_cache / v_cache
};

enum Kind : int32_t { kDecodeFast, kTileFast, kDecodePortable, kTilePortable };

struct Item {
    int32_t seq, h0, h1, kind, part;  // kv heads [h0, h1); part: slot in Args::partial, -1: not split
    i64 a0, a1;                       // decode: key range; tile: query vector range
    i64 cost;
};

// exp(x) for the softmax's x <= 0 (Cephes expf): x = n ln2 + r with n = round(x log2 e) and r
// reduced in two steps (ln2 = C1 + C2, n * C1 exact), so r keeps its bits even for large |x|;
// exp(r) by a degree-7 polynomial on |r| <= ln2 / 2, times 2^n from the exponent bits. ~1 ulp.
// Plain arithmetic (no libm), so loops over it vectorize.
constexpr float kLog2e = 1.44269504088896341f, kC1 = 0.693359375f, kC2 = -2.12194440e-4f;
constexpr float kE5 = 1.9875691500e-4f, kE4 = 1.3981999507e-3f, kE3 = 8.3334519073e-3f, kE2 = 4.1665795894e-2f,
                kE1 = 1.6666665459e-1f, kE0 = 5.0000001201e-1f;

#pragma omp declare simd notinbranch
inline float exp_nonpositive(float x) {
    x = std::max(x, -87.0f);
    const int32_t i = (int32_t)(x * kLog2e - 0.5f);  // truncation toward zero: round to nearest here
    const float n = (float)i;
    float r = x - n * kC1;
    r = r - n * kC2;
    float y = kE5;
    y = y * r + kE4;
    y = y * r + kE3;
    y = y * r + kE2;
    y = y * r + kE1;
    y = y * r + kE0;
    y = y * (r * r) + r + 1.0f;
    const uint32_t bits = (uint32_t)(i + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}

// ------------------------------------------------------------------------------ cache dtypes

// The cache_dtype codes of the C functions (paged_attention.py mirrors them).
enum CacheDtype : int { kF32 = 0, kBF16 = 1, kF16 = 2, kE4M3 = 3, kE5M2 = 4, kNumDtypes = 5 };

// c10's fp8e4m3fn_from_fp32_value: nearest, ties to even; beyond the largest finite (448)
// saturates to +-448 (torch 2.13), NaN -> NaN.
inline uint8_t float_to_e4m3(float f) {
    uint32_t u = f32_bits(f);
    const uint32_t sign = u & 0x80000000u;
    u ^= sign;
    uint8_t r;
    if (u >= (UINT32_C(1087) << 20)) {
        r = u > 0x7f800000u ? 0x7f : 0x7e;
    } else if (u < (UINT32_C(121) << 23)) {  // below 2^-6: subnormal, rounded by a float add
        const uint32_t denorm = UINT32_C(141) << 23;
        r = (uint8_t)(f32_bits(bits_f32(u) + bits_f32(denorm)) - denorm);
    } else {
        const uint32_t odd = (u >> 20) & 1u;
        u += ((uint32_t)(7 - 127) << 23) + 0x7ffffu + odd;
        r = (uint8_t)(u >> 20);
        if (r == 0x7f) r = 0x7e;
    }
    return (uint8_t)(r | (sign >> 24));
}

// c10's fp8e5m2_from_fp32_value: nearest, ties to even, overflow -> inf, NaN -> NaN.
inline uint8_t float_to_e5m2(float f) {
    uint32_t u = f32_bits(f);
    const uint32_t sign = u & 0x80000000u;
    u ^= sign;
    uint8_t r;
    if (u >= (UINT32_C(143) << 23)) {
        r = u > 0x7f800000u ? 0x7f : 0x7c;
    } else if (u < (UINT32_C(113) << 23)) {
        const uint32_t denorm = UINT32_C(134) << 23;
        r = (uint8_t)(f32_bits(bits_f32(u) + bits_f32(denorm)) - denorm);
    } else {
        const uint32_t odd = (u >> 21) & 1u;
        u += ((uint32_t)(15 - 127) << 23) + 0xfffffu + odd;
        r = (uint8_t)(u >> 21);
    }
    return (uint8_t)(r | (sign >> 24));
}

// fp8 -> float32 by table (256 entries each, built when the library loads).
struct Fp8Tables {
    alignas(64) float e4m3[256];
    alignas(64) float e5m2[256];
    Fp8Tables() {
        for (int b = 0; b < 256; ++b) {
            const int e = (b >> 3) & 15, m = b & 7;
            float v = (b & 0x7f) == 0x7f ? std::numeric_limits<float>::quiet_NaN()
                      : e == 0           ? std::ldexp((float)m, -9)
                                         : std::ldexp(1.0f + (float)m / 8.0f, e - 7);
            e4m3[b] = b & 0x80 ? -v : v;
            e5m2[b] = f16_to_f32((uint16_t)(b << 8));  // e5m2 is the top byte of a float16
        }
    }
};
const Fp8Tables g_fp8;

inline int dtype_bytes(int dt) { return dt == kF32 ? 4 : dt == kBF16 || dt == kF16 ? 2 : 1; }

// n elements of a cache (element offset off, stride elements apart) -> float32 dst.
void load_floats(int dt, const void* base, i64 off, i64 stride, i64 n, float* dst) {
    switch (dt) {
        case kBF16: {
            const uint16_t* s = (const uint16_t*)base + off;
            for (i64 i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i * stride]);
            break;
        }
        case kF16: {
            const uint16_t* s = (const uint16_t*)base + off;
            for (i64 i = 0; i < n; ++i) dst[i] = f16_to_f32(s[i * stride]);
            break;
        }
        case kE4M3:
        case kE5M2: {
            const uint8_t* s = (const uint8_t*)base + off;
            const float* table = dt == kE4M3 ? g_fp8.e4m3 : g_fp8.e5m2;
            for (i64 i = 0; i < n; ++i) dst[i] = table[s[i * stride]];
            break;
        }
        default: {
            const float* s = (const float*)base + off;
            for (i64 i = 0; i < n; ++i) dst[i] = s[i * stride];
        }
    }
}

// float32 -> one cache element (index i of base).
inline void store_float(int dt, void* base, i64 i, float x) {
    switch (dt) {
        case kBF16: ((uint16_t*)base)[i] = f32_to_bf16(x); break;
        case kF16: ((uint16_t*)base)[i] = f32_to_f16(x); break;
        case kE4M3: ((uint8_t*)base)[i] = float_to_e4m3(x); break;
        case kE5M2: ((uint8_t*)base)[i] = float_to_e5m2(x); break;
        default: ((float*)base)[i] = x;
    }
}

inline const float* q_ptr(const Args& a, i64 row, i64 head) { return a.q + row * a.q_row + head * a.q_head; }

// The first key position a row at position pos sees (sliding window), else 0.
inline i64 first_visible(const Args& a, i64 pos) { return a.window > 0 ? std::max<i64>(0, pos - a.window + 1) : 0; }

// cap * tanh(x / cap), tanh from exp_nonpositive: (1 - e) / (1 + e) with e = exp(-2|y|), sign of y.
// Within a few float32 ulps of cap * tanh; for small |y| the absolute error stays ~1e-7 * cap.
inline float softcap1(float x, float cap) {
    const float y = x / cap;
    const float e = exp_nonpositive(-2.0f * std::fabs(y));
    return cap * std::copysign((1.0f - e) / (1.0f + e), y);
}

// Query vector i (0 <= i < n_q * G) of kv head h: row i / G, query head h * G + i % G.
inline void vector_of(const Args& a, i64 h, i64 i, i64* row, i64* head) {
    *row = i / a.G;
    *head = h * a.G + i % a.G;
}

// ------------------------------------------------------------------------------ portable

// One decode row, kv head h: its G query heads against its visible keys [lo, ctx), block by block.
QS_CLONES
void decode_portable(const Args& a, i64 s, i64 h) {
    const i64* sq = a.seqs + 4 * s;
    const i64 row = sq[0], ctx = sq[2];
    const i64* table = a.tables + sq[3];
    const i64 D = a.D, BS = a.BS, KVH = a.KVH, G = a.G;
    std::vector<float> state((size_t)(G * (D + 2)));
    float* m = state.data();
    float* l = m + G;
    float* acc = l + G;
    for (i64 r = 0; r < G; ++r) {
        m[r] = kNegInf;
        l[r] = 0.0f;
    }
    std::fill(acc, acc + G * D, 0.0f);
    alignas(64) float s_[kMaxBlock];
    const i64 vrow = KVH * D;  // elements between consecutive tokens of a V block
    const i64 nblocks = (ctx + BS - 1) / BS;
    const i64 lo = first_visible(a, ctx - 1);
    // A cache in another dtype: each block's K and V of head h converted to float32 first.
    std::vector<float> conv(a.dtype == kF32 ? 0 : (size_t)(2 * D * BS));
    for (i64 j = lo / BS; j < nblocks; ++j) {
        const i64 n = std::min(BS, ctx - j * BS);
        const i64 t0 = std::max<i64>(0, lo - j * BS);  // keys before the window: not read
        const i64 koff = (table[j] * KVH + h) * D * BS, voff = table[j] * BS * vrow + h * D;
        const float* kt = (const float*)a.k_cache + koff;  // [D][BS]
        const float* vb = (const float*)a.v_cache + voff;  // V[t][d] = vb[t * vs + d]
        i64 vs = vrow;
        if (a.dtype != kF32) {
            load_floats(a.dtype, a.k_cache, koff, 1, D * BS, conv.data());
            for (i64 t = t0; t < n; ++t) load_floats(a.dtype, a.v_cache, voff + t * vrow, 1, D, conv.data() + D * BS + t * D);
            kt = conv.data();
            vb = conv.data() + D * BS;
            vs = D;
        }
        for (i64 g = 0; g < G; ++g) {
            const float* qg = q_ptr(a, row, h * G + g);
            for (i64 t = t0; t < n; ++t) s_[t] = 0.0f;
            for (i64 d = 0; d < D; ++d) {
                const float qd = qg[d] * a.scale;
                const float* kd = kt + d * BS;
                for (i64 t = t0; t < n; ++t) s_[t] += qd * kd[t];
            }
            if (a.softcap > 0.0f)
                for (i64 t = t0; t < n; ++t) s_[t] = softcap1(s_[t], a.softcap);
            float bm = m[g];
            for (i64 t = t0; t < n; ++t) bm = std::max(bm, s_[t]);
            const float corr = exp_nonpositive(m[g] - bm);  // m = -inf on the first block: ~0 times 0
            float psum = 0.0f;
#pragma omp simd reduction(+ : psum)
            for (i64 t = t0; t < n; ++t) {
                s_[t] = exp_nonpositive(s_[t] - bm);
                psum += s_[t];
            }
            float* o = acc + g * D;
            l[g] = l[g] * corr + psum;
            for (i64 d = 0; d < D; ++d) o[d] *= corr;
            for (i64 t = t0; t < n; ++t) {
                const float p = s_[t];
                const float* vt = vb + t * vs;
                for (i64 d = 0; d < D; ++d) o[d] += p * vt[d];
            }
            m[g] = bm;
        }
    }
    for (i64 g = 0; g < G; ++g) {
        float* dst = a.out + row * a.out_row + (h * G + g) * D;
        const float inv = 1.0f / l[g];
        for (i64 d = 0; d < D; ++d) dst[d] = acc[g * D + d] * inv;
    }
}

// Query vectors [v0, v1) (at most kLanes) of sequence s, kv head h: any block size and head dim.
QS_CLONES
void tile_portable(const Args& a, i64 s, i64 h, i64 v0, i64 v1) {
    const i64* sq = a.seqs + 4 * s;
    const i64 row0 = sq[0], nq = sq[1], ctx = sq[2];
    const i64* table = a.tables + sq[3];
    const i64 D = a.D, BS = a.BS, KVH = a.KVH, nv = v1 - v0, vrow = KVH * D;
    alignas(64) float qt[kMaxHeadDim][kLanes];  // queries transposed: lanes = query vectors
    alignas(64) float ot[kMaxHeadDim][kLanes];
    alignas(64) float sc[kLanes][kLanes];  // [key][lane]
    alignas(64) float kconv[kMaxHeadDim];  // one key's (or value's) row in float32 (16-bit / fp8 caches)
    alignas(64) float m[kLanes], l[kLanes], corr[kLanes];
    i64 pos[kLanes], lo[kLanes];
    for (i64 i = 0; i < kLanes; ++i) {
        i64 r, head;
        vector_of(a, h, v0 + std::min(i, nv - 1), &r, &head);  // spare lanes repeat the last vector
        pos[i] = ctx - nq + r;
        lo[i] = first_visible(a, pos[i]);
        const float* qv = q_ptr(a, row0 + r, head);
        for (i64 d = 0; d < D; ++d) qt[d][i] = qv[d] * a.scale;
        m[i] = kNegInf;
        l[i] = 0.0f;
    }
    for (i64 d = 0; d < D; ++d)
        for (int i = 0; i < kLanes; ++i) ot[d][i] = 0.0f;
    const i64 maxpos = pos[kLanes - 1];
    for (i64 k0 = lo[0]; k0 <= maxpos; k0 += kLanes) {  // lanes' positions ascend: lo[0] is the least
        const i64 nk = std::min<i64>(kLanes, maxpos + 1 - k0);
        for (i64 t = 0; t < nk; ++t) {
            const i64 kp = k0 + t;
            const i64 koff = (table[kp / BS] * KVH + h) * D * BS + kp % BS;
            const float* kt = (const float*)a.k_cache + koff;  // K[d] = kt[d * ks]
            i64 ks = BS;
            if (a.dtype != kF32) {  // another cache dtype: this key converted to float32 first
                load_floats(a.dtype, a.k_cache, koff, BS, D, kconv);
                kt = kconv;
                ks = 1;
            }
            float acc[kLanes] = {};
            for (i64 d = 0; d < D; ++d) {
                const float kd = kt[d * ks];
                for (int i = 0; i < kLanes; ++i) acc[i] += kd * qt[d][i];
            }
            if (a.softcap > 0.0f)
                for (int i = 0; i < kLanes; ++i) acc[i] = softcap1(acc[i], a.softcap);
            for (int i = 0; i < kLanes; ++i) sc[t][i] = kp <= pos[i] && kp >= lo[i] ? acc[i] : kNegInf;
        }
        // Lanes innermost: the loops vectorize over the query vectors.
        alignas(64) float mx[kLanes], sum[kLanes];
        for (int i = 0; i < kLanes; ++i) {
            mx[i] = m[i];
            sum[i] = 0.0f;
        }
        for (i64 t = 0; t < nk; ++t)
            for (int i = 0; i < kLanes; ++i) mx[i] = std::max(mx[i], sc[t][i]);
        for (int i = 0; i < kLanes; ++i) {
            // m = -inf on a lane's first keys: ~0 times 0; a lane whose window has not begun yet
            // (mx still -inf) keeps its zero state.
            corr[i] = mx[i] == kNegInf ? 1.0f : exp_nonpositive(m[i] - mx[i]);
            m[i] = mx[i];
        }
        for (i64 t = 0; t < nk; ++t)
            for (int i = 0; i < kLanes; ++i) {
                sc[t][i] = sc[t][i] == kNegInf ? 0.0f : exp_nonpositive(sc[t][i] - mx[i]);
                sum[i] += sc[t][i];
            }
        for (int i = 0; i < kLanes; ++i) l[i] = l[i] * corr[i] + sum[i];
        for (i64 d = 0; d < D; ++d)
            for (int i = 0; i < kLanes; ++i) ot[d][i] *= corr[i];
        for (i64 t = 0; t < nk; ++t) {
            const i64 kp = k0 + t;
            const i64 voff = (table[kp / BS] * BS + kp % BS) * vrow + h * D;
            const float* vt = (const float*)a.v_cache + voff;
            if (a.dtype != kF32) {
                load_floats(a.dtype, a.v_cache, voff, 1, D, kconv);
                vt = kconv;
            }
            for (i64 d = 0; d < D; ++d) {
                const float vd = vt[d];
                for (int i = 0; i < kLanes; ++i) ot[d][i] += vd * sc[t][i];
            }
        }
    }
    for (i64 i = 0; i < nv; ++i) {
        i64 r, head;
        vector_of(a, h, v0 + i, &r, &head);
        float* dst = a.out + (row0 + r) * a.out_row + head * D;
        const float inv = 1.0f / l[i];
        for (i64 d = 0; d < D; ++d) dst[d] = ot[d][i] * inv;
    }
}

// ------------------------------------------------------------------------------ AVX-512

#if defined(__x86_64__) && defined(__GNUC__)
#define QS_AVX512 1
#define T512 __attribute__((target("avx512f")))

// exp of 16 values <= 0, as exp_nonpositive, except that x < -87 (and -inf: masked scores) gives 0.
T512 inline __m512 exp16(__m512 x) {
    const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kC1), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kC2), r);
    __m512 y = _mm512_set1_ps(kE5);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kE4));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kE3));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kE2));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kE1));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(kE0));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_maskz_mul_ps(live, y, _mm512_castsi512_ps(e));
}

// softcap1 on 16 scores: cap * tanh(x / cap) (NaN stays NaN: masked lanes are blended out after).
T512 inline __m512 softcap16(__m512 x, float cap) {
    const __m512 one = _mm512_set1_ps(1.0f);
    const __m512 y = _mm512_div_ps(x, _mm512_set1_ps(cap));
    const __m512i sign = _mm512_and_si512(_mm512_castps_si512(y), _mm512_set1_epi32((int32_t)0x80000000u));
    const __m512 e = exp16(_mm512_mul_ps(_mm512_abs_ps(y), _mm512_set1_ps(-2.0f)));
    const __m512 t = _mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
    return _mm512_mul_ps(_mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(t), sign)), _mm512_set1_ps(cap));
}

// Cache element types of the AVX-512 kernels (templates over them): load16 reads 16 consecutive
// elements as float32 (exact conversions).
struct CF32 { using T = float; static constexpr int code = kF32; };
struct CBF16 { using T = uint16_t; static constexpr int code = kBF16; };
struct CF16 { using T = uint16_t; static constexpr int code = kF16; };
struct CE4M3 { using T = uint8_t; static constexpr int code = kE4M3; };
struct CE5M2 { using T = uint8_t; static constexpr int code = kE5M2; };

T512 inline __m512 load16(const float* p, CF32) { return _mm512_loadu_ps(p); }
T512 inline __m512 load16(const uint16_t* p, CBF16) {  // bf16 = the top half of a float32
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
T512 inline __m512 load16(const uint16_t* p, CF16) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
T512 inline __m512 load16(const uint8_t* p, CE4M3) {
    return _mm512_i32gather_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)), g_fp8.e4m3, 4);
}
T512 inline __m512 load16(const uint8_t* p, CE5M2) {
    return _mm512_i32gather_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)), g_fp8.e5m2, 4);
}

// The next decode step's K and V of one kv head (n groups of 16 keys), prefetched line by line
// during this step's FMAs: the cache streams from memory, and the out-of-order window alone
// keeps too few of its lines in flight (prefetching a whole step at once, or two steps ahead,
// or into L2 only, measured slower).
template <class E>
struct DecodePrefetch {
    const E* k[kDecodeGroups];
    const E* v[kDecodeGroups];
    int n;
};

// Decode state of one query head: running max, per-lane running sums (reduced once at the end).
struct DecodeState {
    float m;
    __m512 l;
};

// PV part of a decode step: o[g] = o[g] * corr[g] + sum_t p[g][t] V[t] over keys t0..n-1 (V[t][d] =
// vb[t * vrow + d]; p[g][t] = p[g * PS + t]). Each p broadcast feeds DVB vectors of V, each V
// vector NG queries.
template <int NG, int N, int PS, class C>
T512 inline void decode_pv(const typename C::T* vb, i64 D, i64 vrow, int t0, int n, const float* p, const float* corr,
                           float* o, bool first, const typename C::T* pfv) {
    constexpr int DVB = NG == 1 ? 8 : 16 / NG;  // output vectors per query held in registers
    for (i64 dv0 = 0; dv0 < D; dv0 += 16 * DVB) {
        const int nb = (int)std::min<i64>(DVB, (D - dv0) / 16);
        __m512 acc[NG][DVB];
        for (int g = 0; g < NG; ++g)
            for (int c = 0; c < DVB; ++c)
                if (c < nb) {
                    const __m512 prev = _mm512_load_ps(o + g * kMaxHeadDim + dv0 + 16 * c);
                    acc[g][c] = first ? _mm512_mul_ps(prev, _mm512_set1_ps(corr[g])) : prev;
                } else {
                    acc[g][c] = _mm512_setzero_ps();
                }
        const int nt = N ? N : n;
#pragma GCC unroll 4
        for (int t = N ? 0 : t0; t < nt; ++t) {  // only visible keys: other slots may hold anything
            if (pfv && dv0 == 0)
                for (i64 i = 0; i < D; i += 16) _mm_prefetch((const char*)(pfv + t * vrow + i), _MM_HINT_T0);
            __m512 pb[NG];
            for (int g = 0; g < NG; ++g) pb[g] = _mm512_set1_ps(p[g * PS + t]);
            for (int c = 0; c < DVB; ++c)
                if (c < nb) {
                    const __m512 v = load16(vb + t * vrow + dv0 + 16 * c, C{});
                    for (int g = 0; g < NG; ++g) acc[g][c] = _mm512_fmadd_ps(pb[g], v, acc[g][c]);
                }
        }
        for (int g = 0; g < NG; ++g)
            for (int c = 0; c < DVB; ++c)
                if (c < nb) _mm512_store_ps(o + g * kMaxHeadDim + dv0 + 16 * c, acc[g][c]);
    }
}

// One decode step: NG query heads of one kv head against KG groups of up to 16 keys (keys in
// lanes): group j has keys lo[j] <= t < n[j] <= 16 visible at kt[j] / vb[j]; cap > 0 soft-caps.
// K[t][d] = kt[d * BS + t]; V[t][d] = vb[t * vrow + d]; qs, o: [NG][kMaxHeadDim]. Each q
// broadcast feeds KG groups, each K vector all NG queries; the groups' pages stream in together.
template <int NG, int KG, class C>
T512 inline void decode_step(const typename C::T* const* kt, const typename C::T* const* vb, const int* lo,
                             const int* n, i64 D, i64 BS, i64 vrow, float cap, const float* qs, float* o,
                             DecodeState* st, const DecodePrefetch<typename C::T>& pf) {
    constexpr int NC = NG * KG <= 8 ? 2 : 1;  // independent FMA chains per query and group
    alignas(64) float p[NG][16 * KG];
    __m512 sc[NG][KG][NC];
    for (int g = 0; g < NG; ++g)
        for (int j = 0; j < KG; ++j)
            for (int c = 0; c < NC; ++c) sc[g][j][c] = _mm512_setzero_ps();
    for (i64 d = 0; d < D; d += NC) {
#pragma GCC unroll 2
        for (int c = 0; c < NC; ++c) {
            for (int j = 0; j < pf.n; ++j) _mm_prefetch((const char*)(pf.k[j] + (d + c) * BS), _MM_HINT_T0);
            __m512 k[KG];
            for (int j = 0; j < KG; ++j) {
                k[j] = load16(kt[j] + (d + c) * BS, C{});
                __asm__("" : "+v"(k[j]));  // one load each, not one per query
            }
#pragma GCC unroll 4
            for (int g = 0; g < NG; ++g) {
                const __m512 qb = _mm512_set1_ps(qs[g * kMaxHeadDim + d + c]);
                for (int j = 0; j < KG; ++j) sc[g][j][c] = _mm512_fmadd_ps(qb, k[j], sc[g][j][c]);
            }
        }
    }
    float corr[NG];
    const __m512 ninf = _mm512_set1_ps(kNegInf);
    bool moved = false;
    for (int g = 0; g < NG; ++g) {
        __m512 x[KG];
        __mmask16 up = 0;
        const __m512 mv = _mm512_set1_ps(st[g].m);
        for (int j = 0; j < KG; ++j) {
            x[j] = sc[g][j][0];
            for (int c = 1; c < NC; ++c) x[j] = _mm512_add_ps(x[j], sc[g][j][c]);
            if (cap > 0.0f) x[j] = softcap16(x[j], cap);
            x[j] = _mm512_mask_blend_ps((__mmask16)(((1u << n[j]) - 1u) & ~((1u << lo[j]) - 1u)), ninf, x[j]);
            up |= _mm512_cmp_ps_mask(x[j], mv, _CMP_GT_OQ);
        }
        corr[g] = 1.0f;
        if (up) {  // the max only moves when some score exceeds it: compares, no reduction, mostly
            __m512 mx = x[0];
            for (int j = 1; j < KG; ++j) mx = _mm512_max_ps(mx, x[j]);
            const float nm = _mm512_reduce_max_ps(mx);
            corr[g] = exp_nonpositive(st[g].m - nm);  // m = -inf at first: ~0, times zero state
            st[g].l = _mm512_mul_ps(st[g].l, _mm512_set1_ps(corr[g]));
            st[g].m = nm;
            moved = true;
        }
        const __m512 m = _mm512_set1_ps(st[g].m);
        for (int j = 0; j < KG; ++j) {
            const __m512 pj = exp16(_mm512_sub_ps(x[j], m));
            st[g].l = _mm512_add_ps(st[g].l, pj);
            _mm512_store_ps(p[g] + 16 * j, pj);
        }
    }
    for (int j = 0; j < KG; ++j) {
        if (n[j] == 16 && lo[j] == 0)
            decode_pv<NG, 16, 16 * KG, C>(vb[j], D, vrow, 0, 16, &p[0][16 * j], corr, o, moved && j == 0,
                                       j < pf.n ? pf.v[j] : nullptr);
        else
            decode_pv<NG, 0, 16 * KG, C>(vb[j], D, vrow, lo[j], n[j], &p[0][16 * j], corr, o, moved && j == 0,
                                      j < pf.n ? pf.v[j] : nullptr);
    }
}

template <int KG, class C>
T512 inline void decode_step_ng(int nqg, const typename C::T* const* kt, const typename C::T* const* vb, const int* lo,
                                const int* n, i64 D, i64 BS, i64 vrow, float cap, const float* qs, float* o,
                                DecodeState* st, const DecodePrefetch<typename C::T>& pf) {
    switch (nqg) {
        case 1: decode_step<1, KG, C>(kt, vb, lo, n, D, BS, vrow, cap, qs, o, st, pf); break;
        case 2: decode_step<2, KG, C>(kt, vb, lo, n, D, BS, vrow, cap, qs, o, st, pf); break;
        case 3: decode_step<3, KG, C>(kt, vb, lo, n, D, BS, vrow, cap, qs, o, st, pf); break;
        default: decode_step<4, KG, C>(kt, vb, lo, n, D, BS, vrow, cap, qs, o, st, pf); break;
    }
}

// Decode: the query heads of kv heads [h0, h1) of one row, keys [k0, k1) (k0 a multiple of 16; keys
// before the row's window, in the first group only, are masked).
// block_size and D are multiples of 16. part >= 0: unnormalized results into a.partial.
template <class C>
T512 void decode_fast(const Args& a, i64 s, i64 h0, i64 h1, i64 k0, i64 k1, int part) {
    using E = typename C::T;
    const E* k_cache = (const E*)a.k_cache;
    const E* v_cache = (const E*)a.v_cache;
    const i64* sq = a.seqs + 4 * s;
    const i64 row = sq[0], first = first_visible(a, sq[2] - 1);
    const i64* table = a.tables + sq[3];
    const i64 D = a.D, BS = a.BS, KVH = a.KVH, vrow = KVH * D, G = a.G;
    const i64 nq = (h1 - h0) * G;  // query heads h0 * G .. h1 * G - 1
    std::vector<float>& buf = t_decode;
    buf.resize((size_t)(2 * nq * kMaxHeadDim + 16));
    float* qs = (float*)(((uintptr_t)buf.data() + 63) & ~(uintptr_t)63);  // [nq][kMaxHeadDim]
    float* o = qs + nq * kMaxHeadDim;
    DecodeState st[kMaxDecodeHeads];
    for (i64 r = 0; r < nq; ++r) {
        const float* qr = q_ptr(a, row, h0 * G + r);
        for (i64 d = 0; d < D; ++d) {
            qs[r * kMaxHeadDim + d] = qr[d] * a.scale;
            o[r * kMaxHeadDim + d] = 0.0f;
        }
        st[r].m = kNegInf;
        st[r].l = _mm512_setzero_ps();
    }
    for (i64 key = k0; key < k1; key += 16 * kDecodeGroups) {
        const i64 ng = std::min<i64>(kDecodeGroups, (k1 - key + 15) / 16);
        i64 blk[kDecodeGroups], off[kDecodeGroups];
        int n[kDecodeGroups], lo[kDecodeGroups];
        for (i64 j = 0; j < ng; ++j) {
            blk[j] = table[(key + 16 * j) / BS];
            off[j] = (key + 16 * j) % BS;
            n[j] = (int)std::min<i64>(16, k1 - key - 16 * j);
            lo[j] = (int)std::max<i64>(0, first - key - 16 * j);
        }
        const i64 nkey = key + 16 * kDecodeGroups;
        const int nng = (int)std::max<i64>(0, std::min<i64>(kDecodeGroups, (k1 - nkey + 15) / 16));
        i64 nblk[kDecodeGroups], noff[kDecodeGroups];
        for (int j = 0; j < nng; ++j) {
            nblk[j] = table[(nkey + 16 * j) / BS];
            noff[j] = (nkey + 16 * j) % BS;
        }
        const DecodePrefetch<E> nopf{{}, {}, 0};
        for (i64 h = h0; h < h1; ++h) {
            const E* kt[kDecodeGroups];
            const E* vb[kDecodeGroups];
            for (i64 j = 0; j < ng; ++j) {
                kt[j] = k_cache + (blk[j] * KVH + h) * D * BS + off[j];
                vb[j] = v_cache + (blk[j] * BS + off[j]) * vrow + h * D;
            }
            DecodePrefetch<E> pf{{}, {}, nng};
            for (int j = 0; j < nng; ++j) {
                pf.k[j] = k_cache + (nblk[j] * KVH + h) * D * BS + noff[j];
                pf.v[j] = v_cache + (nblk[j] * BS + noff[j]) * vrow + h * D;
            }
            for (i64 g0 = 0; g0 < G; g0 += 4) {
                const i64 r = (h - h0) * G + g0;
                const float* qr = qs + r * kMaxHeadDim;
                float* orr = o + r * kMaxHeadDim;
                const int nqg = (int)std::min<i64>(4, G - g0);
                const float cap = a.softcap;
                const DecodePrefetch<E>& p = g0 ? nopf : pf;
                switch (ng) {
                    case 1: decode_step_ng<1, C>(nqg, kt, vb, lo, n, D, BS, vrow, cap, qr, orr, st + r, p); break;
                    case 2: decode_step_ng<2, C>(nqg, kt, vb, lo, n, D, BS, vrow, cap, qr, orr, st + r, p); break;
                    case 3: decode_step_ng<3, C>(nqg, kt, vb, lo, n, D, BS, vrow, cap, qr, orr, st + r, p); break;
                    default: decode_step_ng<4, C>(nqg, kt, vb, lo, n, D, BS, vrow, cap, qr, orr, st + r, p); break;
                }
            }
        }
    }
    for (i64 r = 0; r < nq; ++r) {
        const float l = _mm512_reduce_add_ps(st[r].l);
        const i64 head = h0 * G + r;
        const float* orr = o + r * kMaxHeadDim;
        if (part >= 0) {  // unnormalized, merged by merge_parts
            float* dst = a.partial + ((i64)part * a.H + head) * (D + 2);
            dst[0] = st[r].m;
            dst[1] = l;
            std::memcpy(dst + 2, orr, sizeof(float) * D);
        } else {
            float* dst = a.out + row * a.out_row + head * D;
            const __m512 inv = _mm512_set1_ps(1.0f / l);
            for (i64 dv = 0; dv < D; dv += 16) _mm512_storeu_ps(dst + dv, _mm512_mul_ps(_mm512_load_ps(orr + dv), inv));
        }
    }
}

// In-register transpose of a 16x16 block: r[i] lane c -> r[c] lane i.
T512 inline void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {  // per 128-bit lane L: r[i + j] holds column 4L + j of rows i..i+3
        r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
        r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
        r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
        r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    }
    for (int j = 0; j < 4; ++j) {  // 4x4 transpose of the 128-bit lanes of r[j], r[4+j], r[8+j], r[12+j]
        const __m512 x0 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x44), x1 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xEE);
        const __m512 y0 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x44),
                     y1 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xEE);
        t[j] = _mm512_shuffle_f32x4(x0, y0, 0x88);
        t[4 + j] = _mm512_shuffle_f32x4(x0, y0, 0xDD);
        t[8 + j] = _mm512_shuffle_f32x4(x1, y1, 0x88);
        t[12 + j] = _mm512_shuffle_f32x4(x1, y1, 0xDD);
    }
    for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// Keys of n <= 16 tokens (rows k + i * k_stride, [KVH][D] each) into consecutive slots of one
// block: dst = the block's K at the first slot's offset ([KVH][D][BS]), transposed 16x16 at a time.
T512 void write_keys_fast(const float* k, i64 k_stride, float* dst, i64 n, i64 KVH, i64 D, i64 BS) {
    const __mmask16 mask = (__mmask16)((1u << n) - 1u);
    for (i64 h = 0; h < KVH; ++h)
        for (i64 dc = 0; dc < D; dc += 16) {
            __m512 x[16];
            for (int i = 0; i < 16; ++i)
                x[i] = i < n ? _mm512_loadu_ps(k + i * k_stride + h * D + dc) : _mm512_setzero_ps();
            transpose16(x);
            for (int c = 0; c < 16; ++c) _mm512_mask_storeu_ps(dst + (h * D + dc + c) * BS, mask, x[c]);
        }
}

// Prefill tile: query vectors [v0, v1) (at most 16 * LG) of sequence s, kv head h, in the lanes
// of LG vectors. block_size and D are multiples of 16. Scores: passes of KP keys x LG vectors of
// lanes (16 accumulators: each K element broadcast feeds LG FMAs); outputs: chunks of DP dims x
// LG vectors (each V element broadcast feeds LG FMAs). LG = 2 needs ~40% fewer loads per FMA.
template <int LG, class C>
T512 void tile_fast(const Args& a, i64 s, i64 h, i64 v0, i64 v1) {
    using E = typename C::T;
    constexpr bool kConvert = C::code != kF32;
    const E* k_cache = (const E*)a.k_cache;
    const E* v_cache = (const E*)a.v_cache;
    constexpr int W = 16 * LG, KP = 16 / LG, DP = 16 / LG;
    const i64* sq = a.seqs + 4 * s;
    const i64 row0 = sq[0], nq = sq[1], ctx = sq[2];
    const i64* table = a.tables + sq[3];
    const i64 D = a.D, BS = a.BS, KVH = a.KVH, nv = v1 - v0, vrow = KVH * D;
    alignas(64) float qt[kMaxHeadDim * W];  // [d][lane], scaled queries
    alignas(64) float ot[kMaxHeadDim * W];  // [d][lane], unnormalized outputs
    alignas(64) float pt[16 * W];           // [key][lane], scores then probabilities
    // 16 keys' K ([d][16]) and V ([16][D]) in float32 when the cache holds another dtype
    alignas(64) float kconv[kConvert ? kMaxHeadDim * 16 : 16];
    alignas(64) float vconv[kConvert ? 16 * kMaxHeadDim : 16];
    alignas(64) int32_t pos[W], lo[W];
    const float* qrow[W];
    for (int i = 0; i < W; ++i) {
        i64 r, head;
        vector_of(a, h, v0 + std::min<i64>(i, nv - 1), &r, &head);  // spare lanes repeat the last vector
        pos[i] = (int32_t)(ctx - nq + r);
        lo[i] = (int32_t)first_visible(a, ctx - nq + r);
        qrow[i] = q_ptr(a, row0 + r, head);
    }
    const __m512 sv = _mm512_set1_ps(a.scale);
    for (int g = 0; g < LG; ++g)
        for (i64 dc = 0; dc < D; dc += 16) {
            __m512 x[16];
            for (int i = 0; i < 16; ++i) x[i] = _mm512_mul_ps(_mm512_loadu_ps(qrow[16 * g + i] + dc), sv);
            transpose16(x);
            for (int c = 0; c < 16; ++c) _mm512_store_ps(qt + (dc + c) * W + 16 * g, x[c]);
        }
    for (i64 i = 0; i < D * W; i += 16) _mm512_store_ps(ot + i, _mm512_setzero_ps());
    const i64 maxpos = pos[W - 1];
    const __m512 ninf = _mm512_set1_ps(kNegInf);
    __m512 m[LG], l[LG];
    for (int g = 0; g < LG; ++g) {
        m[g] = ninf;
        l[g] = _mm512_setzero_ps();
    }
    // Lanes' positions ascend: the first key any lane sees is lo[0]; groups of 16 stay in one block.
    for (i64 key = lo[0] / 16 * 16; key <= maxpos; key += 16) {
        const i64 blk = table[key / BS], off = key % BS;
        const E* kc = k_cache + (blk * KVH + h) * D * BS + off;  // K[t][d] = kc[d * BS + t]
        const E* vc = v_cache + (blk * BS + off) * vrow + h * D;  // V[t][d] = vc[t * vrow + d]
        // As float32: K[t][d] = kt[d * ks + t], V[t][d] = vb[t * vs + d]. Another cache dtype: these
        // 16 keys' K and V converted once into kconv / vconv, then read as a float32 cache.
        const float* kt = (const float*)kc;
        const float* vb = (const float*)vc;
        i64 ks = BS, vs = vrow;
        if constexpr (kConvert) {
            for (i64 d = 0; d < D; ++d) _mm512_store_ps(kconv + d * 16, load16(kc + d * BS, C{}));
            for (int t = 0; t < 16; ++t)
                for (i64 dc = 0; dc < D; dc += 16) _mm512_store_ps(vconv + t * D + dc, load16(vc + t * vrow + dc, C{}));
            kt = kconv;
            vb = vconv;
            ks = 16;
            vs = D;
        }
        // The next 16 keys' K and V lines are prefetched during these FMAs (measured ~6% faster).
        const i64 nkey = key + 16 <= maxpos ? key + 16 : key, nblk = table[nkey / BS], noff = nkey % BS;
        const E* nkt = k_cache + (nblk * KVH + h) * D * BS + noff;
        const E* nvb = v_cache + (nblk * BS + noff) * vrow + h * D;
        for (int k0 = 0; k0 < 16; k0 += KP) {
            __m512 acc[KP][LG];
            for (int t = 0; t < KP; ++t)
                for (int g = 0; g < LG; ++g) acc[t][g] = _mm512_setzero_ps();
            for (i64 d = 0; d < D; ++d) {
                __m512 qd[LG];
                for (int g = 0; g < LG; ++g) qd[g] = _mm512_load_ps(qt + d * W + 16 * g);
                const float* kd = kt + d * ks + k0;
                if (k0 == 0) _mm_prefetch((const char*)(nkt + d * BS), _MM_HINT_T0);
#pragma GCC unroll 16
                for (int t = 0; t < KP; ++t) {
                    const __m512 kb = _mm512_set1_ps(kd[t]);
                    for (int g = 0; g < LG; ++g) acc[t][g] = _mm512_fmadd_ps(kb, qd[g], acc[t][g]);
                }
            }
            for (int t = 0; t < KP; ++t)
                for (int g = 0; g < LG; ++g) _mm512_store_ps(pt + (k0 + t) * W + 16 * g, acc[t][g]);
        }
        __m512 corr[LG];
        for (int g = 0; g < LG; ++g) {
            const bool diag = key + 15 > pos[16 * g];  // causal mask near the diagonal (and past the end)
            const bool low = key < lo[16 * g + 15];    // some lane's window starts after this key
            const __m512i posv = _mm512_load_si512(pos + 16 * g), lov = _mm512_load_si512(lo + 16 * g);
            __m512 x[16];
            for (int t = 0; t < 16; ++t) {
                x[t] = _mm512_load_ps(pt + t * W + 16 * g);
                if (a.softcap > 0.0f) x[t] = softcap16(x[t], a.softcap);
                if (diag || low) {
                    const __m512i kv = _mm512_set1_epi32((int32_t)(key + t));
                    const __mmask16 seen = _mm512_cmp_epi32_mask(kv, posv, _MM_CMPINT_LE) &
                                           _mm512_cmp_epi32_mask(kv, lov, _MM_CMPINT_NLT);
                    x[t] = _mm512_mask_blend_ps(seen, ninf, x[t]);
                }
            }
            __m512 mx[8];
            for (int t = 0; t < 8; ++t) mx[t] = _mm512_max_ps(x[t], x[t + 8]);
            for (int w = 4; w >= 1; w /= 2)
                for (int t = 0; t < w; ++t) mx[t] = _mm512_max_ps(mx[t], mx[t + w]);
            const __m512 mnew = _mm512_max_ps(m[g], mx[0]);
            // m = -inf at first: 0 (and a lane whose window has not begun: exp16(NaN) = 0, state stays 0)
            corr[g] = exp16(_mm512_sub_ps(m[g], mnew));
            m[g] = mnew;
            __m512 ps[8];
            for (int t = 0; t < 16; ++t) {
                const __m512 pv = exp16(_mm512_sub_ps(x[t], mnew));
                _mm512_store_ps(pt + t * W + 16 * g, pv);
                ps[t & 7] = t < 8 ? pv : _mm512_add_ps(ps[t & 7], pv);
            }
            for (int w = 4; w >= 1; w /= 2)
                for (int t = 0; t < w; ++t) ps[t] = _mm512_add_ps(ps[t], ps[t + w]);
            l[g] = _mm512_fmadd_ps(l[g], corr[g], ps[0]);
        }
        // Keys past the tile's last position are masked (p = 0) but their slots may hold anything.
        const int nk = (int)std::min<i64>(16, maxpos + 1 - key);
        for (i64 dc = 0; dc < D; dc += DP) {
            __m512 acc[DP][LG];
            for (int k = 0; k < DP; ++k)
                for (int g = 0; g < LG; ++g) acc[k][g] = _mm512_mul_ps(_mm512_load_ps(ot + (dc + k) * W + 16 * g), corr[g]);
            for (int t = 0; t < nk; ++t) {
                __m512 pv[LG];
                for (int g = 0; g < LG; ++g) pv[g] = _mm512_load_ps(pt + t * W + 16 * g);
                const float* vr = vb + t * vs + dc;
                if (dc % 16 == 0) _mm_prefetch((const char*)(nvb + t * vrow + dc), _MM_HINT_T0);
#pragma GCC unroll 16
                for (int k = 0; k < DP; ++k) {
                    const __m512 vk = _mm512_set1_ps(vr[k]);
                    for (int g = 0; g < LG; ++g) acc[k][g] = _mm512_fmadd_ps(vk, pv[g], acc[k][g]);
                }
            }
            for (int k = 0; k < DP; ++k)
                for (int g = 0; g < LG; ++g) _mm512_store_ps(ot + (dc + k) * W + 16 * g, acc[k][g]);
        }
    }
    for (int g = 0; g < LG; ++g) {
        if (16 * g >= nv) break;
        const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), l[g]);
        float* orow[16];
        for (i64 i = 0; i < 16 && 16 * g + i < nv; ++i) {
            i64 r, head;
            vector_of(a, h, v0 + 16 * g + i, &r, &head);
            orow[i] = a.out + (row0 + r) * a.out_row + head * D;
        }
        for (i64 dc = 0; dc < D; dc += 16) {
            __m512 x[16];
            for (int c = 0; c < 16; ++c) x[c] = _mm512_mul_ps(_mm512_load_ps(ot + (dc + c) * W + 16 * g), inv);
            transpose16(x);
            for (i64 i = 0; i < 16 && 16 * g + i < nv; ++i) _mm512_storeu_ps(orow[i] + dc, x[i]);
        }
    }
}
#endif

#if QS_AVX512
// One AVX-512 work item on a cache of element type C.
template <class C>
T512 void run_fast(const Args& a, const Item& it) {
    if (it.kind == kDecodeFast)
        decode_fast<C>(a, it.seq, it.h0, it.h1, it.a0, it.a1, it.part);
    else if (it.a1 - it.a0 > 16)
        tile_fast<2, C>(a, it.seq, it.h0, it.a0, it.a1);
    else
        tile_fast<1, C>(a, it.seq, it.h0, it.a0, it.a1);
}

void run_fast_dtype(const Args& a, const Item& it) {
    switch (a.dtype) {
        case kBF16: run_fast<CBF16>(a, it); break;
        case kF16: run_fast<CF16>(a, it); break;
        case kE4M3: run_fast<CE4M3>(a, it); break;
        case kE5M2: run_fast<CE5M2>(a, it); break;
        default: run_fast<CF32>(a, it); break;
    }
}
#endif

// Split decodes: combine the parts' (max, sum, unnormalized output) of every query head.
void merge_parts(const Args& a, i64 s, int first_part, int nparts) {
    const i64 D = a.D, row = a.seqs[4 * s];
    for (i64 head = 0; head < a.H; ++head) {
        float mx = kNegInf;
        for (int p = 0; p < nparts; ++p) mx = std::max(mx, a.partial[((i64)(first_part + p) * a.H + head) * (D + 2)]);
        float l = 0.0f;
        float* dst = a.out + row * a.out_row + head * D;
        std::fill(dst, dst + D, 0.0f);
        for (int p = 0; p < nparts; ++p) {
            const float* src = a.partial + ((i64)(first_part + p) * a.H + head) * (D + 2);
            const float w = std::exp(src[0] - mx);
            l += src[1] * w;
            for (i64 d = 0; d < D; ++d) dst[d] += src[2 + d] * w;
        }
        const float inv = 1.0f / l;
        for (i64 d = 0; d < D; ++d) dst[d] *= inv;
    }
}

}  // namespace

extern "C" {

int qs_abi_version() { return 7; }

// 0: portable code only; 1 (default): AVX-512 code where the CPU has it. Returns the previous value.
int qs_set_fast(int allow) {
    const int prev = g_allow_fast;
    g_allow_fast = allow;
    return prev;
}

// Whether a call with this block size / head dim takes the AVX-512 kernels.
int qs_fast_path(i64 D, i64 BS) {
#if QS_AVX512
    return g_allow_fast && BS % 16 == 0 && D % 16 == 0 && __builtin_cpu_supports("avx512f");
#else
    (void)D;
    (void)BS;
    return 0;
#endif
}

// Write T new tokens' keys and values ([T, KVH, D] each, float32, row strides k_stride / v_stride
// floats) into their cache slots (slot = block * BS + offset), rounded to the cache's dtype
// (cache_dtype, as qs_paged_attention). Single-threaded: a few hundred KB at most.
int qs_write_kv(const float* k, i64 k_stride, const float* v, i64 v_stride, void* k_cache_, void* v_cache_,
                const i64* slots, i64 T, i64 KVH, i64 D, i64 BS, int cache_dtype) {
    if (T < 0 || KVH <= 0 || D <= 0 || BS <= 0 || cache_dtype < 0 || cache_dtype >= kNumDtypes) return 1;
    if (cache_dtype != kF32) {
        for (i64 t = 0; t < T; ++t) {
            const i64 blk = slots[t] / BS, off = slots[t] % BS;
            const float* kt = k + t * k_stride;
            const float* vt = v + t * v_stride;
            for (i64 h = 0; h < KVH; ++h) {
                const i64 kbase = (blk * KVH + h) * D * BS + off, vbase = ((blk * BS + off) * KVH + h) * D;
                for (i64 d = 0; d < D; ++d) {
                    store_float(cache_dtype, k_cache_, kbase + d * BS, kt[h * D + d]);
                    store_float(cache_dtype, v_cache_, vbase + d, vt[h * D + d]);
                }
            }
        }
        return 0;
    }
    float* k_cache = (float*)k_cache_;
    float* v_cache = (float*)v_cache_;
#if QS_AVX512
    const bool fast = qs_fast_path(D, BS) != 0;
#endif
    for (i64 t = 0; t < T;) {
        const i64 blk = slots[t] / BS, off = slots[t] % BS;
        // A run of tokens in consecutive slots of one block (a prompt fills whole blocks).
        i64 n = 1;
        while (t + n < T && off + n < BS && slots[t + n] == slots[t] + n) ++n;
#if QS_AVX512
        if (fast && n >= 4) {
            n = std::min<i64>(n, 16);
            write_keys_fast(k + t * k_stride, k_stride, k_cache + blk * KVH * D * BS + off, n, KVH, D, BS);
        } else
#endif
        {
            for (i64 i = 0; i < n; ++i) {
                const float* kt = k + (t + i) * k_stride;
                for (i64 h = 0; h < KVH; ++h) {
                    float* kdst = k_cache + (blk * KVH + h) * D * BS + off + i;  // [D][BS] of head h
                    for (i64 d = 0; d < D; ++d) kdst[d * BS] = kt[h * D + d];
                }
            }
        }
        for (i64 i = 0; i < n; ++i)
            for (i64 h = 0; h < KVH; ++h)
                std::memcpy(v_cache + ((blk * BS + off + i) * KVH + h) * D, v + (t + i) * v_stride + h * D,
                            sizeof(float) * D);
        t += n;
    }
    return 0;
}

// Attention of every query row of a step (see the top of the file). q [T, H, D] with strides
// (q_row, q_head, 1); out [T, H, D] with row stride out_row (heads dense); the caches' elements
// are of type cache_dtype (CacheDtype: 0 float32, 1 bfloat16, 2 float16, 3 fp8 e4m3fn, 4 fp8 e5m2). seqs [S, 4] int64:
// (first row, n_q, ctx, offset in tables). window: sliding window in tokens (0: none); softcap:
// logit soft-capping (0: none). Returns 0 on success, nonzero when the arguments are outside
// what this kernel handles (nothing written then).
int qs_paged_attention(const float* q, i64 q_row, i64 q_head, const void* k_cache, const void* v_cache,
                       float* out, i64 out_row, const i64* seqs, i64 S, const i64* tables, i64 H, i64 KVH, i64 D,
                       i64 BS, float scale, i64 window, float softcap, int nthreads, int cache_dtype) {
    if (S < 0 || H <= 0 || KVH <= 0 || H % KVH || D <= 0 || D > kMaxHeadDim || BS <= 0 || BS > kMaxBlock ||
        window < 0 || !(softcap >= 0.0f) || std::isinf(softcap) || cache_dtype < 0 || cache_dtype >= kNumDtypes)
        return 1;
    for (i64 s = 0; s < S; ++s) {
        const i64 nq = seqs[4 * s + 1], ctx = seqs[4 * s + 2];
        if (nq < 1 || ctx < nq || ctx > (i64)INT32_MAX) return 1;
    }
    nthreads = std::max(nthreads, 1);
    const int G = (int)(H / KVH);
    const bool fast = qs_fast_path(D, BS) != 0;
    std::vector<Item> items;
    std::vector<i64> decodes;
    for (i64 s = 0; s < S; ++s) {
        const i64 nq = seqs[4 * s + 1], ctx = seqs[4 * s + 2];
        if (nq == 1) {
            decodes.push_back(s);
            continue;
        }
        const i64 tile = fast ? 2 * kLanes : kLanes;  // the AVX-512 tiles take up to 32 query vectors
        for (i64 h = 0; h < KVH; ++h)
            for (i64 v0 = 0; v0 < nq * G; v0 += tile) {
                const i64 v1 = std::min(nq * G, v0 + tile);
                i64 keys = ctx - nq + (v1 - 1) / G + 1;
                if (window > 0) keys = std::min(keys, window + (v1 - v0) / G + 1);
                items.push_back({(int32_t)s, (int32_t)h, (int32_t)h + 1, fast ? kTileFast : kTilePortable, -1, v0, v1,
                                 keys * (v1 - v0 > kLanes ? 2 * kLanes : kLanes)});
            }
    }
    // Decodes: whole rows (all kv heads: each K/V block read as one contiguous range) when there
    // are enough of them, else one item per kv head; if the threads would still lack items, each
    // decode's keys are split into parts (at least 64 keys each), merged at the end.
    const i64 target = 4 * (i64)nthreads;
    const bool fast_decode = fast && G <= kMaxDecodeHeads;
    const i64 per = fast_decode && (i64)decodes.size() >= target && H <= kMaxDecodeHeads ? KVH : 1;
    const i64 total = (i64)items.size() + (i64)decodes.size() * (KVH / per);
    i64 want = 1;
    if (fast_decode && total < target) want = (target + total - 1) / total;
    std::vector<i64> split;  // per split decode: s, first part, parts
    int nparts = 0;
    for (i64 s : decodes) {
        // Groups of 16 keys from the one holding the first visible key (window) to the end.
        const i64 ctx = seqs[4 * s + 2], g0 = (window > 0 ? std::max<i64>(0, ctx - window) : 0) / 16;
        const i64 groups = (ctx + 15) / 16 - g0;
        const i64 parts = std::max<i64>(1, std::min(want, groups / 4));
        if (parts > 1) split.insert(split.end(), {s, nparts, parts});
        for (i64 h = 0; h < KVH; h += per)
            for (i64 p = 0; p < parts; ++p) {
                const i64 k0 = (g0 + groups * p / parts) * 16, k1 = std::min(ctx, (g0 + groups * (p + 1) / parts) * 16);
                items.push_back({(int32_t)s, (int32_t)h, (int32_t)(h + per), fast_decode ? kDecodeFast : kDecodePortable,
                                 parts > 1 ? nparts + (int32_t)p : -1, k0, k1, (k1 - k0) * per * std::max(G, 8)});
            }
        if (parts > 1) nparts += (int)parts;
    }
    std::vector<float> partial((size_t)nparts * H * (D + 2));
    std::stable_sort(items.begin(), items.end(), [](const Item& x, const Item& y) { return x.cost > y.cost; });
    Args a{q, q_row, q_head, k_cache, v_cache, out, out_row, seqs, tables, H, KVH, D, BS, G, scale, window, softcap,
           partial.data(), cache_dtype};
    const i64 n = (i64)items.size();
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(dynamic, 1)
        for (i64 i = 0; i < n; ++i) {
            const Item& it = items[i];
            switch (it.kind) {
#if QS_AVX512
                case kDecodeFast:
                case kTileFast: run_fast_dtype(a, it); break;
#endif
                case kDecodePortable: decode_portable(a, it.seq, it.h0); break;
                default: tile_portable(a, it.seq, it.h0, it.a0, it.a1); break;
            }
        }
#pragma omp for schedule(static)
        for (i64 k = 0; k < (i64)split.size(); k += 3) merge_parts(a, split[k], (int)split[k + 1], (int)split[k + 2]);
    }
    return 0;
}

}  // extern "C"
