"""Drawing of attention maps shared by visualize_slots.py and slot_gallery.py: heat maps over
images (viridis), outlines, titled panels and grids under a header with the colour bar, and
the entropy of an attention map over the patches."""
from __future__ import annotations

import functools
import math
from typing import Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# Layout of the grids, in pixels (tests check image sizes against these).
PAD = 6                # gap between panels and around the grid
FONT_SIZE = 13
LINE_HEIGHT = 16
TITLE_HEIGHT = 2 * LINE_HEIGHT + 4   # two title lines above each panel
COLORBAR_HEIGHT = 10
HEAT_ALPHA = 0.7       # opacity of the heat map over the grey image
CONTOUR_COLOR = (255, 48, 48)
BACKGROUND = (255, 255, 255)
TEXT_COLOR = (20, 20, 20)

# Viridis sampled at 10 evenly spaced points (matplotlib's published values): perceptually
# uniform, readable in grey and by colour-blind readers. Interpolated linearly in between.
VIRIDIS = np.array([
    (0x44, 0x01, 0x54), (0x48, 0x28, 0x78), (0x3E, 0x49, 0x89), (0x31, 0x68, 0x8E),
    (0x26, 0x82, 0x8E), (0x1F, 0x9E, 0x89), (0x35, 0xB7, 0x79), (0x6E, 0xCE, 0x58),
    (0xB5, 0xDE, 0x2B), (0xFD, 0xE7, 0x25)], dtype=np.float64)


def patch_entropy(patch_weights):
    """Entropy in nats of each row (last axis) renormalised to sum to 1; log(P) for a uniform
    row of P patches, 0 for a one-hot row. A numpy array or a torch tensor, same type out."""
    weights = torch.as_tensor(patch_weights)
    p = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    entropy = -torch.special.xlogy(p, p).sum(dim=-1)
    return entropy.numpy() if isinstance(patch_weights, np.ndarray) else entropy


def display_size(size: Tuple[int, int], shorter_side: int) -> Tuple[int, int]:
    """(height, width) of a panel: the input size scaled so its shorter side is shorter_side."""
    scale = shorter_side / min(size)
    return int(round(size[0] * scale)), int(round(size[1] * scale))


def colormap(values: np.ndarray) -> np.ndarray:
    """Viridis colours (..., 3) uint8 for values in [0, 1]."""
    position = np.clip(values, 0.0, 1.0) * (len(VIRIDIS) - 1)
    low = np.minimum(np.floor(position).astype(int), len(VIRIDIS) - 2)
    frac = (position - low)[..., None]
    return np.round(VIRIDIS[low] * (1 - frac) + VIRIDIS[low + 1] * frac).astype(np.uint8)


def upsample_nearest(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Each output pixel takes the value of the patch its centre falls in."""
    rows = np.minimum(((np.arange(height) + 0.5) * grid.shape[0] / height).astype(int), grid.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * grid.shape[1] / width).astype(int), grid.shape[1] - 1)
    return grid[rows][:, cols]


def heat_overlay(image: np.ndarray, weights: np.ndarray, alpha: float = HEAT_ALPHA) -> np.ndarray:
    """The patch weights (h, w), scaled to their peak and upsampled, as a colour heat map of
    opacity alpha over a grey version of the image (H, W, 3) uint8."""
    heat = upsample_nearest(weights / max(float(weights.max()), 1e-30), *image.shape[:2])
    grey = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    blended = (1 - alpha) * grey[..., None] + alpha * colormap(heat)
    return np.round(blended).astype(np.uint8)


def mask_contour(mask: np.ndarray, thickness: int = 2) -> np.ndarray:
    """Pixels of a boolean mask (H, W) within `thickness` pixels of its border."""
    inner = mask.copy()
    for _ in range(thickness):
        padded = np.pad(inner, 1, constant_values=False)
        inner = inner & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


@functools.lru_cache(maxsize=None)
def font(size: int = FONT_SIZE):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def titled(panel: np.ndarray, lines: Sequence[str]):
    """A panel (H, W, 3) uint8 under title lines (two lines: TITLE_HEIGHT), as a PIL image
    at least as wide as its titles."""
    height, width = panel.shape[:2]
    title_height = len(lines) * LINE_HEIGHT + 4
    text_width = max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(t, font=font()))
                     for t in lines) + 4
    canvas = Image.new("RGB", (max(width, text_width), title_height + height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for row, text in enumerate(lines):
        draw.text((2, 2 + row * LINE_HEIGHT), text, fill=TEXT_COLOR, font=font())
    canvas.paste(Image.fromarray(panel), (0, title_height))
    return canvas


def colorbar(width: int) -> np.ndarray:
    return np.repeat(colormap(np.linspace(0, 1, width))[None], COLORBAR_HEIGHT, axis=0)


def compose_grid(panels: Sequence, header: Sequence[str], columns: int):
    """Panels (PIL images) in rows of `columns`, in cells the size of the largest panel, under
    header lines and the colour bar of the heat maps (each map scaled to its own peak)."""
    columns = max(1, min(columns, len(panels)))
    rows = math.ceil(len(panels) / columns)
    cell_w, cell_h = max(p.width for p in panels), max(p.height for p in panels)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    low, high, bar_w = "low ", " high (each map scaled to its own peak)", 160
    bar_line = [int(measure.textlength(t, font=font())) for t in (low, high)]
    text_width = max([int(measure.textlength(t, font=font())) for t in header] +
                     [sum(bar_line) + bar_w])
    width = max(PAD + columns * (cell_w + PAD), 2 * PAD + text_width)
    header_h = header_height(len(header))
    canvas = Image.new("RGB", (width, header_h + rows * (cell_h + PAD) + PAD), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for row, text in enumerate(header):
        draw.text((PAD, PAD + row * LINE_HEIGHT), text, fill=TEXT_COLOR, font=font())
    bar_y = PAD + len(header) * LINE_HEIGHT + 2
    draw.text((PAD, bar_y - 3), low, fill=TEXT_COLOR, font=font())
    canvas.paste(Image.fromarray(colorbar(bar_w)), (PAD + bar_line[0], bar_y))
    draw.text((PAD + bar_line[0] + bar_w, bar_y - 3), high, fill=TEXT_COLOR, font=font())
    for index, panel in enumerate(panels):
        row, column = divmod(index, columns)
        canvas.paste(panel, (PAD + column * (cell_w + PAD), header_h + row * (cell_h + PAD)))
    return canvas


def header_height(lines: int) -> int:
    return PAD + lines * LINE_HEIGHT + COLORBAR_HEIGHT + 2 * PAD


def describe_model(config: dict) -> str:
    readout = {"sparo": f"SPARO L={config['sparo_slots']} V={config['sparo_dim']}",
               "cls_proj": f"cls_proj read-out (width {config['sparo_slots'] * config['sparo_dim']})",
               "gap": "gap read-out (mean patch token)"}.get(config["readout"], "CLS read-out")
    return f"{config['arch']}/{config['patch_size']} {readout}"
