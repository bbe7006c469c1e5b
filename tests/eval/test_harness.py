"""The eval harness: choice log-likelihoods equal transformers' on the same weights, generation goes through the
engine exactly as `lmforge generate --chat`, perplexity is eval/perplexity.py's, the bootstrap interval has the
width theory gives, an interrupted run resumes with only the new rows, and the CLI's output and errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import randomized
from tiny import llama_folder

from lmforge.cli import build_parser, main
from lmforge.client import Delta
from lmforge.errors import LmforgeError
from lmforge.eval import harness
from lmforge.eval.harness import (
    bootstrap_ci,
    contains,
    evaluate,
    exact,
    f1,
    normalize_answer,
    read_examples,
    regex,
    score_options,
    split_pair,
)
from lmforge.eval.perplexity import perplexity
from lmforge.generate import SamplingParams, complete, encode_prompt
from lmforge.weights.load import load


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, our model, our tokenizer, transformers' model): the same random 2-layer llama, moved off its init so
    the options' scores are far apart; byte tokenizer (one token per byte), chat template, context 64."""
    from transformers import AutoModelForCausalLM

    folder = llama_folder(tmp_path_factory.mktemp("harness") / "llama", layers=2, chat_template=True)
    hf = randomized(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), seed=1, scale=0.1)
    hf.save_pretrained(folder)
    model, tokenizer = load(folder, dtype="float32")
    return folder, model, tokenizer, hf


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def hf_loglik(hf, prompt: list[int], option: list[int]) -> float:
    with torch.no_grad():
        logp = F.log_softmax(hf(torch.tensor([prompt + option])).logits[0].float(), -1)
    return sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(option))


CHOICE_ROWS = [
    ("The sky is", ["blue", "green", "a very long option of many tokens"]),
    ("2 + 2 =", ["4", "5", "22", " four"]),  # " four" brings its own space
    ("Paris is in ", ["France", "Spain"]),  # the prompt's trailing space moves onto the option
    ("", ["alpha", "beta"]),  # nothing to condition on: scored after BOS
    ("x" * 55, ["short", "a longer one"]),  # 55 + 13 > 64: the prompt loses its oldest tokens
]


# ---- choice -------------------------------------------------------------------------------------------------


def test_split_pair_follows_the_lm_eval_convention(tiny):
    _, _, tok, _ = tiny
    assert split_pair(tok, "The sky is", "blue") == (tok.encode("The sky is"), tok.encode(" blue"))
    assert split_pair(tok, "2 + 2 =", " four") == (tok.encode("2 + 2 ="), tok.encode(" four"))
    assert split_pair(tok, "Paris is in ", "France") == (tok.encode("Paris is in"), tok.encode(" France"))
    assert split_pair(tok, "", "alpha") == ([256], tok.encode("alpha"))


def test_option_logliks_equal_transformers(tiny):
    _, model, tok, hf = tiny
    for prompt_text, options in CHOICE_ROWS:
        pairs = [split_pair(tok, prompt_text, o) for o in options]
        ids = [o for _, o in pairs]
        prompt = harness._fit(pairs[0][0], ids, model.cfg.max_seq_len, "row")
        ours = score_options(model, prompt, ids)
        theirs = [hf_loglik(hf, prompt, o) for o in ids]
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
        assert len(prompt) + max(map(len, ids)) - 1 <= model.cfg.max_seq_len


def test_rows_scored_together_equal_transformers(tiny):
    """score_rows: every row's prompt and options in one forward over their prefix tree."""
    _, model, tok, hf = tiny
    rows = []
    for prompt_text, options in CHOICE_ROWS:
        pairs = [split_pair(tok, prompt_text, o) for o in options]
        ids = [o for _, o in pairs]
        rows.append((harness._fit(pairs[0][0], ids, model.cfg.max_seq_len, "row"), ids))
    together = [(p, o) for p, o in rows if len(p) + max(map(len, o)) <= 40]  # padded shapes within the context
    assert len(together) >= 3 and len({len(p) for p, _ in together}) > 1  # prompts of different lengths
    prompt, ids = together[0]
    together += [(prompt, ids), (prompt, [[ord("x")], ids[0]])]  # a prompt seen again; a one-token option
    for (prompt, ids), ours in zip(together, harness.score_rows(model, together), strict=True):
        np.testing.assert_allclose(ours, [hf_loglik(hf, prompt, o) for o in ids], atol=1e-4, rtol=0)


