// Interface between the torch binding (fused_adamw_cpu.cpp) and the torch-free kernels
// (adamw_kernel.h, compiled once per instruction set by kernel_*.cpp). Contract: version 2
// (lbw_kernels/contract.py).
#pragma once
#include <cstdint>

namespace lbw_cpu {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// The per-tensor scalars of contract.coefficients, each rounded once from double to fp32.
struct Coeffs {
  float step_size;
  float bc2_sqrt;
  float decay;
  float one_minus_beta1;
  float beta2;
  float one_minus_beta2;
  float eps;
  float prev_m;
  float prev_v;
  float spike_scale;
};

// One contiguous range of one tensor (p and g in the bucket's dtype; m and v fp32).
struct RangeArgs {
  void* p;
  const void* g;
  float* m;
  float* v;
  int64_t n;
  Coeffs c;
  float spike_floor;  // the spike bound's floor (contract.spike_floor; 0: none)
  float inv_scale;  // GradScaler's 1 / scale (1 without a scaler)
  float clip;       // clip_grad_norm_'s coefficient (1 without clipping)
};

// Which specialisation of the range kernel runs (the work it can skip); see select().
enum RangeFlags : int {
  kRangeWrite = 1,  // the group's applied gate is 1: update p, m, v (else telemetry only)
  kRangeSpike = 2,  // spike_scale is not +inf (with +inf no element can spike)
  kRangeClamp = 4,  // CLAMP: clamp spikes to the bound
  kRangeMask = 8,   // MASK_NONFINITE: never write an element whose gradient is not finite
  kRangeUnit = 16,  // inv_scale == 1 and clip == 1
};

// Sums of one range, in TENSOR_FIELDS order: grad_sq, update_sq, param_sq, grad_dot_update,
// grad_dot_prev, prev_sq, moment1_sq, moment2_sum; then the exact counts.
constexpr int kNumSums = 8;
// An outlier's second moment grows by this factor per step (contract.SPIKE_V_GROWTH).
constexpr float kSpikeVGrowth = 1.1f;
struct Partials {
  double sums[kNumSums];
  int64_t spikes;
  int64_t nonfinite;
};

using RangeFn = void (*)(const RangeArgs&, Partials&);
// Sum of squares of n gradient elements in double (NaN/inf propagate).
using SquaresFn = double (*)(const void* g, int64_t n);

// One kernel table per instruction set.
namespace base {
RangeFn select(DType dtype, int flags);  // flags: RangeFlags
SquaresFn select_squares(DType dtype);
}  // namespace base
namespace avx2 {
RangeFn select(DType dtype, int flags);  // flags: RangeFlags
SquaresFn select_squares(DType dtype);
}  // namespace avx2
namespace avx512 {
RangeFn select(DType dtype, int flags);  // flags: RangeFlags
SquaresFn select_squares(DType dtype);
}  // namespace avx512

}  // namespace lbw_cpu
