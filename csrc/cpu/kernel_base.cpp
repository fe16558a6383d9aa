// Kernels for the compiler's baseline instruction set (SSE2 on x86-64, NEON on arm64).
#define LBW_KERNEL_NS base
#include "adamw_kernel.h"
