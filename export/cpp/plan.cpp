#include "plan.hpp"

#include <algorithm>
#include <cstdio>
#include <functional>
#include <sstream>

#include "dtype.hpp"
#include "error.hpp"
#include "npy.hpp"

namespace mh {

int64_t Binding::volume() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

namespace {

using DimValues = std::map<std::string, int64_t>;

struct Where {
  std::string buffer;
  int64_t offset = 0;
};
// Where a graph tensor lives, given its spec and resolved shape; throws for tensors the host cannot feed.
using Placer = std::function<Where(const TensorSpec&, const std::vector<int64_t>&)>;

std::vector<int64_t> resolve(const TensorSpec& t, const DimValues& dims, const std::string& graph) {
  std::vector<int64_t> shape;
  for (const Dim& d : t.shape) {
    if (!d.symbolic()) {
      shape.push_back(d.value);
      continue;
    }
    // A symbol ("rows") or a sum of symbols and integers ("past+tokens", "past + tokens").
    int64_t total = 0;
    size_t at = 0;
    while (at <= d.symbol.size()) {
      const size_t plus = std::min(d.symbol.find('+', at), d.symbol.size());
      std::string term = d.symbol.substr(at, plus - at);
      term.erase(0, term.find_first_not_of(' '));
      term.erase(term.find_last_not_of(' ') + 1);
      auto it = dims.find(term);
      if (!term.empty() && term.find_first_not_of("0123456789") == std::string::npos) {
        total += std::stoll(term);
      } else if (it != dims.end()) {
        total += it->second;
      } else {
        throw HostError("graph " + graph + ", tensor " + t.name + ": unknown symbolic dim \"" + d.symbol + "\"");
      }
      at = plus + 1;
    }
    shape.push_back(total);
  }
  return shape;
}

int rows_axis(const TensorSpec& t) {
  for (size_t a = 0; a < t.shape.size(); ++a) {
    if (t.shape[a].symbol == "rows") return int(a);
  }
  return -1;
}

int64_t product(const std::vector<int64_t>& v, size_t from, size_t to) {
  int64_t n = 1;
  for (size_t a = from; a < to; ++a) n *= v[a];
  return n;
}

bool starts_with(const std::string& s, const std::string& prefix) { return s.rfind(prefix, 0) == 0; }

class Planner {
 public:
  Planner(const Manifest& m, DecodePlan& p, int64_t align_bytes) : m_(m), p_(p), align_bytes_(align_bytes) {}

  GraphCall bind(const std::string& graph, const DimValues& dims, const Placer& place_in, const Placer& place_out) {
    const GraphSpec& spec = m_.graph(graph);
    GraphCall call;
    call.graph = graph;
    for (const auto* list : {&spec.inputs, &spec.outputs}) {
      const bool input = list == &spec.inputs;
      for (const TensorSpec& t : *list) {
        const std::vector<int64_t> shape = resolve(t, dims, graph);
        const Where w = (input ? place_in : place_out)(t, shape);
        Binding b{t.name, w.buffer, w.offset, shape};
        use_buffer(b.buffer, t.dtype, b.offset + b.volume(), graph + "." + t.name);
        if (b.offset * int64_t(element_size(t.dtype)) % align_bytes_ != 0) {
          if (!input) throw HostError("graph " + graph + " output " + t.name + " would be written misaligned");
          const std::string stage = "stage/" + t.name;
          add_copy(call.stage, Copy{b.buffer, stage, b.offset, 0, b.volume(), 1, 0, 0,
                                    "align " + t.name + " to " + std::to_string(align_bytes_) + " bytes"},
                   t.dtype);
          b.buffer = stage;
          b.offset = 0;
        }
        (input ? call.inputs : call.outputs).push_back(std::move(b));
      }
    }
    return call;
  }

  void add_copy(std::vector<Copy>& to, Copy c, std::string dtype = "") {
    if (dtype.empty()) dtype = p_.buffers.at(c.src).dtype;
    use_buffer(c.src, dtype, c.src_offset + (c.height - 1) * c.src_pitch + c.width, "copy " + c.why);
    use_buffer(c.dst, dtype, c.dst_offset + (c.height - 1) * c.dst_pitch + c.width, "copy " + c.why);
    to.push_back(std::move(c));
  }

