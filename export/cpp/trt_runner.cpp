#include "trt_runner.hpp"

#include <NvInfer.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <iostream>
#include <map>
#include <string>

#include "error.hpp"
#include "npy.hpp"

namespace mh {

namespace {

void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw HostError(std::string("CUDA error in ") + what + ": " + cudaGetErrorString(status));
}
#define CUDA_CHECK(call) check_cuda((call), #call)

// Prints TensorRT's warnings and errors and keeps the last error, so exceptions can quote it.
class Logger : public nvinfer1::ILogger {
 public:
  void log(Severity severity, const char* msg) noexcept override {
    if (severity <= Severity::kERROR) last_error = msg;
    if (severity <= Severity::kWARNING) std::cerr << "TensorRT: " << msg << "\n";
  }
  std::string last_error;
};

std::string dtype_name(nvinfer1::DataType t) {
  switch (t) {
    case nvinfer1::DataType::kFLOAT: return "float32";
    case nvinfer1::DataType::kHALF: return "float16";
    case nvinfer1::DataType::kINT64: return "int64";
    case nvinfer1::DataType::kINT32: return "int32";
    case nvinfer1::DataType::kBF16: return "bfloat16";
    case nvinfer1::DataType::kBOOL: return "bool";
    case nvinfer1::DataType::kUINT8: return "uint8";
    default: return "another type";
  }
}

nvinfer1::Dims to_dims(const std::vector<int64_t>& shape) {
  nvinfer1::Dims d{};
  if (shape.size() > size_t(nvinfer1::Dims::MAX_DIMS)) {
    throw HostError("tensor rank of " + shape_str(shape) + " is too large for TensorRT");
  }
  d.nbDims = int32_t(shape.size());
  for (size_t a = 0; a < shape.size(); ++a) d.d[a] = shape[a];
  return d;
}

struct Engine {
  std::unique_ptr<nvinfer1::ICudaEngine> engine;
  std::unique_ptr<nvinfer1::IExecutionContext> context;  // destroyed before its engine
  int profile = 0;                                        // a new context starts on profile 0
};

struct Buffer {
  void* ptr = nullptr;
  int64_t bytes = 0;
};

}  // namespace

struct TrtDevice::Impl {
  Logger logger;
  std::unique_ptr<nvinfer1::IRuntime> runtime;  // declared before the engines: outlives them
  std::map<std::string, Engine> engines;
  std::map<std::string, Buffer> buffers;
  cudaStream_t stream = nullptr;

  ~Impl() {
    if (stream) cudaStreamSynchronize(stream);
    engines.clear();
    for (auto& [name, b] : buffers) cudaFree(b.ptr);
    if (stream) cudaStreamDestroy(stream);
    runtime.reset();
  }

  [[noreturn]] void fail(const std::string& what) const {
    throw HostError(what + (logger.last_error.empty() ? "" : " (TensorRT: " + logger.last_error + ")"));
  }

  uint8_t* at(const std::string& buffer, int64_t offset, int64_t bytes) {
    auto it = buffers.find(buffer);
    if (it == buffers.end()) throw HostError("no buffer " + buffer);
    if (offset < 0 || bytes < 0 || bytes > it->second.bytes - offset) {
      throw HostError("buffer " + buffer + ": " + std::to_string(bytes) + " bytes at " + std::to_string(offset) +
                      " are outside its " + std::to_string(it->second.bytes) + " bytes");
    }
    return static_cast<uint8_t*>(it->second.ptr) + offset;
  }

  void load(const Manifest& m, const GraphBindings& g) {
    const PlanFile& plan = m.plans.at(g.graph);  // check_exec_plan: every bound graph has a plan file
    const std::vector<uint8_t> blob = read_file_bytes(m.path(plan.file));
    Engine e;
    e.engine.reset(runtime->deserializeCudaEngine(blob.data(), blob.size()));
    if (!e.engine) {
      fail("cannot deserialize " + plan.file +
           "; a plan loads only with the TensorRT version and GPU it was built for");
    }
    if (size_t(e.engine->getNbOptimizationProfiles()) != g.profiles) {
      fail(plan.file + " has " + std::to_string(e.engine->getNbOptimizationProfiles()) +
           " optimization profiles, the recorded plan " + std::to_string(g.profiles) + ": rebuild the plans");
    }
    if (e.engine->getNbIOTensors() != int32_t(g.tensors.size())) {
      fail(plan.file + ": its tensors differ from the recorded plan");
    }
    for (const TensorBinding& b : g.tensors) {
      const bool input = e.engine->getTensorIOMode(b.name.c_str()) == nvinfer1::TensorIOMode::kINPUT;
      const std::string dtype = dtype_name(e.engine->getTensorDataType(b.name.c_str()));
      if (input != b.input || dtype != b.dtype) {
        fail(plan.file + ": tensor " + b.name + " is " + dtype + (input ? " input" : " output") + " in the engine, " +
             b.dtype + (b.input ? " input" : " output") + " in the recorded plan: rebuild the plans");
      }
    }
    e.context.reset(e.engine->createExecutionContext());
    if (!e.context) fail("cannot create an execution context for " + plan.file);
    engines.emplace(g.graph, std::move(e));
  }
};

