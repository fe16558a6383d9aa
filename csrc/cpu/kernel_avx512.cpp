// Kernels for x86-64 with AVX-512 (F/BW/VL), chosen at run time. AVX-512F brings FMA, so
// the build's -ffp-contract=off is what keeps every multiply and add separately rounded.
#include "kernel_api.h"
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,f16c")
#define LBW_F32_WIDTH 16
#define LBW_KERNEL_NS avx512
#include "adamw_kernel.h"
#pragma GCC pop_options
#else
namespace lbw_cpu { namespace avx512 {
RangeFn select(DType, int) { return nullptr; }
SquaresFn select_squares(DType) { return nullptr; }
} }
#endif
