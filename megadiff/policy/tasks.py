"""Verifiable tasks for unmasking policies: prompts (a training split and a held-out one) and a
reward in [0, 1] for a prompt's completion.

A task is named by a spec (:func:`load_task`):

* a built-in name: ``arith`` (``23+18=``, operands below 50), ``lookup`` (two definitions
  ``key=code`` and a question ``key?``, 6-digit codes), ``sums`` (single-digit ``3+5=``) or
  ``pick`` (``381|527=``: either code is right, :func:`megadiff.demo.synth.pick_lines`): the
  demo's generators and scorers (:mod:`megadiff.demo.scoring`); ``letters`` (a check task for
  tests: the share of letters in the completion);
* a JSONL file of ``{"prompt": ..., "answer": ...}`` rows: correct when the completion, leading
  spaces removed, starts with the answer (and, when the answer ends in a letter or digit, the
  next character is not one);
* ``module:function``: a user verifier ``function(prompt, completion) -> float`` in [0, 1];
  its prompts come from a JSONL file (``prompts=``, rows with a ``"prompt"``; an ``"answer"``
  is optional) or a built-in task's generator (``prompts="arith"``).

Splits: a prompt belongs to the held-out ``eval`` split when the blake2b hash of its text falls
below :data:`EVAL_FRACTION`, so the splits are disjoint and do not depend on ``n`` or ``seed``
(``seed`` only picks which prompts of the split are drawn).

Every failure is a :class:`PolicyTaskError` naming the spec, file and line or function; the
CLIs exit 2 on it. :func:`check_expressible` refuses a task whose prompts or answers the
checkpoint's text tokenizer cannot spell (a character with no token of its own).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from megadiff.demo import scoring

EVAL_FRACTION = 0.2  # of the distinct prompts, held out by content hash
BUILTIN = ("arith", "lookup", "sums", "pick", "letters")
SPLITS = ("train", "eval")
_MAX_DRAWS = 64  # rounds of candidate prompts before a split is declared too small


class PolicyTaskError(ValueError):
    """A task spec, prompt file or verifier that cannot be used (named; CLIs exit 2)."""


class PolicyTask(Protocol):
    name: str

    def prompts(self, split: str, n: int, seed: int) -> list[str]: ...

    def reward(self, prompt: str, completion: str) -> float: ...


def is_held_out(prompt: str, fraction: float = EVAL_FRACTION) -> bool:
    """Whether ``prompt`` is in the held-out split: its content hash (blake2b, 64 bits) below
    ``fraction``."""
    h = int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=8).digest(), "big")
    return h / 2**64 < fraction


def in_split(prompt: str, split: str) -> bool:
    return is_held_out(prompt) == (split == "eval")


def _check_split(name: str, split: str, n: int) -> None:
    if split not in SPLITS:
        raise PolicyTaskError(f"task '{name}': split must be one of {SPLITS}, got {split!r}")
    if n < 1:
        raise PolicyTaskError(f"task '{name}': the number of prompts must be >= 1, got {n}")


def answer_matches(answer: str, completion: str) -> bool:
    """True when ``completion`` (leading spaces removed) starts with ``answer`` and, if the
    answer ends in a letter or digit, does not continue it with another one."""
    text = completion.lstrip()
    if not text.startswith(answer):
        return False
    nxt = text[len(answer) : len(answer) + 1]
    return not (answer[-1:].isalnum() and nxt.isalnum())


# ----------------------------------------------------------------------------- built-in tasks


@dataclass
class GeneratedTask:
    """Prompts from a generator ``(n, seed) -> prompts`` (filtered into the split), rewards from
    a scorer ``(prompt, completion) -> bool``; ``answer(prompt)`` for the vocabulary check."""

    name: str
    generate: Callable[[int, int], list[str]]
    score: Callable[[str, str], bool]
    answer: Callable[[str], Any]

    def prompts(self, split: str, n: int, seed: int) -> list[str]:
        """``n`` prompts of ``split`` (with repeats when the generator's pool is small)."""
        _check_split(self.name, split, n)
        out: list[str] = []
        for r in range(_MAX_DRAWS):
            # 3n candidates per round, as the held-out split keeps ~1/5 of them
            cands = self.generate(3 * n, seed * _MAX_DRAWS + r)
            out += [p for p in cands if in_split(p, split)]
            if len(out) >= n:
                return out[:n]
        raise PolicyTaskError(
            f"task '{self.name}': its generator gave only {len(out)} '{split}' prompts after "
            f"{_MAX_DRAWS} rounds (wanted {n})"
        )

    def reward(self, prompt: str, completion: str) -> float:
        return float(self.score(prompt, completion))

    def texts(self, prompts: Sequence[str]) -> list[str]:
        return [*prompts, *(str(self.answer(p)) for p in prompts)]


def _sums(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 10, (2, n)).tolist()
    return [f"{x}+{y}=" for x, y in zip(a, b)]


@dataclass
class LettersTask:
    """A tiny check task: a random lowercase word; the reward is the fraction of the
    completion's characters that are ASCII letters (0 for an empty completion)."""

    name: str = "letters"

    def prompts(self, split: str, n: int, seed: int) -> list[str]:
        _check_split(self.name, split, n)
        rng = random.Random(f"{self.name}/{split}/{seed}")
        letters = "abcdefghijklmnopqrstuvwxyz"
        return ["".join(rng.choice(letters) for _ in range(3)) + ":" for _ in range(n)]

    def reward(self, prompt: str, completion: str) -> float:
        if not completion:
            return 0.0
        return sum(c.isascii() and c.isalpha() for c in completion) / len(completion)


def builtin_task(name: str, tokenizer: Any = None) -> GeneratedTask | LettersTask:
    """The demo task ``name`` (``lookup`` draws its keys from the tokenizer's one-token words)."""
    if name == "arith":
        return GeneratedTask(
            name,
            lambda n, seed: scoring.arithmetic_prompts(n, seed),
            scoring.score_arithmetic,
            scoring.arithmetic_answer,
        )
    if name == "sums":
        return GeneratedTask(name, _sums, scoring.score_arithmetic, scoring.arithmetic_answer)
    if name == "pick":
        return GeneratedTask(
            name,
            lambda n, seed: scoring.pick_prompts(n, seed),
            scoring.score_pick,
            lambda p: scoring.pick_codes(p)[0],
        )
    if name == "letters":  # a graded check task (its splits: separate random streams)
        return LettersTask()
    if name == "lookup":
        if tokenizer is None:
            raise PolicyTaskError("task 'lookup' needs the checkpoint's text tokenizer (its keys)")
        from megadiff.demo.data import one_token_words

        words = one_token_words(tokenizer)
        if len(words) < 2:
            raise PolicyTaskError(
                f"task 'lookup': the text tokenizer has {len(words)} one-token lower-case words, "
                "it needs at least 2 (a demo-trained BPE has hundreds)"
            )
        return GeneratedTask(
            name,
            lambda n, seed: scoring.lookup_prompts(words, n, seed),
            scoring.score_lookup,
            scoring.lookup_answer,
        )
    raise PolicyTaskError(f"unknown built-in task '{name}' (known: {', '.join(BUILTIN)})")


# ----------------------------------------------------------------------------- files, verifiers


@dataclass
class Row:
    prompt: str
    answer: str | None
    where: str  # file:line


def read_jsonl(path: str | Path, need_answer: bool) -> list[Row]:
    """Rows ``{"prompt": str, "answer": str}`` of a JSONL file (``answer`` optional unless
    ``need_answer``); blank lines skipped; a bad row names ``file:line``."""
    p = Path(path)
    if not p.is_file():
        raise PolicyTaskError(f"task file '{p}' does not exist (expected JSONL prompt rows)")
    rows = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        where = f"{p}:{i}"
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PolicyTaskError(f"{where}: not JSON ({e.msg})") from e
        if not isinstance(row, dict):
            raise PolicyTaskError(f"{where}: expected an object with 'prompt', got {line[:60]!r}")
        prompt, answer = row.get("prompt"), row.get("answer")
        if not isinstance(prompt, str) or not prompt:
            raise PolicyTaskError(f"{where}: 'prompt' must be a non-empty string")
        if answer is None and need_answer:
            raise PolicyTaskError(f"{where}: no 'answer' (every row needs one to be scored)")
        if answer is not None and not isinstance(answer, (str, int)):
            raise PolicyTaskError(f"{where}: 'answer' must be a string or an integer")
        if answer is not None and not str(answer):
            raise PolicyTaskError(f"{where}: 'answer' is empty")
        rows.append(Row(prompt, None if answer is None else str(answer), where))
    if not rows:
        raise PolicyTaskError(f"task file '{p}' holds no rows")
    return rows


@dataclass
class RowsTask:
    """Prompts from JSONL rows; the reward is :func:`answer_matches` of the row's answer, or a
    user ``verifier(prompt, completion)``."""

    name: str
    rows: list[Row]
    verifier: Callable[[str, str], Any] | None = None
    _answers: dict[str, str | None] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._answers = {}
        for r in self.rows:
            prev = self._answers.setdefault(r.prompt, r.answer)
            if prev != r.answer:
                raise PolicyTaskError(
                    f"{r.where}: prompt {r.prompt[:40]!r} appears earlier with another answer"
                )

    def prompts(self, split: str, n: int, seed: int) -> list[str]:
        """``n`` prompts of the split, in a seeded order (repeated when the split has fewer)."""
        _check_split(self.name, split, n)
        pool = [p for p in self._answers if in_split(p, split)]
        if not pool:
            raise PolicyTaskError(
                f"task '{self.name}': none of its {len(self._answers)} distinct prompts falls in "
                f"the '{split}' split (about {EVAL_FRACTION:.0%} are held out; add prompts)"
            )
        order = np.random.default_rng(seed).permutation(len(pool)).tolist()
        reps = -(-n // len(pool))
        return [pool[i] for i in order * reps][:n]

    def reward(self, prompt: str, completion: str) -> float:
        if self.verifier is not None:
            return checked_reward(self.name, self.verifier(prompt, completion))
        answer = self._answers.get(prompt)
        if answer is None:
            raise PolicyTaskError(f"task '{self.name}': prompt {prompt[:40]!r} is not in its file")
        return float(answer_matches(answer, completion))

    def texts(self, prompts: Sequence[str]) -> list[str]:
        answers = [self._answers.get(p) for p in prompts]
        return [*prompts, *(a for a in answers if a is not None)]


@dataclass
class VerifiedTask:
    """A built-in task's prompts scored by a user verifier."""

    name: str
    base: GeneratedTask
    verifier: Callable[[str, str], Any]

    def prompts(self, split: str, n: int, seed: int) -> list[str]:
        return self.base.prompts(split, n, seed)

    def reward(self, prompt: str, completion: str) -> float:
        return checked_reward(self.name, self.verifier(prompt, completion))

    def texts(self, prompts: Sequence[str]) -> list[str]:
        return list(prompts)


def checked_reward(name: str, value: Any) -> float:
    """A verifier's return value as a float in [0, 1] (bools count as 0/1)."""
    try:
        r = float(value)
    except (TypeError, ValueError):
        raise PolicyTaskError(
            f"verifier '{name}' returned {value!r}; it must return a number in [0, 1]"
        ) from None
    if not (math.isfinite(r) and 0.0 <= r <= 1.0):
        raise PolicyTaskError(f"verifier '{name}' returned {r}; rewards must be in [0, 1]")
    return r


def load_verifier(spec: str) -> Callable[[str, str], Any]:
    """The function of ``module:function`` (importable from ``sys.path``, e.g. the current
    directory under ``python -m``), checked to accept ``(prompt, completion)``."""
    module, _, func = spec.partition(":")
    if not module or not func:
        raise PolicyTaskError(f"verifier '{spec}': expected 'module:function'")
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's module
        raise PolicyTaskError(
            f"verifier '{spec}' does not import: module '{module}' raised {type(e).__name__}: "
            f"{e} (it must be importable: on PYTHONPATH or in the current directory)"
        ) from e
    fn = getattr(mod, func, None)
    if fn is None:
        raise PolicyTaskError(f"verifier '{spec}': module '{module}' has no '{func}'")
    if not callable(fn):
        raise PolicyTaskError(f"verifier '{spec}': '{func}' is not callable")
    try:
        inspect.signature(fn).bind("prompt", "completion")
    except TypeError as e:
        raise PolicyTaskError(
            f"verifier '{spec}': '{func}' must take (prompt, completion): {e}"
        ) from e
    except ValueError:  # no signature (a builtin): called as is
        pass
    return fn


def load_task(spec: str, tokenizer: Any = None, prompts: str | None = None) -> PolicyTask:
    """The task of ``spec``: a built-in name, a ``.jsonl`` file, or ``module:function`` with
    prompts from ``prompts`` (a JSONL file or a built-in name; default ``arith``)."""
    if not spec:
        raise PolicyTaskError("empty task spec (a built-in name, a .jsonl file or module:function)")
    if spec in BUILTIN:
        _no_prompts(spec, prompts)
        return builtin_task(spec, tokenizer)
    if spec.endswith(".jsonl") or Path(spec).is_file():
        _no_prompts(spec, prompts)
        return RowsTask(spec, read_jsonl(spec, need_answer=True))
    if ":" in spec:
        verifier = load_verifier(spec)
        source = prompts or "arith"
        if source in BUILTIN:
            return VerifiedTask(spec, builtin_task(source, tokenizer), verifier)
        return RowsTask(spec, read_jsonl(source, need_answer=False), verifier)
    raise PolicyTaskError(
        f"task '{spec}' is not a built-in task ({', '.join(BUILTIN)}), an existing .jsonl file "
        "or a 'module:function' verifier"
    )


def _no_prompts(spec: str, prompts: str | None) -> None:
    if prompts:
        raise PolicyTaskError(
            f"task '{spec}' brings its own prompts; a prompt source ({prompts!r}) is only for a "
            "'module:function' verifier"
        )


# ----------------------------------------------------------------------------- vocabulary


def check_expressible(
    task: PolicyTask, tokenizer: Any, n: int = 64, text_size: int | None = None
) -> None:
    """Refuse a task the tokenizer cannot spell: its prompts (``n`` of each split) and known
    answers must round-trip through it, use ids below ``text_size`` (the model's text range),
    and contain only characters that have a token of their own (not raw bytes, which a model
    trained on the tokenizer's data has never seen)."""
    if tokenizer is None:
        raise PolicyTaskError(f"task '{task.name}': the checkpoint has no text tokenizer")
    prompts = [p for split in SPLITS for p in _some_prompts(task, split, n)]
    texts = task.texts(prompts) if hasattr(task, "texts") else prompts
    known: dict[str, bool] = {}
    for text in texts:
        ids = tokenizer.encode(text)
        if text_size is not None and len(ids) and int(max(ids)) >= text_size:
            raise PolicyTaskError(
                f"task '{task.name}': {text[:40]!r} encodes to id {int(max(ids))}, outside the "
                f"model's text range [0, {text_size})"
            )
        bad = sorted({c for c in text if not _has_token(tokenizer, c, known)})
        if bad or tokenizer.decode(ids) != text:
            chars = ", ".join(repr(c) for c in bad) or "(decoding differs)"
            raise PolicyTaskError(
                f"task '{task.name}': the checkpoint's text tokenizer cannot express {chars} "
                f"in {text[:40]!r}; use a task within its vocabulary or a checkpoint trained "
                "on such text"
            )


def _some_prompts(task: PolicyTask, split: str, n: int) -> list[str]:
    try:
        return task.prompts(split, n, 0)
    except PolicyTaskError as e:
        if "split" in str(e):  # a small file may hold no held-out prompt: check the rest
            return []
        raise


def _has_token(tokenizer: Any, ch: str, known: dict[str, bool]) -> bool:
    """Whether ``ch`` encodes into tokens that each decode to text (not a byte fragment)."""
    if ch not in known:
        ids = tokenizer.encode(ch)
        known[ch] = len(ids) > 0 and all("\ufffd" not in tokenizer.decode([i]) for i in ids)
    return known[ch]