 private:
  void use_buffer(const std::string& name, const std::string& dtype, int64_t end, const std::string& user) {
    auto [it, fresh] = p_.buffers.try_emplace(name, BufferSpec{dtype, 0});
    if (!fresh && it->second.dtype != dtype) {
      throw HostError("buffer " + name + " is " + it->second.dtype + " but " + user + " binds it as " + dtype);
    }
    it->second.elements = std::max(it->second.elements, end);
  }

  const Manifest& m_;
  DecodePlan& p_;
  int64_t align_bytes_;
};

[[noreturn]] void unknown_tensor(const std::string& graph, const std::string& tensor) {
  throw HostError("graph " + graph + " has a tensor \"" + tensor + "\" that this host does not know how to bind");
}

const Binding& find_binding(const std::vector<Binding>& list, const std::string& tensor, const std::string& graph) {
  for (const Binding& b : list) {
    if (b.tensor == tensor) return b;
  }
  throw HostError("graph " + graph + " has no tensor \"" + tensor + "\"");
}

bool fits(const Profile& prof, const GraphCall& call, std::string* why) {
  for (const Binding& b : call.inputs) {
    auto it = prof.find(b.tensor);
    if (it == prof.end()) continue;  // a static input: no range in the profile
    const ShapeRange& r = it->second;
    bool ok = r.min.size() == b.shape.size();
    for (size_t a = 0; ok && a < b.shape.size(); ++a) ok = r.min[a] <= b.shape[a] && b.shape[a] <= r.max[a];
    if (!ok) {
      *why = b.tensor + " " + shape_str(b.shape) + " is outside " + shape_str(r.min) + " .. " + shape_str(r.max);
      return false;
    }
  }
  return true;
}

void choose_profile(const Manifest& m, GraphCall& call, int required) {
  auto it = m.plans.find(call.graph);
  if (it == m.plans.end()) {
    throw HostError("the bundle has no TensorRT plan for graph " + call.graph + " (run `mindhier-rt build`)");
  }
  const std::vector<Profile>& profiles = it->second.profiles;
  if (profiles.empty()) {  // the builder recorded no ranges: one profile, shapes checked by TensorRT
    call.profile = 0;
    return;
  }
  std::string why;
  if (required >= 0) {
    if (required >= int(profiles.size())) {
      throw HostError("plan " + it->second.file + " of " + call.graph + " has " + std::to_string(profiles.size()) +
                      " optimization profiles, scale " + std::to_string(required) + " needs profile " +
                      std::to_string(required));
    }
    if (!fits(profiles[size_t(required)], call, &why)) {
      throw HostError("profile " + std::to_string(required) + " of " + call.graph +
                      " does not admit this batch: " + why + "; rebuild the plans for this many scans and samples");
    }
    call.profile = required;
    return;
  }
  for (size_t k = 0; k < profiles.size(); ++k) {
    if (fits(profiles[k], call, &why)) {
      call.profile = int(k);
      return;
    }
  }
  throw HostError("no optimization profile of " + call.graph + " admits this batch: " + why +
                  "; rebuild the plans for this many scans and samples");
}

// The rows a call runs on: `rows` itself when no profiles are used or one admits it, else the smallest
// row count a profile admits that is larger (padding). `profile` >= 0 restricts the search to that one.
int64_t rows_for(const Manifest& m, const std::string& graph, int64_t rows, int profile, bool use_profiles) {
  if (!use_profiles) return rows;
  auto it = m.plans.find(graph);
  if (it == m.plans.end()) {
    throw HostError("the bundle has no TensorRT plan for graph " + graph + " (run `mindhier-rt build`)");
  }
  const std::vector<Profile>& profiles = it->second.profiles;
  if (profiles.empty()) return rows;
  if (profile >= int(profiles.size())) {
    throw HostError("plan " + it->second.file + " of " + graph + " has " + std::to_string(profiles.size()) +
                    " optimization profiles, scale " + std::to_string(profile) + " needs profile " +
                    std::to_string(profile));
  }
  const GraphSpec& spec = m.graph(graph);
  std::vector<std::pair<int64_t, int64_t>> ranges;  // rows range of each candidate profile
  for (size_t k = 0; k < profiles.size(); ++k) {
    if (profile >= 0 && int(k) != profile) continue;
    int64_t lo = 1, hi = INT64_MAX;
    for (const TensorSpec& t : spec.inputs) {
      const int axis = rows_axis(t);
      auto r = profiles[k].find(t.name);
      if (axis < 0 || r == profiles[k].end() || size_t(axis) >= r->second.min.size()) continue;
      lo = std::max(lo, r->second.min[size_t(axis)]);
      hi = std::min(hi, r->second.max[size_t(axis)]);
    }
    if (lo <= rows && rows <= hi) return rows;
    ranges.emplace_back(lo, hi);
  }
  int64_t padded = INT64_MAX;
  std::string built;
  for (const auto& [lo, hi] : ranges) {
    if (rows < lo && lo <= hi) padded = std::min(padded, lo);
    built += (built.empty() ? "" : ", ") + std::to_string(lo) + (hi == lo ? "" : ".." + std::to_string(hi));
  }
  if (padded == INT64_MAX) {
    throw HostError("the plan of " + graph + " was built for " + built + " rows, this decode needs " +
                    std::to_string(rows) + "; rebuild the plans for this many scans and samples");
  }
  return padded;
}

}  // namespace

DecodePlan make_plan(const Manifest& m, const std::string& subject, int64_t scans, int64_t samples,
                     const SamplingConfig& sampling, const std::vector<uint32_t>& scan_ids, bool use_profiles,
                     int64_t align_bytes) {
  sampling.validate();
  if (align_bytes < 1) throw HostError("the address alignment must be >= 1 byte, got " + std::to_string(align_bytes));
  if (scans < 1 || samples < 1) {
    throw HostError("scans and samples must be >= 1, got " + std::to_string(scans) + " and " + std::to_string(samples));
  }
  if (!scan_ids.empty() && int64_t(scan_ids.size()) != scans) {
    throw HostError("expected " + std::to_string(scans) + " scan ids, got " + std::to_string(scan_ids.size()));
  }
  auto subj = m.subjects.find(subject);
  if (subj == m.subjects.end()) {
    std::string known;
    for (const auto& [name, count] : m.subjects) known += (known.empty() ? "" : ", ") + name;
    throw HostError("the bundle has no encoder for subject \"" + subject + "\"; it has: " + known);
  }
  const ScheduleSpec& s = m.schedule;
  const int64_t K = s.n_scales;
  DecodePlan p;
  Planner planner(m, p, align_bytes);
  p.subject = subject;
  p.scans = scans;
  p.samples = samples;
  p.sampling = sampling;
  p.voxels = subj->second;
  const int64_t R = scans * samples;
  p.cond_rows = R;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t n = r / samples;
    p.row_scan.push_back(scan_ids.empty() ? uint32_t(n) : scan_ids[size_t(n)]);
    p.row_sample.push_back(uint32_t(r % samples));
  }
  const bool guided0 = guidance_active(sampling, 0);
  auto rows = [&](const std::string& graph, int64_t n, int profile = -1) {
    return rows_for(m, graph, n, profile, use_profiles);
  };

