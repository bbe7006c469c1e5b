"""Preference data: pairs, ratings and prompts validated row by row, rendered exactly as fine-tuning renders a
dialog, and the chat page's feedback turned into pairs."""

import json

import pytest
import tiny

from lmforge.cli import main
from lmforge.data.preferences import (
    collate_pairs,
    export_feedback,
    pair_tokens,
    read_pairs,
    read_prompts,
    read_ratings,
    render,
)
from lmforge.data.sft import IGNORE, chat_examples, instruct_examples
from lmforge.errors import LmforgeError
from lmforge.generate import encode_prompt
from lmforge.weights.load import load


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = tiny.llama_folder(tmp_path_factory.mktemp("pref") / "llama", chat_template=True)
    return load(folder)[1]


def test_a_pair_renders_as_instruction_tuning_renders_its_row(tok, tmp_path):
    pairs = read_pairs(write(tmp_path / "p.jsonl", [{"prompt": "hi there", "chosen": "yes", "rejected": "no way",
                                                    "extra": 1}]))
    [pair] = pair_tokens(pairs, tok, 64)
    assert pair.prompt == encode_prompt(tok, "hi there", chat=True)  # what `generate --chat` feeds the model
    sft = instruct_examples(write(tmp_path / "i.jsonl", [{"instruction": "hi there", "output": "yes"}]), tok, 64)[0]
    assert sft.tokens == pair.prompt + pair.chosen
    assert [t for t, label in zip(sft.tokens, sft.labels, strict=True) if label != IGNORE] == pair.chosen
    assert pair.chosen[-1] == tok.eos_id  # the answer ends its turn: the model learns to stop


def test_a_conversation_trains_only_its_last_answer(tok, tmp_path):
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}]
    row = {"messages": messages, "chosen": "dd", "rejected": "e"}
    [pair] = pair_tokens(read_pairs(write(tmp_path / "p.jsonl", [row])), tok, 64)
    sft = chat_examples(write(tmp_path / "c.jsonl", [{"messages": [*messages, {"role": "assistant",
                                                                                "content": "dd"}]}]), tok, 64)[0]
    assert sft.tokens == pair.prompt + pair.chosen
    trained = [t for t, label in zip(sft.tokens, sft.labels, strict=True) if label != IGNORE]
    assert trained[-len(pair.chosen):] == pair.chosen and len(trained) > len(pair.chosen)  # "b" is context here


def test_collated_pairs_keep_each_pair_in_one_row(tok, tmp_path):
    rows = [{"prompt": "p1", "chosen": "aa", "rejected": "b"}, {"prompt": "longer prompt", "chosen": "c",
                                                                  "rejected": "dddd"}]
    pairs = pair_tokens(read_pairs(write(tmp_path / "p.jsonl", rows)), tok, 64)
    batch = collate_pairs(pairs, pad_id=0)
    assert batch["labels"].tolist() == [0, 0]  # one target per pair
    for side in ("chosen", "rejected"):
        for i, p in enumerate(pairs):
            answer = getattr(p, side)
            n = len(p.prompt) + len(answer)
            assert batch[f"{side}_tokens"][i, :n].tolist() == p.prompt + answer
            assert batch[f"{side}_answer"][i].tolist()[:n] == [0] * len(p.prompt) + [1] * len(answer)
            assert batch[f"{side}_mask"][i].sum() == n


@pytest.mark.parametrize("row, message", [
    ({"prompt": "q", "chosen": "same", "rejected": " same "}, "line 2: 'chosen' and 'rejected' are the same"),
    ({"prompt": "q", "chosen": "", "rejected": "x"}, "line 2: 'chosen' is empty"),
    ({"prompt": "q", "rejected": "x"}, "line 2: missing field 'chosen'"),
    ({"chosen": "a", "rejected": "x"}, "line 2: missing field 'prompt' (or 'messages')"),
    ({"prompt": 3, "chosen": "a", "rejected": "x"}, "line 2: 'prompt' must be a string"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "a",
      "rejected": "b"}, "line 2: 'messages' must end with a user turn"),
    ({"messages": [{"role": "robot", "content": "q"}], "chosen": "a", "rejected": "b"}, "line 2: message 1 has role"),
    ("not json", "line 2"),
])
def test_bad_pair_rows_are_named_by_line(row, message, tmp_path):
    path = write(tmp_path / "p.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, row])
    with pytest.raises(LmforgeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_pairs(path)


def test_a_pair_longer_than_the_limit_is_an_error_naming_its_row(tok, tmp_path):
    path = write(tmp_path / "p.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"},
                                        {"prompt": "ok", "chosen": "a", "rejected": "b" * 80}])
    with pytest.raises(LmforgeError, match=r"p.jsonl line 2: the pair is \d+ tokens long, more than the 64"):
        pair_tokens(read_pairs(path), tok, 64, path)


