"""TensorBoard curves of a pre-training run, written by rank 0 into OUTPUT_DIR/tensorboard/.

What is written (tags):
- per iteration, `train/loss`, `train/teacher_entropy`, `train/lr`, `train/wd`,
  `train/momentum` (the teacher's EMA momentum) and `train/teacher_temp`. The values are read
  from the device once per print interval (the loss is not synchronised every step), and then
  written with their own iteration numbers, so the curves have every iteration;
- per print interval, `speed/img_per_s`, `speed/iter_seconds`, `speed/data_seconds` (DINO's
  `time` and `data`) and `memory/max_mem_mib`; for SPARO, the teacher's slot attention on the
  interval's last batch of global crops: `slots/attention_entropy` (per slot, nats over the
  patches, as a histogram, with its mean) and `slots/cls_weight` (the weight each slot puts on
  the CLS token);
- per evaluation, `knn/top1`, `knn/top5` and `knn/seconds` (`knn_student/...` with --eval_student).

A resumed run opens its writer with `purge_step` at its first iteration: TensorBoard then hides
what an interrupted run wrote past the checkpoint it resumes from, so each curve continues
without duplicated or missing steps.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

import torch

import errors
import run_folder
import utils


class TrainingBoard:
    """A SummaryWriter that is a no-op when disabled (every rank but 0, or `--tensorboard false`)."""

    def __init__(self, output_dir: Path, first_step: int, enabled: bool = True) -> None:
        self.writer = None
        if enabled:
            # Imported here: tensorboard is only needed by the process that writes.
            from torch.utils.tensorboard import SummaryWriter

            folder = Path(output_dir) / run_folder.TENSORBOARD
            try:  # a file or a read-only folder in its place: one line now, not a traceback later
                utils.ensure_output_dir(folder, "the TensorBoard folder")
            except errors.UserError as error:
                raise errors.UserError(f"{error} (or turn it off: --tensorboard false)") from error
            wait_for_a_new_second(folder)
            # purge_step also at 0: a run killed in its first epoch restarts there
            self.writer = SummaryWriter(str(folder), purge_step=first_step)

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def add_series(self, series: Mapping[str, Sequence[float]], first_step: int) -> None:
        """Per-iteration values: the i-th value of each series belongs to step first_step + i."""
        if self.writer is None:
            return
        for tag, values in series.items():
            for offset, value in enumerate(values):
                self.writer.add_scalar(tag, float(value), first_step + offset)

    def add_scalars(self, values: Mapping[str, Optional[float]], step: int) -> None:
        """Values of one step; None (not measured, e.g. top-5 of a 3-class set) is skipped."""
        if self.writer is None:
            return
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, float(value), step)

    def add_slot_statistics(self, statistics: Mapping[str, torch.Tensor], step: int) -> None:
        """Per-slot statistics (one value per slot): a histogram and the mean of each."""
        if self.writer is None:
            return
        for tag, per_slot in statistics.items():
            self.writer.add_histogram(f"slots/{tag}", per_slot, step)
            self.writer.add_scalar(f"slots/{tag}_mean", float(per_slot.mean()), step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def wait_for_a_new_second(folder: Path) -> None:
    """TensorBoard reads a folder's event files in name order. A name holds the second it was
    created in, then host, pid and a per-process counter compared as text (".10" before ".9"),
    so a file opened in the same second as an earlier one could be read first and its purge
    would not hide the earlier steps. Opening in a later second keeps the order (a wait of at
    most a second, only when a writer restarts within one, e.g. in-process)."""
    now = time.time()
    if any(f".{int(now):010d}." in path.name for path in folder.glob("events.out.tfevents.*")):
        time.sleep(math.ceil(now) - now + 0.01)


@torch.no_grad()
def slot_statistics(attention: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-slot means over a batch of SPARO attention weights alpha (B, L, N), token 0 = CLS:
    `attention_entropy`, the entropy (nats) of each slot's attention renormalised over the
    patches (log of the patch count when uniform, 0 when on one patch), and `cls_weight`, the
    weight each slot puts on the CLS token. On the attention's device: the training loop copies
    them to the host with the print window's other values."""
    attention = attention.float()
    patches = attention[:, :, 1:]
    patches = patches / patches.sum(-1, keepdim=True).clamp_min(1e-12)
    entropy = -(patches * patches.clamp_min(1e-12).log()).sum(-1)
    return dict(attention_entropy=entropy.mean(0), cls_weight=attention[:, :, 0].mean(0))

