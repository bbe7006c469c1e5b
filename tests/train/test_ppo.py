"""PPO: GAE against a direct loop, the clipped objectives on crafted ratios, the KL term zero when the policy is
the reference, a short run on a tiny model that raises its reward, and reward functions that fail named by row."""

import json
import textwrap
from pathlib import Path

import pytest
import tiny
import torch

from lmforge.cli import main
from lmforge.data.preferences import read_prompts
from lmforge.train.loop import TrainConfig, read_metrics
from lmforge.train.lora import LoRAConfig, adapters_off, add_lora
from lmforge.train.ppo import (
    PPOOptions,
    Rollouts,
    gae,
    kl_penalty,
    policy_loss,
    ppo,
    token_stats,
    value_loss,
    whiten,
)
from lmforge.weights.load import load


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny.llama_folder(tmp_path_factory.mktemp("ppo") / "llama", layers=2, chat_template=True)


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(20)))
    return path


@pytest.fixture
def rewards(tmp_path, monkeypatch):
    """A module of reward functions importable as `ppo_rewards` (the run's cwd is on its path)."""
    (tmp_path / "ppo_rewards.py").write_text(textwrap.dedent("""
        def ascii_rate(prompt, response):  # half the byte vocabulary is ASCII: a reward every answer informs
            return sum(c < "\x80" for c in response) / max(len(response), 1)

        def broken(prompt, response):
            if prompt.endswith("7"):
                raise ValueError("no score for this one")
            return 0.0

        def text(prompt, response):
            return "high"

        def by_prompt(prompt, response):  # a different reward for every prompt, numpy's float type
            import numpy
            return numpy.float32(int(prompt.split()[-1]) / 10)
    """))
    (tmp_path / "ppo_broken.py").write_text("def f(prompt, response)\n    return 0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "ppo_rewards"


def test_gae_equals_the_direct_sum():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 0]], dtype=torch.bool)
    gamma, lam = 0.9, 0.8
    adv, returns = gae(rewards, values, mask, gamma, lam)
    for row in range(3):
        at = mask[row].nonzero()[:, 0].tolist()
        r, v = rewards[row, at].tolist(), values[row, at].tolist() + [0.0]  # the value after the end is 0
        deltas = [r[t] + gamma * v[t + 1] - v[t] for t in range(len(r))]
        for t, col in enumerate(at):
            expected = sum((gamma * lam) ** k * deltas[t + k] for k in range(len(r) - t))
            assert float(adv[row, col]) == pytest.approx(expected)
            assert float(returns[row, col]) == pytest.approx(expected + v[t])
    assert adv[~mask].abs().sum() == 0 and returns[~mask].abs().sum() == 0


def test_the_clipped_policy_objective_on_crafted_ratios():
    clip = 0.2
    ratio = torch.tensor([1.5, 0.5, 1.5, 0.5, 1.1])
    adv = torch.tensor([2.0, 2.0, -2.0, -2.0, 1.0])
    loss, clipped = policy_loss(ratio.log(), torch.zeros(5), adv, clip)
    # A > 0: the gain stops at 1 + clip; A < 0: the loss stops improving at 1 - clip; inside the band: -A r
    assert loss.tolist() == pytest.approx([-2 * 1.2, -2 * 0.5, 2 * 1.5, 2 * 0.8, -1.1])
    assert clipped.tolist() == [True, False, False, True, False]


def test_the_clipped_value_loss_by_hand():
    old, returns = torch.tensor([0.0, 0.0]), torch.tensor([1.0, -1.0])
    values = torch.tensor([0.5, 0.5])  # moved 0.5 from old; clip 0.2 keeps the clipped one at 0.2
    loss = value_loss(values, old, returns, 0.2)
    assert loss.tolist() == pytest.approx([0.5 * max(0.25, 0.64), 0.5 * max(2.25, 1.44)])


def test_whiten_uses_the_masked_positions_only():
    x, mask = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]]), torch.tensor([[1, 1, 0], [1, 1, 0]]).bool()
    w = whiten(x, mask)
    assert float(w[mask].mean()) == pytest.approx(0.0, abs=1e-6) and float(w[mask].std()) == pytest.approx(1.0)
    assert w[~mask].abs().sum() == 0


