"""Monitors, the OOD detector, policy-evaluation statistics and the HTML report."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import warnings

import pytest
import torch

from conftest import shared


def test_distinct_n_and_pearson_hand_values():
    """distinct-2 of ["a b c", "a b d"]: bigrams ab, bc, ab, bd -> 3 unique of 4 = 0.75.
    pearson([1,2,3],[2,4,7]): cov 5/2... r = 5 / sqrt(2 * 12.6667) = 0.99340; constant side -> 0."""
    from rlhfkit.eval.metrics import distinct_n, pearson

    assert distinct_n(["a b c", "a b d"], 2) == 0.75
    assert distinct_n(["a b a b a b"], 2) == pytest.approx(2 / 5)
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(0.993399, abs=1e-6)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 1, 1], [1, 2, 3]) == 0.0


def test_paired_difference_and_win_rate():
    """x = [1,2,3], y = [1,1,1]: differences 0,1,2, mean 1, sample sd 1, SE 1/sqrt(3) = 0.57735;
    wins: tie (0.5) + 2 wins = 2.5/3 = 0.8333."""
    from rlhfkit.eval.policy import paired

    r = paired([1.0, 2.0, 3.0], [1.0, 1.0, 1.0])
    assert r["difference"] == 1.0 and r["difference_se"] == pytest.approx(0.577350, abs=1e-6)
    assert r["win_rate"] == pytest.approx(2.5 / 3)
    assert paired([0.0, 1.0], [1.0, 2.0])["difference"] == -1.0  # sign: policy below reference


def _feed(monitor, steps, score, length, kl=1.0, gold=None):
    """Feed synthetic steps of 8 responses of distinct words with the given lengths and scores."""
    for s in steps:
        lengths = length(s)
        texts = [" ".join(f"w{i}_{s}_{j}" for i in range(n)) for j, n in enumerate(lengths)]
        monitor.observe(s, texts, score(s, lengths), kl(s) if callable(kl) else kl, gold(s) if gold else None)


def test_monitor_alarms_fire_on_hacking_and_stay_quiet_otherwise():
    """Reward that pays for length (corr -> 1 after step 5) raises the length alarm; a KL jump from 1 to 5
    nats after a full window of 5 steps raises a spike (KL growing from 0 over the first 4 steps does not); proxy rising while gold falls raises over-optimisation; a clean run raises none."""
    from rlhfkit.eval.monitors import Monitor, MonitorArgs, RewardHackingWarning

    rng = random.Random(0)

    def lengths(s):
        return [rng.randint(5, 30) for _ in range(8)]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        clean = Monitor(MonitorArgs())
        _feed(clean, range(1, 13), lambda s, n: [rng.random() for _ in n], lengths)
        growing = Monitor(MonitorArgs())  # KL rising from 0 in the first steps is no spike
        _feed(growing, range(1, 5), lambda s, n: [0.0] * 8, lengths, kl=lambda s: [0.0, 0.2, 1.5, 4.0][s - 1])
    assert not [w for w in caught if issubclass(w.category, RewardHackingWarning)]
    assert sum(h["length_corr"] for h in clean.history) / 12 == pytest.approx(0.0, abs=0.3)

    with pytest.warns(RewardHackingWarning, match="reward-length correlation"):
        m = Monitor(MonitorArgs())
        _feed(m, range(1, 11), lambda s, n: [rng.random() if s <= 5 else x / 30 for x in n], lengths)
    with pytest.warns(RewardHackingWarning, match="KL spike"):
        m = Monitor(MonitorArgs())
        _feed(m, range(1, 8), lambda s, n: [0.0] * 8, lengths, kl=lambda s: 5.0 if s == 7 else 1.0)
    with pytest.warns(RewardHackingWarning, match="over-optimisation"):
        m = Monitor(MonitorArgs())
        _feed(m, range(1, 11), lambda s, n: [s / 10] * 8, lengths, gold=lambda s: [1.0 - s / 10 + 0.01 * j for j in range(8)])


def test_ood_detector_on_gaussians():
    """Fit on N(0, I) in 16 dimensions: about 5% of fresh in-distribution points are flagged (the
    threshold is the 95% quantile of a calibration split), and every point shifted by 3 in each
    dimension is flagged."""
    from rlhfkit.models.ood import OODDetector

    g = torch.Generator().manual_seed(0)
    det = OODDetector.fit(torch.randn(2000, 16, generator=g))
    inside = det.flag(torch.randn(2000, 16, generator=g)).float().mean().item()
    assert 0.02 < inside < 0.09
    assert det.flag(torch.randn(200, 16, generator=g) + 3.0).all()


OFF_DISTRIBUTION_LANGUAGE = [
    "Le chat dort sur le canapé pendant que la pluie tombe doucement sur les toits de la ville.",
    "Ich habe gestern im Garten Tomaten gepflanzt, und heute regnet es den ganzen Tag.",
    "El tren sale de la estación a las ocho y llega a Madrid antes del mediodía.",
    "今天天气很好，我们去公园散步，然后在湖边吃了午饭。",
    "Eu gosto de ler livros antigos na biblioteca da universidade aos domingos.",
    "Il museo chiude alle sei, quindi dobbiamo sbrigarci se vogliamo vedere i quadri.",
    "Мы поехали на дачу в субботу и собрали много грибов в лесу.",
    "Kedi pencerenin önünde oturup kuşları izlemeyi çok seviyor.",
    "De fiets staat achter het huis, naast de oude schuur met het rode dak.",
    "Vi åt middag på en liten restaurang vid hamnen och såg solnedgången.",
]


def test_ood_detector_keeps_a_group_in_one_fold():
    """Cross-fitting by group: 60 prompts in 64 dimensions with two near-identical answers each (noise
    0.01 around a per-prompt point). Split by response, each held-out answer's twin sits in the fit,
    which has about as many points as dimensions and so places the twin close: the held-out distances
    come out small, the threshold too low, and 41% of fresh prompts from the same distribution get
    flagged. Split by prompt, under 5% are (0.75%: with so few points per dimension the cross-fitted
    threshold errs on the safe side)."""
    from rlhfkit.models.ood import OODDetector

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(60, 64, generator=g)
    twins = centres.repeat_interleave(2, 0) + 0.01 * torch.randn(120, 64, generator=g)
    fresh = torch.randn(400, 64, generator=g)
    by_prompt = OODDetector.fit(twins, groups=[i // 2 for i in range(120)]).flag(fresh).float().mean().item()
    by_response = OODDetector.fit(twins).flag(fresh).float().mean().item()
    assert by_prompt < 0.05 and by_response > 0.3


def test_ood_detector_on_rm_features_separates_off_distribution_text(bundled_reward_features):
    """The acceptance check, on the bundled model's features (the RM backbone): fitted on 400
    HH-RLHF responses (200 prompts), it flags at most 10% of 150 held-out HH responses and at least 90%
    of 90 clearly off-distribution texts (random tokens, Python source, other languages). The rates are
    printed. With the last-token feature and a full covariance this failed (18.7% in, 53% of the
    other-language texts out)."""
    inside, outside, det = bundled_reward_features
    flagged_in = det.flag(inside).float().mean().item()
    flagged_out = {k: det.flag(v).float().mean().item() for k, v in outside.items()}
    print(f"\nOOD flagged: in-distribution {flagged_in:.3f}; " + ", ".join(f"{k} {v:.3f}" for k, v in flagged_out.items()))
    assert flagged_in <= 0.10
    total = sum(flagged_out[k] * len(outside[k]) for k in outside) / sum(len(v) for v in outside.values())
    assert total >= 0.90


@pytest.fixture(scope="module")
def bundled_reward_features():
    import inspect
    import json as _json

    from rlhfkit.data import load_records
    from rlhfkit.models.ood import OODDetector, ood_texts
    from rlhfkit.models.reward import embed, load_reward_model

    records = load_records(str(shared("hh-rlhf/harmless-base-test.jsonl.gz")), kind="preference").records
    rm, tok = load_reward_model("smollm2-135m-instruct")
    from conftest import NATIVE_BF16

    # as `rm train --mixed-precision bf16` fits it, where the CPU has native bf16 (fp32 elsewhere)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=NATIVE_BF16)
    prompts, responses, groups = ood_texts(records[:200])
    rest_p, rest_r, _ = ood_texts(records[1000:1075])
    with autocast:
        fit = embed(rm, tok, prompts, responses, batch_size=16, max_length=256)
    det = OODDetector.fit(fit, groups=groups)
    with autocast:
        inside = embed(rm, tok, rest_p, rest_r, batch_size=16, max_length=256)
    rng = random.Random(0)
    user = [[{"role": "user", "content": r.prompt[-1]["content"]}] for r in records[2000:2030]]
    code_lines = [line.strip() for line in inspect.getsource(_json.decoder).splitlines() if len(line.strip()) > 30]
    code = ["\n".join(code_lines[i: i + 4]) for i in range(0, 120, 4)]
    noise = [tok.decode([rng.randrange(1000, len(tok) - 1) for _ in range(40)]) for _ in range(30)]
    with autocast:
        outside = {name: embed(rm, tok, user[: len(texts)], texts, batch_size=16, max_length=256)
                   for name, texts in (("random tokens", noise), ("python code", code),
                                       ("other languages", OFF_DISTRIBUTION_LANGUAGE * 3))}
    return inside, outside, det


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("Chromium is not installed (Debian: apt-get install chromium; `make test-deps` does it)")


def rl_run_dir(tmp_path):
    """A finished RL run directory: manifest, config, ten steps of metrics, a held-out comparison with
    hostile model text, and an alarm."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"stage": "pg", "status": "finished", "created": "now",
                                                   "inputs": {"train": {"path": "p.jsonl", "sha256": "ab" * 32}}}))
    (run / "config.yaml").write_text("lr: 0.001\n")
    with open(run / "metrics.jsonl", "w") as f:
        for s in range(1, 11):
            f.write(json.dumps({"step": s, "score": s / 10, "gold": 0.5 - s / 40, "kl": s / 5, "beta": 0.05,
                                "entropy": 2 - s / 10, "policy_clipfrac": 0.01, "response_length": 30 - s,
                                "monitor/length_corr": 0.1, "monitor/repetition": 0.0}) + "\n")
    hostile = "<script>document.title='pwned'</script><img src=x onerror=alert(1)>"
    held = {"prompts": 2, "temperature": 0.7, "kl": 2.0, "kl_se": 0.1,
            "rewards": {"reward": {"policy": 1.0, "reference": 0.5, "difference": 0.5, "difference_se": 0.1,
                                   "difference_in_se": 5.0, "win_rate": 0.75},
                        "gold": {"policy": 0.4, "reference": 0.3, "difference": 0.1, "difference_se": 0.05,
                                 "difference_in_se": 2.0, "win_rate": 0.6}},
            "samples": [{"prompt": hostile, "policy": "short", "reference": "long answer", "reward_policy": 1.0,
                         "reward_reference": 0.5, "gold_policy": 0.4, "gold_reference": 0.3}]}
    (run / "heldout.json").write_text(json.dumps(held))
    (run / "alarms.jsonl").write_text(json.dumps({"step": 7, "alarm": "KL spike"}) + "\n")
    return run


