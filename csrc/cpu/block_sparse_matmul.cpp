// Block-sparse matmul on the CPU: the products dds, dsd and sdd over a block layout.
//
// The same three ops as csrc/block_sparse_matmul.cu (same arguments), for CPU tensors:
//
//   dds: out[t] (P, cols) = a[t] (P, Q) @ B, B given by the row lists of Bᵀ
//        (block row j of Bᵀ = output block column j);
//   dsd: out[t] (rows, N) = A @ x[t] (Q, N), A given by its row lists;
//   sdd: values[e] = Σ_t a[t][rows(i_e), :] @ b[t][:, cols(j_e)] for the kept blocks only.
//
// A row list names, for block row i, the entries offsets[i] .. offsets[i+1] with block
// column indices[e] and packed block perm[e] (or e); block element (r, c) is
// values[p][r*b + c] as stored, values[p][c*b + r] with transpose_blocks.
//
// Every small product is one call of ATen's exported small-GEMM entry point
// at::native::cpublas::brgemm, C (M x N, fp32) (+)= A (M x K) @ B (K x N), all row-major
// with leading dimensions: oneDNN's JIT batch-reduce GEMM kernel on AVX2/AVX-512 CPUs,
// ATen's BLAS gemm elsewhere.  (at::native::cpublas::gemm, which takes transpose flags,
// is not exported from libtorch_cpu, so an extension cannot link it.)  brgemm has no
// transpose flags, so operands that arrive transposed are repacked, always the cheaper
// side: the packed weight blocks (nnz·b² elements once per call, against P·nnz·b² flops),
// or in sdd a b x Kc panel of a transposed activation, shared by every kept block of
// that block row.  Activations in the orientation brgemm wants are read in place.
//
// Parallelism: at::parallel_for threads take independent output tiles in turn (dds:
// token-row tile x output block column, the column fastest so the activation tile stays
// in L2 while the kept blocks of every column are applied; dsd: token-column tile x block
// row; sdd: runs of kept blocks).  Each output element is written by one thread, and its
// sum runs in an order fixed by the tile sizes, which depend on the shapes only: no
// atomics on data, and the result is bitwise the same run to run and for any thread count.
//
// fp32 accumulates in the output; bf16 and fp16 (brgemm 16-bit x 16-bit -> fp32)
// accumulate in a per-thread fp32 tile and are rounded once.  Without AMX, ATen serves
// those through oneDNN's bf16 gemm (about fp32 speed here) and its portable fp16 gemm
// (slower, yet far faster than torch's own fp16 matmul on such CPUs).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <optional>
#include <vector>

namespace sparsevit {
namespace {

// Bytes of activations one dds/dsd tile may touch, to keep it in a core's L2.
constexpr int64_t kTileBytes = 512 * 1024;
// Contraction chunk of sdd (tokens per brgemm call), 4x longer for 16 x 16 blocks whose
// calls are otherwise too small; measured best at 2 threads, fp32, ViT-S MLP shapes.
constexpr int64_t kSddChunk = 64;

// C (M x N, ldc) = A (M x K, lda) @ B (K x N, ldb), plus C when accumulate.
inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                 float* C, int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, /*is_vnni=*/false);
}

inline void gemm(int64_t M, int64_t N, int64_t K, const at::BFloat16* A, int64_t lda, const at::BFloat16* B,
                 int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, /*is_vnni=*/false);
}

inline void gemm(int64_t M, int64_t N, int64_t K, const at::Half* A, int64_t lda, const at::Half* B, int64_t ldb,
                 float* C, int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, /*is_vnni=*/false);
}

template <typename F>
void dispatch_dtype(at::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    case at::kHalf: f(at::Half{}); break;
    default: TORCH_CHECK_TYPE(false, "sparsevit: ", op, "_cpp supports float32, bfloat16 and float16, got ", dtype);
  }
}

