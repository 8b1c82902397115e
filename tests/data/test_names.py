import subprocess
import sys

from megadiff.data.names import (
    DEFAULT_TASKS,
    MODALITIES,
    TASK_IO,
    TASK_MODALITIES,
    TASK_STREAM,
    TASKS,
)
from megadiff.data.vocab import AUDIO, IMAGE, TEXT, TEXT_SPECIALS, VocabLayout


def test_names_are_consistent():
    assert [MODALITIES[i] for i in (TEXT, IMAGE, AUDIO)] == ["text", "image", "audio"]
    assert tuple(TASK_IO) == TASKS and set(DEFAULT_TASKS) == set(MODALITIES)
    for kind, tasks in DEFAULT_TASKS.items():
        assert all(TASK_STREAM[t] == kind for t in tasks)
    assert TASK_STREAM == {
        "t2i": "image", "t2s": "audio", "caption": "image", "asr": "audio", "text": "text"
    }  # fmt: skip
    assert TASK_MODALITIES["caption"] == ("text", "image") and TASK_MODALITIES["text"] == ("text",)


def test_task_tokens_follow_tasks_order():
    """The vocabulary's task tokens are TASKS in order (their ids depend on it)."""
    assert TEXT_SPECIALS == ("<bot>", "<eot>", "<t2i>", "<t2s>", "<caption>", "<asr>", "<text>")
    v = VocabLayout(text_size=10)
    assert [v.task_id(t) for t in TASKS] == list(range(12, 17))


def test_names_import_nothing_heavy():
    """megadiff.config imports the names first: they must not pull in numpy or torch."""
    code = (
        "import sys, megadiff.data.names; "
        "print(sorted(m for m in ('numpy', 'torch', 'yaml') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
