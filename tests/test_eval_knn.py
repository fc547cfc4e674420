"""Weighted k-NN (eval_knn.py) against a brute-force computation written here, on real digits
features; SPARO slot subsets and greedy slot selection; distributed extraction and search."""
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import datasets
import errors
import eval_knn
import features as feats
import knn
from helpers import REPO, cls_vit_tiny, run_script, run_two_gloo_ranks
from sparo_head import select_slots

T = 0.07
KS = (1, 3, 10, 20, 100, 200)
LINE = "{k}-NN classifier result: Top1: {top1:.2f}"


# ------------------------------------------------------------------- the reference k-NN
def brute_force_knn(train, train_labels, test, k, temperature=T, num_classes=None, tie=1e-5):
    """DINO's weighted vote, written plainly: dense similarities in float64, a full sort per
    test image, and a loop over its k nearest neighbours. Also flags the test images whose k-th
    and (k+1)-th similarities tie (within `tie`): there any k-subset of the tied neighbours is a
    correct answer, so those rows are compared only loosely."""
    train, test = np.asarray(train, dtype=np.float64), np.asarray(test, dtype=np.float64)
    labels = np.asarray(train_labels)
    num_classes = num_classes or int(labels.max()) + 1
    sims = test @ train.T
    votes = np.zeros((len(test), num_classes))
    tied = np.zeros(len(test), dtype=bool)
    for i in range(len(test)):
        order = np.argsort(-sims[i], kind="stable")
        for j in order[:k]:
            votes[i, labels[j]] += math.exp(sims[i, j] / temperature)
        if k < len(order):
            tied[i] = sims[i, order[k - 1]] - sims[i, order[k]] < tie
    return votes, tied


def brute_force_accuracy(votes, test_labels, k):
    """Top-1 / top-5 (%) from dense votes; a class needs a vote to count as predicted."""
    test_labels = np.asarray(test_labels)
    hits1 = hits5 = 0
    for i, label in enumerate(test_labels):
        has_vote = label < votes.shape[1] and votes[i, label] > 0
        ranking = sorted(range(votes.shape[1]), key=lambda c: -votes[i, c])
        hits1 += has_vote and ranking[0] == label
        hits5 += has_vote and label in ranking[:5]
    n = len(test_labels)
    top5 = 100.0 * hits5 / n if k >= 5 and votes.shape[1] >= 5 else None
    return 100.0 * hits1 / n, top5


@pytest.fixture(scope="module")
def digits_pixels():
    """Real features: L2-normalised raw pixels of scikit-learn digits, the project's split."""
    train_images, train_labels = datasets.load_digits_split("train")
    test_images, test_labels = datasets.load_digits_split("test")
    as_features = lambda images: F.normalize(torch.tensor(images.reshape(len(images), -1),  # noqa: E731
                                                          dtype=torch.float32), dim=1)
    return (as_features(train_images), torch.tensor(train_labels),
            as_features(test_images), torch.tensor(test_labels))


def assert_votes_match(votes, reference, tied, rtol=1e-4, max_tied=0.05):
    votes = votes.double().cpu().numpy()
    assert votes.shape == reference.shape
    np.testing.assert_allclose(votes[~tied], reference[~tied], rtol=rtol, atol=1e-6)
    # tied rows: the same total weight lands on the classes (only the tied members may swap)
    np.testing.assert_allclose(votes[tied].sum(1), reference[tied].sum(1), rtol=1e-3)
    assert tied.mean() < max_tied, f"{tied.sum()} rows with ties: not a meaningful comparison"


@pytest.mark.parametrize("backend", ["torch", "faiss-cpu", "auto"])
@pytest.mark.parametrize("num_test", [360, 73])
def test_votes_equal_brute_force_with_labels_above_1000(digits_pixels, backend, num_test):
    train, train_labels, test, test_labels = digits_pixels
    test, test_labels = test[:num_test], test_labels[:num_test]
    train_labels, test_labels = train_labels + 1000, test_labels + 1000  # 1000..1009
    votes = knn.knn_classify(train, train_labels, test, KS, T, backend=backend, chunk_size=50)
    assert sorted(votes) == list(KS)
    accuracy = knn.knn_accuracy(votes, test_labels)
    for k in KS:
        reference, tied = brute_force_knn(train, train_labels, test, k)
        assert votes[k].shape == (num_test, 1010)
        assert_votes_match(votes[k], reference, tied)
        top1, top5 = brute_force_accuracy(reference, test_labels, k)
        assert accuracy[k][0] == pytest.approx(top1)
        assert (accuracy[k][1] is None) == (k < 5)
        if k >= 5:
            assert accuracy[k][1] == pytest.approx(top5)
    assert accuracy[20][0] > 90  # raw digit pixels are an easy k-NN problem


