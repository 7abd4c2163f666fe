// Helpers shared by the kernels/cpu sources; each source includes this header and is built into a
// library of its own (kernels/cpu/build.py hashes this file into every library's cache key, so an
// edit here rebuilds them all).
//
// Everything is in an anonymous namespace on purpose: each library gets its own copy with internal
// linkage, so two libraries loaded in one process (built with different flags, e.g.
// -ffp-contract=off) never bind to each other's copy through the dynamic linker.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

typedef int64_t i64;

namespace {

// ---- Scalar conversions: exact where the value fits, else nearest with ties to even; no reliance
// on FTZ or fast-math. They match torch's .to() (c10's conversions) bit for bit, NaN aside. ------

inline float bits_f32(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline uint32_t f32_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

inline float bf16_to_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

inline uint16_t f32_to_bf16(float f) {
    if (std::isnan(f)) return 0x7FC0;  // as c10::BFloat16
    uint32_t u = f32_bits(f);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    if (e == 0) {
        float v = (float)m * 5.9604644775390625e-8f;  // m * 2^-24, exact
        return sign ? -v : v;
    }
    if (e == 31) return bits_f32(sign | 0x7F800000u | (m << 13));
    return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}

// Integer-only, so the result does not depend on how the compiler contracts float arithmetic.
inline uint16_t f32_to_f16(float f) {
    uint32_t x = f32_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t ax = x & 0x7FFFFFFFu;
    if (ax > 0x7F800000u) return sign | 0x7E00u | ((ax >> 13) & 0x3FFu);  // NaN (quiet)
    if (ax >= 0x47800000u) return sign | 0x7C00u;                          // >= 2^16 or inf
    if (ax >= 0x38800000u) {                                               // normal half
        uint32_t r = ax - 0x38000000u;
        r += 0xFFFu + ((r >> 13) & 1u);
        return sign | (uint16_t)(r >> 13);  // may round up to inf: correct
    }
    if (ax <= 0x33000000u) return sign;  // <= 2^-25 rounds to zero (the tie goes to even 0)
    uint32_t e = ax >> 23, m = (ax & 0x7FFFFFu) | 0x800000u;
    uint32_t shift = 126u - e;  // 14..24
    uint32_t q = m >> shift, rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) ++q;
    return sign | (uint16_t)q;
}

// ---- The dtype codes of the quant kernels' entry points (quant4_cpu.cpp, int8_cpu.cpp; the
// Python side: quant/backends/cpu.py's _DTYPE_CODE). ----------------------------------------------

enum { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2 };

inline float load_any(const void* p, int dt, i64 i) {
    if (dt == DT_F32) return static_cast<const float*>(p)[i];
    if (dt == DT_F16) return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
}

inline void store_any(void* p, int dt, i64 i, float v) {
    if (dt == DT_F32)
        static_cast<float*>(p)[i] = v;
    else if (dt == DT_F16)
        static_cast<uint16_t*>(p)[i] = f32_to_f16(v);
    else
        static_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
}

// Threads for `work` units when each thread should get at least `grain` of them: small calls stay
// on the calling thread (waking a team costs more than they take, and far more on a busy machine).
inline int team_size(i64 work, i64 grain, int nt) { return (int)std::max<i64>(1, std::min<i64>(nt, work / grain)); }

// A weight element as float32, exactly: float32, bf16 (the top half of a float32) or int8.
inline float widen(float v) { return v; }
inline float widen(uint16_t h) { return bf16_to_f32(h); }
inline float widen(int8_t q) { return (float)q; }

// ---- The output heads (linear16.cpp: bf16 weights; linear8.cpp: int8 weights with row scales) ----

// x [K] . w [K] in 16 lanes along K (lane k % 16), then the lanes summed in order: a fixed order
// whatever the row's batch, so a row's result does not depend on the other rows.
inline float dot16(const float* x, const float* w, i64 K) {
    float acc[16] = {};
    for (i64 k = 0; k < K; ++k) acc[k % 16] += x[k] * w[k];
    float s = 0.0f;
    for (int l = 0; l < 16; ++l) s += acc[l];
    return s;
}

// out[t][v] = x[t] . w[v] (times scale[v] if scale) (+ bias[v] if bias) for weight rows [v0, v1),
// portable: each weight row widened to float32 once, then dot16 for every row of x.
template <typename W>
void head_rows_portable(const float* x, i64 T, i64 K, const W* w, const float* scale, i64 v0, i64 v1,
                        const float* bias, float* out, i64 V) {
    std::vector<float> wf((size_t)K);
    for (i64 v = v0; v < v1; ++v) {
        const W* wr = w + v * K;
        for (i64 k = 0; k < K; ++k) wf[(size_t)k] = widen(wr[k]);
        for (i64 t = 0; t < T; ++t) {
            float s = dot16(x + t * K, wf.data(), K);
            if (scale) s *= scale[v];
            out[t * V + v] = bias ? s + bias[v] : s;
        }
    }
}

// Weight rows [v0, v1) against activation rows [0, T) in register tiles: 4 weight rows at a time
// (kept in L1 while every group of up to 4 activation rows passes over them), then single rows.
// One activation row (decode at one stream) takes the weight rows one by one instead: a thread's
// weight bytes are then one sequential stream, and 4 rows read interleaved at a row's stride are
// not (on the 2-core AMD EPYC, plain loads of interleaved rows ran at less than half the speed of
// one stream; the bf16 head took 0.72x the time at 49152 x 576). An output's operations are the
// same whatever the tile, so the result is too.
// tile(tr, vr, t, v) runs the kernel's TR x VR tile at activation row t and weight row v; tr and vr
// are std::integral_constant, so the kernel instantiates its tile<TR, VR> from them.
template <class Tile>
inline void sweep_tiles(i64 T, i64 v0, i64 v1, const Tile& tile) {
    using std::integral_constant;
    i64 v = v0;
    if (T == 1) {
        for (; v < v1; ++v) tile(integral_constant<int, 1>{}, integral_constant<int, 1>{}, 0, v);
        return;
    }
    for (; v + 4 <= v1; v += 4)
        for (i64 t = 0; t < T; t += 4) switch (std::min<i64>(4, T - t)) {
                case 1: tile(integral_constant<int, 1>{}, integral_constant<int, 4>{}, t, v); break;
                case 2: tile(integral_constant<int, 2>{}, integral_constant<int, 4>{}, t, v); break;
                case 3: tile(integral_constant<int, 3>{}, integral_constant<int, 4>{}, t, v); break;
                default: tile(integral_constant<int, 4>{}, integral_constant<int, 4>{}, t, v); break;
            }
    for (; v < v1; ++v)
        for (i64 t = 0; t < T; ++t) tile(integral_constant<int, 1>{}, integral_constant<int, 1>{}, t, v);
}

#if defined(__x86_64__) || defined(_M_X64)
// AVX-512 F + BW + VL at run time: what the output heads' tiles need (the libraries are built
// without -march, so every AVX-512 function is chosen by a check like this one).
inline bool has_avx512_bw_vl() {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
}

// The lanes [0, left) of a 16-lane vector (all of them from 16 on): the mask of a loop's tail.
inline __mmask16 tail16(i64 left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u); }

