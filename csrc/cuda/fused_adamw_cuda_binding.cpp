// Torch side of the CUDA backend (contract version 2): the custom op lbw_guard_cuda::fused_step,
// validation, the cached device tables, and the launch of the torch-free kernels in
// fused_adamw_cuda.cu on torch's current stream.
//
// The tensor and chunk tables depend only on the bucket's layout (data pointers, sizes, groups,
// kinds, step counters), so they are built and uploaded once per layout (pinned staging, one
// non-blocking copy) and kept with their scratch buffers in a small LRU cache. A call whose
// layout is cached checks its arguments, fills a parameter struct and launches two kernels:
// no allocation, no copy, no host synchronisation, so it can be captured in a CUDA graph.
#include <torch/extension.h>
#include <torch/library.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <utility>
#include <vector>

#include "check_message.h"  // csrc/common: LBW_CHECK
#include "fused_adamw_cuda.h"

namespace lbw_cuda_binding {
namespace {

using lbw_cuda::ChunkDesc;
using lbw_cuda::TensorDesc;

constexpr size_t kCacheEntries = 16;  // bucket layouts kept (buckets x grad layouts)

std::optional<lbw_cuda::DType> to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return lbw_cuda::kFloat32;
    case at::kBFloat16: return lbw_cuda::kBFloat16;
    case at::kHalf: return lbw_cuda::kFloat16;
    default: return std::nullopt;
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  if (a.numel() <= 1) return true;
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  return true;
}

// ----------------------------------------------------------------- the table cache
struct CacheEntry {
  std::vector<int64_t> key;
  at::Tensor table;     // bytes: TensorDesc[T], ChunkDesc[C], int32 group_of[T]
  at::Tensor partials;  // float64 [C * kNumPartials]
  at::Tensor rows;      // float64 [T * kNumGroupFields]
  at::Tensor counter;   // int32 [1], zero between calls
  const TensorDesc* tensors = nullptr;
  const ChunkDesc* chunks = nullptr;
  const int32_t* group_of = nullptr;
  int32_t num_chunks = 0;
  c10::StreamId stream = 0;
  uint64_t last_use = 0;
  bool captured = false;  // used in a CUDA graph capture: the graph holds its pointers, keep it
};

struct Cache {
  std::mutex mutex;
  std::vector<std::unique_ptr<CacheEntry>> entries;
  uint64_t clock = 0;
  int64_t hits = 0;
  int64_t misses = 0;
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: no CUDA frees at interpreter exit
  return *c;
}

size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

// Builds the tables of a bucket on the host and uploads them (pinned staging, non-blocking).
std::unique_ptr<CacheEntry> build_entry(std::vector<int64_t> key,
                                        const std::vector<TensorDesc>& descs,
                                        const at::Device& device, cudaStream_t stream) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  LBW_CHECK(cudaStreamIsCapturing(stream, &capture) == cudaSuccess &&
                capture == cudaStreamCaptureStatusNone,
            "lbw-guard cuda backend: this bucket's device tables are not cached yet, and they "
            "cannot be built during CUDA graph capture: run one step outside the capture first "
            "(warm-up), then capture");
  auto entry = std::make_unique<CacheEntry>();
  entry->key = std::move(key);
  const int64_t T = static_cast<int64_t>(descs.size());
  std::vector<TensorDesc> tensors(descs);
  std::vector<ChunkDesc> chunks;
  std::vector<int32_t> group_of(T);
  for (int64_t i = 0; i < T; ++i) {
    tensors[i].chunk_begin = static_cast<int32_t>(chunks.size());
    for (int64_t off = 0; off < tensors[i].n; off += lbw_cuda::kChunkElems) {
      chunks.push_back({off, static_cast<int32_t>(i), 0});
      LBW_CHECK(chunks.size() < (size_t(1) << 31), "lbw-guard cuda backend: too many chunks");
    }
    tensors[i].chunk_end = static_cast<int32_t>(chunks.size());
    group_of[i] = tensors[i].group;
  }
  const size_t t_bytes = align_up(T * sizeof(TensorDesc), 16);
  const size_t c_bytes = align_up(chunks.size() * sizeof(ChunkDesc), 16);
  const size_t g_bytes = align_up(T * sizeof(int32_t), 16);
  const int64_t total = static_cast<int64_t>(std::max<size_t>(t_bytes + c_bytes + g_bytes, 16));
  auto staging = at::empty({total}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  char* host = static_cast<char*>(staging.data_ptr());
  if (T) std::memcpy(host, tensors.data(), T * sizeof(TensorDesc));
  if (!chunks.empty()) std::memcpy(host + t_bytes, chunks.data(), chunks.size() * sizeof(ChunkDesc));
  if (T) std::memcpy(host + t_bytes + c_bytes, group_of.data(), T * sizeof(int32_t));
  const auto on_device = at::TensorOptions().device(device);
  entry->table = at::empty({total}, on_device.dtype(at::kByte));
  // The caching host allocator keeps the staging block until this copy has run.
  entry->table.copy_(staging, /*non_blocking=*/true);
  char* dev = static_cast<char*>(entry->table.data_ptr());
  entry->tensors = reinterpret_cast<const TensorDesc*>(dev);
  entry->chunks = reinterpret_cast<const ChunkDesc*>(dev + t_bytes);
  entry->group_of = reinterpret_cast<const int32_t*>(dev + t_bytes + c_bytes);
  entry->num_chunks = static_cast<int32_t>(chunks.size());
  entry->partials = at::empty(
      {std::max<int64_t>(entry->num_chunks, 1) * lbw_cuda::kNumPartials}, on_device.dtype(at::kDouble));
  entry->rows = at::empty({std::max<int64_t>(T, 1) * lbw_cuda::kNumGroupFields}, on_device.dtype(at::kDouble));
  entry->counter = at::zeros({1}, on_device.dtype(at::kInt));
  return entry;
}

// The cached entry of this layout (built on a miss), marked used on `stream`.
CacheEntry* lookup(Cache& c, std::vector<int64_t> key, const std::vector<TensorDesc>& descs,
                   const at::Device& device, const c10::cuda::CUDAStream& stream) {
  CacheEntry* found = nullptr;
  for (auto& e : c.entries)
    if (e->key == key) {
      found = e.get();
      break;
    }
  if (found) {
    ++c.hits;
  } else {
    ++c.misses;
    auto entry = build_entry(std::move(key), descs, device, stream.stream());
    entry->stream = stream.id();
    if (c.entries.size() >= kCacheEntries) {  // evict the least recently used, never a captured one
      auto lru = c.entries.end();
      for (auto it = c.entries.begin(); it != c.entries.end(); ++it)
        if (!(*it)->captured && (lru == c.entries.end() || (*it)->last_use < (*lru)->last_use)) lru = it;
      if (lru != c.entries.end()) c.entries.erase(lru);  // stream-ordered free
    }
    c.entries.push_back(std::move(entry));
    found = c.entries.back().get();
  }
  if (found->stream != stream.id()) {
    // Used on another stream than the one it was allocated on: tell the allocator, so an
    // eviction never hands the memory out while this stream may still use it.
    for (const at::Tensor* t : {&found->table, &found->partials, &found->rows, &found->counter})
      t->record_stream(stream.unwrap());
  }
  found->last_use = ++c.clock;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream.stream(), &capture) == cudaSuccess &&
      capture != cudaStreamCaptureStatusNone)
    found->captured = true;  // a graph now replays with this entry's tables and scratch
  return found;
}

