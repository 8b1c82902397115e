"""``tools/install.sh`` against a stand-in ``python`` that records what it is asked (no network):
torch comes with numpy, nothing imports torch before numpy is in (torch without numpy warns
"Failed to initialize NumPy"), each long step is announced, an installed torch is kept."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# records its arguments; "installs" torch/numpy by touching files; imports like the real one
FAKE_PYTHON = r"""#!/usr/bin/env bash
printf '%s\n' "$*" >>"$FAKE_STATE/calls"
if [[ "$1 $2" == "-m pip" ]]; then
  for a in "$@"; do
    case "$a" in torch==*) touch "$FAKE_STATE/torch" ;; numpy*) touch "$FAKE_STATE/numpy" ;; esac
  done
  exit 0
fi
if [[ "$1" == "-c" && "$2" == *"version('torch')"* ]]; then
  [[ -f "$FAKE_STATE/torch" ]] && echo "2.13.0+cpu" && exit 0
  exit 1
fi
if [[ "$1" == "-c" && "$2" == *"import torch"* ]]; then
  [[ -f "$FAKE_STATE/torch" ]] || exit 1
  [[ -f "$FAKE_STATE/numpy" ]] || echo "UserWarning: Failed to initialize NumPy" >&2
fi
exit 0
"""


def install(tmp_path: Path, torch_installed: bool) -> tuple[subprocess.CompletedProcess, list]:
    state = tmp_path / "state"
    state.mkdir()
    if torch_installed:
        (state / "torch").touch()
        (state / "numpy").touch()
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "FAKE_STATE": str(state)}
    r = subprocess.run(
        ["bash", str(ROOT / "tools" / "install.sh"), "--dev"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    calls = (state / "calls").read_text().splitlines()
    return r, calls


def test_fresh_box_installs_torch_with_numpy_and_says_so(tmp_path):
    r, calls = install(tmp_path, torch_installed=False)
    assert r.returncode == 0, r.stderr
    assert "Failed to initialize NumPy" not in r.stderr
    torch_install = next(i for i, c in enumerate(calls) if "torch==2.13.0" in c and "pip" in c)
    assert "numpy" in calls[torch_install]
    assert not any("import torch" in c for c in calls[:torch_install])
    out = r.stdout
    for step in (
        "installing torch==2.13.0 and numpy",
        "installing mosaicml-streaming",
        "installing megadiff and its dependencies",
        "megadiff installed (torch 2.13.0",
    ):
        assert step in out, out  # fmt: skip
    assert out.index("installing torch") < out.index("installing megadiff")
    assert any(c.startswith("-m pip install -q -e .[dev]") for c in calls)


def test_installed_torch_is_kept(tmp_path):
    r, calls = install(tmp_path, torch_installed=True)
    assert r.returncode == 0, r.stderr
    assert "keeping the installed torch 2.13.0" in r.stdout
    assert not any("torch==" in c for c in calls if "pip" in c)
