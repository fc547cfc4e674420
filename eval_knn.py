"""Weighted k-NN evaluation of a frozen backbone (DINO's protocol), with SPARO slot selection.

    python eval_knn.py --pretrained_weights OUT/checkpoint.pth --data_path /path/to/imagenet
    torchrun --nproc_per_node=8 eval_knn.py --pretrained_weights OUT/checkpoint.pth --data_path ...
    python eval_knn.py --pretrained_weights OUT/checkpoint.pth --data_path fashion_mnist --slots 0,5,9
    python eval_knn.py --load_features FEATS --select_slots 8

Features are the backbone encoding (the unit-norm SPARO vector, or the L2-normalised CLS
token). Each test image is classified by its k nearest training images under cosine
similarity, each neighbour voting for its class with weight exp(similarity / T) (Wu et al.
2018, as in DINO). Top-1 and top-5 accuracy are printed for every k.

The neighbour search runs on plain torch for a bank on a GPU (no second copy of the bank), on
FAISS's exact inner-product index for a bank in CPU memory (torch without FAISS), or on FAISS's
GPU index with --knn_backend faiss-gpu; all give the same neighbours.
Under torchrun the training bank stays split across the processes: each one searches its own
shard and the per-shard top-k lists are merged, so a bank of 1.28M x 4096 fits (halved again
by --knn_fp16).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

import utils
from sparo_head import select_slots

BACKENDS = ("auto", "faiss-gpu", "faiss-cpu", "torch")
FEATURE_FILES = ("trainfeat.pth", "testfeat.pth", "trainlabels.pth", "testlabels.pth")
FEATURE_INFO = "features_info.json"  # model configuration of dumped features (not in DINO)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Evaluation with weighted k-NN on ImageNet-style data",
                                     add_help=False)
    utils.add_eval_args(parser, batch_size=128)
    parser.add_argument("--nb_knn", default=[10, 20, 100, 200], nargs="+", type=utils.positive_int,
                        help="Numbers of nearest neighbours k to evaluate (20 is the headline number).")
    parser.add_argument("--temperature", default=0.07, type=utils.positive_float,
                        help="Temperature T of the neighbour weights exp(similarity / T).")
    parser.add_argument("--use_cuda", default=True, type=utils.bool_flag,
                        help="Keep the features on the GPU (set to false if GPU memory runs out; "
                             "the search then runs on CPU). Ignored without CUDA.")
    parser.add_argument("--knn_backend", default="auto", choices=BACKENDS,
                        help="auto: torch for features on a GPU (no second copy of the bank); "
                             "FAISS on CPU for features in CPU memory (torch without FAISS). "
                             "faiss-gpu copies the bank into FAISS's own GPU storage. All give "
                             "the same neighbours.")
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


# ================================================================ k-NN: neighbour search
def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for `auto`, and a clear error for one that is not installed.

    auto: torch for a bank on a GPU (one GEMM per block over the bank where it lies; FAISS's
    GPU index would hold a second copy of it, and a CPU FAISS would be orders of magnitude
    slower); FAISS on CPU for a bank in CPU memory; torch when FAISS is missing.
    """
    if backend not in BACKENDS:
        raise ValueError(f"knn backend must be one of {BACKENDS}, got {backend!r}")
    faiss = _import_faiss()
    has_gpu_faiss = faiss is not None and hasattr(faiss, "StandardGpuResources") \
        and faiss.get_num_gpus() > 0
    if backend == "auto":
        if device.type == "cuda":
            return "torch"
        return "faiss-cpu" if faiss is not None else "torch"
    if backend.startswith("faiss") and faiss is None:
        raise utils.UserError(f"--knn_backend {backend} needs FAISS: pip install faiss-cpu "
                              f"(or a FAISS GPU build)")
    if backend == "faiss-gpu" and not has_gpu_faiss:
        raise utils.UserError("--knn_backend faiss-gpu needs CUDA and a FAISS GPU build "
                              "(this FAISS has no GPU support); use faiss-cpu or torch")
    return backend


