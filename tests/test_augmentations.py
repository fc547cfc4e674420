"""The two-stage multi-crop pipeline (augmentations.py) against DINO's PIL pipeline.

Distributions: the parameters each pipeline draws are recorded (the PIL pipeline's by wrapping
the torchvision / PIL functions it calls, on a tiny image; the device stage's by sampling them
directly) and compared with two-sample tests at fixed seeds. Ops: for identical parameters each
device op is compared with torchvision's PIL op on real photographs, in grey levels (PIL
rounds to uint8 after every op; the device stage stays in float).
"""
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from scipy import stats
from torchvision import transforms as T
from torchvision.transforms import functional as TF

import augmentations as A
import datasets
import utils
import weight_files

N = 1000  # draws per crop position: rates to +-0.07 at 4.5 sigma


def photo_patches():
    from sklearn.datasets import load_sample_images
    photos = load_sample_images().images
    return [Image.fromarray(photos[0][100:164, 200:264]), Image.fromarray(photos[1][150:214, 300:364]),
            Image.fromarray(np.ascontiguousarray(photos[0][:80, :60]))]


def as_float(image):
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float().unsqueeze(0) / 255


def grey_level_error(device_out, pil_out):
    reference = torch.from_numpy(np.asarray(pil_out).copy()).permute(2, 0, 1).float()
    return (device_out[0] * 255 - reference).abs()