  // ---- encoder: the scans, and (guided) one all-zero scan ----
  const std::string encoder = "encoder_" + subject;
  auto encode = [&](const std::string& input, const std::string& prefix, int64_t n) {
    GraphCall call = planner.bind(
        encoder, {{"rows", rows(encoder, n)}},
        [&](const TensorSpec& t, const std::vector<int64_t>& shape) {
          if (t.name != "voxels") unknown_tensor(encoder, t.name);
          if (shape.size() != 2 || shape[1] != subj->second) {
            throw HostError("graph " + encoder + " reads voxels " + shape_str(shape) + ", but subject " + subject +
                            " has " + std::to_string(subj->second) + " voxels");
          }
          return Where{input, 0};
        },
        [&](const TensorSpec& t, const std::vector<int64_t>&) { return Where{prefix + t.name, 0}; });
    call.rows = rows(encoder, n);
    return call;
  };
  p.encoder = encode("voxels", "enc.", scans);
  if (guided0) p.encoder_null = encode("voxels.null", "null.", 1);

  // ---- context step on B0 rows: [scan rows repeated per sample, zero-scan rows, padding] ----
  const int64_t B0 = guided0 ? 2 * R : R;
  const int64_t C = rows("context", B0);
  auto same_name = [](const TensorSpec& t, const std::vector<int64_t>&) { return Where{t.name, 0}; };
  p.context = planner.bind("context", {{"rows", C}}, same_name, same_name);
  p.context.rows = C;
  for (const Binding& in : p.context.inputs) {
    const TensorSpec& t = *m.graph("context").find_input(in.tensor);
    if (rows_axis(t) != 0) throw HostError("context input " + in.tensor + " should have rows as its first axis");
    const int64_t row = in.volume() / C;
    const std::string enc = "enc." + in.tensor, null = "null." + in.tensor;
    if (!p.buffers.count(enc) || (guided0 && !p.buffers.count(null))) {
      throw HostError("context input " + in.tensor + " is not an output of " + encoder);
    }
    for (int64_t k = 0; k < samples; ++k) {  // row n * samples + k <- scan n
      planner.add_copy(p.context.stage, Copy{enc, in.tensor, 0, k * row, row, scans, row, samples * row,
                                             "scan rows of " + in.tensor + ", sample " + std::to_string(k)});
    }
    for (int64_t r = R; guided0 && r < 2 * R; ++r) {
      planner.add_copy(p.context.stage, Copy{null, in.tensor, 0, r * row, row, 1, 0, 0,
                                             "zero-scan row " + std::to_string(r) + " of " + in.tensor});
    }
  }

