// Block-sparse matmul on CUDA: the products dds, dsd and sdd over a block layout.
//
// Two kernels, as in kernels/block_sparse_matmul.py:
//
//   rowlist: out[t] (R, N) = A (R, Q) @ x[t] (Q, N), with A given by row lists: block row i
//            owns entries offsets[i] .. offsets[i+1] naming block column indices[e] and
//            packed block perm[e] (or e), whose element (r, c) is values[p][r*s_vr + c*s_vc]
//            (s_vr, s_vc) = (b, 1) as stored, (1, b) transposed.  dsd is this directly;
//            dds is out = a @ B = (Bᵀ @ aᵀ)ᵀ with aᵀ and outᵀ as strided views.
//   sdd:     values[t] = Σ_batch a[:, rows(i_t), :] @ b[:, :, cols(j_t)] for kept blocks only.
//
// One CTA (4 warps) owns a TM x TN output tile and loops over the contraction in chunks
// of KC, staging both operand chunks in shared memory (any strides; loads are ordered
// along whichever dim is contiguous).  fp16/bf16 use tensor cores through WMMA 16x16x16
// with fp32 accumulation; fp32 uses an exact CUDA-core path.  An empty block row writes
// zeros; columns past N are masked.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

namespace sparsevit {
namespace {

constexpr int kThreads = 128;  // 4 warps per CTA
constexpr int kWarps = kThreads / 32;
constexpr int kTileN = 64;  // output columns per CTA of the row-list kernel

// The 16-bit overloads serve the CUDA-core path where a type has no WMMA on the target (bf16 before sm_80).
[[maybe_unused]] __device__ __forceinline__ float to_float(float x) { return x; }
[[maybe_unused]] __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
[[maybe_unused]] __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Shared-memory leading dimensions: padded against bank conflicts and chosen so that
// every 16x16 WMMA fragment pointer is 32-byte aligned (see the static_asserts).
template <int KC>
constexpr int lda() { return KC + 8; }
template <int TN>
constexpr int ldb() { return TN + 8; }
template <int TN>
constexpr int ldc() { return TN + 4; }

// C (TM x TN, fp32) += A (TM x KC) @ B (KC x TN) on CUDA cores; A, B in shared memory.
template <typename T, int TM, int TN, int KC>
struct FmaTile {
  static_assert((TM * TN) % kThreads == 0, "tile must split evenly over the threads");
  static constexpr int kPer = TM * TN / kThreads;
  float acc[kPer];

  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < kPer; ++i) acc[i] = 0.f;
  }
  __device__ void step(const T* As, const T* Bs) {
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int e = threadIdx.x + i * kThreads;
      const int r = e / TN, c = e % TN;
      float s = 0.f;
#pragma unroll 8
      for (int k = 0; k < KC; ++k) s += to_float(As[r * lda<KC>() + k]) * to_float(Bs[k * ldb<TN>() + c]);
      acc[i] += s;
    }
  }
  __device__ void store(float* Cs) {
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int e = threadIdx.x + i * kThreads;
      Cs[(e / TN) * ldc<TN>() + e % TN] = acc[i];
    }
  }
};

