"""Vision Transformer with a CLS, SPARO or control read-out, and the DINO projection head.

Built from timm's blocks (fused scaled-dot-product attention, stochastic depth) with the
parameter names of DINO's vision_transformer.py, so an official
DINO backbone state dict loads strictly into `readout="cls"`.

    readout="cls":    patches -> blocks[0..depth-1] -> norm -> token 0
    readout="sparo":  patches -> blocks[0..depth-2] -> norm -> SPARO(all tokens)   (default)
                      (with sparo_keep_all_blocks, every block stays before the read-out)
    readout="gap":    patches -> blocks[0..depth-1] -> norm -> mean of tokens 1..N (patches)
    readout="cls_proj": patches -> blocks[0..depth-1] -> norm -> token 0 -> Linear(D, L*V) -> L2 norm

gap and cls_proj are controls for SPARO (issue 19): gap pools every patch token without
learned queries (does pooling many tokens explain SPARO's lead?); cls_proj has SPARO's width
L*V and a unit norm without per-slot attention (does the wider vector explain it?).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, get_args

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.vision_transformer import Attention, Block

from sparo_head import SLOT_NORMS, SlotNorm, SparoReadout

Readout = Literal["sparo", "cls", "gap", "cls_proj"]


@dataclass(frozen=True)
class ReadoutKind:
    """What the code outside the model needs to know of a read-out."""

    wide: bool  # the encoding is L*V wide (sparo_slots x sparo_dim), else the token width D
    # the encoding is L2-normalised (per slot for SPARO, whole for cls_proj): linear probes
    # rescale it to unit-scale coordinates (eval_linear.py --scale_sparo_features)
    unit_norm: bool
    prefix: Optional[str]  # state-dict prefix of its learned module (warm starts leave it fresh)
    label: str  # how hub entries and titles describe it


# The registry: a new read-out is an entry here and in `Readout`, its weights' signature in
# BackboneConfig.from_state_dict, and its module and branch of VisionTransformer.read_out.
READOUT_KINDS: Dict[str, ReadoutKind] = {
    "sparo": ReadoutKind(wide=True, unit_norm=True, prefix="sparo.", label="SPARO read-out"),
    "cls": ReadoutKind(wide=False, unit_norm=False, prefix=None, label="CLS read-out (DINO)"),
    "gap": ReadoutKind(wide=False, unit_norm=False, prefix=None,
                       label="gap read-out (mean patch token; a control for SPARO)"),
    "cls_proj": ReadoutKind(wide=True, unit_norm=True, prefix="cls_proj.",
                            label="cls_proj read-out (CLS -> Linear(D, L*V) -> L2 norm; a control for SPARO)"),
}
READOUTS: Tuple[str, ...] = get_args(Readout)
assert READOUTS == tuple(READOUT_KINDS), "Readout and READOUT_KINDS name the same read-outs"
WIDE_READOUTS: Tuple[str, ...] = tuple(name for name, kind in READOUT_KINDS.items() if kind.wide)
UNIT_NORM_READOUTS: Tuple[str, ...] = tuple(name for name, kind in READOUT_KINDS.items() if kind.unit_norm)
READOUT_MODULES: Tuple[str, ...] = tuple(kind.prefix for kind in READOUT_KINDS.values() if kind.prefix)

# DINO's architectures: (embed_dim, depth, num_heads); all use mlp_ratio 4 and qkv bias.
# vit_nano is not DINO's: a CPU-sized ViT (half the width and depth of vit_tiny, and under half
# its step time: BENCHMARKS.md) for the learning-speed study in RESULTS.md and quick experiments.
ARCHS: Dict[str, tuple] = {
    "vit_nano": (96, 6, 3),
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
}


def _option(default: Any, help: str, choices: Optional[Tuple[str, ...]] = None) -> Any:
    """A configuration field that training sets with the flag --<field name>."""
    return field(default=default, metadata=dict(help=help, choices=choices))


@dataclass(frozen=True)
class BackboneConfig:
    """Everything needed to rebuild a backbone, checked once here. Training flags, checkpoints
    (as the plain dict `model_config`), weight files without one, hub and timm entries all
    reach the model through it. A new read-out: see READOUT_KINDS."""

    arch: str = _option("vit_small", "Backbone size, as in DINO: vit_tiny (5M), vit_small (21M), "
                                     "vit_base (85M).", choices=tuple(sorted(ARCHS)))
    patch_size: int = _option(16, "Side of the square patches in pixels. Smaller patches mean more "
                                  "tokens: better features, quadratically more attention cost.")
    img_size: int = 224  # the training resolution (--global_crops_size): sizes the position table
    readout: Readout = _option("sparo", "sparo: L slots of single-head attention with learned queries "
                                        "(this project); cls: DINO's CLS token (the baseline). "
                                        "Controls for SPARO (issue 19), all blocks kept: gap, the mean "
                                        "of the patch tokens (does pooling many tokens explain "
                                        "SPARO's lead?); cls_proj, the CLS token through one "
                                        "Linear(D, L*V) and L2-normalised (does SPARO's wider "
                                        "vector explain it?).",
                               choices=READOUTS)
    sparo_slots: int = _option(64, "L, the number of SPARO slots (cls_proj: its width is L*V).")
    sparo_dim: int = _option(64, "V, the output width of each slot; the encoding has L*V dimensions "
                                 "(also cls_proj's).")
    sparo_attn_dim: Optional[int] = _option(None, "a, the width of each slot's query and keys "
                                                  "(default: embed_dim / num_heads).")
    sparo_share_kv: bool = _option(True, "Use each slot's keys as its values (SPARO's default).")
    sparo_norm: SlotNorm = _option("slot", "slot: each slot L2-normalised and scaled by 1/sqrt(L) "
                                           "(SPARO); global: one L2 normalisation of the whole "
                                           "vector (ablation).", choices=SLOT_NORMS)
    sparo_keep_all_blocks: bool = _option(False, "Keep the last transformer block before SPARO. By "
                                                 "default SPARO replaces it, keeping the parameter "
                                                 "count at the CLS baseline's.")

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; choose from {sorted(ARCHS)}")
        if self.readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {self.readout!r}")
        if self.sparo_norm not in SLOT_NORMS:
            raise ValueError(f"sparo_norm must be one of {SLOT_NORMS}, got {self.sparo_norm!r}")
        for name in ("patch_size", "img_size", "sparo_slots", "sparo_dim", "sparo_attn_dim"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    # ------------------------------------------------------------ derived sizes
    @property
    def num_blocks(self) -> int:
        """Blocks before the read-out: SPARO takes the last one's place unless told to keep
        it (SPARO.md, "Cost")."""
        depth = ARCHS[self.arch][1]
        return depth - 1 if self.readout == "sparo" and not self.sparo_keep_all_blocks else depth

    @property
    def attn_dim(self) -> int:
        """SPARO's a: as given, else the width of one attention head."""
        embed_dim, _, num_heads = ARCHS[self.arch]
        return self.sparo_attn_dim or embed_dim // num_heads

    @property
    def num_features(self) -> int:
        """Width of the backbone encoding: L*V for SPARO and cls_proj, the token width D for
        CLS and gap."""
        return self.sparo_slots * self.sparo_dim if self.readout in WIDE_READOUTS else ARCHS[self.arch][0]

    # ------------------------------------------------------------ conversions
    def to_dict(self) -> Dict[str, Any]:
        """The plain dict stored as `model_config` (checkpoints load with weights_only)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, config: Dict[str, Any]) -> "BackboneConfig":
        """A stored `model_config`; fields it lacks (older checkpoints) take their defaults. An
        unknown key or a value of the wrong type is a ValueError (files are hand-edited too)."""
        fields = {f.name: f.default for f in dataclasses.fields(cls)}
        unknown = sorted(str(key) for key in config if key not in fields)
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(unknown)[:200]}")
        for name, value in config.items():
            default = fields[name]
            kind = bool if isinstance(default, bool) else str if isinstance(default, str) else int
            fits = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
            if not (fits or (default is None and value is None)):
                wanted = {bool: "true or false", str: "a string", int: "an integer"}[kind]
                raise ValueError(f"{name} must be {wanted}, got {type(value).__name__} {str(value)[:40]!r}")
        return cls(**config)

    @classmethod
    def take_fields(cls, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        """Remove the configuration's fields from kwargs (the rest are model options) and
        return them."""
        return {f.name: kwargs.pop(f.name) for f in dataclasses.fields(cls) if f.name in kwargs}

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "BackboneConfig":
        """The training flags' configuration (the image size is --global_crops_size)."""
        flagged = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.metadata}
        return cls(img_size=args.global_crops_size, **flagged)

    @classmethod
    def from_state_dict(cls, state: Dict[str, torch.Tensor]) -> "BackboneConfig":
        """The configuration a backbone state dict's shapes imply (official DINO files carry
        none). SPARO's norm leaves no trace in the shapes: the default is assumed. gap has no
        weights of its own, so a bare gap weight file reads as cls (checkpoints and export.py's
        files carry model_config and load as gap); cls_proj's weights give only the product
        L*V, read as L = 64 slots of V when 64 divides it (any split builds the same model).
        Weights that are no ViT backbone are a ValueError."""
        if "patch_embed.proj.weight" not in state or "pos_embed" not in state:
            raise ValueError("the weights are not a ViT backbone (no patch_embed.proj.weight/pos_embed)")
        embed_dim, _, patch_size, _ = state["patch_embed.proj.weight"].shape
        arch = next((name for name, (width, _, _) in ARCHS.items() if width == embed_dim), None)
        if arch is None:
            raise ValueError(f"no known architecture has width {embed_dim} ({sorted(ARCHS)})")
        grid = math.isqrt(state["pos_embed"].shape[1] - 1)
        shape = dict(arch=arch, patch_size=int(patch_size), img_size=int(grid * patch_size))
        if "cls_proj.weight" in state:
            return cls(**shape, readout="cls_proj", **_split_width(state["cls_proj.weight"].shape[0]))
        if "sparo.queries" not in state:
            return cls(**shape, readout="cls")
        slots, attn_dim = state["sparo.queries"].shape
        num_blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        return cls(**shape, readout="sparo", sparo_slots=int(slots), sparo_attn_dim=int(attn_dim),
                   sparo_dim=int(state["sparo.out_proj.weight"].shape[0]),
                   sparo_share_kv="sparo.value.weight" not in state,
                   sparo_keep_all_blocks=num_blocks == ARCHS[arch][1])

    def disagreement(self, asked: Dict[str, Any]) -> Optional[str]:
        """"holds a model with k=v, but k=w was asked for" for the first value asked for that
        differs from this configuration (None asks for nothing); None when all agree."""
        for key, value in asked.items():
            if value is not None and getattr(self, key) != value:
                return f"holds a model with {key}={getattr(self, key)!r}, but {key}={value!r} was asked for"
        return None

    def build(self, **overrides: Any) -> "VisionTransformer":
        """The backbone (overrides: drop_path_rate, in_chans, ...)."""
        return VisionTransformer(self, **overrides)


