"""The generation loop and sampling: greedy, seeds, top-k/top-p, repetition penalty, stop strings,
streaming text, EOS, max_new_tokens, context overflow and parameter checks."""

from __future__ import annotations

import pytest
import torch
from helpers import engine_tokens, manual_greedy

from lmforge.config import ModelConfig
from lmforge.engine import Engine
from lmforge.errors import LmforgeError
from lmforge.generate import SamplingParams, TextStream, complete, generate, sample, stream
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import Tokenizer

PROMPT = [5, 6, 7, 100, 42]


@pytest.fixture(scope="module")
def tiny() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig.from_name("tiny-llama")  # vocab 256, context 128, eos 2
    return Transformer(cfg).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory, byte_tokenizer_writer) -> Tokenizer:
    folder = tmp_path_factory.mktemp("bytetok")
    byte_tokenizer_writer(folder)
    return Tokenizer.from_dir(folder)


def run(model, prompts, eos_ids=(), **kw) -> list[list[int]]:
    """Per row, the tokens generated (up to, not including, EOS)."""
    return engine_tokens(model, prompts, eos_ids=list(eos_ids), **kw)


# ---- decoding strategies on the tiny model ---------------------------------------------------


def test_temperature_zero_is_argmax(tiny):
    (tokens,) = run(tiny, [PROMPT], max_new_tokens=12, temperature=0)
    assert tokens == manual_greedy(tiny, PROMPT, 12)


def test_seeds(tiny):
    kw = dict(max_new_tokens=20, temperature=1.5)
    a = run(tiny, [PROMPT], seed=123, **kw)
    assert a == run(tiny, [PROMPT], seed=123, **kw)
    b = run(tiny, [PROMPT], seed=124, **kw)
    assert a != b
    assert a[0] != manual_greedy(tiny, PROMPT, 20)  # sampling, not greedy
    assert len(set(a[0])) > 5


def test_top_k_one_and_tiny_top_p_are_greedy(tiny):
    greedy = manual_greedy(tiny, PROMPT, 15)
    for seed in (0, 1):
        assert run(tiny, [PROMPT], max_new_tokens=15, temperature=1.0, top_k=1, seed=seed) == [greedy]
        assert run(tiny, [PROMPT], max_new_tokens=15, temperature=1.0, top_p=1e-6, seed=seed) == [greedy]


def test_repetition_penalty_changes_generation(tiny):
    plain = run(tiny, [PROMPT], max_new_tokens=24, temperature=0)[0]
    assert len(set(plain)) < len(plain)  # the random model repeats itself greedily
    penalised = run(tiny, [PROMPT], max_new_tokens=24, temperature=0, repetition_penalty=100.0)[0]
    assert penalised != plain
    assert len(set(penalised)) == len(penalised)  # a huge penalty never repeats a token
    assert not set(penalised) & set(PROMPT)  # prompt tokens count as seen too


# ---- sample() on hand-made logits --------------------------------------------------------------


def test_sample_repetition_penalty_exact():
    p = SamplingParams(temperature=0, repetition_penalty=2.0)
    logits = torch.tensor([[2.0, 1.9, -1.0, 0.5], [2.0, 1.9, -1.0, 0.5]])
    history = torch.tensor([[0, 0], [3, 2]])
    # row 0: 2.0 / 2 = 1.0 < 1.9 -> token 1; row 1: the seen tokens were not the best anyway -> 0
    assert sample(logits, history, p, None).tolist() == [1, 0]
    assert sample(logits, history, SamplingParams(temperature=0), None).tolist() == [0, 0]
    # negative logits are multiplied, not divided, so a penalty always lowers them
    neg = torch.tensor([[-0.5, -0.6, -3.0]])
    assert sample(neg, torch.tensor([[0]]), p, None).tolist() == [1]
    assert sample(neg, torch.tensor([[2]]), p, None).tolist() == [0]
    # a penalty below 1 favours seen tokens
    assert sample(torch.tensor([[1.0, 1.5]]), torch.tensor([[0]]), SamplingParams(temperature=0,
                  repetition_penalty=0.5), None).tolist() == [0]


def _draws(probs: list[float], n: int, **kw) -> torch.Tensor:
    logits = torch.tensor(probs).log()[None].expand(n, -1).contiguous()
    history = torch.zeros(n, 1, dtype=torch.long)
    return sample(logits, history, SamplingParams(temperature=kw.pop("temperature", 1.0), **kw),
                  torch.Generator().manual_seed(0))


