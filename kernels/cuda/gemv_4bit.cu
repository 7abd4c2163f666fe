// torch binding of the batch-1 4-bit GEMV (gemv_4bit.cuh): the operator quant_cuda::gemv_4bit.
//
//   gemv_4bit(Tensor x, Tensor w, Tensor code, Tensor absmax, Tensor? nested_absmax,
//             Tensor? nested_code, float offset, int n, int blocksize, int nested_blocksize,
//             Tensor? bias) -> Tensor
//
// x: [K] (or [1, K]) float32 / float16 / bfloat16, contiguous; w: the packed weight as uint8
// [n * K / 2]; code: float32 [16]; absmax: float32 [blocks], or uint8 codes with nested_absmax
// (float32) and nested_code (float32 [256]). Returns [1, n] in x's dtype. Checks raise (TORCH_CHECK)
// so a bad call never reaches the kernel; quant/backends/cuda.py only calls it for supported shapes.
// Launches on the current stream, allocates only the output: CUDA-graph capturable. Built by
// kernels/cuda/build.py (torch.utils.cpp_extension, hipified on ROCm).
//
// Only device-agnostic torch headers: the stream comes from the device's guard implementation
// (c10::Stream::native_handle() is the CUDA stream, or the HIP stream on ROCm), so the file needs no
// c10/cuda or ATen/cuda header and hipify only has to rename the runtime calls.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include "gemv_4bit.cuh"

namespace quantserve {
namespace {

constexpr int kRowsPerBlock = 4;  // teams of 32 lanes per thread block
constexpr int kUnroll = 4;        // 16-byte chunks in flight per lane (64 bytes)

int log2_exact(int64_t v, const char* what) {
  TORCH_CHECK(v > 0 && (v & (v - 1)) == 0, what, " must be a power of two, got ", v);
  int s = 0;
  while ((int64_t{1} << s) < v) ++s;
  return s;
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

template <typename T>
void launch(const at::Tensor& x, const at::Tensor& w, const at::Tensor& code, const at::Tensor& absmax,
            const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& nested_code,
            double offset, int64_t n, int64_t k, int blocksize_shift, int nested_shift,
            const c10::optional<at::Tensor>& bias, at::Tensor& out) {
  using S = typename Act<T>::Storage;
  const bool nested = nested_absmax.has_value();
  const dim3 block(kTeam * kRowsPerBlock);
  const dim3 grid(static_cast<unsigned>((n + kRowsPerBlock - 1) / kRowsPerBlock));
  const c10::Stream current = c10::impl::getDeviceGuardImpl(x.device().type())->getStream(x.device());
  const cudaStream_t stream = static_cast<cudaStream_t>(current.native_handle());
  const S* x_p = reinterpret_cast<const S*>(x.data_ptr());
  const S* bias_p = bias.has_value() ? reinterpret_cast<const S*>(bias->data_ptr()) : nullptr;
  S* out_p = reinterpret_cast<S*>(out.data_ptr());
  const uint8_t* w_p = w.data_ptr<uint8_t>();
  if (nested) {
    gemv_4bit_kernel<T, true, kRowsPerBlock, kUnroll><<<grid, block, 0, stream>>>(
        x_p, w_p, code.data_ptr<float>(), nullptr, absmax.data_ptr<uint8_t>(), nested_absmax->data_ptr<float>(),
        nested_code->data_ptr<float>(), static_cast<float>(offset), bias_p, out_p, n, k, blocksize_shift,
        nested_shift);
  } else {
    gemv_4bit_kernel<T, false, kRowsPerBlock, kUnroll><<<grid, block, 0, stream>>>(
        x_p, w_p, code.data_ptr<float>(), absmax.data_ptr<float>(), nullptr, nullptr, nullptr, 0.f, bias_p, out_p,
        n, k, blocksize_shift, nested_shift);
  }
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "gemv_4bit launch failed: ", cudaGetErrorString(err));
}

at::Tensor gemv_4bit(const at::Tensor& x, const at::Tensor& w, const at::Tensor& code, const at::Tensor& absmax,
                     const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& nested_code,
                     double offset, int64_t n, int64_t blocksize, int64_t nested_blocksize,
                     const c10::optional<at::Tensor>& bias) {
  const int64_t k = x.numel();
  TORCH_CHECK(x.is_cuda() && x.is_contiguous(), "x must be a contiguous GPU tensor");
  TORCH_CHECK(x.dim() == 1 || (x.dim() == 2 && x.size(0) == 1), "x must be [K] or [1, K]");
  TORCH_CHECK(k % 32 == 0 && k > 0, "K must be a positive multiple of 32, got ", k);
  TORCH_CHECK(blocksize >= 32, "blocksize must be >= 32, got ", blocksize);
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous() && w.numel() == n * k / 2,
              "w must be contiguous uint8 with n * K / 2 bytes");
  TORCH_CHECK(aligned16(x) && aligned16(w), "x and w must be 16-byte aligned");
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == 16, "code must be float32 [16]");
  TORCH_CHECK(nested_absmax.has_value() == nested_code.has_value(), "nested_absmax and nested_code go together");
  const int64_t blocks = (n * k + blocksize - 1) / blocksize;
  if (nested_absmax.has_value()) {
    TORCH_CHECK(absmax.scalar_type() == at::kByte && absmax.numel() >= blocks, "nested absmax codes must be uint8");
    TORCH_CHECK(nested_absmax->scalar_type() == at::kFloat, "nested_absmax must be float32");
    TORCH_CHECK(nested_code->scalar_type() == at::kFloat && nested_code->numel() == 256,
                "nested_code must be float32 [256]");
  } else {
    TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.numel() >= blocks, "absmax must be float32 [blocks]");
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->is_contiguous() && bias->numel() == n,
                "bias must be contiguous [n] in x's dtype");
  }
  const int blocksize_shift = log2_exact(blocksize, "blocksize");
  const int nested_shift = log2_exact(nested_blocksize, "nested_blocksize");

  const c10::DeviceGuard device_guard(x.device());
  at::Tensor out = at::empty({1, n}, x.options());
  switch (x.scalar_type()) {
    case at::kFloat:
      launch<float>(x, w, code, absmax, nested_absmax, nested_code, offset, n, k, blocksize_shift, nested_shift, bias,
                    out);
      break;
    case at::kHalf:
      launch<__half>(x, w, code, absmax, nested_absmax, nested_code, offset, n, k, blocksize_shift, nested_shift, bias,
                     out);
      break;
    case at::kBFloat16:
      launch<Bf16Bits>(x, w, code, absmax, nested_absmax, nested_code, offset, n, k, blocksize_shift, nested_shift,
                       bias, out);
      break;
    default:
      TORCH_CHECK(false, "x must be float32, float16 or bfloat16, got ", x.scalar_type());
  }
  return out;
}

}  // namespace
}  // namespace quantserve

TORCH_LIBRARY(quant_cuda, m) {
  m.def(
      "gemv_4bit(Tensor x, Tensor w, Tensor code, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, "
      "float offset, int n, int blocksize, int nested_blocksize, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(quant_cuda, CUDA, m) { m.impl("gemv_4bit", &quantserve::gemv_4bit); }
