#include "decode.hpp"

#include <cstring>

#include "dtype.hpp"
#include "error.hpp"
#include "npy.hpp"
#include "tensor_names.hpp"

namespace mh {

namespace {

int64_t row_bytes(const TensorBinding& b, size_t profile) {
  const std::vector<int64_t>& shape = b.shapes[profile];
  if (shape.empty() || shape[0] == 0) throw HostError("tensor " + b.name + " has no rows to address");
  return b.nbytes(profile) / shape[0];
}

std::vector<uint8_t> to_dtype(const NpyArray& table, const std::string& dtype, const std::string& what) {
  std::vector<uint8_t> out;
  if (table.descr == "<f4" && (dtype == "float32" || dtype == "float16")) {
    const std::vector<float> values = table.to_float32();
    out.resize(values.size() * element_size(dtype));
    floats_to_dtype(values.data(), out.data(), int64_t(values.size()), dtype);
    return out;
  }
  if (table.descr == "<i8" && dtype == "int64") return table.data;
  throw HostError("table " + what + " (" + table.descr + ") cannot be placed as " + dtype);
}

}  // namespace

PlanExecutor::PlanExecutor(const Manifest& m, Device& device) : m_(m), p_(*m.tensorrt), d_(device) {
  for (const auto& [name, bytes] : p_.buffers) d_.allocate(name, bytes);
  for (const TableUpload& u : p_.tables) {
    const NpyArray table = read_npy(m_.path(m_.tables.at(u.table)));
    int64_t columns = 1;
    for (size_t a = 1; a < table.shape.size(); ++a) columns *= table.shape[a];
    if (table.shape.empty() || columns != u.columns) {
      throw HostError("table " + u.table + " has shape " + shape_str(table.shape) + ", the plan places rows of " +
                      std::to_string(u.columns) + " values: rebuild the plans");
    }
    const std::vector<uint8_t> data = to_dtype(table, u.dtype, u.table);
    const int64_t bytes_per_row = int64_t(data.size()) / table.shape[0];
    for (const auto& [first, rows, offset] : u.layout) {
      if (first + rows > table.shape[0]) {
        throw HostError("table " + u.table + " has " + std::to_string(table.shape[0]) + " rows, the plan reads " +
                        std::to_string(first + rows));
      }
      d_.write(u.buffer, offset, data.data() + first * bytes_per_row, rows * bytes_per_row);
    }
  }
  for (const Fill& f : p_.fills) {
    const std::vector<int64_t> values(size_t(f.count), f.value);
    d_.write(f.buffer, f.offset, values.data(), f.count * 8);
  }
}

void PlanExecutor::copy_rows(const TensorBinding& dst, size_t dst_profile, int64_t dst_row, const TensorBinding& src,
                             size_t src_profile, int64_t rows) {
  const int64_t rb = row_bytes(src, src_profile);
  if (row_bytes(dst, dst_profile) != rb || src.dtype != dst.dtype) {
    throw HostError("cannot pass " + src.name + " " + shape_str(src.shapes[src_profile]) + " as " + dst.name + " " +
                    shape_str(dst.shapes[dst_profile]));
  }
  if (rows > src.shapes[src_profile][0] || dst_row + rows > dst.shapes[dst_profile][0]) {
    throw HostError("cannot pass " + std::to_string(rows) + " rows of " + src.name + " to " + dst.name);
  }
  const std::string& db = dst.buffer[dst_profile];
  const int64_t doff = dst.offsets[dst_profile] + dst_row * rb;
  if (db == src.buffer[src_profile] && doff == src.offsets[src_profile]) return;  // bound in place
  d_.copy(db, doff, src.buffer[src_profile], src.offsets[src_profile], rows * rb);
}

DecodeResult PlanExecutor::decode(const DecodeRequest& r) {
  namespace n = names;
  const GraphBindings& enc = p_.graph(n::encoder_graph(r.subject));
  const GraphBindings& ctx = p_.graph(n::kContextGraph);
  const GraphBindings& step = p_.graph(p_.step_graph);
  const GraphBindings& dec = p_.graph(n::kDecoderGraph);
  const TensorBinding& vox = enc.at(n::kVoxels);
  const int64_t N = r.scans, S = r.samples, R = N * S, V = vox.shapes[0].at(1), K = int64_t(step.profiles);
  if (N < 1 || S < 1 || int64_t(r.voxels.size()) != N * V) {
    throw HostError("expected voxels [" + std::to_string(N) + ", " + std::to_string(V) + "] and samples >= 1");
  }
  const bool guided0 = guidance_active(r.sampling, 0);
  if (N > p_.scans || R > p_.sample_rows || (guided0 && !p_.guided)) {
    throw HostError("this decode needs " + std::to_string(N) + " scan(s) x " + std::to_string(S) + " sample(s)" +
                    (guided0 ? ", guided" : "") + "; the plans were built for " + std::to_string(p_.scans) + " x " +
                    std::to_string(p_.samples) + (p_.guided ? ", guided" : ", unguided") +
                    ": rebuild with `mindhier-rt build --batch N --samples S`");
  }
  DecodeResult out;
  for (int64_t k = 0; k < N; ++k) {
    for (int64_t s = 0; s < S; ++s) {
      out.row_scan.push_back(r.scan_ids.empty() ? uint32_t(k) : r.scan_ids.at(size_t(k)));
      out.row_sample.push_back(uint32_t(s));
    }
  }

  // encoder: the scans, then (guided) one all-zero scan; outputs to the host, assembled into the context inputs
  auto encode = [&](const std::vector<float>& voxels, int64_t rows) {
    std::vector<uint8_t> data(size_t(rows * V) * element_size(vox.dtype));
    floats_to_dtype(voxels.data(), data.data(), rows * V, vox.dtype);
    d_.write(vox.buffer[0], vox.offsets[0], data.data(), int64_t(data.size()));
    d_.run(enc, 0, {{n::kVoxels, {rows, V}}});
    std::map<std::string, std::vector<uint8_t>> outputs;
    for (const TensorBinding& b : enc.tensors) {
      if (b.input) continue;
      std::vector<uint8_t>& o = outputs[b.name];
      o.resize(size_t(rows * row_bytes(b, 0)));
      d_.read(b.buffer[0], b.offsets[0], o.data(), int64_t(o.size()));
    }
    return outputs;
  };
  const auto cond = encode(r.voxels, N);
  const auto null = guided0 ? encode(std::vector<float>(size_t(V), 0.0f), 1) : decltype(cond){};
  for (const TensorBinding& b : ctx.tensors) {
    if (!b.input) continue;
    const TensorBinding* src = enc.find(b.name);
    if (src == nullptr || src->input || src->dtype != b.dtype || row_bytes(*src, 0) != row_bytes(b, 0)) {
      throw HostError("context input " + b.name + " is not an encoder output of the same dtype and row size");
    }
    const int64_t rb = row_bytes(b, 0);
    if ((guided0 ? 2 * R : R) > b.shapes[0][0]) throw HostError("context input " + b.name + " has too few rows");
    std::vector<uint8_t> rows;
    for (int64_t k = 0; k < N; ++k) {
      const auto row = cond.at(b.name).begin() + k * rb;
      for (int64_t s = 0; s < S; ++s) rows.insert(rows.end(), row, row + rb);
    }
    for (int64_t k = 0; guided0 && k < R; ++k) rows.insert(rows.end(), null.at(b.name).begin(), null.at(b.name).end());
    d_.write(b.buffer[0], b.offsets[0], rows.data(), int64_t(rows.size()));
  }
  d_.run(ctx, 0, {});

  const GraphBindings* prev = nullptr;  // the previous update
  {
    const TensorBinding& f_hat = p_.graph(n::update_graph(0)).at(n::kFHat);
    const std::vector<uint8_t> zeros(size_t(f_hat.nbytes(0)), 0);
    d_.write(f_hat.buffer[0], f_hat.offsets[0], zeros.data(), f_hat.nbytes(0));
  }
  bool guided = guided0;
  for (int64_t i = 0; i < K; ++i) {
    const size_t pi = size_t(i);
    guided = guided && guidance_active(r.sampling, i);
    if (prev != nullptr) {  // h of this scale: the previous update's h_next, again for the unconditional rows
      const TensorBinding& h = step.at(n::kH);
      copy_rows(h, pi, 0, prev->at(n::kHNext), 0, R);
      if (guided) copy_rows(h, pi, R, prev->at(n::kHNext), 0, R);
    }
    for (const TensorBinding& b : step.tensors) {  // misaligned segments: copied into their aligned place
      if (b.copy_from.empty()) continue;
      d_.copy(b.buffer[pi], b.offsets[pi], b.copy_from[pi].first, b.copy_from[pi].second, b.nbytes(pi));
    }
    d_.run(step, pi, {});
    const TensorBinding& lb = step.at(n::kLogits);
    const std::vector<int64_t>& ls = lb.shapes[pi];
    const int64_t used = guided ? 2 * R : R;
    if (ls.size() != 3 || ls[0] < used) throw HostError("logits " + shape_str(ls) + " should be [rows, tokens, V]");
    const int64_t l = ls[1], Vt = ls[2];
    std::vector<uint8_t> raw(size_t(used * row_bytes(lb, pi)));
    d_.read(lb.buffer[pi], lb.offsets[pi], raw.data(), int64_t(raw.size()));
    std::vector<float> logits(size_t(used * l * Vt));
    dtype_to_floats(raw.data(), logits.data(), int64_t(logits.size()), lb.dtype);
    if (guided) {
      const int64_t cnt = R * l * Vt;
      cfg_combine(logits.data(), logits.data() + cnt, logits.data(), cnt, guidance_weight(r.sampling, i, K));
    }
    std::vector<int64_t> tokens =
        sample_tokens(logits.data(), R, l, Vt, r.sampling, uint32_t(i), out.row_scan, out.row_sample);

    const GraphBindings& upd = p_.graph(n::update_graph(i));
    const TensorBinding& idx = upd.at(n::kIdx);
    if (idx.dtype != "int64" || idx.shapes[0] != std::vector<int64_t>{idx.shapes[0].at(0), l} || idx.shapes[0][0] < R) {
      throw HostError(upd.graph + " idx " + shape_str(idx.shapes[0]) + " should be int64 [rows >= " +
                      std::to_string(R) + ", " + std::to_string(l) + "]");
    }
    std::vector<int64_t> idx_rows(tokens);
    idx_rows.resize(size_t(idx.shapes[0][0] * l), 0);
    d_.write(idx.buffer[0], idx.offsets[0], idx_rows.data(), int64_t(idx_rows.size() * 8));
    if (prev != nullptr) copy_rows(upd.at(n::kFHat), 0, 0, prev->at(n::kFHatNext), 0, upd.at(n::kFHat).shapes[0][0]);
    d_.run(upd, 0, {});
    out.tokens.push_back(std::move(tokens));
    prev = &upd;
  }
  const TensorBinding& f_hat = dec.at(n::kFHat);
  copy_rows(f_hat, 0, 0, prev->at(n::kFHatNext), 0, f_hat.shapes[0][0]);
  d_.run(dec, 0, {});
  const TensorBinding& image = dec.at(n::kImage);
  out.image_shape = image.shapes[0];
  if (out.image_shape.size() != 4 || out.image_shape[0] < R || out.image_shape[1] != 3) {
    throw HostError("vq_decoder image " + shape_str(out.image_shape) + " should be [rows, 3, H, W]");
  }
  out.image_shape[0] = R;
  std::vector<uint8_t> raw(size_t(R * row_bytes(image, 0)));
  d_.read(image.buffer[0], image.offsets[0], raw.data(), int64_t(raw.size()));
  out.images.resize(size_t(R * 3 * out.image_shape[2] * out.image_shape[3]));
  dtype_to_floats(raw.data(), out.images.data(), int64_t(out.images.size()), image.dtype);
  return out;
}

}  // namespace mh
