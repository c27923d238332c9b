import json
import subprocess

from conftest import PYTHON, ROOT, write_jsonl
from rlhfkit.cli import STAGES


def rlhfkit(*args):
    return subprocess.run([PYTHON, "-m", "rlhfkit.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_help_lists_every_stage():
    out = rlhfkit("--help")
    assert out.returncode == 0
    for name in STAGES:
        assert name in out.stdout
    assert {"sft", "rm train", "ppo", "pg", "dpo", "bon", "pipeline"} <= set(STAGES)


def test_unknown_stage_is_an_error():
    out = rlhfkit("rm", "trian")
    assert out.returncode == 2 and "unknown stage" in out.stderr and "rm train" in out.stderr


def test_stage_help_lists_its_config_fields():
    out = rlhfkit("sft", "--help")
    assert out.returncode == 0
    for flag in ("--model", "--lora-r", "--on-bad-record", "--resume", "--packing", "--config"):
        assert flag in out.stdout


def test_data_inspect_reports_format_counts_lengths_and_problems(tmp_path):
    rows = [{"prompt": "Q", "chosen": "same", "rejected": "same"}, {"prompt": "Q2", "chosen": "", "rejected": "b"},
            {"prompt": "Q3", "chosen": "good " * 600, "rejected": "b"}, "{broken"]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    out = rlhfkit("data", "inspect", str(path), "--json")
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert (r["format"], r["kind"], r["records"], r["malformed"]) == ("trl-standard", "preference", 3, 1)
    assert r["problems"]["chosen_equals_rejected"]["count"] == 1
    assert r["problems"]["empty_response"]["count"] == 1
    assert r["problems"]["overlong"]["count"] == 1
    assert r["tokens"]["response"]["max"] > 512
    text = rlhfkit("data", "inspect", str(path)).stdout
    assert "3 preference pairs from 4 rows" in text and "p.jsonl:4: invalid JSON" in text


def test_a_group_help_lists_its_commands():
    out = subprocess.run([PYTHON, "-m", "rlhfkit", "annotate", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for command in ("create", "serve", "users", "export", "collect", "ab", "stats"):
        assert f"\n  {command} " in out.stdout
