// Run-time choice of the x86 vector ISA for the CPU kernels.
//
// The kernels compile their loops several times (baseline SSE2, and with target attributes for
// AVX2 + FMA and for AVX-512) and pick one per call. EQUIFAST_CPU_ISA caps the choice, so the
// tests can run every copy on one machine: "default" (SSE2 only), "avx2", "avx512" (the default:
// the best the CPU supports).
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

#if defined(__GNUC__) && defined(__x86_64__)
#define EQUIFAST_HAVE_AVX2_PATH 1
#define EQUIFAST_TARGET_AVX2 __attribute__((target("avx2,fma"), flatten))
#define EQUIFAST_TARGET_AVX512 \
  __attribute__((target("avx2,fma,avx512f,avx512vl,avx512dq,avx512bw"), flatten))
// The AVX-512 set with VBMI's byte permutations (Ice Lake and later; not Skylake-X).
#define EQUIFAST_TARGET_AVX512_VBMI \
  __attribute__((target("avx2,fma,avx512f,avx512vl,avx512dq,avx512bw,avx512vbmi"), flatten))
#else
#define EQUIFAST_HAVE_AVX2_PATH 0
#endif

namespace equifast {

// The cap EQUIFAST_CPU_ISA sets: 0 default (SSE2), 1 avx2, 2 avx512 (also when unset).
inline int cpu_isa_cap() {
  const char* isa = std::getenv("EQUIFAST_CPU_ISA");
  if (isa == nullptr || std::string(isa).empty() || std::string(isa) == "avx512") return 2;
  if (std::string(isa) == "avx2") return 1;
  TORCH_CHECK(std::string(isa) == "default",
              "EQUIFAST_CPU_ISA must be one of default, avx2, avx512 (or unset), but got '", isa,
              "'.");
  return 0;
}

inline bool use_avx2() {
#if EQUIFAST_HAVE_AVX2_PATH
  if (cpu_isa_cap() < 1) return false;
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  (void)cpu_isa_cap();  // a wrong value is an error everywhere
  return false;
#endif
}

// Implies use_avx2().
inline bool use_avx512() {
#if EQUIFAST_HAVE_AVX2_PATH
  if (cpu_isa_cap() < 2) return false;
  __builtin_cpu_init();
  return use_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw");
#else
  return false;
#endif
}

// Implies use_avx512().
inline bool use_avx512_vbmi() {
#if EQUIFAST_HAVE_AVX2_PATH
  __builtin_cpu_init();
  return use_avx512() && __builtin_cpu_supports("avx512vbmi");
#else
  return false;
#endif
}

}  // namespace equifast
