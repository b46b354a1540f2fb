"""Nothing mislabelled, nothing lost (issue 14): a resumed run keeps the settings it was started
with, one run at a time owns a run folder, state files are whole or absent, and a plan knows the
weights it was made from."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import vitq
import vitq.methods.search as search
from vitq.cli import main
from vitq.errors import VitqError
from vitq.files import FolderLock, atomic_torch_save, load_state
from vitq.methods import Plan, apply_plan
from vitq.models import load_model
from vitq.report.run_folder import RunFolder

from conftest import tiny_vit
from test_cli import quantize_args, run_error
from test_cli_search import cptv_args


def interrupt_search(monkeypatch, after: int = 3):
    tell = search.Evolution.tell
    calls = {"n": 0}

    def interrupted(self, x, f):
        calls["n"] += 1
        if calls["n"] > after:
            raise KeyboardInterrupt
        tell(self, x, f)

    monkeypatch.setattr(search.Evolution, "tell", interrupted)
    return tell


def test_resume_with_other_settings_is_refused_and_named(checkpoint, image_folder, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cut"
    tell = interrupt_search(monkeypatch)
    assert main(cptv_args(checkpoint, image_folder, out, "--num-calib", "8")) == 130
    monkeypatch.setattr(search.Evolution, "tell", tell)
    args = cptv_args(checkpoint, image_folder, out, "--num-calib", "4", "--resume")
    args[args.index("--w-bits") + 1] = "6"
    err = run_error(capsys, args)
    assert "--resume" in err and "w_bits: 6 (the run being resumed: 4)" in err and "calib.num: 4" in err
    assert "Traceback" not in err
    assert not out.exists() and (tmp_path / "cut.partial" / "search_state.pt").exists()  # nothing lost
    # the same command resumes and completes, labelled with the settings it really has
    assert main(cptv_args(checkpoint, image_folder, out, "--num-calib", "8", "--resume")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["w_bits"] == 4 and metrics["num_calib"] == 8


def test_a_second_run_into_a_locked_folder_is_refused(checkpoint, image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    with RunFolder(out, echo=False) as first:
        first.write_text("marker.txt", "first run")
        err = run_error(capsys, quantize_args(checkpoint, image_folder, out))
        assert "another vitq run" in err and "--out" in err
        assert (first.path / "marker.txt").read_text() == "first run"  # the first run's files are intact
        first.finish()
    assert (out / "marker.txt").exists() and not (tmp_path / "run.lock").exists()


def test_a_killed_run_does_not_leave_its_lock_stuck(tmp_path):
    out = tmp_path / "run"
    lock = tmp_path / "run.lock"
    # another process takes the kernel lock vitq uses and dies holding it, as a SIGKILL would leave it
    code = f"import fcntl, os\nf = open({str(lock)!r}, 'a+')\nfcntl.flock(f, fcntl.LOCK_EX)\nos._exit(9)"
    assert subprocess.run([sys.executable, "-S", "-c", code]).returncode == 9
    assert lock.exists()  # the stale file remains ...
    with FolderLock(out):  # ... but it is not locked any more
        pass
    assert not lock.exists()


def test_the_lock_is_seen_by_other_processes(tmp_path):
    lock = tmp_path / "run.lock"
    code = (f"import fcntl\nf = open({str(lock)!r}, 'a+')\n"
            "try:\n    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n    print('free')\n"
            "except BlockingIOError:\n    print('held')")
    with FolderLock(tmp_path / "run"):
        assert subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True).stdout == "held\n"
        with pytest.raises(VitqError, match=r"another vitq run \(pid \d+\)"):
            FolderLock(tmp_path / "run").acquire()  # a second holder in this process is refused too
    assert subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True).stdout == "free\n"


def test_state_files_are_whole_or_absent(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    atomic_torch_save({"x": torch.arange(3)}, path)

    def dies(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise KeyboardInterrupt  # killed during the save

    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"x": torch.arange(5)}, path)
    monkeypatch.undo()
    assert torch.equal(load_state(path)["x"], torch.arange(3))  # the previous state, whole
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temporary file left
    path.write_bytes(b"half a checkpoint")
    with pytest.raises(VitqError, match="damaged: delete it"):
        load_state(path)


def test_a_damaged_search_state_is_a_clean_error(checkpoint, image_folder, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cut"
    tell = interrupt_search(monkeypatch)
    assert main(cptv_args(checkpoint, image_folder, out)) == 130
    monkeypatch.setattr(search.Evolution, "tell", tell)
    state = tmp_path / "cut.partial" / "search_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    err = run_error(capsys, cptv_args(checkpoint, image_folder, out, "--resume"))
    assert "search_state.pt" in err and "damaged" in err and "Traceback" not in err


def test_a_plan_refuses_other_weights(checkpoint, image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(quantize_args(checkpoint, image_folder, out)) == 0
    plan = Plan.load(out)
    assert plan.meta["model"]["weights_sha256"] == load_model(checkpoint).digest
    other = tiny_vit()
    with torch.no_grad():
        other.head.bias.add_(1.0)  # the same architecture, other weights
    torch.save(other.state_dict(), checkpoint)
    err = run_error(capsys, ["eval", str(checkpoint), "--plan", str(out), "--eval", str(image_folder), "--quiet"])
    assert "other weights" in err and "Pass the model the plan was made for" in err
    with pytest.raises(VitqError, match="other weights"):
        apply_plan(other, plan)
    apply_plan(other, plan, check_weights=False)  # on request (speed measurements)


def test_random_weights_are_seeded_and_rebuilt_from_the_plan(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    kwargs = json.dumps({"img_size": 32, "patch_size": 8, "num_classes": 4})
    rc = main(["quantize", "test_vit", "--random-weights", "--model-kwargs", kwargs, "--recipe", "minmax",
               "--calib", str(image_folder), "--num-calib", "4", "--eval", str(image_folder), "--out", str(out), "--quiet",
               "--seed", "3"])
    assert rc == 0, capsys.readouterr().err
    plan = Plan.load(out)
    assert plan.meta["model"]["random_weights_seed"] == 3
    metrics = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()
    assert main(["eval", "test_vit", "--random-weights", "--model-kwargs", kwargs, "--plan", str(out),
                 "--eval", str(image_folder), "--quiet"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("fp_top1", "quant_top1", "agreement", "kl"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-9), key
    a = load_model("test_vit", pretrained=False, seed=3, model_kwargs=json.loads(kwargs))
    b = load_model("test_vit", pretrained=False, seed=4, model_kwargs=json.loads(kwargs))
    assert a.digest != b.digest


def test_a_model_without_classifier_is_not_scored(image_folder, tmp_path, capsys):
    kwargs = json.dumps({"img_size": 32, "patch_size": 8, "num_classes": 0})
    base = ["quantize", "test_vit", "--random-weights", "--model-kwargs", kwargs, "--recipe", "minmax", "--calib",
            str(image_folder), "--num-calib", "4", "--quiet"]
    err = run_error(capsys, base + ["--eval", str(image_folder), "--out", str(tmp_path / "a")])
    assert "no classifier (num_classes=0)" in err and "drop --eval" in err
    assert main(base + ["--out", str(tmp_path / "b")]) == 0  # without --eval the plan is still made
    with pytest.raises(VitqError, match="no classifier"):
        vitq.evaluate(tiny_vit(num_classes=0), tiny_vit(num_classes=0), [(torch.randn(2, 3, 32, 32), torch.zeros(2))])


def test_a_run_whose_evaluation_failed_can_be_evaluated_from_its_partial_folder(checkpoint, image_folder, tmp_path,
                                                                                capsys, monkeypatch):
    import vitq.cli as cli

    out = tmp_path / "run"

    def broken(*args, **kwargs):
        raise VitqError("cannot read image x.jpg: image file is truncated; remove or replace the file")

    monkeypatch.setattr(cli, "evaluate", broken)
    err = run_error(capsys, quantize_args(checkpoint, image_folder, out, "--num-calib", "4", eval_dir=image_folder))
    assert "truncated" in err and not out.exists()
    partial = tmp_path / "run.partial"
    assert (partial / "plan.json").exists() and "truncated" in (partial / "error.txt").read_text()
    monkeypatch.undo()
    assert main(["eval", str(checkpoint), "--plan", str(partial), "--eval", str(image_folder), "--quiet"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["num_eval"] == 8  # the plan's 4 calibration images are excluded again


def test_the_report_names_the_layers_left_in_float():
    from torch import nn

    from vitq.eval.metrics import float_layers
    from vitq.methods import prepare
    from vitq.report import run_report

    qmodel = prepare(tiny_vit())
    assert float_layers(qmodel) == {}
    qmodel.patch_embed.backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3))  # a hybrid's float stem
    qmodel.head.weight_quantizer.set_spec(qmodel.head.weight_quantizer.spec.with_(enabled=False))
    assert float_layers(qmodel) == {"patch_embed.backbone": 2, "head": 1}
    metrics = {"model": "m", "recipe": "r", "protocol": "p1", "w_bits": 4, "a_bits": 8, "num_calib": 1, "num_eval": 0,
               "seed": 0, "seconds": 1.0, "weight_bytes": 1, "fp_weight_bytes": 4}
    text = run_report(metrics, {"float_layers": float_layers(qmodel)})
    assert "Layers left in float (weights not quantized): head (1), patch_embed.backbone (2)" in text


def test_a_one_pixel_image_is_not_accepted_silently(checkpoint, image_folder, tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (1, 1)).save(image_folder / "cat" / "tiny.png")
    err = run_error(capsys, quantize_args(checkpoint, image_folder, tmp_path / "run", "--num-calib", "4",
                                          eval_dir=image_folder))
    assert "tiny.png (only 1×1 pixels" in err and "--skip-bad-images" in err
