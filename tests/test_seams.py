"""The structure: one-way layers, the rollout-engine and reward-source seams, configs that check
themselves (CLI and pipeline alike), one-line errors, and experiment trackers."""

from __future__ import annotations

import json
import pkgutil
import subprocess

import pytest
import torch
import yaml

import rlhfkit
from conftest import PYTHON, ROOT, write_jsonl
from rlhfkit.errors import ConfigError

# ------------------------------------------------------------------------------------ layers


def test_import_linter_layers_and_acyclic_contracts_hold():
    """The layers contract in pyproject.toml (platform -> data -> models -> losses -> rollout -> feedback ->
    eval -> (train | people) -> pipeline -> web -> (serve | annotate)) and the no-cycles contract."""
    out = subprocess.run([str(ROOT / ".venv" / "bin" / "lint-imports") if (ROOT / ".venv").is_dir() else "lint-imports"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 kept, 0 broken" in out.stdout


def test_the_layers_contract_catches_a_backward_import(tmp_path):
    """The contract can fail: a copy of the package where data/ imports train/ breaks it."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "rlhfkit", src / "rlhfkit")
    (src / "rlhfkit" / "data" / "bad.py").write_text("from rlhfkit.train.common import backward  # noqa\n")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    lint = ROOT / ".venv" / "bin" / "lint-imports"
    out = subprocess.run([str(lint) if lint.exists() else "lint-imports", "--no-cache"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"})
    assert out.returncode != 0 and "rlhfkit.data.bad -> rlhfkit.train.common" in out.stdout


def layers_from_pyproject() -> list[set[str]]:
    """The import-linter layers contract, top layer first: each layer a set of package names."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layered = next(c for c in contracts if c["type"] == "layers")
    return [{name.strip() for name in layer.split("|")} for layer in layered["layers"]]


def layer_index(module: str, layers: list[set[str]]) -> int:
    """The index of the layer ``module`` belongs to (0 is the top)."""
    for i, layer in enumerate(layers):
        if any(module == name or module.startswith(name + ".") for name in layer):
            return i
    raise AssertionError(f"{module} is in no layer of the contract")


def registry_problems(stages: dict, callers: dict[str, tuple[str, ...]], layers: list[set[str]]) -> list[str]:
    """Every stage a caller runs by name (``callers``: caller module -> stage names) whose entry point lives
    in the caller's layer or above it: the imports a lookup by name hides from import-linter."""
    problems = []
    for caller, names in callers.items():
        for name in names:
            module = stages[name].module
            if layer_index(module, layers) <= layer_index(caller, layers):
                problems.append(f"{caller} runs '{name}' from {module}, which is not below it")
    return problems


def test_every_registered_stage_lives_below_the_module_that_runs_it():
    """The CLI runs every stage and the pipeline the ones in pipeline.RUNS, both through the registry (a
    lookup by name that import-linter cannot see): each entry point sits in a layer below its caller."""
    import importlib

    from rlhfkit import pipeline
    from rlhfkit.stages import STAGES

    layers = layers_from_pyproject()
    callers = {"rlhfkit.cli": tuple(STAGES), "rlhfkit.pipeline": pipeline.RUNS}
    assert registry_problems(STAGES, callers, layers) == []
    for stage in STAGES.values():  # and each names a real module, config class and entry point
        module = importlib.import_module(stage.module)
        assert hasattr(module, stage.config) and callable(getattr(module, stage.function)), stage


def test_the_registry_check_catches_a_misplaced_entry():
    """The check can fail: the human A/B's entry back in the web app's package, or the pipeline running the
    web server, are both reported."""
    from dataclasses import replace

    from rlhfkit import pipeline
    from rlhfkit.stages import STAGES

    layers = layers_from_pyproject()
    misplaced = {**STAGES, "annotate ab": replace(STAGES["annotate ab"], module="rlhfkit.annotate.ab")}
    assert registry_problems(misplaced, {"rlhfkit.pipeline": pipeline.RUNS}, layers) == [
        "rlhfkit.pipeline runs 'annotate ab' from rlhfkit.annotate.ab, which is not below it"]
    assert registry_problems(STAGES, {"rlhfkit.pipeline": ("annotate serve",)}, layers) == [
        "rlhfkit.pipeline runs 'annotate serve' from rlhfkit.annotate.serve, which is not below it"]


def test_the_pipeline_refuses_a_stage_outside_its_list(tmp_path):
    from rlhfkit.pipeline import PipelineConfig, stage_config

    with pytest.raises(RuntimeError, match="annotate serve"):
        stage_config(PipelineConfig(), tmp_path, "x", "x", "annotate serve", "x", {}, {}, [])


def test_every_module_imports_in_a_fresh_process():
    names = [m.name for m in pkgutil.walk_packages(rlhfkit.__path__, "rlhfkit.")]
    assert len(names) > 40
    code = f"import importlib\nfor n in {names!r}:\n    importlib.import_module(n)\nprint('ok', {len(names)})"
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr


def test_the_examples_in_docstrings_hold():
    """Every ``>>>`` example in the package's docstrings runs and prints what it says."""
    import doctest
    import importlib

    attempted = failed = 0
    for info in pkgutil.walk_packages(rlhfkit.__path__, "rlhfkit."):
        result = doctest.testmod(importlib.import_module(info.name), optionflags=doctest.ELLIPSIS, verbose=False)
        attempted, failed = attempted + result.attempted, failed + result.failed
    assert attempted >= 20 and failed == 0


def test_no_function_local_internal_imports():
    """Internal imports sit at module top; a function imports only optional heavy third-party packages."""
    import ast

    local = []
    for path in (ROOT / "src" / "rlhfkit").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    names = ([a.name for a in inner.names] if isinstance(inner, ast.Import) else
                             [inner.module or ""] if isinstance(inner, ast.ImportFrom) else [])
                    local += [f"{path.relative_to(ROOT)}:{inner.lineno}" for n in names if n.split(".")[0] == "rlhfkit"]
    assert local == []


# ------------------------------------------------------------------------------------ seams


def test_reward_sources_share_one_interface(tmp_path):
    from rlhfkit.rollout.rewards import CompositeReward, RewardSource, RuleReward, parse_reward

    rule = tmp_path / "r.yaml"
    rule.write_text("keywords: [sure]\n")
    comp = parse_reward(f"2*rule:{rule}")
    assert isinstance(comp, CompositeReward) and isinstance(comp.parts[0][1], RuleReward)
    assert all(isinstance(s, RewardSource) for _, s in comp.parts) and isinstance(comp, RewardSource)
    assert comp.score([[]] * 2, ["sure", "no"]) == [2.0, 0.0] and comp.last_ood is None


def test_hf_engine_samples_what_the_sampler_does():
    """The hf engine is the KV-cache sampler behind the RolloutEngine interface: the same seed gives the
    same tokens, and logprobs equal up to the packed CPU kernels' rounding; sync_weights is a no-op
    that leaves sampling unchanged."""
    from rlhfkit.models import load_causal_lm
    from rlhfkit.rollout.engine import SamplingParams, make_engine
    from rlhfkit.rollout.sampler import sample

    model, tok = load_causal_lm("tiny")
    engine = make_engine("hf", model, torch.device("cpu"))
    params = SamplingParams(tok.pad_token_id, tok.eos_token_id, max_new_tokens=5, temperature=0.7)
    prompts = [[5, 6, 7], [8, 9]]
    a = engine.generate(prompts, params, torch.Generator().manual_seed(3))
    engine.sync_weights(model)
    b = sample(model, prompts, tok.pad_token_id, tok.eos_token_id, max_new_tokens=5, temperature=0.7,
               generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.response_ids, b.response_ids)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-4, rtol=0)
    with pytest.raises(ConfigError, match="unknown engine 'nope'"):
        make_engine("nope", model)


@pytest.fixture()
def fake_accelerator_device(monkeypatch):
    """accelerate 'selects' cuda:0: every model moved anywhere is recorded (and stays on the CPU, where
    this test can run); every model loaded is recorded too."""
    import rlhfkit.models.loading as loading
    import rlhfkit.models.reward as reward
    import rlhfkit.platform.placement

    fake = torch.device("cuda", 0)
    moved, loaded = [], []
    monkeypatch.setattr(rlhfkit.platform.placement, "select_device", lambda: fake)
    real_to = torch.nn.Module.to

    def to(self, *args, **kwargs):
        target = args[0] if args else kwargs.get("device")
        if isinstance(target, (str, torch.device)) and not isinstance(target, torch.dtype):
            moved.append(id(self))
            return self
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    for module, name in ((loading, "load_causal_lm"), (reward, "load_reward_model")):
        real = getattr(module, name)

        def spy(*args, _real=real, **kwargs):
            out = _real(*args, **kwargs)
            loaded.append(out[0])
            return out

        monkeypatch.setattr(module, name, spy)
        for user in ("rlhfkit.feedback.judge", "rlhfkit.feedback.label", "rlhfkit.train.best_of_n",
                     "rlhfkit.rollout.engine", "rlhfkit.rollout.phase", "rlhfkit.rollout.rewards"):
            mod = __import__(user, fromlist=["x"])
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, spy)
    return moved, loaded


