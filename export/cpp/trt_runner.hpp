// The TensorRT device (compiled only where TensorRT and CUDA are found): the plan's buffers in device
// memory, one engine per graph the plan binds (deserialized from the manifest's `plans`), and a graph call as
// `setOptimizationProfileAsync` + `setInputShape` + `setTensorAddress` per tensor (at the recorded buffer and
// byte offset) + `enqueueV3`, all on one CUDA stream. Plans flagged "version_compatible" are loaded with
// `setEngineHostCodeAllowed(true)`. The decode loop that drives it is decode.cpp, shared with the CPU tests.
#pragma once

#include <memory>

#include "decode.hpp"
#include "manifest.hpp"

namespace mh {

class TrtDevice : public Device {
 public:
  TrtDevice(const Manifest& m, int device = 0);
  ~TrtDevice() override;
  TrtDevice(const TrtDevice&) = delete;
  TrtDevice& operator=(const TrtDevice&) = delete;

  void allocate(const std::string& buffer, int64_t bytes) override;
  void write(const std::string& buffer, int64_t offset, const void* src, int64_t bytes) override;
  void read(const std::string& buffer, int64_t offset, void* dst, int64_t bytes) override;
  void copy(const std::string& dst, int64_t dst_offset, const std::string& src, int64_t src_offset,
            int64_t bytes) override;
  void run(const GraphBindings& graph, size_t profile,
           const std::map<std::string, std::vector<int64_t>>& shapes) override;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace mh
