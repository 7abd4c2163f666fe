// The engine's int8 output head on CPU (kernels/cpu/linear8.py builds and loads it):
//   out[T][V] = scale[V] * (x[T][K] . Q[V][K]^T) (+ bias[V]), x and out float32, Q int8 (symmetric,
//   one scale per output row), sums in float32.
// Weight-only: the activations stay float32 and every int8 weight is exact in float32, so the only
// roundings are the float32 products and sums. The head is the largest read of a decode step for a
// small model with a large vocabulary (SmolLM2: 49152 x 576); int8 reads half the bytes of bf16.
// Each output is computed by the same sequence of operations whatever T is and wherever its row lies
// in the call (16-lane partial sums along K, one fixed reduction, then the scale): batch-invariant.
// Work is handed out dynamically (64 weight rows an item): a thread that lost its core to another
// process does not hold the others up.
// Plain C ABI over raw pointers; built with -O3 -std=c++17 -fPIC -shared -fopenmp, no -march: the
// AVX-512 functions carry target attributes and are chosen at run time.

#include <vector>

#include "common.h"

namespace {

constexpr i64 kRowsPerTask = 64;  // weight rows per OpenMP work item

// Portable: 16 partial sums per output, in the lane order of the AVX-512 path.
void rows_portable(const float* x, i64 T, i64 K, const int8_t* w, const float* scale, i64 v0, i64 v1,
                   const float* bias, float* out, i64 V) {
    std::vector<float> wf((size_t)K);
    for (i64 v = v0; v < v1; ++v) {
        const int8_t* wr = w + v * K;
        for (i64 k = 0; k < K; ++k) wf[(size_t)k] = (float)wr[k];
        for (i64 t = 0; t < T; ++t) {
            const float s = dot16(x + t * K, wf.data(), K) * scale[v];
            out[t * V + v] = bias ? s + bias[v] : s;
        }
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define QS_AVX512 1
#define T512 __attribute__((target("avx512f,avx512bw,avx512vl")))

// 16 int8 weights (masked tail) as float32, exactly.
T512 inline __m512 widen16(const int8_t* p, __mmask16 m) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}

// TR rows of x against VR weight rows from v0: each weight vector widened once, used TR times.
template <int TR, int VR>
T512 void tile(const float* x, i64 K, const int8_t* w, const float* scale, i64 v0, const float* bias, float* out,
               i64 V) {
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
            const float s = _mm512_reduce_add_ps(acc[t][r]) * scale[v0 + r];
            out[t * V + v0 + r] = bias ? s + bias[v0 + r] : s;
        }
}

// Weight rows [v0, v1) against all T rows, in tiles (common.h's sweep_tiles).
T512 void rows_avx512(const float* x, i64 T, i64 K, const int8_t* w, const float* scale, i64 v0, i64 v1,
                      const float* bias, float* out, i64 V) {
    sweep_tiles(T, v0, v1, [&](auto tr, auto vr, i64 t, i64 v) {
        tile<decltype(tr)::value, decltype(vr)::value>(x + t * K, K, w, scale, v, bias, out + t * V, V);
    });
}
#endif

}  // namespace

extern "C" {

int qs8_abi_version() { return 1; }

// 1 if the AVX-512 path runs on this CPU, else 0 (the portable loop).
int qs8_has_avx512() {
#if QS_AVX512
    return has_avx512_bw_vl();
#else
    return 0;
#endif
}

// out [T, V] float32 = scale [V] * (x [T, K] float32 . w [V, K] int8 ^T) (+ bias [V] float32, may be
// NULL). force_portable: the portable loop even where AVX-512 runs (tests compare the two).
// Returns 0, or 1 for bad sizes.
int qs8_linear(const float* x, i64 T, i64 K, const int8_t* w, const float* scale, i64 V, const float* bias,
               float* out, int force_portable, int nthreads) {
    if (T < 0 || K <= 0 || V < 0) return 1;
    if (T == 0 || V == 0) return 0;
    nthreads = std::max(nthreads, 1);
    const i64 tasks = (V + kRowsPerTask - 1) / kRowsPerTask;
#if QS_AVX512
    if (!force_portable && qs8_has_avx512()) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
        for (i64 i = 0; i < tasks; ++i) {
            const i64 v0 = i * kRowsPerTask, v1 = std::min(V, v0 + kRowsPerTask);
            rows_avx512(x, T, K, w, scale, v0, v1, bias, out, V);
        }
        return 0;
    }
#endif
    (void)force_portable;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (i64 i = 0; i < tasks; ++i) {
        const i64 v0 = i * kRowsPerTask, v1 = std::min(V, v0 + kRowsPerTask);
        rows_portable(x, T, K, w, scale, v0, v1, bias, out, V);
    }
    return 0;
}

}  // extern "C"
