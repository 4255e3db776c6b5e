// echo_kernels::biased_attention_backward: the CPU backward of echo_attention's core, softmax(q k^T + bias +
// masks) v, with the gradient of the relative bias table (docs/model.md, Kernels).
//
// Query i of a head sees key j when i + shift - left <= j <= i + shift + right and j is not padded; its logit
// is then q_i . k_j + bias[clamp(i + shift - j, -(n-1), n-1) + n - 1, head], q coming scaled. From the
// forward's output O and logsumexp L, with D_i = dO_i . O_i:
//
//     P = exp(logits - L) (0 where masked),   dS = P * (dO v^T - D),
//     dv = P^T dO,   dq = dS k,   dk = dS^T q,   dbias[r, head] = sum of dS over the pairs of row r.
//
// One (batch, head) at a time per thread, in blocks of queries and keys (only the key blocks the band
// reaches): a block's probabilities and score gradients stay in cache between its five matrix products,
// and dbias is summed from dS while it is there, by region of the clamp: a run of keys past it on either
// side adds to one row, each of the 2n - 3 keys near the diagonal to its own. A head's dk, dv and dbias
// belong to the thread that owns the head: nothing is reduced across threads, and the batch's dbias is
// summed in a fixed order after, so the same inputs give the same bits.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <utility>

// MKL's thread count for the calling thread alone, where torch is built with MKL (libtorch_cpu exports it;
// elsewhere the weak reference is null). torch turns MKL's dynamic threading off, so a BLAS call inside one
// of at::parallel_for's threads would start a team of its own on cores the other threads are using.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace echo_kernels {
namespace {

// Within its scope the calling thread's BLAS calls run on that thread only.
class SerialBlas {
 public:
  SerialBlas() : previous_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SerialBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous_);  // 0: back to the global count
  }
  SerialBlas(const SerialBlas&) = delete;
  SerialBlas& operator=(const SerialBlas&) = delete;

 private:
  int previous_;
};

// A block of the logits: up to kBlockRows queries, and keys to make kBlockElements but at least kBlockKeys
// (a key block of k and v, 128 KB each at h = 64 in float32, stays in cache across the block's products;
// fewer queries, as in a decoder's cross-attention, take more keys per product), with the score gradients
// beside them ~1 MB (float32): L2-sized.
constexpr int64_t kBlockRows = 256;
constexpr int64_t kBlockKeys = 512;
constexpr int64_t kBlockElements = 1 << 17;

// Vector clones of the elementwise loops for x86-64 CPUs that have the instructions, chosen when the library
// loads; the plain build targets the baseline (SSE2).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ECHO_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2,fma", "default")))
#else
#define ECHO_VECTOR_CLONES
#endif