  const std::string step_name = m.step_graph;
  const GraphSpec& step_spec = m.graph(step_name);
  // A per-token context map (reference-pipeline): the step reads the whole context [C, H, S, c] in place and
  // the segment of each of its tokens, input cross.segment = rows offset_i .. offset_i + l_i of cross_segment.
  const bool per_token = step_spec.find_input("cross.segment") != nullptr;
  if (per_token && m.context_map != "reference-pipeline") {
    throw HostError(step_name + " reads cross.segment, but the context map is \"" + m.context_map + "\"");
  }
  if (per_token && !m.tables.count("cross_segment")) throw HostError("the manifest has no table cross_segment");
  // Otherwise each cross output is [M, C, H, T, c]: segment g starts at g * (C * H * T * c).
  std::map<std::string, int64_t> segment_stride;
  for (const Binding& b : p.context.outputs) {
    if (!starts_with(b.tensor, "cross.")) continue;
    if (per_token) {
      if (b.shape.size() != 4 || b.shape[2] != s.context_length) {
        throw HostError("context output " + b.tensor + " " + shape_str(b.shape) +
                        " should be [rows, H, context_length = " + std::to_string(s.context_length) + ", c]");
      }
      segment_stride[b.tensor] = 0;  // every scale binds the whole context
      continue;
    }
    if (b.shape.empty() || b.shape[0] != s.n_levels) {
      throw HostError("context output " + b.tensor + " " + shape_str(b.shape) + " should have n_levels = " +
                      std::to_string(s.n_levels) + " segments on its first axis");
    }
    segment_stride[b.tensor] = b.volume() / s.n_levels;
  }
  const GraphSpec& context_spec = m.graph("context");
  bool has_past = false, in_place = false;
  for (const TensorSpec& t : step_spec.inputs) {
    has_past = has_past || starts_with(t.name, "past_key_values.");
    in_place = in_place || t.name == "write_indices";
  }

