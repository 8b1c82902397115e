"""A sweep: one base config, axes of overrides, one run directory per point.

SPEC (YAML; keys in docs/studies.md)::

    base: ../examples/demo.yaml         # relative to the SPEC file; omit for the defaults
    dir: runs/study                      # the sweep folder: <dir>/<point name>/ per point
    set: {eval.every: 100}               # overrides for every point
    grid:                                # the cartesian product of these axes
      model.hidden_size: [64, 96, 128]
      train.steps: [100, 200, 400]
    points:                              # and/or a list of override sets (crossed with grid)
      - {name: text-heavy, data.streams.sums.proportion: 0.6}

Keys are dotted config keys; ``data.streams.<stream name>.<field>`` sets a field of the base
config's stream of that name. Every point is validated (config keys, values, layout at
``world_size`` ranks, the data's vocabulary) before any run starts; a bad one is a
:class:`SweepError` naming the point and the key. Each point's directory holds ``point.yaml`` (its
full config, what ``megadiff train`` runs), ``logs/`` (``rank-0.log``, ``exit-code``) and the
run's own files (``metrics.jsonl``, ``checkpoints/``). ``<dir>/sweep.json`` lists the points
with their costs (parameters, tokens, FLOPs), which ``megadiff sweep collect`` reads.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megadiff.config import (
    ConfigError,
    config_from_dict,
    dump_config,
    merge_dicts,
    read_yaml_mapping,
    set_dotted,
)

SPEC_KEYS = ("base", "dir", "set", "grid", "points", "world_size", "slurm")
SLURM_KEYS = ("script", "options")
SWEEP_FILE = "sweep.json"
POINT_CONFIG = "point.yaml"
LOG_DIR = "logs"
EXIT_FILE = "exit-code"  # rank 0 writes megadiff's exit code here (MEGADIFF_EXIT_FILE)
STREAM_KEY = re.compile(r"^data\.streams\.([^.\[\]]+)\.(\w+)$")


class SweepError(ValueError):
    """A bad SPEC or sweep folder (exit 2); the message names the point and key."""


@dataclass
class Point:
    """One run of the sweep, validated."""

    name: str
    overrides: dict[str, Any]  # the axis values of this point (dotted key -> value)
    params: int = 0  # non-embedding
    params_total: int = 0
    tokens: int = 0
    flops: int = 0
    proportions: dict[str, float] = field(default_factory=dict)  # stream -> share of rows

    def directory(self, sweep_dir: Path) -> Path:
        return sweep_dir / self.name


@dataclass
class Spec:
    path: Path
    base: dict[str, Any]
    dir: Path
    world_size: int
    slurm_script: str
    slurm_options: list[str]
    points: list[Point]
    trees: dict[str, dict[str, Any]]  # point name -> its full config tree


# ------------------------------------------------------------------------------ reading


def load_spec(path: str | Path) -> Spec:
    """Read, expand and validate a SPEC: every point's config is resolved (no run starts)."""
    path = Path(path)
    try:
        raw = read_yaml_mapping(path, "sweep spec")
    except ConfigError as e:
        raise SweepError(str(e)) from e
    where = f"sweep spec '{path}'"
    for key in raw:
        if key not in SPEC_KEYS:
            raise SweepError(f"{where}: unknown key '{key}' (valid: {', '.join(SPEC_KEYS)})")
    if not raw.get("dir") or not isinstance(raw["dir"], str):
        raise SweepError(f"{where}: key 'dir' (the sweep folder, e.g. runs/study) is required")
    base = _read_base(path, raw.get("base"))
    common = _mapping(raw.get("set", {}), f"{where}: key 'set'")
    grid = _mapping(raw.get("grid", {}), f"{where}: key 'grid'")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"{where}: grid axis '{key}' must be a non-empty list of values")
    sets = raw.get("points", [{}])
    if not isinstance(sets, list) or not sets:
        raise SweepError(f"{where}: key 'points' must be a non-empty list of override mappings")
    sets = [_mapping(s, f"{where}: points[{i}]") for i, s in enumerate(sets)]
    world = raw.get("world_size", 1)
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise SweepError(f"{where}: key 'world_size' must be an integer >= 1, got {world!r}")
    slurm = _mapping(raw.get("slurm", {}), f"{where}: key 'slurm'")
    for key in slurm:
        if key not in SLURM_KEYS:
            raise SweepError(f"{where}: unknown key 'slurm.{key}' (valid: {', '.join(SLURM_KEYS)})")
    options = slurm.get("options", [])
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise SweepError(f"{where}: key 'slurm.options' must be a list of sbatch options")
    spec = Spec(
        path=path,
        base=base,
        dir=Path(raw["dir"]),
        world_size=world,
        slurm_script=str(slurm.get("script", "sweep.sbatch")),
        slurm_options=options,
        points=[],
        trees={},
    )
    axis_keys = [*grid, *(k for s in sets for k in s if k != "name")]
    for values in itertools.product(*grid.values()):
        for extra in sets:
            overrides = dict(zip(grid, values))
            overrides.update({k: v for k, v in extra.items() if k != "name"})
            name = point_name(overrides, axis_keys, list(grid), extra.get("name"))
            if name in spec.trees:
                raise SweepError(f"{where}: two points are both named '{name}'; name them")
            tree = point_tree(base, common, overrides, spec.dir / name, f"{where}: point '{name}'")
            spec.trees[name] = tree
            spec.points.append(validate_point(name, overrides, tree, world, where))
    return spec


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SweepError(f"{what} must be a mapping of dotted config keys to values")
    return value


