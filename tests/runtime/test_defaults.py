"""Every config default is written once, in the recipe's dataclasses; choice fields are enums.

* a recipe's ``base.yaml`` (kept as a pointer to ``--help``) sets no key, so the defaults that
  ``--help`` shows are the ones every run uses;
* every shipped YAML (each ``--env`` file, the algorithm-specific env files, the ``--config`` extras)
  loads, converts to the dataclasses and passes the recipe's ``validate``;
* an env YAML sets only keys whose value differs from what the layers below it give. A YAML that
  restates a default on purpose says so in a comment on that line containing "restates the
  default"; those are reported (a warning), not failed;
* a wrong value for a choice field is a one-line ``ConfigError`` naming the key and listing the
  valid values; ``--help`` lists them; a saved ``config.yaml`` with choice fields loads back.
"""
from __future__ import annotations

import dataclasses
import enum
import re
import typing
import warnings
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

import recipes.dreamer as dreamer
import recipes.dreamer_routing as dreamer_routing
import recipes.mappo_vmas as mappo_vmas
import recipes.ppo as ppo
import recipes.ppo_routing as ppo_routing
from torchrl_dreamer.cli import parse_recipe_args
from torchrl_dreamer.config import Choice, ConfigError, help_text, load_config, save_config, to_object

RESTATE_MARKER = "restates the default"


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    module: Any
    schema: type
    default_env: str
    env_config_dir: Path | None = None  # env YAMLs shared by several algorithms (routing)
    # a non-default value for each choice field: (dotted key, value, the valid values in order)
    choices: tuple[tuple[str, str, tuple[str, ...]], ...] = ()

    @property
    def config_dir(self) -> Path:
        return self.module.CONFIG_DIR

    @property
    def env_dir(self) -> Path:
        return self.env_config_dir or self.config_dir

    def envs(self) -> list[str]:
        return sorted(p.stem for p in self.env_dir.glob("*.yaml") if p.stem != "base")

    def extra_layers(self) -> list[Path]:
        """YAMLs in the recipe's own folder that are no ``--env`` file: ``--config`` extras."""
        if self.env_config_dir is None:
            return []
        return sorted(p for p in self.config_dir.glob("*.yaml") if p.stem != "base" and p.stem not in self.envs())

    def parse(self, argv: list[str]):
        return parse_recipe_args(argv, schema=self.schema, config_dir=self.config_dir, description=self.name,
                                 default_env=self.default_env, env_config_dir=self.env_config_dir)


RECIPES = [
    Recipe("dreamer", dreamer, dreamer.DreamerConfig, "cartpole", choices=(
        ("model.size", "xs", ("nano", "tiny", "xs", "s", "m", "l")),
        ("model.compile_mode", "full", ("step", "full")),
        ("loss.free_bits_grad", "straight_through", ("clip", "straight_through")),
        ("ac.actor_grad", "dynamics", ("reinforce", "dynamics")),
        ("ac.cont_mode", "mode", ("prob", "mode")),
    )),
    Recipe("dreamer_routing", dreamer_routing, dreamer_routing.DreamerRoutingConfig, "tsp20",
           env_config_dir=dreamer_routing.ENV_CONFIG_DIR, choices=(
               ("env.problem", "cvrp", ("tsp", "cvrp")),
               ("loss.free_bits_grad", "straight_through", ("clip", "straight_through")),
               ("optim.lr_schedule", "cosine", ("constant", "cosine")),
           )),
    Recipe("ppo_routing", ppo_routing, ppo_routing.PPORoutingConfig, "tsp20",
           env_config_dir=ppo_routing.ENV_CONFIG_DIR, choices=(
               ("env.problem", "cvrp", ("tsp", "cvrp")),
               ("ppo.lr_schedule", "cosine", ("constant", "cosine")),
               ("ppo.advantage", "shared", ("gae", "shared")),
           )),
    Recipe("ppo", ppo, ppo.PPOConfig, "cartpole", choices=(
        ("model.activation", "relu", ("tanh", "relu", "silu")),
    )),
    Recipe("mappo_vmas", mappo_vmas, mappo_vmas.MAPPOConfig, "navigation", choices=(
        ("model.activation", "relu", ("tanh", "relu", "silu", "elu")),
        ("ppo.impl", "torchrl", ("fused", "torchrl")),
        ("ppo.critic_loss", "l2", ("smooth_l1", "l2")),
    )),
]
IDS = [r.name for r in RECIPES]


# --- helpers ------------------------------------------------------------------------------------


def _hints(node: type) -> dict[str, Any]:
    return typing.get_type_hints(node)


