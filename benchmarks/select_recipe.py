"""Which parts of the recommended recipe help at a given bit-width? Decided on calibration images only
(issue 12).

    python benchmarks/select_recipe.py [--assets DIR] [--bits w8a8] [--variants recommended -opt_m uniform-probs ...]

DeiT-Tiny's 100 calibration images (the accuracy benchmark's split) in two halves of 50: each variant
of the recommended recipe is calibrated on one half and scored (KL to the float model, top-1
agreement) on the half it never saw, then the halves swap. None of the 900 evaluation images is
used. Variants (comma-joined changes to the recommended recipe):

- ``recommended``: as shipped;
- ``-opt_m``: without MPTQ-ViT's two-region post-GELU quantizers;
- ``uniform-probs``: uniform post-softmax probabilities instead of log-sqrt2;
- ``no-reparam``: no post-LayerNorm reparameterisation;
- ``reparam=0.5``: the reparameterisation moving only part of the per-channel spread into the
  weights, at every bit-width (its ``strength``; ``reparam=1`` is RepQ-ViT's full move);
- ``gptq-float``: GPTQ fitting the float model's layer outputs from the quantized inputs
  (``gptq.float_target``);
- ``no-gptq-convs``: GPTQ on the linear layers only (the patch embedding rounded to nearest);
- ``+reconstruct[=ITERATIONS][-cur]``: block reconstruction after GPTQ at every bit-width (``-cur``:
  rounding GPTQ's weights as if float, the behaviour before 2026-12-02); ``no-reconstruct``: without it
  (the recommended recipe reconstructs at some bit-widths since 2026-12-02: rows named
  ``recommended`` before then ran without it);
- ``sym-weights``: symmetric weight grids (zero point 0) instead of asymmetric ones;
- ``sym-qkv``: q, k and v on symmetric grids at every bit-width (``activations.symmetric_roles: [attn_qkv]``,
  which OpenVINO's int8 attention needs); ``asym-qkv``: without that setting (and its ``by_bits`` entries)
  where the recipe has it;
- ``flip-aug``: every stage calibrated on the 50 images and their mirror images;
- ``+recalibrate[=OBSERVER]``: the prefix rows' quantizers set again on the quantized model after
  reconstruction (before bias correction), by the recipe's activation observer or OBSERVER;
- ``prefix=A+B``: a ``prefix_rows`` stage with ``points: [A, B]`` (``q``, ``k``, ``act``): those operands'
  class-token rows on a grid of their own;
- ``activations.KEY=VALUE`` (or ``weights.``): one setting of the recipe's observer configuration, e.g.
  ``activations.settings.percentiles=0.99+0.999+0.9999+0.99999`` (the observer's own settings) or
  ``activations.observer=omse``;
- ``STAGE.KEY=VALUE``: one setting of a stage already in the recipe (after ``+reconstruct`` when that
  adds the stage), e.g. ``+reconstruct,reconstruct.drop_prob=0``; VALUE is a number, a list written
  ``A+B`` (``opt_m.points=gelu+softmax``), else read as YAML; ``STAGE.by_bits.wXaY.KEY=VALUE`` sets it
  for one bit-width.

Since 2026-12-05 the recipe gives the class token's query rows a grid of their own at W6A6 and W4A8 (a
``prefix_rows`` stage); the rows measured at those bit-widths before then as ``recommended`` were renamed
``no-prefix_rows``, which reproduces them (``prefix=q`` is the recipe since).

Since the night of 2026-12-04 the recipe fits the last 4 blocks to the classifier's pooled features at
W6A6 (``reconstruct.head_blocks``); DeiT-Tiny's W6A6 rows measured before then as ``recommended`` were
renamed ``reconstruct.by_bits.w6a6.head_blocks=0``, which reproduces them.

Since the evening of 2026-12-02 the recipe searches twin-range post-softmax quantizers at 8-bit
activations (``opt_m.points``); the rows measured at 8-bit activations before then carry
``,opt_m.points=gelu`` in their name, which reproduces them.

``--data-free SOURCE`` (``clamp``, ``psaq``, ``gaussian``) chooses for the data-free user: every variant
is calibrated on the same 32 generated images (100 generator steps, seed 0, as the accuracy benchmark's
data-free rows; ``--df-steps N`` for another number, ``--df-setting KEY=VALUE`` for another generator setting) and scored on all 100 real calibration images, which
quantization never sees (so no halves). ``--images-cache DIR`` keeps the generated images between
invocations (the same files as ``accuracy.py --images-cache``).

``--seed N`` runs the variants with the recipe's seed N (reconstruction's batches, QDrop's masks, OPT-m's
sample; the halves stay the same): a choice within one seed's spread can be checked at another.

``--folds 4`` (or 5) splits the calibration images into that many folds instead of halves: each variant is
fitted on all but one fold and scored on it, once per fold. Each fit is then nearer the recipe's own
(DeiT-Tiny: 75 images against the 100 it ships with, where the halves fit 50), at twice the cost.

``--model cifar`` runs the same choice on the CIFAR-10 ViT (its 256 seed-0 calibration images in
halves of 128), to see whether what was chosen on DeiT-Tiny holds on another model.

A variant may start from another built-in recipe by naming it first: ``recommended-int,+reconstruct``.

(``no-X`` is written for ``-X``, which argparse would take for an option.) Results:
benchmarks/results/recipe_selection.json and a section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import parse_bits  # noqa: E402
from selection import calibration_halves, new_results  # noqa: E402
from foundation import machine, machine_marks, write_section  # noqa: E402

import vitq.recipes  # noqa: E402
from vitq.api import evaluate, quantize  # noqa: E402
from vitq.data import assets_dir  # noqa: E402
from vitq.eval.metrics import compare, predict  # noqa: E402
from vitq.recipes.recipe import setting_value  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS_JSON = HERE / "results" / "recipe_selection.json"
STAGE_NAMES = ("prefix_rows", "reparam", "opt_m", "gptq", "reconstruct", "recalibrate", "bias_correct")
CHANGES = ("-opt_m", "-reparam", "-reconstruct", "-gptq", "-bias_correct", "uniform-probs", "sym-weights", "sym-qkv", "asym-qkv", "gptq-float", "+reconstruct", "flip-aug", "-gptq-convs",
           "+attn_reparam", "+attn_reparam=qk", "+attn_reparam=v", "+recalibrate", "+recalibrate=OBSERVER")


def variant(name: str) -> Dict[str, Any]:
    """The recommended recipe's YAML (or the built-in recipe named first, e.g. ``recommended-int,+reconstruct``)
    with the named changes (comma-separated) applied."""
    changes = [c for c in name.split(",") if c]
    base = changes.pop(0) if changes and (Path(vitq.recipes.__file__).parent / f"{changes[0]}.yaml").exists() \
        else "recommended"
    spec = yaml.safe_load((Path(vitq.recipes.__file__).parent / f"{base}.yaml").read_text())
    spec["name"] = name
    for change in changes:
        change = "-" + change[3:] if change.startswith("no-") else change  # no-X: -X (see the docstring)
        if change.startswith("-") and change[1:] in STAGE_NAMES:  # -STAGE: without that stage
            spec["stages"] = [st for st in spec["stages"] if not (isinstance(st, dict) and change[1:] in st)
                              and st != change[1:]]
        elif change == "sym-weights":  # symmetric weight grids (zero point 0: OpenVINO's int8 kernels need it)
            spec["weights"]["symmetric"] = True
        elif change == "sym-qkv":  # symmetric q, k, v (OpenVINO's int8 attention products need it)
            spec["activations"]["symmetric_roles"] = ["attn_qkv"]
        elif change == "asym-qkv":
            spec["activations"].pop("symmetric_roles", None)
            for changes in spec["activations"].get("by_bits", {}).values():
                changes.pop("symmetric_roles", None)
        elif change == "uniform-probs":
            spec.pop("kinds", None)
        elif change == "gptq-float":
            for st in spec["stages"]:
                if isinstance(st, dict) and "gptq" in st:
                    st["gptq"]["float_target"] = True
        elif change.startswith("+reconstruct"):  # +reconstruct[=ITERATIONS][-cur]: after GPTQ, before bias correction
            settings = {"from_float": not change.endswith("-cur")}
            iterations = change[len("+reconstruct"):].removesuffix("-cur").lstrip("=")
            if iterations:
                settings["iterations"] = int(iterations)
            spec["stages"] = [st for st in spec["stages"] if not (isinstance(st, dict) and "reconstruct" in st)]
            at = next(i for i, st in enumerate(spec["stages"]) if isinstance(st, dict) and "gptq" in st)
            spec["stages"].insert(at + 1, {"reconstruct": settings})  # at every bit-width (no gate)
        elif change.startswith("+recalibrate"):  # +recalibrate[=OBSERVER]: last, before bias correction
            observer = change[len("+recalibrate"):].lstrip("=")
            at = next((i for i, st in enumerate(spec["stages"]) if isinstance(st, dict) and "bias_correct" in st),
                      len(spec["stages"]))
            spec["stages"].insert(at, {"recalibrate": {"observer": observer} if observer else {}})
        elif change.startswith("+attn_reparam"):  # +attn_reparam[=qk|=v]: after reparam, before calibrate
            part = change[len("+attn_reparam"):].lstrip("=")
            settings = {"qk": part in ("", "qk"), "v": part in ("", "v")}
            at = next(i for i, st in enumerate(spec["stages"]) if st == "calibrate" or
                      (isinstance(st, dict) and "calibrate" in st))
            spec["stages"].insert(at, {"attn_reparam": settings})
        elif change == "-gptq-convs":
            for st in spec["stages"]:
                if isinstance(st, dict) and "gptq" in st:
                    st["gptq"]["convs"] = False
        elif change == "flip-aug":
            pass  # the calibration images plus their mirror images (main)
        elif change.split(".", 1)[0] in ("weights", "activations") and "=" in change:  # activations.KEY=VALUE
            key, value = change.split("=", 1)
            *path, last = key.split(".")
            where = spec
            for part in path:
                where = where.setdefault(part, {})
            parsed = setting_value(value)
            where[last] = parsed.split("+") if isinstance(parsed, str) and "+" in parsed else parsed
            if isinstance(where[last], list):  # numbers written A+B
                where[last] = [setting_value(v) if isinstance(v, str) else v for v in where[last]]
        elif "." in change.split("=", 1)[0] and "=" in change:  # STAGE.KEY=VALUE
            key, value = change.split("=", 1)
            stage, setting = key.split(".", 1)
            found = [st for st in spec["stages"] if isinstance(st, dict) and stage in st]
            if not found:
                raise SystemExit(f"{change!r}: the recipe has no {stage!r} stage with settings")
            # as the CLI's --set reads it; A+B is a list (commas separate the changes here)
            parsed = setting_value(value)
            *path, last = setting.split(".")  # by_bits.w6a6.head_blocks: a setting of one bit-width
            where = found[0][stage]
            for part in path:
                where = where.setdefault(part, {})
            where[last] = parsed.split("+") if isinstance(parsed, str) and "+" in parsed else parsed
        elif change.startswith("prefix="):  # prefix=q+k+act: a prefix_rows stage first, with those points
            spec["stages"] = [st for st in spec["stages"] if not (isinstance(st, dict) and "prefix_rows" in st)]
            spec["stages"].insert(0, {"prefix_rows": {"points": change.split("=", 1)[1].split("+")}})
        elif change.startswith("reparam="):
            for st in spec["stages"]:
                if isinstance(st, dict) and "reparam" in st:
                    st["reparam"].update(strength=float(change.split("=", 1)[1]), strength_where="all")
        else:
            raise SystemExit(f"unknown change {change!r}; choose from {', '.join(CHANGES)} or reparam=STRENGTH, prefix=A+B or STAGE.KEY=VALUE")
    return spec


def generated_images(source: str, assets, cache, steps: int = 100, settings=None) -> torch.Tensor:
    """32 images of ``source`` made from DeiT-Tiny (``steps`` generator steps, seed 0, other generator
    ``settings``; 100 steps is the accuracy benchmark's data-free setting), read from ``cache`` when an
    earlier invocation left them there."""
    from accuracy import cached_images, deit_tiny_split  # noqa: E402

    loaded, calib, _, _ = deit_tiny_split(assets_dir(assets), 0)
    made = cached_images(source, loaded, calib, steps, cache, settings)
    if made["seconds"] is not None:
        print(f"32 {source} images ({steps} steps) took {made['seconds']:.0f} s to make", flush=True)
    return made["images"]


def render(results) -> None:
    rows = results["rows"]
    marks = machine_marks(results["machine"], rows)

    def secs(rs) -> str:  # the seconds, marked with the machine they ran on when not the file's
        found = "".join(sorted({marks.get(r.get("machine"), "") for r in rs}))
        return f"{sum(r['seconds'] for r in rs) / len(rs):.0f}{' ' + found if found else ''}"

    where = "".join(f"; seconds marked {mark}: {m}" for m, mark in marks.items())
    lines = ["## Recipe parts by bit-width: chosen on calibration images (issue 12)", "",
             f"Command: `{results['command']}`  ",
             f"Machine: {results['machine']}{' (unmarked seconds)' if marks else ''}{where}  ",
             f"Date: {results['date']}", "",
             "Each variant of the recommended recipe calibrated on one half of a model's calibration images and "
             "scored on the *other* (held-out); then the halves swap. KL(float ‖ quantized), lower is better; "
             "agreement in %; seconds: `vitq.quantize` on one half. Where both a variant's rows and `recommended`'s "
             "(the recipe as it was on that day, same machine and seed) keep each held-out image's KL (rows since "
             "2026-12-05 evening), the variant's per-image KL minus `recommended`'s: its mean and standard error "
             "(a difference within about two standard errors is noise)."]
    heads = {"imagenet": "DeiT-Tiny, the 100 calibration images in two halves of 50",
             "cifar": "CIFAR-10 ViT (`vit_cifar10_d6`), the 256 seed-0 calibration images in two halves of 128 "
                      "(`--model cifar`)"}
    for model, head in heads.items():
        mine = [r for r in rows if r.get("model", "imagenet") == model and not r.get("data_free")
                and not r.get("folds")]
        if not mine:
            continue
        lines += ["", f"### {head}", "",
                  "| bits | variant | held-out KL fold 0 | fold 1 | mean | against `recommended` (per image: mean ± s.e.) "
                  "| held-out agreement (mean) | seconds (mean) |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for bits in dict.fromkeys(r["bits"] for r in mine):
            # a variant measured on two machines has a line for each (the same recipe's KL differs between them)
            # and a variant run with another recipe seed (``--seed``) a line per seed
            for name, on, seed in dict.fromkeys((r["variant"], r.get("machine"), r.get("seed", 0))
                                                for r in mine if r["bits"] == bits):
                rs = measured(mine, bits, name, on, seed)
                if len(rs) != 2:
                    continue
                kl = [r["held_kl"] for r in rs]
                again = len({r.get("machine") for r in mine if r["bits"] == bits and r["variant"] == name}) > 1
                label = f"{name} (on {marks.get(on, 'the first machine')})" if again else name
                label += f" (seed {seed})" if seed else ""
                base = measured(mine, bits, "recommended", on, seed)
                d = paired(rs, base) if name != "recommended" else None
                lines.append(f"| {bits} | {label} | {kl[0]:.4f} | {kl[1]:.4f} | {sum(kl) / 2:.4f} | "
                             f"{f'{d[0]:+.4f} ± {d[1]:.4f}' if d else ''} | "
                             f"{sum(r['held_agreement'] for r in rs) / 2:.1f} | "
                             f"{secs(rs)} |")
    folded = [r for r in rows if r.get("folds")]
    for model, k in dict.fromkeys((r.get("model", "imagenet"), r["folds"]) for r in folded):
        mine = [r for r in folded if r.get("model", "imagenet") == model and r["folds"] == k]
        lines += ["", f"### {heads[model].split(',')[0]}, the calibration images in {k} folds: each variant fitted "
                  f"on {k - 1} of them and scored on the other, {k} times (`--folds {k}`)", "",
                  "| bits | variant | held-out KL per fold | mean | against `recommended` (per image: mean ± s.e.) | "
                  "held-out agreement (mean) | seconds (mean) |",
                  "|---|---|---|---:|---:|---:|---:|"]
        for bits, name, on, seed in dict.fromkeys((r["bits"], r["variant"], r.get("machine"), r.get("seed", 0))
                                                  for r in mine):
            rs = measured(mine, bits, name, on, seed)
            if len(rs) != k:
                continue
            kl = [r["held_kl"] for r in rs]
            label = name + (f" (seed {seed})" if seed else "")
            base = measured(mine, bits, "recommended", on, seed)
            d = paired(rs, base) if name != "recommended" else None
            lines.append(f"| {bits} | {label} | {' / '.join(f'{x:.4f}' for x in kl)} | {sum(kl) / k:.4f} | "
                         f"{f'{d[0]:+.4f} ± {d[1]:.4f}' if d else ''} | "
                         f"{sum(r['held_agreement'] for r in rs) / k:.1f} | {secs(rs)} |")
    free = [r for r in rows if r.get("data_free")]
    for source in dict.fromkeys(r["data_free"] for r in free):
        mine = [r for r in free if r["data_free"] == source]
        name, _, rest = source.partition("@")  # accuracy.df_source's names: clamp, clamp@500, clamp@500,KEY=VALUE
        steps, *pairs = rest.split(",") if rest else ("",)
        option = (f"--data-free {name}" + (f" --df-steps {steps}" if steps else "")
                  + "".join(f" --df-setting {p}" for p in pairs))
        what = ", ".join(pairs)
        lines += ["", f"### DeiT-Tiny calibrated on 32 generated images ({name}, {steps or 100} generator steps"
                  f"{', ' + what if what else ''}, seed 0), "
                  f"scored on all 100 real calibration images (`{option}`)", "",
                  "| bits | variant | KL on the 100 real images | agreement | seconds |", "|---|---|---:|---:|---:|"]
        for r in mine:
            seed = f" (recipe seed {r['seed']})" if r.get("seed") else ""
            lines.append(f"| {r['bits']} | {r['variant']}{seed} | {r['held_kl']:.4f} | {r['held_agreement']:.1f} | "
                         f"{secs([r])} |")
    lines += ["", results.get("conclusion", ""), ""]
    write_section("## Recipe parts by bit-width: chosen on calibration images", lines)


def latest_per_fold(rows):
    """One row per fold, the last written where a variant was measured again on the same machine and seed
    (the same settings reproduce their KL; a rerun adds what earlier rows lacked, e.g. per-image KLs)."""
    return sorted({r["fold"]: r for r in rows}.values(), key=lambda r: r["fold"])


def measured(rows, bits, variant, machine, seed):
    """A variant's rows at ``bits`` on one machine and recipe seed: one per fold (:func:`latest_per_fold`)."""
    return latest_per_fold([r for r in rows if (r["bits"], r["variant"], r.get("machine"), r.get("seed", 0))
                            == (bits, variant, machine, seed)])


def k_folds(halves, fp, k: int):
    """The calibration images in ``k`` equal folds, as (fit images and labels, held-out images and labels,
    held-out float logits) for each fold held out in turn: every image held out once, as with the halves,
    but each fit on (k-1)/k of them, nearer the recipe's own fit on all of them."""
    images = torch.cat([h[0] for h in halves])
    labels = torch.cat([h[1] for h in halves])
    logits = torch.cat([fp[i] for i in range(len(halves))])
    if len(images) % k:
        raise SystemExit(f"--folds {k}: {len(images)} calibration images do not split into {k} equal folds")
    size = len(images) // k
    out = []
    for fold in range(k):
        held = torch.zeros(len(images), dtype=torch.bool)
        held[fold * size:(fold + 1) * size] = True
        out.append(((images[~held], labels[~held]), (images[held], labels[held]), logits[held]))
    return out


def per_image_kl(logits, fp_logits) -> list:
    """KL(float ‖ quantized) of each held-out image, as :func:`vitq.eval.metrics.compare` computes their mean
    (the row's ``held_kl``): two variants scored on the same images can be compared image by image (:func:`paired`)."""
    p = torch.log_softmax(fp_logits.double(), -1)
    kl = (p.exp() * (p - torch.log_softmax(logits.double(), -1))).sum(-1)
    return [round(float(v), 6) for v in kl]


def paired(rows, base_rows):
    """Mean per-image KL difference of ``rows`` against ``base_rows`` (the same folds, so the same held-out
    images) and its standard error, or None where either lacks per-image KLs."""
    if not rows or len(rows) != len(base_rows) or not all(r.get("image_kl") for r in rows + base_rows):
        return None
    diffs = torch.tensor([a - b for r, q in zip(rows, base_rows) for a, b in zip(r["image_kl"], q["image_kl"])],
                         dtype=torch.float64)
    return float(diffs.mean()), float(diffs.std() / len(diffs) ** 0.5)


def moved_codes(result) -> dict:
    """The fraction of the weights whose rounding block reconstruction changed (mean over blocks)."""
    codes = result.plan.meta.get("reconstruct", {}).get("changed_codes")
    return {"reconstruct_changed_codes": round(sum(codes.values()) / len(codes), 5)} if codes else {}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default=None)
    parser.add_argument("--model", choices=["imagenet", "cifar"], default="imagenet",
                        help="DeiT-Tiny (default) or the CIFAR-10 ViT")
    parser.add_argument("--bits", nargs="+", default=["w8a8"])
    parser.add_argument("--variants", nargs="+",
                        default=["recommended", "-opt_m", "uniform-probs", "-opt_m,uniform-probs"])
    parser.add_argument("--data-free", choices=["clamp", "psaq", "gaussian"], default=None,
                        help="calibrate on 32 generated images, score on all 100 real calibration images")
    parser.add_argument("--images-cache", default=None, help="--data-free: keep the generated images in this folder")
    parser.add_argument("--df-steps", type=int, default=100,
                        help="--data-free: generator steps (rows made with other than 100 name their source SOURCE@STEPS)")
    parser.add_argument("--df-setting", action="append", default=[], metavar="KEY=VALUE",
                        help="--data-free: a generator setting (repeatable; e.g. label_smoothing=0.3); rows name "
                             "their source SOURCE@STEPS,KEY=VALUE")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0,
                        help="the recipe's seed (reconstruction's batches, QDrop's masks, OPT-m's sample); the "
                             "halves stay the same")
    parser.add_argument("--folds", type=int, default=2, choices=[2, 4, 5],
                        help="cross-validation folds of the calibration images (2: the halves; 4: fit on 75 "
                             "of DeiT-Tiny's 100, score on the other 25, four times)")
    parser.add_argument("--append", action="store_true", help="keep the rows already in the JSON")
    parser.add_argument("--render", action="store_true", help="rewrite the RESULTS.md section from the JSON")
    args = parser.parse_args(argv)
    if args.render:
        render(json.loads(RESULTS_JSON.read_text()))
        return 0
    torch.set_num_threads(args.threads)
    model, halves, fp = calibration_halves(args.assets, args.model)
    results = new_results('select_recipe.py', argv, RESULTS_JSON, args.append)
    if args.data_free:
        if args.model != "imagenet":
            parser.error("--data-free is measured on DeiT-Tiny (--model imagenet)")
        from accuracy import df_source, parse_gen_settings  # noqa: E402

        settings = parse_gen_settings(args.df_setting)
        generated = generated_images(args.data_free, args.assets, args.images_cache, args.df_steps, settings)
        source = df_source(args.data_free, args.df_steps, settings)
        every = (torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves]))
        fp_all = torch.cat([fp[0], fp[1]])
        for w, a in parse_bits(args.bits):
            for name in args.variants:
                t0 = time.perf_counter()
                result = quantize(model, variant(name), [generated], w_bits=w, a_bits=a, progress=False,
                                  generated=True, seed=args.seed)
                qmodel = result.model
                seconds = time.perf_counter() - t0
                h = evaluate(model, qmodel, [every], device="cpu", progress=False, fp_logits=fp_all)
                row = {"model": "imagenet", "data_free": source, "bits": f"W{w}A{a}", "variant": name,
                       "held_kl": round(h["kl"], 4), "held_agreement": h["agreement"], "seconds": round(seconds, 1),
                       **moved_codes(result), "machine": machine(), **({"seed": args.seed} if args.seed else {})}
                print(row, flush=True)
                results["rows"].append(row)
                RESULTS_JSON.write_text(json.dumps(results, indent=1) + "\n")
        render(results)
        print(f"wrote {RESULTS_JSON} and {HERE / 'RESULTS.md'}")
        return 0
    splits = [(halves[fold], halves[1 - fold], fp[1 - fold]) for fold in (0, 1)]
    if args.folds != 2:
        splits = k_folds(halves, fp, args.folds)
    for w, a in parse_bits(args.bits):
        for name in args.variants:
            recipe = variant(name)
            for fold, (fit, held, held_fp) in enumerate(splits):
                t0 = time.perf_counter()
                images = fit[0]
                if "flip-aug" in name.split(","):
                    images = torch.cat([images, images.flip(-1)])
                result = quantize(model, recipe, [images], w_bits=w, a_bits=a, progress=False, seed=args.seed)
                qmodel = result.model
                seconds = time.perf_counter() - t0
                # one pass of the quantized model: its logits give the row's metrics and each image's KL
                (logits,), labels = predict(qmodel, [held], "cpu", progress=False)
                h = compare(held_fp, logits, labels)
                image_kl = per_image_kl(logits, held_fp)
                row = {"model": args.model, "bits": f"W{w}A{a}", "fold": fold, **({"folds": args.folds} if args.folds != 2 else {}),
                       "variant": name, "held_kl": round(h["kl"], 4),
                       "held_agreement": h["agreement"], "seconds": round(seconds, 1), **moved_codes(result),
                       "machine": machine(), **({"seed": args.seed} if args.seed else {})}
                print(row, flush=True)
                row["image_kl"] = image_kl
                results["rows"].append(row)
                RESULTS_JSON.write_text(json.dumps(results, indent=1) + "\n")
    render(results)
    print(f"wrote {RESULTS_JSON} and {HERE / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
