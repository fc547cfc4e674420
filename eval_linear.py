"""Linear probe of a frozen backbone: a learning-rate grid (the default) or DINO's single head.
README, "Evaluation", describes the protocol and the flags.

    python eval_linear.py --pretrained_weights OUT/checkpoint.pth --data_path /path/to/imagenet
    torchrun --nproc_per_node=8 eval_linear.py --pretrained_weights OUT/checkpoint.pth ...
    python eval_linear.py --pretrained_weights OUT/checkpoint.pth --data_path digits \
        --train_augmentation none --cache_features true --epochs 100      # fast on CPU
    python eval_linear.py --pretrained_weights OUT/checkpoint.pth --lr 0.001   # DINO's one head
    python eval_linear.py --pretrained_weights OUT/checkpoint.pth --evaluate   # your saved head
"""
from __future__ import annotations

import argparse
import hashlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms as T

import datasets
import devices
import errors
import features as feats
import knn
import run_folder
import utils
import vision_transformer as vits
import weight_files

CHECKPOINT_NAME = "linear_checkpoint.pth"
LOG_NAME = "linear_log.txt"
# DINOv2's 13 learning rates (1e-5 .. 0.1, for a batch of 256) extended up to 10: issue 19
# measured SPARO's best probe at lr 1-10 on Fashion-MNIST features, beyond DINOv2's top.
LR_GRID = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1,
           0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
DEFAULT_HOLDOUT = 0.1  # of the training images, for choosing the grid's head


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Evaluation with linear classification", add_help=False)
    feats.add_eval_args(parser, batch_size=128)
    parser.add_argument("--n_last_blocks", default=None, type=utils.positive_int,
                        help="CLS read-out: concatenate the CLS tokens of this many last blocks "
                             "(DINO: 4 for ViT-S, 1 for ViT-B). Default: the grid tries 1 and 4; "
                             "with --lr, 4. Ignored by the other read-outs, whose feature is "
                             "their encoding.")
    parser.add_argument("--avgpool_patchtokens", default=None, type=utils.bool_flag,
                        help="CLS read-out: also concatenate the mean patch token of the last "
                             "block (DINO: False for ViT-S, True for ViT-B). Default: the grid "
                             "tries both; with --lr, False.")
    parser.add_argument("--scale_sparo_features", default=True, type=utils.bool_flag,
                        help="SPARO and cls_proj: multiply the unit-norm encoding (width D) by sqrt(D) so its "
                             "coordinates have the unit scale of LayerNorm'd CLS features that "
                             "DINO's learning rates assume (a constant factor, like a larger lr).")
    parser.add_argument("--epochs", default=100, type=utils.positive_int, help="Number of training epochs.")
    parser.add_argument("--lr", default=None, type=utils.positive_float,
                        help="Train DINO's single head at this learning rate (for a total batch "
                             "of 256, scaled linearly with batch_size_per_gpu * processes; DINO's "
                             "default 0.001) on every training image. Default: the grid.")
    parser.add_argument("--lr_grid", default=None, nargs="+", type=utils.positive_float,
                        help="Learning rates (for a batch of 256) of the heads trained together; "
                             "default: DINOv2's 13 from 1e-5 to 0.1, extended up to 10.")
    parser.add_argument("--holdout_fraction", default=None, type=utils.unit_interval,
                        help="Fraction of the training images (seeded by --seed) kept out of "
                             "training to choose the grid's head; never the test set. Default: "
                             "0.1 for the grid, 0 with --lr (DINO trains on every image).")
    parser.add_argument("--num_labels", default=None, type=utils.positive_int,
                        help="Number of classes of the linear layer (default: inferred from the "
                             "training labels, max label + 1).")
    parser.add_argument("--val_freq", default=1, type=utils.positive_int, help="Epochs between evaluations.")
    parser.add_argument("--output_dir", default=".", help="Where the linear head and its log go.")
    parser.add_argument("--evaluate", action="store_true",
                        help="Only evaluate the head saved in --linear_weights (default: "
                             "OUTPUT_DIR/linear_checkpoint.pth) on the test set.")
    parser.add_argument("--linear_weights", default=None,
                        help="Linear head checkpoint for --evaluate (default: OUTPUT_DIR/"
                             "linear_checkpoint.pth).")
    parser.add_argument("--train_augmentation", default="dino", choices=("dino", "none"),
                        help="dino: RandomResizedCrop + horizontal flip (DINO's recipe); none: "
                             "the test pre-processing (resize + centre crop).")
    parser.add_argument("--cache_features", default=False, type=utils.bool_flag,
                        help="Extract the frozen features once and train the linear layer on "
                             "them: much faster (especially on CPU). Needs --train_augmentation "
                             "none, since cached features cannot be re-augmented.")
    parser.add_argument("--print_freq", default=20, type=utils.positive_int, help="Iterations between progress lines.")
    parser.add_argument("--seed", default=0, type=int, help="Random seed.")
    return parser


