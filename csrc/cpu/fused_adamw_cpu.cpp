// CPU backend of the fused guarded AdamW step (contract version 2, lbw_kernels/contract.py):
// the torch custom ops lbw_guard_cpu::fused_step and lbw_guard_cpu::grad_norm_sq, validation,
// the step-wide checks and per-tensor coefficients (read from the control table and the step
// counters), chunking, threading, ISA dispatch, the deterministic reduction and the finish
// (tensor rows, group fields, record, step counters). The arithmetic lives in adamw_kernel.h.
//
// Every tensor is cut into fixed-size chunks, handed out to torch's intra-op threads one at a
// time; each chunk writes its own telemetry partials, and the partials are summed per tensor in
// chunk order in double. So the telemetry depends neither on the number of threads nor on which
// thread ran which chunk (nor on the ISA: see adamw_kernel.h).
#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "check_message.h"  // csrc/common: LBW_CHECK
#include "kernel_api.h"

namespace lbw_cpu {
namespace {

// ----------------------------------------------------------------- the contract's constants
// Columns of a group row of the control table.
enum : int { kLr = 0, kScale = 1, kGate = 2, kBeta1 = 3, kBeta2 = 4, kEps = 5, kWeightDecay = 6,
             kSpikeK = 7, kClamp = 8, kNumControl = 9 };
// Columns of the step-wide row (row G).
enum : int { kLossLimit = 0, kCheckLoss = 1, kGradNormLimit = 2, kMaxGradNorm = 3,
             kMaskNonfinite = 4 };
// Per-tensor telemetry (TENSOR_FIELDS): the kNumSums sums, then spikes, nonfinite, numel.
enum : int { kTGradSq = 0, kTUpdateSq = 1, kTParamSq = 2, kTGradDotUpdate = 3,
             kTGradDotPrev = 4, kTPrevSq = 5, kTMoment1Sq = 6, kTMoment2Sum = 7, kTSpikes = 8,
             kTNonfinite = 9, kTNumel = 10, kNumTensorFields = 11 };
// Group fields: TENSOR_FIELDS, then the governor's signals (GROUP_FIELDS).
enum : int { kGOmegaLogSum = 11, kGOmegaCount = 12, kGCosSum = 13, kGCosCount = 14,
             kGRatioSqSum = 15, kGRatioCount = 16, kGMatrixNumel = 17, kNumGroupFields = 18 };
enum : int { kRLoss = 0, kRGradNorm = 1, kRStepOk = 2, kNumGlobalFields = 3 };
constexpr double kOmegaLogClamp = 10.0;
constexpr float kClipEps = 1e-6f;
// Kinds: KIND_OTHER (norms, biases), KIND_MATRIX, KIND_ZERO_INIT (a matrix that started at zero,
// LoRA's B: its omega and cos count, its update/param ratio does not).
constexpr int64_t kKindOther = 0, kKindMatrix = 1, kKindZeroInit = 2;

constexpr int64_t kChunk = 1 << 16;  // elements; ~1.8 MB of p, g, m, v in fp32, fits L2

// ----------------------------------------------------------------- instruction sets
enum class Isa : int { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

Isa detect_isa() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("f16c"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) return Isa::kAvx2;
#endif
  return Isa::kBase;
}

const Isa kDetected = detect_isa();
Isa g_isa = kDetected;  // lowered by set_isa() (tests compare ISAs bit for bit)

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "base";
  }
}

RangeFn select_kernel(DType dtype, int flags) {
  switch (g_isa) {
    case Isa::kAvx512: return avx512::select(dtype, flags);
    case Isa::kAvx2: return avx2::select(dtype, flags);
    default: return base::select(dtype, flags);
  }
}

SquaresFn select_squares(DType dtype) {
  switch (g_isa) {
    case Isa::kAvx512: return avx512::select_squares(dtype);
    case Isa::kAvx2: return avx2::select_squares(dtype);
    default: return base::select_squares(dtype);
  }
}

std::optional<DType> to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: return std::nullopt;
  }
}