def _split_width(width: int) -> Dict[str, int]:
    """sparo_slots and sparo_dim whose product is a cls_proj width (L = 64 when it divides)."""
    slots = BackboneConfig.sparo_slots if width % BackboneConfig.sparo_slots == 0 else 1
    return dict(sparo_slots=slots, sparo_dim=width // slots)


class VisionTransformer(nn.Module):
    """DINO's ViT with a choice of read-out. `forward` returns the backbone encoding."""

    def __init__(self, config: BackboneConfig, in_chans: int = 3, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.config = config
        embed_dim, depth, num_heads = ARCHS[config.arch]
        self.readout, self.patch_size, self.embed_dim = config.readout, config.patch_size, embed_dim
        self.num_features = config.num_features
        self.num_heads = num_heads

        # strict_img_size=False: any input size whose sides are multiples of the patch size.
        self.patch_embed = PatchEmbed(img_size=config.img_size, patch_size=config.patch_size,
                                      in_chans=in_chans, embed_dim=embed_dim, flatten=False,
                                      strict_img_size=False)
        self.pos_grid = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + math.prod(self.pos_grid), embed_dim))
        self.pos_drop = nn.Dropout(p=drop_rate)

        drop_path = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # DINO's rule over depth
        self.blocks = nn.ModuleList([
            Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                  proj_drop=drop_rate, attn_drop=attn_drop_rate, drop_path=drop_path[i],
                  norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for i in range(config.num_blocks)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Identity()  # DINO's backbones carry an empty head; the projection is apart

        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_dino_weights)
        self.sparo: Optional[SparoReadout] = None
        if config.readout == "sparo":  # built after DINO's init so that it keeps SPARO's own
            self.sparo = SparoReadout(embed_dim, config.sparo_slots, config.sparo_dim,
                                      config.attn_dim, config.sparo_share_kv, config.sparo_norm)
        self.cls_proj: Optional[nn.Linear] = None
        if config.readout == "cls_proj":  # a Linear like DINO's others: trunc-normal(.02), zero bias
            self.cls_proj = nn.Linear(embed_dim, config.num_features)
            _init_dino_weights(self.cls_proj)

    # ------------------------------------------------------------------------------ tokens
    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> CLS + patch tokens with resampled position embeddings."""
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch size "
                             f"{self.patch_size}")
        patches = self.patch_embed(x)                                # (B, D, h, w)
        grid = list(patches.shape[-2:])
        patches = patches.flatten(2).transpose(1, 2)
        pos_embed = interpolate_pos_embed(self.pos_embed, tuple(self.pos_grid), tuple(grid))
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), patches], dim=1)
        return self.pos_drop(tokens + pos_embed.to(tokens.dtype))

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """All output tokens after the final LayerNorm, (B, 1 + h*w, D)."""
        x = self.prepare_tokens(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    # ---------------------------------------------------------------------------- read-out
    def forward(self, x: torch.Tensor, slot_attention: bool = False) -> Any:
        """The backbone encoding: (B, L*V) unit-norm SPARO or cls_proj vector, or the (B, D)
        CLS token or mean patch token (gap). slot_attention=True (SPARO): (encoding, the
        read-out's attention weights (B, L, N) in this pass)."""
        if slot_attention:
            return self.sparo(self.forward_tokens(x), return_attention=True)
        return self.read_out(self.forward_tokens(x))

    def read_out(self, tokens: torch.Tensor) -> torch.Tensor:
        """The encoding of the output tokens (B, 1 + h*w, D)."""
        if self.sparo is not None:
            return self.sparo(tokens)
        if self.cls_proj is not None:
            return F.normalize(self.cls_proj(tokens[:, 0]), dim=-1)
        return tokens[:, 1:].mean(dim=1) if self.readout == "gap" else tokens[:, 0]

    def get_slot_attention(self, x: torch.Tensor) -> torch.Tensor:
        """SPARO attention weights (B, L, N) over the tokens, N = 1 + h*w (token 0 is CLS)."""
        if self.sparo is None:
            raise ValueError("get_slot_attention needs readout='sparo'")
        return self(x, slot_attention=True)[1]

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Self-attention of the last transformer block, (B, heads, N, N), as in DINO."""
        x = self.prepare_tokens(x)
        for block in self.blocks[:-1]:
            x = block(x)
        return attention_weights(self.blocks[-1], x)

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> List[torch.Tensor]:
        """Normalised outputs of the last n blocks (DINO's linear-probe features)."""
        x = self.prepare_tokens(x)
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if len(self.blocks) - i <= n:
                outputs.append(self.norm(x))
        return outputs


def interpolate_pos_embed(pos_embed: torch.Tensor, old_grid: Tuple[int, int],
                          new_grid: Tuple[int, int]) -> torch.Tensor:
    """Position embeddings (1, 1 + h*w, D) of an old_grid = (h, w) resampled to new_grid, the
    way DINO's interpolate_pos_encoding does it, so that DINO weights give DINO's features.

    DINO resamples by plain bicubic interpolation (no antialiasing) and asks for scale factors
    (n + 0.1) / h rather than for the size n: the 0.1 keeps floor(h * factor) at n despite
    rounding, and since PyTorch samples at (i + 0.5) / factor - 0.5 when given a factor, the
    offset also moves the sampling positions slightly. Both are part of DINO's embeddings.
    """
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed
    (old_h, old_w), (new_h, new_w) = old_grid, new_grid
    dim = pos_embed.shape[-1]
    patch_grid = pos_embed[:, 1:].reshape(1, old_h, old_w, dim).permute(0, 3, 1, 2)
    resampled = F.interpolate(patch_grid, scale_factor=((new_h + 0.1) / old_h, (new_w + 0.1) / old_w),
                              mode="bicubic", align_corners=False)
    if resampled.shape[-2:] != (new_h, new_w):  # DINO asserts the same
        raise RuntimeError(f"resampled a {old_grid} grid to {tuple(resampled.shape[-2:])}, not {new_grid}")
    return torch.cat([pos_embed[:, :1], resampled.flatten(2).transpose(1, 2)], dim=1)


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: Sequence[int]) -> torch.Tensor:
    """Square-grid position embeddings (1, 1 + n*n, D) of a weight file resampled to new_grid by
    the rule the model uses at run time (interpolate_pos_embed)."""
    side = int(round((pos_embed.shape[1] - 1) ** 0.5))
    return interpolate_pos_embed(pos_embed, (side, side), tuple(new_grid))


def set_fused_attention(model: nn.Module, enabled: bool) -> None:
    """Switch every timm attention layer in model between torch's fused scaled-dot-product
    kernel (enabled) and the explicit softmax(q k^T) v (same result, other kernels)."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.fused_attn = enabled


def attention_weights(block: Block, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) of a timm Block's attention for input tokens x."""
    attn = block.attn
    batch, tokens, _ = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def _init_dino_weights(module: nn.Module) -> None:
    """DINO's initialisation: truncated-normal Linear weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _arch_factory(arch: str):
    def build(patch_size: int = 16, **kwargs: Any) -> VisionTransformer:
        config = BackboneConfig(arch=arch, patch_size=patch_size, **BackboneConfig.take_fields(kwargs))
        return config.build(**kwargs)
    build.__name__ = arch
    build.__doc__ = (f"DINO's {arch}: width {ARCHS[arch][0]}, {ARCHS[arch][2]} heads. Keyword "
                     f"arguments: BackboneConfig fields (readout, img_size, ...) and model options.")
    return build


vit_nano = _arch_factory("vit_nano")
vit_tiny = _arch_factory("vit_tiny")
vit_small = _arch_factory("vit_small")
vit_base = _arch_factory("vit_base")


def parameter_table(patch_size: int = 16, img_size: int = 224) -> str:
    """Backbone parameter counts per architecture: CLS (DINO) against SPARO with its default
    sizes (L = V = 64, a = d / heads), replacing the last block (default) or keeping it."""
    rows = [f"{'arch':<10} {'CLS':>12} {'SPARO':>12} {'vs CLS':>8} {'SPARO+block':>12} {'vs CLS':>8} "
            f"{'SPARO read-out':>15} {'one block':>10}"]
    for arch in ARCHS:
        def count(**options: Any) -> int:
            model = BackboneConfig(arch, patch_size, img_size, **options).build()
            return sum(p.numel() for p in model.parameters())
        cls, sparo = count(readout="cls"), count(readout="sparo")
        keep_all = count(readout="sparo", sparo_keep_all_blocks=True)
        block, readout = keep_all - sparo, keep_all - cls  # the last block; SPARO itself
        rows.append(f"{arch:<10} {cls:>12,} {sparo:>12,} {100 * (sparo / cls - 1):>+7.1f}% {keep_all:>12,} "
                    f"{100 * (keep_all / cls - 1):>+7.1f}% {readout:>15,} {block:>10,}")
    return "\n".join(rows)


# ------------------------------------------------------------------------------- DINO head
class WeightNormLinear(nn.Module):
    """Bias-free Linear with weight = g * v / ||v|| per output, named like DINO's weight_norm.

    Keeps the `weight_g`/`weight_v` names of DINO checkpoints without the deprecated
    torch.nn.utils.weight_norm hook.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))
        # DINO's prototypes start from nn.Linear's default initialisation (uniform within
        # +-1/sqrt(in_dim)), not the trunc-normal(0.02) of its other layers: the scale of v sets
        # how fast AdamW turns the prototype directions.
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.weight_v
        weight = v * (self.weight_g / torch.linalg.vector_norm(v, dim=1, keepdim=True))
        return F.linear(x, weight.to(x.dtype))


