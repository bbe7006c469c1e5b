"""Fine-tuning datasets: the loss falls exactly on what the model must say (the response and its end of turn),
the prompt is the one `generate --chat` builds, bad rows name their line, nothing is cut silently, and batches
are a pure function of the step, padded right, with similar lengths together and every row once per epoch."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import write_byte_tokenizer
from tiny import CHAT_TEMPLATE

from lmforge.data.sft import (
    IGNORE,
    Example,
    SFTData,
    chat_examples,
    classify_examples,
    collate,
    domain_examples,
    instruct_examples,
    label_word_examples,
    load_task,
    pad_id_for,
    padding_fraction,
    plain_prompt,
    seq2seq_examples,
    split,
)
from lmforge.errors import LmforgeError
from lmforge.generate import encode_prompt
from lmforge.tokenizer import Tokenizer

EOT = "<|endoftext|>"


def jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def spans(ex: Example) -> list[list[int]]:
    """The runs of trained ids, in order."""
    assert ex.labels is not None and len(ex.labels) == len(ex.tokens)
    runs: list[list[int]] = []
    for i, (tok, lab) in enumerate(zip(ex.tokens, ex.labels, strict=True)):
        if lab == IGNORE:
            continue
        assert lab == tok
        if i == 0 or ex.labels[i - 1] == IGNORE:
            runs.append([])
        runs[-1].append(tok)
    return runs


def untrained_prefix(ex: Example) -> list[int]:
    assert ex.labels is not None
    first = next(i for i, lab in enumerate(ex.labels) if lab != IGNORE)
    return ex.tokens[:first]


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory) -> Tokenizer:
    """Byte-level, no merges, <|endoftext|> = eos = 256, no chat template."""
    folder = tmp_path_factory.mktemp("bytes")
    write_byte_tokenizer(folder)
    return Tokenizer.from_dir(folder)


@pytest.fixture(scope="module")
def tiny_chat_tok(tmp_path_factory) -> Tokenizer:
    """The byte tokenizer with tests/tiny.py's chat template: no end-of-turn token, turns start with eos."""
    folder = tmp_path_factory.mktemp("bytes-chat")
    write_byte_tokenizer(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    return Tokenizer.from_dir(folder)


@pytest.fixture(scope="module")
def t5_tok(tmp_path_factory) -> Tokenizer:
    """Word-level with T5's ids (<pad> 0, </s> 1, <unk> 2) and its post-processor appending </s>."""
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers, processors

    words = "the cat sat on a mat dog ran far away le chat est assis sur un tapis".split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = HF(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    folder = tmp_path_factory.mktemp("t5")
    backend.save(str(folder / "tokenizer.json"))
    config = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer.from_dir(folder)


# ---- instruction tuning -------------------------------------------------------------------------------------


@pytest.mark.parametrize("row, user", [
    ({"instruction": "Name a primary colour.", "output": "Blue is one."}, "Name a primary colour."),
    ({"instruction": "Translate:", "input": "The cat", "output": "Le chat"}, "Translate:\n\nThe cat"),
    ({"instruction": "Say hi.", "input": "", "output": "Hi!"}, "Say hi."),
    ({"prompt": "Capital of France?", "completion": "Paris."}, "Capital of France?"),
])
def test_instruct_row_is_generate_chat_prompt_then_trained_answer(smollm_tokenizer, tmp_path, row, user):
    tok = smollm_tokenizer
    data = instruct_examples(jsonl(tmp_path / "d.jsonl", [row]), tok, max_len=512)
    (ex,) = data
    answer = row.get("output", row.get("completion"))
    # the prompt is exactly what `lmforge generate --chat "<user>"` feeds the model (template's system prompt too)
    assert untrained_prefix(ex) == encode_prompt(tok, user, chat=True)
    assert "You are a helpful AI assistant" in tok.decode(untrained_prefix(ex), skip_special_tokens=False)
    # one trained run, at the end: the answer and the end-of-turn token, and then nothing (no trailing newline)
    (run,) = spans(ex)
    assert tok.decode(run, skip_special_tokens=False) == answer + "<|im_end|>"
    assert ex.tokens[-1] == tok.token_id("<|im_end|>") and ex.tokens[-len(run):] == run
    whole = tok.apply_chat_template([{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
                                    add_generation_prompt=False)
    assert ex.tokens == tok.encode(whole.removesuffix("\n"), add_special_tokens=False)
    assert data.boundary_mismatch == 0 and data.notes() == []


def test_instruct_batch_targets_are_the_next_tokens_of_the_answer(smollm_tokenizer, tmp_path):
    tok = smollm_tokenizer
    rows = [{"instruction": "Count to three.", "output": "One, two, three."}, {"prompt": "Hi", "completion": "Hey"}]
    examples = instruct_examples(jsonl(tmp_path / "d.jsonl", rows), tok, max_len=512)
    batch = collate(list(examples), pad_id_for(tok))
    for r, ex in enumerate(examples):
        n = len(ex.tokens) - 1
        assert batch["tokens"][r, :n].tolist() == ex.tokens[:-1]  # input: the row less its last token
        assert batch["labels"][r, :n].tolist() == ex.labels[1:]  # target at t: the token at t + 1 (or -100)
        assert (batch["labels"][r, n:] == IGNORE).all() and batch["attention_mask"][r].sum() == n
    trained = batch["labels"][0][batch["labels"][0] != IGNORE].tolist()
    assert tok.decode(trained, skip_special_tokens=False) == "One, two, three.<|im_end|>"


def test_instruct_plain_format_without_a_template(byte_tok, tmp_path):
    rows = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
            {"instruction": "Say yes.", "output": "yes"}]
    a, b = instruct_examples(jsonl(tmp_path / "d.jsonl", rows), byte_tok, max_len=256)
    assert byte_tok.decode(untrained_prefix(a), skip_special_tokens=False) == (
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n")
    assert byte_tok.decode(untrained_prefix(b), skip_special_tokens=False) == plain_prompt("Say yes.")
    assert untrained_prefix(b) == encode_prompt(byte_tok, plain_prompt("Say yes."))  # generate without --chat
    assert [byte_tok.decode(r, skip_special_tokens=False) for r in spans(a)] == ["5" + EOT]
    assert b.tokens[-1] == byte_tok.eos_id


def test_instruct_template_without_end_of_turn_token_learns_eos(tiny_chat_tok, tmp_path):
    """tests/tiny.py's template closes a turn with a newline only: the model must still learn to stop (eos)."""
    (ex,) = instruct_examples(jsonl(tmp_path / "d.jsonl", [{"instruction": "Hi?", "output": "Hello."}]),
                              tiny_chat_tok, max_len=256)
    assert untrained_prefix(ex) == encode_prompt(tiny_chat_tok, "Hi?", chat=True)
    assert tiny_chat_tok.decode(untrained_prefix(ex), skip_special_tokens=False) == f"{EOT}user: Hi?\n{EOT}assistant: "
    assert [tiny_chat_tok.decode(r, skip_special_tokens=False) for r in spans(ex)] == ["Hello.\n" + EOT]


def test_instruct_system_prompt_as_generate_system(smollm_tokenizer, tmp_path):
    tok = smollm_tokenizer
    (ex,) = instruct_examples(jsonl(tmp_path / "d.jsonl", [{"instruction": "Hi", "output": "Yo"}]), tok, 512,
                              system="Be brief.")
    assert untrained_prefix(ex) == encode_prompt(tok, "Hi", chat=True, system="Be brief.")


# ---- dialog tuning ------------------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "You answer about SYSTEMWORD."},
    {"role": "user", "content": "What is USERONE?"},
    {"role": "assistant", "content": "It is the first answer."},
    {"role": "user", "content": "And USERTWO?"},
    {"role": "assistant", "content": "Second answer, longer,\nwith a newline."},
]


def test_chat_loss_only_on_assistant_turns(smollm_tokenizer, tmp_path):
    tok = smollm_tokenizer
    rows = [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}]
    data = chat_examples(jsonl(tmp_path / "c.jsonl", rows), tok, max_len=1024)
    full, short = data
    texts = [tok.decode(r, skip_special_tokens=False) for r in spans(full)]
    assert texts == ["It is the first answer.<|im_end|>", "Second answer, longer,\nwith a newline.<|im_end|>"]
    for word in ("SYSTEMWORD", "USERONE", "USERTWO", "user", "system"):
        assert all(word not in t for t in texts)
    # the row is the whole conversation as the template renders it, tokenised as one text (minus the last newline)
    whole = tok.apply_chat_template(CONVERSATION, add_generation_prompt=False)
    assert full.tokens == tok.encode(whole.removesuffix("\n"), add_special_tokens=False)
    assert data.boundary_mismatch == 0
    # no system message: the template's default one, never trained
    assert tok.decode(untrained_prefix(short), skip_special_tokens=False).startswith("<|im_start|>system\nYou are")
    assert [tok.decode(r, skip_special_tokens=False) for r in spans(short)] == ["It is the first answer.<|im_end|>"]


def test_chat_each_turn_prompt_is_what_generation_sees(smollm_tokenizer, tmp_path):
    """Before each assistant turn, the row holds exactly the ids `lmforge chat` feeds the model for it."""
    tok = smollm_tokenizer
    (ex,) = chat_examples(jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}]), tok, max_len=1024)
    starts = [i for i, lab in enumerate(ex.labels) if lab != IGNORE and ex.labels[i - 1] == IGNORE]
    for start, turn in zip(starts, (2, 4), strict=True):
        prompt = tok.encode(tok.apply_chat_template(CONVERSATION[:turn]), add_special_tokens=False)
        assert ex.tokens[:start] == prompt


