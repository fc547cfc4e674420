"""DINO's multi-crop augmentation, two ways.

- `DataAugmentationDINO`: DINO's PIL pipeline, every crop finished on the CPU (float tensors).
- `MultiCropGeometry` + `PhotometricAugmentation`: the same augmentation split in two stages.
  The CPU stage (data-loader workers) decodes and does the geometric work only: random resized
  crops and flips to uint8 tensors of the crop sizes, decoding JPEGs at a reduced resolution
  (`Image.draft`) when every crop of the image is downscaled anyway. The device stage applies
  the photometric augmentations (colour jitter, grayscale, blur, solarisation, normalisation)
  to whole batches on the training device, with per-sample random parameters.

DINO's ranges and probabilities are defined once, below, and both pipelines read them.
kornia 0.9's ColorJitter was considered for the device stage and not used: it draws one order
of the four jitter operations per batch (random_generator/_2d/color_jitter.py), where DINO
(torchvision's ColorJitter, once per image) draws one per image.
"""
from __future__ import annotations

import functools
import random
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torchvision import transforms as T

import datasets
import devices
import utils

# ------------------------------------------------------------ DINO's parameters (one source)
FLIP_P = 0.5
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # torchvision RandomResizedCrop's default aspect range
JITTER_P = 0.8
JITTER = dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
GRAYSCALE_P = 0.2
BLUR_P = (1.0, 0.1, 0.5)  # first global crop, second global crop, every local crop
BLUR_RADIUS = (0.1, 2.0)  # PIL GaussianBlur radius (= sigma) at 224 px
SOLARIZE_P = 0.2  # second global crop only
SOLARIZE_THRESHOLD = 128  # grey levels at or above it are inverted
GREY_WEIGHTS = (0.299, 0.587, 0.114)  # PIL's "L" conversion (ITU-R 601-2), used by its enhancers
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")  # index = op id in `order`


def blur_radius_range(global_crops_size: int) -> Tuple[float, float]:
    """DINO's blur radius, scaled with global_crops_size / 224 so small images are blurred as
    much, relative to their size, as ImageNet crops are in DINO."""
    return BLUR_RADIUS[0] * global_crops_size / 224, BLUR_RADIUS[1] * global_crops_size / 224


def jitter_ranges() -> List[Tuple[float, float]]:
    """The factor range of each jitter op, as torchvision's ColorJitter reads JITTER."""
    return [(1 - JITTER[name], 1 + JITTER[name]) for name in JITTER_OPS[:3]] + \
        [(-JITTER["hue"], JITTER["hue"])]


def crop_blur_p(local_crops_number: int) -> List[float]:
    return [BLUR_P[0], BLUR_P[1]] + [BLUR_P[2]] * local_crops_number


def crop_solarize_p(local_crops_number: int) -> List[float]:
    return [0.0, SOLARIZE_P] + [0.0] * local_crops_number


# ============================================================================ PIL pipeline
class RandomGaussianBlur:
    """PIL Gaussian blur with probability p and a random radius (DINO: 0.1..2 px at 224 px)."""

    def __init__(self, p: float, radius_min: float, radius_max: float) -> None:
        self.p, self.radius_min, self.radius_max = p, radius_min, radius_max

    def __call__(self, image: Any) -> Any:
        if random.random() >= self.p:
            return image
        return image.filter(ImageFilter.GaussianBlur(
            radius=random.uniform(self.radius_min, self.radius_max)))


