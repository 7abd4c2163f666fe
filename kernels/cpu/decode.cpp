// One call per engine step for the whole decoder stack of a Llama-style model on CPU
// (kernels/cpu/decode.py builds and loads it; server/engine/models/native_step.py drives it).
//
// Why: the Python forward (server/engine/models/llama.py) runs ~10 Python-level ops per layer,
// each through torch's dispatcher or ctypes, and between them the OpenMP workers go back to sleep:
// on the 2-core Xeon a single-stream decode step of the default model (30 layers) took ~22 ms of
// which the kernels were about half. Here a step is one call: per layer
//     h = rms_norm(x) ; qkv = h W_qkv^T (+b) ; [q/k head norms] ; rope(q, k) ; write k, v ; a = attention(q)
//     x = x + a W_o^T ; h = rms_norm(x) ; u = h [W_gate | W_up]^T ; x = x + (silu(g) * u) W_down^T
// then the final norm. The matmuls, the cache writes and the attention are the very kernels the
// Python path calls (quant4_cpu.cpp's q4_gemm, paged_attention.cpp's qs_write_kv and
// qs_paged_attention, lora.cpp's qslora_add), reached through function pointers the caller passes,
// so both paths compute the same products; the norm, rope and activation here are per-row loops.
//
// A row's result depends only on that row and the cache (batch invariance, as the kernels it
// calls): the loops below are per row with a fixed order of operations.
// Plain C ABI over raw pointers and two structs mirrored by ctypes in decode.py; -O3, no -march and
// no -ffast-math (the elementwise loops are target_clones picked at run time).

#include "common.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define QS_CLONES __attribute__((target_clones("avx512f", "avx2,fma", "default")))
#else
#define QS_CLONES
#endif


extern "C" {

typedef int (*gemm4_fn)(const void* A, int dtype, i64 M, i64 K, const uint8_t* B, const float* absmax,
                        const float* code, i64 N, i64 bs, const void* bias, void* out, int bf16_products, int nt);
typedef int (*write_kv_fn)(const float* k, i64 k_stride, const float* v, i64 v_stride, void* k_cache,
                           void* v_cache, const i64* slots, i64 T, i64 KVH, i64 D, i64 BS, int cache_dtype);
typedef int (*attention_fn)(const float* q, i64 q_row, i64 q_head, const void* k_cache, const void* v_cache,
                            float* out, i64 out_row, const i64* seqs, i64 S, const i64* tables, i64 H, i64 KVH,
                            i64 D, i64 BS, float scale, i64 window, float softcap, int nthreads, int cache_dtype);
typedef int (*amx_fn)(const float* A, i64 M, i64 K, const uint8_t* B, const float* absmax, const float* code, i64 N,
                      i64 bs, const float* bias, float* out, int nt);
typedef int (*lora_fn)(const float* x, i64 n, i64 K, i64 ldx, float* out, i64 ldo, const int32_t* slot, i64 slots,
                       const i64* table, i64 parts, int bf16, int nt);

// One 4-bit linear: out [T, n] = x [T, k] W^T (+ bias), W packed [n * k / 2] with float32 absmax per bs.
// lora_table: the step's adapters on this linear (lora.cpp's [parts, 6] table) or null.
struct QsdLinear {
    const uint8_t* weight;
    const float* absmax;
    const float* code;  // 16 float32 code values (NF4 / FP4)
    const float* bias;  // [n] float32 or null
    i64 n, k, blocksize;
    const i64* lora_table;
    i64 lora_parts, lora_slots;
    int lora_bf16;
};

struct QsdLayer {
    const float* attn_norm;  // [hidden]: the multiplier (Gemma's 1 + w already added)
    const float* mlp_norm;
    float attn_eps, mlp_eps;
    const float* q_norm;  // [head_dim] per-head RMSNorm of q and k before rope (Qwen3), or null
    const float* k_norm;
    float q_eps, k_eps;
    QsdLinear qkv, o, up, down;  // up: [gate | up] (2 * intermediate rows)
    i64 heads, kv_heads, head_dim, intermediate;
    i64 rope;  // index into the step's cos/sin tables; -1: no rotary embedding (NoPE layer)
    float scale, softcap;
    i64 window;
    void* k_cache;  // [blocks, KVH, D, BS] of the step's cache dtype
    void* v_cache;  // [blocks, BS, KVH, D]
};

struct QsdStep {
    const float* x;  // [T, hidden] input (the embeddings); not written
    float* out;      // [T, hidden]: the final norm of the last layer's output
    float* work;     // scratch, qsd_work_floats(...) floats
    i64 T, hidden;
    const float* const* cos;  // per rope: [T, rot_dim] (transformers' cos, scaling applied)
    const float* const* sin;
    const i64* rot_dims;
    const i64* slots;  // [T] cache slots of the new tokens
    const i64* seqs;   // [S, 4] attention plan (paged_attention.py)
    i64 S;
    const i64* tables;
    i64 block_size;
    int cache_dtype;  // paged_attention.py's CACHE_DTYPE_CODES
    const int32_t* lora_slot;  // [T] adapter slot per row (-1: none), or null when no adapter runs
    const float* final_norm;
    float final_eps;
    int bf16_products, threads;
    i64 num_decodes;  // rows [0, num_decodes) are decode tokens, the rest prompt tokens
    gemm4_fn gemm;
    write_kv_fn write_kv;
    attention_fn attention;
    lora_fn lora;
    amx_fn amx;  // amx.cpp's qamx_gemm4 (bf16 products only), or null
};

}  // extern "C"

