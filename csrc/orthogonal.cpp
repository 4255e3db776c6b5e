// The echo_kernels::orthogonal_product schema and its CPU kernels (forward and backward).
// See orthogonal.h for the maths and the order of the steps.
#include "orthogonal.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <tuple>
#include <vector>

#ifdef ECHO_KERNELS_PYTHON_MODULE
#include <Python.h>
#endif

namespace echo_kernels {
namespace {

// Lines are copied to a work buffer laid out as buf[p * h + line] (position p of every line next to
// each other), so that one step is two contiguous rows of the buffer whatever the product.
template <typename scalar_t, typename acc_t>
void load_lines(const scalar_t* src, acc_t* buf, int64_t h, bool givens_first) {
  if (givens_first) {  // line = column: buf is src itself
    for (int64_t x = 0; x < h * h; ++x) buf[x] = static_cast<acc_t>(src[x]);
  } else {  // line = row: buf is src transposed
    for (int64_t r = 0; r < h; ++r)
      for (int64_t p = 0; p < h; ++p) buf[p * h + r] = static_cast<acc_t>(src[r * h + p]);
  }
}

template <typename acc_t, typename out_t>
void store_lines(const acc_t* buf, out_t* dst, int64_t h, bool givens_first) {
  if (givens_first) {
    for (int64_t x = 0; x < h * h; ++x) dst[x] = static_cast<out_t>(buf[x]);
  } else {
    for (int64_t r = 0; r < h; ++r)
      for (int64_t p = 0; p < h; ++p) dst[r * h + p] = static_cast<out_t>(buf[p * h + r]);
  }
}

// cos/sin of the angle of step t, for t = 0 .. N-1, and the rotation index k of the step.
template <typename acc_t>
void step_angles(const acc_t* theta, int64_t N, bool givens_first, acc_t* cs, acc_t* sn) {
  for (int64_t t = 0; t < N; ++t) {
    const int64_t k = givens_first ? N - 1 - t : t;
    const acc_t phi = givens_first ? theta[k] : -theta[k];
    cs[t] = std::cos(phi);
    sn[t] = std::sin(phi);
  }
}

inline int64_t step_index(int64_t t, int64_t N, bool givens_first) { return givens_first ? N - 1 - t : t; }

// Batch entries per task: threads are worth waking only for about a million numbers updated each.
int64_t grain(int64_t N, int64_t h) { return std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(1, (N + h) * h)); }

template <typename scalar_t>
void forward_kernel(const Prepared& p, at::Tensor& M, bool givens_first) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = p.N, h = p.h;
  const scalar_t* R = p.R.const_data_ptr<scalar_t>();
  const acc_t* theta = p.thetas.const_data_ptr<acc_t>();
  const int64_t* pairs = p.pairs.const_data_ptr<int64_t>();
  scalar_t* out = M.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, p.B, grain(N, h), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(h * h), cs(N), sn(N);
    for (int64_t b = begin; b < end; ++b) {
      load_lines(R + b * h * h, buf.data(), h, givens_first);
      step_angles(theta + b * N, N, givens_first, cs.data(), sn.data());
      for (int64_t t = 0; t < N; ++t) {
        const int64_t k = step_index(t, N, givens_first);
        acc_t* __restrict__ vi = buf.data() + pairs[2 * k] * h;
        acc_t* __restrict__ vj = buf.data() + pairs[2 * k + 1] * h;
        const acc_t c = cs[t], s = sn[t];
        for (int64_t l = 0; l < h; ++l) {
          const acc_t x = vi[l], y = vj[l];
          vi[l] = c * x - s * y;
          vj[l] = s * x + c * y;
        }
      }
      store_lines(buf.data(), out + b * h * h, h, givens_first);
    }
  });
}

// sum over l of (b[l] x[l] - a[l] y[l]), in a fixed order (four interleaved partial sums).
template <typename acc_t>
acc_t angle_gradient(const acc_t* x, const acc_t* y, const acc_t* a, const acc_t* b, int64_t h) {
  acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t l = 0;
  for (; l + 4 <= h; l += 4) {
    s0 += b[l] * x[l] - a[l] * y[l];
    s1 += b[l + 1] * x[l + 1] - a[l + 1] * y[l + 1];
    s2 += b[l + 2] * x[l + 2] - a[l + 2] * y[l + 2];
    s3 += b[l + 3] * x[l + 3] - a[l + 3] * y[l + 3];
  }
  for (; l < h; ++l) s0 += b[l] * x[l] - a[l] * y[l];
  return (s0 + s1) + (s2 + s3);
}