TURN_START_EOS = CHAT_TEMPLATE  # tests/tiny.py: every turn starts with eos, none ends with a special token
NO_SPECIALS = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
               "{% if add_generation_prompt %}assistant: {% endif %}")


@pytest.mark.parametrize("template", [TURN_START_EOS, NO_SPECIALS])
def test_chat_template_without_end_of_turn_token_learns_eos_once_per_turn(byte_tok, template, tmp_path):
    tok = Tokenizer(byte_tok.backend, template, eos_token=EOT)
    messages = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    (ex,) = chat_examples(jsonl(tmp_path / "c.jsonl", [{"messages": messages}]), tok, max_len=256)
    assert [tok.decode(r, skip_special_tokens=False) for r in spans(ex)] == ["a1\n" + EOT, "a2\n" + EOT]
    whole = tok.apply_chat_template(messages, add_generation_prompt=False)
    if template == TURN_START_EOS:  # the eos that starts turn 3 is the one trained after a1: not doubled
        assert tok.decode(ex.tokens, skip_special_tokens=False) == whole + EOT
    else:
        assert tok.decode(ex.tokens, skip_special_tokens=False) == "user: q1\nassistant: a1\n" + EOT + (
            "user: q2\nassistant: a2\n" + EOT)


def test_chat_needs_a_template(byte_tok, tmp_path):
    with pytest.raises(LmforgeError, match="chat template"):
        chat_examples(jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}]), byte_tok, 256)


