"""DPO and the reward model: losses against values derived by hand, the log-probs they use against a direct
computation, the reference as the LoRA model with its adapters off, and short runs on a tiny model that learn
the preference; bad input names its row."""

import json
import math

import pytest
import tiny
import torch
import torch.nn.functional as F

from lmforge.cli import main
from lmforge.data.preferences import SIDES, collate_pairs, pair_tokens, read_pairs
from lmforge.generate import SamplingParams, complete, encode_prompt
from lmforge.train.align import load_reward_model, score
from lmforge.train.lora import LoRAConfig, adapters_off, add_lora
from lmforge.train.preference import (
    DPOObjective,
    RewardObjective,
    answer_logps,
    bradley_terry_loss,
    dpo_loss,
    reference_logps,
)
from lmforge.weights.load import load

LN2 = math.log(2)


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny.llama_folder(tmp_path_factory.mktemp("align") / "llama", layers=2, chat_template=True)


PAIRS = [{"prompt": f"question {i}", "chosen": "yes", "rejected": "no, no and no"} for i in range(24)]


@pytest.fixture
def batch(base, tmp_path):
    _, tok = load(base)
    return collate_pairs(pair_tokens(read_pairs(write(tmp_path / "p.jsonl", PAIRS[:4])), tok, 64), 0)


# ---- the losses, by hand --------------------------------------------------------------------------------------


def both_sides(batch):
    """The chosen rows then the rejected rows, right-padded to one width (2B, T): more padding than the objectives
    use, so the numbers below must not depend on it."""
    width = max(batch[f"{s}_tokens"].shape[1] for s in SIDES)
    return [torch.cat([F.pad(batch[f"{s}_{key}"], (0, width - batch[f"{s}_{key}"].shape[1])) for s in SIDES])
            for key in ("tokens", "answer", "mask")]


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_dpo_loss_by_hand_and_ln2_when_the_policy_is_the_reference():
    pi_c, pi_r, ref_c, ref_r = t(-1.0), t(-3.0), t(-2.0), t(-2.0)
    # h = (pi_c - ref_c) - (pi_r - ref_r) = 1 - (-1) = 2; beta h = 1
    assert float(dpo_loss(pi_c, pi_r, ref_c, ref_r, 0.5)) == pytest.approx(math.log(1 + math.exp(-1)))
    smoothed = 0.9 * math.log(1 + math.exp(-1)) + 0.1 * math.log(1 + math.exp(1))
    assert float(dpo_loss(pi_c, pi_r, ref_c, ref_r, 0.5, "sigmoid", 0.1)) == pytest.approx(smoothed)
    robust = (0.9 * math.log(1 + math.exp(-1)) - 0.1 * math.log(1 + math.exp(1))) / 0.8
    assert float(dpo_loss(pi_c, pi_r, ref_c, ref_r, 0.5, "robust", 0.1)) == pytest.approx(robust)
    assert float(dpo_loss(pi_c, pi_r, ref_c, ref_r, 0.5, "ipo")) == pytest.approx((2 - 1) ** 2)  # (h - 1/(2 beta))^2
    same = t(-4.0, -0.5)
    assert dpo_loss(same, same - 1, same, same - 1, 0.1).tolist() == pytest.approx([LN2, LN2])
    assert dpo_loss(same, same - 1, same, same - 1, 0.1, "robust", 0.2).tolist() == pytest.approx([LN2, LN2])


def test_bradley_terry_loss_by_hand():
    assert bradley_terry_loss(t(2.0), t(1.0)).item() == pytest.approx(math.log(1 + math.exp(-1)))
    assert bradley_terry_loss(t(0.0), t(0.0)).item() == pytest.approx(LN2)


# ---- log-probs through the model ------------------------------------------------------------------------------


def test_answer_logps_equal_a_full_log_softmax(base, batch):
    model, _ = load(base, inference=False)
    model.eval()
    tokens, answer, mask = both_sides(batch)
    sums, counts = answer_logps(model, tokens, answer, mask)
    logits = model(tokens[:, :-1], attention_mask=mask[:, :-1])  # every position through the LM head
    logp = torch.log_softmax(logits.float(), -1).gather(2, tokens[:, 1:, None])[..., 0]
    expected = (logp * answer[:, 1:]).sum(1)
    torch.testing.assert_close(sums, expected, rtol=1e-5, atol=1e-5)
    assert counts.tolist() == answer[:, 1:].sum(1).tolist()


