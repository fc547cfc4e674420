"""Frozen-backbone evaluation toolkit shared by eval_knn.py, eval_linear.py, slot_gallery.py,
embed.py, visualize_slots.py and export.py: the common flags, the one frozen-model set-up
(frozen_model), the labelled train and test sets, feature extraction over a data set (sharded
over processes), the script tail and the JSON results."""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision import transforms as T

import config_files
import datasets
import devices
import utils
import vision_transformer as vits
import weight_files
from errors import UserError
from sparo_head import select_slots

Outputs = Union[torch.Tensor, Tuple[torch.Tensor, ...]]


# ================================================================================== flags
def add_eval_args(parser: argparse.ArgumentParser, batch_size: int = 128) -> None:
    """The flags every evaluation script shares, with DINO's names and defaults."""
    add_weights_args(parser)
    add_image_size_args(parser)
    parser.add_argument("--data_path", default="fashion_mnist", type=str,
                        help="A folder with train/ and val/ ImageFolders (DINO's layout), or a "
                             "built-in data set: fashion_mnist (official 60k/10k split) or digits "
                             "(scikit-learn; test = every 5th image).")
    parser.add_argument("--train_subset", default=None, type=utils.non_negative_int,
                        help="Use only N training images (class-balanced in a folder; the k-NN bank, the linear "
                             "probe's training set), for quick evaluations. Default: all.")
    parser.add_argument("--test_subset", default=None, type=utils.non_negative_int,
                        help="Use only N test images (class-balanced in a folder). Results on a subset are not the "
                             "official test figures; leave unset to report. Default: all.")
    add_run_args(parser, batch_size)
    parser.add_argument("--slots", default=None, type=str,
                        help="SPARO only: evaluate on a subset of slots, e.g. 0,5,9 (the kept slots "
                             "are rescaled to keep unit norm).")
    parser.add_argument("--output_json", default=None, type=str,
                        help="Also write every result to this JSON file.")
    parser.add_argument("--device", default="auto", choices=devices.DEVICE_CHOICES,
                        help="auto: CUDA when usable; an error when GPUs are visible but CUDA "
                             "cannot use them. cuda: require a GPU. cpu: never use a GPU.")


def add_weights_args(parser: argparse.ArgumentParser, required: bool = False, checks: bool = True) -> None:
    """--pretrained_weights and --checkpoint_key of every script that loads a backbone
    (frozen_model) and, with checks, the --arch/--patch_size/--readout it must hold."""
    parser.add_argument("--pretrained_weights", default="", required=required, type=str,
                        help="Backbone to load: this project's checkpoint.pth, export.py's "
                             "model.safetensors or backbone.pth, a bare backbone state dict, or an "
                             "official DINO file (CLS read-out).")
    parser.add_argument("--checkpoint_key", default="teacher", type=str,
                        help="Which weights of a training checkpoint to use: teacher (DINO's choice) "
                             "or student.")
    if not checks:
        return
    parser.add_argument("--arch", default=None, type=str, choices=sorted(vits.ARCHS),
                        help="Expected architecture; read from the checkpoint, so only needed as "
                             "a check (a mismatch is an error).")
    parser.add_argument("--patch_size", default=None, type=utils.positive_int,
                        help="Expected patch size; read from the checkpoint (a mismatch is an error).")
    parser.add_argument("--readout", default=None, type=str, choices=vits.READOUTS,
                        help="Expected read-out (sparo, cls, or the controls gap and cls_proj); "
                             "read from the checkpoint (a mismatch is an error).")


def add_image_size_args(parser: argparse.ArgumentParser) -> None:
    """--image_size (DINO's visualize_attention name; --img_size is kept as an alias) and
    --resize_size of DINO's evaluation pre-processing."""
    parser.add_argument("--image_size", "--img_size", dest="image_size", default=None,
                        type=utils.positive_int,
                        help="Side of the centre crop fed to the network (default: the image size "
                             "the checkpoint was trained at, e.g. 224 or 28).")
    parser.add_argument("--resize_size", default=None, type=utils.positive_int,
                        help="Short side the images are resized to before the centre crop "
                             "(default: image_size * 256 / 224, DINO's 256 for 224).")


