// Which AdamW kernel instantiation serves a call: shared by the CPU and CUDA launchers, so both
// build the same set of variants and refuse the same settings with the same messages.
//
// A call's tensors share one storage dtype per list (fastopt.AdamW groups them so), which
// picks the kernel at compile time: P, G, S the storage of params, grads and moments, where the
// param's fp32 master lives, and whether bf16 stores round stochastically.
#pragma once

#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <cstddef>
#include <type_traits>

#include "checks.h"

namespace fastopt {

// Where a param's fp32 master lives: nowhere (the param is it), as the param plus an int16
// remainder (bf16 params), or in an fp32 copy (fp16 params).
enum class Master { kNone, kRemainder, kCopy };

// The storage of a master of kind kM for params of type P (P itself when there is none).
template <Master kM, typename P>
using master_storage_t = std::conditional_t<kM == Master::kRemainder, int16_t,
                                            std::conditional_t<kM == Master::kCopy, float, P>>;

template <typename T>
struct Tag {
  using type = T;
};

inline Master master_kind(const AdamWInputs& in) {
  if (in.masters.empty()) return Master::kNone;
  return in.params[0].dtype == ScalarType::BFloat16 ? Master::kRemainder : Master::kCopy;
}

// Stochastic rounding, and 8-bit moments (whose codes always round so), need one position (the
// noise's tensor index) and one first index (of the tensor's first element in its whole param)
// per tensor; stochastic rounding is implemented for bf16 stores only; fastopt.AdamW refuses
// the rest before a step.
inline void check_rounding(const AdamWInputs& in, Master master, bool stochastic_rounding,
                           size_t num_positions, size_t num_first_indices) {
  if (!stochastic_rounding && !in.quantized()) return;
  FASTOPT_CHECK(num_positions == in.params.size(), "fastopt.adamw_: positions has ",
                num_positions, " entries, expected ", in.params.size());
  FASTOPT_CHECK(num_first_indices == in.params.size(), "fastopt.adamw_: first_indices has ",
                num_first_indices, " entries, expected ", in.params.size());
  if (!stochastic_rounding) return;
  const bool fp16_store = in.state_dtype == ScalarType::Half ||
                          (in.params[0].dtype == ScalarType::Half && master == Master::kNone);
  FASTOPT_CHECK(!fp16_store, "fastopt.adamw_: stochastic rounding rounds bfloat16 stores "
                "only, and this step stores float16");
}

// Calls f(Tag<P>, Tag<G>, Tag<S>, constant<Master>, constant<bool kSR>) for params of type P,
// instantiating only the combinations a checked call can ask for: grads of the params' dtype
// or fp32; moments of the params' dtype, fp32, bf16 or 8-bit codes (uint8); a remainder only for bf16 params, an
// fp32 copy only for fp16 ones; stochastic rounding only where some store is bf16 and none is
// fp16.
template <typename P, typename F>
void dispatch_adamw_for(ScalarType grad, ScalarType state, Master master, bool sr, F&& f) {
  using BFloat16 = torch::headeronly::BFloat16;
  using Half = torch::headeronly::Half;
  const Tag<P> p;
  auto with_grad = [&](auto g) {
    auto with_state = [&](auto s) {
      using S = typename decltype(s)::type;
      auto with_master = [&](auto kind) {
        constexpr Master kM = decltype(kind)::value;
        constexpr bool kParamStore = kM == Master::kNone;
        constexpr bool kBf16Store =
            std::is_same_v<S, BFloat16> || (std::is_same_v<P, BFloat16> && kParamStore);
        constexpr bool kFp16Store =
            std::is_same_v<S, Half> || (std::is_same_v<P, Half> && kParamStore);
        if constexpr (kBf16Store && !kFp16Store) {
          if (sr) return f(p, g, s, kind, std::true_type{});
        }
        f(p, g, s, kind, std::false_type{});
      };
      if constexpr (std::is_same_v<P, BFloat16>) {
        if (master == Master::kRemainder) {
          return with_master(std::integral_constant<Master, Master::kRemainder>{});
        }
      }
      if constexpr (std::is_same_v<P, Half>) {
        if (master == Master::kCopy) {
          return with_master(std::integral_constant<Master, Master::kCopy>{});
        }
      }
      with_master(std::integral_constant<Master, Master::kNone>{});
    };
    if (state == ScalarType::Float) return with_state(Tag<float>{});
    if (state == ScalarType::BFloat16) return with_state(Tag<BFloat16>{});
    if (state == ScalarType::Byte) return with_state(Tag<uint8_t>{});
    with_state(Tag<P>{});  // the params' own dtype (checked: the only other one allowed)
  };
  if (grad == ScalarType::Float) return with_grad(Tag<float>{});
  with_grad(Tag<P>{});
}

// Calls f(Tag<T>{}) with the storage type of a float32, bfloat16 or float16 dtype.
template <typename F>
void dispatch_float(ScalarType dtype, F&& f) {
  switch (dtype) {
    case ScalarType::Float: return f(Tag<float>{});
    case ScalarType::BFloat16: return f(Tag<torch::headeronly::BFloat16>{});
    default: return f(Tag<torch::headeronly::Half>{});
  }
}

// dispatch_adamw_for with P the storage type of `param`.
template <typename F>
void dispatch_adamw(ScalarType param, ScalarType grad, ScalarType state, Master master, bool sr,
                    F&& f) {
  dispatch_float(param, [&](auto p) {
    dispatch_adamw_for<typename decltype(p)::type>(grad, state, master, sr, f);
  });
}

}  // namespace fastopt
