"""megadiff.data: vocabulary layout (``vocab``), offline tokenizers (``text_tokenizer``,
``image_tokenizer``, ``audio_tokenizer``), MDS shards (``mds``, ``preprocess``), the DP-partitioned
mixture loader (``loader``) and the built-in demo data (``demo``, ``synth``). See docs/data.md."""
