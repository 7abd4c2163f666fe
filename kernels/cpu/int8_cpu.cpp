// Native CPU kernels for LLM.int8 (bitsandbytes' 8-bit format), used by quant/backends/cpu_int8.py.
//
// Plain C ABI over raw pointers, built on first use by kernels/cpu/int8.py with the flags of
// kernels/cpu/build.py (-O3 -std=c++17 -fPIC -shared -fopenmp; no -march, no -ffast-math; ISO C++17
// keeps GCC from contracting a * b + c into an FMA). Instruction sets beyond x86-64 live in
// per-function target attributes, chosen at run time: AVX-512 VNNI, AVX2 (+F16C), portable scalar.
//
// The format and the arithmetic are those of quant/ops.py (and bitsandbytes 0.50):
//  - a row's scale is max|a| over the row (NaN propagates), outliers (|a| >= threshold, compared in
//    the values' dtype) left out; q = round_half_even(a * ((1 / scale) * 127)) as int8 (NaN / inf -> 0,
//    as torch's conversion on x86); the outlier columns are zero in every row.
//  - i8_gemm quantizes the activations through float16 (as bitsandbytes), sums int8 x int8 in int32
//    exactly, and writes dtype(float(acc) * (SCA[m] * SCB[n]) * 6.200124e-05 + bias[n]). The outlier
//    columns' 16-bit product is added by the caller (torch's addmm, the same call bitsandbytes makes).
//
// dtype codes: 0 float32, 1 float16, 2 bfloat16. Entry points return 0 when they did the work and
// nonzero when they do not handle the case (the caller then uses the PyTorch reference).

#include <cstdlib>
#include <limits>

#include "common.h"

#if (defined(__x86_64__) || defined(_M_X64)) && !defined(I8_NO_X86)
#define I8_X86 1
#define TVNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#define T256 __attribute__((target("avx2,fma,f16c")))
#else
#define I8_X86 0
#endif

namespace {

enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_VNNI = 2 };

const float kMmDequantScale = 6.200124e-05f;  // bitsandbytes' CPU constant for 1 / 127^2

int detect_isa() {
#if I8_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vnni"))
        return ISA_VNNI;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return ISA_AVX2;
#endif
    return ISA_SCALAR;
}

const int g_detected_isa = detect_isa();
int g_isa_cap = 99;  // i8_set_isa_cap lowers it (tests exercise every code path)

inline int isa() { return std::min(g_detected_isa, g_isa_cap); }

// The value as the dtype `dt` holds it (torch compares a tensor with a Python number in the
// tensor's dtype: the threshold is rounded to it first).
inline float round_to(float v, int dt) {
    if (dt == DT_F16) return f16_to_f32(f32_to_f16(v));
    if (dt == DT_BF16) return bf16_to_f32(f32_to_bf16(v));
    return v;
}
// torch's float -> int8 of an already rounded value on x86: in range exact; NaN, +-inf and values
// beyond int32 become INT32_MIN, whose low byte is 0.
inline int8_t to_i8(float r) {
    if (!(std::fabs(r) < 2147483648.0f)) return 0;
    return (int8_t)(uint8_t)(uint32_t)(int32_t)r;
}

// ------------------------------------------------------------------------------------------------
// Row quantization. A row of K values (dtype dt), read through float16 when f16 is set (the GEMM's
// activations); thr > 0 marks outliers (in `mask`, relaxed stores: rows may run on several threads).
// ------------------------------------------------------------------------------------------------

struct RowSpec {
    const void* A;
    int dt;
    i64 K;
    bool f16;        // round each value to float16 first
    float thr;       // outlier threshold in the compared dtype; <= 0: none
    bool thr_on;
    uint8_t zero;    // the stored code of 0: 0x00 (int8), 0x80 (the VNNI kernel's uint8 = int8 + 128)
};

inline void mark(uint8_t* mask, i64 k) { __atomic_store_n(mask + k, (uint8_t)1, __ATOMIC_RELAXED); }