def test_sample_top_k_top_p_exact():
    probs = [0.5, 0.3, 0.15, 0.05]
    assert set(_draws(probs, 4000, top_k=2).tolist()) == {0, 1}
    assert set(_draws(probs, 4000, top_p=0.6).tolist()) == {0, 1}
    assert set(_draws(probs, 4000, top_p=0.5).tolist()) == {0}  # the first token alone reaches 0.5
    assert set(_draws(probs, 4000, top_p=0.85).tolist()) == {0, 1, 2}
    assert set(_draws(probs, 4000).tolist()) == {0, 1, 2, 3}
    assert set(_draws(probs, 100, temperature=0, top_k=3, top_p=0.9).tolist()) == {0}


def test_sample_follows_probabilities():
    draws = _draws([0.5, 0.3, 0.15, 0.05], 20000)
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.02)
    # a high temperature flattens, a low one sharpens
    hot = torch.bincount(_draws([0.5, 0.3, 0.15, 0.05], 20000, temperature=10.0), minlength=4).float() / 20000
    cold = torch.bincount(_draws([0.5, 0.3, 0.15, 0.05], 20000, temperature=0.2), minlength=4).float() / 20000
    assert hot[3] > 0.15 and cold[0] > 0.9


# ---- EOS, lengths, context ---------------------------------------------------------------------


def test_eos_ends_generation(tiny):
    full = run(tiny, [PROMPT], max_new_tokens=30, temperature=0)[0]
    # the first token that is new at its step: as EOS, generation must end right there
    k = next(i for i in range(1, len(full)) if full[i] not in full[:i])
    eos = full[k]
    (ended,) = run(tiny, [PROMPT], eos_ids=[eos], max_new_tokens=30, temperature=0)
    assert ended == full[:k]
    # the config's EOS ids are the default
    tiny.cfg.eos_token_ids, saved = [eos], tiny.cfg.eos_token_ids
    try:
        (done,) = complete(tiny, None, [PROMPT], SamplingParams(max_new_tokens=30, temperature=0))
        (ignored,) = complete(tiny, None, [PROMPT], SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True))
    finally:
        tiny.cfg.eos_token_ids = saved
    assert [o.token for o in done.tokens] == full[:k] and done.finish_reason == "eos"
    assert done.usage.completion_tokens == k and done.usage.prompt_tokens == len(PROMPT)
    assert [o.token for o in ignored.tokens] == full and ignored.finish_reason == "length"


def test_eos_in_a_batch_ends_only_that_row(tiny):
    other = [9, 8, 7, 6, 5, 4, 3, 30, 31]
    full = run(tiny, [PROMPT, other], max_new_tokens=20, temperature=0)
    k = next(i for i in range(1, 20) if full[0][i] not in full[0][:i] and full[0][i] not in full[1])
    rows = run(tiny, [PROMPT, other], eos_ids=[full[0][k]], max_new_tokens=20, temperature=0)
    assert rows[0] == full[0][:k]
    assert rows[1] == full[1]


def test_max_new_tokens(tiny):
    for n in (1, 7, 33):
        (tokens,) = run(tiny, [PROMPT], max_new_tokens=n, temperature=0.8, seed=1)
        assert len(tokens) == n and all(isinstance(t, int) and 0 <= t < 256 for t in tokens)
    # the context caps it: 120 prompt tokens in a 128-token context leave room for 8
    (tokens,) = run(tiny, [list(range(3, 123))], max_new_tokens=50, temperature=0)
    assert len(tokens) == 8
    # ... per row: a long neighbour in the batch does not shorten a short prompt's answer
    short = run(tiny, [[5, 6, 7]], max_new_tokens=50, temperature=0)[0]
    batched = run(tiny, [list(range(3, 123)), [5, 6, 7]], max_new_tokens=50, temperature=0)
    assert [[t for t in row if t is not None] for row in batched] == [tokens, short]
    assert len(short) == 50


def test_context_overflow(tiny):
    ctx = tiny.cfg.max_seq_len
    long_prompt = [(i * 7) % 250 + 3 for i in range(ctx + 50)]
    with pytest.raises(LmforgeError, match="context"):
        run(tiny, [long_prompt], max_new_tokens=10, temperature=0)
    with pytest.raises(LmforgeError, match="context"):
        run(tiny, [long_prompt[:ctx]], max_new_tokens=10, temperature=0)
    assert len(run(tiny, [long_prompt[: ctx - 1]], max_new_tokens=10, temperature=0)[0]) == 1
    steps = run(tiny, [long_prompt], max_new_tokens=10, temperature=0, truncate=True)[0]
    assert len(steps) == 10
    # truncation keeps the newest tokens, leaving room for the whole answer
    kept = long_prompt[-(ctx - 10) :]
    assert steps == run(tiny, [kept], max_new_tokens=10, temperature=0)[0]
    # a prompt that fits but leaves too little room is cut too when truncation is asked for
    almost = long_prompt[: ctx - 5]
    cut = run(tiny, [almost], max_new_tokens=10, temperature=0, truncate=True)[0]
    assert cut == run(tiny, [almost[-(ctx - 10) :]], max_new_tokens=10, temperature=0)[0] and len(cut) == 10
    with pytest.raises(LmforgeError, match="context"):
        tiny(torch.tensor([long_prompt]))


