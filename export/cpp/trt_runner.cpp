#include "trt_runner.hpp"

#include <NvInfer.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstring>
#include <iostream>
#include <map>
#include <set>
#include <string>

#include "dtype.hpp"
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

std::vector<int64_t> from_dims(const nvinfer1::Dims& d) {
  std::vector<int64_t> shape;
  for (int32_t a = 0; a < d.nbDims; ++a) shape.push_back(d.d[a]);
  return shape;
}

struct Engine {
  std::string file;
  std::unique_ptr<nvinfer1::ICudaEngine> engine;
  std::unique_ptr<nvinfer1::IExecutionContext> context;  // destroyed before its engine
  int profile = 0;                                        // a new context starts on profile 0
};

struct DeviceBuffer {
  void* ptr = nullptr;
  std::string dtype;
  int64_t elements = 0;
};

const Binding& find(const std::vector<Binding>& list, const std::string& tensor) {
  for (const Binding& b : list) {
    if (b.tensor == tensor) return b;
  }
  throw HostError("the plan binds no tensor " + tensor);
}

}  // namespace

struct TrtRunner::Impl {
  Logger logger;
  std::unique_ptr<nvinfer1::IRuntime> runtime;  // declared before the engines: outlives them
  std::map<std::string, Engine> engines;
  std::map<std::string, DeviceBuffer> buffers;
  std::set<std::string> tables;  // buffers loaded once from the bundle, not zeroed per run
  cudaStream_t stream = nullptr;
  std::vector<uint8_t> host;     // staging for uploads and downloads (pageable: copies return when done)

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

  void load_engine(const Manifest& m, const std::string& graph) {
    if (engines.count(graph)) return;
    auto it = m.plans.find(graph);
    if (it == m.plans.end()) fail("the bundle has no TensorRT plan for graph " + graph + " (run `mindhier-rt build`)");
    Engine e;
    e.file = it->second.file;
    const std::vector<uint8_t> blob = read_file_bytes(m.path(e.file));
    e.engine.reset(runtime->deserializeCudaEngine(blob.data(), blob.size()));
    if (!e.engine) {
      fail("cannot deserialize " + e.file + "; a plan only loads with the TensorRT version and GPU it was built for");
    }
    e.context.reset(e.engine->createExecutionContext());
    if (!e.context) fail("cannot create an execution context for " + e.file);
    check_tensors(e, m.graph(graph));
    engines.emplace(graph, std::move(e));
  }

  // The engine's I/O tensors must be exactly the manifest graph's, with the same directions and dtypes.
  void check_tensors(const Engine& e, const GraphSpec& spec) const {
    std::set<std::string> seen;
    for (int32_t k = 0; k < e.engine->getNbIOTensors(); ++k) {
      const char* name = e.engine->getIOTensorName(k);
      const TensorSpec* in = spec.find_input(name);
      const TensorSpec* out = spec.find_output(name);
      const bool engine_input = e.engine->getTensorIOMode(name) == nvinfer1::TensorIOMode::kINPUT;
      if ((engine_input && !in) || (!engine_input && !out)) {
        fail(e.file + ": engine " + (engine_input ? "input " : "output ") + name + " is not one of graph " + spec.name +
             "'s in the manifest");
      }
      const std::string dt = dtype_name(e.engine->getTensorDataType(name));
      const std::string& want = (in ? in : out)->dtype;
      if (dt != want) {
        fail(e.file + ": tensor " + name + " is " + dt + " in the engine but " + want + " in the manifest");
      }
      seen.insert(name);
    }
    for (const auto* list : {&spec.inputs, &spec.outputs}) {
      for (const TensorSpec& t : *list) {
        if (!seen.count(t.name)) fail(e.file + ": the engine has no tensor " + t.name + " of graph " + spec.name);
      }
    }
  }

  void* address(const std::string& buffer, int64_t offset) const {
    const DeviceBuffer& b = buffers.at(buffer);
    return static_cast<char*>(b.ptr) + offset * int64_t(element_size(b.dtype));
  }

