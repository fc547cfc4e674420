"""k-NN accuracy of the teacher during pre-training (`--eval_every`), with eval_knn.py's code.

DINO's weighted k-NN (k=20, T=0.07, L2-normalised features) on the teacher's encoding, with
DINO's evaluation pre-processing at the training resolution, in exact fp32 (TF32 off while it
evaluates): the figures equal eval_knn.py's on the same checkpoint, subsets and k. Under
torchrun the bank stays split across the ranks, as in eval_knn.py. The sets are built when training starts, so a missing or empty folder stops the run
before epoch 0; a new run also measures its untrained network (and, on request, raw pixels)
before the first epoch, which reads every image once and gives the curves their starting point.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import datasets
import devices
import errors
import features
import knn
import run_folder
import utils

NB_KNN = 20          # DINO's headline k
TEMPERATURE = 0.07   # DINO's neighbour-weight temperature
Figures = Dict[str, Optional[float]]  # top1, top5 (None for fewer than 5 classes), seconds
# Where each network's figures go: log.txt keys (read by plot_runs.py and the summary, and
# kept in knn_baselines.json) and TensorBoard tags.
LOG_PREFIX = {"teacher": "knn_", "student": "student_knn_"}
BOARD_PREFIX = {"teacher": "knn/", "student": "knn_student/"}


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eval_every", default=0, type=utils.non_negative_int,
                        help="Every N epochs (and after the last), measure the teacher's weighted "
                             "20-NN accuracy on --eval_data_path; logged as knn_top1/knn_top5/"
                             "knn_seconds in log.txt and TensorBoard. 0: never.")
    parser.add_argument("--eval_data_path", default=None, type=str,
                        help="Labelled data for --eval_every, as eval_knn.py's --data_path: a "
                             "folder with train/ (the bank) and val/ (the queries), or a built-in "
                             "set (fashion_mnist, digits).")
    parser.add_argument("--eval_train_subset", default=10000, type=utils.non_negative_int,
                        help="Bank size of --eval_every (class-balanced in a folder; 0: all).")
    parser.add_argument("--eval_test_subset", default=10000, type=utils.non_negative_int,
                        help="Queries of --eval_every (class-balanced in a folder; 0: all).")
    parser.add_argument("--eval_raw_pixels", default=False, type=utils.bool_flag,
                        help="Also measure the k-NN accuracy of the raw pixels (the images after "
                             "the evaluation pre-processing) once at the start: the floor a "
                             "network should beat.")
    parser.add_argument("--eval_student", default=False, type=utils.bool_flag,
                        help="Also measure the student at each --eval_every evaluation (logged as "
                             "student_knn_top1/top5/seconds; doubles the evaluation time). Early in "
                             "training the EMA teacher lags the student.")


def check_args(args: argparse.Namespace) -> None:
    if args.eval_every and not args.eval_data_path:
        raise errors.UserError("--eval_every needs --eval_data_path (a folder with train/ and val/, "
                               "or fashion_mnist/digits)")


class KnnMonitor:
    """The evaluation sets of a training run and the k-NN measurement on them."""

    def __init__(self, args: argparse.Namespace, image_size: int) -> None:
        transform = features.eval_transform(image_size)
        self.bank = datasets.build_dataset(args.eval_data_path, "train", transform,
                                           subset=args.eval_train_subset or None)
        self.queries = datasets.build_dataset(args.eval_data_path, "test", transform,
                                              subset=args.eval_test_subset or None)
        if len(self.bank) < NB_KNN:
            raise errors.UserError(f"--eval_data_path {args.eval_data_path} has {len(self.bank)} "
                                   f"training images; the {NB_KNN}-NN needs at least {NB_KNN}")
        self.bank_labels = torch.as_tensor(datasets.dataset_labels(self.bank))
        self.query_labels = torch.as_tensor(datasets.dataset_labels(self.queries))
        self.every, self.epochs = args.eval_every, args.epochs
        self.device, self.batch_size = args.device, args.batch_size_per_gpu
        self.num_workers = args.num_workers
        self.description = (f"{NB_KNN}-NN, bank of {len(self.bank)} {args.eval_data_path} training "
                            f"images, {len(self.queries)} queries")

    def due(self, epoch: int) -> bool:
        """Whether the end of this epoch is evaluated: every N-th epoch and the last one."""
        return bool(self.every) and ((epoch + 1) % self.every == 0 or epoch + 1 == self.epochs)

    def measure(self, forward: Callable[[torch.Tensor], torch.Tensor]) -> Figures:
        """The Figures of the L2-normalised forward(images), on every rank, in exact fp32 as in
        eval_knn.py (training runs in TF32 on GPUs: its settings are back when this returns)."""
        start = time.time()
        common = dict(batch_size=self.batch_size, num_workers=self.num_workers, device=self.device,
                      header=None)
        normalised = lambda images: F.normalize(forward(images).float(), dim=1)  # noqa: E731
        with devices.tf32_allowed(False):
            bank, index = features.extract_features(normalised, self.bank, shard=True, **common)
            queries = features.extract_features(normalised, self.queries, **common)
            top1, top5 = knn.knn_evaluate(bank, self.bank_labels[index], queries, self.query_labels,
                                          nb_knn=[NB_KNN], temperature=TEMPERATURE,
                                          sharded=utils.get_world_size() > 1)[NB_KNN]
        return dict(top1=round(top1, 4), top5=None if top5 is None else round(top5, 4),
                    seconds=round(time.time() - start, 2))

    def evaluate(self, backbone: nn.Module) -> Figures:
        """The k-NN figures of a backbone (in eval mode for the measurement)."""
        was_training = backbone.training
        backbone.eval()
        try:
            with torch.no_grad():
                return self.measure(backbone)
        finally:
            backbone.train(was_training)

    def measure_baselines(self, backbone: nn.Module, raw_pixels: bool, output_dir: Path) -> None:
        """Before a new run's first epoch: the untrained network's figures (and raw pixels'),
        printed and kept in OUTPUT_DIR/knn_baselines.json for the summary and plot_runs.py."""
        baselines = {"untrained": self.evaluate(backbone)}
        print(f"k-NN of the untrained teacher ({self.description}): {format_figures(baselines['untrained'])}")
        if raw_pixels:
            baselines["raw pixels"] = self.measure(lambda images: images.flatten(1))
            print(f"k-NN of the raw pixels ({self.description}): {format_figures(baselines['raw pixels'])}")
        run_folder.write_baselines(output_dir, {**{name: log_entries(figures) for name, figures in baselines.items()},
                                                "description": self.description})

    def evaluate_networks(self, epoch: int, networks: Dict[str, nn.Module]
                          ) -> Tuple[Dict[str, Optional[float]], Dict[str, Optional[float]]]:
        """The figures of each network ("teacher", "student") after `epoch`, printed; returns
        them as log.txt entries and as TensorBoard scalars."""
        log: Dict[str, Optional[float]] = {}
        board: Dict[str, Optional[float]] = {}
        for network, backbone in networks.items():
            figures = self.evaluate(backbone)
            print(f"k-NN of the {network} after epoch {epoch} ({self.description}): {format_figures(figures)}")
            log.update(log_entries(figures, network))
            board.update({BOARD_PREFIX[network] + name: value for name, value in figures.items()})
        return log, board


def log_entries(figures: Figures, network: str = "teacher") -> Dict[str, Optional[float]]:
    return {LOG_PREFIX[network] + name: value for name, value in figures.items()}


def format_figures(figures: Figures) -> str:
    line = f"Top1: {figures['top1']:.2f}"
    if figures["top5"] is not None:
        line += f", Top5: {figures['top5']:.2f}"
    return line + f" ({figures['seconds']:.1f} s)"


def student_figure(entry: Dict[str, Any]) -> str:
    return f" (student {entry['student_knn_top1']:.2f})" if entry.get("student_knn_top1") is not None else ""


def summary(output_dir: Path, history: List[Dict[str, Any]]) -> Optional[str]:
    """What training bought, in k-NN top-1: raw pixels, untrained, then each evaluated epoch."""
    evaluated = [entry for entry in history if "knn_top1" in entry]
    if not evaluated:
        return None
    baselines = run_folder.read_baselines(output_dir)
    parts = [f"{name} {baselines[name]['knn_top1']:.2f}" for name in ("raw pixels", "untrained")
             if name in baselines]
    parts += [f"epoch {entry['epoch']} {entry['knn_top1']:.2f}" + student_figure(entry) for entry in evaluated]
    return f"k-NN top-1 ({baselines.get('description', f'{NB_KNN}-NN')}): " + ", ".join(parts)
