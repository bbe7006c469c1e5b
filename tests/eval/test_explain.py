"""A look inside the model (lmforge.eval.explain, `lmforge explain`): token log-probs from one forward pass and
from the engine, the logit lens (its last layer is the model's own output), attention weights kept by Attention
(the output unchanged, rows summing to 1, causal) and the PNG heat map."""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import pytest
import torch
from helpers import randomized
from tiny import bert_folder, llama_folder

from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.eval.explain import PNG_DPI, attention_map, figure_inches, logit_lens, save_attention_png, token_report
from lmforge.generate import complete, encode_prompt
from lmforge.model.transformer import Transformer
from lmforge.sampling import SamplingParams
from lmforge.weights.load import load

TEXT = "the cat sat on"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Transformer, object]:
    """A 3-layer random llama (byte tokenizer: one token per character) moved off its init, and its folder."""
    folder = llama_folder(tmp_path_factory.mktemp("explain") / "llama", layers=3, chat_template=True)
    model, tokenizer = load(folder, dtype="float32")
    randomized(model, seed=1, scale=0.1)
    return folder, model, tokenizer


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# ---- Attention.keep_weights ---------------------------------------------------------------------------------


def keep_all(model: Transformer, on: bool) -> list:
    blocks = [*(model.encoder or []), *(model.decoder or [])]
    modules = [b.attn for b in blocks] + [b.cross_attn for b in blocks if b.cross_attn is not None]
    for attn in modules:
        attn.keep_weights, attn.weights = on, None
    return modules


def test_kept_weights_leave_the_output_unchanged_and_are_causal_probabilities():
    torch.manual_seed(0)
    model = randomized(Transformer(ModelConfig.from_name("tiny-llama")), scale=0.1)  # GQA: 4 heads, 2 kv heads
    tokens = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        expected = model(tokens)
        modules = keep_all(model, True)
        got = model(tokens)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for attn in modules:
        w = attn.weights
        assert w is not None and w.shape == (2, 4, 9, 9)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 9))
        assert torch.all(w.triu(diagonal=1) == 0) and torch.all(w.diagonal(dim1=-2, dim2=-1) > 0)
    keep_all(model, False)  # off again: the SDPA path, nothing kept
    with torch.no_grad():
        model(tokens)
    assert all(attn.weights is None for attn in modules)


def test_kept_weights_with_padding_and_with_a_relative_bias():
    """The bool mask of a left-padded batch, and T5's float bias (encoder, causal decoder, cross-attention)."""
    torch.manual_seed(0)
    llama = randomized(Transformer(ModelConfig.from_name("tiny-llama")), scale=0.1)
    tokens, mask = torch.randint(0, 256, (2, 6)), torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        expected = llama(tokens, attention_mask=mask)
        modules = keep_all(llama, True)
        got = llama(tokens, attention_mask=mask)
    torch.testing.assert_close(got[0, 2:], expected[0, 2:], atol=1e-5, rtol=1e-5)  # pad rows' outputs are unused
    torch.testing.assert_close(got[1], expected[1], atol=1e-5, rtol=1e-5)
    assert torch.all(modules[0].weights[0, :, 2:, :2] == 0)  # no real token looks at a pad

    # float64: 12 attention layers of unscaled T5 scores leave fp32 summation-order noise (~1e-5) and nothing else
    t5 = randomized(Transformer(dataclasses.replace(ModelConfig.from_name("tiny-t5"), vocab_size=50)), scale=0.1)
    t5 = t5.double()
    enc, dec = torch.randint(0, 50, (1, 7)), torch.randint(0, 50, (1, 5))
    with torch.no_grad():
        expected = t5(enc, decoder_tokens=dec)
        modules = keep_all(t5, True)
        got = t5(enc, decoder_tokens=dec)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    shapes = {tuple(m.weights.shape) for m in modules}
    assert shapes == {(1, 4, 7, 7), (1, 4, 5, 5), (1, 4, 5, 7)}  # encoder, decoder self-, cross-attention
    for attn in modules:
        torch.testing.assert_close(attn.weights.sum(-1), torch.ones(attn.weights.shape[:-1], dtype=torch.float64))


# ---- token log-probabilities ----------------------------------------------------------------------------------


