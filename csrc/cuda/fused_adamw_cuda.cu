// CUDA fused guarded AdamW step (see lbw_kernels/contract.py), multi-tensor-apply style:
// a chunk table maps each thread block to (tensor, offset); every block writes its own
// telemetry partials; a second kernel sums them per group in a fixed order, so telemetry is
// bit-for-bit reproducible. Arithmetic uses the explicit round-to-nearest intrinsics, so no
// FMA contraction or fast-math flag can change the result.
#include "fused_adamw_cuda.h"

#include <cstdint>

namespace lbw_cuda {
namespace {

// Columns of the coefficient table.
enum : int {
  kStepSize = 0, kBc2Sqrt = 1, kDecay = 2, kOneMinusBeta1 = 3, kBeta2 = 4,
  kOneMinusBeta2 = 5, kEps = 6, kOutlierScale = 7, kGate = 8,
};

struct bf16_t { uint16_t x; };
struct half_t { uint16_t x; };

__device__ __forceinline__ float load_f(const float* p) { return *p; }
__device__ __forceinline__ float load_f(const bf16_t* p) {
  return __uint_as_float(uint32_t(p->x) << 16);
}
__device__ __forceinline__ float load_f(const half_t* p) {
  const uint32_t h = p->x;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t em = (h & 0x7fffu) << 13;
  const uint32_t finite = __float_as_uint(__fmul_rn(__uint_as_float(em), 0x1p112f));
  return __uint_as_float(((h & 0x7c00u) == 0x7c00u ? (em | 0x7f800000u) : finite) | sign);
}

// Round to nearest even, NaN encoded as torch does.
__device__ __forceinline__ void store_f(float* p, float f) { *p = f; }
__device__ __forceinline__ void store_f(bf16_t* p, float f) {
  const uint32_t u = __float_as_uint(f);
  p->x = (u & 0x7fffffffu) > 0x7f800000u ? uint16_t(0x7fc0)
                                          : uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
__device__ __forceinline__ void store_f(half_t* p, float f) {
  const uint32_t u = __float_as_uint(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  uint32_t h;
  if (a > 0x7f800000u) {
    h = 0x7e00u;
  } else if (a >= 0x47800000u) {
    h = 0x7c00u;
  } else if (a < (113u << 23)) {  // half subnormal: an fp32 add rounds at the right bit
    h = __float_as_uint(__fadd_rn(__uint_as_float(a), 0.5f)) - (126u << 23);
  } else {
    h = (a + ((15u - 127u) << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
  }
  p->x = uint16_t(h | sign);
}

struct Acc {
  double g2 = 0, u2 = 0, p2 = 0, gu = 0, outl = 0, nonf = 0;
};

template <bool kWrite, class P, class G>
__device__ __forceinline__ void element(P* p, const G* g, float* m, float* v, const float* c,
                                        float inv_scale, float clip, Acc& acc) {
  const float pf = load_f(p);
  float gr = __fmul_rn(load_f(g), inv_scale);
  const bool fin = isfinite(gr);
  gr = fin ? gr : 0.0f;
  const float gu = __fmul_rn(gr, clip);
  const float mo = *m, vo = *v;
  const bool outlier = fin && fabsf(gr) > __fmul_rn(c[kOutlierScale], __fsqrt_rn(vo));
  float u = 0.0f;
  if (kWrite && fin) {
    const float mn = __fadd_rn(mo, __fmul_rn(c[kOneMinusBeta1], __fsub_rn(gu, mo)));
    const float vn = __fadd_rn(__fmul_rn(vo, c[kBeta2]),
                               __fmul_rn(__fmul_rn(c[kOneMinusBeta2], gu), gu));
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vn), c[kBc2Sqrt]), c[kEps]);
    const float pn = __fsub_rn(__fmul_rn(pf, c[kDecay]),
                               __fmul_rn(c[kStepSize], __fdiv_rn(mn, denom)));
    u = __fsub_rn(pn, pf);
    store_f(p, pn);  // masked write: unwritten elements keep their exact bits
    *m = mn;
    *v = vn;
  }
  const double dg = gr, du = u, dp = pf;  // fp32 products are exact in double
  acc.g2 += dg * dg;
  acc.u2 += du * du;
  acc.p2 += dp * dp;
  acc.gu += dg * du;
  acc.outl += outlier ? 1.0 : 0.0;
  acc.nonf += fin ? 0.0 : 1.0;
}

// Fixed-shape block sum (shuffle tree, then warps in order): deterministic for a fixed kThreads.
__device__ double block_sum(double x, double* smem) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) smem[warp] = x;
  __syncthreads();
  double s = 0.0;
  if (threadIdx.x == 0)
    for (int w = 0; w < kThreads / 32; ++w) s += smem[w];
  return s;  // valid in thread 0
}

__device__ void write_partials(const Acc& acc, double* dst) {
  __shared__ double smem[kThreads / 32];
  const double vals[kNumPartials] = {acc.g2, acc.u2, acc.p2, acc.gu, acc.outl, acc.nonf};
  for (int k = 0; k < kNumPartials; ++k) {
    const double s = block_sum(vals[k], smem);
    if (threadIdx.x == 0) dst[k] = s;
  }
}

// Loads/stores 4 consecutive elements at once when the tensor is aligned: 16 bytes of fp32,
// 8 bytes of bf16/fp16.
template <class T> struct Vec4;
template <> struct Vec4<float> { using type = float4; };
template <> struct Vec4<bf16_t> { using type = uint2; };
template <> struct Vec4<half_t> { using type = uint2; };

template <bool kWrite, class P, class G>
__device__ void chunk_body(const TensorDesc& t, int64_t begin, int64_t end, const float* c,
                           float inv_scale, float clip, Acc& acc) {
  P* p = static_cast<P*>(t.p);
  const G* g = static_cast<const G*>(t.g);
  if (t.aligned) {
    // Whole groups of 4 with vector memory ops, in registers; begin is a multiple of 4.
    const int64_t vec_end = begin + (end - begin) / 4 * 4;
    for (int64_t i = begin + 4 * threadIdx.x; i < vec_end; i += 4 * kThreads) {
      typename Vec4<P>::type pv = *reinterpret_cast<const typename Vec4<P>::type*>(p + i);
      const typename Vec4<G>::type gv = *reinterpret_cast<const typename Vec4<G>::type*>(g + i);
      float4 mv = *reinterpret_cast<const float4*>(t.m + i);
      float4 vv = *reinterpret_cast<const float4*>(t.v + i);
      P* pe = reinterpret_cast<P*>(&pv);
      const G* ge = reinterpret_cast<const G*>(&gv);
      float* me = reinterpret_cast<float*>(&mv);
      float* ve = reinterpret_cast<float*>(&vv);
#pragma unroll
      for (int k = 0; k < 4; ++k) element<kWrite>(pe + k, ge + k, me + k, ve + k, c, inv_scale, clip, acc);
      if (kWrite) {
        *reinterpret_cast<typename Vec4<P>::type*>(p + i) = pv;
        *reinterpret_cast<float4*>(t.m + i) = mv;
        *reinterpret_cast<float4*>(t.v + i) = vv;
      }
    }
    begin = vec_end;
  }
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads)
    element<kWrite>(p + i, g + i, t.m + i, t.v + i, c, inv_scale, clip, acc);
}

