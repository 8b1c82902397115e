"""The demo's shape world, shared by the image generator (:mod:`megadiff.demo.synth`) and the
scorers (:mod:`megadiff.demo.scoring`): the palette, shapes and positions, where each position
puts a shape, and the caption grammar ("a red circle on the left", "a blue square in the
center"). The same captions are the demo's speech transcripts."""

from __future__ import annotations

import numpy as np

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 190),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom", "center")
BACKGROUND = (20, 20, 28)


def position_centres(size: int = 32) -> dict[str, tuple[float, float]]:
    """``(row, col)`` of each position's shape centre in a ``size x size`` image."""
    c, near, far = size / 2, size * 0.27, size * 0.73
    return {
        "left": (c, near),
        "right": (c, far),
        "top": (near, c),
        "bottom": (far, c),
        "center": (c, c),
    }


def caption(color: str, shape: str, position: str) -> str:
    """The caption of one picture: ``a <colour> <shape> on the <position>`` (``in the center``)."""
    return f"a {color} {shape} {'in the' if position == 'center' else 'on the'} {position}"


def random_caption(rng: np.random.Generator) -> str:
    """A caption with colour, shape and position drawn from ``rng`` (in that order)."""
    color, shape = list(COLORS)[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))]
    position = POSITIONS[rng.integers(len(POSITIONS))]
    return caption(color, shape, position)


def parse_caption(text: str) -> tuple[str, str, str]:
    """``(colour, shape, position)`` of a demo caption ("a red circle on the left")."""
    w = text.strip().lower().split()
    if len(w) < 5 or w[1] not in COLORS or w[-1] not in POSITIONS:
        raise ValueError(f"not a demo caption ('a <colour> <shape> on the <pos>'): {text!r}")
    return w[1], w[2], w[-1]
