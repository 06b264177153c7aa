// Multi-tensor apply: one kernel launch works through many tensors.
//
// The host packs every tensor's pointers, element count and running chunk count into a struct
// passed to the kernel by value (so a launch needs no device-side metadata buffer, no host to
// device copy, and stays valid inside a CUDA graph). Each tensor is cut into kChunk-element
// chunks, numbered globally across the launch; a persistent grid walks those chunk numbers with
// a grid-stride loop and finds the tensor a chunk belongs to by binary search over the
// cumulative chunk counts. Only the number of tensors per launch is bounded (by the kernel
// parameter space); chunk counts and offsets are 64-bit, so a tensor of any size fits in one
// launch.
//
// Within a chunk every thread owns a fixed set of elements: vector v of a tile is thread
// (v % kBlockThreads), unroll slot (v / kBlockThreads), and element j of it is lane j. Where
// every pointer of a tensor is 16-byte aligned, a vector is one (or two) 16-byte loads; where
// not, the same elements are loaded one by one. The element-to-thread map does not depend on
// the alignment, so reductions give the same bits for a tensor wherever it lies in memory.
#pragma once

#include <cuda_runtime.h>
#include <torch/csrc/stable/c/shim.h>
#include <torch/csrc/stable/macros.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

#include "../inputs.h"
#include "../launch_config.h"

namespace fastopt::cuda {

// Threads per block for every multi-tensor kernel. 256 lets two or more blocks share an SM,
// so one block's chunk set-up (tensor search, bias corrections, the barrier) overlaps another
// block's memory traffic.
constexpr int kBlockThreads = 256;

// __launch_bounds__ minimum of resident blocks per SM: 2 caps the kernels at 128 registers
// (64 Ki / (2 * 256)). With the block size alone ptxas picked register targets of its own (80
// for some AdamW variants) and spilled; with this it gets 128 and spills nothing.
constexpr int kMinBlocksPerSM = 2;

// Elements per chunk, the unit of work of one block-iteration (and of one norm partial). 64 Ki
// elements is 16 tiles of the fp32 AdamW body: big enough that the per-chunk set-up is noise,
// small enough that a few hundred small tensors beside a big one still spread over every SM.
constexpr int kChunk = 1 << 16;

// Kernel parameter space: 32764 bytes since CUDA 12.1 on Volta and newer (the old limit was
// 4096). kReservedParamBytes leaves room for a kernel's other, scalar arguments; every launch
// site static_asserts that its arguments fit.
constexpr int kMaxKernelParamBytes = 32764;
constexpr int kReservedParamBytes = 256;

// The per-launch tensor table, as structure-of-arrays so the padding is nil. Per tensor:
// kDepth data pointers (8 B each), the element count (8 B), the cumulative chunk count (8 B),
// for AdamW the pointer to its float32 step count (8 B), and with stochastic rounding or 8-bit
// moments (whose scales are one more data pointer) the noise's tensor index (its position in the optimizer, 4 B) and the index of its first element
// in the whole param (8 B; non-zero for a shard). Capacity =
// (32764 - 256 reserved - 16 header) / bytes per tensor:
//   AdamW (p, g, m, v, step)                        : 56 B -> 580 tensors per launch
//   AdamW amsgrad (+ max_exp_avg_sq)                : 64 B -> 507
//   AdamW with a master (+ remainder or fp32 copy)  : 64 B -> 507
//   AdamW, master, amsgrad, stochastic rounding     : 84 B -> 386
//   AdamW, 8-bit moments (+ scales, with the noise) : 76 B -> 427
//   AdamW, 8-bit, master, amsgrad                   : 92 B -> 353
//   accumulate (acc, grad)                          : 32 B -> 1015
//   norm (x)                                        : 24 B -> 1353
// so a model of 5000 tensors takes about ten AdamW launches.
template <int kDepth, bool kWithStep, bool kWithNoise = false>
struct TensorListMeta {
  static constexpr int kBytesPerTensor =
      8 * kDepth + 8 + 8 + (kWithStep ? 8 : 0) + (kWithNoise ? 12 : 0);
  static constexpr int kCapacity =
      (kMaxKernelParamBytes - kReservedParamBytes - 16) / kBytesPerTensor;

