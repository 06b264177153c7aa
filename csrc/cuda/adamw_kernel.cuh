// The AdamW kernel: one template over the storage of params, grads and moments, where the fp32
// master lives, stochastic rounding and amsgrad, running the op of its moments' storage over
// each chunk (adamw_float_moments.cuh, adamw_8bit_moments.cuh). adamw.cu checks a call and
// picks the params' storage type; adamw_float.cu, adamw_bfloat16.cu and adamw_half.cu each
// instantiate the variants of one (csrc/adamw_dispatch.h lists them), so they compile in
// parallel.
//
// No host synchronisation: found_inf, grad_scale, grad_norm, lr_tensor and the step counts
// are read by the kernel from device memory, so the launch can be captured in a CUDA graph.
#pragma once

#include <array>
#include <span>
#include <type_traits>
#include <vector>

#include "adamw_8bit_moments.cuh"
#include "adamw_float_moments.cuh"
#include "adamw_op.cuh"

namespace fastopt::cuda {

// Everything but the tensor table, by value.
struct AdamWScalars {
  const float* lr_tensor;   // overrides lr when not null
  const float* grad_scale;  // nullable
  const float* found_inf;   // nullable; non-zero skips the whole update
  const float* grad_norm;   // nullable
  double lr;
  double beta1;
  double beta2;
  double weight_decay;
  double eps;
  float max_grad_norm;
  float grad_factor;
  uint32_t seed32;  // the stochastic-rounding seed, folded (seed_key)
  bool maximize;
};

template <typename S, bool kAmsgrad, Master kM, bool kSR>
using AdamWMeta = TensorListMeta<adamw_depth(kAmsgrad, kM, kQuantized<S>), /*kWithStep=*/true,
                                 kSR || kQuantized<S>>;

static_assert(sizeof(AdamWMeta<float, false, Master::kNone, false>) + sizeof(AdamWScalars) <=
              kMaxKernelParamBytes);
static_assert(sizeof(AdamWMeta<BFloat16, true, Master::kRemainder, true>) +
                  sizeof(AdamWScalars) <= kMaxKernelParamBytes);
// The widest table: 8-bit moments with amsgrad, a master and stochastic rounding.
static_assert(sizeof(AdamWMeta<uint8_t, true, Master::kRemainder, true>) +
                  sizeof(AdamWScalars) <= kMaxKernelParamBytes);

// The op of one variant: float moments, or 8-bit codes (S = uint8_t).
template <typename P, typename G, typename S, Master kM, bool kSR, bool kAmsgrad>
using AdamWOp = std::conditional_t<kQuantized<S>, AdamW8bitOp<P, G, kM, kSR, kAmsgrad>,
                                   AdamWFloatOp<P, G, S, kM, kSR, kAmsgrad>>;

// What thread 0 hands the block for one chunk.
struct ChunkPlan {
  AdamWCoeffs c;
  uint32_t base, key1, key2, next_high;
  int tensor;
  int64_t local_chunk;  // the chunk's number within its tensor
};

template <typename P, typename G, typename S, Master kM, bool kSR, bool kAmsgrad>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSM)
    adamw_kernel(const AdamWMeta<S, kAmsgrad, kM, kSR> meta, const AdamWScalars s) {
  using Op = AdamWOp<P, G, S, kM, kSR, kAmsgrad>;
  constexpr bool kQuant = kQuantized<S>;
  constexpr int kDepth = adamw_depth(kAmsgrad, kM, kQuant);
  constexpr int kMasterStream = kAmsgrad ? 5 : 4;
  constexpr int kScaleStream = kDepth - 1;  // with 8-bit moments
  // Codes and scales, like params and moments, stay bit-unchanged by a skipped step.
  // A skipped step returns before touching params, masters, moments or scales.
  if (s.found_inf != nullptr && *s.found_inf != 0.f) return;

  // Thread 0 computes the tensor, the coefficients (bias corrections in double) and the noise
  // keys of each chunk, once per tensor, and hands them over through shared memory. Two
  // slots, alternated per iteration, need one barrier per chunk: a slot is rewritten two
  // iterations later, after every thread has passed the barrier of the iteration in between.
  // What thread 0 keeps between chunks is in shared memory too: in registers it cost every
  // thread those registers, and the widest variants spilled.
  struct Kept {
    AdamWCoeffs coeffs;  // of `tensor`
    double lr;
    float coef;
    int tensor;
  };
  __shared__ ChunkPlan plan[2];
  __shared__ Kept kept;
  if (threadIdx.x == 0) {
    kept.coef = grad_coefficient(s.grad_scale, s.grad_norm, s.max_grad_norm, s.grad_factor);
    kept.lr = s.lr_tensor != nullptr ? static_cast<double>(*s.lr_tensor) : s.lr;
    kept.tensor = -1;
  }

  // Counted by iteration, the chunk and the slot derived from it: one live register where a
  // chunk index and a slot took three (the widest 8-bit variant spilled the slot).
  for (int i = 0;; ++i) {
    const int64_t chunk = blockIdx.x + static_cast<int64_t>(i) * gridDim.x;
    if (chunk >= meta.num_chunks) break;
    const int slot = i & 1;
    if (threadIdx.x == 0) {
      const int t = find_tensor(meta, chunk);
      // The count before this step plus one: the launch after this kernel advances it
      // (adamw.cu), so every block of the tensor reads the same count.
      const float step = *meta.step[t] + 1.f;
      if (t != kept.tensor) {
        kept.coeffs = adamw_coeffs(kept.lr, s.beta1, s.beta2, s.weight_decay, s.eps,
                                   static_cast<double>(step), kept.coef, s.maximize);
        kept.tensor = t;
      }
      const int64_t local = chunk - chunk_start(meta, t);
      plan[slot].c = kept.coeffs;
      if constexpr (Op::kNoise) {
        const auto count = static_cast<uint32_t>(step);
        const auto index0 = static_cast<uint64_t>(meta.first_index[t] + local * kChunk);
        const auto high = static_cast<uint32_t>(index0 >> 32);
        const uint32_t k1 = noise_key(s.seed32, meta.position[t], count, kStreamParamMoment1);
        const uint32_t k2 = noise_key(s.seed32, meta.position[t], count, kStreamMoments2);
        plan[slot].base = static_cast<uint32_t>(index0);
        plan[slot].key1 = noise_key_for_high_word(k1, high);
        plan[slot].key2 = noise_key_for_high_word(k2, high);
        plan[slot].next_high = mix32(high) ^ mix32(high + 1);  // mix32(0) is 0
      }
      plan[slot].tensor = t;
      plan[slot].local_chunk = local;
    }
    __syncthreads();
    const int t = plan[slot].tensor;
    const int64_t begin = plan[slot].local_chunk * kChunk;
    const int len = static_cast<int>(std::min<int64_t>(kChunk, meta.numel[t] - begin));

    Op op;
    op.param = static_cast<P*>(meta.ptr[0][t]) + begin;
    op.grad = static_cast<const G*>(meta.ptr[1][t]) + begin;
    op.exp_avg = static_cast<S*>(meta.ptr[2][t]) + begin;
    op.exp_avg_sq = static_cast<S*>(meta.ptr[3][t]) + begin;
    op.max_exp_avg_sq = kAmsgrad ? static_cast<S*>(meta.ptr[4][t]) + begin : nullptr;
    op.master = Op::kHasMaster
                    ? static_cast<typename Op::M*>(meta.ptr[kMasterStream][t]) + begin
                    : nullptr;
    if constexpr (kQuant) {
      // scales[t] is (kMoments, blocks) contiguous, blocks counted from the tensor's element 0;
      // a chunk's first block is begin / kQuantBlock exactly (static_assert in AdamW8bitOp).
      op.scales = static_cast<int8_t*>(meta.ptr[kScaleStream][t]) + begin / kQuantBlock;
      op.scale_row = (meta.numel[t] + kQuantBlock - 1) / kQuantBlock;
    }
    op.c = plan[slot].c;
    op.base = plan[slot].base;
    op.key1 = plan[slot].key1;
    op.key2 = plan[slot].key2;
    op.next_high = plan[slot].next_high;
    // Chunk starts are multiples of kChunk elements, so the base pointers decide alignment;
    // scales are read and written a byte at a time, whatever theirs.
    bool aligned = true;
#pragma unroll
    for (int d = 0; d < (kQuant ? kScaleStream : kDepth); ++d) {
      aligned = aligned && aligned16(meta.ptr[d][t]);
    }
    process_chunk<Op::kVec, Op::kUnroll>(op, len, aligned);
  }
}