// ----------------------------------------------------------------- the op
lbw_cuda::Scalar device_scalar(const std::optional<at::Tensor>& t, const at::Device& device,
                               const char* what, std::vector<at::Tensor>& keep_alive) {
  lbw_cuda::Scalar s{nullptr, lbw_cuda::kNone, 0};
  if (!t || !t->defined()) return s;
  LBW_CHECK(t->numel() == 1, "lbw-guard cuda backend: ", what, " must have one element, got ",
            t->numel());
  at::Tensor x = *t;
  if (x.device() != device) {  // e.g. a Python float made a CPU tensor: one (blocking) copy
    x = x.to(device);
    keep_alive.push_back(x);
  }
  switch (x.scalar_type()) {
    case at::kDouble: s.type = lbw_cuda::kF64; break;
    case at::kFloat: s.type = lbw_cuda::kF32; break;
    case at::kHalf: s.type = lbw_cuda::kF16; break;
    case at::kBFloat16: s.type = lbw_cuda::kBF16; break;
    case at::kLong: s.type = lbw_cuda::kI64; break;
    case at::kInt: s.type = lbw_cuda::kI32; break;
    case at::kByte:
    case at::kBool: s.type = lbw_cuda::kU8; break;
    default:
      LBW_CHECK(false, "lbw-guard cuda backend: ", what, " has unsupported dtype ", x.scalar_type());
  }
  s.ptr = x.const_data_ptr();
  return s;
}

