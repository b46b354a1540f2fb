"""End-to-end tests of the ``vitq`` command line, run in-process on a tiny ViT and tiny image folders."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch

from vitq.cli import main

from conftest import tiny_vit, write_images

RUN_FILES = {"config.yaml", "plan.json", "plan.safetensors", "metrics.json", "report.md", "log.txt", "bits.json",
             "bits_per_layer.png"}
METRIC_KEYS = {
    "model", "recipe", "protocol", "w_bits", "a_bits", "seed", "num_calib", "num_eval",
    "fp_top1", "quant_top1", "fp_top5", "quant_top5", "agreement", "kl", "weight_bytes", "seconds",
}
REPRODUCED = ("num_eval", "fp_top1", "quant_top1", "fp_top5", "quant_top5", "agreement", "kl")


def quantize_args(model, calib, out, *extra: str, eval_dir=None) -> List[str]:
    args = ["quantize", str(model), "--recipe", "minmax", "--w-bits", "4", "--a-bits", "8",
            "--calib", str(calib), "--out", str(out), "--device", "cpu", "--quiet"]
    if eval_dir is not None:
        args += ["--eval", str(eval_dir)]
    return args + list(extra)


def run_error(capsys, args: List[str]) -> str:
    """Run a command that must fail with exit status 2; return its stderr."""
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"vitq {args[0]}: error:" in err
    return err


def argparse_error(capsys, args: List[str]) -> str:
    """Run a command that argparse must refuse (SystemExit 2); return its stderr."""
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    return capsys.readouterr().err


def assert_no_run(out: Path) -> None:
    assert not out.exists(), f"a failed run left a final run folder {out}"


# -- happy path ---------------------------------------------------------------------------------
def test_quantize_writes_run_folder_and_eval_reproduces(checkpoint, image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(quantize_args(checkpoint, image_folder, out, "--num-calib", "4", eval_dir=image_folder))
    assert rc == 0, capsys.readouterr().err
    assert {p.name for p in out.iterdir()} == RUN_FILES
    assert not out.with_name("run.partial").exists()

    metrics = json.loads((out / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics)
    assert metrics["recipe"] == "minmax"
    assert metrics["protocol"] == "p1"
    assert (metrics["w_bits"], metrics["a_bits"], metrics["seed"]) == (4, 8, 0)
    # --eval is the calibration folder: the evaluation leaves the calibration images out
    assert metrics["num_calib"] == 4
    assert metrics["num_calib"] + metrics["num_eval"] == 12
    for key in ("fp_top1", "quant_top1", "fp_top5", "quant_top5", "agreement"):
        assert 0.0 <= metrics[key] <= 100.0
    assert metrics["kl"] >= 0.0
    assert metrics["weight_bytes"] > 0

    eval_out = tmp_path / "eval" / "metrics.json"
    rc = main(["eval", str(checkpoint), "--plan", str(out / "plan.json"), "--eval", str(image_folder),
               "--out", str(eval_out), "--device", "cpu", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    again = json.loads(eval_out.read_text())
    for key in REPRODUCED:
        assert again[key] == metrics[key], key


def test_eval_reproduces_metrics_with_relative_folder(checkpoint, image_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(image_folder.parent)
    rel = image_folder.name
    out = tmp_path / "run"
    assert main(quantize_args(checkpoint, rel, out, "--num-calib", "4", eval_dir=rel)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_eval"] == 8
    eval_out = tmp_path / "eval.json"
    rc = main(["eval", str(checkpoint), "--plan", str(out / "plan.json"), "--eval", rel,
               "--out", str(eval_out), "--device", "cpu", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    again = json.loads(eval_out.read_text())
    for key in REPRODUCED:
        assert again[key] == metrics[key], key


def test_quantize_excludes_calibration_when_folder_spelled_differently(
    checkpoint, image_folder, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(image_folder.parent)
    out = tmp_path / "run"
    assert main(quantize_args(checkpoint, image_folder.name, out, "--num-calib", "4", eval_dir=image_folder)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_calib"] + metrics["num_eval"] == 12


@pytest.mark.parametrize("protocol", ["p2", "p3"])
def test_quantize_protocols(checkpoint, image_folder, tmp_path, capsys, protocol):
    out = tmp_path / "run"
    rc = main(quantize_args(checkpoint, image_folder, out, "--protocol", protocol, "--num-calib", "4",
                            eval_dir=image_folder))
    assert rc == 0, capsys.readouterr().err
    assert {p.name for p in out.iterdir()} == RUN_FILES
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["protocol"] == protocol
    assert json.loads((out / "plan.json").read_text())["meta"]["protocol"] == protocol


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    sections = {}
    current = None
    for line in out.splitlines():
        if not line.startswith(" "):
            current = line.rstrip(":")
            sections[current] = []
        elif line.strip():
            sections[current].append(line.split()[0])
    assert {"minmax", "percentile", "omse"} <= set(sections["recipes"])
    assert {"p1", "p2", "p3"} <= set(sections["protocols"])
    assert {"vit", "swin"} <= set(sections["model families"])


# -- odd but valid images -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mode,size", [("L", 32), ("RGBA", 32), ("RGB", 20), ("RGB", 50)], ids=["greyscale", "rgba", "small", "large"]
)
def test_quantize_converts_and_resizes_images(checkpoint, tmp_path, capsys, mode, size):
    folder = write_images(tmp_path / "odd", mode=mode, size=size)
    out = tmp_path / "run"
    rc = main(quantize_args(checkpoint, folder, out, "--num-calib", "4", eval_dir=folder))
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_eval"] == 8


# -- bad models ---------------------------------------------------------------------------------
def test_unknown_model_name(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    err = run_error(capsys, quantize_args("not_a_model_xyz", image_folder, out))
    assert "unknown model" in err and "not_a_model_xyz" in err
    assert_no_run(out)


def test_unsupported_model_family(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    err = run_error(capsys, quantize_args("resnet18", image_folder, out, "--random-weights"))
    assert "not a supported model family" in err
    assert_no_run(out)


def test_checkpoint_not_matching_architecture(checkpoint, image_folder, tmp_path, capsys):
    state = tiny_vit().state_dict()
    del state["head.weight"]
    state["blocks.0.norm1.gamma"] = state.pop("blocks.0.norm1.weight")
    bad = tmp_path / "bad" / "tiny.pth"
    bad.parent.mkdir()
    torch.save(state, bad)
    bad.with_suffix(".json").write_text(checkpoint.with_suffix(".json").read_text())
    out = tmp_path / "run"
    err = run_error(capsys, quantize_args(bad, image_folder, out))
    assert "does not match the architecture" in err
    assert "missing key" in err and "head.weight" in err and "blocks.0.norm1.weight" in err
    assert "unexpected key" in err and "blocks.0.norm1.gamma" in err
    assert_no_run(out)


@pytest.mark.parametrize("content", ["random", "text"])
def test_unreadable_checkpoint(checkpoint, image_folder, tmp_path, capsys, content):
    bad = tmp_path / "bad" / "tiny.pth"
    bad.parent.mkdir()
    if content == "random":
        bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    else:
        bad.write_text("this is not a checkpoint\n")
    bad.with_suffix(".json").write_text(checkpoint.with_suffix(".json").read_text())
    out = tmp_path / "run"
    err = run_error(capsys, quantize_args(bad, image_folder, out))
    assert "cannot read checkpoint" in err and str(bad) in err
    assert_no_run(out)


def test_checkpoint_without_card_or_arch(checkpoint, image_folder, tmp_path, capsys):
    checkpoint.with_suffix(".json").unlink()
    out = tmp_path / "run"
    err = run_error(capsys, quantize_args(checkpoint, image_folder, out))
    assert "no architecture" in err and "--arch" in err
    assert_no_run(out)


# -- bad options ----------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--w-bits", "--a-bits"])
@pytest.mark.parametrize("value", ["0", "1", "9", "-3", "4.5", "four"])
def test_bits_out_of_range(checkpoint, image_folder, tmp_path, capsys, flag, value):
    out = tmp_path / "run"
    args = quantize_args(checkpoint, image_folder, out)
    args[args.index(flag) + 1] = value
    err = argparse_error(capsys, args)
    assert flag in err and "2 to 8" in err
    assert_no_run(out)


def test_unknown_recipe(checkpoint, image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    args = quantize_args(checkpoint, image_folder, out)
    args[args.index("--recipe") + 1] = "no_such_recipe"
    err = run_error(capsys, args)
    assert "unknown recipe" in err and "no_such_recipe" in err and "minmax" in err
    assert_no_run(out)


def test_unknown_protocol(checkpoint, image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    err = argparse_error(capsys, quantize_args(checkpoint, image_folder, out, "--protocol", "p9"))
    assert "--protocol" in err and "p9" in err
    assert_no_run(out)


def test_cuda_without_cuda(checkpoint, image_folder, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    out = tmp_path / "run"
    args = quantize_args(checkpoint, image_folder, out)
    args[args.index("--device") + 1] = "cuda"
    err = run_error(capsys, args)
    assert "CUDA is not available" in err
    assert_no_run(out)


def test_model_kwargs_not_json(checkpoint, image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    err = argparse_error(capsys, quantize_args(checkpoint, image_folder, out, "--model-kwargs", "{num_classes: 4"))
    assert "--model-kwargs" in err and "not valid JSON" in err
    assert_no_run(out)


def test_existing_out_without_overwrite(checkpoint, image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious\n")
    err = run_error(capsys, quantize_args(checkpoint, image_folder, out))
    assert "already exists" in err and "--overwrite" in err
    assert sorted(os.listdir(out)) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious\n"
    assert not out.with_name("run.partial").exists()


# -- bad data -------------------------------------------------------------------------------------
def test_missing_data_folder(checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    missing = tmp_path / "nowhere"
    err = run_error(capsys, quantize_args(checkpoint, missing, out))
    assert "does not exist" in err and str(missing) in err
    assert_no_run(out)


def test_empty_data_folder(checkpoint, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "run"
    err = run_error(capsys, quantize_args(checkpoint, empty, out))
    assert "no images" in err and str(empty) in err
    assert_no_run(out)


def test_subfolders_without_images(checkpoint, tmp_path, capsys):
    root = tmp_path / "noimages"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        (root / name / "notes.txt").write_text("not an image\n")
    out = tmp_path / "run"
    err = run_error(capsys, quantize_args(checkpoint, root, out))
    assert "sub-folders but no images" in err
    assert_no_run(out)


def test_corrupt_image(checkpoint, image_folder, tmp_path, capsys):
    bad = image_folder / "dog" / "001.png"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 512, dtype=np.uint8).tobytes())
    out = tmp_path / "run"
    for workers in ("0", "2"):  # found before any work starts, worker processes or not
        err = run_error(capsys, quantize_args(checkpoint, image_folder, out, "--workers", workers,
                                              eval_dir=image_folder))
        assert "1 of the 12 calibration images cannot be used (unreadable or too small)" in err and str(bad) in err
        assert "--skip-bad-images" in err and "Traceback" not in err
        assert_no_run(out)
        assert not out.with_name("run.partial").exists()  # refused before the run started
    # on request the unreadable image is left out and counted
    rc = main(quantize_args(checkpoint, image_folder, out, "--skip-bad-images", "--num-calib", "4",
                            eval_dir=image_folder))
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_calib"] + metrics["num_eval"] == 11
    assert sum(metrics["skipped_images"].values()) == 1


def test_an_unreadable_image_in_a_worker_is_a_clean_error(checkpoint, image_folder, tmp_path, capsys, monkeypatch):
    """An image that passes the up-front check but fails to decode later, in a loader worker."""
    import vitq.data.folder as folder

    monkeypatch.setattr(folder, "find_bad_images", lambda images: [])
    bad = image_folder / "dog" / "001.png"
    bad.write_bytes(b"not an image")
    err = run_error(capsys, quantize_args(checkpoint, image_folder, tmp_path / "run", "--workers", "2"))
    assert "cannot read image" in err and str(bad) in err and "Traceback" not in err


def test_num_calib_larger_than_folder(checkpoint, image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    err = run_error(capsys, quantize_args(checkpoint, image_folder, out, "--num-calib", "13"))
    assert "13" in err and "only 12" in err
    assert_no_run(out)


def test_quantize_without_recipe_runs_the_recommended_one_and_eval_reproduces(checkpoint, image_folder, tmp_path,
                                                                             capsys):
    out = tmp_path / "run"
    args = quantize_args(checkpoint, image_folder, out, "--num-calib", "6", "--a-bits", "4", "--input-bits", "6",
                         eval_dir=image_folder)
    del args[args.index("--recipe"):args.index("--recipe") + 2]
    assert main(args) == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["recipe"] == "recommended" and metrics["input_bits"] == 6
    assert "image input at 6 bits" in (out / "report.md").read_text()
    plan = json.loads((out / "plan.json").read_text())
    assert plan["rules"]["patch_embed.proj.input_quantizer"]["bits"] == 6
    assert plan["rules"]["blocks.0.attn.probs_quantizer"]["kind"] == "logsqrt2"
    assert plan["meta"]["params"] and plan["meta"]["smooth"]
    capsys.readouterr()
    assert main(["eval", str(checkpoint), "--plan", str(out / "plan.json"), "--eval", str(image_folder),
                 "--device", "cpu", "--quiet", "--out", str(tmp_path / "m.json")]) == 0
    again = json.loads((tmp_path / "m.json").read_text())
    assert again["num_eval"] == metrics["num_eval"]
    for key in ("quant_top1", "agreement", "kl"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-6)


def test_set_reads_numbers_in_exponent_form_as_numbers():
    """YAML 1.1 reads 4e-4 as a string; --set reads it as the number a user means."""
    from vitq.cli import _setting

    assert _setting("reconstruct.act_lr=4e-4") == ("reconstruct", "act_lr", 4e-4)
    assert _setting("reconstruct.act_lr=1E3") == ("reconstruct", "act_lr", 1000.0)
    assert _setting("opt_m.points=[gelu, softmax]") == ("opt_m", "points", ["gelu", "softmax"])
    assert _setting("search.passes=2") == ("search", "passes", 2)
    assert _setting("gptq.convs=false") == ("gptq", "convs", False)
