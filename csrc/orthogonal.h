// echo_kernels::orthogonal_product: M = G_1 ... G_N R (givens_first) or R G_1 ... G_N.
//
// Shared by the CPU and CUDA implementations: argument checks, broadcasting and the order in which
// the rotations are applied.
//
// Both products reduce to one form. A "line" is a vector of h numbers that the rotations mix
// independently of every other line: with givens_first a column of R (left multiplication mixes
// rows i and j of each column), otherwise a row of R (right multiplication mixes columns i and j of
// each row). Step t = 0 .. N-1 applies, to every line v,
//
//     v_i <- cos(phi) v_i - sin(phi) v_j,    v_j <- sin(phi) v_i + cos(phi) v_j,
//
// with k = N-1-t, phi = theta_k (givens_first: G_N touches R first) or k = t, phi = -theta_k
// (R G_1 ... G_N: row vectors meet G_1 first, and u @ G(theta) is G(-theta) acting on u).
//
// Backward walks the steps in reverse from M and dL/dM. With (x, y) = (v_i, v_j) after the step and
// (a, b) their gradients: dL/dphi = sum over lines of (b x - a y); the step is undone with the
// transposed rotation, applied to both (x, y) and (a, b). Nothing but the inputs and M is needed.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace echo_kernels {

constexpr int64_t kMaxH = 256;

struct Prepared {
  at::Tensor thetas;  // (B, N), compute dtype, contiguous
  at::Tensor pairs;   // (N, 2), int64, contiguous
  at::Tensor R;       // (B, h, h), output dtype, contiguous
  std::vector<int64_t> batch;  // broadcast leading dims
  int64_t B, N, h;
};

inline at::ScalarType compute_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Shapes, dtypes and devices; the values of pairs are checked by check_pair_values.
inline void check_arguments(const at::Tensor& thetas, const at::Tensor& pairs, const at::Tensor& R) {
  TORCH_CHECK(at::isFloatingType(thetas.scalar_type()),
              "orthogonal_product: thetas must be a floating-point tensor, got ", thetas.scalar_type());
  TORCH_CHECK(at::isFloatingType(R.scalar_type()),
              "orthogonal_product: R must be a floating-point tensor, got ", R.scalar_type());
  TORCH_CHECK(pairs.scalar_type() == at::kLong || pairs.scalar_type() == at::kInt,
              "orthogonal_product: pairs must be an int64 (or int32) tensor, got ", pairs.scalar_type());
  TORCH_CHECK(thetas.device() == R.device() && pairs.device() == R.device(),
              "orthogonal_product: tensors must be on one device: thetas on ", thetas.device(),
              ", pairs on ", pairs.device(), ", R on ", R.device());
  TORCH_CHECK(R.dim() >= 2 && R.size(-1) == R.size(-2),
              "orthogonal_product: R must have shape (..., h, h), got ", R.sizes());
  TORCH_CHECK(R.size(-1) >= 1 && R.size(-1) <= kMaxH,
              "orthogonal_product: h = ", R.size(-1), " is not supported (1 <= h <= ", kMaxH, ")");
  TORCH_CHECK(thetas.dim() >= 1, "orthogonal_product: thetas must have shape (..., N), got a 0-d tensor");
  TORCH_CHECK(pairs.dim() == 2 && pairs.size(1) == 2 && pairs.size(0) == thetas.size(-1),
              "orthogonal_product: pairs must have shape (N, 2) with N = thetas.shape[-1] = ",
              thetas.size(-1), ", got ", pairs.sizes());
}

// pairs_cpu: (N, 2) int64 on the CPU.
inline void check_pair_values(const at::Tensor& pairs_cpu, int64_t h) {
  const int64_t* p = pairs_cpu.data_ptr<int64_t>();
  for (int64_t k = 0; k < pairs_cpu.size(0); ++k) {
    const int64_t i = p[2 * k], j = p[2 * k + 1];
    TORCH_CHECK(0 <= i && i < h && 0 <= j && j < h, "orthogonal_product: pairs[", k, "] = (", i, ", ", j,
                ") must index rows 0..", h - 1, " of R");
    TORCH_CHECK(i != j, "orthogonal_product: pairs[", k, "] = (", i, ", ", j,
                "): a Givens rotation needs i != j");
  }
}

