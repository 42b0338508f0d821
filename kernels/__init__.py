"""Triton kernels of sparsevit, installed as ``sparsevit.kernels``.

One module per op family; each holds its ``@triton.jit`` kernels and a launcher
that takes torch tensors.  No autograd and no dispatch live here: see
``sparsevit.ops``.
"""