  // ---- scales ----
  bool guided = guided0;
  int64_t prev_rows = C;  // rows of the self caches written by the previous step
  for (int64_t i = 0; i < K; ++i) {
    ScaleStep st;
    st.scale = i;
    guided = guided && guidance_active(sampling, i);
    st.guided = guided;
    st.weight = guidance_weight(sampling, i, K);
    st.rows = guided ? 2 * R : R;
    st.tokens = s.token_counts[size_t(i)];
    const int64_t E = rows(step_name, st.rows, int(i));
    if (E > prev_rows) {
      throw HostError(step_name + " profile " + std::to_string(i) + " runs " + std::to_string(E) +
                      " rows, more than the " + std::to_string(prev_rows) + " the state was computed for");
    }
    prev_rows = E;
    const int64_t past = has_past && !in_place ? s.cached_lengths[size_t(i)] : 0;

    // State tensors whose rows are not the outer axis are cut to E rows by a strided copy when the step
    // runs on fewer rows than the context step; the others (and the segments) are bound with fewer rows.
    std::map<std::string, std::string> state_buffer;
    for (const Binding& b : p.context.outputs) {
      state_buffer[b.tensor] = b.tensor;
      const int axis = rows_axis(*context_spec.find_output(b.tensor));
      if (E == C || starts_with(b.tensor, "cross.") || axis <= 0 || !step_spec.find_input(b.tensor)) continue;
      const std::string cut = b.tensor + ".rows" + std::to_string(E);
      state_buffer[b.tensor] = cut;
      if (p.buffers.count(cut)) continue;  // cut at an earlier scale
      const int64_t row = product(b.shape, size_t(axis) + 1, b.shape.size());
      planner.add_copy(st.before, Copy{b.tensor, cut, 0, 0, E * row, product(b.shape, 0, size_t(axis)), C * row,
                                       E * row, "keep the first " + std::to_string(E) + " rows of " + b.tensor});
    }
    if (in_place) {  // the scale's offset, once per row, for the cache writes of this step
      std::vector<int64_t>& table = p.int_tables["write_indices"];
      table.insert(table.end(), size_t(E), s.offsets[size_t(i)]);
    }
    const int64_t write_at = in_place ? int64_t(p.int_tables["write_indices"].size()) - E : 0;

    const DimValues dims{{"rows", E}, {"tokens", st.tokens}, {"past", past}};
    const std::string ping = std::to_string(i % 2), pong = std::to_string((i + 1) % 2);
    auto cache = [&](const std::string& name, const std::string& parity) {
      return Where{"kv." + name + (in_place ? "" : "/" + parity), 0};
    };
    st.step = planner.bind(
        step_name, dims,
        [&](const TensorSpec& t, const std::vector<int64_t>& shape) -> Where {
          const std::string& n = t.name;
          if (n == "h") return Where{i == 0 ? "start" : "h", 0};
          if (n == "rope.cos" || n == "rope.sin") {
            if (shape.size() != 2) throw HostError(step_name + " input " + n + " should be [tokens, head_dim]");
            return Where{n, s.offsets[size_t(i)] * shape[1]};
          }
          if (n == "cross.segment") {
            if (shape != std::vector<int64_t>{st.tokens}) throw HostError(step_name + " input " + n + " should be [tokens]");
            return Where{n, s.offsets[size_t(i)]};
          }
          if (starts_with(n, "cross.")) {
            auto it = segment_stride.find(n);
            if (it == segment_stride.end()) throw HostError("the context graph has no output " + n);
            return Where{n, s.segment_of_scale[size_t(i)] * it->second};
          }
          if (starts_with(n, "past_key_values.")) return cache(n.substr(16), pong);
          if (n == "write_indices") return Where{"write_indices", write_at};
          auto it = state_buffer.find(n);
          if (it == state_buffer.end()) unknown_tensor(step_name, n);
          return Where{it->second, 0};
        },
        [&](const TensorSpec& t, const std::vector<int64_t>&) -> Where {
          if (t.name == "logits") return Where{"logits", 0};
          if (starts_with(t.name, "present.")) return cache(t.name.substr(8), ping);
          unknown_tensor(step_name, t.name);
        });
    st.step.rows = E;
    const Binding& logits = find_binding(st.step.outputs, "logits", step_name);
    if (logits.shape.size() != 3 || logits.shape[0] != E || logits.shape[1] != st.tokens) {
      throw HostError(step_name + " logits " + shape_str(logits.shape) + " should be [rows, tokens, V]");
    }
    p.vocab = logits.shape[2];
    if (i > 0) {  // the input h of this scale is update_{i-1}'s h_next, per row
      const Binding& h_in = find_binding(st.step.inputs, "h", step_name);
      const GraphCall& prev = p.scales.back().update;
      const Binding& h_next = find_binding(prev.outputs, "h_next", prev.graph);
      if (h_in.volume() / E != h_next.volume() / prev.rows) {
        throw HostError(step_name + " input h " + shape_str(h_in.shape) + " does not match " + prev.graph +
                        " output h_next " + shape_str(h_next.shape));
      }
    }

    const std::string update = "update_" + std::to_string(i);
    const int64_t U = rows(update, R);
    st.update = planner.bind(
        update, {{"rows", U}},
        [&](const TensorSpec& t, const std::vector<int64_t>&) -> Where {
          if (t.name == "f_hat") return Where{"f_hat/" + ping, 0};
          if (t.name == "idx") return Where{"idx", 0};
          unknown_tensor(update, t.name);
        },
        [&](const TensorSpec& t, const std::vector<int64_t>&) -> Where {
          if (t.name == "f_hat_next") return Where{"f_hat/" + pong, 0};
          if (t.name == "h_next") return Where{"h", 0};
          unknown_tensor(update, t.name);
        });
    st.update.rows = U;
    const Binding& idx = find_binding(st.update.inputs, "idx", update);
    if (idx.shape != std::vector<int64_t>{U, st.tokens}) {
      throw HostError(update + " input idx " + shape_str(idx.shape) + " should be [rows, tokens] = " +
                      shape_str({U, st.tokens}));
    }
    const bool last = i == K - 1;
    if (!last) find_binding(st.update.outputs, "h_next", update);  // the next scale's input comes from here
    if (!last && guided && guidance_active(sampling, i + 1)) {
      const int64_t n = find_binding(st.update.outputs, "h_next", update).volume() / U * R;
      planner.add_copy(st.after, Copy{"h", "h", 0, n, n, 1, 0, 0, "duplicate h for the unconditional rows"});
    }
    p.scales.push_back(std::move(st));
  }

