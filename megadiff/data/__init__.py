"""megadiff.data: training-time data. The modality and task names (``names``), the vocabulary
layout (``vocab``), the offline tokenizers (``tokenizers``), MDS shards (``mds``,
``preprocess``), the DP-partitioned mixture loader (``loader``, ``source``) and the built-in
synthetic token source (``synthetic``). The built-in demo data is :mod:`megadiff.demo`. See
docs/data.md."""
