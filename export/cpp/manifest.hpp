// The bundle manifest (`manifest.json`, written by mindhier_rt/export/onnx_export.py and
// mindhier_rt/bundle.py) as typed structs. Keys read, all required unless marked optional:
//
//   format ("mindhier-rt-bundle"), format_version (kFormatVersion)
//   config.{name, image_size, vocab_size, latent_dim, context_dim}, config.generator.{depth, width, heads,
//     attn_mode}
//   schedule.{patch_nums, n_scales, n_levels, context_tokens, context_length, token_counts, offsets,
//     total_tokens, cached_lengths, segment_of_scale}
//   subjects {name: voxel count}, dtype, batch.{scans, samples, rows}
//   sampling.{cfg_scale, cfg_stop, top_k, top_p, greedy, seed}
//   graphs {name: {file, inputs: [{name, dtype, shape}], outputs: [...], external_data (optional)}};
//     shape entries are ints or symbolic dim names ("rows", "tokens", "past", "past+tokens")
//   context_map ("training" or "reference-pipeline": which context segment each query token reads)
//   tables {rope_cos, rope_sin, cross_segment (reference-pipeline only, int64 [L]): file names}
//   files {relative path: {sha256, bytes}}
//   plans (optional, written by `mindhier-rt build`): {graph name: {file, profiles: [{input name:
//     {min: [...], opt: [...], max: [...]}}], flags (optional list; "version_compatible")}}; for the
//     generator step, profile i serves scale i
//   tensorrt (optional, written by `mindhier-rt build` together with `plans`): the decode plan, read and
//     checked by exec_plan.hpp; the host executes it as recorded and plans nothing itself
//
// Other keys (scales, decode_loop, versions, source) are not read.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "exec_plan.hpp"
#include "json.hpp"
#include "sampling.hpp"

namespace mh {

constexpr const char* kBundleFormat = "mindhier-rt-bundle";
constexpr int64_t kFormatVersion = 3;  // mindhier_rt/bundle/manifest.py FORMAT_VERSION

struct Dim {
  int64_t value = 0;
  std::string symbol;  // non-empty for a symbolic dim
  bool symbolic() const { return !symbol.empty(); }
  std::string str() const { return symbolic() ? symbol : std::to_string(value); }
};

struct TensorSpec {
  std::string name;
  std::string dtype;  // "float32", "float16", "int64"
  std::vector<Dim> shape;
};

struct GraphSpec {
  std::string name, file, external_data;
  std::vector<TensorSpec> inputs, outputs;
  const TensorSpec* find_input(const std::string& tensor) const;
  const TensorSpec* find_output(const std::string& tensor) const;
};

struct ScheduleSpec {
  std::vector<int64_t> patch_nums, token_counts, offsets, cached_lengths, segment_of_scale;
  int64_t n_scales = 0, n_levels = 0, context_tokens = 0, context_length = 0, total_tokens = 0;
};

struct ModelSpec {
  std::string name, attn_mode;
  int64_t image_size = 0, vocab_size = 0, latent_dim = 0, context_dim = 0;
  int64_t depth = 0, width = 0, heads = 0;
};

struct BatchSpec {
  int64_t scans = 0, samples = 0, rows = 0;
};

struct FileEntry {
  std::string sha256;
  int64_t bytes = 0;
};

struct ShapeRange {
  std::vector<int64_t> min, opt, max;
};
using Profile = std::map<std::string, ShapeRange>;  // input name -> range

struct PlanFile {
  std::string file;
  std::vector<Profile> profiles;
  std::vector<std::string> flags;  // builder flags that matter at load time ("version_compatible")
};

struct Manifest {
  std::filesystem::path root;  // the bundle folder
  int64_t format_version = 0;
  ModelSpec model;
  ScheduleSpec schedule;
  SamplingConfig sampling;
  std::string dtype;
  BatchSpec batch;
  std::map<std::string, int64_t> subjects;
  std::map<std::string, GraphSpec> graphs;
  std::map<std::string, std::string> tables;
  std::map<std::string, FileEntry> files;
  // "training": scale i reads context segment segment_of_scale[i] (one segment-major block of the cross cache);
  // "reference-pipeline": every step reads the whole context [B, H, S, c] and the per-token segments
  // (input cross.segment = rows offset_i .. offset_i + l_i of the table cross_segment)
  std::string context_map = "training";
  std::map<std::string, PlanFile> plans;  // empty before `mindhier-rt build`
  std::optional<ExecPlan> tensorrt;        // the recorded decode plan; empty before `mindhier-rt build`

  const GraphSpec& graph(const std::string& name) const;  // throws HostError if absent
  std::filesystem::path path(const std::string& rel) const { return root / rel; }
};

// Typed manifest from parsed JSON; checks format, version, the schedule's consistency and that every
// file the manifest refers to has a checksum entry. Errors name the key path ("graphs.context.file").
Manifest parse_manifest(const json::Value& doc, const std::filesystem::path& root);
// Reads `bundle_dir/manifest.json` and parses it; errors start with the manifest's path.
Manifest load_manifest(const std::filesystem::path& bundle_dir);
// Every file in `files`: present, of the recorded size, with the recorded SHA-256.
void verify_files(const Manifest& m);

}  // namespace mh
