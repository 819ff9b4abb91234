#include "npy.hpp"

#include <cstring>
#include <fstream>
#include <limits>

#include "error.hpp"

namespace mh {

namespace {

bool host_is_little_endian() {
  const uint16_t one = 1;
  uint8_t first;
  std::memcpy(&first, &one, 1);
  return first == 1;
}

// The header is a Python dict literal, e.g. {'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }.
// np.save always writes these three keys in this form; anything else is refused, not guessed at.
std::string dict_value(const std::string& header, const std::string& key, const std::string& what) {
  const std::string quoted = "'" + key + "':";
  const size_t at = header.find(quoted);
  if (at == std::string::npos) throw HostError(what + ": .npy header has no '" + key + "' entry");
  size_t p = at + quoted.size();
  while (p < header.size() && header[p] == ' ') ++p;
  size_t end = p;
  if (p < header.size() && header[p] == '(') {
    end = header.find(')', p);
    if (end == std::string::npos) throw HostError(what + ": unterminated shape in the .npy header");
    return header.substr(p, end + 1 - p);
  }
  if (p < header.size() && header[p] == '\'') {
    end = header.find('\'', p + 1);
    if (end == std::string::npos) throw HostError(what + ": unterminated string in the .npy header");
    return header.substr(p + 1, end - p - 1);
  }
  while (end < header.size() && header[end] != ',' && header[end] != '}') ++end;
  return header.substr(p, end - p);
}

std::vector<int64_t> parse_shape(const std::string& tuple, const std::string& what) {
  if (tuple.size() < 2 || tuple.front() != '(' || tuple.back() != ')') {
    throw HostError(what + ": bad shape " + tuple + " in the .npy header");
  }
  std::vector<int64_t> shape;  // "(3, 4)", "(5,)" or "()"
  size_t p = 1;
  while (p < tuple.size() - 1) {
    while (p < tuple.size() && (tuple[p] == ' ' || tuple[p] == ',')) ++p;
    if (p >= tuple.size() - 1) break;
    size_t end = p;
    int64_t v = 0;
    while (end < tuple.size() && tuple[end] >= '0' && tuple[end] <= '9') {
      if (v > (std::numeric_limits<int64_t>::max() - 9) / 10) throw HostError(what + ": .npy shape too large");
      v = v * 10 + (tuple[end] - '0');
      ++end;
    }
    if (end == p) throw HostError(what + ": bad shape " + tuple + " in the .npy header");
    shape.push_back(v);
    p = end;
  }
  return shape;
}

}  // namespace

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

int64_t NpyArray::size() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::vector<float> NpyArray::to_float32() const {
  if (descr != "<f4") throw HostError("expected a float32 ('<f4') array, found '" + descr + "'");
  std::vector<float> out(static_cast<size_t>(size()));
  std::memcpy(out.data(), data.data(), out.size() * sizeof(float));
  return out;
}

std::vector<int64_t> NpyArray::to_int64() const {
  if (descr != "<i8") throw HostError("expected an int64 ('<i8') array, found '" + descr + "'");
  std::vector<int64_t> out(static_cast<size_t>(size()));
  std::memcpy(out.data(), data.data(), out.size() * sizeof(int64_t));
  return out;
}

std::vector<uint8_t> read_file_bytes(const std::filesystem::path& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw HostError("cannot open " + path.string());
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (f.bad()) throw HostError("error reading " + path.string());
  return bytes;
}

NpyArray parse_npy(const std::vector<uint8_t>& bytes, const std::string& what) {
  static const uint8_t magic[6] = {0x93, 'N', 'U', 'M', 'P', 'Y'};
  if (bytes.size() < 10 || std::memcmp(bytes.data(), magic, 6) != 0) throw HostError(what + ": not a .npy file");
  const uint8_t major = bytes[6];
  size_t header_len = 0, header_start = 0;
  if (major == 1) {
    header_len = size_t(bytes[8]) | (size_t(bytes[9]) << 8);
    header_start = 10;
  } else if (major == 2 || major == 3) {
    if (bytes.size() < 12) throw HostError(what + ": truncated .npy header");
    header_len = size_t(bytes[8]) | (size_t(bytes[9]) << 8) | (size_t(bytes[10]) << 16) | (size_t(bytes[11]) << 24);
    header_start = 12;
  } else {
    throw HostError(what + ": unsupported .npy format version " + std::to_string(major));
  }
  if (bytes.size() < header_start + header_len) throw HostError(what + ": truncated .npy header");
  const std::string header(bytes.begin() + long(header_start), bytes.begin() + long(header_start + header_len));

  NpyArray a;
  a.descr = dict_value(header, "descr", what);
  if (a.descr != "<f4" && a.descr != "<i8") {
    throw HostError(what + ": dtype '" + a.descr + "' is not supported (expected '<f4' float32 or '<i8' int64)");
  }
  if (dict_value(header, "fortran_order", what) != "False") {
    throw HostError(what + ": Fortran-order arrays are not supported (save a C-order array)");
  }
  a.shape = parse_shape(dict_value(header, "shape", what), what);
  int64_t count = 1;
  for (int64_t d : a.shape) {
    if (d != 0 && count > (int64_t(1) << 40) / d) {
      throw HostError(what + ": shape " + shape_str(a.shape) + " too large");
    }
    count *= d;
  }
  if (!host_is_little_endian()) throw HostError("this host is big-endian; .npy reading supports little-endian only");
  const size_t payload = size_t(a.size()) * (a.descr == "<f4" ? 4 : 8);
  const size_t start = header_start + header_len;
  if (bytes.size() != start + payload) {
    throw HostError(what + ": expected " + std::to_string(payload) + " data bytes for shape " + shape_str(a.shape) +
                    ", found " + std::to_string(bytes.size() - start));
  }
  a.data.assign(bytes.begin() + long(start), bytes.end());
  return a;
}

NpyArray read_npy(const std::filesystem::path& path) { return parse_npy(read_file_bytes(path), path.string()); }

NpyArray read_npy_float32(const std::filesystem::path& path, size_t ndim) {
  NpyArray a = read_npy(path);
  if (a.descr != "<f4" || a.shape.size() != ndim) {
    throw HostError(path.string() + ": expected a float32 array with " + std::to_string(ndim) +
                    " dimensions, found '" + a.descr + "' of shape " + shape_str(a.shape));
  }
  return a;
}

}  // namespace mh