void fused_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList steps, at::IntArrayRef group_ids,
                     at::IntArrayRef kinds, const at::Tensor& control, const at::Tensor& tensor_out,
                     const at::Tensor& record_out, const std::optional<at::Tensor>& loss,
                     const std::optional<at::Tensor>& found_inf,
                     const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& grad_norm, bool accumulate) {
  const size_t T = params.size();
  LBW_CHECK(grads.size() == T && exp_avgs.size() == T && exp_avg_sqs.size() == T &&
                steps.size() == T && group_ids.size() == T && kinds.size() == T,
            "lbw-guard cuda backend: params, grads, exp_avgs, exp_avg_sqs, steps, group_ids "
            "and kinds must have the same length (", T, " params)");
  LBW_CHECK(control.is_cuda() && control.dim() == 2 && control.size(0) >= 1 &&
                control.size(1) == lbw_cuda::kNumControl && control.scalar_type() == at::kDouble,
            "lbw-guard cuda backend: control must be a float64 CUDA tensor of shape "
            "[num_groups + 1, ", lbw_cuda::kNumControl, "], got ", control.scalar_type(), " ",
            control.sizes(), " on ", control.device());
  const at::Device device = control.device();
  const int64_t G = control.size(0) - 1;
  LBW_CHECK(G < (int64_t(1) << 30) && T < (size_t(1) << 30), "lbw-guard cuda backend: too large");
  LBW_CHECK(tensor_out.device() == device && tensor_out.dim() == 2 &&
                tensor_out.size(0) == static_cast<int64_t>(T) &&
                tensor_out.size(1) == lbw_cuda::kNumTensorFields &&
                tensor_out.scalar_type() == at::kDouble,
            "lbw-guard cuda backend: tensor_out must be a float64 tensor of shape [", T, ", ",
            lbw_cuda::kNumTensorFields, "] on ", device, ", got ", tensor_out.scalar_type(), " ",
            tensor_out.sizes(), " on ", tensor_out.device());
  const int64_t record_size = G * (lbw_cuda::kNumGroupFields + 2) + lbw_cuda::kNumGlobalFields;
  LBW_CHECK(record_out.device() == device && record_out.dim() == 1 &&
                record_out.size(0) == record_size && record_out.scalar_type() == at::kDouble,
            "lbw-guard cuda backend: record_out must be a flat float64 tensor of ", record_size,
            " elements (contract.record_layout(", G, ")) on ", device, ", got ",
            record_out.scalar_type(), " ", record_out.sizes(), " on ", record_out.device());

  // Validate everything before anything is launched.
  lbw_cuda::DType dtype = lbw_cuda::kFloat32;
  std::vector<TensorDesc> descs(T);
  std::vector<int64_t> key;
  key.reserve(4 + T * 9);
  for (size_t i = 0; i < T; ++i) {
    const at::Tensor &p = params[i], &g = grads[i], &m = exp_avgs[i], &v = exp_avg_sqs[i];
    const at::Tensor& s = steps[i];
    LBW_CHECK(p.defined() && g.defined() && m.defined() && v.defined() && s.defined(),
              "lbw-guard cuda backend: tensor ", i, ": param, grad, state or step is undefined");
    LBW_CHECK(p.device() == device && g.device() == device && m.device() == device &&
                  v.device() == device && s.device() == device,
              "lbw-guard cuda backend: tensor ", i, " (param, grad, states and step) is not on ",
              device);
    const auto dt = to_dtype(p.scalar_type());
    LBW_CHECK(dt.has_value(), "lbw-guard cuda backend: tensor ", i,
              ": params must be float32, bfloat16 or float16, got ", p.scalar_type());
    if (i == 0) dtype = *dt;
    LBW_CHECK(*dt == dtype, "lbw-guard cuda backend: tensor ", i, " is ", p.scalar_type(),
              " but tensor 0 is ", params[0].scalar_type(), ": one bucket has one param dtype");
    LBW_CHECK(g.scalar_type() == p.scalar_type(), "lbw-guard cuda backend: tensor ", i,
              ": the grad is ", g.scalar_type(), ", the param ", p.scalar_type());
    LBW_CHECK(m.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "lbw-guard cuda backend: tensor ", i, ": exp_avg and exp_avg_sq must be float32");
    LBW_CHECK(same_layout(p, g) && same_layout(p, m) && same_layout(p, v),
              "lbw-guard cuda backend: tensor ", i, ": param, grad, exp_avg and exp_avg_sq "
              "must have the same sizes and strides (param ", p.sizes(), " ", p.strides(),
              ", grad ", g.sizes(), " ", g.strides(), ")");
    LBW_CHECK(p.is_non_overlapping_and_dense(), "lbw-guard cuda backend: tensor ", i,
              ": the param must be non-overlapping and dense (sizes ", p.sizes(), ", strides ",
              p.strides(), ")");
    LBW_CHECK(group_ids[i] >= 0 && group_ids[i] < G, "lbw-guard cuda backend: tensor ", i,
              ": group id ", group_ids[i], " out of range [0, ", G, ")");
    LBW_CHECK(kinds[i] == 0 || kinds[i] == 1 || kinds[i] == 2, "lbw-guard cuda backend: tensor ",
              i, ": kind must be 0, 1 or 2 (KIND_OTHER, KIND_MATRIX, KIND_ZERO_INIT), got ", kinds[i]);
    LBW_CHECK(s.numel() == 1 && (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble),
              "lbw-guard cuda backend: tensor ", i, ": its step must be a one-element float32 "
              "tensor on ", device);
    TensorDesc& d = descs[i];
    d.p = p.data_ptr();
    d.g = g.const_data_ptr();
    d.m = m.data_ptr<float>();
    d.v = v.data_ptr<float>();
    d.step = s.data_ptr();
    d.n = p.numel();
    d.group = static_cast<int32_t>(group_ids[i]);
    d.kind = static_cast<int32_t>(kinds[i]);
    d.chunk_begin = d.chunk_end = 0;  // set when the table is built
    d.aligned = aligned16(d.p) && aligned16(d.g) && aligned16(d.m) && aligned16(d.v);
    d.step_f64 = s.scalar_type() == at::kDouble;
    for (int64_t x : {reinterpret_cast<int64_t>(d.p), reinterpret_cast<int64_t>(d.g),
                      reinterpret_cast<int64_t>(d.m), reinterpret_cast<int64_t>(d.v),
                      reinterpret_cast<int64_t>(d.step), d.n, int64_t(d.group), int64_t(d.kind),
                      int64_t(d.step_f64)})
      key.push_back(x);
  }
  key.push_back(static_cast<int64_t>(dtype));
  key.push_back(device.index());
  key.push_back(lbw_cuda::kChunkElems);

  const c10::cuda::CUDAGuard guard(device);
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(device.index());
  std::vector<at::Tensor> keep_alive;
  lbw_cuda::StepArgs a{};
  a.loss = device_scalar(loss, device, "loss", keep_alive);
  a.found_inf = device_scalar(found_inf, device, "found_inf", keep_alive);
  a.grad_scale = device_scalar(grad_scale, device, "grad_scale", keep_alive);
  a.grad_norm = device_scalar(grad_norm, device, "grad_norm", keep_alive);
  at::Tensor ctl = control;
  if (!ctl.is_contiguous()) {
    ctl = ctl.contiguous();
    keep_alive.push_back(ctl);
  }
  a.control = ctl.const_data_ptr<double>();
  a.num_tensors = static_cast<int32_t>(T);
  a.num_groups = static_cast<int32_t>(G);
  a.accumulate = accumulate ? 1 : 0;
  a.tensor_out = tensor_out.data_ptr<double>();
  a.tensor_out_stride0 = tensor_out.stride(0);
  a.tensor_out_stride1 = tensor_out.stride(1);
  a.record = record_out.data_ptr<double>();
  a.record_stride = record_out.stride(0);

  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);  // the entry's scratch is used by this launch
  CacheEntry* e = lookup(c, std::move(key), descs, device, stream);
  a.tensors = e->tensors;
  a.chunks = e->chunks;
  a.group_of = e->group_of;
  a.num_chunks = e->num_chunks;
  a.partials = e->partials.data_ptr<double>();
  a.rows = e->rows.data_ptr<double>();
  a.counter = reinterpret_cast<unsigned int*>(e->counter.data_ptr<int32_t>());
  const cudaError_t err = lbw_cuda::launch_fused_step(dtype, a, stream.stream());
  LBW_CHECK(err == cudaSuccess, "lbw-guard cuda backend: launch failed: ", cudaGetErrorString(err));
}