def test_report_without_matplotlib_leaves_the_plots_out(tmp_path, monkeypatch):
    """Without the plot extra (TRL's bench environment has none) an RL run's report is still written,
    with its tables and no images, instead of the stage crashing at its very end."""
    import sys

    from rlhfkit.eval.report import write_report
    from rlhfkit.train.rl import plot_curves

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    run = rl_run_dir(tmp_path)
    page = write_report(run).read_text()
    assert "<img" not in page and "Held-out" in page and "KL spike" in page
    assert not plot_curves(run / "metrics.jsonl", run / "curves.png", ["score"])
    assert not list((run / "report").iterdir())


def test_report_renders_in_headless_chromium(tmp_path):
    """A report with plots, held-out results and hostile model text: headless Chromium loads it from disk,
    every image decodes (the page's own check reports 'broken: 0'), the screenshot is a real picture,
    and the model text stays text (no script runs from it)."""
    from rlhfkit.eval.report import write_report

    path = write_report(rl_run_dir(tmp_path))
    chromium = _chromium()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000", "--allow-file-access-from-files"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120)
    assert "broken: 0" in dom.stdout, dom.stdout[-2000:] + dom.stderr[-2000:]
    loaded = int(dom.stdout.split("loaded: ")[1].split()[0])
    assert loaded >= 2
    assert "pwned" not in dom.stdout.split("</title>")[0]
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, *flags, f"--screenshot={shot}", "--window-size=1200,2400", path.as_uri()],
                   capture_output=True, timeout=120)
    from PIL import Image

    img = Image.open(shot).convert("L")
    assert img.size == (1200, 2400)
    assert len(set(img.getdata())) > 50  # text and plots, not a blank page