def test_prompt_tokens_logprobs_given_the_tokens_before(tiny):
    _, model, tokenizer = tiny
    report = token_report(model, tokenizer, TEXT, top=3, low=0.1)
    ids = tokenizer.encode(TEXT)
    assert [t.id for t in report] == ids and [t.position for t in report] == list(range(len(ids)))
    assert "".join(t.token for t in report) == TEXT and not any(t.generated for t in report)
    assert report[0].logprob is None and report[0].top == [] and not report[0].low
    with torch.no_grad():
        for t in range(1, len(ids)):  # each prefix alone: the causal model sees exactly the tokens before t
            logp = torch.log_softmax(model(torch.tensor([ids[:t]]))[0, -1], -1)
            best = torch.topk(logp, 3)
            assert report[t].logprob == pytest.approx(logp[ids[t]].item(), abs=1e-5)
            assert [i for i, _, _ in report[t].top] == best.indices.tolist()
            assert [lp for _, _, lp in report[t].top] == pytest.approx(best.values.tolist(), abs=1e-5)
            assert [tok for i, tok, _ in report[t].top] == [tokenizer.decode([i]) for i in best.indices.tolist()]
            assert report[t].low == (logp[ids[t]].exp().item() < 0.1)
    assert any(t.low for t in report[1:])  # a random model is unsure of most of the text
    assert [t.low for t in token_report(model, tokenizer, TEXT, low=0.0)] == [False] * len(ids)
    assert all(t.low for t in token_report(model, tokenizer, TEXT, low=1.0)[1:])


def test_generated_tokens_carry_the_engines_logprobs(tiny):
    _, model, tokenizer = tiny
    report = token_report(model, tokenizer, TEXT, chat=True, generate=5, top=2)
    ids = encode_prompt(tokenizer, TEXT, chat=True)
    (completion,) = complete(model, tokenizer, [ids], SamplingParams(max_new_tokens=5, temperature=0, logprobs=2))
    generated = [t for t in report if t.generated]
    assert [t.id for t in report[: len(ids)]] == ids and len(report) == len(ids) + len(completion.tokens)
    assert [t.position for t in generated] == list(range(len(ids), len(report)))
    assert [(t.id, t.logprob, [(i, lp) for i, _, lp in t.top]) for t in generated] == [
        (out.token, out.logprob, out.top) for out in completion.tokens]
    seq = list(ids)
    with torch.no_grad():
        for t in generated:  # greedy, and the log-prob of the token given everything before it
            logp = torch.log_softmax(model(torch.tensor([seq]))[0, -1], -1)
            assert t.id == logp.argmax().item() and t.logprob == pytest.approx(logp[t.id].item(), abs=1e-4)
            seq.append(t.id)


# ---- logit lens ---------------------------------------------------------------------------------------------


def test_logit_lens_last_layer_is_the_models_output(tiny):
    _, model, tokenizer = tiny
    ids = tokenizer.encode(TEXT)
    lens = logit_lens(model, tokenizer, ids)
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0]  # (T, V)
    assert lens.logits.shape == (3, len(ids), logits.shape[-1]) and lens.ids.shape == (3, len(ids))
    torch.testing.assert_close(lens.logits[-1], logits, atol=1e-5, rtol=1e-5)
    assert lens.ids[-1].tolist() == logits.argmax(-1).tolist()
    assert not torch.allclose(lens.logits[0], logits, atol=1e-2)  # earlier layers read something else
    assert len(lens.tokens) == 3 and all(len(row) == len(ids) for row in lens.tokens)
    assert lens.tokens == [[tokenizer.decode([i], skip_special_tokens=False) for i in row] for row in lens.ids.tolist()]
    assert all(not block._forward_hooks for block in model.decoder)  # the hooks are gone


# ---- attention maps -----------------------------------------------------------------------------------------


def test_attention_map_and_png(tiny, tmp_path):
    _, model, tokenizer = tiny
    ids = tokenizer.encode(TEXT)
    T = len(ids)
    w = attention_map(model, ids, layer=2, head=3)
    assert w.shape == (T, T)
    torch.testing.assert_close(w.sum(-1), torch.ones(T))
    assert torch.all(w.triu(diagonal=1) == 0) and w[0, 0].item() == pytest.approx(1.0)
    assert not torch.allclose(w, attention_map(model, ids, layer=2, head=2))  # heads sharing a kv head differ
    attn = model.decoder[2].attn
    assert attn.keep_weights is False and attn.weights is None  # left as found: the SDPA path
    path = tmp_path / "attn.png"
    size = save_attention_png(w, [tokenizer.decode([i]) for i in ids], path, "layer 2, head 3")
    side = round(figure_inches(T) * PNG_DPI)
    assert size == (side, side) and png_size(path) == size
    with pytest.raises(LmforgeError, match="do not match 3 tokens"):
        save_attention_png(w, ["a", "b", "c"], tmp_path / "x.png")


def test_bad_input_names_the_valid_range(tiny, tmp_path):
    _, model, tokenizer = tiny
    ids = tokenizer.encode(TEXT)
    with pytest.raises(LmforgeError, match=r"layer 3 out of range: .* has layers 0\.\.2$"):
        attention_map(model, ids, layer=3, head=0)
    with pytest.raises(LmforgeError, match=r"head -1 out of range: .* has heads 0\.\.3$"):
        attention_map(model, ids, layer=0, head=-1)
    with pytest.raises(LmforgeError, match="empty text"):
        token_report(model, tokenizer, "")
    with pytest.raises(LmforgeError, match="empty text"):
        logit_lens(model, tokenizer, [])
    with pytest.raises(LmforgeError, match=r"exceed the model's context \(64\)"):
        token_report(model, tokenizer, TEXT, generate=60)
    with pytest.raises(LmforgeError, match=r"low must be a probability in \[0, 1\]"):
        token_report(model, tokenizer, TEXT, low=1.5)
    bert, bert_tokenizer = load(bert_folder(tmp_path / "bert"), dtype="float32")
    with pytest.raises(LmforgeError, match="needs a decoder-only language model; .* is encoder"):
        token_report(bert, bert_tokenizer, "hello")
    with pytest.raises(LmforgeError, match="decoder-only"):
        attention_map(bert, [2, 5, 3], 0, 0)


