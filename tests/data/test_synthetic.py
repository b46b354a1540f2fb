import json
import math

import pytest
import torch

from conftest import tiny_swin, tiny_vit
from vitq.cli import main
from vitq.data.synthetic import GenerationDiverged, GeneratorSettings, create_generator
from vitq.data.synthetic.generators import SEGMENTATION_PIXEL_WEIGHT
from vitq.data.synthetic.io import denormalize
from vitq.data.synthetic.losses import (patch_contrastive_loss, patch_similarity_entropy, pixel_information_loss,
                                        total_variation)
from vitq.errors import VitqError
from vitq.models import load_model


def test_contrastive_loss_exact_on_a_constant_grid():
    # every similarity is 1: interior anchors have 8 neighbours and 4 positives (log 2), edge anchors
    # 5 neighbours (log 5/4), corner anchors 3 neighbours that are all positives (0)
    loss = patch_contrastive_loss(torch.ones(1, 4, 4, 8), window=3, positives=4, tau=0.1)
    expected = (4 * torch.log(torch.tensor(2.0)) + 8 * torch.log(torch.tensor(1.25))) / 16
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("window", [3, 5])
def test_window_similarities_from_the_similarity_matrix_equal_the_shifted_products(monkeypatch, window):
    from vitq.data.synthetic import losses

    torch.manual_seed(0)
    grid = torch.randn(3, 5, 7, 16, requires_grad=True)
    fast, valid = losses._neighbour_similarities(grid, window)
    (g_fast,) = torch.autograd.grad(losses.patch_contrastive_loss(grid, window, 4), grid)
    monkeypatch.setattr(losses, "GRAM_LIMIT", 0)  # the windowed products
    slow, valid_slow = losses._neighbour_similarities(grid, window)
    (g_slow,) = torch.autograd.grad(losses.patch_contrastive_loss(grid, window, 4), grid)
    assert torch.equal(valid, valid_slow)
    assert torch.allclose(fast, slow, atol=1e-6) and torch.allclose(g_fast, g_slow, atol=1e-6)
    assert fast.shape == (3, 5, 7, window**2 - 1) and not fast[~valid.expand_as(fast)].any()


@pytest.mark.parametrize("negatives", ["window", "image"])
def test_contrastive_loss_is_cosine_based_and_descends(negatives):
    torch.manual_seed(0)
    grid = torch.randn(2, 6, 6, 16)
    loss = patch_contrastive_loss(grid, negatives=negatives)
    assert patch_contrastive_loss(3.0 * grid, negatives=negatives).item() == pytest.approx(loss.item(), rel=1e-5)
    grid.requires_grad_(True)
    for _ in range(20):
        value = patch_contrastive_loss(grid, negatives=negatives)
        (g,) = torch.autograd.grad(value, grid)
        grid = (grid - 5.0 * g).detach().requires_grad_(True)
    assert patch_contrastive_loss(grid, negatives=negatives) < loss


def test_similarity_entropy_ascends():
    torch.manual_seed(0)
    grid = torch.randn(2, 4, 4, 32, requires_grad=True)
    start = patch_similarity_entropy(grid).detach()
    assert start.shape == (2,)
    for _ in range(10):
        (g,) = torch.autograd.grad(patch_similarity_entropy(grid).sum(), grid)
        grid = (grid + 1.0 * g).detach().requires_grad_(True)
    assert (patch_similarity_entropy(grid) > start).all()


def test_total_variation_exact():
    x = torch.zeros(1, 1, 2, 2)
    x[0, 0, 0, 0] = 1.0
    # vertical diffs: (−1, 0) → mean 0.5; horizontal: (−1, 0) → mean 0.5
    assert total_variation(x).item() == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["psaq", "clamp"])
