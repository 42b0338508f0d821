"""CI checks from the kernel report: every kernel compiles for sm_80 and sm_90, nothing spills,
and the tensor-core kernels lower to Hopper's ``wgmma`` on sm_90.

No exception is allowed today: a config that spills or (fp16/bf16 on sm_90) does not
lower to wgmma fails its test, naming the config.  (The CUDA extension's known spills
are strict expected failures in ``test_report_cuda_ext.py``.)
"""

from __future__ import annotations

from sparsevit.kernel_report.specs import families

def _ok(run) -> list[dict]:
    return [r for r in run.doc["triton"] if not r.get("error")]


def test_report_runs_and_covers_every_kernel(ci_report) -> None:
    assert ci_report.returncode in (0, 1), ci_report.stderr[-5000:]  # 2: a kernel without a spec
    kernels = {(r["family"], r["kernel"]) for r in ci_report.doc["triton"]}
    assert {f for f, _ in kernels} == set(families())
    for family, kernel in kernels:
        archs = {r["arch"] for r in ci_report.doc["triton"] if r["kernel"] == kernel}
        assert archs == {"sm_80", "sm_90"}, f"{family}/{kernel} compiled for {archs} only"


def test_every_config_compiles(ci_report) -> None:
    errors = [f"{r['variant']} {r['arch']}: {r['error'][:400]}" for r in ci_report.doc["triton"] if r.get("error")]
    assert not errors, "\n".join(errors)
    assert ci_report.returncode == 0


def _spilling(run) -> dict[tuple[str, str], int]:
    return {(r["variant"], r["arch"]): r["spills"] for r in _ok(run) if r["spills"]}


def test_no_config_spills(ci_report) -> None:
    spilling = _spilling(ci_report)
    assert not spilling, "\n".join(f"{v} {a}: {n} B spilled" for (v, a), n in spilling.items())


def _tensor_core_sm90(run, family: str) -> list[dict]:
    """The family's tensor-core configs on sm_90 that the autotuner may pick (they fit on the SM)."""
    return [r for r in _ok(run) if r["family"] == family and r["arch"] == "sm_90" and r["tensor_cores"]
            and r["labels"].get("dtype") in ("bf16", "fp16") and r["occupancy"]["fits"]]


def _not_wgmma(records: list[dict]) -> dict[str, str]:
    return {r["variant"]: f"{r['mma']} (SASS {r['sass_mma']})" for r in records
            if r["mma"] != "wgmma" or r["sass_mma"] != "wgmma"}


def test_attention_lowers_to_wgmma_on_sm90(ci_report) -> None:
    records = _tensor_core_sm90(ci_report, "masked_attention")
    kernels = {r["kernel"] for r in records}
    assert {"_masked_attention_fwd_kernel", "_masked_attention_bwd_dkdv_kernel", "_masked_attention_bwd_dq_kernel"} <= kernels
    assert {r["labels"]["dtype"] for r in records} == {"bf16", "fp16"}
    missing = _not_wgmma(records)
    assert not missing, "\n".join(f"{v}: {m}" for v, m in missing.items())


def test_block_sparse_wgmma_fraction_is_reported(ci_report) -> None:
    summary = ci_report.doc["summary"]["block_sparse_matmul"]
    assert summary["wgmma_sm90"]["of"] > 0
    assert 0.0 <= summary["wgmma_sm90"]["fraction"] <= 1.0


def test_block_sparse_lowers_to_wgmma_on_sm90(ci_report) -> None:
    records = _tensor_core_sm90(ci_report, "block_sparse_matmul")
    assert {r["kernel"] for r in records} >= {"_dds_kernel", "_sdd_kernel"}
    missing = _not_wgmma(records)
    assert not missing, f"{len(missing)}/{len(records)} configs without wgmma:\n" + "\n".join(
        f"{v}: {m}" for v, m in missing.items())


def test_async_copies_and_vector_width_recorded(ci_report) -> None:
    for r in _ok(ci_report):
        assert r["global_vector_bytes"] in (0, 1, 2, 4, 8, 16, 32), r["variant"]
        assert isinstance(r["cp_async"], bool) and isinstance(r["tma"], bool)
        assert 0.0 <= r["occupancy"]["occupancy"] <= 1.0
