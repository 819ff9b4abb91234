// The schedule as the manifest gives it. Nothing here re-derives it (mindhier_rt/schedule.py is the one
// source); the host only checks that the numbers it was given agree with each other and fails loudly
// when they do not, since a wrong offset would silently read the wrong cache rows.
#pragma once

#include "manifest.hpp"

namespace mh {

// token_counts[i] == patch_nums[i]^2, offsets == prefix sums of token_counts (length K + 1),
// total_tokens == offsets[K], cached_lengths == offsets[0..K-1], segment_of_scale[i] in [0, n_levels),
// context_length == n_levels * context_tokens, n_scales == K >= 2. Throws HostError naming the first
// disagreement.
void check_schedule(const ScheduleSpec& s);

}  // namespace mh
