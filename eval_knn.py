"""Weighted k-NN evaluation of a frozen backbone (DINO's protocol), with SPARO slot selection;
the search itself is knn.py's. README, "Evaluation", describes the protocol and the flags.

    python eval_knn.py --pretrained_weights OUT/checkpoint.pth --data_path /path/to/imagenet
    torchrun --nproc_per_node=8 eval_knn.py --pretrained_weights OUT/checkpoint.pth --data_path ...
    python eval_knn.py --pretrained_weights OUT/checkpoint.pth --data_path fashion_mnist --slots 0,5,9
    python eval_knn.py --load_features FEATS --select_slots 8
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

import devices
import errors
import features as feats
import knn
import utils

FEATURE_FILES = ("trainfeat.pth", "testfeat.pth", "trainlabels.pth", "testlabels.pth")
FEATURE_INFO = "features_info.json"  # model configuration of dumped features (not in DINO)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Evaluation with weighted k-NN on ImageNet-style data",
                                     add_help=False)
    feats.add_eval_args(parser, batch_size=128)
    knn.add_knn_args(parser, [10, 20, 100, 200],
                     "Numbers of nearest neighbours k to evaluate (20 is the headline number).")
    parser.add_argument("--use_cuda", default=True, type=utils.bool_flag,
                        help="Keep the features on the GPU (set to false if GPU memory runs out; "
                             "the search then runs on CPU). Ignored without CUDA.")
    parser.add_argument("--knn_fp16", default=False, type=utils.bool_flag,
                        help="Store the feature bank in half precision (half the memory; "
                             "similarities then carry fp16 rounding, about 1e-3).")
    parser.add_argument("--knn_chunk_size", default=None, type=utils.positive_int,
                        help="Test images per similarity block (default: sized to the memory).")
    parser.add_argument("--dump_features", default=None,
                        help="Save the features and labels to this folder (DINO's file names).")
    parser.add_argument("--load_features", default=None,
                        help="Load features and labels from this folder instead of extracting them.")
    parser.add_argument("--select_slots", default=0, type=utils.non_negative_int,
                        help="SPARO only: pick this many slots by greedy forward selection, scored "
                             "by k-NN on a held-out part of the training set, then report the "
                             "test accuracy of the chosen slots.")
    parser.add_argument("--select_k", default=20, type=utils.positive_int,
                        help="k of the k-NN score used by --select_slots.")
    parser.add_argument("--select_heldout", default=0.1, type=float,
                        help="Fraction of the (sampled) training images held out to score slots.")
    parser.add_argument("--select_max_images", default=10000, type=utils.non_negative_int,
                        help="Score slots on a random sample of at most this many training images "
                             "(0: all of them; the cost grows with its square).")
    parser.add_argument("--seed", default=0, type=int,
                        help="Seed of the held-out split used by --select_slots.")
    return parser


# ============================================================================== features
class Features(NamedTuple):
    """Train/test features and labels (tensors), the model configuration, the --slots to
    evaluate, the data set indices of this process's rows of the bank, and the bank's size."""
    tensors: Dict[str, torch.Tensor]
    config: Dict
    slots: Optional[List[int]]
    index: torch.Tensor
    bank_size: int


def prepare_features(args: argparse.Namespace) -> Features:
    """The features, loaded or extracted. Under torchrun the bank stays split across the
    processes (no process holds all of it); only a dump or a slot selection collects it, in
    rank 0's host memory."""
    if args.load_features:
        return loaded_features(args)
    frozen = feats.frozen_model(args, args.device, slot_counts={"--select_slots": args.select_slots or None})
    splits = feats.labelled_splits(args, frozen.config)
    feats.check_bank_size(args.nb_knn, len(splits.train))
    model = frozen.model
    normalise = lambda images: F.normalize(model(images).float(), dim=1, p=2)  # noqa: E731

    # ============ extract features ... ============
    common = dict(feats.run_settings(args), storage_device=storage_device(args),
                  dtype=torch.float16 if args.knn_fp16 else torch.float32)
    print("Extracting features for train set...")
    train_features, index = feats.extract_features(normalise, splits.train, shard=True, **common)
    print("Extracting features for val set...")
    tensors = dict(train=train_features, test=feats.extract_features(normalise, splits.test, **common),
                   train_labels=splits.train_labels[index], test_labels=splits.test_labels)
    if args.dump_features:
        whole = feats.gather_shards_to_main(train_features, index, len(splits.train))
        if utils.is_main_process():
            dump_features(args.dump_features, {**tensors, "train": whole, "train_labels": splits.train_labels},
                          frozen.config, args)
    return Features(tensors, frozen.config, frozen.slots, index, len(splits.train))


