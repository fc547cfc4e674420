"""hubconf.py through torch.hub's own loading machinery (source="local"): the entry points build
the training script's model, load its checkpoints and official-DINO-style files, check
architectures, and never download anything."""
import argparse
import importlib
import sys
import types

import pytest
import torch

import datasets
import errors
import main_dino_sparo as dino
import utils
import vision_transformer as vits
from helpers import REPO, TINY_TRAIN_ARGS


def hub_load(entry, **kwargs):
    return torch.hub.load(str(REPO), entry, source="local", **kwargs)


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Any attempt to download makes the test fail."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args}")
    for name in ("download_url_to_file", "load_state_dict_from_url", "_download_url_to_file"):
        if hasattr(torch.hub, name):
            monkeypatch.setattr(torch.hub, name, refuse)


def tiny_args():
    parser = argparse.ArgumentParser(parents=[dino.get_args_parser()])
    return parser.parse_args(TINY_TRAIN_ARGS + ["--output_dir", "unused"])


def digit_batch(size=16):
    images, _ = datasets.load_digits_split("test")
    x = torch.tensor(images[:6], dtype=torch.float32) / 255.0
    x = torch.nn.functional.interpolate(x[:, None], size=(size, size), mode="bilinear")
    return ((x.repeat(1, 3, 1, 1) - 0.45) / 0.225)


def test_entry_points_are_listed_with_their_documentation():
    hubconf = importlib.import_module("hubconf")
    assert set(hubconf.dependencies) <= {"torch", "timm", "numpy"}
    for name in ("sparo_vit_tiny", "sparo_vit_small", "sparo_vit_base", "dino_vit_tiny",
                 "dino_vit_small", "dino_vit_base", "dino_vits16", "dino_vits8", "dino_vitb16",
                 "dino_vitb8", "gap_vit_tiny", "gap_vit_small", "gap_vit_base", "cls_proj_vit_tiny",
                 "cls_proj_vit_small", "cls_proj_vit_base"):
        entry = getattr(hubconf, name)
        assert callable(entry) and entry.__name__ == name and "pretrained_weights" in entry.__doc__


def test_random_model_is_the_training_scripts_teacher_backbone():
    args = tiny_args()
    _, teacher, config, _ = dino.build_student_teacher(args)
    backbone = teacher.backbone.eval()
    model = hub_load("sparo_vit_tiny", patch_size=4, img_size=16, sparo_slots=16, sparo_dim=16).eval()
    reference = backbone.state_dict()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in reference.items()}
    model.load_state_dict(reference, strict=True)
    x = digit_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(x), backbone(x))
    assert model(x).shape == (6, 16 * 16)


def test_sparo_entry_loads_a_training_checkpoint(tiny_sparo_checkpoint):
    checkpoint = torch.load(tiny_sparo_checkpoint, map_location="cpu", weights_only=True)
    # Independent of weight_files.load_backbone: the training script's teacher with the saved weights.
    _, teacher, _, _ = dino.build_student_teacher(tiny_args())
    teacher.load_state_dict(checkpoint["teacher"], strict=True)
    reference = teacher.backbone.eval()

    model = hub_load("sparo_vit_tiny", pretrained_weights=str(tiny_sparo_checkpoint)).eval()
    student = hub_load("sparo_vit_tiny", pretrained_weights=str(tiny_sparo_checkpoint),
                       checkpoint_key="student").eval()
    random = hub_load("sparo_vit_tiny", patch_size=4, img_size=16, sparo_slots=16, sparo_dim=16).eval()
    x = digit_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
        torch.testing.assert_close(model.get_slot_attention(x), reference.get_slot_attention(x))
        assert not torch.allclose(student(x), model(x))     # EMA teacher != student after an epoch
        assert not torch.allclose(random(x), model(x))
    # Model arguments that agree with the checkpoint are accepted; others are refused.
    hub_load("sparo_vit_tiny", pretrained_weights=str(tiny_sparo_checkpoint), patch_size=4, sparo_slots=16)
    with pytest.raises(errors.UserError, match="with sparo_slots=16, but sparo_slots=64"):
        hub_load("sparo_vit_tiny", pretrained_weights=str(tiny_sparo_checkpoint), sparo_slots=64)
    with pytest.raises(errors.UserError, match="with arch='vit_tiny', but arch='vit_small'"):
        hub_load("sparo_vit_small", pretrained_weights=str(tiny_sparo_checkpoint))
    with pytest.raises(errors.UserError, match="with readout='sparo', but readout='cls'"):
        hub_load("dino_vit_tiny", pretrained_weights=str(tiny_sparo_checkpoint))
    # Extra model arguments rebuild the model around the same weights.
    with_drop_path = hub_load("sparo_vit_tiny", pretrained_weights=str(tiny_sparo_checkpoint),
                              drop_path_rate=0.2).eval()
    assert with_drop_path.blocks[-1].drop_path1.drop_prob > 0
    with torch.no_grad():
        torch.testing.assert_close(with_drop_path(x), reference(x))