// ----------------------------------------------------------------- the contract's math (fp64)
// base ** exponent as every backend computes it: exp2(exponent * log2(base)), 0 ** 0 = 1.
double power(double base, double exponent) {
  if (base > 0.0) return std::exp2(exponent * std::log2(base));
  return exponent == 0.0 ? 1.0 : 0.0;
}

// torch.clamp(x, min=lo): NaN stays NaN.
double clamp_min(double x, double lo) { return x < lo ? lo : x; }

struct GroupState {
  double gate = 0.0;     // applied gate, 0/1
  double invalid = 0.0;  // 1: coefficients not valid, not written
};

GroupState group_gate(const double* row, bool step_ok) {
  const double lr_eff = row[kLr] * row[kScale];
  bool valid = std::isfinite(lr_eff) && lr_eff >= 0.0;
  for (int col : {kBeta1, kBeta2, kEps, kWeightDecay}) valid = valid && std::isfinite(row[col]);
  valid = valid && row[kBeta1] >= 0.0 && row[kBeta1] < 1.0 && row[kBeta2] >= 0.0 &&
          row[kBeta2] < 1.0;
  valid = valid && row[kEps] >= 0.0 && row[kWeightDecay] >= 0.0 && !std::isnan(row[kSpikeK]);
  GroupState st;
  st.gate = (row[kGate] != 0.0 && valid && step_ok) ? 1.0 : 0.0;
  st.invalid = valid ? 0.0 : 1.0;
  return st;
}

// contract.coefficients for one group row, step counter and applied gate, rounded to fp32.
Coeffs coefficients(const double* row, double s, double applied) {
  const double b1 = row[kBeta1], b2 = row[kBeta2];
  const double lr_eff = row[kLr] * row[kScale];
  const double s_new = clamp_min(s + applied, 1.0);
  const bool first = s < 1.0;
  const double bc1_prev = 1.0 - power(b1, s);
  const double bc2_prev = 1.0 - power(b2, s);
  const double prev_v = first ? 1.0 : 1.0 / std::sqrt(bc2_prev);
  Coeffs c;
  c.step_size = static_cast<float>(lr_eff / (1.0 - power(b1, s_new)));
  c.bc2_sqrt = static_cast<float>(std::sqrt(1.0 - power(b2, s_new)));
  c.decay = static_cast<float>(1.0 - lr_eff * row[kWeightDecay]);
  c.one_minus_beta1 = static_cast<float>(1.0 - b1);
  c.beta2 = static_cast<float>(b2);
  c.one_minus_beta2 = static_cast<float>(1.0 - b2);
  c.eps = static_cast<float>(row[kEps]);
  c.prev_m = first ? 0.0f : static_cast<float>(1.0 / bc1_prev);
  c.prev_v = static_cast<float>(prev_v);
  c.spike_scale = s < 2.0 ? std::numeric_limits<float>::infinity()  // contract: no bound before two steps
                        : static_cast<float>(row[kSpikeK] * prev_v);
  return c;
}

// contract.spike_floor: the spike bound's floor from the sums tensor_out held on entry.
float spike_floor(float spike_scale, double moment2_sum, double numel) {
  if (!(numel > 0.0)) return 0.0f;
  const float floor = spike_scale * static_cast<float>(std::sqrt(moment2_sum / numel));
  return std::isfinite(floor) ? floor : 0.0f;
}

// clip_grad_norm_'s coefficient in fp32 (contract.clip_coefficient).
float clip_coefficient(double max_grad_norm, const std::optional<double>& grad_norm) {
  if (!grad_norm) return 1.0f;
  const float max_norm = static_cast<float>(max_grad_norm);
  const float norm = static_cast<float>(*grad_norm);
  float coef = max_norm / (norm + kClipEps);
  coef = coef > 1.0f ? 1.0f : coef;  // torch.clamp(max=1): NaN stays NaN
  return max_norm > 0.0f ? coef : 1.0f;
}

