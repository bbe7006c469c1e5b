"""`lmforge generate --format json --logprobs K` and `--stats` on the real default model, against transformers."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.cli import main

PROMPT = "The capital of France is"


@pytest.mark.slow
def test_logprobs_json_equal_transformers_log_softmax(smollm_path, hf_smollm, hf_smollm_tokenizer, capsys):
    rc = main(["generate", PROMPT, "--model", str(smollm_path), "--temperature", "0", "--max-new-tokens", "6",
               "--format", "json", "--logprobs", "3", "--dtype", "float32"])  # parity: transformers runs fp32
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["finish_reason"] == ("length" if len(out["tokens"]) == 6 else "eos")
    ids = hf_smollm_tokenizer(PROMPT).input_ids
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(out["tokens"]),
                            "total_tokens": len(ids) + len(out["tokens"])}
    assert "".join(t["token"] for t in out["tokens"]) == out["text"]
    seq = list(ids)
    for tok in out["tokens"]:
        with torch.no_grad():
            logp = torch.log_softmax(hf_smollm(torch.tensor([seq])).logits[0, -1].float(), -1)
        best = torch.topk(logp, 3)
        assert tok["id"] == best.indices[0].item()  # greedy
        assert tok["logprob"] == pytest.approx(logp[tok["id"]].item(), abs=2e-3)
        assert [t["id"] for t in tok["top"]] == best.indices.tolist()
        assert [t["logprob"] for t in tok["top"]] == pytest.approx(best.values.tolist(), abs=2e-3)
        assert tok["token"] == hf_smollm_tokenizer.decode([tok["id"]])
        seq.append(tok["id"])
    assert "Paris" in out["text"]


@pytest.mark.slow
def test_stats_and_text_format(smollm_path, capsys):
    rc = main(["generate", PROMPT, "--model", str(smollm_path), "--temperature", "0", "--max-new-tokens", "5",
               "--stats"])
    captured = capsys.readouterr()
    assert rc == 0 and "Paris" in captured.out
    stats = dict(line.split(":", 1) for line in captured.err.strip().splitlines()[-8:])
    assert stats["prompt eval count"].strip() == "5 token(s)" and stats["eval count"].strip() == "5 token(s)"
    assert float(stats["eval rate"].split()[0]) > 0 and float(stats["prompt eval rate"].split()[0]) > 0
    assert "GiB RSS" in stats["peak memory"]


def test_logprobs_needs_json_and_a_sane_k(capsys):
    assert main(["generate", "hi", "--logprobs", "2"]) == 2
    assert "--format json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse's own check, before anything loads
        main(["generate", "hi", "--format", "json", "--logprobs", "50"])
    assert exit_info.value.code == 2 and capsys.readouterr().err.startswith("error: argument --logprobs")


def test_truncated_prompt_says_so(tmp_path, capsys):
    """--truncate drops the oldest prompt tokens with a one-line notice on stderr; without it, an error."""
    from tiny import llama_folder

    folder = llama_folder(tmp_path / "llama")  # context 64, byte tokenizer: one token per character
    prompt = "x" * 70
    assert main(["generate", prompt, "--model", str(folder), "--max-new-tokens", "4", "--temperature", "0"]) == 2
    assert "context overflow" in capsys.readouterr().err
    assert main(["generate", prompt, "--model", str(folder), "--max-new-tokens", "4", "--temperature", "0",
                 "--truncate", "--format", "json"]) == 0
    captured = capsys.readouterr()
    assert "(prompt truncated: 10 of its 70 tokens dropped to fit the context)" in captured.err
    assert json.loads(captured.out)["usage"]["prompt_tokens"] == 60