float row_scale_scalar(const RowSpec& s, i64 row, uint8_t* mask) {
    float m = 0.0f;
    bool nan = false;
    for (i64 k = 0; k < s.K; ++k) {
        float h = load_any(s.A, s.dt, row * s.K + k);
        if (s.f16) h = f16_to_f32(f32_to_f16(h));
        float a = std::fabs(h);
        if (s.thr_on && a >= s.thr) {
            mark(mask, k);
            continue;  // an outlier counts as 0
        }
        nan |= (a != a);
        m = a > m ? a : m;
    }
    return nan ? std::numeric_limits<float>::quiet_NaN() : m;
}

// 127 / scale as torch computes `127.0 / tensor`: the reciprocal, then times 127 (two roundings).
inline float inv_scale(float scale) { return (1.0f / scale) * 127.0f; }

void row_quant_scalar(const RowSpec& s, i64 row, float scale, uint8_t* q) {
    const float r = inv_scale(scale);
    for (i64 k = 0; k < s.K; ++k) {
        float h = load_any(s.A, s.dt, row * s.K + k);
        if (s.f16) h = f16_to_f32(f32_to_f16(h));
        q[k] = (uint8_t)to_i8(std::nearbyint(h * r)) ^ s.zero;
    }
}

#if I8_X86
TVNNI inline __m512 load16_512(const RowSpec& s, i64 i, __mmask16 m) {
    __m512 v;
    if (s.dt == DT_F32) {
        v = _mm512_maskz_loadu_ps(m, static_cast<const float*>(s.A) + i);
    } else {
        __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(s.A) + i);
        if (s.dt == DT_F16) return _mm512_cvtph_ps(h);
        v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    if (s.f16) v = _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    return v;
}

TVNNI float row_scale_512(const RowSpec& s, i64 row, uint8_t* mask) {
    __m512 mx = _mm512_setzero_ps();
    const __m512 thr = _mm512_set1_ps(s.thr);
    __mmask16 nan = 0;
    for (i64 k = 0; k < s.K; k += 16) {
        const __mmask16 m = tail16(s.K - k);
        __m512 a = _mm512_abs_ps(load16_512(s, row * s.K + k, m));
        if (s.thr_on) {
            __mmask16 o = _mm512_mask_cmp_ps_mask(m, a, thr, _CMP_GE_OQ);
            if (o) {
                for (int b = 0; b < 16; ++b)
                    if (o >> b & 1) mark(mask, k + b);
                a = _mm512_maskz_mov_ps((__mmask16)~o, a);
            }
        }
        nan |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
        mx = _mm512_max_ps(mx, a);
    }
    return nan ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(mx);
}

TVNNI void row_quant_512(const RowSpec& s, i64 row, float scale, uint8_t* q) {
    const __m512 r = _mm512_set1_ps(inv_scale(scale));
    const __m128i zero = _mm_set1_epi8((char)s.zero);
    for (i64 k = 0; k < s.K; k += 16) {
        const __mmask16 m = tail16(s.K - k);
        __m512 v = _mm512_roundscale_ps(_mm512_mul_ps(load16_512(s, row * s.K + k, m), r),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        // cvtt: NaN / inf -> INT32_MIN; vpmovdb truncates to its low byte, 0 (torch's result).
        __m128i b = _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(v));
        _mm_mask_storeu_epi8(q + k, m, _mm_xor_si128(b, zero));
    }
}

T256 inline __m256 load8_256(const RowSpec& s, i64 i) {
    __m256 v;
    if (s.dt == DT_F32) {
        v = _mm256_loadu_ps(static_cast<const float*>(s.A) + i);
    } else {
        __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(s.A) + i));
        if (s.dt == DT_F16) return _mm256_cvtph_ps(h);
        v = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    if (s.f16) v = _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    return v;
}

