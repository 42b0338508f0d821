// DynamicViT's masked softmax on CUDA (Rao et al., NeurIPS 2021, Eq. 11, with the eps
// terms of the public softmax_with_policy), forward and backward.
//
// For scores P (B, H, N, N), m_i = max_j P_ij over all keys, G_ij = 1 if i = j else keep_j:
//   A_ij = (exp(P_ij - m_i) G_ij + eps/N) / S_i,  S_i = sum_j exp(P_ij - m_i) G_ij + eps.
// Evaluated relative to the largest weight of the row, never outside float32's range: with the
// weighted max mw_i = max_j (P_ij + log G_ij) (finite: G_ii = 1), l_i = sum_j exp(P_ij + log G_ij - mw_i)
// and r_i = eps exp(m_i - mw_i) (kept in the log domain),
//   lam_i = log(l_i + r_i),  rho_i = eps / S_i = r_i / (l_i + r_i),  A_ij = exp((P_ij - mw_i) + log G_ij - lam_i) + rho_i / N.
// The forward returns (A, mw, lam).
//
// Backward: the exact gradient, through m_i as the public code's autograd takes it (to the first
// maximal key j*_i; the backward finds m_i, j*_i, l_i and so rho_i again while it reads the row):
//   Delta_i = sum_j dA_ij A_ij,  dm_i = rho_i (mean_j dA_ij - Delta_i),
//   dP_ij = G_ij (e_ij / S_i) (dA_ij - Delta_i) + [j = j*_i] dm_i,
//   dkeep_j = sum_{h, i != j} (e_ij / S_i) (dA_ij - Delta_i),   e_ij / S_i = exp(P_ij - mw_i - lam_i).
//
// A negative, NaN or infinite keep_j is a NaN gate for every query (the diagonal included), so
// the batch element comes out NaN, as in the reference; row maxima propagate NaN as torch.max does.
//
// One warp per row, fp32 math whatever the storage dtype.  A block holds the rows of one
// (b, h) slice, so the backward sums its dkeep contributions per column in shared memory
// and issues one global atomic per column per block (direct global atomics when N is
// too large for shared memory).  keep == nullptr means G = 1 (pass eps = 0 for softmax).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

