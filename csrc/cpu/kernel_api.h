// Interface between the torch binding (fused_adamw_cpu.cpp) and the torch-free kernels
// (adamw_kernel.h, compiled once per instruction set by kernel_*.cpp).
#pragma once
#include <cstdint>

namespace lbw_cpu {

// Columns of the per-tensor coefficient table; must match lbw_kernels/contract.py.
enum Coeff : int {
  kStepSize = 0,
  kBc2Sqrt = 1,
  kDecay = 2,
  kOneMinusBeta1 = 3,
  kBeta2 = 4,
  kOneMinusBeta2 = 5,
  kEps = 6,
  kOutlierScale = 7,
  kGate = 8,
  kNumCoeffs = 9,
};

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// One contiguous range of one tensor; m and v are fp32.
struct RangeArgs {
  void* p;
  const void* g;
  float* m;
  float* v;
  int64_t n;
  const float* coeffs;  // this tensor's row of the table
  float inv_scale;
  float clip;
};

// Telemetry of one range: grad_sq, update_sq, param_sq, grad_dot_update; then counts.
struct Partials {
  double sums[4];
  int64_t outliers;
  int64_t nonfinite;
};

using RangeFn = void (*)(const RangeArgs&, Partials&);

// One kernel table per instruction set; `write` false is the gate-0 path (read only).
namespace base { RangeFn select(DType param, DType grad, bool write); }
namespace avx2 { RangeFn select(DType param, DType grad, bool write); }
namespace avx512 { RangeFn select(DType param, DType grad, bool write); }

}  // namespace lbw_cpu