T256 float row_scale_256(const RowSpec& s, i64 row, uint8_t* mask) {
    const i64 K8 = s.K / 8 * 8;
    const __m256 sign = _mm256_set1_ps(-0.0f), thr = _mm256_set1_ps(s.thr);
    __m256 mx = _mm256_setzero_ps();
    int nan = 0;
    for (i64 k = 0; k < K8; k += 8) {
        __m256 a = _mm256_andnot_ps(sign, load8_256(s, row * s.K + k));
        if (s.thr_on) {
            __m256 o = _mm256_cmp_ps(a, thr, _CMP_GE_OQ);
            int bits = _mm256_movemask_ps(o);
            if (bits) {
                for (int b = 0; b < 8; ++b)
                    if (bits >> b & 1) mark(mask, k + b);
                a = _mm256_andnot_ps(o, a);
            }
        }
        nan |= _mm256_movemask_ps(_mm256_cmp_ps(a, a, _CMP_UNORD_Q));
        mx = _mm256_max_ps(mx, a);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, mx);
    float m = 0.0f;
    for (float v : lanes) m = v > m ? v : m;
    for (i64 k = K8; k < s.K; ++k) {
        float h = load_any(s.A, s.dt, row * s.K + k);
        if (s.f16) h = f16_to_f32(f32_to_f16(h));
        float a = std::fabs(h);
        if (s.thr_on && a >= s.thr) {
            mark(mask, k);
            continue;
        }
        nan |= (a != a);
        m = a > m ? a : m;
    }
    return nan ? std::numeric_limits<float>::quiet_NaN() : m;
}