@pytest.mark.parametrize("backend", ["torch", "faiss-cpu"])
def test_half_precision_bank_equals_brute_force_on_rounded_features(digits_pixels, backend):
    train, train_labels, test, _ = digits_pixels
    train, test = train.half(), test.half()
    votes = knn.knn_classify(train, train_labels, test, (10, 20), T, backend=backend)
    for k in (10, 20):
        reference, tied = brute_force_knn(train.float(), train_labels, test.float(), k)
        assert_votes_match(votes[k], reference, tied, rtol=2e-3)


def test_torch_search_merges_bank_blocks_exactly(digits_pixels):
    train, _, test, _ = digits_pixels
    whole_sims, whole_index = knn._torch_search(train, test, 50, chunk_size=None)
    block_sims, block_index = knn._torch_search(train.half(), test, 50, chunk_size=64,
                                                     bank_block=37)  # blocks smaller than k
    reference = torch.sort(test.double() @ train.half().double().T, dim=1, descending=True).values[:, :50]
    torch.testing.assert_close(block_sims.double(), reference, atol=1e-6, rtol=0)
    assert torch.all(block_sims[:, :-1] >= block_sims[:, 1:])
    # the indices are the ones whose (fp16-rounded) similarities were returned
    recomputed = (test.double()[:, None, :] * train.half().double()[block_index]).sum(-1)
    torch.testing.assert_close(recomputed, block_sims.double(), atol=1e-6, rtol=0)
    assert (whole_index == block_index).float().mean() > 0.8  # only near-ties may swap


def test_sharded_search_merge_equals_whole_bank(digits_pixels):
    """Each shard's top-k, merged, is the top-k of the whole bank (what every rank does)."""
    train, train_labels, test, _ = digits_pixels
    k = 30
    parts = []
    for shard in range(3):
        index = torch.arange(shard, len(train), 3)
        sims, where = knn.search_topk(train[index], test, k, "torch")
        parts.append((sims, train_labels[index][where]))
    merged_sims, merged_labels = knn.merge_topk(torch.cat([p[0] for p in parts], 1),
                                                     torch.cat([p[1] for p in parts], 1), k)
    votes = knn.class_votes(merged_sims, merged_labels, [k], T, 10)[k]
    reference, tied = brute_force_knn(train, train_labels, test, k)
    assert_votes_match(votes, reference, tied)


def test_top5_is_undefined_for_fewer_than_five_classes(digits_pixels):
    train, train_labels, test, test_labels = digits_pixels
    keep_train, keep_test = train_labels < 3, test_labels < 3
    votes = knn.knn_classify(train[keep_train], train_labels[keep_train], test[keep_test],
                                  (5, 20), T, backend="torch")
    accuracy = knn.knn_accuracy(votes, test_labels[keep_test])
    assert all(top5 is None for _, top5 in accuracy.values())
    assert knn.format_result(20, *accuracy[20]) == LINE.format(k=20, top1=accuracy[20][0])


def test_k_larger_than_the_bank_is_an_error(digits_pixels):
    train, train_labels, test, _ = digits_pixels
    with pytest.raises(ValueError, match="exceeds"):
        knn.knn_classify(train[:50], train_labels[:50], test, (20, 100), backend="torch")


# --------------------------------------------------------------- the script, end to end
def parse_knn_lines(stdout):
    """{k: (top1, top5 or None)} from DINO's lines, checking their exact format."""
    results = {}
    for line in stdout.splitlines():
        if "-NN classifier result:" not in line:
            continue
        head, rest = line.split("-NN classifier result: ")
        parts = dict(part.split(": ") for part in rest.split(", "))
        assert set(parts) <= {"Top1", "Top5"} and all(len(v.split(".")[1]) == 2 for v in parts.values())
        results[int(head)] = (float(parts["Top1"]), float(parts["Top5"]) if "Top5" in parts else None)
    return results


