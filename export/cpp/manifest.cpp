#include "manifest.hpp"

#include <set>

#include "error.hpp"
#include "json_field.hpp"
#include "npy.hpp"
#include "schedule.hpp"
#include "sha256.hpp"

namespace mh {

namespace {

std::vector<TensorSpec> tensor_specs(const Field& list) {
  std::vector<TensorSpec> out;
  for (size_t i = 0; i < list.as_array().size(); ++i) {
    const Field t = list.at(i);
    TensorSpec spec{t["name"].str(), t["dtype"].str(), {}};
    const Field shape = t["shape"];
    for (size_t d = 0; d < shape.as_array().size(); ++d) {
      const Field dim = shape.at(d);
      if (dim.v.type() == json::Type::String) {
        spec.shape.push_back(Dim{0, dim.str()});
      } else {
        const int64_t value = dim.i64();
        if (value < 0) throw HostError(dim.path + ": negative dimension " + std::to_string(value));
        spec.shape.push_back(Dim{value, ""});
      }
    }
    out.push_back(std::move(spec));
  }
  return out;
}

PlanFile plan_file(const Field& f) {
  PlanFile plan{f["file"].str(), {}, {}};
  if (const json::Value* flags = f.find("flags")) {
    const Field list{*flags, f.join("flags")};
    for (size_t k = 0; k < list.as_array().size(); ++k) plan.flags.push_back(list.at(k).str());
  }
  if (const json::Value* profiles = f.find("profiles")) {
    const Field list{*profiles, f.join("profiles")};
    for (size_t p = 0; p < list.as_array().size(); ++p) {
      const Field prof = list.at(p);
      Profile ranges;
      for (const auto& [input, range] : prof.as_object()) {
        const Field r{range, prof.join(input)};
        ranges[input] = ShapeRange{r["min"].ints(), r["opt"].ints(), r["max"].ints()};
        const ShapeRange& sr = ranges[input];
        if (sr.min.size() != sr.max.size() || sr.opt.size() != sr.max.size()) {
          throw HostError(r.path + ": min, opt and max have different ranks");
        }
      }
      plan.profiles.push_back(std::move(ranges));
    }
  }
  return plan;
}

}  // namespace

const TensorSpec* GraphSpec::find_input(const std::string& tensor) const {
  for (const TensorSpec& t : inputs) {
    if (t.name == tensor) return &t;
  }
  return nullptr;
}

const TensorSpec* GraphSpec::find_output(const std::string& tensor) const {
  for (const TensorSpec& t : outputs) {
    if (t.name == tensor) return &t;
  }
  return nullptr;
}

const GraphSpec& Manifest::graph(const std::string& name) const {
  auto it = graphs.find(name);
  if (it == graphs.end()) throw HostError("the bundle has no graph \"" + name + "\"");
  return it->second;
}

Manifest parse_manifest(const json::Value& doc, const std::filesystem::path& root) {
  const Field top{doc, ""};
  Manifest m;
  m.root = root;

  // Format first: a bundle of another version may name everything else differently.
  const std::string format = top["format"].str();
  if (format != kBundleFormat) {
    throw HostError("expected format \"" + std::string(kBundleFormat) + "\", found \"" + format + "\"");
  }
  const Field version = top["format_version"];
  if (version.v.type() != json::Type::Number || version.v.number_text() != std::to_string(kFormatVersion)) {
    const std::string found = version.v.type() == json::Type::Number ? version.v.number_text() : "non-number";
    throw HostError("bundle format version " + found + " is not supported (this host reads version " +
                    std::to_string(kFormatVersion) + "); re-export the bundle or use a matching host");
  }
  m.format_version = kFormatVersion;

  const Field config = top["config"];
  const Field gen = config["generator"];
  m.model = ModelSpec{config["name"].str(),        gen["attn_mode"].str(),        config["image_size"].i64(),
                      config["vocab_size"].i64(),  config["latent_dim"].i64(),    config["context_dim"].i64(),
                      gen["depth"].i64(),          gen["width"].i64(),            gen["heads"].i64()};

  const Field sched = top["schedule"];
  ScheduleSpec& s = m.schedule;
  s.patch_nums = sched["patch_nums"].ints();
  s.token_counts = sched["token_counts"].ints();
  s.offsets = sched["offsets"].ints();
  s.cached_lengths = sched["cached_lengths"].ints();
  s.segment_of_scale = sched["segment_of_scale"].ints();
  s.n_scales = sched["n_scales"].i64();
  s.n_levels = sched["n_levels"].i64();
  s.context_tokens = sched["context_tokens"].i64();
  s.context_length = sched["context_length"].i64();
  s.total_tokens = sched["total_tokens"].i64();
  check_schedule(s);

  for (const auto& [name, count] : top["subjects"].as_object()) {
    m.subjects[name] = Field{count, "subjects." + name}.i64();
  }
  m.dtype = top["dtype"].str();
  const Field batch = top["batch"];
  m.batch = BatchSpec{batch["scans"].i64(), batch["samples"].i64(), batch["rows"].i64()};

  const Field sampling = top["sampling"];
  SamplingConfig& sc = m.sampling;
  sc.cfg_scale = sampling["cfg_scale"].f64();
  const Field stop = sampling["cfg_stop"];
  if (!stop.v.is_null()) sc.cfg_stop = stop.i64();
  sc.top_k = sampling["top_k"].i64();
  sc.top_p = sampling["top_p"].f64();
  sc.greedy = sampling["greedy"].boolean();
  sc.seed = sampling["seed"].u64();
  try {
    sc.validate();
  } catch (const HostError& e) {
    throw HostError(sampling.path + ": " + e.what());
  }

  const Field graphs = top["graphs"];
  for (const auto& [name, value] : graphs.as_object()) {
    const Field g{value, graphs.join(name)};
    GraphSpec spec{name, g["file"].str(), "", tensor_specs(g["inputs"]), tensor_specs(g["outputs"])};
    if (const json::Value* ext = g.find("external_data")) {
      spec.external_data = Field{*ext, g.join("external_data")}.str();
    }
    m.graphs[name] = std::move(spec);
  }
  for (const auto& [name, file] : top["tables"].as_object()) m.tables[name] = Field{file, "tables." + name}.str();
  const Field context_map = top["context_map"];
  m.context_map = context_map.str();
  if (m.context_map != "training" && m.context_map != "reference-pipeline") {
    throw HostError(context_map.path + ": expected \"training\" or \"reference-pipeline\", found \"" +
                    m.context_map + "\"");
  }

  for (const auto& [rel, value] : top["files"].as_object()) {
    const Field f{value, "files." + rel};
    m.files[rel] = FileEntry{f["sha256"].str(), f["bytes"].i64()};
  }
  if (const json::Value* plans = top.find("plans")) {
    const Field p{*plans, "plans"};
    for (const auto& [name, value] : p.as_object()) m.plans[name] = plan_file(Field{value, p.join(name)});
  }
  if (const json::Value* trt = top.find("tensorrt")) {
    m.tensorrt = parse_exec_plan(Field{*trt, "tensorrt"});
    check_exec_plan(*m.tensorrt, m);
  }
  if (m.plans.empty() != !m.tensorrt) {
    throw HostError("expected both `plans` and `tensorrt` (written together by `mindhier-rt build`), or neither");
  }

  // Every file the host may open must be covered by a checksum, or verify_files would not protect it.
  std::set<std::string> referenced;
  for (const auto& [name, g] : m.graphs) {
    referenced.insert(g.file);
    if (!g.external_data.empty()) referenced.insert(g.external_data);
  }
  for (const auto& [name, file] : m.tables) referenced.insert(file);
  for (const auto& [name, plan] : m.plans) referenced.insert(plan.file);
  for (const std::string& rel : referenced) {
    if (!m.files.count(rel)) throw HostError("file " + rel + " is used by the manifest but has no checksum in `files`");
  }
  return m;
}

Manifest load_manifest(const std::filesystem::path& bundle_dir) {
  const std::filesystem::path path = bundle_dir / "manifest.json";
  if (!std::filesystem::is_regular_file(path)) {
    throw HostError(bundle_dir.string() + ": not an engine bundle (no manifest.json)");
  }
  try {
    const std::vector<uint8_t> bytes = read_file_bytes(path);
    const json::Value doc = json::parse(std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()));
    return parse_manifest(doc, bundle_dir);
  } catch (const HostError& e) {
    throw HostError(path.string() + ": " + e.what());
  }
}

void verify_files(const Manifest& m) {
  for (const auto& [rel, entry] : m.files) {
    const std::filesystem::path p = m.path(rel);
    if (!std::filesystem::is_regular_file(p)) {
      throw HostError(m.root.string() + ": file " + rel + " listed in the manifest is missing");
    }
    const auto size = int64_t(std::filesystem::file_size(p));
    if (size != entry.bytes || sha256_file_hex(p) != entry.sha256) {
      throw HostError(m.root.string() + ": file " + rel + " was altered (checksum mismatch)");
    }
  }
}

}  // namespace mh
