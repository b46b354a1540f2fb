"""Data-free calibration images made from the float model itself.

A generator is a registered class: float model in, a tensor of normalised images out, seeded.
The float model is never modified; gradients flow to the images only.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ...errors import VitqError, reject_unknown_keys
from ...models.adapters import find_adapter, kept_on_its_device, scores_last
from ...registry import Registry
from .losses import (PSAQ_TV_SCALE, patch_contrastive_loss, patch_similarity_entropy, pixel_information_loss, roughness,
                     total_variation)

Tensor = torch.Tensor

GENERATORS: Registry[type] = Registry("generator")

#: the per-pixel information loss's weight for a segmentation model when its setting is not given:
#: chosen on CamVid's val/ split (benchmarks/segmentation.py --split val), data-free W4A8 with the
#: recommended recipe, against 0
SEGMENTATION_PIXEL_WEIGHT = 1.0


class GenerationDiverged(VitqError):
    """The loss became NaN or inf. ``images`` holds the last finite images of every batch so far."""

    def __init__(self, message: str, images: Tensor) -> None:
        super().__init__(message)
        self.images = images


@dataclass(frozen=True)
class GeneratorSettings:
    """Settings shared by the optimising generators (PSAQ-ViT's image priors, METHODS.md §3.2).

    Attributes:
        iterations: Adam steps per batch.
        lr: Adam learning rate (β = (0.5, 0.9)), with linear warm-up then cosine decay.
        warmup: warm-up steps (at most a tenth of ``iterations``).
        batch_size: images optimised together; more images are made batch after batch.
        ce_weight: weight of the cross-entropy to random target classes (the output loss).
        label_smoothing: the cross-entropy's label smoothing ε: the target class gets 1 − ε of the
            target distribution, so the images stop at about that confidence in their class instead of
            being pushed towards a softmax of 1 (images far more confident than real ones).
        tv_weight: weight of the total-variation prior.
        tv_target: with it, PSAQ-ViT's form of the prior: the images' roughness (:func:`roughness`,
            the root-mean-square difference of neighbouring pixels over four directions) is held at
            this value by ``tv_weight · PSAQ_TV_SCALE · |roughness − tv_target|`` (PSAQ's ``0.05 ·
            |TV − v|`` at its batch of 32 images at 224 pixels, v = PSAQ_TV_SCALE · tv_target; its v of
            2500-3000 is 1.14-1.37 here, real ImageNet images about 1.5). Without it (None) the mean
            squared neighbour difference is minimised with weight ``tv_weight``.
        jitter: random roll of up to this fraction of the image side, each step.
        flip: random horizontal flips, each step.
        crop_scale: random zoom, each step (off at 1): the model sees a random square crop of the
            images covering between this fraction of their area and all of it, resized back to the
            input size (the same crop for the whole batch), so that the images must look right at
            several scales (Plug-In Inversion's random crops).
        patch_weight: weight of the patch loss (PSAQ entropy or CLAMP contrastive).
        window, positives, tau, negatives: CLAMP's contrastive settings.
        bandwidth, kde_points: PSAQ's kernel density estimate.
        pixel_weight: for a segmentation model (per-pixel class scores, no image-level class): the
            weight of :func:`pixel_information_loss`, its output loss in place of the cross-entropy to
            random classes (confident pixels, every class used across the batch). None (the default):
            :data:`SEGMENTATION_PIXEL_WEIGHT` for a model that says it is a segmentation model
            (``task = "segmentation"``, as vitq's :class:`~vitq.models.ViTSegmenter` and a card with a
            ``segmentation_head``), 0 for any other; 0: the images come from the patch losses and image
            priors alone. A positive weight on a model without per-pixel scores is an error.
        precision: the float model's forward and backward in ``float32`` (default), ``bfloat16`` or
            ``float16`` autocast (the images, the losses and Adam stay in float32): bfloat16 is faster
            on a GPU and on CPUs with AMX or AVX512-BF16, slower on CPUs without them.
    """

    iterations: int = 500
    lr: float = 0.2
    warmup: int = 100
    batch_size: int = 32
    ce_weight: float = 1.0
    label_smoothing: float = 0.0
    tv_weight: float = 0.05
    tv_target: Optional[float] = None
    jitter: float = 0.0625
    flip: bool = True
    crop_scale: float = 1.0
    patch_weight: float = 1.0
    window: int = 3
    positives: int = 4
    tau: float = 0.1
    negatives: str = "window"
    bandwidth: float = 0.01
    kde_points: int = 10
    pixel_weight: Optional[float] = None
    precision: str = "float32"

    def __post_init__(self) -> None:
        for name in ("iterations", "batch_size", "window", "positives", "kde_points"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise VitqError(f"generator setting {name} must be a positive integer, got {value!r}")
        for name in ("lr", "tau", "bandwidth"):
            if not getattr(self, name) > 0:
                raise VitqError(f"generator setting {name} must be positive, got {getattr(self, name)!r}")
        if self.window % 2 == 0 or self.window < 3:
            raise VitqError(f"window must be an odd size of at least 3, got {self.window}")
        if self.positives >= self.window**2 - 1:
            raise VitqError(f"positives must be fewer than the {self.window**2 - 1} neighbours of a window")
        if self.negatives not in ("window", "image"):
            raise VitqError(f"negatives must be 'window' or 'image', got {self.negatives!r}")
        if not 0 <= self.label_smoothing < 1:
            raise VitqError(f"label_smoothing is the probability moved off the target class, in [0, 1), "
                            f"got {self.label_smoothing!r}")
        if self.tv_target is not None and not self.tv_target > 0:
            raise VitqError(f"tv_target is a roughness (about 1.5 for real images), positive, got {self.tv_target!r}")
        if self.pixel_weight is not None and not (
                isinstance(self.pixel_weight, (int, float)) and not isinstance(self.pixel_weight, bool)
                and math.isfinite(self.pixel_weight) and self.pixel_weight >= 0):
            raise VitqError(f"pixel_weight must be a finite number of at least 0 (or null: the default for the "
                            f"model), got {self.pixel_weight!r}")
        if self.precision not in ("float32", "bfloat16", "float16"):
            raise VitqError(f"precision must be 'float32', 'bfloat16' or 'float16', got {self.precision!r}")
        if isinstance(self.crop_scale, bool) or not isinstance(self.crop_scale, (int, float)) \
                or not 0 < self.crop_scale <= 1:
            raise VitqError(f"crop_scale is the smallest fraction of the image area a random crop keeps, in (0, 1] "
                            f"(1: no cropping), got {self.crop_scale!r}")
        if not 0 <= self.jitter < 0.5:
            raise VitqError(f"jitter is a fraction of the image side in [0, 0.5), got {self.jitter}")

    def pixel_weight_for(self, model: nn.Module) -> float:
        """The weight of the per-pixel information loss for ``model``: the setting, or without one
        :data:`SEGMENTATION_PIXEL_WEIGHT` for a segmentation model and 0 for any other."""
        if self.pixel_weight is not None:
            return float(self.pixel_weight)
        return SEGMENTATION_PIXEL_WEIGHT if getattr(model, "task", None) == "segmentation" else 0.0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "generator settings") -> "GeneratorSettings":
        reject_unknown_keys(cls, data, where)
        return cls(**data)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class GenerationResult:
    """Images (normalised for the model), their target classes, and what the run cost."""

    images: Tensor
    targets: Tensor
    seconds: float
    losses: List[float] = field(default_factory=list)
    #: whether an output loss was part of the loss: the cross-entropy to random classes for a
    #: classifier, the per-pixel information loss for a segmentation model given a ``pixel_weight``;
    #: otherwise (a backbone inside a dense model) the images come from the patch losses alone
    output_loss: bool = True


def has_class_head(model: nn.Module) -> bool:
    """Whether ``model`` outputs image-level class scores (a classifier with ``num_classes`` > 0);
    a backbone without head, or a segmentation model, does not: data-free generation drops its
    cross-entropy to random classes and keeps the patch losses and image priors."""
    return int(getattr(model, "num_classes", 0) or 0) > 0 and getattr(model, "task", "classification") == "classification"


class Generator:
    """Base: an optimising generator. Subclasses add a patch loss on the token grids."""

    #: whether the generator reads the model's token grids (needs a supported family)
    uses_grids = True

    def __init__(self, settings: Optional[GeneratorSettings] = None) -> None:
        self.settings = settings or GeneratorSettings()

    def patch_loss(self, grids: Sequence[Tensor]) -> Tensor:  # pragma: no cover - subclasses
        raise NotImplementedError

    def generate(
        self,
        model: nn.Module,
        num_images: int,
        data_config: Mapping[str, Any],
        *,
        seed: int = 0,
        device: Optional[torch.device] = None,
        progress: bool = True,
    ) -> GenerationResult:
        """Make ``num_images`` normalised images ``[N, 3, H, W]`` for ``model``.

        Raises:
            GenerationDiverged: NaN/inf in the loss; carries the images made so far.
        """
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images <= 0:
            raise VitqError(f"the number of images must be a positive integer, got {num_images!r}")
        device = torch.device(device) if device is not None else next(model.parameters()).device
        gen = torch.Generator(device="cpu").manual_seed(seed)
        if has_class_head(model):
            targets = torch.randint(0, int(model.num_classes), (num_images,), generator=gen)
        else:  # no head: no output loss, the targets are placeholders
            targets = torch.zeros(num_images, dtype=torch.long)
        start = time.perf_counter()
        batches, losses = [], []
        bs = self.settings.batch_size
        steps = math.ceil(num_images / bs)
        bar = tqdm(total=steps * self._iterations(), desc=f"generate ({self.name})", unit="step",
                   disable=not progress, leave=False)
        try:
            with _frozen(model, device):
                for b in range(steps):
                    y = targets[b * bs : (b + 1) * bs]
                    try:
                        x, batch_losses = self._optimise(model, y, data_config, gen, device, bar)
                    except GenerationDiverged as err:
                        done = torch.cat(batches + [err.images]) if batches else err.images
                        raise GenerationDiverged(f"batch {b + 1}/{steps}: {err}", done) from None
                    batches.append(x)
                    losses += batch_losses
        finally:
            bar.close()
        return GenerationResult(torch.cat(batches), targets, time.perf_counter() - start, losses,
                                output_loss=self.uses_output_loss(model))

    def uses_output_loss(self, model: nn.Module) -> bool:
        """Whether images for ``model`` are shaped by its output: a classifier's cross-entropy to random
        classes (``ce_weight``) or a segmentation model's per-pixel information loss (``pixel_weight``)."""
        if not self.uses_grids:
            return False
        if has_class_head(model):
            return self.settings.ce_weight > 0
        return self.settings.pixel_weight_for(model) > 0

    @property
    def name(self) -> str:
        return getattr(type(self), "registered_name", type(self).__name__)

    def _iterations(self) -> int:
        return self.settings.iterations

    def refine(
        self,
        model: nn.Module,
        images: Tensor,
        targets: Tensor,
        data_config: Mapping[str, Any],
        *,
        steps: int,
        seed: int = 0,
        device: Optional[torch.device] = None,
        adversary: Optional[nn.Module] = None,
        adversary_weight: float = 0.0,
    ) -> GenerationResult:
        """Go on optimising existing images for ``steps`` steps (CLAMP-ViT's data refresh).

        With an ``adversary`` (the quantized model being built), ``adversary_weight ·
        KL(float ‖ adversary)`` is subtracted from the loss, so the images move to where the two
        models disagree (PSAQ-ViT v2's adaptive pattern).

        Raises:
            GenerationDiverged: NaN/inf in the loss; carries the images before it.
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
            raise VitqError(f"refine steps must be a positive integer, got {steps!r}")
        device = torch.device(device) if device is not None else next(model.parameters()).device
        gen = torch.Generator(device="cpu").manual_seed(seed)
        start = time.perf_counter()
        bar = tqdm(total=0, disable=True)
        out, losses = [], []
        bs = self.settings.batch_size
        with _frozen(model, device), contextlib.ExitStack() as stack:
            if adversary is not None:
                stack.enter_context(_frozen(adversary, device))
            for b in range(0, len(images), bs):
                x, batch_losses = self._optimise(model, targets[b:b + bs], data_config, gen, device, bar,
                                                 x0=images[b:b + bs], iterations=steps, adversary=adversary,
                                                 adversary_weight=adversary_weight)
                out.append(x)
                losses += batch_losses
        return GenerationResult(torch.cat(out), targets, time.perf_counter() - start, losses)

    def _optimise(self, model, targets, data_config, gen, device, bar, *, x0: Optional[Tensor] = None,
                  iterations: Optional[int] = None, adversary: Optional[nn.Module] = None,
                  adversary_weight: float = 0.0) -> Tuple[Tensor, List[float]]:
        s = self.settings
        iterations = s.iterations if iterations is None else iterations
        C, H, W = data_config["input_size"]
        mean = torch.tensor(data_config["mean"], device=device).view(1, -1, 1, 1)
        std = torch.tensor(data_config["std"], device=device).view(1, -1, 1, 1)
        lo, hi = (0 - mean) / std, (1 - mean) / std  # the valid range of normalised pixels
        x = torch.randn((len(targets), C, H, W), generator=gen).to(device) if x0 is None else x0.detach().to(device)
        x = torch.max(torch.min(x, hi), lo).clone().requires_grad_(True)
        targets = targets.to(device)
        opt = torch.optim.Adam([x], lr=s.lr, betas=(0.5, 0.9))
        warmup = min(s.warmup, iterations // 10)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt,
            lambda i: (i + 1) / (warmup + 1) if i < warmup
            else 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, iterations - warmup))),
        )
        head = has_class_head(model)
        if head and (s.pixel_weight or 0) > 0:
            raise VitqError("pixel_weight is for segmentation models (per-pixel class scores); a classifier's images "
                            "are shaped by its cross-entropy to random classes (ce_weight): set pixel_weight to 0")
        pixel_weight = 0.0 if head else s.pixel_weight_for(model)
        grids: List[Tensor] = []
        hooks = []
        if self.uses_grids:
            for module, to_grid in find_adapter(model).token_grids(model):
                hooks.append(module.register_forward_hook(lambda m, i, o, f=to_grid: grids.append(f(o).float())))
        amp = (contextlib.nullcontext() if s.precision == "float32"
               else torch.autocast(device.type, dtype=getattr(torch, s.precision)))
        losses, good = [], x.detach().clone()
        max_shift = int(round(s.jitter * min(H, W)))
        try:
            for step in range(iterations):
                grids.clear()
                dy, dx = (torch.randint(-max_shift, max_shift + 1, (2,), generator=gen).tolist()
                          if max_shift else (0, 0))
                inp = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
                if s.flip and torch.rand((), generator=gen).item() < 0.5:
                    inp = inp.flip(3)
                if s.crop_scale < 1:
                    inp = _random_zoom(inp, s.crop_scale, gen)
                with amp:
                    logits = model(inp)
                logits = logits.float() if torch.is_tensor(logits) else logits
                loss = (s.tv_weight * total_variation(x).mean() if s.tv_target is None
                        else s.tv_weight * PSAQ_TV_SCALE * (roughness(x) - s.tv_target).abs())
                if head:
                    loss = loss + s.ce_weight * F.cross_entropy(logits, targets, label_smoothing=s.label_smoothing)
                elif pixel_weight > 0:
                    if not (torch.is_tensor(logits) and logits.dim() == 4):
                        got = f"shape {tuple(logits.shape)}" if torch.is_tensor(logits) else type(logits).__name__
                        raise VitqError(f"pixel_weight needs per-pixel class scores [B, K, H, W] from the model, got "
                                        f"{got}: set pixel_weight to 0 for this model")
                    loss = loss + pixel_weight * pixel_information_loss(logits)
                if self.uses_grids and s.patch_weight:
                    loss = loss + s.patch_weight * self.patch_loss(grids)
                if adversary is not None and adversary_weight:
                    q_logits = scores_last(adversary(inp))
                    disagreement = F.kl_div(F.log_softmax(q_logits, -1), F.log_softmax(scores_last(logits), -1),
                                            log_target=True, reduction="batchmean")
                    loss = loss - adversary_weight * disagreement
                if not torch.isfinite(loss):
                    raise GenerationDiverged(f"the loss became {loss.item()} at step {step + 1}", good)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                with torch.no_grad():
                    x.copy_(torch.max(torch.min(x, hi), lo))
                    if not torch.isfinite(x).all():
                        raise GenerationDiverged(f"the images became NaN/inf at step {step + 1}", good)
                good = x.detach().clone()
                losses.append(loss.item())
                bar.update(1)
        finally:
            for h in hooks:
                h.remove()
        return good, losses


def _random_zoom(x: Tensor, min_area: float, gen: torch.Generator) -> Tensor:
    """A random square crop of ``x`` covering between ``min_area`` of its area and all of it, resized
    back to ``x``'s size (bilinear; differentiable in ``x``)."""
    H, W = x.shape[-2:]
    area = min_area + (1 - min_area) * torch.rand((), generator=gen).item()
    h, w = max(1, round(H * area ** 0.5)), max(1, round(W * area ** 0.5))
    top = int(torch.randint(0, H - h + 1, (), generator=gen))
    left = int(torch.randint(0, W - w + 1, (), generator=gen))
    crop = x[..., top:top + h, left:left + w]
    if (h, w) == (H, W):
        return crop
    return F.interpolate(crop, size=(H, W), mode="bilinear", align_corners=False)


@contextlib.contextmanager
def _frozen(model: nn.Module, device: torch.device):
    """Eval mode, no parameter gradients and ``device`` for the duration; the model's own flags and
    device come back after."""
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    with kept_on_its_device(model):
        model.eval().to(device).requires_grad_(False)
        try:
            with torch.enable_grad():
                yield model
        finally:
            for p, flag in zip(model.parameters(), flags):
                p.requires_grad_(flag)
            model.train(was_training)


def _register(name: str):
    def decorator(cls):
        cls.registered_name = name
        return GENERATORS.register(name)(cls)

    return decorator


@_register("gaussian")
class GaussianGenerator(Generator):
    """Gaussian noise at the model's input statistics (the baseline that should do badly)."""

    uses_grids = False

    def _iterations(self) -> int:
        return 1

    def _optimise(self, model, targets, data_config, gen, device, bar, **refine: Any):
        """Fresh noise; a refresh (``refine``) draws new noise too: there is nothing to optimise."""
        C, H, W = data_config["input_size"]
        mean = torch.tensor(data_config["mean"]).view(1, -1, 1, 1)
        std = torch.tensor(data_config["std"]).view(1, -1, 1, 1)
        # N(0, 1) in the normalised space is the data's mean and spread in pixel space
        x = torch.randn((len(targets), C, H, W), generator=gen)
        x = torch.max(torch.min(x, (1 - mean) / std), (0 - mean) / std)
        bar.update(1)
        return x.to(device), []


@_register("psaq")
class PatchSimilarityGenerator(Generator):
    """PSAQ-ViT v1: maximise the patch-similarity entropy of every block's attention output,
    with cross-entropy to random classes and a total-variation prior."""

    def patch_loss(self, grids: Sequence[Tensor]) -> Tensor:
        s = self.settings
        return -sum(patch_similarity_entropy(g, s.bandwidth, s.kde_points).mean() for g in grids)


@_register("clamp")
class PatchContrastiveGenerator(Generator):
    """CLAMP-ViT stage 1: patch-level contrastive loss on every block's attention output (the
    most similar neighbours in a k×k window are positives), with the output loss and image priors."""

    def patch_loss(self, grids: Sequence[Tensor]) -> Tensor:
        s = self.settings
        return sum(patch_contrastive_loss(g, s.window, s.positives, s.tau, s.negatives) for g in grids) / len(grids)


def create_generator(name: str, settings: Optional[Mapping[str, Any]] = None) -> Generator:
    """The generator registered as ``name`` with ``settings`` (see :class:`GeneratorSettings`)."""
    cls = GENERATORS.get(name)
    return cls(GeneratorSettings.from_dict(settings or {}))


def make_refresher(
    generator: Generator,
    float_model: nn.Module,
    targets: Tensor,
    data_config: Mapping[str, Any],
    *,
    steps: int = 50,
    adversary_weight: float = 0.0,
    seed: int = 0,
    device: Optional[torch.device] = None,
    log: Optional[Any] = None,
):
    """A data refresher for CLAMP-ViT's cycle (``vitq.quantize(..., refresh=...)``): given the
    quantized model being built and the current image batches, it refines the images ``steps``
    more steps against it (:meth:`Generator.refine`) and returns them in batches of the same size.

    ``targets`` are the images' target classes, in the order of the batches.
    """

    def refresh(qmodel: nn.Module, batches: List[Tensor], step: int) -> List[Tensor]:
        images = torch.cat([b.detach().cpu() for b in batches])
        if len(images) != len(targets):
            raise VitqError(f"{len(images)} images to refresh but {len(targets)} targets: the refresher needs "
                            "every synthetic image, in order (no held-out split)")
        result = generator.refine(float_model, images, targets, data_config, steps=steps, seed=seed + step,
                                  device=device, adversary=qmodel, adversary_weight=adversary_weight)
        if log is not None:
            log("refreshed the %d synthetic images after %d search cycles (%d steps, %.1f s)",
                len(images), step, steps, result.seconds)
        return list(result.images.split(len(batches[0])))

    return refresh
