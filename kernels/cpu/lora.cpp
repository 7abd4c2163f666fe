// LoRA deltas for a batch whose rows use different adapters, on CPU (kernels/cpu/lora.py builds
// and loads it): for each row t with an adapter (slot[t] >= 0),
//     s = A[slot] . x[t]                  (A: [r, K], s: [r])
//     out[t, start:end] += s . Bt[slot]   (Bt: [r, end - start], already scaled)
// x and out float32; A and Bt float32 or bfloat16 (widened exactly); sums in float32.
//
// Why a kernel: with torch, each fused linear of each layer costs an index_select, two matmuls and
// an index_add per adapter in the batch, ~0.8 ms a linear in the engine on 2 cores (the ops are
// tiny, [16, 576] x [576, 24], so dispatch and thread-pool wake-ups dominate): 120 linears made a
// decode step over 4 adapters 2.5x the base's. Here one call per fused linear does every row of
// every adapter. What is left is reading the adapters: rank 16 on every projection of the default
// model is 29 MB of float32 per adapter, more than its 4-bit base, so each adapter's weights are
// read once per call whatever its number of rows (rows grouped by slot), in bf16 where the caller
// allows it, by both threads at once.
//
// Two phases in one parallel region, work handed out dynamically (a thread that lost its core
// does not hold the other back): shrink, then expand (run() says how the work is cut). Each output is the same sequence of operations whatever the other rows
// and the thread count are (16 partial sums along K then one fixed reduction; the rank sum in
// order): a row's result does not depend on its batch.
// Plain C ABI over raw pointers; -O3 -std=c++17 -fPIC -shared -fopenmp, no -march / -ffast-math:
// the loops are target_clones (AVX-512, AVX2+FMA, baseline) chosen at run time.

#include <vector>

#include "common.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define QS_CLONES __attribute__((target_clones("avx512f", "avx2,fma", "default")))
#else
#define QS_CLONES
#endif
#define T512 __attribute__((target("avx512f")))

namespace {

constexpr i64 kMaxRank = 4096;
constexpr i64 kTile = 64;  // output columns per expand item: 4 AVX-512 registers per row
constexpr i64 kRowBlock = 4;  // rows per pass over a weight row / tile: one load, four uses
constexpr i64 kRowsPerItem = 64;
constexpr i64 kRanksPerItem = 16;


template <typename W>
QS_CLONES float dot(const W* a, const float* x, i64 K) {
    float acc[16] = {};
    i64 k = 0;
    for (; k + 16 <= K; k += 16)
        for (int l = 0; l < 16; ++l) acc[l] += widen(a[k + l]) * x[k + l];
    for (; k < K; ++k) acc[k % 16] += widen(a[k]) * x[k];
    float s = 0.0f;
    for (int l = 0; l < 16; ++l) s += acc[l];
    return s;
}

// s[t] = dot(a, x[t]) for the rows of one block.
template <typename W>
void shrink_rows(const W* a, const float* const* x, i64 nrows, i64 K, float* const* s) {
    for (i64 t = 0; t < nrows; ++t) *s[t] = dot(a, x[t], K);
}

// y[t][j0:j0+w] += sum_i s[t][i] * Bt[i][j0:j0+w] for the rows of one block (w <= kTile).
template <typename W>
QS_CLONES void expand_tile(const float* const* s, i64 nrows, const W* Bt, i64 r, i64 width, i64 j0, i64 w,
                           float* const* y) {
    float acc[kRowBlock][kTile];
    for (i64 t = 0; t < nrows; ++t)
        for (i64 j = 0; j < kTile; ++j) acc[t][j] = 0.0f;
    for (i64 i = 0; i < r; ++i) {
        float b[kTile];
        const W* bi = Bt + i * width + j0;
        for (i64 j = 0; j < w; ++j) b[j] = widen(bi[j]);
        for (i64 j = w; j < kTile; ++j) b[j] = 0.0f;
        for (i64 t = 0; t < nrows; ++t) {
            const float st = s[t][i];
            for (i64 j = 0; j < kTile; ++j) acc[t][j] += st * b[j];
        }
    }
    for (i64 t = 0; t < nrows; ++t)
        for (i64 j = 0; j < w; ++j) y[t][j0 + j] += acc[t][j];
}

#if defined(__x86_64__)
// AVX-512: the sums of the generic code in its order (16 lanes along K, then the lanes in order;
// the rank sum in order), fused multiply-adds, one widened weight vector used by every row of the
// block. A machine always takes the same path, so results stay independent of the batch.
T512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
T512 inline __m512 load16(const uint16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
template <typename W>
T512 void shrink_rows_512(const W* a, const float* const* x, i64 nrows, i64 K, float* const* s) {
    __m512 acc[kRowBlock];
    for (i64 t = 0; t < kRowBlock; ++t) acc[t] = _mm512_setzero_ps();
    i64 k = 0;
    for (; k + 16 <= K; k += 16) {
        const __m512 w = load16(a + k);
        for (i64 t = 0; t < nrows; ++t) acc[t] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x[t] + k), acc[t]);
    }
    for (i64 t = 0; t < nrows; ++t) {
        alignas(64) float l[16];
        _mm512_store_ps(l, acc[t]);
        for (i64 kk = k; kk < K; ++kk) l[kk % 16] += widen(a[kk]) * x[t][kk];
        float sum = 0.0f;
        for (int i = 0; i < 16; ++i) sum += l[i];
        *s[t] = sum;
    }
}