def test_bon_label_and_judge_put_every_model_on_the_accelerators_device(tmp_path, fake_accelerator_device):
    moved, loaded = fake_accelerator_device
    from rlhfkit.feedback.judge import JudgeConfig
    from rlhfkit.feedback.judge import run as judge
    from rlhfkit.feedback.label import LabelConfig
    from rlhfkit.feedback.label import run as label
    from rlhfkit.models.reward import load_reward_model, save_reward_model
    from rlhfkit.train.best_of_n import BoNConfig
    from rlhfkit.train.best_of_n import run as bon

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Say {w}."} for w in "abcd"])
    rm, tok = load_reward_model("tiny")
    save_reward_model(rm, tok, tmp_path / "rm")
    loaded.clear()
    common = dict(model="tiny", train=str(prompts), max_new_tokens=3, output_dir=str(tmp_path / "runs"), progress=False)
    bon(BoNConfig(**common, reward=str(tmp_path / "rm"), n=2, name="bon"))
    label(LabelConfig(**common, labeler="reward", reward=str(tmp_path / "rm"), k=2, name="label"))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"}])
    judge(JudgeConfig(data=str(pairs), model="tiny", max_new_tokens=3, output_dir=str(tmp_path / "runs"), name="j"))
    assert len(loaded) == 5  # bon: policy + RM; label: policy + RM; judge: the judge model
    assert all(id(m) in moved or id(getattr(m, "hf", m)) in moved for m in loaded)