# ================================================================================ model
class LinearClassifier(nn.Module):
    """A linear layer on frozen features (DINO's init: N(0, 0.01) weights, zero bias)."""

    def __init__(self, dim: int, num_labels: int) -> None:
        super().__init__()
        self.num_labels = num_labels
        self.linear = nn.Linear(dim, num_labels)
        self.linear.weight.data.normal_(mean=0.0, std=0.01)
        self.linear.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


@dataclass(frozen=True)
class ProbeSpec:
    """One head of the grid: its learning rate (for a batch of 256) and the columns of the
    extracted feature it reads, which for CLS are one of DINO's variants."""
    lr: float
    start: int
    stop: int
    n_last_blocks: Optional[int] = None  # CLS variants only
    avgpool: Optional[bool] = None

    def describe(self) -> str:
        if self.n_last_blocks is None:
            return "encoding"
        return f"CLS of the last {self.n_last_blocks} block(s)" + (" + mean patch" if self.avgpool else "")


@dataclass(frozen=True)
class FeatureLayout:
    """What frozen_features extracts once for every head: the CLS tokens of the last n_last_blocks
    blocks, then the mean patch token if with_avgpool (for CLS); the encoding otherwise."""
    n_last_blocks: int
    with_avgpool: bool
    width: int


def probe_grid(args: argparse.Namespace, config: Dict[str, Any], num_blocks: int,
               slots: Optional[List[int]]) -> Tuple[FeatureLayout, List[ProbeSpec]]:
    """The extracted feature's layout and one spec per (feature variant, learning rate).

    CLS: a variant fixed by a flag stays fixed; an unset one is searched by the grid ({1, 4}
    last blocks, with and without the mean patch token) and takes DINO's value with --lr. Each
    variant is a contiguous column range of one extraction: [CLS_{n_max-n+1} .. CLS_{n_max}, mean]."""
    learning_rates = [args.lr] if args.lr is not None else list(args.lr_grid or LR_GRID)
    if config["readout"] != "cls":
        width = feature_dim(config, 0, False, slots)
        return FeatureLayout(0, False, width), [ProbeSpec(lr, 0, width) for lr in learning_rates]
    single = args.lr is not None
    blocks = ([args.n_last_blocks] if args.n_last_blocks else
              [4] if single else sorted({1, min(4, num_blocks)}))
    pools = ([args.avgpool_patchtokens] if args.avgpool_patchtokens is not None else
             [False] if single else [False, True])
    layout = FeatureLayout(max(blocks), any(pools), feature_dim(config, max(blocks), any(pools), None))
    token = layout.width // (layout.n_last_blocks + int(layout.with_avgpool))
    specs = [ProbeSpec(lr, (layout.n_last_blocks - n) * token, (layout.n_last_blocks + int(pool)) * token,
                       n, pool)
             for n in blocks for pool in pools for lr in learning_rates]
    return layout, specs


class LinearProbes(nn.Module):
    """One LinearClassifier per spec, trained together on the same batches. Heads reading the
    same feature columns (specs in runs of one variant) share one matrix product; each head
    still has its own weights, loss and learning rate, and summing the losses gives every head
    exactly the gradient it would get alone. Every head starts from the same seeded weights, as
    a single head trained with the same --seed."""

    def __init__(self, specs: Sequence[ProbeSpec], num_labels: int, seed: int) -> None:
        super().__init__()
        self.specs, self.num_labels = list(specs), num_labels
        heads = []
        for spec in self.specs:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                heads.append(LinearClassifier(spec.stop - spec.start, num_labels))
        self.heads = nn.ModuleList(heads)
        self.runs: List[Tuple[int, int, List[int]]] = []  # (start, stop, heads) per run of a variant
        for index, spec in enumerate(self.specs):
            if self.runs and self.runs[-1][:2] == (spec.start, spec.stop):
                self.runs[-1][2].append(index)
            else:
                self.runs.append((spec.start, spec.stop, [index]))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Every head's logits, (B, heads, labels)."""
        logits = []
        for start, stop, members in self.runs:
            weight = torch.cat([self.heads[i].linear.weight for i in members])
            bias = torch.cat([self.heads[i].linear.bias for i in members])
            logits.append(F.linear(features[:, start:stop], weight, bias).unflatten(1, (len(members), -1)))
        return torch.cat(logits, dim=1)


