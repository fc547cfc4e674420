"""Warm start from official DINO weights (warm_start.py, main_dino_sparo.py --init_backbone):
the files are made by this project's readout=cls ViT, whose parameter names are DINO's
(test_dino_parity.py checks against DINO's own ViT that it computes DINO's features)."""
import pytest
import torch

import errors
import vision_transformer as vits
import warm_start
import weight_files
from helpers import TINY_TRAIN_ARGS, cls_vit_tiny, run_script, save_dino_checkpoint


def sparo_tiny(**kwargs):
    torch.manual_seed(1)
    return vits.BackboneConfig(arch="vit_tiny", patch_size=4, img_size=16, sparo_slots=16,
                               sparo_dim=16, **kwargs).build()


@pytest.mark.parametrize("layout", ["bare", "full"])
def test_sparo_gets_exactly_dinos_embeddings_kept_blocks_and_norm(tmp_path, layout):
    dino = cls_vit_tiny()
    path = tmp_path / "dino.pth"
    if layout == "bare":  # like dino_deitsmall16_pretrain.pth
        torch.save(dino.state_dict(), path)
    else:
        save_dino_checkpoint(dino, path)
    model = sparo_tiny()
    sparo_before = {k: v.clone() for k, v in model.sparo.state_dict().items()}
    report = warm_start.init_backbone(model, str(path))

    dino_state = dino.state_dict()
    expected = sorted(k for k in dino_state if not k.startswith("blocks.11."))
    assert report["loaded"] == expected
    assert sorted(report["dropped"]) == sorted(
        [k for k in dino_state if k.startswith("blocks.11.")]
        + ([f"head.{k}" for k in vits.DINOHead(192, 64).state_dict()] if layout == "full" else []))
    assert report["fresh"] == [f"sparo.{k}" for k in sparo_before]
    own = model.state_dict()
    for key in expected:  # the teacher's weights, not the student's (+1) of the full file
        torch.testing.assert_close(own[key], dino_state[key], rtol=0, atol=0)
    for key, value in sparo_before.items():
        torch.testing.assert_close(model.sparo.state_dict()[key], value, rtol=0, atol=0)
    # the tokens SPARO reads are DINO's block-11 input after DINO's final norm
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().forward_tokens(images),
                                   dino.get_intermediate_layers(images, n=2)[0])


def test_cls_run_starts_with_dinos_features(tmp_path):
    dino = cls_vit_tiny()
    torch.save(dino.state_dict(), tmp_path / "dino.pth")
    model = cls_vit_tiny(seed=1)
    report = warm_start.init_backbone(model, str(tmp_path / "dino.pth"))
    assert report["loaded"] == sorted(dino.state_dict()) and report["dropped"] == report["fresh"] == []
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), dino(images))


@pytest.mark.parametrize("readout", ["gap", "cls_proj"])
def test_controls_get_every_dino_block_and_only_cls_proj_starts_a_layer_fresh(tmp_path, readout):
    dino = cls_vit_tiny()
    torch.save(dino.state_dict(), tmp_path / "dino.pth")
    torch.manual_seed(1)
    model = vits.BackboneConfig(arch="vit_tiny", patch_size=4, img_size=16, readout=readout,
                                sparo_slots=16, sparo_dim=16).build()
    report = warm_start.init_backbone(model, str(tmp_path / "dino.pth"))
    assert report["loaded"] == sorted(dino.state_dict()) and report["dropped"] == []
    assert report["fresh"] == ([] if readout == "gap" else ["cls_proj.weight", "cls_proj.bias"])
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        tokens = dino.get_intermediate_layers(images, n=1)[0]  # DINO's last block, final norm
        expected = (tokens[:, 1:].mean(dim=1) if readout == "gap" else
                    torch.nn.functional.normalize(model.cls_proj(tokens[:, 0]), dim=-1))
        torch.testing.assert_close(model.eval()(images), expected)
    # --freeze_backbone_epochs trains cls_proj's layer with the head, like SPARO's read-out
    assert warm_start.is_frozen("backbone.blocks.0.attn.qkv.weight")
    assert not warm_start.is_frozen("backbone.cls_proj.weight") and not warm_start.is_frozen("backbone.sparo.queries")