def _leaf_paths(schema: type, prefix: str = "") -> list[str]:
    out = []
    for name, tp in _hints(schema).items():
        if dataclasses.is_dataclass(tp):
            out += _leaf_paths(tp, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


def _field_type(schema: type, dotted: str) -> Any:
    node: Any = schema
    for part in dotted.split("."):
        node = _hints(node)[part]
    return node


def _get(container: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        container = container[part]
    return container


def _line_comments(path: Path) -> dict[str, str]:
    """``dotted.key -> the comment on its line`` for the block mappings of a (simple) YAML file."""
    out: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in path.read_text().splitlines():
        match = re.match(r"^(\s*)([A-Za-z_][\w-]*):(.*)$", line)
        if not match:
            continue
        indent, key, rest = len(match.group(1)), match.group(2), match.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        comment = re.search(r"(^|\s)#(.*)$", rest)
        out[".".join(k for _, k in stack)] = comment.group(2).strip() if comment else ""
    return out


def _restated(schema: type, raw: dict, below: dict, prefix: str = "") -> list[str]:
    """Dotted keys of ``raw`` (one YAML file) whose value equals what ``below`` (the resolved config
    of the layers under that file) already holds. A mapping-typed field (e.g. ``env.kwargs``) restates
    when each of its entries does (``{}`` always does: YAML layers merge mappings)."""
    out = []
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        tp = _field_type(schema, dotted)
        if dataclasses.is_dataclass(tp):
            out += _restated(schema, value, below, f"{dotted}.")
            continue
        current = _get(below, dotted)
        if isinstance(value, dict) and isinstance(current, dict):
            same = all(k in current and current[k] == v for k, v in value.items())
        else:
            same = current == value and isinstance(current, bool) == isinstance(value, bool)
        if same:
            out.append(dotted)
    return out


def _stacks(recipe: Recipe) -> list[tuple[list[Path], Path]]:
    """``(layers below, file)`` for every shipped YAML of the recipe except base.yaml."""
    base = [p for p in [recipe.config_dir / "base.yaml"] if p.is_file()]
    out = []
    for env in recipe.envs():
        env_yaml = recipe.env_dir / f"{env}.yaml"
        out.append((base, env_yaml))
        algo = recipe.config_dir / f"{env}.yaml"
        if recipe.env_config_dir is not None and algo.is_file():
            out.append((base + [env_yaml], algo))
    out += [(base, extra) for extra in recipe.extra_layers()]
    return out


# --- defaults written once ----------------------------------------------------------------------


@pytest.mark.parametrize("recipe", RECIPES, ids=IDS)
def test_base_yaml_sets_no_key(recipe):
    """Defaults live in the dataclasses only: a base.yaml that is left is a comment pointing at --help."""
    base = recipe.config_dir / "base.yaml"
    if base.is_file():
        loaded = OmegaConf.load(base)
        assert not loaded, (f"{base} sets {sorted(OmegaConf.to_container(loaded))}: move the values into the "
                            f"dataclass defaults of recipes/{recipe.name}.py (their doc(...) help for comments)")


@pytest.mark.parametrize("recipe", RECIPES, ids=IDS)
def test_help_shows_each_leaf_once_with_the_default_runs_use(recipe):
    """Every leaf of the schema has one --help line, and the default it shows is the value a run
    without an env YAML gets (schema <- base.yaml): the dataclass is the one place it is written."""
    resolved = OmegaConf.to_container(load_config(
        recipe.schema, [p for p in [recipe.config_dir / "base.yaml"] if p.is_file()]))
    text = help_text(recipe.schema)
    shown: dict[str, list[str]] = {}
    for line in text.splitlines():
        match = re.match(r"^  (\S+)\s+\((.*?)[,;] default (.*?)\)  ", line)
        if match:
            shown.setdefault(match.group(1), []).append(match.group(3))
    leaves = _leaf_paths(recipe.schema)
    assert sorted(shown) == sorted(leaves)
    for key in leaves:
        assert len(shown[key]) == 1, f"{key} appears {len(shown[key])} times in --help"
        value = _get(resolved, key)
        expected = repr(value.name) if isinstance(value, enum.Enum) else repr(value)
        assert shown[key][0] == expected, f"--help shows {key} default {shown[key][0]}, runs use {expected}"


@pytest.mark.parametrize("recipe", RECIPES, ids=IDS)
def test_every_shipped_yaml_resolves_and_validates(recipe):
    envs = recipe.envs()
    assert envs, f"no env YAMLs for {recipe.name}"
    for env in envs:
        for extra in [[]] + [["--config", str(p)] for p in recipe.extra_layers()]:
            args = recipe.parse(["--env", env, *extra])
            cfg = to_object(args.cfg)
            assert isinstance(cfg, recipe.schema)
            recipe.module.validate(cfg)


@pytest.mark.parametrize("recipe", RECIPES, ids=IDS)
def test_env_yamls_set_only_what_differs(recipe):
    """A YAML key whose value equals the layers below it is a drift risk (change the default and
    the file silently keeps the old value): fail, unless the line's comment says it restates the
    default on purpose; those are reported."""
    unmarked, on_purpose = [], []
    for below, path in _stacks(recipe):
        raw = OmegaConf.to_container(OmegaConf.load(path))
        if not raw:
            continue
        resolved = OmegaConf.to_container(load_config(recipe.schema, below))
        comments = _line_comments(path)
        for key in _restated(recipe.schema, raw, resolved):
            where = f"{path.relative_to(recipe.config_dir.parent)}: {key}"
            (on_purpose if RESTATE_MARKER in comments.get(key, "") else unmarked).append(where)
    for where in on_purpose:
        warnings.warn(f"restates a default on purpose (commented): {where}", UserWarning, stacklevel=1)
    assert not unmarked, ("these YAML keys restate the value below them; delete them, or say why in a comment "
                          f"containing '{RESTATE_MARKER}': {unmarked}")


def test_restatement_check_catches_a_restated_default(tmp_path):
    """The check above is not vacuous: a key equal to its default is found, a commented one is
    told apart, and a differing one passes."""
    path = tmp_path / "env.yaml"
    path.write_text("ppo:\n  epochs: 30\n  lr: 1.0e-3\n  gamma: 0.99   # restates the default on purpose\n"
                    "env:\n  kwargs: {}\n")
    raw = OmegaConf.to_container(OmegaConf.load(path))
    resolved = OmegaConf.to_container(load_config(mappo_vmas.MAPPOConfig))
    assert _restated(mappo_vmas.MAPPOConfig, raw, resolved) == ["ppo.epochs", "ppo.gamma", "env.kwargs"]
    comments = _line_comments(path)
    assert RESTATE_MARKER in comments["ppo.gamma"] and comments["ppo.epochs"] == ""


# --- choice fields ------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", RECIPES, ids=IDS)
def test_choice_fields_are_enums_that_behave_as_strings(recipe):
    overrides = [f"{key}={value}" for key, value, _ in recipe.choices]
    cfg = to_object(load_config(recipe.schema, [], overrides))
    for key, value, valid in recipe.choices:
        tp = _field_type(recipe.schema, key)
        assert isinstance(tp, type) and issubclass(tp, Choice), f"{key} is typed {tp}, not a Choice enum"
        assert [m.value for m in tp] == list(valid)
        got = _get(dataclasses.asdict(cfg), key)
        assert isinstance(got, tp) and got is tp[value]  # to_object gives the enum member ...
        assert got == value and f"{got}" == value and str(got) == value  # ... that reads as its string
        assert {value: 1}[got] == 1


def test_choice_enums_match_what_the_code_accepts():
    from baselines.mappo_networks import ACTIVATIONS
    from torchrl_dreamer.dreamer.agent import PRESETS

    assert [m.value for m in _field_type(dreamer.DreamerConfig, "model.size")] == list(PRESETS)
    assert {m.value for m in _field_type(mappo_vmas.MAPPOConfig, "model.activation")} == set(ACTIVATIONS)


def test_a_choice_member_name_must_equal_its_value():
    """config.yaml stores the member's name and reads it back by name, so the two must agree."""
    with pytest.raises(TypeError, match="name and value must be equal"):
        class Bad(Choice):
            fast = "quick"


@pytest.mark.parametrize("recipe", RECIPES, ids=IDS)
def test_wrong_choice_names_the_key_and_lists_the_choices(recipe, tmp_path):
    key, _, valid = recipe.choices[0]
    expected = f"{key} must be one of {', '.join(valid)}; got 'bogus'"
    with pytest.raises(ConfigError) as err:  # command line
        recipe.parse([f"{key}=bogus"])
    assert expected in str(err.value) and "command-line override" in str(err.value)
    assert "\n" not in str(err.value)
    section, leaf = key.split(".")
    bad = tmp_path / "bad.yaml"  # a YAML file: the message names it
    bad.write_text(f"{section}:\n  {leaf}: bogus\n")
    with pytest.raises(ConfigError) as err:
        recipe.parse(["--config", str(bad)])
    assert expected in str(err.value) and str(bad) in str(err.value)
    with pytest.raises(ConfigError, match=re.escape(f"{key} must be one of {', '.join(valid)}; got null")):
        recipe.parse([f"{key}=null"])


@pytest.mark.parametrize("recipe", RECIPES, ids=IDS)
def test_help_lists_the_choices(recipe, capsys):
    with pytest.raises(SystemExit) as exit_:
        recipe.parse(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    default = OmegaConf.to_container(load_config(recipe.schema))
    for key, _, valid in recipe.choices:
        line = next(line for line in out.splitlines() if line.strip().startswith(f"{key} "))
        assert f"(one of: {', '.join(valid)}; default '{_get(default, key)}')" in line, line


@pytest.mark.parametrize("recipe", RECIPES, ids=IDS)
def test_saved_config_with_choices_reloads(recipe, tmp_path):
    """save_config writes plain strings for the enum fields; the file loads back as it is (what
    --resume and --evaluate read) and gives the same config."""
    overrides = [f"{key}={value}" for key, value, _ in recipe.choices]
    cfg = recipe.parse(overrides).cfg
    save_config(cfg, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "!!python" not in text and "Choice" not in text
    plain = OmegaConf.to_container(OmegaConf.load(tmp_path / "config.yaml"))
    for key, value, _ in recipe.choices:
        assert type(_get(plain, key)) is str and _get(plain, key) == value
    resumed = recipe.parse(["--resume", str(tmp_path)]).cfg
    assert OmegaConf.to_container(resumed) == OmegaConf.to_container(cfg)
    assert to_object(resumed) == to_object(cfg)
