// FASTOPT_CHECK(cond, parts...): throws std::runtime_error whose message is the parts, streamed
// together, and nothing else.
//
// torch's STD_TORCH_CHECK prefixes the function name and the source file and line, so a wheel's
// errors would show its build machine's paths ("check_floating, /home/ci/fastopt/csrc/cpu/
// reduce.cpp:133, fastopt.multi_tensor_norm: ..."). Our messages already name the op and the
// argument. The exception crosses the stable C shim unchanged (a stable kernel is called from
// libtorch, in C++), and torch's Python binding turns a std::runtime_error into a RuntimeError
// carrying what() as it is.
#pragma once

#include <sstream>
#include <stdexcept>

namespace fastopt::detail {

// Out of line and cold: the checks sit in every op's entry, and the message formatting is
// only paid for on failure.
template <typename... Parts>
[[noreturn, gnu::noinline, gnu::cold]] void fail(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  throw std::runtime_error(out.str());
}

}  // namespace fastopt::detail

#define FASTOPT_CHECK(cond, ...)                                            \
  do {                                                                      \
    if (__builtin_expect(!(cond), 0)) ::fastopt::detail::fail(__VA_ARGS__); \
  } while (0)