def head_losses(logits: torch.Tensor, target: torch.Tensor, divisor: Optional[float] = None) -> torch.Tensor:
    """Each head's cross-entropy summed over the batch and divided by `divisor` (default: the
    batch size, i.e. the mean), (heads,), from logits (B, heads, labels)."""
    batch, heads, labels = logits.shape
    losses = F.cross_entropy(logits.reshape(batch * heads, labels), target.repeat_interleave(heads),
                             reduction="none")
    return losses.view(batch, heads).sum(0) / (batch if divisor is None else divisor)


def top_predictions(logits: torch.Tensor) -> torch.Tensor:
    """The 5 (or all, if fewer) most likely labels of every head, (B, heads, k); -1 where a
    head's logits are not finite, so that such a prediction never counts as right."""
    predictions = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    return predictions.masked_fill(~torch.isfinite(logits).all(-1, keepdim=True), -1)


def frozen_features(model: nn.Module, images: torch.Tensor, config: Dict[str, Any],
                    n_last_blocks: int, avgpool: bool, slots: Optional[List[int]],
                    scale_sparo: bool = True) -> torch.Tensor:
    """The linear probe's input: the encoding (a SPARO slot subset rescaled to unit norm), or
    DINO's CLS feature: CLS tokens of the last n blocks (+ the mean patch token), concatenated.

    scale_sparo multiplies a unit-norm encoding (SPARO, cls_proj) of width D by sqrt(D),
    giving its coordinates the unit scale of LayerNorm'd CLS tokens, for which DINO's learning
    rates were tuned. (A constant factor, equivalent to a D-times larger learning rate; without
    it DINO's default lr barely moves the head in a short run.)
    """
    if config["readout"] != "cls":
        encoding = feats.keep_slots(model(images).float(), config, slots)
        unit_norm = config["readout"] in vits.UNIT_NORM_READOUTS
        return encoding * math.sqrt(encoding.shape[1]) if scale_sparo and unit_norm else encoding
    blocks = model.get_intermediate_layers(images, n_last_blocks)
    parts = [tokens[:, 0] for tokens in blocks]
    if avgpool:
        parts.append(blocks[-1][:, 1:].mean(dim=1))
    return torch.cat(parts, dim=-1).float()


def feature_dim(config: Dict[str, Any], n_last_blocks: int, avgpool: bool,
                slots: Optional[List[int]]) -> int:
    if config["readout"] == "cls":
        return vits.ARCHS[config["arch"]][0] * (n_last_blocks + int(avgpool))
    if slots:
        return int(config["sparo_dim"]) * len(slots)
    return vits.BackboneConfig.from_dict(config).num_features


# ================================================================================= data
def build_transforms(args: argparse.Namespace, crop_size: int) -> Tuple[Callable, Callable]:
    val_transform = feats.eval_transform(crop_size, args.resize_size)
    if args.train_augmentation == "none":
        return val_transform, val_transform
    train_transform = T.Compose([T.RandomResizedCrop(crop_size), T.RandomHorizontalFlip(),
                                 T.ToTensor(), T.Normalize(utils.IMAGENET_MEAN, utils.IMAGENET_STD)])
    return train_transform, val_transform


