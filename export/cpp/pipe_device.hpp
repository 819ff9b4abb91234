// A Device (decode.hpp) on host memory whose graphs are run by another process over two file descriptors:
// how tests/test_cpp_host.py executes the host's decode loop with onnxruntime, without TensorRT or a GPU.
//
// Protocol, per graph call: the host writes "run GRAPH PROFILE N_INPUTS\n", then per input
// "NAME DTYPE NDIM D0 D1 ...\n" and its raw little-endian bytes; the other side answers "outputs N\n" and per
// output the same header and bytes. Each output must be an output of the graph, of its dtype, with its
// recorded shape (the first axis may be shorter: the encoder's rows). The host writes "done\n" at the end.
#pragma once

#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "decode.hpp"

namespace mh {

class PipeDevice : public Device {
 public:
  PipeDevice(int read_fd, int write_fd);
  ~PipeDevice() override;
  void allocate(const std::string& buffer, int64_t bytes) override;
  void write(const std::string& buffer, int64_t offset, const void* src, int64_t bytes) override;
  void read(const std::string& buffer, int64_t offset, void* dst, int64_t bytes) override;
  void copy(const std::string& dst, int64_t dst_offset, const std::string& src, int64_t src_offset,
            int64_t bytes) override;
  void run(const GraphBindings& graph, size_t profile,
           const std::map<std::string, std::vector<int64_t>>& shapes) override;

 private:
  uint8_t* at(const std::string& buffer, int64_t offset, int64_t bytes);
  std::map<std::string, std::vector<uint8_t>> buffers_;
  std::FILE* in_ = nullptr;
  std::FILE* out_ = nullptr;
};

}  // namespace mh