inline std::vector<int64_t> batch_shape(const at::Tensor& thetas, const at::Tensor& R) {
  const auto tb = thetas.sizes().slice(0, thetas.dim() - 1);
  const auto rb = R.sizes().slice(0, R.dim() - 2);
  const int64_t n = std::max(tb.size(), rb.size());
  std::vector<int64_t> batch(n);
  for (int64_t d = 0; d < n; ++d) {
    const int64_t dt = d - (n - (int64_t)tb.size()), dr = d - (n - (int64_t)rb.size());
    const int64_t st = dt >= 0 ? tb[dt] : 1, sr = dr >= 0 ? rb[dr] : 1;
    TORCH_CHECK(st == sr || st == 1 || sr == 1, "orthogonal_product: leading dims of thetas ", tb,
                " and R ", rb, " do not broadcast");
    batch[d] = st == 1 ? sr : st;
  }
  return batch;
}

inline at::ScalarType output_type(const at::Tensor& thetas, const at::Tensor& R) {
  return c10::promoteTypes(thetas.scalar_type(), R.scalar_type());
}

// Broadcast thetas and R to the common leading dims, flattened to one batch dim.
inline Prepared prepare(const at::Tensor& thetas, const at::Tensor& pairs, const at::Tensor& R) {
  Prepared p;
  p.batch = batch_shape(thetas, R);
  p.N = thetas.size(-1);
  p.h = R.size(-1);
  p.B = 1;
  for (auto s : p.batch) p.B *= s;
  const auto out_type = output_type(thetas, R);
  std::vector<int64_t> tshape(p.batch), rshape(p.batch);
  tshape.push_back(p.N);
  rshape.push_back(p.h);
  rshape.push_back(p.h);
  p.thetas = thetas.to(compute_type(out_type)).expand(tshape).contiguous().view({p.B, p.N});
  p.R = R.to(out_type).expand(rshape).contiguous().view({p.B, p.h, p.h});
  p.pairs = pairs.to(at::kLong).contiguous();
  return p;
}

inline std::vector<int64_t> with_tail(std::vector<int64_t> batch, std::initializer_list<int64_t> tail) {
  for (auto t : tail) batch.push_back(t);
  return batch;
}

// Backward arguments: grad and M of shape (*batch, h, h), thetas broadcastable to (*batch, N).
inline void check_backward_arguments(const at::Tensor& grad, const at::Tensor& thetas, const at::Tensor& pairs,
                                     const at::Tensor& M) {
  check_arguments(thetas, pairs, M);
  TORCH_CHECK(grad.sizes() == M.sizes(), "orthogonal_product_backward: grad has shape ", grad.sizes(),
              " but M has shape ", M.sizes());
  TORCH_CHECK(grad.device() == M.device(), "orthogonal_product_backward: grad on ", grad.device(), ", M on ",
              M.device());
  TORCH_CHECK(at::isFloatingType(grad.scalar_type()),
              "orthogonal_product_backward: grad must be floating-point, got ", grad.scalar_type());
}

struct BackwardPrepared {
  at::Tensor grad;    // (B, h, h), M's dtype, contiguous
  at::Tensor M;       // (B, h, h), contiguous
  at::Tensor thetas;  // (B, N), compute dtype, contiguous
  at::Tensor pairs;   // (N, 2), int64, contiguous
  std::vector<int64_t> batch;
  int64_t B, N, h;
};

inline BackwardPrepared prepare_backward(const at::Tensor& grad, const at::Tensor& thetas, const at::Tensor& pairs,
                                         const at::Tensor& M) {
  BackwardPrepared p;
  p.batch = std::vector<int64_t>(M.sizes().begin(), M.sizes().end() - 2);
  TORCH_CHECK(batch_shape(thetas, M) == p.batch, "orthogonal_product_backward: thetas ", thetas.sizes(),
              " does not broadcast to the leading dims of M ", M.sizes());
  p.N = thetas.size(-1);
  p.h = M.size(-1);
  p.B = 1;
  for (auto s : p.batch) p.B *= s;
  p.M = M.contiguous().view({p.B, p.h, p.h});
  p.grad = grad.to(M.scalar_type()).contiguous().view({p.B, p.h, p.h});
  p.thetas = thetas.to(compute_type(M.scalar_type())).expand(with_tail(p.batch, {p.N})).contiguous().view({p.B, p.N});
  p.pairs = pairs.to(at::kLong).contiguous();
  return p;
}

}  // namespace echo_kernels