template <typename scalar_t>
void backward_kernel(const at::Tensor& grad, const at::Tensor& M, const at::Tensor& thetas, const at::Tensor& pairs_t,
                     at::Tensor& grad_thetas, at::Tensor& grad_R, int64_t B, int64_t N, int64_t h, bool givens_first) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  const scalar_t* m = M.const_data_ptr<scalar_t>();
  const acc_t* theta = thetas.const_data_ptr<acc_t>();
  const int64_t* pairs = pairs_t.const_data_ptr<int64_t>();
  acc_t* gt = grad_thetas.mutable_data_ptr<acc_t>();
  acc_t* gr = grad_R.mutable_data_ptr<acc_t>();
  at::parallel_for(0, B, grain(2 * N, h), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> mb(h * h), ab(h * h), cs(N), sn(N);
    for (int64_t b = begin; b < end; ++b) {
      load_lines(m + b * h * h, mb.data(), h, givens_first);
      load_lines(g + b * h * h, ab.data(), h, givens_first);
      step_angles(theta + b * N, N, givens_first, cs.data(), sn.data());
      for (int64_t t = N - 1; t >= 0; --t) {
        const int64_t k = step_index(t, N, givens_first);
        const int64_t i = pairs[2 * k], j = pairs[2 * k + 1];
        acc_t* __restrict__ xi = mb.data() + i * h;
        acc_t* __restrict__ yj = mb.data() + j * h;
        acc_t* __restrict__ ai = ab.data() + i * h;
        acc_t* __restrict__ bj = ab.data() + j * h;
        const acc_t dphi = angle_gradient<acc_t>(xi, yj, ai, bj, h);
        gt[b * N + k] = givens_first ? dphi : -dphi;
        const acc_t c = cs[t], s = sn[t];
        for (int64_t l = 0; l < h; ++l) {  // undo the step: the transposed rotation
          const acc_t x = xi[l], y = yj[l], a = ai[l], bb = bj[l];
          xi[l] = c * x + s * y;
          yj[l] = -s * x + c * y;
          ai[l] = c * a + s * bb;
          bj[l] = -s * a + c * bb;
        }
      }
      store_lines(ab.data(), gr + b * h * h, h, givens_first);
    }
  });
}

at::Tensor orthogonal_product_cpu(const at::Tensor& thetas, const at::Tensor& pairs, const at::Tensor& R,
                                  bool givens_first) {
  check_arguments(thetas, pairs, R);
  Prepared p = prepare(thetas, pairs, R);
  check_pair_values(p.pairs, p.h);
  at::Tensor M = at::empty({p.B, p.h, p.h}, p.R.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.R.scalar_type(), "orthogonal_product_cpu",
                                  [&] { forward_kernel<scalar_t>(p, M, givens_first); });
  return M.view(with_tail(p.batch, {p.h, p.h}));
}

std::tuple<at::Tensor, at::Tensor> orthogonal_product_backward_cpu(const at::Tensor& grad, const at::Tensor& thetas,
                                                                   const at::Tensor& pairs, const at::Tensor& M,
                                                                   bool givens_first) {
  check_backward_arguments(grad, thetas, pairs, M);
  BackwardPrepared p = prepare_backward(grad, thetas, pairs, M);
  check_pair_values(p.pairs, p.h);
  at::Tensor grad_thetas = at::empty({p.B, p.N}, p.thetas.options());
  at::Tensor grad_R = at::empty({p.B, p.h, p.h}, p.thetas.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.M.scalar_type(), "orthogonal_product_backward_cpu", [&] {
    backward_kernel<scalar_t>(p.grad, p.M, p.thetas, p.pairs, grad_thetas, grad_R, p.B, p.N, p.h, givens_first);
  });
  return {grad_thetas.view(with_tail(p.batch, {p.N})), grad_R.view(with_tail(p.batch, {p.h, p.h}))};
}

}  // namespace

TORCH_LIBRARY(echo_kernels, m) {
  m.def("orthogonal_product(Tensor thetas, Tensor pairs, Tensor R, bool givens_first=True) -> Tensor");
  m.def(
      "orthogonal_product_backward(Tensor grad, Tensor thetas, Tensor pairs, Tensor M, bool givens_first)"
      " -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(echo_kernels, CPU, m) {
  m.impl("orthogonal_product", &orthogonal_product_cpu);
  m.impl("orthogonal_product_backward", &orthogonal_product_backward_cpu);
}

}  // namespace echo_kernels

#ifdef ECHO_KERNELS_PYTHON_MODULE
// `import echo_kernels._C` loads this library, which registers the ops above with the dispatcher.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "echo_kernels C++/CUDA ops (torch.ops.echo_kernels)",
                                      -1, nullptr};
  return PyModule_Create(&module);
}
#endif
