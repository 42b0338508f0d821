"""The kernel report: registers, spills, shared memory, occupancy and instruction choices
(wgmma / mma.sync, cp.async / TMA, vector widths) of every Triton and CUDA kernel of
sparsevit, for sm_80 and sm_90, compiled on a machine without a GPU.

Run it as ``python -m sparsevit.kernel_report`` (see :mod:`.__main__`).  One job per
module: :mod:`.targets` (per-SM limits), :mod:`.occupancy` (the estimate),
:mod:`.triton_specs` (launch → signature, constexprs, options) with one
``specs_*.py`` per kernel family, :mod:`.triton_compile` (one compile and its facts),
:mod:`.ptx_facts` and :mod:`.ptxas_log` (parsers), :mod:`.cuda_resources` (the CUDA
extension), :mod:`.runner` (worker processes), :mod:`.report` (JSON and tables).
"""
