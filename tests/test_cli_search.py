"""The search recipes from the command line: cpt-v from a plan, clamp-vit data-free, resume, --set."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import vitq.methods.search as search
from vitq.cli import main

from test_cli import quantize_args, run_error

FAST = ["--set", "search.passes=1", "--set", "search.batch_size=6", "--set", "search.radius=0.01"]


def scales(run):
    return {k: v for k, v in load_file(run / "plan.safetensors").items() if k.endswith(".scale")}


def cptv_args(checkpoint, image_folder, out, *extra):
    args = quantize_args(checkpoint, image_folder, out, *FAST, *extra)
    args[args.index("minmax")] = "cpt-v"
    return args


def test_cptv_from_a_start_plan(checkpoint, image_folder, tmp_path, capsys):
    assert main(quantize_args(checkpoint, image_folder, tmp_path / "omse", "--recipe", "omse")) == 0
    start = tmp_path / "omse"
    args = cptv_args(checkpoint, image_folder, tmp_path / "cptv", "--start-plan", str(start / "plan.json"),
                     "--eval", str(image_folder), "--num-calib", "6")
    for flag in ("--w-bits", "--a-bits"):  # the plan's bit-widths are kept
        i = args.index(flag)
        del args[i:i + 2]
    assert main(args) == 0, capsys.readouterr().err
    run = tmp_path / "cptv"
    for name in ("search_curve.json", "search_curve.png", "search_state.pt", "plan.json", "metrics.json"):
        assert (run / name).exists(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["w_bits"] == 4 and metrics["start_plan"].endswith("plan.json")
    assert metrics["search"]["last_fitness"] <= metrics["search"]["first_fitness"]
    before, after = scales(start), scales(run)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".attn." in k for k in changed)
    # the searched plan re-applies to a fresh model with the same accuracy
    assert main(["eval", str(checkpoint), "--plan", str(run), "--eval", str(image_folder), "--device", "cpu",
                 "--quiet"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["quant_top1"] == metrics["quant_top1"] and evaluated["kl"] == metrics["kl"]


def test_start_plan_bits_must_match(checkpoint, image_folder, tmp_path, capsys):
    assert main(quantize_args(checkpoint, image_folder, tmp_path / "a")) == 0
    args = cptv_args(checkpoint, image_folder, tmp_path / "b", "--start-plan", str(tmp_path / "a"))
    args[args.index("--w-bits") + 1] = "3"
    assert "differs from the start plan" in run_error(capsys, args)


def test_clamp_vit_data_free_refreshes_images(checkpoint, tmp_path, capsys):
    out = tmp_path / "clamp"
    args = ["quantize", str(checkpoint), "--recipe", "clamp-vit", "--w-bits", "4", "--a-bits", "8",
            "--data-free", "clamp", "--num-images", "4", "--iterations", "2", "--out", str(out), "--device", "cpu",
            "--quiet", "--set", "search.passes=1", "--set", "search.cycles=2", "--set", "search.refresh_every=16",
            "--batch-size", "4"]
    assert main(args) == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data_free"] == "clamp" and metrics["search"]["fitness"] == "local_contrastive"
    assert metrics["search"]["refreshes"], "the images were never refreshed"
    log = (out / "log.txt").read_text()
    assert "refreshed the 4 synthetic images" in log
    curve = json.loads((out / "search_curve.json").read_text())["curve"]
    assert any(p.get("event") == "refresh" for p in curve)


def check_resume(args_for, tmp_path, capsys, monkeypatch):
    """A search cut in its third block by Ctrl-C resumes from ``<out>.partial`` to the very plan of an
    uninterrupted run. ``args_for(out, *extra)`` builds the quantize command line."""
    full = tmp_path / "full"
    assert main(args_for(full)) == 0
    out = tmp_path / "cut"
    tell = search.Evolution.tell
    calls = {"n": 0}

    def interrupted(self, x, f):
        calls["n"] += 1
        if calls["n"] > 7:  # in the third block
            raise KeyboardInterrupt
        tell(self, x, f)

    monkeypatch.setattr(search.Evolution, "tell", interrupted)
    assert main(args_for(out)) == 130
    assert not out.exists() and (tmp_path / "cut.partial" / "search_state.pt").exists()
    monkeypatch.setattr(search.Evolution, "tell", tell)
    assert main(args_for(out, "--resume")) == 0, capsys.readouterr().err
    assert "resumed from" in (out / "log.txt").read_text()
    a, b = scales(full), scales(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_an_interrupted_search(checkpoint, image_folder, tmp_path, capsys, monkeypatch):
    check_resume(lambda out, *extra: cptv_args(checkpoint, image_folder, out, *extra), tmp_path, capsys, monkeypatch)


def test_resume_without_a_partial_run(checkpoint, image_folder, tmp_path, capsys):
    err = run_error(capsys, cptv_args(checkpoint, image_folder, tmp_path / "none", "--resume"))
    assert "nothing to resume" in err


@pytest.mark.parametrize(
    "setting, message",
    [("search.passes=0", "passes"), ("search.speed=1", "unknown key"), ("smooth.alpha=1", "no stage 'smooth'"),
     ("search.holdout=2", "holdout")],
)
def test_bad_set(checkpoint, image_folder, tmp_path, capsys, setting, message):
    err = run_error(capsys, cptv_args(checkpoint, image_folder, tmp_path / "x", "--set", setting))
    assert message in err
    assert not (tmp_path / "x").exists()


def test_set_syntax(checkpoint, image_folder, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(cptv_args(checkpoint, image_folder, tmp_path / "x", "--set", "passes"))
    assert "STAGE.SETTING=VALUE" in capsys.readouterr().err