template <typename W>
T512 void expand_tile_512(const float* const* s, i64 nrows, const W* Bt, i64 r, i64 width, i64 j0, i64 w,
                          float* const* y) {
    if (w < kTile) {  // the last, narrower tile of a row
        expand_tile(s, nrows, Bt, r, width, j0, w, y);
        return;
    }
    __m512 acc[kRowBlock][4];
    for (i64 t = 0; t < kRowBlock; ++t)
        for (int v = 0; v < 4; ++v) acc[t][v] = _mm512_setzero_ps();
    for (i64 i = 0; i < r; ++i) {
        const W* bi = Bt + i * width + j0;
        const __m512 b0 = load16(bi), b1 = load16(bi + 16), b2 = load16(bi + 32), b3 = load16(bi + 48);
        for (i64 t = 0; t < nrows; ++t) {
            const __m512 st = _mm512_set1_ps(s[t][i]);
            acc[t][0] = _mm512_fmadd_ps(st, b0, acc[t][0]);
            acc[t][1] = _mm512_fmadd_ps(st, b1, acc[t][1]);
            acc[t][2] = _mm512_fmadd_ps(st, b2, acc[t][2]);
            acc[t][3] = _mm512_fmadd_ps(st, b3, acc[t][3]);
        }
    }
    for (i64 t = 0; t < nrows; ++t)
        for (int v = 0; v < 4; ++v) {
            float* p = y[t] + j0 + 16 * v;
            _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), acc[t][v]));
        }
}
#endif

struct Entry {  // one targeted part of one slot's adapter
    i64 q;
    const void* a;
    const void* bt;
    i64 r, start, end;
    i64 soff;  // where its rows' s values start in the s buffer ([rows of q][r])
};