void check_block_size(int64_t bs) {
  TORCH_CHECK_VALUE(bs == 16 || bs == 32 || bs == 64 || bs == 128,
                    "sparsevit: block size must be 16, 32, 64 or 128, got ", bs);
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "sparsevit: ", name, " must be a CPU tensor, got one on ", t.device());
}

void check_index(const at::Tensor& t, const char* name) {
  check_cpu(t, name);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, "sparsevit: ", name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.is_contiguous(), "sparsevit: ", name, " must be a contiguous 1-D tensor");
}

void check_values(const at::Tensor& values) {
  check_cpu(values, "values");
  TORCH_CHECK_VALUE(values.dim() == 3 && values.size(1) == values.size(2) && values.is_contiguous(),
                    "sparsevit: values must be contiguous (nnz, b, b), got ", values.sizes());
  check_block_size(values.size(2));
}

// Row lists over n_rows block rows into n_cols block columns naming nnz packed blocks: the
// offsets are monotone from 0 to nnz and every index is in range, so no bad index can
// reach memory.
struct RowLists {
  const int* offsets;
  const int* indices;
  const int* perm;  // nullptr: entry e is packed block e

  int64_t block(int64_t e) const { return perm != nullptr ? perm[e] : e; }
};

RowLists check_row_lists(const at::Tensor& offsets, const at::Tensor& indices, const std::optional<at::Tensor>& perm,
                         int64_t n_rows, int64_t n_cols, int64_t nnz) {
  check_index(offsets, "offsets");
  check_index(indices, "indices");
  TORCH_CHECK_VALUE(offsets.numel() == n_rows + 1, "sparsevit: offsets must have ", n_rows + 1,
                    " entries (block rows + 1), got ", offsets.numel());
  TORCH_CHECK_VALUE(indices.numel() == nnz, "sparsevit: indices must have one entry per block (", nnz, "), got ",
                    indices.numel());
  const int* off = offsets.data_ptr<int>();
  const int* idx = indices.data_ptr<int>();
  TORCH_CHECK_VALUE(off[0] == 0 && off[n_rows] == nnz, "sparsevit: offsets must run from 0 to ", nnz);
  for (int64_t i = 0; i < n_rows; ++i) {
    TORCH_CHECK_VALUE(off[i] <= off[i + 1], "sparsevit: offsets must be non-decreasing");
  }
  for (int64_t e = 0; e < nnz; ++e) {
    TORCH_CHECK_VALUE(idx[e] >= 0 && idx[e] < n_cols, "sparsevit: indices must lie in [0, ", n_cols, ")");
  }
  const int* p = nullptr;
  if (perm.has_value()) {
    check_index(*perm, "perm");
    TORCH_CHECK_VALUE(perm->numel() == nnz, "sparsevit: perm must have ", nnz, " entries, got ", perm->numel());
    p = perm->data_ptr<int>();
    for (int64_t e = 0; e < nnz; ++e) {
      TORCH_CHECK_VALUE(p[e] >= 0 && p[e] < nnz, "sparsevit: perm must lie in [0, ", nnz, ")");
    }
  }
  return {off, idx, p};
}

// True when the last two dims of t (rows, cols) are row-major with a usable leading
// dimension (the stride of a dim of size 1 does not matter: see leading_dim).
bool row_major(const at::Tensor& t) {
  return (t.size(2) <= 1 || t.stride(2) == 1) && (t.size(1) <= 1 || t.stride(1) >= t.size(2));
}

at::Tensor as_row_major(const at::Tensor& t) { return row_major(t) ? t : t.contiguous(); }

// The leading dimension brgemm gets for the rows of t: its row stride, or the row length
// when there is a single row (whose stride may be anything).
int64_t leading_dim(const at::Tensor& t) { return t.size(1) > 1 ? t.stride(1) : std::max<int64_t>(t.size(2), 1); }

// Rows of a tile of `row_bytes` each that fit kTileBytes: 16..512, a multiple of 16.
int64_t tile_extent(int64_t row_bytes) {
  const int64_t n = kTileBytes / std::max<int64_t>(row_bytes, 1);
  return std::clamp<int64_t>(n / 16 * 16, 16, 512);
}

