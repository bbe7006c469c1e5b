"""`lmforge eval compare`: variant specs parse (and bad ones are one-line errors), every variant runs on the same
rows with its own prompts, each model loads once, and the chart is a real PNG."""

from __future__ import annotations

import json

import pytest
from tiny import llama_folder

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.eval.compare import Variant, best, compare, parse_variant, plot
from lmforge.eval.harness import PromptSpec, evaluate_examples, read_examples
from lmforge.sampling import SamplingParams
from lmforge.weights.load import load

TEMPLATE = """\
{% block instruction %}Answer in one word.{% endblock %}
{% block input %}Q: {{ input }}{% endblock %}
"""


@pytest.fixture(scope="module")
def roomy(tmp_path_factory):
    folder = llama_folder(tmp_path_factory.mktemp("roomy") / "llama", chat_template=True, context=512)
    return (folder, *load(folder, dtype="float32"))


@pytest.fixture
def files(tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text(TEMPLATE)
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"input": f"pool question {i}?", "target": f"a{i}"}) + "\n" for i in range(4)))
    data = tmp_path / "rows.jsonl"
    rows = [{"input": f"question {i}?", "target": "x" if i % 2 else "y", "options": ["x", "y"]} for i in range(5)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return template, pool, data


def test_parse_variant():
    assert parse_variant("zero") == Variant("zero")
    assert parse_variant("few:shots=3, select=similar,template=t.jinja,seed=4,model=m,samples=5") == Variant(
        "few", "t.jinja", 3, "similar", 4, "m", 5)
    for spec, message in [
        (":shots=1", "needs a name"),
        ("a:shot=1", "unknown key 'shot' \\(keys: template, shots, select, seed, model, samples\\)"),
        ("a:shots=x", "shots must be an integer >= 0, got 'x'"),
        ("a:shots=-1", "shots must be an integer >= 0"),
        ("a:samples=0", "samples must be an integer >= 1"),
        ("a:select=best", "select must be one of first, random, similar, got 'best'"),
        ("a:shots", "shots needs a value"),
        ("a:shots=1,shots=2", "shots is given twice"),
    ]:
        with pytest.raises(LmforgeError, match=f"--variant '{spec}': {message}" if spec[0] != ":" else message):
            parse_variant(spec)


def test_compare_runs_every_variant_on_the_same_rows(tmp_path, roomy, files):
    _, model, tok = roomy
    template, pool, data = files
    loads = []

    def loader(name):
        loads.append(name)
        return model, tok

    variants = [Variant("zero"), Variant("tpl", str(template)), Variant("first", str(template), 2),
                Variant("other-model", str(template), 2, "random", 3, model="other")]
    params = SamplingParams(max_new_tokens=3)
    results = compare(data, "generate", variants, "base", pool, metric="contains", params=params, loader=loader)
    assert loads == ["base", "other"]  # each distinct model once
    assert [r.model for r in results] == ["base", "base", "base", "other"]
    for r in results:
        assert [(x["index"], x["target"]) for x in r.result.records] == [(i, "x" if i % 2 else "y") for i in range(5)]
        assert r.result.n == 5 and r.result.metric == "contains"
    # each variant scores what the harness scores with its prompts
    rows = read_examples(data, "generate")
    alone = evaluate_examples(rows, "generate", model, tok, metric="contains", params=SamplingParams(
        max_new_tokens=3, temperature=0.0), prompts=PromptSpec(str(template), 2, pool, "first", 0))
    assert [x["output"] for x in results[2].result.records] == [x["output"] for x in alone.records]
    assert [len(x["shots"]) for x in results[2].result.records] == [2] * 5
    assert "shots" not in results[0].result.records[0] or results[0].result.records[0]["shots"] == []
    assert results[0].result.records[0]["prompt"] != results[1].result.records[0]["prompt"]  # the template applies
    png = plot(results, tmp_path / "sub" / "c.png")
    raw = png.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[2] in (3, 4)
    choice = compare(data, "choice", [Variant("a"), Variant("b", str(template), 1)], "base", pool, loader=loader)
    assert [r.result.metric for r in choice] == ["acc", "acc"] and best(choice) in (0, 1)


def test_compare_mistakes_before_any_load(tmp_path, files):
    template, pool, data = files

    def loader(name):
        raise AssertionError("no model should load")

    for kwargs, message in [
        ({"variants": [Variant("a", shots=5)]}, f"variant a: asked for 5 shots but the pool {pool} holds only 4"),
        ({"variants": [Variant("a", shots=1)], "pool": None}, "variant a: 1 shots need a pool"),
        ({"variants": [Variant("a"), Variant("a", shots=1)]}, "two variants are named 'a'"),
        ({"variants": [Variant("a", str(tmp_path / "no.jinja"))]}, "variant a: no such file"),
        ({"variants": [Variant("a", samples=2)], "temperature": 0.0}, "samples=2 needs a temperature > 0"),
        ({"variants": [Variant("a", samples=2)], "kind": "choice"}, "--samples is for --kind generate"),
        ({"variants": [Variant("a")], "kind": "perplexity"}, "compare scores --kind generate, choice, classify"),
        ({"variants": []}, "at least one --variant"),
    ]:
        kwargs = {"data": data, "kind": "generate", "pool": pool, "loader": loader, **kwargs}
        with pytest.raises(LmforgeError, match=message):
            compare(**kwargs)


def test_cli_compare(tmp_path, roomy, files, capsys):
    folder, _, _ = roomy
    template, pool, data = files
    png = tmp_path / "chart.png"
    base = ["eval", "compare", "--model", str(folder), "--dtype", "float32", "--data", str(data), "--pool", str(pool),
            "--max-new-tokens", "3", "--png", str(png), "--metric", "contains"]
    assert main([*base, "--variant", "zero", "--variant", f"two:template={template},shots=2", "--format",
                 "json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [v["variant"] for v in got["variants"]] == ["zero", "two"] and got["png"] == str(png)
    assert sum(v["best"] for v in got["variants"]) == 1
    assert all(v["n"] == 5 and v["ci_low"] <= v["score"] <= v["ci_high"] for v in got["variants"])
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert main([*base, "--variant", "zero", "--variant", f"two:template={template},shots=2"]) == 0
    table = capsys.readouterr().out
    assert "zero" in table and "ci_low" in table and "*" in table and str(png.name) in table
    for argv, message in [
        ([*base, "--variant", "a:shots=x"], "error: --variant 'a:shots=x': shots must be an integer >= 0"),
        ([*base, "--variant", "a:colour=red"], "unknown key 'colour'"),
        ([*base, "--variant", "a:shots=9"], f"variant a: asked for 9 shots but the pool {pool} holds only 4"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
