"""Command-line help: every flag of every ``megadiff`` command and of every ``tools/`` script
is described, defaults are shown, per-kind ``preprocess`` pages, ``megadiff --version``."""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megadiff.cli import COMMANDS
from megadiff.flags import HelpFormatter

ROOT = Path(__file__).resolve().parents[1]


def parsers(name: str, p: argparse.ArgumentParser):
    """(name, parser) of ``p`` and every sub-command parser below it."""
    yield name, p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub, sp in a.choices.items():
                yield from parsers(f"{name} {sub}", sp)


def command_parser(name: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"megadiff {name}", formatter_class=HelpFormatter)
    importlib.import_module(COMMANDS[name][0]).add_arguments(p)
    return p


def undescribed(p: argparse.ArgumentParser) -> list[str]:
    return [
        "/".join(a.option_strings) or a.dest
        for a in p._actions
        if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
        and not (a.help or "").strip()
    ]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_flag_of_every_command_is_described(command):
    missing = {n: undescribed(p) for n, p in parsers(command, command_parser(command))}
    assert not {n: m for n, m in missing.items() if m}


def test_preprocess_text_help_is_its_own_page_with_defaults(capsys):
    from megadiff.cli import main

    argv = sys.argv
    with pytest.raises(SystemExit) as e:
        try:
            main(["preprocess", "text", "--help"])
        finally:
            sys.argv = argv
    assert e.value.code == 0
    page = capsys.readouterr().out
    assert page.startswith("usage: megadiff preprocess text")
    assert "(default: 2048)" in page and "(default: text)" in page  # --vocab-size, --text-key
    assert "--train-tokenizer" in page and "--arrays" not in page and "--codes" not in page
    assert "(default: None)" not in page and "(default: False)" not in page


def test_generate_help_offers_the_strategies_and_describes_batch_size():
    p = command_parser("generate")
    actions = {a.dest: a for a in p._actions}
    assert set(actions["strategy"].choices) == {
        "random", "confidence", "margin", "threshold", "entropy", "policy"
    }  # fmt: skip
    assert "forward pass" in actions["batch_size"].help
    assert "policy folder" in actions["policy"].help
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--ckpt", "x", "--task", "text", "--strategy", "best"])
    assert e.value.code == 2


def test_version(capsys):
    from megadiff import __version__
    from megadiff.cli import main

    argv = sys.argv
    with pytest.raises(SystemExit) as e:
        try:
            main(["--version"])
        finally:
            sys.argv = argv
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"megadiff {__version__}" != "megadiff "


def test_bench_step_help_and_verdict():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import bench_step
    finally:
        sys.path.remove(str(ROOT / "tools"))
    assert not undescribed(bench_step.build_parser())
    assert bench_step.verdict(1.10, 1.15).startswith("PASS")
    assert bench_step.verdict(1.15, 1.15).startswith("PASS")
    assert bench_step.verdict(1.246, 1.15).startswith("FAIL")
    r = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_step.py"), "--help"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0 and "--target" in r.stdout and "(default: 1.15)" in r.stdout


@pytest.mark.parametrize(
    "argv, expect",
    [  # overrides after an option are overrides (the bad value proves it was read)
        (["demo", "--no-score", "model.num_layers=0"], "model.num_layers"),
        (["demo", "--no-score", "--bogus"], "unrecognized arguments: --bogus"),
        (["generate", "--ckpt", "none", "--task", "t2i", "x=1"], "unrecognized arguments: x=1"),
    ],
)
def test_overrides_after_options_are_read_and_unknown_flags_refused(argv, expect, capsys):
    from megadiff.cli import main

    saved = sys.argv
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = saved
    assert code == 2
    assert expect in capsys.readouterr().err


def undescribed_on_page(page: str) -> list[str]:
    """The options of an argparse ``--help`` page that have no description."""
    lines = page.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(("options:", "optional")))
    bad = []
    for i, line in enumerate(lines[start + 1 :], start + 1):
        if not line.startswith("  -") or re.search(r"\S\s{2,}\S", line.strip()):
            continue  # not an option, or its description follows on the same line
        following = lines[i + 1] if i + 1 < len(lines) else ""
        if not re.match(r"^\s{6,}[^\s-]", following):
            bad.append(line.split()[0].rstrip(","))
    return bad


SCRIPTS = sorted(
    p.name for p in (ROOT / "tools").glob("*.py") if '__name__ == "__main__"' in p.read_text()
)  # the tools run as scripts (not the modules they share, such as bare_twin.py)


@pytest.mark.parametrize("tool", SCRIPTS)
def test_every_tool_flag_is_described(tool):
    r = subprocess.run(
        [sys.executable, str(ROOT / "tools" / tool), "--help"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert undescribed_on_page(r.stdout) == [], r.stdout


def test_undescribed_on_page_finds_a_bare_flag():
    p = argparse.ArgumentParser()
    p.add_argument("--described", help="it says what it does")
    p.add_argument("--long-described-flag-name-that-wraps", help="described on the next line")
    p.add_argument("--bare", type=int)
    assert undescribed_on_page(p.format_help()) == ["--bare"]