  void* ptr[kDepth][kCapacity];
  int64_t numel[kCapacity];
  int64_t chunk_end[kCapacity];  // chunks of tensors 0..t of this launch, inclusive
  const float* step[kWithStep ? kCapacity : 1];
  int64_t first_index[kWithNoise ? kCapacity : 1];
  uint32_t position[kWithNoise ? kCapacity : 1];
  int64_t num_chunks;  // == chunk_end[num_tensors - 1]
  int32_t num_tensors;
};

// ---------------------------------------------------------------------------------------------
// Launch geometry: the one place block and grid sizes are chosen.

inline int multiprocessor_count(int device) {
  static std::array<std::atomic<int>, 64> cache{};
  if (device < 0 || device >= static_cast<int>(cache.size())) {
    int n = 0;
    STD_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    return n;
  }
  int n = cache[device].load(std::memory_order_relaxed);
  if (n == 0) {
    STD_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

// Blocks of kBlockThreads that fit on one SM at kKernel's register and shared-memory use, from
// the occupancy calculator (queried once per kernel; every GPU these kernels are built for has
// the same 64 Ki registers per SM, so the answer does not depend on the device).
template <auto kKernel>
int blocks_per_multiprocessor() {
  static const int blocks = [] {
    int n = 0;
    STD_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kKernel, kBlockThreads, 0));
    return std::max(n, 1);
  }();
  return blocks;
}

// A persistent grid: as many blocks as are resident at once on `device` (SMs times blocks per
// SM), never more than there are chunks. Each block loops over chunks, so any grid size is
// correct; this one fills the GPU with one wave and no tail wave. grid_blocks_per_sm()
// overrides the blocks per SM, for tuning sweeps.
template <auto kKernel>
int persistent_grid(int64_t num_chunks, int device) {
  const int override_per_sm = grid_blocks_per_sm();
  const int per_sm = override_per_sm > 0 ? override_per_sm : blocks_per_multiprocessor<kKernel>();
  const int64_t blocks = static_cast<int64_t>(multiprocessor_count(device)) * per_sm;
  return static_cast<int>(std::max<int64_t>(1, std::min(num_chunks, blocks)));
}

// ---------------------------------------------------------------------------------------------
// Host side: the current stream, and packing tensor lists into TensorListMeta launches.

// torch's current CUDA stream on `device`, through the stable shim (the C++ Stream of the stable
// ABI gives its native handle only from torch 2.13 on).
inline cudaStream_t current_stream(int device) {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device, &stream));
  return static_cast<cudaStream_t>(stream);
}

// The properties of a list of tensors, read once (inputs.h).
using InfoList = std::span<const TensorInfo>;

// Calls launch(meta, first_chunk) once per TensorListMeta::kCapacity non-empty tensors among
// lists[*][indices[i]], in order. first_chunk is the global number of the launch's first chunk
// (over all launches of this call), for kernels that write one result per chunk. steps,
// positions and first_indices are read only for tables that hold them.
template <int kDepth, bool kWithStep, bool kWithNoise = false, typename Launch>
void multi_tensor_apply(const std::array<InfoList, kDepth>& lists,
                        std::span<const float* const> steps, const std::vector<int64_t>& indices,
                        Launch&& launch, std::span<const int64_t> positions = {},
                        std::span<const int64_t> first_indices = {}) {
  using Meta = TensorListMeta<kDepth, kWithStep, kWithNoise>;
  Meta meta;
  meta.num_tensors = 0;
  meta.num_chunks = 0;
  int64_t first_chunk = 0;
  for (const int64_t i : indices) {
    const int64_t n = lists[0][i].numel;
    if (n == 0) continue;
    const int k = meta.num_tensors;
    for (int d = 0; d < kDepth; ++d) meta.ptr[d][k] = lists[d][i].data;
    meta.numel[k] = n;
    meta.num_chunks += (n + kChunk - 1) / kChunk;
    meta.chunk_end[k] = meta.num_chunks;
    if constexpr (kWithStep) meta.step[k] = steps[i];
    if constexpr (kWithNoise) {
      meta.position[k] = static_cast<uint32_t>(positions[i]);
      meta.first_index[k] = first_indices[i];
    }
    meta.num_tensors = k + 1;
    if (meta.num_tensors == Meta::kCapacity) {
      launch(meta, first_chunk);
      first_chunk += meta.num_chunks;
      meta.num_tensors = 0;
      meta.num_chunks = 0;
    }
  }
  if (meta.num_tensors > 0) launch(meta, first_chunk);
}

inline int64_t count_chunks(InfoList list) {
  int64_t chunks = 0;
  for (const auto& t : list) chunks += (t.numel + kChunk - 1) / kChunk;
  return chunks;
}

