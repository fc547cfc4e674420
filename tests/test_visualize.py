"""visualize_slots.py: attention maps against independent computations, the PNG grids it writes
(sizes, content) for a trained checkpoint and a CLS checkpoint, and its errors on bad input."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
import errors
import features as feats
import slot_drawing as drawing
import vision_transformer as vits
import visualize_slots as vis
import weight_files
from helpers import run_script


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def digit_images(tmp_path_factory):
    """Three scikit-learn test digits as PNGs: 16x16, 24 wide x 16 high, and one in a sub-folder."""
    folder = tmp_path_factory.mktemp("digits_png")
    images, labels = datasets.load_digits_split("test")
    (folder / "sub").mkdir()
    paths = [folder / "square.png", folder / "wide.png", folder / "sub" / "square.png"]
    sizes = [(16, 16), (24, 16), (16, 16)]
    for path, image, size in zip(paths, images, sizes):
        Image.fromarray(image).resize(size, Image.BICUBIC).save(path)
    return folder, paths


@pytest.fixture(scope="module")
def cls_checkpoint(tmp_path_factory):
    """A CLS read-out backbone saved as a bare state dict (the layout of DINO's released files)."""
    torch.manual_seed(0)
    model = vits.vit_tiny(patch_size=4, img_size=16, readout="cls")
    path = tmp_path_factory.mktemp("cls") / "cls_backbone.pth"
    torch.save(model.state_dict(), path)
    return path


def network_input(path, size):
    return vis.to_network_input(datasets.load_rgb_image(str(path)), size)


# ------------------------------------------------------------------ attention computations
def test_slot_maps_are_the_slot_softmax_laid_out_row_major(tiny_sparo_checkpoint, digit_images):
    model, config = weight_files.load_backbone(str(tiny_sparo_checkpoint))
    model.eval()
    x = network_input(digit_images[1][1], (16, 24))           # 4 x 6 patches, not square
    maps = vis.attention_maps(model, x)
    num_slots = config["sparo_slots"]
    assert maps.patches.shape == (num_slots, 4, 6) and maps.cls_weight.shape == (num_slots,)

    # Independent: each slot's softmax_n(q_l . k_l(h_n) / sqrt(a)) from the module's weights.
    sparo = model.sparo
    with torch.no_grad():
        tokens = model.forward_tokens(x)[0]                    # (N, d)
        keys = (tokens @ sparo.key.weight.t() + sparo.key.bias).view(len(tokens), num_slots, -1)
        logits = torch.einsum("la,nla->ln", sparo.queries, keys) / math.sqrt(sparo.attn_dim)
        alpha = logits.softmax(dim=1).numpy()
    np.testing.assert_allclose(maps.cls_weight, alpha[:, 0], atol=1e-5)
    for row in range(4):
        for col in range(6):
            np.testing.assert_allclose(maps.patches[:, row, col], alpha[:, 1 + row * 6 + col], atol=1e-5)
    # Every slot's attention over CLS and patches sums to 1.
    np.testing.assert_allclose(maps.patches.sum(axis=(1, 2)) + maps.cls_weight, 1.0, atol=1e-5)

    # A trained checkpoint's slots look at different places: no two heat maps are the same.
    peak_scaled = maps.patches / maps.patches.max(axis=(1, 2), keepdims=True)
    distances = np.abs(peak_scaled[:, None] - peak_scaled[None]).max(axis=(2, 3))
    off_diagonal = distances[~np.eye(num_slots, dtype=bool)]
    assert off_diagonal.min() > 1e-3, f"two slots have the same map (distance {off_diagonal.min()})"


def test_cls_maps_are_the_cls_query_of_each_head(cls_checkpoint, digit_images):
    model, config = weight_files.load_backbone(str(cls_checkpoint))
    model.eval()
    x = network_input(digit_images[1][1], (16, 24))
    maps = vis.attention_maps(model, x)
    heads = model.num_heads
    assert maps.labels == [f"head {i}" for i in range(heads)] and maps.patches.shape == (heads, 4, 6)

    # Independent: softmax(q_CLS . k_n / sqrt(head_dim)) of the last block, head by head.
    block = model.blocks[-1]
    with torch.no_grad():
        h = model.prepare_tokens(x)
        for earlier in model.blocks[:-1]:
            h = earlier(h)
        h = block.norm1(h)[0]
        dim = model.embed_dim
        q = h @ block.attn.qkv.weight[:dim].t() + block.attn.qkv.bias[:dim]
        k = h @ block.attn.qkv.weight[dim:2 * dim].t() + block.attn.qkv.bias[dim:2 * dim]
        head_dim = dim // heads
        for head in range(heads):
            part = slice(head * head_dim, (head + 1) * head_dim)
            row = torch.softmax(q[0, part] @ k[:, part].t() / math.sqrt(head_dim), dim=0).numpy()
            assert abs(maps.cls_weight[head] - row[0]) < 1e-5
            np.testing.assert_allclose(maps.patches[head].ravel(), row[1:], atol=1e-5)
    np.testing.assert_allclose(maps.patches.sum(axis=(1, 2)) + maps.cls_weight, 1.0, atol=1e-5)


def test_threshold_mask_is_the_smallest_set_holding_the_mass():
    rng = np.random.default_rng(0)
    weights = rng.dirichlet(np.full(30, 0.3), size=50) * rng.uniform(0.2, 1.0, size=(50, 1))
    for fraction in (0.1, 0.6, 0.9, 0.99):
        mask = vis.threshold_mask(weights, fraction)
        for row, keep in zip(weights, mask):
            p = row / row.sum()
            # DINO's rule written from its script: sort ascending, keep cumsum > 1 - fraction.
            ascending = np.sort(p)
            expected_count = int((np.cumsum(ascending) > 1 - fraction + 1e-12).sum())
            assert keep.sum() == expected_count
            assert p[keep].sum() >= fraction - 1e-9
            assert p[keep].min() >= p[~keep].max(initial=0.0)     # the heaviest patches


def test_patch_entropy_matches_torch_categorical():
    rng = np.random.default_rng(1)
    weights = rng.uniform(size=(5, 12)) * 0.7                  # rows need not sum to 1
    expected = torch.distributions.Categorical(probs=torch.tensor(weights)).entropy().numpy()
    np.testing.assert_allclose(drawing.patch_entropy(weights), expected, rtol=1e-10)
    assert drawing.patch_entropy(np.ones((1, 49)))[0] == pytest.approx(math.log(49))
    assert drawing.patch_entropy(np.eye(4))[0] == 0.0


def test_nearest_upsampling_and_top_k_selection():
    grid = np.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(drawing.upsample_nearest(grid, 8, 12), np.kron(grid, np.ones((4, 4))))
    odd = drawing.upsample_nearest(grid, 5, 7)                       # pixel centres decide
    assert odd[0, 0] == 0 and odd[4, 6] == 5 and odd[1, 3] == 1 and odd[3, 2] == 4

    patches = np.stack([np.ones((2, 2)), np.eye(2), np.array([[1.0, 0.0], [0.0, 0.0]]),
                        np.array([[3.0, 1.0], [1.0, 1.0]])])
    maps = vis.AttentionMaps([f"slot {i}" for i in range(4)], patches, np.zeros(4))
    assert vis.select_maps(maps, None, 2).labels == ["slot 2", "slot 1"]   # entropy 0, log 2
    assert vis.select_maps(maps, [0, 3, 1], 2).labels == ["slot 1", "slot 3"]
    assert vis.select_maps(maps, [3, 0, 3], None).labels == ["slot 3", "slot 0"]


def test_colormap_runs_from_dark_purple_to_yellow_with_rising_luminance():
    colours = drawing.colormap(np.linspace(0, 1, 50)).astype(float)
    assert tuple(colours[0]) == (0x44, 0x01, 0x54) and tuple(colours[-1]) == (0xFD, 0xE7, 0x25)
    luminance = colours @ np.array([0.299, 0.587, 0.114])
    assert np.all(np.diff(luminance) > 0)


# --------------------------------------------------------------------------- the script
def expected_grid_size(panels, columns, panel_w, panel_h, header_lines):
    rows = math.ceil(panels / columns)
    header = drawing.PAD + header_lines * drawing.LINE_HEIGHT + drawing.COLORBAR_HEIGHT + 2 * drawing.PAD
    return (drawing.PAD + columns * (panel_w + drawing.PAD),
            header + rows * (drawing.TITLE_HEIGHT + panel_h + drawing.PAD) + drawing.PAD)


def panel_box(index, columns, panel_w, panel_h, header_lines):
    """Pixel box of the image part of panel `index` in a grid (left, top, right, bottom)."""
    header = drawing.PAD + header_lines * drawing.LINE_HEIGHT + drawing.COLORBAR_HEIGHT + 2 * drawing.PAD
    row, column = divmod(index, columns)
    left = drawing.PAD + column * (panel_w + drawing.PAD)
    top = header + row * (drawing.TITLE_HEIGHT + panel_h + drawing.PAD) + drawing.TITLE_HEIGHT
    return left, top, left + panel_w, top + panel_h


def test_script_writes_a_readable_grid_for_a_trained_checkpoint(tiny_sparo_checkpoint, digit_images,
                                                                 tmp_path):
    _, paths = digit_images
    out = tmp_path / "vis"
    result = run_script("visualize_slots.py", "--pretrained_weights", tiny_sparo_checkpoint,
                        "--image_path", paths[1], "--output_dir", out, "--slots", "0,3,5",
                        "--columns", "3", "--display_size", "160", "--threshold", "0.5")
    png = out / "wide_slots.png"
    assert png.exists() and str(png) in result.stdout
    grid = np.asarray(Image.open(png).convert("RGB"))
    # The 24x16 image is the network input (the model was trained at 16 px): panels 240x160,
    # the image and 3 slots in rows of 3 under a 3-line header.
    width, height = expected_grid_size(4, 3, 240, 160, header_lines=3)
    assert (grid.shape[1], grid.shape[0]) == (width, height)

    crop = lambda i: grid[panel_box(i, 3, 240, 160, 3)[1]:panel_box(i, 3, 240, 160, 3)[3],
                          panel_box(i, 3, 240, 160, 3)[0]:panel_box(i, 3, 240, 160, 3)[2]].astype(int)
    image_panel = crop(0)
    assert np.array_equal(image_panel[..., 0], image_panel[..., 1])       # the grey input
    heat = [crop(i) for i in (1, 2, 3)]
    for a in range(3):
        for b in range(a + 1, 3):
            assert np.abs(heat[a] - heat[b]).mean() > 1.0, "two slots drew the same heat map"
    red = lambda panel: np.all(panel == drawing.CONTOUR_COLOR, axis=-1).sum()
    assert all(red(panel) > 0 for panel in heat)                          # threshold outlines


def test_script_on_a_folder_with_top_k(tiny_sparo_checkpoint, digit_images, tmp_path):
    folder, _ = digit_images
    out = tmp_path / "vis"
    vis.main(["--pretrained_weights", str(tiny_sparo_checkpoint), "--image_path", str(folder),
              "--output_dir", str(out), "--top_k", "4", "--columns", "5", "--display_size", "160"])
    names = sorted(p.name for p in out.iterdir())
    assert names == ["square_slots.png", "sub_square_slots.png", "wide_slots.png"]
    size = Image.open(out / "square_slots.png").size
    assert size == expected_grid_size(5, 5, 160, 160, header_lines=2)


def test_cls_checkpoint_draws_one_panel_per_head(cls_checkpoint, digit_images, tmp_path):
    _, paths = digit_images
    out = tmp_path / "vis"
    vis.main(["--pretrained_weights", str(cls_checkpoint), "--image_path", str(paths[0]),
              "--output_dir", str(out), "--image_size", "32", "--display_size", "160"])
    grid = Image.open(out / "square_heads.png")
    assert grid.size == expected_grid_size(1 + 3, 4, 160, 160, header_lines=2)  # vit_tiny: 3 heads


def test_bad_input_gives_one_clear_line(tiny_sparo_checkpoint, cls_checkpoint, digit_images, tmp_path):
    _, paths = digit_images
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.png").write_text("not an image")
    ckpt = ["--pretrained_weights", str(tiny_sparo_checkpoint), "--output_dir", str(tmp_path / "o")]
    cases = [
        (ckpt + ["--image_path", str(tmp_path / "missing.png")], "does not exist"),
        (ckpt + ["--image_path", str(tmp_path / "empty")], "holds no images"),
        (ckpt + ["--image_path", str(tmp_path / "broken.png")], "cannot read image"),
        (ckpt + ["--image_path", str(paths[0]), "--slots", "1,99"], "--slots must name slots between 0 and 15"),
        (ckpt + ["--image_path", str(paths[0]), "--threshold", "1.5"], "--threshold"),
        (["--pretrained_weights", str(cls_checkpoint), "--image_path", str(paths[0]), "--top_k", "2"],
         "--top_k needs a SPARO checkpoint"),
        (["--pretrained_weights", str(cls_checkpoint), "--image_path", str(paths[0]), "--slots", "0"],
         "--slots needs a SPARO checkpoint"),
        (["--pretrained_weights", str(tmp_path / "none.pth"), "--image_path", str(paths[0])],
         "does not exist"),
    ]
    for argv, message in cases:
        with pytest.raises(errors.UserError, match=message):
            vis.main(argv)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())

    # From the command line: exit status 2 and one line on stderr, no traceback.
    result = run_script("visualize_slots.py", *cases[3][0], check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --slots must name slots between 0 and 15, got '1,99'"]


# ------------------------------------------------------------------------ slot_gallery.py
def test_slot_gallery_numbers_match_an_independent_computation(tiny_sparo_checkpoint, tmp_path):
    import slot_gallery

    out = tmp_path / "gallery"
    slot_gallery.main(["--pretrained_weights", str(tiny_sparo_checkpoint), "--data_path", "digits",
                       "--output_dir", str(out), "--num_workers", "0", "--slots", "0,3,7,12",
                       "--images_per_slot", "5", "--top_k", "2", "--knn_backend", "torch",
                       "--train_subset", "800", "--test_subset", "200"])
    summary = json.loads((out / "slot_stats.json").read_text())
    assert [r["slot"] for r in summary["slots"]] == [0, 3, 7, 12]
    assert (summary["num_train"], summary["num_test"], summary["k"]) == (800, 200, 20)

    # Independent: features and attention straight from the model, k-NN written out here.
    model, config = weight_files.load_backbone(str(tiny_sparo_checkpoint))
    model.eval()
    transform = feats.eval_transform(config["img_size"])
    def encode(split, subset):
        dataset = datasets.build_dataset("digits", split, transform, subset=subset)
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])
        with torch.no_grad():
            return model(images), model.get_slot_attention(images), torch.as_tensor(datasets.dataset_labels(dataset))
    train, _, train_labels = encode("train", 800)
    test, attention, test_labels = encode("test", 200)
    num_slots = config["sparo_slots"]
    for record in summary["slots"]:
        slot = record["slot"]
        unit = lambda enc: torch.nn.functional.normalize(enc.view(len(enc), num_slots, -1)[:, slot], dim=1)
        sims, index = (unit(test) @ unit(train).t()).topk(20, dim=1)
        votes = torch.zeros(len(test), 10, dtype=torch.float64)
        votes.scatter_add_(1, train_labels[index], (sims.double() / 0.07).exp())
        accuracy = (votes.argmax(1) == test_labels).double().mean().item() * 100
        assert record["knn_top1"] == pytest.approx(accuracy, abs=1e-6)
        patches = attention[:, slot, 1:] / attention[:, slot, 1:].sum(1, keepdim=True)
        entropy = -(patches * patches.clamp_min(1e-38).log()).sum(1).mean().item()
        assert record["entropy"] == pytest.approx(entropy, rel=1e-4)
        assert record["cls_weight"] == pytest.approx(attention[:, slot, 0].mean().item(), rel=1e-4)
        mean = unit(test).mean(0)
        assert record["mean_resultant_length"] == pytest.approx(mean.norm().item(), rel=1e-4)
        cosine = unit(test) @ (mean / mean.norm())
        assert record["nearest"] == cosine.topk(5).indices.tolist()
    assert 0 <= min(r["knn_top1"] for r in summary["slots"]) and summary["all_slots_knn_top1"] > 50

    # The gallery: two rows (the two most concentrated of the four slots), five thumbnails each.
    thumbnail, cell_h = 64, drawing.LINE_HEIGHT + 4 + 64
    gallery = Image.open(out / "slot_gallery.png")
    header = drawing.PAD + 4 * drawing.LINE_HEIGHT + drawing.COLORBAR_HEIGHT + 2 * drawing.PAD
    assert gallery.height == header + 2 * (cell_h + drawing.PAD) + drawing.PAD
    assert gallery.width >= slot_gallery.ROW_LABEL_WIDTH + 5 * (thumbnail + drawing.PAD)