  const std::string final_fhat = "f_hat/" + std::to_string(K % 2);
  const int64_t D = rows("vq_decoder", R);
  p.decoder = planner.bind(
      "vq_decoder", {{"rows", D}},
      [&](const TensorSpec& t, const std::vector<int64_t>&) -> Where {
        if (t.name != "f_hat") unknown_tensor("vq_decoder", t.name);
        return Where{final_fhat, 0};
      },
      same_name);
  p.decoder.rows = D;
  p.image_shape = find_binding(p.decoder.outputs, "image", "vq_decoder").shape;
  if (p.image_shape.size() != 4 || p.image_shape[0] != D || p.image_shape[1] != 3) {
    throw HostError("vq_decoder image " + shape_str(p.image_shape) + " should be [rows, 3, H, W]");
  }
  for (const char* table : {"rope_cos", "rope_sin"}) {
    if (!p.buffers.count(std::string("rope.") + (table + 5))) continue;  // a step without rotary tables
    auto it = m.tables.find(table);
    if (it == m.tables.end()) throw HostError(std::string("the manifest has no table ") + table);
    p.tables[std::string("rope.") + (table + 5)] = it->second;
  }
  if (per_token) p.tables["cross.segment"] = m.tables.at("cross_segment");

  if (use_profiles) {
    choose_profile(m, p.encoder, -1);
    if (!p.encoder_null.graph.empty()) choose_profile(m, p.encoder_null, -1);
    choose_profile(m, p.context, -1);
    for (ScaleStep& st : p.scales) {
      choose_profile(m, st.step, int(st.scale));
      choose_profile(m, st.update, -1);
    }
    choose_profile(m, p.decoder, -1);
  }
  return p;
}

