"""Export a megadiff checkpoint to a Hugging Face folder: ``megadiff convert to-hf``.

python tools/convert_to_hf.py --ckpt runs/x/checkpoints --out hf/x [--verify] [--overwrite]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megadiff.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["convert", "to-hf", *sys.argv[1:]]))
