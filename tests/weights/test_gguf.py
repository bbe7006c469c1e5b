"""GGUF loading (llama architecture): a tiny random Llama written the way llama.cpp's convert_hf_to_gguf writes
it (permuted q/k rows, F32 norms, byte-level BPE vocabulary in metadata), once per 2-D weight type, checked
against transformers reading the same file, against gguf-py's dequantizer and against the fp32 original."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer
from lmforge.weights.gguf import metadata, open_gguf
from lmforge.weights.load import load

T = GGMLQuantizationType
TYPES = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q6_K]
# max |logit - fp32 original| per type, for logits of order 1 (max ~1.4); measured errors are about half of these:
# F16 4e-4, BF16 3e-3, Q8_0 0.011, Q4_0 0.16, Q4_1 0.15, Q4_K 0.17, Q6_K 0.035
FP32_TOL = {T.F32: 1e-6, T.F16: 1e-3, T.BF16: 1e-2, T.Q8_0: 3e-2, T.Q4_0: 0.3, T.Q4_1: 0.3, T.Q4_K: 0.3, T.Q6_K: 0.08}

N_HEAD, N_KV_HEAD, HEAD_DIM, N_LAYER, D_MODEL = 4, 2, 64, 2, 256
CONTEXT, ROPE_BASE, EPS = 3072, 50000.0, 1e-5

# ---- the vocabulary: 256 byte tokens (id = byte), a few real GPT-2 merges, then control/user tokens ----------

B2U = bytes_to_unicode()
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ w", "o r", "l l", "Ġ s", "1 2", "Ġ 1", "Ġa n", "e s"]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # token type 3 (control)
USER = ["<think>"]  # token type 4 (user-defined)
TOKENS = [B2U[b] for b in range(256)] + [m.replace(" ", "") for m in MERGES] + SPECIAL + USER
TOKEN_TYPES = [1] * (256 + len(MERGES)) + [3] * len(SPECIAL) + [4] * len(USER)
BOS, EOS = TOKENS.index("<|endoftext|>"), TOKENS.index("<|im_end|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEXTS = [
    "Hello world, the weather in 2024 is 12345 degrees.",
    "the answer and the other one: an ant, a wasp, some spin",
    "<|im_start|>user\nhi there<|im_end|>\n<think>ok</think>",
    "naïve café — 日本語 🙂\n\n\ttabs  and   spaces ",
    "I'm sure they'll say 'we've won' ...!!",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": " Why is the sky blue? "},
        {"role": "assistant", "content": "Rayleigh scattering."},
        {"role": "user", "content": "Thanks"},
    ],
]

# ---- K-quant round-to-nearest quantizers (gguf-py only dequantizes these), following ggml's block layouts ---


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros(np.broadcast_shapes(a.shape, b.shape), np.float32), where=b > 0)


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """Q4_K: blocks of 256 = 8 sub-blocks of 32, x = d*sc*q - dmin*m with 6-bit sc/m and 4-bit q; 144 bytes:
    fp16 d, fp16 dmin, 12 bytes of packed scales/mins, 128 bytes of nibbles (byte j of chunk c holds
    sub-block 2c's element j low and sub-block 2c+1's high)."""
    rows = w.shape[0]
    x = w.astype(np.float32).reshape(-1, 8, 32)
    nb = x.shape[0]
    lo = np.minimum(x.min(-1), 0)
    scale, mn = (x.max(-1) - lo) / 15, -lo
    d = (scale.max(-1, keepdims=True) / 63).astype(np.float16)
    dmin = (mn.max(-1, keepdims=True) / 63).astype(np.float16)
    sc = np.clip(np.round(_div(scale, d.astype(np.float32))), 0, 63).astype(np.uint8)
    m = np.clip(np.round(_div(mn, dmin.astype(np.float32))), 0, 63).astype(np.uint8)
    eff_scale = (d.astype(np.float32) * sc)[..., None]
    eff_min = (dmin.astype(np.float32) * m)[..., None]
    q = np.clip(np.round(_div(x + eff_min, eff_scale)), 0, 15).astype(np.uint8)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(nb, 128)
    packed = np.empty((nb, 12), np.uint8)
    packed[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    blocks = np.concatenate([d.view(np.uint8), dmin.view(np.uint8), packed, qs], axis=1)
    return blocks.reshape(rows, -1)


def quantize_q6_k(w: np.ndarray) -> np.ndarray:
    """Q6_K: blocks of 256 = 16 sub-blocks of 16, x = d*sc*(q-32) with int8 sc and 6-bit q; 210 bytes: 128 bytes
    ql (low nibbles), 64 bytes qh (2 high bits), 16 int8 scales, fp16 d."""
    rows = w.shape[0]
    x = w.astype(np.float32).reshape(-1, 16, 16)
    nb = x.shape[0]
    scale = np.abs(x).max(-1) / 31
    d = (scale.max(-1, keepdims=True) / 127).astype(np.float16)
    sc = np.clip(np.round(_div(scale, d.astype(np.float32))), -128, 127).astype(np.int8)
    eff = (d.astype(np.float32) * sc)[..., None]
    q = (np.clip(np.round(_div(x, eff)), -32, 31) + 32).astype(np.uint8).reshape(nb, 256)
    low = (q & 0xF).reshape(nb, 2, 2, 64)  # element h*128 + k*64 + j: byte h*64 + j, nibble k
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(nb, 128)
    high = (q >> 4).reshape(nb, 2, 4, 32)  # element h*128 + k*32 + j: byte h*32 + j, bits 2k..2k+1
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(nb, 64)
    blocks = np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8)], axis=1)
    return blocks.reshape(rows, -1)


def encode(w: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """One 2-D weight in the file's representation for `qtype`."""
    if qtype == T.Q4_K:
        return quantize_q4_k(w)
    if qtype == T.Q6_K:
        return quantize_q6_k(w)
    return quantize(np.ascontiguousarray(w, np.float32), qtype)