// The same on tensor cores: each warp owns up to kPer 16x16 accumulator fragments.
template <typename T, int TM, int TN, int KC>
struct WmmaTile {
  static_assert(TM % 16 == 0 && TN % 16 == 0 && KC % 16 == 0, "WMMA tiles are 16x16x16");
  static_assert((16 * lda<KC>() * 2) % 32 == 0 && (16 * ldb<TN>() * 2) % 32 == 0, "fragment alignment");
  static_assert((16 * ldc<TN>() * 4) % 32 == 0, "fragment alignment");
  static constexpr int kFrags = (TM / 16) * (TN / 16);
  static constexpr int kPer = (kFrags + kWarps - 1) / kWarps;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[kPer];

  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < kPer; ++i) nvcuda::wmma::fill_fragment(acc[i], 0.f);
  }
  __device__ void step(const T* As, const T* Bs) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int f = warp + i * kWarps;
      if (f < kFrags) {  // warp-uniform
        const int fm = f / (TN / 16), fn = f % (TN / 16);
#pragma unroll
        for (int kk = 0; kk < KC; kk += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
          wmma::load_matrix_sync(fa, As + fm * 16 * lda<KC>() + kk, lda<KC>());
          wmma::load_matrix_sync(fb, Bs + kk * ldb<TN>() + fn * 16, ldb<TN>());
          wmma::mma_sync(acc[i], fa, fb, acc[i]);
        }
      }
    }
  }
  __device__ void store(float* Cs) {
    const int warp = threadIdx.x / 32;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int f = warp + i * kWarps;
      if (f < kFrags) {
        const int fm = f / (TN / 16), fn = f % (TN / 16);
        nvcuda::wmma::store_matrix_sync(Cs + fm * 16 * ldc<TN>() + fn * 16, acc[i], ldc<TN>(), nvcuda::wmma::mem_row_major);
      }
    }
  }
};

template <typename T, int TM, int TN, int KC>
struct TileFor {
  using type = FmaTile<T, TM, TN, KC>;
};
template <int TM, int TN, int KC>
struct TileFor<__half, TM, TN, KC> {
  using type = WmmaTile<__half, TM, TN, KC>;
};
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
template <int TM, int TN, int KC>
struct TileFor<__nv_bfloat16, TM, TN, KC> {  // bf16 WMMA needs sm_80+
  using type = WmmaTile<__nv_bfloat16, TM, TN, KC>;
};
#endif

// Element (r, c) of a rows x cols tile for flat index i, walking along the dim whose
// global stride is 1 so that consecutive threads touch consecutive addresses.
__device__ __forceinline__ void tile_coords(int i, int rows, int cols, bool rows_fastest, int& r, int& c) {
  if (rows_fastest) {
    r = i % rows;
    c = i / rows;
  } else {
    r = i / cols;
    c = i % cols;
  }
}

template <typename T, int TM, int KC>
__global__ void __launch_bounds__(kThreads) rowlist_kernel(
    const T* __restrict__ values, const int* __restrict__ offsets, const int* __restrict__ indices,
    const int* __restrict__ perm, int64_t s_vr, int64_t s_vc, int bs, const T* __restrict__ x,
    T* __restrict__ out, int64_t N, int64_t n_tiles, int64_t sxb, int64_t sxq, int64_t sxn, int64_t sob,
    int64_t som, int64_t son) {
  constexpr int TN = kTileN;
  __shared__ __align__(32) T As[TM * lda<KC>()];
  __shared__ __align__(32) T Bs[KC * ldb<TN>()];
  __shared__ __align__(32) float Cs[TM * ldc<TN>()];

  const int64_t bt = blockIdx.x / n_tiles;
  const int64_t n0 = (blockIdx.x % n_tiles) * TN;
  const int sub = bs / TM;
  const int64_t row = blockIdx.y / sub;
  const int r0 = (blockIdx.y % sub) * TM;
  const bool block_col_major = s_vr == 1;
  const bool x_q_major = sxq == 1 && sxn != 1;

  typename TileFor<T, TM, TN, KC>::type tile;
  tile.zero();
  const T* xb = x + bt * sxb;
  const int start = offsets[row], end = offsets[row + 1];
  for (int e = start; e < end; ++e) {
    const int64_t col = indices[e];
    const int64_t p = perm != nullptr ? perm[e] : e;
    const T* blk = values + p * bs * bs;
    for (int k0 = 0; k0 < bs; k0 += KC) {
      for (int i = threadIdx.x; i < TM * KC; i += kThreads) {
        int r, c;
        tile_coords(i, TM, KC, block_col_major, r, c);
        As[r * lda<KC>() + c] = blk[(r0 + r) * s_vr + (k0 + c) * s_vc];
      }
      for (int i = threadIdx.x; i < KC * TN; i += kThreads) {
        int r, c;
        tile_coords(i, KC, TN, x_q_major, r, c);
        const int64_t n = n0 + c;
        Bs[r * ldb<TN>() + c] = n < N ? xb[(col * bs + k0 + r) * sxq + n * sxn] : from_float<T>(0.f);
      }
      __syncthreads();
      tile.step(As, Bs);
      __syncthreads();
    }
  }
  tile.store(Cs);
  __syncthreads();
  T* ob = out + bt * sob + (row * bs + r0) * som;
  const bool out_m_major = som == 1 && son != 1;
  for (int i = threadIdx.x; i < TM * TN; i += kThreads) {
    int r, c;
    tile_coords(i, TM, TN, out_m_major, r, c);
    const int64_t n = n0 + c;
    if (n < N) ob[r * som + n * son] = from_float<T>(Cs[r * ldc<TN>() + c]);
  }
}