T256 void row_quant_256(const RowSpec& s, i64 row, float scale, uint8_t* q) {
    const float rs = inv_scale(scale);
    const __m256 r = _mm256_set1_ps(rs);
    const i64 K8 = s.K / 8 * 8;
    for (i64 k = 0; k < K8; k += 8) {
        __m256 v = _mm256_round_ps(_mm256_mul_ps(load8_256(s, row * s.K + k), r),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m256i i = _mm256_cvttps_epi32(v);  // NaN / inf -> INT32_MIN
        alignas(32) int32_t w[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(w), i);
        for (int j = 0; j < 8; ++j) q[k + j] = (uint8_t)w[j] ^ s.zero;  // the low byte
    }
    for (i64 k = K8; k < s.K; ++k) {
        float h = load_any(s.A, s.dt, row * s.K + k);
        if (s.f16) h = f16_to_f32(f32_to_f16(h));
        q[k] = (uint8_t)to_i8(std::nearbyint(h * rs)) ^ s.zero;
    }
}
#endif  // I8_X86

// Rows [0, M) of s.A into q (row stride ldq, bytes [K, ldq) set to the zero code), scales, mask.
void quantize_rows(const RowSpec& s, i64 M, i64 ldq, uint8_t* q, float* scales, uint8_t* mask, int level, int nt) {
    std::memset(mask, 0, (size_t)s.K);
    nt = team_size(M * s.K, 1 << 16, nt);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (i64 m = 0; m < M; ++m) {
        float scale;
        uint8_t* qm = q + m * ldq;
#if I8_X86
        if (level >= ISA_VNNI) {
            scale = row_scale_512(s, m, mask);
            row_quant_512(s, m, scale, qm);
        } else if (level >= ISA_AVX2) {
            scale = row_scale_256(s, m, mask);
            row_quant_256(s, m, scale, qm);
        } else
#endif
        {
            scale = row_scale_scalar(s, m, mask);
            row_quant_scalar(s, m, scale, qm);
        }
        scales[m] = scale;
        std::memset(qm + s.K, s.zero, (size_t)(ldq - s.K));
    }
    i64 first = 0;
    while (first < s.K && !mask[first]) ++first;
    if (first == s.K) return;
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (i64 m = 0; m < M; ++m)  // the outlier columns are computed in 16 bits: zero here
        for (i64 k = first; k < s.K; ++k)
            if (mask[k]) q[m * ldq + k] = s.zero;
}

// ------------------------------------------------------------------------------------------------
// int8 GEMM: acc[m][n] = sum_k q[m][k] * B[n][k] (int32, exact), then the epilogue.
// ------------------------------------------------------------------------------------------------

struct GemmArgs {
    const uint8_t* q;  // activations [M][ldq]: int8, or int8 + 128 as uint8 for VNNI
    i64 ldq, M, K, N;
    const int8_t* B;   // [N][K]
    const float* sca;  // [M]
    const float* scb;  // [N]
    const void* bias;  // [N] in dt, or null
    void* out;         // [M][N] in dt
    int dt;
};

inline void epilogue(const GemmArgs& g, i64 m, i64 n, int32_t acc) {
    float v = (float)acc * (g.sca[m] * g.scb[n]);  // bitsandbytes: acc * (row * col) * const
    v = v * kMmDequantScale;
    if (g.bias) v = v + load_any(g.bias, g.dt, n);
    store_any(g.out, g.dt, m * g.N + n, v);
}

template <int MT, int NT>
void tile_scalar(const GemmArgs& g, i64 m0, i64 n0) {
    for (int i = 0; i < MT; ++i)
        for (int j = 0; j < NT; ++j) {
            const int8_t* a = reinterpret_cast<const int8_t*>(g.q + (m0 + i) * g.ldq);
            const int8_t* b = g.B + (n0 + j) * g.K;
            int32_t acc = 0;
            for (i64 k = 0; k < g.K; ++k) acc += (int32_t)a[k] * (int32_t)b[k];
            epilogue(g, m0 + i, n0 + j, acc);
        }
}

#if I8_X86
// VNNI: vpdpbusd multiplies unsigned by signed bytes, so the activations are stored as q + 128
// (uint8) and 128 * sum_k B[n][k] is taken back off; the sum comes from the same instruction
// against a vector of ones, once per weight row for the whole tile of activation rows.
template <int MT, int NT>
TVNNI void tile_vnni(const GemmArgs& g, i64 m0, i64 n0) {
    __m512i acc[MT][NT], wsum[NT];
    for (int j = 0; j < NT; ++j) {
        wsum[j] = _mm512_setzero_si512();
        for (int i = 0; i < MT; ++i) acc[i][j] = _mm512_setzero_si512();
    }
    const __m512i ones = _mm512_set1_epi8(1);
    const int8_t* b0 = g.B + n0 * g.K;
    for (i64 k = 0; k < g.K; k += 64) {
        const __mmask64 km = g.K - k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (g.K - k)) - 1);
        __m512i w[NT];
        for (int j = 0; j < NT; ++j) {
            w[j] = _mm512_maskz_loadu_epi8(km, b0 + j * g.K + k);
            wsum[j] = _mm512_dpbusd_epi32(wsum[j], ones, w[j]);
        }
        for (int i = 0; i < MT; ++i) {
            const __m512i a = _mm512_loadu_si512(g.q + (m0 + i) * g.ldq + k);  // padded to ldq
            for (int j = 0; j < NT; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], a, w[j]);
        }
    }
    for (int j = 0; j < NT; ++j) {
        const uint32_t s = (uint32_t)_mm512_reduce_add_epi32(wsum[j]);
        for (int i = 0; i < MT; ++i) {
            // Two's complement: wrapped partial sums still give the exact int32 result.
            const uint32_t t = (uint32_t)_mm512_reduce_add_epi32(acc[i][j]) - 128u * s;
            epilogue(g, m0 + i, n0 + j, (int32_t)t);
        }
    }
}

