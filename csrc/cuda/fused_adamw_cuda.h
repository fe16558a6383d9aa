// Launcher interface of the CUDA fused guarded AdamW kernel. Torch-free on purpose: the .cu
// builds with plain nvcc (and is compile-checked that way on machines without a CUDA torch);
// fused_adamw_cuda_binding.cpp is the thin torch side.
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

namespace lbw_cuda {

enum DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

constexpr int kChunkElems = 16384;  // elements per chunk (one thread block)
constexpr int kThreads = 256;       // threads per block, both kernels
constexpr int kNumPartials = 6;     // grad_sq, update_sq, param_sq, grad_dot_update, outliers, nonfinite
constexpr int kNumCoeffs = 9;       // columns of the coefficient table (contract.py)

// One tensor of the bucket. All pointers are device pointers; m and v are fp32.
struct TensorDesc {
  void* p;
  const void* g;
  float* m;
  float* v;
  int64_t n;
  int32_t group;
  int32_t aligned;  // 1: p, g, m, v all 16-byte aligned, so 4-element vector accesses are legal
};

// One chunk: elements [offset, min(offset + kChunkElems, n)) of tensors[tensor].
struct ChunkDesc {
  int64_t offset;
  int32_t tensor;
  int32_t pad;
};

// Runs the update over every chunk, then reduces the per-chunk partials per group in a fixed
// order into out[num_groups * kNumPartials] (float64). `partials` is scratch of
// num_chunks * kNumPartials doubles. coeffs is the [num_tensors, 9] fp32 table;
// inv_grad_scale and clip_coef point to fp32 scalars on the device (no host sync).
cudaError_t launch_fused_adamw(DType param_dtype, DType grad_dtype, const TensorDesc* tensors,
                               const ChunkDesc* chunks, int num_chunks, const float* coeffs,
                               const float* inv_grad_scale, const float* clip_coef,
                               double* partials, int num_groups, double* out,
                               cudaStream_t stream);

}  // namespace lbw_cuda