template <typename T, int TM, int KC>
__global__ void __launch_bounds__(kThreads) sdd_kernel(
    const T* __restrict__ a, const T* __restrict__ b, const int* __restrict__ row_indices,
    const int* __restrict__ col_indices, T* __restrict__ values, int bs, int64_t BT, int64_t R, int64_t sab,
    int64_t sam, int64_t sar, int64_t sbb, int64_t sbr, int64_t sbn) {
  constexpr int TN = TM;
  __shared__ __align__(32) T As[TM * lda<KC>()];
  __shared__ __align__(32) T Bs[KC * ldb<TN>()];
  __shared__ __align__(32) float Cs[TM * ldc<TN>()];

  const int sub = bs / TM;
  const int64_t t = blockIdx.x / (sub * sub);
  const int s = blockIdx.x % (sub * sub);
  const int r0 = (s / sub) * TM, c0 = (s % sub) * TN;
  const int64_t i0 = static_cast<int64_t>(row_indices[t]) * bs + r0;
  const int64_t j0 = static_cast<int64_t>(col_indices[t]) * bs + c0;
  const bool a_k_major = sar == 1 && sam != 1;
  const bool b_k_major = sbr == 1 && sbn != 1;

  typename TileFor<T, TM, TN, KC>::type tile;
  tile.zero();
  for (int64_t bt = 0; bt < BT; ++bt) {
    const T* ab = a + bt * sab + i0 * sam;
    const T* bb = b + bt * sbb + j0 * sbn;
    for (int64_t k0 = 0; k0 < R; k0 += KC) {
      for (int i = threadIdx.x; i < TM * KC; i += kThreads) {
        int r, c;
        tile_coords(i, TM, KC, !a_k_major, r, c);
        const int64_t k = k0 + c;
        As[r * lda<KC>() + c] = k < R ? ab[r * sam + k * sar] : from_float<T>(0.f);
      }
      for (int i = threadIdx.x; i < KC * TN; i += kThreads) {
        int r, c;
        tile_coords(i, KC, TN, b_k_major, r, c);
        const int64_t k = k0 + r;
        Bs[r * ldb<TN>() + c] = k < R ? bb[k * sbr + c * sbn] : from_float<T>(0.f);
      }
      __syncthreads();
      tile.step(As, Bs);
      __syncthreads();
    }
  }
  tile.store(Cs);
  __syncthreads();
  T* dst = values + t * bs * bs + static_cast<int64_t>(r0) * bs + c0;
  for (int i = threadIdx.x; i < TM * TN; i += kThreads) {
    const int r = i / TN, c = i % TN;
    dst[r * bs + c] = from_float<T>(Cs[r * ldc<TN>() + c]);
  }
}

// ---------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------
template <typename F>
void dispatch_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, "sparsevit: block-sparse matmul supports float32, float16 and bfloat16, got ", dtype);
  }
}

void check_block_size(int64_t bs) {
  TORCH_CHECK(bs == 16 || bs == 32 || bs == 64 || bs == 128, "sparsevit: block size must be 16, 32, 64 or 128, got ", bs);
}

void check_index(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.is_cuda() && t.device() == device, "sparsevit: ", name, " must be on ", device);
  TORCH_CHECK(t.scalar_type() == at::kInt && t.dim() == 1 && t.is_contiguous(),
              "sparsevit: ", name, " must be a contiguous 1-D int32 tensor");
}

