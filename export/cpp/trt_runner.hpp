// The TensorRT runner (compiled only where TensorRT and CUDA are found): executes a DecodePlan.
//
// It deserializes the plan file of every graph the decode calls, from the manifest's `plans` section
// (written by `mindhier-rt build`):
//
//   "plans": {<graph name>: {"file": <plan file in the bundle>,
//                            "profiles": [{<input name>: {"min": [...], "opt": [...], "max": [...]}}, ...]}}
//
// Keys read: plans.<graph>.file (required for every graph the decode calls), plans.<graph>.profiles
// (optional; make_plan picks each call's profile from them, padding rows up to what a profile admits: for
// the step, profile i serves scale i; for the other graphs the first profile that admits the call),
// plans.<graph>.flags (optional) and tensorrt.step_graph (optional). Every plan file must be listed in the
// manifest's `files` with its SHA-256.
//
// Execution, all on one CUDA stream: one device buffer per plan buffer (allocated once, zeroed per run;
// the rope tables and write_indices uploaded once), `setOptimizationProfileAsync` when a call's profile
// differs from its context's, `setInputShape` + `setTensorAddress` per tensor (pointers offset into the
// plan's buffers: a scale's context segment is bound in place in the segment-major cache; present -> next
// past alternate between two buffers, or share one with the in-place step), `enqueueV3`. Plans flagged
// "version_compatible" are loaded with `setEngineHostCodeAllowed(true)`. Between the step and the update
// of a scale the logits come to the host, are combined and sampled by the shared routine (sampling.cpp)
// and the tokens go back. CUDA graphs are not used (each scale runs once per decode, with host sampling
// in between).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "manifest.hpp"
#include "plan.hpp"

namespace mh {

struct DecodeResult {
  std::vector<float> images;                 // [R, 3, H, W] in [0, 1] (padded rows dropped)
  std::vector<std::vector<int64_t>> tokens;  // per scale, [R, l] row-major
};

class TrtRunner {
 public:
  // Loads the engines `plan` calls and allocates its buffers on CUDA device `device`.
  TrtRunner(const Manifest& m, const DecodePlan& plan, int device = 0);
  ~TrtRunner();
  TrtRunner(const TrtRunner&) = delete;
  TrtRunner& operator=(const TrtRunner&) = delete;

  // voxels_NV: [plan.scans, plan.voxels] float32, row n is the scan with id plan.row_scan[n * samples].
  DecodeResult run(const DecodePlan& plan, const std::vector<float>& voxels_NV);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace mh
