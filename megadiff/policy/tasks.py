"""Verifiable tasks for policy training: prompts and a verifier (reward in [0, 1]).

``load_task(spec, tokenizer)``: a built-in task name, or ``module:function`` (a user verifier
``function(prompt, completion) -> float``; its prompts come from ``policy.prompts``).
"""

from __future__ import annotations

import importlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol


class PolicyTaskError(ValueError):
    """A task spec that cannot be loaded or used (the command line exits 2)."""


class PolicyTask(Protocol):
    name: str

    def prompts(self, split: str, n: int, seed: int) -> list[str]: ...  # split: train | eval

    def reward(self, prompt: str, completion: str) -> float: ...  # correctness in [0, 1]


@dataclass
class LettersTask:
    """A tiny check task: a random lowercase word; the reward is the fraction of the
    completion's characters that are ASCII letters (0 for an empty completion)."""

    name: str = "letters"

    def prompts(self, split: str, n: int, seed: int) -> list[str]:
        rng = random.Random(f"{self.name}/{split}/{seed}")
        letters = "abcdefghijklmnopqrstuvwxyz"
        return ["".join(rng.choice(letters) for _ in range(3)) + ":" for _ in range(n)]

    def reward(self, prompt: str, completion: str) -> float:
        if not completion:
            return 0.0
        return sum(c.isascii() and c.isalpha() for c in completion) / len(completion)


@dataclass
class FunctionTask:
    """A user verifier ``function(prompt, completion) -> float``; no built-in prompts."""

    name: str
    function: Callable[[str, str], Any]

    def prompts(self, split: str, n: int, seed: int) -> list[str]:
        raise PolicyTaskError(
            f"task '{self.name}' is a verifier function without prompts: set policy.prompts "
            "to a JSONL file of prompts"
        )

    def reward(self, prompt: str, completion: str) -> float:
        value = float(self.function(prompt, completion))
        if not 0.0 <= value <= 1.0:
            raise PolicyTaskError(f"verifier {self.name} returned {value}, expected [0, 1]")
        return value


BUILTIN = {"letters": LettersTask}


def load_task(spec: str, tokenizer: Any) -> PolicyTask:
    """The task of ``spec``: a built-in name or ``module:function``."""
    if spec in BUILTIN:
        return BUILTIN[spec]()
    if ":" not in spec:
        raise PolicyTaskError(
            f"unknown task '{spec}' (built-in: {', '.join(BUILTIN)}; or module:function)"
        )
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except Exception as e:  # ImportError, AttributeError, or an error inside the module
        raise PolicyTaskError(f"verifier '{spec}' does not import: {type(e).__name__}: {e}") from e
    if not callable(fn):
        raise PolicyTaskError(f"verifier '{spec}' is not callable")
    return FunctionTask(spec, fn)
