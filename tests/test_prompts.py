"""Prompt templates, example pools, shot selection, rendering (chat and plain), overflow and majority vote, with
the real SmolLM2 tokenizer, the real MiniLM encoder, and the tiny byte tokenizer (one token per byte, no chat
template) where exact token counts matter."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

import lmforge.embeddings
from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.generate import encode_prompt
from lmforge.prompts import (
    DEFAULT_TEMPLATE,
    Example,
    Pool,
    PromptTemplate,
    build_prompt,
    load_template,
    load_tokenizer,
    majority_vote,
    read_pool,
    select_shots,
)
from lmforge.tokenizer import Tokenizer

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    return load_tokenizer("smollm2-135m-instruct")[0]


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory, byte_tokenizer_writer) -> Tokenizer:
    folder = tmp_path_factory.mktemp("byte_tok")
    byte_tokenizer_writer(folder)
    return Tokenizer.from_dir(folder)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path: Path, rows: list[object]) -> Path:
    return write(path, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


# ---- templates ----------------------------------------------------------------------------------------------

TRANSLATE = """\
{% block system %}You translate.{% endblock %}
{% block instruction %}
Translate {{ lang }} into French.
{% endblock %}
{% block example %}
{{ lang }}: {{ input }}
French: {{ output }}
{% endblock %}
{% block input %}
{% if chat %}{{ input }}{% else %}{{ lang }}: {{ input }}
French:{% endif %}
{% endblock %}
"""


def test_template_blocks_render_inline_for_a_plain_tokenizer(byte_tok) -> None:
    shots = [Example("cat", "chat"), Example("dog", "chien")]
    prompt = build_prompt(PromptTemplate(TRANSLATE), {"lang": "English", "input": "bread"}, shots, byte_tok)
    expected = ("You translate.\n\nTranslate English into French.\n\nEnglish: cat\nFrench: chat\n\n"
                "English: dog\nFrench: chien\n\nEnglish: bread\nFrench:")
    assert prompt.text == expected
    assert prompt.ids == list(expected.encode())  # the byte tokenizer: one id per byte, no special tokens
    assert prompt.chat is False and prompt.messages is None
    assert prompt.shots_used == shots and prompt.dropped == 0


def test_a_template_file_and_the_blocks_it_leaves_out(tmp_path, byte_tok) -> None:
    path = write(tmp_path / "t.jinja", "{% block instruction %}Answer briefly.{% endblock %}\n")
    template = load_template(path)
    assert template.name == str(path)
    assert load_template(None) is DEFAULT_TEMPLATE and load_template(template) is template
    shots = [Example("1+1", "2")]
    prompt = build_prompt(path, {"input": "2+2"}, shots, byte_tok)  # example and input: the default's
    assert prompt.text == "Answer briefly.\n\nInput: 1+1\nOutput: 2\n\nInput: 2+2\nOutput:"
    # the default template takes system and instruction from variables of those names
    prompt = build_prompt(None, {"system": "Be exact.", "instruction": "Add.", "input": "2+2"}, [], byte_tok)
    assert prompt.text == "Be exact.\n\nAdd.\n\n2+2"


def test_an_unset_variable_is_an_error_naming_it(byte_tok) -> None:
    template = PromptTemplate("{% block instruction %}Write about {{ topic }}.{% endblock %}", "mine.jinja")
    with pytest.raises(LmforgeError) as e:
        build_prompt(template, {"input": "x"}, [], byte_tok)
    assert str(e.value) == "template mine.jinja, block instruction: variable 'topic' is not set"
    with pytest.raises(LmforgeError) as e:
        build_prompt(None, {"topic": "x"}, [], byte_tok)
    assert str(e.value) == "template default, block input: variable 'input' is not set"


def test_bad_templates_and_variables(tmp_path, byte_tok) -> None:
    with pytest.raises(LmforgeError, match=r"^template t line 2: unexpected '}'$"):
        PromptTemplate("{% block input %}\n{{ input }\n{% endblock %}", "t")
    with pytest.raises(LmforgeError, match=r"^template t: unknown block 'exmaple' \(blocks: system, instruction, "
                                           r"example, input\)$"):
        PromptTemplate("{% block exmaple %}{% endblock %}", "t")
    with pytest.raises(LmforgeError, match="no such file"):
        load_template(tmp_path / "missing.jinja")
    with pytest.raises(LmforgeError, match=r"^template variable 'chat' is reserved"):
        build_prompt(None, {"input": "x", "chat": True}, [], byte_tok)
    with pytest.raises(LmforgeError, match="must be an object"):
        build_prompt(None, ["x"], [], byte_tok)  # type: ignore[arg-type]
    bad = PromptTemplate("{% block input %}{{ input + 1 }}{% endblock %}", "t")
    with pytest.raises(LmforgeError, match=r"^template t, block input: TypeError: "):
        build_prompt(bad, {"input": "x"}, [], byte_tok)


# ---- pools --------------------------------------------------------------------------------------------------


def test_each_pool_row_spelling(tmp_path) -> None:
    path = jsonl(tmp_path / "pool.jsonl", [
        {"input": "2+2", "target": "4", "id": 7},
        "",
        {"instruction": "Add.", "input": "1+2", "output": "3"},
        {"instruction": "Name a colour.", "output": "red"},
        {"instruction": "Name a colour.", "input": "", "output": "blue"},
        {"prompt": "Capital of France?", "completion": "Paris"},
    ])
    pool = read_pool(path)
    assert isinstance(pool, Pool) and pool.source == str(path)
    assert list(pool) == [Example("2+2", "4"), Example("Add.\n\n1+2", "3"), Example("Name a colour.", "red"),
                          Example("Name a colour.", "blue"), Example("Capital of France?", "Paris")]
    assert [e.line for e in pool] == [1, 3, 4, 5, 6]  # the blank line 2 is skipped, not renumbered


@pytest.mark.parametrize(("row", "message"), [
    ('{"input": "x"}', "line 2: no answer field: expected {input, target}, {instruction, input, output} or "
                       "{prompt, completion}, got {input}"),
    ('{"input": "x", "target": "y", "output": "z"}', "line 2: ambiguous row: it has both 'target' and 'output'"),
    ('{"target": "y"}', "line 2: missing field 'input'"),
    ('{"input": 3, "target": "y"}', "line 2: 'input' must be a string, not a number"),
    ('{"prompt": "x", "completion": " "}', "line 2: 'completion' is empty"),
    ('{"output": "y"}', "line 2: an 'output' row needs a non-empty 'instruction' or 'input'"),
    ('{"input": "x", "target": null}', "line 2: 'target' is null"),
    ('{"input": "x", ', "line 2: not valid JSON"),
    ('["x", "y"]', "line 2: expected a JSON object, got a list"),
])
def test_a_bad_pool_row_names_file_and_line(tmp_path, row, message) -> None:
    path = jsonl(tmp_path / "pool.jsonl", [{"input": "a", "target": "b"}, row])
    with pytest.raises(LmforgeError) as e:
        read_pool(path)
    assert str(e.value).startswith(f"{path} {message}")


def test_an_empty_or_missing_pool(tmp_path) -> None:
    with pytest.raises(LmforgeError, match="no rows"):
        read_pool(write(tmp_path / "empty.jsonl", "\n\n"))
    with pytest.raises(LmforgeError, match="no such file"):
        read_pool(tmp_path / "missing.jsonl")


# ---- shot selection -----------------------------------------------------------------------------------------

POOL = Pool(Example(q, a) for q, a in [
    ("What is the capital of France?", "Paris"),
    ("How many legs does a spider have?", "8"),
    ("Which planet is closest to the sun?", "Mercury"),
    ("What is the capital of Japan?", "Tokyo"),
    ("How many legs does an insect have?", "6"),
    ("Which planet is the largest in the solar system?", "Jupiter"),
])


def outputs(shots: list[Example]) -> list[str]:
    return [s.output for s in shots]


def test_first_shots_skip_the_query_itself() -> None:
    assert outputs(select_shots(POOL, "unrelated", 3)) == ["Paris", "8", "Mercury"]
    assert outputs(select_shots(POOL, QUESTION, 3, "first")) == ["8", "Mercury", "Tokyo"]
    assert outputs(select_shots(POOL, Example(QUESTION, "?"), 1)) == ["8"]
    assert select_shots(POOL, "unrelated", 0) == []


def test_random_shots_are_seeded() -> None:
    pool = Pool(Example(f"q{i}", f"a{i}") for i in range(20))
    first = select_shots(pool, "q3", 5, "random", seed=1)
    assert first == select_shots(pool, "q3", 5, "random", seed=1)
    assert first != select_shots(pool, "q3", 5, "random", seed=2)
    assert len(set(first)) == 5 and Example("q3", "a3") not in first
    # the draw is random.Random(seed).sample over the pool minus the query, in draw order
    import random

    rest = [e for e in pool if e.input != "q3"]
    assert first == random.Random(1).sample(rest, 5)


def test_similar_shots_are_the_semantic_neighbours_most_similar_first(monkeypatch) -> None:
    pool = Pool(POOL)
    calls = []
    real_embed = lmforge.embeddings.embed

    def counting_embed(texts, *args, **kwargs):
        calls.append(len(texts))
        return real_embed(texts, *args, **kwargs)

    monkeypatch.setattr(lmforge.embeddings, "embed", counting_embed)
    assert outputs(select_shots(pool, "What is the capital city of Italy?", 2, "similar")) == ["Paris", "Tokyo"]
    assert outputs(select_shots(pool, "Which planet is farthest from the sun?", 2, "similar")) == [
        "Mercury", "Jupiter"]
    assert outputs(select_shots(pool, "How many legs does a dog have?", 2, "similar")) == ["6", "8"]
    assert calls == [6, 1, 1, 1]  # the pool is embedded once, each query once
    # its own row is never a shot: the next capital question comes first, then the rest by similarity
    assert outputs(select_shots(pool, QUESTION, 2, "similar")) == ["Tokyo", "Mercury"]


def test_more_shots_than_the_pool_holds() -> None:
    with pytest.raises(LmforgeError, match=r"^asked for 7 shots but the pool holds only 6 examples$"):
        select_shots(POOL, "unrelated", 7)
    with pytest.raises(LmforgeError, match=r"^asked for 6 shots but the pool holds only 5 examples besides the "
                                           r"query \(6 with it\)$"):
        select_shots(POOL, QUESTION, 6, "random", seed=0)
    with pytest.raises(LmforgeError, match="unknown shot selection 'best'"):
        select_shots(POOL, "x", 1, "best")  # type: ignore[arg-type]
    with pytest.raises(LmforgeError, match=">= 0"):
        select_shots(POOL, "x", -1)


# ---- rendering ----------------------------------------------------------------------------------------------


def test_load_tokenizer_reads_only_the_gguf_metadata(smol, smollm_tokenizer) -> None:
    tokenizer, context = load_tokenizer()
    assert context == 8192
    assert tokenizer.chat_template == smollm_tokenizer.chat_template == smol.chat_template
    assert tokenizer.encode("Hello, world! 123") == smollm_tokenizer.encode("Hello, world! 123")
    with pytest.raises(LmforgeError, match="encoder-only"):
        load_tokenizer("minilm-l6")


def test_zero_shot_chat_renders_as_generate_chat(smol) -> None:
    prompt = build_prompt(None, {"input": QUESTION}, [], smol)
    assert prompt.chat is True
    assert prompt.ids == encode_prompt(smol, QUESTION, chat=True)
    assert prompt.text == smol.apply_chat_template([{"role": "user", "content": QUESTION}])
    assert prompt.messages == [{"role": "user", "content": QUESTION}]
    with_system = build_prompt(None, {"input": QUESTION, "system": "Be brief."}, [], smol)
    assert with_system.ids == encode_prompt(smol, QUESTION, chat=True, system="Be brief.")
    # chat=False renders as plain `lmforge generate`
    plain = build_prompt(None, {"input": QUESTION}, [], smol, chat=False)
    assert plain.text == QUESTION and plain.ids == encode_prompt(smol, QUESTION)


def test_shots_become_prior_chat_turns(smol) -> None:
    shots = [Example("What is the capital of Japan?", "Tokyo"), Example("What is the capital of Peru?", "Lima")]
    prompt = build_prompt(None, {"instruction": "Answer with one word.", "system": "Be exact.", "input": QUESTION},
                          shots, smol)
    assert prompt.messages == [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "Answer with one word.\n\nWhat is the capital of Japan?"},
        {"role": "assistant", "content": "Tokyo"},
        {"role": "user", "content": "What is the capital of Peru?"},
        {"role": "assistant", "content": "Lima"},
        {"role": "user", "content": QUESTION},
    ]
    assert prompt.text == smol.apply_chat_template(prompt.messages, add_generation_prompt=True)
    assert prompt.text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.ids == smol.encode(prompt.text, add_special_tokens=False)
    # a shot's user turn is the input block with the shot's input
    template = PromptTemplate("{% block input %}Q: {{ input }}{% endblock %}")
    prompt = build_prompt(template, {"input": QUESTION}, shots[:1], smol)
    assert [m["content"] for m in prompt.messages or []][-3:] == ["Q: What is the capital of Japan?", "Tokyo",
                                                                 f"Q: {QUESTION}"]


def test_chat_needs_a_chat_template(byte_tok) -> None:
    with pytest.raises(LmforgeError, match="no chat template"):
        build_prompt(None, {"input": "x"}, [], byte_tok, chat=True)
    assert build_prompt(None, {"input": "x"}, [], byte_tok).chat is False  # None: chat only with a template


def test_overflow_drops_the_last_shots_with_a_warning(byte_tok) -> None:
    shots = [Example(f"q{i}", f"a{i}") for i in range(4)]  # each inline shot: "Input: qN\nOutput: aN" + "\n\n"
    full = build_prompt(None, {"input": "x"}, shots, byte_tok)
    assert len(full.ids) == 4 * 22 + len("Input: x\nOutput:")
    two = len(full.ids) - 2 * 22
    with pytest.warns(UserWarning, match=r"^dropped 2 of 4 shots to fit the prompt in 60 tokens$"):
        prompt = build_prompt(None, {"input": "x"}, shots, byte_tok, max_tokens=two)
    assert two == 60 and len(prompt.ids) == 60
    assert prompt.shots_used == shots[:2] and prompt.dropped == 2
    with pytest.warns(UserWarning, match=r"^dropped 3 of 4 shots"):  # one token short of two shots: one shot left
        assert build_prompt(None, {"input": "x"}, shots, byte_tok, max_tokens=two - 1).shots_used == shots[:1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an exact fit drops nothing and warns about nothing
        exact = build_prompt(None, {"input": "x"}, shots, byte_tok, max_tokens=len(full.ids))
    assert exact.dropped == 0 and exact.text == full.text
    with pytest.warns(UserWarning, match="dropped 4 of 4 shots"):
        none = build_prompt(None, {"input": "x"}, shots, byte_tok, max_tokens=1)
    assert none.text == "x" and none.shots_used == [] and none.dropped == 4
    with pytest.raises(LmforgeError, match=r"^context overflow: the prompt has 5 tokens even with no shots, over "
                                           r"the limit of 4$"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_prompt(None, {"input": "hello"}, shots, byte_tok, max_tokens=4)
    with pytest.raises(LmforgeError, match=r"^context overflow: the prompt has 5 tokens, over the limit of 4$"):
        build_prompt(None, {"input": "hello"}, [], byte_tok, max_tokens=4)


def test_chat_overflow_drops_whole_turns(smol) -> None:
    shots = [Example("What is the capital of Japan?", "Tokyo"), Example("What is the capital of Peru?", "Lima")]
    one = build_prompt(None, {"input": QUESTION}, shots[:1], smol)
    with pytest.warns(UserWarning, match="dropped 1 of 2 shots"):
        prompt = build_prompt(None, {"input": QUESTION}, shots, smol, max_tokens=len(one.ids))
    assert prompt.ids == one.ids and prompt.messages == one.messages and prompt.dropped == 1


# ---- self-consistency ---------------------------------------------------------------------------------------


def test_majority_vote() -> None:
    assert majority_vote(["Paris", " paris.", "Lyon", "PARIS!"]) == ("paris", 0.75)
    assert majority_vote(["b", "a", "a", "b", "c"]) == ("b", 0.4)  # a tie goes to the first seen
    assert majority_vote(["Paris", "paris"], normalize=None) == ("Paris", 0.5)
    assert majority_vote(["42 ", "x"], normalize=str.strip) == ("42", 0.5)
    with pytest.raises(LmforgeError, match="no answers"):
        majority_vote([])


# ---- the command --------------------------------------------------------------------------------------------


def run(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["prompt", "render", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, message: str) -> None:
    assert rc == 2
    assert err.splitlines() == [f"error: {message}"]


def test_cli_renders_the_default_chat_model(capsys, smol) -> None:
    rc, out, err = run(capsys, "--vars", json.dumps({"input": QUESTION}))
    assert rc == 0
    assert out == smol.apply_chat_template([{"role": "user", "content": QUESTION}])
    assert err == f"{len(encode_prompt(smol, QUESTION, chat=True))} tokens (chat, 0 shots)\n"
    rc, out, err = run(capsys, "--vars", json.dumps({"input": QUESTION}), "--no-chat")
    assert rc == 0 and out == QUESTION
    assert err == f"{len(smol.encode(QUESTION))} tokens (plain, 0 shots)\n"


def test_cli_template_vars_file_and_pool(tmp_path, capsys, smol) -> None:
    template = write(tmp_path / "t.jinja", TRANSLATE)
    variables = write(tmp_path / "vars.json", json.dumps({"lang": "English", "input": "bread"}))
    pool = jsonl(tmp_path / "pool.jsonl", [{"input": "cat", "target": "chat"}, {"input": "bread", "target": "pain"},
                                           {"input": "dog", "target": "chien"}, {"input": "sun", "target": "soleil"}])
    rc, out, err = run(capsys, "--template", str(template), "--vars", f"@{variables}", "--pool", str(pool),
                       "--shots", "2", "--no-chat")
    assert rc == 0
    assert out == ("You translate.\n\nTranslate English into French.\n\nEnglish: cat\nFrench: chat\n\n"
                   "English: dog\nFrench: chien\n\nEnglish: bread\nFrench:")
    assert err == f"{len(smol.encode(out))} tokens (plain, 2 shots)\n"
    # a context that holds one shot, not two: one is dropped, and stderr says so
    shots = [Example("cat", "chat"), Example("dog", "chien")]
    one = build_prompt(template, {"lang": "English", "input": "bread"}, shots[:1], smol)
    room = 8192 - len(one.ids)
    rc, out, err = run(capsys, "--template", str(template), "--vars", f"@{variables}", "--pool", str(pool),
                       "--shots", "2", "--max-new-tokens", str(room))
    assert rc == 0 and out == one.text
    assert err == f"{len(one.ids)} tokens (chat, 1 shot, 1 dropped to fit {len(one.ids)} tokens)\n"
    # a seeded random draw: the same shots as select_shots picks
    picked = select_shots(read_pool(pool), "bread", 2, "random", seed=5)
    rc, out, err = run(capsys, "--template", str(template), "--vars", f"@{variables}", "--pool", str(pool),
                       "--shots", "2", "--select", "random", "--seed", "5")
    assert rc == 0 and out == build_prompt(template, {"lang": "English", "input": "bread"}, picked, smol).text
    assert err.endswith("(chat, 2 shots)\n")


def test_cli_errors_are_one_line(tmp_path, capsys) -> None:
    rc, _, err = run(capsys, "--vars", '{"input": "x"')
    assert_one_line_error(rc, err, "--vars is not valid JSON (Expecting ',' delimiter at line 1 column 14)")
    rc, _, err = run(capsys, "--vars", '["x"]')
    assert_one_line_error(rc, err, "--vars must be a JSON object of template variables, not a list")
    template = write(tmp_path / "t.jinja", "{% block instruction %}About {{ topic }}{% endblock %}")
    rc, _, err = run(capsys, "--template", str(template), "--vars", '{"input": "x"}')
    assert_one_line_error(rc, err, f"template {template}, block instruction: variable 'topic' is not set")
    rc, _, err = run(capsys, "--vars", '{"input": "x"}', "--shots", "2")
    assert_one_line_error(rc, err, "--shots K and --pool FILE go together")
    pool = jsonl(tmp_path / "pool.jsonl", [{"input": "a", "target": "b"}, {"input": "c"}])
    rc, _, err = run(capsys, "--vars", '{"input": "x"}', "--shots", "1", "--pool", str(pool))
    assert rc == 2 and err.startswith(f"error: {pool} line 2: no answer field") and err.count("\n") == 1
    rc, _, err = run(capsys, "--vars", '{"input": "x"}', "--shots", "3", "--pool", str(tmp_path / "nope.jsonl"))
    assert rc == 2 and err.startswith("error: no such file") and err.count("\n") == 1
    rc, _, err = run(capsys, "--vars", '{"input": "x"}', "--seed", "3")
    assert_one_line_error(rc, err, "--seed is for --select random")
    rc, _, err = run(capsys, "--vars", f"@{tmp_path / 'missing.json'}")
    assert_one_line_error(rc, err, f"no such file: {tmp_path / 'missing.json'}")
