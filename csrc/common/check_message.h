// Error messages for the backends' argument checks, built without iostreams.
//
// TORCH_CHECK(cond, a, b, ...) formats its arguments with a std::ostringstream compiled into
// this extension. On the GPU image this project was validated on (CUDA 13, torch 2.11) every
// failed check with a number in its message segfaulted in ostream::_M_insert<long>, in code gdb
// placed inside the extension (its own copy of the stream code, whose locale was seemingly never
// set up): a bad argument crashed the process instead of raising. TORCH_CHECK passes a single
// std::string through untouched, so LBW_CHECK builds that string here with std::to_string and
// plain concatenation.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>
#include <type_traits>

namespace lbw_check {

inline void append(std::string& out, const char* s) { out += s; }
inline void append(std::string& out, const std::string& s) { out += s; }
inline void append(std::string& out, c10::ScalarType t) { out += c10::toString(t); }
inline void append(std::string& out, const c10::Device& d) { out += d.str(); }

template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool> &&
                                           !std::is_same_v<T, char>, int> = 0>
inline void append(std::string& out, T v) {
  out += std::to_string(v);
}

// No floating-point or bool overload: IntArrayRef's one-element constructor would otherwise take
// them and print 0.7 as [0]. Format such a value into a string first.
template <typename T, std::enable_if_t<std::is_floating_point_v<T> || std::is_same_v<T, bool>, int> = 0>
void append(std::string& out, T v) = delete;

inline void append(std::string& out, c10::IntArrayRef values) {  // sizes and strides: [2, 3]
  out += '[';
  for (size_t i = 0; i < values.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(values[i]);
  }
  out += ']';
}

template <typename... Args>
std::string message(const Args&... args) {
  std::string out;
  (append(out, args), ...);
  return out;
}

}  // namespace lbw_check

// TORCH_CHECK with the message made by lbw_check::message (only when the check fails).
#define LBW_CHECK(cond, ...) TORCH_CHECK(cond, ::lbw_check::message(__VA_ARGS__))
