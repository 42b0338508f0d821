// Token dropping on CUDA: gather, scatter and scatter-add of token rows.
//
//   gather:      out[b, k, :]          = x[b, index[b, k], :]
//   scatter:     out = base; out[b, index[b, k], :] = src[b, k, :]
//   scatter-add: out = 0 (fp32); out[b, index[b, k], :] += src[b, k, :]; cast to src dtype
//
// Gather and scatter are pure data movement, so they copy rows in the widest unit
// (16, 8, 4 or 2 bytes) that the row length, strides and pointers allow; one warp
// moves one row.  Scatter expects distinct indices (the Python op resolves repeats,
// last one wins, before calling): two warps writing one row could interleave units.
// Scatter-add uses float atomics (run-dependent summation order); with
// torch.use_deterministic_algorithms(True) the Python op does not call it.  An index outside [0, N) never touches memory out of bounds: gather
// writes zeros for it, scatter and scatter-add skip it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

namespace sparsevit {
namespace {

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 8;

// The token row this thread row handles: slot (b, k) of the (B, K) index and its
// token n = index[b, k].  Returns false past the last row.
__device__ __forceinline__ bool decode_row(int64_t B, int64_t K, const int64_t* __restrict__ index, int64_t sib,
                                           int64_t sik, int64_t& b, int64_t& k, int64_t& n) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= B * K) return false;
  b = row / K;
  k = row - b * K;
  n = index[b * sib + k * sik];
  return true;
}

// Gather (kScatter = false): out[b, k] = in[b, index[b, k]], zeros for a bad index.
// Scatter (kScatter = true): out[b, index[b, k]] = in[b, k], bad indices skipped.
// Strides are in units of `Unit` (a vector or one element); `sic` is the read side's
// channel stride, the written side is contiguous along channels.
template <typename Unit, bool kScatter>
__global__ void move_rows_kernel(const Unit* __restrict__ in, const int64_t* __restrict__ index,
                                 Unit* __restrict__ out, int64_t B, int64_t K, int64_t N, int64_t units,
                                 int64_t sib_in, int64_t sir_in, int64_t sic, int64_t sib, int64_t sik,
                                 int64_t sob, int64_t sor) {
  int64_t b, k, n;
  if (!decode_row(B, K, index, sib, sik, b, k, n)) return;
  const bool valid = n >= 0 && n < N;
  if (kScatter && !valid) return;
  Unit* dst = out + b * sob + (kScatter ? n : k) * sor;
  if (!valid) {
    for (int64_t c = threadIdx.x; c < units; c += blockDim.x) dst[c] = Unit{};
    return;
  }
  const Unit* src = in + b * sib_in + (kScatter ? k : n) * sir_in;
  for (int64_t c = threadIdx.x; c < units; c += blockDim.x) dst[c] = src[c * sic];
}

template <typename scalar_t>
__global__ void scatter_add_rows_kernel(const scalar_t* __restrict__ src, const int64_t* __restrict__ index,
                                        float* __restrict__ out, int64_t B, int64_t K, int64_t N, int64_t C,
                                        int64_t ssb, int64_t ssk, int64_t ssc, int64_t sib, int64_t sik) {
  int64_t b, k, n;
  if (!decode_row(B, K, index, sib, sik, b, k, n) || n < 0 || n >= N) return;
  const scalar_t* s = src + b * ssb + k * ssk;
  float* dst = out + (b * N + n) * C;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) atomicAdd(dst + c, static_cast<float>(s[c * ssc]));
}

dim3 row_grid(int64_t rows) {
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  TORCH_CHECK(blocks <= INT32_MAX, "sparsevit: too many token rows for one launch");
  return dim3(static_cast<unsigned>(blocks));
}

// Widest unit (bytes) in which a row of `row_bytes` bytes at the given byte strides
// and pointers can be moved; the channel stride must be one element.
int copy_unit_bytes(int64_t row_bytes, int64_t elem_bytes, std::initializer_list<int64_t> byte_strides,
                    std::initializer_list<const void*> ptrs) {
  for (int unit : {16, 8, 4, 2}) {
    if (unit < elem_bytes) break;
    bool ok = row_bytes % unit == 0;
    for (int64_t s : byte_strides) ok = ok && (s % unit == 0);
    for (const void* p : ptrs) ok = ok && (reinterpret_cast<uintptr_t>(p) % unit == 0);
    if (ok) return unit;
  }
  return static_cast<int>(elem_bytes);
}

