"""Linear probe of a frozen backbone (DINO's recipe).

    python eval_linear.py --pretrained_weights OUT/checkpoint.pth --data_path /path/to/imagenet
    torchrun --nproc_per_node=8 eval_linear.py --pretrained_weights OUT/checkpoint.pth ...
    python eval_linear.py --pretrained_weights OUT/checkpoint.pth --data_path digits \
        --train_augmentation none --cache_features true --epochs 100      # fast on CPU
    python eval_linear.py --pretrained_weights OUT/checkpoint.pth --evaluate   # your saved head

A linear layer (no BatchNorm) is trained on frozen features with SGD (momentum 0.9, no weight
decay, lr scaled by the total batch / 256, cosine decay to 0), with RandomResizedCrop + flip on
the training images and resize + centre crop on the test images. Features: the SPARO encoding
(optionally a subset of slots, --slots), or for the CLS read-out DINO's concatenated CLS
tokens of the last --n_last_blocks blocks (plus the mean patch token with
--avgpool_patchtokens). The head is saved in OUTPUT_DIR/linear_checkpoint.pth every epoch
and a rerun resumes from it.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import features as feats
import utils
from sparo_head import select_slots

CHECKPOINT_NAME = "linear_checkpoint.pth"
LOG_NAME = "linear_log.txt"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Evaluation with linear classification", add_help=False)
    feats.add_eval_args(parser, batch_size=128)
    parser.add_argument("--n_last_blocks", default=4, type=utils.positive_int,
                        help="CLS read-out: concatenate the CLS tokens of this many last blocks "
                             "(DINO: 4 for ViT-S, 1 for ViT-B). Ignored for SPARO, whose "
                             "feature is its encoding.")
    parser.add_argument("--avgpool_patchtokens", default=False, type=utils.bool_flag,
                        help="CLS read-out: also concatenate the mean patch token of the last "
                             "block (DINO: False for ViT-S, True for ViT-B).")
    parser.add_argument("--scale_sparo_features", default=True, type=utils.bool_flag,
                        help="SPARO: multiply the unit-norm encoding (width D) by sqrt(D) so its "
                             "coordinates have the unit scale of LayerNorm'd CLS features that "
                             "DINO's learning rates assume (a constant factor, like a larger lr).")
    parser.add_argument("--epochs", default=100, type=utils.positive_int, help="Number of training epochs.")
    parser.add_argument("--lr", default=0.001, type=utils.positive_float,
                        help="Learning rate for a total batch of 256, scaled linearly with the "
                             "total batch size (batch_size_per_gpu * processes).")
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


def frozen_features(model: nn.Module, images: torch.Tensor, config: Dict[str, Any],
                    n_last_blocks: int, avgpool: bool, slots: Optional[List[int]],
                    scale_sparo: bool = True) -> torch.Tensor:
    """The linear probe's input: the SPARO encoding (slot subset rescaled to unit norm), or
    DINO's CLS feature: CLS tokens of the last n blocks (+ the mean patch token), concatenated.

    scale_sparo multiplies the unit-norm SPARO vector of width D by sqrt(D), giving its
    coordinates the unit scale of LayerNorm'd CLS tokens, for which DINO's learning rates
    were tuned. (A constant factor, equivalent to a D-times larger learning rate; without it
    DINO's default lr barely moves the head in a short run.)
    """
    if config["readout"] == "sparo":
        encoding = model(images).float()
        if slots is not None:
            encoding = F.normalize(select_slots(encoding, int(config["sparo_slots"]), slots), dim=1)
        return encoding * math.sqrt(encoding.shape[1]) if scale_sparo else encoding
    blocks = model.get_intermediate_layers(images, n_last_blocks)
    parts = [tokens[:, 0] for tokens in blocks]
    if avgpool:
        parts.append(blocks[-1][:, 1:].mean(dim=1))
    return torch.cat(parts, dim=-1).float()


def feature_dim(config: Dict[str, Any], n_last_blocks: int, avgpool: bool,
                slots: Optional[List[int]]) -> int:
    import vision_transformer as vits

    if config["readout"] == "sparo":
        return int(config["sparo_dim"]) * (len(slots) if slots else int(config["sparo_slots"]))
    return vits.ARCHS[config["arch"]][0] * (n_last_blocks + int(avgpool))


# ================================================================================= data
def build_transforms(args: argparse.Namespace, crop_size: int) -> Tuple[Callable, Callable]:
    from torchvision import transforms as T

    val_transform = feats.eval_transform(crop_size, args.resize_size)
    if args.train_augmentation == "none":
        return val_transform, val_transform
    train_transform = T.Compose([T.RandomResizedCrop(crop_size), T.RandomHorizontalFlip(),
                                 T.ToTensor(), T.Normalize(utils.IMAGENET_MEAN, utils.IMAGENET_STD)])
    return train_transform, val_transform


class CachedBatches:
    """Mini-batches of cached features: this process's shuffled share each epoch."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int) -> None:
        self.features, self.labels, self.batch_size = features, labels, batch_size
        self.sampler = torch.utils.data.DistributedSampler(
            range(len(labels)), num_replicas=utils.get_world_size(), rank=utils.get_rank(),
            shuffle=True, seed=seed)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return (len(self.sampler) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        order = torch.tensor(list(self.sampler), dtype=torch.long)
        for start in range(0, len(order), self.batch_size):
            index = order[start:start + self.batch_size].to(self.features.device)
            yield self.features[index], self.labels[index]


# ============================================================================= training
def train_one_epoch(linear: nn.Module, optimizer: torch.optim.Optimizer, batches: Any,
                    to_features: Callable, epoch: int, args: argparse.Namespace) -> Dict[str, float]:
    linear.train()
    metric_logger = utils.MetricLogger(delimiter="  ")
    metric_logger.meters["lr"] = utils.SmoothedValue(window_size=1, fmt="{value:.6f}")
    header = f"Epoch: [{epoch}]"
    for inputs, target in metric_logger.log_every(batches, args.print_freq, header):
        inputs = inputs.to(args.device, non_blocking=True)
        target = target.to(args.device, non_blocking=True)
        with torch.no_grad(), feats.feature_autocast(args.device, args.use_fp16):
            features = to_features(inputs)
        loss = F.cross_entropy(linear(features), target)
        if not finite_everywhere(loss):  # stop before the step: no NaN head is ever saved
            raise utils.UserError(nonfinite_loss_message(loss.item(), features, epoch))
        loss_value = loss.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        metric_logger.update(loss=loss_value, lr=optimizer.param_groups[0]["lr"])
    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger)
    return {name: meter.global_avg for name, meter in metric_logger.meters.items()}


def finite_everywhere(value: torch.Tensor) -> bool:
    """Whether `value` is finite on every process: one all-reduce of the sum, in which a NaN or
    an infinity of any rank survives, so that all ranks stop together (a rank that stopped
    alone would leave the others waiting in DDP's next gradient all-reduce)."""
    total = value.detach().float().reshape(1)
    if utils.is_dist_avail_and_initialized():
        total = total.to(utils.collective_device())
        dist.all_reduce(total)
    return bool(torch.isfinite(total).all())


def nonfinite_loss_message(loss: float, features: torch.Tensor, epoch: int) -> str:
    cause = ("the backbone's features are not finite (NaN or inf in its weights?)"
             if not torch.isfinite(features).all() else "try a lower --lr")
    return f"the linear probe's loss is {loss} at epoch {epoch}: {cause}; this epoch's head was not saved"


def cosine_lr(base_lr: float, epoch: int, epochs: int) -> float:
    """DINO's per-epoch cosine decay to 0 (CosineAnnealingLR's closed form), computed from
    the epoch so that a resumed run follows the same schedule."""
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * epoch / epochs))


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> Tuple[float, Optional[float]]:
    """Top-1 and top-5 (%), top-5 only with at least 5 classes."""
    labels = labels.to(logits.device)
    top1 = (logits.argmax(1) == labels).double().mean().item() * 100
    top5 = None
    if logits.shape[1] >= 5:
        top5 = (logits.topk(5, dim=1).indices == labels[:, None]).any(1).double().mean().item() * 100
    return top1, top5