class DataAugmentationDINO:
    """DINO's multi-crop: two global views (blur; blur+solarize) and N blurred local views.

    The blur radius scales with global_crops_size / 224 (blur_radius_range).
    """

    def __init__(self, global_crops_scale: Tuple[float, float], local_crops_scale: Tuple[float, float],
                 local_crops_number: int, global_crops_size: int = 224, local_crops_size: int = 96) -> None:
        flip_and_color_jitter = T.Compose([
            T.RandomHorizontalFlip(p=FLIP_P),
            T.RandomApply([T.ColorJitter(**JITTER)], p=JITTER_P),
            T.RandomGrayscale(p=GRAYSCALE_P),
        ])
        # Grey images stay single-channel until here: the PIL work on one channel takes 20 %
        # less time than on RGB (bench/augmentation_speed.py), with the same crops
        # (saturation and hue leave grey unchanged).
        normalize = T.Compose([T.ToTensor(), datasets.to_three_channels,
                               T.Normalize(utils.IMAGENET_MEAN, utils.IMAGENET_STD)])
        radius = blur_radius_range(global_crops_size)
        blur_p = crop_blur_p(1)
        bicubic = T.InterpolationMode.BICUBIC

        def crop(size: int, scale: Tuple[float, float]) -> Any:
            return T.RandomResizedCrop(size, scale=tuple(scale), ratio=CROP_RATIO, interpolation=bicubic)

        self.global_transfo1 = T.Compose([crop(global_crops_size, global_crops_scale),
                                          flip_and_color_jitter, RandomGaussianBlur(blur_p[0], *radius),
                                          normalize])
        self.global_transfo2 = T.Compose([crop(global_crops_size, global_crops_scale),
                                          flip_and_color_jitter, RandomGaussianBlur(blur_p[1], *radius),
                                          T.RandomSolarize(threshold=SOLARIZE_THRESHOLD, p=SOLARIZE_P),
                                          normalize])
        self.local_transfo = T.Compose([crop(local_crops_size, local_crops_scale),
                                        flip_and_color_jitter, RandomGaussianBlur(blur_p[2], *radius),
                                        normalize])
        self.local_crops_number = local_crops_number

    def __call__(self, image: Any) -> List[torch.Tensor]:
        crops = [self.global_transfo1(image), self.global_transfo2(image)]
        crops += [self.local_transfo(image) for _ in range(self.local_crops_number)]
        return crops


# ======================================================================= CPU (worker) stage
Box = Tuple[int, int, int, int]  # (top, left, height, width) in full-resolution pixels


def draft_scale(boxes: Sequence[Box], sizes: Sequence[int]) -> int:
    """The JPEG DCT scale a (1 or 2) at which decoding at 1/a resolution is safe.

    Crop boxes are sampled in the full-resolution frame. Decoded at 1/a, a box of h x w pixels
    covers h/a x w/a pixels, and is then resized to size x size. Safe means the resize still
    only shrinks (h/a >= size and w/a >= size for every crop): the crop is then made from at
    least as many pixels as it has, like the full-resolution pipeline, and no crop is
    upsampled that would not have been. A crop already upsampled at full resolution forces a=1.
    Larger scales are not used: at 1/4 (reduced 2x2 IDCT) crops near the limit differed from
    full-resolution ones by 2-4 grey levels on average, at 1/8 (DC coefficients only) by 2-3,
    against 0.2-1.2 at 1/2 (measured on scikit-learn's photographs).
    """
    slack = min(min(h, w) / size for (_, _, h, w), size in zip(boxes, sizes))
    return 2 if slack >= 2 else 1