template <class P, class G>
__global__ void __launch_bounds__(kThreads)
fused_adamw_kernel(const TensorDesc* __restrict__ tensors, const ChunkDesc* __restrict__ chunks,
                   const float* __restrict__ coeffs, const float* __restrict__ inv_grad_scale,
                   const float* __restrict__ clip_coef, double* __restrict__ partials) {
  const ChunkDesc ch = chunks[blockIdx.x];
  const TensorDesc t = tensors[ch.tensor];
  const float* c = coeffs + int64_t(ch.tensor) * kNumCoeffs;
  const float inv_scale = *inv_grad_scale, clip = *clip_coef;
  const int64_t end = ch.offset + kChunkElems < t.n ? ch.offset + kChunkElems : t.n;
  Acc acc;
  if (c[kGate] != 0.0f)
    chunk_body<true, P, G>(t, ch.offset, end, c, inv_scale, clip, acc);
  else  // gated: telemetry only, no stores at all
    chunk_body<false, P, G>(t, ch.offset, end, c, inv_scale, clip, acc);
  write_partials(acc, partials + int64_t(blockIdx.x) * kNumPartials);
}

// One block per group: thread t sums chunks t, t + kThreads, ... of that group in order, then
// a fixed block tree. Deterministic for a given chunk table.
__global__ void __launch_bounds__(kThreads)
reduce_groups_kernel(const TensorDesc* __restrict__ tensors, const ChunkDesc* __restrict__ chunks,
                     int num_chunks, const double* __restrict__ partials, double* __restrict__ out) {
  __shared__ double smem[kThreads / 32];
  const int group = blockIdx.x;
  double acc[kNumPartials] = {};
  for (int i = threadIdx.x; i < num_chunks; i += kThreads) {
    if (tensors[chunks[i].tensor].group != group) continue;
    for (int k = 0; k < kNumPartials; ++k) acc[k] += partials[int64_t(i) * kNumPartials + k];
  }
  for (int k = 0; k < kNumPartials; ++k) {
    const double s = block_sum(acc[k], smem);
    if (threadIdx.x == 0) out[group * kNumPartials + k] = s;
  }
}