// contract.tensor_signals + the matrix numel column: the 7 extra group fields of one tensor.
void tensor_extra(const double* sums, int64_t kind, double s, double b1, double b2, double written,
                  double* extra) {
  const bool matrix = kind != kKindOther;  // both matrix kinds
  const double m_sq = sums[kTMoment1Sq], v_sum = sums[kTMoment2Sum];
  const bool has_history = s >= 1.0;
  const double safe_s = has_history ? s : 1.0;
  const double b1s = power(b1, safe_s);
  const double bc1 = 1.0 - b1s;
  const double bc2 = 1.0 - power(b2, safe_s);
  const bool omega_defined = matrix && has_history && m_sq > 0.0 && v_sum > 0.0;
  const double ratio = (m_sq / (bc1 * bc1)) / (v_sum > 0.0 ? v_sum / bc2 : 1.0);
  const double white = (1.0 - b1) * (1.0 + b1s) / ((1.0 + b1) * (1.0 - b1s));
  const double omega = ratio / white;
  double log_omega = std::log(omega_defined ? omega : 1.0);
  log_omega = log_omega < -kOmegaLogClamp ? -kOmegaLogClamp
                                          : (log_omega > kOmegaLogClamp ? kOmegaLogClamp : log_omega);
  const double g_sq = sums[kTGradSq], d_sq = sums[kTPrevSq];
  const bool cos_defined = matrix && g_sq > 0.0 && d_sq > 0.0;
  const double denom = std::sqrt(cos_defined ? g_sq * d_sq : 1.0);
  const double p_sq = sums[kTParamSq];
  const bool ratio_defined =
      kind == kKindMatrix && written > 0.0 && p_sq > 0.0 && std::isfinite(p_sq);
  extra[0] = omega_defined ? log_omega : 0.0;
  extra[1] = omega_defined ? 1.0 : 0.0;
  extra[2] = cos_defined ? sums[kTGradDotPrev] / denom : 0.0;
  extra[3] = cos_defined ? 1.0 : 0.0;
  extra[4] = ratio_defined ? sums[kTUpdateSq] / p_sq : 0.0;
  extra[5] = ratio_defined ? 1.0 : 0.0;
  extra[6] = matrix ? sums[kTNumel] : 0.0;
}

// ----------------------------------------------------------------- validation helpers
// The value of a one-element tensor as a double (loss, found_inf, grad_scale, grad_norm).
double scalar_value(const at::Tensor& t, const char* what) {
  LBW_CHECK(t.numel() == 1, "lbw-guard cpu backend: ", what, " must have one element, got ",
            t.numel());
  if (t.device().is_cpu()) {
    switch (t.scalar_type()) {
      case at::kDouble: return *t.const_data_ptr<double>();
      case at::kFloat: return *t.const_data_ptr<float>();
      case at::kHalf: return static_cast<float>(*t.const_data_ptr<at::Half>());
      case at::kBFloat16: return static_cast<float>(*t.const_data_ptr<at::BFloat16>());
      default: break;
    }
  }
  return t.item<double>();
}

// Same layout: equal sizes, and equal strides on every dimension that has more than one element.
bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  if (a.numel() <= 1) return true;
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  return true;
}

struct Chunk {
  int32_t tensor;
  int64_t offset;
  int64_t n;
};

// Runs fn(c) for every chunk c in [0, n) on torch's intra-op threads, handing chunks out one at a
// time from a shared counter: a thread that is descheduled for a while (a busy machine) does not
// hold up the others. Each chunk writes only its own partials, which are summed in chunk order
// afterwards, so the results do not depend on which thread ran which chunk.
template <class Fn>
void for_each_chunk(int64_t n, const Fn& fn) {
  if (n <= 0) return;
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n);
  if (workers <= 1 || at::in_parallel_region()) {
    for (int64_t c = 0; c < n; ++c) fn(c);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1, std::memory_order_relaxed); c < n;
         c = next.fetch_add(1, std::memory_order_relaxed))
      fn(c);
  });
}

