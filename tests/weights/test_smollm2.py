"""The real shipped SmolLM2-135M-Instruct (Q4_1 GGUF): ours against transformers reading the same file."""

from __future__ import annotations

import pytest
import torch
from helpers import engine_tokens
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmforge.generate import SamplingParams, generate
from lmforge.weights.load import export_hf, load

pytestmark = pytest.mark.slow

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a terse assistant. Answer in one sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
    [
        {"role": "user", "content": "Write a Python function that adds two numbers."},
        {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
        {"role": "user", "content": "Now make it add three numbers."},
    ],
]


@pytest.fixture(scope="module")
def prompts(smollm):
    _, tok = smollm
    return [tok.encode(tok.apply_chat_template(c), add_special_tokens=False) for c in CHATS]


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():  # eos_token_id=None: run the full n steps, like ours with eos_ids=[]
        out = hf.generate(
            x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=2
        )
    assert out.shape[1] == len(ids) + n
    return out[0, len(ids) :].tolist()


def test_prompts_render_like_transformers(smollm, hf_smollm_tokenizer, prompts):
    _, tok = smollm
    for chat, ids in zip(CHATS, prompts, strict=True):
        text = hf_smollm_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert tok.apply_chat_template(chat) == text
        assert hf_smollm_tokenizer(text, add_special_tokens=False).input_ids == ids
        assert ids[0] == tok.token_id("<|im_start|>") and text.endswith("<|im_start|>assistant\n")


def test_logits_match_transformers(smollm, hf_smollm, prompts):
    model, _ = smollm
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.no_grad():
            theirs = hf_smollm(x).logits[0]
        ours = model(x)[0]
        assert ours.shape == theirs.shape == (len(ids), 49152)
        assert (ours - theirs).abs().max().item() <= 1e-3
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_greedy_matches_transformers(smollm, hf_smollm, prompts):
    model, tok = smollm
    rows = engine_tokens(model, prompts, eos_ids=[], max_new_tokens=48, temperature=0)
    for ours, ids in zip(rows, prompts, strict=True):
        assert ours == hf_greedy(hf_smollm, ids, 48)
    first = tok.decode(rows[0])
    assert "Paris" in first


def test_chat_greedy_answer(smollm):
    model, tok = smollm
    ids = tok.encode(tok.apply_chat_template(CHATS[0]), add_special_tokens=False)
    (text,) = generate(model, tok, [ids], SamplingParams(max_new_tokens=24, temperature=0))
    assert "Paris" in text
    assert "<|im_end|>" not in text  # generation ends on EOS (<|im_end|>) and never shows it


def test_hf_export_loads_in_transformers(smollm, hf_smollm_tokenizer, prompts, tmp_path_factory):
    model, tok = smollm
    folder = tmp_path_factory.mktemp("smollm2-export")
    export_hf(model, tok, folder)
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    their_tok = AutoTokenizer.from_pretrained(folder)
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.no_grad():
            exported = theirs(x).logits[0]
        assert (exported - model(x)[0]).abs().max().item() <= 1e-3  # the bound for the real weights
    texts = ["Hello world!", "def f(x):\n\treturn x  # 12345", "Café 東京 🤖", "<|im_start|>user\nhi<|im_end|>"]
    for text in texts:
        assert their_tok(text).input_ids == hf_smollm_tokenizer(text).input_ids == tok.encode(text)
        assert their_tok.decode(tok.encode(text)) == text
    for chat in CHATS:
        for gen in (True, False):
            want = hf_smollm_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert their_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen) == want
    assert their_tok.eos_token == "<|im_end|>" and their_tok.bos_token == tok.bos_token
    del theirs
    # and we load our own export back to the same model
    back, back_tok = load(folder)
    x = torch.tensor([prompts[0]])
    assert (back(x) - model(x)).abs().max().item() <= 1e-5
    assert back_tok.apply_chat_template(CHATS[2]) == tok.apply_chat_template(CHATS[2])


def test_bf16_load_and_generate(smollm_path):
    model, tok = load(smollm_path, "bf16")
    assert model.tok_emb.weight.dtype == torch.bfloat16
    assert model(torch.tensor([[1, 2, 3]])).dtype == torch.bfloat16
    (text,) = generate(model, tok, ["The capital of France is"], SamplingParams(max_new_tokens=8, temperature=0))
    assert "Paris" in text
    ids = tok.encode(tok.apply_chat_template(CHATS[0]), add_special_tokens=False)
    (answer,) = generate(model, tok, [ids], SamplingParams(max_new_tokens=24, temperature=0))
    assert "Paris" in answer


def test_requests_joining_a_running_batch_keep_their_solo_greedy_tokens(smollm, prompts):
    """The engine as a server drives it: requests arrive while others decode, one leaves early on max tokens;
    each gets exactly the tokens it gets alone."""
    from lmforge.engine import Engine

    model, _ = smollm
    lengths = [24, 8, 16]
    solo = [engine_tokens(model, [ids], eos_ids=[], max_new_tokens=n, temperature=0)[0]
            for ids, n in zip(prompts, lengths, strict=True)]
    engine = Engine(model, max_batch=3, eos_ids=[], prefill_chunk=16)
    got: dict[int, list[int]] = {}
    for step in range(60):
        if step in (0, 3, 5):
            i = (0, 3, 5).index(step)
            got[engine.add(prompts[i], SamplingParams(max_new_tokens=lengths[i], temperature=0))] = []
        for out in engine.step():
            got[out.request_id].append(out.token)
        if not engine.has_work():
            break
    assert [got[i] for i in sorted(got)] == solo
