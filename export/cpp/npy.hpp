// Reading NumPy .npy files (format versions 1.0, 2.0 and 3.0): little-endian float32 ('<f4') and int64
// ('<i8') arrays in C order, as written by np.save for the bundle's rope tables and for voxel inputs.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace mh {

struct NpyArray {
  std::string descr;           // '<f4' or '<i8'
  std::vector<int64_t> shape;  // () for a scalar
  std::vector<uint8_t> data;   // C-order payload, little-endian

  int64_t size() const;  // number of elements
  std::vector<float> to_float32() const;    // requires descr '<f4'
  std::vector<int64_t> to_int64() const;    // requires descr '<i8'
};

NpyArray parse_npy(const std::vector<uint8_t>& bytes, const std::string& what);  // `what` names it in errors
NpyArray read_npy(const std::filesystem::path& path);
std::vector<uint8_t> read_file_bytes(const std::filesystem::path& path);

// A float32 array of exactly `ndim` dimensions (errors name the file and the found shape).
NpyArray read_npy_float32(const std::filesystem::path& path, size_t ndim);

std::string shape_str(const std::vector<int64_t>& shape);  // "[2, 3]"

}  // namespace mh
