"""The kernel report's PTX, SASS, ptxas-log and cuobjdump parsers on hand-written snippets."""

from __future__ import annotations

import pytest

from sparsevit.kernel_report.cuda_resources import short_name
from sparsevit.kernel_report.ptx_facts import (access_bytes, cp_async_bytes, mma_counts, mma_family, ptx_facts, sass_counts,
                                               sass_mma_family, uses_cp_async, uses_tma, widest_access)
from sparsevit.kernel_report.ptxas_log import parse_ptxas_log, parse_res_usage

HOPPER_PTX = """
.version 8.7
.target sm_90a
	// begin inline asm
	@%p1 cp.async.cg.shared.global [ %r10 + 0 ], [ %rd4 + 0 ], 0x10, %r11;
	// end inline asm
	cp.async.commit_group;
	ld.global.nc.L1::evict_last.v2.b32 { %r1, %r2 }, [ %rd1 + 0 ];
	@%p2 ld.global.b16 { %rs1 }, [ %rd2 + 0 ];
	wgmma.fence.sync.aligned;
	wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%r20, %r21}, %rd8, %rd9, p, 1, 1, 0, 1;
	wgmma.commit_group.sync.aligned;
	@%p3 st.global.v4.b32 [ %rd5 + 0 ], { %r30, %r31, %r32, %r33 };
	ld.shared.v4.b32 { %r40, %r41, %r42, %r43 }, [ %r12 + 0 ];
"""
AMPERE_PTX = """
.target sm_80
	cp.async.ca.shared.global [%r1], [%rd2], 4;
	ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%r1, %r2, %r3, %r4}, [%r5];
	mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1, %f2, %f3, %f4}, {%r1, %r2, %r3, %r4}, {%r5, %r6}, {%f1, %f2, %f3, %f4};
	ld.global.v4.f32 {%f5, %f6, %f7, %f8}, [%rd3];
	st.global.b32 [%rd4], %r9;
"""
WMMA_PTX = "wmma.mma.sync.aligned.row.col.m16n16k16.f32.f16.f16.f32 {%f1}, {%r1}, {%r2}, {%f1};\n"
TMA_PTX = """
	cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r1], [%rd1, {%r2, %r3}], [%r4];
	fma.rn.f32 %f1, %f2, %f3, %f4;
	st.global.v2.b32 [%rd2], {%r5, %r6};
"""
PLAIN_PTX = "fma.rn.f32 %f1, %f2, %f3, %f4;\nld.global.b32 %r1, [%rd1];\n"


def test_mma_family() -> None:
    assert mma_family(HOPPER_PTX) == "wgmma"
    assert mma_family(AMPERE_PTX) == "mma.sync"
    assert mma_family(WMMA_PTX) == "wmma"
    assert mma_family(TMA_PTX) == "none"
    assert mma_family(PLAIN_PTX) == "none"
    assert mma_family(AMPERE_PTX + HOPPER_PTX) == "wgmma+mma.sync"  # one product on warpgroups, one not
    assert mma_counts(AMPERE_PTX + HOPPER_PTX + WMMA_PTX) == {"wgmma": 1, "mma.sync": 1, "wmma": 1}


@pytest.mark.parametrize("qualifiers, nbytes", [
    (".v4.b32", 16), (".nc.L1::evict_last.v2.b32", 8), (".b16", 2), (".v2.f32", 8), (".u8", 1), (".v4.b16", 8),
    (".L2::cache_hint.b64", 8),
])
def test_access_bytes(qualifiers: str, nbytes: int) -> None:
    assert access_bytes(qualifiers) == nbytes


def test_widest_global_access() -> None:
    assert widest_access(HOPPER_PTX, "ld") == 8      # the shared-memory v4 load does not count
    assert widest_access(HOPPER_PTX, "st") == 16
    assert widest_access(AMPERE_PTX, "ld") == 16
    assert widest_access(AMPERE_PTX, "st") == 4
    assert widest_access(TMA_PTX, "ld") == 0