void check_lists(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                 at::TensorList exp_avg_sqs, at::TensorList steps, at::IntArrayRef group_ids,
                 at::IntArrayRef kinds, const at::Tensor& control, const at::Tensor& tensor_out,
                 const at::Tensor& record_out, const char* who) {
  const size_t T = params.size();
  LBW_CHECK(grads.size() == T && exp_avgs.size() == T && exp_avg_sqs.size() == T &&
                steps.size() == T && group_ids.size() == T && kinds.size() == T,
            "lbw-guard ", who, " backend: params, grads, exp_avgs, exp_avg_sqs, steps, "
            "group_ids and kinds must have the same length (", T, " params)");
  LBW_CHECK(control.dim() == 2 && control.size(0) >= 1 && control.size(1) == kNumControl &&
                control.scalar_type() == at::kDouble,
            "lbw-guard ", who, " backend: control must be a float64 tensor of shape "
            "[num_groups + 1, ", int(kNumControl), "], got ", control.scalar_type(), " ",
            control.sizes());
  const int64_t G = control.size(0) - 1;
  LBW_CHECK(tensor_out.dim() == 2 && tensor_out.size(0) == static_cast<int64_t>(T) &&
                tensor_out.size(1) == kNumTensorFields && tensor_out.scalar_type() == at::kDouble,
            "lbw-guard ", who, " backend: tensor_out must be a float64 tensor of shape [", T,
            ", ", int(kNumTensorFields), "], got ", tensor_out.scalar_type(), " ",
            tensor_out.sizes());
  const int64_t record_size = G * (kNumGroupFields + 2) + kNumGlobalFields;
  LBW_CHECK(record_out.dim() == 1 && record_out.size(0) == record_size &&
                record_out.scalar_type() == at::kDouble,
            "lbw-guard ", who, " backend: record_out must be a flat float64 tensor of ",
            record_size, " elements (contract.record_layout(", G, ")), got ",
            record_out.scalar_type(), " ", record_out.sizes());
}