def test_position_embeddings_are_resampled_for_another_crop_size(tmp_path):
    dino = cls_vit_tiny(img_size=16)
    torch.save(dino.state_dict(), tmp_path / "dino.pth")
    torch.manual_seed(1)
    model = vits.BackboneConfig(arch="vit_tiny", patch_size=4, img_size=32, sparo_slots=4,
                                sparo_dim=4).build()
    warm_start.init_backbone(model, str(tmp_path / "dino.pth"))
    assert model.pos_embed.shape == (1, 1 + 64, 192)
    torch.testing.assert_close(model.pos_embed[:, 0], dino.pos_embed[:, 0], rtol=0, atol=0)


def test_mismatches_are_one_line_errors(tmp_path):
    torch.save(cls_vit_tiny(patch_size=8).state_dict(), tmp_path / "patch8.pth")
    with pytest.raises(errors.UserError, match=r"shape mismatch .*patch_embed\.proj\.weight"):
        warm_start.init_backbone(sparo_tiny(), str(tmp_path / "patch8.pth"))
    state = cls_vit_tiny().state_dict()
    torch.save({k: v for k, v in state.items() if not k.startswith("blocks.3.")}, tmp_path / "short.pth")
    with pytest.raises(errors.UserError, match=r"missing keys: blocks\.3\."):
        warm_start.init_backbone(sparo_tiny(), str(tmp_path / "short.pth"))
    # with all blocks kept there is no block to leave out; a CLS model keeps them all too
    torch.save({**state, "blocks.12.norm1.weight": torch.ones(192)}, tmp_path / "deep.pth")
    with pytest.raises(errors.UserError, match=r"unexpected keys: blocks\.12\."):
        warm_start.init_backbone(sparo_tiny(sparo_keep_all_blocks=True), str(tmp_path / "deep.pth"))
    with pytest.raises(errors.UserError, match="has no 'teacher' weights"):
        torch.save({"model": state, "epoch": 3}, tmp_path / "other.pth")
        warm_start.init_backbone(sparo_tiny(), str(tmp_path / "other.pth"))


@pytest.mark.slow
def test_training_from_dino_weights_freezes_then_thaws_and_resumes_without_reloading(tmp_path):
    dino = cls_vit_tiny()
    save_dino_checkpoint(dino, tmp_path / "dino_full.pth")
    out = tmp_path / "run"
    args = [*TINY_TRAIN_ARGS, "--subset", "64", "--init_backbone", tmp_path / "dino_full.pth",
            "--freeze_backbone_epochs", "1", "--output_dir", out]
    first = run_script("main_dino_sparo.py", *args, "--epochs", "1")
    assert "Warm start from" in first.stdout and "dropped 12 tensors of blocks 11-11" in first.stdout
    checkpoint = weight_files.load_checkpoint(out / "checkpoint.pth")
    dino_state = dino.state_dict()
    for key, value in dino_state.items():
        if not key.startswith("blocks.11."):  # frozen: still DINO's tensors, bit for bit
            torch.testing.assert_close(checkpoint["student"][f"backbone.{key}"], value, rtol=0, atol=0)
            # the teacher is the EMA m*t + (1-m)*s of equal tensors: equal up to rounding
            torch.testing.assert_close(checkpoint["teacher"][f"backbone.{key}"], value,
                                       rtol=1e-6, atol=1e-8)
    sparo_keys = [k for k in checkpoint["student"] if ".sparo." in f".{k}"]
    assert sparo_keys and any(not torch.equal(checkpoint["student"][k], checkpoint["teacher"][k])
                              for k in sparo_keys)  # the read-out did learn

    second = run_script("main_dino_sparo.py", *args, "--epochs", "2")
    assert "is not applied" in second.stdout and "Warm start from" not in second.stdout
    assert "Resuming from" in second.stdout
    resumed = weight_files.load_checkpoint(out / "checkpoint.pth")["student"]
    assert not torch.equal(resumed["backbone.blocks.0.attn.qkv.weight"],
                           dino_state["blocks.0.attn.qkv.weight"])  # thawed in epoch 2


def test_negative_freeze_is_a_flag_error(tmp_path):
    result = run_script("main_dino_sparo.py", *TINY_TRAIN_ARGS, "--freeze_backbone_epochs", "-1",
                        "--output_dir", tmp_path / "run", check=False)
    assert result.returncode == 2 and result.stderr.startswith("error:")
    assert not (tmp_path / "run").exists()
