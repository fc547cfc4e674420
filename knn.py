"""Weighted k-NN classification on frozen features (DINO's protocol, Wu et al. 2018): exact
inner-product neighbour search (torch, or FAISS on CPU or GPU), the per-class vote
exp(similarity / T), top-1/top-5 accuracy, banks sharded over processes, and greedy
selection of SPARO slots scored on held-out training images.

Entry point for code that has features in hand (eval_knn.py, training-time monitors):
knn_evaluate(bank, bank_labels, queries, query_labels, nb_knn) -> {k: (top1, top5)}.
"""
from __future__ import annotations

import argparse
import math
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

import errors
import features as feats
import utils

BACKENDS = ("auto", "faiss-gpu", "faiss-cpu", "torch")


def add_knn_args(parser: argparse.ArgumentParser, nb_knn: List[int], nb_knn_help: str) -> None:
    """--nb_knn (default nb_knn), --temperature and --knn_backend of a script that runs a k-NN."""
    parser.add_argument("--nb_knn", default=nb_knn, nargs="+", type=utils.positive_int, help=nb_knn_help)
    parser.add_argument("--temperature", default=0.07, type=utils.positive_float,
                        help="Temperature T of the neighbour weights exp(similarity / T).")
    parser.add_argument("--knn_backend", default="auto", choices=BACKENDS,
                        help="auto: torch for features on a GPU (no second copy of the bank); "
                             "FAISS on CPU for features in CPU memory (torch without FAISS). "
                             "faiss-gpu copies the bank into FAISS's own GPU storage. All give "
                             "the same neighbours.")


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
        raise errors.UserError(f"--knn_backend {backend} needs FAISS: pip install faiss-cpu "
                               f"(or a FAISS GPU build)")
    if backend == "faiss-gpu" and not has_gpu_faiss:
        raise errors.UserError("--knn_backend faiss-gpu needs CUDA and a FAISS GPU build "
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
            raise errors.UserError(f"FAISS on GPU searches at most 2048 neighbours, asked {k}")
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
        bank_size = int(utils.over_ranks([bank_size], "sum").item())
        label_max = int(utils.over_ranks([label_max], "max").item())
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


def _merge_shards(sims: torch.Tensor, labels: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-process top-k lists -> the global top-k, on every process."""
    # Shards smaller than k are padded with -inf similarities, which never win the merge.
    pad = k - sims.shape[1]
    if pad > 0:
        sims = torch.cat([sims, sims.new_full((sims.shape[0], pad), -math.inf)], 1)
        labels = torch.cat([labels, labels.new_zeros((labels.shape[0], pad))], 1)
    all_sims = feats.all_gather_stacked(sims.float())                  # (W, M, k)
    all_labels = feats.all_gather_stacked(labels.to(all_sims.device))
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


def knn_evaluate(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor,
                 query_labels: torch.Tensor, nb_knn: Sequence[int] = (10, 20, 100, 200),
                 temperature: float = 0.07, sharded: bool = False, backend: str = "auto",
                 chunk_size: Optional[int] = None) -> Dict[int, Tuple[float, Optional[float]]]:
    """{k: (top-1, top-5)} (%) of DINO's weighted k-NN: L2-normalised bank features (N, D) with
    their labels, query features (M, D) with theirs. sharded=True: bank/bank_labels are this
    process's shard (queries the same on every process); every process gets the result."""
    votes = knn_classify(bank, bank_labels, queries, nb_knn, temperature, backend=backend,
                         chunk_size=chunk_size, sharded=sharded)
    return knn_accuracy(votes, query_labels)


# ====================================================================== slot selection
def heldout_split(num_images: int, fraction: float, seed: int,
                  max_images: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(held-out, rest) indices of num_images items: a seeded random sample of at most
    max_images (0: all; the same on every rank: a CPU generator), of which `fraction` is held
    out, at least one item when fraction is above 0 (a tiny set still holds one out)."""
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    if max_images and max_images < num_images:
        order = order[:max_images]
    num_heldout = max(1, round(fraction * len(order))) if fraction > 0 else 0
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
                        heldout_fraction: float = 0.1, seed: int = 0, max_images: int = 10000,
                        device: Optional[torch.device] = None) -> Tuple[List[int], List[float]]:
    """Greedy forward selection of `count` slots, using the training set only.

    A seeded held-out part of the training images is classified by k-NN against the rest;
    each step adds the slot that gives the best held-out top-1 (ties: the lowest slot).
    Returns the slots in the order chosen and the held-out top-1 after each addition.
    """
    if not 1 <= count <= num_slots:
        raise errors.UserError(f"--select_slots must lie between 1 and L={num_slots}, got {count}")
    if not 0 < heldout_fraction < 1:
        raise errors.UserError(f"--select_heldout must lie strictly between 0 and 1, got {heldout_fraction}")
    heldout, bank = heldout_split(train_features.shape[0], heldout_fraction, seed, max_images)
    if k > len(bank):
        raise errors.UserError(f"--select_k {k} exceeds the {len(bank)} training images left "
                               f"after holding out {len(heldout)}")
    device = device or train_features.device  # where the sampled images are scored
    labels = train_labels.long().to(train_features.device)
    num_classes = int(labels.max()) + 1
    print(f"Selecting {count} of {num_slots} slots greedily: {k}-NN top-1 of {len(heldout)} "
          f"held-out training images against {len(bank)} others (seed {seed}); the test set "
          f"is not used.")
    heldout, bank = heldout.to(train_features.device), bank.to(train_features.device)
    held_feats, held_labels = train_features[heldout].to(device), labels[heldout].to(device)
    bank_feats, bank_labels = train_features[bank].to(device), labels[bank].to(device)
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

