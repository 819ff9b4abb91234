#include "dtype.hpp"

#include <cstring>

#include "error.hpp"

namespace mh {

size_t element_size(const std::string& dtype) {
  if (dtype == "float32" || dtype == "int32") return 4;
  if (dtype == "float16") return 2;
  if (dtype == "int64") return 8;
  throw HostError("unsupported tensor dtype \"" + dtype + "\" (expected float32, float16, int64 or int32)");
}

uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t mant = x & 0x7FFFFFu;
  const int32_t exp = int32_t((x >> 23) & 0xFFu);
  if (exp == 0xFF) return uint16_t(sign | 0x7C00u | (mant ? 0x200u : 0u));  // inf, NaN (quiet)
  const int32_t e = exp - 127 + 15;
  if (e >= 0x1F) return uint16_t(sign | 0x7C00u);  // overflow -> inf
  if (e <= 0) {  // half subnormal (or zero): value = (1.mant) * 2^(exp - 127) = m * 2^-24
    if (e < -10) return uint16_t(sign);
    mant |= 0x800000u;
    const int shift = 14 - e;
    uint32_t half_mant = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u), halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (half_mant & 1u))) ++half_mant;  // may carry into the exponent: right
    return uint16_t(sign | half_mant);
  }
  uint32_t half = sign | (uint32_t(e) << 10) | (mant >> 13);
  const uint32_t rem = mant & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (half & 1u))) ++half;  // a carry may round up to inf: right
  return uint16_t(half);
}

float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  uint32_t x;
  if (exp == 0 && mant == 0) {
    x = sign;
  } else if (exp == 0) {  // subnormal: normalise
    uint32_t shifts = 0;
    while (!(mant & 0x400u)) {
      mant <<= 1;
      ++shifts;
    }
    x = sign | ((113u - shifts) << 23) | ((mant & 0x3FFu) << 13);
  } else if (exp == 0x1F) {
    x = sign | 0x7F800000u | (mant << 13);
  } else {
    x = sign | ((exp + 112u) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

void floats_to_dtype(const float* src, void* dst, int64_t n, const std::string& dtype) {
  if (dtype == "float32") {
    std::memcpy(dst, src, size_t(n) * 4);
  } else if (dtype == "float16") {
    auto* out = static_cast<uint16_t*>(dst);
    for (int64_t k = 0; k < n; ++k) out[k] = float_to_half(src[k]);
  } else {
    throw HostError("cannot convert floats to a " + dtype + " tensor");
  }
}

void dtype_to_floats(const void* src, float* dst, int64_t n, const std::string& dtype) {
  if (dtype == "float32") {
    std::memcpy(dst, src, size_t(n) * 4);
  } else if (dtype == "float16") {
    const auto* in = static_cast<const uint16_t*>(src);
    for (int64_t k = 0; k < n; ++k) dst[k] = half_to_float(in[k]);
  } else {
    throw HostError("cannot read a " + dtype + " tensor as floats");
  }
}

}  // namespace mh
