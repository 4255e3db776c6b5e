// echo_kernels::parallel_threads: how many threads at::parallel_for gives this extension's CPU kernels.
// ATen's parallel_for is compiled into its caller: built without OpenMP it runs every chunk on the calling
// thread, silently (setup.py compiles with -fopenmp where torch uses OpenMP). `python -m echo_kernels.info`
// reports the count, and the tests check it against torch.get_num_threads().
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace echo_kernels {
namespace {

int64_t parallel_threads() {
  const int64_t threads = at::get_num_threads();
  std::vector<char> ran(threads, 0);  // one slot per thread: no two threads write the same one
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) { ran[at::get_thread_num()] = 1; });
  return std::count(ran.begin(), ran.end(), 1);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(echo_kernels, m) { m.def("parallel_threads() -> int", &parallel_threads); }

}  // namespace echo_kernels