// Indices of list's tensors grouped by dtype (float, bfloat16, half), list order kept within a
// group: each group is launched with its own kernel instantiation.
inline std::array<std::vector<int64_t>, 3> group_by_dtype(InfoList list) {
  std::array<std::vector<int64_t>, 3> groups;
  for (int64_t i = 0; i < static_cast<int64_t>(list.size()); ++i) {
    const auto dt = list[i].dtype;
    groups[dt == ScalarType::Float ? 0 : dt == ScalarType::BFloat16 ? 1 : 2].push_back(i);
  }
  return groups;
}

// ---------------------------------------------------------------------------------------------
// Device side.

// The tensor that global chunk `chunk` of this launch belongs to: the first t with
// chunk_end[t] > chunk. Uniform across the block; the table is read from parameter space.
template <typename Meta>
__device__ __forceinline__ int find_tensor(const Meta& meta, int64_t chunk) {
  int lo = 0;
  int hi = meta.num_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (meta.chunk_end[mid] > chunk) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

template <typename Meta>
__device__ __forceinline__ int64_t chunk_start(const Meta& meta, int t) {
  return t == 0 ? 0 : meta.chunk_end[t - 1];
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// Storage <-> fp32 conversions. torch's (header-only) types round to nearest even on the way
// down, like torch.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(BFloat16 x) { return static_cast<float>(x); }
__device__ __forceinline__ float to_float(Half x) { return static_cast<float>(x); }
template <typename T>
__device__ __forceinline__ T from_float(float x) {
  return static_cast<T>(x);
}
// On sm_80 and later torch's conversion is cvt.rn.bf16.f32, which writes every NaN as 0x7FFF
// (and nothing else so); every fastopt backend writes the one NaN 0x7FC0 (csrc/adamw_math.h,
// fastopt/rounding.py). Tested on the result's bits, not on x: x != x kept x live beside the
// result, and the 8-bit kernel for bf16 params spilled 24 bytes at 128 registers.
template <>
__device__ __forceinline__ BFloat16 from_float<BFloat16>(float x) {
  const BFloat16 y = static_cast<BFloat16>(x);
  return y.x == 0x7FFF ? BFloat16(0x7FC0, BFloat16::from_bits()) : y;
}

// N consecutive elements at p as stored. kAligned: p is 16-byte aligned and N elements are a
// whole number of 16-byte words, each moved with one 128-bit access (or, for 8-bit codes of 8
// elements, one 8-byte word at an 8-byte aligned p).
template <int N, bool kAligned, typename T>
__device__ __forceinline__ void load_raw(const T* __restrict__ p, T (&out)[N]) {
  if constexpr (kAligned && N * sizeof(T) == 8) {  // 8 one-byte codes: one 64-bit access
    const uint2 raw = *reinterpret_cast<const uint2*>(p);
    memcpy(&out[0], &raw, sizeof(raw));
  } else if constexpr (kAligned) {
    constexpr int kPerWord = 16 / sizeof(T);
    static_assert(N % kPerWord == 0, "a vector must be whole 16-byte words");
#pragma unroll
    for (int w = 0; w < N / kPerWord; ++w) {
      const uint4 raw = reinterpret_cast<const uint4*>(p)[w];
      memcpy(&out[w * kPerWord], &raw, sizeof(raw));
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = p[j];
  }
}

// The first `count` (< N, may be <= 0) elements at p; the rest of out is zero.
template <int N, typename T>
__device__ __forceinline__ void load_raw_partial(const T* __restrict__ p, int count,
                                                 T (&out)[N]) {
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = j < count ? p[j] : T{};
}

template <int N, bool kAligned, typename T>
__device__ __forceinline__ void store_raw(T* __restrict__ p, const T (&in)[N]) {
  if constexpr (kAligned && N * sizeof(T) == 8) {
    uint2 raw;
    memcpy(&raw, &in[0], sizeof(raw));
    *reinterpret_cast<uint2*>(p) = raw;
  } else if constexpr (kAligned) {
    constexpr int kPerWord = 16 / sizeof(T);
    static_assert(N % kPerWord == 0, "a vector must be whole 16-byte words");
#pragma unroll
    for (int w = 0; w < N / kPerWord; ++w) {
      uint4 raw;
      memcpy(&raw, &in[w * kPerWord], sizeof(raw));
      reinterpret_cast<uint4*>(p)[w] = raw;
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) p[j] = in[j];
  }
}

template <int N, typename T>
__device__ __forceinline__ void store_raw_partial(T* __restrict__ p, int count, const T (&in)[N]) {
#pragma unroll
  for (int j = 0; j < N; ++j) {
    if (j < count) p[j] = in[j];
  }
}

// The same, converted to and from fp32.
template <int N, bool kAligned, typename T>
__device__ __forceinline__ void load_n(const T* __restrict__ p, float (&out)[N]) {
  T vals[N];
  load_raw<N, kAligned>(p, vals);
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = to_float(vals[j]);
}

template <int N, typename T>
__device__ __forceinline__ void load_n_partial(const T* __restrict__ p, int count,
                                               float (&out)[N]) {
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = j < count ? to_float(p[j]) : 0.f;
}

template <int N, bool kAligned, typename T>
__device__ __forceinline__ void store_n(T* __restrict__ p, const float (&in)[N]) {
  T vals[N];
#pragma unroll
  for (int j = 0; j < N; ++j) vals[j] = from_float<T>(in[j]);
  store_raw<N, kAligned>(p, vals);
}

template <int N, typename T>
__device__ __forceinline__ void store_n_partial(T* __restrict__ p, int count,
                                                const float (&in)[N]) {
#pragma unroll
  for (int j = 0; j < N; ++j) {
    if (j < count) p[j] = from_float<T>(in[j]);
  }
}

// Runs Op over one chunk of `len` (<= kChunk) elements, in tiles of kVec * kUnroll *
// kBlockThreads. Per tile, each thread first issues the loads of all kUnroll vectors (so
// kUnroll x streams independent 16-byte loads are in flight before the first use), then
// computes and stores them. kFull (len == kChunk) drops every bounds check. Op provides:
//   Frag                                    per-vector fp32 registers of every stream
//   load<kAligned>(e, frag)                 kVec elements from element e of the chunk
//   load_partial(e, count, frag)            count (< kVec, maybe <= 0) of them, zeros after
//   compute(frag, u)                        u: the unroll slot, a compile-time constant
//   store<kAligned>(e, frag), store_partial(e, count, frag)
template <int kVec, int kUnroll, bool kAligned, bool kFull, typename Op>
__device__ __forceinline__ void chunk_tiles(Op& op, int len) {
  constexpr int kTile = kVec * kUnroll * kBlockThreads;
  static_assert(kChunk % kTile == 0, "a full chunk must be whole tiles");
  for (int tile = 0; tile < len; tile += kTile) {
    typename Op::Frag frag[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int e = tile + (u * kBlockThreads + static_cast<int>(threadIdx.x)) * kVec;
      if (kFull || e + kVec <= len) {
        op.template load<kAligned>(e, frag[u]);
      } else {
        op.load_partial(e, len - e, frag[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int e = tile + (u * kBlockThreads + static_cast<int>(threadIdx.x)) * kVec;
      op.compute(frag[u], u);
      if (kFull || e + kVec <= len) {
        op.template store<kAligned>(e, frag[u]);
      } else if (e < len) {
        op.store_partial(e, len - e, frag[u]);
      }
    }
  }
}

// One chunk: the 16-byte path when the tensor's pointers all are 16-byte aligned, the
// element-by-element path (same element-to-thread map) when not.
template <int kVec, int kUnroll, typename Op>
__device__ __forceinline__ void process_chunk(Op& op, int len, bool aligned) {
  if (aligned) {
    if (len == kChunk) {
      chunk_tiles<kVec, kUnroll, true, true>(op, len);
    } else {
      chunk_tiles<kVec, kUnroll, true, false>(op, len);
    }
  } else {
    chunk_tiles<kVec, kUnroll, false, false>(op, len);
  }
}

// Elements of one vector: 16 bytes of the narrowest stream, so its loads are whole words.
template <typename... T>
constexpr int vector_elems() {
  return 16 / static_cast<int>(std::min({sizeof(T)...}));
}

// Vectors each thread loads before computing any, per tile: as many as keep about 64 fp32
// values of data in registers (kVec elements times `streams` arrays per vector), rounded down
// to a power of two so that tiles divide kChunk. fp32 AdamW: 4 (16 x 16-byte loads in flight
// per thread); fp32 AdamW amsgrad: 2 (10 loads); 16-bit AdamW: 2 (8 to 10 loads); 16-bit
// amsgrad: 1 (5 or 6 loads). More would push the kernels past 128 registers, where ptxas
// spills rather than give up two blocks per SM.
constexpr int unroll_for(int vec, int streams) {
  int budget = 64 / (vec * streams);
  int unroll = 1;
  while (unroll * 2 <= budget) unroll *= 2;
  return unroll;
}

}  // namespace fastopt::cuda