#if defined(__GNUC__)
#define QS_TARGET_AVX512BW __attribute__((target("avx512f,avx512bw,avx512vl")))

// 16 weights (masked tail) as float32, exactly.
QS_TARGET_AVX512BW inline __m512 widen16(const uint16_t* p, __mmask16 m) {  // bf16
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
QS_TARGET_AVX512BW inline __m512 widen16(const int8_t* p, __mmask16 m) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}

// head_rows_portable's results for TR rows of x against VR weight rows from v0, on AVX-512: float32
// FMAs in 16 lanes along K, each weight vector widened once and used TR times, one reduction.
template <int TR, int VR, typename W>
QS_TARGET_AVX512BW void head_tile_avx512(const float* x, i64 K, const W* w, const float* scale, i64 v0,
                                         const float* bias, float* out, i64 V) {
    __m512 acc[TR][VR];
    for (int t = 0; t < TR; ++t)
        for (int r = 0; r < VR; ++r) acc[t][r] = _mm512_setzero_ps();
    for (i64 k = 0; k < K; k += 16) {
        const __mmask16 m = tail16(K - k);
        __m512 wv[VR];
        for (int r = 0; r < VR; ++r) wv[r] = widen16(w + (v0 + r) * K + k, m);
        for (int t = 0; t < TR; ++t) {
            const __m512 xv = _mm512_maskz_loadu_ps(m, x + t * K + k);
            for (int r = 0; r < VR; ++r) acc[t][r] = _mm512_fmadd_ps(xv, wv[r], acc[t][r]);
        }
    }
    for (int t = 0; t < TR; ++t)
        for (int r = 0; r < VR; ++r) {
            float s = _mm512_reduce_add_ps(acc[t][r]);
            if (scale) s *= scale[v0 + r];
            out[t * V + v0 + r] = bias ? s + bias[v0 + r] : s;
        }
}

// Word indices for _mm512_permutex2var_epi16 over 64 bf16 values (two vectors): vl picks the pairs
// (x1, x3), (x5, x7), ... and vh (x0, x2), (x4, x6), ...: the activation layout of quant4_cpu.cpp's
// bf16 kernel, which amx.cpp's tiles share.
__attribute__((target("avx512f,avx512bw"))) inline void bf16_pair_indices(__m512i& vl, __m512i& vh) {
    alignas(64) int16_t il[32], ih[32];
    for (int i = 0; i < 16; ++i) {
        il[2 * i] = (int16_t)(4 * i + 1);
        il[2 * i + 1] = (int16_t)(4 * i + 3);
        ih[2 * i] = (int16_t)(4 * i);
        ih[2 * i + 1] = (int16_t)(4 * i + 2);
    }
    vl = _mm512_load_si512((const void*)il);
    vh = _mm512_load_si512((const void*)ih);
}
#endif
#endif

}  // namespace