// `in` is read (channel stride possibly > 1), `out` written; (B, K) from the index.
template <typename Unit, bool kScatter>
void launch_move(const at::Tensor& in, const at::Tensor& index, at::Tensor& out, int64_t N, bool vector_path) {
  const int64_t u = sizeof(Unit) / in.element_size();  // elements per unit
  const int64_t B = index.size(0), K = index.size(1), C = in.size(2);
  const dim3 block(kWarp, kRowsPerBlock);
  auto stream = c10::cuda::getCurrentCUDAStream();
  move_rows_kernel<Unit, kScatter><<<row_grid(B * K), block, 0, stream>>>(
      reinterpret_cast<const Unit*>(in.data_ptr()), index.data_ptr<int64_t>(), reinterpret_cast<Unit*>(out.data_ptr()),
      B, K, N, C / u, in.stride(0) / u, in.stride(1) / u, vector_path ? 1 : in.stride(2), index.stride(0),
      index.stride(1), out.stride(0) / u, out.stride(1) / u);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// What every kernel here assumes of a token tensor `t` (B, ., C) and of `index` (B, K):
// float32/float16/bfloat16 on one CUDA device, index int64 with t's batch size.
void check_inputs(const at::Tensor& t, const char* name, const at::Tensor& index) {
  TORCH_CHECK(t.is_cuda(), "sparsevit: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() == 3, "sparsevit: ", name, " must be (B, N, C), got ", t.sizes());
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, "sparsevit: ", name,
              " must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(index.is_cuda() && index.device() == t.device(), "sparsevit: index must be on ", t.device());
  TORCH_CHECK(index.scalar_type() == at::kLong, "sparsevit: index must be int64, got ", index.scalar_type());
  TORCH_CHECK(index.dim() == 2 && index.size(0) == t.size(0), "sparsevit: index must be (B, K) with B = ",
              t.size(0), ", got ", index.sizes());
}

// The rows read at k < index.size(1) must exist in src (B, K, C).
void check_rows_match(const at::Tensor& src, const at::Tensor& index) {
  TORCH_CHECK(index.size(1) == src.size(1), "sparsevit: index must be (B, K) with K = src.size(1) = ", src.size(1),
              ", got ", index.sizes());
}

// Dispatch a row copy on the widest unit allowed.  `a` is the tensor read with a
// possibly non-unit channel stride, `b` the contiguous one written or read.
template <typename F>
void by_copy_unit(const at::Tensor& a, const at::Tensor& b, F&& f) {
  const int64_t es = a.element_size();
  const bool unit_c = a.stride(2) == 1 || a.size(2) <= 1;
  int unit = static_cast<int>(es);
  if (unit_c) {
    unit = copy_unit_bytes(a.size(2) * es, es, {a.stride(0) * es, a.stride(1) * es, b.stride(0) * es, b.stride(1) * es},
                           {a.data_ptr(), b.data_ptr()});
  }
  const bool vector_path = unit_c;
  switch (unit) {
    case 16: f(uint4{}, vector_path); break;
    case 8: f(uint2{}, vector_path); break;
    case 4: f(uint32_t{}, vector_path); break;
    case 2: f(uint16_t{}, vector_path); break;
    default: TORCH_CHECK(false, "sparsevit: unsupported element size ", es);
  }
}

}  // namespace

at::Tensor gather_tokens_cuda(const at::Tensor& x, const at::Tensor& index) {
  check_inputs(x, "x", index);
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({x.size(0), index.size(1), x.size(2)}, x.options());
  if (out.numel() == 0) return out;
  by_copy_unit(x, out, [&](auto unit, bool vector_path) {
    launch_move<decltype(unit), false>(x, index, out, x.size(1), vector_path);
  });
  return out;
}

at::Tensor scatter_tokens_cuda(const at::Tensor& src, const at::Tensor& index, const at::Tensor& base) {
  check_inputs(src, "src", index);
  check_inputs(base, "base", index);
  check_rows_match(src, index);
  TORCH_CHECK(base.scalar_type() == src.scalar_type(), "sparsevit: base and src must share a dtype");
  TORCH_CHECK(base.size(2) == src.size(2), "sparsevit: base (B, N, C) and src (B, K, C) must agree on C, got ",
              base.sizes(), " and ", src.sizes());
  const c10::cuda::CUDAGuard guard(src.device());
  auto out = base.contiguous().clone();
  if (src.numel() == 0) return out;
  by_copy_unit(src, out, [&](auto unit, bool vector_path) {
    launch_move<decltype(unit), true>(src, index, out, out.size(1), vector_path);
  });
  return out;
}

at::Tensor scatter_add_tokens_cuda(const at::Tensor& src, const at::Tensor& index, int64_t n) {
  check_inputs(src, "src", index);
  check_rows_match(src, index);
  TORCH_CHECK(n >= 0, "sparsevit: n must be >= 0, got ", n);
  const c10::cuda::CUDAGuard guard(src.device());
  const int64_t B = src.size(0), K = src.size(1), C = src.size(2);
  auto acc = at::zeros({B, n, C}, src.options().dtype(at::kFloat));
  if (src.numel() > 0 && n > 0) {
    const dim3 block(kWarp, kRowsPerBlock);
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "scatter_add_tokens_cuda", [&] {
      scatter_add_rows_kernel<scalar_t><<<row_grid(B * K), block, 0, stream>>>(
          src.data_ptr<scalar_t>(), index.data_ptr<int64_t>(), acc.data_ptr<float>(), B, K, n, C, src.stride(0),
          src.stride(1), src.stride(2), index.stride(0), index.stride(1));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return src.scalar_type() == at::kFloat ? acc : acc.to(src.scalar_type());
}

TORCH_LIBRARY_IMPL(sparsevit, CUDA, m) {
  m.impl("gather_tokens_cuda", &gather_tokens_cuda);
  m.impl("scatter_tokens_cuda", &scatter_tokens_cuda);
  m.impl("scatter_add_tokens_cuda", &scatter_add_tokens_cuda);
}

}  // namespace sparsevit
