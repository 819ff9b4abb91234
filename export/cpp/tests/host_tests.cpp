// Unit tests of everything in the host that needs no GPU. No framework: CHECK records a failure and goes
// on; the exit status is the number of failures (capped), so CTest reports any of them.
//
// usage: host_tests FIXTURES_DIR   (export/cpp/tests/fixtures)
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include <unistd.h>  // getpid: unique temp folders

#include "dtype.hpp"
#include "error.hpp"
#include "image.hpp"
#include "json.hpp"
#include "manifest.hpp"
#include "npy.hpp"
#include "exec_plan.hpp"
#include "sampling.hpp"
#include "schedule.hpp"
#include "sha256.hpp"

namespace fs = std::filesystem;

static int g_failures = 0;
static int g_checks = 0;

#define CHECK(cond)                                                                          \
  do {                                                                                       \
    ++g_checks;                                                                              \
    if (!(cond)) {                                                                           \
      ++g_failures;                                                                          \
      std::cerr << __FILE__ << ":" << __LINE__ << ": CHECK failed: " #cond << std::endl;     \
    }                                                                                        \
  } while (0)

#define CHECK_EQ(a, b)                                                                              \
  do {                                                                                              \
    ++g_checks;                                                                                     \
    const auto va_ = (a);                                                                           \
    const auto vb_ = (b);                                                                           \
    if (!(va_ == vb_)) {                                                                            \
      ++g_failures;                                                                                 \
      std::cerr << __FILE__ << ":" << __LINE__ << ": CHECK_EQ failed: " #a " == " #b " (" << va_ \
                << " vs " << vb_ << ")" << std::endl;                                               \
    }                                                                                               \
  } while (0)

// The call must throw HostError with a message containing `part`.
#define CHECK_THROWS(expr, part)                                                                          \
  do {                                                                                                    \
    ++g_checks;                                                                                           \
    std::string what_;                                                                                    \
    try {                                                                                                 \
      (void)(expr);                                                                                       \
    } catch (const mh::HostError& e) {                                                                    \
      what_ = e.what();                                                                                   \
    }                                                                                                     \
    if (what_.find(part) == std::string::npos || what_.empty()) {                                         \
      ++g_failures;                                                                                       \
      std::cerr << __FILE__ << ":" << __LINE__ << ": expected an error containing \"" << (part)          \
                << "\" from " #expr ", got \"" << what_ << "\"" << std::endl;                            \
    }                                                                                                     \
  } while (0)

static fs::path g_fixtures;