// ----------------------------------------------------------------- the fused step
void fused_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList steps, at::IntArrayRef group_ids,
                    at::IntArrayRef kinds, const at::Tensor& control, const at::Tensor& tensor_out,
                    const at::Tensor& record_out, const std::optional<at::Tensor>& loss,
                    const std::optional<at::Tensor>& found_inf,
                    const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& grad_norm, bool accumulate) {
  check_lists(params, grads, exp_avgs, exp_avg_sqs, steps, group_ids, kinds, control, tensor_out,
              record_out, "cpu");
  const int64_t T = static_cast<int64_t>(params.size());
  const int64_t G = control.size(0) - 1;
  LBW_CHECK(control.device().is_cpu() && tensor_out.device().is_cpu() &&
                record_out.device().is_cpu(),
            "lbw-guard cpu backend: control, tensor_out and record_out must be CPU tensors");
  LBW_CHECK(T < (int64_t(1) << 31), "lbw-guard cpu backend: too many tensors");

  // Validate everything before anything is modified.
  DType dtype = DType::kFloat32;
  std::vector<double> step_before(T);
  for (int64_t i = 0; i < T; ++i) {
    const at::Tensor &p = params[i], &g = grads[i], &m = exp_avgs[i], &v = exp_avg_sqs[i];
    LBW_CHECK(p.defined() && g.defined() && m.defined() && v.defined(),
              "lbw-guard cpu backend: tensor ", i, ": param, grad or state is undefined");
    LBW_CHECK(p.device().is_cpu() && g.device().is_cpu() && m.device().is_cpu() &&
                  v.device().is_cpu(),
              "lbw-guard cpu backend: tensor ", i, " is not on the CPU");
    const auto dt = to_dtype(p.scalar_type());
    LBW_CHECK(dt.has_value(), "lbw-guard cpu backend: tensor ", i,
              ": params must be float32, bfloat16 or float16, got ", p.scalar_type());
    if (i == 0) dtype = *dt;
    LBW_CHECK(*dt == dtype, "lbw-guard cpu backend: tensor ", i, " is ", p.scalar_type(),
              " but tensor 0 is ", params[0].scalar_type(), ": one bucket has one param dtype");
    LBW_CHECK(g.scalar_type() == p.scalar_type(), "lbw-guard cpu backend: tensor ", i,
              ": the grad is ", g.scalar_type(), ", the param ", p.scalar_type());
    LBW_CHECK(m.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "lbw-guard cpu backend: tensor ", i, ": exp_avg and exp_avg_sq must be float32");
    LBW_CHECK(same_layout(p, g) && same_layout(p, m) && same_layout(p, v),
              "lbw-guard cpu backend: tensor ", i, ": param, grad, exp_avg and exp_avg_sq "
              "must have the same sizes and strides (param ", p.sizes(), " ", p.strides(),
              ", grad ", g.sizes(), " ", g.strides(), ")");
    LBW_CHECK(p.is_non_overlapping_and_dense(), "lbw-guard cpu backend: tensor ", i,
              ": the param must be non-overlapping and dense (sizes ", p.sizes(), ", strides ",
              p.strides(), ")");
    LBW_CHECK(group_ids[i] >= 0 && group_ids[i] < G, "lbw-guard cpu backend: tensor ", i,
              ": group id ", group_ids[i], " out of range [0, ", G, ")");
    LBW_CHECK(kinds[i] == kKindOther || kinds[i] == kKindMatrix || kinds[i] == kKindZeroInit,
              "lbw-guard cpu backend: tensor ", i, ": kind must be 0, 1 or 2 (KIND_OTHER, "
              "KIND_MATRIX, KIND_ZERO_INIT), got ", kinds[i]);
    const at::Tensor& s = steps[i];
    LBW_CHECK(s.defined() && s.device().is_cpu() && s.numel() == 1 &&
                  (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble),
              "lbw-guard cpu backend: tensor ", i, ": its step must be a one-element float32 "
              "CPU tensor");
    step_before[i] = s.scalar_type() == at::kFloat ? double(*s.const_data_ptr<float>())
                                                   : *s.const_data_ptr<double>();
  }
  std::optional<double> loss_v, found_inf_v, grad_scale_v, grad_norm_v;
  if (loss && loss->defined()) loss_v = scalar_value(*loss, "loss");
  if (found_inf && found_inf->defined()) found_inf_v = scalar_value(*found_inf, "found_inf");
  if (grad_scale && grad_scale->defined()) grad_scale_v = scalar_value(*grad_scale, "grad_scale");
  if (grad_norm && grad_norm->defined()) grad_norm_v = scalar_value(*grad_norm, "grad_norm");

  // The control table, read once (any strides).
  const at::Tensor ctl = control.contiguous();
  const double* ctab = ctl.const_data_ptr<double>();
  const double* step_row = ctab + G * kNumControl;

  // Step-wide checks (contract.step_checks).
  bool step_ok = true;
  if (found_inf_v) step_ok = step_ok && *found_inf_v == 0.0;
  if (grad_norm_v)
    step_ok = step_ok && std::isfinite(*grad_norm_v) && *grad_norm_v <= step_row[kGradNormLimit];
  if (loss_v) {
    const bool checked = std::isfinite(*loss_v) && *loss_v <= step_row[kLossLimit];
    step_ok = step_ok && (checked || step_row[kCheckLoss] == 0.0);
  }
  std::vector<GroupState> groups(G);
  for (int64_t gi = 0; gi < G; ++gi) groups[gi] = group_gate(ctab + gi * kNumControl, step_ok);
  const float inv_scale = grad_scale_v ? 1.0f / static_cast<float>(*grad_scale_v) : 1.0f;
  const float clip = clip_coefficient(step_row[kMaxGradNorm], grad_norm_v);
  const bool mask_nonfinite = step_row[kMaskNonfinite] != 0.0;

  // Per-tensor arguments; tensors of one group at one step share their coefficients.
  std::vector<RangeArgs> args(T);
  std::vector<RangeFn> fns(T);
  std::vector<Chunk> chunks;
  std::vector<double> last_step(G, std::numeric_limits<double>::quiet_NaN());
  std::vector<Coeffs> last_coeffs(G);
  const auto tensor_in = tensor_out.accessor<double, 2>();  // the previous step's sums
  for (int64_t i = 0; i < T; ++i) {
    const int64_t gi = group_ids[i];
    const double* row = ctab + gi * kNumControl;
    const double s = step_before[i];
    if (!(last_step[gi] == s)) {
      last_coeffs[gi] = coefficients(row, s, groups[gi].gate);
      last_step[gi] = s;
    }
    RangeArgs& a = args[i];
    a.p = params[i].data_ptr();
    a.g = grads[i].const_data_ptr();
    a.m = exp_avgs[i].data_ptr<float>();
    a.v = exp_avg_sqs[i].data_ptr<float>();
    a.n = params[i].numel();
    a.c = last_coeffs[gi];
    a.spike_floor = spike_floor(a.c.spike_scale, tensor_in[i][kTMoment2Sum], tensor_in[i][kTNumel]);
    a.inv_scale = inv_scale;
    a.clip = clip;
    int flags = 0;
    if (groups[gi].gate != 0.0) flags |= kRangeWrite;
    if (!(a.c.spike_scale == std::numeric_limits<float>::infinity())) flags |= kRangeSpike;
    if (row[kClamp] != 0.0) flags |= kRangeClamp;
    if (mask_nonfinite) flags |= kRangeMask;
    if (inv_scale == 1.0f && clip == 1.0f) flags |= kRangeUnit;
    fns[i] = select_kernel(dtype, flags);
    LBW_CHECK(fns[i] != nullptr, "lbw-guard cpu backend: no kernel for this instruction set");
    for (int64_t off = 0; off < a.n; off += kChunk)
      chunks.push_back({static_cast<int32_t>(i), off, std::min(kChunk, a.n - off)});
  }

  // The pass: each chunk writes its own partials.
  std::vector<Partials> partials(chunks.size());
  const int64_t elem = params.empty() ? 4 : params[0].element_size();
  for_each_chunk(static_cast<int64_t>(chunks.size()), [&](int64_t c) {
    const Chunk& ch = chunks[c];
    RangeArgs a = args[ch.tensor];
    a.p = static_cast<char*>(a.p) + ch.offset * elem;
    a.g = static_cast<const char*>(a.g) + ch.offset * elem;
    a.m += ch.offset;
    a.v += ch.offset;
    a.n = ch.n;
    fns[ch.tensor](a, partials[c]);
  });

  // Per-tensor sums: chunk by chunk in order, sums in double, counts exact in int64.
  std::vector<double> sums(T * kNumTensorFields, 0.0);
  {
    std::vector<int64_t> counts(T * 2, 0);
    for (size_t c = 0; c < chunks.size(); ++c) {
      const int64_t t = chunks[c].tensor;
      for (int k = 0; k < kNumSums; ++k) sums[t * kNumTensorFields + k] += partials[c].sums[k];
      counts[t * 2] += partials[c].spikes;
      counts[t * 2 + 1] += partials[c].nonfinite;
    }
    for (int64_t t = 0; t < T; ++t) {
      sums[t * kNumTensorFields + kTSpikes] = static_cast<double>(counts[t * 2]);
      sums[t * kNumTensorFields + kTNonfinite] = static_cast<double>(counts[t * 2 + 1]);
      sums[t * kNumTensorFields + kTNumel] = static_cast<double>(args[t].n);
    }
  }

  // Group fields (contract.group_fields): per-tensor rows added in bucket order.
  std::vector<double> fields(G * kNumGroupFields, 0.0);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t gi = group_ids[t];
    const double* row = ctab + gi * kNumControl;
    const double* st = sums.data() + t * kNumTensorFields;
    double extra[kNumGroupFields - kNumTensorFields];
    tensor_extra(st, kinds[t], step_before[t], row[kBeta1], row[kBeta2], groups[gi].gate, extra);
    double* f = fields.data() + gi * kNumGroupFields;
    for (int k = 0; k < kNumTensorFields; ++k) f[k] += st[k];
    for (int k = kNumTensorFields; k < kNumGroupFields; ++k) f[k] += extra[k - kNumTensorFields];
  }

  // Outputs.
  {
    auto out = tensor_out.accessor<double, 2>();
    for (int64_t t = 0; t < T; ++t)
      for (int k = 0; k < kNumTensorFields; ++k) out[t][k] = sums[t * kNumTensorFields + k];
    auto rec = record_out.accessor<double, 1>();
    for (int64_t i = 0; i < G * kNumGroupFields; ++i)
      rec[i] = accumulate ? rec[i] + fields[i] : fields[i];
    const int64_t gate_at = G * kNumGroupFields, invalid_at = G * (kNumGroupFields + 1);
    for (int64_t gi = 0; gi < G; ++gi) {
      rec[gate_at + gi] = groups[gi].gate;
      rec[invalid_at + gi] = groups[gi].invalid;
    }
    const int64_t glob = G * (kNumGroupFields + 2);
    const double nan = std::numeric_limits<double>::quiet_NaN();
    rec[glob + kRLoss] = loss_v ? *loss_v : nan;
    rec[glob + kRGradNorm] = grad_norm_v ? *grad_norm_v : nan;
    rec[glob + kRStepOk] = step_ok ? 1.0 : 0.0;
  }
  // Step counters advance by the applied gate, after the pass.
  for (int64_t i = 0; i < T; ++i) {
    const double gate = groups[group_ids[i]].gate;
    const at::Tensor& s = steps[i];
    if (s.scalar_type() == at::kFloat) {
      float* ps = s.data_ptr<float>();
      *ps = *ps + static_cast<float>(gate);
    } else {
      double* ps = s.data_ptr<double>();
      *ps = *ps + gate;
    }
  }
}