namespace {

// y = x * (1 / sqrt(mean(x^2) + eps)) * w, as torch's rms_norm on float32 (float32 sums).
QS_CLONES void rms_norm_row(const float* x, const float* w, float eps, i64 n, float* y) {
    float acc[16] = {};
    i64 i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; ++j) acc[j] += x[i + j] * x[i + j];
    float sum = 0.0f;
    for (int j = 0; j < 16; ++j) sum += acc[j];
    for (; i < n; ++i) sum += x[i] * x[i];
    const float r = 1.0f / std::sqrt(sum / (float)n + eps);
    for (i64 j = 0; j < n; ++j) y[j] = (x[j] * r) * w[j];
}

// x [N heads, D] rotated in place by cos/sin [rd] (rotate-half, transformers' apply_rotary_pos_emb):
// x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin over the first rd dims.
QS_CLONES void rope_row(float* x, i64 heads, i64 D, const float* cos, const float* sin, i64 rd) {
    const i64 half = rd / 2;
    for (i64 h = 0; h < heads; ++h) {
        float* v = x + h * D;
        for (i64 i = 0; i < half; ++i) {
            const float a = v[i], b = v[i + half];
            v[i] = a * cos[i] - b * sin[i];
            v[i + half] = b * cos[i + half] + a * sin[i + half];
        }
    }
}

// act [I] = silu(gate) * up, gate and up the two halves of u [2I].
QS_CLONES void silu_mul_row(const float* u, i64 I, float* act) {
    for (i64 i = 0; i < I; ++i) {
        const float g = u[i];
        act[i] = (g / (1.0f + std::exp(-g))) * u[I + i];
    }
}

QS_CLONES void add_row(float* x, const float* y, i64 n) {
    for (i64 i = 0; i < n; ++i) x[i] += y[i];
}

// Per-row elementwise work is split over threads only where it is worth a region.
inline int row_threads(const QsdStep& s, i64 work) { return work >= (1 << 16) ? s.threads : 1; }

// Decode rows [0, split) through q4_gemm, prompt rows [split, T) through the AMX kernel (with bf16
// products): 5-8x faster at 32-2048 rows, but it decodes the weights into tiles once per call, a
// fixed cost one row does not repay (0.5x at 1 row, 1.4x at 8 on a [3072, 576] weight). Decode rows
// through AMX from 8 of them gained 3% at 16 streams end to end: not worth a decode row's result
// depending on how many others share its step, so a row's path depends only on its kind.
i64 amx_split(const QsdStep& s) { return s.amx && s.bf16_products ? s.num_decodes : s.T; }

int linear(const QsdStep& s, const QsdLinear& l, const float* x, float* out) {
    const i64 split = amx_split(s);
    int rc = 0;
    if (split < s.T && s.amx(x + split * l.k, s.T - split, l.k, l.weight, l.absmax, l.code, l.n, l.blocksize,
                             l.bias, out + split * l.n, s.threads) != 0)
        rc = s.gemm(x + split * l.k, 0, s.T - split, l.k, l.weight, l.absmax, l.code, l.n, l.blocksize, l.bias,
                    out + split * l.n, s.bf16_products, s.threads);
    if (rc == 0 && split > 0)
        rc = s.gemm(x, 0, split, l.k, l.weight, l.absmax, l.code, l.n, l.blocksize, l.bias, out, s.bf16_products,
                    s.threads);
    if (rc) return 10 + rc;
    if (l.lora_table && s.lora_slot && s.lora)
        rc = s.lora(x, s.T, l.k, l.k, out, l.n, s.lora_slot, l.lora_slots, l.lora_table, l.lora_parts, l.lora_bf16,
                    s.threads);
    return rc ? 20 + rc : 0;
}