  void copy(const Copy& c) {
    const size_t elt = element_size(buffers.at(c.src).dtype);
    void* dst = address(c.dst, c.dst_offset);
    const void* src = address(c.src, c.src_offset);
    if (c.height == 1) {
      CUDA_CHECK(cudaMemcpyAsync(dst, src, size_t(c.width) * elt, cudaMemcpyDeviceToDevice, stream));
    } else {
      CUDA_CHECK(cudaMemcpy2DAsync(dst, size_t(c.dst_pitch) * elt, src, size_t(c.src_pitch) * elt,
                                   size_t(c.width) * elt, size_t(c.height), cudaMemcpyDeviceToDevice, stream));
    }
  }

  void execute(const GraphCall& c) {
    for (const Copy& s : c.stage) copy(s);
    Engine& e = engines.at(c.graph);
    if (e.profile != c.profile) {
      if (!e.context->setOptimizationProfileAsync(c.profile, stream)) {
        fail(c.graph + ": cannot select optimization profile " + std::to_string(c.profile) + " of " + e.file);
      }
      e.profile = c.profile;
    }
    for (const Binding& b : c.inputs) {
      if (!e.context->setInputShape(b.tensor.c_str(), to_dims(b.shape))) {
        fail(c.graph + ": profile " + std::to_string(c.profile) + " of " + e.file + " does not admit input " +
             b.tensor + " " + shape_str(b.shape));
      }
      if (!e.context->setTensorAddress(b.tensor.c_str(), address(b.buffer, b.offset))) {
        fail(c.graph + ": cannot bind input " + b.tensor);
      }
    }
    for (const Binding& b : c.outputs) {
      const std::vector<int64_t> shape = from_dims(e.context->getTensorShape(b.tensor.c_str()));
      if (shape != b.shape) {
        fail(c.graph + ": output " + b.tensor + " would be " + shape_str(shape) + ", the manifest says " +
             shape_str(b.shape));
      }
      if (!e.context->setTensorAddress(b.tensor.c_str(), address(b.buffer, b.offset))) {
        fail(c.graph + ": cannot bind output " + b.tensor);
      }
    }
    if (!e.context->enqueueV3(stream)) fail(c.graph + ": enqueueV3 failed");
  }

  void upload_floats(const std::string& buffer, const std::vector<float>& values) {
    const DeviceBuffer& b = buffers.at(buffer);
    host.resize(values.size() * element_size(b.dtype));
    floats_to_dtype(values.data(), host.data(), int64_t(values.size()), b.dtype);
    CUDA_CHECK(cudaMemcpyAsync(b.ptr, host.data(), host.size(), cudaMemcpyHostToDevice, stream));
  }

  std::vector<float> download_floats(const Binding& bind) {
    const DeviceBuffer& b = buffers.at(bind.buffer);
    host.resize(size_t(bind.volume()) * element_size(b.dtype));
    CUDA_CHECK(cudaMemcpyAsync(host.data(), address(bind.buffer, bind.offset), host.size(), cudaMemcpyDeviceToHost,
                               stream));
    CUDA_CHECK(cudaStreamSynchronize(stream));
    std::vector<float> out(static_cast<size_t>(bind.volume()));
    dtype_to_floats(host.data(), out.data(), bind.volume(), b.dtype);
    return out;
  }

  void upload_tokens(const Binding& bind, const std::vector<int64_t>& tokens) {  // int64 (or int32) values
    const DeviceBuffer& b = buffers.at(bind.buffer);
    if (b.dtype == "int64") {
      host.resize(tokens.size() * 8);
      std::memcpy(host.data(), tokens.data(), host.size());
    } else if (b.dtype == "int32") {
      host.resize(tokens.size() * 4);
      for (size_t k = 0; k < tokens.size(); ++k) {
        const int32_t t = int32_t(tokens[k]);
        std::memcpy(host.data() + 4 * k, &t, 4);
      }
    } else {
      throw HostError("token input " + bind.tensor + " must be int64 or int32, not " + b.dtype);
    }
    CUDA_CHECK(cudaMemcpyAsync(address(bind.buffer, bind.offset), host.data(), host.size(), cudaMemcpyHostToDevice,
                               stream));
  }
};

