// Reading and checking the ops' tensor arguments: the pieces every op's checks are made of, so
// each check reads and fails the same way on every device, its message naming the op (by its
// schema name, "adamw_") and the offending argument. The rules of one op's arguments sit beside
// it, built from these (adamw_inputs.h, reduce_inputs.h).
//
// Written against PyTorch's stable ABI (torch::stable::Tensor), so one binary loads into every
// torch from TORCH_TARGET_VERSION on; failures throw through FASTOPT_CHECK (error.h), whose
// messages carry no build paths. Every accessor of a stable tensor is a call into libtorch
// (scalar_type() and device() several), so each tensor's properties are read once, into a
// TensorInfo, which the kernels then take their pointers and sizes from.
#pragma once

#include <torch/csrc/stable/tensor.h>

#include <cstdint>
#include <optional>
#include <ostream>
#include <vector>

#include "dtypes.h"
#include "error.h"

namespace fastopt {

using torch::stable::Device;
using torch::stable::DeviceType;
using torch::stable::Tensor;
// Tensor[] arguments arrive as a vector of owning handles; Tensor? as an optional.
using TensorList = std::vector<Tensor>;
using OptionalTensor = std::optional<Tensor>;

// torch's name of a device type, for the types a tensor reaching these kernels can have.
inline const char* device_type_name(DeviceType type) {
  switch (type) {
    case DeviceType::CPU:
      return "cpu";
    case DeviceType::CUDA:
      return "cuda";
    case DeviceType::Meta:
      return "meta";
    case DeviceType::XPU:
      return "xpu";
    case DeviceType::MPS:
      return "mps";
    case DeviceType::PrivateUse1:
      return "privateuseone";
    default:
      return "unknown";
  }
}

// For messages: "cpu", "cuda:1", as torch prints a device (the stable Device has no <<).
struct DeviceName {
  Device device;
};
inline std::ostream& operator<<(std::ostream& out, const DeviceName& d) {
  out << device_type_name(d.device.type());
  if (d.device.has_index() && !d.device.is_cpu()) out << ":" << int(d.device.index());
  return out;
}

// Whether a kernel writes a tensor (its pointer comes from mutable_data_ptr, which unshares a
// copy-on-write tensor first) or only reads it (const_data_ptr, which leaves it shared).
enum class Access { kRead, kWrite };

// A tensor's dtype and device by the fewest shim calls. torch::stable's scalar_type() maps the
// shim's dtype code to a ScalarType through one more call per dtype it tries (13 for
// bfloat16), device() reads the index and maps the type the same way: 30% of a planned step's
// reads of 1,000 small tensors on a 2-core EPYC. The codes of the dtypes the kernels take, and
// of the CPU and CUDA, are read once; any other takes torch's mapping.
namespace detail {
struct ShimCodes {
  int32_t f32 = aoti_torch_dtype_float32(), bf16 = aoti_torch_dtype_bfloat16(),
          f16 = aoti_torch_dtype_float16(), u8 = aoti_torch_dtype_uint8(),
          i8 = aoti_torch_dtype_int8(), i16 = aoti_torch_dtype_int16(),
          cpu = aoti_torch_device_type_cpu(), cuda = aoti_torch_device_type_cuda();
};
inline const ShimCodes& shim_codes() {
  static const ShimCodes codes;
  return codes;
}
}  // namespace detail

inline ScalarType dtype_of(const Tensor& t) {
  int32_t code;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_dtype(t.get(), &code));
  const auto& c = detail::shim_codes();
  if (code == c.f32) return ScalarType::Float;
  if (code == c.bf16) return ScalarType::BFloat16;
  if (code == c.f16) return ScalarType::Half;
  if (code == c.u8) return ScalarType::Byte;
  if (code == c.i8) return ScalarType::Char;
  if (code == c.i16) return ScalarType::Short;
  return t.scalar_type();
}

