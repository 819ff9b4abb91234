#include "exec_plan.hpp"

#include <algorithm>
#include <cstdio>
#include <set>
#include <sstream>

#include "dtype.hpp"
#include "error.hpp"
#include "manifest.hpp"
#include "npy.hpp"

namespace mh {

namespace {

const std::set<std::string> kDtypes = {"float32", "float16", "bfloat16", "int64", "int32", "bool", "uint8"};

int64_t itemsize(const std::string& dtype) {
  if (dtype == "bfloat16") return 2;
  if (dtype == "bool" || dtype == "uint8") return 1;
  return int64_t(element_size(dtype));
}

class Reader {
 public:
  explicit Reader(const Field& f) {
    const Field b = f["buffers"];
    for (const auto& [name, value] : b.as_object()) {
      const Field size{value, b.join(name)};
      const int64_t bytes = size.i64();
      if (name.empty() || bytes < 0 || bytes > kMaxPlanBytes) {
        throw HostError(size.path + ": expected a buffer size in [0, 2^48], found " + std::to_string(bytes));
      }
      buffers[name] = bytes;
    }
  }

  std::string buffer(const Field& f) const {
    const std::string& name = f.str();
    if (!buffers.count(name)) throw HostError(f.path + ": no buffer \"" + name + "\" in tensorrt.buffers");
    return name;
  }

  int64_t non_negative(const Field& f, int64_t max = kMaxPlanBytes) const {
    const int64_t v = f.i64();
    if (v < 0 || v > max) {
      throw HostError(f.path + ": expected an integer in [0, " + std::to_string(max) + "], found " + std::to_string(v));
    }
    return v;
  }

  std::string dtype(const Field& f) const {
    const std::string& d = f.str();
    if (!kDtypes.count(d)) throw HostError(f.path + ": unknown dtype \"" + d + "\"");
    return d;
  }

  // [offset, offset + bytes) inside the buffer; offsets of bound tensors aligned.
  void span(const Field& f, const std::string& buffer, int64_t offset, int64_t bytes, bool aligned) const {
    if (aligned && offset % kPlanAlignment != 0) {
      throw HostError(f.path + ": offset " + std::to_string(offset) + " is not a multiple of " +
                      std::to_string(kPlanAlignment) + " bytes");
    }
    if (bytes > buffers.at(buffer) - offset) {  // both in [0, 2^48]: no overflow
      throw HostError(f.path + ": " + std::to_string(bytes) + " bytes at offset " + std::to_string(offset) +
                      " do not fit in buffer " + buffer + " (" + std::to_string(buffers.at(buffer)) + " bytes)");
    }
    used[buffer] = std::max(used[buffer], offset + bytes);
  }

  // No buffer larger than its furthest use, aligned up: a plan cannot ask for memory that nothing binds.
  void check_sizes(const Field& f) const {
    for (const auto& [name, bytes] : buffers) {
      const auto u = used.find(name);
      const int64_t furthest = u == used.end() ? 0 : u->second;
      const int64_t bound = (furthest + kPlanAlignment - 1) / kPlanAlignment * kPlanAlignment;
      if (bytes > bound) {
        throw HostError(f["buffers"].join(name) + ": " + std::to_string(bytes) + " bytes, more than the " +
                        std::to_string(bound) + " its bindings, tables and fills use");
      }
    }
  }

