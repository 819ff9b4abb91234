// Executing the recorded decode plan (exec_plan.hpp): the decode loop of mindhier_rt/pipeline.py on a device
// whose buffers, bindings and tables are exactly the plan's. The device only allocates, copies and runs one
// graph with one optimization profile (trt_runner.cpp: TensorRT; pipe_device.cpp: host memory with the
// graphs run by another process, which is how tests/test_cpp_host.py checks this loop without a GPU).
//
// Rows as the Python TensorRT backend: R = scans x samples conditional rows, scan-major, then (while
// guided) R unconditional rows; every call runs at the rows the plans were built for and the rows past the
// decode's are computed and ignored (rows are independent). Once guidance stops the unconditional rows are
// still computed, and only the first R rows of the logits are sampled.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "exec_plan.hpp"
#include "manifest.hpp"
#include "sampling.hpp"

namespace mh {

class Device {
 public:
  virtual ~Device() = default;
  virtual void allocate(const std::string& buffer, int64_t bytes) = 0;  // zero-filled
  virtual void write(const std::string& buffer, int64_t offset, const void* src, int64_t bytes) = 0;
  virtual void read(const std::string& buffer, int64_t offset, void* dst, int64_t bytes) = 0;
  virtual void copy(const std::string& dst, int64_t dst_offset, const std::string& src, int64_t src_offset,
                    int64_t bytes) = 0;
  // Run `graph` with `profile`; `shapes`: inputs whose shape differs from the recorded one (the encoder's rows).
  virtual void run(const GraphBindings& graph, size_t profile,
                   const std::map<std::string, std::vector<int64_t>>& shapes) = 0;
};

struct DecodeRequest {
  std::string subject;
  std::vector<float> voxels;  // [scans, V], row n is scan scan_ids[n]
  int64_t scans = 0, samples = 1;
  std::vector<uint32_t> scan_ids;  // default 0..scans-1
  SamplingConfig sampling;
};

struct DecodeResult {
  std::vector<float> images;                 // [R, 3, H, W] in [0, 1]
  std::vector<int64_t> image_shape;          // {R, 3, H, W}
  std::vector<std::vector<int64_t>> tokens;  // per scale, [R, l] row-major
  std::vector<uint32_t> row_scan, row_sample;
};

class PlanExecutor {
 public:
  // Allocates the plan's buffers on `device` and places its tables and fills (the manifest must have plans).
  PlanExecutor(const Manifest& m, Device& device);
  DecodeResult decode(const DecodeRequest& request);

 private:
  void copy_rows(const TensorBinding& dst, size_t dst_profile, int64_t dst_row, const TensorBinding& src,
                 size_t src_profile, int64_t rows);
  const Manifest& m_;
  const ExecPlan& p_;
  Device& d_;
};

}  // namespace mh
