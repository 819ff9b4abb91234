#include "image.hpp"

#include <cmath>
#include <cstring>
#include <fstream>
#include <string>

#include "error.hpp"

#ifdef MINDHIER_HAVE_PNG
#include <png.h>
#endif

namespace mh {

namespace {

std::filesystem::path temp_path(const std::filesystem::path& path) {
  return path.parent_path() / ("." + path.filename().string() + ".tmp");
}

void commit(const std::filesystem::path& tmp, const std::filesystem::path& path) {
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::filesystem::remove(tmp, ec);
    throw HostError("cannot write " + path.string());
  }
}

}  // namespace

bool png_supported() {
#ifdef MINDHIER_HAVE_PNG
  return true;
#else
  return false;
#endif
}

std::vector<uint8_t> to_rgb8(const float* chw, int64_t H, int64_t W) {
  std::vector<uint8_t> rgb(static_cast<size_t>(H * W * 3));
  for (int64_t c = 0; c < 3; ++c) {
    for (int64_t y = 0; y < H; ++y) {
      for (int64_t x = 0; x < W; ++x) {
        float v = chw[(c * H + y) * W + x];
        v = std::isnan(v) ? 0.0f : std::fmin(std::fmax(v, 0.0f), 1.0f);
        rgb[size_t((y * W + x) * 3 + c)] = uint8_t(std::nearbyint(v * 255.0f));  // default mode: half to even
      }
    }
  }
  return rgb;
}

void write_ppm(const std::filesystem::path& path, const std::vector<uint8_t>& rgb, int64_t H, int64_t W) {
  const std::filesystem::path tmp = temp_path(path);
  {
    std::ofstream f(tmp, std::ios::binary);
    if (!f) throw HostError("cannot write " + path.string());
    f << "P6\n" << W << " " << H << "\n255\n";
    f.write(reinterpret_cast<const char*>(rgb.data()), std::streamsize(rgb.size()));
    if (!f) throw HostError("cannot write " + path.string());
  }
  commit(tmp, path);
}

void write_png(const std::filesystem::path& path, const std::vector<uint8_t>& rgb, int64_t H, int64_t W) {
#ifdef MINDHIER_HAVE_PNG
  const std::filesystem::path tmp = temp_path(path);
  png_image image;
  std::memset(&image, 0, sizeof image);
  image.version = PNG_IMAGE_VERSION;
  image.width = png_uint_32(W);
  image.height = png_uint_32(H);
  image.format = PNG_FORMAT_RGB;
  if (!png_image_write_to_file(&image, tmp.c_str(), 0, rgb.data(), 0, nullptr)) {
    const std::string why = image.message;
    png_image_free(&image);
    throw HostError("cannot write " + path.string() + ": " + why);
  }
  commit(tmp, path);
#else
  (void)rgb, (void)H, (void)W;
  throw HostError("cannot write " + path.string() + ": this host was built without libpng; write a .ppm");
#endif
}

void write_image(const std::filesystem::path& path, const float* chw, int64_t H, int64_t W) {
  const std::string ext = path.extension().string();
  if (ext == ".ppm") return write_ppm(path, to_rgb8(chw, H, W), H, W);
  if (ext == ".png") return write_png(path, to_rgb8(chw, H, W), H, W);
  throw HostError("output " + path.string() + ": expected a .ppm or .png file name");
}

}  // namespace mh
