// Which AdamW kernel instantiation serves a checked call (adamw_inputs.h checks it): shared by
// the CPU and CUDA launchers, so both build the same set of variants.
//
// A call's tensors share one storage dtype per list (fastopt.AdamW groups them so), which
// picks the kernel at compile time: P, G, S the storage of params, grads and moments, where the
// param's fp32 master lives, and whether bf16 stores round stochastically.
#pragma once

#include <cstdint>
#include <type_traits>

#include "adamw_inputs.h"
#include "dtypes.h"

namespace fastopt {

// The storage of a master of kind kM for params of type P (P itself when there is none).
template <Master kM, typename P>
using master_storage_t = std::conditional_t<kM == Master::kRemainder, int16_t,
                                            std::conditional_t<kM == Master::kCopy, float, P>>;

// Calls f(Tag<P>, Tag<G>, Tag<S>, constant<Master>, constant<bool kSR>) for params of type P,
// instantiating only the combinations a checked call can ask for: grads of the params' dtype
// or fp32; moments of the params' dtype, fp32, bf16 or 8-bit codes (uint8); a remainder only
// for bf16 params, an fp32 copy only for fp16 ones; stochastic rounding only where some store
// is bf16 and none is fp16.
template <typename P, typename F>
void dispatch_adamw_for(ScalarType grad, ScalarType state, Master master, bool sr, F&& f) {
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

// dispatch_adamw_for with P the storage type of `param`.
template <typename F>
void dispatch_adamw(ScalarType param, ScalarType grad, ScalarType state, Master master, bool sr,
                    F&& f) {
  dispatch_float(param, [&](auto p) {
    dispatch_adamw_for<typename decltype(p)::type>(grad, state, master, sr, f);
  });
}

}  // namespace fastopt