def test_the_lora_reference_is_the_model_with_adapters_off(base, batch):
    plain, _ = load(base, inference=False)
    model, _ = load(base, inference=False)
    add_lora(model, LoRAConfig(r=4, alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # adapters that change the outputs
    tokens, answer, mask = both_sides(batch)
    with torch.no_grad():
        base_logps = answer_logps(plain.eval(), tokens, answer, mask)[0]
        tuned = answer_logps(model.eval(), tokens, answer, mask)[0]
        with adapters_off(model):
            off = answer_logps(model, tokens, answer, mask)[0]
    assert not torch.allclose(tuned, base_logps)
    torch.testing.assert_close(off, base_logps)
    torch.testing.assert_close(answer_logps(model, tokens, answer, mask)[0].detach(), tuned)  # back on after


def test_dpo_objective_is_ln2_at_the_start_and_rpo_adds_the_chosen_nll(base, batch):
    model, _ = load(base, inference=False)
    model.eval()
    [(chosen, rejected)] = reference_logps(model, [batch])
    batch["ref_chosen"], batch["ref_rejected"] = chosen, rejected
    n = batch["labels"].shape[0]
    with torch.no_grad():
        assert float(DPOObjective(0.1, "sigmoid")(model, batch)) == pytest.approx(n * LN2, rel=1e-5)
        rpo = DPOObjective(0.1, "rpo", rpo_alpha=0.5)
        tokens_c = batch["chosen_answer"][:, 1:].sum(1)
        nll = (-chosen / tokens_c).sum()
        assert float(rpo(model, batch)) == pytest.approx(n * LN2 + 0.5 * float(nll), rel=1e-5)
        metrics = rpo.take_metrics()
    assert metrics["reward_accuracy"] == 0.0 and metrics["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert rpo.take_metrics() == {}  # taken once
    with torch.no_grad():  # IPO at the start: (0 - 1 / (2 beta))^2 per pair
        assert float(DPOObjective(0.1, "ipo")(model, batch)) == pytest.approx(n * 25.0, rel=1e-4)


def test_reward_objective_on_scores(base, batch):
    model, _ = load(base, inference=False)
    torch.manual_seed(0)
    model.add_label_head(1)
    model.eval()
    objective = RewardObjective()
    with torch.no_grad():
        loss = float(objective(model, batch))
        tokens, _, mask = both_sides(batch)
        last = mask.sum(1) - 1
        scores = model(tokens, attention_mask=mask, head="classify")[torch.arange(len(last)), last, 0]
    n = batch["labels"].shape[0]
    assert loss == pytest.approx(float(-F.logsigmoid(scores[:n] - scores[n:]).sum()), rel=1e-5)
    assert objective.take_metrics()["accuracy"] == float((scores[:n] > scores[n:]).double().mean())


# ---- runs ---------------------------------------------------------------------------------------------------


def answer_logp(model, tok, prompt: str, answer: str) -> float:
    rows = [{"prompt": prompt, "chosen": answer, "rejected": answer + "!"}]
    batch = collate_pairs(pair_tokens(read_pairs(write_tmp(rows)), tok, 64), 0)
    with torch.no_grad():
        return float(answer_logps(model.eval(), batch["chosen_tokens"], batch["chosen_answer"],
                                  batch["chosen_mask"])[0][0])


def write_tmp(rows):
    import tempfile
    from pathlib import Path

    return write(Path(tempfile.mkdtemp()) / "p.jsonl", rows)


@pytest.mark.parametrize("loss", ["sigmoid", "rpo"])
def test_dpo_run_prefers_the_chosen_answer_on_held_out_prompts(loss, base, tmp_path):
    data = write(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / "dpo"
    assert main(["align", "dpo", "--model", str(base), "--data", str(data), "--out", str(out), "--loss", loss,
                 "--steps", "24", "--batch-size", "4", "--lr", "5e-3", "--merge", "--quiet"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["before"]["reward_accuracy"] == 0.0 and result["before"]["loss"] == pytest.approx(
        LN2 + (result["before"]["chosen_nll"] if loss == "rpo" else 0), rel=1e-4)
    assert result["after"]["reward_accuracy"] == 1.0 and result["after"]["reward_margin"] > 0.1
    tuned, tok = load(out / "merged")
    plain, _ = load(base)
    margin = [answer_logp(m, tok, "question 99", "yes") - answer_logp(m, tok, "question 99", "no, no and no")
              for m in (plain, tuned)]
    assert margin[1] > margin[0] + 1.0  # on a prompt never trained on
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 24 and {"reward_accuracy", "reward_margin", "chosen_nll"} <= set(records[-1])
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out / "merged").eval()  # the merged folder is a plain HF model
    ids = torch.tensor([encode_prompt(tok, "question 99", chat=True)])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, tuned(ids), rtol=1e-4, atol=1e-4)


def test_full_dpo_writes_an_hf_folder(base, tmp_path):
    data = write(tmp_path / "pairs.jsonl", PAIRS[:8])
    out = tmp_path / "full"
    assert main(["align", "dpo", "--model", str(base), "--data", str(data), "--out", str(out), "--method", "full",
                 "--steps", "4", "--batch-size", "4", "--lr", "1e-3", "--val-fraction", "0", "--quiet"]) == 0
    from transformers import AutoModelForCausalLM

    model, tok = load(out)
    plain, _ = load(base)
    ids = torch.tensor([encode_prompt(tok, "question 99", chat=True)])
    with torch.no_grad():
        tuned = model(ids)
        assert (tuned - plain(ids)).abs().max() > 1e-3  # every weight trained: the folder is not the base
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits, tuned,
                                   rtol=1e-4, atol=1e-4)
    margin = [answer_logp(m, tok, "question 99", "yes") - answer_logp(m, tok, "question 99", "no, no and no")
              for m in (plain, model)]
    assert margin[1] > margin[0]


def test_reward_model_learns_a_separable_preference_and_scores_rows(base, tmp_path, capsys):
    data = write(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / "rm"
    assert main(["align", "reward", "--model", str(base), "--data", str(data), "--out", str(out), "--steps", "30",
                 "--batch-size", "4", "--lr", "1e-2", "--val-fraction", "0.25", "--quiet"]) == 0
    assert "held-out pairwise accuracy: 100.0% (6 pairs)" in capsys.readouterr().out
    result = json.loads((out / "result.json").read_text())
    assert result["after"]["loss"] < 0.1 < result["before"]["loss"]
    rows = write(tmp_path / "score.jsonl", [{"prompt": "question 77", "response": "no, no and no"},
                                            {"prompt": "question 77", "response": "yes"}])
    assert main(["align", "score", "--reward", str(out), "--data", str(rows), "--format", "json"]) == 0
    scored = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [s["line"] for s in scored] == [1, 2] and scored[1]["score"] > scored[0]["score"]
    model, tok = load_reward_model(out)  # the library call gives the same numbers
    values = score(model, tok, [[{"role": "user", "content": "question 77"}]] * 3, ["no, no and no", "yes", ""])
    assert values[:2] == pytest.approx([s["score"] for s in scored], abs=1e-5)
    assert math.isfinite(values[2])  # a policy that says nothing still gets a score (PPO's rollouts can)


def test_sample_writes_greedy_then_sampled_answers(base, tmp_path):
    prompts = write(tmp_path / "q.jsonl", [{"prompt": "question 1"}, {"prompt": "question 2"}])
    out = tmp_path / "answers.jsonl"
    assert main(["align", "sample", "--model", str(base), "--prompts", str(prompts), "--n", "3", "--out", str(out),
                 "--max-new-tokens", "6"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt"], r["sample"], r["greedy"]) for r in rows] == [
        ("question 1", 0, True), ("question 1", 1, False), ("question 1", 2, False),
        ("question 2", 0, True), ("question 2", 1, False), ("question 2", 2, False)]
    model, tok = load(base)
    greedy = complete(model, tok, [encode_prompt(tok, "question 2", chat=True)],
                      SamplingParams(max_new_tokens=6, temperature=0))[0].text
    assert rows[3]["response"] == greedy


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "q", "chosen": "a", "rejected": "a"}], "pairs.jsonl line 1: 'chosen' and 'rejected' are the same"),
    ([{"prompt": "q", "chosen": "a", "rejected": "b" * 200}], "pairs.jsonl line 1: the pair is"),
    ([{"prompt": "q", "chosen": "a"}], "pairs.jsonl line 1: missing field 'rejected'"),
])
def test_bad_pairs_are_one_line_errors_naming_the_row(rows, message, base, tmp_path, capsys):
    data = write(tmp_path / "pairs.jsonl", rows)
    for command in ("dpo", "reward"):
        assert main(["align", command, "--model", str(base), "--data", str(data), "--out", str(tmp_path / command),
                     "--steps", "1", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