// ----------------------------------------------------------------- the grad-norm pre-pass
// sum of squares of every element of every grad, in double; NaN/inf propagate. Fixed chunks,
// summed in order: independent of the thread count and the ISA.
at::Tensor grad_norm_sq_cpu(at::TensorList grads) {
  const int64_t T = static_cast<int64_t>(grads.size());
  std::vector<at::Tensor> dense(T);
  std::vector<SquaresFn> fns(T);
  std::vector<Chunk> chunks;
  for (int64_t i = 0; i < T; ++i) {
    const at::Tensor& g = grads[i];
    LBW_CHECK(g.defined() && g.device().is_cpu(), "lbw-guard cpu grad_norm_sq: grad ", i,
              " is not a CPU tensor");
    const auto dt = to_dtype(g.scalar_type());
    LBW_CHECK(dt.has_value(), "lbw-guard cpu grad_norm_sq: grad ", i,
              " must be float32, bfloat16 or float16, got ", g.scalar_type());
    // A dense tensor is read as a flat array over its storage; anything else is copied.
    dense[i] = g.is_non_overlapping_and_dense() ? g : g.contiguous();
    fns[i] = select_squares(*dt);
    LBW_CHECK(fns[i] != nullptr, "lbw-guard cpu backend: no kernel for this instruction set");
    for (int64_t off = 0; off < g.numel(); off += kChunk)
      chunks.push_back({static_cast<int32_t>(i), off, std::min(kChunk, g.numel() - off)});
  }
  std::vector<double> partials(chunks.size());
  for_each_chunk(static_cast<int64_t>(chunks.size()), [&](int64_t c) {
    const Chunk& ch = chunks[c];
    const at::Tensor& g = dense[ch.tensor];
    partials[c] = fns[ch.tensor](
        static_cast<const char*>(g.const_data_ptr()) + ch.offset * g.element_size(), ch.n);
  });
  double total = 0.0;
  for (double x : partials) total += x;
  return at::scalar_tensor(total, at::TensorOptions().dtype(at::kDouble));
}

