"""The built-in tri-modal demo: the shape world and caption grammar (``shapes``), the raw data
generators (``synth``), the dataset build: tokenizers and MDS streams (``data``), the
``megadiff demo`` command (``command``) and the scorers of its verifiable tasks (``scoring``).
See docs/data.md and docs/generation.md."""