def _read_base(spec_path: Path, base: Any) -> dict[str, Any]:
    if base is None:
        return {}
    if not isinstance(base, str):
        raise SweepError(f"sweep spec '{spec_path}': key 'base' must be a config file path")
    path = spec_path.parent / base
    try:
        return read_yaml_mapping(path)
    except ConfigError as e:
        raise SweepError(f"sweep spec '{spec_path}': key 'base': {e}") from e


def _value_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def point_name(
    overrides: dict[str, Any], axis_keys: list[str], grid_keys: list[str], name: Any
) -> str:
    """A stable, readable folder name: ``hidden_size-64_steps-200``, each key shortened to its
    shortest dotted suffix unique among the axes. A named override set contributes its
    ``name`` instead of its own keys."""
    shown = grid_keys if name is not None else list(overrides)
    parts = [str(name)] if name is not None else []
    parts += [f"{_short_key(k, axis_keys)}-{_value_text(overrides[k])}" for k in shown]
    text = "_".join(parts) or "base"
    return re.sub(r"[^A-Za-z0-9.=+-]+", "_", text).strip("_") or "base"


def _short_key(key: str, keys: list[str]) -> str:
    parts = key.split(".")
    for n in range(1, len(parts) + 1):
        suffix = ".".join(parts[-n:])
        if sum(1 for k in set(keys) if k == suffix or k.endswith("." + suffix)) <= 1:
            return suffix
    return key


def apply_override(tree: dict[str, Any], key: str, value: Any, where: str) -> None:
    """Set dotted ``key`` in the config ``tree``; ``data.streams.<name>.<field>`` sets a field
    of the stream named ``<name>``."""
    m = STREAM_KEY.match(key)
    if m:
        streams = tree.get("data", {}).get("streams")
        names = [s.get("name") for s in streams or [] if isinstance(s, dict)]
        if m.group(1) not in names:
            raise SweepError(
                f"{where}: key '{key}': the base config has no stream '{m.group(1)}' "
                f"(its streams: {', '.join(map(str, names)) or 'none'})"
            )
        streams[names.index(m.group(1))][m.group(2)] = value
        return
    try:
        set_dotted(tree, key, value)
    except ConfigError as e:
        raise SweepError(f"{where}: {e}") from e


def point_tree(
    base: dict[str, Any],
    common: dict[str, Any],
    overrides: dict[str, Any],
    run_dir: Path,
    where: str,
) -> dict[str, Any]:
    """The point's full config tree: base, then ``set``, then its axis values, then run.dir."""
    tree = copy.deepcopy(base)
    for key, value in {**common, **overrides}.items():
        if not isinstance(key, str) or not key:
            raise SweepError(f"{where}: {key!r} is not a dotted config key")
        apply_override(tree, key, copy.deepcopy(value), where)
    return merge_dicts(tree, {"run": {"dir": str(run_dir)}})


def validate_point(
    name: str, overrides: dict[str, Any], tree: dict[str, Any], world_size: int, where: str
) -> Point:
    """Resolve the point's config (as ``megadiff train`` would) and compute its costs."""
    from megadiff.plan import resolve
    from megadiff.study.costs import parameter_counts, training_flops

    try:
        plan = resolve(config_from_dict(tree), world_size)
    except ConfigError as e:
        raise SweepError(f"{where}: point '{name}': {e}") from e
    cfg = plan.cfg
    counts = parameter_counts(cfg.model)
    streams = cfg.data.streams if cfg.data.source == "mds" else []
    total = sum(s.proportion for s in streams)
    return Point(
        name=name,
        overrides=overrides,
        params=counts.non_embedding,
        params_total=counts.total,
        tokens=plan.tokens_per_run,
        flops=training_flops(cfg, plan.tokens_per_run),
        proportions={s.name: s.proportion / total for s in streams},
    )


# ------------------------------------------------------------------------------ the folder


def write_sweep(spec: Spec) -> None:
    """``<dir>/sweep.json`` and each point's ``point.yaml``."""
    spec.dir.mkdir(parents=True, exist_ok=True)
    for point in spec.points:
        folder = point.directory(spec.dir)
        folder.mkdir(parents=True, exist_ok=True)
        text = dump_config(config_from_dict(spec.trees[point.name]))
        path = folder / POINT_CONFIG
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
    record = {"spec": str(spec.path), "points": [asdict(p) for p in spec.points]}
    tmp = spec.dir / (SWEEP_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(spec.dir / SWEEP_FILE)


def read_sweep(sweep_dir: str | Path) -> list[Point]:
    """The points of a sweep folder written by ``megadiff sweep``."""
    path = Path(sweep_dir) / SWEEP_FILE
    if not path.is_file():
        raise SweepError(
            f"'{sweep_dir}' is not a sweep folder (no {SWEEP_FILE}); give the 'dir' of a "
            "SPEC that `megadiff sweep SPEC.yaml` has run or listed"
        )
    try:
        return [Point(**p) for p in json.loads(path.read_text())["points"]]
    except (ValueError, KeyError, TypeError) as e:
        raise SweepError(f"'{path}' is not a valid sweep record ({e}); run the sweep again") from e


def exit_code(point_dir: Path) -> int | None:
    """The recorded exit code of the point's last run (None: never ran to an exit)."""
    path = point_dir / LOG_DIR / EXIT_FILE
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def yaml_text(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip()