# ---- writing a GGUF like llama.cpp's converter -----------------------------------------------------------------


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.LlamaModel.permute: each head's rotary halves interleaved row by row."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(hf: LlamaForCausalLM) -> dict[str, np.ndarray]:
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    out = {"token_embd.weight": sd["model.embed_tokens.weight"]}
    for i in range(N_LAYER):
        p = f"model.layers.{i}."
        out |= {
            f"blk.{i}.attn_norm.weight": sd[p + "input_layernorm.weight"],
            f"blk.{i}.attn_q.weight": permute(sd[p + "self_attn.q_proj.weight"], N_HEAD),
            f"blk.{i}.attn_k.weight": permute(sd[p + "self_attn.k_proj.weight"], N_KV_HEAD),
            f"blk.{i}.attn_v.weight": sd[p + "self_attn.v_proj.weight"],
            f"blk.{i}.attn_output.weight": sd[p + "self_attn.o_proj.weight"],
            f"blk.{i}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
            f"blk.{i}.ffn_gate.weight": sd[p + "mlp.gate_proj.weight"],
            f"blk.{i}.ffn_up.weight": sd[p + "mlp.up_proj.weight"],
            f"blk.{i}.ffn_down.weight": sd[p + "mlp.down_proj.weight"],
        }
    out |= {"output_norm.weight": sd["model.norm.weight"], "output.weight": sd["lm_head.weight"]}
    return out


