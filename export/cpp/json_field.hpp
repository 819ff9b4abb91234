// A JSON value with its key path ("tensorrt.bindings.context[2].offsets"), for readers that check a document
// field by field and say where each error is (the manifest, the TensorRT plan section).
#pragma once

#include <string>
#include <vector>

#include "error.hpp"
#include "json.hpp"

namespace mh {

struct Field {
  const json::Value& v;
  std::string path;

  template <typename F>
  auto typed(F f) const -> decltype(f(v)) {
    try {
      return f(v);
    } catch (const HostError& e) {
      throw HostError(path + ": " + e.what());
    }
  }
  Field operator[](const std::string& key) const {
    const json::Value* child = typed([&](const json::Value& x) { return x.find(key); });
    if (child == nullptr) throw HostError("missing key " + join(key));
    return {*child, join(key)};
  }
  const json::Value* find(const std::string& key) const {
    return typed([&](const json::Value& x) { return x.find(key); });
  }
  Field at(size_t i) const { return {as_array()[i], path + "[" + std::to_string(i) + "]"}; }
  std::string join(const std::string& key) const { return path.empty() ? key : path + "." + key; }

  int64_t i64() const { return typed([](const json::Value& x) { return x.as_int(); }); }
  uint64_t u64() const { return typed([](const json::Value& x) { return x.as_uint(); }); }
  double f64() const { return typed([](const json::Value& x) { return x.as_double(); }); }
  bool boolean() const { return typed([](const json::Value& x) { return x.as_bool(); }); }
  const std::string& str() const {
    return typed([](const json::Value& x) -> const std::string& { return x.as_string(); });
  }
  const json::Array& as_array() const {
    return typed([](const json::Value& x) -> const json::Array& { return x.as_array(); });
  }
  const json::Object& as_object() const {
    return typed([](const json::Value& x) -> const json::Object& { return x.as_object(); });
  }
  std::vector<int64_t> ints() const {
    std::vector<int64_t> out;
    for (size_t i = 0; i < as_array().size(); ++i) out.push_back(at(i).i64());
    return out;
  }
};

}  // namespace mh
