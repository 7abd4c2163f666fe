// LLM.int8's default forward on CPU, weight-only (kernels/cpu/int8_linear.py builds and loads it):
//   out[M][N] = (A[M][K] . CB[N][K]^T) * (SCB[N] * float32(1/127)) (+ bias[N]), in A's dtype,
// the activations unquantized: bitsandbytes' dequantized-weight matmul (its CPU MatMul8bitFp),
// without a float copy of the weight. Each int8 weight tile is widened to float32 in registers
// (exact: |CB| <= 127) and multiplied into float32 FMAs, the row scale applied once to the sum.
// A float16 / bfloat16 A is widened to float32 once per call (exact); the result is rounded once
// to A's dtype. The only roundings are the float32 products and sums, the scale's product and that
// last cast: within Higham's gamma_{K+2} (float32) of the exact dequantized matmul.
// The tiles are common.h's output-head tiles (linear8.cpp): 4 weight rows x up to 4 activation
// rows in registers, each widened weight vector used for every activation row of the tile; each
// output is computed by the same operations whatever M is (batch-invariant). Work is handed out
// dynamically, 64 weight rows an item.
// Plain C ABI over raw pointers; built with -O3 -std=c++17 -fPIC -shared -fopenmp, no -march: the
// AVX-512 functions carry target attributes and are chosen at run time.

#include <vector>

#include "common.h"