// x[j] <- exp(x[j] + add). float: e^y = 2^n e^f with n = round(y / ln 2) put in the exponent bits and
// f = y - n ln 2 (ln 2 in two parts, the first exact times n: Cody and Waite's reduction) taken by its
// Taylor polynomial to degree 7 on |f| <= ln 2 / 2; written so the compiler vectorizes it, where std::exp
// stays a scalar call. Below -87 the result is about 1e-38 instead of smaller: it is a probability next to
// at least one of 1 in its row.
ECHO_VECTOR_CLONES void exp_shifted(float* __restrict x, float add, int64_t count) {
  for (int64_t j = 0; j < count; ++j) {
    float y = x[j] + add;
    y = y > -87.0f ? y : -87.0f;
    const float n = (y * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // 1.5 * 2^23: rounds to nearest
    const float f = (y - n * 0.693145751953125f) - n * 1.42860676533018707e-6f;
    float p = 1.98412698e-4f;
    p = p * f + 1.38888889e-3f;
    p = p * f + 8.33333333e-3f;
    p = p * f + 4.16666667e-2f;
    p = p * f + 1.66666667e-1f;
    p = p * f + 0.5f;
    p = p * f + 1.0f;
    p = p * f + 1.0f;
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    float two_n;
    std::memcpy(&two_n, &bits, sizeof(float));
    x[j] = p * two_n;
  }
}

void exp_shifted(double* x, double add, int64_t count) {
  for (int64_t j = 0; j < count; ++j) x[j] = std::exp(x[j] + add);
}

// ds[j] <- p[j] (ds[j] - D); returns the sum of the new ds.
template <typename scalar_t>
inline double score_gradients_impl(scalar_t* __restrict ds, const scalar_t* __restrict p, scalar_t D, int64_t count) {
  scalar_t partial[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // eight running sums, which the compiler keeps in vectors
  int64_t j = 0;
  for (; j + 8 <= count; j += 8)
    for (int l = 0; l < 8; ++l) {
      ds[j + l] = p[j + l] * (ds[j + l] - D);
      partial[l] += ds[j + l];
    }
  double total = 0.0;
  for (int l = 0; l < 8; ++l) total += partial[l];
  for (; j < count; ++j) {
    ds[j] = p[j] * (ds[j] - D);
    total += ds[j];
  }
  return total;
}

ECHO_VECTOR_CLONES double score_gradients(float* ds, const float* p, float D, int64_t count) {
  return score_gradients_impl(ds, p, D, count);
}

double score_gradients(double* ds, const double* p, double D, int64_t count) {
  return score_gradients_impl(ds, p, D, count);
}

// The keys one query row r = i + shift meets, split by the bias row they take: [lo, far) past the clamp on
// the keys' past side (row 2n - 2), [far, near) near the diagonal (row r - j + n - 1), [near, hi) past it on
// the other side (row 0); [lo, hi) is the band, clipped to the keys.
struct RowKeys {
  int64_t lo, far, near, hi;
};

inline RowKeys row_keys(int64_t r, int64_t n, int64_t left, int64_t right, int64_t Tk) {
  const int64_t lo = std::clamp<int64_t>(r - left, 0, Tk), hi = std::clamp<int64_t>(r + right + 1, lo, Tk);
  const int64_t far = std::clamp<int64_t>(r - n + 2, lo, hi);
  return {lo, far, std::clamp<int64_t>(r + n - 1, far, hi), hi};
}

// [lo, hi) of the keys as columns of a block that starts at key j0 and is w wide: (first, count).
inline std::pair<int64_t, int64_t> in_block(int64_t lo, int64_t hi, int64_t j0, int64_t w) {
  const int64_t a = std::clamp<int64_t>(lo - j0, 0, w), b = std::clamp<int64_t>(hi - j0, a, w);
  return {a, b - a};
}

template <typename scalar_t>
struct Head {
  at::Tensor q, k, v, dout, dq, dk, dv;  // (T, h) rows of one (batch, head)
  const scalar_t* lse;
  const scalar_t* delta;
  const scalar_t* bias;  // this head's column of the (2n - 1, H) table, stride bias_stride; null without bias
  int64_t bias_stride, n;
  const bool* padded;  // (Tk,) this batch's key padding, or null
  int64_t left, right, shift;
  double* dbias;  // (2n - 1,) this head's sums, or null
};

// One query row of a block: P = exp(logits + bias - L) in place, 0 at the keys the row does not see.
template <typename scalar_t>
void probabilities_row(scalar_t* row, const Head<scalar_t>& hd, const RowKeys& s, int64_t r, scalar_t L,
                       int64_t j0, int64_t w) {
  const auto seen = in_block(s.lo, s.hi, j0, w);
  std::fill(row, row + seen.first, scalar_t(0));
  std::fill(row + seen.first + seen.second, row + w, scalar_t(0));
  if (!hd.bias) {
    exp_shifted(row + seen.first, -L, seen.second);
  } else {
    const int64_t n = hd.n, stride = hd.bias_stride;
    const auto far = in_block(s.lo, s.far, j0, w), near = in_block(s.far, s.near, j0, w);
    const auto beyond = in_block(s.near, s.hi, j0, w);
    exp_shifted(row + far.first, hd.bias[(2 * n - 2) * stride] - L, far.second);
    for (int64_t j = near.first; j < near.first + near.second; ++j)
      row[j] = std::exp(row[j] + hd.bias[(r - (j0 + j) + n - 1) * stride] - L);
    exp_shifted(row + beyond.first, hd.bias[0] - L, beyond.second);
  }
  if (hd.padded)
    for (int64_t j = seen.first; j < seen.first + seen.second; ++j)
      if (hd.padded[j0 + j]) row[j] = 0;
}

// One query row of a block: dS = P (dP - D) in place of dP (0 at the keys the row does not see, whatever
// their values), summed into dbias by bias row.
template <typename scalar_t>
void score_gradients_row(scalar_t* row, const scalar_t* prow, const Head<scalar_t>& hd, const RowKeys& s,
                         int64_t r, scalar_t D, int64_t j0, int64_t w) {
  const auto seen = in_block(s.lo, s.hi, j0, w);
  std::fill(row, row + seen.first, scalar_t(0));
  std::fill(row + seen.first + seen.second, row + w, scalar_t(0));
  if (!hd.dbias) {
    score_gradients(row + seen.first, prow + seen.first, D, seen.second);
    return;
  }
  const int64_t n = hd.n;
  const auto far = in_block(s.lo, s.far, j0, w), near = in_block(s.far, s.near, j0, w);
  const auto beyond = in_block(s.near, s.hi, j0, w);
  hd.dbias[2 * n - 2] += score_gradients(row + far.first, prow + far.first, D, far.second);
  for (int64_t j = near.first; j < near.first + near.second; ++j) {
    row[j] = prow[j] * (row[j] - D);
    hd.dbias[r - (j0 + j) + n - 1] += row[j];
  }
  hd.dbias[0] += score_gradients(row + beyond.first, prow + beyond.first, D, beyond.second);
}

template <typename scalar_t>
void head_backward(const Head<scalar_t>& hd, at::Tensor& logits, at::Tensor& dlogits, int64_t rows, int64_t cols) {
  const int64_t Tq = hd.q.size(0), Tk = hd.k.size(0), n = hd.n;
  const int64_t ld = logits.stride(0);
  for (int64_t a = 0; a < Tq; a += rows) {
    const int64_t c = std::min(rows, Tq - a);
    const at::Tensor q_blk = hd.q.narrow(0, a, c), do_blk = hd.dout.narrow(0, a, c);
    at::Tensor dq_blk = hd.dq.narrow(0, a, c);
    // the keys some query of the block sees: from the first row's band start to the last row's end
    const int64_t first = row_keys(a + hd.shift, n, hd.left, hd.right, Tk).lo;
    const int64_t last = row_keys(a + c - 1 + hd.shift, n, hd.left, hd.right, Tk).hi;
    for (int64_t j0 = first; j0 < last; j0 += cols) {
      const int64_t w = std::min(cols, last - j0);
      const at::Tensor k_blk = hd.k.narrow(0, j0, w), v_blk = hd.v.narrow(0, j0, w);
      at::Tensor p = logits.narrow(0, 0, c).narrow(1, 0, w), ds = dlogits.narrow(0, 0, c).narrow(1, 0, w);
      at::mm_out(p, q_blk, k_blk.t());
      scalar_t* p_data = p.data_ptr<scalar_t>();
      for (int64_t i = 0; i < c; ++i) {
        const int64_t r = a + i + hd.shift;
        probabilities_row(p_data + i * ld, hd, row_keys(r, n, hd.left, hd.right, Tk), r, hd.lse[a + i], j0, w);
      }
      hd.dv.narrow(0, j0, w).addmm_(p.t(), do_blk);
      at::mm_out(ds, do_blk, v_blk.t());
      scalar_t* ds_data = ds.data_ptr<scalar_t>();
      for (int64_t i = 0; i < c; ++i) {
        const int64_t r = a + i + hd.shift;
        score_gradients_row(ds_data + i * ld, p_data + i * ld, hd, row_keys(r, n, hd.left, hd.right, Tk), r,
                            hd.delta[a + i], j0, w);
      }
      dq_blk.addmm_(ds, k_blk);
      hd.dk.narrow(0, j0, w).addmm_(ds.t(), q_blk);
    }
  }
}

void check_arguments(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& bias,
                     const std::optional<at::Tensor>& key_padding_mask) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "biased_attention_backward: q, k, v must be (B, H, T, h)");
  TORCH_CHECK(q.device().is_cpu(), "biased_attention_backward: a CPU kernel, got tensors on ", q.device());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "biased_attention_backward: float32 or float64, got ", q.scalar_type());
  const auto B = q.size(0), H = q.size(1), Tq = q.size(2), h = q.size(3), Tk = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(1) == H && k.size(3) == h,
              "biased_attention_backward: k and v must be (B, H, Tk, h) of q's B, H, h; got ", k.sizes(), " and ",
              v.sizes());
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "biased_attention_backward: dout and out must be q's shape ", q.sizes());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == H && lse.size(2) == Tq,
              "biased_attention_backward: lse must be (B, H, Tq), got ", lse.sizes());
  for (const at::Tensor* t : {&dout, &k, &v, &out, &lse})
    TORCH_CHECK(t->scalar_type() == q.scalar_type() && t->device() == q.device(),
                "biased_attention_backward: every tensor must be q's dtype and device");
  if (bias) {
    TORCH_CHECK(bias->dim() == 2 && bias->size(1) == H && bias->size(0) % 2 == 1,
                "biased_attention_backward: bias must be (2n - 1, H), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == q.scalar_type() && bias->device() == q.device(),
                "biased_attention_backward: bias must be q's dtype and device");
  }
  if (key_padding_mask) {
    TORCH_CHECK(key_padding_mask->dim() == 2 && key_padding_mask->size(0) == B && key_padding_mask->size(1) == Tk &&
                    key_padding_mask->scalar_type() == at::kBool && key_padding_mask->device() == q.device(),
                "biased_attention_backward: key_padding_mask must be (B, Tk) bool, got ", key_padding_mask->sizes(), " ",
                key_padding_mask->scalar_type());
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> biased_attention_backward_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& key_padding_mask,
    int64_t left, int64_t right, int64_t shift) {
  check_arguments(dout, q, k, v, out, lse, bias, key_padding_mask);
  const auto B = q.size(0), H = q.size(1), Tq = q.size(2), h = q.size(3), Tk = k.size(2);
  const int64_t BH = B * H;
  // Past Tq + Tk of either side the band cuts nothing more; clipped, no sum below can overflow.
  const int64_t reach = Tq + Tk + std::abs(shift);
  left = std::clamp<int64_t>(left, -reach, reach);
  right = std::clamp<int64_t>(right, -reach, reach);
  const at::Tensor q3 = q.reshape({BH, Tq, h}).contiguous(), k3 = k.reshape({BH, Tk, h}).contiguous();
  const at::Tensor v3 = v.reshape({BH, Tk, h}).contiguous(), do3 = dout.reshape({BH, Tq, h}).contiguous();
  const at::Tensor lse2 = lse.reshape({BH, Tq}).contiguous();
  const at::Tensor delta = do3.mul(out.reshape({BH, Tq, h})).sum(-1);  // (BH, Tq): D_i = dO_i . O_i
  const at::Tensor table = bias ? bias->contiguous() : at::Tensor();
  const at::Tensor padded = key_padding_mask ? key_padding_mask->contiguous() : at::Tensor();
  const int64_t n = bias ? (table.size(0) + 1) / 2 : 1;
  at::Tensor dq = at::zeros_like(q3), dk = at::zeros_like(k3), dv = at::zeros_like(v3);
  // each head's row of sums on cache lines of its own (rows of 8 doubles): heads of different threads
  const int64_t rows_of_bias = bias ? 2 * n - 1 : 0;
  at::Tensor dbias_heads = at::zeros({BH, (rows_of_bias + 7) / 8 * 8}, q.options().dtype(at::kDouble));
  const int64_t rows = std::clamp<int64_t>(Tq, 1, kBlockRows);
  const int64_t cols = std::clamp<int64_t>(std::max(kBlockKeys, kBlockElements / rows), 1, std::max<int64_t>(Tk, 1));
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "biased_attention_backward_cpu", [&] {
    at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
      const SerialBlas serial;  // the heads are the parallelism
      // a worker thread starts without the caller's dispatch state: autograd would see q, k, v needing grad
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      at::Tensor logits = at::empty({rows, cols}, q3.options()), dlogits = at::empty_like(logits);
      for (int64_t bh = begin; bh < end; ++bh) {
        const Head<scalar_t> hd{q3[bh], k3[bh], v3[bh], do3[bh], dq[bh], dk[bh], dv[bh],
                                lse2[bh].data_ptr<scalar_t>(), delta[bh].data_ptr<scalar_t>(),
                                bias ? table.data_ptr<scalar_t>() + bh % H : nullptr, H, n,
                                key_padding_mask ? padded[bh / H].data_ptr<bool>() : nullptr, left, right, shift,
                                bias ? dbias_heads[bh].data_ptr<double>() : nullptr};
        head_backward<scalar_t>(hd, logits, dlogits, rows, cols);
      }
    });
  });
  // (2n - 1, H), the batch summed in order; (0, H) without a bias
  const at::Tensor dbias =
      dbias_heads.narrow(1, 0, rows_of_bias).view({B, H, rows_of_bias}).sum(0).t().contiguous().to(q.scalar_type());
  return {dq.view(q.sizes()), dk.view(k.sizes()), dv.view(v.sizes()), dbias};
}

TORCH_LIBRARY_FRAGMENT(echo_kernels, m) {
  m.def(
      "biased_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? bias,"
      " Tensor? key_padding_mask, int left, int right, int shift) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(echo_kernels, CPU, m) { m.impl("biased_attention_backward", &biased_attention_backward_cpu); }

}  // namespace echo_kernels