def decode(image: Any, scale: int) -> Tuple[Any, float]:
    """Decode a lazily opened image, a JPEG at 1/scale resolution when scale > 1; returns the
    8-bit image ("RGB", or "L" for in-memory grey images) and the factor from full-resolution
    coordinates to the decoded image's."""
    factor = 1.0
    if scale > 1 and getattr(image, "format", None) == "JPEG":
        full_width = image.size[0]
        drafted = image.draft(None, (image.size[0] // scale, image.size[1] // scale))
        if drafted is not None:  # the returned box is the full image in drafted pixels
            factor = drafted[1][2] / full_width
    image.load()
    # Files are read as RGB, as in the PIL pipeline; the built-in grey data sets stay "L".
    in_memory_grey = image.mode == "L" and getattr(image, "format", None) is None
    if image.mode != "RGB" and not in_memory_grey:
        image = datasets.to_rgb(image)
    return image, factor


def image_tensor(image: Any) -> torch.Tensor:
    """(1, C, H, W) uint8 view of an "RGB" or "L" PIL image (channels-last memory, no copy
    beyond PIL's own export)."""
    with warnings.catch_warnings():  # PIL exports read-only memory; nothing writes into it
        warnings.simplefilter("ignore", UserWarning)
        pixels = torch.from_numpy(np.asarray(image))
    pixels = pixels.unsqueeze(-1) if pixels.ndim == 2 else pixels
    return pixels.permute(2, 0, 1).unsqueeze(0)


class MultiCropGeometry:
    """CPU stage of the two-stage pipeline: every crop of DataAugmentationDINO's geometry
    (RandomResizedCrop with bicubic resampling, horizontal flip with p = 0.5) as a uint8
    tensor, from an image opened lazily (datasets.open_image) so JPEGs can be decoded small.

    Crops are resized by torch's uint8 antialiased bicubic kernel, which computes PIL's
    bicubic resize (see tests/test_augmentations.py) 2-3x faster than PIL does.
    """

    def __init__(self, global_crops_scale: Tuple[float, float], local_crops_scale: Tuple[float, float],
                 local_crops_number: int, global_crops_size: int = 224, local_crops_size: int = 96,
                 draft: bool = True) -> None:
        self.specs = [(global_crops_size, tuple(global_crops_scale))] * 2 + \
            [(local_crops_size, tuple(local_crops_scale))] * local_crops_number
        self.draft = draft

    def sample(self, image_size: Tuple[int, int]) -> Tuple[List[Box], List[bool]]:
        """Crop boxes and flips for an image of (width, height), drawn as torchvision draws them."""
        width, height = image_size
        dummy = torch.empty(1, 1, 1).expand(1, height, width)  # its shape is all get_params reads
        boxes, flips = [], []
        for _, scale in self.specs:
            boxes.append(tuple(T.RandomResizedCrop.get_params(dummy, list(scale), list(CROP_RATIO))))
            flips.append(bool(torch.rand(1) < FLIP_P))
        return boxes, flips

    def __call__(self, image: Any) -> List[torch.Tensor]:
        boxes, flips = self.sample(image.size)
        sizes = [size for size, _ in self.specs]
        image, factor = decode(image, draft_scale(boxes, sizes) if self.draft else 1)
        if factor == 1:
            return crop_and_resize(image_tensor(image), boxes, sizes, flips)
        return crop_and_resize_subpixel(image, boxes, sizes, flips, factor)


def crop_and_resize(pixels: torch.Tensor, boxes: Sequence[Box], sizes: Sequence[int],
                    flips: Sequence[bool]) -> List[torch.Tensor]:
    """torchvision's resized_crop (bicubic, antialiased) + optional flip of each box of a
    (1, C, H, W) uint8 image, by torch's uint8 kernel."""
    crops = []
    for (top, left, height, width), size, flip in zip(boxes, sizes, flips):
        crop = F.interpolate(pixels[:, :, top:top + height, left:left + width], size=(size, size),
                             mode="bicubic", antialias=True, align_corners=False)[0]
        crops.append((crop.flip(-1) if flip else crop).contiguous())
    return crops


def crop_and_resize_subpixel(image: Any, boxes: Sequence[Box], sizes: Sequence[int],
                             flips: Sequence[bool], factor: float) -> List[torch.Tensor]:
    """The same from a drafted JPEG: full-resolution boxes scaled by `factor` fall between
    its pixels, and PIL's resize takes such a box exactly (rounding it to the pixel grid would
    shift a crop by up to half a drafted pixel). The drafted image is small, so PIL is cheap."""
    crops = []
    for (top, left, height, width), size, flip in zip(boxes, sizes, flips):
        box = (left * factor, top * factor, (left + width) * factor, (top + height) * factor)
        crop = image.resize((size, size), Image.Resampling.BICUBIC, box=box)
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else crop
        crops.append(image_tensor(crop)[0].contiguous())
    return crops


# ============================================================================ device stage
# The device stage never waits for the device: no .nonzero(), .item() or boolean indexing, no
# shape that depends on a random draw (tests/test_sync_free.py counts host syncs on the CPU).
# Each op runs on every image, and torch.where (or a factor of 1) keeps its result only for the
# images that drew it; all crops of one size go through together. That is more arithmetic than
# working on index lists (BENCHMARKS.md), but on a GPU each index list makes the host wait for
# the device, and here the kernel shapes stay fixed per crop size: cudnn autotunes the blur's
# convolutions once per crop size, not again for every new count of blurred images.
@dataclass
class PhotometricParams:
    """Per-sample parameters of one crop position's photometric augmentation (tensors of B)."""
    jitter: torch.Tensor  # bool: colour jitter applied
    order: torch.Tensor  # (B, 4) long: a random permutation of JITTER_OPS per sample
    factors: torch.Tensor  # (B, 4) float: brightness, contrast, saturation factors, hue shift
    grey: torch.Tensor  # bool
    blur: torch.Tensor  # bool
    radius: torch.Tensor  # float: blur sigma in pixels
    solarize: torch.Tensor  # bool


def sample_params(batch: int, device: torch.device, blur_p: float, solarize_p: float,
                  radius: Tuple[float, float]) -> PhotometricParams:
    """DINO's per-image draws, for `batch` images at once (torch's generator on `device`)."""
    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return torch.empty(batch, *shape, device=device).uniform_(low, high)

    factors = torch.stack([uniform(low, high) for low, high in jitter_ranges()], dim=1)
    # torchvision applies hue shifts in PIL's 1/255-turn steps, truncated towards zero
    factors[:, 3] = torch.trunc(factors[:, 3] * 255) / 255
    return PhotometricParams(
        jitter=uniform(0, 1) < JITTER_P, order=torch.rand(batch, 4, device=device).argsort(dim=1),
        factors=factors, grey=uniform(0, 1) < GRAYSCALE_P, blur=uniform(0, 1) < blur_p,
        radius=uniform(*radius), solarize=uniform(0, 1) < solarize_p)


@functools.lru_cache(maxsize=None)
def channel_constant(values: Tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(1, C, 1, 1) tensor of per-channel constants, copied to the device once per process
    (a copy from Python data to a GPU waits for the GPU's queue to drain)."""
    return torch.tensor(values, device=device, dtype=dtype).view(1, -1, 1, 1)


def grey_levels(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) luma of (B, 3, H, W) RGB in [0, 1], with PIL's weights."""
    return (x * channel_constant(GREY_WEIGHTS, x.device, x.dtype)).sum(dim=1, keepdim=True)


def mean_grey_level(grey: torch.Tensor) -> torch.Tensor:
    """(B, 1, 1, 1) mean of each image's grey levels, rounded to a level as PIL's Contrast does."""
    return torch.round(grey.mean(dim=(1, 2, 3), keepdim=True) * 255) / 255


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def blend(x: torch.Tensor, anchor: torch.Tensor | float, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance, Image.blend(anchor, x, factor): x * factor + anchor * (1 - factor),
    clipped to [0, 1], one factor per image."""
    factor = _per_sample(factor)
    return (x * factor + anchor * (1 - factor)).clamp(0, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance.Brightness: a blend with black."""
    return blend(x, 0.0, factor)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance.Contrast: a blend with the image's mean grey level, rounded to a level."""
    return blend(x, mean_grey_level(grey_levels(x)), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance.Color: a blend with the grey version of the image."""
    return blend(x, grey_levels(x), factor)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by `shift` turns in HSV space, value and saturation kept.

    With V = max(r, g, b), delta = V - min(r, g, b) = V*S and the hue h in sixths of a turn,
    each channel of the rotated colour is V - delta * clamp(min(k, 4 - k), 0, 1) with
    k = (n + h') mod 6, n = 5, 3, 1 for r, g, b (the standard HSV-to-RGB formula). torchvision's
    tensor rgb<->hsv functions compute the same with ~10x more work on CPU.
    """
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    value, lowest = x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True)
    delta = value - lowest
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(value == r, (g - b) / safe,
                      torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = hue + 6 * _per_sample(shift)
    k = torch.remainder(hue + channel_constant((5.0, 3.0, 1.0), x.device, x.dtype), 6)
    return value - delta * torch.minimum(k, 4 - k).clamp(0, 1)


ADJUST = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)  # JITTER_OPS order
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


def blend_pass(x: torch.Tensor, op: torch.Tensor, factors: torch.Tensor,
               selected: torch.Tensor) -> torch.Tensor:
    """One of brightness, contrast or saturation per image (op: (B,) in 0..2), applied to the
    selected images. The three are blends (`blend`) with black, the mean grey level and the grey
    image, so one blend does each image's own op: anchor * (1 - factor) is the grey image times
    (1 - factor) or 0, plus the mean times (1 - factor) or 0. The others get factor 1: x exactly.
    Each image's result is bit for bit its own op's (adjust_*)."""
    grey = grey_levels(x)
    factor = torch.where(selected, factors.gather(1, op.unsqueeze(1)).squeeze(1), 1.0)
    rest = 1 - factor
    anchored = torch.addcmul(mean_grey_level(grey) * _per_sample(rest * (op == CONTRAST)),
                             grey, _per_sample(rest * (op == SATURATION)))  # one term is exactly 0
    return (x * _per_sample(factor)).add_(anchored).clamp_(0, 1)


def color_jitter(x: torch.Tensor, params: PhotometricParams) -> torch.Tensor:
    """Each selected image gets the four adjustments in its own random order.

    Per image, the hue rotation splits its three blends into those before it and those after.
    Blend j of an image is the j-th op of its order that is not the hue; three whole-batch
    passes apply blend j to the images whose hue comes later, one hue rotation follows for every
    image, and three more apply blend j where the hue came first: 6 blends and 1 hue per batch
    instead of 4 of each (or of an index list per op and position, which needs host syncs).
    """
    hue_at = (params.order == HUE).int().argmax(dim=1)  # the hue's place in each image's order
    blend_ops = [torch.where(j < hue_at, params.order[:, j], params.order[:, j + 1]) for j in range(3)]
    for j, op in enumerate(blend_ops):
        x = blend_pass(x, op, params.factors, params.jitter & (j < hue_at))
    x = torch.where(_per_sample(params.jitter), adjust_hue(x, params.factors[:, HUE]), x)
    for j, op in enumerate(blend_ops):
        x = blend_pass(x, op, params.factors, params.jitter & (j >= hue_at))
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image, edges replicated (as PIL's blur).
    The kernel reaches 3 sigma of the largest radius the range allows, so its size, like the
    batch's, is fixed for a crop size."""
    batch, channels, height, width = x.shape
    half = max(1, int(np.ceil(3 * max_sigma)))
    taps = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps.view(1, -1) / sigma.view(-1, 1)) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (B, taps): one kernel per image ...
    kernel = kernel.unsqueeze(1).expand(-1, channels, -1).reshape(batch * channels, -1)  # ... per channel
    flat = x.reshape(1, batch * channels, height, width)
    flat = F.pad(flat, (half, half, half, half), mode="replicate")
    flat = F.conv2d(flat, kernel.view(-1, 1, 1, 2 * half + 1), groups=batch * channels)
    flat = F.conv2d(flat, kernel.view(-1, 1, 2 * half + 1, 1), groups=batch * channels)
    return flat.view(batch, channels, height, width)


def photometric(x: torch.Tensor, params: PhotometricParams, max_sigma: float) -> torch.Tensor:
    """DINO's photometric chain on (B, 3, H, W) RGB in [0, 1]: jitter, grayscale, blur,
    solarisation, in DINO's order; returns [0, 1] (normalisation is separate)."""
    x = color_jitter(x, params)
    x = torch.where(_per_sample(params.grey), grey_levels(x).expand_as(x), x)
    x = torch.where(_per_sample(params.blur), gaussian_blur(x, params.radius, max_sigma), x)
    threshold = SOLARIZE_THRESHOLD / 255
    solarized = torch.where(x >= threshold, 1 - x, x)
    return torch.where(_per_sample(params.solarize), solarized, x)


class PhotometricAugmentation:
    """Device stage: the list of uint8 crop batches [(B, C, S, S)] from MultiCropGeometry
    becomes DINO's normalised float crops, each image with its own random parameters.

    The parameters are drawn crop position by crop position (blur and solarisation rates differ
    between them); the ops then run once on all crops of a size together (the two global crop
    positions, the local ones): every op works on each image alone, so the result is the same,
    with a fraction of the kernel launches."""

    def __init__(self, local_crops_number: int, global_crops_size: int) -> None:
        self.blur_p = crop_blur_p(local_crops_number)
        self.solarize_p = crop_solarize_p(local_crops_number)
        self.radius = blur_radius_range(global_crops_size)

    def __call__(self, crops: List[torch.Tensor]) -> List[torch.Tensor]:
        # exact fp32 convolutions (the blur) whatever TF32 setting training runs with
        with devices.tf32_allowed(False):
            return self.augment_all(crops)

    def augment_all(self, crops: List[torch.Tensor]) -> List[torch.Tensor]:
        params = [sample_params(batch.shape[0], batch.device, self.blur_p[position],
                                self.solarize_p[position], self.radius)
                  for position, batch in enumerate(crops)]
        out: List[torch.Tensor] = list(crops)
        for positions in positions_by_shape(crops):
            together = self.augment(torch.cat([crops[p] for p in positions]),
                                    concatenate_params([params[p] for p in positions]))
            for position, part in zip(positions, together.split([crops[p].shape[0] for p in positions])):
                out[position] = part
        return out

    def augment(self, batch: torch.Tensor, params: PhotometricParams) -> torch.Tensor:
        x = batch.float().div_(255)
        if x.shape[1] == 1:  # grey data sets: saturation and hue leave grey unchanged
            x = x.expand(-1, 3, -1, -1)
        x = photometric(x, params, self.radius[1])
        mean = channel_constant(tuple(utils.IMAGENET_MEAN), x.device, x.dtype)
        std = channel_constant(tuple(utils.IMAGENET_STD), x.device, x.dtype)
        return (x - mean) / std


def positions_by_shape(crops: Sequence[torch.Tensor]) -> List[List[int]]:
    """Crop positions grouped by their (C, H, W), in order of first appearance."""
    groups: Dict[Tuple[int, ...], List[int]] = {}
    for position, batch in enumerate(crops):
        groups.setdefault(tuple(batch.shape[1:]), []).append(position)
    return list(groups.values())


def concatenate_params(params: Sequence[PhotometricParams]) -> PhotometricParams:
    return PhotometricParams(**{name: torch.cat([getattr(p, name) for p in params])
                                for name in vars(params[0])})


def default_on_device(device: torch.device) -> bool:
    """--augment_on_device's default: on for CUDA; on CPU, whichever measured faster
    end-to-end (BENCHMARKS.md, bench/augmentation_speed.py)."""
    return device.type == "cuda" or CPU_DEFAULT_ON_DEVICE


CPU_DEFAULT_ON_DEVICE = False  # set from the end-to-end measurement, see default_on_device
