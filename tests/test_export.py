"""export.py -> every loader (utils/eval scripts, torch.hub, timm, DINO's own loader) gives the
checkpoint's features; timm's registry and conventions; safetensors files never run code."""
import json
import pickle

import pytest
import timm
import torch

import errors
import export
import timm_models  # noqa: F401 - registers the timm names
import utils
import vision_transformer as vits
import weight_files
from bench.dino_original import DINO_REPO, load_dino
from helpers import REPO, Payload, cls_vit_tiny, dino_vit_tiny, needs_dino


def features(model, images):
    with torch.no_grad():
        return model.eval()(images)


def hub_load(entry, **kwargs):
    return torch.hub.load(str(REPO), entry, source="local", **kwargs)


def export_to(tmp_path, checkpoint, *extra):
    out = tmp_path / "export"
    export.main(["--pretrained_weights", str(checkpoint), "--output_dir", str(out), *extra])
    return out


def cpu_recipe_checkpoint(tmp_path, readout="sparo"):
    """A checkpoint in the training layout with the CPU recipe's shapes (vit_nano/7 at 28 px,
    configs/quality/recipe_cpu.yaml), untrained: export does not care how the weights came."""
    config = vits.BackboneConfig(arch="vit_nano", patch_size=7, img_size=28, readout=readout,
                               sparo_slots=8, sparo_dim=8, sparo_norm="global")
    torch.manual_seed(0)
    student, teacher = config.build(), config.build()
    path = tmp_path / "checkpoint.pth"
    torch.save(dict(student={f"backbone.{k}": v for k, v in student.state_dict().items()},
                    teacher={f"backbone.{k}": v for k, v in teacher.state_dict().items()},
                    epoch=5, model_config=config.to_dict()), path)
    return path, student, teacher


def test_trained_checkpoint_exports_to_files_every_loader_reads(tiny_sparo_checkpoint, tmp_path):
    out = export_to(tmp_path, tiny_sparo_checkpoint)
    teacher, config = weight_files.load_backbone(str(tiny_sparo_checkpoint))
    images = torch.randn(3, 3, 16, 16)
    expected = features(teacher, images)
    meta = json.loads((out / "config.json").read_text())
    assert meta["architecture"] == "vit_tiny_patch4_28_sparo"  # image size 16 travels as a model arg
    assert meta["readout"] == {"type": "sparo", "L": 16, "V": 16, "a": 64, "share_kv": True,
                               "norm": "slot", "keep_all_blocks": False}
    assert meta["pretrained_cfg"]["input_size"] == [3, 16, 16]
    assert meta["pretrained_cfg"]["mean"] == list(utils.IMAGENET_MEAN)
    assert meta["model_config"] == config and meta["num_features"] == 256
    for name in ("model.safetensors", "backbone.pth"):
        path = str(out / name)
        loaded, loaded_config = weight_files.load_backbone(path)  # what eval_knn/eval_linear call
        assert loaded_config == config
        torch.testing.assert_close(features(loaded, images), expected, rtol=0, atol=0)
        torch.testing.assert_close(features(hub_load("sparo_vit_tiny", pretrained_weights=path), images),
                                   expected, rtol=0, atol=0)
        model = timm.create_model(meta["architecture"], pretrained=True,
                                  pretrained_cfg_overlay=dict(file=path))
        torch.testing.assert_close(features(model, images), expected, rtol=0, atol=0)
        tokens = model.forward_features(images)
        assert tokens.shape == (3, 1 + 16, 192)
        torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), expected.detach())
        assert timm.data.resolve_data_config({}, model=model)["input_size"] == (3, 16, 16)
    # the whole folder through timm's local-dir source (config.json + model.safetensors)
    torch.testing.assert_close(features(timm.create_model(f"local-dir:{out}", pretrained=True), images),
                               expected, rtol=0, atol=0)