# ------------------------------------------------------------------------------------ configs that check themselves


def test_every_stage_config_resolves_its_own_required_fields():
    """Every stage's config has resolve(); those with a required field refuse to resolve without it."""
    from rlhfkit.stages import STAGES

    positional = {"data inspect", "export"}  # their one required field is a positional argument
    complete = {"serve policy", "annotate serve", "annotate users"}  # every field has a usable default
    for name, stage in STAGES.items():
        cls = stage.config_class()
        assert hasattr(cls, "resolve") or name in positional, name
        if name in positional:
            continue
        if name in complete:
            assert cls().resolve() is not None
            continue
        with pytest.raises(ConfigError):
            cls().resolve()


def test_ppo_preset_lives_in_the_config():
    from rlhfkit.train.ppo import PPOConfig

    cfg = PPOConfig(train="p.jsonl", reward="rule:r.yaml", preset="a2c").resolve()
    assert (cfg.ppo_epochs, cfg.num_minibatches, cfg.clip, cfg.value_clip) == (1, 1, float("inf"), 0.0)


def test_a_bad_value_in_a_config_names_the_key(tmp_path):
    from rlhfkit.config import load_yaml
    from rlhfkit.train.policy_gradient import PGConfig

    path = tmp_path / "c.yaml"
    path.write_text("estimator: rlo\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: field 'estimator': expected one of 'reinforce'"):
        load_yaml(PGConfig, path)
    path.write_text("lr: fast\n")
    with pytest.raises(ConfigError, match="field 'lr': expected a number"):
        load_yaml(PGConfig, path)


