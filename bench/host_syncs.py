"""Host syncs and op counts of the device stage and the training step, recorded on any device.

    python bench/host_syncs.py                          # DINO's ViT-S/16 recipe, on the CPU
    python bench/host_syncs.py --device cuda --output_json ops.json    # the same on a GPU

A GPU runs ahead of the Python process that queues its work; whenever the process needs a value
from the GPU (`.item()`, `bool(tensor)`, a copy to the host, the size of a `.nonzero()`) or makes
a blocking copy to it (`torch.tensor(data, device=...)`), it waits until the GPU has caught up,
and the GPU then idles until new work arrives. HostSyncRecorder finds these on any device, the
CPU included, from the ops themselves: a TorchDispatchMode sees every aten op with its tags
(`data_dependent_output`: a value read on the host; `dynamic_output_shape`: a shape that depends
on the data, so the host must wait for it; `copy_` between a host and a device tensor) and a
TorchFunctionMode sees the Python-level copies (`.cpu()`, `.tolist()`, `.numpy()`, `.to("cpu")`,
`torch.tensor(..., device=...)`, `.to(device)` of a host tensor without `non_blocking`).

Host tensors: on the CPU every tensor lives on the host, so the recorder tracks which tensors
would be host tensors on a GPU: the result of a copy to the host, of `torch.tensor` or a factory
called without `device=`, and what is computed from host tensors alone. A sync op counts when
one of its tensors is a device tensor. (A `.to(device)` of a device tensor to the CPU device
counts as a copy to the host: on a GPU it would be one.)

Op counts: every aten op dispatched below autograd, and those of them that are not views
(`kernels`): on a GPU nearly each of those is one kernel launch; on the CPU a few fuse or
split differently, so the counts are the CPU's.
"""
from __future__ import annotations

import argparse
import collections
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch.overrides import TorchFunctionMode, resolve_name
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import augmentations  # noqa: E402
import main_dino_sparo as dino  # noqa: E402
from bench.measure import STEP_AT, bench_device, random_crops, write_json  # noqa: E402

aten = torch.ops.aten
# Indexing reads the size of a boolean mask on the host; with integer indices it does not.
MASK_INDEXING = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default,
                 aten._index_put_impl_.default}
VALUE_READS = {aten.is_nonzero.default, aten.item.default}  # (tagged ones aside)
COPIES_TO_HOST = {torch.Tensor.cpu, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__array__}
FROM_PYTHON_DATA = {"torch.tensor", "torch.as_tensor", "torch.asarray"}
FACTORIES = {f"torch.{name}" for name in ("zeros", "ones", "empty", "full", "rand", "randn", "randint",
                                          "arange", "linspace", "eye", "randperm")}


@dataclass
class Sync:
    kind: str  # "value read", "data-dependent shape", "copy to host", "blocking copy from host"
    op: str
    where: str  # the innermost line of this repository's code that caused it

    def __str__(self) -> str:
        return f"{self.kind}: {self.op} at {self.where}"


class HostSyncRecorder:
    """Context manager: records the host syncs (`syncs`) and the dispatched ops (`ops`, a
    Counter by op name; `kernels`: those that are not views) of the code it wraps."""

    def __init__(self) -> None:
        self.syncs: List[Sync] = []
        self.ops: collections.Counter = collections.Counter()
        self.kernels = 0
        self._host: Dict[int, torch.Tensor] = {}  # storage address -> a tensor keeping it alive
        self._modes = (_FunctionMode(self), _DispatchMode(self))

    def __enter__(self) -> "HostSyncRecorder":
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        self._host.clear()

    @property
    def total_ops(self) -> int:
        return sum(self.ops.values())

    def is_host(self, tensor: torch.Tensor) -> bool:
        return _address(tensor) in self._host

    def mark_host(self, result: Any) -> None:
        for tensor in _tensors(result):
            self._host[_address(tensor)] = tensor

    def record(self, kind: str, op: str) -> None:
        self.syncs.append(Sync(kind, op, _caller()))