TrtRunner::TrtRunner(const Manifest& m, const DecodePlan& plan, int device) : impl_(std::make_unique<Impl>()) {
  Impl& I = *impl_;
  CUDA_CHECK(cudaSetDevice(device));
  CUDA_CHECK(cudaStreamCreateWithFlags(&I.stream, cudaStreamNonBlocking));
  I.runtime.reset(nvinfer1::createInferRuntime(I.logger));
  if (!I.runtime) I.fail("cannot create the TensorRT runtime");
  for (const auto& [graph, file] : m.plans) {  // version-compatible plans carry their own lean runtime
    for (const std::string& flag : file.flags) {
      if (flag == "version_compatible") I.runtime->setEngineHostCodeAllowed(true);
    }
  }

  I.load_engine(m, plan.encoder.graph);
  I.load_engine(m, plan.context.graph);
  for (const ScaleStep& st : plan.scales) {
    I.load_engine(m, st.step.graph);
    I.load_engine(m, st.update.graph);
  }
  I.load_engine(m, plan.decoder.graph);

  for (const auto& [name, spec] : plan.buffers) {
    DeviceBuffer b{nullptr, spec.dtype, spec.elements};
    const size_t bytes = std::max<size_t>(size_t(spec.elements) * element_size(spec.dtype), 256);
    CUDA_CHECK(cudaMalloc(&b.ptr, bytes));  // 256-byte aligned, which make_plan's offsets build on
    I.buffers.emplace(name, b);
  }
  for (const auto& [buffer, file] : plan.tables) {
    if (plan.buffers.at(buffer).dtype == "int64") {  // cross_segment: the per-token context map
      const std::vector<int64_t> values = read_npy(m.path(file)).to_int64();
      if (int64_t(values.size()) != I.buffers.at(buffer).elements) {
        throw HostError(file + ": " + std::to_string(values.size()) + " values, but the graphs read " +
                        std::to_string(I.buffers.at(buffer).elements) + " from it");
      }
      I.upload_tokens(Binding{buffer, buffer, 0, {int64_t(values.size())}}, values);
      I.tables.insert(buffer);
      continue;
    }
    const std::vector<float> table = read_npy_float32(m.path(file), 2).to_float32();
    if (int64_t(table.size()) != I.buffers.at(buffer).elements) {
      throw HostError(file + ": " + std::to_string(table.size()) + " values, but the graphs read " +
                      std::to_string(I.buffers.at(buffer).elements) + " from it");
    }
    I.upload_floats(buffer, table);
    I.tables.insert(buffer);
  }
  for (const auto& [buffer, values] : plan.int_tables) {  // write_indices of the in-place cache
    I.upload_tokens(Binding{buffer, buffer, 0, {int64_t(values.size())}}, values);
    I.tables.insert(buffer);
  }
  CUDA_CHECK(cudaStreamSynchronize(I.stream));
}

TrtRunner::~TrtRunner() = default;

DecodeResult TrtRunner::run(const DecodePlan& plan, const std::vector<float>& voxels_NV) {
  Impl& I = *impl_;
  I.logger.last_error.clear();
  for (const auto& [name, b] : I.buffers) {
    if (I.tables.count(name)) continue;
    CUDA_CHECK(cudaMemsetAsync(b.ptr, 0, size_t(b.elements) * element_size(b.dtype), I.stream));  // f_hat starts at 0
  }
  I.upload_floats("voxels", voxel_rows(plan, voxels_NV));
  I.execute(plan.encoder);
  if (!plan.encoder_null.graph.empty()) I.execute(plan.encoder_null);  // reads the zeroed voxels.null
  I.execute(plan.context);  // its stage copies assemble the rows from both encoder runs

  DecodeResult result;
  for (const ScaleStep& st : plan.scales) {
    for (const Copy& c : st.before) I.copy(c);
    I.execute(st.step);
    std::vector<float> logits = I.download_floats(find(st.step.outputs, "logits"));  // padded rows too
    std::vector<int64_t> tokens = sample_scale(plan, st, logits);
    I.upload_tokens(find(st.update.inputs, "idx"), idx_rows(st, tokens));
    I.execute(st.update);
    for (const Copy& c : st.after) I.copy(c);
    result.tokens.push_back(std::move(tokens));
  }
  I.execute(plan.decoder);
  result.images = I.download_floats(find(plan.decoder.outputs, "image"));
  result.images.resize(size_t(plan.cond_rows * plan.image_shape[1] * plan.image_shape[2] * plan.image_shape[3]));
  return result;
}

}  // namespace mh