@pytest.mark.parametrize("make", [tiny_vit, tiny_swin], ids=["vit", "swin"])
def test_generators_lower_their_loss_and_keep_images_in_range(name, make):
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = load_model(model).data_config
    result = create_generator(name, {"iterations": 30, "batch_size": 3, "lr": 0.1}).generate(
        model, 5, cfg, seed=0, progress=False)
    assert result.images.shape == (5, 3, 32, 32)
    assert torch.isfinite(result.images).all()
    pixels = denormalize(result.images, cfg)
    assert torch.equal(pixels, pixels.clamp(0, 1))
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < first
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is untouched
    assert all(p.requires_grad for p in model.parameters())


def test_label_smoothing_stops_the_images_at_the_smoothed_confidence():
    """The cross-entropy's optimum with smoothing ε over K classes is a target probability of
    1 − ε + ε/K: the images are no longer pushed towards certainty."""
    model = tiny_vit()
    with torch.no_grad():  # a head with logits wide enough that certainty is within reach
        model.head.weight.mul_(30)
    cfg = load_model(model).data_config

    def confidence(eps):
        settings = {"iterations": 60, "lr": 0.1, "patch_weight": 0.0, "tv_weight": 0.0, "jitter": 0.0,
                    "flip": False, "label_smoothing": eps}
        made = create_generator("clamp", settings).generate(model, 4, cfg, seed=0, progress=False)
        with torch.no_grad():
            probs = model(made.images).softmax(-1)
        return probs.gather(1, made.targets[:, None]).mean().item()

    sharp, smoothed = confidence(0.0), confidence(0.6)
    assert sharp > 0.9
    assert abs(smoothed - (1 - 0.6 + 0.6 / 4)) < 0.1
    with pytest.raises(VitqError, match="label_smoothing"):
        GeneratorSettings(label_smoothing=1.0)


def test_bfloat16_autocast_generates_float32_images_and_lowers_the_loss():
    model = tiny_vit()
    cfg = load_model(model).data_config
    settings = {"iterations": 30, "batch_size": 3, "lr": 0.1, "precision": "bfloat16"}
    result = create_generator("clamp", settings).generate(model, 3, cfg, seed=0, progress=False)
    assert result.images.dtype == torch.float32 and torch.isfinite(result.images).all()
    assert sum(result.losses[-3:]) < sum(result.losses[:3])
    assert next(model.parameters()).dtype == torch.float32
    reference = create_generator("clamp", {**settings, "precision": "float32"}).generate(
        model, 3, cfg, seed=0, progress=False)
    assert not torch.equal(reference.images, result.images)  # the setting reached the forward pass
    with pytest.raises(VitqError, match="precision"):
        GeneratorSettings(precision="int8")


def test_roughness_exact_on_a_ramp():
    from vitq.data.synthetic.losses import roughness

    ramp = torch.arange(4.0).repeat(1, 2, 4, 1)  # x[..., i, j] = j: steps of 1 across, 0 down
    assert roughness(ramp).item() == pytest.approx(3.0)  # across 1, down 0, both diagonals 1
    assert roughness(2 * ramp).item() == pytest.approx(6.0)


def test_tv_target_holds_the_images_roughness_psaq_style():
    from vitq.data.synthetic.losses import roughness

    model = tiny_vit()
    cfg = load_model(model).data_config
    only_prior = {"iterations": 80, "lr": 0.05, "ce_weight": 0.0, "patch_weight": 0.0, "jitter": 0.0, "flip": False}
    start = roughness(create_generator("clamp", {**only_prior, "iterations": 1, "lr": 1e-9}).generate(
        model, 4, cfg, progress=False).images).item()
    held = roughness(create_generator("clamp", {**only_prior, "tv_target": 1.5}).generate(
        model, 4, cfg, progress=False).images).item()
    assert start > 3 and abs(held - 1.5) < 0.2
    with pytest.raises(VitqError, match="tv_target"):
        GeneratorSettings(tv_target=0.0)