def test_prefix_tree_merges_shared_prefixes_and_sees_only_ancestors():
    tree = harness.PrefixTree()
    a = tree.add([5, 6, 7])
    b = tree.add([5, 6, 8])
    assert tree.add([5, 6, 7]) == a and b[:2] == a[:2] and b[2] == 3  # 4 nodes for 9 tokens
    c = tree.add([9], under=a[-1])
    assert tree.token == [5, 6, 7, 8, 9] and tree.depth == [0, 1, 2, 2, 3] and tree.parent == [-1, 0, 1, 1, 2]
    assert c == [4]
    keep = tree.keep()
    assert keep.tolist() == [[True, False, False, False, False],
                             [True, True, False, False, False],
                             [True, True, True, False, False],
                             [True, True, False, True, False],  # 8 sees its prefix, not its sibling 7
                             [True, True, True, False, True]]


def test_a_packed_tree_computes_what_each_sequence_computes_alone(tiny):
    """The model with an explicit mask (each token sees its ancestors, positions = depth): every node's hidden
    state is its sequence's own causal one; a mask with a cache is refused."""
    _, model, _, _ = tiny
    seqs = [[72, 101, 108, 108, 111], [72, 101, 121], [72, 101, 108, 112, 33, 33]]
    tree = harness.PrefixTree()
    nodes = [tree.add(seq) for seq in seqs]
    with torch.no_grad():
        packed = model(torch.tensor([tree.token]), torch.tensor([tree.depth]), head="hidden",
                       keep=tree.keep()[None, None])[0]
        for seq, seq_nodes in zip(seqs, nodes, strict=True):
            alone = model(torch.tensor([seq]), head="hidden")[0]
            torch.testing.assert_close(packed[seq_nodes], alone, rtol=1e-5, atol=1e-5)
        cache = model.new_cache(1, 8)
        positions = torch.arange(3)[None]
        with pytest.raises(LmforgeError, match="explicit attention mask"):
            model(torch.tensor([[1, 2, 3]]), positions, cache.step(0, positions), keep=torch.ones(1, 1, 3, 3).bool())