int layer_forward(const QsdStep& s, const QsdLayer& L, float* x, float* work) {
    const i64 T = s.T, Hd = s.hidden, H = L.heads, KVH = L.kv_heads, D = L.head_dim, I = L.intermediate;
    const i64 qkv_n = L.qkv.n;
    float* h = work;                  // [T, hidden]
    float* qkv = h + T * Hd;          // [T, (H + 2 KVH) D]
    float* attn = qkv + T * qkv_n;    // [T, H D]
    float* proj = attn + T * H * D;   // [T, hidden]
    float* up = proj + T * Hd;        // [T, 2I]
    float* act = up + T * 2 * I;      // [T, I]
    int nt = row_threads(s, T * Hd);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (i64 t = 0; t < T; ++t) rms_norm_row(x + t * Hd, L.attn_norm, L.attn_eps, Hd, h + t * Hd);
    int rc = linear(s, L.qkv, h, qkv);
    if (rc) return rc;
    if (L.q_norm) {
        nt = row_threads(s, T * qkv_n);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
        for (i64 t = 0; t < T; ++t) {
            float* row = qkv + t * qkv_n;
            for (i64 h = 0; h < H; ++h) rms_norm_row(row + h * D, L.q_norm, L.q_eps, D, row + h * D);
            for (i64 h = H; h < H + KVH; ++h) rms_norm_row(row + h * D, L.k_norm, L.k_eps, D, row + h * D);
        }
    }
    if (L.rope >= 0) {
        const float* cos = s.cos[L.rope];
        const float* sin = s.sin[L.rope];
        const i64 rd = s.rot_dims[L.rope];
        nt = row_threads(s, T * (H + KVH) * rd);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
        for (i64 t = 0; t < T; ++t)  // q and k are adjacent heads of the row: one pass over H + KVH heads
            rope_row(qkv + t * qkv_n, H + KVH, D, cos + t * rd, sin + t * rd, rd);
    }
    const float* k = qkv + H * D;
    const float* v = k + KVH * D;
    rc = s.write_kv(k, qkv_n, v, qkv_n, L.k_cache, L.v_cache, s.slots, T, KVH, D, s.block_size, s.cache_dtype);
    if (rc) return 30 + rc;
    rc = s.attention(qkv, qkv_n, D, L.k_cache, L.v_cache, attn, H * D, s.seqs, s.S, s.tables, H, KVH, D,
                     s.block_size, L.scale, L.window, L.softcap, s.threads, s.cache_dtype);
    if (rc) return 40 + rc;
    if ((rc = linear(s, L.o, attn, proj))) return rc;
    nt = row_threads(s, T * Hd);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (i64 t = 0; t < T; ++t) {
        add_row(x + t * Hd, proj + t * Hd, Hd);
        rms_norm_row(x + t * Hd, L.mlp_norm, L.mlp_eps, Hd, h + t * Hd);
    }
    if ((rc = linear(s, L.up, h, up))) return rc;
    nt = row_threads(s, T * I);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (i64 t = 0; t < T; ++t) silu_mul_row(up + t * 2 * I, I, act + t * I);
    if ((rc = linear(s, L.down, act, proj))) return rc;
    nt = row_threads(s, T * Hd);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (i64 t = 0; t < T; ++t) add_row(x + t * Hd, proj + t * Hd, Hd);
    return 0;
}

}  // namespace

extern "C" {

int qsd_abi_version() { return 4; }

// Floats of scratch a step of T rows needs (the residual stream, then one layer's buffers).
i64 qsd_work_floats(i64 T, i64 hidden, i64 max_qkv, i64 max_attn, i64 max_intermediate) {
    return T * (hidden + hidden + max_qkv + max_attn + hidden + 3 * max_intermediate);
}

// Every layer, then the final norm, for the step's T rows. Returns 0, or a code naming the part
// that declined (10+: a matmul, 20+: a LoRA add, 30+: the cache write, 40+: attention, 1: arguments);
// s->out is then unspecified and the caller computes the step another way (the cache writes of
// the layers already run are rewritten with the same values by whichever path recomputes them).
int qsd_forward(const QsdLayer* layers, i64 num_layers, const QsdStep* step) {
    const QsdStep& s = *step;
    if (s.T <= 0 || s.hidden <= 0 || num_layers < 0 || !s.gemm || !s.write_kv || !s.attention) return 1;
    float* x = s.work;  // the residual stream [T, hidden]
    std::memcpy(x, s.x, sizeof(float) * s.T * s.hidden);
    float* work = x + s.T * s.hidden;
    for (i64 l = 0; l < num_layers; ++l) {
        const int rc = layer_forward(s, layers[l], x, work);
        if (rc) return rc;
    }
    const int nt = row_threads(s, s.T * s.hidden);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (i64 t = 0; t < s.T; ++t) rms_norm_row(x + t * s.hidden, s.final_norm, s.final_eps, s.hidden, s.out + t * s.hidden);
    return 0;
}

}  // extern "C"