def test_kl_is_zero_when_the_policy_is_the_reference(base, prompts, rewards):
    model, tok = load(base, inference=False)
    model.add_label_head(1)
    add_lora(model, LoRAConfig(r=4, alpha=8, modules_to_save=["score"]))  # fresh adapters: B = 0
    model.eval()
    tokens = torch.tensor([[1, 5, 9, 33, 40, 41], [2, 7, 7, 12, 13, 0]])
    answer = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 0]])
    mask = torch.tensor([[1] * 6, [1] * 5 + [0]])
    with torch.no_grad():
        logp, _, _ = token_stats(model, tokens, answer, mask)
        with adapters_off(model):
            ref, _, _ = token_stats(model, tokens, answer, mask, values=False)
    assert kl_penalty(logp, ref).abs().max() == 0
    opts = PPOOptions(model=str(base), reward=f"{rewards}:ascii_rate", prompts=prompts, out=Path("unused"),
                      rollouts=4, max_new_tokens=5)
    from lmforge.train.ppo import load_reward

    data = Rollouts(model, tok, read_prompts(prompts), load_reward(opts.reward, torch.device("cpu"))[0], opts,
                    batch_size=2, seed=0, reference=None)
    batch = data.global_batch(0)  # the first rollout: the policy is still its reference
    assert data.stats["kl"] == 0.0 and data.stats["ppo_step"] == 1
    assert batch["tokens"].shape[0] == 2 and int((batch["labels"] != -100).sum()) > 0


def ascii_mass(folder) -> float:
    """Mean probability of an ASCII byte as the first answer token, over prompts no run trains on."""
    from lmforge.generate import encode_prompt

    model, tok = load(folder)
    with torch.no_grad():
        probs = [torch.softmax(model(torch.tensor([encode_prompt(tok, f"question {i}", chat=True)]))[0, -1], -1)
                 for i in range(100, 110)]
    return sum(float(p[:128].sum()) for p in probs) / len(probs)


def test_a_short_ppo_run_raises_the_reward(base, prompts, rewards, tmp_path):
    out = tmp_path / "ppo"
    opts = PPOOptions(model=str(base), reward=f"{rewards}:ascii_rate", prompts=prompts, out=out, method="full",
                      rollouts=16, ppo_epochs=2, max_new_tokens=8, val_fraction=0.2, kl_coef=0.01, merge=True)
    tc = TrainConfig(steps=0, batch_size=8, lr=3e-3, min_lr=3e-3, warmup=0, save_every=100)
    result = ppo(opts, 10, tc, progress=False, quiet=True)
    assert result["after"]["reward"] > result["before"]["reward"] + 0.2  # held-out prompts, greedy answers
    # and the policy itself moved: more probability on rewarded tokens at the start of unseen prompts' answers
    assert ascii_mass(out) > ascii_mass(base) + 0.05
    records = read_metrics(out / "metrics.jsonl")
    assert len(records) == 10 * 2 * 2  # PPO steps x epochs x minibatches
    for key in ("reward", "kl", "entropy", "clip_fraction", "policy_loss", "value_loss", "ppo_step"):
        assert key in records[-1]
    assert records[0]["kl"] == 0.0 and records[-1]["kl"] != 0.0
    assert (out / "loss.png").exists()
    model, tok = load(out)  # full: OUT is the policy as an HF folder, without its value head
    assert model.cfg.n_labels == 0


def test_ppo_through_the_cli_with_a_reward_model(base, prompts, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "a", "rejected": "bbb"}) + "\n"
                             for i in range(8)))
    rm = tmp_path / "rm"
    assert main(["align", "reward", "--model", str(base), "--data", str(pairs), "--out", str(rm), "--steps", "2",
                 "--batch-size", "4", "--val-fraction", "0", "--quiet"]) == 0
    out = tmp_path / "ppo"
    assert main(["align", "ppo", "--model", str(base), "--reward", str(rm), "--prompts", str(prompts), "--out",
                 str(out), "--steps", "1", "--rollouts", "4", "--batch-size", "2", "--max-new-tokens", "4",
                 "--merge", "--quiet"]) == 0
    assert "held-out mean reward (2 prompts, greedy)" in capsys.readouterr().out
    assert (out / "adapter" / "adapter_model.safetensors").exists() and (out / "merged" / "config.json").exists()
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert not adapter.get("modules_to_save")  # the value head stays behind
    load(out / "merged")