namespace sparsevit {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;
constexpr int kRowsPerBlock = 32;
constexpr int64_t kMaxSharedColumns = 12288;  // 48 KiB of float column sums

// max that propagates NaN (fmaxf would drop it), as torch.max does.
__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// G_ij: 1 on the diagonal, keep_j elsewhere; NaN (diagonal included) for a negative or non-finite keep_j.
__device__ __forceinline__ float gate(const float* keep_b, int64_t i, int64_t j) {
  if (keep_b == nullptr) return 1.f;
  const float k = keep_b[j];
  if (!(k >= 0.f && k < INFINITY)) return NAN;
  return i == j ? 1.f : k;
}

// log(exp(a) + exp(b)); either may be -inf (not both), a NaN stays NaN.
__device__ __forceinline__ float log_add(float a, float b) {
  const float hi = nan_max(a, b);
  return hi + log1pf(expf(fminf(a, b) - hi));
}

// (log(l + r), r / (l + r)) from log l and log r (log r = -inf without eps), free of cancellation.
__device__ __forceinline__ void row_terms(float log_l, float log_r, bool has_eps, float* lam, float* rho) {
  *lam = has_eps ? log_add(log_l, log_r) : log_l;
  *rho = has_eps ? 1.f / (1.f + expf(log_l - log_r)) : 0.f;
}

template <typename scalar_t>
__global__ void masked_softmax_fwd_kernel(const scalar_t* __restrict__ scores, const float* __restrict__ keep,
                                          scalar_t* __restrict__ out, float* __restrict__ row_mw,
                                          float* __restrict__ row_lam, int64_t H, int64_t N,
                                          int64_t blocks_per_slice, float log_eps, float inv_n, bool has_eps) {
  const int64_t slice = blockIdx.x / blocks_per_slice;  // b * H + h
  const int64_t chunk = blockIdx.x % blocks_per_slice;
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const float* keep_b = keep == nullptr ? nullptr : keep + (slice / H) * N;
  for (int r = warp; r < kRowsPerBlock; r += kWarpsPerBlock) {
    const int64_t i = chunk * kRowsPerBlock + r;
    if (i >= N) break;  // uniform across the warp
    const int64_t row = slice * N + i;
    const scalar_t* p = scores + row * N;
    float m = -INFINITY, mw = -INFINITY;
    for (int64_t j = lane; j < N; j += kWarp) {
      const float s = static_cast<float>(p[j]);
      m = nan_max(m, s);
      mw = nan_max(mw, s + logf(gate(keep_b, i, j)));
    }
    m = warp_max(m);
    mw = warp_max(mw);
    float l = 0.f;
    // (P - mw) + log G, not (P + log G) - mw: the shift's own rounding cancels, the scores' would not
    for (int64_t j = lane; j < N; j += kWarp) l += expf((static_cast<float>(p[j]) - mw) + logf(gate(keep_b, i, j)));
    float lam, rho;
    row_terms(logf(warp_sum(l)), log_eps + (m - mw), has_eps, &lam, &rho);
    const float beta = rho * inv_n;
    scalar_t* o = out + row * N;
    for (int64_t j = lane; j < N; j += kWarp) {
      o[j] = static_cast<scalar_t>(expf((static_cast<float>(p[j]) - mw) + logf(gate(keep_b, i, j)) - lam) + beta);
    }
    if (lane == 0) {
      row_mw[row] = mw;
      row_lam[row] = lam;
    }
  }
}

template <typename scalar_t>
__global__ void masked_softmax_bwd_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ scores,
                                          const float* __restrict__ keep, const float* __restrict__ row_mw,
                                          const float* __restrict__ row_lam, scalar_t* __restrict__ dscores,
                                          float* __restrict__ dkeep, int64_t H, int64_t N, int64_t blocks_per_slice,
                                          float log_eps, float inv_n, bool has_eps, bool shared_columns) {
  extern __shared__ float columns[];
  const int64_t slice = blockIdx.x / blocks_per_slice;
  const int64_t chunk = blockIdx.x % blocks_per_slice;
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const int64_t b = slice / H;
  const float* keep_b = keep == nullptr ? nullptr : keep + b * N;
  float* dkeep_b = keep == nullptr ? nullptr : dkeep + b * N;
  const bool use_shared = keep != nullptr && shared_columns;
  if (use_shared) {
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) columns[j] = 0.f;
    __syncthreads();
  }
  for (int r = warp; r < kRowsPerBlock; r += kWarpsPerBlock) {
    const int64_t i = chunk * kRowsPerBlock + r;
    if (i >= N) break;
    const int64_t row = slice * N + i;
    const scalar_t* p = scores + row * N;
    const scalar_t* g = grad + row * N;
    const float mw = row_mw[row];
    const float lam = row_lam[row];
    // One pass: the row max and its first index, l, sum_j dA_ij a_ij and sum_j dA_ij.
    float m = -INFINITY, l = 0.f, ga = 0.f, gsum = 0.f;
    int64_t jstar = N;
    for (int64_t j = lane; j < N; j += kWarp) {
      const float s = static_cast<float>(p[j]);
      const float sw = (s - mw) + logf(gate(keep_b, i, j));
      const float dg = static_cast<float>(g[j]);
      if (s > m || (s != s && m == m)) {  // strict: the first maximal (or NaN) key of this lane
        m = s;
        jstar = j;
      }
      l += expf(sw);
      ga += dg * expf(sw - lam);
      gsum += dg;
    }
    for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, offset);
      const int64_t j2 = __shfl_xor_sync(0xffffffffu, jstar, offset);
      const bool nan1 = m != m, nan2 = m2 != m2;
      if ((nan2 && !nan1) || m2 > m || ((m2 == m || (nan1 && nan2)) && j2 < jstar)) {
        m = m2;
        jstar = j2;
      }
    }
    l = warp_sum(l);
    ga = warp_sum(ga);
    gsum = warp_sum(gsum);
    float lam_again, rho;
    row_terms(logf(l), log_eps + (m - mw), has_eps, &lam_again, &rho);
    const float delta = ga + rho * inv_n * gsum;
    const float dm = rho * (gsum * inv_n - delta);
    scalar_t* ds = dscores + row * N;
    for (int64_t j = lane; j < N; j += kWarp) {
      const float e = expf((static_cast<float>(p[j]) - mw) - lam);  // e_ij / S_i
      const float gij = gate(keep_b, i, j);
      const float t = static_cast<float>(g[j]) - delta;
      // G = 0 gives 0 even where e overflowed (a dropped key far above the kept ones, eps = 0)
      float d = gij == 0.f ? 0.f : e * gij * t;
      if (has_eps && j == jstar) d += dm;
      ds[j] = static_cast<scalar_t>(d);
      if (keep_b != nullptr && j != i) {
        if (use_shared) {
          atomicAdd(columns + j, e * t);
        } else {
          atomicAdd(dkeep_b + j, e * t);
        }
      }
    }
  }
  if (use_shared) {
    __syncthreads();
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
      if (columns[j] != 0.f) atomicAdd(dkeep_b + j, columns[j]);
    }
  }
}

void check_scores(const at::Tensor& scores, const char* name) {
  TORCH_CHECK(scores.is_cuda(), "sparsevit: ", name, " must be a CUDA tensor");
  TORCH_CHECK(scores.dim() == 4 && scores.size(2) == scores.size(3), "sparsevit: ", name,
              " must be (B, H, N, N), got ", scores.sizes());
  const auto dt = scores.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, "sparsevit: ", name,
              " must be float32, float16 or bfloat16, got ", dt);
}

// keep as a contiguous float32 (B, N) tensor, or an undefined tensor for "no mask".
at::Tensor keep_as_float(const std::optional<at::Tensor>& keep, const at::Tensor& scores) {
  if (!keep.has_value() || !keep->defined()) return at::Tensor();
  const at::Tensor& k = *keep;
  TORCH_CHECK(k.device() == scores.device(), "sparsevit: keep must be on ", scores.device());
  TORCH_CHECK(k.dim() == 2 && k.size(0) == scores.size(0) && k.size(1) == scores.size(3),
              "sparsevit: keep must be (B, N) = (", scores.size(0), ", ", scores.size(3), "), got ", k.sizes());
  return k.to(at::kFloat).contiguous();
}