@pytest.mark.parametrize(
    "bad",
    [
        dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(max_new_tokens=0), dict(max_new_tokens=-3),
        dict(top_k=-1), dict(repetition_penalty=0.0), dict(stop=[""]),
    ],
)
def test_bad_params(tiny, bad):
    with pytest.raises(LmforgeError):
        Engine(tiny).add(PROMPT, SamplingParams(**bad))


def test_empty_prompt(tiny):
    with pytest.raises(LmforgeError, match="empty"):
        Engine(tiny).add([], SamplingParams(max_new_tokens=3))


def test_text_api_on_tiny_model(tiny, byte_tok):
    params = SamplingParams(max_new_tokens=16, temperature=0)
    ids = byte_tok.encode("hello")
    assert ids == list(b"hello")
    (text,) = generate(tiny, byte_tok, ["hello"], params)
    assert text == byte_tok.decode(manual_greedy(tiny, ids, 16))
    assert "".join(stream(tiny, byte_tok, "hello", params)) == text
    batch = generate(tiny, byte_tok, ["hello", "a much longer prompt here"], params)
    assert batch[0] == text
    assert batch[1] == generate(tiny, byte_tok, ["a much longer prompt here"], params)[0]


# ---- TextStream with the real tokenizer --------------------------------------------------------


def push_all(tok, text: str, stop: list[str]) -> tuple[list[str], TextStream]:
    ts = TextStream(tok, stop)
    deltas = []
    for i in tok.encode(text, add_special_tokens=False):
        deltas.append(ts.push(i))
        if ts.stopped:
            break
    deltas.append(ts.finish())
    return deltas, ts


@pytest.mark.slow
def test_stop_strings_cut_text(smollm_tokenizer):
    tok = smollm_tokenizer
    text = "Sure! The answer is 42.\n\nUser: and now something else entirely"
    deltas, ts = push_all(tok, text, ["\n\nUser:"])
    assert "".join(deltas) == ts.text == "Sure! The answer is 42."
    assert ts.stopped
    # the earliest of several stop strings wins; a stop inside one token is cut too
    deltas, ts = push_all(tok, text, ["something", "42"])
    assert "".join(deltas) == "Sure! The answer is "
    deltas, ts = push_all(tok, "abcdefgh", ["def"])
    assert "".join(deltas) == "abc"
    # a partial match is held back, then released when it does not complete
    deltas, ts = push_all(tok, "the END is not ENDING", ["ENDX"])
    assert "".join(deltas) == "the END is not ENDING" and not ts.stopped
    # no stop strings: everything comes out
    deltas, ts = push_all(tok, text, [])
    assert "".join(deltas) == text


@pytest.mark.slow
def test_stream_deltas_with_multibyte_text(smollm_tokenizer):
    tok = smollm_tokenizer
    for text in ["Hi 🤖🚀 東京は日本の首都です。 naïve 👨‍👩‍👧 done", "🇫🇷", "中文和English混合 ∑ π ≈ 3.14"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert len(ids) > len(text.split())  # some characters span several tokens
        ts = TextStream(tok, [])
        deltas = [ts.push(i) for i in ids] + [ts.finish()]
        assert all("\ufffd" not in d for d in deltas)
        assert "".join(deltas) == tok.decode(ids) == text


@pytest.mark.slow
def test_stop_string_in_real_generation(smollm):
    model, tok = smollm
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]),
                     add_special_tokens=False)
    (full,) = generate(model, tok, [ids], SamplingParams(max_new_tokens=24, temperature=0))
    assert "Paris" in full
    (cut,) = generate(model, tok, [ids], SamplingParams(max_new_tokens=24, temperature=0, stop=["Paris"]))
    assert cut == full[: full.index("Paris")]
    assert "".join(stream(model, tok, ids, SamplingParams(max_new_tokens=24, temperature=0, stop=["Paris"]))) == cut
