"""This project against the original facebookresearch/dino code, run side by side.

Needs a clone of DINO named by $DINO_REPO; skipped without one. DINO's modules
are imported under private names by bench/dino_original.py and never copied.
"""
import pytest
import torch

import vision_transformer as vits
import weight_files
from bench.dino_original import DINO_REPO, load_dino
from helpers import needs_dino

pytestmark = needs_dino

# Square sides of the issue, non-square inputs, and a 7x28 grid: as many patches as the
# 14x14 training grid, where DINO still interpolates.
SIZES = [(96, 96), (112, 112), (160, 160), (224, 224), (480, 480), (96, 160), (224, 112), (112, 448)]


@pytest.fixture(scope="module")
def official_checkpoint(tmp_path_factory):
    """DINO's own ViT-tiny/16 with random weights, saved the way DINO's released files are
    (a bare backbone state dict). The position embeddings get the size of trained ones
    (std 1 rather than DINO's 0.02 init), so that a wrong resampling shows in the features."""
    dino = load_dino(DINO_REPO)
    torch.manual_seed(0)
    original = dino.vision_transformer.vit_tiny(patch_size=16).eval()
    with torch.no_grad():
        original.pos_embed.normal_()
    path = tmp_path_factory.mktemp("dino") / "dino_deittiny16_pretrain.pth"
    torch.save(original.state_dict(), path)
    model, config = weight_files.load_backbone(str(path))  # the project's loader, as users call it
    assert config["readout"] == "cls" and config["img_size"] == 224
    return original, model.eval()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_official_checkpoint_gives_dinos_features_at_every_size(official_checkpoint, size):
    original, model = official_checkpoint
    torch.manual_seed(1)
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected, ours = original(images), model(images)
    assert (ours - expected).abs().max().item() <= 1e-4


def test_dino_head_starts_exactly_like_dinos():
    """Same seed, same construction order: every head parameter equals DINO's bit for bit,
    the prototypes (nn.Linear's default init, then weight_g = 1) included."""
    dino = load_dino(DINO_REPO)
    for norm_last_layer in (True, False):
        torch.manual_seed(0)
        expected = dino.vision_transformer.DINOHead(96, 300, norm_last_layer=norm_last_layer,
                                                    hidden_dim=64, bottleneck_dim=32).state_dict()
        torch.manual_seed(0)
        head = vits.DINOHead(96, 300, norm_last_layer=norm_last_layer, hidden_dim=64, bottleneck_dim=32)
        state = head.state_dict()
        assert state.keys() == expected.keys()
        for name, value in expected.items():
            assert torch.equal(state[name], value), name
        assert head.last_layer.weight_g.requires_grad == (not norm_last_layer)