std::vector<float> voxel_rows(const DecodePlan& p, const std::vector<float>& voxels_NV) {
  const int64_t V = p.voxels;
  if (int64_t(voxels_NV.size()) != p.scans * V) {
    throw HostError("expected voxels [" + std::to_string(p.scans) + ", " + std::to_string(V) + "], got " +
                    std::to_string(voxels_NV.size()) + " values");
  }
  std::vector<float> rows(voxels_NV);
  rows.resize(size_t(p.encoder.rows * V), 0.0f);  // padded rows: zeros
  return rows;
}

std::vector<int64_t> sample_scale(const DecodePlan& p, const ScaleStep& st, std::vector<float>& logits) {
  const int64_t R = p.cond_rows, n = R * st.tokens * p.vocab;
  if (int64_t(logits.size()) < st.rows * st.tokens * p.vocab) {
    throw HostError("scale " + std::to_string(st.scale) + ": expected " +
                    std::to_string(st.rows * st.tokens * p.vocab) + " logits, got " + std::to_string(logits.size()));
  }
  if (st.guided) cfg_combine(logits.data(), logits.data() + n, logits.data(), n, st.weight);
  return sample_tokens(logits.data(), R, st.tokens, p.vocab, p.sampling, uint32_t(st.scale), p.row_scan,
                       p.row_sample);
}

std::vector<int64_t> idx_rows(const ScaleStep& st, const std::vector<int64_t>& tokens) {
  std::vector<int64_t> rows(tokens);
  rows.resize(size_t(st.update.rows * st.tokens), 0);
  return rows;
}

