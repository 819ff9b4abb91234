#include "schedule.hpp"

#include <string>

#include "error.hpp"
#include "npy.hpp"

namespace mh {

namespace {
[[noreturn]] void bad(const std::string& what) { throw HostError("inconsistent schedule in the manifest: " + what); }

std::string list_str(const std::vector<int64_t>& v) { return shape_str(v); }
}  // namespace

void check_schedule(const ScheduleSpec& s) {
  const int64_t K = int64_t(s.patch_nums.size());
  if (K < 2) bad("patch_nums needs at least 2 scales, got " + list_str(s.patch_nums));
  if (s.n_scales != K) bad("n_scales = " + std::to_string(s.n_scales) + " but patch_nums has " + std::to_string(K));
  auto need_len = [&](const char* name, const std::vector<int64_t>& v, int64_t n) {
    if (int64_t(v.size()) != n) {
      bad(std::string(name) + " has " + std::to_string(v.size()) + " entries, expected " + std::to_string(n));
    }
  };
  need_len("token_counts", s.token_counts, K);
  need_len("offsets", s.offsets, K + 1);
  need_len("cached_lengths", s.cached_lengths, K);
  need_len("segment_of_scale", s.segment_of_scale, K);
  for (int64_t i = 0; i < K; ++i) {
    const int64_t p = s.patch_nums[i];
    if (p < 1) bad("patch_nums[" + std::to_string(i) + "] = " + std::to_string(p) + " is not >= 1");
    if (s.token_counts[i] != p * p) {
      bad("token_counts[" + std::to_string(i) + "] = " + std::to_string(s.token_counts[i]) +
          ", expected patch_num^2 = " + std::to_string(p * p));
    }
  }
  if (s.offsets[0] != 0) bad("offsets[0] = " + std::to_string(s.offsets[0]) + ", expected 0");
  for (int64_t i = 0; i < K; ++i) {
    if (s.offsets[i + 1] != s.offsets[i] + s.token_counts[i]) {
      bad("offsets " + list_str(s.offsets) + " are not the prefix sums of token_counts " + list_str(s.token_counts));
    }
    if (s.cached_lengths[i] != s.offsets[i]) {
      bad("cached_lengths " + list_str(s.cached_lengths) + " differ from offsets " + list_str(s.offsets));
    }
  }
  if (s.total_tokens != s.offsets[K]) {
    bad("total_tokens = " + std::to_string(s.total_tokens) + ", expected offsets[K] = " + std::to_string(s.offsets[K]));
  }
  if (s.n_levels < 1 || s.context_tokens < 1) {
    bad("n_levels and context_tokens must be >= 1, got " + std::to_string(s.n_levels) + " and " +
        std::to_string(s.context_tokens));
  }
  if (s.context_length != s.n_levels * s.context_tokens) {
    bad("context_length = " + std::to_string(s.context_length) + ", expected n_levels * context_tokens = " +
        std::to_string(s.n_levels * s.context_tokens));
  }
  for (int64_t i = 0; i < K; ++i) {
    if (s.segment_of_scale[i] < 0 || s.segment_of_scale[i] >= s.n_levels) {
      bad("segment_of_scale[" + std::to_string(i) + "] = " + std::to_string(s.segment_of_scale[i]) +
          " is outside 0.." + std::to_string(s.n_levels - 1));
    }
  }
}

}  // namespace mh
