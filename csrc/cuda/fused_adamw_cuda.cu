// CUDA fused guarded AdamW step (contract version 2, lbw_kernels/contract.py), multi-tensor-apply
// style, in two launches:
//
// 1. update_kernel: one block per chunk of one tensor (a cached chunk table maps blocks to
//    (tensor, offset)). Warp 0 computes the tensor's coefficients once per block from the
//    control table, the step counter and the step-wide scalars (step checks, applied gate,
//    bias corrections with exp2(s * log2(beta)) in fp64, each rounded once to fp32); then every
//    thread updates its elements (16-byte vector accesses when the tensor is aligned, a scalar
//    path otherwise) and accumulates the telemetry terms in fp64 (products of fp32 values are
//    exact there); a fixed-shape block reduction writes the chunk's partials.
// 2. finish_kernel: one block per tensor sums its chunks' partials in a fixed order, writes
//    its tensor_out row and its row of group signals, and advances its step counter by the
//    applied gate; the last block to arrive (an atomic counter, reset by that block) adds the
//    rows per group in bucket order and writes the record (group fields, gates, invalid flags,
//    globals). No serial chain over chunks, no host synchronisation.
//
// Arithmetic uses the explicit round-to-nearest intrinsics, so no FMA contraction or fast-math
// flag can change a result: params and moments match the contract bit for bit.
#include "fused_adamw_cuda.h"

#include <cstdint>