def assert_same_rate(a, b, nominal):
    """Two Bernoulli samples agree with each other and with the nominal rate (4.5 sigma)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    sigma = math.sqrt(max(nominal * (1 - nominal), 1e-4) / len(a))
    assert abs(a.mean() - nominal) < 4.5 * sigma + 1e-9, (a.mean(), nominal)
    assert abs(b.mean() - nominal) < 4.5 * sigma + 1e-9, (b.mean(), nominal)


def assert_same_distribution(a, b):
    assert len(a) > 30 and len(b) > 30
    assert stats.ks_2samp(a, b).pvalue > 1e-3


# ------------------------------------------------------------------ recording the PIL pipeline
class Recorder:
    def __init__(self, monkeypatch):
        self.calls = []
        for name in ("adjust_brightness", "adjust_contrast", "adjust_saturation", "adjust_hue"):
            self._wrap(monkeypatch, name, lambda args: (args[1],))
        self._wrap(monkeypatch, "rgb_to_grayscale", lambda args: ())
        self._wrap(monkeypatch, "solarize", lambda args: ())
        self._wrap(monkeypatch, "resized_crop", lambda args: tuple(args[1:5]))
        self._wrap(monkeypatch, "hflip", lambda args: ())
        recorder, blur = self, ImageFilter.GaussianBlur

        class RecordingBlur(blur):
            def __init__(self, radius):
                recorder.calls.append(("blur", radius))
                super().__init__(radius)
        monkeypatch.setattr(ImageFilter, "GaussianBlur", RecordingBlur)

    def _wrap(self, monkeypatch, name, keep):
        original = getattr(TF, name)

        def wrapper(*args, **kwargs):
            self.calls.append((name, *keep(args)))
            return original(*args, **kwargs)
        monkeypatch.setattr(TF, name, wrapper)

    def run(self, transform, image):
        self.calls = []
        transform(image)
        return self.calls


@pytest.fixture(scope="module")
def pil_draws():
    """What DINO's PIL pipeline drew for N images at each crop position (first global, second
    global, local), on a 40 x 30 image with 8 / 4 px crops (cheap; the draws do not depend on
    the content)."""
    mp = pytest.MonkeyPatch()
    try:
        recorder = Recorder(mp)
        pipeline = A.DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), 1, 8, 4)
        image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8))
        torch.manual_seed(0), np.random.seed(0)
        import random
        random.seed(0)
        return {position: [recorder.run(transform, image) for _ in range(N)]
                for position, transform in enumerate((pipeline.global_transfo1, pipeline.global_transfo2,
                                                      pipeline.local_transfo))}
    finally:
        mp.undo()


def summarise_pil(records):
    """Per image: jitter applied, op order, factors, grey, blur, radius, solarize, box, flip."""
    out = []
    for calls in records:
        names = [c[0] for c in calls]
        jitter = [c for c in calls if c[0].startswith("adjust_")]
        blur = [c[1] for c in calls if c[0] == "blur"]
        box = next(c[1:] for c in calls if c[0] == "resized_crop")
        out.append(dict(jitter=bool(jitter), order=tuple(c[0][7:] for c in jitter),
                        factors={c[0][7:]: c[1] for c in jitter}, grey="rgb_to_grayscale" in names,
                        blur=bool(blur), radius=blur[0] if blur else None, solarize="solarize" in names,
                        box=box, flip="hflip" in names))
    return out


# --------------------------------------------------------------------------- distributions
def test_crop_and_flip_distributions_match_the_pil_pipeline(pil_draws):
    torch.manual_seed(1)
    geometry = A.MultiCropGeometry((0.4, 1.0), (0.05, 0.4), 1, 8, 4)
    ours = [geometry.sample((40, 30)) for _ in range(N)]
    for position in (0, 2):  # a global and the local crop position
        pil = summarise_pil(pil_draws[position])
        boxes = [b[0][position] for b in ours]
        for measure in (lambda b: b[2] * b[3] / 1200, lambda b: math.log(b[3] / b[2]), lambda b: b[0], lambda b: b[1]):
            assert_same_distribution([measure(b) for b in boxes], [measure(p["box"]) for p in pil])
        assert_same_rate([b[1][position] for b in ours], [p["flip"] for p in pil], A.FLIP_P)
        low, high = (0.4, 1.0) if position == 0 else (0.05, 0.4)
        areas = np.array([b[2] * b[3] / 1200 for b in boxes])
        assert areas.min() >= low - 0.03 and areas.max() <= high + 0.03  # integer boxes round


@pytest.mark.parametrize("position", [0, 1, 2])
def test_photometric_parameter_distributions_match_the_pil_pipeline(pil_draws, position):
    pil = summarise_pil(pil_draws[position])
    torch.manual_seed(2)
    radius = A.blur_radius_range(8)
    blur_p, solarize_p = A.crop_blur_p(1)[position], A.crop_solarize_p(1)[position]
    ours = A.sample_params(N, torch.device("cpu"), blur_p, solarize_p, radius)
    assert_same_rate(ours.jitter, [p["jitter"] for p in pil], A.JITTER_P)
    assert_same_rate(ours.grey, [p["grey"] for p in pil], A.GRAYSCALE_P)
    assert_same_rate(ours.blur, [p["blur"] for p in pil], blur_p)
    assert_same_rate(ours.solarize, [p["solarize"] for p in pil], solarize_p)
    jittered = [p for p in pil if p["jitter"]]
    for op, name in enumerate(A.JITTER_OPS):
        theirs = np.array([p["factors"][name] for p in jittered])
        if name == "hue":  # torchvision shifts PIL's uint8 hue by int(f * 255) steps of 1/255 turn
            theirs = np.trunc(theirs * 255) / 255
        assert_same_distribution(ours.factors[ours.jitter, op].numpy(), theirs)
        low, high = A.jitter_ranges()[op]
        assert ours.factors[:, op].min() >= low and ours.factors[:, op].max() <= high
        # each op comes first in a quarter of the jittered images, in both pipelines
        assert_same_rate((ours.order[ours.jitter, 0] == op).numpy(),
                         [p["order"][0] == name for p in jittered], 0.25)
    assert len({tuple(o) for o in ours.order.tolist()}) == 24  # a permutation per image
    if blur_p > 0.2:
        assert_same_distribution(ours.radius[ours.blur].numpy(), [p["radius"] for p in pil if p["blur"]])
        assert ours.radius.min() >= radius[0] and ours.radius.max() <= radius[1]


# -------------------------------------------------------------- each op against PIL's op
# Tolerances in grey levels (0..255). PIL rounds down to uint8 after each op (< 1 level for
# the blends); its hue works on uint8 HSV (hue in 1/255 turns: up to 9 levels on saturated
# pixels, < 1 on average); its Gaussian blur is three box blurs (up to 4 levels inside the
# image, more within 3 sigma of the edges, where its edge handling differs; < 1 on average).
BLEND_MAX, HUE_MAX, HUE_MEAN, BLUR_INSIDE_MAX, BLUR_MEAN = 1.1, 9.5, 1.0, 4.0, 1.0


@pytest.mark.parametrize("image", photo_patches())
def test_each_device_op_matches_torchvision_on_pil(image):
    x, one = as_float(image), torch.ones(1)
    for factor in (0.6, 0.85, 1.4):
        assert grey_level_error(A.adjust_brightness(x, one * factor), TF.adjust_brightness(image, factor)).max() < BLEND_MAX
        assert grey_level_error(A.adjust_contrast(x, one * factor), TF.adjust_contrast(image, factor)).max() < BLEND_MAX
    for factor in (0.8, 1.2):
        assert grey_level_error(A.adjust_saturation(x, one * factor), TF.adjust_saturation(image, factor)).max() < BLEND_MAX
    for factor in (-0.1, -0.03, 0.05, 0.1):
        error = grey_level_error(A.adjust_hue(x, one * (math.trunc(factor * 255) / 255)), TF.adjust_hue(image, factor))
        assert error.max() < HUE_MAX and error.mean() < HUE_MEAN
    grey = A.grey_levels(x).expand(-1, 3, -1, -1)
    assert grey_level_error(grey, TF.rgb_to_grayscale(image, 3)).max() < 0.6
    for radius in (0.1, 0.5, 1.0, 2.0):
        error = grey_level_error(A.gaussian_blur(x, one * radius, 2.0), image.filter(ImageFilter.GaussianBlur(radius)))
        inside = error[:, 6:-6, 6:-6]
        assert inside.max() < BLUR_INSIDE_MAX and error.mean() < BLUR_MEAN
    solarized = torch.where(x >= A.SOLARIZE_THRESHOLD / 255, 1 - x, x)
    assert grey_level_error(solarized, TF.solarize(image, A.SOLARIZE_THRESHOLD)).max() < 1e-3  # exact


def test_hue_rotation_is_torchvisions_formula_and_normalisation_is_dinos():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 16, 16)
    for shift in (-0.1, 0.04, 0.5):
        expected = torch.stack([TF.adjust_hue(image, shift) for image in x])
        torch.testing.assert_close(A.adjust_hue(x, torch.full((3,), shift)), expected, atol=1e-5, rtol=0)
    # all-off parameters: the device stage is DINO's ToTensor + Normalize
    uint8 = (x * 255).to(torch.uint8)
    off = A.PhotometricAugmentation(0, 224)
    off.blur_p, off.solarize_p = [0.0, 0.0], [0.0, 0.0]
    params = A.sample_params(3, torch.device("cpu"), 0.0, 0.0, (0.1, 2.0))
    params.jitter[:], params.grey[:] = False, False
    out = A.photometric(uint8.float() / 255, params, 2.0)
    normalize = T.Normalize(utils.IMAGENET_MEAN, utils.IMAGENET_STD)
    torch.testing.assert_close(normalize(out), normalize(uint8.float() / 255))


def test_photometric_applies_the_ops_only_where_drawn():
    torch.manual_seed(0)
    x = torch.rand(64, 3, 8, 8)
    params = A.sample_params(64, torch.device("cpu"), 0.5, 0.5, (0.5, 1.0))
    out = A.photometric(x, params, 1.0)
    untouched = ~(params.jitter | params.grey | params.blur | params.solarize)
    assert untouched.any() and (~untouched).any()
    torch.testing.assert_close(out[untouched], x[untouched])
    assert ((out[~untouched] - x[~untouched]).abs().flatten(1).amax(1) > 1e-4).all()
    grey = params.grey & ~params.blur & ~params.solarize
    assert torch.allclose(out[grey][:, 0], out[grey][:, 1]) and torch.allclose(out[grey][:, 1], out[grey][:, 2])


def per_image_reference(x, params, max_sigma):
    """DINO's chain computed image by image, each op only where drawn, in the image's own jitter
    order: what the batched device stage must equal."""
    out = []
    for i in range(len(x)):
        y = x[i:i + 1]
        if params.jitter[i]:
            for op in params.order[i].tolist():
                y = A.ADJUST[op](y, params.factors[i:i + 1, op])
        if params.grey[i]:
            y = A.grey_levels(y).expand(-1, 3, -1, -1)
        if params.blur[i]:
            y = A.gaussian_blur(y, params.radius[i:i + 1], max_sigma)
        if params.solarize[i]:
            y = torch.where(y >= A.SOLARIZE_THRESHOLD / 255, 1 - y, y)
        out.append(y)
    return torch.cat(out)


def test_the_batched_device_stage_equals_a_per_image_computation():
    torch.manual_seed(0)
    photos = [as_float(image.resize((16, 16))) for image in photo_patches()]
    x = torch.cat(photos + [torch.rand(237, 3, 16, 16)])
    params = A.sample_params(240, torch.device("cpu"), 0.5, 0.5, (0.1, 2.0))
    assert len({tuple(o) for o in params.order[params.jitter].tolist()}) == 24  # every jitter order
    torch.testing.assert_close(A.photometric(x, params, 2.0), per_image_reference(x, params, 2.0),
                               atol=1e-6, rtol=0)
    params.grey[:], params.blur[:], params.solarize[:] = False, False, False  # the jitter: bit for bit
    assert torch.equal(A.photometric(x, params, 2.0), per_image_reference(x, params, 2.0))


def test_crops_of_one_size_go_through_together_with_their_own_draws():
    """PhotometricAugmentation draws each crop position's parameters in turn (its own blur and
    solarisation rates) and augments all crops of a size in one batch: the same result as each
    position alone."""
    generator = torch.Generator().manual_seed(1)
    crops = [torch.randint(0, 256, (6, 3, size, size), dtype=torch.uint8, generator=generator)
             for size in (20, 20, 10, 10, 10)]
    stage = A.PhotometricAugmentation(3, 20)
    torch.manual_seed(2)
    out = stage(crops)
    torch.manual_seed(2)
    params = [A.sample_params(6, torch.device("cpu"), blur_p, solarize_p, stage.radius)
              for blur_p, solarize_p in zip(A.crop_blur_p(3), A.crop_solarize_p(3))]
    normalize = T.Normalize(utils.IMAGENET_MEAN, utils.IMAGENET_STD)
    for crop, p, o in zip(crops, params, out):
        expected = normalize(per_image_reference(crop.float() / 255, p, stage.radius[1]))
        torch.testing.assert_close(o, expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------- the CPU stage
def test_cpu_stage_crops_are_torchvisions_resized_crop():
    image = photo_patches()[2]  # 60 x 80, non-square
    pixels = A.image_tensor(image)
    boxes = [(0, 0, 80, 60), (10, 5, 40, 30), (70, 50, 10, 10), (3, 7, 5, 6)]  # the last is upsampled
    sizes, flips = [32, 32, 16, 16], [False, True, False, True]
    for crop, box, size, flip in zip(A.crop_and_resize(pixels, boxes, sizes, flips), boxes, sizes, flips):
        expected = TF.resized_crop(image, *box, [size, size], T.InterpolationMode.BICUBIC)
        expected = TF.hflip(expected) if flip else expected
        assert crop.dtype == torch.uint8 and crop.shape == (3, size, size)
        error = (crop.float() - torch.from_numpy(np.asarray(expected).copy()).permute(2, 0, 1).float()).abs()
        assert error.max() <= 1, (box, error.max())  # torch's uint8 kernel is PIL's bicubic


def test_draft_scale_keeps_every_crop_downscaled():
    sizes = [224, 224, 96]
    assert A.draft_scale([(0, 0, 1800, 2000), (0, 0, 1900, 1800), (0, 0, 800, 900)], sizes) == 2  # never 4 or 8
    assert A.draft_scale([(0, 0, 448, 460), (0, 0, 900, 900), (0, 0, 192, 300)], sizes) == 2
    assert A.draft_scale([(0, 0, 447, 460), (0, 0, 900, 900), (0, 0, 200, 300)], sizes) == 1
    assert A.draft_scale([(0, 0, 500, 460), (0, 0, 900, 900), (0, 0, 191, 300)], sizes) == 1
    assert A.draft_scale([(0, 0, 100, 100), (0, 0, 900, 900), (0, 0, 900, 900)], sizes) == 1  # upsampled


def test_drafted_jpeg_crops_match_full_resolution_crops(tmp_path):
    from sklearn.datasets import load_sample_images
    path = tmp_path / "big.jpg"
    Image.fromarray(load_sample_images().images[0]).resize((1280, 854), Image.Resampling.BICUBIC).save(path, quality=92)
    # the smallest side of each box just above twice its output size: the worst case
    boxes, sizes, flips = [(0, 0, 854, 1280), (101, 203, 200, 196), (300, 600, 100, 105)], [96, 96, 48], [False] * 3
    scale = A.draft_scale(boxes, sizes)
    assert scale == 2
    drafted, factor = A.decode(datasets.open_image(str(path)), scale)
    assert drafted.size == (640, 427) and factor == 1 / 2
    full, one = A.decode(datasets.open_image(str(path)), 1)
    assert full.size == (1280, 854) and one == 1
    for small, exact in zip(A.crop_and_resize_subpixel(drafted, boxes, sizes, flips, factor),
                            A.crop_and_resize(A.image_tensor(full), boxes, sizes, flips)):
        error = (small.float() - exact.float()).abs()
        assert error.mean() < 1.5, error.mean()  # DCT-domain downscaling: 0.2-1.2 measured


def test_grey_small_and_non_square_images_behave_as_today(tmp_path):
    torch.manual_seed(0)
    geometry = A.MultiCropGeometry((0.4, 1.0), (0.05, 0.4), 2, 28, 12)
    device = A.PhotometricAugmentation(2, 28)
    today = A.DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), 2, 28, 12)
    grey = Image.fromarray(np.random.default_rng(0).integers(0, 255, (9, 7), dtype=np.uint8), "L")
    # built-in grey data sets: one channel on the CPU, three equal channels after the device
    crops = geometry(grey)
    assert [tuple(c.shape) for c in crops] == [(1, 28, 28)] * 2 + [(1, 12, 12)] * 2  # 9x7: upsampled
    out = device([c.unsqueeze(0) for c in crops])
    expected = [tuple(c.shape) for c in today(grey)]
    assert [tuple(o.shape[1:]) for o in out] == expected
    unnormalised = [o * torch.tensor(utils.IMAGENET_STD).view(1, 3, 1, 1) +
                    torch.tensor(utils.IMAGENET_MEAN).view(1, 3, 1, 1) for o in out]
    for o in unnormalised:  # grey stays grey (saturation and hue leave it unchanged)
        torch.testing.assert_close(o[:, 0], o[:, 1], atol=1e-5, rtol=0)
    # files: grey JPEGs, palette PNGs and non-square images become RGB crops, as today
    Image.fromarray(np.full((50, 90), 128, np.uint8), "L").save(tmp_path / "grey.jpg")
    grey.convert("P").resize((31, 77)).save(tmp_path / "palette.png")
    for name in ("grey.jpg", "palette.png"):
        crops = geometry(datasets.open_image(str(tmp_path / name)))
        assert [tuple(c.shape) for c in crops] == [(3, 28, 28)] * 2 + [(3, 12, 12)] * 2
    boxes, _ = geometry.sample((31, 77))
    for top, left, height, width in boxes:
        assert 0 <= top and top + height <= 77 and 0 <= left and left + width <= 31


def test_lazy_folder_skips_unreadable_images(tmp_path, capsys):
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "a.jpg")
    (tmp_path / "b.jpg").write_bytes((tmp_path / "a.jpg").read_bytes()[:200])  # truncated
    geometry = A.MultiCropGeometry((0.4, 1.0), (0.05, 0.4), 1, 16, 8)
    dataset = datasets.build_dataset(str(tmp_path), "pretrain", geometry, lazy=True)
    crops, _ = dataset[1]
    assert [tuple(c.shape) for c in crops] == [(3, 16, 16)] * 2 + [(3, 8, 8)]
    assert "b.jpg" in capsys.readouterr().err


# ------------------------------------------------------------------------------- training
TRAIN_ARGS = ["--arch", "vit_tiny", "--patch_size", "8", "--batch_size_per_gpu", "8", "--global_crops_size", "16",
              "--local_crops_size", "8", "--local_crops_number", "2", "--out_dim", "128", "--sparo_slots", "8",
              "--sparo_dim", "8", "--head_hidden_dim", "64", "--head_bottleneck_dim", "16", "--epochs", "1",
              "--warmup_epochs", "0", "--print_freq", "1", "--saveckp_freq", "0"]


def train_and_check(tmp_path, data_path, extra, on_device, device_name="cpu"):
    from helpers import read_log, run_script
    out = tmp_path / "run"
    process = run_script("main_dino_sparo.py", *TRAIN_ARGS, "--data_path", data_path, "--output_dir", out,
                         *extra, gpu=device_name == "cuda")
    expected = f"photometric on {device_name}" if on_device else "PIL in the loader"
    assert f"Starting DINO training! (augmentation: {expected})" in process.stdout
    checkpoint = weight_files.load_checkpoint(out / "checkpoint.pth")
    assert checkpoint["args"]["augment_on_device"] is on_device  # the checkpoint says which pipeline
    assert all(math.isfinite(record["train_loss"]) for record in read_log(out / "log.txt"))


@pytest.mark.slow
def test_training_on_fashion_mnist_with_the_device_stage(tmp_path):
    from helpers import fashion_mnist_installed
    if not fashion_mnist_installed():
        pytest.skip("Fashion-MNIST is not installed")
    train_and_check(tmp_path, "fashion_mnist", ["--subset", "32", "--num_workers", "0", "--augment_on_device", "true"], True)


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_training_on_a_folder_of_real_jpegs_with_the_device_stage(tmp_path, device):
    """End to end as on a GPU machine: JPEGs decoded and cropped by 2 loader workers, batches in
    pinned memory on CUDA, the photometric stage on the training device."""
    import argparse

    import main_dino_sparo as dino
    from bench.augmentation_speed import write_photos
    folder = tmp_path / "photos"
    folder.mkdir()
    write_photos(folder, 16)
    flags = ["--data_path", str(folder), "--num_workers", "2", "--augment_on_device", "true"]
    args = argparse.ArgumentParser(parents=[dino.get_args_parser()]).parse_args([*TRAIN_ARGS, *flags])
    args.device, args.rank, args.world_size = torch.device(device), 0, 1
    loader = dino.build_data_loader(args)
    assert loader.num_workers == 2 and loader.pin_memory == (device == "cuda")
    crops, _ = next(iter(loader))
    assert crops[0].dtype == torch.uint8 and all(c.is_pinned() == (device == "cuda") for c in crops)
    train_and_check(tmp_path, str(folder), [*flags[2:], "--device", device], True, device)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_stage_on_cuda_matches_cpu_and_trains_by_default(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(16, 3, 24, 24)
    params = A.sample_params(16, torch.device("cpu"), 0.5, 0.5, (0.1, 2.0))
    on_cuda = A.PhotometricParams(**{k: v.cuda() for k, v in vars(params).items()})
    torch.testing.assert_close(A.photometric(x.cuda(), on_cuda, 2.0).cpu(), A.photometric(x, params, 2.0),
                               atol=1e-4, rtol=0)
    drawn = A.sample_params(4000, torch.device("cuda"), 0.5, 0.2, (0.1, 2.0))
    assert abs(drawn.jitter.float().mean().item() - A.JITTER_P) < 0.03
    assert abs(drawn.grey.float().mean().item() - A.GRAYSCALE_P) < 0.03
    # the default on CUDA is the device stage, and the checkpoint records it
    train_and_check(tmp_path, "digits", ["--subset", "32", "--num_workers", "1"], True, "cuda")
