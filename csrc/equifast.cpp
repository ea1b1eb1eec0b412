// The schema file of the equifast operators.
//
// Every op is declared here once, with TORCH_LIBRARY, and reached from Python as
// torch.ops.equifast.<op>. The kernels live one per backend file and register themselves with
// TORCH_LIBRARY_IMPL(equifast, CPU|CUDA): csrc/cpu/<op>_kernel.cpp and csrc/cuda/<op>_kernel.cu.
// The fake (meta) kernels and the pure-PyTorch references are registered in Python (equifast/ops).
//
// This file also defines the Python module equifast._C itself (PYBIND11_MODULE): importing it
// loads the library and so runs the registrations. Its only function, build_info(), reports how the
// library was built. Keep kernels out of this file: it is the only one that includes the heavy
// pybind11/torch headers.

#include <torch/library.h>
#include <torch/version.h>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#ifdef WITH_CUDA
#include <cuda.h>  // CUDA_VERSION of the toolkit the CUDA sources were compiled with
#endif

// Build facts passed by setup.py as string defines; the fallbacks keep a hand build working.
#ifndef EQUIFAST_TORCH_VERSION
#define EQUIFAST_TORCH_VERSION TORCH_VERSION
#endif
#ifndef EQUIFAST_CUDA_ARCH_LIST
#define EQUIFAST_CUDA_ARCH_LIST ""
#endif

TORCH_LIBRARY(equifast, m) {
  // The (K+1)*B model inputs, identity block first: each source image resampled under each
  // affine map, normalized, in out_dtype and memory format. Contract: equifast/ops (docstrings)
  // and DESIGN.md section 4.
  m.def(
      "transform_images(Tensor src, Tensor source_affines, int[] protocols, int margin_y, "
      "int margin_x, int out_h, int out_w, float[]? mean, float[]? std, ScalarType out_dtype, "
      "bool channels_last) -> Tensor");

  // float32 sufficient statistics (eq, inv, chance) comparing each transformed block of a layer
  // output with the transformed identity block: the first block of feats, or `reference` (then
  // feats holds the K element blocks only); with `disc` (centre_x, centre_y, radius_x, radius_y
  // in grid coordinates) only over positions that lie inside it with their sources. Contract:
  // equifast/ops and DESIGN.md section 4.
  m.def(
      "equivariance_stats(Tensor feats, Tensor source_affines, int[] wrap, int batch, str layout, "
      "int grid_h, int grid_w, int prefix, str subpixel, bool with_inv, bool with_chance, "
      "Tensor? reference=None, float[]? disc=None) -> Tensor");

  // Scores of compared pairs from float64 statistics (..., C, 6) of one or several layers whose
  // channels lie one after the other (channel_counts): (..., L, 8) float64, the scores in the
  // order of equifast.scores.METRICS. CPU only; elsewhere equifast/scores.py computes them with
  // torch ops. Contract: equifast/scores.py (score_stats).
  m.def("score_stats(Tensor stats, int[] channel_counts, float? psnr_range) -> Tensor");
}

namespace {

std::vector<std::string> compiled_backends() {
  std::vector<std::string> backends{"cpu"};
#ifdef WITH_CUDA
  backends.emplace_back("cuda");
#endif
  return backends;
}

// "9.0;8.0+PTX" or "9.0 8.0" -> ["9.0", "8.0+PTX"]
std::vector<std::string> split_arch_list(const std::string& text) {
  std::vector<std::string> arches;
  std::string current;
  for (char c : text) {
    if (c == ';' || c == ' ' || c == ',') {
      if (!current.empty()) arches.push_back(current);
      current.clear();
    } else {
      current.push_back(c);
    }
  }
  if (!current.empty()) arches.push_back(current);
  return arches;
}

pybind11::dict build_info() {
  pybind11::dict info;
  info["loaded"] = true;
  info["backends"] = compiled_backends();
  info["cuda_arch_list"] = split_arch_list(EQUIFAST_CUDA_ARCH_LIST);
  info["torch_version"] = std::string(EQUIFAST_TORCH_VERSION);
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = std::string(__VERSION__);
#endif
#ifdef WITH_CUDA
  // CUDA_VERSION is major * 1000 + minor * 10.
  info["cuda_version"] =
      std::to_string(CUDA_VERSION / 1000) + "." + std::to_string((CUDA_VERSION % 1000) / 10);
#else
  info["cuda_version"] = pybind11::none();
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "equifast compiled operators (reached as torch.ops.equifast.*)";
  m.def("build_info", &build_info,
        "How this library was built: backends, CUDA arch list, torch, compiler and CUDA versions.");
}
