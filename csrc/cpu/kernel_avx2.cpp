// Kernels for x86-64 with AVX2 (+F16C), chosen at run time. FMA is left off (and the build
// has -ffp-contract=off): the contract rounds every multiply and add separately.
#include "kernel_api.h"
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#pragma GCC push_options
#pragma GCC target("avx2,f16c")
#define LBW_F32_WIDTH 8
#define LBW_KERNEL_NS avx2
#include "adamw_kernel.h"
#pragma GCC pop_options
#else
namespace lbw_cpu { namespace avx2 {
RangeFn select(DType, int) { return nullptr; }
SquaresFn select_squares(DType) { return nullptr; }
} }
#endif
