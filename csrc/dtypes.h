// The floating storage dtypes the kernels take, and the one dispatch from a dtype to its C++
// storage type, shared by the CPU and CUDA code.
#pragma once

#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

namespace fastopt {

using torch::headeronly::ScalarType;
using BFloat16 = torch::headeronly::BFloat16;
using Half = torch::headeronly::Half;

// A type as a value: lambdas dispatched over storage types take Tag<T> and read T back as
// typename decltype(tag)::type, with no T ever constructed.
template <typename T>
struct Tag {
  using type = T;
};

inline bool is_floating(ScalarType dt) {
  return dt == ScalarType::Float || dt == ScalarType::BFloat16 || dt == ScalarType::Half;
}

// Calls f(Tag<T>{}) with the storage type of a float32, bfloat16 or float16 dtype (the caller
// has checked it is one: anything else is taken as float16).
template <typename F>
decltype(auto) dispatch_float(ScalarType dtype, F&& f) {
  switch (dtype) {
    case ScalarType::Float:
      return f(Tag<float>{});
    case ScalarType::BFloat16:
      return f(Tag<BFloat16>{});
    default:
      return f(Tag<Half>{});
  }
}

}  // namespace fastopt
