// The engine's 16-bit output head on CPU (kernels/cpu/linear16.py builds and loads it):
//   out[T][V] = x[T][K] . W[V][K]^T (+ bias[V]), x and out float32, W bfloat16, sums in float32.
// A float32 head costs the model twice its bytes, and reading them is most of a decode step's
// time for a small model with a large vocabulary; torch's bf16 GEMM on CPU rounds its output to
// bf16 (logits to ~3 significant digits), which would make near-ties of greedy decoding ties.
//
// Two products, chosen by the caller from torch's float32 matmul precision:
// - exact: each bf16 weight widened to float32 (exactly), float32 products and sums (AVX-512F FMAs);
// - bf16 (AVX-512-BF16, as torch's "medium" precision does): x rounded to bf16 once, vdpbf16ps
//   (exact products of bf16 pairs, float32 sums): twice the FMA throughput.
// Each output is computed by the same sequence of operations whatever T is and wherever its row
// lies in the call (16-lane partial sums along K, one fixed reduction): batch-invariant logits.
// Plain C ABI over raw pointers; built with -O3 -std=c++17 -fPIC -shared -fopenmp, no -march:
// the AVX-512 functions carry target attributes and are chosen at run time.

#include <vector>

#include "common.h"

namespace {

constexpr i64 kRowsPerTask = 64;  // weight rows per OpenMP work item

#if defined(__x86_64__) && defined(__GNUC__)
#define QS_AVX512 1
#define T512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define T512BF __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// TR rows of xb (bf16, K padded to Kp with zeros) against VR weight rows: vdpbf16ps.
template <int TR, int VR>
T512BF void tile_bf16(const uint16_t* xb, i64 Kp, i64 K, const uint16_t* w, i64 v0, const float* bias, float* out,
                      i64 V) {
    __m512 acc[TR][VR];
    for (int t = 0; t < TR; ++t)
        for (int r = 0; r < VR; ++r) acc[t][r] = _mm512_setzero_ps();
    for (i64 k = 0; k < K; k += 32) {
        const __mmask32 m = K - k >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << (K - k)) - 1u);
        __m512i wv[VR];
        for (int r = 0; r < VR; ++r) wv[r] = _mm512_maskz_loadu_epi16(m, w + (v0 + r) * K + k);
        for (int t = 0; t < TR; ++t) {
            const __m512i xv = _mm512_loadu_si512(xb + t * Kp + k);
            for (int r = 0; r < VR; ++r) acc[t][r] = _mm512_dpbf16_ps(acc[t][r], (__m512bh)xv, (__m512bh)wv[r]);
        }
    }
    for (int t = 0; t < TR; ++t)
        for (int r = 0; r < VR; ++r) {
            const float s = _mm512_reduce_add_ps(acc[t][r]);
            out[t * V + v0 + r] = bias ? s + bias[v0 + r] : s;
        }
}

// Weight rows [v0, v1) against all T rows, in tiles (common.h's sweep_tiles).
T512 void rows_exact(const float* x, i64 T, i64 K, const uint16_t* w, i64 v0, i64 v1, const float* bias, float* out,
                     i64 V) {
    sweep_tiles(T, v0, v1, [&](auto tr, auto vr, i64 t, i64 v) {
        head_tile_avx512<decltype(tr)::value, decltype(vr)::value>(x + t * K, K, w, nullptr, v, bias, out + t * V, V);
    });
}

// As rows_exact, with x already rounded to bf16 (rows of Kp).
T512BF void rows_bf16(const uint16_t* xb, i64 Kp, i64 T, i64 K, const uint16_t* w, i64 v0, i64 v1, const float* bias,
                      float* out, i64 V) {
    sweep_tiles(T, v0, v1, [&](auto tr, auto vr, i64 t, i64 v) {
        tile_bf16<decltype(tr)::value, decltype(vr)::value>(xb + t * Kp, Kp, K, w, v, bias, out + t * V, V);
    });
}
#endif

}  // namespace

extern "C" {

int qs16_abi_version() { return 1; }

// 1 if the CPU has AVX-512-BF16 (bf16 products available), else 0.
int qs16_has_bf16_products() {
#if QS_AVX512
    return has_avx512_bw_vl() && __builtin_cpu_supports("avx512bf16");
#else
    return 0;
#endif
}

// out [T, V] float32 = x [T, K] float32 . w [V, K] bf16 ^T (+ bias [V] float32, may be NULL).
// bf16_products: round x to bf16 and use vdpbf16ps (ignored without AVX-512-BF16). Returns 0.
int qs16_linear(const float* x, i64 T, i64 K, const uint16_t* w, i64 V, const float* bias, float* out,
                int bf16_products, int nthreads) {
    if (T < 0 || K <= 0 || V < 0) return 1;
    if (T == 0 || V == 0) return 0;
    nthreads = std::max(nthreads, 1);
    const i64 tasks = (V + kRowsPerTask - 1) / kRowsPerTask;
#if QS_AVX512
    const bool avx512 = has_avx512_bw_vl();
    const bool bf = avx512 && bf16_products && qs16_has_bf16_products();
    std::vector<uint16_t> xb;
    const i64 Kp = (K + 31) / 32 * 32;
    if (bf) {
        xb.assign((size_t)(T * Kp), 0);
        for (i64 t = 0; t < T; ++t)
            for (i64 k = 0; k < K; ++k) xb[(size_t)(t * Kp + k)] = f32_to_bf16(x[t * K + k]);
    }
    if (avx512) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
        for (i64 i = 0; i < tasks; ++i) {
            const i64 v0 = i * kRowsPerTask, v1 = std::min(V, v0 + kRowsPerTask);
            if (bf)
                rows_bf16(xb.data(), Kp, T, K, w, v0, v1, bias, out, V);
            else
                rows_exact(x, T, K, w, v0, v1, bias, out, V);
        }
        return 0;
    }
#endif
    (void)bf16_products;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (i64 i = 0; i < tasks; ++i) {
        const i64 v0 = i * kRowsPerTask, v1 = std::min(V, v0 + kRowsPerTask);
        head_rows_portable(x, T, K, w, nullptr, v0, v1, bias, out, V);
    }
    return 0;
}

}  // extern "C"
