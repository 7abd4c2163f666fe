// Paged decode attention for the engine's CPU path (server/engine/native.py builds and loads it).
//
// One query token per sequence attends to its keys/values in the paged KV cache, read in place:
// no gathered copy of the cache, one pass with an online softmax per block of tokens.
// Plain C ABI over raw pointers; float32 only (the engine's CPU dtype). Built with
//   g++ -O3 -std=c++17 -fPIC -shared -fopenmp
// and no -march / -ffast-math: the hot functions are compiled for AVX-512, AVX2+FMA and the
// x86-64 baseline (target_clones), and the CPU picks at load time.
//
// Layouts: q, out [B, H, D]; k_cache [num_blocks, KVH, D, block_size] (keys transposed within a
// block: the scores of a block's tokens are whole-vector FMAs); v_cache [num_blocks, block_size,
// KVH, D]; block_tables [B, max_blocks] int64; context_lens [B] int64. The query heads of kv head
// h are h*G .. h*G+G-1 with G = H / KVH (grouped-query attention).
//
// Two implementations: AVX-512 intrinsics for block_size 16 and head_dim a multiple of 16 (the
// engine's default), and portable loops (any sizes) that the compiler vectorizes as it can.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

typedef int64_t i64;

namespace {

constexpr int kMaxHeadDim = 256;
constexpr int kMaxBlock = 256;  // tokens per block

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define QS_CLONES __attribute__((target_clones("avx512f", "avx2,fma", "default")))
#else
#define QS_CLONES
#endif

// Scratch per thread: running max, sum and output accumulator of every query head of an item.
thread_local std::vector<float> t_state;

// exp(x) for the softmax's x <= 0: 2^(x log2 e) split into 2^i (exponent bits) * 2^f (degree-6
// polynomial on [0, 1)); relative error ~2e-7. Plain arithmetic, so loops over it vectorize.
#pragma omp declare simd notinbranch
inline float exp_nonpositive(float x) {
    x = std::max(x, -87.0f);
    const float t = x * 1.44269504088896341f;
    int32_t i = (int32_t)t;       // truncates toward zero: one too high for negative non-integers
    i -= (float)i > t ? 1 : 0;    // floor
    const float f = t - (float)i;
    float p = 1.535336188319500e-4f;
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.0f;
    const uint32_t bits = (uint32_t)(i + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

// Portable version. One sequence, kv heads [h0, h1): their G query heads each against ctx
// keys/values, block by block (online softmax).
QS_CLONES
void attend_generic(const float* __restrict q, const float* __restrict k_cache, const float* __restrict v_cache,
                    const i64* __restrict table, i64 ctx, float* __restrict out, int G, i64 D, i64 BS, i64 KVH,
                    i64 h0, i64 h1, float scale) {
    const i64 nq = (h1 - h0) * G;  // query heads handled here; q/out rows start at head h0 * G
    t_state.resize((size_t)(nq * (D + 2)));
    float* m = t_state.data();
    float* l = m + nq;
    float* acc = l + nq;
    for (i64 r = 0; r < nq; ++r) {
        m[r] = -std::numeric_limits<float>::infinity();
        l[r] = 0.0f;
    }
    std::fill(acc, acc + nq * D, 0.0f);
    alignas(64) float s[kMaxBlock];
    const i64 vrow = KVH * D;  // floats between consecutive tokens of a V block
    const i64 nblocks = (ctx + BS - 1) / BS;
    for (i64 j = 0; j < nblocks; ++j) {
        const i64 n = std::min(BS, ctx - j * BS);
        for (i64 h = h0; h < h1; ++h) {
            const float* kt = k_cache + (table[j] * KVH + h) * D * BS;  // [D][BS]
            const float* vb = v_cache + table[j] * BS * vrow + h * D;
            for (int g = 0; g < G; ++g) {
                const i64 r = (h - h0) * G + g;
                const float* qg = q + r * D;
                for (i64 t = 0; t < n; ++t) s[t] = 0.0f;
                for (i64 d = 0; d < D; ++d) {
                    const float qd = qg[d] * scale;
                    const float* kd = kt + d * BS;
                    for (i64 t = 0; t < n; ++t) s[t] += qd * kd[t];
                }
                float bm = m[r];
                for (i64 t = 0; t < n; ++t) bm = std::max(bm, s[t]);
                const float corr = std::exp(m[r] - bm);  // exp(-inf) = 0 on the first block
                float psum = 0.0f;
#pragma omp simd reduction(+ : psum)
                for (i64 t = 0; t < n; ++t) {
                    s[t] = exp_nonpositive(s[t] - bm);
                    psum += s[t];
                }
                float* a = acc + r * D;
                l[r] = l[r] * corr + psum;
                for (i64 d = 0; d < D; ++d) a[d] *= corr;
                for (i64 t = 0; t < n; ++t) {
                    const float p = s[t];
                    const float* vt = vb + t * vrow;
                    for (i64 d = 0; d < D; ++d) a[d] += p * vt[d];
                }
                m[r] = bm;
            }
        }
    }
    for (i64 r = 0; r < nq; ++r) {
        const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
        for (i64 d = 0; d < D; ++d) out[r * D + d] = acc[r * D + d] * inv;
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define QS_AVX512 1
#define T512 __attribute__((target("avx512f")))

// exp of 16 values <= 0, as exp_nonpositive.
T512 inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    const __m512 fi = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, fi);
    __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(fi), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

// Block size 16 (one vector of scores per block), head_dim D = 16 * DV.
T512 void attend_avx512(const float* __restrict q, const float* __restrict k_cache, const float* __restrict v_cache,
                        const i64* __restrict table, i64 ctx, float* __restrict out, int G, i64 D, i64 KVH,
                        i64 h0, i64 h1, float scale) {
    constexpr i64 BS = 16;
    const int DV = (int)(D / 16);
    const i64 nq = (h1 - h0) * G;
    t_state.resize((size_t)(nq * (D + 2) + 16));
    float* m = t_state.data();
    float* l = m + nq;
    float* acc = l + nq;
    for (i64 r = 0; r < nq; ++r) {
        m[r] = -std::numeric_limits<float>::infinity();
        l[r] = 0.0f;
    }
    std::fill(acc, acc + nq * D, 0.0f);
    alignas(64) float p[16];
    const i64 vrow = KVH * D;
    const i64 nblocks = (ctx + BS - 1) / BS;
    for (i64 j = 0; j < nblocks; ++j) {
        const i64 n = std::min(BS, ctx - j * BS);
        const __mmask16 valid = (__mmask16)((1u << n) - 1u);
        for (i64 h = h0; h < h1; ++h) {
            const float* kt = k_cache + (table[j] * KVH + h) * D * BS;  // [D][16]
            const float* vb = v_cache + table[j] * BS * vrow + h * D;
            for (int g = 0; g < G; ++g) {
                const i64 r = (h - h0) * G + g;
                const float* qg = q + r * D;
                // scores of the 16 tokens: four independent FMA chains over d
                __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
                i64 d = 0;
                for (; d + 4 <= D; d += 4) {
                    s0 = _mm512_fmadd_ps(_mm512_set1_ps(qg[d]), _mm512_loadu_ps(kt + d * BS), s0);
                    s1 = _mm512_fmadd_ps(_mm512_set1_ps(qg[d + 1]), _mm512_loadu_ps(kt + (d + 1) * BS), s1);
                    s2 = _mm512_fmadd_ps(_mm512_set1_ps(qg[d + 2]), _mm512_loadu_ps(kt + (d + 2) * BS), s2);
                    s3 = _mm512_fmadd_ps(_mm512_set1_ps(qg[d + 3]), _mm512_loadu_ps(kt + (d + 3) * BS), s3);
                }
                for (; d < D; ++d) s0 = _mm512_fmadd_ps(_mm512_set1_ps(qg[d]), _mm512_loadu_ps(kt + d * BS), s0);
                __m512 sc = _mm512_mul_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)),
                                          _mm512_set1_ps(scale));
                const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
                sc = _mm512_mask_blend_ps(valid, ninf, sc);  // slots past the context end
                const float bm = std::max(m[r], _mm512_reduce_max_ps(sc));
                const float corr = std::exp(m[r] - bm);  // exp(-inf) = 0 on the first block
                __m512 pv = _mm512_maskz_mov_ps(valid, exp16(_mm512_sub_ps(sc, _mm512_set1_ps(bm))));
                l[r] = l[r] * corr + _mm512_reduce_add_ps(pv);
                m[r] = bm;
                _mm512_store_ps(p, pv);
                float* a = acc + r * D;
                const __m512 c = _mm512_set1_ps(corr);
                for (int dv = 0; dv < DV; ++dv) {
                    __m512 av = _mm512_mul_ps(_mm512_loadu_ps(a + 16 * dv), c);
                    for (i64 t = 0; t < n; ++t)
                        av = _mm512_fmadd_ps(_mm512_set1_ps(p[t]), _mm512_loadu_ps(vb + t * vrow + 16 * dv), av);
                    _mm512_storeu_ps(a + 16 * dv, av);
                }
            }
        }
    }
    for (i64 r = 0; r < nq; ++r) {
        const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
        for (i64 d = 0; d < D; ++d) out[r * D + d] = acc[r * D + d] * inv;
    }
}
#endif

}  // namespace