// ----------------------------------------------------------------- fake (meta) kernels
void fused_step_meta(at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                     at::TensorList, at::IntArrayRef, at::IntArrayRef, const at::Tensor&,
                     const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                     const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                     const std::optional<at::Tensor>&, bool) {}

at::Tensor grad_norm_sq_meta(at::TensorList) {
  return at::empty({}, at::TensorOptions().dtype(at::kDouble).device(at::kMeta));
}

std::string get_isa() { return isa_name(g_isa); }

// Use a narrower instruction set than detected ("base", "avx2", "avx512"); returns the one
// now in use. Results are bit-identical across ISAs; this exists to test exactly that.
std::string set_isa(const std::string& name) {
  LBW_CHECK(name == "avx512" || name == "avx2" || name == "base", "unknown isa ", name);
  const Isa want = name == "avx512" ? Isa::kAvx512 : name == "avx2" ? Isa::kAvx2 : Isa::kBase;
  g_isa = static_cast<int>(want) <= static_cast<int>(kDetected) ? want : kDetected;
  return isa_name(g_isa);
}

using FusedStepFn = void(at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                         at::TensorList, at::IntArrayRef, at::IntArrayRef, const at::Tensor&,
                         const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                         const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                         const std::optional<at::Tensor>&, bool);

// The step through the dispatcher (one op in torch.profiler), for the loader's `fused_adamw`.
void fused_adamw_py(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                    const std::vector<at::Tensor>& exp_avgs,
                    const std::vector<at::Tensor>& exp_avg_sqs,
                    const std::vector<at::Tensor>& steps, const std::vector<int64_t>& group_ids,
                    const std::vector<int64_t>& kinds, const at::Tensor& control,
                    const at::Tensor& tensor_out, const at::Tensor& record_out,
                    const std::optional<at::Tensor>& loss,
                    const std::optional<at::Tensor>& found_inf,
                    const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& grad_norm, bool accumulate) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lbw_guard_cpu::fused_step", "")
                             .typed<FusedStepFn>();
  op.call(params, grads, exp_avgs, exp_avg_sqs, steps, group_ids, kinds, control, tensor_out,
          record_out, loss, found_inf, grad_scale, grad_norm, accumulate);
}