// AVX2: maddubs(|w| as uint8, a * sign(w)) is exact here: |w| <= 128 and |a| <= 127 keep each
// pair of products within int16 (|w| = 128 only for w = -128, which only foreign weights hold).
template <int MT, int NT>
T256 void tile_avx2(const GemmArgs& g, i64 m0, i64 n0) {
    __m256i acc[MT][NT];
    for (int i = 0; i < MT; ++i)
        for (int j = 0; j < NT; ++j) acc[i][j] = _mm256_setzero_si256();
    const __m256i ones16 = _mm256_set1_epi16(1);
    const int8_t* b0 = g.B + n0 * g.K;
    const i64 K32 = g.K / 32 * 32;
    for (i64 k = 0; k < K32; k += 32) {
        __m256i w[NT], aw[NT];
        for (int j = 0; j < NT; ++j) {
            w[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b0 + j * g.K + k));
            aw[j] = _mm256_abs_epi8(w[j]);
        }
        for (int i = 0; i < MT; ++i) {
            const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g.q + (m0 + i) * g.ldq + k));
            for (int j = 0; j < NT; ++j) {
                const __m256i p = _mm256_maddubs_epi16(aw[j], _mm256_sign_epi8(a, w[j]));
                acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(p, ones16));
            }
        }
    }
    for (int i = 0; i < MT; ++i) {
        const int8_t* a = reinterpret_cast<const int8_t*>(g.q + (m0 + i) * g.ldq);
        for (int j = 0; j < NT; ++j) {
            alignas(32) int32_t lanes[8];
            _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc[i][j]);
            uint32_t t = 0;
            for (int l = 0; l < 8; ++l) t += (uint32_t)lanes[l];
            for (i64 k = K32; k < g.K; ++k) t += (uint32_t)((int32_t)a[k] * (int32_t)b0[j * g.K + k]);
            epilogue(g, m0 + i, n0 + j, (int32_t)t);
        }
    }
}
#endif  // I8_X86

typedef void (*TileFn)(const GemmArgs&, i64, i64);

// Kernels for tiles of up to 4 activation rows x NT weight rows (and single weight rows for the tail).
struct Tiles {
    int nt;
    TileFn full[4];  // MT = 1..4, NT = nt
    TileFn one[4];   // MT = 1..4, NT = 1
};

#define I8_TILES(fn, NT) \
    Tiles { NT, {fn<1, NT>, fn<2, NT>, fn<3, NT>, fn<4, NT>}, {fn<1, 1>, fn<2, 1>, fn<3, 1>, fn<4, 1>} }

Tiles tiles_for(int level, i64 M) {
#if I8_X86
    if (level >= ISA_VNNI) return M == 1 ? I8_TILES(tile_vnni, 8) : I8_TILES(tile_vnni, 4);
    if (level >= ISA_AVX2) return M == 1 ? I8_TILES(tile_avx2, 4) : I8_TILES(tile_avx2, 2);
#endif
    (void)level, (void)M;
    return I8_TILES(tile_scalar, 1);
}

// Activation rows are taken in panels (a group's weight rows stay in L1 across a panel's tiles).
const i64 kPanelRows = 64;

void gemm_rows(const GemmArgs& g, const Tiles& t, int nt) {
    const i64 nfull = g.N / t.nt;
    const i64 ngroups = nfull + (g.N - nfull * t.nt);  // full groups, then single weight rows
    const i64 npanels = (g.M + kPanelRows - 1) / kPanelRows;
    const i64 tasks = ngroups * npanels;
    // A team from ~256K multiply-adds: even one row's weights come from memory, and one core does
    // not read them as fast as two.
    nt = team_size(g.M * g.N * g.K, 1 << 18, nt);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (i64 task = 0; task < tasks; ++task) {
        const i64 grp = task % ngroups, panel = task / ngroups;
        const i64 n0 = grp < nfull ? grp * t.nt : nfull * t.nt + (grp - nfull);
        const TileFn* fns = grp < nfull ? t.full : t.one;
        const i64 m_end = std::min(g.M, (panel + 1) * kPanelRows);
        for (i64 m0 = panel * kPanelRows; m0 < m_end; m0 += 4) fns[std::min<i64>(4, m_end - m0) - 1](g, m0, n0);
    }
}

// A grow-only, 64-byte aligned buffer per calling thread, reused across calls.
void* thread_buffer(size_t bytes) {
    struct Buf {
        void* p = nullptr;
        size_t n = 0;
        ~Buf() { std::free(p); }
    };
    thread_local Buf b;
    if (b.n < bytes) {
        std::free(b.p);
        b.n = 0;
        b.p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
        if (b.p) b.n = bytes;
    }
    return b.p;
}

