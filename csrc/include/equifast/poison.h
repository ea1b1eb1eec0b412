// Test aid (host code only): with EQUIFAST_POISON_OUTPUTS=1 in the environment, the ops that
// allocate their outputs uninitialized (both CPU ops, the CUDA transform_images; the CUDA
// statistics op zeroes its output) fill them with NaN before the kernel writes them. A
// heap block reused from an earlier call of the same shape can hold exactly the values expected,
// so an element a kernel forgot to write would go unnoticed; poisoned, it fails the comparison.
// tests/conftest.py turns it on for the whole suite. Read on every call (a getenv is cheap next to
// any op), so that a test can switch it.
#pragma once

#include <cstdlib>

namespace equifast {

inline bool poison_outputs() {
  const char* value = std::getenv("EQUIFAST_POISON_OUTPUTS");
  return value != nullptr && value[0] != '\0' && !(value[0] == '0' && value[1] == '\0');
}

}  // namespace equifast