TrtDevice::TrtDevice(const Manifest& m, int device) : impl_(std::make_unique<Impl>()) {
  CUDA_CHECK(cudaSetDevice(device));
  CUDA_CHECK(cudaStreamCreate(&impl_->stream));
  impl_->runtime.reset(nvinfer1::createInferRuntime(impl_->logger));
  if (!impl_->runtime) impl_->fail("cannot create the TensorRT runtime");
  bool compatible = true;
  for (const auto& [graph, plan] : m.plans) {
    bool flagged = false;
    for (const std::string& f : plan.flags) flagged = flagged || f == "version_compatible";
    compatible = compatible && flagged;
  }
  if (compatible) impl_->runtime->setEngineHostCodeAllowed(true);  // version-compatible plans embed their runtime
  for (const GraphBindings& g : m.tensorrt->graphs) impl_->load(m, g);
}

TrtDevice::~TrtDevice() = default;

void TrtDevice::allocate(const std::string& buffer, int64_t bytes) {
  Buffer b{nullptr, bytes};
  CUDA_CHECK(cudaMalloc(&b.ptr, size_t(std::max<int64_t>(bytes, 1))));  // cudaMalloc: 256-byte aligned
  impl_->buffers[buffer] = b;
  CUDA_CHECK(cudaMemsetAsync(b.ptr, 0, size_t(bytes), impl_->stream));
}

void TrtDevice::write(const std::string& buffer, int64_t offset, const void* src, int64_t bytes) {
  CUDA_CHECK(
      cudaMemcpyAsync(impl_->at(buffer, offset, bytes), src, size_t(bytes), cudaMemcpyHostToDevice, impl_->stream));
  CUDA_CHECK(cudaStreamSynchronize(impl_->stream));  // the host data may go away after this call
}

void TrtDevice::read(const std::string& buffer, int64_t offset, void* dst, int64_t bytes) {
  CUDA_CHECK(
      cudaMemcpyAsync(dst, impl_->at(buffer, offset, bytes), size_t(bytes), cudaMemcpyDeviceToHost, impl_->stream));
  CUDA_CHECK(cudaStreamSynchronize(impl_->stream));
}

void TrtDevice::copy(const std::string& dst, int64_t dst_offset, const std::string& src, int64_t src_offset,
                     int64_t bytes) {
  CUDA_CHECK(cudaMemcpyAsync(impl_->at(dst, dst_offset, bytes), impl_->at(src, src_offset, bytes), size_t(bytes),
                             cudaMemcpyDeviceToDevice, impl_->stream));
}

void TrtDevice::run(const GraphBindings& g, size_t profile, const std::map<std::string, std::vector<int64_t>>& shapes) {
  Engine& e = impl_->engines.at(g.graph);
  if (e.profile != int(profile)) {
    if (!e.context->setOptimizationProfileAsync(int32_t(profile), impl_->stream)) {
      impl_->fail("cannot select optimization profile " + std::to_string(profile) + " of " + g.graph);
    }
    e.profile = int(profile);
  }
  for (const TensorBinding& b : g.tensors) {
    void* ptr = impl_->at(b.buffer[profile], b.offsets[profile], b.nbytes(profile));
    if (b.input) {
      auto it = shapes.find(b.name);
      const std::vector<int64_t>& shape = it == shapes.end() ? b.shapes[profile] : it->second;
      if (!e.context->setInputShape(b.name.c_str(), to_dims(shape))) {
        impl_->fail(g.graph + ": profile " + std::to_string(profile) + " does not admit " + b.name + " " +
                    shape_str(shape));
      }
    }
    if (!e.context->setTensorAddress(b.name.c_str(), ptr)) {
      impl_->fail(g.graph + ": TensorRT refused the address of " + b.name);
    }
  }
  if (!e.context->enqueueV3(impl_->stream)) impl_->fail("TensorRT failed to run " + g.graph);
}

}  // namespace mh
