// Torch-free CPU kernels of the fused guarded AdamW step (contract version 2) for one contiguous
// range of one tensor, and the sum of squares of the gradient-norm pre-pass. The per-element
// arithmetic follows lbw_kernels/contract.py operation by operation in IEEE fp32 (no FMA
// contraction: build with -ffp-contract=off), so params and moments are bit-exact.
//
// This header is compiled several times, once per instruction set (see kernel_*.cpp); each
// translation unit defines LBW_KERNEL_NS first so that the template instances of different
// ISAs never collide at link time. It includes nothing, and uses only compiler builtins and
// GCC/Clang vector extensions, so no library inline function gets emitted with a wider ISA
// than its caller expects.
#ifndef LBW_KERNEL_NS
#error "define LBW_KERNEL_NS before including adamw_kernel.h"
#endif

#include "kernel_api.h"

namespace lbw_cpu {
namespace LBW_KERNEL_NS {
namespace {

struct bf16_t { uint16_t x; };
struct half_t { uint16_t x; };

constexpr int kSub = 512;   // elements per fp32 accumulation pass (32 terms per lane)
constexpr int kLanes = 16;  // accumulator lanes per sum; fixed, so sums do not depend on ISA
#ifndef LBW_F32_WIDTH
#define LBW_F32_WIDTH 4  // floats per native vector register; set per ISA by kernel_*.cpp
#endif
constexpr int kW = LBW_F32_WIDTH;
constexpr int kVecs = kLanes / kW;  // native vectors per block of kLanes elements
constexpr int kWd = kW / 2;         // doubles per native vector
constexpr int kVecsD = kLanes / kWd;
// The lane structure is explicit: element j of a range belongs to lane j % kLanes; each ISA
// maps the 16 lanes onto the registers it has (one zmm, two ymm or four xmm), and every
// operation is the same IEEE fp32 operation on every ISA, so results are bit-identical.
typedef float vf __attribute__((vector_size(4 * kW)));
typedef int32_t vi __attribute__((vector_size(4 * kW)));  // lane masks: -1 or 0
typedef uint32_t vu __attribute__((vector_size(4 * kW)));
typedef uint16_t vh __attribute__((vector_size(2 * kW)));
typedef float f32xH __attribute__((vector_size(4 * kWd)));
typedef double f64xH __attribute__((vector_size(8 * kWd)));

template <class V, class S>
inline V splat(S x) { return V{} + x; }
inline vf vsqrt(vf x) {  // the compiler turns this into one IEEE sqrtps per register
  vf r;
  for (int k = 0; k < kW; ++k) r[k] = __builtin_sqrtf(x[k]);
  return r;
}
// Branch-free selects by bit masks: an unconditional store of a blended value vectorizes on
// every ISA and keeps the unselected value's exact bits.
inline vu sel(vi m, vu a, vu b) { return (a & (vu)m) | (b & ~(vu)m); }
inline vf sel(vi m, vf a, vf b) { return (vf)sel(m, (vu)a, (vu)b); }
inline vf keep(vi m, vf a) { return (vf)((vu)a & (vu)m); }  // a where m, else +0
inline vf vabs(vf x) { return (vf)((vu)x & 0x7fffffffu); }
inline vf vcopysign(vf mag, vf sgn) {
  return (vf)(((vu)mag & 0x7fffffffu) | ((vu)sgn & 0x80000000u));
}

// Loads: exact widening to fp32; `raw` keeps the stored bits (unwritten elements are written
// back with them).
inline vf vload(const float* p, vu& raw) {
  vf r;
  __builtin_memcpy(&r, p, sizeof r);
  raw = (vu)r;
  return r;
}
inline vf vload(const bf16_t* p, vu& raw) {
  vh h;
  __builtin_memcpy(&h, p, sizeof h);
  raw = __builtin_convertvector(h, vu);
  return (vf)(raw << 16);
}
inline vf vload(const half_t* p, vu& raw) {
  // Shift exponent+mantissa into fp32 position and rescale by 2^112: exact for normals and
  // subnormals; inf/nan get the fp32 all-ones exponent instead.
  vh h;
  __builtin_memcpy(&h, p, sizeof h);
  raw = __builtin_convertvector(h, vu);
  const vu sign = (raw & 0x8000u) << 16;
  const vu em = (raw & 0x7fffu) << 13;
  const vu finite = (vu)((vf)em * 0x1p112f);
  const vu special = em | 0x7f800000u;
  return (vf)(sel((vi)((raw & 0x7c00u) == 0x7c00u), special, finite) | sign);
}
template <class P>
inline vf vload(const P* p) {
  vu raw;
  return vload(p, raw);
}

// Stores: round to nearest even, the same rounding (and NaN encoding) as torch's .to(dtype).
inline vu vbits(vf x, float) { return (vu)x; }
inline vu vbits(vf x, bf16_t) {
  const vu u = (vu)x;
  const vu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return sel((vi)((u & 0x7fffffffu) > 0x7f800000u), splat<vu>(0x7fc0u), rounded);
}
inline vu vbits(vf x, half_t) {
  const vu u = (vu)x;
  const vu sign = (u >> 16) & 0x8000u;
  const vu a = u & 0x7fffffffu;
  // Results that are half subnormals: let an fp32 add do the rounding at the right position.
  const vu magic = splat<vu>(126u << 23);  // 0.5f: aligns the half subnormal ulp with fp32's
  const vu sub = (vu)((vf)a + (vf)magic) - magic;
  // Normal results: rebias the exponent and round the dropped 13 bits to nearest even.
  const vu norm = (a + ((15u - 127u) << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
  vu h = sel((vi)(a < (113u << 23)), sub, norm);
  h = sel((vi)(a >= 0x47800000u), splat<vu>(0x7c00u), h);  // overflow to inf
  h = sel((vi)(a > 0x7f800000u), splat<vu>(0x7e00u), h);   // NaN, as torch writes it
  return h | sign;
}
inline void vstore_bits(float* p, vu bits) { __builtin_memcpy(p, &bits, sizeof bits); }
template <class P>
inline void vstore_bits(P* p, vu bits) {
  const vh h = __builtin_convertvector(bits, vh);
  __builtin_memcpy(p, &h, sizeof h);
}
inline void vstore(float* p, vf x) { __builtin_memcpy(p, &x, sizeof x); }

// Specialisations of the range kernel (kernel_api.h's RangeFlags): each flag removes work from
// the per-element loop, or adds the work it names.
constexpr int kFWrite = RangeFlags::kRangeWrite;  // update p, m, v (else telemetry only)
constexpr int kFSpike = RangeFlags::kRangeSpike;  // test |g| against a finite spike bound
constexpr int kFClamp = RangeFlags::kRangeClamp;  // clamp spikes (with kFSpike)
constexpr int kFMask = RangeFlags::kRangeMask;    // never write a non-finite gradient element
constexpr int kFUnit = RangeFlags::kRangeUnit;    // inv_scale == clip == 1: skip two multiplies

// The per-tensor scalars, broadcast once per range.
struct Consts {
  vf inv_scale, clip, spike_scale, spike_floor, prev_m, prev_v, eps, omb1, beta2, omb2, bc2_sqrt, decay,
      step_size;
};

// The fp32 lane sums of one lane group in the current pass and the exact counts (locals of
// range_kernel, so they stay in registers).
struct Acc {
  vf g2, u2, p2, gu, gd, d2, m2, v1;
  vi spikes, nonfinite;  // -1 per counted element
};

// Whether any lane of a mask is set (one test instruction on x86 with GCC; the builtins are
// those behind _mm512_test_epi32_mask, _mm256_movemask_ps and _mm_movemask_ps).
inline bool any_lane(vi m) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && LBW_F32_WIDTH == 16
  return __builtin_ia32_ptestmd512(m, m, 0xffff) != 0;
#elif defined(__x86_64__) && defined(__GNUC__) && LBW_F32_WIDTH == 8
  return __builtin_ia32_movmskps256((vf)m) != 0;
#elif defined(__x86_64__) && defined(__GNUC__) && LBW_F32_WIDTH == 4
  return __builtin_ia32_movmskps((vf)m) != 0;
#else
  int32_t r = 0;
  for (int k = 0; k < kW; ++k) r |= m[k];
  return r != 0;
#endif
}

// One vector of kW elements (lanes o .. o + kW - 1 of a block of kLanes): the contract's
// per-element step, then each telemetry term added to its fp32 lane. kFinite: every gradient of
// the vector is finite and every lane is real, so nothing needs masking (the common case; the
// general path below computes the same values with the masks). With kTail the pointers are a
// zero-padded copy of which the lanes below `valid` are real; the padding adds exactly +0 and
// counts nothing.
template <int kFlags, bool kTail, bool kFinite, class P>
__attribute__((always_inline)) inline void vec_body(P* __restrict p, float* __restrict m,
                                                    float* __restrict v, const Consts& c, Acc& acc,
                                                    vi real, vu praw, vf pf, vf gr, vi fin, vf mo,
                                                    vf vo) {
  constexpr bool kWrite = kFlags & kFWrite, kSpike = kFlags & kFSpike;
  constexpr bool kClamp = kFlags & kFClamp, kMask = kFlags & kFMask, kUnit = kFlags & kFUnit;
  const vf gc = kUnit ? gr : gr * c.clip;                     // fused max_grad_norm
  const vf sv = vsqrt(vo);
  // The spike bound k * sqrt(v_hat); with an infinite bound no element can spike.
  // An outlier enters m at its typical size sqrt(v_hat) with its sign; its v grows by 10%.
  vf gm = gc;
  vi grown = splat<vi>(0);
  if (kSpike) {
    const vf bound = c.spike_scale * sv;
    vi spike = (vi)(vo > 0.0f) & (vi)(vabs(gc) > bound) & (vi)(vabs(gc) > c.spike_floor);
    if (!kFinite) spike &= fin;
    if (kTail) spike &= real;  // (the zero padding has v = 0 and cannot spike anyway)
    if (kFinite ? any_lane(spike) : true) {  // rare: clamp and count
      if (kClamp) {
        gm = sel(spike, vcopysign(sv * c.prev_v, gc), gc);
        grown = spike;
      }
      acc.spikes += spike;
    }
  }
  const vf dprev = (mo * c.prev_m) / (sv * c.prev_v + c.eps);  // the previous step's direction
  const vi tfin = kTail ? fin & real : fin;
  const vf gt = kFinite ? gr : keep(tfin, gr);
  vf u = splat<vf>(0.0f);
  if (kWrite) {
    // torch's lerp_, from the nearer end: beta1 = 0 gives m' = g exactly
    const vf mn = (c.omb1 < 0.5f && c.omb1 > -0.5f) ? mo + c.omb1 * (gm - mo) : gm - (1.0f - c.omb1) * (gm - mo);
    const vf vn = sel(grown, vo * kSpikeVGrowth, vo * c.beta2 + c.omb2 * gc * gc);
    const vf denom = vsqrt(vn) / c.bc2_sqrt + c.eps;
    const vf pn = pf * c.decay - c.step_size * (mn / denom);
    u = kFinite ? pn - pf : keep(tfin, pn - pf);
    if (kMask && !kFinite) {  // unwritten elements keep their exact bits
      vstore_bits(p, sel(fin, vbits(pn, P{}), praw));
      vstore(m, sel(fin, mn, mo));
      vstore(v, sel(fin, vn, vo));
    } else {  // every element written (AdamW's propagation of a non-finite gradient)
      vstore_bits(p, vbits(pn, P{}));
      vstore(m, mn);
      vstore(v, vn);
    }
  }
  const vf pt = kTail ? keep(real, pf) : pf;
  const vf dt = kTail ? keep(real, dprev) : dprev;
  const vf mt = kTail ? keep(real, mo) : mo;
  const vf vt = kTail ? keep(real, vo) : vo;
  acc.g2 += gt * gt;                                    // grad_sq
  acc.u2 += u * u;                                      // update_sq
  acc.p2 += pt * pt;                                    // param_sq
  acc.gu += gt * u;                                     // grad_dot_update
  acc.gd += kFinite ? gr * dprev : keep(tfin, gr * dprev);  // grad_dot_prev
  acc.d2 += dt * dt;                                    // prev_sq
  acc.m2 += mt * mt;                                    // moment1_sq
  acc.v1 += vt;                                         // moment2_sum
  if (!kFinite) acc.nonfinite += kTail ? ~fin & real : ~fin;
}

template <int kFlags, bool kTail, class P>
__attribute__((always_inline)) inline void vec_step(P* __restrict p, const P* __restrict g,
                                                    float* __restrict m, float* __restrict v,
                                                    const Consts& c, Acc& acc, int o, int valid) {
  constexpr bool kUnit = kFlags & kFUnit;
  vi real = splat<vi>(-1);
  if (kTail) {
    vi lane;
    for (int k = 0; k < kW; ++k) lane[k] = o + k;
    real = lane < valid;
  }
  vu praw;
  const vf pf = vload(p, praw);
  const vf gr = kUnit ? vload(g) : vload(g) * c.inv_scale;    // GradScaler unscale
  const vi fin = (vi)(((vu)gr & 0x7f800000u) != 0x7f800000u);
  vf mo, vo;
  __builtin_memcpy(&mo, m, sizeof mo);
  __builtin_memcpy(&vo, v, sizeof vo);
  if (!kTail && !any_lane(~fin))
    vec_body<kFlags, false, true>(p, m, v, c, acc, real, praw, pf, gr, fin, mo, vo);
  else
    vec_body<kFlags, kTail, false>(p, m, v, c, acc, real, praw, pf, gr, fin, mo, vo);
}

// The full blocks of one pass for one lane group, in its own function so that register
// allocation sees only this loop and keeps the accumulators in registers.
template <int kFlags, class P>
__attribute__((noinline)) void run_blocks(P* __restrict p, const P* __restrict g,
                                          float* __restrict m, float* __restrict v, int full,
                                          const Consts& c, Acc& acc_io) {
  Acc acc = acc_io;
  for (int j = 0; j < full; j += kLanes)
    vec_step<kFlags, false>(p + j, g + j, m + j, v + j, c, acc, 0, kLanes);
  acc_io = acc;
}

template <class T>
inline void copy_n(T* dst, const T* src, int n) {
  for (int k = 0; k < n; ++k) dst[k] = src[k];
}

// Adds the fp32 lanes of a vector to its two halves of double lanes.
inline void widen_add(vf x, f64xH& lo_acc, f64xH& hi_acc) {
  f32xH lo, hi;
  __builtin_memcpy(&lo, &x, sizeof lo);
  __builtin_memcpy(&hi, reinterpret_cast<const char*>(&x) + sizeof lo, sizeof hi);
  lo_acc += __builtin_convertvector(lo, f64xH);
  hi_acc += __builtin_convertvector(hi, f64xH);
}

// Two-level deterministic sums: within a pass of kSub elements, element j adds its fp32 term to
// fp32 lane j % kLanes (32 terms per lane, in order); after the pass each lane is added to its
// double lane; at the end the double lanes are added in order. Only this fixed assignment
// decides the rounding, never the ISA or the thread count. A pass walks the lanes one native
// vector at a time (q), so each lane group's accumulators are plain registers.
template <int kFlags, class P>
void range_kernel(const RangeArgs& a, Partials& out) {
  constexpr bool kWrite = kFlags & kFWrite;
  // Distinct tensors never overlap; __restrict lets the compiler skip runtime alias checks.
  P* __restrict p = static_cast<P*>(a.p);
  const P* __restrict g = static_cast<const P*>(a.g);
  float* __restrict m = a.m;
  float* __restrict v = a.v;
  Consts c;
  c.inv_scale = splat<vf>(a.inv_scale);
  c.clip = splat<vf>(a.clip);
  c.spike_scale = splat<vf>(a.c.spike_scale);
  c.spike_floor = splat<vf>(a.spike_floor);
  c.prev_m = splat<vf>(a.c.prev_m);
  c.prev_v = splat<vf>(a.c.prev_v);
  c.eps = splat<vf>(a.c.eps);
  c.omb1 = splat<vf>(a.c.one_minus_beta1);
  c.beta2 = splat<vf>(a.c.beta2);
  c.omb2 = splat<vf>(a.c.one_minus_beta2);
  c.bc2_sqrt = splat<vf>(a.c.bc2_sqrt);
  c.decay = splat<vf>(a.c.decay);
  c.step_size = splat<vf>(a.c.step_size);

  f64xH d[kNumSums][kVecsD] = {};
  vi spikes = splat<vi>(0), nonfinite = splat<vi>(0);
  const int64_t n = a.n;
  for (int64_t i0 = 0; i0 < n; i0 += kSub) {
    const int len = n - i0 < kSub ? int(n - i0) : kSub;
    const int full = len / kLanes * kLanes;
    const int rest = len - full;
    const int64_t at = i0 + full;
    // The last few elements of the range go through a zero-padded copy.
    P tp[kLanes] = {}, tg[kLanes] = {};
    float tm[kLanes] = {}, tv[kLanes] = {};
    if (rest) {
      copy_n(tp, p + at, rest);
      copy_n(tg, g + at, rest);
      copy_n(tm, m + at, rest);
      copy_n(tv, v + at, rest);
    }
    for (int q = 0; q < kVecs; ++q) {
      const int o = q * kW;
      Acc acc;
      acc.g2 = acc.u2 = acc.p2 = acc.gu = acc.gd = acc.d2 = acc.m2 = acc.v1 = splat<vf>(0.0f);
      acc.spikes = spikes;
      acc.nonfinite = nonfinite;
      run_blocks<kFlags>(p + i0 + o, g + i0 + o, m + i0 + o, v + i0 + o, full, c, acc);
      if (rest) vec_step<kFlags, true>(tp + o, tg + o, tm + o, tv + o, c, acc, o, rest);
      spikes = acc.spikes;
      nonfinite = acc.nonfinite;
      widen_add(acc.g2, d[0][2 * q], d[0][2 * q + 1]);
      widen_add(acc.u2, d[1][2 * q], d[1][2 * q + 1]);
      widen_add(acc.p2, d[2][2 * q], d[2][2 * q + 1]);
      widen_add(acc.gu, d[3][2 * q], d[3][2 * q + 1]);
      widen_add(acc.gd, d[4][2 * q], d[4][2 * q + 1]);
      widen_add(acc.d2, d[5][2 * q], d[5][2 * q + 1]);
      widen_add(acc.m2, d[6][2 * q], d[6][2 * q + 1]);
      widen_add(acc.v1, d[7][2 * q], d[7][2 * q + 1]);
    }
    if (kWrite && rest) {
      copy_n(p + at, tp, rest);
      copy_n(m + at, tm, rest);
      copy_n(v + at, tv, rest);
    }
  }
  Partials r{};
  for (int f = 0; f < kNumSums; ++f)
    for (int k = 0; k < kLanes; ++k) r.sums[f] += d[f][k / kWd][k % kWd];
  uint32_t n_spikes = 0, n_nonfinite = 0;  // exact: a range has fewer than 2^31 elements
  for (int k = 0; k < kW; ++k) {
    n_spikes -= uint32_t(spikes[k]);
    n_nonfinite -= uint32_t(nonfinite[k]);
  }
  r.spikes = n_spikes;
  r.nonfinite = n_nonfinite;
  out = r;
}

// Sum of squares in double: element j of the range goes to double lane j % kLanes (squares of
// fp32 values are exact in double); the lanes are added in order at the end.
template <class P>
double squares_kernel(const void* gp, int64_t n) {
  const P* __restrict g = static_cast<const P*>(gp);
  f64xH acc[kVecsD] = {};
  const int64_t full = n / kLanes * kLanes;
  auto square_add = [&](const P* x) {
    for (int q = 0; q < kVecs; ++q) {
      const vf xf = vload(x + q * kW);
      f32xH lo, hi;
      __builtin_memcpy(&lo, &xf, sizeof lo);
      __builtin_memcpy(&hi, reinterpret_cast<const char*>(&xf) + sizeof lo, sizeof hi);
      const f64xH dl = __builtin_convertvector(lo, f64xH);
      const f64xH dh = __builtin_convertvector(hi, f64xH);
      acc[2 * q] += dl * dl;
      acc[2 * q + 1] += dh * dh;
    }
  };
  for (int64_t j = 0; j < full; j += kLanes) square_add(g + j);
  if (full < n) {
    P t[kLanes] = {};
    copy_n(t, g + full, int(n - full));
    square_add(t);
  }
  double total = 0.0;
  for (int k = 0; k < kLanes; ++k) total += acc[k / kWd][k % kWd];
  return total;
}

// The flags that change the loop: kFClamp only with kFSpike, kFMask only with kFWrite.
inline int normalize(int flags) {
  if (!(flags & kFSpike)) flags &= ~kFClamp;
  if (!(flags & kFWrite)) flags &= ~(kFMask | kFClamp);
  return flags & 31;
}

template <class P>
RangeFn pick(int flags) {
#define LBW_CASE(F) \
  case F: return &range_kernel<F, P>; \
  case F | kFUnit: return &range_kernel<F | kFUnit, P>;
  switch (normalize(flags)) {
    LBW_CASE(0)
    LBW_CASE(kFSpike)
    LBW_CASE(kFWrite)
    LBW_CASE(kFWrite | kFMask)
    LBW_CASE(kFWrite | kFSpike)
    LBW_CASE(kFWrite | kFSpike | kFMask)
    LBW_CASE(kFWrite | kFSpike | kFClamp)
    LBW_CASE(kFWrite | kFSpike | kFClamp | kFMask)
  }
#undef LBW_CASE
  return nullptr;
}

}  // namespace

RangeFn select(DType dtype, int flags) {
  switch (dtype) {
    case DType::kFloat32: return pick<float>(flags);
    case DType::kBFloat16: return pick<bf16_t>(flags);
    case DType::kFloat16: return pick<half_t>(flags);
  }
  return nullptr;
}

SquaresFn select_squares(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return &squares_kernel<float>;
    case DType::kBFloat16: return &squares_kernel<bf16_t>;
    case DType::kFloat16: return &squares_kernel<half_t>;
  }
  return nullptr;
}

}  // namespace LBW_KERNEL_NS
}  // namespace lbw_cpu
