// Token sampling, the C++ twin of mindhier_rt/sampling.py: classifier-free guidance (ramp and combine),
// the counter-based uniform of each token position, top-k / top-p / inverse-CDF selection and greedy.
// docs/sampling.md is the specification; the same logits give the same tokens as
// mindhier_rt.sampling.sample_tokens (checked by tests/host_tests.cpp and tests/test_cpp_host.py).
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

namespace mh {

struct SamplingConfig {
  double cfg_scale = 6.0;          // guidance weight reached at the last scale; 0 disables guidance
  std::optional<int64_t> cfg_stop;  // first 0-indexed scale with guidance off; empty: all scales guided
  int64_t top_k = 400;             // 0 = no top-k; values above V act as V
  double top_p = 0.95;             // nucleus mass in (0, 1]; 1 = no top-p
  bool greedy = false;             // argmax, lowest index on ties
  uint64_t seed = 0;

  void validate() const;  // throws HostError, with the same rules as SamplingConfig.__post_init__
};

// ---- random stream (docs/sampling.md section 3) ----
uint32_t fmix32(uint32_t x);
uint32_t hash_key(uint64_t seed, uint32_t scan, uint32_t sample, uint32_t scale, uint32_t token);
double uniform(uint64_t seed, uint32_t scan, uint32_t sample, uint32_t scale, uint32_t token);

// ---- classifier-free guidance (section 2) ----
bool guidance_active(const SamplingConfig& cfg, int64_t scale);
double guidance_weight(const SamplingConfig& cfg, int64_t scale, int64_t n_scales);  // t_i, float64
// out[k] = float(1 + t) * cond[k] - float(t) * uncond[k], each product and the difference rounded to
// float32 (no fused multiply-add: the build passes -ffp-contract=off). out may alias cond.
void cfg_combine(const float* cond, const float* uncond, float* out, int64_t n, double t);

// ---- selection (section 5) ----
// One token position: x holds V logits converted to double, u its uniform. `order` is scratch space.
int64_t select_token(const double* x, int64_t V, double u, int64_t top_k, double top_p,
                     std::vector<int64_t>& order, std::vector<double>& cumsum);
int64_t greedy_token(const float* x, int64_t V);  // first index of the maximum

// Tokens [N, l] from combined float32 logits [N, l, V]; row r uses the key (seed, scan_ids[r],
// sample_ids[r], scale, token). Throws HostError on NaN / +inf logits or a row without a finite logit.
std::vector<int64_t> sample_tokens(const float* logits_NlV, int64_t N, int64_t l, int64_t V,
                                   const SamplingConfig& cfg, uint32_t scale,
                                   const std::vector<uint32_t>& scan_ids, const std::vector<uint32_t>& sample_ids);

}  // namespace mh
