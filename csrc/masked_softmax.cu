// DynamicViT's masked softmax on CUDA (Rao et al., NeurIPS 2021, Eq. 11, with the eps
// terms of the public softmax_with_policy), forward and backward.
//
// For scores P (B, H, N, N), m_i = max_j P_ij over all keys, G_ij = 1 if i = j else keep_j:
//   forward:  A_ij = (exp(P_ij - m_i) G_ij + eps/N) / S_i,  S_i = sum_j exp(P_ij - m_i) G_ij + eps
//   backward (m_i constant): Delta_i = sum_j dA_ij A_ij,  t_ij = (dA_ij - Delta_i) / S_i,
//             dP_ij = exp(P_ij - m_i) G_ij t_ij,  dkeep_j = sum_{h, i != j} exp(P_ij - m_i) t_ij
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

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float gate(const float* keep_b, int64_t i, int64_t j) {
  return (keep_b == nullptr || i == j) ? 1.f : keep_b[j];
}

template <typename scalar_t>
__global__ void masked_softmax_fwd_kernel(const scalar_t* __restrict__ scores, const float* __restrict__ keep,
                                          scalar_t* __restrict__ out, float* __restrict__ row_max,
                                          float* __restrict__ row_sum, int64_t H, int64_t N,
                                          int64_t blocks_per_slice, float eps, float eps_n) {
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
    float m = -INFINITY;
    for (int64_t j = lane; j < N; j += kWarp) m = fmaxf(m, static_cast<float>(p[j]));
    m = warp_max(m);
    float s = 0.f;
    for (int64_t j = lane; j < N; j += kWarp) s += expf(static_cast<float>(p[j]) - m) * gate(keep_b, i, j);
    s = warp_sum(s) + eps;
    scalar_t* o = out + row * N;
    for (int64_t j = lane; j < N; j += kWarp) {
      const float w = expf(static_cast<float>(p[j]) - m) * gate(keep_b, i, j);
      o[j] = static_cast<scalar_t>((w + eps_n) / s);
    }
    if (lane == 0) {
      row_max[row] = m;
      row_sum[row] = s;
    }
  }
}

template <typename scalar_t>
__global__ void masked_softmax_bwd_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ scores,
                                          const float* __restrict__ keep, const float* __restrict__ row_max,
                                          const float* __restrict__ row_sum, scalar_t* __restrict__ dscores,
                                          float* __restrict__ dkeep, int64_t H, int64_t N, int64_t blocks_per_slice,
                                          float eps_n, bool shared_columns) {
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
    const float m = row_max[row];
    const float s = row_sum[row];
    float delta = 0.f;
    for (int64_t j = lane; j < N; j += kWarp) {
      const float a = (expf(static_cast<float>(p[j]) - m) * gate(keep_b, i, j) + eps_n) / s;
      delta += static_cast<float>(g[j]) * a;
    }
    delta = warp_sum(delta);
    scalar_t* ds = dscores + row * N;
    for (int64_t j = lane; j < N; j += kWarp) {
      const float e = expf(static_cast<float>(p[j]) - m);
      const float t = (static_cast<float>(g[j]) - delta) / s;
      ds[j] = static_cast<scalar_t>(e * gate(keep_b, i, j) * t);
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
  auto row_max = at::empty({B, H, N}, scores.options().dtype(at::kFloat));
  auto row_sum = at::empty({B, H, N}, scores.options().dtype(at::kFloat));
  if (scores.numel() == 0) return {out, row_max, row_sum};
  const float eps_f = static_cast<float>(eps);
  const float eps_n = static_cast<float>(eps / static_cast<double>(N));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "masked_softmax_cuda", [&] {
    masked_softmax_fwd_kernel<scalar_t><<<grid_size(B * H, N), kWarp * kWarpsPerBlock, 0, stream>>>(
        scores.data_ptr<scalar_t>(), keep.defined() ? keep.data_ptr<float>() : nullptr, out.data_ptr<scalar_t>(),
        row_max.data_ptr<float>(), row_sum.data_ptr<float>(), H, N, blocks_per_slice(N), eps_f, eps_n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, row_max, row_sum};
}

std::tuple<at::Tensor, at::Tensor> masked_softmax_backward_cuda(const at::Tensor& grad_in, const at::Tensor& scores_in,
                                                                const std::optional<at::Tensor>& keep_in,
                                                                const at::Tensor& row_max_in,
                                                                const at::Tensor& row_sum_in, double eps) {
  check_scores(scores_in, "scores");
  TORCH_CHECK(grad_in.sizes() == scores_in.sizes(), "sparsevit: grad must have the shape of scores");
  TORCH_CHECK(grad_in.device() == scores_in.device(), "sparsevit: grad must be on ", scores_in.device());
  const int64_t B = scores_in.size(0), H = scores_in.size(1), N = scores_in.size(2);
  for (const at::Tensor* t : {&row_max_in, &row_sum_in}) {
    TORCH_CHECK(t->device() == scores_in.device() && t->dim() == 3 && t->size(0) == B && t->size(1) == H &&
                    t->size(2) == N,
                "sparsevit: row statistics must be (B, H, N) on the device of scores");
  }
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const at::Tensor scores = scores_in.contiguous();
  const at::Tensor grad = grad_in.to(scores.scalar_type()).contiguous();
  const at::Tensor row_max = row_max_in.to(at::kFloat).contiguous();
  const at::Tensor row_sum = row_sum_in.to(at::kFloat).contiguous();
  const at::Tensor keep = keep_as_float(keep_in, scores);
  auto dscores = at::empty_like(scores);
  auto dkeep = at::zeros({B, N}, scores.options().dtype(at::kFloat));
  if (scores.numel() == 0) return {dscores, dkeep};
  const float eps_n = static_cast<float>(eps / static_cast<double>(N));
  const bool shared_columns = keep.defined() && N <= kMaxSharedColumns;
  const size_t shared_bytes = shared_columns ? static_cast<size_t>(N) * sizeof(float) : 0;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "masked_softmax_backward_cuda", [&] {
    masked_softmax_bwd_kernel<scalar_t><<<grid_size(B * H, N), kWarp * kWarpsPerBlock, shared_bytes, stream>>>(
        grad.data_ptr<scalar_t>(), scores.data_ptr<scalar_t>(), keep.defined() ? keep.data_ptr<float>() : nullptr,
        row_max.data_ptr<float>(), row_sum.data_ptr<float>(), dscores.data_ptr<scalar_t>(), dkeep.data_ptr<float>(), H,
        N, blocks_per_slice(N), eps_n, shared_columns);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dscores, dkeep};
}

TORCH_LIBRARY_IMPL(sparsevit, CUDA, m) {
  m.impl("masked_softmax_cuda", &masked_softmax_cuda);
  m.impl("masked_softmax_backward_cuda", &masked_softmax_backward_cuda);
}

}  // namespace sparsevit