def test_student_export_and_cpu_recipe_shapes(tmp_path):
    path, student, _ = cpu_recipe_checkpoint(tmp_path)
    out = export_to(tmp_path, path, "--checkpoint_key", "student")
    images = torch.randn(2, 3, 28, 28)
    # sparo_norm=global cannot be read from the shapes: it travels in both files
    for name in ("model.safetensors", "backbone.pth"):
        loaded, config = weight_files.load_backbone(str(out / name))
        assert config["sparo_norm"] == "global"
        torch.testing.assert_close(features(loaded, images), features(student, images), rtol=0, atol=0)
    model = timm.create_model("vit_nano_patch7_28_sparo", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")))
    torch.testing.assert_close(features(model, images), features(student, images), rtol=0, atol=0)
    classifier = timm.create_model("vit_nano_patch7_28_sparo", pretrained=True, num_classes=10,
                                   pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")))
    assert classifier(images).shape == (2, 10)
    torch.testing.assert_close(classifier.forward_head(classifier.forward_features(images), pre_logits=True),
                               features(student, images))


def test_timm_reads_a_weight_file_once_through_utils(tmp_path, monkeypatch):
    """timm's path shares the one reader (weight_files.read_backbone) and does not read the file again."""
    path, _, teacher = cpu_recipe_checkpoint(tmp_path)
    reads = []
    real = weight_files.load_checkpoint
    monkeypatch.setattr(weight_files, "load_checkpoint", lambda file: reads.append(file) or real(file))
    monkeypatch.setattr(timm.models._builder, "load_state_dict",
                        lambda *args, **kwargs: pytest.fail("timm read the weight file again"))
    model = timm.create_model("vit_nano_patch7_28_sparo", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path)))
    assert reads == [str(path)]
    images = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(features(model, images), features(teacher, images), rtol=0, atol=0)


@pytest.mark.parametrize("readout, width", [("gap", 96), ("cls_proj", 64)])
def test_control_exports_load_back_with_their_readout(tmp_path, readout, width):
    """gap's weights alone read as cls: model_config in both files keeps it gap everywhere."""
    path, _, teacher = cpu_recipe_checkpoint(tmp_path, readout)
    out = export_to(tmp_path, path)
    meta = json.loads((out / "config.json").read_text())
    assert meta["architecture"] == f"vit_nano_patch7_28_{readout}" and meta["num_features"] == width
    assert meta["readout"] == ({"type": readout, "width": 64} if readout == "cls_proj" else {"type": readout})
    images = torch.randn(2, 3, 28, 28)
    expected = features(teacher, images)
    assert expected.shape == (2, width)
    for name in ("model.safetensors", "backbone.pth"):
        loaded, config = weight_files.load_backbone(str(out / name))
        assert config["readout"] == loaded.readout == readout
        torch.testing.assert_close(features(loaded, images), expected, rtol=0, atol=0)
    model = timm.create_model(meta["architecture"], pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")))
    torch.testing.assert_close(features(model, images), expected, rtol=0, atol=0)
    torch.testing.assert_close(features(timm.create_model(f"local-dir:{out}", pretrained=True), images),
                               expected, rtol=0, atol=0)


def test_timm_refuses_a_file_of_another_architecture_and_never_downloads(tmp_path):
    path, _, _ = cpu_recipe_checkpoint(tmp_path)
    out = export_to(tmp_path, path)
    file = dict(file=str(out / "model.safetensors"))
    with pytest.raises(ValueError, match="patch_size=7, but vit_nano_patch16_224_sparo has patch_size=16"):
        timm.create_model("vit_nano_patch16_224_sparo", pretrained=True, pretrained_cfg_overlay=file)
    with pytest.raises(ValueError, match="readout='sparo', but vit_nano_patch7_28_cls"):
        timm.create_model("vit_nano_patch7_28_cls", pretrained=True, pretrained_cfg_overlay=file)
    with pytest.raises(ValueError, match="sparo_slots=8, but sparo_slots=16 was asked for"):
        timm.create_model("vit_nano_patch7_28_sparo", pretrained=True, sparo_slots=16, pretrained_cfg_overlay=file)
    with pytest.raises(RuntimeError, match="No pretrained weights exist"):
        timm.create_model("vit_small_patch16_224_sparo", pretrained=True)
    model = timm.create_model("vit_small_patch16_224_cls")  # random, DINO's ViT-S/16 shapes
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 384) and model.num_features == 384