def run_knn(*args):
    """eval_knn.py's main() in this process (no interpreter start-up); returns its stdout."""
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        eval_knn.main([str(a) for a in args])
    return buffer.getvalue()


def expected_lines(folder, ks, slots=None, num_slots=None):
    """k-NN results recomputed by brute force from dumped features."""
    load = lambda name: torch.load(folder / name, weights_only=True)  # noqa: E731
    train, test = load("trainfeat.pth").float(), load("testfeat.pth").float()
    if slots is not None:
        train = F.normalize(select_slots(train, num_slots, slots), dim=1)
        test = F.normalize(select_slots(test, num_slots, slots), dim=1)
    train_labels, test_labels = load("trainlabels.pth"), load("testlabels.pth")
    results = {}
    for k in ks:
        votes, _ = brute_force_knn(train, train_labels, test, k)
        top1, top5 = brute_force_accuracy(votes, test_labels, k)
        results[k] = (round(top1, 2), None if top5 is None else round(top5, 2))
    return results


@pytest.fixture(scope="module")
def sparo_features(tiny_sparo_checkpoint, tmp_path_factory):
    """Features of the tiny SPARO checkpoint on digits, dumped by eval_knn.py (L=16, V=16)."""
    folder = tmp_path_factory.mktemp("sparo_features")
    out = run_script("eval_knn.py", "--pretrained_weights", tiny_sparo_checkpoint,
                     "--data_path", "digits", "--nb_knn", "5", "20", "--dump_features", folder,
                     "--output_json", folder / "result.json")
    return folder, out.stdout


def test_script_result_equals_brute_force_on_dumped_features(sparo_features):
    folder, stdout = sparo_features
    assert (torch.load(folder / "trainfeat.pth", weights_only=True).shape == (1437, 256))
    assert torch.load(folder / "testlabels.pth", weights_only=True).dtype == torch.long
    printed = parse_knn_lines(stdout)
    assert printed == expected_lines(folder, (5, 20))
    saved = json.loads((folder / "result.json").read_text())["knn"]
    assert saved["20"]["top1"] == pytest.approx(printed[20][0], abs=0.005)
    info = json.loads((folder / eval_knn.FEATURE_INFO).read_text())
    assert info["model_config"]["sparo_slots"] == 16


def test_slots_flag_evaluates_the_rescaled_slot_subset(tiny_sparo_checkpoint, sparo_features):
    folder, _ = sparo_features
    stdout = run_knn("--pretrained_weights", tiny_sparo_checkpoint, "--data_path", "digits",
                     "--nb_knn", "20", "--slots", "0,5,9")
    assert "Evaluating on 3 of 16 slots: 0,5,9" in stdout
    assert parse_knn_lines(stdout) == expected_lines(folder, (20,), [0, 5, 9], 16)


def test_slot_scores_equal_knn_on_the_selected_features(sparo_features):
    """The incremental scorer equals k-NN run on select_slots features, for every candidate."""
    folder, _ = sparo_features
    features = torch.load(folder / "trainfeat.pth", weights_only=True)
    labels = torch.load(folder / "trainlabels.pth", weights_only=True)
    heldout, bank = knn.heldout_split(len(features), 0.1, seed=3)
    selected, candidates, k = [4, 11], [0, 7, 15], 10
    scores = knn.score_slot_candidates(features[heldout], labels[heldout], features[bank],
                                            labels[bank], 16, selected, candidates, k, T, 10,
                                            chunk_size=50)
    for score, slot in zip(scores, candidates):
        subset = lambda x: F.normalize(select_slots(x, 16, selected + [slot]), dim=1)  # noqa: E731
        votes, _ = brute_force_knn(subset(features[bank]), labels[bank], subset(features[heldout]), k)
        top1, _ = brute_force_accuracy(votes, labels[heldout], k)
        assert float(score) == pytest.approx(top1)


