"""GGUF export (`lmforge convert --to gguf`): a tiny random Llama saved by transformers (with the byte-level BPE
vocabulary of test_gguf.py: merges, control and user-defined tokens, chat template) is exported at each quant,
then read back by our loader, by transformers' GGUF loader and by gguf-py, and compared with the source."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tiny
import torch
from gguf import GGUFReader
from test_gguf import BOS, CHAT_TEMPLATE, CHATS, EOS, MERGES, TEXTS, TOKEN_TYPES, TOKENS
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer
from lmforge.weights import gguf_write
from lmforge.weights.gguf import metadata, open_gguf, unpermute_rope_rows
from lmforge.weights.gguf_write import convert_gguf, export_gguf, permute_rope_rows, tensor_types
from lmforge.weights.load import load

D_MODEL, N_HEAD, N_KV_HEAD, HEAD_DIM, D_FF, N_LAYER, CONTEXT, ROPE_BASE = 64, 4, 2, 16, 128, 2, 128, 50000.0


def byte_bpe_tokenizer(pre: str = "gpt-2", add_bos: bool = False) -> Tokenizer:
    """test_gguf.py's vocabulary as an HF tokenizer (built by our GGUF reader from the metadata alone)."""
    return Tokenizer.from_gguf({
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": TOKENS,
        "tokenizer.ggml.token_type": TOKEN_TYPES, "tokenizer.ggml.merges": MERGES,
        "tokenizer.ggml.bos_token_id": BOS, "tokenizer.ggml.eos_token_id": EOS,
        "tokenizer.ggml.add_bos_token": add_bos, "tokenizer.chat_template": CHAT_TEMPLATE,
    })