def add_run_args(parser: argparse.ArgumentParser, batch_size: int = 128) -> None:
    """Batch, loaders, precision and the distributed set-up of a feature-extracting script."""
    parser.add_argument("--batch_size_per_gpu", default=batch_size, type=utils.positive_int,
                        help="Images per process (per GPU, or per CPU process).")
    parser.add_argument("--num_workers", default=None, type=utils.non_negative_int,
                        help="Data-loading processes per GPU/process (default: 10 on GPU as in "
                             "DINO; on CPU a number that leaves the cores to the network).")
    parser.add_argument("--use_fp16", default=False, type=utils.bool_flag,
                        help="Extract features under autocast on CUDA (bf16 where supported, else "
                             "fp16): faster, slightly less exact. Ignored on CPU.")
    parser.add_argument("--dist_url", default="env://", type=str,
                        help="URL to set up distributed evaluation (torchrun and Slurm set the environment).")
    parser.add_argument("--local_rank", "--local-rank", default=0, type=int,
                        help="Ignored; torchrun sets LOCAL_RANK.")


# ========================================================================= the set-up
def default_num_workers(device: torch.device) -> int:
    """DINO's 10 loaders per GPU; on CPU the network needs the cores, so few or none."""
    if device.type == "cuda":
        return 10
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(8, cores // (4 * utils.get_world_size()))


def start(args: argparse.Namespace) -> None:
    """Processes and device (utils.init_distributed_mode) and the default loaders. The script
    checks its own flags next, before it prints anything, so that an error is the last line."""
    utils.init_distributed_mode(args)
    if args.num_workers is None:
        args.num_workers = default_num_workers(args.device)


def run_settings(args: argparse.Namespace) -> Dict[str, Any]:
    """extract_features' batch, loaders, device and precision from the run flags (add_run_args)."""
    return dict(batch_size=args.batch_size_per_gpu, num_workers=args.num_workers, device=args.device,
                use_amp=args.use_fp16)


def show_args(args: argparse.Namespace) -> None:
    print("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))


class Frozen(NamedTuple):
    """A frozen backbone, its model configuration and the --slots it is evaluated on (None:
    the whole encoding)."""
    model: nn.Module
    config: Dict[str, Any]
    slots: Optional[List[int]]


def frozen_model(args: argparse.Namespace, device: torch.device, sparo_only: str = "",
                 slot_counts: Optional[Dict[str, Optional[int]]] = None) -> Frozen:
    """The one set-up of the backbone of every evaluation-like script: --pretrained_weights'
    --checkpoint_key weights, checked against --arch/--patch_size/--readout where the script
    has them and against its slot flags (checked_slots), on `device` in eval mode with
    gradients off. Nothing else is read before it fails."""
    if not args.pretrained_weights:
        raise UserError("--pretrained_weights is required (no weights are downloaded)")
    expected = {name: getattr(args, name, None) for name in ("arch", "patch_size", "readout")}
    model, config = weight_files.load_backbone(args.pretrained_weights, args.checkpoint_key, expected)
    slots = checked_slots(config, getattr(args, "slots", None), sparo_only, slot_counts)
    model.to(device).eval().requires_grad_(False)
    return Frozen(model, config, slots)


@dataclass
class LabelledSplits:
    """The train and test sets of an evaluation, pre-processed at crop_size, and their labels."""
    crop_size: int
    train: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    train_labels: torch.Tensor
    test_labels: torch.Tensor


def labelled_splits(args: argparse.Namespace, config: Dict[str, Any],
                    train_transform: Optional[Callable[[int], Callable]] = None) -> LabelledSplits:
    """DINO's evaluation data: pre-processing at the checkpoint's resolution (or
    train_transform(crop_size) for the training images), the train and test sets of
    --data_path (--train_subset, --test_subset) and their labels."""
    crop_size = eval_crop_size(args, config)
    test_transform = eval_transform(crop_size, args.resize_size)
    train_set = datasets.build_dataset(args.data_path, "train",
                                       train_transform(crop_size) if train_transform else test_transform,
                                       subset=args.train_subset)
    test_set = datasets.build_dataset(args.data_path, "test", test_transform, subset=args.test_subset)
    print(f"Data loaded with {len(train_set)} train and {len(test_set)} val imgs.")
    return LabelledSplits(crop_size, train_set, test_set,
                          torch.as_tensor(datasets.dataset_labels(train_set)),
                          torch.as_tensor(datasets.dataset_labels(test_set)))


def check_bank_size(nb_knn: List[int], bank_size: int) -> None:
    """The k-NN bank (the training images) must hold the largest k of --nb_knn."""
    if max(nb_knn) > bank_size:
        raise UserError(f"--nb_knn {max(nb_knn)} exceeds the {bank_size} training images")


def eval_crop_size(args: argparse.Namespace, config: Dict[str, Any]) -> int:
    """--image_size, else the checkpoint's training resolution; must be a multiple of the patch."""
    size = args.image_size or int(config.get("img_size", 224))
    if size < 1 or size % config["patch_size"]:
        raise UserError(f"image size {size} is not a positive multiple of the patch size "
                        f"{config['patch_size']}; choose --image_size accordingly")
    return size


def eval_transform(crop_size: int, resize_size: Optional[int] = None) -> Callable:
    """DINO's evaluation pre-processing: bicubic resize of the short side (default
    crop_size * 256 / 224), centre crop, ImageNet normalisation."""
    resize = resize_size or int(round(crop_size * 256 / 224))
    if resize < crop_size:
        raise UserError(f"--resize_size {resize} is smaller than the crop size {crop_size}")
    return T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(crop_size), T.ToTensor(),
                      T.Normalize(utils.IMAGENET_MEAN, utils.IMAGENET_STD)])