// dst (rows x cols, row-major) = srcᵀ for src (cols x rows) with row stride s_c (rows
// contiguous), rows a multiple of 8: 8 x 8 tiles through a fixed-size buffer, which the
// compiler turns into vector loads, shuffles and stores.
template <typename T>
void transpose_panel(T* dst, const T* src, int64_t rows, int64_t cols, int64_t s_c) {
  const int64_t cols8 = cols / 8 * 8;
  for (int64_t c0 = 0; c0 < cols8; c0 += 8) {
    for (int64_t r0 = 0; r0 < rows; r0 += 8) {
      T tile[8][8];
      for (int i = 0; i < 8; ++i) {
        for (int j = 0; j < 8; ++j) tile[j][i] = src[(c0 + i) * s_c + r0 + j];
      }
      for (int j = 0; j < 8; ++j) {
        for (int i = 0; i < 8; ++i) dst[(r0 + j) * cols + c0 + i] = tile[j][i];
      }
    }
  }
  for (int64_t c = cols8; c < cols; ++c) {
    for (int64_t r = 0; r < rows; ++r) dst[r * cols + c] = src[c * s_c + r];
  }
}

// dst (rows x cols, row-major) = src with element (r, c) at src[r*s_r + c*s_c]; blocked
// so that both the source lines and the destination rows stay in L1.
template <typename T>
void pack_panel(T* dst, const T* src, int64_t rows, int64_t cols, int64_t s_r, int64_t s_c) {
  if (s_r == 1 && rows % 8 == 0) {  // the transpose of a row-major operand (a weight gradient's doutᵀ)
    transpose_panel(dst, src, rows, cols, s_c);
    return;
  }
  constexpr int64_t kB = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += kB) {
    const int64_t r1 = std::min(rows, r0 + kB);
    for (int64_t c0 = 0; c0 < cols; c0 += kB) {
      const int64_t c1 = std::min(cols, c0 + kB);
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t c = c0; c < c1; ++c) dst[r * cols + c] = src[r * s_r + c * s_c];
      }
    }
  }
}

// out (rows x cols, ld_out) = acc (rows x cols, ld_acc) rounded to T.
template <typename T>
void store_tile(T* out, int64_t ld_out, const float* acc, int64_t ld_acc, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) out[r * ld_out + c] = static_cast<T>(acc[r * ld_acc + c]);
  }
}

template <typename T>
void zero_tile(T* out, int64_t ld_out, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) std::fill(out + r * ld_out, out + r * ld_out + cols, static_cast<T>(0.f));
}

// Runs body(begin, end, scratch) over [0, n) in ranges of `chunk` items, each taken by
// whichever thread is free next (an atomic counter hands them out), so that a thread
// slowed by other work on its core holds no one up.  Which thread runs a range never
// changes what it computes: each range writes its own outputs, in its own order.
template <typename MakeScratch, typename Body>
void parallel_ranges(int64_t n, int64_t chunk, MakeScratch make_scratch, Body body) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), (n + chunk - 1) / chunk);
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    auto scratch = make_scratch();
    for (int64_t w = w0; w < w1; ++w) {  // one worker per thread, all of them when run inline
      for (int64_t begin; (begin = next.fetch_add(chunk, std::memory_order_relaxed)) < n;) {
        body(begin, std::min(n, begin + chunk), scratch);
      }
    }
  });
}