def pipeline_yaml(tmp_path, **over):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Question {i}: name a {w}."}
                                                       for i, w in enumerate(["colour", "fruit", "tree", "city"] * 4)])
    utility = tmp_path / "u.yaml"
    utility.write_text("min_words: 2\nmax_words: 6\nname: gold\n")
    cfg = {"name": "pipe", "output_dir": str(tmp_path / "out"), "model": "tiny", "prompts": str(prompts), "eval_size": 4,
           "progress": False, "algorithm": "ppo",
           "feedback": {"labeler": "simulated", "utility": f"rule:{utility}", "k": 2, "limit": 8, "max_new_tokens": 4},
           "reward_model": {"batch_size": 4, "micro_batch_size": 4, "max_length": 64, "ood_fit": 0, "max_steps": 1},
           "rl": {"preset": "a2c", "batch_size": 4, "micro_batch_size": 2, "max_new_tokens": 4, "max_length": 64,
                  "max_steps": 1, "lora_r": 4},
           "evaluate": {"eval_prompts": 4}}
    cfg.update(over)
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, cfg


def test_pipeline_with_an_a2c_section_runs_the_a2c_loss(tmp_path, monkeypatch):
    """rl: {preset: a2c} in a pipeline: one epoch, one minibatch, and the policy loss is called with no
    clipping (clip = inf); before, the preset was applied only by `rlhfkit ppo`'s main()."""
    import rlhfkit.train.ppo as ppo
    from rlhfkit.cli import main

    clips = []
    real = ppo.policy_loss

    def spy(logp, old, adv, clip, clip_high=None):
        clips.append(clip)
        return real(logp, old, adv, clip, clip_high)

    monkeypatch.setattr(ppo, "policy_loss", spy)
    path, _ = pipeline_yaml(tmp_path)
    main(["pipeline", "--config", str(path)])
    assert clips == [float("inf")] * 2  # 4 prompts, micro-batches of 2, one epoch and one minibatch
    saved = yaml.safe_load((tmp_path / "out" / "pipe" / "r1-ppo" / "config.yaml").read_text())
    assert (saved["preset"], saved["ppo_epochs"], saved["num_minibatches"]) == ("a2c", 1, 1)