def images_under(root: str, flag: str, leave_out: Callable[[Path], bool] = lambda path: False) -> List[Path]:
    """Every image file under the folder `root`, recursively and sorted; hidden files and
    folders, and those leave_out names, are left out. A folder without one is an error
    naming `flag`."""
    folder = Path(root)
    files = sorted(path for path in folder.rglob("*")
                   if path.is_file() and path.suffix.lower() in datasets.IMAGE_EXTENSIONS
                   and not any(part.startswith(".") for part in path.relative_to(folder).parts)
                   and not leave_out(path))
    if not files:
        raise UserError(f"{flag} {root} holds no images (extensions: {' '.join(datasets.IMAGE_EXTENSIONS)})")
    return files


# ================================================================================= slots
def checked_slots(config: Dict[str, Any], text: Optional[str], sparo_only: str = "",
                  slot_counts: Optional[Dict[str, Optional[int]]] = None) -> Optional[List[int]]:
    """--slots "0,5,9" -> [0, 5, 9], checked against a checkpoint's read-out and L, with the
    checks that the script `sparo_only` names needs SPARO and that each number of slots asked
    for by a flag (slot_counts: --top_k, --select_slots) exists."""
    if sparo_only:
        require_sparo(config, sparo_only)
    slots = parse_slots(text, config)
    for flag, count in (slot_counts or {}).items():
        if count is not None:
            require_sparo(config, flag)
            if count > int(config["sparo_slots"]):
                raise UserError(f"{flag} {count} exceeds the {config['sparo_slots']} slots of this checkpoint")
    return slots


def parse_slots(text: Optional[str], config: Dict[str, Any]) -> Optional[List[int]]:
    if text is None or str(text).strip() == "":
        return None
    require_sparo(config, "--slots")
    try:
        slots = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError as error:
        raise UserError(f"--slots takes comma-separated slot numbers like 0,5,9, got {text!r}") from error
    num_slots = int(config["sparo_slots"])
    bad = [s for s in slots if not 0 <= s < num_slots]
    if not slots or bad:
        raise UserError(f"--slots must name slots between 0 and {num_slots - 1}, got {text!r}")
    if len(set(slots)) != len(slots):
        raise UserError(f"--slots names a slot twice: {text!r}")
    return slots