# ---- CLI ----------------------------------------------------------------------------------------------------


def test_cli_json(tiny, tmp_path, capsys):
    folder, _, _ = tiny
    png = tmp_path / "map.png"
    rc = main(["explain", "--model", str(folder), "--dtype", "float32", TEXT, "--generate", "3", "--top", "2",
               "--low", "0.05", "--lens", "--layer", "1", "--head", "0", "--png", str(png), "--format", "json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and set(out) == {"tokens", "lens", "attention"}
    model, tokenizer = load(folder, dtype="float32")  # the CLI's own weights (transformers' init, not randomized)
    report = token_report(model, tokenizer, TEXT, generate=3, top=2, low=0.05)
    assert out["tokens"] == [t.as_dict() for t in report]
    first, last = out["tokens"][1], out["tokens"][-1]
    assert set(first) == {"position", "id", "token", "logprob", "prob", "generated", "low", "top"}
    assert first["generated"] is False and last["generated"] is True and len(first["top"]) == 2
    assert set(first["top"][0]) == {"id", "token", "logprob"}
    ids = [t.id for t in report]
    assert out["lens"] == logit_lens(model, tokenizer, ids).tokens and len(out["lens"]) == 3
    side = round(figure_inches(len(ids)) * PNG_DPI)
    assert out["attention"] == {"layer": 1, "head": 0, "png": str(png), "width": side, "height": side}
    assert png_size(png) == (side, side)


def test_cli_table_marks_low_tokens(tiny, capsys):
    folder, _, _ = tiny
    rc = main(["explain", "--model", str(folder), "--dtype", "float32", "ab", "--lens"])
    out = capsys.readouterr().out
    assert rc == 0 and "token log-probabilities (red: p < 0.1)" in out and "logit lens" in out


@pytest.mark.parametrize(("args", "message"), [
    (["--layer", "0", "--head", "0"], "error: an attention map needs all of --layer L, --head H and --png FILE"),
    (["--layer", "7", "--head", "0", "--png", "x.png"], "error: layer 7 out of range: llama has layers 0..2"),
    (["--layer", "0", "--head", "4", "--png", "x.png"], "error: head 4 out of range: llama has heads 0..3"),
    (["--system", "be brief"], "error: --system needs --chat"),
])
def test_cli_errors_are_one_line(tiny, capsys, args, message):
    folder, _, _ = tiny
    assert main(["explain", "--model", str(folder), TEXT, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_cli_refuses_empty_text_and_an_encoder(tmp_path, capsys):
    assert main(["explain", "--model", str(bert_folder(tmp_path / "bert")), "hello"]) == 2
    assert "encoder-only" in capsys.readouterr().err
    assert main(["explain", "--model", str(tmp_path / "bert"), ""]) == 2
    assert capsys.readouterr().err == "error: empty text: nothing to explain\n"


# ---- the real model -----------------------------------------------------------------------------------------

PROMPT = "The capital of France is"


@pytest.mark.slow
def test_smollm_generated_logprobs_equal_generate_json_and_png(smollm, smollm_path, tmp_path, capsys):
    model, tokenizer = smollm
    rc = main(["generate", PROMPT, "--model", str(smollm_path), "--temperature", "0", "--max-new-tokens", "6",
               "--format", "json", "--logprobs", "3", "--dtype", "float32"])
    expected = json.loads(capsys.readouterr().out)["tokens"]
    assert rc == 0 and len(expected) == 6
    report = token_report(model, tokenizer, PROMPT, generate=6, top=3)
    generated = [t.as_dict() for t in report if t.generated]
    assert [t["id"] for t in generated] == [t["id"] for t in expected]
    assert [t["token"] for t in generated] == [t["token"] for t in expected]
    assert [t["logprob"] for t in generated] == pytest.approx([t["logprob"] for t in expected], abs=1e-5)
    assert [t["top"] for t in generated] == [
        [{**a, "logprob": pytest.approx(a["logprob"], abs=1e-5)} for a in t["top"]] for t in expected]
    assert "Paris" in "".join(t["token"] for t in generated)

    ids = [t.id for t in report]
    png = tmp_path / "smollm.png"
    size = save_attention_png(attention_map(model, ids, layer=5, head=2), [t.token for t in report], png, "5/2")
    side = round(figure_inches(len(ids)) * PNG_DPI)
    assert size == (side, side) and png_size(png) == (side, side)