  TensorBinding binding(const Field& f, size_t profiles) const {
    TensorBinding b;
    b.name = f["name"].str();
    b.input = f["input"].boolean();
    b.dtype = dtype(f["dtype"]);
    const Field shapes = f["shapes"];
    for (size_t p = 0; p < shapes.as_array().size(); ++p) {
      const Field s = shapes.at(p);
      std::vector<int64_t> shape;
      int64_t elements = 1;
      for (size_t d = 0; d < s.as_array().size(); ++d) {
        const int64_t n = non_negative(s.at(d), int64_t(1) << 31);
        if (n != 0 && elements > kMaxPlanBytes / n) throw HostError(s.path + ": tensor larger than 2^48 elements");
        elements *= n;
        shape.push_back(n);
      }
      b.shapes.push_back(std::move(shape));
    }
    if (b.shapes.empty() || (profiles != 0 && b.shapes.size() != profiles)) {
      throw HostError(shapes.path + ": expected one shape per optimization profile (" +
                      std::to_string(profiles ? profiles : 1) + "), found " + std::to_string(b.shapes.size()));
    }
    const Field buffer = f["buffer"], offsets = f["offsets"];
    if (buffer.as_array().size() != b.shapes.size() || offsets.as_array().size() != b.shapes.size()) {
      throw HostError(f.path + ": expected buffer and offsets with one entry per profile (" +
                      std::to_string(b.shapes.size()) + ")");
    }
    for (size_t p = 0; p < b.shapes.size(); ++p) {
      b.buffer.push_back(this->buffer(buffer.at(p)));
      b.offsets.push_back(non_negative(offsets.at(p)));
      span(offsets.at(p), b.buffer[p], b.offsets[p], b.nbytes(p), true);
    }
    const Field copy = f["copy_from"];
    if (!copy.v.is_null()) {
      if (copy.as_array().size() != b.shapes.size()) {
        throw HostError(copy.path + ": expected one [buffer, offset] per profile (" + std::to_string(b.shapes.size()) +
                        ")");
      }
      for (size_t p = 0; p < b.shapes.size(); ++p) {
        const Field pair = copy.at(p);
        if (pair.as_array().size() != 2) throw HostError(pair.path + ": expected [buffer, offset]");
        const std::string src = this->buffer(pair.at(0));
        const int64_t offset = non_negative(pair.at(1));
        span(pair, src, offset, b.nbytes(p), false);
        b.copy_from.emplace_back(src, offset);
      }
      if (!b.input) throw HostError(copy.path + ": only inputs are copied in");
    }
    return b;
  }