def keep_slots(features: torch.Tensor, config: Dict[str, Any], slots: Optional[List[int]]) -> torch.Tensor:
    """Features of a subset of slots (--slots), rescaled to unit norm (the selected cosine);
    all of them with slots=None."""
    if slots is None:
        return features
    kept = select_slots(features.float(), int(config["sparo_slots"]), slots)
    return F.normalize(kept, dim=1).to(features.dtype)


def require_sparo(config: Dict[str, Any], flag: str) -> None:
    if config.get("readout") != "sparo":
        raise UserError(f"{flag} needs a SPARO checkpoint; this one has readout="
                        f"{config.get('readout')!r}, which has no slots")


# ==================================================================== feature extraction
def all_gather_stacked(tensor: torch.Tensor) -> torch.Tensor:
    """all_gather of same-shaped tensors -> (world, *shape), on the backend's device."""
    world = utils.get_world_size()
    if world == 1:
        return tensor.unsqueeze(0)
    tensor = tensor.to(utils.collective_device())
    # the output is the inputs stacked along dim 0 (the layout both gloo and NCCL expect)
    out = torch.empty((world * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype,
                      device=tensor.device)
    dist.all_gather_into_tensor(out, tensor.contiguous())
    return out.view(world, *tensor.shape)


def gather_shards_to_main(shard: torch.Tensor, index: torch.Tensor,
                          total: int) -> Optional[torch.Tensor]:
    """The whole bank (total, D) in rank 0's CPU memory (None on other ranks) from every rank's
    shard and its data set indices (extract_features(..., shard=True)). Shards travel one at a
    time, so no GPU ever holds more than its own shard and one other."""
    world, rank = utils.get_world_size(), utils.get_rank()
    if world == 1:
        return shard.cpu()
    device = utils.collective_device()
    rows = -(-total // world)  # the longest shard
    buffer = torch.zeros((rows, *shard.shape[1:]), dtype=shard.dtype, device=device)
    where = torch.full((rows,), -1, dtype=torch.long, device=device)  # -1: no row
    if rank != 0:
        buffer[:len(shard)], where[:len(index)] = shard.to(device), index.to(device)
        dist.send(buffer, dst=0)
        dist.send(where, dst=0)
        return None
    whole = torch.empty((total, *shard.shape[1:]), dtype=shard.dtype)
    whole.index_copy_(0, index.cpu(), shard.cpu())
    for source in range(1, world):
        dist.recv(buffer, src=source)
        dist.recv(where, src=source)
        valid = where >= 0
        whole.index_copy_(0, where[valid].cpu(), buffer[valid].cpu())
    return whole


class IndexedDataset(torch.utils.data.Dataset):
    """Items of a data set as (image, index): each sample carries its position, so that its
    features are placed where it belongs wherever it was computed."""

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        return self.dataset[index][0], index


def _as_tuple(outputs: Outputs) -> Tuple[torch.Tensor, ...]:
    return outputs if isinstance(outputs, tuple) else (outputs,)


@torch.no_grad()
def extract_features(forward: Callable[[torch.Tensor], Outputs], dataset: torch.utils.data.Dataset,
                     batch_size: int = 128, num_workers: int = 0,
                     device: Optional[torch.device] = None, use_amp: bool = False,
                     storage_device: Optional[torch.device] = None,
                     dtype: torch.dtype = torch.float32, shard: bool = False,
                     header: Optional[str] = "Extracting features:", print_freq: int = 50) -> Any:
    """forward(images) of every image of a data set, placed by each sample's index.

    forward returns a tensor (B, ...) or a tuple of them; the result has the same structure,
    each output (N, ...) in data set order on every rank. Floating outputs are stored as
    `dtype` on `storage_device` (default: `device`). It runs under torch.no_grad (autocast on
    CUDA with use_amp); an output that is not finite on any rank is an error on every rank.
    shard=True: no communication; this rank's share (rank, rank + W, ...) and the data set
    indices of its rows: (outputs, indices). Shards of all ranks hold every item once.
    header=None: no progress lines.
    """
    device = device or torch.device("cpu")
    storage = storage_device or device
    world, rank = utils.get_world_size(), utils.get_rank()
    total = len(dataset)
    if shard:  # this rank's items only, without padding: no collective runs per batch
        sampler: Any = range(rank, total, world)
    elif world > 1:  # padded to the same count on every rank, so the per-batch gathers pair up
        sampler = torch.utils.data.DistributedSampler(dataset, world, rank, shuffle=False)
    else:
        sampler = range(total)
    loader = torch.utils.data.DataLoader(IndexedDataset(dataset), sampler=sampler, batch_size=batch_size,
                                         num_workers=num_workers, pin_memory=device.type == "cuda")
    rows = len(sampler) if shard else total
    store: Optional[List[torch.Tensor]] = None
    carried: List[torch.Tensor] = []  # shard: the data set index of each row
    filled = 0
    finite = torch.ones((), dtype=torch.bool, device=device)  # read once at the end: no sync per batch
    logger = utils.MetricLogger(delimiter="  ")
    for images, index in (loader if header is None else logger.log_every(loader, print_freq, header)):
        images = images.to(device, non_blocking=True)
        with devices.autocast(device, use_amp):  # --use_fp16 is ignored on the CPU
            outputs = _as_tuple(forward(images))
        for out in outputs:
            finite &= torch.isfinite(out).all()
        outputs = tuple(out.float().to(dtype) if out.is_floating_point() else out for out in outputs)
        if shard:  # this rank's rows in arrival order; the carried indices say which items
            carried.append(index)
            index = torch.arange(filled, filled + len(index))
        elif world > 1:
            index = all_gather_stacked(index.to(device)).flatten()
            outputs = tuple(all_gather_stacked(out).flatten(0, 1) for out in outputs)
        if store is None:
            store = [torch.empty((rows, *out.shape[1:]), dtype=out.dtype, device=storage) for out in outputs]
        for target, out in zip(store, outputs):  # padding repeats items: same rows, same values
            target.index_copy_(0, index.to(storage), out.to(storage))
        filled += len(images)
    _check_finite(finite)
    if store is None:  # an empty shard (more processes than images)
        store = [torch.empty((0, 0), dtype=dtype, device=storage)]
    result = tuple(store) if len(store) > 1 else store[0]
    if shard:
        return result, torch.cat(carried) if carried else torch.empty(0, dtype=torch.long)
    return result


def _check_finite(finite: torch.Tensor) -> None:
    if not utils.over_ranks(finite, "min").item():  # every rank stops, not only the one that saw it
        # a NaN feature would be scored silently (k-NN votes, accuracy 0)
        raise UserError("the network's features are not finite (NaN or inf) for some images: "
                        "the weights are broken (e.g. saved from a diverged run); nothing was scored")


# ========================================================================== the script end
def write_json(path: Optional[str], results: Dict[str, Any]) -> None:
    """Results as indented JSON, written by the main process (nothing without a path)."""
    if path and utils.is_main_process():
        utils.atomic_write_text(path, json.dumps(results, indent=1) + "\n")


def run_script(description: str, get_args_parser: Callable[[], argparse.ArgumentParser],
               run: Callable[[argparse.Namespace], Any], argv: Optional[List[str]] = None) -> Any:
    """The tail of every evaluation script's main(): parse (with --config), run, and always
    leave the process group."""
    parser = argparse.ArgumentParser(description, parents=[get_args_parser()])
    args = config_files.parse_args_with_config(parser, argv)
    try:
        return run(args)
    finally:
        utils.cleanup_distributed()
