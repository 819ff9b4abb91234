// Writing decoded images: binary PPM (P6) always, PNG when the build found libpng (MINDHIER_HAVE_PNG).
// Pixels are converted as mindhier_rt/io.py does: NaN -> 0, clamp to [0, 1], then
// round-half-to-even(x * 255) in float32. Files are written to a temporary name and renamed.
#pragma once

#include <cstdint>
#include <filesystem>
#include <vector>

namespace mh {

bool png_supported();

// [3, H, W] floats in [0, 1] -> H x W x 3 bytes.
std::vector<uint8_t> to_rgb8(const float* chw, int64_t H, int64_t W);

void write_ppm(const std::filesystem::path& path, const std::vector<uint8_t>& rgb, int64_t H, int64_t W);
void write_png(const std::filesystem::path& path, const std::vector<uint8_t>& rgb, int64_t H, int64_t W);
// By extension: .ppm or .png (throws HostError for others, or for .png without libpng).
void write_image(const std::filesystem::path& path, const float* chw, int64_t H, int64_t W);

}  // namespace mh