# ---- bad rows -----------------------------------------------------------------------------------------------

GOOD_INSTRUCT = {"instruction": "a", "output": "b"}
GOOD_CHAT = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}


@pytest.mark.parametrize("task, rows, message", [
    ("instruct", [GOOD_INSTRUCT, "{not json"], r"line 2: not valid JSON"),
    ("instruct", [GOOD_INSTRUCT, GOOD_INSTRUCT, {"instruction": "x"}], r"line 3: missing field 'output'"),
    ("instruct", [{"instruction": "x", "output": 3}], r"line 1: 'output' must be a string, not a number"),
    ("instruct", [{"instruction": "x", "input": ["y"], "output": "z"}], r"line 1: 'input' must be a string"),
    ("instruct", [{"prompt": "x", "completion": ""}], r"line 1: 'completion' is empty"),
    ("instruct", [GOOD_INSTRUCT, "[1, 2]"], r"line 2: expected a JSON object, got a list"),
    ("instruct", [], r"no rows"),
    ("chat", [GOOD_CHAT, {"messages": [{"role": "bot", "content": "x"}]}], r"line 2: message 1 has role 'bot'"),
    ("chat", [{"messages": [{"role": "user", "content": "x"}]}], r"line 1: no assistant message"),
    ("chat", [{"messages": "hello"}], r"line 1: 'messages' must be a non-empty list, not a string"),
    ("chat", [{"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}],
     r"line 1: message 1: missing field 'content'"),
    ("chat", [{"messages": [GOOD_CHAT["messages"][0], {"role": "system", "content": "s"}]}],
     r"line 1: message 2 is a system message"),
    ("chat", [{"text": "x"}], r"line 1: missing field 'messages'"),
    ("chat", [{"messages": GOOD_CHAT["messages"][::-1]}], r"line 1: message 1 is an assistant message before any"),
    ("classify", [{"text": "x", "label": "a"}, {"text": "y", "label": 1}], r"line 2: label 1 is a number"),
    ("classify", [{"text": "x", "label": True}], r"line 1: 'label' must be a string or an integer"),
    ("classify", [{"text": "x"}], r"line 1: missing field 'label'"),
    ("seq2seq", [{"source": "x", "target": None}], r"line 1: 'target' is null"),
])
def test_bad_rows_name_their_line(tiny_chat_tok, tmp_path, task, rows, message):
    path = jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(LmforgeError, match=message) as e:
        load_task(task, path, tiny_chat_tok, max_len=64)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_blank_lines_skipped_and_line_numbers_count_them(tiny_chat_tok, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(GOOD_INSTRUCT) + "\n\n  \n" + json.dumps(GOOD_INSTRUCT) + "\n")
    assert [ex.line for ex in instruct_examples(path, tiny_chat_tok, 64)] == [1, 4]
    path.write_bytes(b'{"instruction": "a", "output": "\xff"}\n')
    with pytest.raises(LmforgeError, match="line 1 is not valid UTF-8"):
        instruct_examples(path, tiny_chat_tok, 64)
    with pytest.raises(LmforgeError, match="no such file"):
        instruct_examples(tmp_path / "missing.jsonl", tiny_chat_tok, 64)


# ---- truncation ---------------------------------------------------------------------------------------------


def test_long_rows_truncated_and_counted_fully_cut_dropped(byte_tok, tmp_path):
    prompt_len = len(encode_prompt(byte_tok, plain_prompt("q")))  # 35 byte tokens
    rows = [
        {"instruction": "q", "output": "short"},  # fits
        {"instruction": "q", "output": "x" * 100},  # the answer is cut: trained on its start
        {"instruction": "q" * 100, "output": "y"},  # the whole answer is cut off: dropped
        {"instruction": "q", "output": "z" * 80},
    ]
    max_len = prompt_len + 20
    data = instruct_examples(jsonl(tmp_path / "d.jsonl", rows), byte_tok, max_len=max_len)
    assert [ex.line for ex in data] == [1, 2, 4]
    assert (data.truncated, data.dropped) == (2, 1)
    assert all(len(ex.tokens) <= max_len for ex in data)
    assert byte_tok.decode(spans(data[1])[0]) == "x" * 20  # no eos: the answer did not end there
    assert data.notes() == [f"2 rows truncated to {max_len} tokens",
                            f"1 row dropped: the response starts after {max_len} tokens"]
    with pytest.raises(LmforgeError, match="no row left"):
        instruct_examples(jsonl(tmp_path / "e.jsonl", rows[2:3]), byte_tok, max_len=max_len)


# ---- batching -----------------------------------------------------------------------------------------------


def mixed_rows(n: int, seed: int = 0) -> list[Example]:
    """Row i: first token i (so a batch row names its example), lengths 2..300, half of each row trained."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        length = rng.choice([rng.randint(2, 20), rng.randint(20, 300)])
        tokens = [i] + [rng.randint(0, 99) for _ in range(length - 1)]
        labels = [IGNORE] * (length // 2) + tokens[length // 2:]
        rows.append(Example(tokens, labels, line=i + 1))
    return rows


def test_global_batch_pure_function_of_step(tmp_path):
    rows = mixed_rows(203)
    a, b = SFTData(rows, [], 8, seed=3, pad_id=0), SFTData(rows, [], 8, seed=3, pad_id=0)
    for step in (0, 5, 25, 26, 60, 7):  # any order, across epochs (203 rows = 25.4 steps per epoch)
        x, y = a.global_batch(step), b.global_batch(step)
        assert x.keys() == y.keys() == {"tokens", "attention_mask", "labels"}
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert a.rows(3) != SFTData(rows, [], 8, seed=4, pad_id=0).rows(3)  # the seed matters


def test_batches_padded_right_with_mask_and_ignored_labels():
    rows = mixed_rows(40)
    data = SFTData(rows, [], 4, seed=0, pad_id=99)
    for step in range(10):
        batch = data.global_batch(step)
        for r, i in enumerate(data.rows(step)):
            n = len(rows[i].tokens) - 1
            mask = batch["attention_mask"][r]
            assert mask[:n].all() and not mask[n:].any()  # 1s then 0s: right padding
            assert batch["tokens"][r, :n].tolist() == rows[i].tokens[:-1]
            assert (batch["tokens"][r, n:] == 99).all() and (batch["labels"][r, n:] == IGNORE).all()


@pytest.mark.parametrize("n, batch_size", [(240, 8), (203, 8), (5, 8)])
def test_every_row_once_per_epoch(n, batch_size):
    data = SFTData(mixed_rows(n), [], batch_size, seed=1, pad_id=0)
    steps = -(-3 * n // batch_size) + 1
    seen = [i for s in range(steps) for i in data.rows(s)]
    for epoch in range(3):
        assert sorted(seen[epoch * n:(epoch + 1) * n]) == list(range(n))
    first_rows = [int(t) for s in range(-(-n // batch_size)) for t in data.global_batch(s)["tokens"][:, 0]]
    assert sorted(first_rows[:n]) == list(range(n))  # the tensors hold those rows


def test_similar_lengths_batched_together():
    rows = mixed_rows(1000)
    grouped = SFTData(rows, [], 8, seed=0, pad_id=0, group_batches=10)  # windows of 80 rows, several per epoch
    steps = 1000 // 8

    def padding(batches: list[dict[str, torch.Tensor]]) -> int:
        return sum(int((b["attention_mask"] == 0).sum()) for b in batches)

    order = random.Random(0).sample(range(1000), 1000)
    shuffled = padding([collate([rows[i] for i in order[s * 8:(s + 1) * 8]], 0) for s in range(steps)])
    real = sum(len(r.tokens) - 1 for r in rows)
    assert shuffled > real  # random batches of these rows are mostly padding
    assert padding([grouped.global_batch(s) for s in range(steps)]) < shuffled / 10
    assert padding_fraction(grouped.global_batch(0)) < 0.5
    # and the batch order is shuffled, not sorted from short to long
    means = [sum(len(rows[i].tokens) for i in grouped.rows(s)) for s in range(steps)]
    assert means != sorted(means) and means != sorted(means, reverse=True)


def test_val_batches_fixed_in_order_and_tokens_per_row():
    rows = mixed_rows(30)
    data = SFTData(rows[:20], rows[20:], 4, seed=0, pad_id=0)
    batches = data.val_batches()
    assert [b["tokens"].shape[0] for b in batches] == [4, 4, 2]
    assert [int(t) for b in batches for t in b["tokens"][:, 0]] == list(range(20, 30))
    assert data.val_batches() is batches
    assert data.tokens_per_row == round(sum(len(r.tokens) - 1 for r in rows[:20]) / 20)


def test_split_deterministic_disjoint_and_complete():
    rows = mixed_rows(50)
    train, val = split(rows, 0.1, seed=7)
    assert (len(train), len(val)) == (45, 5)
    assert split(rows, 0.1, seed=7) == (train, val) and split(rows, 0.1, seed=8)[1] != val
    assert sorted(r.line for r in train + val) == list(range(1, 51))
    assert [r.line for r in val] == sorted(r.line for r in val)  # validation keeps file order
    assert split(rows, 0.0, seed=0) == (rows, [])
    with pytest.raises(LmforgeError):
        split(rows[:1], 0.1, 0)


def test_pad_id_falls_back_to_eos_then_zero(byte_tok, t5_tok):
    assert pad_id_for(t5_tok) == 0 and pad_id_for(byte_tok) == byte_tok.eos_id == 256


# ---- classification and seq2seq -----------------------------------------------------------------------------


def test_classify_labels_sorted_and_unseen_label_names_the_line(t5_tok, tmp_path):
    rows = [{"text": "the cat sat", "label": "pos"}, {"text": "a dog ran", "label": "neg"},
            {"text": "the mat", "label": "pos"}]
    data = classify_examples(jsonl(tmp_path / "t.jsonl", rows), t5_tok, max_len=16)
    assert data.labels == ["neg", "pos"] and [ex.label for ex in data] == [1, 0, 1]
    assert data[0].tokens == t5_tok.encode("the cat sat")  # special tokens as the tokenizer adds them (</s>)
    batch = collate(list(data), 0)
    assert batch["labels"].tolist() == [1, 0, 1] and batch["labels"].shape == (3,)
    assert batch["attention_mask"].sum(1).tolist() == [4, 4, 3]
    val = [{"text": "the dog", "label": "neg"}, {"text": "a cat", "label": "meh"}]
    with pytest.raises(LmforgeError, match=r"v.jsonl line 2: label 'meh' is not among the training labels"):
        classify_examples(jsonl(tmp_path / "v.jsonl", val), t5_tok, 16, labels=data.labels)
    ok = classify_examples(jsonl(tmp_path / "v2.jsonl", val[:1]), t5_tok, 16, labels=data.labels)
    assert [ex.label for ex in ok] == [0]


def test_classify_int_labels_sort_as_numbers_and_truncation_keeps_eos(t5_tok, tmp_path):
    rows = [{"text": "the cat sat on a mat", "label": 10}, {"text": "a dog", "label": 2}]
    data = classify_examples(jsonl(tmp_path / "t.jsonl", rows), t5_tok, max_len=4)
    assert data.labels == [2, 10] and [ex.label for ex in data] == [1, 0]
    assert data[0].tokens[-1] == 1 and len(data[0].tokens) == 4 and data.truncated == 1


def test_label_words_are_instruct_rows(smollm_tokenizer, tmp_path):
    tok = smollm_tokenizer
    rows = [{"text": "I loved it", "label": "positive"}, {"text": "Awful", "label": "negative"}]
    data = label_word_examples(jsonl(tmp_path / "t.jsonl", rows), tok, 256)
    assert data.labels == ["negative", "positive"]
    assert untrained_prefix(data[0]) == encode_prompt(tok, "I loved it", chat=True)
    assert [tok.decode(spans(ex)[0], skip_special_tokens=False) for ex in data] == [
        "positive<|im_end|>", "negative<|im_end|>"]


def test_seq2seq_shapes_and_decoder_shift(t5_tok, tmp_path):
    rows = [{"source": "the cat sat on the mat", "target": "le chat est assis"},
            {"source": "a dog", "target": "un"}]
    data = seq2seq_examples(jsonl(tmp_path / "s.jsonl", rows), t5_tok, max_len=32)
    ex = data[0]
    assert ex.tokens == t5_tok.encode("the cat sat on the mat") and ex.tokens[-1] == 1  # </s> on the encoder side
    assert ex.labels == t5_tok.encode("le chat est assis") and ex.labels[-1] == 1
    assert ex.decoder_tokens == [0, *ex.labels[:-1]]  # decoder start (pad) + target shifted right
    batch = collate(list(data), pad_id_for(t5_tok))
    assert batch["tokens"].shape == batch["attention_mask"].shape == (2, 7)
    assert batch["decoder_tokens"].shape == batch["labels"].shape == (2, 5)
    assert batch["labels"][1].tolist() == [t5_tok.token_id("un"), 1, IGNORE, IGNORE, IGNORE]
    assert batch["decoder_tokens"][1].tolist() == [0, t5_tok.token_id("un"), 0, 0, 0]
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0, 0]
    sft = SFTData(list(data), [], 2, seed=0, pad_id=0)
    assert sft.global_batch(0).keys() == batch.keys() and sft.tokens_per_row == round((7 + 5 + 3 + 2) / 2)


# ---- domain tuning ------------------------------------------------------------------------------------------


def test_domain_blocks_cover_the_documents_once(byte_tok, tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("First document, about tax law." * 3)
    (folder / "sub" / "b.md").write_text("# Second\n\nMarkdown text.")
    (folder / "empty.txt").write_text("  \n")
    data = domain_examples(folder, byte_tok, max_len=16)
    assert all(len(ex.tokens) <= 16 and ex.labels == ex.tokens for ex in data)  # every token trained
    stream = data[0].tokens + [t for ex in data[1:] for t in ex.tokens[1:]]  # consecutive blocks share one token
    expected = "First document, about tax law." * 3 + EOT + "# Second\n\nMarkdown text." + EOT
    assert byte_tok.decode(stream, skip_special_tokens=False) == expected
    assert all(a.tokens[-1] == b.tokens[0] for a, b in zip(data.examples, data.examples[1:], strict=False))
    (folder / "x.jsonl").write_text("{}\n")
    with pytest.raises(LmforgeError, match=r"x.jsonl: domain tuning reads .txt and .md"):
        domain_examples(folder, byte_tok, max_len=16)


def test_unknown_task(byte_tok, tmp_path):
    with pytest.raises(LmforgeError, match="unknown task 'rlhf'"):
        load_task("rlhf", jsonl(tmp_path / "d.jsonl", [GOOD_INSTRUCT]), byte_tok, 64)