def llama_folder(
    folder: Path, tie: bool = False, head_dim: int = HEAD_DIM, d_ff: int = D_FF, pre: str = "gpt-2",
    add_bos: bool = False, seed: int = 0,
) -> Path:
    """A random Llama saved by transformers, with norms away from 1, N(0, 1) embeddings and weights of std
    1/sqrt(fan-in), so that every block changes the result (a misplaced norm or q/k row shows) and logits are of
    order 10."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(TOKENS), hidden_size=D_MODEL, intermediate_size=d_ff, num_hidden_layers=N_LAYER,
        num_attention_heads=N_HEAD, num_key_value_heads=N_KV_HEAD, head_dim=head_dim, max_position_embeddings=CONTEXT,
        rope_theta=ROPE_BASE, rms_norm_eps=1e-5, tie_word_embeddings=tie, bos_token_id=BOS, eos_token_id=EOS,
    )
    model = LlamaForCausalLM(config).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("embed_tokens.weight"):
                p.normal_(0, 1.0)
            else:
                p.normal_(0, 2 * p.shape[1] ** -0.5 if name.startswith("lm_head") else p.shape[1] ** -0.5)
    model.save_pretrained(folder)
    byte_bpe_tokenizer(pre, add_bos).save(folder)
    return folder


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, len(TOKENS), (2, 24), generator=g)


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return llama_folder(tmp_path_factory.mktemp("src") / "tiny-llama")


@pytest.fixture(scope="module")
def source(src: Path):
    return load(src, torch.float32, device="cpu")


@pytest.fixture(scope="module")
def exported(src: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """quant -> the source exported at that quant."""
    folder = tmp_path_factory.mktemp("gguf")
    paths = {q: folder / f"tiny-{q}.gguf" for q in gguf_write.QUANTS}
    for quant, path in paths.items():
        convert_gguf(src, path, quant)
    return paths


# ---- numbers -------------------------------------------------------------------------------------------------

# max |logit - source| / max |source logit| per quant (source logits up to 8). Measured: f16 6.5e-4 (weights
# rounded to 11 significant bits), q8_0 0.019 (each 32-block scaled to int8), q4_0 0.29 and q4_1 0.20 (16 levels
# per block, Gaussian weights); the bounds are 2-3x those. The exact check is test_reloaded_model_is_the_source_
# rounded: these only say the rounding is of the expected size.
REL_TOL = {"f16": 2e-3, "q8_0": 0.05, "q4_0": 0.6, "q4_1": 0.5}
# greedy choices of the random model agreeing with the source's (measured 1.0, 1.0, 0.73, 0.77: a random model
# has many near-ties, which 4 bits flip)
AGREE = {"f16": 1.0, "q8_0": 1.0, "q4_0": 0.6, "q4_1": 0.6}


def rounded(path: Path, quant: str, tied: bool = False):
    """The source model with each 2-D weight quantized and dequantized by gguf-py as the export stores it (the head
    Q8_0 under 4-bit quants, a row length the block does not divide F16). Blocks run along rows, so the q/k row
    permutation does not change what is rounded."""
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import dequantize, quantize

    model, _ = load(path, torch.float32, device="cpu")
    wanted = gguf_write.QUANTS[quant][0]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim != 2:
                continue
            head = name.startswith("lm_head") or (tied and name.startswith("tok_emb"))
            qtype = gguf_write.QUANTS["q8_0"][0] if head and quant.startswith("q4") else wanted
            if p.shape[1] % GGML_QUANT_SIZES[qtype][0]:
                qtype = gguf_write.QUANTS["f16"][0]
            p.copy_(torch.from_numpy(dequantize(quantize(p.numpy(), qtype), qtype).reshape(p.shape)))
    return model


@pytest.mark.parametrize("quant", list(gguf_write.QUANTS))
def test_reloaded_model_is_the_source_rounded(quant, src, exported, ids):
    """Exactly: every weight lands where it belongs (split, permuted and unpermuted, norms F32), only rounded."""
    again, _ = load(exported[quant], torch.float32, device="cpu")
    assert (logits(again, ids) - logits(rounded(src, quant), ids)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("quant", list(gguf_write.QUANTS))
def test_reloaded_logits_close_to_the_source(quant, source, exported, ids):
    model, _ = source
    again, _ = load(exported[quant], torch.float32, device="cpu")
    ref, out = logits(model, ids), logits(again, ids)
    assert ref.abs().max() > 5
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    assert rel <= REL_TOL[quant], f"{quant}: {rel:.2e}"
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= AGREE[quant], f"{quant}: {agree:.2f}"


def test_tensor_types_and_layout(source, exported):
    model, _ = source
    types = {q: tensor_types(path) for q, path in exported.items()}
    for quant, by_name in types.items():
        weight = {"f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1"}[quant]
        assert by_name["blk.0.attn_norm.weight"] == by_name["output_norm.weight"] == "F32"
        assert by_name["blk.1.ffn_down.weight"] == by_name["blk.0.attn_q.weight"] == weight
        assert by_name["token_embd.weight"] == weight  # untied: the embedding stays at the chosen quant
        # the head: Q8_0 under 4-bit quants, as llama-quantize (Q6_K, which gguf-py cannot write) would
        assert by_name["output.weight"] == ("Q8_0" if quant.startswith("q4") else weight)
    assert len(types["f16"]) == 3 + N_LAYER * 9  # q|k|v and gate|up split, nothing else added
    # q/k rows permuted into llama.cpp's order: un-permuting the stored rows gives the source's
    reader = GGUFReader(exported["f16"])
    stored = {t.name: np.array(t.data) for t in reader.tensors}
    qkv = model.state_dict()["decoder.1.attn.qkv.weight"].half()
    q, k = qkv[: N_HEAD * HEAD_DIM], qkv[N_HEAD * HEAD_DIM : (N_HEAD + N_KV_HEAD) * HEAD_DIM]
    assert torch.equal(unpermute_rope_rows(torch.from_numpy(stored["blk.1.attn_q.weight"]), N_HEAD), q)
    assert torch.equal(unpermute_rope_rows(torch.from_numpy(stored["blk.1.attn_k.weight"]), N_KV_HEAD), k)
    assert not torch.equal(torch.from_numpy(stored["blk.1.attn_q.weight"]), q)


def test_permute_inverts_the_readers_unpermute():
    w = torch.randn(6 * 8, 5)
    for heads in (1, 3, 6):
        assert torch.equal(unpermute_rope_rows(permute_rope_rows(w, heads), heads), w)


def test_tensor_type_rules():
    T = gguf_write.T
    rule = gguf_write._tensor_type
    assert rule(torch.ones(64), T.Q4_0, head=False) == T.F32  # norms
    assert rule(torch.ones(8, 64), T.Q4_1, head=True) == T.Q8_0  # the head keeps 8 bits
    assert rule(torch.ones(8, 64), T.Q8_0, head=True) == T.Q8_0
    assert rule(torch.ones(8, 48), T.Q4_0, head=False) == T.F16  # 48 is no multiple of the 32-block
    assert rule(torch.full((8, 48), 1e5), T.Q8_0, head=False) == T.F32  # beyond fp16's 65504
    assert rule(torch.full((8, 64), -1e5), T.F16, head=False) == T.F32


def test_metadata_and_config_read_back(source, exported):
    model, tok = source
    meta = metadata(open_gguf(exported["q8_0"]))
    expected = {
        "general.architecture": "llama", "general.name": "tiny-llama", "general.file_type": 7,
        "general.quantization_version": 2, "llama.context_length": CONTEXT, "llama.embedding_length": D_MODEL,
        "llama.block_count": N_LAYER, "llama.feed_forward_length": D_FF, "llama.attention.head_count": N_HEAD,
        "llama.attention.head_count_kv": N_KV_HEAD, "llama.rope.freq_base": ROPE_BASE,
        "llama.rope.dimension_count": HEAD_DIM, "llama.vocab_size": len(TOKENS), "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.tokens": TOKENS, "tokenizer.ggml.token_type": TOKEN_TYPES,
        "tokenizer.ggml.merges": MERGES, "tokenizer.ggml.bos_token_id": BOS, "tokenizer.ggml.eos_token_id": EOS,
        "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": CHAT_TEMPLATE,
    }
    assert {k: meta.get(k) for k in expected} == expected
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert "llama.attention.key_length" not in meta  # head_dim is d_model / n_head: readers derive it
    again, tok2 = load(exported["q8_0"], torch.float32, device="cpu")
    a, b = model.cfg, again.cfg
    fields = ("vocab_size", "d_model", "n_layer", "n_head", "n_kv_head", "head_dim", "d_ff", "max_seq_len",
              "rope_base", "tie_embeddings", "bos_token_id", "eos_token_ids")
    assert {f: getattr(b, f) for f in fields} == {f: getattr(a, f) for f in fields}
    assert b.norm_eps == pytest.approx(a.norm_eps)
    assert tok2.chat_template == tok.chat_template == CHAT_TEMPLATE
    for chat in CHATS:
        assert tok2.apply_chat_template(chat) == tok.apply_chat_template(chat)


@pytest.mark.parametrize(("pre", "add_bos"), [("gpt-2", True), ("llama-bpe", False), ("qwen2", True),
                                              ("smollm", False)])
def test_tokenizer_round_trip(tmp_path, pre, add_bos):
    """Each pre-tokenizer our reader rebuilds is recognised and named, so the same text gives the same ids."""
    folder = llama_folder(tmp_path / "m", pre=pre, add_bos=add_bos)
    out = tmp_path / "m.gguf"
    convert_gguf(folder, out)
    meta = metadata(open_gguf(out))
    assert (meta["tokenizer.ggml.pre"], meta["tokenizer.ggml.add_bos_token"]) == (pre, add_bos)
    ours, again = Tokenizer.from_dir(folder), Tokenizer.from_gguf(meta)
    # transformers has no digit split for "smollm" (it reads it as plain GPT-2): ids differ on numbers there
    hf = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name) if pre != "smollm" else None
    for text in [*TEXTS, "12345 + 678 = 13023"]:
        ids = ours.encode(text)
        assert again.encode(text) == ids, text
        assert again.decode(ids, skip_special_tokens=False) == ours.decode(ids, skip_special_tokens=False)
        assert hf is None or hf(text).input_ids == ids, text
    assert (again.bos_token, again.eos_token) == (ours.bos_token, ours.eos_token)


# ---- transformers reads the file ---------------------------------------------------------------------------


def test_transformers_reads_config_tokenizer_template_and_weights(source, exported, ids):
    model, tok = source
    path = exported["f16"]
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    cfg = model.cfg
    assert (config.model_type, config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.head_dim, config.intermediate_size, config.max_position_embeddings,
            config.vocab_size, config.bos_token_id, config.eos_token_id) == (
        "llama", cfg.d_model, cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_ff, cfg.max_seq_len,
        cfg.vocab_size, BOS, EOS)
    assert config.rope_parameters["rope_theta"] == ROPE_BASE
    assert config.rms_norm_eps == pytest.approx(cfg.norm_eps)
    theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        assert theirs(text).input_ids == tok.encode(text), text
    assert theirs.chat_template == tok.chat_template
    for chat in CHATS:
        assert theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
            tok.apply_chat_template(chat)
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    again, _ = load(path, torch.float32, device="cpu")
    with torch.no_grad():
        theirs_logits = hf(ids).logits
    assert (theirs_logits - logits(again, ids)).abs().max().item() <= 1e-4  # the same fp16 weights, read twice
    ref = logits(model, ids)
    assert ((theirs_logits - ref).abs().max() / ref.abs().max()).item() <= REL_TOL["f16"]


def test_tied_embeddings_and_unusual_shapes(tmp_path, ids):
    """Tied: no output.weight, token_embd is the head (Q8_0 under q4). head_dim 24 != 64/4: key_length written.
    d_ff 80: ffn_down's rows (80) do not split into 32-blocks, so it falls back to F16."""
    folder = llama_folder(tmp_path / "m", tie=True, head_dim=24, d_ff=80)
    assert load(folder, torch.float32, device="cpu")[0].cfg.tie_embeddings
    for quant, embd in [("q4_0", "Q8_0"), ("q8_0", "Q8_0")]:
        out = tmp_path / f"m-{quant}.gguf"
        convert_gguf(folder, out, quant)
        types = tensor_types(out)
        assert "output.weight" not in types and types["token_embd.weight"] == embd
        assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == quant.upper()
        meta = metadata(open_gguf(out))
        assert meta["llama.attention.key_length"] == meta["llama.attention.value_length"] == 24
        again, _ = load(out, torch.float32, device="cpu")
        assert again.cfg.tie_embeddings and again.cfg.head_dim == 24
        assert (logits(again, ids) - logits(rounded(folder, quant, tied=True), ids)).abs().max().item() <= 1e-5
    config = AutoConfig.from_pretrained(tmp_path, gguf_file="m-q8_0.gguf")
    assert config.head_dim == 24 and config.tie_word_embeddings