def test_rows_sharing_prefixes_score_as_each_row_alone(tiny, monkeypatch):
    """Repeated prompts, prompts extending one another and options that start alike share nodes, in trees split
    across several forwards: each row's scores are its own, in the rows' order."""
    _, model, tok, _ = tiny
    texts = [("Question: the sky is", ["blue sky", "blue sea", "green"]), ("Question: the sea is", ["blue", "wet"]),
             ("Question: the sky is", ["blue sky", "grey"]), ("Question: the", ["end", "sky is blue"])]
    rows = []
    for prompt_text, options in texts:
        pairs = [split_pair(tok, prompt_text, o) for o in options]
        rows.append((pairs[0][0], [o for _, o in pairs]))
    alone = [harness.score_rows(model, [row])[0] for row in rows]
    monkeypatch.setattr(harness, "TREE_NODES", 30)  # several trees for these rows
    monkeypatch.setattr(harness, "MAX_TREE_NODES", 40)
    forwards = []
    real = harness._score_tree
    monkeypatch.setattr(harness, "_score_tree", lambda *a: (forwards.append(len(a[1].token)), real(*a))[1])
    together = harness.score_rows(model, rows)
    assert len(forwards) > 1
    unshared = sum(len(p) + sum(len(o) - 1 for o in opts) for p, opts in rows)
    assert sum(forwards) < unshared  # sharing happened
    for got, want in zip(together, alone, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_a_long_shared_prefix_keeps_rows_in_one_tree(tiny, monkeypatch):
    """Few-shot rows (one long block of shots, then each question) stay in one tree past TREE_NODES: the shared
    block runs once; rows that share nothing split into several trees."""
    _, model, tok, _ = tiny
    shots = "Q: red? A: colour. Q: six? "
    few_shot = [(tok.encode(shots + f"Q: {w}? A:"), [tok.encode(" colour"), tok.encode(" number")])
                for w in ("blue", "ten", "pink")]
    unrelated = [(tok.encode(w * 6), [tok.encode(" a"), tok.encode(" b")]) for w in ("xy", "pq", "mn")]
    monkeypatch.setattr(harness, "TREE_NODES", 8)
    forwards = []
    real = harness._score_tree
    monkeypatch.setattr(harness, "_score_tree", lambda *a: (forwards.append(len(a[1].token)), real(*a))[1])
    harness.score_rows(model, few_shot)
    assert len(forwards) == 1 and forwards[0] < sum(len(p) for p, _ in few_shot)
    forwards.clear()
    harness.score_rows(model, unrelated)
    assert len(forwards) == 3


def test_choice_accuracy_on_rows_whose_answer_is_known(tmp_path, tiny):
    """Targets are picked from transformers' scores: the argmax for some rows, another option for the rest, so
    acc and acc_norm are known exactly before the harness runs."""
    _, model, tok, hf = tiny
    rows, right, right_norm = [], 0, 0
    for i, (prompt_text, options) in enumerate(CHOICE_ROWS * 2):
        pairs = [split_pair(tok, prompt_text, o) for o in options]
        prompt = harness._fit(pairs[0][0], [o for _, o in pairs], model.cfg.max_seq_len, "row")
        ll = [hf_loglik(hf, prompt, o) for _, o in pairs]
        best, best_norm = int(np.argmax(ll)), int(np.argmax([s / len(o) for s, (_, o) in zip(ll, pairs, strict=True)]))
        target = best if i % 3 else (best + 1) % len(options)
        right, right_norm = right + (target == best), right_norm + (target == best_norm)
        # the target as its index or as its text, both allowed
        rows.append({"input": prompt_text, "options": options, "target": target if i % 2 else options[target]})
    result = evaluate(write_rows(tmp_path / "choice.jsonl", rows), "choice", model, tok)
    n = len(rows)
    assert result.n == n and result.metric == "acc"
    assert result.score == pytest.approx(right / n, abs=1e-12)
    assert result.extra["acc_norm"] == pytest.approx(right_norm / n, abs=1e-12)
    assert result.ci_low <= result.score <= result.ci_high
    assert 0 < right < n  # the set is not degenerate
    first = result.records[0]
    assert first["target"] == (rows[0]["options"].index(rows[0]["target"]))
    assert first["tokens"] == [len(" blue"), len(" green"), len(" a very long option of many tokens")]


def test_classify_takes_the_labels_once(tmp_path, tiny):
    _, model, tok, _ = tiny
    rows = [{"input": "I loved it. Sentiment:", "target": "positive"}, {"input": "Awful. Sentiment:", "target": 1},
            {"input": "Meh:", "target": "neutral", "options": ["neutral", "other"]}]
    data = write_rows(tmp_path / "cls.jsonl", rows)
    result = evaluate(data, "classify", model, tok, labels=["positive", "negative"])
    assert [r["options"] for r in result.records] == [["positive", "negative"]] * 2 + [["neutral", "other"]]
    assert [r["target"] for r in result.records] == [0, 1, 0]
    assert result.extra["acc"] == np.mean([r["pred"] == r["target"] for r in result.records])
    with pytest.raises(LmforgeError, match=r"cls.jsonl line 1: no options: give --labels"):
        evaluate(data, "classify", model, tok)


# ---- generate -----------------------------------------------------------------------------------------------


def test_metrics_on_constructed_outputs():
    assert normalize_answer('  "Paris."\n') == "paris"
    assert normalize_answer("The  Eiffel\tTower!") == "the eiffel tower"
    assert normalize_answer("3.5") == "3.5" and normalize_answer("«Oui»") == "oui"
    assert exact("Paris.", "paris") == 1.0 and exact("Paris, France", "Paris") == 0.0
    assert contains("It is Paris, France.", "paris") == 1.0
    assert contains("The answer is 14", "4") == 0.0  # whole words only
    assert contains("New York City", "new york") == 1.0
    precision, recall = 2 / 3, 2 / 5  # "the" stays a word: the light normalisation keeps articles
    assert f1("the liquid methane", "liquid methane and liquid oxygen") == pytest.approx(
        2 * precision * recall / (precision + recall))
    assert f1("Paris.", "Paris") == 1.0 and f1("", "") == 1.0 and f1("x", "") == 0.0 and f1("a b", "c") == 0.0
    assert regex("The answer: 42.", r"\b42\b") == 1.0 and regex("Answer 42", r"^42") == 0.0
    assert regex("PARIS", "(?i)paris") == 1.0


def test_generate_goes_through_the_chat_path_of_generate(tmp_path, tiny):
    _, model, tok, _ = tiny
    prompts = ["What is 2+2?", "Name a colour.", "Say hi", "Spell cat"]
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    # what `lmforge generate --chat --temperature 0` answers, one prompt at a time
    expected = [complete(model, tok, [encode_prompt(tok, p, chat=True)], params)[0].text for p in prompts]
    assert len(set(expected)) > 1
    rows = [{"input": p, "target": e if i % 2 == 0 else "no such answer"}
            for i, (p, e) in enumerate(zip(prompts, expected, strict=True))]
    rows[3] = {"instruction": prompts[3], "output": "no such answer"}  # Alpaca, no input
    result = evaluate(write_rows(tmp_path / "gen.jsonl", rows), "generate", model, tok, params=params, batch_size=3)
    assert [r["output"] for r in result.records] == expected
    assert result.score == 0.5 and [r["score"] for r in result.records] == [1.0, 0.0, 1.0, 0.0]
    assert result.metric == "exact" and result.n == 4


def test_generate_without_a_chat_template_continues_the_raw_text(tmp_path, tiny):
    _, model, tok, _ = tiny
    plain = type(tok)(tok.backend, None, tok.bos_token, tok.eos_token)
    params = SamplingParams(max_new_tokens=5, temperature=0.0)
    expected = complete(model, plain, ["Once upon"], params)[0].text
    rows = [{"prompt": "Once upon", "completion": expected}]
    result = evaluate(write_rows(tmp_path / "raw.jsonl", rows), "generate", model, plain, params=params)
    assert result.records[0]["output"] == expected and result.score == 1.0


class FakeClient:
    """A remote model that answers 'answer to <prompt>' and remembers what it was asked."""

    def __init__(self):
        self.asked: list[str] = []

    def stream_chat(self, messages, params):
        self.asked.append(messages[-1]["content"])
        yield Delta("answer to ")
        yield Delta(messages[-1]["content"], "stop")


def test_remote_model_and_resume_asks_only_about_new_rows(tmp_path):
    rows = [{"input": f"q{i}", "target": f"answer to q{i}" if i % 3 else "wrong"} for i in range(7)]
    prefix = write_rows(tmp_path / "prefix.jsonl", rows[:3])
    full = write_rows(tmp_path / "full.jsonl", rows)
    out = tmp_path / "out.jsonl"
    client = FakeClient()
    first = evaluate(prefix, "generate", client=client, out=out, batch_size=2)
    assert client.asked == ["q0", "q1", "q2"] and first.n == 3 and first.score == pytest.approx(2 / 3)
    with out.open("a") as f:
        f.write('{"index": 3, "kind": "gen')  # a run killed mid-write
    client.asked.clear()
    second = evaluate(full, "generate", client=client, out=out, batch_size=2)
    assert client.asked == ["q3", "q4", "q5", "q6"]
    assert second.n == 7 and second.score == pytest.approx(4 / 7)
    assert [r["index"] for r in second.records] == list(range(7))
    saved = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in saved] == list(range(7))
    assert [r["output"] for r in saved] == [f"answer to q{i}" for i in range(7)]
    client.asked.clear()
    again = evaluate(full, "generate", client=client, out=out, metric="contains")  # rescored from the records
    assert client.asked == [] and again.score == pytest.approx(4 / 7) and again.metric == "contains"
    write_rows(full, [{"input": "changed", "target": "x"}] + rows[1:])
    with pytest.raises(LmforgeError, match=r"out.jsonl line 1: its row \(.*full.jsonl line 1\) changed"):
        evaluate(full, "generate", client=client, out=out)
    with pytest.raises(LmforgeError, match="holds generate records"):
        choice = write_rows(tmp_path / "choice.jsonl", [{"input": "q0", "target": 0, "options": ["a", "b"]}])
        evaluate(choice, "choice", model=object(), tokenizer=object(), out=out)  # type: ignore[arg-type]


