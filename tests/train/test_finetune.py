"""Fine-tuning end to end on tiny checkpoints: the tuned model answers the trained way through `generate --chat`,
LoRA adapters and merged folders load, classification trains a head, and bad input names its line."""

import json

import pytest
import tiny
import torch
from corpus import write_corpus

from lmforge.cli import main
from lmforge.generate import SamplingParams, complete, encode_prompt
from lmforge.train.finetune import FinetuneOptions, finetune
from lmforge.train.loop import TrainConfig, read_metrics
from lmforge.weights.load import load

ANSWER = "ok!"


def rows(n: int) -> list[dict[str, str]]:
    return [{"instruction": f"say it {i}", "output": ANSWER} for i in range(n)]


def write_rows(path, items):
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny.llama_folder(tmp_path_factory.mktemp("base") / "llama", layers=2, chat_template=True)


def chat_answer(folder, prompt: str) -> str:
    model, tok = load(folder)
    ids = encode_prompt(tok, prompt, chat=True)
    return complete(model, tok, [ids], SamplingParams(max_new_tokens=8, temperature=0))[0].text


@pytest.mark.parametrize("method", ["full", "lora"])
def test_instruct_tuning_teaches_the_answer_generate_chat_gives(method, base, tmp_path):
    data = write_rows(tmp_path / "train.jsonl", rows(40))
    out = tmp_path / "run"
    opts = FinetuneOptions(model=str(base), data=data, task="instruct", out=out, method=method, merge=True,
                           rank=8, alpha=16)
    tc = TrainConfig(steps=40, batch_size=8, lr=1e-2, min_lr=1e-3, warmup=4, eval_every=0, save_every=20)
    result = finetune(opts, tc, progress=False, quiet=True)
    # LoRA cannot sharpen a random tiny model's frozen head (its logits stay small), but it makes the answer the
    # most likely one everywhere
    assert result["after"]["loss"] < (0.2 if method == "full" else 0.9) * result["before"]["loss"]
    assert result["after"]["accuracy"] == 1.0 and result["before"]["accuracy"] < 0.5
    assert len(read_metrics(out / "metrics.jsonl")) == 40
    folder = out if method == "full" else out / "merged"
    assert chat_answer(folder, "say it 99").startswith(ANSWER)  # a prompt never trained on
    assert chat_answer(base, "say it 99") != ANSWER
    if method == "lora":
        assert (out / "adapter" / "adapter_model.safetensors").exists()
        ckpt = torch.load(sorted((out / "checkpoints").glob("step-*.pt"))[-1], weights_only=False)
        assert all("lora" in k for k in ckpt["model"])  # the frozen base is not copied into checkpoints


