"""k-NN speed: this project's torch and FAISS searches vs DINO's torch vote, against the GEMM peak.

    python bench/knn_speed.py                          # 60k x 10k at 4096 dimensions, 10 classes
    python bench/knn_speed.py --num_train 1281167 --num_test 50000 --num_classes 1000 --device cuda \
        --methods torch [--dtype fp16]                 # ImageNet's shape (eval_knn --knn_fp16)

Same random unit features for every method (fixed seed), made on the device itself, in blocks
(an ImageNet bank never passes through host memory), stored in --dtype (fp16: eval_knn.py's
--knn_fp16 bank). For each method: the time of the whole classification (search for the largest
k, votes for every k), its peak memory above the features, the predictions for every k compared
with the first method's, and the achieved rate of the similarity product (2 * N * M * D
floating-point operations) against a GEMM peak measured here in the search's precision, so that
"time / (2NMD / peak)" says how close the search is to what the matrix multiply allows.
"dino" is DINO's torch k-NN as the original writes it (blocks of 100 test images, a one-hot
(block * k, C) tensor, one pass per k), re-expressed here as the plain reference.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import errors  # noqa: E402
import knn  # noqa: E402
from bench.measure import PeakMemory, describe_device, gemm_peak_gflops, header, timed, write_json  # noqa: E402

METHODS = ("torch", "faiss-cpu", "faiss-gpu", "dino")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("knn_speed")
    parser.add_argument("--num_train", type=int, default=60000, help="N, the size of the bank.")
    parser.add_argument("--num_test", type=int, default=10000, help="M, the number of queries.")
    parser.add_argument("--dim", type=int, default=4096, help="D, the feature width (SPARO: L*V).")
    parser.add_argument("--num_classes", type=int, default=10)
    parser.add_argument("--nb_knn", type=int, nargs="+", default=[10, 20, 100, 200])
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--methods", nargs="+", default=["torch", "faiss-cpu", "dino"], choices=METHODS)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="Where the features live (the torch and DINO searches run there).")
    parser.add_argument("--dtype", default="fp32", choices=tuple(DTYPES),
                        help="How bank and queries are stored (fp16: eval_knn.py --knn_fp16).")
    parser.add_argument("--gemm_size", type=int, default=4096, help="Side of the square GEMM of the peak.")
    parser.add_argument("--output_json", default=None)
    return parser


def dino_knn(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor,
             nb_knn: List[int], temperature: float, num_classes: int) -> Dict[int, torch.Tensor]:
    """DINO's knn_classifier structure: for each k, blocks of 100 queries, similarity GEMM,
    top-k, a one-hot (block * k, C) tensor weighted by exp(sim / T), summed per class."""
    votes = {}
    train_t = train.t()
    for k in nb_knn:
        scores = []
        for start in range(0, test.shape[0], 100):
            sims = test[start:start + 100] @ train_t
            top, index = sims.topk(k, dim=1, largest=True, sorted=True)
            labels = train_labels.view(1, -1).expand(len(top), -1).gather(1, index)
            one_hot = torch.zeros(len(top) * k, num_classes, device=train.device)
            one_hot.scatter_(1, labels.view(-1, 1), 1)
            weighted = one_hot.view(len(top), k, num_classes) * (top.float() / temperature).exp().view(len(top), k, 1)
            scores.append(weighted.sum(1))
        votes[k] = torch.cat(scores)
    return votes


def make_features(args: argparse.Namespace, device: torch.device):
    """Unit-norm bank and queries and the bank's labels, drawn on `device` in blocks of rows
    (the fp32 draw of a block, then its copy in --dtype: no full-size fp32 temporary)."""
    generator = torch.Generator(device).manual_seed(0)
    dtype = DTYPES[args.dtype]

    def unit(rows: int) -> torch.Tensor:
        out = torch.empty((rows, args.dim), dtype=dtype, device=device)
        for start in range(0, rows, 65536):
            block = torch.randn((min(65536, rows - start), args.dim), generator=generator, device=device)
            out[start:start + len(block)] = torch.nn.functional.normalize(block, dim=1)
        return out

    train, test = unit(args.num_train), unit(args.num_test)
    labels = torch.randint(0, args.num_classes, (args.num_train,), generator=generator, device=device)
    return train, labels, test


def run_method(method: str, args: argparse.Namespace, train: torch.Tensor, labels: torch.Tensor,
               test: torch.Tensor) -> Dict[int, torch.Tensor]:
    if method == "dino":
        return dino_knn(train, labels, test, sorted(args.nb_knn), args.temperature, args.num_classes)
    return knn.knn_classify(train, labels, test, nb_knn=args.nb_knn, temperature=args.temperature,
                                 num_classes=args.num_classes, backend=method)


def main(argv: List[str] | None = None) -> Dict:
    args = get_args_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise errors.UserError("--device cuda needs a CUDA GPU")
    (train, labels, test), features_s = timed(lambda: make_features(args, device), device)
    features_mib = (train.nbytes + test.nbytes + labels.nbytes) / 2**20
    # the search's GEMM precision: fp16 banks multiply in fp16 on a GPU, in fp32 on the CPU (knn.py)
    search_dtype = DTYPES[args.dtype] if device.type == "cuda" else torch.float32
    peak = gemm_peak_gflops(args.gemm_size, device, search_dtype)
    flops = 2.0 * args.num_train * args.num_test * args.dim
    floor_s = flops / (peak * 1e9)
    print(header(device))
    print(f"bank N={args.num_train}, queries M={args.num_test}, D={args.dim}, C={args.num_classes}, "
          f"k={sorted(args.nb_knn)}, {args.dtype} features ({features_mib:.0f} MiB, made in {features_s:.2f} s); "
          f"{str(search_dtype).split('.')[-1]} GEMM peak {peak:.1f} GFLOP/s -> similarity product "
          f"alone needs {floor_s:.2f} s")
    results, reference = {}, None
    for method in args.methods:
        memory = PeakMemory(device)
        memory.start()
        votes, seconds = timed(lambda: run_method(method, args, train, labels, test), device)
        peak_mib = memory.stop()
        predictions = {k: v.argmax(1).cpu() for k, v in votes.items()}
        if reference is None:
            reference, same = predictions, True
        else:
            same = all(torch.equal(predictions[k], reference[k]) for k in reference)
        results[method] = dict(seconds=seconds, gflops=flops / seconds / 1e9, vs_gemm_floor=seconds / floor_s,
                               peak_mib_above_features=peak_mib, same_predictions=same)
        print(f"{method:>10}: {seconds:8.2f} s  {flops / seconds / 1e9:7.1f} GFLOP/s  "
              f"{seconds / floor_s:5.2f}x the GEMM floor  peak {peak_mib:.0f} MiB above the features  "
              f"predictions identical to {args.methods[0]}: {same}", flush=True)
    first = args.methods[0]
    for method in args.methods[1:]:
        print(f"{method}/{first} time ratio: {results[method]['seconds'] / results[first]['seconds']:.3f}")
    summary = dict(device=describe_device(device), torch=torch.__version__, gemm_peak_gflops=peak, floor_s=floor_s,
                   features_mib=features_mib, features_s=features_s, config=vars(args), results=results)
    write_json(args.output_json, summary)
    return summary


if __name__ == "__main__":
    errors.run_main(main)