def holdout_split(count: int, fraction: float, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(training rows, held-out rows), each sorted: knn.heldout_split's seeded `fraction`."""
    held, rows = knn.heldout_split(count, fraction, seed)
    if fraction > 0 and not len(rows):
        raise errors.UserError(f"--holdout_fraction {fraction} of {count} training images leaves "
                               f"{len(held)} held out and 0 to train on: both need one")
    return rows.sort().values, held.sort().values


class CachedBatches:
    """Mini-batches of cached features, of which this process holds its shard only: the data
    set rows `index` (extract_features(..., shard=True)). Each step takes the next
    batch_size x W training rows of one seeded permutation (the same on every process) and each
    process trains on those it holds, its loss divided by the step's rows / W (the third item
    of a batch): DDP's mean of the processes' gradients is then the gradient of the mean loss
    over all the step's rows, the step one process takes with a batch of batch_size x W."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, rows: torch.Tensor,
                 total: int, batch_size: int, seed: int) -> None:
        self.features, self.labels, self.rows, self.seed = features, labels, rows, seed
        self.world = utils.get_world_size()
        self.step_rows = batch_size * self.world
        self.local = torch.full((total,), -1, dtype=torch.long)  # data set row -> row of the shard
        self.local[index] = torch.arange(len(index))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (len(self.rows) + self.step_rows - 1) // self.step_rows

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor, float]]:
        # DistributedSampler's permutation for one process: a single process's steps are as before
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = self.rows[torch.randperm(len(self.rows), generator=generator)]
        for start in range(0, len(order), self.step_rows):
            step = order[start:start + self.step_rows]
            held = self.local[step]
            index = held[held >= 0].to(self.features.device)
            yield self.features[index], self.labels[index], len(step) / self.world


# ============================================================================= training
def train_one_epoch(probes: nn.Module, optimizer: torch.optim.Optimizer, batches: Any,
                    to_features: Callable, epoch: int, args: argparse.Namespace) -> Dict[str, float]:
    probes.train()
    metric_logger = utils.MetricLogger(delimiter="  ")
    metric_logger.meters["lr"] = utils.SmoothedValue(window_size=1, fmt="{value:.6f}")
    header = f"Epoch: [{epoch}]"
    for inputs, target, *divisor in metric_logger.log_every(batches, args.print_freq, header):
        inputs = inputs.to(args.device, non_blocking=True)
        target = target.to(args.device, non_blocking=True)
        with torch.no_grad(), devices.autocast(args.device, args.use_fp16):
            features = to_features(inputs)
        losses = head_losses(probes(features), target, *divisor)  # CachedBatches give a divisor
        finite = finite_per_entry(losses)
        # stop before the step (no NaN head is saved) when the one head, or the features
        # themselves, are not finite; a grid only retires its diverging heads
        if not finite.all() and (len(losses) == 1 or not finite_everywhere(features.float().sum())):
            raise errors.UserError(nonfinite_loss_message(losses[~finite][0].item(), features, epoch))
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()  # d(sum)/d(loss_i) = 1: each head gets its own gradient
        for index in torch.nonzero(~finite).flatten().tolist():
            retire_head(optimizer, index)
        optimizer.step()
        alive = [loss for loss, group in zip(losses.tolist(), optimizer.param_groups)
                 if not group.get("diverged")]
        if not alive:
            raise errors.UserError("every head of the learning-rate grid diverged: try lower --lr_grid values")
        metric_logger.update(loss=min(alive), lr=max(group["lr"] for group in optimizer.param_groups))
    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger)
    return {name: meter.global_avg for name, meter in metric_logger.meters.items()}


def retire_head(optimizer: torch.optim.Optimizer, index: int) -> None:
    """A grid head whose loss left the finite numbers: zero its weights, gradient and momentum
    and its learning rate for good (recorded in the optimizer state, so a resume keeps it), so
    that it stays finite and out of the choice while the other heads train on."""
    group = optimizer.param_groups[index]
    if not group.get("diverged"):
        print(f"Head {index} (lr {group['lr']:.3g}) diverged: its loss is not finite; it is retired.")
    group["diverged"], group["lr"] = True, 0.0
    for param in group["params"]:
        param.data.zero_()
        if param.grad is not None:
            param.grad.zero_()
        optimizer.state.pop(param, None)


def finite_per_entry(values: torch.Tensor) -> torch.Tensor:
    """Which entries are finite on every process (a NaN or an infinity of any rank survives
    the sum), so that all ranks decide alike: a rank that stopped alone would leave the
    others waiting in DDP's next gradient all-reduce."""
    return torch.isfinite(utils.over_ranks(values))


def finite_everywhere(value: torch.Tensor) -> bool:
    """Whether every entry of `value` is finite on every process (finite_per_entry)."""
    return bool(finite_per_entry(value).all())


def nonfinite_loss_message(loss: float, features: torch.Tensor, epoch: int) -> str:
    cause = ("the backbone's features are not finite (NaN or inf in its weights?)"
             if not torch.isfinite(features).all() else "try a lower --lr")
    return f"the linear probe's loss is {loss} at epoch {epoch}: {cause}; this epoch's head was not saved"


def cosine_lr(base_lr: float, epoch: int, epochs: int) -> float:
    """DINO's per-epoch cosine decay to 0 (CosineAnnealingLR's closed form), computed from
    the epoch so that a resumed run follows the same schedule."""
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * epoch / epochs))


def set_epoch_lr(optimizer: torch.optim.Optimizer, specs: Sequence[ProbeSpec], scale: float,
                 epoch: int, epochs: int) -> None:
    for group, spec in zip(optimizer.param_groups, specs):
        group["lr"] = 0.0 if group.get("diverged") else cosine_lr(spec.lr * scale, epoch, epochs)


# =========================================================================== evaluation
def accuracy(predictions: torch.Tensor, labels: torch.Tensor,
             across_ranks: bool = False) -> Tuple[float, Optional[float]]:
    """Top-1 and top-5 (%) of one head's top predictions (N, k), top-5 only with k = 5; with
    across_ranks, of every process's predictions (each holding its shard of the images)."""
    hits = predictions == labels.to(predictions.device)[:, None]
    counts = [*torch.stack([hits[:, 0].sum(), hits.any(1).sum()]).tolist(), len(hits)]  # one device copy
    top1, top5, images = utils.over_ranks(counts).tolist() if across_ranks else counts
    return top1 / images * 100, top5 / images * 100 if predictions.shape[1] >= 5 else None


