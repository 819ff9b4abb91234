// Element types of graph tensors as the manifest names them, and the float16 conversions the host needs
// for half-precision bundles (IEEE binary16, round to nearest even).
#pragma once

#include <cstdint>
#include <string>

namespace mh {

size_t element_size(const std::string& dtype);  // float32 4, float16 2, int64 8, int32 4; throws otherwise
uint16_t float_to_half(float f);
float half_to_float(uint16_t h);

// Convert n values between float32 and a tensor dtype ("float32" or "float16").
void floats_to_dtype(const float* src, void* dst, int64_t n, const std::string& dtype);
void dtype_to_floats(const void* src, float* dst, int64_t n, const std::string& dtype);

}  // namespace mh