namespace {

constexpr i64 kRowsPerTask = 64;  // weight rows per OpenMP work item
constexpr float kInv127 = 7.874015718698502e-3f;  // float32(1 / 127), as bitsandbytes' SCB * (1.0 / 127.0)

#if defined(__x86_64__) && defined(__GNUC__)
#define QS_AVX512 1
#define T512 __attribute__((target("avx512f,avx512bw,avx512vl")))

T512 void rows_avx512(const float* x, i64 M, i64 K, const int8_t* w, const float* scale, i64 n0, i64 n1,
                      const float* bias, float* out, i64 N) {
    sweep_tiles(M, n0, n1, [&](auto tr, auto vr, i64 t, i64 v) {
        head_tile_avx512<decltype(tr)::value, decltype(vr)::value>(x + t * K, K, w, scale, v, bias, out + t * N, N);
    });
}
#endif

bool use_avx512(int force_portable) {
#if QS_AVX512
    return !force_portable && has_avx512_bw_vl();
#else
    (void)force_portable;
    return false;
#endif
}

#if QS_AVX512
// rows x K int8 -> dtype, each row times its scale (float32 product, then one rounding to dtype).
T512 void dequant_rows_avx512(const int8_t* CB, const float* scale, i64 rows, i64 K, void* out, int dtype) {
    for (i64 r = 0; r < rows; ++r) {
        const __m512 s = _mm512_set1_ps(scale[r]);
        const int8_t* q = CB + r * K;
        for (i64 k = 0; k < K; k += 16) {
            const __mmask16 m = tail16(K - k);
            const __m512 v = _mm512_mul_ps(widen16(q + k, m), s);
            const i64 o = r * K + k;
            if (dtype == DT_F32) {
                _mm512_mask_storeu_ps(static_cast<float*>(out) + o, m, v);
            } else if (dtype == DT_BF16) {  // round to nearest even, as f32_to_bf16 (v is finite)
                __m512i u = _mm512_castps_si512(v);
                const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
                u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
                _mm256_mask_storeu_epi16(static_cast<uint16_t*>(out) + o, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
            } else {
                _mm256_mask_storeu_epi16(static_cast<uint16_t*>(out) + o, m,
                                         _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            }
        }
    }
}
#endif

}  // namespace

extern "C" {

int i8l_abi_version() { return 2; }

// 1 if the AVX-512 path runs on this CPU, else 0 (the portable loop).
int i8l_has_avx512() { return use_avx512(0) ? 1 : 0; }

// out [M, N] (dtype) = A [M, K] (dtype) . (CB [N, K] int8 * SCB [N] float32 / 127)^T (+ bias [N] in
// dtype, may be NULL). dtype: common.h's DT_F32 / DT_F16 / DT_BF16. force_portable: the portable
// loop even where AVX-512 runs (tests compare the two). Returns 0, or 1 for bad arguments.
int i8l_linear(const void* A, int dtype, i64 M, i64 K, const int8_t* CB, const float* SCB, i64 N, const void* bias,
               void* out, int force_portable, int nthreads) {
    if (M < 0 || K <= 0 || N < 0 || dtype < DT_F32 || dtype > DT_BF16) return 1;
    if (M == 0 || N == 0) return 0;
    std::vector<float> scale((size_t)N), bias32;
    for (i64 n = 0; n < N; ++n) scale[(size_t)n] = SCB[n] * kInv127;
    if (bias) {
        bias32.resize((size_t)N);
        for (i64 n = 0; n < N; ++n) bias32[(size_t)n] = load_any(bias, dtype, n);
    }
    const float* x = static_cast<const float*>(A);
    std::vector<float> x32;
    if (dtype != DT_F32) {  // widened once (exact), not once per weight tile
        x32.resize((size_t)(M * K));
        for (i64 i = 0; i < M * K; ++i) x32[(size_t)i] = load_any(A, dtype, i);
        x = x32.data();
    }
    float* y = static_cast<float*>(out);
    std::vector<float> y32;
    if (dtype != DT_F32) {
        y32.resize((size_t)(M * N));
        y = y32.data();
    }
    const float* b = bias ? bias32.data() : nullptr;
    const i64 tasks = (N + kRowsPerTask - 1) / kRowsPerTask;
    // Small products stay on the calling thread: waking a team costs more than they take.
    const int nt = team_size(M * N * K, (i64)1 << 18, std::max(nthreads, 1));
    const bool fast = use_avx512(force_portable);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (i64 i = 0; i < tasks; ++i) {
        const i64 n0 = i * kRowsPerTask, n1 = std::min(N, n0 + kRowsPerTask);
#if QS_AVX512
        if (fast) {
            rows_avx512(x, M, K, CB, scale.data(), n0, n1, b, y, N);
            continue;
        }
#endif
        head_rows_portable(x, M, K, CB, scale.data(), n0, n1, b, y, N);
    }
    (void)fast;
    if (dtype != DT_F32)
        for (i64 i = 0; i < M * N; ++i) store_any(out, dtype, i, y32[(size_t)i]);
    return 0;
}

// out [rows, K] (dtype) = CB [rows, K] int8 * (SCB [rows] * float32(1/127)), one rounding to dtype:
// a tile of the dequantized weight (bitsandbytes' CB * (SCB / 127)) for a GEMM on many rows.
// Returns 0, or 1 for bad arguments.
int i8l_dequant(const int8_t* CB, const float* SCB, i64 rows, i64 K, void* out, int dtype, int force_portable,
                int nthreads) {
    if (rows < 0 || K < 0 || dtype < DT_F32 || dtype > DT_BF16) return 1;
    const i64 chunk = 16;  // rows per work item
    const i64 items = (rows + chunk - 1) / chunk;
    const int nt = team_size(rows * K, (i64)1 << 16, std::max(nthreads, 1));
    const bool fast = use_avx512(force_portable);
#pragma omp parallel for schedule(static) num_threads(nt)
    for (i64 i = 0; i < items; ++i) {
        const i64 r0 = i * chunk, r1 = std::min(rows, r0 + chunk);
        float scale[chunk];
        for (i64 r = r0; r < r1; ++r) scale[r - r0] = SCB[r] * kInv127;
#if QS_AVX512
        if (fast) {
            const size_t width = dtype == DT_F32 ? 4 : 2;
            dequant_rows_avx512(CB + r0 * K, scale, r1 - r0, K, static_cast<char*>(out) + (size_t)(r0 * K) * width,
                                dtype);
            continue;
        }
#endif
        for (i64 r = r0; r < r1; ++r)
            for (i64 k = 0; k < K; ++k) store_any(out, dtype, r * K + k, (float)CB[r * K + k] * scale[r - r0]);
    }
    (void)fast;
    return 0;
}

}  // extern "C"