def test_control_entries_load_their_training_checkpoints(tiny_control_checkpoint):
    checkpoint = torch.load(tiny_control_checkpoint, map_location="cpu", weights_only=True)
    readout = checkpoint["model_config"]["readout"]
    reference = vits.BackboneConfig.from_dict(checkpoint["model_config"]).build().eval()
    reference.load_state_dict({k[len("backbone."):]: v for k, v in checkpoint["teacher"].items()
                               if k.startswith("backbone.")}, strict=True)
    model = hub_load(f"{readout}_vit_tiny", pretrained_weights=str(tiny_control_checkpoint)).eval()
    x = digit_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    assert model.readout == readout
    with pytest.raises(errors.UserError, match=f"with readout='{readout}', but readout='cls'"):
        hub_load("dino_vit_tiny", pretrained_weights=str(tiny_control_checkpoint))
    random = hub_load(f"{readout}_vit_small")
    assert len(random.blocks) == 12 and random.num_features == (4096 if readout == "cls_proj" else 384)


@pytest.mark.parametrize("layout", ["bare", "full"])
def test_cls_entries_load_official_dino_layouts(tmp_path, layout):
    torch.manual_seed(0)
    original = vits.vit_small(patch_size=16, readout="cls").eval()
    state = original.state_dict()
    path = tmp_path / "dino.pth"
    if layout == "bare":  # like dino_deitsmall16_pretrain.pth
        torch.save(state, path)
    else:                 # like a DINO training checkpoint: wrapped, prefixed, args as a Namespace
        torch.save({"teacher": {f"module.backbone.{k}": v for k, v in state.items()},
                    "args": argparse.Namespace(arch="vit_small", patch_size=16), "epoch": 100}, path)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = original(x)
        for entry in ("dino_vits16", "dino_vit_small"):
            model = hub_load(entry, pretrained_weights=str(path)).eval()
            torch.testing.assert_close(model(x), expected)
    with pytest.raises(errors.UserError, match="with patch_size=16, but patch_size=8"):
        hub_load("dino_vits8", pretrained_weights=str(path))
    with pytest.raises(ValueError, match="patch size 16, not 8"):
        hub_load("dino_vits16", patch_size=8, pretrained=False)


def test_random_entries_build_each_architecture():
    model = hub_load("dino_vitb8", pretrained=False)
    assert (model.patch_size, model.embed_dim, len(model.blocks), model.sparo) == (8, 768, 12, None)
    model = hub_load("sparo_vit_small")
    assert (model.patch_size, model.embed_dim, len(model.blocks)) == (16, 384, 11)
    assert model.sparo.num_slots == 64 and model.num_features == 64 * 64
    with pytest.raises(TypeError, match="readout is set by the entry point"):
        hub_load("sparo_vit_tiny", readout="cls")


def test_a_foreign_utils_module_is_set_aside_and_restored(tiny_sparo_checkpoint, monkeypatch):
    foreign = types.ModuleType("utils")
    foreign.__file__ = "/somewhere/else/utils.py"
    monkeypatch.setitem(sys.modules, "utils", foreign)
    model = hub_load("sparo_vit_tiny", pretrained_weights=str(tiny_sparo_checkpoint))
    assert sys.modules["utils"] is foreign
    assert model(digit_batch()).shape == (6, 256)