template <typename W>
void run(const float* x, i64 K, i64 ldx, float* out, i64 ldo, const std::vector<std::vector<i64>>& rows,
         const std::vector<Entry>& e, i64 ssize, int threads) {
#if defined(__x86_64__)
    const bool avx512 = __builtin_cpu_supports("avx512f");
#else
    const bool avx512 = false;
#endif
    std::vector<float> s((size_t)ssize);  // written by the shrink, read by the expand
    // Work items: (part, block of up to kRowsPerItem of its slot's rows, rank chunk) for the
    // shrink and (part, row block, column tile) for the expand, so that one adapter's rows still
    // split over the threads, and a long prefill's rows stay in cache while a weight block is reused.
    struct Item {
        i64 p, t0, t1, c0;
    };
    std::vector<Item> shrink, expand;
    for (i64 p = 0; p < (i64)e.size(); ++p) {
        const i64 nq = (i64)rows[e[p].q].size();
        for (i64 t0 = 0; t0 < nq; t0 += kRowsPerItem) {
            const i64 t1 = std::min(nq, t0 + kRowsPerItem);
            for (i64 i0 = 0; i0 < e[p].r; i0 += kRanksPerItem) shrink.push_back(Item{p, t0, t1, i0});
            for (i64 j0 = 0; j0 < e[p].end - e[p].start; j0 += kTile) expand.push_back(Item{p, t0, t1, j0});
        }
    }
    const i64 ns = (i64)shrink.size(), ne = (i64)expand.size();
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
#pragma omp for schedule(dynamic, 1)
        for (i64 w = 0; w < ns; ++w) {
            const Item it = shrink[w];
            const Entry& ep = e[it.p];
            const std::vector<i64>& rq = rows[ep.q];
            const i64 i1 = std::min(ep.r, it.c0 + kRanksPerItem);
            for (i64 t0 = it.t0; t0 < it.t1; t0 += kRowBlock) {
                const i64 nb = std::min(kRowBlock, it.t1 - t0);
                const float* xp[kRowBlock];
                float* sp[kRowBlock];
                for (i64 i = it.c0; i < i1; ++i) {
                    const W* ai = static_cast<const W*>(ep.a) + i * K;
                    for (i64 t = 0; t < nb; ++t) {
                        xp[t] = x + rq[t0 + t] * ldx;
                        sp[t] = s.data() + ep.soff + (t0 + t) * ep.r + i;
                    }
#if defined(__x86_64__)
                    if (avx512) {
                        shrink_rows_512(ai, xp, nb, K, sp);
                        continue;
                    }
#endif
                    shrink_rows(ai, xp, nb, K, sp);
                }
            }
        }
#pragma omp for schedule(dynamic, 1)
        for (i64 w = 0; w < ne; ++w) {
            const Item it = expand[w];
            const Entry& ep = e[it.p];
            const std::vector<i64>& rq = rows[ep.q];
            const i64 width = ep.end - ep.start, cols = std::min(kTile, width - it.c0);
            const W* bt = static_cast<const W*>(ep.bt);
            for (i64 t0 = it.t0; t0 < it.t1; t0 += kRowBlock) {
                const i64 nb = std::min(kRowBlock, it.t1 - t0);
                const float* sp[kRowBlock];
                float* yp[kRowBlock];
                for (i64 t = 0; t < nb; ++t) {
                    sp[t] = s.data() + ep.soff + (t0 + t) * ep.r;
                    yp[t] = out + rq[t0 + t] * ldo + ep.start;
                }
#if defined(__x86_64__)
                if (avx512) {
                    expand_tile_512(sp, nb, bt, ep.r, width, it.c0, cols, yp);
                    continue;
                }
#endif
                expand_tile(sp, nb, bt, ep.r, width, it.c0, cols, yp);
            }
        }
    }
}

}  // namespace

extern "C" {

int qslora_abi_version() { return 3; }

// x [n, K] (row stride ldx), out [n, >= every end] (row stride ldo), slot [n] int32 (-1: no
// adapter, else < slots), table [parts, 6] int64: slot, A pointer ([r, K]), Bt pointer ([r, end - start]), r,
// start, end; a slot may have several parts (q, k, v) or none. Parts of one slot must not share
// output columns (each is added by one thread). bf16: A and Bt are bfloat16, else float32.
// Returns 0, or 1 on a bad argument (nothing written).
int qslora_add(const float* x, i64 n, i64 K, i64 ldx, float* out, i64 ldo, const int32_t* slot, i64 slots,
               const i64* table, i64 parts, int bf16, int threads) {
    for (i64 p = 0; p < parts; ++p) {
        const i64* t = table + 6 * p;
        if (t[0] < 0 || t[0] >= slots || t[3] < 1 || t[3] > kMaxRank || t[4] < 0 || t[5] < t[4] || t[5] > ldo)
            return 1;
    }
    std::vector<std::vector<i64>> rows((size_t)slots);
    for (i64 t = 0; t < n; ++t) {
        if (slot[t] >= slots) return 1;
        if (slot[t] >= 0) rows[slot[t]].push_back(t);
    }
    std::vector<Entry> e;
    i64 ssize = 0;
    for (i64 p = 0; p < parts; ++p) {
        const i64* t = table + 6 * p;
        const i64 nq = (i64)rows[t[0]].size();
        if (nq == 0) continue;
        e.push_back(Entry{t[0], reinterpret_cast<const void*>(t[1]), reinterpret_cast<const void*>(t[2]), t[3], t[4],
                          t[5], ssize});
        ssize += nq * t[3];
    }
    if (e.empty()) return 0;
    if (threads < 1) threads = 1;
    if (bf16)
        run<uint16_t>(x, K, ldx, out, ldo, rows, e, ssize, threads);
    else
        run<float>(x, K, ldx, out, ldo, rows, e, ssize, threads);
    return 0;
}

}  // extern "C"
