"""The step-driven engine: requests join and leave a running batch, each with its own sampling, seed, stop
strings and logprobs, and what a request generates never depends on what runs beside it."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
from helpers import engine_tokens, manual_greedy

from lmforge.config import ModelConfig
from lmforge.engine import Engine, decode_step
from lmforge.errors import LmforgeError
from lmforge.generate import SamplingParams, complete
from lmforge.model.fast import use_onednn
from lmforge.model.transformer import Transformer
from lmforge.tokenizer import Tokenizer

PROMPTS = [[5, 6, 7, 100, 42], [9, 8, 7, 6, 5, 4, 3, 30, 31, 32, 33, 34, 35], [140], [17, 18, 19, 20, 21, 22, 23]]


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2"])
def tiny(request) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_name(request.param)).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    use_onednn(model, measure=False)  # the swapped path, whichever is faster on this CPU
    return model


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory, byte_tokenizer_writer) -> Tokenizer:
    folder = tmp_path_factory.mktemp("bytetok")
    byte_tokenizer_writer(folder)
    return Tokenizer.from_dir(folder)


def drive(engine: Engine, schedule: dict[int, list[tuple[list[int], SamplingParams]]]) -> dict[int, list[int]]:
    """Step the engine, adding requests at the steps the schedule names; -> request id -> tokens."""
    tokens: dict[int, list[int]] = {}
    step = 0
    while engine.has_work() or any(s >= step for s in schedule):
        for prompt, params in schedule.get(step, []):
            tokens[engine.add(prompt, params)] = []
        for out in engine.step():
            if out.token is not None:
                tokens[out.request_id].append(out.token)
        step += 1
    return tokens


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0)


@pytest.mark.parametrize("chunk", [512, 3])
def test_requests_joining_at_different_steps_get_their_solo_greedy_tokens(tiny, chunk):
    engine = Engine(tiny, max_batch=3, eos_ids=[], prefill_chunk=chunk)  # 5 requests, 3 slots: queue + reuse
    schedule = {0: [(PROMPTS[0], greedy(12))], 2: [(PROMPTS[1], greedy(6)), (PROMPTS[2], greedy(9))],
                5: [(PROMPTS[3], greedy(10)), (PROMPTS[0], greedy(4))]}
    got = drive(engine, schedule)
    requests = [r for s in sorted(schedule) for r in schedule[s]]
    for rid, (prompt, params) in enumerate(requests):
        assert got[rid] == manual_greedy(tiny, prompt, params.max_new_tokens), rid
    assert engine.cache is not None and engine.cache.n_free == 3 and not engine.running


def test_seeded_sampling_is_batch_invariant(tiny):
    params = SamplingParams(max_new_tokens=20, temperature=1.2, top_p=0.95, seed=7)
    (alone,) = engine_tokens(tiny, [PROMPTS[1]], eos_ids=[], **vars(params))
    others = {0: [(PROMPTS[0], SamplingParams(max_new_tokens=25, temperature=0.8, seed=1)),
                  (PROMPTS[2], SamplingParams(max_new_tokens=5, temperature=0))],
              3: [(PROMPTS[1], params), (PROMPTS[3], SamplingParams(max_new_tokens=30, temperature=1.5, top_k=5))]}
    got = drive(Engine(tiny, max_batch=4, eos_ids=[]), others)
    assert got[2] == alone
    assert alone != manual_greedy(tiny, PROMPTS[1], 20)
    # seed 0 is a seed like any other (not "no seed")
    zero = SamplingParams(max_new_tokens=20, temperature=1.5, seed=0)
    first = engine_tokens(tiny, [PROMPTS[0]], eos_ids=[], **vars(zero))
    assert first == engine_tokens(tiny, [PROMPTS[0]], eos_ids=[], **vars(zero))
    assert first != engine_tokens(tiny, [PROMPTS[0]], eos_ids=[], **(vars(zero) | {"seed": 1}))
    unseeded = SamplingParams(max_new_tokens=20, temperature=1.5)
    assert engine_tokens(tiny, [PROMPTS[0]], eos_ids=[], **vars(unseeded)) != engine_tokens(
        tiny, [PROMPTS[0]], eos_ids=[], **vars(unseeded))


def test_repetition_penalty_in_a_batch_equals_one_by_one(tiny):
    kw = dict(max_new_tokens=16, temperature=0, repetition_penalty=1.5)
    batched = engine_tokens(tiny, PROMPTS, eos_ids=[], **kw)
    for prompt, row in zip(PROMPTS, batched, strict=True):
        assert row == engine_tokens(tiny, [prompt], eos_ids=[], **kw)[0]
    assert batched != engine_tokens(tiny, PROMPTS, eos_ids=[], max_new_tokens=16, temperature=0)


def test_abort_frees_the_slot(tiny):
    engine = Engine(tiny, max_batch=1, eos_ids=[])
    a = engine.add(PROMPTS[0], greedy(50))
    b = engine.add(PROMPTS[1], greedy(3))
    for _ in range(3):
        assert {o.request_id for o in engine.step()} == {a}  # b waits for the only slot
    assert engine.abort(a) and not engine.abort(a)
    outs = []
    while engine.has_work():
        outs += engine.step()
    assert {o.request_id for o in outs} == {b}
    assert [o.token for o in outs] == manual_greedy(tiny, PROMPTS[1], 3)
    assert engine.cache is not None and engine.cache.n_free == 1
    # aborting a waiting request works too
    c = engine.add(PROMPTS[2], greedy(3))
    assert engine.abort(c) and not engine.has_work()


def live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on every object touches deprecated torch attributes
        warnings.simplefilter("ignore")
        return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())


def test_many_joins_and_leaves_do_not_grow_memory(tiny):
    engine = Engine(tiny, max_batch=3, eos_ids=[])

    def wave(n: int) -> None:
        for i in range(n):
            engine.add(PROMPTS[i % 4], SamplingParams(max_new_tokens=1 + i % 5, temperature=0.5, seed=i))
            engine.step()
        while engine.has_work():
            engine.step()

    wave(30)
    cache = engine.cache
    assert cache is not None
    buffers = (cache.k.data_ptr(), cache.v.data_ptr(), cache.k.shape)
    tensors = live_tensors()
    wave(60)
    assert engine.cache is cache and (cache.k.data_ptr(), cache.v.data_ptr(), cache.k.shape) == buffers
    assert not engine.running and not engine.waiting and cache.n_free == 3
    assert live_tensors() <= tensors


def test_stop_string_cuts_text_and_ends_the_row(tiny, byte_tok):
    prompt = byte_tok.encode("hello")
    (full,) = complete(tiny, byte_tok, [prompt], SamplingParams(max_new_tokens=24, temperature=0), eos_ids=[])
    text = full.text
    assert len(text) >= 12 and full.finish_reason == "length"
    stop = text[6:9]
    cut_at = text.find(stop)
    (cut,) = complete(tiny, byte_tok, [prompt], SamplingParams(max_new_tokens=24, temperature=0, stop=[stop]),
                      eos_ids=[])
    assert cut.text == text[:cut_at] and cut.finish_reason == "stop"
    assert cut.usage.completion_tokens < 24  # the row stopped decoding when the stop string appeared
    # streamed deltas add up to the same text, and never show a piece of the stop string
    engine = Engine(tiny, byte_tok, eos_ids=[])
    engine.add(prompt, SamplingParams(max_new_tokens=24, temperature=0, stop=[stop]))
    deltas = []
    while engine.has_work():
        deltas += [o.text for o in engine.step()]
    assert "".join(deltas) == cut.text


def test_logprobs_are_log_softmax_of_raw_logits(tiny):
    params = SamplingParams(max_new_tokens=6, temperature=0.9, repetition_penalty=1.3, seed=3, logprobs=4)
    (done,) = complete(tiny, None, [PROMPTS[0]], params, eos_ids=[])
    seq = list(PROMPTS[0])
    for out in done.tokens:
        with torch.no_grad():
            logp = torch.log_softmax(tiny(torch.tensor([seq]))[0, -1].float(), -1)
        assert out.logprob == pytest.approx(logp[out.token].item(), abs=1e-4)
        best = torch.topk(logp, 4)
        assert [i for i, _ in out.top] == best.indices.tolist()
        assert [lp for _, lp in out.top] == pytest.approx(best.values.tolist(), abs=1e-4)
        seq.append(out.token)


def test_context_and_budget(tiny):
    ctx = tiny.cfg.max_seq_len
    (done,) = complete(tiny, None, [list(range(3, ctx - 2))], greedy(50), eos_ids=[])
    assert done.finish_reason == "length" and len(done.tokens) == 5  # the context caps the budget
    with pytest.raises(LmforgeError, match="vocabulary"):
        Engine(tiny).add([1, 2, 9999])


def test_encoder_models_cannot_generate():
    cfg = ModelConfig(family="encoder", vocab_size=32, d_model=16, n_layer=1, n_head=2, d_ff=32, max_seq_len=16,
                      pos="learned", norm="layer")
    with pytest.raises(LmforgeError, match="encoder-only"):
        Engine(Transformer(cfg))


def test_decode_step_compiles_without_graph_breaks(tiny):
    engine = Engine(tiny, max_batch=2, eos_ids=[])
    engine.add(PROMPTS[0], greedy(5))
    engine.add(PROMPTS[1], greedy(5))
    engine.step()
    assert engine.cache is not None
    tokens = torch.tensor([[3], [4]])
    positions = torch.tensor([[len(PROMPTS[0])], [len(PROMPTS[1])]])
    step = engine.cache.step(0, positions, kv_len=len(PROMPTS[1]) + 1)
    with torch.inference_mode():  # as the engine runs it (its cache is an inference tensor)
        explanation = torch._dynamo.explain(decode_step)(tiny, tokens, positions, step)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()


def test_cache_grows_under_running_rows(tiny):
    """A request longer than the cache so far arrives mid-run: the cache grows, the running row keeps its state."""
    engine = Engine(tiny, max_batch=2, eos_ids=[])
    long_prompt = [(7 * i) % 250 + 3 for i in range(100)]
    got: dict[int, list[int]] = {engine.add(PROMPTS[0], greedy(12)): []}
    for step in range(40):
        if step == 3:
            assert engine.cache is not None and engine.cache.max_len < 110  # sized for the first request only
            got[engine.add(long_prompt, greedy(10))] = []
        for out in engine.step():
            got[out.request_id].append(out.token)
    assert not engine.has_work() and engine.cache.max_len >= 110
    assert got[0] == manual_greedy(tiny, PROMPTS[0], 12)
    assert got[1] == manual_greedy(tiny, long_prompt, 10)