void check_values(const at::Tensor& values, const at::Device& device) {
  TORCH_CHECK(values.is_cuda() && values.device() == device, "sparsevit: values must be on ", device);
  TORCH_CHECK(values.dim() == 3 && values.size(1) == values.size(2) && values.is_contiguous(),
              "sparsevit: values must be contiguous (nnz, b, b), got ", values.sizes());
  check_block_size(values.size(2));
}

template <typename T, int TM, int KC>
void launch_rowlist(const at::Tensor& values, const at::Tensor& offsets, const at::Tensor& indices,
                    const std::optional<at::Tensor>& perm, bool transpose_blocks, const at::Tensor& x,
                    const at::Tensor& out) {
  const int64_t bs = values.size(2);
  const int64_t T_ = out.size(0), N = out.size(2);
  const int64_t row_blocks = offsets.numel() - 1;
  const int64_t n_tiles = (N + kTileN - 1) / kTileN;
  const int64_t gx = T_ * n_tiles, gy = row_blocks * (bs / TM);
  TORCH_CHECK(gx <= INT32_MAX && gy <= 65535, "sparsevit: block-sparse matmul problem too large for one launch");
  const int64_t s_vr = transpose_blocks ? 1 : bs, s_vc = transpose_blocks ? bs : 1;
  auto stream = c10::cuda::getCurrentCUDAStream();
  rowlist_kernel<T, TM, KC><<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), kThreads, 0, stream>>>(
      reinterpret_cast<const T*>(values.data_ptr()), offsets.data_ptr<int>(), indices.data_ptr<int>(),
      perm.has_value() ? perm->data_ptr<int>() : nullptr, s_vr, s_vc, static_cast<int>(bs),
      reinterpret_cast<const T*>(x.data_ptr()), reinterpret_cast<T*>(out.data_ptr()), N, n_tiles, x.stride(0),
      x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// out (T, R, N) = A @ x[t] (T, Q, N) for A given by row lists; both as strided views.
void rowlist_matmul(const at::Tensor& values, const at::Tensor& offsets, const at::Tensor& indices,
                    const std::optional<at::Tensor>& perm, bool transpose_blocks, const at::Tensor& x,
                    const at::Tensor& out) {
  const auto device = values.device();
  check_values(values, device);
  check_index(offsets, "offsets", device);
  check_index(indices, "indices", device);
  if (perm.has_value()) check_index(*perm, "perm", device);
  TORCH_CHECK(x.device() == device && x.dim() == 3, "sparsevit: the dense operand must be a 3-D tensor on ", device);
  TORCH_CHECK(x.scalar_type() == values.scalar_type(), "sparsevit: dense and sparse operands must share a dtype");
  const int64_t bs = values.size(2);
  TORCH_CHECK(x.size(1) % bs == 0, "sparsevit: the contraction dim must be a multiple of the block size");
  TORCH_CHECK(out.size(1) == (offsets.numel() - 1) * bs, "sparsevit: offsets do not match the output rows");
  if (out.numel() == 0) return;
  dispatch_dtype(values.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    switch (bs) {
      case 16: launch_rowlist<T, 16, 16>(values, offsets, indices, perm, transpose_blocks, x, out); break;
      case 32: launch_rowlist<T, 32, 32>(values, offsets, indices, perm, transpose_blocks, x, out); break;
      default: launch_rowlist<T, 64, 32>(values, offsets, indices, perm, transpose_blocks, x, out); break;
    }
  });
}