extern "C" {

int qs_abi_version() { return 4; }

// Write T new tokens' keys and values ([T, KVH, D] each, row strides k_stride / v_stride floats)
// into their cache slots (slot = block * BS + offset). Single-threaded: it is a few KB per layer.
int qs_write_kv(const float* k, i64 k_stride, const float* v, i64 v_stride, float* k_cache, float* v_cache,
                const i64* slots, i64 T, i64 KVH, i64 D, i64 BS) {
    if (T < 0 || KVH <= 0 || D <= 0 || BS <= 0) return 1;
    for (i64 t = 0; t < T; ++t) {
        const i64 blk = slots[t] / BS, off = slots[t] % BS;
        const float* kt = k + t * k_stride;
        const float* vt = v + t * v_stride;
        float* vdst = v_cache + (blk * BS + off) * KVH * D;
        for (i64 h = 0; h < KVH; ++h) {
            float* kdst = k_cache + (blk * KVH + h) * D * BS + off;  // [D][BS] of head h
            for (i64 d = 0; d < D; ++d) kdst[d * BS] = kt[h * D + d];
            std::memcpy(vdst + h * D, vt + h * D, sizeof(float) * D);
        }
    }
    return 0;
}

// Returns 0 on success, nonzero when the shapes are outside what this kernel handles.
int qs_paged_decode_attention(const float* q, const float* k_cache, const float* v_cache, const i64* block_tables,
                              const i64* context_lens, float* out, i64 B, i64 H, i64 KVH, i64 D, i64 BS,
                              i64 max_blocks, float scale, int nthreads) {
    if (B <= 0 || H <= 0 || KVH <= 0 || H % KVH || D <= 0 || D > kMaxHeadDim || BS <= 0 || BS > kMaxBlock)
        return 1;
    const int G = (int)(H / KVH);
    // Work items: whole sequences when there are enough of them, else (sequence, kv head).
    const bool split_heads = B < 2 * (i64)std::max(nthreads, 1);
    const i64 per = split_heads ? 1 : KVH;
    const i64 items = B * (KVH / per);
#if QS_AVX512
    const bool fast = BS == 16 && D % 16 == 0 && __builtin_cpu_supports("avx512f");
#else
    const bool fast = false;
#endif
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (i64 i = 0; i < items; ++i) {
        const i64 b = i / (KVH / per), h0 = (i % (KVH / per)) * per;
        const float* qb = q + (b * H + h0 * G) * D;
        float* ob = out + (b * H + h0 * G) * D;
        const i64* tb = block_tables + b * max_blocks;
#if QS_AVX512
        if (fast) {
            attend_avx512(qb, k_cache, v_cache, tb, context_lens[b], ob, G, D, KVH, h0, h0 + per, scale);
            continue;
        }
#endif
        attend_generic(qb, k_cache, v_cache, tb, context_lens[b], ob, G, D, BS, KVH, h0, h0 + per, scale);
    }
    return 0;
}

}  // extern "C"
