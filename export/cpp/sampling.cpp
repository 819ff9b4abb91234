#include "sampling.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>

#include "error.hpp"

namespace mh {

namespace {
constexpr uint32_t kHashIv = 0x243F6A88u;  // first 32 bits of the fractional part of pi
}

void SamplingConfig::validate() const {
  if (!(std::isfinite(cfg_scale) && cfg_scale >= 0.0)) {
    throw HostError("cfg_scale must be a finite float >= 0 (0 = no guidance), got " + std::to_string(cfg_scale));
  }
  if (cfg_stop && *cfg_stop < 0) {
    throw HostError("cfg_stop must be empty or an int >= 0 (a 0-indexed scale), got " + std::to_string(*cfg_stop));
  }
  if (top_k < 0) throw HostError("top_k must be an int >= 0 (0 = no top-k), got " + std::to_string(top_k));
  if (!(top_p > 0.0 && top_p <= 1.0)) {  // also rejects NaN
    throw HostError("top_p must be a float in (0, 1] (1.0 = no top-p), got " + std::to_string(top_p));
  }
}

// ---- random stream --------------------------------------------------------------------------------
uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  x ^= x >> 16;
  return x;
}

uint32_t hash_key(uint64_t seed, uint32_t scan, uint32_t sample, uint32_t scale, uint32_t token) {
  const uint32_t words[6] = {uint32_t(seed), uint32_t(seed >> 32), scan, sample, scale, token};
  uint32_t h = kHashIv;
  for (uint32_t w : words) h = fmix32(h ^ w);
  return h;
}

double uniform(uint64_t seed, uint32_t scan, uint32_t sample, uint32_t scale, uint32_t token) {
  return std::ldexp(double(hash_key(seed, scan, sample, scale, token)), -32);  // exact: h < 2^32
}

// ---- classifier-free guidance ---------------------------------------------------------------------
bool guidance_active(const SamplingConfig& cfg, int64_t scale) {
  return cfg.cfg_scale > 0.0 && (!cfg.cfg_stop || scale < *cfg.cfg_stop);
}

double guidance_weight(const SamplingConfig& cfg, int64_t scale, int64_t n_scales) {
  if (n_scales < 2) throw HostError("n_scales must be >= 2, got " + std::to_string(n_scales));
  if (scale < 0 || scale >= n_scales) {
    throw HostError("scale must be in 0.." + std::to_string(n_scales - 1) + ", got " + std::to_string(scale));
  }
  if (!guidance_active(cfg, scale)) return 0.0;
  return cfg.cfg_scale * double(scale) / double(n_scales - 1);  // product first, as in the spec
}

void cfg_combine(const float* cond, const float* uncond, float* out, int64_t n, double t) {
  const float w_cond = float(1.0 + t);  // sum in float64, then rounded once
  const float w_uncond = float(t);
  for (int64_t k = 0; k < n; ++k) {
    const float a = cond[k] * w_cond;
    const float b = uncond[k] * w_uncond;
    out[k] = a - b;
  }
}

// ---- selection ------------------------------------------------------------------------------------
int64_t greedy_token(const float* x, int64_t V) {
  int64_t best = 0;
  for (int64_t j = 1; j < V; ++j) {
    if (x[j] > x[best]) best = j;  // strict: the first maximal index wins ties
  }
  return best;
}

int64_t select_token(const double* x, int64_t V, double u, int64_t top_k, double top_p,
                     std::vector<int64_t>& order, std::vector<double>& cumsum) {
  const int64_t k = top_k == 0 ? V : std::min(top_k, V);
  // Descending by value, ties by ascending index: a strict total order, so selecting the first k
  // positions and sorting only those gives exactly the first k entries of the full stable sort
  // (O(V + k log k) instead of O(V log V)).
  order.resize(size_t(V));
  std::iota(order.begin(), order.end(), int64_t(0));
  auto before = [x](int64_t a, int64_t b) { return x[a] > x[b] || (x[a] == x[b] && a < b); };
  if (k < V) std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), before);
  std::sort(order.begin(), order.begin() + k, before);

  // Unnormalised softmax, accumulated sequentially in sorted order: E_j = e_0 + ... + e_j.
  cumsum.resize(size_t(k));
  double acc = 0.0;
  const double x0 = x[order[0]];
  for (int64_t j = 0; j < k; ++j) {
    acc += std::exp(x[order[j]] - x0);
    cumsum[j] = acc;
  }
  // top-p: keep position j iff j == 0 or E_{j-1} < top_p * Z.
  const double cut = top_p * cumsum[k - 1];
  int64_t m = 1;
  while (m < k && cumsum[m - 1] < cut) ++m;
  // Inverse CDF over the kept prefix; the last kept position if rounding leaves none above target.
  const double target = u * cumsum[m - 1];
  for (int64_t j = 0; j < m; ++j) {
    if (cumsum[j] > target) return order[j];
  }
  return order[m - 1];
}

std::vector<int64_t> sample_tokens(const float* logits_NlV, int64_t N, int64_t l, int64_t V,
                                   const SamplingConfig& cfg, uint32_t scale,
                                   const std::vector<uint32_t>& scan_ids, const std::vector<uint32_t>& sample_ids) {
  if (V < 1) throw HostError("logits need a vocabulary of at least 1, got V = " + std::to_string(V));
  if (int64_t(scan_ids.size()) != N || int64_t(sample_ids.size()) != N) {
    throw HostError("scan_ids and sample_ids need one id per row: expected " + std::to_string(N) + ", got " +
                    std::to_string(scan_ids.size()) + " and " + std::to_string(sample_ids.size()));
  }
  std::vector<int64_t> tokens(static_cast<size_t>(N * l));
  std::vector<double> x(static_cast<size_t>(V)), cumsum;
  std::vector<int64_t> order;
  for (int64_t r = 0; r < N; ++r) {
    for (int64_t j = 0; j < l; ++j) {
      const float* row = logits_NlV + (r * l + j) * V;
      // The spec allows finite logits and -inf (probability 0); anything else would make the order
      // undefined (NaN) or the softmax NaN (+inf), so it is refused instead of sampled.
      bool any_finite = false;
      for (int64_t v = 0; v < V; ++v) {
        if (std::isnan(row[v]) || row[v] == INFINITY) {
          throw HostError("logits of row " + std::to_string(r) + ", token " + std::to_string(j) + " at scale " +
                          std::to_string(scale) + " hold NaN or +inf (index " + std::to_string(v) + ")");
        }
        any_finite = any_finite || std::isfinite(row[v]);
      }
      if (!any_finite) {
        throw HostError("logits of row " + std::to_string(r) + ", token " + std::to_string(j) + " at scale " +
                        std::to_string(scale) + " are all -inf");
      }
      if (cfg.greedy) {
        tokens[size_t(r * l + j)] = greedy_token(row, V);
        continue;
      }
      for (int64_t v = 0; v < V; ++v) x[size_t(v)] = double(row[v]);  // exact
      const double u = uniform(cfg.seed, scan_ids[size_t(r)], sample_ids[size_t(r)], scale, uint32_t(j));
      tokens[size_t(r * l + j)] = select_token(x.data(), V, u, cfg.top_k, cfg.top_p, order, cumsum);
    }
  }
  return tokens;
}

}  // namespace mh
