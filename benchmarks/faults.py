"""Bad inputs and faults, one line each (issue 14): what a user can get wrong or what can happen to
a run, the exit code, the first line of vitq's message, and whether a complete-looking run folder
was left behind.

    python benchmarks/faults.py [--keep DIR]

Runs in a few seconds per case on a tiny random-weight ViT (timm's ``test_vit`` at 32×32) and tiny
image folders written to a temporary folder; no asset is needed. Each case runs the command line
in-process (``vitq.cli.main``), so faults are injected where a real one would strike (a Ctrl-C in
the search, a run holding the folder, bytes cut from a checkpoint).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Tuple

import numpy as np
import torch
from PIL import Image

import vitq.methods.search as search
from vitq.cli import main
from vitq.report.run_folder import RunFolder

KW = {"img_size": 32, "patch_size": 8, "num_classes": 4}


def write_images(root: Path, per_class: int = 3, size: int = 32) -> Path:
    rng = np.random.default_rng(0)
    for c in ("cat", "dog", "fish", "owl"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i:03d}.png")
    return root


def checkpoint(root: Path, **kwargs) -> Path:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_vit", **{**KW, **kwargs}).eval()
    path = root / "tiny.pth"
    root.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    card = {"format": "vitq-model-card/1", "name": "tiny", "timm_model": "test_vit", "kwargs": {**KW, **kwargs},
            "data_config": {"input_size": [3, 32, 32], "interpolation": "bilinear", "crop_pct": 1.0,
                            "mean": [0.5] * 3, "std": [0.25] * 3}}
    path.with_suffix(".json").write_text(json.dumps(card))
    return path


def run(args: List[str]) -> Tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(args)
        except SystemExit as exit_:  # argparse
            rc = int(exit_.code or 0)
    return rc, err.getvalue()


@contextlib.contextmanager
def interrupted_search():
    """Ctrl-C in the search's fourth evaluation, as a user's interrupt would strike."""
    tell, calls = search.Evolution.tell, {"n": 0}

    def cut(self, x, f):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt
        tell(self, x, f)

    search.Evolution.tell = cut
    try:
        yield
    finally:
        search.Evolution.tell = tell


def main_(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", default=None, help="work in this folder and keep it (default: a temporary one)")
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    with contextlib.ExitStack() as stack:
        tmp = Path(opts.keep) if opts.keep else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        tmp.mkdir(parents=True, exist_ok=True)
        images = write_images(tmp / "images")
        ckpt = checkpoint(tmp / "model")

        def q(out: Path, *extra: str, recipe: str = "minmax") -> List[str]:
            return ["quantize", str(ckpt), "--recipe", recipe, "--w-bits", "4", "--a-bits", "8", "--calib",
                    str(images), "--num-calib", "4", "--out", str(out), "--device", "cpu", "--quiet", *extra]

        def cptv(out: Path, *extra: str) -> List[str]:
            return q(out, "--set", "search.passes=1", "--set", "search.batch_size=4", *extra, recipe="cpt-v")

        def cut_run(out: Path) -> None:
            """A cpt-v run interrupted in its search: ``<out>.partial`` holds its state."""
            with interrupted_search():
                run(cptv(out))

        cases: List[Tuple[str, Callable[[Path], Tuple[int, str]]]] = []

        def case(name: str):
            def add(fn):
                cases.append((name, fn))
                return fn
            return add

        @case("resume with other bits and image count")
        def _(out):
            cut_run(out)
            args = cptv(out, "--resume")
            args[args.index("--w-bits") + 1], args[args.index("--num-calib") + 1] = "6", "8"
            return run(args)

        @case("second run into a folder another run is writing")
        def _(out):
            with RunFolder(out, echo=False):
                return run(q(out))

        @case("eval --plan with other weights of the same architecture")
        def _(out):
            made = out.parent / "made"
            run(q(made))
            other = checkpoint(out.parent / "other")
            torch.manual_seed(1)
            state = {k: v + 0.01 * torch.randn_like(v) for k, v in torch.load(other).items()}
            torch.save(state, other)
            return run(["eval", str(other), "--plan", str(made), "--eval", str(images), "--quiet"])

        @case("--out that cannot be written")
        def _(out):
            return run(q(Path("/proc/vitq-cannot-write/run")))

        @case("recipe YAML without name:")
        def _(out):
            recipe = out.parent / "noname.yaml"
            recipe.write_text("weights: {observer: minmax}\nstages: [calibrate]\n")
            return run(q(out, recipe=str(recipe)))

        @case("model card that timm rejects (dim not divisible by heads)")
        def _(out):
            bad = checkpoint(out.parent / "bad")
            card = json.loads(bad.with_suffix(".json").read_text())
            card["kwargs"].update(embed_dim=65, num_heads=2)
            bad.with_suffix(".json").write_text(json.dumps(card))
            args = q(out)
            args[1] = str(bad)
            return run(args)

        @case("half-written search_state.pt, then --resume")
        def _(out):
            cut_run(out)
            state = out.with_name(out.name + ".partial") / "search_state.pt"
            state.write_bytes(state.read_bytes()[:100])
            return run(cptv(out, "--resume"))

        @case("corrupt calibration image, --workers 2")
        def _(out):
            folder = write_images(out.parent / "corrupt")
            (folder / "dog" / "001.png").write_bytes(b"\x89PNG not really")
            args = q(out, "--workers", "2")
            args[args.index("--calib") + 1], args[args.index("--num-calib") + 1] = str(folder), "12"
            return run(args)

        @case("corrupt evaluation image (found before calibration)")
        def _(out):
            folder = write_images(out.parent / "corrupt-eval")
            (folder / "owl" / "002.png").write_bytes(b"garbage")
            return run(q(out, "--eval", str(folder)))

        @case("corrupt evaluation image with --skip-bad-images")
        def _(out):
            folder = write_images(out.parent / "corrupt-eval-skip")
            (folder / "owl" / "002.png").write_bytes(b"garbage")
            return run(q(out, "--eval", str(folder), "--skip-bad-images"))

        @case("a 1×1 image among the evaluation images")
        def _(out):
            folder = write_images(out.parent / "tiny-image")
            Image.new("RGB", (1, 1)).save(folder / "cat" / "tiny.png")
            return run(q(out, "--eval", str(folder)))

        @case("bits out of range (--w-bits 12)")
        def _(out):
            args = q(out)
            args[args.index("--w-bits") + 1] = "12"
            return run(args)

        @case("pickled nn.Module instead of a state_dict")
        def _(out):
            import timm

            path = out.parent / "pickled.pth"
            torch.save(timm.create_model("test_vit", **KW), path)
            path.with_suffix(".json").write_text(ckpt.with_suffix(".json").read_text())
            args = q(out)
            args[1] = str(path)
            return run(args)

        @case("existing file given as --out")
        def _(out):
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("not a folder")
            return run(q(out))

        @case("model without a classifier (num_classes=0), with --eval")
        def _(out):
            headless = checkpoint(out.parent / "headless", num_classes=0)
            args = q(out, "--eval", str(images))
            args[1] = str(headless)
            return run(args)

        @case("timm name whose weights are not cached, offline (HF_HUB_OFFLINE=1)")
        def _(out):
            args = q(out)
            args[1] = "deit_tiny_patch16_224"
            old = os.environ.get("HF_HUB_OFFLINE")
            os.environ["HF_HUB_OFFLINE"] = "1"
            try:
                return run(args)
            finally:
                if old is None:
                    del os.environ["HF_HUB_OFFLINE"]
                else:
                    os.environ["HF_HUB_OFFLINE"] = old

        print("| case | exit | seconds | first line of the message | complete-looking folder left |")
        print("|---|---:|---:|---|---|")
        for i, (name, fn) in enumerate(cases):
            out = tmp / f"case{i:02d}" / "run"
            out.parent.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            rc, err = fn(out)
            seconds = time.perf_counter() - start
            lines = [line for line in err.splitlines() if line.strip()]
            first = next((line for line in lines if "error:" in line), lines[0] if lines else "")
            left = (out / "metrics.json").exists()
            traceback = " (traceback!)" if "Traceback" in err else ""
            print(f"| {name} | {rc} | {seconds:.1f} | {first[:160]}{traceback} | {'yes' if left else 'no'} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main_())