// ----------------------------------------------------------------- fake (meta) kernel, module
void fused_step_meta(at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                     at::TensorList, at::IntArrayRef, at::IntArrayRef, const at::Tensor&,
                     const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                     const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                     const std::optional<at::Tensor>&, bool) {}

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
                             .findSchemaOrThrow("lbw_guard_cuda::fused_step", "")
                             .typed<FusedStepFn>();
  op.call(params, grads, exp_avgs, exp_avg_sqs, steps, group_ids, kinds, control, tensor_out,
          record_out, loss, found_inf, grad_scale, grad_norm, accumulate);
}

std::pair<int64_t, int64_t> cache_stats() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  return {c.hits, c.misses};
}

void clear_cache() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  c.entries.clear();
}

}  // namespace
}  // namespace lbw_cuda_binding

TORCH_LIBRARY_FRAGMENT(lbw_guard_cuda, m) {
  m.def(
      "fused_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] steps, int[] group_ids, int[] kinds, "
      "Tensor control, Tensor(e!) tensor_out, Tensor(f!) record_out, *, Tensor? loss=None, "
      "Tensor? found_inf=None, Tensor? grad_scale=None, Tensor? grad_norm=None, "
      "bool accumulate=False) -> ()");
}

TORCH_LIBRARY_IMPL(lbw_guard_cuda, CUDA, m) {
  m.impl("fused_step", &lbw_cuda_binding::fused_step_cuda);
}

