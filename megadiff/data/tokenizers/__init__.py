"""The offline tokenizers: text BPE (``text``), the image PatchVQ (``image``), the audio
SpectralRVQ codec (``audio``), their shared k-means (``vq``) and the tokenizer files a run and
its checkpoints carry (``files``). See docs/data.md."""