DINO_HEAD_HIDDEN_DIM = 2048  # DINO's head MLP width
DINO_HEAD_BOTTLENECK_DIM = 256  # DINO's L2-normalised bottleneck before the prototypes


class DINOHead(nn.Module):
    """DINO's projection head: MLP -> bottleneck -> L2 normalise -> weight-normed prototypes."""

    def __init__(self, in_dim: int, out_dim: int, use_bn: bool = False,
                 norm_last_layer: bool = True, nlayers: int = 3, hidden_dim: int = DINO_HEAD_HIDDEN_DIM,
                 bottleneck_dim: int = DINO_HEAD_BOTTLENECK_DIM) -> None:
        super().__init__()
        nlayers = max(nlayers, 1)
        widths = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: List[nn.Module] = []
        for i, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(width_in, width_out))
            if i < nlayers - 1:
                layers += [nn.BatchNorm1d(width_out)] if use_bn else []
                layers.append(nn.GELU())
        self.mlp = layers[0] if nlayers == 1 else nn.Sequential(*layers)
        self.apply(_init_dino_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        self.last_layer.weight_g.requires_grad = not norm_last_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x).float(), dim=-1, p=2)
        # The prototype layer runs in fp32 even under autocast: its outputs are cosines in
        # [-1, 1] that the loss divides by temperatures of 0.04-0.1; rounded to bf16 they
        # carry a visible error into the teacher's probabilities (BENCHMARKS.md).
        with torch.autocast(x.device.type, enabled=False):
            return self.last_layer(x)


