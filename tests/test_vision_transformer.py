"""ViT backbone: shapes, DINO-compatible parameter names, read-outs, head and multi-crop."""
import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import utils
import vision_transformer as vits


def dino_vit_state_dict(embed_dim, depth, patch_size, img_size=224, in_chans=3):
    """The keys and shapes of an official DINO ViT backbone, written out from DINO's layout."""
    grid = img_size // patch_size
    state = {
        "cls_token": (1, 1, embed_dim),
        "pos_embed": (1, 1 + grid * grid, embed_dim),
        "patch_embed.proj.weight": (embed_dim, in_chans, patch_size, patch_size),
        "patch_embed.proj.bias": (embed_dim,),
        "norm.weight": (embed_dim,),
        "norm.bias": (embed_dim,),
    }
    for i in range(depth):
        prefix = f"blocks.{i}."
        state.update({
            prefix + "norm1.weight": (embed_dim,), prefix + "norm1.bias": (embed_dim,),
            prefix + "attn.qkv.weight": (3 * embed_dim, embed_dim), prefix + "attn.qkv.bias": (3 * embed_dim,),
            prefix + "attn.proj.weight": (embed_dim, embed_dim), prefix + "attn.proj.bias": (embed_dim,),
            prefix + "norm2.weight": (embed_dim,), prefix + "norm2.bias": (embed_dim,),
            prefix + "mlp.fc1.weight": (4 * embed_dim, embed_dim), prefix + "mlp.fc1.bias": (4 * embed_dim,),
            prefix + "mlp.fc2.weight": (embed_dim, 4 * embed_dim), prefix + "mlp.fc2.bias": (embed_dim,),
        })
    return {name: torch.randn(shape) for name, shape in state.items()}


@pytest.mark.parametrize("arch,width,patch", [("vit_small", 384, 16), ("vit_tiny", 192, 8), ("vit_base", 768, 16)])
def test_official_dino_state_dict_loads_strictly_into_cls(arch, width, patch):
    model = getattr(vits, arch)(patch_size=patch, readout="cls")
    state = dino_vit_state_dict(width, 12, patch)
    model.load_state_dict(state, strict=True)
    torch.testing.assert_close(model.blocks[11].mlp.fc2.weight, state["blocks.11.mlp.fc2.weight"])


def test_sparo_replaces_last_block_and_matches_parameter_budget():
    cls = vits.vit_small(readout="cls")
    sparo = vits.vit_small()
    keep_all = vits.vit_small(sparo_keep_all_blocks=True)
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert len(sparo.blocks) == 11 and len(cls.blocks) == 12 and len(keep_all.blocks) == 12
    assert count(sparo) <= count(cls)
    sparo_params = sum(p.numel() for p in sparo.sparo.parameters())
    block_params = sum(p.numel() for p in cls.blocks[-1].parameters())
    assert 1.5e6 < sparo_params < block_params  # SPARO.md: ~1.6M, less than one block (1.8M)
    assert sparo.num_features == 64 * 64 and cls.num_features == 384


@pytest.mark.parametrize("readout,width", [("sparo", 16 * 8), ("cls", 192), ("gap", 192), ("cls_proj", 16 * 8)])
def test_shapes_for_global_local_and_non_square_inputs(readout, width):
    model = vits.vit_tiny(patch_size=4, img_size=28, readout=readout, sparo_slots=16, sparo_dim=8)
    for shape in [(2, 3, 28, 28), (3, 3, 12, 12), (1, 3, 28, 16), (2, 3, 64, 64)]:
        assert model(torch.randn(shape)).shape == (shape[0], width)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(1, 3, 30, 28))


def test_position_embeddings_unchanged_at_native_size_and_resampled_elsewhere():
    model = vits.vit_tiny(patch_size=4, img_size=28, readout="cls")
    x = torch.randn(1, 3, 28, 28)
    tokens = model.prepare_tokens(x)
    patches = model.patch_embed(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens[:, 1:], patches + model.pos_embed[:, 1:])
    torch.testing.assert_close(tokens[:, 0], (model.cls_token + model.pos_embed[:, :1])[:, 0])
    assert model.prepare_tokens(torch.randn(1, 3, 12, 20)).shape == (1, 1 + 3 * 5, 192)