def test_classification_head_on_an_encoder(tmp_path):
    from lmforge.tokenizer_train import save_trained, train_tokenizer

    corpus = write_corpus(tmp_path / "corpus", docs=20)
    tok = save_trained(train_tokenizer([corpus], "wordpiece", vocab_size=200), tmp_path / "tok")
    from lmforge.train.pretrain import PretrainOptions, pretrain

    enc = tmp_path / "enc"
    pretrain(PretrainOptions(data=_prepared(corpus, tok, tmp_path), out=enc, preset="tiny-bert", block_size=16),
             TrainConfig(steps=2, batch_size=4, save_every=2), progress=False, quiet=True)
    months = ["january", "february", "march", "april", "may", "june"]
    items = [{"text": " ".join([w] * 3), "label": "month" if w in months else "other"}
             for w in ["january", "february", "march", "april", "may", "june", "monday", "tuesday", "one", "two",
                       "three", "friday"] * 4]
    data = write_rows(tmp_path / "cls.jsonl", items)
    out = tmp_path / "cls"
    assert main(["finetune", "--model", str(enc), "--data", str(data), "--task", "classify", "--out", str(out),
                 "--method", "full", "--steps", "60", "--lr", "1e-3", "--val-data", str(data), "--quiet"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["after"]["accuracy"] == 1.0
    assert json.loads((out / "labels.json").read_text()) == ["month", "other"]
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(out)
    assert hf.config.id2label == {0: "month", 1: "other"}


def _prepared(corpus, tok, tmp_path):
    from lmforge.data.prepare import prepare

    prepare([corpus], tok, tmp_path / "data", val_fraction=0.2, workers=1, progress=False,
            max_top_ngram_fraction=1.0)
    return tmp_path / "data"


def _fails(capsys, *args: str) -> str:
    assert main(list(args)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_bad_finetune_input_is_one_line(base, tmp_path, capsys):
    good = write_rows(tmp_path / "good.jsonl", rows(10))
    args = ["finetune", "--model", str(base), "--out", str(tmp_path / "o"), "--steps", "1", "--quiet"]
    assert "is for encoder-decoder models" in _fails(capsys, *args, "--data", str(good), "--task", "seq2seq")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows(1)[0]) + "\n" + json.dumps({"instruction": "x"}) + "\n")
    assert "line 2" in _fails(capsys, *args, "--data", str(bad), "--task", "instruct")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "empty" in _fails(capsys, *args, "--data", str(empty), "--task", "instruct").lower()
    assert "missing field 'text'" in _fails(capsys, *args, "--data", str(good), "--task", "classify")
    assert not (tmp_path / "o").exists()


def test_domain_and_seq2seq_tuning_lower_the_validation_loss(base, datasets, corpus, tmp_path):
    """Domain: continued causal LM on text files. Seq2seq: a T5 (pre-trained here for a few steps) learns to
    copy its input."""
    from lmforge.train.pretrain import PretrainOptions, pretrain

    tc = TrainConfig(steps=30, batch_size=8, lr=1e-2, min_lr=1e-3, warmup=3, eval_every=0, save_every=30)
    domain = finetune(FinetuneOptions(model=str(base), data=corpus, task="domain", out=tmp_path / "domain",
                                      method="full", max_len=32), tc, progress=False, quiet=True)
    assert domain["after"]["perplexity"] < 0.5 * domain["before"]["perplexity"]

    t5 = tmp_path / "t5"
    pretrain(PretrainOptions(data=datasets["span"], out=t5, preset="tiny-t5", block_size=32),
             TrainConfig(steps=2, batch_size=4, save_every=2), progress=False, quiet=True)
    words = sorted({w.strip(".") for f in corpus.iterdir() for w in f.read_text().split()})[:20]
    items = [{"source": " ".join(words[i:i + 3]), "target": " ".join(words[i:i + 3])} for i in range(18)] * 3
    data = write_rows(tmp_path / "copy.jsonl", items)
    tc = TrainConfig(steps=40, batch_size=8, lr=3e-3, min_lr=3e-4, warmup=4, eval_every=0, save_every=40)
    result = finetune(FinetuneOptions(model=str(t5), data=data, task="seq2seq", out=tmp_path / "copy",
                                      method="full", val_data=data), tc, progress=False, quiet=True)
    assert result["after"]["loss"] < 0.5 * result["before"]["loss"]
    assert result["after"]["accuracy"] > result["before"]["accuracy"] + 0.3


def test_a_decoder_classifies_with_label_words(base, tmp_path):
    months = {"january", "february", "march", "april", "may", "june"}
    words = ["january", "february", "march", "april", "may", "june", "monday", "tuesday", "one", "two", "three",
             "friday"]
    items = [{"text": f"{w} {i}", "label": "month" if w in months else "other"} for i in range(3) for w in words]
    data = write_rows(tmp_path / "cls.jsonl", items)
    tc = TrainConfig(steps=80, batch_size=8, lr=1e-2, min_lr=1e-3, warmup=4, eval_every=0, save_every=80)
    result = finetune(FinetuneOptions(model=str(base), data=data, task="classify", out=tmp_path / "run",
                                      method="full", val_data=data), tc, progress=False, quiet=True)
    assert result["before"]["accuracy"] == 0.0 and result["after"]["accuracy"] == 1.0
    assert chat_answer(tmp_path / "run", "march 7").startswith("month")
    assert chat_answer(tmp_path / "run", "friday 7").startswith("other")


def test_lora_on_a_bf16_base_and_gradient_checkpointing(base, tmp_path):
    """A bfloat16 frozen base still trains fp32 adapters; recomputing activations gives the same gradients."""
    from lmforge.train.finetune import loss_for
    from lmforge.train.lora import LoRAConfig, add_lora

    data = write_rows(tmp_path / "train.jsonl", rows(24))
    tc = TrainConfig(steps=20, batch_size=8, lr=1e-2, min_lr=1e-3, warmup=2, eval_every=0, save_every=20)
    result = finetune(FinetuneOptions(model=str(base), data=data, task="instruct", out=tmp_path / "bf16",
                                      base_dtype="bfloat16"), tc, progress=False, quiet=True)
    assert result["after"]["loss"] < result["before"]["loss"] - 0.3

    model, tok = load(base, inference=False)
    add_lora(model, LoRAConfig(r=4, alpha=8))
    torch.manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.1)
    from lmforge.data.sft import SFTData, instruct_examples, pad_id_for

    examples = list(instruct_examples(data, tok, 64))
    batch = SFTData(examples, examples[:2], 8, 0, pad_id_for(tok)).global_batch(0)
    grads = []
    for checkpointing in (False, True):
        model.grad_checkpointing = checkpointing
        model.zero_grad()
        loss_for("instruct")(model, batch).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