inline Device device_of(const Tensor& t) {
  int32_t type;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_type(t.get(), &type));
  const auto& c = detail::shim_codes();
  if (type == c.cpu) return Device(DeviceType::CPU);  // index -1, as torch's
  if (type != c.cuda) return t.device();
  int32_t index;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_index(t.get(), &index));
  return Device(DeviceType::CUDA, static_cast<torch::stable::DeviceIndex>(index));
}

// One tensor's properties, read once.
struct TensorInfo {
  void* data;  // const unless read with Access::kWrite
  int64_t numel;
  ScalarType dtype;
  Device device;
  bool contiguous;

  TensorInfo(const Tensor& t, Access access)
      : data(access == Access::kWrite ? t.mutable_data_ptr()
                                      : const_cast<void*>(t.const_data_ptr())),
        numel(t.numel()),
        dtype(dtype_of(t)),
        device(device_of(t)),
        contiguous(t.is_contiguous()) {}
};

// A hint to load the cache line at `p`, which never faults whatever `p` is. On x86-64 it is
// written in assembly: GCC 12 drops __builtin_prefetch from ReadAhead::at below (all of its
// prefetches, once one address comes from a load). Elsewhere (aarch64 hosts) the builtin,
// which at worst the compiler drops: a slower read, never a wrong one.
inline void prefetch_line(const void* p) {
#if defined(__x86_64__) && !defined(__CUDA_ARCH__)
  asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p);
#endif
}

// Reading ahead of a loop over many tensors' properties. Each tensor is a chain of three heap
// objects (the handle, which is an at::Tensor; its TensorImpl; its StorageImpl), and a loop
// that reads one tensor's properties before the next reaches each object with the full
// latency of a cache miss: 25% of a planned step of 1,000 small tensors in a profile on a
// 2-core EPYC, on the first loads of the TensorImpl and of the StorageImpl. `at(i)` before
// reading tensor i starts the misses of tensors i + kAhead .. i + 3 * kAhead, one object deeper
// per stage, so they overlap. It relies on two layouts, read from torch 2.14's shim in its
// disassembly: an at::Tensor's first word is its TensorImpl*, and a TensorImpl's third word
// (after the vtable and the reference counts) is its StorageImpl*. Both reads stay inside the
// objects and a prefetch never faults, so a torch that changed either (or the offsets below)
// would only prefetch the wrong lines: slower, never wrong.
class ReadAhead {
 public:
  explicit ReadAhead(const TensorList& list) : list_(list.data()), size_(list.size()) {}

  void at(size_t i) const {
    if (i + 3 * kAhead < size_) prefetch_line(list_[i + 3 * kAhead].get());
    if (i + 2 * kAhead < size_) {
      // The shim's reads of a TensorImpl (torch 2.14 on x86-64): its vtable and storage
      // pointer (bytes 0-23), then numel, dtype, device and flags (bytes 152-167).
      const char* impl = impl_of(list_[i + 2 * kAhead]);
      prefetch_line(impl);
      prefetch_line(impl + 152);
      prefetch_line(impl + 167);
    }
    if (i + kAhead < size_) {
      // Of a StorageImpl, its data pointer and flags (bytes 16-61).
      const char* impl = impl_of(list_[i + kAhead]);
      const char* storage = *reinterpret_cast<const char* const*>(impl + 2 * sizeof(void*));
      prefetch_line(storage + 16);
      prefetch_line(storage + 61);
    }
  }

 private:
  // Tensors per stage: a tensor's reads take about 30 ns when they hit, so 8 keep each stage
  // about 240 ns ahead, more than a DRAM miss takes (4 measured the same, warm).
  static constexpr size_t kAhead = 8;

  static const char* impl_of(const Tensor& t) {
    return *reinterpret_cast<const char* const*>(t.get());
  }

  const Tensor* list_;
  size_t size_;
};

// Into `out`, replacing what it held (a caller that keeps `out` reuses its memory).
inline void read_infos(const TensorList& list, Access access, std::vector<TensorInfo>& out) {
  out.clear();
  out.reserve(list.size());
  const ReadAhead ahead(list);
  for (size_t i = 0; i < list.size(); ++i) {
    ahead.at(i);
    out.emplace_back(list[i], access);
  }
}