def _import_faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _auto_chunk(num_train: int, device: torch.device) -> int:
    """Test rows per block so that one block of similarities stays near 256 MB (CPU) or 1 GB."""
    budget = (1 << 30) if device.type == "cuda" else (1 << 28)
    return max(1, budget // (4 * max(num_train, 1)))


def merge_topk(sims: torch.Tensor, labels: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keep the k largest similarities (and their labels) along dim 1, sorted descending."""
    top, where = sims.topk(min(k, sims.shape[1]), dim=1)
    return top, labels.gather(1, where)


def _torch_search(train: torch.Tensor, test: torch.Tensor, k: int, chunk_size: Optional[int],
                  bank_block: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k inner products with torch: one GEMM per block of test rows.

    On GPU the GEMM runs in the bank's dtype (fp16 banks use tensor cores); its fp16 output
    only picks the neighbours, whose similarities are then recomputed in fp32, because
    exp(sim / 0.07) would turn fp16 rounding (5e-4) into 0.7% vote errors. CPUs have no fast
    fp16 GEMM, so there a half bank is widened to fp32 block by block.
    """
    device = train.device
    widen = not train.is_cuda and train.dtype != torch.float32
    # Bank blocks: the whole bank when it is stored as computed, else blocks of ~64 MB.
    block = bank_block or (max(k, (1 << 26) // (4 * train.shape[1])) if widen else train.shape[0])
    chunk = chunk_size or _auto_chunk(min(block, train.shape[0]), device)
    out_sims = torch.empty((test.shape[0], k), dtype=torch.float32, device=device)
    out_index = torch.empty((test.shape[0], k), dtype=torch.long, device=device)
    for start in range(0, test.shape[0], chunk):
        queries = test[start:start + chunk].to(device=device, dtype=torch.float32 if widen else train.dtype)
        best_sims: Optional[torch.Tensor] = None
        best_index: Optional[torch.Tensor] = None
        for offset in range(0, train.shape[0], block):
            bank = train[offset:offset + block]
            sims = queries @ (bank.float() if widen else bank).T
            top, where = sims.topk(min(k, bank.shape[0]), dim=1)
            top, where = top.float(), where + offset
            if best_sims is None:
                best_sims, best_index = top, where
            else:
                best_sims, best_index = merge_topk(torch.cat([best_sims, top], 1),
                                                   torch.cat([best_index, where], 1), k)
        if sims.dtype != torch.float32:
            best_sims, best_index = refine_similarities(queries, train, best_index)
        out_sims[start:start + chunk], out_index[start:start + chunk] = best_sims, best_index
    return out_sims, out_index


def refine_similarities(queries: torch.Tensor, train: torch.Tensor,
                        index: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """fp32 inner products of each query with its chosen neighbours (M, k), re-sorted.

    Costs M*k*D multiply-adds, a rounding error next to the M*N*D of the search.
    """
    sims = torch.empty(index.shape, dtype=torch.float32, device=index.device)
    rows = max(1, (1 << 26) // (index.shape[1] * train.shape[1]))  # ~64M gathered values
    for start in range(0, index.shape[0], rows):
        block = slice(start, start + rows)
        neighbours = train[index[block]].float()                       # (rows, k, D)
        sims[block] = torch.bmm(neighbours, queries[block].float().unsqueeze(2)).squeeze(2)
    sims, order = sims.sort(dim=1, descending=True)
    return sims, index.gather(1, order)


def _faiss_search(train: torch.Tensor, test: torch.Tensor, k: int, use_gpu: bool,
                  chunk_size: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k inner products with a flat FAISS index (fp16 storage for half banks)."""
    import faiss

    dim, half = train.shape[1], train.dtype == torch.float16
    if use_gpu:
        config = faiss.GpuIndexFlatConfig()
        config.device = train.device.index if train.is_cuda else torch.cuda.current_device()
        config.useFloat16 = half
        resources = faiss.StandardGpuResources()
        index = faiss.GpuIndexFlatIP(resources, dim, config)
        if k > 2048:
            raise utils.UserError(f"FAISS on GPU searches at most 2048 neighbours, asked {k}")
    elif half:  # exact search over fp16-stored vectors, half the memory of a flat index
        index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16,
                                           faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexFlatIP(dim)
    block = max(1, (1 << 28) // (4 * dim))  # add in ~256 MB float32 pieces
    for start in range(0, train.shape[0], block):
        index.add(_as_numpy(train[start:start + block]))
    chunk = chunk_size or _auto_chunk(train.shape[0], torch.device("cuda" if use_gpu else "cpu"))
    sims, where = [], []
    for start in range(0, test.shape[0], chunk):
        top, found = index.search(_as_numpy(test[start:start + chunk]), k)
        sims.append(torch.from_numpy(top))
        where.append(torch.from_numpy(found))
    return torch.cat(sims), torch.cat(where).long()


def _as_numpy(features: torch.Tensor):
    return features.detach().float().cpu().contiguous().numpy()


def search_topk(train: torch.Tensor, test: torch.Tensor, k: int, backend: str = "auto",
                chunk_size: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(similarities, train indices), both (M, k), sorted by decreasing inner product."""
    if k > train.shape[0]:
        raise ValueError(f"k={k} exceeds the {train.shape[0]} images of the bank")
    backend = resolve_backend(backend, train.device)
    if backend == "torch":
        return _torch_search(train, test, k, chunk_size)
    return _faiss_search(train, test, k, backend == "faiss-gpu", chunk_size)


# ======================================================================= k-NN: the vote
def class_votes(sims: torch.Tensor, neighbour_labels: torch.Tensor, nb_knn: Iterable[int],
                temperature: float, num_classes: int) -> Dict[int, torch.Tensor]:
    """DINO's weighted vote from sorted neighbour lists: for each k, (M, C) sums over the first
    k neighbours of exp(similarity / T), per class.

    Smaller k are prefixes of the largest one, so each neighbour column is added once and
    the votes are read off as the running sum passes each k (scatter_add, no one-hot tensor).
    """
    # exp(1/T) overflows float32 for T < ~0.0113: use float64 then.
    dtype = torch.float32 if 1.0 / temperature < 80 else torch.float64
    weights = (sims.to(dtype) / temperature).exp()
    votes = torch.zeros((sims.shape[0], num_classes), dtype=dtype, device=sims.device)
    labels = neighbour_labels.to(sims.device)
    result, done = {}, 0
    for k in sorted(set(nb_knn)):
        votes.scatter_add_(1, labels[:, done:k], weights[:, done:k])
        done = k
        result[k] = votes.clone()
    return result


def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor,
                 test_features: torch.Tensor, nb_knn: Sequence[int] = (10, 20, 100, 200),
                 temperature: float = 0.07, num_classes: Optional[int] = None,
                 backend: str = "auto", chunk_size: Optional[int] = None,
                 sharded: bool = False) -> Dict[int, torch.Tensor]:
    """Weighted k-NN class votes: for each k in nb_knn an (M, C) matrix whose row i sums
    exp(sim / T) over the k training features with the largest inner product with test row i,
    per class of those neighbours. Features should be L2-normalised (sim = cosine).

    The search runs once for the largest k. sharded=True: train_features/labels are this
    process's shard of the bank (test features identical on every process); each process
    searches its shard and the per-shard top-k lists are merged, on every process.
    """
    nb_knn = sorted({int(k) for k in nb_knn})
    if not nb_knn or nb_knn[0] < 1:
        raise ValueError(f"nb_knn must hold positive k, got {nb_knn}")
    if train_features.shape[0] != train_labels.shape[0]:
        raise ValueError("train_features and train_labels differ in length")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"train features have {train_features.shape[1]} dimensions, test "
                         f"features {test_features.shape[1]}")
    train_labels = train_labels.long()
    k_max = nb_knn[-1]
    bank_size, label_max = train_features.shape[0], int(train_labels.max()) if len(train_labels) else -1
    if sharded and utils.get_world_size() > 1:
        bank_size, label_max = _all_reduce_ints([bank_size, label_max], [dist.ReduceOp.SUM, dist.ReduceOp.MAX])
    if k_max > bank_size:
        raise ValueError(f"k={k_max} exceeds the {bank_size} training images")
    if len(train_labels) and int(train_labels.min()) < 0:
        raise ValueError("labels must be non-negative")
    num_classes = num_classes or label_max + 1
    if label_max >= num_classes:
        raise ValueError(f"a training label ({label_max}) is not below num_classes={num_classes}")

    local_k = min(k_max, train_features.shape[0])
    if local_k > 0:
        sims, index = search_topk(train_features, test_features, local_k, backend, chunk_size)
        neighbour_labels = train_labels.to(index.device)[index]
    else:  # an empty shard (more processes than images)
        sims = torch.empty((test_features.shape[0], 0))
        neighbour_labels = torch.empty((test_features.shape[0], 0), dtype=torch.long)
    if sharded and utils.get_world_size() > 1:
        sims, neighbour_labels = _merge_shards(sims, neighbour_labels, k_max)
    return class_votes(sims, neighbour_labels, nb_knn, temperature, num_classes)


def _all_reduce_ints(values: List[int], ops: List) -> List[int]:
    out = []
    for value, op in zip(values, ops):
        tensor = torch.tensor([value], dtype=torch.long)
        if dist.get_backend() == "nccl":
            tensor = tensor.cuda()
        dist.all_reduce(tensor, op=op)
        out.append(int(tensor.item()))
    return out


def _merge_shards(sims: torch.Tensor, labels: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-process top-k lists -> the global top-k, on every process."""
    # Shards smaller than k are padded with -inf similarities, which never win the merge.
    pad = k - sims.shape[1]
    if pad > 0:
        sims = torch.cat([sims, sims.new_full((sims.shape[0], pad), -math.inf)], 1)
        labels = torch.cat([labels, labels.new_zeros((labels.shape[0], pad))], 1)
    all_sims = utils.all_gather_stacked(sims.float())                  # (W, M, k)
    all_labels = utils.all_gather_stacked(labels.to(all_sims.device))
    merged_sims = all_sims.permute(1, 0, 2).reshape(sims.shape[0], -1)
    merged_labels = all_labels.permute(1, 0, 2).reshape(sims.shape[0], -1)
    return merge_topk(merged_sims, merged_labels, k)


def knn_accuracy(votes: Dict[int, torch.Tensor], test_labels: torch.Tensor
                 ) -> Dict[int, Tuple[float, Optional[float]]]:
    """Top-1 and top-5 accuracy (%) of each k's votes. Top-5 is None when k < 5 or there are
    fewer than 5 classes. A class counts as predicted only if it received a vote, so a test
    class that no neighbour voted for is never "found" among tied zero votes."""
    results: Dict[int, Tuple[float, Optional[float]]] = {}
    for k, vote in sorted(votes.items()):
        labels = test_labels.long().to(vote.device)
        known = labels < vote.shape[1]
        true_vote = vote.gather(1, labels.clamp(max=vote.shape[1] - 1)[:, None]).squeeze(1)
        has_vote = known & (true_vote > 0)
        top1 = ((vote.argmax(1) == labels) & has_vote).double().mean().item() * 100
        top5 = None
        if k >= 5 and vote.shape[1] >= 5:
            in_top5 = (vote.topk(5, dim=1).indices == labels[:, None]).any(1)
            top5 = (in_top5 & has_vote).double().mean().item() * 100
        results[k] = (top1, top5)
    return results


def format_result(k: int, top1: float, top5: Optional[float]) -> str:
    """DINO's output line; top-5 is left out where it is undefined."""
    line = f"{k}-NN classifier result: Top1: {top1:.2f}"
    return line + (f", Top5: {top5:.2f}" if top5 is not None else "")


# ====================================================================== slot selection
def heldout_split(num_images: int, fraction: float, seed: int,
                  max_images: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(held-out, bank) indices into the training set: a seeded random sample of at most
    max_images (0: all), of which `fraction` is held out."""
    if not 0 < fraction < 1:
        raise utils.UserError(f"--select_heldout must lie strictly between 0 and 1, got {fraction}")
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    if max_images and max_images < num_images:
        order = order[:max_images]
    num_heldout = max(1, int(round(fraction * len(order))))
    return order[:num_heldout], order[num_heldout:]


def _per_slot(features: torch.Tensor, num_slots: int) -> torch.Tensor:
    """(N, L*V) -> (L, N, V) float32, contiguous per slot for fast per-slot products."""
    return features.float().view(features.shape[0], num_slots, -1).transpose(0, 1).contiguous()


@torch.no_grad()
def score_slot_candidates(heldout: torch.Tensor, heldout_labels: torch.Tensor,
                          bank: torch.Tensor, bank_labels: torch.Tensor, num_slots: int,
                          selected: Sequence[int], candidates: Sequence[int], k: int,
                          temperature: float, num_classes: int,
                          chunk_size: int = 256) -> torch.Tensor:
    """Held-out k-NN top-1 (%) of `selected + [c]` for each candidate slot c.

    The features of a slot subset S are the kept slots rescaled to unit norm, so the
    similarity of two images is the cosine of their concatenated slot vectors:
        sim_S(x, y) = sum_{l in S} <x_l, y_l> / sqrt(sum_{l in S} |x_l|^2 * sum_{l in S} |y_l|^2).
    Dot products and squared norms add up over slots, so the products for S are computed
    once per block and each candidate adds one (block x V) @ (V x bank) product.
    """
    device = bank.device
    held, stored = _per_slot(heldout.to(device), num_slots), _per_slot(bank, num_slots)
    held_sq, bank_sq = held.pow(2).sum(-1), stored.pow(2).sum(-1)       # (L, h), (L, n)
    chosen = list(selected)
    correct = torch.zeros(len(candidates), dtype=torch.long)
    bank_base_sq = bank_sq[chosen].sum(0) if chosen else torch.zeros(bank.shape[0], device=device)
    labels, bank_labels = heldout_labels.long().to(device), bank_labels.long().to(device)
    for start in range(0, heldout.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        base = torch.zeros((held[0, rows].shape[0], bank.shape[0]), device=device)
        for slot in chosen:
            base.addmm_(held[slot, rows], stored[slot].T)
        held_base_sq = held_sq[chosen, rows].sum(0) if chosen else torch.zeros(base.shape[0], device=device)
        for j, slot in enumerate(candidates):
            sims = torch.addmm(base, held[slot, rows], stored[slot].T)
            sims.mul_((held_base_sq + held_sq[slot, rows]).clamp_min(1e-24).rsqrt()[:, None])
            sims.mul_((bank_base_sq + bank_sq[slot]).clamp_min(1e-24).rsqrt()[None, :])
            top, where = sims.topk(k, dim=1)
            votes = class_votes(top, bank_labels[where], [k], temperature, num_classes)
            correct[j] += _count_top1(votes[k], labels[rows])
    return correct.double() * 100 / heldout.shape[0]


def _count_top1(votes: torch.Tensor, labels: torch.Tensor) -> int:
    top1, _ = knn_accuracy({1: votes}, labels)[1]
    return int(round(top1 * labels.shape[0] / 100))


def greedy_select_slots(train_features: torch.Tensor, train_labels: torch.Tensor, num_slots: int,
                        count: int, k: int = 20, temperature: float = 0.07,
                        heldout_fraction: float = 0.1, seed: int = 0, max_images: int = 10000
                        ) -> Tuple[List[int], List[float]]:
    """Greedy forward selection of `count` slots, using the training set only.

    A seeded held-out part of the training images is classified by k-NN against the rest;
    each step adds the slot that gives the best held-out top-1 (ties: the lowest slot).
    Returns the slots in the order chosen and the held-out top-1 after each addition.
    """
    if not 1 <= count <= num_slots:
        raise utils.UserError(f"--select_slots must lie between 1 and L={num_slots}, got {count}")
    heldout, bank = heldout_split(train_features.shape[0], heldout_fraction, seed, max_images)
    if k > len(bank):
        raise utils.UserError(f"--select_k {k} exceeds the {len(bank)} training images left "
                              f"after holding out {len(heldout)}")
    features, labels = train_features, train_labels.long().to(train_features.device)
    heldout, bank = heldout.to(features.device), bank.to(features.device)
    num_classes = int(labels.max()) + 1
    print(f"Selecting {count} of {num_slots} slots greedily: {k}-NN top-1 of {len(heldout)} "
          f"held-out training images against {len(bank)} others (seed {seed}); the test set "
          f"is not used.")
    held_feats, held_labels = features[heldout], labels[heldout]
    bank_feats, bank_labels = features[bank], labels[bank]
    selected: List[int] = []
    scores: List[float] = []
    for step in range(count):
        candidates = [s for s in range(num_slots) if s not in selected]
        candidate_scores = score_slot_candidates(held_feats, held_labels, bank_feats, bank_labels,
                                                 num_slots, selected, candidates, k, temperature,
                                                 num_classes)
        best = int(torch.argmax(candidate_scores))  # first maximum: the lowest slot number
        selected.append(candidates[best])
        scores.append(float(candidate_scores[best]))
        print(f"Selected slot {candidates[best]} ({step + 1}/{count}): held-out {k}-NN top-1 "
              f"{scores[-1]:.2f}", flush=True)
    return selected, scores


# ================================================================================ script
def prepare_features(args: argparse.Namespace) -> Tuple[Dict[str, torch.Tensor], Dict, bool]:
    """Train/test features and labels, the model configuration, and whether the train bank
    is this process's shard."""
    if args.load_features:
        # under torchrun each process reads only its shard of the bank, unless slot
        # selection needs all of it
        shard = (args.rank, args.world_size) if args.distributed and not args.select_slots else None
        features, config = load_features(args, shard)
        check_slot_config(args, config)
        bank_size = len(features["train_labels"])
        if shard is not None:
            bank_size = _all_reduce_ints([bank_size], [dist.ReduceOp.SUM])[0]
        check_bank_size(args.nb_knn, bank_size)
        return features, config, shard is not None
    # ============ building network ... ============
    model, config = utils.load_eval_backbone(args)
    check_slot_config(args, config)  # before the long extraction
    normalise = lambda images: F.normalize(model(images).float(), dim=1, p=2)  # noqa: E731

    # ============ preparing data ... ============
    transform = utils.eval_transform(utils.eval_crop_size(args, config), args.resize_size)
    dataset_train = utils.build_dataset(args.data_path, "train", transform, subset=args.train_subset)
    dataset_val = utils.build_dataset(args.data_path, "test", transform, subset=args.test_subset)
    check_bank_size(args.nb_knn, len(dataset_train))
    print(f"Data loaded with {len(dataset_train)} train and {len(dataset_val)} val imgs.")
    train_labels = torch.as_tensor(utils.dataset_labels(dataset_train))
    test_labels = torch.as_tensor(utils.dataset_labels(dataset_val))

    # ============ extract features ... ============
    storage = args.device if args.use_cuda else torch.device("cpu")
    dtype = torch.float16 if args.knn_fp16 else torch.float32
    common = dict(batch_size=args.batch_size_per_gpu, num_workers=args.num_workers,
                  device=args.device, forward=normalise, use_amp=args.use_fp16,
                  storage_device=storage, dtype=dtype)
    print("Extracting features for train set...")
    # Under torchrun the bank stays split across the processes (no process holds all of it)
    # unless slot selection needs it whole; a dump collects it on rank 0's host memory only.
    sharded = args.distributed and not args.select_slots
    all_train_labels = train_labels
    if sharded:
        train_features, index = utils.extract_feature_shard(model, dataset_train, **common)
        train_labels = train_labels[index]
    else:
        train_features = utils.extract_features(model, dataset_train, **common)
    print("Extracting features for val set...")
    test_features = utils.extract_features(model, dataset_val, **common)
    features = dict(train=train_features, test=test_features, train_labels=train_labels,
                    test_labels=test_labels)
    if args.dump_features:
        whole = utils.gather_shards_to_main(train_features, len(all_train_labels)) if sharded \
            else train_features
        if utils.is_main_process():
            dump_features(args.dump_features, {**features, "train": whole,
                                               "train_labels": all_train_labels}, config, args)
    return features, config, sharded


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
            raise utils.UserError(f"--load_features {path} has no {name} (expected "
                                  f"{', '.join(FEATURE_FILES)})")
        try:
            tensor = _load_mapped(path / name)
        except Exception as error:  # noqa: BLE001 - any failure means an unusable file
            raise utils.UserError(f"cannot read {path / name}: {str(error).splitlines()[0]}") from error
        if not isinstance(tensor, torch.Tensor):
            raise utils.UserError(f"{path / name} holds a {type(tensor).__name__}, not a tensor")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise utils.UserError(f"{path / name} holds features that are not finite (NaN or inf)")
        tensors[key] = tensor
    for split in ("train", "test"):
        feats, labels = tensors[split], tensors[f"{split}_labels"]
        if feats.dim() != 2 or labels.dim() != 1 or feats.shape[0] != labels.shape[0]:
            raise utils.UserError(f"{path}: {split} features {tuple(feats.shape)} and labels "
                                  f"{tuple(labels.shape)} do not match")
    if tensors["train"].shape[1] != tensors["test"].shape[1]:
        raise utils.UserError(f"{path}: train and test features differ in width")
    storage = args.device if args.use_cuda else torch.device("cpu")
    dtype = torch.float16 if args.knn_fp16 else torch.float32
    if shard is not None:
        tensors["train"], tensors["train_labels"] = bank_shard(tensors["train"], tensors["train_labels"], *shard)
    for split in ("train", "test"):
        # DINO's dumps are normalised already; normalising again makes foreign files safe.
        tensors[split] = normalised_copy(tensors[split], storage, dtype)
        tensors[f"{split}_labels"] = tensors[f"{split}_labels"].long()
    config = {}
    if (path / FEATURE_INFO).is_file():
        config = json.loads((path / FEATURE_INFO).read_text()).get("model_config", {})
    print(f"Features loaded from {path}: {tensors['train'].shape[0]} train and "
          f"{tensors['test'].shape[0]} test images, {tensors['train'].shape[1]} dimensions.")
    return tensors, config


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


def apply_slots(features: torch.Tensor, config: Dict, slots: Optional[List[int]]) -> torch.Tensor:
    """Keep a subset of slots, rescaled to unit norm (the selected cosine)."""
    if slots is None:
        return features
    kept = select_slots(features.float(), int(config["sparo_slots"]), slots)
    return F.normalize(kept, dim=1).to(features.dtype)


def check_args(args: argparse.Namespace) -> None:
    if args.select_slots and args.slots:
        raise utils.UserError("use either --slots or --select_slots, not both")
    if args.load_features and args.dump_features:
        raise utils.UserError("--load_features and --dump_features exclude each other")
    if args.dump_features:
        utils.ensure_output_dir(args.dump_features, "--dump_features")
    if args.output_json:
        utils.ensure_output_file(args.output_json, "--output_json")


def check_slot_config(args: argparse.Namespace, config: Dict) -> Optional[List[int]]:
    """The --slots list, after checking that --slots/--select_slots fit this checkpoint."""
    if (args.slots or args.select_slots) and not config:
        raise utils.UserError(f"--slots/--select_slots with --load_features need "
                              f"{FEATURE_INFO} (written by --dump_features) to know the slots")
    slots = utils.parse_slots(args.slots, config)
    utils.require_slot_count(args.select_slots or None, config, "--select_slots")
    return slots


def check_bank_size(nb_knn: List[int], bank_size: int) -> None:
    if max(nb_knn) > bank_size:
        raise utils.UserError(f"--nb_knn {max(nb_knn)} exceeds the {bank_size} training images")


def eval_knn(args: argparse.Namespace) -> Dict:
    utils.init_distributed_mode(args)
    check_args(args)
    if args.num_workers is None:
        args.num_workers = utils.default_num_workers(args.device)
    if args.device.type != "cuda":
        args.use_cuda = False
    print("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))
    start = time.time()
    features, config, sharded = prepare_features(args)
    slots = utils.parse_slots(args.slots, config)
    backend = resolve_backend(args.knn_backend, features["train"].device)
    results: Dict = dict(pretrained_weights=args.pretrained_weights, data_path=args.data_path,
                         load_features=args.load_features, temperature=args.temperature,
                         backend=backend, slots=slots, knn={})

    if args.select_slots:
        slots, scores = greedy_select_slots(
            features["train"], features["train_labels"], int(config["sparo_slots"]),
            args.select_slots, args.select_k, args.temperature, args.select_heldout, args.seed,
            args.select_max_images)
        print(f"Selected slots: {','.join(map(str, slots))}")
        results.update(selected_slots=slots, selection_scores=scores, slots=slots)
    if slots is not None:
        print(f"Evaluating on {len(slots)} of {config['sparo_slots']} slots: {','.join(map(str, slots))}")
        features["train"] = apply_slots(features["train"], config, slots)
        features["test"] = apply_slots(features["test"], config, slots)
    if args.distributed and not sharded:  # the whole bank was needed here; still split the search
        features["train"], features["train_labels"] = bank_shard(
            features["train"], features["train_labels"], utils.get_rank(), utils.get_world_size())
        sharded = True

    # ============ k-NN classification ... ============
    print("Features are ready!\nStart the k-NN classification.")
    votes = knn_classify(features["train"], features["train_labels"], features["test"],
                         args.nb_knn, args.temperature, backend=backend,
                         chunk_size=args.knn_chunk_size, sharded=sharded)
    for k, (top1, top5) in knn_accuracy(votes, features["test_labels"]).items():
        print(format_result(k, top1, top5))
        results["knn"][str(k)] = dict(top1=top1, top5=top5)
    print(f"k-NN evaluation done in {time.time() - start:.1f} s.")
    if args.output_json and utils.is_main_process():
        Path(args.output_json).write_text(json.dumps(results, indent=1) + "\n")
    return results


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser("Evaluation with weighted k-NN", parents=[get_args_parser()])
    args = utils.parse_args_with_config(parser, argv)
    try:
        eval_knn(args)
    finally:
        utils.cleanup_distributed()


if __name__ == "__main__":
    utils.run_main(main)
