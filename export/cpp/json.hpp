// A minimal, strict JSON reader (RFC 8259): objects, arrays, strings with escapes, numbers, true, false,
// null. No extensions: NaN / Infinity, comments, trailing commas and duplicate keys are errors, and every
// error names the byte offset where it was found.
//
// Numbers keep their source text, so 64-bit integers (seeds up to 2^64 - 1) are read exactly, not
// through a double.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "error.hpp"

namespace mh::json {

class Value;
using Array = std::vector<Value>;
using Object = std::map<std::string, Value>;

enum class Type { Null, Bool, Number, String, Array, Object };

const char* type_name(Type t);

class Value {
 public:
  Value() = default;  // null
  static Value boolean(bool b);
  static Value number(std::string text);  // text must already be a valid JSON number
  static Value string(std::string s);
  static Value array(Array a);
  static Value object(Object o);

  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::Null; }

  // Typed access; a wrong type throws HostError naming the expected and found types.
  bool as_bool() const;
  double as_double() const;
  int64_t as_int() const;     // an integer literal (no fraction or exponent) that fits int64
  uint64_t as_uint() const;   // a non-negative integer literal that fits uint64
  const std::string& as_string() const;
  const Array& as_array() const;
  const Object& as_object() const;
  const std::string& number_text() const;

  // Object members: `at` throws when the key is missing, `find` returns nullptr.
  const Value& at(const std::string& key) const;
  const Value* find(const std::string& key) const;

 private:
  void expect(Type t) const;
  Type type_ = Type::Null;
  bool bool_ = false;
  std::string text_;  // string value, or the source text of a number
  std::shared_ptr<Array> array_;
  std::shared_ptr<Object> object_;
};

// Parse a whole document; throws HostError("JSON error at byte N: ...").
Value parse(std::string_view text);

}  // namespace mh::json