class _DispatchMode(TorchDispatchMode):
    def __init__(self, recorder: HostSyncRecorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        recorder = self.recorder
        recorder.ops[str(func.overloadpacket.__name__)] += 1
        recorder.kernels += not func.is_view
        inputs = _tensors((args, kwargs))
        if inputs and all(recorder.is_host(t) for t in inputs):
            recorder.mark_host(out)
            return out
        if func is aten.copy_.default:  # between a host and a device tensor
            non_blocking = kwargs.get("non_blocking", args[2] if len(args) > 2 else False)
            if recorder.is_host(args[0]):
                recorder.record("copy to host", "copy_ into a host tensor")
            elif recorder.is_host(args[1]) and not non_blocking:
                recorder.record("blocking copy from host", "copy_ into a device tensor")
        elif torch.Tag.data_dependent_output in func.tags or func in VALUE_READS:
            recorder.record("value read", str(func))
        elif func in MASK_INDEXING:
            if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
                recorder.record("data-dependent shape", f"{func} with a boolean mask")
        elif torch.Tag.dynamic_output_shape in func.tags:
            recorder.record("data-dependent shape", str(func))
        return out


class _FunctionMode(TorchFunctionMode):
    def __init__(self, recorder: HostSyncRecorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        recorder = self.recorder
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        on_device = source is not None and not recorder.is_host(source)
        target = _target_device(args[1:], kwargs) if func is torch.Tensor.to else None
        to_host = func in COPIES_TO_HOST or (target is not None and target.type == "cpu")
        if to_host and on_device:
            recorder.record("copy to host", getattr(func, "__name__", str(func)))
        upload = func is torch.Tensor.cuda or (target is not None and target.type != "cpu")
        if upload and source is not None and not on_device and not kwargs.get("non_blocking", False):
            recorder.record("blocking copy from host", f"Tensor.{func.__name__}")
        if func is torch.Tensor.new_tensor and on_device:
            recorder.record("blocking copy from host", "Tensor.new_tensor")
        name = resolve_name(func) or ""
        from_data = name in FROM_PYTHON_DATA and not (args and isinstance(args[0], torch.Tensor))
        if from_data and kwargs.get("device") is not None:
            recorder.record("blocking copy from host", f"{name}(..., device=...)")
        out = func(*args, **kwargs)
        if to_host or ((from_data or name in FACTORIES) and kwargs.get("device") is None):
            recorder.mark_host(out)  # on the host, as it would be on a GPU machine
        return out


def _address(tensor: torch.Tensor) -> int:
    try:
        return tensor.untyped_storage().data_ptr() or id(tensor)
    except (RuntimeError, NotImplementedError):  # tensors without storage (meta, some views)
        return id(tensor)


def _tensors(tree: Any) -> List[torch.Tensor]:
    return [leaf for leaf in pytree.tree_leaves(tree) if isinstance(leaf, torch.Tensor)]


def _target_device(args: Any, kwargs: Dict[str, Any]) -> Optional[torch.device]:
    for value in (*args, kwargs.get("device")):
        if isinstance(value, (str, torch.device)):
            return torch.device(value)
    return None


def _target_is_cpu(args: Any, kwargs: Dict[str, Any]) -> bool:
    device = _target_device(args, kwargs)
    return device is not None and device.type == "cpu"


def _caller() -> str:
    """file:line of the innermost frame in this repository outside this file."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename)
        if path != Path(__file__) and REPO in path.parents and ".venv" not in path.parts:
            return f"{path.relative_to(REPO)}:{frame.lineno}"
    return "outside the repository"


# ================================================================= the benchmark (CLI)
def record(function: Callable[[], Any]) -> HostSyncRecorder:
    with HostSyncRecorder() as recorder:
        function()
    return recorder


def summary(recorder: HostSyncRecorder) -> Dict[str, Any]:
    return dict(ops=recorder.total_ops, kernels=recorder.kernels, host_syncs=len(recorder.syncs),
                syncs=collections.Counter(s.kind for s in recorder.syncs))


def measure(args: argparse.Namespace) -> Dict[str, Dict[str, Any]]:
    """The device stage on uint8 crops (--device_stage_batch images), then a training step
    without it (--batch_size_per_gpu images), each after one unrecorded warm-up call."""
    stage = augmentations.PhotometricAugmentation(args.local_crops_number, args.global_crops_size)
    crops = random_crops(args, args.device_stage_batch, uint8=True)
    stage(crops)
    results = {"device stage": summary(record(lambda: stage(crops)))}
    images = stage(random_crops(args, args.batch_size_per_gpu, uint8=True))
    models, optimisation = dino.build_training(args)
    without_stage = argparse.Namespace(**{**vars(args), "augment_on_device": False})
    step = dino.TrainStep(models, optimisation, without_stage)
    step(images, *STEP_AT)
    results["training step"] = summary(record(lambda: step(images, *STEP_AT)))
    return results


def main(argv: Optional[List[str]] = None) -> Dict[str, Dict[str, Any]]:
    parser = argparse.ArgumentParser("host_syncs", parents=[dino.get_args_parser()])
    parser.add_argument("--output_json", default=None, help="Also write the results here.")
    parser.add_argument("--device_stage_batch", type=int, default=64,
                        help="Images per crop position in the device stage (DINO's batch per GPU; "
                             "an index-list pipeline's op count depends on it).")
    # The training step's op count does not depend on the batch: a small one keeps it cheap on CPU.
    parser.set_defaults(batch_size_per_gpu=4)
    args = parser.parse_args(argv)
    args.device = bench_device(args.device)
    args.distributed, args.augment_on_device = False, True
    torch.manual_seed(0)
    results = measure(args)
    print(f"{args.arch}/{args.patch_size}, crops 2 x {args.global_crops_size} + {args.local_crops_number} x "
          f"{args.local_crops_size} px, out_dim {args.out_dim}, batch {args.device_stage_batch} (device stage) "
          f"and {args.batch_size_per_gpu} (training step), on {args.device}")
    for name, result in results.items():
        print(f"{name}: {result['ops']} dispatched ops, {result['kernels']} not views, "
              f"{result['host_syncs']} host syncs {dict(result['syncs'])}")
    write_json(args.output_json, results, indent=1)
    return results


if __name__ == "__main__":
    main()