@torch.no_grad()
def validate(linear: nn.Module, test_data: Any, test_labels: torch.Tensor,
             to_features: Callable, args: argparse.Namespace) -> Dict[str, Any]:
    """Loss and accuracy on every test image, counted exactly once across processes."""
    linear.eval()
    if isinstance(test_data, torch.Tensor):  # cached features
        logits = torch.cat([linear(chunk.to(args.device)) for chunk in test_data.split(4096)])
    else:  # every test image once, in data set order, without progress lines
        logits = feats.extract_features(
            lambda images: linear(to_features(images)), test_data, batch_size=args.batch_size_per_gpu,
            num_workers=args.num_workers, device=args.device, use_amp=args.use_fp16, header=None)
    if not torch.isfinite(logits).all():  # an accuracy from NaN logits would look like a result
        raise utils.UserError("the linear head's outputs are not finite (NaN or inf): try a lower --lr")
    labels = test_labels.to(logits.device)
    top1, top5 = accuracy(logits.float(), labels)
    return dict(loss=F.cross_entropy(logits.float(), labels).item(), acc1=top1, acc5=top5)


# ========================================================================== checkpoints
def head_config(args: argparse.Namespace, config: Dict[str, Any], slots: Optional[List[int]],
                dim: int, num_labels: int, backbone: nn.Module) -> Dict[str, Any]:
    """What a saved head was trained on; a resume or --evaluate must match it."""
    cls = config["readout"] == "cls"
    return dict(readout=config["readout"], arch=config["arch"], patch_size=config["patch_size"],
                n_last_blocks=args.n_last_blocks if cls else None,
                avgpool_patchtokens=args.avgpool_patchtokens if cls else None,
                slots=slots, feature_dim=dim, num_labels=num_labels,
                scale_sparo_features=args.scale_sparo_features if not cls else None,
                backbone_sha256=backbone_sha256(backbone),
                backbone_source=f"{args.pretrained_weights} ({args.checkpoint_key})")