def test_async_copies() -> None:
    assert uses_cp_async(HOPPER_PTX) and not uses_tma(HOPPER_PTX)
    assert cp_async_bytes(HOPPER_PTX) == 16          # hex copy size
    assert uses_cp_async(AMPERE_PTX) and cp_async_bytes(AMPERE_PTX) == 4
    assert uses_tma(TMA_PTX) and not uses_cp_async(TMA_PTX) and cp_async_bytes(TMA_PTX) == 0
    assert not uses_cp_async(PLAIN_PTX) and not uses_tma(PLAIN_PTX)


def test_ptx_facts_record() -> None:
    facts = ptx_facts(HOPPER_PTX)
    assert facts.as_dict() == dict(mma="wgmma", mma_counts={"wgmma": 1, "mma.sync": 0, "wmma": 0}, cp_async=True, tma=False, ld_global_bytes=8, st_global_bytes=16,
                                   cp_async_bytes=16, global_vector_bytes=16)


SASS = """
        /*0a30*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24, gsb0 ;
        /*0a40*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24, gsb0 ;
        /*0b00*/                   LDGSTS.E.BYPASS.LTC128B.128 [R5], desc[UR6][R2.64] ;
        /*0c00*/                   STL.64 [R1+0x8], R10 ;
        /*0c10*/                   LDL.64 R10, [R1+0x8] ;
"""


def test_sass() -> None:
    counts = sass_counts(SASS)
    assert (counts["HGMMA"], counts["HMMA"], counts["LDGSTS"], counts["STL"], counts["LDL"]) == (2, 0, 1, 1, 1)
    assert sass_mma_family(SASS) == "wgmma"
    assert sass_mma_family("        /*0100*/   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;\n") == "mma.sync"
    assert sass_mma_family("        /*0100*/   FFMA R4, R8, R12, R4 ;\n") == "none"
    assert sass_mma_family(SASS + "        /*0d00*/   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;\n") == "wgmma+mma.sync"


PTXAS_LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    24 bytes stack frame, 20 bytes spill stores, 28 bytes spill loads
ptxas info    : Used 72 registers, used 1 barriers, 24 bytes cumulative stack size, 9728 bytes smem, 400 bytes cmem[0]
ptxas info    : Compile time = 52.546 ms
ptxas info    : Function properties for _Z6helperv
    8 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function '_rowlist_kernel' for 'sm_80'
ptxas info    : Function properties for _rowlist_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 96 registers, used 1 barriers, 448 bytes cmem[0]
"""


def test_ptxas_log() -> None:
    res = parse_ptxas_log(PTXAS_LOG)
    assert set(res) == {"_Z3fooPf", "_rowlist_kernel"}      # the device function is not an entry
    foo = res["_Z3fooPf"]
    assert (foo.regs, foo.spill_stores, foo.spill_loads, foo.spills, foo.stack, foo.smem) == (72, 20, 28, 48, 24, 9728)
    row = res["_rowlist_kernel"]
    assert (row.regs, row.spills, row.stack, row.smem) == (96, 0, 0, 0)


def test_res_usage() -> None:
    text = """
Resource usage:
 Common:
  GLOBAL:28 CONSTANT[4]:224
 Function _Z3fooPf:
  REG:72 STACK:24 SHARED:10752 LOCAL:0 CONSTANT[0]:640 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z3barv:
  REG:128 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:448 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    table = parse_res_usage(text)
    assert table["_Z3fooPf"]["REG"] == 72 and table["_Z3fooPf"]["STACK"] == 24 and table["_Z3fooPf"]["SHARED"] == 10752
    assert table["_Z3barv"]["REG"] == 128 and table["_Z3barv"]["CONSTANT[0]"] == 448


@pytest.mark.parametrize("demangled, short", [
    ("void sparsevit::(anonymous namespace)::sdd_kernel<__nv_bfloat16, 16, 32>(__nv_bfloat16 const*, int, long)",
     "sdd_kernel<bf16,16,32>"),
    ("void sparsevit::(anonymous namespace)::move_rows_kernel<uint4, true>(uint4 const*, long const*)",
     "move_rows_kernel<uint4,true>"),
    ("void sparsevit::masked_softmax_fwd_kernel<float>(float const*, float const*)", "masked_softmax_fwd_kernel<fp32>"),
    ("plain_kernel(float*)", "plain_kernel"),
])
def test_short_name(demangled: str, short: str) -> None:
    assert short_name(demangled) == short