def selected_slots(stdout):
    lines = [l for l in stdout.splitlines() if l.startswith("Selected slot ")]
    return [int(l.split()[2]) for l in lines], [float(l.split()[-1]) for l in lines]


def test_select_slots_never_uses_the_test_split(sparo_features, tmp_path):
    folder, _ = sparo_features
    run = lambda source: run_knn("--load_features", source, "--nb_knn", "20",  # noqa: E731
                                 "--select_slots", "3", "--select_k", "10")
    first = run(folder)
    chosen, scores = selected_slots(first)
    assert len(chosen) == 3 == len(set(chosen)) and all(0 <= s < 16 for s in chosen)
    assert f"Selected slots: {','.join(map(str, chosen))}" in first
    assert parse_knn_lines(first) == expected_lines(folder, (20,), chosen, 16)

    # The same selection with the test split replaced by noise and shuffled labels.
    perturbed = tmp_path / "perturbed"
    shutil.copytree(folder, perturbed)
    test = torch.load(folder / "testfeat.pth", weights_only=True)
    torch.save(F.normalize(torch.randn_like(test), dim=1), perturbed / "testfeat.pth")
    test_labels = torch.load(folder / "testlabels.pth", weights_only=True)
    torch.save(test_labels[torch.randperm(len(test_labels))], perturbed / "testlabels.pth")
    second = run(perturbed)
    assert selected_slots(second) == (chosen, scores)
    assert parse_knn_lines(second)[20][0] < parse_knn_lines(first)[20][0] - 20


def _select_slots_on_a_rank(folder, out):
    """eval_knn.py --select_slots on one of two ranks, recording the bank this rank holds."""
    held = {}
    prepare = eval_knn.prepare_features

    def recording(args):
        tensors, *rest = prepare(args)
        bank = tensors["train"]
        held.update(rows=bank.shape[0], width=bank.shape[1], storage=bank.untyped_storage().nbytes())
        return (tensors, *rest)

    eval_knn.prepare_features = recording
    results = eval_knn.main(["--load_features", str(folder), "--nb_knn", "20", "--select_slots", "3",
                             "--select_k", "10", "--device", "cpu"])
    torch.save(dict(held, slots=results["selected_slots"], knn=results["knn"]),
               Path(out) / f"rank{os.environ['RANK']}.pth")


@pytest.mark.slow
def test_select_slots_under_two_ranks_keeps_only_shards(sparo_features, tmp_path):
    """Issue 23 item 7: with --select_slots every rank still holds only its shard of the bank
    (rank 0 collects the whole bank in host memory to select), and the selection and the
    accuracy equal one process's."""
    folder, _ = sparo_features
    single = run_knn("--load_features", folder, "--nb_knn", "20", "--select_slots", "3",
                     "--select_k", "10")
    run_two_gloo_ranks(_select_slots_on_a_rank, str(folder), str(tmp_path))
    total = len(torch.load(folder / "trainlabels.pth", weights_only=True))
    for rank in (0, 1):
        record = torch.load(tmp_path / f"rank{rank}.pth", weights_only=True)
        rows = len(range(rank, total, 2))
        assert record["rows"] == rows and record["storage"] == rows * record["width"] * 4
        assert record["slots"] == selected_slots(single)[0]
        two_decimals = lambda v: None if v is None else round(v, 2)  # noqa: E731
        assert {int(k): (two_decimals(v["top1"]), two_decimals(v["top5"]))
                for k, v in record["knn"].items()} == parse_knn_lines(single)


@pytest.fixture(scope="module")
def cls_checkpoint(tmp_path_factory):
    """A DINO-named CLS backbone state dict (vit_tiny/4 at 16 px, random weights)."""
    model = cls_vit_tiny()
    path = tmp_path_factory.mktemp("cls") / "cls_backbone.pth"
    torch.save(model.state_dict(), path)
    return path