def cubic_weights(t: float) -> np.ndarray:
    """Keys' cubic convolution (A = -0.75, PyTorch's bicubic) for the 4 taps at -1, 0, 1, 2."""
    A = -0.75
    def kernel(x):
        x = abs(x)
        if x <= 1:
            return (A + 2) * x ** 3 - (A + 3) * x ** 2 + 1
        return A * x ** 3 - 5 * A * x ** 2 + 8 * A * x - 4 * A if x < 2 else 0.0
    return np.array([kernel(t + 1), kernel(t), kernel(1 - t), kernel(2 - t)])


def dino_resampling_matrix(old: int, new: int) -> np.ndarray:
    """(new x old) matrix of DINO's 1-D resampling: bicubic at scale factor (new + 0.1) / old,
    output pixel i sampled at (i + 0.5) / factor - 0.5 of the input, borders replicated."""
    factor = (new + 0.1) / old
    matrix = np.zeros((new, old))
    for i in range(new):
        source = (i + 0.5) / factor - 0.5
        base = math.floor(source)
        for tap, weight in zip(range(-1, 3), cubic_weights(source - base)):
            matrix[i, min(max(base + tap, 0), old - 1)] += weight
    return matrix


@pytest.mark.parametrize("grid", [(6, 6), (7, 7), (10, 10), (30, 30), (3, 5), (7, 28), (14, 14)])
def test_position_embeddings_follow_dinos_formula(grid):
    """The embeddings added to the tokens equal an independent NumPy evaluation of DINO's
    interpolate_pos_encoding (plain bicubic, no antialiasing, the +0.1 factor offset)."""
    torch.manual_seed(0)
    model = vits.vit_tiny(patch_size=16, readout="cls")
    with torch.no_grad():
        model.pos_embed.normal_()
    x = torch.randn(1, 3, grid[0] * 16, grid[1] * 16)
    with torch.no_grad():
        tokens = model.prepare_tokens(x)
        patches = model.patch_embed(x).flatten(2).transpose(1, 2)
        added = torch.cat([tokens[:, :1] - model.cls_token, tokens[:, 1:] - patches], dim=1)[0].double().numpy()
    table = model.pos_embed[0].detach().double().numpy()
    rows, cols = dino_resampling_matrix(14, grid[0]), dino_resampling_matrix(14, grid[1])
    patch_table = table[1:].reshape(14, 14, -1)
    expected = np.einsum("ih,hwd,jw->ijd", rows, patch_table, cols).reshape(-1, table.shape[1])
    if grid == (14, 14):  # DINO returns its table untouched at the training grid
        expected = table[1:]
    np.testing.assert_allclose(added[0], table[0], atol=1e-5)
    np.testing.assert_allclose(added[1:], expected, atol=1e-5)


def test_last_selfattention_is_the_attention_the_block_applies():
    torch.manual_seed(0)
    model = vits.vit_tiny(patch_size=4, img_size=28, readout="cls").eval()
    x = torch.randn(2, 3, 28, 28)
    attention = model.get_last_selfattention(x)
    assert attention.shape == (2, 3, 50, 50)
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 3, 50))
    # Recompute the last block's attention output from these weights and compare with the
    # block's own fused (SDPA) attention.
    tokens = model.prepare_tokens(x)
    for block in model.blocks[:-1]:
        tokens = block(tokens)
    block = model.blocks[-1]
    normed = block.norm1(tokens)
    v = block.attn.qkv(normed).reshape(2, 50, 3, 3, 64).permute(2, 0, 3, 1, 4)[2]
    mixed = (attention @ v).transpose(1, 2).reshape(2, 50, 192)
    torch.testing.assert_close(block.attn.proj(mixed), block.attn(normed), rtol=1e-4, atol=1e-5)


def test_slot_attention_and_intermediate_layers():
    model = vits.vit_tiny(patch_size=4, img_size=28, sparo_slots=8, sparo_dim=4)
    x = torch.randn(2, 3, 28, 28)
    alpha = model.get_slot_attention(x)
    assert alpha.shape == (2, 8, 50)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(2, 8))
    layers = model.get_intermediate_layers(x, n=4)
    assert len(layers) == 4 and all(t.shape == (2, 50, 192) for t in layers)
    torch.testing.assert_close(model.sparo(layers[-1]), model(x))
    with pytest.raises(ValueError):
        vits.vit_tiny(readout="cls").get_slot_attention(x)


