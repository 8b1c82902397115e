"""Every typed flag of ``megadiff generate`` and ``megadiff convert`` refuses NaN and
out-of-range values in argparse itself: exit 2, the flag named, nothing read or loaded."""

from __future__ import annotations

import argparse

import pytest

from megadiff.export import cli as convert_cli
from megadiff.generation import cli as generate_cli


def _parser(module, prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog)
    module.add_arguments(p)
    return p


def _typed_flags(parser: argparse.ArgumentParser, prefix: list[str]):
    """(argv prefix, flag) of every option with a ``type=`` (sub-commands included)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _typed_flags(sub, [*prefix, name])
        elif action.type is not None and action.option_strings:
            yield prefix, action.option_strings[0]


PARSERS = {
    "generate": (_parser(generate_cli, "megadiff generate"), ["--ckpt", "x", "--task", "text"]),
    "convert": (_parser(convert_cli, "megadiff convert"), []),
}
CASES = [
    (name, prefix, flag)
    for name, (parser, _) in PARSERS.items()
    for prefix, flag in _typed_flags(parser, [])
]


def test_every_numeric_flag_is_covered():
    flags = {f"{n} {' '.join(p)} {f}".replace("  ", " ") for n, p, f in CASES}
    assert len(flags) >= 16, flags  # 13 of generate, --shard-size and 2 x --tolerance
    untyped_numbers = [
        a.option_strings[0]
        for parser, _ in PARSERS.values()
        for a in parser._actions
        if a.type in (int, float)
    ]
    assert not untyped_numbers  # each number has a range (megadiff.flags.number)


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0.5x"])
@pytest.mark.parametrize("name,prefix,flag", CASES, ids=[f"{c[0]}{c[2]}" for c in CASES])
def test_bad_numeric_flag_values_exit_2_naming_the_flag(name, prefix, flag, value, capsys):
    parser, required = PARSERS[name]
    argv = [*prefix, *required, f"{flag}={value}"]
    if name == "convert":
        argv += (
            ["--ckpt", "c", "--out", "o"] if prefix == ["to-hf"] else ["--hf", "h", "--out", "o"]
        )
    with pytest.raises(SystemExit) as e:
        parser.parse_args(argv)
    assert e.value.code == 2
    assert f"argument {flag}: must be" in capsys.readouterr().err


def test_good_values_still_parse():
    parser, required = PARSERS["generate"]
    args = parser.parse_args([*required, "--temperature", "0.7", "--top-p", "1", "--seed", "0"])
    # --gen-length unset: the checkpoint's sampling section or 32 decides (test_sampling_generate)
    assert (args.temperature, args.top_p, args.seed, args.gen_length) == (0.7, 1.0, 0, None)
    parser = PARSERS["convert"][0]
    args = parser.parse_args(["to-hf", "--ckpt", "c", "--out", "o", "--shard-size", "500MB"])
    assert args.shard_size == "500MB"
    args = parser.parse_args(["to-hf", "--ckpt", "c", "--out", "o", "--shard-size", "1000"])
    assert args.shard_size == 1000
