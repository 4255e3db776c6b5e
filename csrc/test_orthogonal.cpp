// A small C++ test of echo_kernels::orthogonal_product (run by ctest): the op against dense Givens
// products, its backward against finite differences, and its argument checks.
#include <torch/torch.h>

#include <cstdio>
#include <cstdlib>

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  std::printf("%s: %s\n", ok ? "ok  " : "FAIL", what);
  failures += ok ? 0 : 1;
}

at::Tensor givens(int64_t h, int64_t i, int64_t j, double theta) {
  at::Tensor G = torch::eye(h, torch::kFloat64);
  G[i][i] = std::cos(theta);
  G[j][j] = std::cos(theta);
  G[i][j] = -std::sin(theta);
  G[j][i] = std::sin(theta);
  return G;
}

}  // namespace

int main() {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("echo_kernels::orthogonal_product", "")
                .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>();
  auto backward = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("echo_kernels::orthogonal_product_backward", "")
                      .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&, bool)>();
  torch::manual_seed(0);
  const int64_t h = 12, N = 40;
  at::Tensor i = torch::randint(0, h, {N}, torch::kLong);
  at::Tensor j = (i + torch::randint(1, h, {N}, torch::kLong)) % h;
  at::Tensor pairs = torch::stack({i, j}, 1);
  at::Tensor thetas = torch::randn({N}, torch::kFloat64);
  at::Tensor R = torch::randn({h, h}, torch::kFloat64);

  at::Tensor dense = torch::eye(h, torch::kFloat64);
  for (int64_t k = 0; k < N; ++k)
    dense = dense.matmul(givens(h, pairs[k][0].item<int64_t>(), pairs[k][1].item<int64_t>(), thetas[k].item<double>()));
  expect(torch::allclose(op.call(thetas, pairs, R, true), dense.matmul(R), 1e-12, 1e-12), "G_1 ... G_N R");
  expect(torch::allclose(op.call(thetas, pairs, R, false), R.matmul(dense), 1e-12, 1e-12), "R G_1 ... G_N");

  // d/dtheta_k of sum(W * M) by central differences.
  at::Tensor W = torch::randn({h, h}, torch::kFloat64);
  at::Tensor M = op.call(thetas, pairs, R, true);
  auto grads = backward.call(W, thetas, pairs, M, true);
  const int64_t k = 7;
  const double eps = 1e-6;
  at::Tensor plus = thetas.clone(), minus = thetas.clone();
  plus[k] += eps;
  minus[k] -= eps;
  const double fd = ((op.call(plus, pairs, R, true) - op.call(minus, pairs, R, true)) * W).sum().item<double>() / (2 * eps);
  expect(std::abs(std::get<0>(grads)[k].item<double>() - fd) < 1e-6, "angle gradient");
  expect(torch::allclose(std::get<1>(grads), dense.transpose(0, 1).matmul(W), 1e-10, 1e-10), "R gradient");

  bool raised = false;
  try {
    op.call(thetas, torch::zeros({N, 2}, torch::kLong), R, true);
  } catch (const c10::Error& e) {
    raised = std::string(e.what()).find("needs i != j") != std::string::npos;
  }
  expect(raised, "i == j is rejected");
  return failures ? EXIT_FAILURE : EXIT_SUCCESS;
}