class MultiCropWrapper(nn.Module):
    """Runs the backbone once per crop resolution and the head once on all crops (DINO)."""

    def __init__(self, backbone: VisionTransformer, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops: List[torch.Tensor] | torch.Tensor, slot_attention: bool = False) -> Any:
        """The head's output on every crop. slot_attention=True (SPARO, crops of one resolution,
        as the teacher's): (output, the read-out's attention weights (B, L, N) in this pass)."""
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        if slot_attention:
            encoding, attention = self.backbone(torch.cat(crops), slot_attention=True)
            return self.head(encoding), attention
        encodings, start = [], 0
        for end in _resolution_boundaries(crops):
            encodings.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        return self.head(torch.cat(encodings))


def _resolution_boundaries(crops: List[torch.Tensor]) -> List[int]:
    """End indices of the runs of consecutive crops that share a resolution."""
    ends = [i for i in range(1, len(crops)) if crops[i].shape[-2:] != crops[i - 1].shape[-2:]]
    return ends + [len(crops)]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Parameter counts of the backbones.")
    parser.add_argument("--param_table", action="store_true", help="Print the table (the default action).")
    parser.add_argument("--patch_size", type=int, default=16)
    parser.add_argument("--img_size", type=int, default=224)
    options = parser.parse_args()
    print(f"Backbone parameters, patch {options.patch_size}, {options.img_size} px "
          f"(the position table grows with (img_size / patch)^2):", flush=True)
    print(parameter_table(options.patch_size, options.img_size))
