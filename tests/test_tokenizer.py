"""Our tokenizer built from the SmolLM2 GGUF metadata against transformers' tokenizer from the same file."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's what we've done, isn't it? You'd think so.",
    "def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))",
    "for (int i = 0; i < n; ++i) { sum += x[i] * 2; }  // C++",
    "\tindented\twith\ttabs\t\t",
    "multiple    spaces   here  and trailing   ",
    "   leading spaces",
    "line one\nline two\n\n\nline five\n",
    "windows\r\nline\r\nendings\r\n",
    "digits 12345 and 3.14159 and 1,000,000 and 007",
    "Café, naïve, résumé, Ångström, Straße, São Paulo, Zürich",
    "emoji 🤖🚀 and family 👨‍👩‍👧 and flags 🇫🇷🇯🇵",
    "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.",
    "Привет, мир! Γειά σου Κόσμε! مرحبا بالعالم",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "text with <|im_start|> inside and <|endoftext|> too",
    "<|im_end|><|im_end|>",
    "mixed\t \n \r\n\t  whitespace",
    "",
    " ",
    "a",
    "URL: https://example.com/path?q=1&r=two#frag and email a.b@c.org",
    "Math: ∑_{i=1}^{n} i² = n(n+1)/2 ≈ ∞ ≠ π",
    'JSON {"key": [1, 2, {"nested": null}], "ok": true}',
]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_identical(smollm_tokenizer, hf_smollm_tokenizer, text):
    ours = smollm_tokenizer.encode(text)
    theirs = hf_smollm_tokenizer(text).input_ids
    assert ours == theirs
    assert smollm_tokenizer.encode(text, add_special_tokens=False) == hf_smollm_tokenizer(
        text, add_special_tokens=False
    ).input_ids


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trip(smollm_tokenizer, hf_smollm_tokenizer, text):
    ids = smollm_tokenizer.encode(text)
    assert smollm_tokenizer.decode(ids, skip_special_tokens=False) == text
    assert smollm_tokenizer.decode(ids, skip_special_tokens=False) == hf_smollm_tokenizer.decode(
        ids, skip_special_tokens=False
    )
    assert smollm_tokenizer.decode(ids) == hf_smollm_tokenizer.decode(ids, skip_special_tokens=True)


def test_known_ids(smollm_tokenizer):
    tok = smollm_tokenizer
    assert tok.vocab_size == 49152
    assert tok.token_id("<|im_start|>") == 1 == tok.bos_id
    assert tok.token_id("<|im_end|>") == 2 == tok.eos_id
    assert tok.encode("<|im_start|>") == [1]
    assert tok.encode("12345") == [33, 34, 35, 36, 37]  # digits one by one
    assert tok.encode("hello world") == [28120, 905]
    assert tok.decode([1, 28120, 905, 2]) == "hello world"
    assert tok.decode([1, 28120, 905, 2], skip_special_tokens=False) == "<|im_start|>hello world<|im_end|>"


def test_encode_batch(smollm_tokenizer):
    texts = TEXTS[:6]
    assert smollm_tokenizer.encode_batch(texts) == [smollm_tokenizer.encode(t) for t in texts]
    assert smollm_tokenizer.encode_batch(texts, max_length=3) == [smollm_tokenizer.encode(t)[:3] for t in texts]


CHATS = {
    "system+user": [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Where is the treasure?"},
    ],
    "user only": [{"role": "user", "content": "Hi! 你好 🤖\nSecond line."}],
    "multi-turn": [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And times 3?"},
    ],
    "system+multi-turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one."},
        {"role": "assistant", "content": "Red."},
    ],
}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", list(CHATS))
def test_chat_template_matches(smollm_tokenizer, hf_smollm_tokenizer, name, add_generation_prompt):
    messages = CHATS[name]
    ours = smollm_tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_smollm_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours == theirs
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt
    ids = hf_smollm_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 may return a BatchEncoding
        ids = ids["input_ids"]
    assert smollm_tokenizer.encode(ours, add_special_tokens=False) == list(ids)


def test_default_system_prompt(smollm_tokenizer):
    text = smollm_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    with_system = smollm_tokenizer.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}], add_generation_prompt=False
    )
    assert with_system == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"


def test_bad_messages(smollm_tokenizer):
    from lmforge.errors import LmforgeError

    with pytest.raises(LmforgeError):
        smollm_tokenizer.apply_chat_template([{"content": "no role"}])
