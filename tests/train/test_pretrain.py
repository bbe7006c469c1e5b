"""Pre-training end to end: each objective learns, the result is an HF folder transformers loads, a killed run
resumes to the same losses, and torchrun with two processes trains the same weights as one."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from corpus import unigram_entropy
from safetensors.torch import load_file

from lmforge.cli import main
from lmforge.train.loop import TrainConfig, read_metrics
from lmforge.train.pretrain import PretrainOptions, pretrain
from lmforge.weights.load import load

PRESET = {"clm": "tiny-gpt", "mlm": "tiny-bert", "span": "tiny-t5"}
# steps, peak learning rate, block and batch that learn this corpus in seconds. BERT's learned absolute positions
# make "attend to my neighbour" slow to learn (GPT needs only the current token, T5 has relative buckets), so its
# rows are short and many, and post-norm wants the lower rate
RECIPE = {"clm": (100, 3e-3, 32, 16), "mlm": (300, 1e-3, 16, 64), "span": (150, 3e-3, 32, 16)}


@pytest.fixture(scope="module")
def runs(datasets, tmp_path_factory):
    """objective -> (run folder, last metrics record), each trained once for the tests below."""
    out = {}
    for objective, preset in PRESET.items():
        steps, lr, block, batch = RECIPE[objective]
        run = tmp_path_factory.mktemp(f"run-{objective}") / "run"
        opts = PretrainOptions(data=datasets[objective], out=run, preset=preset, block_size=block,
                               sample_prompt="march", sample_tokens=8)
        tc = TrainConfig(steps=steps, batch_size=batch, lr=lr, min_lr=lr / 10, warmup=20, eval_every=steps // 2,
                         save_every=steps)
        out[objective] = run, pretrain(opts, tc, progress=False)
    return out


@pytest.mark.parametrize("objective", ["clm", "mlm", "span"])
def test_each_objective_learns_far_below_the_unigram_entropy(objective, runs, datasets):
    run, last = runs[objective]
    entropy = unigram_entropy(datasets[objective])
    assert entropy > 3.0  # ~30 words, nearly flat: context is the only way down
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, RECIPE[objective][0] + 1))
    assert records[0]["loss"] > entropy  # a fresh model is worse than unigram counts
    assert last["val_loss"] < 0.5 * entropy, (last["val_loss"], entropy)
    assert last["val_ppl"] == pytest.approx(torch.tensor(last["val_loss"]).exp().item(), rel=1e-6)
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_decoder_run_samples_and_generates_the_learned_sequence(runs, capsys):
    run, last = runs["clm"]
    samples = [r["sample"] for r in read_metrics(run / "metrics.jsonl") if "sample" in r]
    assert len(samples) == 2 and all(s.startswith("march") for s in samples)
    assert main(["generate", "--model", str(run), "-t", "0", "--max-new-tokens", "6", "march april"]) == 0
    assert capsys.readouterr().out.split()[:4] == ["may", "june", "july", "august"]


@pytest.mark.parametrize("objective", ["clm", "mlm", "span"])
def test_the_run_is_an_hf_folder_transformers_loads(objective, runs):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer, T5ForConditionalGeneration

    run, _ = runs[objective]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in run.iterdir()}
    ours, tok = load(run, inference=True)
    theirs_tok = AutoTokenizer.from_pretrained(run)
    text = "june july august september"
    ids = tok.encode(text)
    assert ids == theirs_tok(text).input_ids
    tokens = torch.tensor([ids])
    with torch.no_grad():
        if objective == "clm":
            theirs = AutoModelForCausalLM.from_pretrained(run).eval()
            expected, got = theirs(tokens).logits, ours(tokens)
        elif objective == "mlm":
            theirs = AutoModelForMaskedLM.from_pretrained(run).eval()
            expected, got = theirs(tokens).logits, ours(tokens, head="mlm")
        else:
            theirs = T5ForConditionalGeneration.from_pretrained(run).eval()
            dec = torch.tensor([[0, *ids[:3]]])
            expected = theirs(input_ids=tokens, decoder_input_ids=dec).logits
            got = ours(tokens, decoder_tokens=dec)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "lmforge", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _pretrain_args(data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["pretrain", "--data", str(data), "--out", str(out), "--preset", "tiny-gpt", "--block-size", "32",
            "--steps", str(steps), "--batch-size", "8", "--lr", "3e-3", "--eval-every", "10", "--sample-tokens", "0",
            "--quiet", *extra]


def test_a_run_killed_with_sigkill_resumes_to_the_same_losses(datasets, tmp_path):
    data, steps = datasets["clm"], 60
    # dropout on: resuming must restore the RNG too, not only weights, optimizer and data position
    args = ("--save-every", "4", "--dropout", "0.1")
    whole = _cli(*_pretrain_args(data, tmp_path / "whole", steps, *args))
    assert whole.wait(timeout=600) == 0, whole.stderr.read()
    killed_run = tmp_path / "killed"
    proc = _cli(*_pretrain_args(data, killed_run, steps, *args))
    ckpts = killed_run / "checkpoints"
    deadline = time.time() + 300
    while not (ckpts.is_dir() and any(p.name == "step-000008.pt" for p in ckpts.iterdir())):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed_run / "model.safetensors").exists()  # killed mid-run
    killed_at = max(r["step"] for r in read_metrics(killed_run / "metrics.jsonl"))
    assert killed_at < steps
    resumed = _cli(*_pretrain_args(data, killed_run, steps, *args, "--resume"))
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    a, b = read_metrics(tmp_path / "whole" / "metrics.jsonl"), read_metrics(killed_run / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, steps + 1))  # the log reads as one run
    for x, y in zip(a, b, strict=True):
        assert abs(x["loss"] - y["loss"]) < 1e-6, (x["step"], x["loss"], y["loss"])
        assert abs(x.get("val_loss", 0) - y.get("val_loss", 0)) < 1e-6
    wa, wb = load_file(tmp_path / "whole" / "model.safetensors"), load_file(killed_run / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_torchrun_two_processes_train_the_same_weights_as_one(fsdp, datasets, tmp_path):
    data, steps = datasets["clm"], 4
    extra = ("--micro-batch", "2", "--save-every", "2") + (("--fsdp",) if fsdp else ())
    one = _cli(*_pretrain_args(data, tmp_path / "one", steps, *extra))
    assert one.wait(timeout=600) == 0, one.stderr.read()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "lmforge",
         *_pretrain_args(data, tmp_path / "two", steps, *extra)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0)
    la, lb = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert la[-1]["loss"] < la[0]["loss"]  # the weights moved: equal weights are not equally untrained ones
    assert [round(r["loss"], 5) for r in la] == [round(r["loss"], 5) for r in lb]


# ---- bad input: one line, exit 2, nothing overwritten ----------------------------------------------------------


def _fails(capsys, *args: str) -> str:
    assert main(list(args)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_bad_pretrain_input_is_one_line_and_exit_2(datasets, corpus, tmp_path, capsys):
    data = str(datasets["clm"])
    base = ["pretrain", "--data", data, "--steps", "2", "--quiet", "--sample-tokens", "0"]
    assert "unknown config preset 'nope'" in _fails(capsys, *base, "--out", str(tmp_path / "a"), "--preset", "nope")
    err = _fails(capsys, *base, "--out", str(tmp_path / "a"), "--preset", "tiny-llama")  # vocab 256 < the tokenizer's
    assert "vocab_size is 256" in err
    assert "vocab size" in _fails(capsys, *base, "--out", str(tmp_path / "a"), "--preset", "tiny-gpt",
                                  "--vocab-size", "300")
    assert "objective mlm" in _fails(capsys, *base, "--out", str(tmp_path / "a"), "--preset", "tiny-gpt",
                                     "--objective", "mlm")
    assert "no [CLS] token" in _fails(capsys, *base, "--out", str(tmp_path / "a"), "--preset", "tiny-bert")  # BPE data
    assert "not a prepared dataset" in _fails(capsys, "pretrain", "--data", str(corpus), "--out",
                                              str(tmp_path / "a"), "--preset", "tiny-gpt", "--steps", "2")
    assert "--steps or --tokens" in _fails(capsys, "pretrain", "--data", data, "--out", str(tmp_path / "a"),
                                           "--preset", "tiny-gpt")
    assert not (tmp_path / "a").exists()  # refused before anything was written

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert "not a run folder" in _fails(capsys, *base, "--out", str(other), "--preset", "tiny-gpt")
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_resume_refuses_another_config_and_a_rerun_never_overwrites(datasets, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["pretrain", "--data", str(datasets["clm"]), "--out", str(run), "--preset", "tiny-gpt", "--block-size",
            "32", "--steps", "2", "--quiet", "--sample-tokens", "0"]
    assert main(args) == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert "already holds a run" in _fails(capsys, *args)
    assert "another lr" in _fails(capsys, *args, "--resume", "--lr", "1e-2")
    assert "another model" in _fails(capsys, *args[:6], "tiny-llama", *args[7:], "--resume", "--vocab-size", "448")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # the same options continue it: more steps, the schedule follows
    assert main([*args[:-4], "4", "--quiet", "--sample-tokens", "0", "--resume"]) == 0
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4]
    assert json.loads((run / "run.json").read_text())["steps"] == 4


def test_schedule_and_weight_decay_groups():
    from lmforge.config import ModelConfig
    from lmforge.model.transformer import Transformer
    from lmforge.train.loop import param_groups

    tc = TrainConfig(steps=100, lr=1e-3, min_lr=1e-4, warmup=10)
    assert tc.lr_at(0) == pytest.approx(1e-4) and tc.lr_at(9) == pytest.approx(1e-3)
    assert tc.lr_at(10) == pytest.approx(1e-3) and tc.lr_at(99) == pytest.approx(1e-4)  # the last step: min_lr
    assert tc.lr_at(54) > 5.5e-4 > tc.lr_at(55)  # half way down the cosine (steps 10 ... 99)
    assert all(tc.lr_at(i) >= tc.lr_at(i + 1) for i in range(10, 99))
    cfg = ModelConfig.from_name("tiny-gpt")
    cfg.vocab_size = 128
    model = Transformer(cfg)
    decay, plain = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(names[id(p)].endswith("weight") and "norm" not in names[id(p)] and "emb" not in names[id(p)]
               for p in decay["params"])
    assert {names[id(p)] for p in plain["params"]} >= {"tok_emb.weight", "pos_emb.weight", "dec_norm.weight",
                                                       "decoder.0.attn.qkv.bias"}
    assert len(decay["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_config_file_and_token_budget(datasets, tmp_path, capsys):
    """A ModelConfig JSON (or an HF config.json) instead of a preset; --tokens sets the steps from the window."""
    from lmforge.model_info import read_config

    config = tmp_path / "model.json"
    config.write_text(json.dumps({"name": "mine", "d_model": 32, "n_layer": 1, "n_head": 2, "n_kv_head": 1,
                                  "d_ff": 64, "max_seq_len": 64, "vocab_size": 0}))
    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(datasets["clm"]), "--out", str(run), "--config", str(config),
                 "--block-size", "32", "--batch-size", "4", "--tokens", "1k", "--quiet", "--sample-tokens", "0"]) == 0
    assert len(read_metrics(run / "metrics.jsonl")) == 8  # ceil(1000 / (4 rows x 32 tokens))
    cfg = read_config(run)[0]
    assert (cfg.d_model, cfg.n_layer, cfg.n_kv_head, cfg.vocab_size, cfg.hf_model_type) == (32, 1, 1, 448, "llama")
    capsys.readouterr()
    config.write_text(json.dumps({"d_model": 32, "n_layers": 1}))
    assert "unknown field(s) n_layers" in _fails(capsys, "pretrain", "--data", str(datasets["clm"]), "--out",
                                                 str(tmp_path / "b"), "--config", str(config), "--steps", "1")