def test_gguf_input_round_trip(tmp_path, ids):
    """A GGUF in (Q8_0/Q4_0 weights, F16 embeddings) -> f16 GGUF out: the same model, its dequantized weights
    rounded to fp16 (a Q8_0 value d*q needs up to 18 significant bits; not every one fits fp16's 11)."""
    src = tiny.gguf_file(tmp_path / "in.gguf")
    out = tmp_path / "out.gguf"
    assert main(["convert", "--model", str(src), "--to", "gguf", "--out", str(out)]) == 0
    (model, tok), (again, tok2) = load(src, torch.float32, device="cpu"), load(out, torch.float32, device="cpu")
    assert model.cfg.tie_embeddings and again.cfg.tie_embeddings  # no output.weight in, none out
    ids = ids % model.cfg.vocab_size
    assert (logits(again, ids) - logits(rounded(src, "f16", tied=True), ids)).abs().max().item() <= 1e-5
    meta_in, meta_out = metadata(open_gguf(src)), metadata(open_gguf(out))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"):
        assert meta_out[key] == meta_in[key], key
    assert tok2.encode(TEXTS[2]) == tok.encode(TEXTS[2])


def test_sentencepiece_style_vocabulary_for_llama_cpp(tmp_path):
    """A Llama-2-style tokenizer.json (▁ for spaces, <0xNN> byte fallback) becomes llama.cpp's `llama` vocabulary:
    scores that replay the merge order, BYTE/UNKNOWN/CONTROL types, add_bos, add_space_prefix. Our reader does not
    read that vocabulary yet; transformers' does, and tokenizes as the source."""
    from tokenizers import AddedToken, decoders, models, normalizers, processors
    from tokenizers import Tokenizer as Backend

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate([*specials, *(f"<0x{b:02X}>" for b in range(256)), *"▁abcdehilnorstuwHW,."])}
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("i", "n"), ("▁", "w"), ("o", "r"), ("l", "l"), ("e", "l"),
              ("el", "l"), ("ell", "o"), ("H", "ello"), ("▁", "H"), ("▁H", "ello")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    backend = Backend(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok = Tokenizer(backend, CHAT_TEMPLATE, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    folder = tmp_path / "spm"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save(folder)
    out = tmp_path / "spm.gguf"
    convert_gguf(folder, out, "q8_0")
    meta = metadata(open_gguf(out))
    keys = ("model", "add_bos_token", "add_space_prefix", "unknown_token_id")
    assert [meta[f"tokenizer.ggml.{k}"] for k in keys] == ["llama", True, True, 0]
    types, scores = meta["tokenizer.ggml.token_type"], meta["tokenizer.ggml.scores"]
    assert types[:4] == [2, 3, 3, 6] and types[vocab["▁t"]] == 1
    assert scores[vocab["▁t"]] > scores[vocab["he"]] > scores[vocab["▁the"]]  # earlier merges score higher
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    ours = Tokenizer.from_dir(folder)
    for text in ["Hello world, the tin", "Hello 😀 there.\nwow"]:  # (a leading space reads differently in each)
        assert theirs(text).input_ids == ours.encode(text), text
    with pytest.raises(LmforgeError, match="tokenizer model 'llama' is not supported"):
        load(out, torch.float32, device="cpu")


# ---- refusals, the CLI, all or nothing ---------------------------------------------------------------------


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def gpt2_folder(folder: Path) -> Path:
    from conftest import BYTE_VOCAB, write_byte_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=BYTE_VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=64)).save_pretrained(
        folder)
    write_byte_tokenizer(folder)
    return folder