def test_choice_resume_scores_only_new_rows(tmp_path, tiny, monkeypatch):
    _, model, tok, _ = tiny
    rows = [{"input": p, "options": o, "target": 0} for p, o in CHOICE_ROWS]
    out = tmp_path / "out.jsonl"
    scored: list[list[int]] = []
    real = harness.score_rows

    def counting(model, rows):
        scored.extend(prompt for prompt, _ in rows)
        return real(model, rows)

    monkeypatch.setattr(harness, "score_rows", counting)
    whole = evaluate(write_rows(tmp_path / "all.jsonl", rows), "choice", model, tok)
    assert len(scored) == 5
    scored.clear()
    evaluate(write_rows(tmp_path / "two.jsonl", rows[:2]), "choice", model, tok, out=out)
    assert len(scored) == 2
    scored.clear()
    resumed = evaluate(tmp_path / "all.jsonl", "choice", model, tok, out=out)
    assert len(scored) == 3
    # rows scored in other batches: the same numbers up to float rounding
    for got, want in zip(resumed.records, whole.records, strict=True):
        assert got["loglik"] == pytest.approx(want["loglik"], abs=1e-4)
    assert (resumed.score, resumed.extra["acc_norm"]) == (whole.score, whole.extra["acc_norm"])


# ---- perplexity ---------------------------------------------------------------------------------------------


