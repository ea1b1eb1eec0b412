// Argument checks for the equifast operators (host code only).
//
// Each check names the argument and says what was expected, what was found and what to do, e.g.
//   equifast: feats must be a 4-D tensor (B, C, H, W), but got a 3-D tensor of shape [2, 3, 4].
//   Pass the layer output with its batch dimension.
// Use them for anything a user can get wrong (TORCH_CHECK raises a Python RuntimeError/ValueError);
// use TORCH_INTERNAL_ASSERT only for what the dispatcher guarantees.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>
#include <sstream>
#include <string>
#include <string_view>

namespace equifast {

// A general check naming the argument: EQUIFAST_CHECK_ARG(grid_h > 0, "grid_h", "must be > 0, got ",
// grid_h, ". Pass the height of the layer's spatial grid.");
#define EQUIFAST_CHECK_ARG(cond, arg_name, ...) \
  TORCH_CHECK((cond), "equifast: ", arg_name, " ", __VA_ARGS__)

// Same, raising ValueError in Python (for bad values rather than bad tensors).
#define EQUIFAST_CHECK_VALUE(cond, arg_name, ...) \
  TORCH_CHECK_VALUE((cond), "equifast: ", arg_name, " ", __VA_ARGS__)

namespace detail {

inline std::string join_dtypes(std::initializer_list<c10::ScalarType> dtypes) {
  std::ostringstream out;
  bool first = true;
  for (auto dtype : dtypes) {
    out << (first ? "" : ", ") << dtype;
    first = false;
  }
  return out.str();
}

inline std::string join_ints(std::initializer_list<int64_t> values) {
  std::ostringstream out;
  bool first = true;
  for (auto value : values) {
    out << (first ? "" : " or ") << value;
    first = false;
  }
  return out.str();
}

// " (B, C, H, W)" when a description of the axes is given, "" otherwise.
inline std::string axes_suffix(const char* axes) {
  return (axes != nullptr && axes[0] != '\0') ? std::string(" ") + axes : std::string();
}

}  // namespace detail

inline void check_defined(const at::Tensor& tensor, const char* name) {
  TORCH_CHECK(tensor.defined(), "equifast: ", name,
              " must be a tensor, but got an undefined tensor (None). Pass a tensor.");
}

// check_dim(feats, "feats", 4, "(B, C, H, W)")
inline void check_dim(const at::Tensor& tensor, const char* name, int64_t dim,
                      const char* axes = nullptr) {
  TORCH_CHECK(tensor.dim() == dim, "equifast: ", name, " must be a ", dim, "-D tensor",
              detail::axes_suffix(axes), ", but got a ", tensor.dim(), "-D tensor of shape ",
              tensor.sizes(), ". Reshape it to ", dim, " dimensions.");
}

// check_dim_in(feats, "feats", {3, 4}, "(B, N, C) or (B, C, H, W)")
inline void check_dim_in(const at::Tensor& tensor, const char* name,
                         std::initializer_list<int64_t> dims, const char* axes = nullptr) {
  bool ok = false;
  for (auto dim : dims) ok = ok || tensor.dim() == dim;
  TORCH_CHECK(ok, "equifast: ", name, " must have ", detail::join_ints(dims), " dimensions",
              detail::axes_suffix(axes), ", but got a ", tensor.dim(), "-D tensor of shape ",
              tensor.sizes(), ".");
}

// check_size(src, "src", 1, 3, "channels"): src.size(1) must be 3.
inline void check_size(const at::Tensor& tensor, const char* name, int64_t dim, int64_t expected,
                       const char* what = nullptr) {
  TORCH_CHECK(dim < tensor.dim() && tensor.size(dim) == expected, "equifast: ", name, ".size(", dim,
              ")", (what != nullptr ? std::string(" (") + what + ")" : std::string()),
              " must be ", expected, ", but got shape ", tensor.sizes(), ".");
}

// check_shape(affines, "source_affines", {K, 2, 3}, "(K+1, 2, 3)")
inline void check_shape(const at::Tensor& tensor, const char* name, c10::IntArrayRef expected,
                        const char* axes = nullptr) {
  TORCH_CHECK(tensor.sizes() == expected, "equifast: ", name, " must have shape ", expected,
              detail::axes_suffix(axes), ", but got shape ", tensor.sizes(), ".");
}

inline void check_dtype(const at::Tensor& tensor, const char* name, c10::ScalarType dtype) {
  TORCH_CHECK(tensor.scalar_type() == dtype, "equifast: ", name, " must have dtype ", dtype,
              ", but got ", tensor.scalar_type(), ". Convert it with .to(", dtype, ").");
}

// check_dtype_in(feats, "feats", {at::kFloat, at::kHalf, at::kBFloat16})
inline void check_dtype_in(const at::Tensor& tensor, const char* name,
                           std::initializer_list<c10::ScalarType> dtypes) {
  bool ok = false;
  for (auto dtype : dtypes) ok = ok || tensor.scalar_type() == dtype;
  TORCH_CHECK(ok, "equifast: ", name, " must have one of the dtypes ", detail::join_dtypes(dtypes),
              ", but got ", tensor.scalar_type(), ". Convert it with .to(<one of these dtypes>).");
}

inline void check_device_cpu(const at::Tensor& tensor, const char* name) {
  TORCH_CHECK(tensor.device().is_cpu(), "equifast: ", name, " must be on the CPU, but it is on ",
              tensor.device(), ". Move it with .cpu().");
}

inline void check_device_cuda(const at::Tensor& tensor, const char* name) {
  TORCH_CHECK(tensor.device().is_cuda(), "equifast: ", name,
              " must be on a CUDA device, but it is on ", tensor.device(), ". Move it with .cuda().");
}

// check_same_device(affines, "affines", feats, "feats")
inline void check_same_device(const at::Tensor& tensor, const char* name, const at::Tensor& other,
                              const char* other_name) {
  TORCH_CHECK(tensor.device() == other.device(), "equifast: ", name, " and ", other_name,
              " must be on the same device, but ", name, " is on ", tensor.device(), " and ",
              other_name, " on ", other.device(), ". Move one of them with .to(device).");
}

inline void check_contiguous(const at::Tensor& tensor, const char* name,
                             c10::MemoryFormat format = c10::MemoryFormat::Contiguous) {
  TORCH_CHECK(tensor.is_contiguous(format), "equifast: ", name, " must be contiguous in ", format,
              " memory format, but got strides ", tensor.strides(), " for shape ", tensor.sizes(),
              ". Call .contiguous(memory_format=...) first.");
}

// check_positive(grid_h, "grid_h")
inline void check_positive(int64_t value, const char* name) {
  TORCH_CHECK_VALUE(value > 0, "equifast: ", name, " must be > 0, but got ", value, ".");
}

// check_non_negative(prefix, "prefix")
inline void check_non_negative(int64_t value, const char* name) {
  TORCH_CHECK_VALUE(value >= 0, "equifast: ", name, " must be >= 0, but got ", value, ".");
}

// check_list_size(protocols, "protocols", affines.size(0), "one per affine map")
template <typename T>
inline void check_list_size(c10::ArrayRef<T> values, const char* name, int64_t expected,
                            const char* why = nullptr) {
  TORCH_CHECK_VALUE(static_cast<int64_t>(values.size()) == expected, "equifast: ", name,
                    " must have ", expected, " entries",
                    (why != nullptr ? std::string(" (") + why + ")" : std::string()), ", but got ",
                    values.size(), ".");
}

// check_one_of(layout, "layout", {"nchw", "nhwc", "nlc"})
inline void check_one_of(std::string_view value, const char* name,
                         std::initializer_list<std::string_view> allowed) {
  bool ok = false;
  std::ostringstream choices;
  bool first = true;
  for (auto choice : allowed) {
    ok = ok || value == choice;
    choices << (first ? "'" : ", '") << choice << "'";
    first = false;
  }
  TORCH_CHECK_VALUE(ok, "equifast: ", name, " must be one of ", choices.str(), ", but got '",
                    std::string(value), "'.");
}

}  // namespace equifast
