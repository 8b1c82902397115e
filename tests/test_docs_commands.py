"""The README's and docs' commands, read as text: every folder they write into inside a checkout
is ignored by git, and the walk-through commands that train do train (no finished run resumed,
no checkpoint loaded at its own last step)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# flags and keys whose value is a path megadiff writes
OUTPUTS = re.compile(r"(?:run\.dir=|checkpoint\.dir=|--out |--train-tokenizer )([A-Za-z0-9_./-]+)")


def ignored_top_level() -> set[str]:
    """Top-level folders ``.gitignore`` ignores (its ``/name/`` lines)."""
    lines = (ROOT / ".gitignore").read_text().splitlines()
    return {line.strip("/") for line in lines if re.fullmatch(r"/[^/*]+/", line.strip())}


def code_blocks(path: Path) -> str:
    return "\n".join(re.findall(r"```[a-z]*\n(.*?)```", path.read_text(), re.S))


def test_every_output_folder_of_the_docs_commands_is_ignored():
    ignored = ignored_top_level()
    outputs = {
        (doc.name, m)
        for doc in DOCS
        for m in OUTPUTS.findall(code_blocks(doc))
        if not m.startswith("/") and m[0].islower()  # absolute paths, placeholders (DIR)
    }
    assert len(outputs) > 10
    bad = sorted((doc, m) for doc, m in outputs if m.split("/")[0] not in ignored)
    assert not bad, f"outputs outside .gitignore: {bad}"
    assert "runs" in ignored and "samples" in ignored and "hf" in ignored


def readme_commands() -> list[str]:
    """The README's shell commands, continuation lines joined and comments dropped."""
    text = code_blocks(ROOT / "README.md").replace("\\\n", " ")
    return [re.sub(r"\s+#.*$", "", line).strip() for line in text.splitlines() if line.strip()]


def test_readme_training_commands_each_have_their_own_work():
    """Two training commands with one run.dir are one run continued (the second says so), a
    command without run.dir writes to the config's, and a checkpoint.load from a run of the
    same length resets the step or trains further."""
    train = [c for c in readme_commands() if " train " in f" {c} " or c.startswith("megadiff demo")]
    assert len(train) >= 8
    imported = {  # checkpoints written by from-hf: step 0
        m.group(1)
        for c in readme_commands()
        if "from-hf" in c and (m := re.search(r"--out (\S+)", c))
    }
    dirs: dict[str, str] = {}
    for cmd in train:
        run_dir = re.search(r"run\.dir=(\S+)", cmd)
        config = next((w for w in cmd.split() if w.endswith(".yaml")), "demo")
        key = run_dir.group(1) if run_dir else f"the default run.dir of {config}"
        if not run_dir:  # only the config's own run, once
            assert key not in dirs, f"{cmd!r} resumes {dirs[key]!r} (give it a run.dir)"
        elif key in dirs:  # the same run again: only after a stop (a time budget)
            assert "exit_after_minutes" in dirs[key], f"{cmd!r} resumes a finished {dirs[key]!r}"
        dirs[key] = cmd
        load = re.search(r"checkpoint\.load=(\S+)", cmd)
        if load and load.group(1) not in imported:
            assert "reset_step=true" in cmd or "train.steps=" in cmd, cmd