def test_same_seed_same_images():
    model = tiny_vit()
    cfg = load_model(model).data_config
    gen = create_generator("clamp", {"iterations": 3})
    a = gen.generate(model, 2, cfg, seed=1, progress=False).images
    b = gen.generate(model, 2, cfg, seed=1, progress=False).images
    c = gen.generate(model, 2, cfg, seed=2, progress=False).images
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_gaussian_matches_input_statistics():
    model = tiny_vit()
    cfg = load_model(model).data_config
    images = create_generator("gaussian").generate(model, 64, cfg, progress=False).images
    assert abs(images.mean().item()) < 0.1 and 0.7 < images.std().item() < 1.05


def _nan_vit():
    model = tiny_vit()
    with torch.no_grad():
        model.head.bias[0] = float("nan")
    return model


def test_divergence_is_reported_with_the_step_and_images_kept():
    model = _nan_vit()
    cfg = load_model(model).data_config
    gen = create_generator("clamp", {"iterations": 5, "batch_size": 2})
    with pytest.raises(GenerationDiverged, match="step 1") as info:
        gen.generate(model, 3, cfg, progress=False)
    assert info.value.images.shape == (2, 3, 32, 32)
    assert torch.isfinite(info.value.images).all()


@pytest.mark.parametrize("num", [0, -3, 2.5])
def test_bad_image_counts(num):
    model = tiny_vit()
    with pytest.raises(VitqError, match="positive integer"):
        create_generator("clamp").generate(model, num, load_model(model).data_config, progress=False)


def test_unknown_generator_and_settings():
    with pytest.raises(VitqError, match="unknown generator 'clampp'"):
        create_generator("clampp")
    with pytest.raises(VitqError, match="unknown key"):
        create_generator("clamp", {"temperature": 0.1})
    with pytest.raises(VitqError, match="window"):
        GeneratorSettings(window=4)


def test_model_without_token_grids_is_refused():
    import timm

    model = timm.create_model("resnet18", num_classes=4)
    with pytest.raises(VitqError, match="not a supported model family"):
        create_generator("psaq", {"iterations": 1}).generate(
            model, 1, {"input_size": (3, 32, 32), "mean": (0, 0, 0), "std": (1, 1, 1)}, progress=False)