inline std::vector<TensorInfo> infos(const TensorList& list, Access access) {
  std::vector<TensorInfo> out;
  read_infos(list, access, out);
  return out;
}

// For messages: a tensor's shape as torch prints it, "[2, 3]".
struct Sizes {
  const Tensor& t;
};
inline std::ostream& operator<<(std::ostream& out, const Sizes& s) {
  out << "[";
  const auto sizes = s.t.sizes();
  for (size_t d = 0; d < sizes.size(); ++d) out << (d ? ", " : "") << sizes[d];
  return out << "]";
}

// Whether a tensor on `actual` is on `expected`: the same device, or for the CPU any CPU
// device (there is one, whatever index a tensor reports).
inline bool on_device(const Device& actual, const Device& expected) {
  return expected.is_cpu() ? actual.is_cpu() : actual == expected;
}

// `name` (a list's first tensor, "params[0]") is on a device of type `type`.
inline void check_device_type(const char* op, const char* name, const TensorInfo& t,
                              DeviceType type) {
  FASTOPT_CHECK(t.device.type() == type, "fastopt.", op, ": ", name, " is on ",
                DeviceName{t.device}, ", expected a ", device_type_name(type), " device");
}

// The list `name` has n tensors.
inline void check_count(const char* op, const char* name, size_t size, size_t n) {
  FASTOPT_CHECK(size == n, "fastopt.", op, ": ", name, " has ", size, " tensors, expected ", n);
}

// `list` holds n contiguous tensors of `dtype` on `device`, the device of `owner` ("params[0]").
inline void check_list(const char* op, const char* name, const std::vector<TensorInfo>& list,
                       size_t n, ScalarType dtype, const Device& device, const char* owner) {
  check_count(op, name, list.size(), n);
  for (size_t i = 0; i < n; ++i) {
    const auto& t = list[i];
    FASTOPT_CHECK(on_device(t.device, device), "fastopt.", op, ": ", name, "[", i, "] is on ",
                  DeviceName{t.device}, ", ", owner, " on ", DeviceName{device});
    FASTOPT_CHECK(t.dtype == dtype, "fastopt.", op, ": ", name, "[", i, "] is ", t.dtype,
                  ", expected ", dtype);
    FASTOPT_CHECK(t.contiguous, "fastopt.", op, ": ", name, "[", i, "] must be contiguous");
  }
}

// `list` holds contiguous float32, bfloat16 or float16 tensors, in any mix, on `device`.
inline void check_floating_list(const char* op, const char* name,
                                const std::vector<TensorInfo>& list, const Device& device) {
  for (size_t i = 0; i < list.size(); ++i) {
    const auto& t = list[i];
    FASTOPT_CHECK(is_floating(t.dtype), "fastopt.", op, ": ", name, "[", i,
                  "] must be float32, bfloat16 or float16, got ", t.dtype);
    FASTOPT_CHECK(on_device(t.device, device), "fastopt.", op, ": ", name, "[", i, "] is on ",
                  DeviceName{t.device}, ", expected ", DeviceName{device});
    FASTOPT_CHECK(t.contiguous, "fastopt.", op, ": ", name, "[", i, "] must be contiguous");
  }
}

// Reads an optional one-element float32 tensor on `device` as a pointer to its value (nullptr
// when absent), a device pointer for a CUDA op.
inline const float* optional_scalar(const OptionalTensor& t, const Device& device, const char* op,
                                    const char* name) {
  if (!t.has_value()) return nullptr;
  const TensorInfo info(*t, Access::kRead);
  FASTOPT_CHECK(info.numel == 1 && info.dtype == ScalarType::Float, "fastopt.", op, ": ", name,
                " must be a one-element float32 tensor, got ", Sizes{*t}, " of ", info.dtype);
  FASTOPT_CHECK(on_device(info.device, device), "fastopt.", op, ": ", name, " is on ",
                DeviceName{info.device}, ", expected ", DeviceName{device});
  return static_cast<const float*>(info.data);
}

}  // namespace fastopt