// ---------------------------------------------------------------------------------
// dds: out[t] = a[t] @ B.  B block (k, j) = (Bᵀ block (j, k))ᵀ, which is values[p] as
// stored exactly when the row lists of Bᵀ read the blocks transposed.
// ---------------------------------------------------------------------------------
template <typename T>
void dds_kernel(const at::Tensor& a, const at::Tensor& blocks, const RowLists& lists, at::Tensor& out) {
  const int64_t T_ = a.size(0), P = a.size(1), Q = a.size(2), bs = blocks.size(2);
  const int64_t cols = out.size(2), nb = cols / bs;
  const int64_t sa0 = a.stride(0), sa1 = leading_dim(a);
  const int64_t tm = std::min(tile_extent(Q * static_cast<int64_t>(sizeof(T))), P);
  const int64_t mt = (P + tm - 1) / tm;
  const T* A = a.const_data_ptr<T>();
  const T* V = blocks.const_data_ptr<T>();
  T* O = out.mutable_data_ptr<T>();
  auto scratch = [&] { return std::vector<float>(std::is_same_v<T, float> ? 0 : tm * bs); };
  parallel_ranges(T_ * mt * nb, 1, scratch, [&](int64_t begin, int64_t end, std::vector<float>& acc) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t t = w / (mt * nb), mi = (w / nb) % mt, j = w % nb;
      const int64_t m0 = mi * tm, mm = std::min(tm, P - m0);
      T* o = O + (t * P + m0) * cols + j * bs;
      const int64_t e0 = lists.offsets[j], e1 = lists.offsets[j + 1];
      if (e0 == e1) {
        zero_tile(o, cols, mm, bs);
        continue;
      }
      float* c;
      int64_t ldc;
      if constexpr (std::is_same_v<T, float>) {
        c = o;
        ldc = cols;
      } else {
        c = acc.data();
        ldc = bs;
      }
      const T* a_tile = A + t * sa0 + m0 * sa1;
      for (int64_t e = e0; e < e1; ++e) {
        const int64_t k = lists.indices[e];
        gemm(mm, bs, bs, a_tile + k * bs, sa1, V + lists.block(e) * bs * bs, bs, c, ldc, e != e0);
      }
      if constexpr (!std::is_same_v<T, float>) store_tile(o, cols, c, ldc, mm, bs);
    }
  });
}

// ---------------------------------------------------------------------------------
// dsd: out[t] = A @ x[t], A block (i, k) is values[p] as stored unless transposed.
// ---------------------------------------------------------------------------------
template <typename T>
void dsd_kernel(const at::Tensor& blocks, const RowLists& lists, const at::Tensor& x, at::Tensor& out) {
  const int64_t T_ = x.size(0), Q = x.size(1), N = x.size(2), bs = blocks.size(2);
  const int64_t rows = out.size(1), nr = rows / bs;
  const int64_t sx0 = x.stride(0), sx1 = leading_dim(x);
  const int64_t tn = std::min(tile_extent(Q * static_cast<int64_t>(sizeof(T))), N);
  const int64_t nt = (N + tn - 1) / tn;
  const T* X = x.const_data_ptr<T>();
  const T* V = blocks.const_data_ptr<T>();
  T* O = out.mutable_data_ptr<T>();
  auto scratch = [&] { return std::vector<float>(std::is_same_v<T, float> ? 0 : bs * tn); };
  parallel_ranges(T_ * nt * nr, 1, scratch, [&](int64_t begin, int64_t end, std::vector<float>& acc) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t t = w / (nt * nr), ni = (w / nr) % nt, i = w % nr;
      const int64_t n0 = ni * tn, nn = std::min(tn, N - n0);
      T* o = O + (t * rows + i * bs) * N + n0;
      const int64_t e0 = lists.offsets[i], e1 = lists.offsets[i + 1];
      if (e0 == e1) {
        zero_tile(o, N, bs, nn);
        continue;
      }
      float* c;
      int64_t ldc;
      if constexpr (std::is_same_v<T, float>) {
        c = o;
        ldc = N;
      } else {
        c = acc.data();
        ldc = tn;
      }
      const T* x_tile = X + t * sx0 + n0;
      for (int64_t e = e0; e < e1; ++e) {
        const int64_t k = lists.indices[e];
        gemm(bs, nn, bs, V + lists.block(e) * bs * bs, bs, x_tile + k * bs * sx1, sx1, c, ldc, e != e0);
      }
      if constexpr (!std::is_same_v<T, float>) store_tile(o, N, c, ldc, bs, nn);
    }
  });
}