int64_t blocks_per_slice(int64_t N) { return (N + kRowsPerBlock - 1) / kRowsPerBlock; }

unsigned grid_size(int64_t slices, int64_t N) {
  const int64_t blocks = slices * blocks_per_slice(N);
  TORCH_CHECK(blocks <= INT32_MAX, "sparsevit: too many attention rows for one launch");
  return static_cast<unsigned>(blocks);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_softmax_cuda(const at::Tensor& scores_in,
                                                                   const std::optional<at::Tensor>& keep_in,
                                                                   double eps) {
  check_scores(scores_in, "scores");
  TORCH_CHECK(eps >= 0, "sparsevit: eps must be >= 0");
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor keep = keep_as_float(keep_in, scores);
  const int64_t B = scores.size(0), H = scores.size(1), N = scores.size(2);
  auto out = at::empty_like(scores);
  auto row_mw = at::empty({B, H, N}, scores.options().dtype(at::kFloat));
  auto row_lam = at::empty({B, H, N}, scores.options().dtype(at::kFloat));
  if (scores.numel() == 0) return {out, row_mw, row_lam};
  const bool has_eps = eps > 0;
  const float log_eps = has_eps ? static_cast<float>(std::log(eps)) : 0.f;
  const float inv_n = static_cast<float>(1.0 / static_cast<double>(N));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "masked_softmax_cuda", [&] {
    masked_softmax_fwd_kernel<scalar_t><<<grid_size(B * H, N), kWarp * kWarpsPerBlock, 0, stream>>>(
        scores.data_ptr<scalar_t>(), keep.defined() ? keep.data_ptr<float>() : nullptr, out.data_ptr<scalar_t>(),
        row_mw.data_ptr<float>(), row_lam.data_ptr<float>(), H, N, blocks_per_slice(N), log_eps, inv_n, has_eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, row_mw, row_lam};
}

std::tuple<at::Tensor, at::Tensor> masked_softmax_backward_cuda(const at::Tensor& grad_in, const at::Tensor& scores_in,
                                                                const std::optional<at::Tensor>& keep_in,
                                                                const at::Tensor& row_mw_in,
                                                                const at::Tensor& row_lam_in, double eps) {
  check_scores(scores_in, "scores");
  TORCH_CHECK(grad_in.sizes() == scores_in.sizes(), "sparsevit: grad must have the shape of scores");
  TORCH_CHECK(grad_in.device() == scores_in.device(), "sparsevit: grad must be on ", scores_in.device());
  const int64_t B = scores_in.size(0), H = scores_in.size(1), N = scores_in.size(2);
  TORCH_CHECK(eps >= 0, "sparsevit: eps must be >= 0");
  for (const at::Tensor* t : {&row_mw_in, &row_lam_in}) {
    TORCH_CHECK(t->device() == scores_in.device() && t->dim() == 3 && t->size(0) == B && t->size(1) == H &&
                    t->size(2) == N,
                "sparsevit: row statistics must be (B, H, N) on the device of scores");
  }
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor grad = grad_in.to(scores.scalar_type()).contiguous();
  const at::Tensor row_mw = row_mw_in.to(at::kFloat).contiguous();
  const at::Tensor row_lam = row_lam_in.to(at::kFloat).contiguous();
  const at::Tensor keep = keep_as_float(keep_in, scores);
  auto dscores = at::empty_like(scores);
  auto dkeep = at::zeros({B, N}, scores.options().dtype(at::kFloat));
  if (scores.numel() == 0) return {dscores, dkeep};
  const bool has_eps = eps > 0;
  const float log_eps = has_eps ? static_cast<float>(std::log(eps)) : 0.f;
  const float inv_n = static_cast<float>(1.0 / static_cast<double>(N));
  const bool shared_columns = keep.defined() && N <= kMaxSharedColumns;
  const size_t shared_bytes = shared_columns ? static_cast<size_t>(N) * sizeof(float) : 0;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "masked_softmax_backward_cuda", [&] {
    masked_softmax_bwd_kernel<scalar_t><<<grid_size(B * H, N), kWarp * kWarpsPerBlock, shared_bytes, stream>>>(
        grad.data_ptr<scalar_t>(), scores.data_ptr<scalar_t>(), keep.defined() ? keep.data_ptr<float>() : nullptr,
        row_mw.data_ptr<float>(), row_lam.data_ptr<float>(), dscores.data_ptr<scalar_t>(), dkeep.data_ptr<float>(), H,
        N, blocks_per_slice(N), log_eps, inv_n, has_eps, shared_columns);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dscores, dkeep};
}

TORCH_LIBRARY_IMPL(sparsevit, CUDA, m) {
  m.impl("masked_softmax_cuda", &masked_softmax_cuda);
  m.impl("masked_softmax_backward_cuda", &masked_softmax_backward_cuda);
}

}  // namespace sparsevit