// ---- printing -------------------------------------------------------------------------------------
namespace {

void describe_copy(std::ostringstream& o, const Copy& c);

void describe_call(std::ostringstream& o, const GraphCall& c) {
  if (c.graph.empty()) return;
  for (const Copy& s : c.stage) describe_copy(o, s);
  o << "  " << c.graph << " (profile " << c.profile << ", " << c.rows << " rows)\n";
  for (const auto* list : {&c.inputs, &c.outputs}) {
    for (const Binding& b : *list) {
      o << "    " << (list == &c.inputs ? "in  " : "out ") << b.tensor << " " << shape_str(b.shape) << " = "
        << b.buffer << "[" << b.offset << "]\n";
    }
  }
}

void describe_copy(std::ostringstream& o, const Copy& c) {
  o << "  copy " << c.src << "[" << c.src_offset << "] -> " << c.dst << "[" << c.dst_offset << "]: " << c.height
    << " x " << c.width << " elements (" << c.why << ")\n";
}

std::string q(const std::string& s) { return "\"" + s + "\""; }  // plan names are plain ASCII

std::string ints_json(const std::vector<int64_t>& v) { return shape_str(v); }

template <typename T>
std::string ids_json(const std::vector<T>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

std::string num_json(double x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.17g", x);
  return buf;
}

std::string copies_json(const std::vector<Copy>& copies);

std::string call_json(const GraphCall& c) {
  if (c.graph.empty()) return "null";
  std::string s = "{\"graph\": " + q(c.graph) + ", \"profile\": " + std::to_string(c.profile) +
                  ", \"rows\": " + std::to_string(c.rows) + ", \"stage\": " + copies_json(c.stage);
  for (const auto* list : {&c.inputs, &c.outputs}) {
    s += list == &c.inputs ? ", \"inputs\": [" : ", \"outputs\": [";
    for (size_t k = 0; k < list->size(); ++k) {
      const Binding& b = (*list)[k];
      s += (k ? ", " : "") + std::string("{\"tensor\": ") + q(b.tensor) + ", \"buffer\": " + q(b.buffer) +
           ", \"offset\": " + std::to_string(b.offset) + ", \"shape\": " + ints_json(b.shape) + "}";
    }
    s += "]";
  }
  return s + "}";
}

std::string copies_json(const std::vector<Copy>& copies) {
  std::string s = "[";
  for (size_t k = 0; k < copies.size(); ++k) {
    const Copy& c = copies[k];
    s += (k ? ", " : "") + std::string("{\"src\": ") + q(c.src) + ", \"dst\": " + q(c.dst) +
         ", \"src_offset\": " + std::to_string(c.src_offset) + ", \"dst_offset\": " + std::to_string(c.dst_offset) +
         ", \"width\": " + std::to_string(c.width) + ", \"height\": " + std::to_string(c.height) +
         ", \"src_pitch\": " + std::to_string(c.src_pitch) + ", \"dst_pitch\": " + std::to_string(c.dst_pitch) + "}";
  }
  return s + "]";
}

}  // namespace

std::string describe_plan(const DecodePlan& p) {
  std::ostringstream o;
  o << "decode plan: subject " << p.subject << ", " << p.scans << " scan(s) x " << p.samples << " sample(s): "
    << p.cond_rows << " conditional rows, V = " << p.vocab << "\n";
  o << "buffers:\n";
  for (const auto& [name, b] : p.buffers) o << "  " << name << " " << b.dtype << " x " << b.elements << "\n";
  describe_call(o, p.encoder);
  describe_call(o, p.encoder_null);
  describe_call(o, p.context);
  for (const ScaleStep& st : p.scales) {
    o << "scale " << st.scale << ": " << st.rows << " rows sampled from, " << st.tokens << " tokens, "
      << (st.guided ? "guided, t = " + num_json(st.weight) : std::string("unguided")) << "\n";
    for (const Copy& c : st.before) describe_copy(o, c);
    describe_call(o, st.step);
    o << "  host: " << (st.guided ? "combine cond/uncond logits, " : "") << "sample -> idx\n";
    describe_call(o, st.update);
    for (const Copy& c : st.after) describe_copy(o, c);
  }
  describe_call(o, p.decoder);
  return o.str();
}

std::string plan_to_json(const DecodePlan& p) {
  std::string s = "{\"subject\": " + q(p.subject) + ", \"scans\": " + std::to_string(p.scans) +
                  ", \"samples\": " + std::to_string(p.samples) + ", \"cond_rows\": " + std::to_string(p.cond_rows) +
                  ", \"vocab\": " + std::to_string(p.vocab) +
                  ", \"row_scan\": " + ids_json(p.row_scan) + ", \"row_sample\": " + ids_json(p.row_sample);
  s += ", \"buffers\": {";
  bool first = true;
  for (const auto& [name, b] : p.buffers) {
    s += (first ? "" : ", ") + q(name) + ": {\"dtype\": " + q(b.dtype) +
         ", \"elements\": " + std::to_string(b.elements) + "}";
    first = false;
  }
  s += "}, \"tables\": {";
  first = true;
  for (const auto& [buffer, file] : p.tables) {
    s += (first ? "" : ", ") + q(buffer) + ": " + q(file);
    first = false;
  }
  s += "}, \"int_tables\": {";
  first = true;
  for (const auto& [buffer, values] : p.int_tables) {
    s += (first ? "" : ", ") + q(buffer) + ": " + ids_json(values);
    first = false;
  }
  s += "}, \"encoder\": " + call_json(p.encoder) + ", \"encoder_null\": " + call_json(p.encoder_null) +
       ", \"context\": " + call_json(p.context) + ", \"scales\": [";
  for (size_t k = 0; k < p.scales.size(); ++k) {
    const ScaleStep& st = p.scales[k];
    s += (k ? ", " : "") + std::string("{\"scale\": ") + std::to_string(st.scale) + ", \"rows\": " +
         std::to_string(st.rows) + ", \"tokens\": " + std::to_string(st.tokens) + ", \"guided\": " +
         (st.guided ? "true" : "false") + ", \"weight\": " + num_json(st.weight) + ", \"before\": " +
         copies_json(st.before) + ", \"step\": " + call_json(st.step) + ", \"update\": " + call_json(st.update) +
         ", \"after\": " + copies_json(st.after) + "}";
  }
  s += "], \"decoder\": " + call_json(p.decoder) + ", \"image_shape\": " + ints_json(p.image_shape) + "}";
  return s;
}

}  // namespace mh
