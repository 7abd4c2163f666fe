// 4-bit (NF4 / FP4) matmul on Intel AMX tiles, for the prompt rows of an engine step on CPU
// (kernels/cpu/amx.py builds and loads it; kernels/cpu/decode.cpp calls it for prefill rows).
//
// Why: a prompt is compute-bound. quant4_cpu.cpp's AVX-512-BF16 kernel (vdpbf16ps, 32 products
// per instruction) spent ~200 ms on a 128-token prompt of the default model on the 2-core Xeon;
// an AMX tile multiply does 16 x 16 x 32 products per instruction. The weights are decoded once per
// call into bf16 tiles (16 output rows x 32 inputs, VNNI pairs) and reused for every 32 rows of A.
//
// Semantics: those of q4_gemm with bf16 products (torch's "medium" float32 matmul precision):
// activations and decoded weights (code * absmax, rounded to bf16, nearest even) multiplied as
// bf16, summed in float32, float32 output (+ bias). The sums run in a fixed order per output
// (32-input tiles in K order), so a row's result does not depend on the other rows of A.
//
// Layout: quant4_cpu.cpp's bf16 kernel pairs the inputs of each 64-chunk as (4i+1, 4i+3) then
// (4i, 4i+2) (its nibble decode gives odd and even elements apart); A is re-laid out the same way,
// which any consistent pairing allows: C[m][n] = sum over pairs of A[m][p0] W[n][p0] + A[m][p1] W[n][p1].
// Plain C ABI; -O3, no -march: the AMX code is compiled per function (target attributes) and
// chosen at run time (CPUID + the kernel's permission for tile data, arch_prctl).

#include <cstdlib>
#include <vector>

#include "common.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define QS_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#else
#define QS_AMX 0
#endif

namespace {

#if QS_AMX
#define TAMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512bf16,avx512vl")))

constexpr int kRows = 16;          // rows of a tile
constexpr i64 kNBlock = 32;        // weight rows per work item: two B tiles
constexpr i64 kMBlock = 32;        // activation rows per pass: two A tiles
constexpr i64 kTileBytes = 1024;   // 16 rows x 64 bytes

bool amx_usable() {
    static const bool ok = [] {
        unsigned a, b, c, d;
        __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
        const bool tile = (d >> 24) & 1, bf16 = (d >> 22) & 1, avx512bf16_host = __builtin_cpu_supports("avx512bf16");
        if (!tile || !bf16 || !avx512bf16_host) return false;
        // Linux hands out the 8 KB of tile state only to processes that ask (ARCH_REQ_XCOMP_PERM,
        // XFEATURE_XTILEDATA = 18); without it the first tile instruction faults.
        return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
    }();
    return ok;
}

struct TileConfig {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

TAMX void configure() {
    alignas(64) TileConfig cfg{};
    cfg.palette = 1;
    for (int t = 0; t < 8; ++t) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = kRows;
    }
    _tile_loadconfig(&cfg);
}

// 16x16 dwords transposed in registers: r[i] holds row i on entry, column i on return.
TAMX inline void transpose16(__m512i* r) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 16; i += 8)
        for (int j = 0; j < 4; ++j) {
            t[i + j] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0x88);
            t[i + j + 4] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0xDD);
        }
    for (int j = 0; j < 8; ++j) {
        r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
        r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xDD);
    }
}

// The 16-entry code times one absmax, as 16 bf16 (twice: vpermw reads 5 index bits).
TAMX inline __m512i bf16_table(__m512 code, float absmax) {
    const __m512 p = _mm512_mul_ps(code, _mm512_set1_ps(absmax));
    return (__m512i)_mm512_cvtne2ps_pbh(p, p);
}

// Weight rows [n0, n0 + 32) x all K decoded into tiles: panel[(c * 2 + half) * 2 + j] is the B tile
// of 64-chunk c, half 0 (pairs 4i+1, 4i+3) or 1 (pairs 4i, 4i+2), rows n0 + 16 j .. + 15 (VNNI:
// tile row i holds pair i of each of the 16 weight rows). Rows past N are zero.
TAMX void decode_panel(const uint8_t* B, const float* absmax, const float* code, i64 N, i64 K, i64 bs, i64 n0,
                       uint8_t* panel) {
    const __m512 cv = _mm512_loadu_ps(code);
    const i64 chunks = K / 64;
    for (int j = 0; j < 2; ++j) {
        for (i64 c = 0; c < chunks; ++c) {
            __m512i lo[16], hi[16];
            for (int r = 0; r < 16; ++r) {
                const i64 n = n0 + 16 * j + r;
                if (n >= N) {
                    lo[r] = hi[r] = _mm512_setzero_si512();
                    continue;
                }
                const i64 first = n * K + c * 64;  // element index of the chunk (bs % 64 == 0: one block)
                const __m512i tab = bf16_table(cv, absmax[first / bs]);
                const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(B + first / 2)));
                lo[r] = _mm512_permutexvar_epi16(v, tab);                         // low nibbles: odd elements
                hi[r] = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), tab);   // high nibbles: even elements
            }
            transpose16(lo);
            transpose16(hi);
            uint8_t* t0 = panel + ((c * 2 + 0) * 2 + j) * kTileBytes;
            uint8_t* t1 = panel + ((c * 2 + 1) * 2 + j) * kTileBytes;
            for (int r = 0; r < 16; ++r) {
                _mm512_store_si512((void*)(t0 + r * 64), lo[r]);
                _mm512_store_si512((void*)(t1 + r * 64), hi[r]);
            }
        }
    }
}

