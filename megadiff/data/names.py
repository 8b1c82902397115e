"""The modality and task names, defined once.

Plain Python with no imports: :mod:`megadiff.config` reads it before anything heavy is loaded.

* Modalities: ``text``, ``image``, ``audio``. A modality's position in :data:`MODALITIES` is its
  modality id (``megadiff.data.vocab.TEXT/IMAGE/AUDIO``); a stream's ``kind`` is a modality.
* Tasks: ``text`` (packed text), ``t2i`` / ``t2s`` (text -> image / speech), ``caption`` /
  ``asr`` (image / speech -> text). A task reads one modality and generates one
  (:data:`TASK_IO`); a paired task's rows come from a stream of its media modality
  (:data:`TASK_STREAM`).
"""

MODALITIES = ("text", "image", "audio")

# in the order of the task tokens in the vocabulary (<t2i> <t2s> <caption> <asr> <text>): the
# order fixes their ids, so new tasks are appended
TASKS = ("t2i", "t2s", "caption", "asr", "text")

# task -> (modality it reads, modality it generates)
TASK_IO = {
    "t2i": ("text", "image"),
    "t2s": ("text", "audio"),
    "caption": ("image", "text"),
    "asr": ("audio", "text"),
    "text": ("text", "text"),
}

# task -> the kind of stream its rows are made from (the media side of a pair; text for text)
TASK_STREAM = {t: next((m for m in io if m != "text"), "text") for t, io in TASK_IO.items()}

# task -> the modalities its rows hold (in MODALITIES order): the tokenizers it needs
TASK_MODALITIES = {t: tuple(m for m in MODALITIES if m in io) for t, io in TASK_IO.items()}

# the tasks a stream of each kind trains when its ``tasks`` list is empty
DEFAULT_TASKS = {"text": ("text",), "image": ("t2i", "caption"), "audio": ("t2s", "asr")}