  std::map<std::string, int64_t> buffers;
  mutable std::map<std::string, int64_t> used;  // the furthest byte any span reaches, per buffer
};

}  // namespace

int64_t TensorBinding::nbytes(size_t profile) const {
  int64_t n = itemsize(dtype);
  for (int64_t d : shapes.at(profile)) n *= d;
  return n;
}

const TensorBinding* GraphBindings::find(const std::string& tensor) const {
  for (const TensorBinding& b : tensors) {
    if (b.name == tensor) return &b;
  }
  return nullptr;
}

const TensorBinding& GraphBindings::at(const std::string& tensor) const {
  const TensorBinding* b = find(tensor);
  if (b == nullptr) throw HostError("the plan of graph " + graph + " binds no tensor \"" + tensor + "\"");
  return *b;
}

const GraphBindings& ExecPlan::graph(const std::string& name) const {
  for (const GraphBindings& g : graphs) {
    if (g.graph == name) return g;
  }
  throw HostError("the TensorRT plan has no bindings for graph \"" + name + "\" (rebuild with `mindhier-rt build`)");
}

ExecPlan parse_exec_plan(const Field& f) {
  const json::Value* version = f.find("plan_version");
  if (version == nullptr || version->type() != json::Type::Number || Field{*version, ""}.i64() != kPlanVersion) {
    const std::string found = version == nullptr                     ? std::string("(none)")
                              : version->type() == json::Type::Number ? version->number_text()
                                                                      : std::string("?");
    throw HostError(f.path + ": TensorRT plan version " + found +
                    " is not supported (this host reads version " + std::to_string(kPlanVersion) +
                    "): rebuild the plans with `mindhier-rt build --engine BUNDLE`");
  }
  if (f["alignment"].i64() != kPlanAlignment) throw HostError(f.path + ".alignment: expected 256");
  const Reader r(f);
  ExecPlan p;
  p.buffers = r.buffers;
  p.step_graph = f["step_graph"].str();
  p.self_cache = f["self_cache"].str();
  if (p.self_cache != "none" && p.self_cache != "in_place" && p.self_cache != "ping_pong") {
    throw HostError(f.path + ".self_cache: expected none, in_place or ping_pong, found \"" + p.self_cache + "\"");
  }
  const Field rows = f["rows"];
  p.scans = r.non_negative(rows["scans"], 1 << 20);
  p.samples = r.non_negative(rows["samples"], 1 << 20);
  p.guided = rows["guided"].boolean();
  p.sample_rows = p.scans * p.samples;
  p.rows = p.sample_rows * (p.guided ? 2 : 1);
  if (p.scans < 1 || p.samples < 1 || rows["rows"].i64() != p.rows || rows["sample_rows"].i64() != p.sample_rows) {
    throw HostError(rows.path + ": expected scans, samples >= 1 with rows = scans x samples (x2 guided)");
  }
  p.version_compatible = f["version_compatible"].boolean();
  const Field bindings = f["bindings"];
  for (const auto& [graph, list] : bindings.as_object()) {
    const Field entries{list, bindings.join(graph)};
    GraphBindings g{graph, {}, 0};
    for (size_t k = 0; k < entries.as_array().size(); ++k) {
      TensorBinding b = r.binding(entries.at(k), g.profiles);
      if (g.find(b.name)) throw HostError(entries.at(k).path + ": tensor " + b.name + " bound twice");
      g.profiles = b.shapes.size();
      g.tensors.push_back(std::move(b));
    }
    if (g.tensors.empty()) throw HostError(entries.path + ": expected at least one binding");
    p.graphs.push_back(std::move(g));
  }
  p.graph(p.step_graph);  // throws when the step graph has no bindings
  const Field tables = f["tables"];
  for (size_t k = 0; k < tables.as_array().size(); ++k) {
    const Field t = tables.at(k);
    TableUpload u{r.buffer(t["buffer"]), t["table"].str(), r.dtype(t["dtype"]), r.non_negative(t["columns"], 1 << 24),
                  {}};
    const Field layout = t["layout"];
    for (size_t j = 0; j < layout.as_array().size(); ++j) {
      const Field row = layout.at(j);
      if (row.as_array().size() != 3) throw HostError(row.path + ": expected [first_row, rows, byte_offset]");
      const std::array<int64_t, 3> e{r.non_negative(row.at(0), 1 << 30), r.non_negative(row.at(1), 1 << 30),
                                     r.non_negative(row.at(2))};
      r.span(row, u.buffer, e[2], e[1] * u.columns * itemsize(u.dtype), true);
      u.layout.push_back(e);
    }
    p.tables.push_back(std::move(u));
  }
  const Field fills = f["fills"];
  for (size_t k = 0; k < fills.as_array().size(); ++k) {
    const Field x = fills.at(k);
    if (x["dtype"].str() != "int64") throw HostError(x.path + ".dtype: expected \"int64\"");
    Fill fill{r.buffer(x["buffer"]), r.non_negative(x["offset"]), x["value"].i64(),
              r.non_negative(x["count"], int64_t(1) << 40)};
    r.span(x, fill.buffer, fill.offset, fill.count * 8, false);
    p.fills.push_back(std::move(fill));
  }
  r.check_sizes(f);
  return p;
}

void check_exec_plan(const ExecPlan& p, const Manifest& m) {
  for (const GraphBindings& g : p.graphs) {
    auto spec = m.graphs.find(g.graph);
    if (spec == m.graphs.end()) throw HostError("tensorrt.bindings: the bundle has no graph \"" + g.graph + "\"");
    std::set<std::pair<std::string, bool>> want, bound;
    for (const TensorSpec& t : spec->second.inputs) want.emplace(t.name, true);
    for (const TensorSpec& t : spec->second.outputs) want.emplace(t.name, false);
    for (const TensorBinding& b : g.tensors) bound.emplace(b.name, b.input);
    if (want != bound) {
      throw HostError("tensorrt.bindings." + g.graph + ": the bound tensors are not the graph's inputs and outputs");
    }
    for (const TensorBinding& b : g.tensors) {
      const TensorSpec* t = b.input ? spec->second.find_input(b.name) : spec->second.find_output(b.name);
      if (t->dtype != b.dtype) {
        throw HostError("tensorrt.bindings." + g.graph + ": " + b.name + " is " + b.dtype + " in the plan, " +
                        t->dtype + " in the graph: rebuild the plans");
      }
      // the graph's rank and fixed sizes; a symbolic size at most the plan's rows or the pyramid's tokens
      for (const std::vector<int64_t>& shape : b.shapes) {
        bool fits = shape.size() == t->shape.size();
        for (size_t d = 0; fits && d < shape.size(); ++d) {
          const Dim& dim = t->shape[d];
          const int64_t limit = dim.symbol == "rows" ? p.rows : m.schedule.total_tokens;
          fits = dim.symbolic() ? shape[d] <= limit : shape[d] == dim.value;
        }
        if (!fits) {
          throw HostError("tensorrt.bindings." + g.graph + ": a shape of " + b.name +
                          " does not fit the graph's (rows <= " + std::to_string(p.rows) + ", tokens <= " +
                          std::to_string(m.schedule.total_tokens) + ")");
        }
      }
    }
    if (!m.plans.count(g.graph)) throw HostError("the manifest has no plan file for graph " + g.graph);
  }
  for (const TableUpload& u : p.tables) {
    if (!m.tables.count(u.table)) throw HostError("tensorrt.tables: the bundle has no table \"" + u.table + "\"");
  }
}

// ---- printing ---------------------------------------------------------------------------------------
namespace {

std::string q(const std::string& s) {  // plan names come from a parsed manifest: escape what JSON needs
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
      continue;
    }
    out += c;
  }
  return out + "\"";
}