// Activations [M, K] float32 -> bf16 rows (nearest even) in the pairing above, M padded to a
// multiple of 32 with zero rows (tiles always load 16 rows).
TAMX void relayout_rows(const float* A, i64 m0, i64 m1, i64 K, uint16_t* dst) {
    __m512i vl, vh;
    bf16_pair_indices(vl, vh);
    for (i64 m = m0; m < m1; ++m)
        for (i64 c = 0; c < K; c += 64) {
            const float* a = A + m * K + c;
            const __m512i s0 = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(a + 16), _mm512_loadu_ps(a));
            const __m512i s1 = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(a + 48), _mm512_loadu_ps(a + 32));
            _mm512_storeu_si512((void*)(dst + m * K + c), _mm512_permutex2var_epi16(s0, vl, s1));
            _mm512_storeu_si512((void*)(dst + m * K + c + 32), _mm512_permutex2var_epi16(s0, vh, s1));
        }
}

TAMX void gemm_amx(const float* A, i64 M, i64 K, const uint8_t* B, const float* absmax, const float* code, i64 N,
                   i64 bs, const float* bias, float* out, int nt) {
    const i64 Mp = (M + kMBlock - 1) / kMBlock * kMBlock;
    static thread_local std::vector<uint16_t> abuf;  // the caller's: shared read-only by the team
    if ((i64)abuf.size() < Mp * K + 32) abuf.resize(Mp * K + 32);
    uint16_t* Ap = abuf.data();
    std::memset(Ap + M * K, 0, sizeof(uint16_t) * (Mp - M) * K);
    const i64 nblocks = (N + kNBlock - 1) / kNBlock;
    const i64 panel_bytes = (K / 64) * 4 * kTileBytes;
    nt = (int)std::max<i64>(1, std::min<i64>(nt, nblocks));
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
#pragma omp for schedule(static)
        for (i64 m = 0; m < M; ++m) relayout_rows(A, m, m + 1, K, Ap);
        configure();
        uint8_t* panel = (uint8_t*)std::aligned_alloc(64, panel_bytes);
        alignas(64) float cbuf[kMBlock * kNBlock];
#pragma omp for schedule(dynamic, 1)
        for (i64 nb = 0; nb < nblocks; ++nb) {
            const i64 n0 = nb * kNBlock;
            decode_panel(B, absmax, code, N, K, bs, n0, panel);
            const i64 ncols = std::min(kNBlock, N - n0);
            for (i64 m0 = 0; m0 < M; m0 += kMBlock) {
                _tile_zero(4);
                _tile_zero(5);
                _tile_zero(6);
                _tile_zero(7);
                for (i64 t = 0; t < K / 32; ++t) {  // 32-input tiles in K order
                    const uint16_t* a = Ap + m0 * K + t * 32;
                    _tile_loadd(0, a, K * 2);
                    _tile_loadd(1, a + 16 * K, K * 2);
                    _tile_loadd(2, panel + (t * 2 + 0) * kTileBytes, 64);
                    _tile_loadd(3, panel + (t * 2 + 1) * kTileBytes, 64);
                    _tile_dpbf16ps(4, 0, 2);
                    _tile_dpbf16ps(5, 0, 3);
                    _tile_dpbf16ps(6, 1, 2);
                    _tile_dpbf16ps(7, 1, 3);
                }
                _tile_stored(4, cbuf, kNBlock * 4);
                _tile_stored(5, cbuf + 16, kNBlock * 4);
                _tile_stored(6, cbuf + 16 * kNBlock, kNBlock * 4);
                _tile_stored(7, cbuf + 16 * kNBlock + 16, kNBlock * 4);
                const i64 rows = std::min(kMBlock, M - m0);
                for (i64 i = 0; i < rows; ++i) {
                    float* o = out + (m0 + i) * N + n0;
                    const float* cr = cbuf + i * kNBlock;
                    if (bias)
                        for (i64 j = 0; j < ncols; ++j) o[j] = cr[j] + bias[n0 + j];
                    else
                        std::memcpy(o, cr, sizeof(float) * ncols);
                }
            }
        }
        std::free(panel);
        _tile_release();
    }
}
#endif  // QS_AMX

}  // namespace

extern "C" {

int qamx_abi_version() { return 1; }

// 1 when this CPU and kernel run the AMX kernel.
int qamx_available() {
#if QS_AMX
    return amx_usable() ? 1 : 0;
#else
    return 0;
#endif
}

// out [M, N] float32 = bf16(A [M, K] float32) @ bf16(W)^T + bias (float32 [N] or null), W = [N, K]
// packed 4-bit with float32 absmax per bs elements and a 16-entry float32 code. Returns nonzero
// (nothing written) when the CPU lacks AMX or the shape is not one it takes (K and bs multiples of 64).
int qamx_gemm4(const float* A, i64 M, i64 K, const uint8_t* B, const float* absmax, const float* code, i64 N,
               i64 bs, const float* bias, float* out, int nt) {
#if QS_AMX
    if (M <= 0 || N <= 0 || K <= 0 || K % 64 || bs <= 0 || bs % 64 || !amx_usable()) return 1;
    gemm_amx(A, M, K, B, absmax, code, N, bs, bias, out, nt);
    return 0;
#else
    (void)A, (void)M, (void)K, (void)B, (void)absmax, (void)code, (void)N, (void)bs, (void)bias, (void)out, (void)nt;
    return 1;
#endif
}

}  // extern "C"