def test_build_backbone_from_config_round_trip():
    config = vits.BackboneConfig(arch="vit_tiny", patch_size=4, img_size=28, sparo_slots=8, sparo_dim=4,
                                 sparo_norm="global", sparo_share_kv=False)
    model = vits.BackboneConfig.from_dict(config.to_dict()).build()
    assert model.sparo.norm == "global" and model.sparo.value is not None
    assert model.pos_embed.shape == (1, 50, 192)
    with pytest.raises(ValueError):
        vits.BackboneConfig(arch="vit_huge")


def test_backbone_config_checks_once_and_keeps_the_checkpoint_dict(capsys):
    # the plain dict that checkpoints store as model_config (weights_only loading)
    assert vits.BackboneConfig().to_dict() == dict(
        arch="vit_small", patch_size=16, img_size=224, readout="sparo", sparo_slots=64, sparo_dim=64,
        sparo_attn_dim=None, sparo_share_kv=True, sparo_norm="slot", sparo_keep_all_blocks=False)
    older = vits.BackboneConfig.from_dict(dict(arch="vit_tiny", patch_size=4, readout="cls"))
    assert (older.img_size, older.sparo_keep_all_blocks, older.num_features) == (224, False, 192)
    for bad in (dict(readout="cls_token"), dict(sparo_norm="layer"), dict(sparo_slots=0),
                dict(patch_size=-4), dict(sparo_attn_dim=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            vits.BackboneConfig(**bad)
    parser = argparse.ArgumentParser()
    utils.add_backbone_args(parser)
    args = parser.parse_args(["--readout", "cls", "--sparo_keep_all_blocks", "true", "--sparo_dim", "8"])
    args.global_crops_size = 28
    assert vits.BackboneConfig.from_args(args) == vits.BackboneConfig(
        img_size=28, readout="cls", sparo_dim=8, sparo_keep_all_blocks=True)
    for bad in (["--sparo_slots", "0"], ["--sparo_norm", "layer"], ["--arch", "vit_huge"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    assert "invalid choice: 'vit_huge'" in capsys.readouterr().err


@pytest.mark.parametrize("arch", sorted(vits.ARCHS))
@pytest.mark.parametrize("keep_all", [False, True])
def test_every_arch_is_recovered_from_its_weights(arch, keep_all):
    """Checkpoints without a configuration (official DINO files) are rebuilt from weight shapes;
    this needs every arch to have its own width."""
    config = vits.BackboneConfig(arch=arch, patch_size=8, img_size=16, sparo_slots=4, sparo_dim=8,
                                 sparo_keep_all_blocks=keep_all)
    inferred = vits.BackboneConfig.from_state_dict(config.build().state_dict()).to_dict()
    assert inferred["arch"] == arch and inferred["sparo_keep_all_blocks"] == keep_all
    assert (inferred["sparo_slots"], inferred["sparo_dim"], inferred["patch_size"]) == (4, 8, 8)
    widths = [width for width, _, _ in vits.ARCHS.values()]
    assert len(set(widths)) == len(widths)


# ------------------------------------------------------------ the controls of issue 19
def test_gap_is_the_mean_patch_token_after_the_final_norm_with_every_block():
    torch.manual_seed(0)
    model = vits.BackboneConfig("vit_nano", patch_size=4, img_size=16, readout="gap").build().eval()
    x = torch.randn(3, 3, 16, 20)
    tokens = model.forward_tokens(x)
    assert len(model.blocks) == 6 and model.num_features == 96 and tokens.shape == (3, 1 + 4 * 5, 96)
    # independently: every block, the final LayerNorm by hand, then the mean over tokens 1..N
    h = model.prepare_tokens(x)
    for block in model.blocks:
        h = block(h)
    h = F.layer_norm(h, (96,), model.norm.weight, model.norm.bias, eps=1e-6)
    expected = h[:, 1:].sum(dim=1) / h[:, 1:].shape[1]
    torch.testing.assert_close(model(x), expected)
    assert not torch.allclose(model(x), tokens[:, 0])  # not the CLS token
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(model) == count(vits.BackboneConfig("vit_nano", 4, 16, readout="cls").build())


def test_cls_proj_is_the_normalised_linear_map_of_the_cls_token():
    torch.manual_seed(0)
    config = vits.BackboneConfig("vit_nano", patch_size=4, img_size=16, readout="cls_proj",
                                 sparo_slots=8, sparo_dim=16)
    model = config.build().eval()
    x = torch.randn(2, 3, 16, 16)
    encoding = model(x)
    assert encoding.shape == (2, 128) and model.num_features == 128 and len(model.blocks) == 6
    torch.testing.assert_close(encoding.norm(dim=-1), torch.ones(2))
    cls_token = model.forward_tokens(x)[:, 0]
    projected = cls_token @ model.cls_proj.weight.T + model.cls_proj.bias
    torch.testing.assert_close(encoding, projected / projected.norm(dim=-1, keepdim=True))
    # DINO's init of a Linear: trunc-normal std 0.02, zero bias
    assert torch.all(model.cls_proj.bias == 0) and 0.015 < model.cls_proj.weight.std() < 0.025
    count = lambda m: sum(p.numel() for p in m.parameters())
    cls = vits.BackboneConfig("vit_nano", 4, 16, readout="cls").build()
    assert count(model) - count(cls) == 96 * 128 + 128  # D*L*V weights + L*V biases
    assert set(model.state_dict()) - set(cls.state_dict()) == {"cls_proj.weight", "cls_proj.bias"}


def test_controls_default_width_is_sparos():
    assert vits.vit_small(readout="cls_proj").num_features == vits.vit_small().num_features == 4096
    assert vits.vit_small(readout="gap").num_features == 384


@pytest.mark.parametrize("slots,dim,expected", [(8, 16, (64, 2)), (3, 8, (1, 24)), (64, 64, (64, 64))])
def test_cls_proj_is_recovered_from_its_weights_and_gap_reads_as_cls(slots, dim, expected):
    config = vits.BackboneConfig("vit_nano", patch_size=8, img_size=16, readout="cls_proj",
                                 sparo_slots=slots, sparo_dim=dim)
    state = config.build().state_dict()
    inferred = vits.BackboneConfig.from_state_dict(state)
    assert inferred.readout == "cls_proj" and inferred.num_features == slots * dim
    # only the product L*V is in the weights: L = 64 when it divides, else 1
    assert (inferred.sparo_slots, inferred.sparo_dim) == expected
    inferred.build().load_state_dict(state, strict=True)
    gap = vits.BackboneConfig("vit_nano", patch_size=8, img_size=16, readout="gap").build()
    assert vits.BackboneConfig.from_state_dict(gap.state_dict()).readout == "cls"  # documented


def test_dino_head_matches_dino_definition():
    torch.manual_seed(0)
    head = vits.DINOHead(in_dim=32, out_dim=100, hidden_dim=64, bottleneck_dim=16)
    names = set(dict(head.named_parameters()))
    assert {"mlp.0.weight", "mlp.2.weight", "mlp.4.weight", "last_layer.weight_g", "last_layer.weight_v"} <= names
    assert not head.last_layer.weight_g.requires_grad
    x = torch.randn(5, 32)
    bottleneck = F.normalize(head.mlp(x), dim=-1)
    weight = F.normalize(head.last_layer.weight_v, dim=1)  # g = 1: unit-norm prototypes
    torch.testing.assert_close(head(x), bottleneck @ weight.T)
    assert vits.DINOHead(32, 10, norm_last_layer=False).last_layer.weight_g.requires_grad


def test_multicrop_wrapper_equals_separate_forward_passes():
    torch.manual_seed(0)
    backbone = vits.vit_tiny(patch_size=4, img_size=28, sparo_slots=4, sparo_dim=4).eval()
    wrapper = vits.MultiCropWrapper(backbone, vits.DINOHead(16, 10, hidden_dim=8, bottleneck_dim=4)).eval()
    crops = [torch.randn(2, 3, 28, 28), torch.randn(2, 3, 28, 28), torch.randn(2, 3, 12, 12)]
    separate = torch.cat([wrapper.head(backbone(c)) for c in crops])
    torch.testing.assert_close(wrapper(crops), separate, rtol=1e-5, atol=1e-6)
