// Runs the kernels of fused_adamw_cuda.cu on the CPU, for tests on machines without a GPU
// (tests/test_cpp_backends.py builds it with a host C++ compiler; it is not part of the
// extension). Every CUDA thread of a block is a cooperative fiber (ucontext) on the calling
// thread; blocks run one after the other, so `__shared__` variables can be function statics.
// __syncthreads is a block barrier, and the warp shuffles exchange values through a per-warp
// slot array between two warp barriers; a fiber waiting at a barrier yields to the next one.
// The fp32/fp64 intrinsics map to the IEEE host operations (build with -ffp-contract=off),
// which is what the round-to-nearest intrinsics compute on the GPU; exp2/log2/log come from
// the host libm, which may differ from CUDA's in the last bit of a double.
//
// The launch syntax `kernel<<<grid, block, smem, stream>>>(args)` is not C++: the test rewrites
// each launch into `lbw_emu::launch(grid, block, smem, stream, [&] { kernel(args); })` before
// compiling.
#pragma once

#include <ucontext.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static

using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
struct uint4 { uint32_t x, y, z, w; };
struct float4 { float x, y, z, w; };

namespace lbw_emu {

struct Dim { unsigned x = 0, y = 0, z = 0; };
inline Dim thread_idx, block_idx, block_dim, grid_dim;

struct Barrier {
  int expected = 0;
  int arrived = 0;
  uint64_t generation = 0;
};

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  bool done = false;
};

struct Block {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  int current = 0;
  Barrier sync;
  std::vector<Barrier> warps;
  std::vector<uint64_t> slots;
  const std::function<void()>* kernel = nullptr;
};
inline Block* block = nullptr;

inline void yield() {
  Fiber& f = block->fibers[block->current];
  swapcontext(&f.context, &block->scheduler);
  thread_idx = {static_cast<unsigned>(block->current), 0, 0};
}

inline void wait(Barrier& b) {
  const uint64_t gen = b.generation;
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  while (b.generation == gen) yield();
}

inline void fiber_main() {
  (*block->kernel)();
  block->fibers[block->current].done = true;
  swapcontext(&block->fibers[block->current].context, &block->scheduler);
}

template <class T>
T exchange(T value, int src_lane, bool in_range) {
  static_assert(sizeof(T) <= 8, "shuffles of up to 8 bytes");
  const int tid = static_cast<int>(thread_idx.x);
  const int warp = tid / 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  block->slots[tid] = bits;
  wait(block->warps[warp]);
  T out = value;
  if (in_range) std::memcpy(&out, &block->slots[warp * 32 + src_lane], sizeof(T));
  wait(block->warps[warp]);
  return out;
}

inline void launch(unsigned grid, unsigned threads, int /*smem*/, cudaStream_t /*stream*/,
                   const std::function<void()>& kernel) {
  grid_dim = {grid, 1, 1};
  block_dim = {threads, 1, 1};
  Block state;
  state.kernel = &kernel;
  state.fibers.resize(threads);
  for (auto& f : state.fibers) f.stack.resize(256 * 1024);
  block = &state;
  for (unsigned b = 0; b < grid; ++b) {
    block_idx = {b, 0, 0};
    state.sync = Barrier{static_cast<int>(threads), 0, 0};
    state.warps.assign(threads / 32, Barrier{32, 0, 0});
    state.slots.assign(threads, 0);
    for (auto& f : state.fibers) {
      f.done = false;
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = f.stack.data();
      f.context.uc_stack.ss_size = f.stack.size();
      f.context.uc_link = nullptr;
      makecontext(&f.context, fiber_main, 0);
    }
    // Round robin until every fiber of the block has returned.
    for (bool live = true; live;) {
      live = false;
      for (unsigned t = 0; t < threads; ++t) {
        if (state.fibers[t].done) continue;
        state.current = static_cast<int>(t);
        thread_idx = {t, 0, 0};
        swapcontext(&state.scheduler, &state.fibers[t].context);
        live = live || !state.fibers[t].done;
      }
    }
  }
  block = nullptr;
}

}  // namespace lbw_emu

#define threadIdx (lbw_emu::thread_idx)
#define blockIdx (lbw_emu::block_idx)
#define blockDim (lbw_emu::block_dim)
#define gridDim (lbw_emu::grid_dim)

inline void __syncthreads() { lbw_emu::wait(lbw_emu::block->sync); }
inline void __threadfence() {}
template <class T>
T __shfl_sync(unsigned, T v, int src) { return lbw_emu::exchange(v, src & 31, true); }
template <class T>
T __shfl_down_sync(unsigned, T v, unsigned delta) {
  const int lane = static_cast<int>(threadIdx.x & 31);
  return lbw_emu::exchange(v, lane + static_cast<int>(delta), lane + static_cast<int>(delta) < 32);
}
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
template <class T>
T __ldg(const T* p) { return *p; }
template <class T>
T __ldcg(const T* p) { return *p; }

inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __dsqrt_rn(double a) { return std::sqrt(a); }
inline float __double2float_rn(double a) { return static_cast<float>(a); }
inline uint32_t __float_as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int32_t i) { float f; std::memcpy(&f, &i, 4); return f; }
inline double __longlong_as_double(long long i) { double d; std::memcpy(&d, &i, 8); return d; }
inline float fabsf(float x) { return std::fabs(x); }
inline float copysignf(float a, float b) { return std::copysign(a, b); }
using std::exp2;
using std::isfinite;
using std::isnan;
using std::log;
using std::log2;
