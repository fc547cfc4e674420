"""Strict weight loading (weight_files.load_backbone) as the evaluation scripts use it: official DINO
layouts for the CLS read-out, this project's SPARO checkpoints, and clear errors otherwise."""
import argparse
import json
import re

import pytest
import torch

import errors
import eval_knn
import eval_linear
import vision_transformer as vits
import weight_files
from helpers import run_script

class NotATensor:
    """An arbitrary pickled object: safe (weights_only) loading must refuse it."""


CLS_CONFIG = vits.BackboneConfig("vit_tiny", patch_size=4, img_size=16, readout="cls")


def cls_backbone(seed):
    torch.manual_seed(seed)
    return CLS_CONFIG.build().eval()


def assert_same_weights(loaded, reference):
    loaded_state, reference_state = loaded.state_dict(), reference.state_dict()
    assert loaded_state.keys() == reference_state.keys()
    for key, value in reference_state.items():
        assert torch.equal(loaded_state[key], value), key


def with_prefix(state, prefix):
    return {prefix + key: value for key, value in state.items()}


def test_bare_dino_named_cls_state_dict_loads_strictly(tmp_path):
    reference = cls_backbone(1)
    path = tmp_path / "dino_vittiny4_pretrain.pth"
    torch.save(reference.state_dict(), path)
    model, config = weight_files.load_backbone(str(path))
    assert config["readout"] == "cls" and config["arch"] == "vit_tiny"
    assert config["patch_size"] == 4 and config["img_size"] == 16
    assert_same_weights(model, reference)
    images = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model.eval()(images), reference(images))


def test_official_full_checkpoint_with_namespace_args_and_prefixes(tmp_path):
    """DINO's full checkpoint: the student under DDP (`module.backbone.`), the teacher as
    `backbone.` + a projection head, `args` as an argparse.Namespace (allowed by safe loading)."""
    student, teacher = cls_backbone(2), cls_backbone(3)
    head = vits.DINOHead(192, 64)
    checkpoint = dict(
        student={**with_prefix(student.state_dict(), "module.backbone."),
                 **with_prefix(head.state_dict(), "module.head.")},
        teacher={**with_prefix(teacher.state_dict(), "backbone."),
                 **with_prefix(head.state_dict(), "head.")},
        optimizer={"state": {}, "param_groups": []}, epoch=100,
        args=argparse.Namespace(arch="vit_tiny", patch_size=4, out_dim=64),
        dino_loss={"center": torch.zeros(1, 64)})
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    loaded_teacher, _ = weight_files.load_backbone(str(path), "teacher")
    assert_same_weights(loaded_teacher, teacher)
    loaded_student, _ = weight_files.load_backbone(str(path), "student")
    assert_same_weights(loaded_student, student)


def test_sparo_checkpoint_into_a_cls_model_fails_clearly(tiny_sparo_checkpoint, tmp_path):
    # asked for a CLS backbone
    with pytest.raises(errors.UserError, match="with readout='sparo', but readout='cls'"):
        weight_files.load_backbone(str(tiny_sparo_checkpoint), expected={"readout": "cls"})
    # a checkpoint whose configuration says CLS but whose weights are SPARO's
    checkpoint = weight_files.load_checkpoint(tiny_sparo_checkpoint)
    config = {**checkpoint["model_config"], "readout": "cls"}
    torch.save({**checkpoint, "model_config": config}, tmp_path / "mislabelled.pth")
    with pytest.raises(errors.UserError, match=r"unexpected keys: .*sparo\.") as error:
        weight_files.load_backbone(str(tmp_path / "mislabelled.pth"))
    assert "readout=cls" in str(error.value)
    # and the other way round: SPARO configuration, SPARO weights missing
    state = {k: v for k, v in checkpoint["teacher"].items() if ".sparo." not in k}
    torch.save({**checkpoint, "teacher": state}, tmp_path / "no_sparo.pth")
    with pytest.raises(errors.UserError, match=r"missing keys: .*sparo\."):
        weight_files.load_backbone(str(tmp_path / "no_sparo.pth"))


def test_the_scripts_report_the_readout_mismatch(tiny_sparo_checkpoint):
    out = run_script("eval_knn.py", "--pretrained_weights", tiny_sparo_checkpoint,
                     "--data_path", "digits", "--readout", "cls", check=False)
    assert out.returncode == 2 and "readout='cls' was asked for" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("script", [eval_knn, eval_linear])
@pytest.mark.parametrize("flags, message", [
    (["--arch", "vit_small"], "with arch='vit_tiny', but arch='vit_small' was asked for"),
    (["--patch_size", "8"], "with patch_size=4, but patch_size=8 was asked for"),
    (["--checkpoint_key", "ema"], "has no 'ema' weights"),
])
def test_wrong_architecture_or_key_is_a_clear_error(tiny_sparo_checkpoint, tmp_path, script,
                                                    flags, message):
    output = ["--output_dir", str(tmp_path)] if script is eval_linear else []
    with pytest.raises(errors.UserError, match=re.escape(message)):
        script.main(["--pretrained_weights", str(tiny_sparo_checkpoint), "--data_path", "digits",
                     *output, *flags])


def test_control_checkpoint_reloads_as_itself_and_eval_knn_evaluates_it(tiny_control_checkpoint, tmp_path):
    """gap's weights alone would read as cls: the checkpoint's model_config keeps it gap."""
    checkpoint = torch.load(tiny_control_checkpoint, map_location="cpu", weights_only=True)
    readout = checkpoint["model_config"]["readout"]
    model, config = weight_files.load_backbone(str(tiny_control_checkpoint))
    assert model.readout == config["readout"] == readout and len(model.blocks) == 12
    assert model.num_features == (256 if readout == "cls_proj" else 192)
    teacher = {k[len("backbone."):]: v for k, v in checkpoint["teacher"].items() if k.startswith("backbone.")}
    own = model.state_dict()
    assert own.keys() == teacher.keys() and all(torch.equal(own[k], v) for k, v in teacher.items())
    result = tmp_path / "knn.json"
    out = run_script("eval_knn.py", "--pretrained_weights", tiny_control_checkpoint, "--data_path", "digits",
                     "--train_subset", "300", "--test_subset", "100", "--nb_knn", "20",
                     "--readout", readout, "--output_json", result)
    assert f"readout={readout}" in out.stdout
    top1 = json.loads(result.read_text())["knn"]["20"]["top1"]
    assert 10 < top1 <= 100  # above chance (10 classes): the features carry the digits


def test_wrong_arch_for_an_inferred_configuration(tmp_path):
    """Files without a model_config (official DINO ones): the shapes decide, --arch is checked."""
    path = tmp_path / "backbone.pth"
    torch.save(cls_backbone(4).state_dict(), path)
    with pytest.raises(errors.UserError, match="arch='vit_small' was asked for"):
        weight_files.load_backbone(str(path), expected={"arch": "vit_small"})
    model, _ = weight_files.load_backbone(str(path), expected={"arch": "vit_tiny", "patch_size": 4})
    assert model.readout == "cls"


def test_missing_or_unsafe_files_are_refused(tmp_path):
    with pytest.raises(errors.UserError, match="does not exist"):
        weight_files.load_backbone(str(tmp_path / "nothing.pth"))
    torch.save({"teacher": {}, "evil": NotATensor()}, tmp_path / "unsafe.pth")
    with pytest.raises(errors.UserError, match="refused by safe loading"):
        weight_files.load_backbone(str(tmp_path / "unsafe.pth"))