def test_eval_policy_stage_with_identical_policies_and_an_http_judge(tmp_path):
    """Policy == reference (both the tiny model from seed 0): the same seeds give the same samples, so
    KL = 0, every reward difference is 0 and every win rate 0.5. The fake judge always answers [[A]]:
    position bias, so each swapped pair is inconsistent -> a tie (consistency 0, judge win rate 0.5)."""
    from conftest import json_server, write_jsonl
    from rlhfkit.eval.policy import EvalPolicyConfig
    from rlhfkit.eval.policy import run as run_eval

    prompts = write_jsonl(tmp_path / "held.jsonl", [{"prompt": f"Say something about {w}."} for w in "abcdef"])
    rule = tmp_path / "gold.yaml"
    rule.write_text("max_words: 4\nname: gold\n")
    with json_server(lambda body: (200, {"choices": [{"message": {"content": "[[A]]"}}]})) as base:
        run = run_eval(EvalPolicyConfig(model="tiny", reference="tiny", eval=str(prompts), reward=f"rule:{rule}",
                                        gold=f"rule:{rule}", judge_url=f"{base}/v1", max_new_tokens=6,
                                        output_dir=str(tmp_path / "runs"), name="ev", progress=False))
    result = json.loads((run.path / "eval.json").read_text())
    assert result["prompts"] == 6 and result["kl"] == pytest.approx(0.0, abs=1e-5)
    for r in result["rewards"].values():
        assert r["difference"] == 0.0 and r["win_rate"] == 0.5
    assert result["judge"] == {"win_rate": 0.5, "consistency": 0.0, "ties": 6, "unparsable": 0}
    assert {"words_mean", "distinct_1", "distinct_2", "repetition"} <= set(result["policy_stats"])
    assert (tmp_path / "runs" / "ev" / "report.html").is_file()
