// Torch side of the CUDA backend: validates the bucket, builds the chunk table, and calls the
// torch-free launcher in fused_adamw_cuda.cu on torch's current stream. No host sync: the
// table travels in one non-blocking copy from pinned memory and the scalars stay on device.
#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstring>
#include <vector>

#include "fused_adamw_cuda.h"

namespace {

lbw_cuda::DType to_dtype(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return lbw_cuda::kFloat32;
    case at::kBFloat16: return lbw_cuda::kBFloat16;
    case at::kHalf: return lbw_cuda::kFloat16;
    default:
      TORCH_CHECK(false, "lbw-guard cuda backend: ", what, " must be float32, bfloat16 or ",
                  "float16, got ", t.scalar_type());
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

at::Tensor fused_adamw_cuda(std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
                            std::vector<at::Tensor> exp_avgs,
                            std::vector<at::Tensor> exp_avg_sqs, at::Tensor coeffs,
                            std::vector<int64_t> group_ids, int64_t num_groups,
                            at::Tensor inv_grad_scale, at::Tensor clip_coef) {
  const int64_t T = static_cast<int64_t>(params.size());
  TORCH_CHECK(grads.size() == params.size() && exp_avgs.size() == params.size() &&
                  exp_avg_sqs.size() == params.size() && group_ids.size() == params.size(),
              "lbw-guard cuda backend: list lengths differ");
  TORCH_CHECK(coeffs.is_cuda() && coeffs.dim() == 2 && coeffs.size(0) == T &&
                  coeffs.size(1) == lbw_cuda::kNumCoeffs,
              "coeffs must be a CUDA tensor of shape [", T, ", 9]");
  const at::Device device = coeffs.device();
  const c10::cuda::CUDAGuard guard(device);
  auto out = at::zeros({num_groups, lbw_cuda::kNumPartials},
                       at::TensorOptions().dtype(at::kDouble).device(device));
  if (T == 0 || num_groups == 0) return out;
  coeffs = coeffs.to(at::kFloat).contiguous();
  auto inv = inv_grad_scale.to(device, at::kFloat).reshape({1}).contiguous();
  auto clip = clip_coef.to(device, at::kFloat).reshape({1}).contiguous();

  const lbw_cuda::DType pdt = to_dtype(params[0], "params");
  const lbw_cuda::DType gdt = to_dtype(grads[0], "grads");
  std::vector<lbw_cuda::TensorDesc> tensors(T);
  std::vector<lbw_cuda::ChunkDesc> chunks;
  for (int64_t i = 0; i < T; ++i) {
    const at::Tensor &p = params[i], &g = grads[i], &m = exp_avgs[i], &v = exp_avg_sqs[i];
    TORCH_CHECK(p.device() == device && g.device() == device && m.device() == device &&
                    v.device() == device,
                "lbw-guard cuda backend: tensor ", i, " is not on ", device);
    TORCH_CHECK(p.is_contiguous() && g.is_contiguous() && m.is_contiguous() && v.is_contiguous(),
                "lbw-guard cuda backend: tensor ", i, " is not contiguous");
    TORCH_CHECK(to_dtype(p, "params") == pdt && to_dtype(g, "grads") == gdt,
                "lbw-guard cuda backend: one bucket must have one param and one grad dtype");
    TORCH_CHECK(m.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
                "lbw-guard cuda backend: optimizer states must be float32");
    TORCH_CHECK(g.numel() == p.numel() && m.numel() == p.numel() && v.numel() == p.numel(),
                "lbw-guard cuda backend: tensor ", i, ": sizes differ");
    TORCH_CHECK(group_ids[i] >= 0 && group_ids[i] < num_groups, "group id out of range");
    tensors[i] = {p.data_ptr(), g.data_ptr(), m.data_ptr<float>(), v.data_ptr<float>(),
                  p.numel(), static_cast<int32_t>(group_ids[i]),
                  aligned16(p.data_ptr()) && aligned16(g.data_ptr()) &&
                          aligned16(m.data_ptr()) && aligned16(v.data_ptr())
                      ? 1
                      : 0};
    for (int64_t off = 0; off < p.numel(); off += lbw_cuda::kChunkElems)
      chunks.push_back({off, static_cast<int32_t>(i), 0});
  }
  TORCH_CHECK(chunks.size() < (1u << 31), "lbw-guard cuda backend: too many chunks");

  // One pinned staging buffer for both tables, one async copy. The caching host allocator
  // keeps the staging memory alive until the copy has run on this stream.
  const size_t tbytes = tensors.size() * sizeof(lbw_cuda::TensorDesc);
  const size_t cbytes = chunks.size() * sizeof(lbw_cuda::ChunkDesc);
  auto staging = at::empty({static_cast<int64_t>(tbytes + cbytes)},
                           at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(staging.data_ptr(), tensors.data(), tbytes);
  std::memcpy(static_cast<char*>(staging.data_ptr()) + tbytes, chunks.data(), cbytes);
  auto table = staging.to(device, /*non_blocking=*/true);
  auto partials = at::empty({static_cast<int64_t>(std::max<size_t>(chunks.size(), 1)) *
                                 lbw_cuda::kNumPartials},
                            at::TensorOptions().dtype(at::kDouble).device(device));

  const auto* dev_tensors = reinterpret_cast<const lbw_cuda::TensorDesc*>(table.data_ptr());
  const auto* dev_chunks =
      reinterpret_cast<const lbw_cuda::ChunkDesc*>(static_cast<char*>(table.data_ptr()) + tbytes);
  const cudaError_t err = lbw_cuda::launch_fused_adamw(
      pdt, gdt, dev_tensors, dev_chunks, static_cast<int>(chunks.size()),
      coeffs.data_ptr<float>(), inv.data_ptr<float>(), clip.data_ptr<float>(),
      partials.data_ptr<double>(), static_cast<int>(num_groups), out.data_ptr<double>(),
      c10::cuda::getCurrentCUDAStream(device.index()).stream());
  TORCH_CHECK(err == cudaSuccess, "lbw-guard cuda backend: launch failed: ",
              cudaGetErrorString(err));
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lbw-guard fused guarded AdamW step, CUDA C++ backend";
  m.def("fused_adamw", &fused_adamw_cuda, "Fused guarded AdamW step (see contract.py)",
        py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
        py::arg("coeffs"), py::arg("group_ids"), py::arg("num_groups"),
        py::arg("inv_grad_scale"), py::arg("clip_coef"));
}