def test_slot_gallery_refuses_a_cls_checkpoint(cls_checkpoint, tmp_path):
    import slot_gallery

    with pytest.raises(errors.UserError, match="slot_gallery.py needs a SPARO checkpoint"):
        slot_gallery.main(["--pretrained_weights", str(cls_checkpoint), "--data_path", "digits",
                           "--output_dir", str(tmp_path), "--num_workers", "0"])


def test_control_checkpoints_draw_the_last_blocks_heads_and_refuse_slot_options(
        tiny_control_checkpoint, digit_images, tmp_path):
    """gap and cls_proj keep every block: DINO's CLS-query maps of the last block are drawn (the
    same computation as for CLS, tested above); they have no slots to pick or rank."""
    import slot_gallery

    _, paths = digit_images
    model, config = weight_files.load_backbone(str(tiny_control_checkpoint))
    maps = vis.attention_maps(model.eval(), network_input(paths[0], (16, 16)))
    with torch.no_grad():
        expected = model.get_last_selfattention(network_input(paths[0], (16, 16)))[0, :, 0]
    np.testing.assert_allclose(maps.cls_weight, expected[:, 0].numpy(), atol=1e-6)
    assert maps.labels == ["head 0", "head 1", "head 2"] and len(model.blocks) == 12
    out = tmp_path / "vis"
    vis.main(["--pretrained_weights", str(tiny_control_checkpoint), "--image_path", str(paths[0]),
              "--output_dir", str(out), "--image_size", "32", "--display_size", "160"])
    assert Image.open(out / "square_heads.png").size == expected_grid_size(1 + 3, 4, 160, 160, header_lines=2)
    assert f"{config['readout']} read-out" in drawing.describe_model(config)
    base = ["--pretrained_weights", str(tiny_control_checkpoint), "--image_path", str(paths[0])]
    for flag, value in (("--top_k", "2"), ("--slots", "0")):
        with pytest.raises(errors.UserError, match=f"{flag} needs a SPARO checkpoint; this one has "
                                                  f"readout='{config['readout']}'"):
            vis.main(base + ["--output_dir", str(tmp_path / "o"), flag, value])
    with pytest.raises(errors.UserError, match="slot_gallery.py needs a SPARO checkpoint"):
        slot_gallery.main(["--pretrained_weights", str(tiny_control_checkpoint), "--data_path", "digits",
                           "--output_dir", str(tmp_path / "g"), "--num_workers", "0"])


def test_a_second_run_into_the_image_folder_skips_the_first_runs_grids(tmp_path):
    for name in ("a.png", "a_slots.png", "b_heads.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    assert [p.name for p in vis.list_images(str(tmp_path), str(tmp_path))] == ["a.png"]
    assert len(vis.list_images(str(tmp_path), str(tmp_path / "elsewhere"))) == 3
