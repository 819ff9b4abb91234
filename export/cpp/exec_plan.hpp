// The decode plan `mindhier-rt build` records in the manifest's `tensorrt` section (computed once, in
// Python: export/tensorrt_plan.py; the format is described in mindhier_rt/bundle/tensorrt_plan.py). The
// host does not plan: it reads the section, checks every name, index, offset and size against the buffers
// and the bundle's graphs (a hostile manifest is a HostError naming the field, never an out-of-bounds
// access), and executes it (decode.hpp).
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "json_field.hpp"

namespace mh {

struct Manifest;

constexpr int64_t kPlanVersion = 2;     // mindhier_rt/bundle/tensorrt_plan.py PLAN_VERSION
constexpr int64_t kPlanAlignment = 256;  // every bound address is a multiple of it
constexpr int64_t kMaxPlanBytes = int64_t(1) << 48;

struct TensorBinding {
  std::string name;
  bool input = false;
  std::string dtype;
  std::vector<std::string> buffer;               // per profile
  std::vector<std::vector<int64_t>> shapes;      // per profile
  std::vector<int64_t> offsets;                  // bytes, per profile
  std::vector<std::pair<std::string, int64_t>> copy_from;  // per profile, or empty: bound in place
  int64_t nbytes(size_t profile) const;
};

struct GraphBindings {
  std::string graph;
  std::vector<TensorBinding> tensors;
  size_t profiles = 0;
  const TensorBinding& at(const std::string& tensor) const;  // throws HostError if absent
  const TensorBinding* find(const std::string& tensor) const;
};

struct TableUpload {
  std::string buffer, table, dtype;
  int64_t columns = 0;
  std::vector<std::array<int64_t, 3>> layout;  // (first_row, rows, byte_offset)
};

struct Fill {
  std::string buffer;
  int64_t offset = 0, value = 0, count = 0;  // `count` int64 values
};

struct ExecPlan {
  std::string step_graph, self_cache;
  int64_t scans = 0, samples = 0, rows = 0, sample_rows = 0;
  bool guided = false, version_compatible = false;
  std::map<std::string, int64_t> buffers;  // bytes
  std::vector<GraphBindings> graphs;       // in the recorded order
  std::vector<TableUpload> tables;
  std::vector<Fill> fills;
  const GraphBindings& graph(const std::string& name) const;  // throws HostError if absent
};

// Reads and checks the section (`f` is manifest field `tensorrt`).
ExecPlan parse_exec_plan(const Field& f);
// Cross-checks with the rest of the manifest: the bound tensors are each graph's inputs and outputs, the
// tables exist, and every graph the decode runs has a plan file.
void check_exec_plan(const ExecPlan& p, const Manifest& m);
std::string exec_plan_to_json(const ExecPlan& p);  // the section as read, for tools and tests
std::string describe_exec_plan(const ExecPlan& p);  // human-readable summary

}  // namespace mh
