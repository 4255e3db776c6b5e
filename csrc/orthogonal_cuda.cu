// CUDA kernels of echo_kernels::orthogonal_product (forward and backward). See orthogonal.h for the
// maths and the order of the steps.
//
// One launch applies all N steps. A block is one warp that owns a chunk of 32 lines (one per lane)
// of one batch entry, held in shared memory as lines[p * kLd + lane] (position p, padded stride kLd
// so that the transposed loads of the row-line case are free of bank conflicts). Steps are taken
// kTile at a time: the warp stages their pairs and cos/sin in shared memory, then every lane applies
// them to its line in order (pairs may overlap, so within a line the steps are sequential). Each
// tile's angles and pairs are read into registers while the tile before it is applied. Steps
// are taken in groups of four: when the four pairs touch eight distinct rows (or two by two), their
// loads are issued together, which shortens the chain of shared-memory round trips a lane waits on;
// disjoint rotations commute, so the result is the same bits as one at a time.
//
// Backward keeps M's and the gradient's lines, walks the steps in reverse, and writes each lane's
// contribution to dL/dphi of a step into a (kTile x 32) scratch; after the tile, lane u adds row u in
// lane order. Chunks of one batch entry write separate partials, added in chunk order by a second
// small kernel. No atomics: the angle gradients are the same bits run to run.
#include "orthogonal.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>

