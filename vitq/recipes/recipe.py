"""Recipes: YAML files read into validated, frozen dataclasses. An unknown key is an error."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Mapping, Tuple, Union

import yaml

from ..errors import VitqError, reject_unknown_keys
from ..data.synthetic.generators import GENERATORS, GeneratorSettings
from ..methods.stages import STAGES, StageConfig
from ..quant.observers import ObserverConfig
from ..quant.protocol import KIND_CHOICES
from ..registry import Registry

RECIPE_DIR = Path(__file__).parent


@dataclass(frozen=True)
class DataFreeConfig:
    """Synthetic calibration images: which generator, how many, with which settings
    (see :class:`vitq.data.synthetic.GeneratorSettings`).

    A recipe whose ``search`` stage has ``refresh_every`` refines the images during the search
    (CLAMP-ViT's cycle): ``refresh_steps`` more generator steps each time, minus
    ``refresh_adversary`` · KL(float ‖ quantized) so that the images move to where the current
    quantized model disagrees with the float one (0 turns that feedback off).
    """

    generator: str = "clamp"
    num_images: int = 32
    settings: Dict[str, Any] = field(default_factory=dict)
    refresh_steps: int = 50
    refresh_adversary: float = 0.0

    def __post_init__(self) -> None:
        GENERATORS.get(self.generator)
        if isinstance(self.refresh_steps, bool) or not isinstance(self.refresh_steps, int) or self.refresh_steps <= 0:
            raise VitqError(f"data_free.refresh_steps must be a positive integer, got {self.refresh_steps!r}")
        if not isinstance(self.refresh_adversary, (int, float)) or self.refresh_adversary < 0:
            raise VitqError(f"data_free.refresh_adversary must be a number ≥ 0, got {self.refresh_adversary!r}")
        if isinstance(self.num_images, bool) or not isinstance(self.num_images, int) or self.num_images <= 0:
            raise VitqError(f"data_free.num_images must be a positive integer, got {self.num_images!r}")
        GeneratorSettings.from_dict(self.settings, "data_free.settings")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> "DataFreeConfig":
        reject_unknown_keys(cls, data, where)
        return cls(**data)


@dataclass(frozen=True)
class Recipe:
    """A named method: how weights and activations are calibrated and which stages run.

    ``data_free`` says how synthetic calibration images are made when a run asks for them
    (``--data-free``); real calibration images ignore it. ``kinds`` chooses the quantizer kind of
    a role where there is a choice (``{attn_probs: logsqrt2}``); the protocol still says which
    roles are quantized.

    Example:
        >>> load_recipe("omse").activations.observer
        'omse'
    """

    name: str
    description: str = ""
    weights: ObserverConfig = field(default_factory=lambda: ObserverConfig("minmax", symmetric=True))
    activations: ObserverConfig = field(default_factory=ObserverConfig)
    stages: Tuple[StageConfig, ...] = (StageConfig("calibrate", STAGES.get("calibrate").Settings()),)
    data_free: DataFreeConfig = field(default_factory=DataFreeConfig)
    kinds: Dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise VitqError("a recipe needs a non-empty 'name'")
        if not isinstance(self.kinds, Mapping):
            raise VitqError(f"recipe {self.name!r}: 'kinds' maps a role to a quantizer kind, e.g. "
                            "{attn_probs: logsqrt2}")
        for role, kind in self.kinds.items():
            if role not in KIND_CHOICES or kind not in KIND_CHOICES[role]:
                choices = "; ".join(f"{r}: {', '.join(k)}" for r, k in KIND_CHOICES.items())
                raise VitqError(f"recipe {self.name!r}: kinds {role}: {kind} is not a choice ({choices})")
        if self.weights.symmetric_roles or any("symmetric_roles" in c for c in self.weights.by_bits.values()):
            raise VitqError(f"recipe {self.name!r}: 'symmetric_roles' is an activation setting (weights have "
                            "one role: use weights.symmetric or weights.symmetric_min_bits)")
        object.__setattr__(self, "kinds", dict(self.kinds))
        stages = tuple(s if isinstance(s, StageConfig) else StageConfig.parse(s, f"recipe {self.name!r}")
                       for s in self.stages)
        object.__setattr__(self, "stages", stages)
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise VitqError(f"recipe {self.name!r} names a stage twice: {names}")

    @property
    def stage_names(self) -> Tuple[str, ...]:
        return tuple(s.name for s in self.stages)

    def stage(self, name: str) -> StageConfig:
        for s in self.stages:
            if s.name == name:
                return s
        raise VitqError(f"recipe {self.name!r} has no stage {name!r} (its stages: {', '.join(self.stage_names)})")

    def with_overrides(self, overrides: Mapping[str, Mapping[str, Any]]) -> "Recipe":
        """A copy with some stage settings replaced: ``{"search": {"passes": 2}}``."""
        for name in overrides:
            self.stage(name)
        stages = tuple(s.with_overrides(overrides[s.name]) if s.name in overrides else s for s in self.stages)
        return replace(self, stages=stages)

    def with_budget(self, budget: str) -> "Recipe":
        """A copy whose width-allocating stage (Greedy MP, or a mixed-precision search) aims at the
        average bits ``budget``, e.g. ``"w4a6"``.

        Example:
            >>> from vitq.recipes import load_recipe
            >>> load_recipe("mptq-vit-mp").with_budget("w5a6").stage("greedy_mp").settings.budget_w
            5.0
        """
        from ..methods.mixed import parse_budget

        budget_w, budget_a = parse_budget(budget)
        for config in self.stages:
            if config.settings.allocates_widths():
                return self.with_overrides({config.name: {"budget_w": budget_w, "budget_a": budget_a}})
        raise VitqError(f"a bit budget needs a recipe that allocates widths: a greedy_mp stage (mptq-vit-mp) or a "
                        f"search with bits (clamp-vit-mp); recipe {self.name!r} has {', '.join(self.stage_names)}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "recipe") -> "Recipe":
        if not isinstance(data, Mapping):
            raise VitqError(f"{where}: a recipe is a mapping of keys (name, weights, activations, stages, ...), "
                            f"got {type(data).__name__}")
        reject_unknown_keys(cls, data, where)
        data = dict(data)
        if not isinstance(data.get("name"), str) or not data["name"].strip():
            raise VitqError(f"{where}: the recipe needs a name, e.g. 'name: my-recipe' as its first line")
        for key in ("weights", "activations"):
            if key in data:
                data[key] = ObserverConfig.from_dict(data[key], f"{where}: {key}")
        if "stages" in data:
            if not isinstance(data["stages"], (list, tuple)) or not data["stages"]:
                raise VitqError(f"{where}: 'stages' must be a non-empty list")
            data["stages"] = tuple(StageConfig.parse(s, where) for s in data["stages"])
        if "data_free" in data:
            data["data_free"] = DataFreeConfig.from_dict(data["data_free"], f"{where}: data_free")
        return cls(**data)

    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out["stages"] = [s.to_dict() for s in self.stages]
        return out


RECIPES: Registry[Path] = Registry("recipe")
for _path in sorted(RECIPE_DIR.glob("*.yaml")):
    RECIPES.register(_path.stem)(_path)


def setting_value(text: str) -> Any:
    """A stage setting written as text (``--set STAGE.KEY=VALUE``): YAML (2, true, [a, b], null),
    except that a number in exponent form is a number (YAML 1.1 reads ``4e-4`` as a string)."""
    text = text.strip()
    if not text:
        return None
    try:
        return float(text) if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", text) else yaml.safe_load(text)
    except yaml.YAMLError:
        raise VitqError(f"{text!r} is not a valid setting value (YAML)") from None


def load_recipe(recipe: Union[str, Path, Recipe, Mapping[str, Any]]) -> Recipe:
    """A recipe by built-in name (``vitq list``), YAML path, mapping, or as it is."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return Recipe.from_dict(recipe)
    text = str(recipe)
    if text.endswith((".yaml", ".yml")) or Path(text).is_file():
        path = Path(text)
        if not path.is_file():
            raise VitqError(f"recipe file {path} does not exist")
    else:
        path = RECIPES.get(text)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise VitqError(f"recipe {path} is not valid YAML: {err}") from None
    return Recipe.from_dict(data or {}, where=f"recipe {path.name}")
