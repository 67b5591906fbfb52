"""Saved-for-backward bytes, measured with `torch.autograd.graph.saved_tensors_hooks`.

Every tensor autograd keeps for the backward pass goes through the pack hook. Several saved tensors
often share one storage (a view and its base, an output saved by two consumers), and what stays
alive is the storage, so bytes are summed once per storage. Parameters (and anything else passed
in `exclude`) are reported separately: they exist whether or not we train.

Works on real tensors and on fake tensors (FakeTensorMode), so the cost model can use it for a
ViT-B at batch 256 without allocating anything.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor


def storage_key(t: Tensor) -> int:
    """A key identifying the storage of `t` (the address of its StorageImpl, stable for its lifetime).

    `data_ptr()` cannot be used: fake tensors have no data, and two zero-size storages share 0.
    """
    return t.untyped_storage()._cdata


def storage_nbytes(t: Tensor) -> int:
    return int(t.untyped_storage().nbytes())


@dataclass
class SavedTensors:
    """What autograd saved during one recorded region.

    `activation_bytes`: bytes of distinct storages saved that are not excluded (the activation
    memory a training step holds between forward and backward). `param_bytes`: bytes of distinct
    excluded storages that were saved (weights). `count`: number of pack-hook calls (saved tensor
    slots, before dedupe). `by_shape` counts bytes per (dtype, shape) for inspection.
    """

    activation_bytes: int = 0
    param_bytes: int = 0
    count: int = 0
    storages: int = 0
    by_shape: dict[str, int] = field(default_factory=dict)


class SavedTensorRecorder:
    """Context manager recording saved-for-backward tensors, deduplicated by storage.

    The recorder keeps the tensors alive only as long as autograd does (the pack hook returns the
    tensor itself), so it does not change the memory it measures.
    """

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self._exclude = {storage_key(t) for t in exclude}
        self._seen: set[int] = set()
        self.result = SavedTensors()
        self._ctx: contextlib.AbstractContextManager | None = None

    def _pack(self, t: Tensor) -> Tensor:
        self.result.count += 1
        key = storage_key(t)
        if key in self._seen:
            return t
        self._seen.add(key)
        nbytes = storage_nbytes(t)
        self.result.storages += 1
        if key in self._exclude:
            self.result.param_bytes += nbytes
        else:
            self.result.activation_bytes += nbytes
            name = f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"
            self.result.by_shape[name] = self.result.by_shape.get(name, 0) + nbytes
        return t

    def __enter__(self) -> SavedTensorRecorder:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._ctx is not None
        self._ctx.__exit__(*exc)


@contextlib.contextmanager
def record_saved(exclude: Iterable[Tensor] = ()) -> Iterator[SavedTensors]:
    """`with record_saved(model.parameters()) as saved: loss = model(x).sum()` then read
    `saved.activation_bytes`."""
    rec = SavedTensorRecorder(exclude)
    with rec:
        yield rec.result


def saved_bytes_of_model(model: torch.nn.Module, inputs: Tensor) -> SavedTensors:
    """Saved-for-backward bytes of one training forward of `model` on `inputs` (parameters excluded).

    Only the forward is run; the graph is dropped afterwards.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    with record_saved(params) as saved:
        out = model(inputs)
    del out
    return saved