def test_slot_flags_are_errors_for_the_cls_readout(cls_checkpoint):
    # as a user sees it: one line on stderr, exit status 2, refused before the slow part
    out = run_script("eval_knn.py", "--pretrained_weights", cls_checkpoint, "--data_path", "digits",
                     "--slots", "0,5,9", check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == ("error: --slots needs a SPARO checkpoint; this one has "
                                  "readout='cls', which has no slots")
    assert "Extracting features" not in out.stdout
    with pytest.raises(errors.UserError, match="--select_slots needs a SPARO checkpoint"):
        run_knn("--pretrained_weights", cls_checkpoint, "--data_path", "digits", "--select_slots", "2")


@pytest.mark.parametrize("flags, message", [
    (["--select_slots", "17"], "exceeds the 16 slots"),
    (["--slots", "3,16"], "between 0 and 15"),
    (["--slots", "3,3"], "twice"),
    (["--slots", "2", "--select_slots", "2"], "either --slots or --select_slots"),
])
def test_bad_slot_requests_are_clear_errors(sparo_features, flags, message):
    folder, _ = sparo_features
    with pytest.raises(errors.UserError, match=re.escape(message)):
        run_knn("--load_features", folder, *flags)


def test_cls_checkpoint_runs_and_matches_brute_force(cls_checkpoint, tmp_path):
    stdout = run_knn("--pretrained_weights", cls_checkpoint, "--data_path", "digits",
                     "--nb_knn", "10", "--dump_features", tmp_path, "--knn_backend", "torch")
    assert "readout=cls" in stdout
    features = torch.load(tmp_path / "trainfeat.pth", weights_only=True)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(len(features)))  # L2-normalised CLS
    assert parse_knn_lines(stdout) == expected_lines(tmp_path, (10,))


def torchrun(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--standalone", "eval_knn.py", "--device", "cpu", *map(str, args)]
    process = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=timeout)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    return process


@pytest.mark.slow
def test_two_process_extraction_and_sharded_search(tiny_sparo_checkpoint, sparo_features, tmp_path):
    """Under torchrun: the gathered features equal one process's, row for row (1437 train
    images: one rank gets a padded duplicate that must be dropped), and the sharded bank gives
    the same k-NN results."""
    folder, stdout = sparo_features
    common = ["--pretrained_weights", tiny_sparo_checkpoint, "--data_path", "digits",
              "--nb_knn", "5", "20", "--batch_size_per_gpu", "100"]
    gathered = torchrun(*common, "--dump_features", tmp_path)
    for name in eval_knn.FEATURE_FILES:
        mine, reference = (torch.load(f / name, weights_only=True) for f in (tmp_path, folder))
        assert mine.shape == reference.shape
        torch.testing.assert_close(mine, reference, atol=1e-5, rtol=0)
    sharded = torchrun(*common)
    assert parse_knn_lines(sharded.stdout) == parse_knn_lines(gathered.stdout) == parse_knn_lines(stdout)


def test_refined_similarities_are_exact_fp32(digits_pixels):
    """The fp16-GEMM path (GPU) recomputes the chosen neighbours' similarities in fp32."""
    train, _, test, _ = digits_pixels
    bank = train.half()
    index = torch.randint(0, len(train), (len(test), 25), generator=torch.Generator().manual_seed(0))
    sims, order = knn.refine_similarities(test.half(), bank, index)
    reference = torch.tensor([[float(test.half()[i].double() @ bank[j].double()) for j in row]
                              for i, row in enumerate(order.tolist())])
    torch.testing.assert_close(sims.double(), reference.double(), atol=1e-6, rtol=0)
    assert torch.all(sims[:, :-1] >= sims[:, 1:])
    assert torch.equal(order.sort(1).values, index.sort(1).values)


# An fp16 GEMM output (unit vectors, fp32 accumulation) is within this of the exact cosine;
# neighbours picked with it are the exact top-k up to swaps within the bound.
FP16_SELECTION_BOUND = 2e-3


def assert_fp16_knn_close(sims, votes, train, train_labels, test, k, bound=FP16_SELECTION_BOUND):
    """An fp16 search is right when its sorted top-k similarities are within `bound` of the
    exact ones, position by position, and each row's total vote is within the error that
    bound makes in exp(sim / T). (Near-ties make class-wise votes meaningless to compare: on
    digits 65-100 % of rows have k-th and (k+1)-th neighbours within the bound.)"""
    exact = test.double().cpu() @ train.double().cpu().T
    exact_top = exact.topk(k, dim=1).values
    assert (sims[:, :k].double().cpu() - exact_top).abs().max() <= bound
    reference, _ = brute_force_knn(train.float().cpu(), train_labels, test.float().cpu(), k)
    np.testing.assert_allclose(votes.double().cpu().numpy().sum(1), reference.sum(1),
                               rtol=math.expm1(bound / T))