template <typename P, typename G, typename S, Master kM, bool kSR, bool kAmsgrad>
void launch_adamw(const AdamWInputs& in, std::span<const int64_t> positions,
                  std::span<const int64_t> first_indices, const AdamWScalars& s,
                  cudaStream_t stream, int device) {
  constexpr bool kQuant = kQuantized<S>;
  constexpr int kDepth = adamw_depth(kAmsgrad, kM, kQuant);
  std::array<InfoList, kDepth> lists;
  lists[0] = in.params;
  lists[1] = in.grads;
  lists[2] = in.exp_avgs;
  lists[3] = in.exp_avg_sqs;
  if constexpr (kAmsgrad) lists[4] = in.max_exp_avg_sqs;
  if constexpr (kM != Master::kNone) lists[kAmsgrad ? 5 : 4] = in.masters;
  if constexpr (kQuant) lists[kDepth - 1] = in.scales;
  std::vector<int64_t> all(in.params.size());
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<int64_t>(i);
  constexpr auto kernel = adamw_kernel<P, G, S, kM, kSR, kAmsgrad>;
  multi_tensor_apply<kDepth, true, kSR || kQuant>(
      lists, in.steps, all,
      [&](const AdamWMeta<S, kAmsgrad, kM, kSR>& meta, int64_t /*first_chunk*/) {
        const int grid = persistent_grid<kernel>(meta.num_chunks, device);
        kernel<<<grid, kBlockThreads, 0, stream>>>(meta, s);
        STD_CUDA_KERNEL_LAUNCH_CHECK();
      },
      positions, first_indices);
}