def test_perplexity_kind_is_eval_perplexity(tmp_path, tiny):
    _, model, tok, _ = tiny
    text = "the quick brown fox jumps over the lazy dog. " * 4  # 180 bytes: more than the context of 64
    path = tmp_path / "text.txt"
    path.write_text(text)
    expected = perplexity(model, tok.encode(text), 32, 8)
    got = evaluate(path, "perplexity", model, tok, window=32, stride=8)
    assert got.score == expected.perplexity and got.n == expected.tokens == len(text) - 1
    assert got.extra["nll"] == expected.nll and got.ci_low is None
    assert got.extra["bits_per_token"] == pytest.approx(expected.nll / expected.tokens / math.log(2))
    short = evaluate(path, "perplexity", model, tok, limit=40)
    assert short.score == perplexity(model, tok.encode(text)[:40]).perplexity and short.n == 39


# ---- bootstrap ----------------------------------------------------------------------------------------------


def test_bootstrap_interval_of_a_known_distribution():
    scores = np.random.default_rng(1).permutation([1.0] * 700 + [0.0] * 300)  # mean exactly 0.7
    low, high = bootstrap_ci(scores)
    half = 1.96 * math.sqrt(0.7 * 0.3 / 1000)  # 0.0284: the normal approximation
    assert low < 0.7 < high
    assert (high - low) / 2 == pytest.approx(half, abs=0.003)
    assert abs((low + high) / 2 - 0.7) < 0.003
    assert bootstrap_ci(scores) == (low, high)  # seeded
    assert bootstrap_ci(scores, seed=1) != (low, high)
    assert bootstrap_ci([1.0] * 50) == (1.0, 1.0)
    with pytest.raises(LmforgeError, match="no scores"):
        bootstrap_ci([])


# ---- bad input ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "row", "message"), [
    ("generate", {"input": "q"}, r'line 2: missing "target"'),
    ("generate", {"instruction": "q", "input": "x"}, r'line 2: missing "output"'),
    ("generate", {"prompt": "q"}, r'line 2: missing "completion"'),
    ("generate", {"input": 3, "target": "x"}, r'line 2: "input" must be a string'),
    ("generate", ["q", "a"], "line 2: expected a JSON object"),
    ("choice", {"input": "q", "target": "a"}, r'line 2: no options: choice rows need an "options" list'),
    ("choice", {"input": "q", "target": "c", "options": ["a", "b"]}, "line 2: the target must be one of the options"),
    ("choice", {"input": "q", "target": 2, "options": ["a", "b"]}, "line 2: target index 2 is outside its 2 options"),
    ("choice", {"input": "q", "target": 0, "options": ["a"]}, 'line 2: "options" must be a list of at least two'),
])
def test_bad_rows_name_file_and_line(tmp_path, kind, row, message):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"input": "ok", "target": "a", "options": ["a", "b"]}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(LmforgeError, match=f"rows.jsonl {message}"):
        read_examples(path, kind)


def test_bad_options_are_refused_before_work(tmp_path):
    path = write_rows(tmp_path / "r.jsonl", [{"input": "q", "target": "a"}])
    for kwargs, message in [
        ({"kind": "generate", "labels": ["a", "b"]}, "--labels is for --kind classify"),
        ({"kind": "choice", "metric": "f1"}, "--metric is for --kind generate"),
        ({"kind": "generate", "metric": "bleu"}, "unknown metric"),
        ({"kind": "nope"}, "unknown kind"),
        ({"kind": "choice", "client": FakeClient()}, "needs the model's log-probabilities"),
        ({"kind": "perplexity", "out": tmp_path / "o.jsonl"}, "perplexity scores one text"),
        ({"kind": "generate", "stride": 4}, "--window and --stride are for --kind perplexity"),
    ]:
        with pytest.raises(LmforgeError, match=message):
            evaluate(path, **kwargs)
    (tmp_path / "x.jsonl").write_text('{"input": "q", "target": "(unclosed"}\n')
    with pytest.raises(LmforgeError, match="x.jsonl line 1: the target is not a valid regex"):
        evaluate(tmp_path / "x.jsonl", "generate", client=FakeClient(), metric="regex")
    (tmp_path / "bad.jsonl").write_text("{nope\n")
    with pytest.raises(LmforgeError, match="bad.jsonl line 1: not valid JSON"):
        read_examples(tmp_path / "bad.jsonl", "generate")


# ---- the CLI ------------------------------------------------------------------------------------------------