def test_fp16_criterion_on_a_simulated_fp16_search(digits_pixels):
    """The GPU test's fp16 criterion, on CPU: neighbours picked from fp16-rounded similarities
    (as a GPU fp16 GEMM gives them), refined in fp32, pass it; the old per-row tie criterion
    would have flagged most rows."""
    train, train_labels, test, _ = digits_pixels
    train, test = train.half(), test.half()
    rounded = (test.float() @ train.float().T).half()  # the fp16 GEMM's output
    _, picked = rounded.float().topk(200, dim=1)
    sims, order = knn.refine_similarities(test, train, picked)
    votes = knn.class_votes(sims, train_labels[order], (10, 20, 200), T, 10)
    for k in (10, 20, 200):
        assert_fp16_knn_close(sims, votes[k], train, train_labels, test, k)
    _, tied = brute_force_knn(train.float(), train_labels, test.float(), 200, tie=2e-3)
    assert tied.mean() > 0.6  # why the old criterion could not pass
    assert (sims[:, :200].double() - (test.double() @ train.double().T).topk(200).values).abs().max() > 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_backends_equal_brute_force(digits_pixels, dtype):
    train, train_labels, test, test_labels = digits_pixels
    train, test = train.to("cuda", dtype), test.to("cuda", dtype)
    backends = ["torch", "auto"]
    faiss = knn._import_faiss()
    if faiss is not None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        backends.append("faiss-gpu")
    for backend in backends:
        votes = knn.knn_classify(train, train_labels.cuda() + 1000, test, (10, 20, 200), T,
                                      backend=backend, chunk_size=100)
        if dtype == torch.float16:  # fp16 GEMM picks the neighbours
            sims, _ = knn.search_topk(train, test, 200, backend, chunk_size=100)
            for k in (10, 20, 200):
                assert_fp16_knn_close(sims, votes[k], train, train_labels + 1000, test, k)
            continue
        for k in (10, 20, 200):
            reference, tied = brute_force_knn(train.float().cpu(), train_labels + 1000,
                                              test.float().cpu(), k)
            assert_votes_match(votes[k].cpu(), reference, tied, rtol=1e-4)


def test_extract_features_keeps_dataset_order_and_storage_dtype():
    dataset = datasets.build_dataset("digits", "test", feats.eval_transform(8, resize_size=8))
    model = torch.nn.Flatten()  # features = the pre-processed pixels, easy to recompute
    expected = torch.stack([dataset[i][0].flatten() for i in range(len(dataset))])
    features = feats.extract_features(model, dataset, batch_size=7, dtype=torch.float16)
    assert features.dtype == torch.float16 and features.shape == expected.shape
    torch.testing.assert_close(features, expected.half())
    shard, index = feats.extract_features(model, dataset, batch_size=50, shard=True)
    assert torch.equal(index, torch.arange(len(dataset)))  # one process: the whole data set
    torch.testing.assert_close(shard, expected)


def test_extract_features_places_every_output_of_a_tuple_by_index():
    """A forward with several outputs gives each one in data set order (floating outputs in the
    storage dtype, others as computed), the index carried by each sample."""
    dataset = datasets.build_dataset("digits", "test", feats.eval_transform(8, resize_size=8), subset=45)
    pixels = torch.stack([dataset[i][0].flatten() for i in range(len(dataset))])
    flat, total, bright = feats.extract_features(
        lambda x: (x.flatten(1), x.flatten(1).sum(1).double(), x.flatten(1).mean(1) > 0),
        dataset, batch_size=8, header=None)
    torch.testing.assert_close(flat, pixels)
    torch.testing.assert_close(total, pixels.sum(1))
    assert total.dtype == torch.float32 and bright.dtype == torch.bool
    assert torch.equal(bright, pixels.mean(1) > 0)