// One call's launches for params of storage type P.
template <typename P>
void launch_adamw_for(const AdamWInputs& in, Master master, bool stochastic_rounding,
                      bool amsgrad, std::span<const int64_t> positions,
                      std::span<const int64_t> first_indices, const AdamWScalars& s,
                      cudaStream_t stream, int device) {
  dispatch_adamw_for<P>(in.grads[0].dtype, in.state_dtype, master, stochastic_rounding,
                        [&](auto /*p*/, auto g_tag, auto s_tag, auto kind, auto sr) {
    using G = typename decltype(g_tag)::type;
    using S = typename decltype(s_tag)::type;
    constexpr Master kM = decltype(kind)::value;
    constexpr bool kSR = decltype(sr)::value;
    if (amsgrad) {
      launch_adamw<P, G, S, kM, kSR, true>(in, positions, first_indices, s, stream, device);
    } else {
      launch_adamw<P, G, S, kM, kSR, false>(in, positions, first_indices, s, stream, device);
    }
  });
}

#define FASTOPT_ADAMW_FOR(P)                                                                   \
  template void launch_adamw_for<P>(const AdamWInputs&, Master, bool, bool,                   \
                                    std::span<const int64_t>, std::span<const int64_t>,         \
                                    const AdamWScalars&, cudaStream_t, int)
extern FASTOPT_ADAMW_FOR(float);
extern FASTOPT_ADAMW_FOR(BFloat16);
extern FASTOPT_ADAMW_FOR(Half);

}  // namespace fastopt::cuda
