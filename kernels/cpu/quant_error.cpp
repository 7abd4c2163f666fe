// What quantizing a weight cost, in one pass over it (server/loading/quant_stats.py): the sum of
// squares of the original and of its difference from the dequantized weight, dequantized exactly
// as the ops do (float32 code * float32 scale), without materializing it. Single-threaded: the
// loader calls it once per layer, on a machine whose other core is often busy.
// Built with -ffp-contract=off so that no multiply-add fuses the product the ops round.

#include <cstdint>

extern "C" {

int qse_abi_version() { return 2; }

// w: float32 [n]; packed: uint8 [(n + 1) / 2], high nibble first; absmax: float32 per block;
// code: float32 [16]. Every `stride`-th block (1: all). out: {sum w^2, sum (w - code[q] * absmax[block])^2}
// over those blocks.
void qse_error_4bit(const float* w, const uint8_t* packed, const float* absmax, const float* code,
                    int64_t n, int64_t blocksize, int64_t stride, double* out) {
    double sum_w = 0.0, sum_e = 0.0;
    for (int64_t start = 0; start < n; start += blocksize * stride) {
        const int64_t end = start + blocksize < n ? start + blocksize : n;
        const float scale = absmax[start / blocksize];
        // 16 independent float32 lanes (the compiler vectorizes them; one running sum would wait
        // on each add), summed and added in double per block. start is even: lane j of a group
        // is byte (i + j) / 2, high nibble for even j.
        float lw[16] = {0}, le[16] = {0};
        int64_t i = start;
        for (; i + 16 <= end; i += 16) {
            const uint8_t* bytes = packed + (i >> 1);
            for (int j = 0; j < 16; ++j) {
                const uint8_t byte = bytes[j >> 1];
                const int q = (j & 1) ? (byte & 0xF) : (byte >> 4);
                const float x = w[i + j];
                const float d = x - code[q] * scale;
                lw[j] += x * x;
                le[j] += d * d;
            }
        }
        for (; i < end; ++i) {
            const uint8_t byte = packed[i >> 1];
            const int q = (i & 1) ? (byte & 0xF) : (byte >> 4);
            const float d = w[i] - code[q] * scale;
            lw[0] += w[i] * w[i];
            le[0] += d * d;
        }
        double block_w = 0.0, block_e = 0.0;
        for (int j = 0; j < 16; ++j) {
            block_w += lw[j];
            block_e += le[j];
        }
        sum_w += block_w;
        sum_e += block_e;
    }
    out[0] = sum_w;
    out[1] = sum_e;
}

// w: float32 [rows, cols]; CB: int8 [rows, cols]; SCB: float32 [rows]. Dequantized as
// int8_vectorwise_dequant: (CB * SCB) * (float32 1/127). Every `stride`-th row. out as above.
void qse_error_int8(const float* w, const int8_t* CB, const float* SCB, int64_t rows, int64_t cols, int64_t stride,
                    double* out) {
    const float inv127 = 7.874015718698502e-3f;
    double sum_w = 0.0, sum_e = 0.0;
    for (int64_t r = 0; r < rows; r += stride) {
        const float scale = SCB[r];
        const float* wr = w + r * cols;
        const int8_t* cr = CB + r * cols;
        float lw[16] = {0}, le[16] = {0};  // independent lanes, as above
        int64_t c = 0;
        for (; c + 16 <= cols; c += 16) {
            for (int j = 0; j < 16; ++j) {
                const float x = wr[c + j];
                const float d = x - ((float)cr[c + j] * scale) * inv127;
                lw[j] += x * x;
                le[j] += d * d;
            }
        }
        for (; c < cols; ++c) {
            const float d = wr[c] - ((float)cr[c] * scale) * inv127;
            lw[0] += wr[c] * wr[c];
            le[0] += d * d;
        }
        for (int j = 0; j < 16; ++j) {
            sum_w += lw[j];
            sum_e += le[j];
        }
    }
    out[0] = sum_w;
    out[1] = sum_e;
}

}  // extern "C"
