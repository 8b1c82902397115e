"""Generation: checkpoint loading, model adapters, task buffers, the library behind
``megadiff generate`` (:mod:`~megadiff.generation.api`) and its command line."""
