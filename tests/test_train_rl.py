"""The RL stages end to end on the tiny model: PPO, the critic-free estimators, best-of-n, the ratio-1
check, the KL sign, and resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import write_jsonl

PROMPTS = ["How do I read a CSV file?", "What is a good first language?", "How can I sort numbers?",
           "Explain a neural network.", "How do I count words?", "What is regression?", "How do I make a request?",
           "What is overfitting?", "How do I reverse a string?", "What is a dictionary?", "How do I plot?",
           "What is gradient descent?"]


@pytest.fixture()
def prompts(tmp_path):
    return str(write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS]))


def rule(tmp_path, text="keywords: [the]\nmax_words: 5\n"):
    path = tmp_path / "rule.yaml"
    path.write_text(text)
    return f"rule:{path}"


def metrics(run):
    return [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]


def ppo_cfg(tmp_path, prompts, **kw):
    from rlhfkit.train.ppo import PPOConfig

    base = dict(model="tiny", train=prompts, eval_size=4, eval_prompts=4, reward=rule(tmp_path), batch_size=4,
                micro_batch_size=2, max_new_tokens=6, max_steps=2, lora_r=4, output_dir=str(tmp_path / "runs"),
                progress=False, temperature=0.7)
    return PPOConfig(**{**base, **kw})


def test_ppo_first_minibatch_has_ratio_one(tmp_path, prompts):
    """With one PPO epoch and one minibatch the update starts at pi = pi_old: ratio exactly 1, approx-KL 0,
    no clipping (reference §3 'Checks'); the sampler's logprobs equal the trainer's within 1e-5 (fp32).
    The run directory has the curves, the held-out comparison and the final model."""
    from rlhfkit.train.ppo import run as train

    run = train(ppo_cfg(tmp_path, prompts, ppo_epochs=1, name="ratio"))
    first = metrics(run)[0]
    assert first["ratio"] == pytest.approx(1.0, abs=1e-6) and first["ratio_first_minibatch"] == pytest.approx(1.0, abs=1e-6)
    assert first["approx_kl"] == pytest.approx(0.0, abs=1e-10) and first["policy_clipfrac"] == 0.0
    assert first["logprob_mismatch"] < 1e-4
    # the hf engine is the trainer's own model: importance weights 1, nothing truncated
    assert first["is_weight"] == pytest.approx(1.0, abs=1e-4) and first["engine_logprob_diff"] < 1e-5
    assert first["is_truncated"] == 0.0 and first["engine_ratio_outside"] == 0.0
    for key in ("score", "non_score_reward", "kl", "entropy", "value_clipfrac", "value_loss", "explained_variance",
                "response_length", "eos_rate", "beta", "time_generate", "time_train"):
        assert key in first, key
    assert (run.path / "curves.png").stat().st_size > 1000
    assert first["explained_variance"] == 0.0  # the value head starts at zero: V = 0 explains nothing
    held = json.loads((run.path / "heldout.json").read_text())
    assert held["prompts"] == 4 and "difference_se" in held
    assert (run.path / "final" / "config.json").is_file()


def _perturbed_pair(tmp_path):
    """A tiny policy and a reference that differs from it by weight noise, saved as folders."""
    from rlhfkit.models import load_causal_lm

    model, tok = load_causal_lm("tiny", seed=0)
    with torch.no_grad():
        model.model.norm.weight.mul_(6.0)  # sharper next-token distributions than a random init's near-uniform ones
    model.save_pretrained(tmp_path / "policy")
    tok.save_pretrained(tmp_path / "policy")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * p.std() * torch.randn_like(p))
    model.save_pretrained(tmp_path / "reference")
    tok.save_pretrained(tmp_path / "reference")
    return str(tmp_path / "policy"), str(tmp_path / "reference")


@pytest.mark.parametrize("stage", ["ppo", "pg"])
def test_zero_reward_and_positive_beta_lowers_kl(tmp_path, prompts, stage):
    """Sign test (reference §8 item 5): the policy starts away from its reference (weight noise), the task
    reward is 0 (a rule with no terms). With beta = +1 the per-sequence KL does not run away: the last
    three steps stay below 1.5x the first three (whether it falls within 12 steps of 12 prompts is
    within the noise: it did for some seeds and not others). With beta = -1 (the sign bug of verl #179)
    the same run drives the KL up, to more than twice where beta = +1 ends."""
    policy, reference = _perturbed_pair(tmp_path)
    kls = {}
    for beta in (1.0, -1.0):
        common = dict(model=policy, reference=reference, train=prompts, eval_size=0, eval_prompts=0,
                      reward=rule(tmp_path, "{}\n"), beta=beta, max_new_tokens=8, max_steps=12, lr=3e-4, warmup_ratio=0.0,
                      min_lr_ratio=1.0, output_dir=str(tmp_path / "runs"), progress=False, temperature=1.0,
                      name=f"{stage}{beta}", save_every=100, batch_size=12)
        if stage == "ppo":
            from rlhfkit.train.ppo import PPOConfig
            from rlhfkit.train.ppo import run as train

            run = train(PPOConfig(**common, micro_batch_size=12, ppo_epochs=1))
        else:
            from rlhfkit.train.policy_gradient import PGConfig
            from rlhfkit.train.policy_gradient import run as train

            run = train(PGConfig(**common, samples_per_prompt=4, micro_batch_size=48, estimator="reinforce"))
        kls[beta] = [m["kl"] for m in metrics(run)]
    up, down = kls[-1.0], kls[1.0]
    assert down[0] > 1.0
    assert sum(down[-3:]) < 1.5 * sum(down[:3]), down
    assert sum(up[-3:]) > 2 * sum(down[-3:]), (up, down)


@pytest.mark.parametrize("estimator,kl_in", [("rloo", "reward"), ("grpo", "loss"), ("dr_grpo", "loss")])
def test_pg_estimators_run(tmp_path, prompts, estimator, kl_in):
    """Each estimator runs k = 4 samples per prompt with the KL where its paper puts it."""
    from rlhfkit.train.policy_gradient import PGConfig
    from rlhfkit.train.policy_gradient import run as train

    run = train(PGConfig(model="tiny", train=prompts, eval_size=2, eval_prompts=2, reward=rule(tmp_path), batch_size=2,
                         samples_per_prompt=4, micro_batch_size=4, max_new_tokens=6, max_steps=2, lora_r=4,
                         estimator=estimator, kl_in=kl_in, kl_estimator="k3", output_dir=str(tmp_path / "runs"),
                         progress=False, name=estimator))
    rows = metrics(run)
    assert len(rows) == 2 and rows[0]["ratio"] == pytest.approx(1.0, abs=1e-6)
    assert ("kl_loss" in rows[0]) == (kl_in == "loss")


def test_pg_shared_prefix_computes_the_same_step(tmp_path, prompts):
    """--share-prefix (each prompt computed once for its k samples, in the logprob phase and the update)
    against one row per response, with one minibatch, where the order of the micro-batches does not
    change the step: the same samples, KL, loss, ratio 1 and LoRA weights after the step, within float
    rounding. One step: after it the two policies differ by rounding, and a later draw that lands within
    rounding of a token boundary samples a different token on some CPUs (seen on an AVX2 machine). A
    micro-batch that would split a group is refused."""
    from safetensors.torch import load_file

    from rlhfkit.errors import ConfigError
    from rlhfkit.train.policy_gradient import PGConfig
    from rlhfkit.train.policy_gradient import run as train

    base = dict(model="tiny", train=prompts, eval_size=0, eval_prompts=0, reward=rule(tmp_path), batch_size=4,
                samples_per_prompt=3, micro_batch_size=6, max_new_tokens=8, max_steps=1, lora_r=4, lr=1e-2, adam_eps=1e-4,
                output_dir=str(tmp_path / "runs"), progress=False, temperature=1.0)
    runs = {share: train(PGConfig(**base, share_prefix=share, name=f"share-{share}")) for share in (True, False)}
    a, b = metrics(runs[True]), metrics(runs[False])
    for key in ("score", "kl", "response_length", "policy_loss", "ratio", "entropy", "grad_norm"):
        for ra, rb in zip(a, b):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), key
    assert a[0]["ratio_first_minibatch"] == pytest.approx(1.0, abs=1e-6)
    wa, wb = (load_file(str(r.path / "final" / "model.safetensors")) for r in (runs[True], runs[False]))
    for k in wa:  # adam_eps 1e-4: Adam would blow rounding noise in zero gradients up to lr-sized steps
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-3)
    with pytest.raises(ConfigError, match="multiple of --samples-per-prompt"):
        PGConfig(**{**base, "micro_batch_size": 4}).resolve()


def test_grpo_takes_pi_old_from_the_update_forward(tmp_path, prompts):
    """GRPO (KL in the loss) with one update per rollout takes pi_old from the update's own forward
    instead of a separate pass, as TRL does: step 1's KL to the reference, engine mismatch and IS weight
    are those of a run whose two minibatches need pi_old first (computed in the logprob phase), and the
    ratio is 1."""
    from rlhfkit.train.policy_gradient import PGConfig
    from rlhfkit.train.policy_gradient import run as train

    base = dict(model="tiny", train=prompts, eval_size=0, eval_prompts=0, reward=rule(tmp_path), batch_size=4,
                samples_per_prompt=3, micro_batch_size=6, max_new_tokens=8, max_steps=1, lora_r=4, lr=1e-2,
                estimator="grpo", kl_in="loss", kl_estimator="k3", output_dir=str(tmp_path / "runs"), progress=False,
                temperature=1.0, reference="tiny:1x32")  # another model: KL > 0 at step 1
    fused, separate = (metrics(train(PGConfig(**base, num_minibatches=n, name=f"mb{n}")))[0] for n in (1, 2))
    assert fused["kl"] > 0.1
    for key in ("kl", "engine_logprob_diff", "is_weight", "score", "response_length"):
        assert fused[key] == pytest.approx(separate[key], rel=1e-5, abs=1e-6), key
    assert fused["ratio"] == pytest.approx(1.0, abs=1e-7) and fused["ratio_first_minibatch"] == pytest.approx(1.0, abs=1e-7)


def test_best_of_n_writes_sft_and_preference_data(tmp_path, prompts):
    """n = 4: best.jsonl has one demonstration per prompt, its score the max of the prompt's four in
    samples.jsonl; pairs.jsonl pairs best with worst; KL_bon = log 4 - 3/4 in the manifest."""
    from rlhfkit.data import load_records
    from rlhfkit.train.best_of_n import BoNConfig
    from rlhfkit.train.best_of_n import run as run_bon

    run = run_bon(BoNConfig(model="tiny", train=prompts, reward=rule(tmp_path, "max_words: 3\n"), n=4,
                            max_new_tokens=6, output_dir=str(tmp_path / "runs"), progress=False, name="bon"))
    samples = [json.loads(x) for x in (run.path / "samples.jsonl").read_text().splitlines()]
    best = [json.loads(x) for x in (run.path / "best.jsonl").read_text().splitlines()]
    assert len(samples) == 4 * len(PROMPTS) and len(best) == len(PROMPTS)
    for i, b in enumerate(best):
        assert b["score"] == max(s["score"] for s in samples[4 * i: 4 * i + 4])
    assert len(load_records(str(run.path / "best.jsonl"), kind="demonstration").records) == len(PROMPTS)
    if (run.path / "pairs.jsonl").read_text().strip():
        load_records(str(run.path / "pairs.jsonl"), kind="preference")
    summary = json.loads((run.path / "manifest.json").read_text())["summary"]
    assert summary["kl_bon"] == pytest.approx(0.636294, abs=1e-6)
    assert summary["mean_score_best"] >= summary["mean_score_n1"]


def resumed_from_step_2(train, cfg, run) -> list[dict]:
    """A 4-step run with checkpoints at 2 and 4 cut back to step 2 (as if killed there), then resumed:
    the resumed run's metrics, steps 1 to 4."""
    shutil.rmtree(run.path / "checkpoints" / "step-00000004")
    (run.path / "checkpoints" / "latest").write_text("step-00000002")
    shutil.rmtree(run.path / "final")
    cfg.resume = True
    resumed = metrics(train(cfg))
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    return resumed


def test_ppo_resume_equals_uninterrupted(tmp_path, prompts):
    """Run 4 steps with a checkpoint at step 2. Then remove everything after step 2 (as if killed) and
    --resume: steps 3 and 4 log the same scores and KL, and the adaptive beta comes back from the
    checkpoint."""
    from rlhfkit.train.ppo import run as train

    cfg = ppo_cfg(tmp_path, prompts, max_steps=4, save_every=2, name="resume", kl_target=0.01, eval_prompts=0,
                  eval_size=0, keep_checkpoints=3)
    run = train(cfg)
    full = metrics(run)
    resumed = resumed_from_step_2(train, cfg, run)
    for a, b in zip(full[2:], resumed[2:]):
        for key in ("score", "kl", "beta", "response_length", "policy_loss"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    assert full[2]["beta"] != full[0]["beta"]


def test_ppo_ptx_and_a2c_preset(tmp_path, prompts):
    """PPO-ptx mixes the SFT loss of demonstrations in (logged as ptx_loss, about ln(vocab) on a random
    tiny model); the a2c preset sets one epoch, one minibatch, no policy or value clipping."""
    from rlhfkit.train.ppo import PRESETS
    from rlhfkit.train.ppo import run as train

    demos = write_jsonl(tmp_path / "demos.jsonl", [{"prompt": p, "response": "Use Python."} for p in PROMPTS])
    run = train(ppo_cfg(tmp_path, prompts, name="ptx", ptx_data=str(demos), ptx_coef=0.5, **PRESETS["a2c"]))
    rows = metrics(run)
    assert 9.0 < rows[0]["ptx_loss"] < 12.0
    assert rows[0]["policy_clipfrac"] == 0.0 and rows[0]["value_clipfrac"] == 0.0
    assert PRESETS["a2c"] == {"ppo_epochs": 1, "num_minibatches": 1, "clip": float("inf"), "value_clip": 0.0}


def test_ppo_with_lora_under_bf16_runs(tmp_path, prompts):
    """Regression: under bf16 the frozen copy inside the critic's LoRA head wrapper is stored in bf16
    while the trained head is fp32; the value head must run in the trained weights' dtype (the shipped
    configs/ppo-rule.yaml crashed at its first step with 'expected m1 and m2 to have the same dtype')."""
    from rlhfkit.train.ppo import run as train

    run = train(ppo_cfg(tmp_path, prompts, name="bf16", mixed_precision="bf16", max_steps=1, ppo_epochs=1))
    assert metrics(run)[0]["ratio_first_minibatch"] == pytest.approx(1.0, abs=1e-2)



@pytest.mark.parametrize("bf16", [False, True])
def test_critic_checkpointing_gives_the_same_gradients(bf16):
    """PPO's critic recomputed in the backward pass (--critic-checkpointing, the default) gives the loss and
    every gradient of keeping its activations, in fp32 under the CPU kernels and under bf16 autocast."""
    from rlhfkit.models import apply_lora, load_causal_lm
    from rlhfkit.models.reward import init_reward_head, load_reward_model
    from rlhfkit.platform.kernels import cpu_kernels
    from rlhfkit.rollout.sampler import Rollout
    from rlhfkit.train.ppo import ActorCritic

    torch.manual_seed(0)
    policy = apply_lora(load_causal_lm("tiny", seed=0)[0], 4, 8)
    critic, _ = load_reward_model("tiny", seed=1)
    init_reward_head(critic.hf.score)
    prompt_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    response_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    ro = Rollout(torch.randint(5, 500, (2, 4)) * prompt_mask, prompt_mask, torch.randint(5, 500, (2, 5)),
                 response_mask, torch.zeros(2, 5), torch.tensor([True, False]))
    device = torch.device("cpu")
    results = []
    for ckpt in (False, True):
        model = ActorCritic(policy, critic, ckpt, lambda: cpu_kernels(device))
        model.zero_grad()
        with cpu_kernels(device), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits, values, _ = model(ro, 0.7)
            loss = logits.logsumexp(-1).mul(response_mask).sum() * 1e-3 + (values - 1).pow(2).mul(response_mask).sum()
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (l0, g0), (l1, g1) = results
    assert any("critic" in n for n in g0) and any("lora" in n for n in g0)
    torch.testing.assert_close(l1, l0, rtol=0, atol=0)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-6, atol=1e-7, msg=n)


def test_shared_trunk_value_head_reads_the_policys_own_pass():
    """--shared-trunk: the update's one pass gives the logits of a policy-only pass and the values the
    logprob phase reads through the head (the same hidden states), the head starts at zero, and the value
    loss's gradient reaches the policy's adapter, which a separate critic's never does."""
    from rlhfkit.models import apply_lora, load_causal_lm
    from rlhfkit.rollout.sampler import Rollout, response_logits, response_values
    from rlhfkit.train.ppo import ActorCritic, TrunkValueHead

    torch.manual_seed(0)
    policy = apply_lora(load_causal_lm("tiny", seed=0)[0], 4, 8)
    head = TrunkValueHead(policy)
    assert [n for n, _ in head.named_parameters()] == ["head.weight"] and not head.head.weight.any()
    torch.nn.init.normal_(head.head.weight, std=0.1)
    prompt_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    response_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    ro = Rollout(torch.randint(5, 500, (2, 4)) * prompt_mask, prompt_mask, torch.randint(5, 500, (2, 5)),
                 response_mask, torch.zeros(2, 5), torch.tensor([True, False]))
    model = ActorCritic(policy, head)
    logits, values, _ = model(ro, 0.7)
    with torch.no_grad():
        torch.testing.assert_close(logits, response_logits(policy, ro, 0.7), rtol=0, atol=1e-5)
        torch.testing.assert_close(values, response_values(head, ro), rtol=0, atol=1e-5)
    assert values.abs().sum() > 0.1
    (values - 1).pow(2).mul(response_mask).sum().backward()
    lora_grads = [p.grad for n, p in policy.named_parameters() if "lora_B" in n]
    assert lora_grads and any(g is not None and g.abs().sum() > 0 for g in lora_grads)
    assert sorted(n for n, _ in model.named_parameters() if "head" in n) == ["critic.head.weight"]


@pytest.mark.slow
def test_ppo_with_a_shared_trunk_trains_and_resumes(tmp_path, prompts):
    """A PPO run with the value head on the policy's trunk: ratio 1 and explained variance 0 at the start
    (a zero head), values that move once the head trains, final/ is the policy alone, and a resumed run
    equals the uninterrupted one (the head is in the checkpoint)."""
    from rlhfkit.train.ppo import run as train

    cfg = ppo_cfg(tmp_path, prompts, shared_trunk=True, ppo_epochs=1, max_steps=4, save_every=2, lr=3e-3,
                  keep_checkpoints=3, name="shared")
    run = train(cfg)
    rows = metrics(run)
    assert rows[0]["ratio_first_minibatch"] == pytest.approx(1.0, abs=1e-6)
    assert rows[0]["explained_variance"] == 0.0
    assert any(r["explained_variance"] != 0.0 for r in rows[1:])
    from safetensors.torch import load_file

    final = load_file(str(run.path / "final" / "model.safetensors"))
    assert not any("head.weight" in k and "lm_head" not in k for k in final)
    resumed = resumed_from_step_2(train, cfg, run)
    for a, b in zip(rows[2:], resumed[2:]):
        for key in ("score", "kl", "value_loss", "policy_loss", "explained_variance"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
