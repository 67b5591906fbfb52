"""A model of torch.compile(timm): the eager trace with each chain of memory-bound ops as ONE kernel.

Inductor turns a run of pointwise / normalisation / reduction ops between two GEMMs into one
generated kernel that reads the chain's inputs once and writes only what is used after the chain; the
GEMMs stay on cuBLAS (addmm/mm) and attention on SDPA's flash kernel. Modeled here on the recorded
dataflow (`OpRecord.reads` / `writes`):

* a chain = a maximal run of consecutive records of the same phase whose kind is in
  `taxonomy.MEMORY_KINDS` (GEMMs, attention, convolutions, the optimizer and custom ops end a chain);
* its kernel reads every storage the chain reads that the chain did not produce itself, once;
* it writes every storage it produced that a later record reads, or that nothing reads at all
  (a program output); a temporary used only inside the chain costs nothing;
* one launch per chain; FLOPs are summed (0 for these ops).

What this leaves out (so: a model): inductor may split a chain (reductions of different shapes),
recompute instead of saving activations for backward (the saved bytes stay those of eager timm),
pick different GEMM kernels, and it compiles neither the optimizer nor the loss with the model here.
"""

from __future__ import annotations

from vit_fast.perf.cost.dispatch import OpRecord
from vit_fast.perf.cost.taxonomy import MEMORY_KINDS


def _chains(records: list[OpRecord]) -> list[list[OpRecord]]:
    """Consecutive groups: each memory-bound chain as one group, every other record alone."""
    groups: list[list[OpRecord]] = []
    for r in records:
        fusible = r.kind in MEMORY_KINDS
        last = groups[-1] if groups else None
        if fusible and last and last[-1].kind in MEMORY_KINDS and last[-1].phase == r.phase:
            last.append(r)
        else:
            groups.append([r])
    return groups


def fuse_elementwise_chains(records: list[OpRecord]) -> list[OpRecord]:
    """The records of a torch.compile'd program derived from eager `records` (see module doc)."""
    groups = _chains(records)
    # For each storage, the index of the last group that reads it.
    last_read: dict[int, int] = {}
    for gi, group in enumerate(groups):
        for r in group:
            for key, _ in r.reads:
                last_read[key] = gi
    out: list[OpRecord] = []
    for gi, group in enumerate(groups):
        if len(group) == 1 and group[0].kind not in MEMORY_KINDS:
            out.append(group[0])
            continue
        produced: dict[int, int] = {}  # storage -> bytes written inside the chain
        read_bytes: dict[int, int] = {}  # storages read from outside the chain
        for r in group:
            for key, nbytes in r.reads:
                if key not in produced:
                    read_bytes[key] = max(read_bytes.get(key, 0), nbytes)
            for key, nbytes in r.writes:
                produced[key] = max(produced.get(key, 0), nbytes)
        written = sum(
            nbytes for key, nbytes in produced.items() if last_read.get(key, gi) > gi or key not in last_read
        )
        first = group[0]
        out.append(
            OpRecord(
                op="inductor::fused_" + "_".join(sorted({r.op.partition("::")[2] for r in group}))[:80],
                kind="fused chain" if len(group) > 1 else first.kind,
                phase=first.phase,
                launches=1,
                bytes=sum(read_bytes.values()) + written,
                flops=sum(r.flops for r in group),
                dtype=first.dtype,
                reads=tuple(read_bytes.items()),
                writes=tuple((k, b) for k, b in produced.items()),
            )
        )
    return out