// ---------------------------------------------------------------------------------
// sdd: values[e] = Σ_t a[t][i_e block rows, :] @ b[t][:, j_e block cols].  brgemm wants
// the contraction contiguous in a and the output columns contiguous in b; an operand
// stored the other way (a = doutᵀ in a weight gradient) is packed chunk by chunk into a
// panel, and consecutive kept blocks of one block row share the a panel.
// ---------------------------------------------------------------------------------
template <typename T>
void sdd_kernel(const at::Tensor& a, const at::Tensor& b, const int* row_idx, const int* col_idx, int64_t bs,
                at::Tensor& values) {
  const int64_t T_ = a.size(0), R = a.size(2), nnz = values.size(0);
  const int64_t sa0 = a.stride(0), sa1 = a.stride(1), sa2 = a.stride(2);
  const int64_t sb0 = b.stride(0), sb1 = b.stride(1), sb2 = b.stride(2);
  // Read in place when brgemm can (contraction contiguous in a, output columns in b);
  // any other strides, transposed or not, go through pack_panel.
  const bool a_direct = (R <= 1 || sa2 == 1) && sa1 >= R;
  const bool b_direct = sb2 == 1 && sb1 >= b.size(2);
  const int64_t kc_max = std::min(bs == 16 ? 4 * kSddChunk : kSddChunk, R);
  const T* A = a.const_data_ptr<T>();
  const T* B = b.const_data_ptr<T>();
  T* Vout = values.mutable_data_ptr<T>();
  // Ranges of a few blocks each, about 4 per thread: enough to balance, while the blocks
  // of a range still share each contraction chunk (no measurable loss at 1 per range).
  const int64_t ranges = 4 * at::get_num_threads();
  const int64_t chunk = std::max<int64_t>(1, (nnz + ranges - 1) / ranges);
  struct Scratch {
    std::vector<T> a_panel, b_panel;
    std::vector<float> acc;
  };
  auto scratch = [&] {
    return Scratch{std::vector<T>(a_direct ? 0 : bs * kc_max), std::vector<T>(b_direct ? 0 : kc_max * bs),
                   std::vector<float>(std::is_same_v<T, float> ? 0 : chunk * bs * bs)};
  };
  parallel_ranges(nnz, chunk, scratch, [&](int64_t begin, int64_t end, Scratch& sc) {
    std::vector<T>& a_panel = sc.a_panel;
    std::vector<T>& b_panel = sc.b_panel;
    std::vector<float>& acc = sc.acc;
    auto out_of = [&](int64_t e) -> float* {
      if constexpr (std::is_same_v<T, float>) {
        return Vout + e * bs * bs;
      } else {
        return acc.data() + (e - begin) * bs * bs;
      }
    };
    // Chunk of the contraction outermost: its rows of a and b stay in cache while every
    // kept block of this thread consumes them.
    for (int64_t t = 0; t < T_; ++t) {
      for (int64_t k0 = 0; k0 < R; k0 += kc_max) {
        const int64_t kc = std::min(kc_max, R - k0);
        const bool accumulate = t > 0 || k0 > 0;
        for (int64_t g0 = begin, g1; g0 < end; g0 = g1) {  // runs of blocks in one block row
          const int64_t i = row_idx[g0];
          for (g1 = g0 + 1; g1 < end && row_idx[g1] == i;) ++g1;
          const T* a_src = A + t * sa0 + i * bs * sa1 + k0 * sa2;
          const T* a_op = a_src;
          int64_t lda = sa1;
          if (!a_direct) {
            pack_panel(a_panel.data(), a_src, bs, kc, sa1, sa2);
            a_op = a_panel.data();
            lda = kc;
          }
          for (int64_t e = g0; e < g1; ++e) {
            const T* b_src = B + t * sb0 + k0 * sb1 + col_idx[e] * bs * sb2;
            const T* b_op = b_src;
            int64_t ldb = sb1;
            if (!b_direct) {
              pack_panel(b_panel.data(), b_src, kc, bs, sb1, sb2);
              b_op = b_panel.data();
              ldb = bs;
            }
            gemm(bs, bs, kc, a_op, lda, b_op, ldb, out_of(e), bs, accumulate);
          }
        }
      }
    }
    if constexpr (!std::is_same_v<T, float>) {
      for (int64_t e = begin; e < end; ++e) store_tile(Vout + e * bs * bs, bs, out_of(e), bs, bs, bs);
    }
  });
}

