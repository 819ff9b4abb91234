// Names of the bundle's graphs, graph tensors and tables the host binds by name: the C++ twin of
// mindhier_rt/bundle/tensor_names.py (tests/test_cpp_host.py checks that the two agree).
#pragma once

#include <string>

namespace mh::names {

// graphs
inline constexpr const char* kContextGraph = "context";
inline constexpr const char* kStepGraph = "generator_step";
inline constexpr const char* kKvStepGraph = "generator_step_kv";
inline constexpr const char* kDecoderGraph = "vq_decoder";
inline constexpr const char* kEncoderPrefix = "encoder_";
inline constexpr const char* kUpdatePrefix = "update_";

// encoder_<subject>
inline constexpr const char* kVoxels = "voxels";
inline constexpr const char* kPooled = "pooled";
inline constexpr const char* kContext = "context";

// generator step
inline constexpr const char* kH = "h";
inline constexpr const char* kLogits = "logits";

// update_<i> and the decoder
inline constexpr const char* kFHat = "f_hat";
inline constexpr const char* kIdx = "idx";
inline constexpr const char* kFHatNext = "f_hat_next";
inline constexpr const char* kHNext = "h_next";
inline constexpr const char* kImage = "image";

inline std::string encoder_graph(const std::string& subject) { return kEncoderPrefix + subject; }
inline std::string update_graph(int64_t scale) { return kUpdatePrefix + std::to_string(scale); }

}  // namespace mh::names