template <typename T, int TM>
void launch_sdd(const at::Tensor& a, const at::Tensor& b, const at::Tensor& row_indices,
                const at::Tensor& col_indices, at::Tensor& values, int64_t bs) {
  const int64_t nnz = col_indices.numel();
  const int64_t sub = bs / TM;
  const int64_t gx = nnz * sub * sub;
  TORCH_CHECK(gx <= INT32_MAX, "sparsevit: too many blocks for one sdd launch");
  auto stream = c10::cuda::getCurrentCUDAStream();
  sdd_kernel<T, TM, 32><<<static_cast<unsigned>(gx), kThreads, 0, stream>>>(
      reinterpret_cast<const T*>(a.data_ptr()), reinterpret_cast<const T*>(b.data_ptr()), row_indices.data_ptr<int>(),
      col_indices.data_ptr<int>(), reinterpret_cast<T*>(values.data_ptr()), static_cast<int>(bs), a.size(0), a.size(2),
      a.stride(0), a.stride(1), a.stride(2), b.stride(0), b.stride(1), b.stride(2));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// a (T, P, Q) @ B -> (T, P, cols), where Bᵀ (cols, Q) is given by row lists.
at::Tensor dds_cuda(const at::Tensor& a, const at::Tensor& values, const at::Tensor& offsets,
                    const at::Tensor& indices, const std::optional<at::Tensor>& perm, bool transpose_blocks,
                    int64_t cols) {
  TORCH_CHECK(a.is_cuda() && a.dim() == 3, "sparsevit: a must be a 3-D CUDA tensor (T, P, Q)");
  const c10::cuda::CUDAGuard guard(a.device());
  auto out = at::empty({a.size(0), a.size(1), cols}, a.options());
  rowlist_matmul(values, offsets, indices, perm, transpose_blocks, a.transpose(1, 2), out.transpose(1, 2));
  return out;
}

// A @ b[t] -> (T, rows, N) for b (T, Q, N) and A (rows, Q) given by row lists.
at::Tensor dsd_cuda(const at::Tensor& values, const at::Tensor& offsets, const at::Tensor& indices,
                    const std::optional<at::Tensor>& perm, bool transpose_blocks, const at::Tensor& b, int64_t rows) {
  TORCH_CHECK(b.is_cuda() && b.dim() == 3, "sparsevit: b must be a 3-D CUDA tensor (T, Q, N)");
  const c10::cuda::CUDAGuard guard(b.device());
  auto out = at::empty({b.size(0), rows, b.size(2)}, b.options());
  rowlist_matmul(values, offsets, indices, perm, transpose_blocks, b, out);
  return out;
}

// The kept blocks of Σ_t a[t] @ b[t]: a (T, M, R), b (T, R, N) -> (nnz, b, b).
at::Tensor sdd_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& row_indices,
                    const at::Tensor& col_indices, int64_t block_size) {
  TORCH_CHECK(a.is_cuda() && a.dim() == 3 && b.dim() == 3 && b.device() == a.device(),
              "sparsevit: a (T, M, R) and b (T, R, N) must be 3-D tensors on one CUDA device");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "sparsevit: a and b must share a dtype");
  TORCH_CHECK(a.size(0) == b.size(0) && a.size(2) == b.size(1), "sparsevit: a (T, M, R) and b (T, R, N) disagree");
  check_block_size(block_size);
  TORCH_CHECK(a.size(1) % block_size == 0 && b.size(2) % block_size == 0,
              "sparsevit: M and N must be multiples of the block size");
  check_index(row_indices, "row_indices", a.device());
  check_index(col_indices, "col_indices", a.device());
  TORCH_CHECK(row_indices.numel() == col_indices.numel(), "sparsevit: row_indices and col_indices differ in length");
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t nnz = col_indices.numel();
  auto values = at::empty({nnz, block_size, block_size}, a.options());
  if (nnz == 0) return values;
  if (a.size(0) * a.size(2) == 0) return values.zero_();
  dispatch_dtype(a.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    switch (block_size) {
      case 16: launch_sdd<T, 16>(a, b, row_indices, col_indices, values, block_size); break;
      case 32: launch_sdd<T, 32>(a, b, row_indices, col_indices, values, block_size); break;
      default: launch_sdd<T, 64>(a, b, row_indices, col_indices, values, block_size); break;
    }
  });
  return values;
}

TORCH_LIBRARY_IMPL(sparsevit, CUDA, m) {
  m.impl("dds_cuda", &dds_cuda);
  m.impl("dsd_cuda", &dsd_cuda);
  m.impl("sdd_cuda", &sdd_cuda);
}

}  // namespace sparsevit