// (T, M, R) with batch stride R·(contraction stride) folds into one batch of T·R: fewer,
// longer contraction chunks.
at::Tensor fold_batch_into_contraction(const at::Tensor& t, bool contraction_last) {
  const int64_t T_ = t.size(0);
  if (T_ <= 1) return t;
  if (contraction_last) {  // (T, M, R): element (t, m, r) at t*s0 + m*s1 + r*s2
    if (t.stride(0) == t.size(2) * t.stride(2)) {
      return t.as_strided({1, t.size(1), T_ * t.size(2)}, {T_ * t.stride(0), t.stride(1), t.stride(2)});
    }
  } else if (t.stride(0) == t.size(1) * t.stride(1)) {  // (T, R, N)
    return t.as_strided({1, T_ * t.size(1), t.size(2)}, {T_ * t.stride(0), t.stride(1), t.stride(2)});
  }
  return t;
}

}  // namespace

// a (T, P, Q) @ B -> (T, P, cols), where Bᵀ (cols, Q) is given by row lists.
at::Tensor dds_cpp(const at::Tensor& a, const at::Tensor& values, const at::Tensor& offsets,
                   const at::Tensor& indices, const std::optional<at::Tensor>& perm, bool transpose_blocks,
                   int64_t cols) {
  check_cpu(a, "a");
  TORCH_CHECK_VALUE(a.dim() == 3, "sparsevit: a must be a 3-D tensor (T, P, Q), got ", a.sizes());
  check_values(values);
  TORCH_CHECK_TYPE(a.scalar_type() == values.scalar_type(), "sparsevit: a and values must share a dtype, got ",
                   a.scalar_type(), " and ", values.scalar_type());
  const int64_t bs = values.size(2);
  TORCH_CHECK_VALUE(a.size(2) % bs == 0, "sparsevit: Q=", a.size(2), " must be a multiple of the block size ", bs);
  TORCH_CHECK_VALUE(cols >= 0 && cols % bs == 0, "sparsevit: cols=", cols, " must be a multiple of the block size ", bs);
  const RowLists lists = check_row_lists(offsets, indices, perm, cols / bs, a.size(2) / bs, values.size(0));
  auto out = at::empty({a.size(0), a.size(1), cols}, a.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  dispatch_dtype(a.scalar_type(), "dds", [&](auto tag) {
    using T = decltype(tag);
    // B's blocks row-major: as stored when the lists of Bᵀ read them transposed, else transposed once here.
    const at::Tensor blocks = transpose_blocks ? values : values.transpose(1, 2).contiguous();
    dds_kernel<T>(as_row_major(a), blocks, lists, out);
  });
  return out;
}

// A @ b[t] -> (T, rows, N) for b (T, Q, N) and A (rows, Q) given by row lists.
at::Tensor dsd_cpp(const at::Tensor& values, const at::Tensor& offsets, const at::Tensor& indices,
                   const std::optional<at::Tensor>& perm, bool transpose_blocks, const at::Tensor& b, int64_t rows) {
  check_cpu(b, "b");
  TORCH_CHECK_VALUE(b.dim() == 3, "sparsevit: b must be a 3-D tensor (T, Q, N), got ", b.sizes());
  check_values(values);
  TORCH_CHECK_TYPE(b.scalar_type() == values.scalar_type(), "sparsevit: b and values must share a dtype, got ",
                   b.scalar_type(), " and ", values.scalar_type());
  const int64_t bs = values.size(2);
  TORCH_CHECK_VALUE(b.size(1) % bs == 0, "sparsevit: Q=", b.size(1), " must be a multiple of the block size ", bs);
  TORCH_CHECK_VALUE(rows >= 0 && rows % bs == 0, "sparsevit: rows=", rows, " must be a multiple of the block size ", bs);
  const RowLists lists = check_row_lists(offsets, indices, perm, rows / bs, b.size(1) / bs, values.size(0));
  auto out = at::empty({b.size(0), rows, b.size(2)}, b.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  dispatch_dtype(b.scalar_type(), "dsd", [&](auto tag) {
    using T = decltype(tag);
    const at::Tensor blocks = transpose_blocks ? values.transpose(1, 2).contiguous() : values;
    dsd_kernel<T>(blocks, lists, as_row_major(b), out);
  });
  return out;
}

// The kept blocks of Σ_t a[t] @ b[t]: a (T, M, R), b (T, R, N) -> (nnz, b, b).
at::Tensor sdd_cpp(const at::Tensor& a, const at::Tensor& b, const at::Tensor& row_indices,
                   const at::Tensor& col_indices, int64_t block_size) {
  check_cpu(a, "a");
  check_cpu(b, "b");
  TORCH_CHECK_VALUE(a.dim() == 3 && b.dim() == 3, "sparsevit: a (T, M, R) and b (T, R, N) must be 3-D, got ",
                    a.sizes(), " and ", b.sizes());
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), "sparsevit: a and b must share a dtype, got ",
                   a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK_VALUE(a.size(0) == b.size(0) && a.size(2) == b.size(1),
                    "sparsevit: a (T, M, R) and b (T, R, N) disagree: ", a.sizes(), " and ", b.sizes());
  check_block_size(block_size);
  TORCH_CHECK_VALUE(a.size(1) % block_size == 0 && b.size(2) % block_size == 0,
                    "sparsevit: M and N must be multiples of the block size ", block_size);
  check_index(row_indices, "row_indices");
  check_index(col_indices, "col_indices");
  const int64_t nnz = col_indices.numel();
  TORCH_CHECK_VALUE(row_indices.numel() == nnz, "sparsevit: row_indices and col_indices differ in length");
  const int* rows = row_indices.data_ptr<int>();
  const int* cols = col_indices.data_ptr<int>();
  const int64_t mb = a.size(1) / block_size, nb = b.size(2) / block_size;
  for (int64_t e = 0; e < nnz; ++e) {
    TORCH_CHECK_VALUE(rows[e] >= 0 && rows[e] < mb && cols[e] >= 0 && cols[e] < nb,
                      "sparsevit: block (", rows[e], ", ", cols[e], ") is outside the ", mb, " x ", nb, " block grid");
  }
  auto values = at::empty({nnz, block_size, block_size}, a.options().memory_format(at::MemoryFormat::Contiguous));
  if (nnz == 0) return values;
  if (a.size(0) * a.size(2) == 0) return values.zero_();
  dispatch_dtype(a.scalar_type(), "sdd", [&](auto tag) {
    using T = decltype(tag);
    at::Tensor a3 = fold_batch_into_contraction(a, true), b3 = fold_batch_into_contraction(b, false);
    if (a3.size(0) != b3.size(0)) {  // only one side folds: keep both per batch
      a3 = a;
      b3 = b;
    }
    sdd_kernel<T>(a3, b3, rows, cols, block_size, values);
  });
  return values;
}

TORCH_LIBRARY_IMPL(sparsevit, CPU, m) {
  m.impl("dds_cpp", &dds_cpp);
  m.impl("dsd_cpp", &dsd_cpp);
  m.impl("sdd_cpp", &sdd_cpp);
}

}  // namespace sparsevit
