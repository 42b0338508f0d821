// Schemas of every C++ op of sparsevit, registered as torch.ops.sparsevit.*.
// The implementations live beside their kernels (TORCH_LIBRARY_IMPL in each .cu and in
// csrc/cpu/*.cpp); the fake kernels and autograd are registered in Python (sparsevit/ops/).
// The CUDA schemas exist only in a build with the CUDA kernels (SPARSEVIT_WITH_CUDA), so
// that an op is declared exactly when its kernel is compiled in.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// The module carries no Python functions: importing it registers the ops.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "sparsevit C++/CUDA kernels (see torch.ops.sparsevit)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(sparsevit, m) {
  // Block-sparse matmul on the CPU (csrc/cpu/block_sparse_matmul.cpp): the arguments of
  // the CUDA ops below.
  m.def(
      "dds_cpp(Tensor a, Tensor values, Tensor offsets, Tensor indices, Tensor? perm, bool transpose_blocks, "
      "int cols) -> Tensor");
  m.def(
      "dsd_cpp(Tensor values, Tensor offsets, Tensor indices, Tensor? perm, bool transpose_blocks, Tensor b, "
      "int rows) -> Tensor");
  m.def("sdd_cpp(Tensor a, Tensor b, Tensor row_indices, Tensor col_indices, int block_size) -> Tensor");
#ifdef SPARSEVIT_WITH_CUDA
  // Token dropping (csrc/token_gather.cu).
  m.def("gather_tokens_cuda(Tensor x, Tensor index) -> Tensor");
  m.def("scatter_tokens_cuda(Tensor src, Tensor index, Tensor base) -> Tensor");
  m.def("scatter_add_tokens_cuda(Tensor src, Tensor index, int n) -> Tensor");
  // Block-sparse matmul (csrc/block_sparse_matmul.cu).
  m.def(
      "dds_cuda(Tensor a, Tensor values, Tensor offsets, Tensor indices, Tensor? perm, bool transpose_blocks, "
      "int cols) -> Tensor");
  m.def(
      "dsd_cuda(Tensor values, Tensor offsets, Tensor indices, Tensor? perm, bool transpose_blocks, Tensor b, "
      "int rows) -> Tensor");
  m.def("sdd_cuda(Tensor a, Tensor b, Tensor row_indices, Tensor col_indices, int block_size) -> Tensor");
  // DynamicViT masked softmax (csrc/masked_softmax.cu): probabilities, weighted row max, row log-denominator.
  m.def("masked_softmax_cuda(Tensor scores, Tensor? keep, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "masked_softmax_backward_cuda(Tensor grad, Tensor scores, Tensor? keep, Tensor row_mw, Tensor row_lam, "
      "float eps) -> (Tensor, Tensor)");
#endif
}