def backbone_sha256(model: nn.Module) -> str:
    """SHA-256 of the backbone's weights (names and bytes): a head is only valid on the exact
    backbone it was trained on, wherever that checkpoint file has moved since."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_head_config(saved: Dict[str, Any], wanted: Dict[str, Any], path: Path) -> None:
    """Refuse a head trained on another backbone or other features (where the backbone was
    read from, backbone_source, only names it: the weights' hash decides)."""
    if saved.get("backbone_sha256") != wanted["backbone_sha256"]:
        raise utils.UserError(f"{path} holds a linear head trained on another backbone "
                              f"({saved.get('backbone_source', 'one not recorded')}) than "
                              f"{wanted['backbone_source']}. Use another --output_dir.")
    differing = [f"{key} ({saved.get(key)!r} saved, {value!r} now)" for key, value in wanted.items()
                 if key != "backbone_source" and saved.get(key) != value]
    if differing:
        raise utils.UserError(f"{path} was trained on other features: {'; '.join(differing)}. "
                              f"Use another --output_dir or the same flags.")


def load_head(path: Path, linear: LinearClassifier, wanted: Dict[str, Any]) -> Dict[str, Any]:
    checkpoint = utils.load_checkpoint(path)
    if "state_dict" not in checkpoint or "head_config" not in checkpoint:
        raise utils.UserError(f"{path} is not a linear head saved by eval_linear.py")
    check_head_config(checkpoint["head_config"], wanted, path)
    linear.load_state_dict(checkpoint["state_dict"])
    return checkpoint


# ================================================================================ script
def check_args(args: argparse.Namespace) -> None:
    if args.cache_features and args.train_augmentation != "none":
        raise utils.UserError("--cache_features needs --train_augmentation none: cached features "
                              "cannot be re-augmented each epoch")
    if not args.evaluate and utils.is_main_process():  # training writes its head and log there
        utils.ensure_output_dir(args.output_dir, "--output_dir")
    if args.output_json:
        utils.ensure_output_file(args.output_json, "--output_json")


def check_model(args: argparse.Namespace, model: nn.Module, config: Dict[str, Any]) -> None:
    feats.parse_slots(args.slots, config)
    if config["readout"] == "cls" and args.n_last_blocks > len(model.blocks):
        raise utils.UserError(f"--n_last_blocks {args.n_last_blocks} exceeds the "
                              f"{len(model.blocks)} blocks of the model")


def infer_num_labels(args: argparse.Namespace, train_labels: torch.Tensor) -> int:
    needed = int(train_labels.max()) + 1
    if args.num_labels is None:
        return needed
    if args.num_labels < needed:
        raise utils.UserError(f"--num_labels {args.num_labels} is too small: the training labels "
                              f"go up to {needed - 1}")
    return args.num_labels


def eval_linear(args: argparse.Namespace) -> Dict[str, Any]:
    feats.start(args, check_args)
    utils.enable_fast_fp32(args.device)  # TF32 for the default fp32 backbone passes, as DINO
    utils.fix_random_seeds(args.seed)
    output_dir = Path(args.output_dir)
    evaluation = feats.setup_evaluation(args, lambda model, config: check_model(args, model, config),
                                        train_transform=lambda crop: build_transforms(args, crop)[0])
    model, config = evaluation.model, evaluation.config
    dataset_train, dataset_val = evaluation.train, evaluation.test
    train_labels, test_labels = evaluation.train_labels, evaluation.test_labels
    slots = feats.parse_slots(args.slots, config)
    to_features = lambda images: frozen_features(  # noqa: E731
        model, images, config, args.n_last_blocks, args.avgpool_patchtokens, slots,
        args.scale_sparo_features)
    dim = feature_dim(config, args.n_last_blocks, args.avgpool_patchtokens, slots)
    num_labels = infer_num_labels(args, train_labels)
    print(f"{num_labels} classes; features of width {dim}.")

    linear = LinearClassifier(dim, num_labels).to(args.device)
    wanted = head_config(args, config, slots, dim, num_labels, model)
    results: Dict[str, Any] = dict(pretrained_weights=args.pretrained_weights, data_path=args.data_path,
                                   head=wanted)

    if args.evaluate:
        path = Path(args.linear_weights) if args.linear_weights else output_dir / CHECKPOINT_NAME
        load_head(path, linear, wanted)
        stats = validate(linear, dataset_val, test_labels, to_features, args)
        print(f"Accuracy of the network on the {len(dataset_val)} test images: {stats['acc1']:.1f}%")
        print(f"Top-1 test accuracy: {stats['acc1']:.1f}")
        results.update(evaluate=stats, top1=stats["acc1"])
        feats.write_json(args.output_json, results)
        return results

    # ============ features (cached) or images ... ============
    feature_kwargs = dict(batch_size=args.batch_size_per_gpu, num_workers=args.num_workers,
                          device=args.device, use_amp=args.use_fp16)
    if args.cache_features:
        print("Caching the frozen features of the train and val sets...")
        cached_train = feats.extract_features(to_features, dataset_train, **feature_kwargs)
        test_data: Any = feats.extract_features(to_features, dataset_val, **feature_kwargs)
        batches: Any = CachedBatches(cached_train, train_labels.to(cached_train.device),
                                     args.batch_size_per_gpu, args.seed)
        train_features: Callable = lambda x: x  # noqa: E731
    else:
        sampler = torch.utils.data.DistributedSampler(dataset_train, utils.get_world_size(),
                                                      utils.get_rank(), shuffle=True, seed=args.seed)
        batches = torch.utils.data.DataLoader(dataset_train, sampler=sampler,
                                              batch_size=args.batch_size_per_gpu,
                                              num_workers=args.num_workers,
                                              pin_memory=args.device.type == "cuda")
        test_data, train_features = dataset_val, to_features

    # ============ optimizer and schedule (DINO) ... ============
    linear_ddp: nn.Module = linear
    if args.distributed:
        linear_ddp = nn.parallel.DistributedDataParallel(
            linear, device_ids=[args.gpu] if args.device.type == "cuda" else None)
    base_lr = args.lr * (args.batch_size_per_gpu * utils.get_world_size()) / 256.0
    optimizer = torch.optim.SGD(linear.parameters(), base_lr, momentum=0.9, weight_decay=0)

    # ============ optionally resume ... ============
    start_epoch, best_acc = 0, 0.0
    last: Dict[str, Any] = {}
    checkpoint_path = output_dir / CHECKPOINT_NAME
    if checkpoint_path.exists():
        checkpoint = load_head(checkpoint_path, linear, wanted)
        optimizer.load_state_dict(checkpoint["optimizer"])
        start_epoch, best_acc = int(checkpoint["epoch"]), float(checkpoint["best_acc"])
        last = dict(checkpoint.get("last_stats") or {})
        print(f"Resuming from {checkpoint_path} at epoch {start_epoch} (best so far {best_acc:.2f}%).")

    start = time.time()
    for epoch in range(start_epoch, args.epochs):
        (batches if isinstance(batches, CachedBatches) else batches.sampler).set_epoch(epoch)
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(base_lr, epoch, args.epochs)
        train_stats = train_one_epoch(linear_ddp, optimizer, batches, train_features, epoch, args)
        log_stats: Dict[str, Any] = {**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch}
        if epoch % args.val_freq == 0 or epoch == args.epochs - 1:
            last = validate(linear, test_data, test_labels,
                            train_features if args.cache_features else to_features, args)
            last["epoch"] = epoch
            print(f"Accuracy at epoch {epoch} of the network on the {len(dataset_val)} test images: "
                  f"{last['acc1']:.1f}%")
            best_acc = max(best_acc, last["acc1"])
            print(f"Max accuracy so far: {best_acc:.2f}%")
            log_stats.update({f"test_{k}": v for k, v in last.items() if k != "epoch"})
        save = dict(epoch=epoch + 1, state_dict=linear.state_dict(), optimizer=optimizer.state_dict(),
                    best_acc=best_acc, head_config=wanted,
                    last_stats=last, args=utils.plain(args))
        utils.save_on_master(save, checkpoint_path)
        if utils.is_main_process():
            utils.write_json_line(output_dir / LOG_NAME, log_stats)
    print(f"Training of the supervised linear classifier on frozen features completed in "
          f"{time.time() - start:.1f} s.")
    print(f"Top-1 test accuracy: {best_acc:.1f}")
    if last:
        print(f"Top-1 test accuracy after the last epoch: {last['acc1']:.1f}")
    results.update(top1=best_acc, last=last, epochs=args.epochs)
    feats.write_json(args.output_json, results)
    return results


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    return feats.run_script("Evaluation with linear classification", get_args_parser, eval_linear, argv)


if __name__ == "__main__":
    utils.run_main(main)