def test_cli_generate_then_calibrate_on_the_files(checkpoint, image_folder, tmp_path, capsys):
    gen_out = tmp_path / "gen"
    rc = main(["generate", str(checkpoint), "--generator", "clamp", "--num-images", "4", "--iterations", "3",
               "--out", str(gen_out), "--device", "cpu", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert (gen_out / "grid.png").is_file() and len(list((gen_out / "images").rglob("*.png"))) == 4
    stats = json.loads((gen_out / "stats.json").read_text())
    assert stats["num_images"] == 4 and 0 <= stats["mean_confidence"] <= 1
    out = tmp_path / "run"
    rc = main(["quantize", str(checkpoint), "--recipe", "minmax", "--calib", str(gen_out / "images"),
               "--eval", str(image_folder), "--out", str(out), "--device", "cpu", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["num_calib"] == 4


def test_cli_quantize_data_free(checkpoint, image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["quantize", str(checkpoint), "--recipe", "omse", "--w-bits", "4", "--data-free", "psaq",
               "--num-images", "3", "--iterations", "2", "--eval", str(image_folder), "--out", str(out),
               "--device", "cpu", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data_free"] == "psaq" and metrics["num_calib"] == 3
    assert (out / "grid.png").is_file() and (out / "stats.json").is_file()


def test_cli_data_free_skips_the_stages_gated_to_real_images(checkpoint, image_folder, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nstages: [calibrate, {gptq: {images: real}}]\n")
    base = ["quantize", str(checkpoint), "--recipe", str(recipe), "--w-bits", "4", "--device", "cpu", "--quiet"]
    assert main(base + ["--data-free", "gaussian", "--num-images", "2", "--out", str(tmp_path / "df")]) == 0, \
        capsys.readouterr().err
    meta = json.loads((tmp_path / "df" / "plan.json").read_text())["meta"]
    assert meta["skipped_stages"] == {"gptq": "generated (data-free) images"}
    assert main(base + ["--calib", str(image_folder), "--out", str(tmp_path / "real")]) == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "real" / "plan.json").read_text())["meta"]
    assert "skipped_stages" not in meta and "skipped" not in meta["gptq"]


def test_cli_generation_failure_keeps_images(checkpoint, tmp_path, capsys):
    torch.save(_nan_vit().state_dict(), checkpoint)  # the same architecture, with a NaN in the head
    out = tmp_path / "gen"
    rc = main(["generate", str(checkpoint), "--num-images", "2", "--iterations", "4",
               "--out", str(out), "--device", "cpu", "--quiet"])
    assert rc == 2
    assert "step" in capsys.readouterr().err
    assert not out.exists()
    partial = tmp_path / "gen.partial"
    assert (partial / "error.txt").is_file() and len(list((partial / "images").rglob("*.png"))) == 2


def test_cli_rejects_bad_counts_and_generators(checkpoint, tmp_path):
    for argv in (["--num-images", "0"], ["--num-images", "-1"], ["--generator", "nope"]):
        with pytest.raises(SystemExit) as info:
            main(["generate", str(checkpoint), "--out", str(tmp_path / "g"), *argv])
        assert info.value.code == 2


def test_cli_refuses_mixed_real_and_synthetic_options(checkpoint, image_folder, tmp_path, capsys):
    base = ["quantize", str(checkpoint), "--out", str(tmp_path / "r"), "--device", "cpu", "--quiet"]
    assert main(base + ["--data-free", "clamp", "--num-calib", "4"]) == 2
    assert "--num-images" in capsys.readouterr().err
    assert main(base + ["--calib", str(image_folder), "--num-images", "4"]) == 2
    assert "--num-calib" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(base + ["--calib", str(image_folder), "--data-free", "clamp"])


def test_pixel_information_loss_exact_on_hand_made_scores():
    """Pixel entropy minus the entropy of the classes' share: uniform pixels give log K − log K = 0;
    confident pixels split evenly over K classes give 0 − log K; all confident in one class give 0."""
    K = 4
    assert pixel_information_loss(torch.zeros(2, K, 3, 5)).item() == pytest.approx(0.0, abs=1e-6)
    even = torch.full((2, K, 2, 2), -1e4)
    for c in range(K):  # each class owns one pixel of each image
        even[:, c, c // 2, c % 2] = 1e4
    assert pixel_information_loss(even).item() == pytest.approx(-math.log(K), abs=1e-5)
    one = torch.full((2, K, 2, 2), -1e4)
    one[:, 1] = 1e4
    assert pixel_information_loss(one).item() == pytest.approx(0.0, abs=1e-5)
    # one pixel at [0.5, 0.5, 0, 0], the other confident in class 2: mean pixel entropy log(2)/2,
    # shares [0.25, 0.25, 0.5, 0]: entropy 1.5·log 2
    mixed = torch.tensor([[0.0, 0.0, -1e4, -1e4], [-1e4, -1e4, 1e4, -1e4]]).T.reshape(1, K, 1, 2)
    assert pixel_information_loss(mixed).item() == pytest.approx(0.5 * math.log(2) - 1.5 * math.log(2), abs=1e-5)
    with pytest.raises(ValueError, match=r"\[B, K, H, W\]"):
        pixel_information_loss(torch.zeros(2, K))


def test_pixel_weight_shapes_a_segmenters_images_with_its_scores():
    """With pixel_weight a segmentation model's images are made with its per-pixel information loss
    (recorded as an output loss), and that loss is lower on them than on images made without it."""
    import timm

    from vitq.models import ViTSegmenter

    torch.manual_seed(0)
    seg = ViTSegmenter(timm.create_model("test_vit", img_size=(32, 48), patch_size=8, num_classes=0), [0, 1], 3,
                       hidden=8).eval()
    with torch.no_grad():  # a random head's scores are near-uniform: make them depend on the image
        seg.head[-1].weight.mul_(50)
    config = {"input_size": (3, 32, 48), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    made = {}
    for weight in (0.0, 5.0):
        gen = create_generator("clamp", {"iterations": 20, "batch_size": 4, "pixel_weight": weight})
        made[weight] = gen.generate(seg, 4, config, seed=0, progress=False)
    assert not made[0.0].output_loss and made[5.0].output_loss
    # no setting: a segmentation model (task "segmentation") gets the loss at SEGMENTATION_PIXEL_WEIGHT
    default = create_generator("clamp", {"iterations": 20, "batch_size": 4}).generate(seg, 4, config, seed=0,
                                                                                  progress=False)
    explicit = create_generator("clamp", {"iterations": 20, "batch_size": 4,
                                          "pixel_weight": SEGMENTATION_PIXEL_WEIGHT}).generate(seg, 4, config, seed=0,
                                                                                               progress=False)
    assert SEGMENTATION_PIXEL_WEIGHT > 0 and default.output_loss
    assert torch.equal(default.images, explicit.images)
    with torch.no_grad():
        info = {w: pixel_information_loss(seg(r.images)).item() for w, r in made.items()}
    assert info[5.0] < info[0.0] - 0.05
    assert not create_generator("gaussian", {"pixel_weight": 1.0}).generate(seg, 2, config, progress=False).output_loss
    with pytest.raises(VitqError, match="pixel_weight"):
        GeneratorSettings(pixel_weight=-1.0)
    # a model without per-pixel scores (a bare backbone's features) or a classifier: named, not ignored
    backbone = timm.create_model("test_vit", img_size=(32, 48), patch_size=8, num_classes=0).eval()
    with pytest.raises(VitqError, match=r"per-pixel class scores \[B, K, H, W\].*shape \(2, "):
        create_generator("clamp", {"iterations": 2, "pixel_weight": 1.0}).generate(backbone, 2, config, progress=False)
    classifier = timm.create_model("test_vit", img_size=(32, 48), patch_size=8, num_classes=5).eval()
    with pytest.raises(VitqError, match="ce_weight"):
        create_generator("clamp", {"iterations": 2, "pixel_weight": 1.0}).generate(classifier, 2, config, progress=False)
    # without the setting neither gets the pixel loss (the classifier keeps its cross-entropy) and neither is refused
    assert not create_generator("clamp", {"iterations": 2}).generate(backbone, 2, config, progress=False).output_loss
    assert create_generator("clamp", {"iterations": 2}).generate(classifier, 2, config, progress=False).output_loss


def test_crop_scale_zooms_into_the_images_seeded_and_still_lowers_the_loss():
    from vitq.data.synthetic.generators import _random_zoom

    gen = torch.Generator().manual_seed(0)
    ramp = torch.arange(32.0).expand(1, 3, 32, 32).clone()
    zoomed = _random_zoom(ramp, 0.25, gen)
    assert zoomed.shape == ramp.shape
    steps = zoomed[0, 0, 0, 1:-1].diff()  # a crop of a ramp resized up is a ramp with smaller steps
    assert 0.45 < steps.min().item() <= steps.max().item() < 1.0
    assert torch.equal(_random_zoom(torch.full((1, 3, 8, 8), 0.3), 0.1, gen), torch.full((1, 3, 8, 8), 0.3))
    assert torch.equal(_random_zoom(ramp, 1.0, gen), ramp)

    model = tiny_vit()
    cfg = load_model(model).data_config
    settings = {"iterations": 30, "batch_size": 3, "lr": 0.1, "crop_scale": 0.3}
    made = create_generator("clamp", settings).generate(model, 3, cfg, seed=0, progress=False)
    assert sum(made.losses[-3:]) < sum(made.losses[:3])
    again = create_generator("clamp", settings).generate(model, 3, cfg, seed=0, progress=False)
    assert torch.equal(made.images, again.images)
    plain = create_generator("clamp", {**settings, "crop_scale": 1.0}).generate(model, 3, cfg, seed=0, progress=False)
    assert not torch.equal(plain.images, made.images)
    for bad in (0, 1.5, True):
        with pytest.raises(VitqError, match="crop_scale"):
            GeneratorSettings(crop_scale=bad)