def write_gguf(
    path: Path,
    tensors: dict[str, np.ndarray],
    qtype: GGMLQuantizationType = T.F32,
    arch: str = "llama",
    pre: str = "gpt-2",
    add_bos: bool = False,
    raw: dict[str, tuple[np.ndarray, GGMLQuantizationType]] | None = None,
) -> Path:
    """`raw` stores the named tensors as the given bytes and type instead."""
    w = GGUFWriter(str(path), arch)
    w.add_name("tiny-llama")
    w.add_block_count(N_LAYER)
    w.add_context_length(CONTEXT)
    w.add_embedding_length(D_MODEL)
    w.add_feed_forward_length(512)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV_HEAD)
    w.add_rope_freq_base(ROPE_BASE)
    w.add_layer_norm_rms_eps(EPS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_vocab_size(len(TOKENS))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(TOKENS)
    w.add_token_types(TOKEN_TYPES)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(BOS)
    w.add_eos_token_id(EOS)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(CHAT_TEMPLATE)
    for name, array in tensors.items():
        if raw and name in raw:
            w.add_tensor(name, raw[name][0], raw_dtype=raw[name][1])
        elif array.ndim == 1:  # norms stay F32, as llama.cpp writes them
            w.add_tensor(name, np.ascontiguousarray(array, np.float32))
        else:
            w.add_tensor(name, encode(array, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def stored(path: Path) -> dict[str, np.ndarray]:
    """Each tensor of the file dequantized by gguf-py, in (rows, cols) order."""
    reader = GGUFReader(path)
    return {
        t.name: dequantize(t.data, t.tensor_type).astype(np.float32).reshape([int(n) for n in reversed(t.shape)])
        for t in reader.tensors
    }


# ---- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def original() -> LlamaForCausalLM:
    """The tiny random fp32 Llama, with non-trivial norm weights so that a misplaced norm shows."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(TOKENS), hidden_size=D_MODEL, intermediate_size=512, num_hidden_layers=N_LAYER,
        num_attention_heads=N_HEAD, num_key_value_heads=N_KV_HEAD, rope_theta=ROPE_BASE, rms_norm_eps=EPS,
        tie_word_embeddings=False, max_position_embeddings=CONTEXT,
    )
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("embed_tokens.weight"):
                p.normal_(0, 1.0)  # so hidden states are not dwarfed by the norms' eps
    return model


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, len(TOKENS), (2, 23), generator=g)


@pytest.fixture(scope="module", params=TYPES, ids=lambda t: t.name)
def case(request, original, tmp_path_factory):
    """(type, file, our model, our tokenizer, transformers' model from the file)."""
    qtype = request.param
    path = write_gguf(tmp_path_factory.mktemp("gguf") / f"tiny-{qtype.name}.gguf", gguf_tensors(original), qtype)
    model, tok = load(path, torch.float32)
    # transformers (>= 5) reads every type here with its own torch dequantizer, independent of gguf-py's
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return qtype, path, model, tok, hf


# ---- tests ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K])
def test_own_k_quantizers_write_valid_blocks(qtype):
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.02, (8, 512)).astype(np.float32)
    w[0] = 0  # an all-zero row must not divide by zero
    blocks = encode(w, qtype)
    assert blocks.dtype == np.uint8 and blocks.shape == (8, 2 * {T.Q4_K: 144, T.Q6_K: 210}[qtype])
    back = dequantize(blocks, qtype)
    assert back.shape == w.shape and np.isfinite(back).all()
    rel = np.abs(back - w).max() / np.abs(w).max()
    assert rel < {T.Q4_K: 0.1, T.Q6_K: 0.03}[qtype]


def test_logits_match_transformers_reading_the_same_file(case, ids):
    qtype, _, model, _, hf = case
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ours.shape == theirs.shape == (*ids.shape, len(TOKENS))
    assert (ours - theirs).abs().max().item() <= 1e-4, qtype.name


def test_logits_close_to_the_fp32_original(case, original, ids):
    qtype, _, model, _, _ = case
    with torch.no_grad():
        ours, ref = model(ids), original(ids).logits
    assert ref.abs().max() > 1  # the tolerances below assume logits of order 1
    err = (ours - ref).abs().max().item()
    assert err <= FP32_TOL[qtype], f"{qtype.name}: {err}"


def test_qk_rows_unpermuted(case, original):
    qtype, path, model, _, _ = case
    files = stored(path)
    state = model.state_dict()
    q_rows, kv_rows = N_HEAD * HEAD_DIM, N_KV_HEAD * HEAD_DIM
    for i in range(N_LAYER):
        qkv = state[f"decoder.{i}.attn.qkv.weight"].numpy()
        q, k, v = qkv[:q_rows], qkv[q_rows : q_rows + kv_rows], qkv[q_rows + kv_rows :]
        assert np.array_equal(q, unpermute(files[f"blk.{i}.attn_q.weight"], N_HEAD))
        assert np.array_equal(k, unpermute(files[f"blk.{i}.attn_k.weight"], N_KV_HEAD))
        assert np.array_equal(v, files[f"blk.{i}.attn_v.weight"])
        if qtype == T.F32:  # lossless: un-permuting exactly inverts the converter's permute
            attn = original.model.layers[i].self_attn
            assert np.array_equal(q, attn.q_proj.weight.detach().numpy())
            assert np.array_equal(k, attn.k_proj.weight.detach().numpy())


def test_config_and_tokens_from_metadata(case):
    _, _, model, tok, hf = case
    cfg = model.cfg
    assert (cfg.n_layer, cfg.d_model, cfg.d_ff, cfg.n_head, cfg.n_kv_head, cfg.head_dim) == (2, 256, 512, 4, 2, 64)
    eps = float(np.float32(EPS))  # GGUF stores it as float32
    assert (cfg.max_seq_len, cfg.rope_base, cfg.norm_eps, cfg.vocab_size) == (CONTEXT, ROPE_BASE, eps, len(TOKENS))
    assert not cfg.tie_embeddings and cfg.bos_token_id == BOS and cfg.eos_token_ids == [EOS]
    assert tok.vocab_size == len(TOKENS) and tok.eos_id == EOS and tok.chat_template == CHAT_TEMPLATE
    c = hf.config
    assert (c.num_key_value_heads, c.max_position_embeddings, c.rms_norm_eps) == (cfg.n_kv_head, CONTEXT, eps)


@pytest.mark.parametrize(("pre", "add_bos"), [("gpt-2", False), ("llama-bpe", True), ("qwen2", False)])
def test_tokenizer_matches_transformers(tmp_path, pre, add_bos):
    path = write_gguf(tmp_path / "tok.gguf", {}, pre=pre, add_bos=add_bos)
    ours = Tokenizer.from_gguf(metadata(open_gguf(path)))
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert ours.vocab_size == len(TOKENS)
    assert (ours.bos_token, ours.eos_token) == ("<|endoftext|>", "<|im_end|>")
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text).input_ids, text
        assert ours.encode(text, add_special_tokens=False) == theirs(text, add_special_tokens=False).input_ids
        assert (ids[0] == BOS) == add_bos
        assert ours.decode(ids, skip_special_tokens=False) == (TOKENS[BOS] if add_bos else "") + text
    assert any(i >= 256 for t in TEXTS for i in ours.encode(t))  # the merges are used
    specials = [TOKENS.index("<|im_start|>"), TOKENS.index("<think>")]
    assert ours.encode("<|im_start|><think>", add_special_tokens=False) == specials


def test_chat_template_from_metadata(tmp_path):
    path = write_gguf(tmp_path / "tok.gguf", {})
    ours = Tokenizer.from_gguf(metadata(open_gguf(path)))
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert ours.chat_template == CHAT_TEMPLATE
    for chat in CHATS:
        for gen in (True, False):
            text = ours.apply_chat_template(chat, add_generation_prompt=gen)
            assert text == theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert text.startswith("<|endoftext|><|im_start|>system\n") and text.endswith("assistant\n") == gen


def test_other_architecture_is_refused(tmp_path):
    path = write_gguf(tmp_path / "falcon.gguf", {"token_embd.weight": np.zeros((len(TOKENS), 256))}, arch="falcon")
    with pytest.raises(LmforgeError, match="falcon"):
        load(path, torch.float32)


def test_unsupported_tensor_type_is_refused(tmp_path, original):
    tensors = gguf_tensors(original)
    down = tensors["blk.1.ffn_down.weight"]  # stored as IQ4_NL (18-byte blocks of 32), a type we do not read
    junk = np.random.default_rng(0).integers(0, 256, (256, 512 // 32 * 18), np.uint8)
    raw = {"blk.1.ffn_down.weight": (junk, T.IQ4_NL)}
    assert down.shape == (256, 512)
    path = write_gguf(tmp_path / "iq4.gguf", tensors, raw=raw)
    with pytest.raises(LmforgeError, match="IQ4_NL"):
        load(path, torch.float32)


def test_loading_and_decoding_never_import_the_compiler(tmp_path: Path) -> None:
    """A CLI run pays for what it imports: building the meta model once pulled in torch._dynamo through the
    rotary tables (~1 s and ~60 MB). Load a quantized GGUF and decode in a fresh process, then look."""
    import subprocess
    import sys

    from tiny import gguf_file

    path = gguf_file(tmp_path / "tiny.gguf")
    script = ("import sys; from lmforge.weights.load import load; from lmforge.generate import SamplingParams, "
              "complete; m, t = load(sys.argv[1], dtype='int4'); complete(m, t, [[1, 2, 3]], "
              "SamplingParams(max_new_tokens=3)); print(sorted(k for k in ('torch._dynamo', 'torch.distributed.fsdp')"
              " if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