def test_pipeline_typo_in_the_last_section_fails_before_the_first_stage(tmp_path):
    from rlhfkit.pipeline import PipelineConfig, run

    path, cfg = pipeline_yaml(tmp_path, evaluate={"eval_promts": 4})
    pc = PipelineConfig(**{k: v for k, v in cfg.items()})
    with pytest.raises(ConfigError, match=r"pipeline: evaluate: unknown field\(s\) eval_promts"):
        run(pc)
    assert not (tmp_path / "out" / "pipe").exists()  # nothing ran, nothing was written
    out = subprocess.run([PYTHON, "-m", "rlhfkit.cli", "pipeline", "--config", str(path)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "eval_promts" in out.stderr and "Traceback" not in out.stderr
    with pytest.raises(ConfigError, match=r"pipeline: rl: field 'lr': expected a number"):
        run(PipelineConfig(**{**cfg, "rl": {**cfg["rl"], "lr": "fast"}}))
    with pytest.raises(ConfigError, match=r"pipeline: reward_model: output_dir cannot be set in a section"):
        run(PipelineConfig(**{**cfg, "reward_model": {"output_dir": "elsewhere"}}))


def test_a_seed_set_in_a_section_is_used_and_said(tmp_path):
    from rlhfkit.pipeline import PipelineConfig, plan

    _, cfg = pipeline_yaml(tmp_path, feedback={"labeler": "simulated", "utility": "rule:u.yaml", "seed": 1})
    stages, notes = plan(PipelineConfig(**cfg), tmp_path / "out" / "pipe", "t.jsonl", "h.jsonl")
    seeds = {s.name: s.cfg.seed for s in stages}
    assert seeds == {"r1-feedback": 1, "r1-rm": 0, "r1-ppo": 0, "r1-eval": 0}
    assert notes == ["r1-feedback: seed = 1 from the feedback section (the pipeline's: 0)"]


def test_sft_takes_comma_and_glob_inputs(tmp_path, demos):
    """The shared data flags promise 'several as a,b or a glob'; sft's main() used to reject them."""
    from rlhfkit.train.sft import SFTConfig
    from rlhfkit.train.sft import run as sft

    second = tmp_path / "more.jsonl"
    second.write_text(demos.read_text())
    for spec in (f"{demos},{second}", str(tmp_path / "*.jsonl")):
        run = sft(SFTConfig(model="tiny", train=spec, max_steps=1, batch_size=4, micro_batch_size=4, progress=False,
                            output_dir=str(tmp_path / "runs"), name=f"s{len(spec)}"))
        assert run.manifest()["status"] == "finished"


# ------------------------------------------------------------------------------------ clean errors


def cli(*args, cwd):
    return subprocess.run([PYTHON, "-m", "rlhfkit.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_expected_errors_are_one_line_without_a_traceback(tmp_path):
    nothing = tmp_path / "nothing.json"
    nothing.write_text(json.dumps([{"foo": 1, "bar": 2}]))
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("lr: 1e-4\nlearning_rate: 3\n")
    demos = ROOT / "examples" / "demonstrations.jsonl"
    prompts = ROOT / "examples" / "prompts.jsonl"
    out_dir = ["--output-dir", str(tmp_path / "runs")]
    cases = {
        "no format": (["data", "inspect", str(nothing), "--model", "tiny"], "cannot tell the format"),
        "missing file": (["sft", "--train", str(tmp_path / "nope.jsonl"), "--model", "tiny", *out_dir], "no such file"),
        "missing model": (["sft", "--train", str(demos), "--model", str(tmp_path / "no-model"), *out_dir], "no-model"),
        "bad key": (["sft", "--config", str(bad_yaml)], "unknown field(s) learning_rate"),
        "unreachable reward": (["bon", "--train", str(prompts), "--model", "tiny", "--limit", "2", "--n", "2",
                                "--max-new-tokens", "3", "--reward", "http://127.0.0.1:9/score", "--reward-retries", "0",
                                "--reward-timeout", "2", "--no-progress", *out_dir], "http://127.0.0.1:9/score"),
    }
    for name, (args, expected) in cases.items():
        out = cli(*args, cwd=tmp_path)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2, (name, out.stderr[-2000:])
        assert "Traceback" not in out.stderr, (name, out.stderr[-2000:])
        assert lines[-1].startswith("rlhfkit: error: ") and expected in lines[-1], (name, lines[-1])
    debug = cli("--debug", *cases["no format"][0], cwd=tmp_path)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "DataError" in debug.stderr


# ------------------------------------------------------------------------------------ trackers


def test_report_to_tensorboard_writes_the_logged_scalars(tmp_path, demos):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rlhfkit.train.sft import SFTConfig
    from rlhfkit.train.sft import run as sft

    run = sft(SFTConfig(model="tiny", train=str(demos), max_steps=3, batch_size=4, micro_batch_size=4, progress=False,
                        output_dir=str(tmp_path / "runs"), name="tb", report_to="tensorboard"))
    logged = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run.path / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("loss")
    assert [s.step for s in scalars] == [1, 2, 3]
    assert [s.value for s in scalars] == pytest.approx([m["loss"] for m in logged if "loss" in m], rel=1e-6)
    assert "lr" in events.Tags()["scalars"]