@pytest.mark.parametrize("function, message", [
    ("broken", "the reward function ppo_rewards:broken failed on prompt "),
    ("text", "the reward function ppo_rewards:text returned 'high' for prompt "),
    ("missing", "cannot load the reward function ppo_rewards:missing"),
])
def test_reward_functions_that_fail_are_named(function, message, base, prompts, rewards, capsys):
    code = main(["align", "ppo", "--model", str(base), "--reward", f"{rewards}:{function}", "--prompts",
                 str(prompts), "--out", "run", "--steps", "1", "--rollouts", "20", "--batch-size", "20",
                 "--val-fraction", "0", "--max-new-tokens", "2", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    if function == "broken":  # the row named is one the function refuses: question 7 or 17
        assert ("prompts.jsonl line 8: " in err or "prompts.jsonl line 18: " in err) and "ValueError: no score" in err


def test_an_interrupted_ppo_run_resumes_to_the_same_numbers(base, prompts, rewards, tmp_path):
    def run(out, steps, resume=False):
        opts = PPOOptions(model=str(base), reward=f"{rewards}:ascii_rate", prompts=prompts, out=out, rollouts=4,
                          ppo_epochs=2, max_new_tokens=4, val_fraction=0, resume=resume)
        tc = TrainConfig(steps=0, batch_size=2, lr=1e-3, min_lr=1e-3, warmup=0, save_every=1)
        return ppo(opts, steps, tc, progress=False, quiet=True)

    run(tmp_path / "straight", 3)
    run(tmp_path / "resumed", 2)  # stopped after 2 PPO steps (8 optimizer steps), checkpointed at the boundary
    run(tmp_path / "resumed", 3, resume=True)
    straight, resumed = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("straight", "resumed"))
    assert len(resumed) == len(straight) == 12
    for a, b in zip(straight, resumed, strict=True):  # the third rollout and its updates are the same
        for key in ("loss", "reward", "kl", "grad_norm", "ppo_step"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)


def test_a_module_that_does_not_import_is_one_line(base, prompts, rewards, capsys):
    code = main(["align", "ppo", "--model", str(base), "--reward", "ppo_broken:f", "--prompts", str(prompts), "--out",
                 "run", "--steps", "1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot load the reward function ppo_broken:f: SyntaxError" in err and err.count("\n") == 1


def rollouts(model, tok, prompts, rewards, saved=None, **options):
    from lmforge.train.ppo import load_reward

    opts = PPOOptions(model="unused", reward=f"{rewards}:by_prompt", prompts=prompts, out=Path("unused"),
                      rollouts=4, max_new_tokens=5, **options)
    return Rollouts(model, tok, read_prompts(prompts), load_reward(opts.reward, torch.device("cpu"))[0], opts,
                    batch_size=2, seed=0, reference=None, saved=saved)


def test_each_answer_token_returns_its_rows_reward(base, prompts, rewards):
    """With no KL penalty and gamma = lambda = 1 every answer token's return is the row's reward, which pins where
    the reward is placed and how GAE runs over the answer; the old log-probs are the policy's own."""
    model, tok = load(base, inference=False)
    model.add_label_head(1)
    add_lora(model, LoRAConfig(r=4, alpha=8, modules_to_save=["score"]))
    data = rollouts(model, tok, prompts, rewards, kl_coef=0.0, gamma=1.0, lam=1.0)
    data.global_batch(0)
    batch = data.batch
    trained = batch["answer"][:, 1:].bool()
    assert data.stats["reward"] > 0
    rows = [data.prompts[i] for i in data._prompt_rows(0)]
    for r, row in enumerate(rows):
        expected = int(row.prompt.split()[-1]) / 10
        assert batch["returns"][r][trained[r]].tolist() == pytest.approx([expected] * int(trained[r].sum()))
    with torch.no_grad():
        logp, values, _ = token_stats(model.eval(), batch["tokens"], batch["answer"], batch["mask"])
    torch.testing.assert_close(batch["old_logp"][trained], logp)
    torch.testing.assert_close(batch["old_values"][trained], values)


def test_the_kl_against_the_adapters_off_reference_once_the_policy_moved(base, prompts, rewards):
    model, tok = load(base, inference=False)
    model.add_label_head(1)
    add_lora(model, LoRAConfig(r=4, alpha=8, modules_to_save=["score"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    data = rollouts(model, tok, prompts, rewards)
    data.global_batch(0)
    trained = data.batch["answer"][:, 1:].bool()
    plain, _ = load(base)
    with torch.no_grad():
        ref, _, _ = token_stats(plain, data.batch["tokens"], data.batch["answer"], data.batch["mask"], values=False)
    kl = data.batch["old_logp"][trained] - ref
    assert kl.abs().max() > 0.01  # the policy differs from its start
    assert data.stats["kl"] == pytest.approx(float(kl.sum()) / trained.shape[0], rel=1e-4)


def test_a_stopped_run_resumes_with_the_rollout_it_had(base, prompts, rewards, tmp_path):
    model, tok = load(base, inference=False)
    model.add_label_head(1)
    add_lora(model, LoRAConfig(r=4, alpha=8, modules_to_save=["score"]))
    saved = tmp_path / "rollout.pt"
    first = rollouts(model, tok, prompts, rewards, saved=saved)
    batch = first.global_batch(0)
    with torch.no_grad():  # the policy moved during the cycle's first updates, then the run stopped
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    again = rollouts(model, tok, prompts, rewards, saved=saved)
    assert all(torch.equal(again.global_batch(0)[k], v) for k, v in batch.items())
    assert again.stats == first.stats
    assert not torch.equal(rollouts(model, tok, prompts, rewards).global_batch(0)["old_logp"], batch["old_logp"])