def test_cli_json_output(tmp_path, tiny, capsys):
    folder, model, tok, _ = tiny
    rows = [{"input": p, "options": o, "target": 0} for p, o in CHOICE_ROWS]
    data = write_rows(tmp_path / "c.jsonl", rows)
    base = ["eval", "--model", str(folder), "--dtype", "float32", "--data", str(data)]
    assert main([*base, "--kind", "choice", "--format", "json"]) == 0
    got = json.loads(capsys.readouterr().out)
    expected = evaluate(data, "choice", model, tok).summary()
    assert set(got) >= {"score", "ci_low", "ci_high", "n", "acc", "acc_norm"}
    assert got == pytest.approx(expected) and got["n"] == 5
    text = tmp_path / "t.txt"
    text.write_text("hello world, hello again")
    assert main(["eval", "--model", str(folder), "--dtype", "float32", "--data", str(text), "--kind", "perplexity",
                 "--format", "json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["perplexity"] == pytest.approx(perplexity(model, tok.encode(text.read_text())).perplexity)
    assert got["tokens"] == len("hello world, hello again") - 1
    gen = write_rows(tmp_path / "g.jsonl", [{"input": "hi", "target": "x"}, {"input": "yo", "target": "y"}])
    out = tmp_path / "out.jsonl"
    assert main(["eval", "--model", str(folder), "--dtype", "float32", "--data", str(gen), "--max-new-tokens", "3",
                 "--metric", "contains", "--out", str(out), "--limit", "1"]) == 0
    table = capsys.readouterr().out
    assert "contains" in table and "n" in table and "[0.000, 0.000]" in table
    assert len(out.read_text().splitlines()) == 1


def test_cli_eval_and_eval_rag_both_parse():
    args = build_parser().parse_args(["eval", "--data", "d.jsonl", "--kind", "choice"])
    # None: greedy at run time, 0.7 with --samples N > 1 (cli._default_temperature)
    assert args.func.__name__ == "cmd_eval" and args.temperature is None and args.eval_command is None
    args = build_parser().parse_args(["eval", "compare", "--data", "d.jsonl", "--variant", "a", "--variant", "b"])
    assert args.func.__name__ == "cmd_eval_compare" and args.variant == ["a", "b"] and args.png == "compare.png"
    args = build_parser().parse_args(["eval", "rag", "--store", "s.db", "--qa", "qa.jsonl", "--k", "3"])
    assert args.func.__name__ == "cmd_eval_rag" and args.k == 3 and args.temperature == 0.2


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    data = write_rows(tmp_path / "r.jsonl", [{"input": "q"}])
    for argv, message in [
        (["eval", "--data", str(data), "--labels", "a,b"], "error: --labels is for --kind classify"),
        (["eval", "--data", str(data), "--model", "nowhere"], 'line 1: missing "target"'),  # before any load
        (["eval"], "error: name the data"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err
    for argv in (["eval", "--data", "x", "--kind", "nope"], ["eval", "--data", "x", "--metric", "bleu"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1 and "invalid choice" in err


# ---- the real model -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_model_choice_matches_transformers_and_knows_paris(smollm, hf_smollm):
    model, tok = smollm
    prompt_text, options = "The capital of France is", ["Paris", "London", "Berlin", "a banana"]
    pairs = [split_pair(tok, prompt_text, o) for o in options]
    ours = score_options(model, pairs[0][0], [o for _, o in pairs])
    theirs = [hf_loglik(hf_smollm, pairs[0][0], o) for _, o in pairs]
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    assert int(np.argmax(ours)) == 0


# ---- prompts: templates, shots, self-consistency ------------------------------------------------------------

TEMPLATE = """\
{% block instruction %}Answer in one word.{% endblock %}
{% block input %}Q: {{ input }}{% endblock %}
"""
WEATHER = ["Will it rain tomorrow?", "Is it sunny outside today?", "How cold is the winter here?",
           "Does it snow in the mountains?"]
FOOD = ["What goes well with pasta?", "Is pizza better with cheese?", "How do I bake fresh bread?",
        "Which soup is best for dinner?"]


@pytest.fixture(scope="module")
def roomy(tmp_path_factory):
    """(folder, model, tokenizer): a random 1-layer llama with the chat template and a context of 512, room for
    a few shots of bytes."""
    folder = llama_folder(tmp_path_factory.mktemp("roomy") / "llama", chat_template=True, context=512)
    return (folder, *load(folder, dtype="float32"))


def prompt_files(tmp_path, pool_rows, rows):
    template = tmp_path / "t.jinja"
    template.write_text(TEMPLATE)
    return template, write_rows(tmp_path / "pool.jsonl", pool_rows), write_rows(tmp_path / "rows.jsonl", rows)


def test_shots_reach_the_engine_exactly_as_build_prompt_makes_them(tmp_path, roomy, monkeypatch, capsys):
    from lmforge.prompts import build_prompt, read_pool, select_shots

    folder, model, tok = roomy
    pool_rows = [{"input": q, "target": f"a{i}"} for i, q in enumerate(WEATHER + FOOD)]
    rows = [{"input": "Is it windy?", "target": "x"}, {"instruction": "Name a fruit.", "input": "", "output": "y"}]
    template, pool_path, data = prompt_files(tmp_path, pool_rows, rows)
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    pool = read_pool(pool_path)
    built = [build_prompt(template, {"input": "Is it windy?"}, select_shots(pool, "Is it windy?", 2), tok,
                          max_tokens=512 - 6),
             build_prompt(template, {"instruction": "Name a fruit.", "input": ""},
                          select_shots(pool, "Name a fruit.", 2), tok, max_tokens=512 - 6)]
    assert built[0].chat and "a0" in built[0].text and "a1" in built[0].text and "Q: Is it windy?" in built[0].text
    expected = [c.text for c in complete(model, tok, [b.ids for b in built], params)]
    seen: list[list[int]] = []
    real = harness.complete

    def spy(model, tokenizer, prompts, params=None, **kwargs):
        seen.extend(prompts)
        return real(model, tokenizer, prompts, params, **kwargs)

    monkeypatch.setattr(harness, "complete", spy)
    spec = harness.PromptSpec(template, 2, pool_path)
    result = evaluate(data, "generate", model, tok, params=params, prompts=spec, out=tmp_path / "out.jsonl")
    assert seen == [b.ids for b in built]  # the built ids, not rendered through the chat template a second time
    assert [r["output"] for r in result.records] == expected
    assert [r["prompt"] for r in result.records] == [b.text for b in built]
    saved = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [s["shots"] for s in saved] == [[{"line": 1, "input": WEATHER[0]}, {"line": 2, "input": WEATHER[1]}]] * 2
    # the CLI: the same records
    seen.clear()
    out = tmp_path / "cli.jsonl"
    assert main(["eval", "--model", str(folder), "--dtype", "float32", "--data", str(data), "--template",
                 str(template), "--shots", "2", "--pool", str(pool_path), "--max-new-tokens", "6", "--out",
                 str(out), "--format", "json"]) == 0
    assert seen == [b.ids for b in built]
    assert [json.loads(line)["output"] for line in out.read_text().splitlines()] == expected


def test_choice_scores_options_after_the_built_plain_prompt(tmp_path, roomy):
    from lmforge.prompts import build_prompt, read_pool

    _, model, tok = roomy
    template, pool_path, data = prompt_files(tmp_path, [{"input": "Is it hot?", "target": "yes"}],
                                             [{"input": "Is ice cold?", "options": ["yes", "no"], "target": 0}])
    result = evaluate(data, "choice", model, tok, prompts=harness.PromptSpec(template, 1, pool_path))
    text = build_prompt(template, {"input": "Is ice cold?"}, list(read_pool(pool_path)), tok, chat=False).text
    assert result.records[0]["prompt"] == text and "Q: Is it hot?" not in text  # plain: the example block
    assert "Input: Is it hot?\nOutput: yes" in text
    pairs = [split_pair(tok, text, o) for o in ("yes", "no")]
    assert result.records[0]["loglik"] == pytest.approx(score_options(model, pairs[0][0], [o for _, o in pairs]))


def test_similar_selection_gives_each_row_its_own_shots(tmp_path, roomy):
    _, model, tok = roomy
    pool_rows = [{"input": q, "target": "w"} for q in WEATHER[:2]] + [{"input": q, "target": "f"} for q in FOOD]
    pool_rows += [{"input": q, "target": "w"} for q in WEATHER[2:]]
    rows = [{"input": "Will there be a storm this weekend?", "target": "w"},
            {"input": "What should I cook for lunch?", "target": "f"}]
    template, pool_path, data = prompt_files(tmp_path, pool_rows, rows)
    params = SamplingParams(max_new_tokens=2, temperature=0.0)
    shots = {}
    for how in ("first", "similar"):
        result = evaluate(data, "generate", model, tok, params=params,
                          prompts=harness.PromptSpec(template, 2, pool_path, how))
        shots[how] = [[s["input"] for s in r["shots"]] for r in result.records]
    assert shots["first"] == [WEATHER[:2], WEATHER[:2]]
    weather, food = shots["similar"]
    assert set(weather) <= set(WEATHER) and set(food) <= set(FOOD)  # each row its own topic's shots


def test_shots_that_overflow_are_dropped_with_a_warning_naming_the_row(tmp_path, roomy):
    _, model, tok = roomy
    pool_rows = [{"input": f"{i} " + "a long example question " * 6, "target": "ok"} for i in range(3)]
    template, pool_path, data = prompt_files(tmp_path, pool_rows, [{"input": "short?", "target": "x"}])
    params = SamplingParams(max_new_tokens=250, temperature=0.0)
    with pytest.warns(UserWarning, match=r"rows.jsonl line 1: dropped [12] of 3 shots to fit the prompt in 262"):
        result = evaluate(data, "generate", model, tok, params=params, prompts=harness.PromptSpec(template, 3,
                                                                                                  pool_path))
    kept = len(result.records[0]["shots"])
    assert 1 <= kept < 3 and len(tok.encode(result.records[0]["prompt"], add_special_tokens=False)) <= 262
    with pytest.raises(LmforgeError, match=r"line 1: 600 tokens for the answer leave no room"):
        evaluate(data, "generate", model, tok, params=SamplingParams(max_new_tokens=600),
                 prompts=harness.PromptSpec(template, 3, pool_path))


class VotingClient:
    """A remote model whose answers go round a fixed list."""

    def __init__(self, answers):
        self.answers, self.calls = answers, 0

    def stream_chat(self, messages, params):
        self.calls += 1
        yield Delta(self.answers[(self.calls - 1) % len(self.answers)], "stop")


def test_samples_score_the_majority_vote(tmp_path, roomy, monkeypatch):
    data = write_rows(tmp_path / "q.jsonl", [{"input": "capital of France?", "target": "paris"}])
    client = VotingClient(["Paris.", "Rome", "paris"])
    result = evaluate(data, "generate", client=client, samples=3)
    record = result.records[0]
    assert client.calls == 3 and record["outputs"] == ["Paris.", "Rome", "paris"]
    assert record["output"] == "Paris." and record["agreement"] == pytest.approx(2 / 3) and result.score == 1.0
    one = evaluate(data, "generate", client=VotingClient(["Rome", "Paris.", "paris"]), samples=1)
    assert one.score == 0.0  # a single sample is the first answer
    # a local model: all samples of all rows in one engine batch, sample j seeded seed + j
    _, model, tok = roomy
    rows = write_rows(tmp_path / "r.jsonl", [{"input": "hi", "target": "x"}, {"input": "yo", "target": "y"}])
    batches = []
    real = harness.complete

    def spy(model, tokenizer, prompts, params=None, **kwargs):
        batches.append(len(prompts))
        return real(model, tokenizer, prompts, params, **kwargs)

    monkeypatch.setattr(harness, "complete", spy)
    params = SamplingParams(max_new_tokens=5, temperature=1.5, seed=7)
    result = evaluate(rows, "generate", model, tok, params=params, samples=3)
    assert batches == [6]
    for record, text in zip(result.records, ["hi", "yo"], strict=True):
        ids = encode_prompt(tok, text, chat=True)
        expected = [complete(model, tok, [ids], SamplingParams(max_new_tokens=5, temperature=1.5, seed=7 + j))[0].text
                    for j in range(3)]
        assert record["outputs"] == expected and len(set(expected)) > 1
    with pytest.raises(LmforgeError, match="--samples 3 needs a temperature > 0"):
        evaluate(rows, "generate", model, tok, params=SamplingParams(temperature=0.0), samples=3)
    with pytest.raises(LmforgeError, match="--samples is for --kind generate"):
        evaluate(rows, "choice", model, tok, samples=3)
    args = build_parser().parse_args(["eval", "--data", "d.jsonl", "--samples", "3"])
    assert args.temperature is None and args.samples == 3


def test_cli_prompt_mistakes_are_one_line_before_any_load(tmp_path, capsys):
    pool = write_rows(tmp_path / "pool.jsonl", [{"input": "a", "target": "b"}, {"input": "c", "target": "d"}])
    data = write_rows(tmp_path / "r.jsonl", [{"input": "q", "target": "a"}])
    base = ["eval", "--data", str(data), "--model", "nowhere"]
    for argv, message in [
        ([*base, "--shots", "3", "--pool", str(pool)], f"asked for 3 shots but the pool {pool} holds only 2"),
        ([*base, "--shots", "2"], "--shots K and --pool FILE go together"),
        ([*base, "--pool", str(pool)], "--shots K and --pool FILE go together"),
        ([*base, "--select", "similar"], "--select needs --shots K"),
        ([*base, "--template", str(tmp_path / "none.jinja")], "no such file"),
        ([*base, "--kind", "perplexity", "--template", str(pool)], "--template and --shots are for --kind"),
        ([*base, "--kind", "choice", "--samples", "2"], "--samples is for --kind generate"),
        ([*base, "--samples", "2", "--temperature", "0"], "--samples 2 needs a temperature > 0"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (argv, err)