TORCH_LIBRARY_IMPL(lbw_guard_cuda, Meta, m) {
  m.impl("fused_step", &lbw_cuda_binding::fused_step_meta);
}

// An optimizer step is not differentiable: skip autograd (no version-counter or fallback work).
TORCH_LIBRARY_IMPL(lbw_guard_cuda, Autograd, m) {
  m.impl("fused_step", torch::CppFunction::makeFallthrough());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lbw-guard fused guarded AdamW step, CUDA C++ backend (op: torch.ops.lbw_guard_cuda)";
  m.def("fused_adamw", &lbw_cuda_binding::fused_adamw_py,
        "Fused guarded AdamW step (lbw_kernels/contract.py); calls lbw_guard_cuda::fused_step",
        py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
        py::arg("steps"), py::arg("group_ids"), py::arg("kinds"), py::arg("control"),
        py::arg("tensor_out"), py::arg("record_out"), py::kw_only(), py::arg("loss") = py::none(),
        py::arg("found_inf") = py::none(), py::arg("grad_scale") = py::none(),
        py::arg("grad_norm") = py::none(), py::arg("accumulate") = false,
        py::call_guard<py::gil_scoped_release>());
  m.def("cache_stats", &lbw_cuda_binding::cache_stats,
        "(hits, misses) of the device-table cache since the module was loaded");
  m.def("clear_cache", &lbw_cuda_binding::clear_cache,
        "Drop the cached device tables (not while a captured CUDA graph that used them may replay)");
}