namespace echo_kernels {
namespace {

constexpr int kLines = 32;       // lines per block: one warp, one line per lane
constexpr int kLd = kLines + 1;  // shared stride between positions
constexpr int kTile = 64;        // steps staged in shared memory at a time
constexpr int kGroup = 4;        // steps per group (see group_flags)

__device__ __forceinline__ void sin_cos(float x, float* s, float* c) { sincosf(x, s, c); }
__device__ __forceinline__ void sin_cos(double x, double* s, double* c) { sincos(x, s, c); }

// Shared memory carve-up, identical on host and device.
template <typename acc_t>
struct Layout {
  int h;
  __host__ __device__ size_t lines_elems() const { return static_cast<size_t>(h) * kLd; }
  // lines (x n_mats), tile cos, tile sin, [partials], tile offsets of i and j, group flags
  __host__ __device__ size_t bytes(int n_mats, bool partials) const {
    return sizeof(acc_t) * (n_mats * lines_elems() + 2 * kTile + (partials ? kTile * kLd : 0)) +
           sizeof(int) * (2 * kTile + kTile / kGroup);
  }
};

// Copy the block's lines of one h x h matrix into shared memory (lines = rows if kRows, else columns).
template <bool kRows, typename src_t, typename acc_t>
__device__ __forceinline__ void load_lines(const src_t* __restrict__ src, acc_t* lines, int h, int l0, int nl,
                                           int lane) {
  if (kRows) {  // rows l0 .. l0+nl-1 are nl*h contiguous numbers
    const src_t* base = src + static_cast<int64_t>(l0) * h;
    for (int f = lane; f < nl * h; f += kLines) {
      const int r = f / h, p = f - r * h;
      lines[p * kLd + r] = static_cast<acc_t>(base[f]);
    }
  } else if (lane < nl) {
    for (int p = 0; p < h; ++p) lines[p * kLd + lane] = static_cast<acc_t>(src[static_cast<int64_t>(p) * h + l0 + lane]);
  }
}

template <bool kRows, typename dst_t, typename acc_t>
__device__ __forceinline__ void store_lines(const acc_t* lines, dst_t* __restrict__ dst, int h, int l0, int nl,
                                            int lane) {
  if (kRows) {
    dst_t* base = dst + static_cast<int64_t>(l0) * h;
    for (int f = lane; f < nl * h; f += kLines) {
      const int r = f / h, p = f - r * h;
      base[f] = static_cast<dst_t>(lines[p * kLd + r]);
    }
  } else if (lane < nl) {
    for (int p = 0; p < h; ++p) dst[static_cast<int64_t>(p) * h + l0 + lane] = static_cast<dst_t>(lines[p * kLd + lane]);
  }
}

// One lane's share of a tile's steps as read from global memory (steps lane and lane + 32 of the tile):
// read for the next tile before the current one is applied, so that the loads' latency hides behind
// that work instead of stalling the warp at every tile.
constexpr int kStepsPerLane = kTile / kLines;

template <typename acc_t>
struct StepLoads {
  acc_t phi[kStepsPerLane];
  int64_t i[kStepsPerLane], j[kStepsPerLane];
};

// Read steps t0 .. t0+nt-1: the angle each applies and its pair (rows i, j).
template <bool kRows, typename acc_t>
__device__ __forceinline__ StepLoads<acc_t> load_steps(const acc_t* __restrict__ theta,
                                                       const int64_t* __restrict__ pairs, int N, int t0, int nt,
                                                       int lane) {
  StepLoads<acc_t> loads{};
#pragma unroll
  for (int r = 0; r < kStepsPerLane; ++r) {
    const int u = lane + r * kLines;
    if (u < nt) {
      const int t = t0 + u;
      const int k = kRows ? t : N - 1 - t;
      loads.phi[r] = kRows ? -theta[k] : theta[k];
      loads.i[r] = pairs[2 * k];
      loads.j[r] = pairs[2 * k + 1];
    }
  }
  return loads;
}

// Stage the nt steps of a tile that load_steps read: cos/sin of their angle and the shared offsets
// of rows i and j. A bad pair (the host checks them for the CPU op and the public function; a direct
// call on CUDA is caught here) stops the kernel with a device-side assert; in builds without asserts
// it is skipped.
template <typename acc_t>
__device__ __forceinline__ void stage_steps(const StepLoads<acc_t>& loads, int h, int nt, int lane, acc_t* tc,
                                            acc_t* ts, int* ti, int* tj) {
#pragma unroll
  for (int r = 0; r < kStepsPerLane; ++r) {
    const int u = lane + r * kLines;
    if (u < nt) {
      acc_t s, c;
      sin_cos(loads.phi[r], &s, &c);
      tc[u] = c;
      ts[u] = s;
      const int64_t i = loads.i[r], j = loads.j[r];
      const bool ok = 0 <= i && i < h && 0 <= j && j < h && i != j;
      CUDA_KERNEL_ASSERT(ok && "orthogonal_product: pairs must hold i != j, both in [0, h)");
      ti[u] = ok ? static_cast<int>(i) * kLd : -1;
      tj[u] = ok ? static_cast<int>(j) * kLd : -1;
    }
  }
}

// After stage_steps (and a barrier): for each group g of steps 4g .. 4g+3 of the tile, bit 0 says all
// four are valid and touch eight distinct rows; bit 1 (2) says the same of steps 4g, 4g+1 (4g+2, 4g+3).
__device__ __forceinline__ void group_flags(const int* ti, const int* tj, int nt, int lane, int* tf) {
  for (int g = lane; g < (nt + kGroup - 1) / kGroup; g += kLines) {
    const int u0 = kGroup * g;
    auto valid = [&](int u) { return u < nt && ti[u] >= 0; };
    auto apart = [&](int u, int v) { return ti[u] != ti[v] && ti[u] != tj[v] && tj[u] != ti[v] && tj[u] != tj[v]; };
    const bool lo = valid(u0) && valid(u0 + 1) && apart(u0, u0 + 1);
    const bool hi = valid(u0 + 2) && valid(u0 + 3) && apart(u0 + 2, u0 + 3);
    const bool all = lo && hi && apart(u0, u0 + 2) && apart(u0, u0 + 3) && apart(u0 + 1, u0 + 2) && apart(u0 + 1, u0 + 3);
    tf[g] = (all ? 1 : 0) | (lo ? 2 : 0) | (hi ? 4 : 0);
  }
}

// Apply steps u0 .. u0+G-1 of the tile to this lane's line. G > 1 only for steps on distinct rows.
// Every load comes before the first store, so that the G chains overlap (the stage arrays and the
// lines are separate regions of shared memory: __restrict__ lets the compiler know).
template <int G, typename acc_t>
__device__ __forceinline__ void forward_steps(int u0, int lane, acc_t* __restrict__ lines,
                                              const acc_t* __restrict__ tc, const acc_t* __restrict__ ts,
                                              const int* __restrict__ ti, const int* __restrict__ tj) {
  int oi[G], oj[G];
  acc_t x[G], y[G], c[G], s[G];
#pragma unroll
  for (int q = 0; q < G; ++q) {
    oi[q] = ti[u0 + q];
    oj[q] = tj[u0 + q];
    c[q] = tc[u0 + q];
    s[q] = ts[u0 + q];
  }
  if (G == 1 && oi[0] < 0) return;  // a bad pair, skipped
#pragma unroll
  for (int q = 0; q < G; ++q) {
    x[q] = lines[oi[q] + lane];
    y[q] = lines[oj[q] + lane];
  }
#pragma unroll
  for (int q = 0; q < G; ++q) {
    lines[oi[q] + lane] = c[q] * x[q] - s[q] * y[q];
    lines[oj[q] + lane] = s[q] * x[q] + c[q] * y[q];
  }
}

// Undo steps u0 .. u0+G-1 (any order: G > 1 only for steps on distinct rows) on this lane's lines of
// M and of the gradient, writing each step's contribution to dL/dphi to part (0 where inactive).
template <int G, typename acc_t>
__device__ __forceinline__ void backward_steps(int u0, bool active, int lane, acc_t* __restrict__ m,
                                               acc_t* __restrict__ a, const acc_t* __restrict__ tc,
                                               const acc_t* __restrict__ ts, const int* __restrict__ ti,
                                               const int* __restrict__ tj, acc_t* __restrict__ part) {
  int oi[G], oj[G];
  acc_t d[G], c[G], s[G];
  bool on = active;
#pragma unroll
  for (int q = 0; q < G; ++q) {
    oi[q] = ti[u0 + q];
    oj[q] = tj[u0 + q];
    c[q] = tc[u0 + q];
    s[q] = ts[u0 + q];
    on = on && oi[q] >= 0;
    d[q] = 0;
  }
  if (on) {
    acc_t x[G], y[G], ga[G], gb[G];
#pragma unroll
    for (int q = 0; q < G; ++q) {
      x[q] = m[oi[q] + lane];
      y[q] = m[oj[q] + lane];
      ga[q] = a[oi[q] + lane];
      gb[q] = a[oj[q] + lane];
    }
#pragma unroll
    for (int q = 0; q < G; ++q) {
      d[q] = gb[q] * x[q] - ga[q] * y[q];
      m[oi[q] + lane] = c[q] * x[q] + s[q] * y[q];  // undo the step: the transposed rotation
      m[oj[q] + lane] = -s[q] * x[q] + c[q] * y[q];
      a[oi[q] + lane] = c[q] * ga[q] + s[q] * gb[q];
      a[oj[q] + lane] = -s[q] * ga[q] + c[q] * gb[q];
    }
  }
#pragma unroll
  for (int q = 0; q < G; ++q) part[(u0 + q) * kLd + lane] = d[q];
}

template <typename scalar_t, typename acc_t, bool kRows>
__global__ void __launch_bounds__(kLines)
    forward_kernel(const scalar_t* __restrict__ R, scalar_t* __restrict__ M, const acc_t* __restrict__ thetas,
                   const int64_t* __restrict__ pairs, int N, int h, int nchunks) {
  extern __shared__ __align__(16) unsigned char smem[];
  const Layout<acc_t> layout{h};
  acc_t* lines = reinterpret_cast<acc_t*>(smem);
  acc_t* tc = lines + layout.lines_elems();
  acc_t* ts = tc + kTile;
  int* ti = reinterpret_cast<int*>(ts + kTile);
  int* tj = ti + kTile;
  int* tf = tj + kTile;

  const int lane = threadIdx.x;
  const int64_t b = blockIdx.x / nchunks;
  const int l0 = static_cast<int>(blockIdx.x % nchunks) * kLines;
  const int nl = min(kLines, h - l0);
  const int64_t hh = static_cast<int64_t>(h) * h;
  const acc_t* theta = thetas + b * N;

  load_lines<kRows>(R + b * hh, lines, h, l0, nl, lane);
  StepLoads<acc_t> next = load_steps<kRows>(theta, pairs, N, 0, min(kTile, N), lane);
  for (int t0 = 0; t0 < N; t0 += kTile) {
    const int nt = min(kTile, N - t0);
    __syncthreads();  // the previous tile is done with tc/ts/ti/tj (and the loads are visible)
    stage_steps(next, h, nt, lane, tc, ts, ti, tj);
    __syncthreads();
    group_flags(ti, tj, nt, lane, tf);
    __syncthreads();
    if (t0 + kTile < N) next = load_steps<kRows>(theta, pairs, N, t0 + kTile, min(kTile, N - t0 - kTile), lane);
    if (lane < nl) {
      for (int u0 = 0; u0 < nt; u0 += kGroup) {
        const int f = tf[u0 / kGroup];
        if (f & 1) {
          forward_steps<4>(u0, lane, lines, tc, ts, ti, tj);
          continue;
        }
        for (int half = 0; half < 2; ++half) {
          const int ua = u0 + 2 * half;
          if (f & (2 << half)) {
            forward_steps<2>(ua, lane, lines, tc, ts, ti, tj);
          } else {
            for (int u = ua; u < min(ua + 2, nt); ++u) forward_steps<1>(u, lane, lines, tc, ts, ti, tj);
          }
        }
      }
    }
  }
  __syncthreads();
  store_lines<kRows>(lines, M + b * hh, h, l0, nl, lane);
}

template <typename scalar_t, typename acc_t, bool kRows>
__global__ void __launch_bounds__(kLines)
    backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ M,
                    const acc_t* __restrict__ thetas, const int64_t* __restrict__ pairs, acc_t* __restrict__ grad_R,
                    acc_t* __restrict__ partial, int N, int h, int nchunks) {
  extern __shared__ __align__(16) unsigned char smem[];
  const Layout<acc_t> layout{h};
  acc_t* m = reinterpret_cast<acc_t*>(smem);
  acc_t* a = m + layout.lines_elems();
  acc_t* tc = a + layout.lines_elems();
  acc_t* ts = tc + kTile;
  acc_t* part = ts + kTile;  // kTile x kLd
  int* ti = reinterpret_cast<int*>(part + kTile * kLd);
  int* tj = ti + kTile;
  int* tf = tj + kTile;

  const int lane = threadIdx.x;
  const int64_t b = blockIdx.x / nchunks;
  const int chunk = static_cast<int>(blockIdx.x % nchunks);
  const int l0 = chunk * kLines;
  const int nl = min(kLines, h - l0);
  const int64_t hh = static_cast<int64_t>(h) * h;
  const acc_t* theta = thetas + b * N;
  acc_t* out_partial = partial + (b * nchunks + chunk) * N;

  load_lines<kRows>(M + b * hh, m, h, l0, nl, lane);
  load_lines<kRows>(grad + b * hh, a, h, l0, nl, lane);
  StepLoads<acc_t> next = load_steps<kRows>(theta, pairs, N, max(0, N - kTile), min(kTile, N), lane);
  for (int t1 = N; t1 > 0; t1 -= kTile) {
    const int t0 = max(0, t1 - kTile);
    const int nt = t1 - t0;
    __syncthreads();  // the previous tile's reduction has read part and the stage arrays
    stage_steps(next, h, nt, lane, tc, ts, ti, tj);
    __syncthreads();
    group_flags(ti, tj, nt, lane, tf);
    __syncthreads();
    if (t0 > 0) next = load_steps<kRows>(theta, pairs, N, max(0, t0 - kTile), t0 - max(0, t0 - kTile), lane);
    const bool active = lane < nl;  // every lane still writes its (zero) share of part
    for (int u0 = kGroup * ((nt - 1) / kGroup); u0 >= 0; u0 -= kGroup) {  // groups, last first
      const int f = tf[u0 / kGroup];
      if (f & 1) {
        backward_steps<4>(u0, active, lane, m, a, tc, ts, ti, tj, part);
        continue;
      }
      for (int half = 1; half >= 0; --half) {
        const int ua = u0 + 2 * half;
        if (f & (2 << half)) {
          backward_steps<2>(ua, active, lane, m, a, tc, ts, ti, tj, part);
        } else {
          for (int u = min(ua + 2, nt) - 1; u >= ua; --u) backward_steps<1>(u, active, lane, m, a, tc, ts, ti, tj, part);
        }
      }
    }
    __syncthreads();
    for (int u = lane; u < nt; u += kLines) {  // fixed order: lane 0 .. 31
      acc_t sum = 0;
      for (int q = 0; q < kLines; ++q) sum += part[u * kLd + q];
      const int t = t0 + u;
      const int k = kRows ? t : N - 1 - t;
      out_partial[k] = kRows ? -sum : sum;
    }
  }
  __syncthreads();
  store_lines<kRows>(a, grad_R + b * hh, h, l0, nl, lane);
}

// out[b, k] = sum over chunks c (in order) of partial[b, c, k].
template <typename acc_t>
__global__ void sum_chunks_kernel(const acc_t* __restrict__ partial, acc_t* __restrict__ out, int64_t BN, int N,
                                  int nchunks) {
  const int64_t x = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (x >= BN) return;
  const int64_t b = x / N, k = x - b * N;
  const acc_t* p = partial + b * nchunks * N + k;
  acc_t sum = 0;
  for (int c = 0; c < nchunks; ++c) sum += p[static_cast<int64_t>(c) * N];
  out[x] = sum;
}

template <typename Kernel>
void allow_shared_memory(Kernel kernel, size_t bytes, int device) {
  if (bytes <= 48 * 1024) return;
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(bytes <= static_cast<size_t>(optin), "orthogonal_product: h needs ", bytes,
              " bytes of shared memory per block; this GPU offers ", optin);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

void check_sizes(int64_t B, int64_t N, int64_t h) {
  const int64_t blocks = B * ((h + kLines - 1) / kLines);
  TORCH_CHECK(blocks < (int64_t{1} << 31), "orthogonal_product: batch of ", B, " matrices is too large for one launch");
  TORCH_CHECK(N < (int64_t{1} << 31) / 2, "orthogonal_product: N = ", N, " is too large");
}

at::Tensor orthogonal_product_cuda(const at::Tensor& thetas, const at::Tensor& pairs, const at::Tensor& R,
                                   bool givens_first) {
  check_arguments(thetas, pairs, R);
  const c10::cuda::CUDAGuard guard(R.device());
  Prepared p = prepare(thetas, pairs, R);
  check_sizes(p.B, p.N, p.h);
  at::Tensor M = at::empty({p.B, p.h, p.h}, p.R.options());
  if (p.B > 0) {
    const int h = static_cast<int>(p.h), N = static_cast<int>(p.N);
    const int nchunks = (h + kLines - 1) / kLines;
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.R.scalar_type(), "orthogonal_product_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      auto kernel = givens_first ? forward_kernel<scalar_t, acc_t, false> : forward_kernel<scalar_t, acc_t, true>;
      const size_t bytes = Layout<acc_t>{h}.bytes(1, false);
      allow_shared_memory(kernel, bytes, R.get_device());
      kernel<<<static_cast<unsigned>(p.B * nchunks), kLines, bytes, stream>>>(
          p.R.const_data_ptr<scalar_t>(), M.mutable_data_ptr<scalar_t>(), p.thetas.const_data_ptr<acc_t>(),
          p.pairs.const_data_ptr<int64_t>(), N, h, nchunks);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return M.view(with_tail(p.batch, {p.h, p.h}));
}

std::tuple<at::Tensor, at::Tensor> orthogonal_product_backward_cuda(const at::Tensor& grad, const at::Tensor& thetas,
                                                                    const at::Tensor& pairs, const at::Tensor& M,
                                                                    bool givens_first) {
  check_backward_arguments(grad, thetas, pairs, M);
  const c10::cuda::CUDAGuard guard(M.device());
  BackwardPrepared p = prepare_backward(grad, thetas, pairs, M);
  check_sizes(p.B, p.N, p.h);
  at::Tensor grad_thetas = at::empty({p.B, p.N}, p.thetas.options());
  at::Tensor grad_R = at::empty({p.B, p.h, p.h}, p.thetas.options());
  if (p.B > 0) {
    const int h = static_cast<int>(p.h), N = static_cast<int>(p.N);
    const int nchunks = (h + kLines - 1) / kLines;
    at::Tensor partial = nchunks == 1 ? grad_thetas : at::empty({p.B, nchunks, p.N}, p.thetas.options());
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.M.scalar_type(), "orthogonal_product_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      auto kernel = givens_first ? backward_kernel<scalar_t, acc_t, false> : backward_kernel<scalar_t, acc_t, true>;
      const size_t bytes = Layout<acc_t>{h}.bytes(2, true);
      allow_shared_memory(kernel, bytes, M.get_device());
      kernel<<<static_cast<unsigned>(p.B * nchunks), kLines, bytes, stream>>>(
          p.grad.const_data_ptr<scalar_t>(), p.M.const_data_ptr<scalar_t>(), p.thetas.const_data_ptr<acc_t>(),
          p.pairs.const_data_ptr<int64_t>(), grad_R.mutable_data_ptr<acc_t>(), partial.mutable_data_ptr<acc_t>(), N,
          h, nchunks);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (nchunks > 1 && N > 0) {
        const int64_t BN = p.B * p.N;
        const int threads = 256;
        sum_chunks_kernel<acc_t><<<static_cast<unsigned>((BN + threads - 1) / threads), threads, 0, stream>>>(
            partial.const_data_ptr<acc_t>(), grad_thetas.mutable_data_ptr<acc_t>(), BN, N, nchunks);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
  return {grad_thetas.view(with_tail(p.batch, {p.N})), grad_R.view(with_tail(p.batch, {p.h, p.h}))};
}

}  // namespace

TORCH_LIBRARY_IMPL(echo_kernels, CUDA, m) {
  m.impl("orthogonal_product", &orthogonal_product_cuda);
  m.impl("orthogonal_product_backward", &orthogonal_product_backward_cuda);
}

}  // namespace echo_kernels