def loaded_features(args: argparse.Namespace) -> Features:
    """--load_features: under torchrun each process reads its rows of the bank only."""
    shard = (args.rank, args.world_size) if args.distributed else None
    tensors, config = load_features(args, shard)
    if (args.slots or args.select_slots) and not config:
        raise errors.UserError(f"--slots/--select_slots with --load_features need "
                               f"{FEATURE_INFO} (written by --dump_features) to know the slots")
    slots = feats.checked_slots(config, args.slots, slot_counts={"--select_slots": args.select_slots or None})
    bank_size = int(utils.over_ranks([len(tensors["train_labels"])]).item())
    feats.check_bank_size(args.nb_knn, bank_size)
    rank, world = shard or (0, 1)
    return Features(tensors, config, slots, torch.arange(rank, bank_size, world), bank_size)


def storage_device(args: argparse.Namespace) -> torch.device:
    return args.device if args.use_cuda else torch.device("cpu")


def select_slots_on_main(args: argparse.Namespace, tensors: Dict[str, torch.Tensor], config: Dict,
                         index: torch.Tensor, bank_size: int) -> Tuple[List[int], List[float]]:
    """Greedy slot selection needs the whole bank: rank 0 collects it in its host memory
    (the other ranks keep only their shards), selects, and tells the others the slots."""
    bank, labels = tensors["train"], tensors["train_labels"]
    if args.distributed:
        bank = feats.gather_shards_to_main(bank, index, bank_size)
        labels = feats.gather_shards_to_main(labels, index, bank_size)
    # the others wait on the store, not in a collective: a selection over a large bank may
    # outlast the collective timeout
    choice = utils.result_from_main(lambda: knn.greedy_select_slots(
        bank, labels, int(config["sparo_slots"]), args.select_slots, args.select_k, args.temperature,
        args.select_heldout, args.seed, args.select_max_images, device=tensors["train"].device))
    del bank, labels
    return choice


def dump_features(folder: str, features: Dict[str, torch.Tensor], config: Dict, args) -> None:
    path = Path(folder)  # created and checked by check_args, before the extraction
    tensors = (features["train"], features["test"], features["train_labels"], features["test_labels"])
    for name, tensor in zip(FEATURE_FILES, tensors):
        utils.atomic_save(tensor.cpu().contiguous(), path / name)
    info = dict(model_config=config, pretrained_weights=args.pretrained_weights,
                checkpoint_key=args.checkpoint_key, data_path=args.data_path, normalised=True)
    (path / FEATURE_INFO).write_text(json.dumps(info, indent=1))
    print(f"Features saved to {path} ({', '.join(FEATURE_FILES)}).")


def load_features(args: argparse.Namespace,
                  shard: Optional[Tuple[int, int]] = None) -> Tuple[Dict[str, torch.Tensor], Dict]:
    """Features dumped by --dump_features (or by DINO's eval_knn.py), checked for consistency.

    Files are memory-mapped; with shard=(rank, world) only the bank rows rank, rank + world,
    ... are read and converted, so no process holds the whole bank or a second copy of it.
    """
    path = Path(args.load_features)
    tensors = {}
    for key, name in zip(("train", "test", "train_labels", "test_labels"), FEATURE_FILES):
        if not (path / name).is_file():
            raise errors.UserError(f"--load_features {path} has no {name} (expected "
                                   f"{', '.join(FEATURE_FILES)})")
        try:
            tensor = _load_mapped(path / name)
        except Exception as error:  # noqa: BLE001 - any failure means an unusable file
            raise errors.UserError(f"cannot read {path / name}: {str(error).splitlines()[0]}") from error
        if not isinstance(tensor, torch.Tensor):
            raise errors.UserError(f"{path / name} holds a {type(tensor).__name__}, not a tensor")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise errors.UserError(f"{path / name} holds features that are not finite (NaN or inf)")
        tensors[key] = tensor
    for split in ("train", "test"):
        rows, labels = tensors[split], tensors[f"{split}_labels"]
        if rows.dim() != 2 or labels.dim() != 1 or rows.shape[0] != labels.shape[0]:
            raise errors.UserError(f"{path}: {split} features {tuple(rows.shape)} and labels "
                                   f"{tuple(labels.shape)} do not match")
    if tensors["train"].shape[1] != tensors["test"].shape[1]:
        raise errors.UserError(f"{path}: train and test features differ in width")
    check_labels(path, tensors)
    storage = storage_device(args)
    dtype = torch.float16 if args.knn_fp16 else torch.float32
    if shard is not None:
        tensors["train"], tensors["train_labels"] = bank_shard(tensors["train"], tensors["train_labels"], *shard)
    for split in ("train", "test"):
        # DINO's dumps are normalised already; normalising again makes foreign files safe.
        tensors[split] = normalised_copy(tensors[split], storage, dtype)
        tensors[f"{split}_labels"] = tensors[f"{split}_labels"].long()
    config = {}
    if (path / FEATURE_INFO).is_file():
        try:
            config = json.loads((path / FEATURE_INFO).read_text()).get("model_config", {})
        except (OSError, ValueError, AttributeError) as error:
            raise errors.UserError(f"cannot read {path / FEATURE_INFO}: {errors.capped(str(error), 200)}; "
                                   f"delete it (it only names the model)") from error
        if not isinstance(config, dict):
            raise errors.UserError(f"{path / FEATURE_INFO}: its model_config is not a mapping")
    print(f"Features loaded from {path}: {tensors['train'].shape[0]} train and "
          f"{tensors['test'].shape[0]} test images, {tensors['train'].shape[1]} dimensions.")
    return tensors, config


