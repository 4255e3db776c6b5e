// CUDA kernels of echo_kernels::orthogonal_product (forward and backward). See orthogonal.h for the
// maths and the order of the steps.
//
// One launch applies all N steps. A block is one warp that owns a chunk of 32 lines (one per lane)
// of one batch entry, held in shared memory as lines[p * kLd + lane] (position p, padded stride kLd
// so that the transposed loads of the row-line case are free of bank conflicts). Steps are taken
// kTile at a time: the warp stages their pairs and cos/sin in shared memory, then every lane applies
// them to its line in order (pairs may overlap, so within a line the steps are sequential).
//
// Backward keeps M's and the gradient's lines, walks the steps in reverse, and writes each lane's
// contribution to dL/dphi of a step into a (kTile x 32) scratch; after the tile, lane u adds row u in
// lane order. Chunks of one batch entry write separate partials, added in chunk order by a second
// small kernel. No atomics: the angle gradients are the same bits run to run.
#include "orthogonal.h"

#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>

namespace echo_kernels {
namespace {

constexpr int kLines = 32;       // lines per block: one warp, one line per lane
constexpr int kLd = kLines + 1;  // shared stride between positions
constexpr int kTile = 64;        // steps staged in shared memory at a time

__device__ __forceinline__ void sin_cos(float x, float* s, float* c) { sincosf(x, s, c); }
__device__ __forceinline__ void sin_cos(double x, double* s, double* c) { sincos(x, s, c); }

// Shared memory carve-up, identical on host and device.
template <typename acc_t>
struct Layout {
  int h;
  __host__ __device__ size_t lines_elems() const { return static_cast<size_t>(h) * kLd; }
  // lines (x n_mats), tile cos, tile sin, [partials], tile offsets of i and j
  __host__ __device__ size_t bytes(int n_mats, bool partials) const {
    return sizeof(acc_t) * (n_mats * lines_elems() + 2 * kTile + (partials ? kTile * kLd : 0)) +
           sizeof(int) * 2 * kTile;
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

// Stage steps t0 .. t0+nt-1: cos/sin of their angle and the shared offsets of rows i and j.
// A bad pair (the host checks them for the CPU op and the public function; a direct call on CUDA is
// caught here) stops the kernel with a device-side assert; in builds without asserts it is skipped.
template <bool kRows, typename acc_t>
__device__ __forceinline__ void stage_steps(const acc_t* __restrict__ theta, const int64_t* __restrict__ pairs, int N,
                                            int h, int t0, int nt, int lane, acc_t* tc, acc_t* ts, int* ti, int* tj) {
  for (int u = lane; u < nt; u += kLines) {
    const int t = t0 + u;
    const int k = kRows ? t : N - 1 - t;
    const acc_t phi = kRows ? -theta[k] : theta[k];
    acc_t s, c;
    sin_cos(phi, &s, &c);
    tc[u] = c;
    ts[u] = s;
    const int64_t i = pairs[2 * k], j = pairs[2 * k + 1];
    const bool ok = 0 <= i && i < h && 0 <= j && j < h && i != j;
    CUDA_KERNEL_ASSERT(ok && "orthogonal_product: pairs must hold i != j, both in [0, h)");
    ti[u] = ok ? static_cast<int>(i) * kLd : -1;
    tj[u] = ok ? static_cast<int>(j) * kLd : -1;
  }
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

  const int lane = threadIdx.x;
  const int64_t b = blockIdx.x / nchunks;
  const int l0 = static_cast<int>(blockIdx.x % nchunks) * kLines;
  const int nl = min(kLines, h - l0);
  const int64_t hh = static_cast<int64_t>(h) * h;
  const acc_t* theta = thetas + b * N;

  load_lines<kRows>(R + b * hh, lines, h, l0, nl, lane);
  for (int t0 = 0; t0 < N; t0 += kTile) {
    const int nt = min(kTile, N - t0);
    __syncthreads();  // the previous tile is done with tc/ts/ti/tj (and the loads are visible)
    stage_steps<kRows>(theta, pairs, N, h, t0, nt, lane, tc, ts, ti, tj);
    __syncthreads();
    if (lane < nl) {
      for (int u = 0; u < nt; ++u) {
        const int oi = ti[u], oj = tj[u];
        if (oi < 0) continue;
        const acc_t c = tc[u], s = ts[u];
        const acc_t x = lines[oi + lane], y = lines[oj + lane];
        lines[oi + lane] = c * x - s * y;
        lines[oj + lane] = s * x + c * y;
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
  for (int t1 = N; t1 > 0; t1 -= kTile) {
    const int t0 = max(0, t1 - kTile);
    const int nt = t1 - t0;
    __syncthreads();  // the previous tile's reduction has read part and the stage arrays
    stage_steps<kRows>(theta, pairs, N, h, t0, nt, lane, tc, ts, ti, tj);
    __syncthreads();
    for (int u = nt - 1; u >= 0; --u) {
      const int oi = ti[u], oj = tj[u];
      acc_t d = 0;
      if (lane < nl && oi >= 0) {
        const acc_t c = tc[u], s = ts[u];
        const acc_t x = m[oi + lane], y = m[oj + lane];
        const acc_t ga = a[oi + lane], gb = a[oj + lane];
        d = gb * x - ga * y;
        m[oi + lane] = c * x + s * y;  // undo the step: the transposed rotation
        m[oj + lane] = -s * x + c * y;
        a[oi + lane] = c * ga + s * gb;
        a[oj + lane] = -s * ga + c * gb;
      }
      part[u * kLd + lane] = d;
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
    const auto stream = at::cuda::getCurrentCUDAStream();
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
    const auto stream = at::cuda::getCurrentCUDAStream();
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
