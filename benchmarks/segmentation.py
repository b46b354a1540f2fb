"""Dense prediction (issue 13): vitq's reference CamVid segmentation model, and its quantization table.

    python benchmarks/segmentation.py --build-model --out DIR [--assets DIR]
    python benchmarks/segmentation.py --bench --model DIR/model.pth [--methods ...] [--bits w8a8 ...] [--append]
    python benchmarks/segmentation.py --render

``--build-model`` trains the reference model deterministically from ``$VITQ_ASSETS/camvid``: the
ImageNet DeiT-Tiny (``models/deit_tiny_imagenet.pth``) as a frozen backbone at 352×480 (its position
embedding resampled from 14×14 to a 22×30 grid), the features of some of its blocks, and a small
convolutional head (:class:`vitq.models.ViTSegmenter`) trained on ``train/`` with cross-entropy
(void ignored), horizontal flips as the only augmentation (the backbone features are computed once
per image and flip). The head's shape and the number of epochs are chosen by mIoU on ``val/``;
``test/`` is scored once, at the end, for the card. Writes ``DIR/model.pth`` (a state_dict),
``DIR/model.json`` (its vitq model card) and ``DIR/train_log.json``. On one CPU the build gives the
same weights every time; on another CPU their last bits differ (an AMD EPYC and an Intel Xeon build
score the same val 66.781 and test 57.147 mIoU, but have other checksums), so the table keeps rows of
such builds together and marks them.

``--bench`` quantizes that model's backbone with each method at each bit-width (calibration: seeded
train/ images; evaluation: all 233 test/ images) and writes benchmarks/results/segmentation.json
and the "Dense prediction" section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from foundation import machine, write_section  # noqa: E402

from vitq.data import assets_dir, scan_segmentation, segmentation_loader  # noqa: E402
from vitq.eval.segmentation import confusion_matrix, iou_per_class, mean_iou  # noqa: E402
from vitq.models import ViTSegmenter, load_model, resize_vit_grid  # noqa: E402
from vitq.models.loading import read_state_dict  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS_JSON = HERE / "results" / "segmentation.json"
SIZE = (352, 480)  # CamVid's 360×480 scenes at a multiple of the patch size (22×30 patches)
BACKBONE = "deit_tiny_patch16_224"
INDICES = [3, 7, 11]
#: head shapes tried on val/ (hidden channels, first kernel); the best one is kept
HEADS = [(0, 1), (256, 1), (256, 3)]
EPOCHS = 30
CHECK_EVERY = 5


def _backbone(assets: Path) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """The ImageNet DeiT-Tiny at 352×480 without its classifier."""
    import timm

    card = json.loads((assets / "models" / "deit_tiny_imagenet.json").read_text())
    state = read_state_dict(assets / "models" / "deit_tiny_imagenet.pth")
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    grid = (SIZE[0] // 16, SIZE[1] // 16)
    state = resize_vit_grid(state, grid)
    model = timm.create_model(BACKBONE, pretrained=False, img_size=SIZE, num_classes=0)
    model.load_state_dict(state, strict=True)
    return model.eval(), card


def _data_config(card: Dict[str, Any]) -> Dict[str, Any]:
    dc = card["data_config"]
    return {"input_size": (3, *SIZE), "interpolation": dc["interpolation"], "crop_pct": 1.0,
            "mean": tuple(dc["mean"]), "std": tuple(dc["std"])}


@torch.no_grad()
def _features(seg: ViTSegmenter, data, data_config, flip: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Backbone features (float16) and label maps of a split, with their mirror images if ``flip``."""
    feats, labels = [], []
    for images, label in segmentation_loader(data, data_config, batch_size=8):
        feats.append(seg.features(images).half())
        labels.append(label.to(torch.uint8))
        if flip:
            feats.append(seg.features(images.flip(-1)).half())
            labels.append(label.flip(-1).to(torch.uint8))
        print(f"\r  features: {sum(len(f) for f in feats)} maps", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return torch.cat(feats), torch.cat(labels)


def _scores(seg: ViTSegmenter, feats: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore: int
            ) -> Tuple[float, List]:
    seg.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    with torch.no_grad():
        for i in range(0, len(feats), 16):
            logits = seg.classify(feats[i:i + 16].float(), SIZE)
            logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
            cm += confusion_matrix(logits.argmax(1), labels[i:i + 16].long(), num_classes, ignore)
    return mean_iou(cm), iou_per_class(cm)


def _train_head(seg: ViTSegmenter, train: Tuple[torch.Tensor, torch.Tensor], val, num_classes: int, ignore: int,
                seed: int, log: List[Dict[str, Any]], tag: str) -> Tuple[int, float]:
    """AdamW with cosine decay on the head's parameters; the val mIoU every ``CHECK_EVERY`` epochs.
    Returns the best epoch and its val mIoU; the head's state at that epoch is kept in ``seg``."""
    feats, labels = train
    # the loss at half the label resolution (nearest-neighbour labels): 4× cheaper on CPU, and the
    # 22×30 logits are still upsampled 8×; val/ is scored at full resolution, as the model runs
    half = (labels.shape[-2] // 2, labels.shape[-1] // 2)
    labels = labels[:, ::2, ::2]
    params = list(seg.norm.parameters()) + list(seg.head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    steps_per_epoch = (len(feats) + 7) // 8
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    best = (-1.0, 0, None)
    for epoch in range(1, EPOCHS + 1):
        seg.norm.train()
        seg.head.train()
        order = torch.randperm(len(feats), generator=gen)
        total = 0.0
        for i in range(0, len(order), 8):
            idx = order[i:i + 8]
            logits = seg.classify(feats[idx].float(), half)
            loss = F.cross_entropy(logits, labels[idx].long(), ignore_index=ignore)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        entry = {"head": tag, "epoch": epoch, "train_loss": round(total / len(feats), 5)}
        if epoch % CHECK_EVERY == 0:
            miou, _ = _scores(seg, *val, num_classes, ignore)
            entry["val_miou"] = round(miou, 3)
            if miou > best[0]:
                best = (miou, epoch, {k: v.clone() for k, v in seg.state_dict().items() if not k.startswith("backbone.")})
        log.append(entry)
        print(f"  {tag} epoch {epoch}: loss {entry['train_loss']:.4f}"
              + (f", val mIoU {entry['val_miou']:.2f}" if "val_miou" in entry else ""), file=sys.stderr)
    seg.load_state_dict(best[2], strict=False)
    return best[1], best[0]


def build_model(out: Path, assets: Path, seed: int = 0) -> Dict[str, Any]:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    started = time.perf_counter()
    camvid = assets / "camvid"
    info = json.loads((camvid / "classes.json").read_text())
    classes, ignore = info["classes"], int(info["ignore_index"])
    backbone, card = _backbone(assets)
    data_config = _data_config(card)
    probe = ViTSegmenter(backbone, INDICES, len(classes), hidden=0)
    print("backbone features of train/ (with flips) and val/ ...", file=sys.stderr)
    train = _features(probe, scan_segmentation(camvid, "train"), data_config, flip=True)
    val = _features(probe, scan_segmentation(camvid, "val"), data_config, flip=False)
    feature_seconds = time.perf_counter() - started
    log: List[Dict[str, Any]] = []
    tried = []
    best = None
    for hidden, kernel in HEADS:
        torch.manual_seed(seed)
        seg = ViTSegmenter(backbone, INDICES, len(classes), hidden=hidden, kernel=kernel)
        tag = f"hidden {hidden}, kernel {kernel}" if hidden else f"linear, kernel {kernel}"
        epoch, miou = _train_head(seg, train, val, len(classes), ignore, seed, log, tag)
        tried.append({"hidden": hidden, "kernel": kernel, "best_epoch": epoch, "val_miou": round(miou, 3)})
        if best is None or miou > best[0]:
            best = (miou, hidden, kernel, epoch, seg)
    miou, hidden, kernel, epoch, seg = best
    seg.eval()
    del train
    test = _features(seg, scan_segmentation(camvid, "test"), data_config, flip=False)
    test_miou, test_iou = _scores(seg, *test, len(classes), ignore)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(seg.state_dict(), out / "model.pth")
    card_out = {
        "format": "vitq-model-card/1",
        "name": "deit_tiny_camvid_seg",
        "task": "segmentation",
        "timm_model": BACKBONE,
        "kwargs": {"img_size": list(SIZE), "num_classes": 0},
        "segmentation_head": {"indices": INDICES, "num_classes": len(classes), "hidden": hidden, "kernel": kernel},
        "data_config": {**{k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()}},
        "classes": classes,
        "ignore_index": ignore,
        "metrics": {"val_miou": round(miou, 3), "test_miou": round(test_miou, 3),
                    "test_iou_per_class": {c: None if v is None else round(v, 2) for c, v in zip(classes, test_iou)},
                    "scored": "dataset-level mIoU over the 11 classes, void ignored, logits resized to 360×480"},
        "training": {
            "script": "benchmarks/segmentation.py --build-model", "seed": seed,
            "backbone": "deit_tiny_imagenet.pth (frozen), pos_embed resampled bicubic 14×14 → 22×30",
            "features": f"blocks {INDICES} (residual stream before the final norm), concatenated, BatchNorm",
            "data": "camvid train/ (367 images) and their horizontal mirrors; 352×480 bicubic resize",
            "optimiser": f"AdamW lr 1e-3 wd 1e-4, cosine over {EPOCHS} epochs, batch 8, cross-entropy ignoring void "
                         "at half the label resolution (180×240, nearest labels)",
            "selection": f"head shape and epoch (checked every {CHECK_EVERY}) by val/ mIoU: {tried}",
            "seconds": round(time.perf_counter() - started, 1), "feature_seconds": round(feature_seconds, 1),
            "machine": machine(), "torch": torch.__version__,
        },
    }
    (out / "model.json").write_text(json.dumps(card_out, indent=1) + "\n")
    (out / "train_log.json").write_text(json.dumps({"tried": tried, "log": log}, indent=1) + "\n")
    print(f"wrote {out / 'model.pth'}: val mIoU {miou:.2f} ({'linear' if not hidden else f'hidden {hidden}'}, "
          f"kernel {kernel}, epoch {epoch}); test mIoU {test_miou:.2f}")
    return card_out


# -- the quantization table ---------------------------------------------------------------------------
METHODS = ["omse", "recommended", "mptq-vit", "clamp-vit"]
BITS = ["w8a8", "w6a6", "w4a8", "w4a4"]
DATA_FREE = ["clamp", "psaq", "gaussian"]
#: CLAMP-ViT's search passes on the CPU budget (the paper: 10); a row of ``clamp-vit`` is its recipe
#: with the search cut to this many passes, on the same real calibration images as the other rows
#: (so without its image refresh); its data-free images are the ``clamp`` rows'
CLAMP_PASSES = 1


def _recipe(method: str):
    """What ``vitq.quantize`` runs for the table's ``method``: the built-in recipe, or for
    ``clamp-vit`` that recipe with its search cut to :data:`CLAMP_PASSES` passes."""
    if method == "clamp-vit":
        from accuracy import _seed_recipe

        return _seed_recipe("clamp-vit", CLAMP_PASSES, refresh_every=None)
    return method


def recipe_sha(method: str) -> str:
    """A short digest of the recipe a row of ``method`` runs, as it is now (its stages and settings)."""
    import hashlib

    from vitq.recipes import load_recipe

    return hashlib.sha256(json.dumps(load_recipe(_recipe(method)).to_dict(), sort_keys=True,
                                     default=str).encode()).hexdigest()[:12]


def _load() -> Dict[str, Any]:
    return json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else {"rows": []}


def _save_rows(rows: List[Dict[str, Any]], extra: Dict[str, Any]) -> None:
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_JSON.write_text(json.dumps({**extra, "rows": rows}, indent=1) + "\n")


def _key(row: Dict[str, Any]) -> Tuple[str, str, Any, int, Any, Any, str]:
    """What a row measures: rows of another generator budget, output loss or scored split (``val`` rows
    choose settings, ``test`` rows report) are other rows, not replacements."""
    generator = row.get("data_free")
    return (row["method"], row["bits"], generator, row["num_calib"], row.get("gen_iterations") if generator else None,
            float(row.get("gen_pixel_weight") or 0.0) if generator else None, row.get("split", "test"))


def _same_model(model_path: Path, model_sha: str, num_test: int, num_val: int = -1):
    """Whether a stored row was measured on this reference model: on these very weights (the same
    checksum), or on another build of it. ``--build-model`` is deterministic on one CPU, but its float
    rounding differs between CPUs (an AMD and an Intel build differ in their last bits); a build is the
    same model when it scores the same float mIoU on all images of the row's split (test, or val for
    the rows that choose settings) as this one's card says (3 decimals; the CamVid builds so far:
    test 57.1472 and 57.1473)."""
    card_path = model_path.with_suffix(".json")
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    metrics = card.get("metrics") or {}

    def same(row: Dict[str, Any]) -> bool:
        if row.get("model_sha") == model_sha:
            return True
        split = row.get("split", "test")
        card_fp = metrics.get(f"{split}_miou")
        count = num_val if split == "val" else num_test
        return bool(row.get("model_sha")) and card_fp is not None and row["num_eval"] == count and \
            abs(row["fp_miou"] - card_fp) < 0.002
    return same


def bench(model_path: Path, assets: Path, methods: List[str], bits: List[str], data_free: List[str],
          num_calib: int, num_eval: int, seed: int, append: bool, dry_run: bool, df_images: int = 16,
          df_iterations: int = 50, df_pixel_weight: float = 0.0, split: str = "test",
          df_twin: bool = True) -> List[Dict[str, Any]]:
    """The table's rows of ``methods`` × ``bits`` (and the data-free W4A8 rows), scored on ``split``:
    ``test`` (the reported table) or ``val`` (rows that choose a setting, e.g. ``--df-pixel-weight``,
    kept apart and never mixed into the reported table)."""
    from accuracy import PeakMemory, parse_bits

    import vitq
    from vitq.data import balanced_subset, make_loader, scan_folder

    loaded = load_model(model_path)
    camvid = assets / "camvid"
    calib = balanced_subset(scan_folder(camvid / "images" / "train", labelled=False), num_calib, seed)
    calib_batches = [x for x, _ in make_loader(calib, loaded.data_config, 8)]
    if split not in ("test", "val"):
        raise ValueError(f"split {split!r}: expected 'test' (the reported table) or 'val' (choosing settings)")
    test_all = scan_segmentation(camvid, "test")
    val_all = scan_segmentation(camvid, "val")
    test = (test_all if split == "test" else val_all).sample(num_eval, seed)  # the images this run scores
    eval_batches = list(segmentation_loader(test, loaded.data_config, 8))
    model_sha = loaded.digest  # the float weights' checksum
    same_model = _same_model(model_path, model_sha, len(test_all), len(val_all))
    stored = _load() if append else {"rows": []}
    # rows of another reference model (or from before the rows recorded the checksum) leave the table:
    # they are kept in the JSON under "earlier_model_rows". Rows of another build of the same model
    # (same training, same float test mIoU; see _same_model) stay, and say which build they ran on.
    earlier = [r for r in stored.get("earlier_model_rows", []) + stored["rows"] if not same_model(r)]
    rows = [r for r in stored["rows"] if same_model(r)]
    other_builds = stored.get("other_build_rows", [])
    # a row counts as measured only with the recipe as it is now: a changed recipe is measured again
    done = {_key(r) for r in rows
            if r.get("recipe_sha") == recipe_sha(r["method"]) and r["num_eval"] == len(test)
            and r.get("split", "test") == split}
    # data-free rows (W4A8, the recommended recipe) beside real images of the same number
    plan = [(m, b, None, len(calib), None, None) for b in bits for m in methods]
    if data_free:  # the generators' output loss: the per-pixel information loss at --df-pixel-weight (noise has none)
        plan += [("recommended", "w4a8", None, df_images, None, None)] * df_twin + \
            [("recommended", "w4a8", g, df_images, df_iterations, df_pixel_weight if g != "gaussian" else 0.0)
             for g in data_free]
    # the header describes the reported (test) table: a val run keeps what the stored rows say of it
    num_test = len(test) if split == "test" else stored.get("num_eval", len(test_all))
    extra = {"model": str(model_path), "model_sha": model_sha, "num_calib": len(calib), "num_eval": num_test,
             "calibration": f"{len(calib)} seeded images of camvid/images/train (seed {seed})",
             "evaluation": f"{num_test} images of camvid test/"}
    if earlier:
        extra["earlier_model_rows"] = earlier
    if other_builds:
        extra["other_build_rows"] = other_builds
    for method, bits_name, generator, count, steps, pixel_weight in plan:
        if (method, bits_name, generator, count, steps, pixel_weight, split) in done:
            continue
        (w, a), = parse_bits([bits_name])
        source = f"data-free {generator} ({steps} steps{f', pixel loss {pixel_weight:g}' if pixel_weight else ''})" \
            if generator else "real"
        print(f"[{method} {bits_name} {count} {source} images, scored on {split}/]", flush=True)
        if dry_run:
            continue
        started = time.perf_counter()
        with PeakMemory() as memory:
            if generator:
                result = vitq.quantize(loaded.model, _recipe(method), None, data_free=generator, num_images=count,
                                       gen_settings={"iterations": df_iterations, "batch_size": 8,
                                                     "pixel_weight": pixel_weight},
                                       batch_size=8,
                                       w_bits=w, a_bits=a, seed=seed, device="cpu", progress=False)
            else:
                batches = calib_batches if count == len(calib) else [b for b in torch.cat(calib_batches)[:count].split(8)]
                result = vitq.quantize(loaded.model, _recipe(method), batches, w_bits=w, a_bits=a, seed=seed,
                                       device="cpu", progress=False)
        quantize_seconds = time.perf_counter() - started
        t0 = time.perf_counter()
        metrics, _ = vitq.evaluate_segmentation(loaded.model, result.model, eval_batches,
                                                ignore_index=test.ignore_index, classes=test.classes, device="cpu",
                                                progress=False)
        row = {"method": method, "recipe_sha": recipe_sha(method), "model_sha": model_sha, "machine": machine(),
               "bits": bits_name, "data_free": generator, "num_calib": count,
               "gen_iterations": df_iterations if generator else None,
               **({"gen_pixel_weight": pixel_weight} if pixel_weight else {}),
               **({"split": split} if split != "test" else {}), **metrics,
               "quantize_seconds": round(quantize_seconds, 1), "eval_seconds": round(time.perf_counter() - t0, 1),
               "stage_seconds": result.record.get("stage_seconds"), "peak_mib": memory.mib,
               "generation_seconds": (result.record.get("data_free") or {}).get("seconds")}
        key = _key(row)
        for r in rows:  # a row of the same recipe on another build: kept beside it (the builds compared)
            if _key(r) == key and r["model_sha"] != model_sha and r.get("recipe_sha") == row["recipe_sha"] \
                    and r["num_eval"] == row["num_eval"]:
                other_builds = [o for o in other_builds if (_key(o), o["model_sha"]) != (key, r["model_sha"])] + [r]
                extra["other_build_rows"] = other_builds
        rows = [r for r in rows if _key(r) != key] + [row]  # replaces a row of an older recipe or another build
        _save_rows(rows, extra)
        print(f"  mIoU float {row['fp_miou']:.2f} quantized {row['quant_miou']:.2f}, pixel agreement "
              f"{row['pixel_agreement']:.2f}, {row['quantize_seconds']} s + eval {row['eval_seconds']} s", flush=True)
    if rows and not dry_run:
        write_results(rows, extra)
    return rows


def _build_marks(rows: List[Dict[str, Any]], extra: Dict[str, Any]) -> Dict[str, str]:
    """A mark for each other build of the reference model that rows of the table ran on."""
    others = list(dict.fromkeys(r["model_sha"] for r in rows if r["model_sha"] != extra["model_sha"]))
    return {sha: " " + "‡§¶"[i] if i < 3 else f" [build {sha}]" for i, sha in enumerate(others)}


def _build_lines(rows: List[Dict[str, Any]], extra: Dict[str, Any]) -> List[str]:
    """The footnote of rows measured on another build of the reference model, with the rows measured on
    both builds side by side (how much a build's last bits move a row)."""
    marks = _build_marks(rows, extra)
    if not marks:
        return []
    here = [r for r in rows if r["model_sha"] == extra["model_sha"]]
    text = []
    for sha, mark in marks.items():
        first = next(r for r in rows if r["model_sha"] == sha)
        n = sum(r["model_sha"] == sha for r in rows)
        pairs = [(o, h) for o in extra.get("other_build_rows", []) if o["model_sha"] == sha
                 for h in here if _key(h) == _key(o)]
        compared = "; ".join(f"{h['method']} {h['bits'].upper()} {o['quant_miou']:.2f} there, {h['quant_miou']:.2f} here"
                             for o, h in pairs)
        float_here = f"{here[0]['fp_miou']:.4f}" if here else "the same"
        text.append(
            f"{mark.strip()} {n} rows ran on another build of the reference model (weights checksum {sha}, built and measured "
            f"on {first['machine']}): the same `--build-model` command, whose float rounding differs between CPUs, "
            f"with float test mIoU {first['fp_miou']:.4f} against {float_here} for this table's build "
            f"({extra['model_sha']})")
        if compared:
            text[-1] += f". Rows measured on both builds: {compared}"
        text[-1] += "."
    return [""] + text


def write_results(rows: List[Dict[str, Any]], extra: Dict[str, Any]) -> None:
    selection = [r for r in rows if r.get("split", "test") != "test"]  # rows scored on val/ choose settings
    rows = [r for r in rows if r.get("split", "test") == "test"]
    if not rows:
        return
    fp = rows[0]["fp_miou"]
    counts: Dict[str, int] = {}
    for r in rows:
        counts[r["machine"]] = counts.get(r["machine"], 0) + 1
    machines = "; ".join(f"{m} ({n} rows)" if len(counts) > 1 else m for m, n in counts.items())
    lines = [
        "## Dense prediction: CamVid segmentation with a quantized DeiT-Tiny backbone",
        "",
        f"Model: vitq's reference segmenter (`python benchmarks/segmentation.py --build-model`): the ImageNet "
        "DeiT-Tiny, frozen, at 352×480, features of blocks 3, 7 and 11, a two-layer head trained on CamVid "
        f"train/. Only the backbone is quantized (protocol p1, image input 8 bits); the head stays float. "
        f"Calibration: {extra['calibration']}; evaluation: {extra['evaluation']}, dataset-level mIoU over "
        "11 classes, void ignored. Machine: " + machines + ".",
        "",
        "Command: `python benchmarks/segmentation.py --bench --model DIR/model.pth --append` (data-free rows: "
        "the recommended recipe at W4A8 on generated images, CPU budget `--df-images 16 --df-iterations 50`, beside "
        "real images of the same number; the generators use no output loss unless a row says \"pixel loss W\": "
        "`--df-pixel-weight W`, the per-pixel information loss on the model's scores, passed explicitly, so a row "
        "without it has none, whatever vitq's default (since 2026-12-04 weight 1 for a segmentation model, chosen "
        f"on the val/ rows below); `clamp-vit`: its recipe with the layer-wise search cut to {CLAMP_PASSES} "
        "pass (the paper: 10) on the same real images, so without its image refresh). A row names its recipe's "
        "version when it was not measured with the recipe as it is now (`--append` measures such rows again). "
        "A data-free row's quantize seconds include generating its images. "
        "Peak MiB: the whole process's resident memory while the row quantized, "
        "which includes what earlier rows of the same invocation left allocated.",
        "",
        f"| method | bits | calibration images | test mIoU (float {fp:.2f}) | Δ | pixel agreement | KL | quantize s | peak MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    order = {**{m: i for i, m in enumerate(METHODS)}}

    def place(r):  # the table's order: real images by bit-width and method, then the data-free rows
        return (r["num_calib"] != extra["num_calib"] or bool(r.get("data_free")),
                BITS.index(r["bits"]) if r["bits"] in BITS else len(BITS), r["num_calib"],
                DATA_FREE.index(r["data_free"]) + 1 if r.get("data_free") in DATA_FREE else 0, r.get("gen_iterations") or 0,
                r.get("gen_pixel_weight") or 0, order.get(r["method"], len(order)))
    marks = _build_marks(rows, extra)
    marks.update({r["model_sha"]: f" [build {r['model_sha']}]" for r in selection
                  if r["model_sha"] != extra["model_sha"] and r["model_sha"] not in marks})

    def line(r: Dict[str, Any], num_eval: int) -> str:
        pixel = f", pixel loss {r['gen_pixel_weight']:g}" if r.get("gen_pixel_weight") else ""
        source = (f"{r['num_calib']} data-free {r['data_free']} ({r['gen_iterations']} steps{pixel})" if r.get("data_free")
                  else f"{r['num_calib']} real")
        if r["num_eval"] != num_eval:  # scored on another number of images than the header says
            source += f" (scored on {r['num_eval']} {r.get('split', 'test')} images)"
        method = r["method"] if r.get("recipe_sha") == recipe_sha(r["method"]) else \
            f"{r['method']} ({'an earlier version of the recipe' if r.get('recipe_sha') else 'recipe version not recorded'})"
        method += marks.get(r["model_sha"], "")
        return (f"| {method} | {r['bits'].upper()} | {source} | {r['quant_miou']:.2f} | "
                f"{r['quant_miou'] - r['fp_miou']:+.2f} | {r['pixel_agreement']:.2f} | {r['kl']:.4f} | "
                f"{r['quantize_seconds']:.0f}{' *' if r.get('note') else ''} | {r['peak_mib']:.0f} |")
    lines += [line(r, extra["num_eval"]) for r in sorted(rows, key=place)]
    def notes(table: List[Dict[str, Any]]) -> List[str]:  # the rows marked * in the seconds column, and why
        said = [f"\\* {r['method']} {r['bits'].upper()}, {line(r, r['num_eval']).split(' | ')[2]}: {r['note']}"
                for r in sorted(table, key=place) if r.get("note")]
        return [""] + said if said else []
    lines += notes(rows)
    if selection:
        val_fp = selection[0]["fp_miou"]
        lines += ["", f"Rows that choose settings, scored on camvid val/ ({selection[0]['num_eval']} images; "
                  "`--split val`), never on test/:", "",
                  f"| method | bits | calibration images | val mIoU (float {val_fp:.2f}) | Δ | pixel agreement | KL | "
                  "quantize s | peak MiB |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        lines += [line(r, selection[0]["num_eval"]) for r in sorted(selection, key=place)]
        lines += notes(selection)
    lines += _build_lines(rows, extra)
    if extra.get("earlier_model_rows"):
        lines += ["", f"{len(extra['earlier_model_rows'])} rows measured on another reference model (a build whose float test mIoU "
                  "differs), or before the rows recorded the model's checksum, are kept in benchmarks/results/segmentation.json "
                  "(`earlier_model_rows`), out of this table."]
    shown = [r for r in rows if r["bits"] == "w4a8" and not r.get("data_free") and r["num_calib"] == extra["num_calib"]]
    if shown:
        names = list(shown[0]["per_class_iou"])
        lines += ["", "Per-class IoU, float and W4A8 (real calibration images):", "",
                  "| class | float | " + " | ".join(r["method"] for r in shown) + " |",
                  "|---|---:|" + "---:|" * len(shown)]
        for n in names:
            lines.append(f"| {n} | {shown[0]['per_class_iou'][n]['fp']:.2f} | "
                         + " | ".join(f"{r['per_class_iou'][n]['quant']:.2f}" for r in shown) + " |")
    write_section("## Dense prediction", lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default=None, help="default: $VITQ_ASSETS or ../shared/assets")
    parser.add_argument("--build-model", action="store_true", help="train the reference segmentation model")
    parser.add_argument("--out", help="--build-model: the folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bench", action="store_true", help="the quantization table of --model")
    parser.add_argument("--model", help="--bench: the reference model (DIR/model.pth of --build-model)")
    parser.add_argument("--methods", nargs="*", default=METHODS, help="recipes of the table's rows (none: data-free rows only)")
    parser.add_argument("--bits", nargs="+", default=BITS)
    parser.add_argument("--data-free", nargs="*", default=DATA_FREE, help="generators of the data-free W4A8 rows")
    parser.add_argument("--num-calib", type=int, default=32)
    parser.add_argument("--df-images", type=int, default=16, help="images of the data-free rows (and their real twin)")
    parser.add_argument("--df-twin", action=argparse.BooleanOptionalAction, default=True,
                        help="the data-free rows' twin on as many real images (--no-df-twin: the generators' rows alone)")
    parser.add_argument("--df-iterations", type=int, default=50, help="generator steps per batch (CPU budget)")
    parser.add_argument("--df-pixel-weight", type=float, default=0.0,
                        help="weight of the generators' per-pixel information loss on the model's scores (0: none)")
    parser.add_argument("--num-eval", type=int, default=None, help="default: all of the scored split")
    parser.add_argument("--split", choices=["test", "val"], default="test",
                        help="score on test/ (the reported table) or val/ (rows that choose a setting, kept apart)")
    parser.add_argument("--append", action="store_true", help="keep the rows measured before; add the missing")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--render", action="store_true", help="rewrite RESULTS.md's section from the stored rows")
    args = parser.parse_args(argv)
    assets = Path(args.assets) if args.assets else assets_dir()
    if args.build_model:
        if not args.out:
            parser.error("--build-model needs --out DIR")
        build_model(Path(args.out), assets, args.seed)
    if args.bench:
        if not args.model:
            parser.error("--bench needs --model DIR/model.pth")
        bench(Path(args.model), assets, args.methods, args.bits, args.data_free, args.num_calib, args.num_eval,
              args.seed, args.append, args.dry_run, args.df_images, args.df_iterations, args.df_pixel_weight,
              args.split, args.df_twin)
    if args.render:
        stored = _load()
        if not stored["rows"]:
            parser.error(f"--render: no rows in {RESULTS_JSON}")
        write_results(stored["rows"], {k: v for k, v in stored.items() if k != "rows"})
    if not (args.build_model or args.bench or args.render):
        parser.error("nothing to do: pass --build-model, --bench and/or --render")
    return 0


if __name__ == "__main__":
    sys.exit(main())