def test_other_families_are_refused_in_one_line(tmp_path, capsys):
    bert, gpt2 = tiny.bert_folder(tmp_path / "bert"), gpt2_folder(tmp_path / "gpt2")
    out = tmp_path / "out.gguf"
    with pytest.raises(LmforgeError, match=r"^GGUF export supports the Llama family; bert is bert \(encoder\)$"):
        convert_gguf(bert, out)
    capsys.readouterr()  # transformers' save_pretrained progress bars
    assert main(["convert", "--model", str(gpt2), "--to", "gguf", "--out", str(out)]) == 2
    assert one_error_line(capsys) == "error: GGUF export supports the Llama family; gpt2 is gpt2"
    model, tok = load(tiny.llama_folder(tmp_path / "llama"), torch.float32, device="cpu")
    model.cfg.qk_norm = True  # as Qwen3 has
    with pytest.raises(LmforgeError, match="llama is llama with q/k norms"):
        export_gguf(model, tok, out)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bert", "gpt2", "llama"]


def test_quantized_in_memory_model_is_refused(tmp_path):
    """A model loaded with an int8/int4 --dtype keeps packed rows (a uint8 `qweight` and scales) in its Linears."""
    model, tok = load(tiny.llama_folder(tmp_path / "llama"), torch.float32, device="cpu")
    model.decoder[0].attn.qkv.register_buffer("qweight", torch.zeros(4, dtype=torch.uint8))
    with pytest.raises(LmforgeError, match=r"needs float weights.*decoder\.0\.attn\.qkv\.qweight"):
        export_gguf(model, tok, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_cli_options_and_bad_quant(src, tmp_path, capsys):
    out = tmp_path / "sub" / "m.gguf"  # missing parents are created
    assert main(["convert", str(src), str(out), "--to", "gguf", "--quant", "Q8_0"]) == 0
    assert tensor_types(out)["blk.0.attn_q.weight"] == "Q8_0"
    capsys.readouterr()
    assert main(["convert", "-m", str(src), "-o", str(tmp_path / "x.gguf"), "--to", "gguf", "--quant", "q5_k"]) == 2
    assert "unknown GGUF quantization 'q5_k' (choose one of: f16, q8_0, q4_0, q4_1)" in one_error_line(capsys)
    assert main(["convert", str(src), str(tmp_path / "hf"), "--quant", "q8_0"]) == 2  # --quant is for gguf
    assert "--to gguf" in one_error_line(capsys)
    assert main(["convert", "--model", str(src), "--to", "gguf"]) == 2
    assert "where to write" in one_error_line(capsys)
    assert main(["convert", str(src), "--model", str(tmp_path), "--out", str(out)]) == 2
    assert "given twice" in one_error_line(capsys)
    assert main(["convert", str(src), str(out), "--to", "gguf", "--dtype", "bfloat16"]) == 2
    assert "--quant" in one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]
    assert main(["convert", "--model", str(src), "--out", str(tmp_path / "hf")]) == 0  # --to hf is the default
    assert (tmp_path / "hf" / "config.json").exists()