def test_empty_answer_and_empty_file(tok, tmp_path):
    with pytest.raises(LmforgeError, match="row 1: empty answer"):
        render(tok, [{"role": "user", "content": "q"}], "  ", "row 1")
    with pytest.raises(LmforgeError, match="no rows"):
        read_pairs(write(tmp_path / "e.jsonl", []))


def test_prompt_rows(tmp_path):
    rows = read_prompts(write(tmp_path / "q.jsonl", [{"prompt": "one"}, {"messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "two"}]}]))
    assert [r.prompt for r in rows] == ["one", "two"] and rows[1].where.endswith("q.jsonl line 2")


FEEDBACK = [  # the shape `lmforge serve --feedback` writes, with a regenerated answer to the first conversation
    {"messages": [{"role": "user", "content": "capital of France?"}], "response": "Paris.", "rating": 1,
     "model": "m", "created": 1},
    {"messages": [{"role": "user", "content": "capital of France?"}], "response": "I think it is Lyon, or maybe",
     "rating": -1, "model": "m", "created": 2},
    {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "2+2?"}], "response": "4",
     "rating": 1, "model": "m", "created": 3},  # liked, never disliked: no pair
    {"messages": [{"role": "user", "content": "capital of France?"}], "response": "Paris.", "rating": 1,
     "model": "m", "created": 4},  # the same answer liked twice is one answer
]


def test_feedback_export_pairs_liked_and_disliked_answers_to_one_conversation(tmp_path):
    source = write(tmp_path / "feedback.jsonl", FEEDBACK)
    out = tmp_path / "prefs.jsonl"
    assert main(["feedback", "export", "--from", str(source), "--out", str(out)]) == 0
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {"prompt": "capital of France?", "chosen": "Paris.", "rejected": "I think it is Lyon, or maybe"}]
    counts = export_feedback(source, out)
    assert counts == {"ratings": 4, "conversations": 2, "pairs": 1, "unpaired": 1}
    assert len(read_pairs(out)) == 1  # the export reads back as training pairs


def test_answers_rated_both_ways_or_differing_in_space_only_are_not_pairs(tmp_path):
    q = [{"role": "user", "content": "q"}]
    rows = [{"messages": q, "response": "Paris.", "rating": 1}, {"messages": q, "response": "Paris. ", "rating": -1},
            {"messages": q, "response": "Lyon", "rating": -1}, {"messages": q, "response": "Nice", "rating": 1},
            {"messages": q, "response": "Lyon", "rating": 1}, {"messages": q, "response": "Rome", "rating": -1}]
    out = tmp_path / "prefs.jsonl"
    counts = export_feedback(write(tmp_path / "f.jsonl", rows), out)
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {"prompt": "q", "chosen": "Nice", "rejected": "Rome"}]
    assert counts["pairs"] == 1 and counts["unpaired"] == 4  # "Paris." and "Lyon" went both ways


def test_feedback_without_a_pair_and_bad_ratings(tmp_path, capsys):
    source = write(tmp_path / "f.jsonl", FEEDBACK[2:3])
    assert main(["feedback", "export", "--from", str(source), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "no conversation has both a liked and a disliked answer" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()
    with pytest.raises(LmforgeError, match="line 1: 'rating' must be -1 or 1, not 5"):
        read_ratings(write(tmp_path / "r.jsonl", [{**FEEDBACK[0], "rating": 5}]))