def test_safetensors_loading_never_unpickles(tmp_path):
    marker = tmp_path / "ran"
    fake = tmp_path / "model.safetensors"
    fake.write_bytes(pickle.dumps({"pos_embed": Payload(marker)}))
    with pytest.raises(errors.UserError, match="cannot be read as safetensors"):
        weight_files.load_backbone(str(fake))
    assert not marker.exists()


def test_official_dino_file_exports_and_loads_back_everywhere(tmp_path):
    """A file laid out like DINO's released backbones (this project's CLS ViT: DINO's names)."""
    dino = cls_vit_tiny()
    torch.save(dino.state_dict(), tmp_path / "dino_vittiny4_pretrain.pth")
    out = export_to(tmp_path, tmp_path / "dino_vittiny4_pretrain.pth")
    images = torch.randn(2, 3, 16, 16)
    expected = features(dino, images)
    assert json.loads((out / "config.json").read_text())["architecture"] == "vit_tiny_patch4_28_cls"
    # timm straight from DINO's file and from the export; hub's DINO-named entry
    for file in (tmp_path / "dino_vittiny4_pretrain.pth", out / "model.safetensors"):
        model = timm.create_model("vit_tiny_patch4_28_cls", pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(file)))
        torch.testing.assert_close(features(model, images), expected, rtol=0, atol=0)
    hub = hub_load("dino_vit_tiny", pretrained_weights=str(out / "model.safetensors"))
    torch.testing.assert_close(features(hub, images), expected, rtol=0, atol=0)


@needs_dino
def test_official_dino_file_exports_and_loads_back_into_dinos_own_vit(tmp_path, capsys):
    dino = dino_vit_tiny()
    torch.save(dino.state_dict(), tmp_path / "dino_vittiny4_pretrain.pth")
    out = export_to(tmp_path, tmp_path / "dino_vittiny4_pretrain.pth")
    images = torch.randn(2, 3, 16, 16)
    expected = features(dino, images)
    # DINO's own loader (its eval scripts' load_pretrained_weights) reads the exported .pth
    fresh = dino_vit_tiny(seed=5)
    load_dino(DINO_REPO).utils.load_pretrained_weights(fresh, str(out / "backbone.pth"),
                                                               "teacher", "vit_tiny", 4)
    assert "missing_keys=[]" in capsys.readouterr().out
    torch.testing.assert_close(features(fresh, images), expected, rtol=0, atol=0)
    # timm from DINO's file: timm's fused attention vs DINO's explicit softmax, equal up to rounding
    model = timm.create_model("vit_tiny_patch4_28_cls", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")))
    torch.testing.assert_close(features(model, images), expected, rtol=1e-4, atol=1e-5)


def test_dino_named_hub_entries_do_not_hand_out_random_networks_silently():
    with pytest.warns(UserWarning, match=r"randomly initialised.*dino_deitsmall16_pretrain\.pth"):
        hub_load("dino_vits16")
    with pytest.raises(ValueError, match=r"nothing is downloaded here .*pretrained_weights='dino_vitbase8_pretrain\.pth'"):
        hub_load("dino_vitb8", pretrained=True)
    with pytest.raises(ValueError, match="nothing is downloaded here"):
        hub_load("sparo_vit_tiny", pretrained=True)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hub_load("dino_vits8", pretrained=False)  # random on purpose: no warning
        hub_load("sparo_vit_tiny", patch_size=4)  # this project's names never downloaded anything
