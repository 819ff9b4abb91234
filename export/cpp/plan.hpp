// The decode plan: every graph call of one decode, with each tensor bound to a named buffer, an element
// offset and a concrete shape, plus the few device copies and host steps between the calls. It is
// computed from the manifest alone (the graphs' tensor specs, the schedule, the plans' profiles), on the
// CPU, so it is unit-tested without a GPU; the TensorRT runner only executes it, and
// tests/test_cpp_host.py executes the same plan with onnxruntime and compares it with the Python loop.
//
// Rows (as mindhier_rt/pipeline.py): R = scans * samples conditional rows, scan-major (row r is scan
// r / samples, sample r % samples); while guided the step batch is B = 2R: the R conditional rows, then R
// unconditional rows. The encoder runs on the scans, and once more on one all-zero scan for the
// unconditional rows; copies assemble the context step's B input rows from those. When the manifest has
// TensorRT plans, a call whose row count no profile admits is padded up to the smallest row count one
// admits (rows are independent; padded rows are computed and ignored), as `mindhier-rt build` intends:
// its profiles fix the rows of the context step, the generator step, the updates and the decoder.
//
// Buffers (all zero-initialised by the runner):
//   voxels, voxels.null      encoder inputs: the scans, and one zero row for the unconditional rows
//   enc.*, null.*            encoder outputs for the scans and for the zero scan
//   pooled, context          context-step inputs, assembled by copies (scan rows repeated per sample,
//                            then the zero scan's row for every unconditional row)
//   start, ada_blocks, ada_head, cross.{j}.key / cross.{j}.value   context-step outputs; a scale reads its
//                            segment of the segment-major cross cache [M, B, H, T, c] in place
//   ada_blocks.rows<N>       ada_blocks cut to its first N rows (a strided copy) when a step runs on fewer
//                            rows than the context step (guidance stopped, no padding)
//   rope.cos, rope.sin       the bundle's rope tables [L, c]; scale i binds rows offset_i .. offset_i + l_i
//   cross.segment            reference-pipeline context map: the bundle's int64 table cross_segment [L];
//                            scale i binds rows offset_i .. offset_i + l_i, and its cross.* inputs bind the
//                            whole context output [B, H, S, c] in place
//   h                        the next scale's input, written by update_i (rows 0..R-1) and duplicated for
//                            the unconditional rows while the next scale is guided
//   logits                   [rows, l, V]; the host combines and samples the first (2)R rows
//   idx                      [rows, l] tokens written by the host (padded rows: 0)
//   f_hat/0, f_hat/1         ping-pong: update_i reads f_hat/(i%2) and writes f_hat/((i+1)%2)
//   kv.{j}.{key,value}/0,1   block-causal, ping-pong: step i reads past from /((i+1)%2), writes present
//                            to /(i%2); the first rows are always the conditional ones
//   kv.{j}.{key,value}       block-causal with the in-place step (generator_step_kv): one cache, bound as
//                            both past_key_values and present; write_indices (int64) tells it where
//   image                    [rows, 3, H, W]; the first R are the images
//   stage/<tensor>           an aligned copy of an input whose place in its buffer is misaligned
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "manifest.hpp"
#include "sampling.hpp"

namespace mh {

struct Binding {
  std::string tensor;  // the graph's tensor name
  std::string buffer;  // the plan buffer it lives in
  int64_t offset = 0;  // in elements of the buffer's dtype
  std::vector<int64_t> shape;
  int64_t volume() const;
};

// `height` runs of `width` elements: run k goes from src + src_offset + k * src_pitch to
// dst + dst_offset + k * dst_pitch (cudaMemcpy2DAsync).
struct Copy {
  std::string src, dst;
  int64_t src_offset = 0, dst_offset = 0, width = 0, height = 1, src_pitch = 0, dst_pitch = 0;
  std::string why;
};

struct GraphCall {
  std::string graph;
  int profile = 0;          // optimization profile of the graph's plan (the step: the scale index)
  int64_t rows = 0;         // rows the call runs on (after padding)
  std::vector<Copy> stage;  // copies right before the call: assembling inputs, aligning misaligned ones
  std::vector<Binding> inputs, outputs;
};

struct BufferSpec {
  std::string dtype;
  int64_t elements = 0;
};

struct ScaleStep {
  int64_t scale = 0, rows = 0, tokens = 0;  // rows: the step's real rows (2R guided, else R)
  bool guided = false;
  double weight = 0.0;       // t_i of the guidance ramp
  std::vector<Copy> before;  // before the step (cut state rows when the step runs on fewer rows)
  GraphCall step;
  GraphCall update;
  std::vector<Copy> after;   // after the update (duplicate h for the unconditional rows)
};

struct DecodePlan {
  std::string subject;
  int64_t scans = 0, samples = 0, cond_rows = 0, voxels = 0, vocab = 0;
  SamplingConfig sampling;
  std::vector<uint32_t> row_scan, row_sample;  // ids of the R conditional rows
  std::map<std::string, BufferSpec> buffers;
  std::map<std::string, std::string> tables;  // buffer -> bundle .npy it is loaded from (float32, or int64)
  std::map<std::string, std::vector<int64_t>> int_tables;  // int64 buffer -> its values (write_indices)
  GraphCall encoder;       // the scans
  GraphCall encoder_null;  // the all-zero scan; graph empty when the decode is never guided
  GraphCall context;
  std::vector<ScaleStep> scales;
  GraphCall decoder;
  std::vector<int64_t> image_shape;  // [rows, 3, H, W] of the decoder's output
};

// TensorRT wants every tensor address aligned to 256 bytes. Buffers start aligned (cudaMalloc); an input
// bound at an offset that is not a multiple of `align_bytes` (a rope row offset, a context segment with
// an odd B * H * T) is staged by a small copy into its own buffer instead of being bound in place.
constexpr int64_t kTensorAlignBytes = 256;

// Plans the decode of `scans` scans (ids scan_ids[n], default 0..scans-1) with `samples` draws each.
// Graph specs, buffer sizes and offsets come from the manifest; a symbolic dim the host does not know,
// a graph tensor it cannot feed, or a dtype clash throws HostError. With `use_profiles` (the manifest has
// TensorRT plans), rows are padded as described above and every call gets the profile that admits its
// input shapes, or an error naming the input and the range.
DecodePlan make_plan(const Manifest& m, const std::string& subject, int64_t scans, int64_t samples,
                     const SamplingConfig& sampling, const std::vector<uint32_t>& scan_ids = {},
                     bool use_profiles = false, int64_t align_bytes = kTensorAlignBytes);

// The host work between graph calls, shared by every runner:
// the encoder's input [encoder rows, V] from voxels [scans, V] (padded rows zero) ...
std::vector<float> voxel_rows(const DecodePlan& p, const std::vector<float>& voxels_NV);
// ... one scale's tokens [R, l] from the step's logits (float32, at least st.rows * l * V values; the
// first R rows are combined in place with the next R when guided) ...
std::vector<int64_t> sample_scale(const DecodePlan& p, const ScaleStep& st, std::vector<float>& logits);
// ... and the update's idx input [update rows, l]: the tokens, then zeros for padded rows.
std::vector<int64_t> idx_rows(const ScaleStep& st, const std::vector<int64_t>& tokens);

std::string describe_plan(const DecodePlan& p);  // human-readable summary
std::string plan_to_json(const DecodePlan& p);   // the whole plan, for tools and tests

}  // namespace mh
