"""Generation: model adapters, checkpoint loading, task buffers, the ``generate`` command."""