template <class P, class G>
void launch_update(const TensorDesc* tensors, const ChunkDesc* chunks, int num_chunks,
                   const float* coeffs, const float* inv_scale, const float* clip,
                   double* partials, cudaStream_t stream) {
  fused_adamw_kernel<P, G><<<num_chunks, kThreads, 0, stream>>>(tensors, chunks, coeffs,
                                                                inv_scale, clip, partials);
}

template <class P>
void dispatch_grad(DType grad, const TensorDesc* tensors, const ChunkDesc* chunks,
                   int num_chunks, const float* coeffs, const float* inv_scale,
                   const float* clip, double* partials, cudaStream_t stream) {
  switch (grad) {
    case kFloat32: return launch_update<P, float>(tensors, chunks, num_chunks, coeffs, inv_scale, clip, partials, stream);
    case kBFloat16: return launch_update<P, bf16_t>(tensors, chunks, num_chunks, coeffs, inv_scale, clip, partials, stream);
    case kFloat16: return launch_update<P, half_t>(tensors, chunks, num_chunks, coeffs, inv_scale, clip, partials, stream);
  }
}

}  // namespace

cudaError_t launch_fused_adamw(DType param_dtype, DType grad_dtype, const TensorDesc* tensors,
                               const ChunkDesc* chunks, int num_chunks, const float* coeffs,
                               const float* inv_grad_scale, const float* clip_coef,
                               double* partials, int num_groups, double* out,
                               cudaStream_t stream) {
  if (num_groups <= 0) return cudaSuccess;
  if (num_chunks > 0) {
    switch (param_dtype) {
      case kFloat32: dispatch_grad<float>(grad_dtype, tensors, chunks, num_chunks, coeffs, inv_grad_scale, clip_coef, partials, stream); break;
      case kBFloat16: dispatch_grad<bf16_t>(grad_dtype, tensors, chunks, num_chunks, coeffs, inv_grad_scale, clip_coef, partials, stream); break;
      case kFloat16: dispatch_grad<half_t>(grad_dtype, tensors, chunks, num_chunks, coeffs, inv_grad_scale, clip_coef, partials, stream); break;
      default: return cudaErrorInvalidValue;
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  reduce_groups_kernel<<<num_groups, kThreads, 0, stream>>>(tensors, chunks, num_chunks, partials, out);
  return cudaGetLastError();
}

}  // namespace lbw_cuda