RowSpec row_spec(const void* A, int dt, i64 K, bool f16, double threshold, uint8_t zero) {
    const bool on = threshold > 0.0;
    return RowSpec{A, dt, K, f16, on ? round_to((float)threshold, f16 ? DT_F16 : dt) : 0.0f, on, zero};
}

}  // namespace

extern "C" {

int i8_abi_version() { return 1; }

int i8_detected_isa() { return g_detected_isa; }

int i8_isa() { return isa(); }

// Lower (or restore, with a large value) the instruction-set level used; for tests.
void i8_set_isa_cap(int cap) { g_isa_cap = cap; }

// int8_vectorwise_quant: A [M, K] (dtype) -> CB [M, K] int8, SCB [M] float32, mask [K] (1: outlier
// column). The values are compared and scaled in A's own dtype, or rounded to float16 first when
// as_f16 is set (gemm_int8's activations, as bitsandbytes quantizes them).
int i8_quantize(const void* A, int dtype, i64 M, i64 K, double threshold, int as_f16, int8_t* CB, float* SCB,
                uint8_t* mask, int threads) {
    if (dtype < 0 || dtype > 2 || M < 0 || K <= 0) return 1;
    const RowSpec s = row_spec(A, dtype, K, as_f16 != 0, threshold, 0);
    quantize_rows(s, M, K, reinterpret_cast<uint8_t*>(CB), SCB, mask, isa(), threads);
    return 0;
}

// The dequantizing epilogue alone, for an int32 product computed elsewhere (torch._int_mm):
// out [M, N] (dtype) = dtype(float(acc) * (SCA[m] * SCB[n]) * 6.200124e-05 + bias[n]).
int i8_epilogue(const int32_t* acc, i64 M, i64 N, const float* SCA, const float* SCB, const void* bias, void* out,
                int dtype, int threads) {
    if (dtype < 0 || dtype > 2 || M < 0 || N <= 0) return 1;
    const GemmArgs g{nullptr, 0, M, 0, N, nullptr, SCA, SCB, bias, out, dtype};
    const int nt = team_size(M * N, 1 << 16, threads);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (i64 m = 0; m < M; ++m)
        for (i64 n = 0; n < N; ++n) epilogue(g, m, n, acc[m * N + n]);
    return 0;
}

// gemm_int8 without the outlier columns' 16-bit product: out [M, N] (dtype of A) =
// dtype(float(q(A) @ B^T) * (SCA * SCB) * 6.200124e-05 + bias), q(A) the float16 activations
// quantized per row with the threshold; mask [K] gets the outlier columns for the caller's addmm.
// bias: [N] in A's dtype, or null.
int i8_gemm(const void* A, int dtype, i64 M, i64 K, const int8_t* B, const float* SCB, i64 N, double threshold,
            const void* bias, void* out, uint8_t* mask, int threads) {
    if (dtype < 0 || dtype > 2 || M < 0 || K <= 0 || N <= 0) return 1;
    if (M == 0) {
        std::memset(mask, 0, (size_t)K);
        return 0;
    }
    const int level = isa();
    const bool vnni = level >= ISA_VNNI;
    const i64 ldq = (K + 63) / 64 * 64;
    char* ws = static_cast<char*>(thread_buffer((size_t)(M * ldq + M * 4)));
    if (!ws) return 2;
    uint8_t* q = reinterpret_cast<uint8_t*>(ws);
    float* sca = reinterpret_cast<float*>(ws + M * ldq);
    const RowSpec s = row_spec(A, dtype, K, true, threshold, vnni ? 0x80 : 0x00);
    quantize_rows(s, M, ldq, q, sca, mask, level, threads);
    const GemmArgs g{q, ldq, M, K, N, B, sca, SCB, bias, out, dtype};
    gemm_rows(g, tiles_for(level, M), threads);
    return 0;
}

}  // extern "C"