template <typename T, typename F>
std::string list(const std::vector<T>& v, F f) {
  std::string s = "[";
  for (size_t k = 0; k < v.size(); ++k) s += (k ? ", " : "") + f(v[k]);
  return s + "]";
}

std::string ints(const std::vector<int64_t>& v) {
  return list(v, [](int64_t x) { return std::to_string(x); });
}

}  // namespace

std::string exec_plan_to_json(const ExecPlan& p) {
  std::string s = "{\"plan_version\": " + std::to_string(kPlanVersion) + ", \"step_graph\": " + q(p.step_graph) +
                  ", \"self_cache\": " + q(p.self_cache) + ", \"rows\": {\"scans\": " + std::to_string(p.scans) +
                  ", \"samples\": " + std::to_string(p.samples) + ", \"guided\": " + (p.guided ? "true" : "false") +
                  ", \"rows\": " + std::to_string(p.rows) + ", \"sample_rows\": " + std::to_string(p.sample_rows) +
                  "}, \"alignment\": " + std::to_string(kPlanAlignment) +
                  ", \"version_compatible\": " + (p.version_compatible ? "true" : "false") + ", \"buffers\": {";
  bool first = true;
  for (const auto& [name, bytes] : p.buffers) {
    s += (first ? "" : ", ") + q(name) + ": " + std::to_string(bytes);
    first = false;
  }
  s += "}, \"bindings\": {";
  for (size_t k = 0; k < p.graphs.size(); ++k) {
    const GraphBindings& g = p.graphs[k];
    s += (k ? ", " : "") + q(g.graph) + ": " + list(g.tensors, [](const TensorBinding& b) {
      std::string copy = "null";
      if (!b.copy_from.empty()) {
        copy = list(b.copy_from, [](const std::pair<std::string, int64_t>& c) {
          return "[" + q(c.first) + ", " + std::to_string(c.second) + "]";
        });
      }
      return "{\"name\": " + q(b.name) + ", \"input\": " + (b.input ? "true" : "false") + ", \"dtype\": " + q(b.dtype) +
             ", \"buffer\": " + list(b.buffer, q) + ", \"shapes\": " + list(b.shapes, ints) +
             ", \"offsets\": " + ints(b.offsets) + ", \"copy_from\": " + copy + "}";
    });
  }
  s += "}, \"tables\": " + list(p.tables, [](const TableUpload& u) {
    return "{\"buffer\": " + q(u.buffer) + ", \"table\": " + q(u.table) + ", \"dtype\": " + q(u.dtype) +
           ", \"columns\": " + std::to_string(u.columns) + ", \"layout\": " +
           list(u.layout, [](const std::array<int64_t, 3>& e) { return ints({e[0], e[1], e[2]}); }) + "}";
  });
  s += ", \"fills\": " + list(p.fills, [](const Fill& f) {
    return "{\"buffer\": " + q(f.buffer) + ", \"offset\": " + std::to_string(f.offset) +
           ", \"value\": " + std::to_string(f.value) + ", \"count\": " + std::to_string(f.count) +
           ", \"dtype\": \"int64\"}";
  });
  return s + "}";
}

std::string describe_exec_plan(const ExecPlan& p) {
  std::ostringstream o;
  o << "TensorRT plan: step " << p.step_graph << ", " << p.self_cache << " self cache, built for " << p.scans
    << " scan(s) x " << p.samples << " sample(s)" << (p.guided ? ", guided" : "") << " (" << p.rows << " rows)\n";
  int64_t total = 0;
  for (const auto& [name, bytes] : p.buffers) total += bytes;
  o << p.buffers.size() << " buffers, " << total << " bytes\n";
  for (const GraphBindings& g : p.graphs) {
    o << "  " << g.graph << " (" << g.profiles << " profile" << (g.profiles == 1 ? "" : "s") << ")\n";
    for (const TensorBinding& b : g.tensors) {
      o << "    " << (b.input ? "in  " : "out ") << b.name << " " << shape_str(b.shapes[0]) << " = " << b.buffer[0]
        << "[" << b.offsets[0] << "]" << (b.copy_from.empty() ? "" : " (copied in)") << "\n";
    }
  }
  return o.str();
}

}  // namespace mh
