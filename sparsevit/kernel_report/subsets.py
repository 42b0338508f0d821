"""Named subsets of the launches, for quick runs and CI.

* ``quick``: every kernel once (its first bf16 launch, or its first launch, first config);
* ``ci``: ``quick`` plus, for sm_90 only, what the CI assertions need: every autotune
  config of the masked-attention tensor-core kernels in bf16 and fp16 with a keep mask
  at D = 64, and in bf16 at D = 128; every config of the block-sparse product kernels
  in bf16 at block size 64 (``dds_fwd``, and ``sdd`` without split-K).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from .triton_specs import Launch

__all__ = ["SUBSETS", "select"]

# (launch, how many of its configs (None: all), the capabilities (None: every one asked for))
Selection = list[tuple[Launch, Optional[int], Optional[tuple[int, ...]]]]


def _quick(launches: Sequence[Launch]) -> Selection:
    out: Selection = []
    seen: set = set()
    for want_bf16 in (True, False):
        for launch in launches:
            key = (launch.module, launch.kernel)
            if key in seen or (want_bf16 and launch.labels.get("dtype") != "bf16"):
                continue
            seen.add(key)
            out.append((launch, 1, None))
    return out


def _ci_extra(launch: Launch) -> bool:
    lab = launch.labels
    if launch.family == "masked_attention" and launch.tensor_cores and lab.get("keep") == 1:
        return (lab.get("D") == 64 and lab.get("dtype") in ("bf16", "fp16")) or (lab.get("D") == 128 and lab.get("dtype") == "bf16")
    if launch.family == "block_sparse_matmul":
        return lab.get("dtype") == "bf16" and lab.get("bs") == 64 and lab.get("mode") in ("dds_fwd", "sdd") \
            and not lab.get("split")
    return False


def _ci(launches: Sequence[Launch]) -> Selection:
    return _quick(launches) + [(launch, None, (90,)) for launch in launches if _ci_extra(launch)]


SUBSETS: dict[str, Callable[[Sequence[Launch]], Selection]] = {"quick": _quick, "ci": _ci}


def select(launches: Sequence[Launch], subset: Optional[str], max_configs: Optional[int] = None) -> Selection:
    """The launches of ``subset`` (None: all), each with at most ``max_configs`` configs."""
    if subset is None:
        chosen: Selection = [(launch, None, None) for launch in launches]
    elif subset in SUBSETS:
        chosen = SUBSETS[subset](launches)
    else:
        raise ValueError(f"unknown subset {subset!r}; known: {', '.join(SUBSETS)}")
    if max_configs:
        chosen = [(launch, min(n, max_configs) if n else max_configs, caps) for launch, n, caps in chosen]
    return chosen