MAX_CLASSES = 1_000_000  # the k-NN vote table is (test images x classes): bounded before it exists


def check_labels(path: Path, tensors: Dict[str, torch.Tensor]) -> None:
    """Labels of loaded features: integers from 0 to MAX_CLASSES - 1 (class indices, as the
    dump writes them), and at least one test and one training row."""
    for split in ("train", "test"):
        labels = tensors[f"{split}_labels"]
        if labels.numel() == 0:
            raise errors.UserError(f"{path}: the {split} set is empty (no rows in {split}feat.pth)")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise errors.UserError(f"{path}: {split}labels.pth holds {labels.dtype} values, not class indices")
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= MAX_CLASSES:
            raise errors.UserError(f"{path}: {split}labels.pth holds labels from {low} to {high}; class "
                                   f"indices from 0 to {MAX_CLASSES - 1} are needed (renumber the classes)")


def _load_mapped(path: Path) -> object:
    """torch.load memory-mapped (pages are read as rows are used); files in the pre-1.6
    format cannot be mapped and are read whole."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def normalised_copy(features: torch.Tensor, device: torch.device, dtype: torch.dtype,
                    rows: int = 1 << 16) -> torch.Tensor:
    """L2-normalised rows as `dtype` on `device`, converted block by block: a memory-mapped
    or fp16 file never turns into a whole fp32 copy next to the result."""
    out = torch.empty(features.shape, dtype=dtype, device=device)
    for start in range(0, features.shape[0], rows):
        block = features[start:start + rows].to(device).float()
        out[start:start + rows] = F.normalize(block, dim=1)
    return out


def bank_shard(features: torch.Tensor, labels: torch.Tensor, rank: int,
               world: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rows rank, rank + world, ... as compact tensors: a strided view would keep the whole
    bank alive (on the GPU, on every rank)."""
    return features[rank::world].clone(), labels[rank::world].clone()


def check_args(args: argparse.Namespace) -> None:
    if args.select_slots and args.slots:
        raise errors.UserError("use either --slots or --select_slots, not both")
    if args.load_features and args.dump_features:
        raise errors.UserError("--load_features and --dump_features exclude each other")
    if args.dump_features:
        utils.ensure_output_dir(args.dump_features, "--dump_features")
    if args.output_json:
        utils.ensure_output_file(args.output_json, "--output_json")
    if args.device.type != "cuda":
        args.use_cuda = False


def eval_knn(args: argparse.Namespace) -> Dict:
    feats.start(args)
    check_args(args)
    feats.show_args(args)
    # exact fp32 similarities: TF32 off (torch's default turns it on for cudnn), as knn_monitor
    with devices.tf32_allowed(False):
        return evaluate(args)


def evaluate(args: argparse.Namespace) -> Dict:
    """Features (extracted or loaded), optional slot selection, the k-NN results."""
    start = time.time()
    backend = knn.resolve_backend(args.knn_backend, storage_device(args))  # before the extraction
    tensors, config, slots, index, bank_size = prepare_features(args)
    results: Dict = dict(pretrained_weights=args.pretrained_weights, data_path=args.data_path,
                         load_features=args.load_features, temperature=args.temperature,
                         backend=backend, slots=slots, knn={})

    if args.select_slots:
        slots, scores = select_slots_on_main(args, tensors, config, index, bank_size)
        print(f"Selected slots: {','.join(map(str, slots))}")
        results.update(selected_slots=slots, selection_scores=scores, slots=slots)
    if slots is not None:
        print(f"Evaluating on {len(slots)} of {config['sparo_slots']} slots: {','.join(map(str, slots))}")
        tensors["train"] = feats.keep_slots(tensors["train"], config, slots)
        tensors["test"] = feats.keep_slots(tensors["test"], config, slots)

    # ============ k-NN classification ... ============
    print("Features are ready!\nStart the k-NN classification.")
    accuracy = knn.knn_evaluate(tensors["train"], tensors["train_labels"], tensors["test"],
                                tensors["test_labels"], args.nb_knn, args.temperature,
                                sharded=args.distributed, backend=backend,
                                chunk_size=args.knn_chunk_size)
    for k, (top1, top5) in accuracy.items():
        print(knn.format_result(k, top1, top5))
        results["knn"][str(k)] = dict(top1=top1, top5=top5)
    print(f"k-NN evaluation done in {time.time() - start:.1f} s.")
    feats.write_json(args.output_json, results)
    return results


def main(argv: Optional[List[str]] = None) -> Dict:
    return feats.run_script("Evaluation with weighted k-NN", get_args_parser, eval_knn, argv)


if __name__ == "__main__":
    errors.run_main(main)
