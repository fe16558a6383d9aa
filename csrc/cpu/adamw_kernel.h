// Torch-free CPU kernel for one contiguous range of one tensor of the fused guarded AdamW step.
// The per-element arithmetic follows lbw_kernels/contract.py operation by operation (fp32,
// no FMA contraction: build with -ffp-contract=off), so results match the PyTorch reference.
//
// This header is compiled several times, once per instruction set (see kernel_*.cpp); each
// translation unit defines LBW_KERNEL_NS first so that the template instances of different
// ISAs never collide at link time. It includes nothing, and uses only compiler builtins,
// so no library inline function gets emitted with a wider ISA than its caller expects.
#ifndef LBW_KERNEL_NS
#error "define LBW_KERNEL_NS before including adamw_kernel.h"
#endif

#include "kernel_api.h"

namespace lbw_cpu {
namespace LBW_KERNEL_NS {
namespace {

struct bf16_t { uint16_t x; };
struct half_t { uint16_t x; };

inline uint32_t f2u(float f) { uint32_t u; __builtin_memcpy(&u, &f, 4); return u; }
inline float u2f(uint32_t u) { float f; __builtin_memcpy(&f, &u, 4); return f; }

// Loads: exact widening to fp32.
inline float load(const float* p) { return *p; }
inline float load(const bf16_t* p) { return u2f(uint32_t(p->x) << 16); }
inline float load(const half_t* p) {
  // Shift exponent+mantissa into fp32 position and rescale by 2^112: exact for normals and
  // subnormals; inf/nan get the fp32 all-ones exponent instead.
  const uint32_t h = p->x;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t em = (h & 0x7fffu) << 13;
  const uint32_t finite = f2u(u2f(em) * 0x1p112f);
  const uint32_t special = em | 0x7f800000u;
  return u2f(((h & 0x7c00u) == 0x7c00u ? special : finite) | sign);
}

// Stores: round to nearest even, the same rounding as torch's .to(dtype).
inline uint16_t to_bits(float f, bf16_t) {
  const uint32_t u = f2u(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7fffffffu) > 0x7f800000u ? uint16_t(0x7fc0) : uint16_t(rounded);  // NaN as torch
}
inline uint16_t to_bits(float f, half_t) {
  const uint32_t u = f2u(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  // Results that are half subnormals: let an fp32 add do the rounding at the right position.
  const uint32_t magic = 126u << 23;  // 0.5f: aligns the half subnormal ulp with fp32's ulp
  const uint32_t sub = f2u(u2f(a) + u2f(magic)) - magic;
  // Normal results: rebias the exponent and round the dropped 13 bits to nearest even.
  const uint32_t norm = (a + ((15u - 127u) << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
  uint32_t h = a < (113u << 23) ? sub : norm;
  h = a >= 0x47800000u ? 0x7c00u : h;          // overflow to inf
  h = a > 0x7f800000u ? 0x7e00u : h;           // NaN, as torch's conversion writes it
  return uint16_t(h | sign);
}
inline uint32_t orig_bits(const bf16_t* p) { return p->x; }
inline uint32_t orig_bits(const half_t* p) { return p->x; }
inline void store_bits(bf16_t* p, uint32_t b) { p->x = uint16_t(b); }
inline void store_bits(half_t* p, uint32_t b) { p->x = uint16_t(b); }

constexpr int kSub = 512;   // elements per stage-1 pass; its fp32 scratch stays in L1
constexpr int kLanes = 16;  // fp32 accumulator lanes per sum; fixed, so sums do not depend on ISA
#ifndef LBW_F32_WIDTH
#define LBW_F32_WIDTH 4  // floats per native vector register; set per ISA by kernel_*.cpp
#endif
constexpr int kW = LBW_F32_WIDTH;
constexpr int kVecs = kLanes / kW;  // native vectors per sum
// GCC/Clang vector extension: makes the lane structure explicit; each ISA maps the 16 lanes
// onto the registers it has (one zmm, two ymm or four xmm) with the same results.
typedef float f32xW __attribute__((vector_size(4 * kW)));

// Branch-free select by bit masks. A plain `c ? a : b` written back to where b came from
// becomes a masked store, which AVX2 and older ISAs emulate slowly or not at all; an
// unconditional store of a blended value vectorizes everywhere and keeps b's exact bits.
inline uint32_t blend_bits(bool take_a, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - uint32_t(take_a);
  return (a & mask) | (b & ~mask);
}
inline float blend(bool take_a, float a, float b) { return u2f(blend_bits(take_a, f2u(a), f2u(b))); }

template <class P>
inline void store_param(P* p, float pn, bool written) {
  store_bits(p, blend_bits(written, to_bits(pn, P{}), orig_bits(p)));
}
inline void store_param(float* p, float pn, bool written) { *p = blend(written, pn, *p); }

// One element. Returns the values the telemetry needs; writes p, m, v when kWrite.
template <bool kWrite, class P, class G>
inline void element(P* p, const G* g, float* m, float* v, const float* c, float inv_scale,
                    float clip, float& g_out, float& u_out, float& p_out, uint32_t& outlier,
                    uint32_t& nonfinite) {
  const float pf = load(p);
  float gr = load(g) * inv_scale;
  const bool fin = (f2u(gr) & 0x7f800000u) != 0x7f800000u;
  gr = fin ? gr : 0.0f;
  const float gu = gr * clip;
  const float mo = *m, vo = *v;
  const bool out = fin & (__builtin_fabsf(gr) > c[kOutlierScale] * __builtin_sqrtf(vo));
  g_out = gr;
  p_out = pf;
  outlier = out ? 1u : 0u;
  nonfinite = fin ? 0u : 1u;
  if (kWrite) {
    const float mn = mo + c[kOneMinusBeta1] * (gu - mo);
    const float vn = vo * c[kBeta2] + c[kOneMinusBeta2] * gu * gu;
    const float denom = __builtin_sqrtf(vn) / c[kBc2Sqrt] + c[kEps];
    const float pn = pf * c[kDecay] - c[kStepSize] * (mn / denom);
    u_out = fin ? pn - pf : 0.0f;
    store_param(p, pn, fin);
    *m = blend(fin, mn, mo);
    *v = blend(fin, vn, vo);
  } else {
    u_out = 0.0f;
  }
}

template <bool kWrite, class P, class G>
void range_kernel(const RangeArgs& a, Partials& out) {
  // Distinct tensors never overlap; __restrict lets the compiler skip runtime alias checks.
  P* __restrict p = static_cast<P*>(a.p);
  const G* __restrict g = static_cast<const G*>(a.g);
  float* __restrict m = a.m;
  float* __restrict v = a.v;
  // Copy the coefficient row to the stack so the compiler knows the stores never alias it.
  float c[kNumCoeffs];
  for (int k = 0; k < kNumCoeffs; ++k) c[k] = a.coeffs[k];
  const float inv_scale = a.inv_scale, clip = a.clip;

  // Two-level deterministic sums. Within a pass of kSub elements, element j adds its fp32
  // product to fp32 lane j % kLanes (kSub / kLanes = 32 terms per lane); after the pass each
  // lane is added to its double lane; at the end the double lanes are added in order. Only
  // this fixed assignment decides the rounding, never the ISA or the thread count.
  double d_g[kLanes] = {}, d_u[kLanes] = {}, d_p[kLanes] = {}, d_gu[kLanes] = {};
  uint32_t n_out = 0, n_nf = 0;  // exact: a range has fewer than 2^32 elements
  const int64_t n = a.n;
  for (int64_t i0 = 0; i0 < n; i0 += kSub) {
    const int len = n - i0 < kSub ? int(n - i0) : kSub;
    // Stage 1, elementwise (one vectorizable loop): update p, m, v and keep what the
    // telemetry needs in fp32 scratch.
    alignas(64) float gb[kSub], ub[kSub], pb[kSub];
    for (int j = 0; j < len; ++j) {
      uint32_t o, nf;
      element<kWrite>(p + i0 + j, g + i0 + j, m + i0 + j, v + i0 + j, c, inv_scale, clip,
                      gb[j], ub[j], pb[j], o, nf);
      n_out += o;
      n_nf += nf;
    }
    const int padded = (len + kLanes - 1) / kLanes * kLanes;
    for (int j = len; j < padded; ++j) gb[j] = ub[j] = pb[j] = 0.0f;  // adds +0: no effect
    // Stage 2: lane sums of the fp32 products.
    f32xW s_g[kVecs] = {}, s_u[kVecs] = {}, s_p[kVecs] = {}, s_gu[kVecs] = {};
    for (int j = 0; j < padded; j += kLanes) {
      for (int q = 0; q < kVecs; ++q) {
        f32xW gv, uv, pv;
        __builtin_memcpy(&gv, gb + j + q * kW, sizeof gv);
        __builtin_memcpy(&uv, ub + j + q * kW, sizeof uv);
        __builtin_memcpy(&pv, pb + j + q * kW, sizeof pv);
        s_g[q] += gv * gv;
        s_u[q] += uv * uv;
        s_p[q] += pv * pv;
        s_gu[q] += gv * uv;
      }
    }
    for (int k = 0; k < kLanes; ++k) {
      d_g[k] += s_g[k / kW][k % kW];
      d_u[k] += s_u[k / kW][k % kW];
      d_p[k] += s_p[k / kW][k % kW];
      d_gu[k] += s_gu[k / kW][k % kW];
    }
  }
  Partials r{};
  for (int k = 0; k < kLanes; ++k) {
    r.sums[0] += d_g[k];
    r.sums[1] += d_u[k];
    r.sums[2] += d_p[k];
    r.sums[3] += d_gu[k];
  }
  r.outliers = n_out;
  r.nonfinite = n_nf;
  out = r;
}

template <class P, class G>
RangeFn pick_write(bool write) {
  return write ? &range_kernel<true, P, G> : &range_kernel<false, P, G>;
}

template <class P>
RangeFn pick_grad(DType grad, bool write) {
  switch (grad) {
    case DType::kFloat32: return pick_write<P, float>(write);
    case DType::kBFloat16: return pick_write<P, bf16_t>(write);
    case DType::kFloat16: return pick_write<P, half_t>(write);
  }
  return nullptr;
}

}  // namespace

RangeFn select(DType param, DType grad, bool write) {
  switch (param) {
    case DType::kFloat32: return pick_grad<float>(grad, write);
    case DType::kBFloat16: return pick_grad<bf16_t>(grad, write);
    case DType::kFloat16: return pick_grad<half_t>(grad, write);
  }
  return nullptr;
}

}  // namespace LBW_KERNEL_NS
}  // namespace lbw_cpu
