"""The ``vitq`` command line: parse, load, call the library, write the run folder."""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from . import __version__
from .api import evaluate, quantize, resolve_device
from .data.folder import ImageList, balanced_subset, check_labels, load_images, make_loader, scan_folder
from .data.synthetic import GENERATORS, GenerationDiverged, GenerationResult, create_generator
from .data.synthetic.io import image_stats, save_grid, save_images
from .errors import VitqError
from .eval.metrics import count_quant_points, model_size
from .methods.lifecycle import check_bits
from .methods.mixed import parse_budget
from .methods.plan import Plan, apply_plan
from .models.adapters import ADAPTERS, find_adapter
from .models.loading import LoadedModel, load_model
from .quant.observers import OBSERVERS
from .quant.protocol import PROTOCOLS, get_protocol
from .recipes.recipe import RECIPES, load_recipe
from .report import RunFolder, run_report

DEFAULT_NUM_CALIB = 256


# -- argument types -------------------------------------------------------------------------------
def _bits(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must be an integer from 2 to 8, got {text!r}") from None
    try:
        return check_bits(value, "bits")
    except VitqError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _json_object(text: str) -> Dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"--model-kwargs is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--model-kwargs must be a JSON object, e.g. '{\"num_classes\": 10}'")
    return value


# -- parser -------------------------------------------------------------------------------------
def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="timm model name, or checkpoint (.pth/.safetensors/.npz) with a sidecar .json")
    parser.add_argument("--arch", help="timm architecture of a checkpoint without a sidecar card")
    parser.add_argument("--model-kwargs", type=_json_object, default=None, help="JSON of timm.create_model arguments")
    parser.add_argument("--random-weights", action="store_true", help="timm name only: random weights, no download")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default=None, help="which tensors are quantized")
    parser.add_argument("--seed", type=int, default=None, help="seed of the data subsets (default 0; eval: the plan's)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--batch-size", type=_positive_int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="data-loading worker processes")
    parser.add_argument("--eval", dest="eval_dir", help="evaluation images (ImageFolder or flat synset folder)")
    parser.add_argument("--num-eval", type=_positive_int, default=None, help="seeded class-balanced subset")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or log on the console")


