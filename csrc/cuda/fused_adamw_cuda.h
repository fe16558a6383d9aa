// Launcher interface of the CUDA fused guarded AdamW step (contract version 2,
// lbw_kernels/contract.py). Torch-free on purpose: the .cu builds with plain nvcc (and is
// compile-checked that way on machines without a CUDA torch); fused_adamw_cuda_binding.cpp is
// the torch side (validation, the cached device tables, the launch on torch's stream).
#pragma once
#include <cstdint>

#include <cuda_runtime.h>

namespace lbw_cuda {

enum DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// The element type behind an optional device scalar (loss, found_inf, grad_scale, grad_norm);
// kNone: not given. The kernels read and convert it on the device: no host sync.
enum ScalarType : int32_t {
  kNone = 0, kF64 = 1, kF32 = 2, kF16 = 3, kBF16 = 4, kI64 = 5, kI32 = 6, kU8 = 7,
};

struct Scalar {
  const void* ptr;
  int32_t type;  // ScalarType
  int32_t pad;
};

constexpr int kThreads = 256;        // threads per block of the update kernel
constexpr int kFinishThreads = 256;  // threads per block of the finish kernel
constexpr int kChunkElems = 16384;   // elements per chunk: one update block each
constexpr int kNumPartials = 10;     // per chunk: the 8 sums of TENSOR_FIELDS, spikes, nonfinite
constexpr int kNumControl = 9;       // columns of the control table
constexpr int kNumTensorFields = 11;
constexpr int kNumGroupFields = 18;
constexpr int kNumGlobalFields = 3;
constexpr float kSpikeVGrowth = 1.1f;  // an outlier's second moment grows by this (contract.SPIKE_V_GROWTH)

// One tensor of the bucket (device pointers; m and v fp32, step a one-element counter).
struct TensorDesc {
  void* p;
  const void* g;
  float* m;
  float* v;
  void* step;           // float32 (or float64 when step_f64) counter, torch's state["step"]
  int64_t n;
  int32_t group;
  int32_t kind;         // KIND_OTHER 0, KIND_MATRIX 1, KIND_ZERO_INIT 2
  int32_t chunk_begin;  // this tensor's chunks are [chunk_begin, chunk_end) of the chunk table
  int32_t chunk_end;
  int32_t aligned;      // p, g, m, v all 16-byte aligned: 16-byte vector accesses are legal
  int32_t step_f64;
};

// One chunk: elements [offset, min(offset + kChunkElems, n)) of tensors[tensor].
struct ChunkDesc {
  int64_t offset;
  int32_t tensor;
  int32_t pad;
};

// Everything one step reads and writes. The tables and scratch buffers are cached by the
// binding per bucket layout; control and the outputs may change from call to call.
struct StepArgs {
  const TensorDesc* tensors;  // [num_tensors]
  const ChunkDesc* chunks;    // [num_chunks]
  const int32_t* group_of;    // [num_tensors]: tensors[t].group, packed for the finish
  int32_t num_tensors;
  int32_t num_chunks;
  int32_t num_groups;         // G: control is [G + 1, kNumControl], contiguous float64
  int32_t accumulate;         // add the group fields to record (else overwrite them)
  const double* control;
  Scalar loss, found_inf, grad_scale, grad_norm;
  double* partials;           // scratch [num_chunks, kNumPartials]
  double* rows;               // scratch [num_tensors, kNumGroupFields]: per-tensor group rows
  unsigned int* counter;      // finish blocks done; zero between calls (the last block resets it)
  double* tensor_out;         // [num_tensors, kNumTensorFields] with these strides (elements)
  int64_t tensor_out_stride0;
  int64_t tensor_out_stride1;
  double* record;             // flat record (contract.record_layout) with this stride
  int64_t record_stride;
};

// Two launches on `stream`: the update (one block per chunk: coefficients once per block,
// p/m/v updated, per-chunk partial sums) and the finish (one block per tensor: its sums in a
// fixed order, its row of signals, its step counter advanced; the last block to finish writes
// the group fields, applied gates, invalid flags and globals). Deterministic, no host sync.
cudaError_t launch_fused_step(DType dtype, const StepArgs& args, cudaStream_t stream);

}  // namespace lbw_cuda
