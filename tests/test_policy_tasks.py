"""Verifiable tasks of the unmasking policies (megadiff.policy.tasks): built-in rewards on
hand-written completions, JSONL and ``module:function`` tasks and their errors, the held-out
split, the vocabulary check."""

import json
import textwrap

import pytest

from megadiff.data.tokenizers.text import train_bpe
from megadiff.policy.tasks import (
    PolicyTaskError,
    check_expressible,
    is_held_out,
    load_task,
)

WORDS = ["able", "red", "blue", "green", "circle", "square", "left", "right", "the", "and"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A small byte-level BPE trained on ASCII words, digits and the tasks' punctuation."""
    lines = [f"{w}={i * 7919 % 1000000:06d}\n{w}?" for i, w in enumerate(WORDS * 20)]
    lines += [f"{a}+{b}={a + b} {a}-{b}" for a in range(30) for b in range(0, 30, 3)]
    return train_bpe(lines, 300, tmp_path_factory.mktemp("tok") / "t.tiktoken")


def write(path, text):
    path.write_text(textwrap.dedent(text).lstrip())
    return str(path)


# ----------------------------------------------------------------------------- built-ins


@pytest.mark.parametrize(
    "prompt,completion,reward",
    [
        ("23+58=", "81", 1.0),
        ("23+58=", " 81\n", 1.0),
        ("23+58=", "81<eot>", 1.0),
        ("23+58=", "811", 0.0),
        ("23+58=", "18", 0.0),
        ("23+58=", "", 0.0),
        ("40-12=", "28", 1.0),
        ("40-12=", "52", 0.0),
    ],
)
def test_arith_reward(tok, prompt, completion, reward):
    assert load_task("arith", tok).reward(prompt, completion) == reward


def test_sums_and_lookup_rewards(tok):
    sums = load_task("sums", tok)
    assert sums.reward("3+5=", "8") == 1.0
    assert sums.reward("9+9=", "18") == 1.0
    assert sums.reward("3+5=", "9") == 0.0
    look = load_task("lookup", tok)
    prompt = "able=611644\nred=768175\nred?"
    assert look.reward(prompt, "768175") == 1.0
    assert look.reward(prompt, "768175\nblue") == 1.0
    assert look.reward(prompt, "611644") == 0.0  # the other key's code
    assert look.reward(prompt, "7681750") == 0.0  # a digit too many
    assert look.reward(prompt, "76817") == 0.0


def test_pick_reward_accepts_either_code_whole(tok):
    pick = load_task("pick", tok)
    assert pick.reward("381|527=", "527;8301") == 1.0
    assert pick.reward("381|527=", " 381") == 1.0  # the tag is optional
    assert pick.reward("081|527=", "081;0000") == 1.0  # leading zero kept
    assert pick.reward("381|527=", "321;8301") == 0.0  # a mix of the two codes
    assert pick.reward("381|527=", "5271") == 0.0  # a digit too many
    assert pick.reward("381|527=", "52") == 0.0
    assert pick.reward("381|527=", ";527") == 0.0


def test_builtin_prompts_have_the_demo_forms(tok):
    for p in load_task("sums", tok).prompts("train", 50, 0):
        a, b = p.removesuffix("=").split("+")
        assert 0 <= int(a) <= 9 and 0 <= int(b) <= 9
    for p in load_task("arith", tok).prompts("eval", 50, 0):
        assert p.endswith("=") and ("+" in p or "-" in p)
    for p in load_task("lookup", tok).prompts("eval", 20, 0):
        *defs, question = p.split("\n")
        assert len(defs) == 2 and question.endswith("?")
        assert question[:-1] in {d.split("=")[0] for d in defs}
    for p in load_task("pick", tok).prompts("eval", 50, 0):
        a, b = p.removesuffix("=").split("|")
        assert len(a) == len(b) == 3 and all(x != y for x, y in zip(a, b)), p


@pytest.mark.parametrize("name", ["arith", "lookup", "sums", "pick"])
def test_split_disjoint_deterministic_seeded(tok, name):
    task = load_task(name, tok)
    train = task.prompts("train", 300, 0)
    held = task.prompts("eval", 100, 0)
    assert len(train) == 300 and len(held) == 100
    assert not set(train) & set(held)
    assert all(is_held_out(p) for p in held) and not any(is_held_out(p) for p in train)
    assert task.prompts("eval", 100, 0) == held  # deterministic
    assert load_task(name, tok).prompts("eval", 100, 0) == held  # across loads
    other = task.prompts("eval", 100, 1)
    assert other != held and all(is_held_out(p) for p in other)  # seed picks, split fixed


def test_held_out_fraction_is_about_a_fifth():
    held = sum(is_held_out(f"prompt {i}") for i in range(5000))
    assert 0.17 * 5000 < held < 0.23 * 5000


def test_split_and_count_errors(tok):
    task = load_task("arith", tok)
    with pytest.raises(PolicyTaskError, match="split must be one of"):
        task.prompts("test", 4, 0)
    with pytest.raises(PolicyTaskError, match=">= 1"):
        task.prompts("train", 0, 0)


# ----------------------------------------------------------------------------- JSONL


def test_jsonl_task(tmp_path, tok):
    rows = [{"prompt": f"{w} colour?", "answer": c} for w, c in zip(WORDS, "rgbrgbrgbr")]
    rows.append({"prompt": "seven?", "answer": 7})
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    task = load_task(str(path), tok)
    assert task.reward("able colour?", " r") == 1.0
    assert task.reward("able colour?", "g") == 0.0
    assert task.reward("able colour?", "red") == 0.0  # the answer continues
    assert task.reward("seven?", "7.") == 1.0
    train, held = task.prompts("train", 30, 0), task.prompts("eval", 3, 0)
    assert not set(train) & set(held)
    assert set(train) | set(held) <= {r["prompt"] for r in rows}
    assert set(train) == {r["prompt"] for r in rows if not is_held_out(r["prompt"])}


@pytest.mark.parametrize(
    "body,match",
    [
        ('{"prompt": "a?", "answer": "1"}\n{"prompt": "b?", "answer": \n', r"t.jsonl:2: not JSON"),
        ('{"prompt": "a?", "answer": "1"}\n["a?", "1"]\n', r"t.jsonl:2: expected an object"),
        ('{"answer": "1"}\n', r"t.jsonl:1: 'prompt' must be a non-empty string"),
        ('{"prompt": "a?"}\n', r"t.jsonl:1: no 'answer'"),
        ('{"prompt": "a?", "answer": [1]}\n', r"t.jsonl:1: 'answer' must be a string"),
        ('{"prompt": "a?", "answer": ""}\n', r"t.jsonl:1: 'answer' is empty"),
        ('{"prompt": "a?", "answer": "1"}\n{"prompt": "a?", "answer": "2"}\n', r"t.jsonl:2:"),
        ("\n\n", "holds no rows"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, tok, body, match):
    (tmp_path / "t.jsonl").write_text(body)
    with pytest.raises(PolicyTaskError, match=match):
        load_task(str(tmp_path / "t.jsonl"), tok)


def test_unknown_specs(tmp_path, tok):
    with pytest.raises(PolicyTaskError, match="does not exist"):
        load_task(str(tmp_path / "missing.jsonl"), tok)
    with pytest.raises(PolicyTaskError, match="not a built-in task"):
        load_task("arithmetic", tok)
    with pytest.raises(PolicyTaskError, match="only for a 'module:function'"):
        load_task("arith", tok, prompts="sums")


# ----------------------------------------------------------------------------- verifiers


@pytest.fixture
def verifiers(tmp_path, monkeypatch):
    write(
        tmp_path / "my_verifiers.py",
        """
        def ends_with_x(prompt, completion):
            return 1.0 if completion.strip().endswith("x") else 0.0

        def half(prompt, completion):
            return 0.5

        def too_big(prompt, completion):
            return 2

        def words(prompt, completion):
            return "yes"

        def one_arg(completion):
            return 1.0

        NOT_A_FUNCTION = 3
        """,
    )
    write(tmp_path / "broken_verifier.py", "import not_a_module_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_verifier_on_builtin_and_file_prompts(verifiers, tok):
    task = load_task("my_verifiers:ends_with_x", tok)  # built-in arith prompts by default
    prompt = task.prompts("eval", 1, 0)[0]
    assert prompt.endswith("=")
    assert task.reward(prompt, "12x") == 1.0 and task.reward(prompt, "12") == 0.0
    assert load_task("my_verifiers:half", tok, prompts="sums").reward("3+5=", "8") == 0.5
    path = verifiers / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(40)))
    task = load_task("my_verifiers:ends_with_x", tok, prompts=str(path))
    held = task.prompts("eval", 4, 0)
    assert held and all(p.startswith("q") and is_held_out(p) for p in held)
    assert task.reward("q0", "x") == 1.0


@pytest.mark.parametrize(
    "spec,match",
    [
        ("no_such_module_here:f", "verifier 'no_such_module_here:f' does not import"),
        ("broken_verifier:f", "'broken_verifier:f' does not import.*not_a_module_anywhere"),
        ("my_verifiers:missing", "has no 'missing'"),
        ("my_verifiers:NOT_A_FUNCTION", "is not callable"),
        ("my_verifiers:one_arg", r"must take \(prompt, completion\)"),
        ("my_verifiers:", "expected 'module:function'"),
    ],
)
def test_verifier_load_errors(verifiers, tok, spec, match):
    with pytest.raises(PolicyTaskError, match=match):
        load_task(spec, tok)


def test_verifier_bad_rewards(verifiers, tok):
    with pytest.raises(PolicyTaskError, match=r"returned 2.0; rewards must be in \[0, 1\]"):
        load_task("my_verifiers:too_big", tok).reward("1+1=", "2")
    with pytest.raises(PolicyTaskError, match="returned 'yes'"):
        load_task("my_verifiers:words", tok).reward("1+1=", "2")


# ----------------------------------------------------------------------------- vocabulary


def test_builtin_tasks_are_expressible(tok):
    for name in ("arith", "sums", "lookup", "pick"):
        check_expressible(load_task(name, tok), tok, n=16)


def test_unknown_characters_are_named(tmp_path, tok):
    rows = [{"prompt": f"{w} in French?", "answer": "rouge"} for w in WORDS]
    rows[3]["answer"] = "bleu é"
    rows.append({"prompt": "red in Japanese?", "answer": "赤"})
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(PolicyTaskError, match="cannot express '(é|赤)'"):
        check_expressible(load_task(str(path), tok), tok, n=64)


def test_ids_beyond_the_model_text_range(tok):
    with pytest.raises(PolicyTaskError, match="outside the model's text range"):
        check_expressible(load_task("arith", tok), tok, n=8, text_size=200)
