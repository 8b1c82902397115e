"""Sampler settings per task, merged from four layers (later ones win):

1. the package's ``megadiff/generation/defaults.json`` (:func:`builtin_defaults`);
2. the run's ``sampling`` config section, carried by its checkpoints (``sampling.text.gen_length:
   5`` for a model trained on short rows);
3. a defaults file (``megadiff generate --defaults FILE``, as ``tools/eval_sampling.py`` writes);
4. explicit overrides (the command line's flags).

A layer is a tree ``{task: {setting: value}}``; a setting is a :class:`SamplerConfig` field or
one of the buffer lengths in :data:`BUFFER_KEYS` (``gen_length`` for tasks that write text,
``audio_frames`` for ``t2s``).
"""

from __future__ import annotations

import json
import typing
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from megadiff.data.names import TASK_IO, TASKS
from megadiff.diffusion.sampler_config import SamplerConfig, SamplingError
from megadiff.diffusion.strategies import COUNT_STRATEGIES
from megadiff.generation.tasks import DEFAULT_GEN_LENGTH, TaskError

DEFAULTS_FILE = Path(__file__).with_name("defaults.json")
# buffer length -> the tasks it applies to (text output: generated tokens; t2s: audio frames)
BUFFER_KEYS = {
    "gen_length": tuple(t for t in TASKS if TASK_IO[t][1] == "text"),
    "audio_frames": ("t2s",),
}
SAMPLER_TYPES = typing.get_type_hints(SamplerConfig)  # setting -> its type (int | None, ...)
SAMPLER_KEYS = tuple(SAMPLER_TYPES)


@dataclass(frozen=True)
class TaskSettings:
    """What one task samples with: the sampler and the generated buffer's length."""

    sampler: SamplerConfig
    gen_length: int = DEFAULT_GEN_LENGTH  # generated text tokens (text, caption, asr)
    audio_frames: int | None = None  # t2s frames (None: from the prompt's length)


def builtin_defaults() -> dict[str, dict]:
    """Per-task sampler settings shipped with the package (proposed by tools/eval_sampling.py)."""
    tree = json.loads(DEFAULTS_FILE.read_text())
    return {k: v for k, v in tree.items() if k in TASKS}


def read_defaults(path: str | Path) -> dict:
    """A defaults file's tree (``{task: {setting: value}}``, keys starting with ``_`` are
    notes), its shape checked."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"defaults file '{path}' does not exist")
    try:
        tree = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TaskError(f"defaults file '{path}' is not valid JSON: {e}") from e
    if isinstance(tree, dict):  # "_source" and other "_" keys: notes (tools/eval_sampling.py)
        tree = {k: v for k, v in tree.items() if not str(k).startswith("_")}
    check_tree(tree, f"defaults file '{path}': ")
    return tree


def check_tree(tree: Any, lead: str) -> None:
    """``tree`` is ``{task: {setting: value}}`` with known tasks, settings and buffer lengths;
    a TaskError names the setting after ``lead`` (``"sampling."``, ``"defaults file 'F': "``).
    Values are checked by :func:`task_settings`."""
    if not isinstance(tree, Mapping):
        raise TaskError(f"{lead.rstrip('.: ')}: expected a mapping of task -> settings")
    for task, settings in tree.items():
        if task not in TASKS:
            raise TaskError(f"{lead}{task}: unknown task (known: {', '.join(TASKS)})")
        if not isinstance(settings, Mapping):
            raise TaskError(f"{lead}{task}: expected a mapping of settings, got {settings!r}")
        for key, value in settings.items():
            if key in BUFFER_KEYS:
                _check_buffer(task, key, value, lead)
            elif key not in SAMPLER_KEYS:
                known = ", ".join((*SAMPLER_KEYS, *BUFFER_KEYS))
                raise TaskError(f"{lead}{task}.{key}: unknown setting (known: {known})")
            elif not _has_type(value, SAMPLER_TYPES[key]):
                kind = _type_name(SAMPLER_TYPES[key])
                raise TaskError(f"{lead}{task}.{key}: must be {kind}, got {value!r}")


def _has_type(value: Any, hint: Any) -> bool:
    kinds = typing.get_args(hint) or (hint,)
    if value is None or isinstance(value, bool):
        return value is None and type(None) in kinds
    if float in kinds:
        return isinstance(value, (int, float))
    return isinstance(value, tuple(k for k in kinds if k is not type(None)))


def _type_name(hint: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", type(None): "null"}
    return " or ".join(names[k] for k in typing.get_args(hint) or (hint,))


def _check_buffer(task: str, key: str, value: Any, lead: str) -> None:
    if task not in BUFFER_KEYS[key]:
        raise TaskError(
            f"{lead}{task}.{key}: only for {', '.join(BUFFER_KEYS[key])} "
            f"('{task}' generates {TASK_IO[task][1]})"
        )
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TaskError(f"{lead}{task}.{key}: must be an integer >= 1, got {value!r}")


def task_settings(
    task: str,
    overrides: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Any] | None = None,
    run: Mapping[str, Any] | None = None,
) -> TaskSettings:
    """The settings of ``task``: package defaults < ``run`` (a run's ``sampling`` section) <
    ``defaults`` (a defaults file's tree) < ``overrides`` (one task's settings by
    :class:`SamplerConfig` field or buffer-length name). A count strategy without ``steps``
    gets 16. Raises TaskError (unknown task or setting) or SamplingError (a bad value)."""
    if task not in TASKS:
        raise TaskError(f"unknown task '{task}' (known: {', '.join(TASKS)})")
    layers = (
        ("package defaults: ", builtin_defaults()),
        ("sampling.", run or {}),
        ("defaults: ", defaults or {}),
        ("overrides: ", {task: overrides or {}}),
    )
    c, buffers = SamplerConfig(), {}
    for lead, tree in layers:
        check_tree(tree, lead)
        settings = dict(tree.get(task, {}))
        buffers.update({k: settings.pop(k) for k in BUFFER_KEYS if k in settings})
        c = replace(c, **settings)
    if c.strategy in COUNT_STRATEGIES and c.steps is None:
        c = replace(c, steps=16)
    return TaskSettings(c.validate(), **buffers)


def sampler_config(
    task: str,
    overrides: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Any] | None = None,
    run: Mapping[str, Any] | None = None,
) -> SamplerConfig:
    """The sampler part of :func:`task_settings`."""
    return task_settings(task, overrides, defaults, run).sampler


def check_run_sampling(tree: Mapping[str, Any]) -> None:
    """A run's ``sampling`` section: every task it names gives valid settings (TaskError or
    SamplingError naming the task and setting)."""
    check_tree(tree, "sampling.")
    for task in tree:
        try:
            task_settings(task, run=tree)
        except SamplingError as e:
            raise SamplingError(f"sampling.{task}: {e}") from e