@pytest.mark.usefixtures("umask_022")
def test_existing_output_refused_then_replaced_with_force(src, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"precious")
    assert main(["convert", "--model", str(src), "--to", "gguf", "--out", str(out)]) == 2
    assert "exists (use --force" in one_error_line(capsys)
    assert out.read_bytes() == b"precious"
    assert main(["convert", "--model", str(src), "--to", "gguf", "--out", str(out), "--force"]) == 0
    assert out.read_bytes()[:4] == b"GGUF" and oct(out.stat().st_mode & 0o777) == oct(0o644)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temporary file left
    with pytest.raises(LmforgeError, match="source itself"):
        convert_gguf(out, out, force=True)
    with pytest.raises(LmforgeError, match="is a folder"):
        convert_gguf(src, tmp_path, force=True)
    before = (src / "config.json").read_bytes()
    with pytest.raises(LmforgeError, match="file of the source folder"):
        convert_gguf(src, src / "config.json", force=True)
    assert (src / "config.json").read_bytes() == before


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_failure_leaves_nothing_behind(src, tmp_path, monkeypatch):
    """Fail while writing the third tensor: the temporary file and the folders made for it go, and an existing
    output is left as it was."""
    real = gguf_write._encode
    calls = []

    def fail_on_third(item, cfg):
        calls.append(item.name)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(item, cfg)

    monkeypatch.setattr(gguf_write, "_encode", fail_on_third)
    with pytest.raises(LmforgeError, match="No space left"):
        convert_gguf(src, tmp_path / "a" / "b" / "m.gguf")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "m.gguf").write_bytes(b"old")
    calls.clear()
    with pytest.raises(LmforgeError, match="No space left"):
        convert_gguf(src, tmp_path / "m.gguf", force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"] and (tmp_path / "m.gguf").read_bytes() == b"old"


def test_tensors_are_views_until_written(source):
    """Memory: the plan holds views into the model's weights (fused q|k|v and gate|up split, not copied), so the
    only float copies are made one tensor at a time while writing."""
    model, _ = source
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    plan = gguf_write._plan(model, gguf_write.QUANTS["q8_0"][0])
    assert plan and all(item.tensor.untyped_storage().data_ptr() in storages for item in plan)


# ---- the real model ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_exports_to_q8_0(smollm, smollm_path, tmp_path):
    """The shipped SmolLM2-135M-Instruct (Q4_1, Q8_0 embeddings) -> q8_0 (138 MiB): tokenizer, template and the
    greedy answer unchanged. Logits move by Q8_0's rounding of the dequantized 4-bit weights over 30 layers
    (measured 3.5% of the largest logit, 35 of 37 greedy choices along the prompt the same; f16 gives 0.1%)."""
    from lmforge.generate import SamplingParams, complete

    model, tok = smollm
    out = tmp_path / "smollm2-q8_0.gguf"
    convert_gguf(smollm_path, out, "q8_0")
    meta_in, meta_out = metadata(open_gguf(smollm_path)), metadata(open_gguf(out))
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.add_bos_token",
                "tokenizer.chat_template", "llama.rope.freq_base", "llama.context_length", "llama.vocab_size",
                "llama.attention.head_count_kv", "llama.rope.dimension_count"):
        assert meta_out[key] == meta_in[key], key
    types = tensor_types(out)
    assert "output.weight" not in types and types["token_embd.weight"] == types["blk.29.ffn_down.weight"] == "Q8_0"
    again, tok2 = load(out, torch.float32, device="cpu")
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    ids = tok.encode(prompt)
    assert tok2.encode(prompt) == ids
    device = next(model.parameters()).device  # the shared fixture's: cuda where there is one
    ref, new = logits(model, torch.tensor([ids], device=device)).cpu(), logits(again, torch.tensor([ids]))
    assert ((new - ref).abs().max() / ref.abs().max()).item() <= 0.07
    assert (new.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.9
    params = SamplingParams(max_new_tokens=12, temperature=0)
    answers = [complete(m, t, [ids], params)[0].text for m, t in [(model, tok), (again, tok2)]]
    assert answers[0] == answers[1] and "Paris" in answers[0]
