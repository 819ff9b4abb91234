#include "pipe_device.hpp"

#include <cstring>
#include <sstream>

#include "error.hpp"
#include "npy.hpp"

namespace mh {

PipeDevice::PipeDevice(int read_fd, int write_fd) : in_(fdopen(read_fd, "rb")), out_(fdopen(write_fd, "wb")) {
  if (in_ == nullptr || out_ == nullptr) throw HostError("--engine-pipe: cannot open the file descriptors");
}

PipeDevice::~PipeDevice() {
  std::fputs("done\n", out_);
  std::fclose(out_);
  std::fclose(in_);
}

uint8_t* PipeDevice::at(const std::string& buffer, int64_t offset, int64_t bytes) {
  auto it = buffers_.find(buffer);
  if (it == buffers_.end()) throw HostError("no buffer " + buffer);
  if (offset < 0 || bytes < 0 || bytes > int64_t(it->second.size()) - offset) {
    throw HostError("buffer " + buffer + ": " + std::to_string(bytes) + " bytes at " + std::to_string(offset) +
                    " are outside its " + std::to_string(it->second.size()) + " bytes");
  }
  return it->second.data() + offset;
}

void PipeDevice::allocate(const std::string& buffer, int64_t bytes) { buffers_[buffer].assign(size_t(bytes), 0); }

void PipeDevice::write(const std::string& buffer, int64_t offset, const void* src, int64_t bytes) {
  std::memcpy(at(buffer, offset, bytes), src, size_t(bytes));
}

void PipeDevice::read(const std::string& buffer, int64_t offset, void* dst, int64_t bytes) {
  std::memcpy(dst, at(buffer, offset, bytes), size_t(bytes));
}

void PipeDevice::copy(const std::string& dst, int64_t dst_offset, const std::string& src, int64_t src_offset,
                      int64_t bytes) {
  std::memmove(at(dst, dst_offset, bytes), at(src, src_offset, bytes), size_t(bytes));
}

namespace {

std::string read_line(std::FILE* f) {
  std::string line;
  for (int c = std::fgetc(f); c != '\n'; c = std::fgetc(f)) {
    if (c == EOF) throw HostError("--engine-pipe: the engine process closed the pipe");
    line += char(c);
    if (line.size() > 4096) throw HostError("--engine-pipe: header line too long");
  }
  return line;
}

}  // namespace

void PipeDevice::run(const GraphBindings& g, size_t profile,
                     const std::map<std::string, std::vector<int64_t>>& shapes) {
  std::vector<const TensorBinding*> inputs;
  for (const TensorBinding& b : g.tensors) {
    if (b.input) inputs.push_back(&b);
  }
  std::fprintf(out_, "run %s %zu %zu\n", g.graph.c_str(), profile, inputs.size());
  for (const TensorBinding* b : inputs) {
    auto it = shapes.find(b->name);
    const std::vector<int64_t>& want = b->shapes[profile];
    const std::vector<int64_t>& shape = it == shapes.end() ? want : it->second;
    bool fits = shape.size() == want.size();
    for (size_t a = 0; fits && a < shape.size(); ++a) {
      fits = a == 0 ? (shape[a] >= 0 && shape[a] <= want[a]) : shape[a] == want[a];
    }
    if (!fits) {
      throw HostError(g.graph + " input " + b->name + " " + shape_str(shape) + " does not fit " + shape_str(want));
    }
    int64_t bytes = b->nbytes(profile);
    if (!want.empty() && want[0] > 0) bytes = bytes / want[0] * shape[0];
    std::fprintf(out_, "%s %s %zu", b->name.c_str(), b->dtype.c_str(), shape.size());
    for (int64_t d : shape) std::fprintf(out_, " %lld", static_cast<long long>(d));
    std::fputc('\n', out_);
    std::fwrite(at(b->buffer[profile], b->offsets[profile], bytes), 1, size_t(bytes), out_);
  }
  std::fflush(out_);
  std::istringstream head(read_line(in_));
  std::string word;
  size_t count = 0;
  if (!(head >> word >> count) || word != "outputs") throw HostError("--engine-pipe: expected \"outputs N\"");
  for (size_t k = 0; k < count; ++k) {
    std::istringstream h(read_line(in_));
    std::string name, dtype;
    size_t ndim = 0;
    h >> name >> dtype >> ndim;
    const TensorBinding* b = g.find(name);
    if (b == nullptr || b->input || b->dtype != dtype || ndim != b->shapes[profile].size()) {
      throw HostError("--engine-pipe: " + g.graph + " has no output " + name + " " + dtype + " of rank " +
                      std::to_string(ndim));
    }
    std::vector<int64_t> shape(ndim);
    for (int64_t& d : shape) h >> d;
    const std::vector<int64_t>& want = b->shapes[profile];
    bool ok = bool(h);
    for (size_t a = 0; ok && a < ndim; ++a) ok = a == 0 ? (shape[a] >= 0 && shape[a] <= want[a]) : shape[a] == want[a];
    if (!ok) {
      throw HostError("--engine-pipe: " + g.graph + " output " + name + " " + shape_str(shape) + " does not fit " +
                      shape_str(want));
    }
    int64_t bytes = b->nbytes(profile);
    if (ndim > 0 && want[0] > 0) bytes = bytes / want[0] * shape[0];
    if (std::fread(at(b->buffer[profile], b->offsets[profile], bytes), 1, size_t(bytes), in_) != size_t(bytes)) {
      throw HostError("--engine-pipe: short read of " + g.graph + " output " + name);
    }
  }
}

}  // namespace mh