def _generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-images", type=_positive_int, default=None,
                        help="synthetic images to make (default: the recipe's data_free.num_images, 32)")
    parser.add_argument("--iterations", type=_positive_int, default=None, help="optimisation steps per batch")
    parser.add_argument("--gen-settings", type=_json_object, default=None,
                        help="JSON of generator settings (lr, tau, window, positives, batch_size, ...)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitq", description="Post-training quantization of vision transformers.")
    parser.add_argument("--version", action="version", version=f"vitq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="calibrate a quantized model, evaluate it, write a run folder")
    _common(q)
    q.add_argument("--recipe", default="omse", help="recipe name (vitq list) or YAML file")
    q.add_argument("--w-bits", type=_bits, default=8)
    q.add_argument("--a-bits", type=_bits, default=8)
    q.add_argument("--budget", default=None,
                   help="mixed precision: average weight/activation bits of the blocks' linear layers, e.g. w4a4 "
                        "(a recipe with a greedy_mp stage, e.g. mptq-vit-mp; other points keep --w-bits/--a-bits)")
    source = q.add_mutually_exclusive_group(required=True)
    source.add_argument("--calib", help="calibration images (ImageFolder or flat synset folder)")
    source.add_argument("--data-free", choices=GENERATORS.names(),
                        help="no real images: calibrate on images synthesised from the model by this generator")
    _generation_options(q)
    q.add_argument("--num-calib", type=_positive_int, default=None, help=f"default {DEFAULT_NUM_CALIB} or all if fewer")
    q.add_argument("--out", required=True, help="run folder to write")
    q.add_argument("--overwrite", action="store_true", help="replace an existing run folder")

    e = sub.add_parser("eval", help="evaluate a plan (re-applied to a fresh float model) against the float model")
    _common(e)
    e.add_argument("--plan", required=True, help="plan.json of a run (or the run folder)")
    e.add_argument("--out", help="write metrics.json here (a file path)")

    g = sub.add_parser("generate", help="synthesise calibration images from the model (data-free)")
    _common(g)
    g.add_argument("--generator", choices=GENERATORS.names(), default="clamp")
    g.add_argument("--recipe", default=None, help="take the generator settings from this recipe's data_free section")
    _generation_options(g)
    g.add_argument("--out", required=True, help="folder to write (images/, grid.png, stats.json)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing folder")

    sub.add_parser("list", help="recipes, observers, protocols, generators and supported model families")
    return parser


# -- helpers ------------------------------------------------------------------------------------
def _load(args: argparse.Namespace) -> LoadedModel:
    loaded = load_model(args.model, arch=args.arch, model_kwargs=args.model_kwargs, pretrained=not args.random_weights)
    find_adapter(loaded.model)  # refuse unsupported families before any data is read
    return loaded


def _num_classes(loaded: LoadedModel) -> int:
    return int(getattr(loaded.model, "num_classes", 0) or 0)


def _eval_images(args: argparse.Namespace, calib: Optional[ImageList], seed: int) -> Optional[ImageList]:
    """Evaluation images; drawn from the calibration folder they exclude the calibration images."""
    if not args.eval_dir:
        return None
    exclude: Sequence[Path] = ()
    if calib is not None and Path(args.eval_dir).expanduser().resolve() == calib.root.resolve():
        exclude = calib.paths
    return load_images(args.eval_dir, args.num_eval, seed, exclude, what="evaluation images")


def _calib_images_of_plan(plan: Plan, eval_dir: str) -> Optional[ImageList]:
    """Re-derive a plan's calibration subset when evaluating on the folder it calibrated on."""
    calib = plan.meta.get("calibration") or {}
    folder = calib.get("folder")
    if not folder or Path(eval_dir).expanduser().resolve() != Path(folder).resolve():
        return None
    return load_images(folder, calib["num"], calib["seed"], what="calibration images")


def _generate(args: argparse.Namespace, loaded: LoadedModel, generator_name: str, recipe, device, run) -> GenerationResult:
    """Synthesise images as the recipe and the options say; write images, grid and stats into the run."""
    settings = dict(recipe.data_free.settings) if recipe is not None and recipe.data_free.generator == generator_name else {}
    settings.update(args.gen_settings or {})
    if args.iterations is not None:
        settings["iterations"] = args.iterations
    num = args.num_images or (recipe.data_free.num_images if recipe is not None else 32)
    generator = create_generator(generator_name, settings)
    run.log.info("generating %d images with %s (%s)", num, generator_name,
                 ", ".join(f"{k}={v}" for k, v in sorted(settings.items())) or "default settings")
    model = loaded.model.to(device)
    try:
        result = generator.generate(model, num, loaded.data_config, seed=args.seed, device=device,
                                    progress=not args.quiet)
    except GenerationDiverged as err:
        kept = len(err.images)
        if kept:
            save_images(err.images, torch.zeros(kept, dtype=torch.long), run.path / "images", loaded.data_config)
            save_grid(err.images, run.path / "grid.png", loaded.data_config)
        run.log.error("generation stopped: %s; %d images made before it are kept in %s", err, kept, run.path)
        raise
    save_images(result.images, result.targets, run.path / "images", loaded.data_config)
    save_grid(result.images, run.path / "grid.png", loaded.data_config)
    stats = {"generator": generator_name, "settings": generator.settings.to_dict(), "seconds": round(result.seconds, 2),
             "seconds_per_image": round(result.seconds / num, 3), "first_loss": result.losses[0] if result.losses else None,
             "last_loss": result.losses[-1] if result.losses else None,
             **image_stats(model, result.images, result.targets)}
    if torch.cuda.is_available() and device.type == "cuda":
        stats["peak_cuda_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    run.write_json("stats.json", stats)
    run.log.info("made %d images in %.1f s; float model confidence %.3f, %d distinct predicted classes",
                 num, result.seconds, stats["mean_confidence"], stats["distinct_predicted_classes"])
    return result


def _metric_keys(metrics: Dict[str, Any]) -> str:
    row = [
        ("fp top-1", metrics.get("fp_top1")),
        ("quant top-1", metrics.get("quant_top1")),
        ("fp top-5", metrics.get("fp_top5")),
        ("quant top-5", metrics.get("quant_top5")),
        ("agreement", metrics.get("agreement")),
        ("KL", metrics.get("kl")),
    ]
    head = " | ".join(k for k, _ in row)
    vals = " | ".join("—" if v is None else (f"{v:.4f}" if k == "KL" else f"{v:.2f}") for k, v in row)
    return f"| {head} |\n| {' | '.join('---' for _ in row)} |\n| {vals} |"


# -- commands -----------------------------------------------------------------------------------
def cmd_quantize(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    args.seed = 0 if args.seed is None else args.seed
    protocol = get_protocol(args.protocol or "p1")
    recipe = load_recipe(args.recipe)
    if args.budget is not None:
        budget_w, budget_a = parse_budget(args.budget)
        if "greedy_mp" not in recipe.stage_names:
            raise VitqError(f"--budget needs a recipe with a greedy_mp stage (e.g. mptq-vit-mp); recipe "
                            f"{recipe.name!r} has {', '.join(recipe.stage_names)}")
        recipe = recipe.with_overrides({"greedy_mp": {"budget_w": budget_w, "budget_a": budget_a}})
    device = resolve_device(args.device)
    loaded = _load(args)
    calib: Optional[ImageList] = None
    if args.data_free and args.num_calib is not None:
        raise VitqError("--num-calib counts real images; with --data-free use --num-images")
    if args.calib and (args.num_images or args.iterations or args.gen_settings):
        raise VitqError("--num-images, --iterations and --gen-settings are for --data-free; with --calib use --num-calib")
    if args.calib:
        folder = scan_folder(args.calib)
        num_calib = args.num_calib if args.num_calib is not None else min(DEFAULT_NUM_CALIB, len(folder))
        calib = balanced_subset(folder, num_calib, args.seed, what="calibration images")
        if _num_classes(loaded):
            check_labels(calib, _num_classes(loaded))
    eval_images = _eval_images(args, calib, args.seed)
    if eval_images is not None and _num_classes(loaded):
        check_labels(eval_images, _num_classes(loaded))

    with RunFolder(args.out, overwrite=args.overwrite, echo=not args.quiet) as run:
        torch.manual_seed(args.seed)
        config = {
            "command": "quantize",
            "model": loaded.identity,
            "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in loaded.data_config.items()},
            "recipe": recipe.to_dict(),
            "protocol": protocol.name,
            "w_bits": args.w_bits,
            "a_bits": args.a_bits,
            "budget": args.budget,
            "seed": args.seed,
            "device": str(device),
            "batch_size": args.batch_size,
            "calib": {"folder": str(calib.root), "num": len(calib), "layout": calib.layout} if calib else
            {"data_free": args.data_free},
            "eval": None
            if eval_images is None
            else {"folder": str(eval_images.root), "num": len(eval_images),
                  "excludes_calibration": bool(calib and eval_images.root == calib.root)},
            "versions": {"vitq": __version__, "torch": torch.__version__, "python": platform.python_version()},
        }
        run.write_yaml("config.yaml", config)
        run.log.info("vitq %s: %s, recipe %s, W%dA%d, protocol %s, device %s",
                     __version__, loaded.name, recipe.name, args.w_bits, args.a_bits, protocol.name, device)
        meta = {"model": loaded.identity, "seed": args.seed, "batch_size": args.batch_size}
        if calib is not None:
            run.log.info("calibration: %d images from %s", len(calib), calib.root)
            calib_batches = make_loader(calib, loaded.data_config, args.batch_size, args.workers)
            meta["calibration"] = {"folder": str(calib.root), "num": len(calib), "seed": args.seed}
            num_calib, calib_source = len(calib), str(calib.root)
        else:
            generated = _generate(args, loaded, args.data_free, recipe, device, run)
            calib_batches = list(generated.images.split(args.batch_size))
            meta["calibration"] = {"data_free": args.data_free, "num": len(generated.images), "seed": args.seed}
            num_calib, calib_source = len(generated.images), f"the {args.data_free} generator (data-free)"
        t0 = time.perf_counter()
        result = quantize(
            loaded.model, recipe, calib_batches, w_bits=args.w_bits, a_bits=args.a_bits, protocol=protocol.name,
            device=device, progress=not args.quiet, meta=meta,
        )
        run.log.info("calibrated %d quant points in %.1f s", len(result.plan.rules), time.perf_counter() - t0)
        result.plan.save(run.path)

        if eval_images is not None:
            run.log.info("evaluation: %d images from %s", len(eval_images), eval_images.root)
            loader = make_loader(eval_images, loaded.data_config, args.batch_size, args.workers)
            metrics = evaluate(loaded.model, result.model, loader, device=device, progress=not args.quiet)
        else:
            size = model_size(result.model)
            metrics = {k: None for k in ("fp_top1", "quant_top1", "fp_top5", "quant_top5", "agreement", "kl")}
            metrics.update(num_eval=0, weight_bytes=size.weight_bytes, fp_weight_bytes=size.fp_bytes)
        metrics = {
            "model": loaded.name,
            "recipe": recipe.name,
            "protocol": protocol.name,
            "w_bits": args.w_bits,
            "a_bits": args.a_bits,
            "budget": args.budget,
            "seed": args.seed,
            "num_calib": num_calib,
            "data_free": args.data_free,
            **metrics,
            "seconds": round(time.perf_counter() - start, 2),
            "device": str(device),
        }
        notes = {
            "protocol_description": protocol.description,
            "calib": calib_source,
            "eval": "—" if eval_images is None else str(eval_images.root)
            + (" (calibration images excluded)" if config["eval"]["excludes_calibration"] else ""),
            "device": str(device),
            "quant_points": count_quant_points(result.model),
        }
        run.write_json("metrics.json", metrics)
        run.write_text("report.md", run_report(metrics, notes))
        run.log.info("\n%s", _metric_keys(metrics))
        folder = run.finish()
    if not args.quiet:
        print(f"run written to {folder}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    plan = Plan.load(args.plan)
    if args.protocol and args.protocol != plan.meta.get("protocol"):
        raise VitqError(f"the plan uses protocol {plan.meta.get('protocol')!r}; drop --protocol or pass that one")
    if not args.eval_dir:
        raise VitqError("vitq eval needs --eval DIR (the images to evaluate on)")
    device = resolve_device(args.device)
    loaded = _load(args)
    planned = plan.meta.get("model", {})
    if planned.get("arch") and planned["arch"] != loaded.arch:
        raise VitqError(
            f"the plan was made for {planned['arch']!r} but the model is {loaded.arch!r}: pass the model the plan was made for"
        )
    seed = args.seed if args.seed is not None else plan.meta.get("seed", 0)
    calib = _calib_images_of_plan(plan, args.eval_dir)
    images = _eval_images(args, calib, seed)
    if _num_classes(loaded):
        check_labels(images, _num_classes(loaded))
    qmodel = apply_plan(loaded.model, plan)
    batch_size = args.batch_size
    loader = make_loader(images, loaded.data_config, batch_size, args.workers)
    metrics = evaluate(loaded.model, qmodel, loader, device=device, progress=not args.quiet)
    metrics = {
        "model": loaded.name,
        "plan": str(args.plan),
        "recipe": plan.meta.get("recipe"),
        "protocol": plan.meta.get("protocol"),
        "w_bits": plan.meta.get("w_bits"),
        "a_bits": plan.meta.get("a_bits"),
        "seed": seed,
        **metrics,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(metrics, indent=1) + "\n")
    print(_metric_keys(metrics))
    print(json.dumps(metrics))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    args.seed = 0 if args.seed is None else args.seed
    recipe = load_recipe(args.recipe) if args.recipe else None
    device = resolve_device(args.device)
    loaded = _load(args)
    with RunFolder(args.out, overwrite=args.overwrite, echo=not args.quiet) as run:
        torch.manual_seed(args.seed)
        run.write_yaml("config.yaml", {"command": "generate", "model": loaded.identity, "generator": args.generator,
                                       "recipe": args.recipe, "num_images": args.num_images, "seed": args.seed,
                                       "device": str(device), "settings": args.gen_settings,
                                       "iterations": args.iterations})
        _generate(args, loaded, args.generator, recipe, device, run)
        folder = run.finish()
    if not args.quiet:
        print(f"images written to {folder / 'images'} (grid: {folder / 'grid.png'}); calibrate with --calib {folder / 'images'}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    print("recipes:")
    for name in RECIPES.names():
        print(f"  {name:12s} {load_recipe(name).description.splitlines()[0] if load_recipe(name).description else ''}")
    print("observers:")
    for name, cls in OBSERVERS.items():
        print(f"  {name:12s} {(cls.__doc__ or '').strip().splitlines()[0]}")
    print("protocols:")
    for name, proto in PROTOCOLS.items():
        print(f"  {name:12s} {proto.description}")
    print("generators (data-free):")
    for name, cls in GENERATORS.items():
        print(f"  {name:12s} {(cls.__doc__ or '').strip().splitlines()[0]}")
    print("model families:")
    for name, cls in ADAPTERS.items():
        print(f"  {name:12s} {cls.family}")
    return 0


COMMANDS = {"quantize": cmd_quantize, "eval": cmd_eval, "generate": cmd_generate, "list": cmd_list}


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except VitqError as err:
        print(f"vitq {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