at::Tensor grad_norm_sq_py(const std::vector<at::Tensor>& grads) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lbw_guard_cpu::grad_norm_sq", "")
                             .typed<at::Tensor(at::TensorList)>();
  return op.call(grads);
}

}  // namespace
}  // namespace lbw_cpu

TORCH_LIBRARY_FRAGMENT(lbw_guard_cpu, m) {
  m.def(
      "fused_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, int[] group_ids, int[] kinds, "
      "Tensor control, Tensor(e!) tensor_out, Tensor(f!) record_out, *, Tensor? loss=None, "
      "Tensor? found_inf=None, Tensor? grad_scale=None, Tensor? grad_norm=None, "
      "bool accumulate=False) -> ()");
  m.def("grad_norm_sq(Tensor[] grads) -> Tensor");
}

TORCH_LIBRARY_IMPL(lbw_guard_cpu, CPU, m) {
  m.impl("fused_step", &lbw_cpu::fused_step_cpu);
  m.impl("grad_norm_sq", &lbw_cpu::grad_norm_sq_cpu);
}

TORCH_LIBRARY_IMPL(lbw_guard_cpu, Meta, m) {
  m.impl("fused_step", &lbw_cpu::fused_step_meta);
  m.impl("grad_norm_sq", &lbw_cpu::grad_norm_sq_meta);
}

// An optimizer step is not differentiable: skip autograd (no version-counter or fallback work).
TORCH_LIBRARY_IMPL(lbw_guard_cpu, Autograd, m) {
  m.impl("fused_step", torch::CppFunction::makeFallthrough());
  m.impl("grad_norm_sq", torch::CppFunction::makeFallthrough());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lbw-guard fused guarded AdamW step, CPU C++ backend (ops: torch.ops.lbw_guard_cpu)";
  m.def("fused_adamw", &lbw_cpu::fused_adamw_py,
        "Fused guarded AdamW step (lbw_kernels/contract.py); calls lbw_guard_cpu::fused_step",
        py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
        py::arg("steps"), py::arg("group_ids"), py::arg("kinds"), py::arg("control"),
        py::arg("tensor_out"), py::arg("record_out"), py::kw_only(), py::arg("loss") = py::none(),
        py::arg("found_inf") = py::none(), py::arg("grad_scale") = py::none(),
        py::arg("grad_norm") = py::none(), py::arg("accumulate") = false,
        py::call_guard<py::gil_scoped_release>());
  m.def("grad_norm_sq", &lbw_cpu::grad_norm_sq_py, py::arg("grads"),
        "Sum of squares of every element of the grads in float64 (lbw_guard_cpu::grad_norm_sq)",
        py::call_guard<py::gil_scoped_release>());
  m.def("isa", &lbw_cpu::get_isa, "Instruction set in use");
  m.def("set_isa", &lbw_cpu::set_isa, py::arg("name"),
        "Use a narrower instruction set than detected (for tests)");
}