@torch.no_grad()
def head_predictions(probes: LinearProbes, data: Any, to_features: Callable,
                     args: argparse.Namespace) -> torch.Tensor:
    """Every head's top predictions on every image of `data` (cached features or a data set),
    (N, heads, k), each image counted exactly once across processes. Predictions, not logits,
    are kept: a grid's logits on a large test set would not fit in memory."""
    probes.eval()
    if isinstance(data, torch.Tensor):  # cached features
        return torch.cat([top_predictions(probes(chunk.to(args.device))) for chunk in data.split(4096)])
    return feats.extract_features(  # in data set order, without progress lines
        lambda images: top_predictions(probes(to_features(images))), data, header=None,
        **feats.run_settings(args))


def score(predictions: torch.Tensor, labels: torch.Tensor, across_ranks: bool = False) -> Dict[str, Any]:
    """Accuracy of one head's top predictions (N, k) (across_ranks: see accuracy)."""
    nonfinite = bool((predictions < 0).any())
    if across_ranks:  # every process stops, not only the one holding the image
        nonfinite = bool(utils.over_ranks([nonfinite], "max").item())
    if nonfinite:  # an accuracy from NaN logits would look like a result
        raise errors.UserError("the linear head's outputs are not finite (NaN or inf): try a lower --lr")
    top1, top5 = accuracy(predictions, labels, across_ranks)
    return dict(acc1=top1, acc5=top5)


def choose_head(heldout_top1: Sequence[Optional[float]]) -> int:
    """The head with the best held-out accuracy (the first in grid order on a tie); a retired
    head has None. Only held-out figures come in: the test set cannot influence the choice."""
    candidates = [(top1, -index) for index, top1 in enumerate(heldout_top1) if top1 is not None]
    if not candidates:
        raise errors.UserError("every head of the learning-rate grid diverged: try lower --lr_grid values")
    return -max(candidates)[1]


@dataclass
class ProbeData:
    """Where the heads train and how they are scored: batches of the training rows, the
    held-out rows (features or images, None without a hold-out), the test set. Cached features
    are this process's shard (sharded=True): held-out and test rows and labels are its share."""
    batches: Any
    to_features: Callable  # images -> features (unused when the data are cached features)
    heldout: Any
    heldout_labels: Optional[torch.Tensor]
    test: Any
    test_labels: torch.Tensor
    sharded: bool = False


def evaluate_heads(probes: LinearProbes, optimizer: Optional[torch.optim.Optimizer], data: ProbeData,
                   args: argparse.Namespace) -> Dict[str, Any]:
    """The held-out accuracy of every head, the chosen head, and its test figures."""
    retired = [bool(group.get("diverged")) for group in optimizer.param_groups] if optimizer else \
        [False] * len(probes.specs)
    heldout: List[Optional[float]] = [None if gone else 0.0 for gone in retired]
    if data.heldout is not None:
        predictions = head_predictions(probes, data.heldout, data.to_features, args)
        for index in range(len(heldout)):
            if not retired[index]:
                heldout[index] = accuracy(predictions[:, index], data.heldout_labels, data.sharded)[0]
    chosen = choose_head(heldout)
    test = head_predictions(probes, data.test, data.to_features, args)[:, chosen]
    return dict(chosen=chosen, heldout_top1=heldout, test=score(test, data.test_labels, data.sharded))


# ========================================================================== checkpoints
def head_config(args: argparse.Namespace, config: Dict[str, Any], slots: Optional[List[int]],
                layout: FeatureLayout, specs: Sequence[ProbeSpec], num_labels: int,
                backbone: nn.Module) -> Dict[str, Any]:
    """What saved heads were trained on; a resume or --evaluate must match it."""
    return dict(readout=config["readout"], arch=config["arch"], patch_size=config["patch_size"],
                layout=asdict(layout), heads=[asdict(spec) for spec in specs], slots=slots,
                num_labels=num_labels, holdout_fraction=args.holdout_fraction,
                split_seed=args.seed if args.holdout_fraction else None,
                scale_sparo_features=(args.scale_sparo_features if config["readout"] in vits.UNIT_NORM_READOUTS
                                      else None),
                backbone_sha256=backbone_sha256(backbone),
                backbone_source=f"{args.pretrained_weights} ({args.checkpoint_key})")


def data_record(args: argparse.Namespace, evaluation: feats.LabelledSplits) -> Dict[str, Any]:
    """What the heads are trained and tested on: fingerprints of the training and test images
    (datasets.dataset_fingerprint; --train_subset and --test_subset included), so that a rerun
    on another data set into the same --output_dir is refused instead of resumed."""
    return dict(data_path=args.data_path, train_sha256=datasets.dataset_fingerprint(evaluation.train),
                test_sha256=datasets.dataset_fingerprint(evaluation.test))