static std::string read_text(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

static void write_text(const fs::path& p, const std::string& text) {
  std::ofstream f(p, std::ios::binary);
  f << text;
}

static fs::path temp_dir(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("mindhier_host_tests_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

// ---- JSON ---------------------------------------------------------------------------------------
static void test_json() {
  using mh::json::parse;
  const auto v = parse(R"( {"a": [1, -2.5e3, true, false, null], "s": "q\"\\\/\b\f\n\r\t\u00e9\ud83d\ude00",
                          "big": 18446744073709551615, "neg": -9223372036854775808, "o": {}} )");
  const auto& a = v.at("a").as_array();
  CHECK_EQ(a.size(), size_t(5));
  CHECK_EQ(a[0].as_int(), int64_t(1));
  CHECK_EQ(a[1].as_double(), -2500.0);
  CHECK(a[2].as_bool() && !a[3].as_bool() && a[4].is_null());
  CHECK_EQ(v.at("s").as_string(), std::string("q\"\\/\b\f\n\r\t\xC3\xA9\xF0\x9F\x98\x80"));
  CHECK_EQ(v.at("big").as_uint(), uint64_t(18446744073709551615ull));
  CHECK_EQ(v.at("neg").as_int(), INT64_MIN);
  CHECK(v.at("o").as_object().empty());
  CHECK(v.find("missing") == nullptr);
  CHECK_THROWS(v.at("missing"), "missing key \"missing\"");
  CHECK_THROWS(v.at("a").as_object(), "expected a JSON object, found array");
  CHECK_THROWS(a[1].as_int(), "expected an integer");
  CHECK_THROWS(v.at("big").as_int(), "does not fit");

  // Strictness, with byte offsets.
  CHECK_THROWS(parse(R"({"a": 1,})"), "JSON error at byte 8: expected a string key");
  CHECK_THROWS(parse(R"([1, 2,])"), "JSON error at byte 6");
  CHECK_THROWS(parse(R"({"a": 1, "a": 2})"), "JSON error at byte 9: duplicate key \"a\"");
  CHECK_THROWS(parse("[NaN]"), "JSON error at byte 1");
  CHECK_THROWS(parse("[Infinity]"), "JSON error at byte 1");
  CHECK_THROWS(parse("[01]"), "leading zeros");
  CHECK_THROWS(parse("[1.]"), "JSON error at byte 3: expected a digit");
  CHECK_THROWS(parse("\"a\nb\""), "control character");
  CHECK_THROWS(parse("\"\\x\""), "invalid escape");
  CHECK_THROWS(parse("\"\\ud800\""), "surrogate");
  CHECK_THROWS(parse("{} x"), "JSON error at byte 3: unexpected trailing characters");
  CHECK_THROWS(parse(""), "JSON error at byte 0");
  CHECK_THROWS(parse("[1 // c\n]"), "JSON error at byte 3");
  CHECK_THROWS(parse("\"abc"), "unterminated string");
  CHECK_THROWS(parse(std::string(600, '[') + std::string(600, ']')), "nesting deeper");
}

// ---- SHA-256 (FIPS 180-2 / NIST example vectors) -------------------------------------------------
static void test_sha256() {
  CHECK_EQ(mh::sha256_hex("", 0), std::string("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"));
  CHECK_EQ(mh::sha256_hex("abc", 3), std::string("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"));
  const std::string two_blocks = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
  CHECK_EQ(mh::sha256_hex(two_blocks.data(), two_blocks.size()),
           std::string("248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"));
  const std::string million(1000000, 'a');
  CHECK_EQ(mh::sha256_hex(million.data(), million.size()),
           std::string("cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"));
  // Streaming in uneven pieces gives the one-shot digest.
  std::string bytes;
  for (int k = 0; k < 3; ++k) {
    for (int b = 0; b < 256; ++b) bytes += char(b);
  }
  mh::Sha256 h;
  for (size_t at = 0, step = 1; at < bytes.size(); at += step, step = step * 3 % 97 + 1) {
    h.update(bytes.data() + at, std::min(step, bytes.size() - at));
  }
  CHECK_EQ(h.hex_digest(), std::string("f3a25aa93aa2fbba28d79260535bbd6a5eb0fc1c24a8b0f04e12b484c1dfe363"));
  const fs::path dir = temp_dir("sha");
  write_text(dir / "abc.txt", "abc");
  CHECK_EQ(mh::sha256_file_hex(dir / "abc.txt"), mh::sha256_hex("abc", 3));
  CHECK_THROWS(mh::sha256_file_hex(dir / "nope"), "cannot open");
  fs::remove_all(dir);
}

// ---- sampling: the reference values of docs/sampling.md section 6 --------------------------------
static void test_sampling() {
  CHECK_EQ(mh::fmix32(0), 0x00000000u);
  CHECK_EQ(mh::fmix32(1), 0x514e28b7u);
  CHECK_EQ(mh::fmix32(0xffffffffu), 0x81f16f39u);
  // Trace of the key (12345, 7, 1, 4, 99), word by word.
  const uint32_t words[6] = {12345, 0, 7, 1, 4, 99};
  const uint32_t trace[6] = {0xee8c12a5u, 0xb732272cu, 0x14510095u, 0x8db36bedu, 0xf9eedc92u, 0x828f6555u};
  uint32_t h = 0x243f6a88u;
  for (int k = 0; k < 6; ++k) {
    h = mh::fmix32(h ^ words[k]);
    CHECK_EQ(h, trace[k]);
  }
  struct Key {
    uint64_t seed;
    uint32_t scan, sample, scale, token, h;
    double u;
  };
  const Key keys[] = {
      {0, 0, 0, 0, 0, 0x19ea732fu, 0.10123367211781442},
      {0, 0, 0, 0, 1, 0x08ec4517u, 0.034855192294344306},
      {1, 0, 0, 0, 0, 0x89d9b335u, 0.5384780887980014},
      {18446744073709551615ull, 3, 2, 9, 1023, 0xeeef13cau, 0.9333355301059783},
      {12345, 7, 1, 4, 99, 0x828f6555u, 0.5100005466956645},
      {4294967296ull, 0, 0, 0, 0, 0xc097403cu, 0.7523079058155417},
      {0, 4294967295u, 4294967295u, 4294967295u, 4294967295u, 0x141e100bu, 0.07858371990732849},
  };
  for (const Key& k : keys) {
    CHECK_EQ(mh::hash_key(k.seed, k.scan, k.sample, k.scale, k.token), k.h);
    CHECK_EQ(mh::uniform(k.seed, k.scan, k.sample, k.scale, k.token), k.u);
  }

  // sample_tokens on the fixed logits: N = 2 rows (0, 0) and (0, 1), scale 3, l = 8.
  const float x[8] = {2.0f, 1.0f, 0.5f, 2.0f, -1.0f, 0.0f, 1.5f, 0.25f};
  std::vector<float> logits;
  for (int t = 0; t < 16; ++t) logits.insert(logits.end(), x, x + 8);
  struct Case {
    const char* name;
    mh::SamplingConfig cfg;
    std::vector<int64_t> tokens;  // row (0, 0) then row (0, 1)
  };
  mh::SamplingConfig greedy, all, top3, half, defaults, max_seed;
  greedy.greedy = true;
  all.top_k = 0, all.top_p = 1.0;
  top3.top_k = 3, top3.top_p = 1.0;
  half.top_k = 0, half.top_p = 0.5;
  max_seed.seed = 18446744073709551615ull;
  const Case cases[] = {
      {"greedy", greedy, {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}},
      {"top_k=0, top_p=1", all, {6, 3, 0, 3, 5, 0, 3, 6, 0, 0, 0, 0, 0, 1, 6, 7}},
      {"top_k=3, top_p=1", top3, {3, 0, 0, 0, 6, 0, 0, 3, 0, 0, 0, 0, 0, 6, 3, 6}},
      {"top_k=0, top_p=0.5", half, {3, 0, 0, 0, 3, 0, 0, 3, 0, 0, 0, 0, 0, 3, 3, 3}},
      {"defaults", defaults, {6, 3, 0, 3, 5, 0, 3, 6, 0, 0, 0, 0, 0, 1, 6, 2}},
      {"seed=2^64-1", max_seed, {0, 3, 1, 3, 0, 3, 0, 1, 3, 6, 3, 0, 3, 3, 3, 3}},
  };
  for (const Case& c : cases) {
    const auto got = mh::sample_tokens(logits.data(), 2, 8, 8, c.cfg, 3, {0, 0}, {0, 1});
    if (got != c.tokens) std::cerr << "sampling case " << c.name << " differs" << std::endl;
    CHECK(got == c.tokens);
  }
  // A row alone gives the same tokens as in the batch (ids are data, not positions).
  const auto alone = mh::sample_tokens(logits.data(), 1, 8, 8, defaults, 3, {0}, {1});
  CHECK((alone == std::vector<int64_t>{0, 0, 0, 0, 0, 1, 6, 2}));

  // -inf is probability 0; NaN, +inf and all -inf rows are refused.
  std::vector<float> masked = {-INFINITY, 1.0f, -INFINITY, 1.0f};
  for (uint32_t seed = 0; seed < 20; ++seed) {
    mh::SamplingConfig c;
    c.seed = seed;
    const auto t = mh::sample_tokens(masked.data(), 1, 1, 4, c, 0, {0}, {0});
    CHECK(t[0] == 1 || t[0] == 3);
  }
  std::vector<float> bad = {0.0f, NAN};
  CHECK_THROWS(mh::sample_tokens(bad.data(), 1, 1, 2, defaults, 0, {0}, {0}), "NaN or +inf");
  bad = {-INFINITY, -INFINITY};
  CHECK_THROWS(mh::sample_tokens(bad.data(), 1, 1, 2, defaults, 0, {0}, {0}), "all -inf");
  CHECK_THROWS(mh::sample_tokens(logits.data(), 2, 8, 8, defaults, 3, {0}, {0, 1}), "one id per row");

  // Guidance: ramp, stop, combine.
  mh::SamplingConfig g;  // cfg_scale 6
  CHECK_EQ(mh::guidance_weight(g, 0, 10), 0.0);
  CHECK_EQ(mh::guidance_weight(g, 3, 10), 2.0);
  CHECK_EQ(mh::guidance_weight(g, 9, 10), 6.0);
  CHECK_EQ(mh::guidance_weight(g, 4, 10), 6.0 * 4 / 9);
  g.cfg_stop = 5;
  CHECK(mh::guidance_active(g, 4) && !mh::guidance_active(g, 5));
  CHECK_EQ(mh::guidance_weight(g, 5, 10), 0.0);
  g.cfg_scale = 0.0;
  CHECK(!mh::guidance_active(g, 0));
  CHECK_THROWS(mh::guidance_weight(g, 10, 10), "scale must be in 0..9");
  const float cond[3] = {1.5f, -2.0f, 0.1f}, uncond[3] = {0.5f, 1.0f, 0.3f};
  float out[3];
  mh::cfg_combine(cond, uncond, out, 3, 0.0);
  CHECK(std::memcmp(out, cond, sizeof out) == 0);  // t = 0 gives cond exactly
  mh::cfg_combine(cond, uncond, out, 3, 2.0);
  CHECK_EQ(out[0], 3.5f);
  CHECK_EQ(out[1], -8.0f);
  const float a = 0.1f * float(1.0 + 2.0 / 3.0), b = 0.3f * float(2.0 / 3.0);
  mh::cfg_combine(cond, uncond, out, 3, 2.0 / 3.0);
  CHECK_EQ(out[2], a - b);

  mh::SamplingConfig invalid;
  invalid.top_p = 0.0;
  CHECK_THROWS(invalid.validate(), "top_p");
  invalid = {};
  invalid.cfg_scale = NAN;
  CHECK_THROWS(invalid.validate(), "cfg_scale");
}

// ---- schedule checks -----------------------------------------------------------------------------
static mh::ScheduleSpec good_schedule() {
  mh::ScheduleSpec s;
  s.patch_nums = {1, 2, 3, 4};
  s.token_counts = {1, 4, 9, 16};
  s.offsets = {0, 1, 5, 14, 30};
  s.cached_lengths = {0, 1, 5, 14};
  s.segment_of_scale = {0, 0, 1, 1};
  s.n_scales = 4, s.n_levels = 2, s.context_tokens = 5, s.context_length = 10, s.total_tokens = 30;
  return s;
}

static void test_schedule() {
  mh::check_schedule(good_schedule());
  auto s = good_schedule();
  s.offsets[2] = 6;
  CHECK_THROWS(mh::check_schedule(s), "are not the prefix sums of token_counts");
  s = good_schedule();
  s.token_counts[3] = 15;
  CHECK_THROWS(mh::check_schedule(s), "token_counts[3] = 15, expected patch_num^2 = 16");
  s = good_schedule();
  s.segment_of_scale[3] = 2;
  CHECK_THROWS(mh::check_schedule(s), "segment_of_scale[3] = 2 is outside 0..1");
  s = good_schedule();
  s.offsets.pop_back();
  CHECK_THROWS(mh::check_schedule(s), "offsets has 4 entries, expected 5");
  s = good_schedule();
  s.context_length = 9;
  CHECK_THROWS(mh::check_schedule(s), "context_length");
  s = good_schedule();
  s.total_tokens = 31;
  CHECK_THROWS(mh::check_schedule(s), "total_tokens");
}

// ---- manifest ------------------------------------------------------------------------------------
// A bundle folder from the fixture manifest whose files hold their own names (the fixture's checksums).
static fs::path fixture_bundle(const std::string& name, const std::string& manifest_text) {
  const fs::path dir = temp_dir(name);
  write_text(dir / "manifest.json", manifest_text);
  const auto doc = mh::json::parse(manifest_text);
  for (const auto& [rel, entry] : doc.at("files").as_object()) write_text(dir / rel, rel);
  return dir;
}

static std::string replace_once(std::string s, const std::string& from, const std::string& to) {
  const size_t at = s.find(from);
  if (at == std::string::npos) throw std::runtime_error("fixture text not found: " + from);
  return s.replace(at, from.size(), to);
}

static void test_manifest() {
  const std::string text = read_text(g_fixtures / "manifest_block_causal.json");
  const fs::path dir = fixture_bundle("manifest", text);
  const mh::Manifest m = mh::load_manifest(dir);
  CHECK_EQ(m.format_version, int64_t(3));
  CHECK_EQ(m.context_map, std::string("training"));
  CHECK_EQ(m.model.name, std::string("tiny"));
  CHECK_EQ(m.model.attn_mode, std::string("block_causal"));
  CHECK_EQ(m.model.vocab_size, int64_t(64));
  CHECK_EQ(m.model.depth, int64_t(2));
  CHECK((m.schedule.offsets == std::vector<int64_t>{0, 1, 5, 14, 30}));
  CHECK((m.schedule.segment_of_scale == std::vector<int64_t>{0, 0, 1, 1}));
  CHECK_EQ(m.schedule.context_tokens, int64_t(5));
  CHECK_EQ(m.subjects.at("subj01"), int64_t(96));
  CHECK_EQ(m.dtype, std::string("float32"));
  CHECK_EQ(m.sampling.cfg_scale, 6.0);
  CHECK(!m.sampling.cfg_stop);
  CHECK_EQ(m.sampling.top_k, int64_t(400));
  CHECK_EQ(m.sampling.seed, uint64_t(0));
  const mh::GraphSpec& step = m.graph("generator_step");
  CHECK_EQ(step.file, std::string("generator_step.onnx"));
  const mh::TensorSpec* past = step.find_input("past_key_values.1.value");
  CHECK(past != nullptr);
  if (past) {
    CHECK_EQ(past->shape.size(), size_t(4));
    CHECK_EQ(past->shape[0].symbol, std::string("rows"));
    CHECK_EQ(past->shape[2].symbol, std::string("past"));
    CHECK_EQ(past->shape[3].value, int64_t(32));
  }
  CHECK_EQ(step.find_output("present.0.key")->shape[2].symbol, std::string("past+tokens"));
  CHECK_EQ(m.graph("update_1").find_input("idx")->dtype, std::string("int64"));
  CHECK_EQ(m.tables.at("rope_cos"), std::string("rope_cos.npy"));
  CHECK_EQ(m.plans.at("generator_step").profiles.size(), size_t(4));
  CHECK((m.plans.at("generator_step").profiles[2].at("h").max == std::vector<int64_t>{2, 9, 64}));
  CHECK_EQ(m.files.at("context.onnx").bytes, int64_t(12));
  CHECK_THROWS(m.graph("nope"), "no graph \"nope\"");
  mh::verify_files(m);

  // An altered file, a missing file, another version, another format, a broken schedule, bad JSON.
  write_text(dir / "context.onnx", "context.onnY");
  CHECK_THROWS(mh::verify_files(m), "file context.onnx was altered (checksum mismatch)");
  fs::remove(dir / "context.onnx");
  CHECK_THROWS(mh::verify_files(m), "file context.onnx listed in the manifest is missing");
  const std::string v4 = replace_once(text, "\"format_version\": 3", "\"format_version\": 4");
  CHECK_THROWS(mh::load_manifest(fixture_bundle("v4", v4)),
               "bundle format version 4 is not supported (this host reads version 3)");
  const std::string map = replace_once(text, "\"context_map\": \"training\"", "\"context_map\": \"inference\"");
  CHECK_THROWS(mh::load_manifest(fixture_bundle("map", map)),
               "context_map: expected \"training\" or \"reference-pipeline\", found \"inference\"");
  const std::string other = replace_once(text, "\"format\": \"mindhier-rt-bundle\"", "\"format\": \"other\"");
  CHECK_THROWS(mh::load_manifest(fixture_bundle("other", other)), "expected format \"mindhier-rt-bundle\"");
  const std::string offsets = replace_once(text, "\"total_tokens\": 30", "\"total_tokens\": 31");
  CHECK_THROWS(mh::load_manifest(fixture_bundle("offsets", offsets)), "inconsistent schedule in the manifest");
  const std::string dtype = replace_once(text, "\"vocab_size\": 64", "\"vocab_size\": \"64\"");
  CHECK_THROWS(mh::load_manifest(fixture_bundle("types", dtype)), "config.vocab_size: expected a JSON number");
  const std::string broken = text.substr(0, 100);
  const fs::path broken_dir = temp_dir("broken");
  write_text(broken_dir / "manifest.json", broken);
  CHECK_THROWS(mh::load_manifest(broken_dir), "manifest.json: JSON error at byte");
  CHECK_THROWS(mh::load_manifest(broken_dir / "nowhere"), "not an engine bundle (no manifest.json)");
  for (const char* d : {"manifest", "v3", "other", "offsets", "types", "broken"}) {
    const std::string name = "mindhier_host_tests_" + std::string(d) + "_" + std::to_string(::getpid());
    fs::remove_all(fs::temp_directory_path() / name);
  }
}

// ---- the recorded decode plan (the manifest's `tensorrt` section, written by `mindhier-rt build`) ----------
static void test_exec_plan() {
  const std::string text = read_text(g_fixtures / "manifest_block_causal.json");
  const mh::Manifest m = mh::parse_manifest(mh::json::parse(text), g_fixtures);
  CHECK(m.tensorrt.has_value());
  if (!m.tensorrt) return;
  const mh::ExecPlan& p = *m.tensorrt;
  CHECK_EQ(p.step_graph, std::string("generator_step"));
  CHECK_EQ(p.self_cache, std::string("ping_pong"));
  CHECK_EQ(p.rows, int64_t(2));
  CHECK(p.guided && p.sample_rows == 1);
  const mh::GraphBindings& step = p.graph("generator_step");
  CHECK_EQ(step.profiles, size_t(4));
  const mh::TensorBinding& h = step.at("h");
  CHECK_EQ(h.buffer[0], std::string("context.start"));  // scale 0 reads the context step's output in place
  CHECK_EQ(h.buffer[1], std::string("step.h"));
  // ping-pong caches: present of scale i is the past of scale i + 1
  for (size_t i = 1; i < 4; ++i) {
    CHECK_EQ(step.at("past_key_values.1.key").buffer[i], step.at("present.1.key").buffer[i - 1]);
  }
  // cross.1.value [2, 2, 5, 32] float32: segment 1 of the context cache starts 2560 bytes in
  CHECK_EQ(step.at("cross.1.value").offsets[2], int64_t(2560));
  for (size_t i = 0; i < 4; ++i) CHECK_EQ(step.at("rope.cos").offsets[i] % mh::kPlanAlignment, int64_t(0));
  CHECK_EQ(p.graph("update_1").at("f_hat").buffer[0], p.graph("update_0").at("f_hat_next").buffer[0]);
  CHECK_EQ(p.graph("vq_decoder").at("f_hat").buffer[0], p.graph("update_3").at("f_hat_next").buffer[0]);
  CHECK_EQ(p.tables.size(), size_t(2));
  CHECK_EQ(p.tables[0].table, std::string("rope_cos"));
  CHECK_EQ(p.tables[0].layout[3][0], int64_t(14));  // scale 3's rows start at row 14 of the table
  CHECK(p.fills.empty());
  CHECK_THROWS(p.graph("encoder_subj09"), "no bindings for graph \"encoder_subj09\"");
  CHECK_THROWS(step.at("nope"), "binds no tensor \"nope\"");
  // what --print-plan prints reads back to the same plan
  const std::string json = mh::exec_plan_to_json(p);
  const mh::ExecPlan again = mh::parse_exec_plan(mh::Field{mh::json::parse(json), "tensorrt"});
  CHECK_EQ(mh::exec_plan_to_json(again), json);
  CHECK(mh::describe_exec_plan(p).find("ping_pong self cache") != std::string::npos);

  // The block-causal step with an in-place cache: one buffer for past and present, write indices filled once.
  const std::string kv_text = read_text(g_fixtures / "manifest_block_causal_kv.json");
  const mh::Manifest kv = mh::parse_manifest(mh::json::parse(kv_text), g_fixtures);
  const mh::ExecPlan& q = *kv.tensorrt;
  CHECK_EQ(q.step_graph, std::string("generator_step_kv"));
  CHECK(q.version_compatible);
  CHECK((kv.plans.at("context").flags == std::vector<std::string>{"version_compatible"}));
  const mh::GraphBindings& kstep = q.graph("generator_step_kv");
  for (size_t i = 0; i < 4; ++i) {
    CHECK_EQ(kstep.at("past_key_values.1.value").buffer[i], kstep.at("present.1.value").buffer[i]);
    CHECK((kstep.at("past_key_values.1.value").shapes[i] == std::vector<int64_t>{2, 2, 30, 32}));
  }
  CHECK_EQ(q.fills.size(), size_t(4));
  std::vector<int64_t> values;
  for (const mh::Fill& f : q.fills) values.push_back(f.value);
  CHECK((values == std::vector<int64_t>{0, 1, 5, 14}));
  CHECK_EQ(kstep.at("write_indices").offsets[1], q.fills[1].offset);
}

// ---- .npy ------------------------------------------------------------------------------------------
static std::vector<uint8_t> npy_bytes(const std::string& descr, const std::string& shape, const std::string& order,
                                      const std::vector<uint8_t>& payload) {
  std::string header = "{'descr': '" + descr + "', 'fortran_order': " + order + ", 'shape': " + shape + ", }";
  while ((10 + header.size() + 1) % 64) header += ' ';
  header += '\n';
  std::string file = "\x93NUMPY";
  file += char(1), file += char(0), file += char(header.size() & 0xFF), file += char(header.size() >> 8);
  file += header;
  file.append(payload.begin(), payload.end());
  return std::vector<uint8_t>(file.begin(), file.end());
}

template <typename T>
static std::vector<uint8_t> raw(const std::vector<T>& v) {
  std::vector<uint8_t> b(v.size() * sizeof(T));
  std::memcpy(b.data(), v.data(), b.size());
  return b;
}

static void test_npy() {
  const std::vector<float> f = {0.0f, 1.5f, -2.0f, 3.25f, 4.0f, 5.0f};
  const auto a = mh::parse_npy(npy_bytes("<f4", "(2, 3)", "False", raw(f)), "a.npy");
  CHECK((a.shape == std::vector<int64_t>{2, 3}));
  CHECK(a.to_float32() == f);
  CHECK_THROWS(a.to_int64(), "expected an int64");
  const std::vector<int64_t> i = {-1, 0, 1LL << 40};
  const auto b = mh::parse_npy(npy_bytes("<i8", "(3,)", "False", raw(i)), "b.npy");
  CHECK((b.shape == std::vector<int64_t>{3}));
  CHECK(b.to_int64() == i);
  const auto scalar = mh::parse_npy(npy_bytes("<f4", "()", "False", raw(std::vector<float>{7.0f})), "s.npy");
  CHECK(scalar.shape.empty() && scalar.size() == 1);
  CHECK_THROWS(mh::parse_npy(npy_bytes(">f4", "(6,)", "False", raw(f)), "c.npy"),
               "c.npy: dtype '>f4' is not supported");
  CHECK_THROWS(mh::parse_npy(npy_bytes("<f4", "(2, 3)", "True", raw(f)), "d.npy"), "Fortran-order");
  CHECK_THROWS(mh::parse_npy(npy_bytes("<f4", "(2, 4)", "False", raw(f)), "e.npy"), "expected 32 data bytes");
  CHECK_THROWS(mh::parse_npy({1, 2, 3}, "f.npy"), "not a .npy file");
  // A file written by the fixture-free path: read_npy_float32 checks the rank.
  const fs::path dir = temp_dir("npy");
  const auto bytes = npy_bytes("<f4", "(2, 3)", "False", raw(f));
  std::ofstream(dir / "v.npy", std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()), long(bytes.size()));
  CHECK(mh::read_npy_float32(dir / "v.npy", 2).to_float32() == f);
  CHECK_THROWS(mh::read_npy_float32(dir / "v.npy", 3), "expected a float32 array with 3 dimensions");
  CHECK_THROWS(mh::read_npy(dir / "missing.npy"), "cannot open");
  fs::remove_all(dir);
}

// ---- float16 and images ---------------------------------------------------------------------------
static void test_dtype_and_image() {
  CHECK_EQ(mh::float_to_half(1.0f), uint16_t(0x3C00));
  CHECK_EQ(mh::float_to_half(-2.0f), uint16_t(0xC000));
  CHECK_EQ(mh::float_to_half(65504.0f), uint16_t(0x7BFF));
  CHECK_EQ(mh::float_to_half(65520.0f), uint16_t(0x7C00));               // rounds up to inf
  CHECK_EQ(mh::float_to_half(std::ldexp(1.0f, -24)), uint16_t(0x0001));  // smallest subnormal
  CHECK_EQ(mh::float_to_half(std::ldexp(1.0f, -25)), uint16_t(0x0000));  // halfway: to even (0)
  CHECK_EQ(mh::float_to_half(1.0f + std::ldexp(1.0f, -11)), uint16_t(0x3C00));  // halfway: to even
  CHECK_EQ(mh::float_to_half(1.0f + 3 * std::ldexp(1.0f, -11)), uint16_t(0x3C02));
  bool round_trip = true;  // every finite half survives half -> float -> half
  for (uint32_t h = 0; h < 0x10000; ++h) {
    if ((h & 0x7C00) == 0x7C00) continue;
    round_trip = round_trip && mh::float_to_half(mh::half_to_float(uint16_t(h))) == h;
  }
  CHECK(round_trip);
  CHECK_EQ(mh::half_to_float(0x0001), std::ldexp(1.0f, -24));
  CHECK(std::isinf(mh::half_to_float(0x7C00)) && std::isnan(mh::half_to_float(0x7E00)));
  CHECK_EQ(mh::element_size("float16"), size_t(2));
  CHECK_THROWS(mh::element_size("bfloat16"), "unsupported tensor dtype");

  // 1 x 2 image: channel planes; 0.5 * 255 = 127.5 rounds to even (128), NaN -> 0, clamp.
  const float chw[6] = {0.5f, NAN, 1.5f, -1.0f, 0.2f, 1.0f};
  const auto rgb = mh::to_rgb8(chw, 1, 2);
  CHECK((rgb == std::vector<uint8_t>{128, 255, 51, 0, 0, 255}));
  const fs::path dir = temp_dir("image");
  mh::write_image(dir / "x.ppm", chw, 1, 2);
  const std::string ppm = read_text(dir / "x.ppm");
  CHECK_EQ(ppm.substr(0, 11), std::string("P6\n2 1\n255\n"));
  CHECK_EQ(ppm.size(), size_t(11 + 6));
  if (mh::png_supported()) {
    mh::write_image(dir / "x.png", chw, 1, 2);
    CHECK_EQ(read_text(dir / "x.png").substr(1, 3), std::string("PNG"));
  } else {
    CHECK_THROWS(mh::write_image(dir / "x.png", chw, 1, 2), "without libpng");
  }
  CHECK_THROWS(mh::write_image(dir / "x.jpg", chw, 1, 2), "expected a .ppm or .png");
  fs::remove_all(dir);
}

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: host_tests FIXTURES_DIR" << std::endl;
    return 2;
  }
  g_fixtures = argv[1];
  const std::vector<std::pair<const char*, std::function<void()>>> tests = {
      {"json", test_json},         {"sha256", test_sha256}, {"sampling", test_sampling},
      {"schedule", test_schedule}, {"manifest", test_manifest}, {"exec_plan", test_exec_plan},
      {"npy", test_npy},           {"dtype_and_image", test_dtype_and_image},
  };
  for (const auto& [name, fn] : tests) {
    const int before = g_failures;
    try {
      fn();
    } catch (const std::exception& e) {
      ++g_failures;
      std::cerr << name << ": unexpected exception: " << e.what() << std::endl;
    }
    std::cout << (g_failures == before ? "ok   " : "FAIL ") << name << std::endl;
  }
  std::cout << g_checks << " checks, " << g_failures << " failures" << std::endl;
  return g_failures == 0 ? 0 : 1;
}
