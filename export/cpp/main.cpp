// mindhier_host: decode fMRI scans to images through a bundle's TensorRT plans, plus CPU-only checks.
// Errors print one line ("error: ...") and exit 1; bad command lines exit 2.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "error.hpp"
#include "image.hpp"
#include "manifest.hpp"
#include "npy.hpp"
#include "decode.hpp"
#include "exec_plan.hpp"
#include "pipe_device.hpp"
#include "sampling.hpp"

#ifdef MINDHIER_HAVE_TENSORRT
#include "trt_runner.hpp"
#endif

namespace {

using mh::HostError;

struct UsageError : HostError {
  using HostError::HostError;
};

const char* kUsage = R"(usage:
  mindhier_host --bundle DIR --fmri FILE.npy --subject NAME --out OUT.ppm [options]
      Decode every scan of FILE.npy (float32 [scans, voxels]) to OUT.ppm (or .png); several scans or
      samples give OUT_scan00003.ppm, OUT_scan00003_s1.ppm, ... (needs a TensorRT build and a bundle
      with plans from `mindhier-rt build`). Scans with NaN or inf voxels are skipped with a warning.
      --samples N      images per scan (default: the bundle's batch.samples)
      --device N       CUDA device (default 0)
      --engine-pipe R,W  run the graphs in another process over file descriptors R (answers) and W
                       (requests) instead of TensorRT (pipe_device.hpp; how the tests check the decode loop)
  mindhier_host --check-bundle DIR
      Parse the manifest, verify every file's SHA-256, print the schedule and the recorded TensorRT plan.
  mindhier_host --print-plan DIR
      The recorded TensorRT plan (the manifest's `tensorrt` section) as this host read and checked it, as JSON.
  mindhier_host --check-sampling LOGITS.npy [--scale I] [--scan-ids 0,1,..] [--sample-ids 0,0,..]
                [--n-scales K] [sampling options]
      Tokens of float32 logits [N, l, V], one line per row. With --n-scales K the rows are
      [N conditional, N unconditional], combined with the guidance weight of scale I of K.
sampling options (default: the bundle's manifest, else docs/sampling.md):
  --seed N  --cfg-scale X  --cfg-stop N|none  --top-k N  --top-p X  --greedy
)";

// ---- command line ---------------------------------------------------------------------------------
const std::set<std::string> kValueOptions = {
    "--bundle", "--fmri",  "--subject", "--out",      "--samples",    "--seed",        "--cfg-scale",
    "--cfg-stop", "--top-k", "--top-p", "--scans",    "--scale",      "--scan-ids",    "--sample-ids",
    "--n-scales", "--device", "--engine-pipe", "--check-bundle", "--print-plan", "--check-sampling"};
const std::set<std::string> kFlags = {"--greedy", "--help", "-h"};

struct Args {
  std::map<std::string, std::string> values;
  std::set<std::string> flags;
  bool has(const std::string& k) const { return values.count(k) || flags.count(k); }
  const std::string& get(const std::string& k) const {
    auto it = values.find(k);
    if (it == values.end()) throw UsageError("missing " + k);
    return it->second;
  }
};

Args parse_args(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    if (kFlags.count(k)) {
      a.flags.insert(k);
    } else if (kValueOptions.count(k)) {
      if (i + 1 >= argc) throw UsageError(k + " needs a value");
      if (!a.values.emplace(k, argv[++i]).second) throw UsageError(k + " given twice");
    } else {
      throw UsageError("unknown argument " + k);
    }
  }
  return a;
}

int64_t to_int(const std::string& opt, const std::string& s) {
  size_t used = 0;
  long long v = 0;
  try {
    v = std::stoll(s, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != s.size() || s.empty()) throw UsageError(opt + " expects an integer, got \"" + s + "\"");
  return v;
}

uint64_t to_uint(const std::string& opt, const std::string& s) {
  size_t used = 0;
  unsigned long long v = 0;
  try {
    v = s.empty() || s[0] == '-' ? 0 : std::stoull(s, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != s.size() || s.empty()) throw UsageError(opt + " expects an integer in [0, 2^64), got \"" + s + "\"");
  return v;
}

double to_double(const std::string& opt, const std::string& s) {
  size_t used = 0;
  double v = 0;
  try {
    v = std::stod(s, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != s.size() || s.empty()) throw UsageError(opt + " expects a number, got \"" + s + "\"");
  return v;
}

std::vector<uint32_t> to_ids(const std::string& opt, const std::string& s) {
  std::vector<uint32_t> ids;
  std::stringstream in(s);
  std::string item;
  while (std::getline(in, item, ',')) {
    const uint64_t v = to_uint(opt, item);
    if (v > 0xFFFFFFFFull) throw UsageError(opt + " ids must be < 2^32, got " + item);
    ids.push_back(uint32_t(v));
  }
  return ids;
}

mh::SamplingConfig sampling_from(const Args& a, mh::SamplingConfig cfg) {
  if (a.has("--seed")) cfg.seed = to_uint("--seed", a.get("--seed"));
  if (a.has("--cfg-scale")) cfg.cfg_scale = to_double("--cfg-scale", a.get("--cfg-scale"));
  if (a.has("--cfg-stop")) {
    const std::string& v = a.get("--cfg-stop");
    cfg.cfg_stop = v == "none" ? std::optional<int64_t>() : std::optional<int64_t>(to_int("--cfg-stop", v));
  }
  if (a.has("--top-k")) cfg.top_k = to_int("--top-k", a.get("--top-k"));
  if (a.has("--top-p")) cfg.top_p = to_double("--top-p", a.get("--top-p"));
  if (a.has("--greedy")) cfg.greedy = true;
  cfg.validate();
  return cfg;
}

// ---- modes ----------------------------------------------------------------------------------------
int check_sampling(const Args& a) {
  const mh::NpyArray arr = mh::read_npy_float32(a.get("--check-sampling"), 3);
  std::vector<float> logits = arr.to_float32();
  const mh::SamplingConfig cfg = sampling_from(a, mh::SamplingConfig{});
  const int64_t scale = a.has("--scale") ? to_int("--scale", a.get("--scale")) : 0;
  if (scale < 0 || scale > 0xFFFFFFFFll) throw UsageError("--scale must be in [0, 2^32)");
  int64_t N = arr.shape[0];
  const int64_t l = arr.shape[1], V = arr.shape[2];
  if (a.has("--n-scales")) {  // [cond rows, uncond rows]: combine as the decode loop does
    if (N % 2) throw HostError("--n-scales expects [2N, l, V] logits (conditional then unconditional rows)");
    N /= 2;
    const int64_t n = N * l * V, n_scales = to_int("--n-scales", a.get("--n-scales"));
    const double t = mh::guidance_weight(cfg, scale, n_scales);  // also checks scale < n_scales
    if (mh::guidance_active(cfg, scale)) {
      mh::cfg_combine(logits.data(), logits.data() + n, logits.data(), n, t);
    }
  }
  std::vector<uint32_t> scans(static_cast<size_t>(N)), samples(size_t(N), 0);
  for (int64_t r = 0; r < N; ++r) scans[size_t(r)] = uint32_t(r);
  if (a.has("--scan-ids")) scans = to_ids("--scan-ids", a.get("--scan-ids"));
  if (a.has("--sample-ids")) samples = to_ids("--sample-ids", a.get("--sample-ids"));
  const std::vector<int64_t> tokens = mh::sample_tokens(logits.data(), N, l, V, cfg, uint32_t(scale), scans, samples);
  for (int64_t r = 0; r < N; ++r) {
    for (int64_t j = 0; j < l; ++j) std::cout << (j ? " " : "") << tokens[size_t(r * l + j)];
    std::cout << "\n";
  }
  return 0;
}

std::string ints(const std::vector<int64_t>& v) { return mh::shape_str(v); }

int check_bundle(const Args& a, bool json) {
  const mh::Manifest m = mh::load_manifest(a.get(json ? "--print-plan" : "--check-bundle"));
  mh::verify_files(m);
  if (json) {
    if (!m.tensorrt) throw HostError("the bundle has no TensorRT plans: run `mindhier-rt build --engine BUNDLE`");
    std::cout << mh::exec_plan_to_json(*m.tensorrt) << "\n";
    return 0;
  }
  const mh::ScheduleSpec& s = m.schedule;
  std::cout << "bundle " << m.root.string() << ": format version " << m.format_version << ", model "
            << m.model.name << " (" << m.model.attn_mode << "), dtype " << m.dtype << ", " << m.files.size()
            << " files verified\n";
  std::cout << "schedule: patch_nums " << ints(s.patch_nums) << ", token_counts " << ints(s.token_counts)
            << ", offsets " << ints(s.offsets) << ", segment_of_scale " << ints(s.segment_of_scale) << ", n_levels "
            << s.n_levels << ", context_tokens " << s.context_tokens << "\n";
  std::cout << "subjects:";
  for (const auto& [name, voxels] : m.subjects) std::cout << " " << name << " (" << voxels << " voxels)";
  std::cout << "\nplans: ";
  if (m.plans.empty()) std::cout << "none (ONNX only; run `mindhier-rt build` for TensorRT plans)";
  for (const auto& [graph, plan] : m.plans) std::cout << graph << "=" << plan.file << " ";
  std::cout << "\n" << (m.tensorrt ? mh::describe_exec_plan(*m.tensorrt) : std::string());
  return 0;
}

std::filesystem::path image_path(const std::filesystem::path& out, bool single, uint32_t scan,
                                                 uint32_t sample, int64_t samples) {
  if (single) return out;
  char tag[48];
  if (samples == 1) {
    std::snprintf(tag, sizeof tag, "_scan%05u", scan);
  } else {
    std::snprintf(tag, sizeof tag, "_scan%05u_s%u", scan, sample);
  }
  return out.parent_path() / (out.stem().string() + tag + out.extension().string());
}

int decode(const Args& a) {
  const mh::Manifest m = mh::load_manifest(a.get("--bundle"));
  mh::verify_files(m);
  const std::string subject = a.get("--subject");
  const std::filesystem::path out = a.get("--out");
  if (out.extension() != ".ppm" && out.extension() != ".png") throw UsageError("--out must end in .ppm or .png");
  if (out.extension() == ".png" && !mh::png_supported()) {
    throw HostError("this host was built without libpng: write a .ppm instead");
  }
  auto subj = m.subjects.find(subject);
  if (subj == m.subjects.end()) throw HostError("the bundle has no encoder for subject \"" + subject + "\"");
  const mh::NpyArray arr = mh::read_npy_float32(a.get("--fmri"), 2);
  if (arr.shape[1] != subj->second) {
    throw HostError(a.get("--fmri") + ": subject " + subject + " expects " + std::to_string(subj->second) +
                    " voxels per scan, got " + std::to_string(arr.shape[1]));
  }
  // A batch job reports bad scans and decodes the good ones (as `mindhier-rt decode`).
  const std::vector<float> all = arr.to_float32();
  std::vector<float> voxels;
  std::vector<uint32_t> ids;
  for (int64_t n = 0; n < arr.shape[0]; ++n) {
    const float* row = all.data() + n * arr.shape[1];
    bool finite = true;
    for (int64_t v = 0; v < arr.shape[1]; ++v) finite = finite && std::isfinite(row[v]);
    if (!finite) {
      std::cerr << "warning: scan " << n << ": NaN or inf voxels, skipped\n";
      continue;
    }
    voxels.insert(voxels.end(), row, row + arr.shape[1]);
    ids.push_back(uint32_t(n));
  }
  if (ids.empty()) throw HostError(a.get("--fmri") + ": no scan with finite voxels");
  const int64_t samples = a.has("--samples") ? to_int("--samples", a.get("--samples")) : m.batch.samples;
  if (!m.tensorrt) throw HostError("the bundle has no TensorRT plan: run `mindhier-rt build --engine BUNDLE` first");
  mh::DecodeRequest request{subject, voxels, int64_t(ids.size()), samples, ids, sampling_from(a, m.sampling)};
  std::unique_ptr<mh::Device> device;
  if (a.has("--engine-pipe")) {
    const std::vector<uint32_t> fds = to_ids("--engine-pipe", a.get("--engine-pipe"));
    if (fds.size() != 2) throw UsageError("--engine-pipe expects R,W (two file descriptors)");
    device = std::make_unique<mh::PipeDevice>(int(fds[0]), int(fds[1]));
  } else {
#ifdef MINDHIER_HAVE_TENSORRT
    const int gpu = a.has("--device") ? int(to_int("--device", a.get("--device"))) : 0;
    device = std::make_unique<mh::TrtDevice>(m, gpu);
#else
    throw HostError("this mindhier_host was built without TensorRT: only --check-bundle, --print-plan, "
                    "--check-sampling and --engine-pipe are available (rebuild where TensorRT and CUDA are installed)");
#endif
  }
  mh::PlanExecutor executor(m, *device);
  const auto t0 = std::chrono::steady_clock::now();
  const mh::DecodeResult result = executor.decode(request);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const int64_t R = result.image_shape[0], H = result.image_shape[2], W = result.image_shape[3];
  const bool single = R == 1;
  for (int64_t r = 0; r < R; ++r) {
    const std::filesystem::path path =
        image_path(out, single, result.row_scan[size_t(r)], result.row_sample[size_t(r)], samples);
    mh::write_image(path, result.images.data() + r * 3 * H * W, H, W);
    std::cout << "wrote " << path.string() << "\n";
  }
  for (size_t i = 0; i < result.tokens.size(); ++i) {  // one line per scale: the tokens of every row
    std::cout << "tokens " << i << ":";
    for (int64_t t : result.tokens[i]) std::cout << " " << t;
    std::cout << "\n";
  }
  std::cout << "decoded " << ids.size() << " scan(s) x " << samples << " sample(s) in " << seconds << " s\n";
  return 0;
}

int run(int argc, char** argv) {
  const Args a = parse_args(argc, argv);
  if (a.has("--help") || a.has("-h") || argc == 1) {
    std::cout << kUsage << "image formats: ppm" << (mh::png_supported() ? ", png" : " (png: not built, no libpng)")
              << "\nTensorRT runner: "
#ifdef MINDHIER_HAVE_TENSORRT
              << "built\n";
#else
              << "not built (no TensorRT found at build time)\n";
#endif
    return 0;
  }
  if (a.has("--check-sampling")) return check_sampling(a);
  if (a.has("--check-bundle")) return check_bundle(a, false);
  if (a.has("--print-plan")) return check_bundle(a, true);
  return decode(a);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const UsageError& e) {
    std::cerr << "error: " << e.what() << " (see --help)\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