def backbone_sha256(model: nn.Module) -> str:
    """SHA-256 of the backbone's weights (names and bytes): a head is only valid on the exact
    backbone it was trained on, wherever that checkpoint file has moved since."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_head_config(saved: Dict[str, Any], wanted: Dict[str, Any], path: Path) -> None:
    """Refuse heads trained on another backbone or other features (where the backbone was
    read from, backbone_source, only names it: the weights' hash decides)."""
    if saved.get("backbone_sha256") != wanted["backbone_sha256"]:
        raise errors.UserError(f"{path} holds a linear head trained on another backbone "
                               f"({saved.get('backbone_source', 'one not recorded')}) than "
                               f"{wanted['backbone_source']}. Use another --output_dir.")
    saved_data, data = saved.get("data"), wanted.get("data")
    if saved_data is not None and data is not None and (  # heads saved before issue 32 lack it
            saved_data.get("train_sha256") != data["train_sha256"]
            or saved_data.get("test_sha256") != data["test_sha256"]):
        raise errors.UserError(f"{path} holds linear heads trained on other data "
                               f"(--data_path {saved_data.get('data_path')} then, {data['data_path']} now, "
                               f"or other images or subsets). Use another --output_dir.")
    differing = [f"{key} ({errors.shown(saved.get(key))} saved, {errors.shown(value)} now)" for key, value in wanted.items()
                 if key not in ("backbone_source", "data") and saved.get(key) != value]
    if differing:
        raise errors.UserError(f"{path} was trained on other features or another grid: "
                               f"{'; '.join(differing)}. Use another --output_dir or the same flags.")


def load_heads(path: Path, probes: LinearProbes, wanted: Dict[str, Any]) -> Dict[str, Any]:
    checkpoint = weight_files.load_checkpoint(path)
    if "state_dict" not in checkpoint or "head_config" not in checkpoint:
        raise errors.UserError(f"{path} is not a linear head saved by eval_linear.py")
    check_head_config(checkpoint["head_config"], wanted, path)
    probes.load_state_dict(checkpoint["state_dict"])
    return checkpoint


# ================================================================================ script
def check_args(args: argparse.Namespace) -> None:
    if args.cache_features and args.train_augmentation != "none":
        raise errors.UserError("--cache_features needs --train_augmentation none: cached features "
                               "cannot be re-augmented each epoch")
    if args.lr is not None and args.lr_grid:
        raise errors.UserError("--lr trains one head and --lr_grid a grid of them: give one of the two")
    if args.holdout_fraction is None:
        args.holdout_fraction = 0.0 if args.lr is not None else DEFAULT_HOLDOUT
    grid = args.lr is None
    if grid and args.holdout_fraction == 0 and len(args.lr_grid or LR_GRID) > 1:
        raise errors.UserError("the learning-rate grid chooses its head on held-out training images: "
                               "--holdout_fraction must be above 0 (or train one head with --lr)")
    if args.holdout_fraction == 1:
        raise errors.UserError("--holdout_fraction 1 leaves no training image")
    if not args.evaluate and utils.is_main_process():  # training writes its heads and log there
        utils.ensure_output_dir(args.output_dir, "--output_dir")
        run_folder.lock_output_dir(args.output_dir, "a linear probe")  # two runs in one folder would resume each other's heads
    if args.output_json:
        utils.ensure_output_file(args.output_json, "--output_json")


def infer_num_labels(args: argparse.Namespace, train_labels: torch.Tensor) -> int:
    needed = int(train_labels.max()) + 1
    if args.num_labels is None:
        return needed
    if args.num_labels < needed:
        raise errors.UserError(f"--num_labels {args.num_labels} is too small: the training labels "
                               f"go up to {needed - 1}")
    return args.num_labels


def prepare_data(args: argparse.Namespace, evaluation: feats.LabelledSplits, to_features: Callable) -> ProbeData:
    """Cached features (extracted once) or image loaders, split into training and held-out rows."""
    train_rows, heldout_rows = holdout_split(len(evaluation.train), args.holdout_fraction, args.seed)
    if heldout_rows.numel():
        print(f"Holding out {len(heldout_rows)} of the {len(evaluation.train)} training images "
              f"(seed {args.seed}) to choose the head; training on {len(train_rows)}.")
    heldout_labels = evaluation.train_labels[heldout_rows] if heldout_rows.numel() else None
    if args.cache_features:  # each process keeps its shard: ImageNet's bank is ~21 GB in fp32
        print("Caching the frozen features of the train and val sets...")
        kwargs = dict(feats.run_settings(args), shard=True)
        train, index = feats.extract_features(to_features, evaluation.train, **kwargs)
        test, test_index = feats.extract_features(to_features, evaluation.test, **kwargs)
        labels = evaluation.train_labels[index]
        batches: Any = CachedBatches(train, labels.to(train.device), index, train_rows, len(evaluation.train),
                                     args.batch_size_per_gpu, args.seed)
        held = torch.isin(index, heldout_rows)
        heldout = train[held.to(train.device)] if heldout_rows.numel() else None
        return ProbeData(batches, to_features, heldout, labels[held] if heldout_rows.numel() else None,
                         test, evaluation.test_labels[test_index], sharded=True)
    train_set = torch.utils.data.Subset(evaluation.train, train_rows.tolist())
    sampler = torch.utils.data.DistributedSampler(train_set, utils.get_world_size(), utils.get_rank(),
                                                  shuffle=True, seed=args.seed)
    batches = torch.utils.data.DataLoader(train_set, sampler=sampler, batch_size=args.batch_size_per_gpu,
                                          num_workers=args.num_workers,
                                          pin_memory=args.device.type == "cuda")
    heldout = None
    if heldout_rows.numel():  # held-out images are scored like test images: no augmentation
        plain = datasets.build_dataset(args.data_path, "train",
                                       feats.eval_transform(evaluation.crop_size, args.resize_size),
                                       subset=args.train_subset)
        heldout = torch.utils.data.Subset(plain, heldout_rows.tolist())
    return ProbeData(batches, to_features, heldout, heldout_labels, evaluation.test, evaluation.test_labels)


def print_grid(probes: LinearProbes, evaluation: Dict[str, Any], scale: float) -> List[Dict[str, Any]]:
    """The whole grid, one line per head, and its rows for the results."""
    rows = []
    print(f"{'head':>4}  {'lr/256':>8}  {'lr':>9}  {'held-out top-1':>14}  features")
    for index, (spec, top1) in enumerate(zip(probes.specs, evaluation["heldout_top1"])):
        mark = "  <- chosen" if index == evaluation["chosen"] else ""
        shown = "diverged" if top1 is None else f"{top1:.2f}"
        print(f"{index:>4}  {spec.lr:>8.3g}  {spec.lr * scale:>9.3g}  {shown:>14}  {spec.describe()}{mark}")
        rows.append(dict(asdict(spec), heldout_top1=top1))
    return rows


def grid_edge_warning(specs: Sequence[ProbeSpec], chosen: int) -> Optional[str]:
    """A warning when the chosen learning rate is the grid's smallest or largest."""
    rates = sorted({spec.lr for spec in specs})
    if len(rates) > 1 and specs[chosen].lr in (rates[0], rates[-1]):
        return (f"warning: the chosen learning rate {specs[chosen].lr:g} is at the edge of the grid "
                f"({rates[0]:g} .. {rates[-1]:g}): a better one may lie beyond; extend --lr_grid")
    return None


def eval_linear(args: argparse.Namespace) -> Dict[str, Any]:
    feats.start(args)
    check_args(args)
    feats.show_args(args)
    devices.enable_fast_fp32(args.device)  # TF32 for the default fp32 backbone passes, as DINO
    utils.fix_random_seeds(args.seed)
    output_dir = Path(args.output_dir)
    model, config, slots = feats.frozen_model(args, args.device)
    if config["readout"] == "cls" and (args.n_last_blocks or 0) > len(model.blocks):
        raise errors.UserError(f"--n_last_blocks {args.n_last_blocks} exceeds the "
                               f"{len(model.blocks)} blocks of the model")
    evaluation = feats.labelled_splits(args, config, lambda crop: build_transforms(args, crop)[0])
    layout, specs = probe_grid(args, config, len(model.blocks), slots)
    to_features = lambda images: frozen_features(  # noqa: E731
        model, images, config, layout.n_last_blocks, layout.with_avgpool, slots,
        args.scale_sparo_features)
    num_labels = infer_num_labels(args, evaluation.train_labels)
    print(f"{num_labels} classes; features of width {layout.width}; {len(specs)} linear head(s).")

    probes = LinearProbes(specs, num_labels, args.seed).to(args.device)
    wanted = {**head_config(args, config, slots, layout, specs, num_labels, model),
              "data": data_record(args, evaluation)}
    results: Dict[str, Any] = dict(pretrained_weights=args.pretrained_weights, data_path=args.data_path,
                                   head=wanted)
    scale = args.batch_size_per_gpu * utils.get_world_size() / 256.0  # lr scaling, as DINO

    if args.evaluate:
        path = Path(args.linear_weights) if args.linear_weights else output_dir / CHECKPOINT_NAME
        chosen = int(load_heads(path, probes, wanted).get("chosen", 0))
        predictions = head_predictions(probes, evaluation.test, to_features, args)[:, chosen]
        stats = score(predictions, evaluation.test_labels)
        print(f"Accuracy of the network on the {len(evaluation.test)} test images: {stats['acc1']:.1f}%")
        print(f"Top-1 test accuracy: {stats['acc1']:.1f}")
        results.update(evaluate=stats, top1=stats["acc1"], chosen=asdict(specs[chosen]))
        feats.write_json(args.output_json, results)
        return results

    data = prepare_data(args, evaluation, to_features)
    probes_ddp: nn.Module = probes
    if args.distributed:
        probes_ddp = nn.parallel.DistributedDataParallel(
            probes, device_ids=[args.gpu] if args.device.type == "cuda" else None)
    optimizer = torch.optim.SGD([dict(params=head.parameters(), lr=spec.lr * scale)
                                 for head, spec in zip(probes.heads, specs)],
                                momentum=0.9, weight_decay=0)

    # ============ optionally resume ... ============
    start_epoch, best_acc = 0, 0.0
    last: Dict[str, Any] = {}
    checkpoint_path = output_dir / CHECKPOINT_NAME
    if checkpoint_path.exists():
        checkpoint = load_heads(checkpoint_path, probes, wanted)
        optimizer.load_state_dict(checkpoint["optimizer"])
        start_epoch, best_acc = int(checkpoint["epoch"]), float(checkpoint["best_acc"])
        last = dict(checkpoint.get("last_stats") or {})
        print(f"Resuming from {checkpoint_path} at epoch {start_epoch} (best so far {best_acc:.2f}%).")

    # ============ training the heads ... ============
    start = time.time()
    for epoch in range(start_epoch, args.epochs):
        set_epoch_lr(optimizer, specs, scale, epoch, args.epochs)
        (data.batches if isinstance(data.batches, CachedBatches) else data.batches.sampler).set_epoch(epoch)
        train_stats = train_one_epoch(probes_ddp, optimizer, data.batches,
                                      (lambda x: x) if args.cache_features else to_features, epoch, args)
        log_stats: Dict[str, Any] = {**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch}
        if epoch % args.val_freq == 0 or epoch == args.epochs - 1:
            last = evaluate_heads(probes, optimizer, data, args)
            test = last["test"]
            print(f"Accuracy at epoch {epoch} of the network on the {len(evaluation.test)} test images: "
                  f"{test['acc1']:.1f}%" + (f" (head {last['chosen']}, chosen on the held-out images)"
                                           if len(specs) > 1 else ""))
            best_acc = max(best_acc, test["acc1"])
            print(f"Max accuracy so far: {best_acc:.2f}%")
            last.update(epoch=epoch, acc1=test["acc1"], acc5=test["acc5"])
            log_stats.update({f"test_{k}": v for k, v in test.items()}, chosen_head=last["chosen"])
        save = dict(epoch=epoch + 1, state_dict=probes.state_dict(), optimizer=optimizer.state_dict(),
                    best_acc=best_acc, head_config=wanted, last_stats=last,
                    chosen=last.get("chosen", 0), args=utils.plain(args))
        utils.save_on_master(save, checkpoint_path)
        if utils.is_main_process():
            utils.write_json_line(output_dir / LOG_NAME, log_stats)
    print(f"Training of the supervised linear classifier(s) on frozen features completed in "
          f"{time.time() - start:.1f} s.")
    return finish(args, probes, specs, last, best_acc, scale, results)


def finish(args: argparse.Namespace, probes: LinearProbes, specs: Sequence[ProbeSpec],
           last: Dict[str, Any], best_acc: float, scale: float, results: Dict[str, Any]) -> Dict[str, Any]:
    """The closing lines and results: DINO's best-over-epochs for one head; for a grid the
    whole grid and the chosen head's test accuracy after the last epoch."""
    if len(specs) > 1 and last:
        results["grid"] = print_grid(probes, last, scale)
        chosen = specs[last["chosen"]]
        print(f"Chosen head: lr {chosen.lr:g} (x{scale:g} for this batch), {chosen.describe()}, "
              f"held-out top-1 {last['heldout_top1'][last['chosen']]:.2f}%.")
        warning = grid_edge_warning(specs, last["chosen"])
        if warning:
            print(warning)
        print(f"Top-1 test accuracy: {last['acc1']:.1f}")
        results.update(top1=last["acc1"], chosen=asdict(chosen))
    else:
        print(f"Top-1 test accuracy: {best_acc:.1f}")
        if last:
            print(f"Top-1 test accuracy after the last epoch: {last['acc1']:.1f}")
        results.update(top1=best_acc)
    results.update(last={k: v for k, v in last.items() if k != "test"}, epochs=args.epochs)
    feats.write_json(args.output_json, results)
    return results


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    try:
        return feats.run_script("Evaluation with linear classification", get_args_parser, eval_linear, argv)
    finally:
        run_folder.release_output_locks()


if __name__ == "__main__":
    errors.run_main(main)
