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

#if defined(__x86_64__) && defined(__GNUC__)
#define QS_AVX512 1
#define T512 __attribute__((target("avx512f,avx512bw,avx512vl")))

// Weight rows [v0, v1) against all T rows, in tiles (common.h's sweep_tiles).
T512 void rows_avx512(const float* x, i64 T, i64 K, const int8_t* w, const float* scale, i64 v0, i64 v1,
                      const float* bias, float* out, i64 V) {
    sweep_tiles(T, v0, v1, [&](auto tr, auto vr, i64 t, i64 v) {
        head_tile_avx512<decltype(tr)::value, decltype(vr)::value>(x + t * K, K, w, scale, v, bias, out + t * V, V);
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
        head_rows_portable(x, T, K, w, scale, v0, v1, bias, out, V);
    }
    return 0;
}

}  // extern "C"