namespace lbw_cuda {
namespace {

// Columns of a group row and of the step-wide row of the control table.
enum : int { kLr = 0, kScale = 1, kGate = 2, kBeta1 = 3, kBeta2 = 4, kEps = 5, kWeightDecay = 6,
             kSpikeK = 7, kClamp = 8 };
enum : int { kLossLimit = 0, kCheckLoss = 1, kGradNormLimit = 2, kMaxGradNorm = 3,
             kMaskNonfinite = 4 };
// TENSOR_FIELDS (the first kNumSums are the fp64 sums of the partials).
enum : int { kTGradSq = 0, kTUpdateSq = 1, kTParamSq = 2, kTGradDotUpdate = 3,
             kTGradDotPrev = 4, kTPrevSq = 5, kTMoment1Sq = 6, kTMoment2Sum = 7, kTSpikes = 8,
             kTNonfinite = 9, kTNumel = 10 };
enum : int { kRLoss = 0, kRGradNorm = 1, kRStepOk = 2 };
constexpr double kOmegaLogClamp = 10.0;
constexpr float kClipEps = 1e-6f;
constexpr int kFinishTile = 64;  // tensors per shared-memory tile of the group sums

// Coefficient flags: which work the block does.
enum : int { kFWrite = 1, kFSpike = 2, kFClamp = 4, kFMask = 8 };

struct bf16_t { uint16_t x; };
struct half_t { uint16_t x; };

// ----------------------------------------------------------------- element types
// Raw bits (zero-extended to 32) <-> fp32: exact widening, round-to-nearest-even narrowing with
// torch's NaN encodings.
__device__ __forceinline__ float half_to_float(uint32_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t em = (h & 0x7fffu) << 13;
  const uint32_t finite = __float_as_uint(__fmul_rn(__uint_as_float(em), 0x1p112f));
  return __uint_as_float(((h & 0x7c00u) == 0x7c00u ? (em | 0x7f800000u) : finite) | sign);
}

template <class P> struct Type;
template <> struct Type<float> {
  static constexpr int kVec = 4;  // elements per 16-byte access
  __device__ static __forceinline__ float to_f(uint32_t b) { return __uint_as_float(b); }
  __device__ static __forceinline__ uint32_t bits(float f) { return __float_as_uint(f); }
};
template <> struct Type<bf16_t> {
  static constexpr int kVec = 8;
  __device__ static __forceinline__ float to_f(uint32_t b) { return __uint_as_float(b << 16); }
  __device__ static __forceinline__ uint32_t bits(float f) {
    const uint32_t u = __float_as_uint(f);
    return (u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  }
};
template <> struct Type<half_t> {
  static constexpr int kVec = 8;
  __device__ static __forceinline__ float to_f(uint32_t b) { return half_to_float(b); }
  __device__ static __forceinline__ uint32_t bits(float f) {
    const uint32_t u = __float_as_uint(f);
    const uint32_t sign = (u >> 16) & 0x8000u;
    const uint32_t a = u & 0x7fffffffu;
    uint32_t h;
    if (a > 0x7f800000u) {
      h = 0x7e00u;  // NaN, as torch's conversion writes it
    } else if (a >= 0x47800000u) {
      h = 0x7c00u;  // overflow to inf
    } else if (a < (113u << 23)) {  // half subnormal: an fp32 add rounds at the right bit
      h = __float_as_uint(__fadd_rn(__uint_as_float(a), 0.5f)) - (126u << 23);
    } else {
      h = (a + ((15u - 127u) << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
    }
    return h | sign;
  }
};

// Raw element k of a 16-byte vector of P.
template <class P>
__device__ __forceinline__ uint32_t raw_elem(const uint4& r, int k) {
  const uint32_t w[4] = {r.x, r.y, r.z, r.w};
  if (sizeof(P) == 4) return w[k];
  return (w[k >> 1] >> (16 * (k & 1))) & 0xffffu;
}
template <class P>
__device__ __forceinline__ void set_raw_elem(uint4& r, int k, uint32_t b) {
  uint32_t* w = reinterpret_cast<uint32_t*>(&r);
  if (sizeof(P) == 4) {
    w[k] = b;
  } else {
    const int s = 16 * (k & 1);
    w[k >> 1] = (w[k >> 1] & ~(0xffffu << s)) | (b << s);
  }
}
template <class P>
__device__ __forceinline__ uint32_t load_raw(const P* p) {
  if (sizeof(P) == 4) return *reinterpret_cast<const uint32_t*>(p);
  return *reinterpret_cast<const uint16_t*>(p);
}
template <class P>
__device__ __forceinline__ void store_raw(P* p, uint32_t b) {
  if (sizeof(P) == 4)
    *reinterpret_cast<uint32_t*>(p) = b;
  else
    *reinterpret_cast<uint16_t*>(p) = static_cast<uint16_t>(b);
}

// ----------------------------------------------------------------- the contract's scalars (fp64)
__device__ double load_scalar(const Scalar& s) {
  switch (s.type) {
    case kF64: return *static_cast<const double*>(s.ptr);
    case kF32: return *static_cast<const float*>(s.ptr);
    case kF16: return half_to_float(*static_cast<const uint16_t*>(s.ptr));
    case kBF16: return __uint_as_float(uint32_t(*static_cast<const uint16_t*>(s.ptr)) << 16);
    case kI64: return static_cast<double>(*static_cast<const long long*>(s.ptr));
    case kI32: return static_cast<double>(*static_cast<const int*>(s.ptr));
    case kU8: return static_cast<double>(*static_cast<const unsigned char*>(s.ptr));
    default: return 0.0;
  }
}

// base ** exponent as every backend computes it: exp2(exponent * log2(base)), 0 ** 0 = 1.
__device__ double power(double base, double exponent) {
  if (base > 0.0) return exp2(__dmul_rn(exponent, log2(base)));
  return exponent == 0.0 ? 1.0 : 0.0;
}

__device__ __forceinline__ bool finite64(double x) { return isfinite(x); }

// contract.step_checks
__device__ bool step_ok(const StepArgs& a) {
  const double* row = a.control + int64_t(a.num_groups) * kNumControl;
  bool ok = true;
  if (a.found_inf.type != kNone) ok = ok && load_scalar(a.found_inf) == 0.0;
  if (a.grad_norm.type != kNone) {
    const double norm = load_scalar(a.grad_norm);
    ok = ok && finite64(norm) && norm <= row[kGradNormLimit];
  }
  if (a.loss.type != kNone) {
    const double loss = load_scalar(a.loss);
    const bool checked = finite64(loss) && loss <= row[kLossLimit];
    ok = ok && (checked || row[kCheckLoss] == 0.0);
  }
  return ok;
}

// contract.group_gates for one group row.
__device__ void group_gate(const double* row, bool ok, double& gate, double& invalid) {
  const double lr_eff = __dmul_rn(row[kLr], row[kScale]);
  bool valid = finite64(lr_eff) && lr_eff >= 0.0;
  valid = valid && finite64(row[kBeta1]) && finite64(row[kBeta2]) && finite64(row[kEps]) &&
          finite64(row[kWeightDecay]);
  valid = valid && row[kBeta1] >= 0.0 && row[kBeta1] < 1.0 && row[kBeta2] >= 0.0 &&
          row[kBeta2] < 1.0;
  valid = valid && row[kEps] >= 0.0 && row[kWeightDecay] >= 0.0 && !isnan(row[kSpikeK]);
  gate = (row[kGate] != 0.0 && valid && ok) ? 1.0 : 0.0;
  invalid = valid ? 0.0 : 1.0;
}

__device__ __forceinline__ double read_step(const TensorDesc& t) {
  return t.step_f64 ? *static_cast<const double*>(t.step)
                    : static_cast<double>(*static_cast<const float*>(t.step));
}

// The per-tensor fp32 coefficients of contract.coefficients, plus the step-wide ones.
struct Coef {
  float step_size, bc2_sqrt, decay, omb1, beta2, omb2, eps, prev_m, prev_v, spike_scale,
      spike_floor, clip, inv_scale;
  int flags;
};

// Called by warp 0 of a block: lanes 0-3 evaluate the four powers at once.
__device__ void compute_coef(const StepArgs& a, const TensorDesc& t, int32_t tensor, Coef& out) {
  const int lane = threadIdx.x & 31;
  const double* row = a.control + int64_t(t.group) * kNumControl;
  const double* srow = a.control + int64_t(a.num_groups) * kNumControl;
  const bool ok = step_ok(a);
  double gate, invalid;
  group_gate(row, ok, gate, invalid);
  const double s = read_step(t);
  const double b1 = row[kBeta1], b2 = row[kBeta2];
  double s_new = __dadd_rn(s, gate);
  s_new = s_new < 1.0 ? 1.0 : s_new;  // torch.clamp(min=1): NaN stays NaN
  const double pw = power((lane & 1) ? b2 : b1, (lane & 2) ? s_new : s);
  const double b1_s = __shfl_sync(0xffffffffu, pw, 0);
  const double b2_s = __shfl_sync(0xffffffffu, pw, 1);
  const double b1_new = __shfl_sync(0xffffffffu, pw, 2);
  const double b2_new = __shfl_sync(0xffffffffu, pw, 3);
  if (lane != 0) return;
  const double lr_eff = __dmul_rn(row[kLr], row[kScale]);
  const bool first = s < 1.0;
  const double bc1_prev = __dsub_rn(1.0, b1_s);
  const double bc2_prev = __dsub_rn(1.0, b2_s);
  const double prev_v = first ? 1.0 : __ddiv_rn(1.0, __dsqrt_rn(bc2_prev));
  Coef c;
  c.step_size = __double2float_rn(__ddiv_rn(lr_eff, __dsub_rn(1.0, b1_new)));
  c.bc2_sqrt = __double2float_rn(__dsqrt_rn(__dsub_rn(1.0, b2_new)));
  c.decay = __double2float_rn(__dsub_rn(1.0, __dmul_rn(lr_eff, row[kWeightDecay])));
  c.omb1 = __double2float_rn(__dsub_rn(1.0, b1));
  c.beta2 = __double2float_rn(b2);
  c.omb2 = __double2float_rn(__dsub_rn(1.0, b2));
  c.eps = __double2float_rn(row[kEps]);
  c.prev_m = first ? 0.0f : __double2float_rn(__ddiv_rn(1.0, bc1_prev));
  c.prev_v = __double2float_rn(prev_v);
  c.spike_scale = s < 2.0 ? __int_as_float(0x7f800000)  // contract: no bound before two steps
                        : __double2float_rn(__dmul_rn(row[kSpikeK], prev_v));
  // contract.spike_floor, from the previous step's sums (the finish kernel, launched after
  // this one, overwrites them).
  const double* t_in = a.tensor_out + int64_t(tensor) * a.tensor_out_stride0;
  const double numel_in = t_in[kTNumel * a.tensor_out_stride1];
  c.spike_floor = 0.0f;
  if (numel_in > 0.0) {
    const double rms = __dsqrt_rn(__ddiv_rn(t_in[kTMoment2Sum * a.tensor_out_stride1], numel_in));
    const float floor = __fmul_rn(c.spike_scale, __double2float_rn(rms));
    if ((__float_as_uint(floor) & 0x7f800000u) != 0x7f800000u) c.spike_floor = floor;
  }
  // clip_grad_norm_'s coefficient in fp32 (contract.clip_coefficient).
  c.clip = 1.0f;
  if (a.grad_norm.type != kNone) {
    const float max_norm = __double2float_rn(srow[kMaxGradNorm]);
    const float norm = __double2float_rn(load_scalar(a.grad_norm));
    float coef = __fdiv_rn(max_norm, __fadd_rn(norm, kClipEps));
    coef = coef > 1.0f ? 1.0f : coef;  // torch.clamp(max=1): NaN stays NaN
    c.clip = max_norm > 0.0f ? coef : 1.0f;
  }
  c.inv_scale = a.grad_scale.type != kNone
                    ? __fdiv_rn(1.0f, __double2float_rn(load_scalar(a.grad_scale)))
                    : 1.0f;
  int flags = 0;
  if (gate != 0.0) flags |= kFWrite;
  if (!(c.spike_scale == __int_as_float(0x7f800000))) flags |= kFSpike;
  if (row[kClamp] != 0.0) flags |= kFClamp;
  if (srow[kMaskNonfinite] != 0.0) flags |= kFMask;
  c.flags = flags;
  out = c;
}

// ----------------------------------------------------------------- the update
struct Acc {
  double g2 = 0, u2 = 0, p2 = 0, gu = 0, gd = 0, d2 = 0, m2 = 0, v1 = 0;
  unsigned spikes = 0, nonfinite = 0;
};

// One element: the contract's per-element step. m and v are updated in place and `p_bits`
// replaced by the new param's bits only where the element is written; the telemetry terms go
// to acc (fp64: products of fp32 values are exact).
template <class P>
__device__ __forceinline__ void element(uint32_t& p_bits, uint32_t g_bits, float& m, float& v,
                                        const Coef& c, Acc& acc) {
  const float pf = Type<P>::to_f(p_bits);
  const float gr = __fmul_rn(Type<P>::to_f(g_bits), c.inv_scale);  // GradScaler unscale
  const bool fin = (__float_as_uint(gr) & 0x7f800000u) != 0x7f800000u;
  const float gc = __fmul_rn(gr, c.clip);                          // fused max_grad_norm
  const float mo = m, vo = v;
  const float sv = __fsqrt_rn(vo);
  bool spike = false;
  float gm = gc;  // an outlier enters m at its typical size sqrt(v_hat); its v grows by 10%
  bool grown = false;
  if (c.flags & kFSpike) {  // k * sqrt(v_hat); with an infinite bound nothing can spike
    const float bound = __fmul_rn(c.spike_scale, sv);
    spike = fin && vo > 0.0f && fabsf(gc) > bound && fabsf(gc) > c.spike_floor;
    if (spike && (c.flags & kFClamp)) {
      gm = copysignf(__fmul_rn(sv, c.prev_v), gc);
      grown = true;
    }
  }
  const float dprev = __fdiv_rn(__fmul_rn(mo, c.prev_m), __fadd_rn(__fmul_rn(sv, c.prev_v), c.eps));
  float u = 0.0f;
  if (c.flags & kFWrite) {
    // torch's lerp_, from the nearer end: beta1 = 0 gives m' = g exactly
    const float mn = fabsf(c.omb1) < 0.5f ? __fadd_rn(mo, __fmul_rn(c.omb1, __fsub_rn(gm, mo)))
                                          : __fsub_rn(gm, __fmul_rn(__fsub_rn(1.0f, c.omb1), __fsub_rn(gm, mo)));
    const float vn = grown ? __fmul_rn(vo, kSpikeVGrowth)
                           : __fadd_rn(__fmul_rn(vo, c.beta2), __fmul_rn(__fmul_rn(c.omb2, gc), gc));
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vn), c.bc2_sqrt), c.eps);
    const float pn = __fsub_rn(__fmul_rn(pf, c.decay), __fmul_rn(c.step_size, __fdiv_rn(mn, denom)));
    if (fin || !(c.flags & kFMask)) {  // written: else p, m, v keep their bits
      m = mn;
      v = vn;
      p_bits = Type<P>::bits(pn);
      if (fin) u = __fsub_rn(pn, pf);
    }
  }
  const double dg = fin ? static_cast<double>(gr) : 0.0;
  const double du = u, dp = pf, dd = dprev, dm = mo, dv = vo;
  acc.g2 = __dadd_rn(acc.g2, __dmul_rn(dg, dg));
  acc.u2 = __dadd_rn(acc.u2, __dmul_rn(du, du));
  acc.p2 = __dadd_rn(acc.p2, __dmul_rn(dp, dp));
  acc.gu = __dadd_rn(acc.gu, __dmul_rn(dg, du));
  acc.gd = __dadd_rn(acc.gd, fin ? __dmul_rn(dg, dd) : 0.0);
  acc.d2 = __dadd_rn(acc.d2, __dmul_rn(dd, dd));
  acc.m2 = __dadd_rn(acc.m2, __dmul_rn(dm, dm));
  acc.v1 = __dadd_rn(acc.v1, dv);
  acc.spikes += spike ? 1u : 0u;
  acc.nonfinite += fin ? 0u : 1u;
}

// Fixed-shape block sum of kNumPartials values (shuffle tree, then the warps in order); the
// totals land in thread k < kNumPartials as vals[k]... written straight to dst by those threads.
template <int kBlock>
__device__ void block_sums(double (&vals)[kNumPartials], double* dst, int64_t stride = 1) {
  __shared__ double smem[kNumPartials][kBlock / 32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
  for (int k = 0; k < kNumPartials; ++k) {
    double x = vals[k];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = __dadd_rn(x, __shfl_down_sync(0xffffffffu, x, o));
    if (lane == 0) smem[k][warp] = x;
  }
  __syncthreads();
  if (threadIdx.x < kNumPartials) {
    double s = 0.0;
#pragma unroll
    for (int w = 0; w < kBlock / 32; ++w) s = __dadd_rn(s, smem[threadIdx.x][w]);
    dst[threadIdx.x * stride] = s;
  }
}

// About 80 registers: 3 blocks of 256 threads per SM (a floor of 4 blocks would spill). With
// 16-byte accesses that keeps ~48 KB per SM in flight, above what HBM3 needs.
template <class P>
__global__ void __launch_bounds__(kThreads)
update_kernel(const StepArgs a) {
  __shared__ Coef s_coef;
  const ChunkDesc ch = a.chunks[blockIdx.x];
  const TensorDesc t = a.tensors[ch.tensor];
  if (threadIdx.x < 32) compute_coef(a, t, ch.tensor, s_coef);  // once per block, not per element
  __syncthreads();
  const Coef c = s_coef;
  P* __restrict__ p = static_cast<P*>(t.p);
  const P* __restrict__ g = static_cast<const P*>(t.g);
  float* __restrict__ m = t.m;
  float* __restrict__ v = t.v;
  const int64_t begin = ch.offset;
  const int64_t end = begin + kChunkElems < t.n ? begin + kChunkElems : t.n;
  const bool write = c.flags & kFWrite;
  Acc acc;
  int64_t scalar_begin = begin;
  if (t.aligned) {
    // 16-byte vectors: kVec elements of p and g, kVec / 4 float4 of m and v per access.
    constexpr int kVec = Type<P>::kVec;
    const int64_t vec_end = begin + (end - begin) / kVec * kVec;
    for (int64_t i = begin + int64_t(threadIdx.x) * kVec; i < vec_end; i += int64_t(kThreads) * kVec) {
      uint4 pr = *reinterpret_cast<const uint4*>(p + i);
      const uint4 gr = __ldg(reinterpret_cast<const uint4*>(g + i));
      float4 mv[kVec / 4], vv[kVec / 4];
#pragma unroll
      for (int q = 0; q < kVec / 4; ++q) {
        mv[q] = *reinterpret_cast<const float4*>(m + i + 4 * q);
        vv[q] = *reinterpret_cast<const float4*>(v + i + 4 * q);
      }
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        uint32_t pb = raw_elem<P>(pr, k);
        float* me = reinterpret_cast<float*>(&mv[k / 4]) + (k % 4);
        float* ve = reinterpret_cast<float*>(&vv[k / 4]) + (k % 4);
        element<P>(pb, raw_elem<P>(gr, k), *me, *ve, c, acc);
        set_raw_elem<P>(pr, k, pb);
      }
      if (write) {
        *reinterpret_cast<uint4*>(p + i) = pr;
#pragma unroll
        for (int q = 0; q < kVec / 4; ++q) {
          *reinterpret_cast<float4*>(m + i + 4 * q) = mv[q];
          *reinterpret_cast<float4*>(v + i + 4 * q) = vv[q];
        }
      }
    }
    scalar_begin = vec_end;
  }
  // Unaligned storage, and the last few elements of an aligned tensor.
  for (int64_t i = scalar_begin + threadIdx.x; i < end; i += kThreads) {
    uint32_t pb = load_raw(p + i);
    float mi = m[i], vi = v[i];
    element<P>(pb, load_raw(g + i), mi, vi, c, acc);
    if (write) {
      store_raw(p + i, pb);
      m[i] = mi;
      v[i] = vi;
    }
  }
  double vals[kNumPartials] = {acc.g2, acc.u2, acc.p2, acc.gu, acc.gd, acc.d2, acc.m2, acc.v1,
                               static_cast<double>(acc.spikes), static_cast<double>(acc.nonfinite)};
  block_sums<kThreads>(vals, a.partials + int64_t(blockIdx.x) * kNumPartials);
}

// ----------------------------------------------------------------- the finish
// contract.tensor_signals + the matrix numel column: the 7 extra group fields of one tensor.
// Kinds: 0 KIND_OTHER, 1 KIND_MATRIX, 2 KIND_ZERO_INIT (omega and cos count, the ratio does not).
__device__ void tensor_extra(const double* sums, int kind, double s, double b1, double b2,
                             double written, double* extra) {
  const bool matrix = kind != 0;
  const double m_sq = sums[kTMoment1Sq], v_sum = sums[kTMoment2Sum];
  const bool has_history = s >= 1.0;
  const double safe_s = has_history ? s : 1.0;
  const double b1s = power(b1, safe_s);
  const double bc1 = __dsub_rn(1.0, b1s);
  const double bc2 = __dsub_rn(1.0, power(b2, safe_s));
  const bool omega_defined = matrix && has_history && m_sq > 0.0 && v_sum > 0.0;
  const double ratio =
      __ddiv_rn(__ddiv_rn(m_sq, __dmul_rn(bc1, bc1)), v_sum > 0.0 ? __ddiv_rn(v_sum, bc2) : 1.0);
  const double white = __ddiv_rn(__dmul_rn(__dsub_rn(1.0, b1), __dadd_rn(1.0, b1s)),
                                 __dmul_rn(__dadd_rn(1.0, b1), __dsub_rn(1.0, b1s)));
  const double omega = __ddiv_rn(ratio, white);
  double log_omega = log(omega_defined ? omega : 1.0);
  log_omega = log_omega < -kOmegaLogClamp ? -kOmegaLogClamp
                                          : (log_omega > kOmegaLogClamp ? kOmegaLogClamp : log_omega);
  const double g_sq = sums[kTGradSq], d_sq = sums[kTPrevSq];
  const bool cos_defined = matrix && g_sq > 0.0 && d_sq > 0.0;
  const double denom = __dsqrt_rn(cos_defined ? __dmul_rn(g_sq, d_sq) : 1.0);
  const double p_sq = sums[kTParamSq];
  const bool ratio_defined = kind == 1 && written > 0.0 && p_sq > 0.0 && finite64(p_sq);
  extra[0] = omega_defined ? log_omega : 0.0;
  extra[1] = omega_defined ? 1.0 : 0.0;
  extra[2] = cos_defined ? __ddiv_rn(sums[kTGradDotPrev], denom) : 0.0;
  extra[3] = cos_defined ? 1.0 : 0.0;
  extra[4] = ratio_defined ? __ddiv_rn(sums[kTUpdateSq], p_sq) : 0.0;
  extra[5] = ratio_defined ? 1.0 : 0.0;
  extra[6] = matrix ? sums[kTNumel] : 0.0;
}

__global__ void __launch_bounds__(kFinishThreads)
finish_kernel(const StepArgs a) {
  __shared__ double s_totals[kNumPartials];
  __shared__ bool s_last;
  const int T = a.num_tensors, G = a.num_groups;
  if (int(blockIdx.x) < T) {
    // This tensor's chunks, thread i taking chunks i, i + blockDim, ...; then a fixed tree.
    const TensorDesc t = a.tensors[blockIdx.x];
    double vals[kNumPartials] = {};
    for (int c = t.chunk_begin + threadIdx.x; c < t.chunk_end; c += kFinishThreads) {
      const double* part = a.partials + int64_t(c) * kNumPartials;
#pragma unroll
      for (int k = 0; k < kNumPartials; ++k) vals[k] = __dadd_rn(vals[k], part[k]);
    }
    block_sums<kFinishThreads>(vals, s_totals);
    __syncthreads();
    if (threadIdx.x == 0) {
      double sums[kNumTensorFields];
      for (int k = 0; k < kNumPartials; ++k) sums[k] = s_totals[k];
      sums[kTNumel] = static_cast<double>(t.n);
      double* out = a.tensor_out + int64_t(blockIdx.x) * a.tensor_out_stride0;
      for (int k = 0; k < kNumTensorFields; ++k) out[k * a.tensor_out_stride1] = sums[k];
      const double* row = a.control + int64_t(t.group) * kNumControl;
      double gate, invalid;
      group_gate(row, step_ok(a), gate, invalid);
      const double s = read_step(t);
      double* dst = a.rows + int64_t(blockIdx.x) * kNumGroupFields;
      for (int k = 0; k < kNumTensorFields; ++k) dst[k] = sums[k];
      tensor_extra(sums, t.kind, s, row[kBeta1], row[kBeta2], gate, dst + kNumTensorFields);
      // The step counter advances by the applied gate, after the update read it.
      if (t.step_f64)
        *static_cast<double*>(t.step) = __dadd_rn(s, gate);
      else
        *static_cast<float*>(t.step) = __fadd_rn(static_cast<float>(s), static_cast<float>(gate));
    }
  }
  // The last block to arrive writes the record.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) s_last = atomicAdd(a.counter, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  if (threadIdx.x == 0) *a.counter = 0u;  // ready for the next call (and graph replays)

  // Group fields: per (group, field), the tensors' rows added in bucket order, staged through
  // shared memory a tile of tensors at a time (rows of other blocks: loads that skip L1).
  __shared__ double tile[kFinishTile][kNumGroupFields];
  __shared__ int tile_group[kFinishTile];
  const int pairs = G * kNumGroupFields;
  for (int base = 0; base < pairs; base += kFinishThreads) {
    const int pair = base + threadIdx.x;
    const int gi = pair / kNumGroupFields, f = pair % kNumGroupFields;
    double acc = 0.0;
    for (int t0 = 0; t0 < T; t0 += kFinishTile) {
      const int count = T - t0 < kFinishTile ? T - t0 : kFinishTile;
      __syncthreads();
      for (int i = threadIdx.x; i < count * kNumGroupFields; i += kFinishThreads)
        tile[i / kNumGroupFields][i % kNumGroupFields] =
            __ldcg(a.rows + int64_t(t0) * kNumGroupFields + i);
      for (int i = threadIdx.x; i < count; i += kFinishThreads) tile_group[i] = a.group_of[t0 + i];
      __syncthreads();
      if (pair < pairs)
        for (int i = 0; i < count; ++i)
          if (tile_group[i] == gi) acc = __dadd_rn(acc, tile[i][f]);
    }
    if (pair < pairs) {
      double* r = a.record + int64_t(pair) * a.record_stride;
      *r = a.accumulate ? __dadd_rn(*r, acc) : acc;
    }
  }
  const bool ok = step_ok(a);
  for (int gi = threadIdx.x; gi < G; gi += kFinishThreads) {
    double gate, invalid;
    group_gate(a.control + int64_t(gi) * kNumControl, ok, gate, invalid);
    a.record[int64_t(G * kNumGroupFields + gi) * a.record_stride] = gate;
    a.record[int64_t(G * (kNumGroupFields + 1) + gi) * a.record_stride] = invalid;
  }
  if (threadIdx.x == 0) {
    const double nan = __longlong_as_double(0x7ff8000000000000ll);
    double* glob = a.record + int64_t(G * (kNumGroupFields + 2)) * a.record_stride;
    glob[kRLoss * a.record_stride] = a.loss.type != kNone ? load_scalar(a.loss) : nan;
    glob[kRGradNorm * a.record_stride] = a.grad_norm.type != kNone ? load_scalar(a.grad_norm) : nan;
    glob[kRStepOk * a.record_stride] = ok ? 1.0 : 0.0;
  }
}

}  // namespace

cudaError_t launch_fused_step(DType dtype, const StepArgs& args, cudaStream_t stream) {
  if (args.num_chunks > 0) {
    switch (dtype) {
      case kFloat32: update_kernel<float><<<args.num_chunks, kThreads, 0, stream>>>(args); break;
      case kBFloat16: update_kernel<bf16_t><<<args.num_chunks, kThreads, 0, stream>>>(args); break;
      case kFloat16: update_kernel<half_t><<<args.num_chunks, kThreads, 0, stream>>>(args); break;
      default: return cudaErrorInvalidValue;
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const int blocks = args.num_tensors > 0 ? args.num_tensors : 1;
  finish_kernel<<<blocks, kFinishThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace lbw_cuda
