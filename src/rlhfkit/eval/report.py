"""``report.html``: one self-contained page per run (and per pipeline) that opens in a browser from
disk, with no server. Plots are PNG files in ``report/`` beside it, linked relatively.

What a page holds depends on what the run directory has:

* ``metrics.jsonl`` of an RL run: reward, gold, KL, beta, entropy, clip fraction and length over steps,
  the monitors, and the reward-versus-KL frontier (each step's batch, and the held-out result);
* ``metrics.jsonl`` of a reward-model run and its ``eval/``: accuracy over steps, the reliability
  diagram and the margin histogram;
* ``heldout.json`` (RL) or ``eval.json`` (eval policy): proxy and gold against the reference with
  standard errors and the KL, and a before/after sample table;
* ``alarms.jsonl``: the monitors' alarms and off-distribution examples;
* the config and the lineage (the manifest's inputs and parent runs).

All model text is HTML-escaped.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from rlhfkit.errors import warn_once

RL_PLOTS = [("score", "reward (proxy)"), ("gold", "gold"), ("kl", "KL per response"), ("beta", "beta"),
            ("entropy", "entropy"), ("policy_clipfrac", "clip fraction"), ("response_length", "length (tokens)"),
            ("monitor/length_corr", "corr(reward, length)"), ("monitor/repetition", "repetition rate"),
            ("monitor/distinct_2", "distinct-2"), ("monitor/ood_fraction", "OOD fraction")]
RM_PLOTS = [("loss", "loss"), ("accuracy", "train accuracy"), ("margin", "margin"), ("reward_mean", "reward mean"),
            ("reward_std", "reward std")]

STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.3em .6em;vertical-align:top;
text-align:left;font-size:.9em}th{background:#f3f3f3}pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:.8em}
img{max-width:100%;border:1px solid #ddd;margin:.3em 0}.alarm{color:#a40000}.small{color:#666;font-size:.85em}"""

CHECK = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).length;
  document.getElementById('image-check').textContent =
    'images: ' + imgs.length + ' loaded: ' + (imgs.length - broken) + ' broken: ' + broken;
});
</script>"""


def esc(x) -> str:
    return html.escape(str(x))


def fmt(x, digits: int = 4) -> str:
    if isinstance(x, float):
        return "inf" if math.isinf(x) else f"{x:.{digits}f}"
    return esc(x)


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def pyplot():
    """matplotlib's pyplot on the Agg backend; None, with one warning, when the ``plot`` extra is not
    installed: every plot is then left out and nothing else changes."""
    try:
        import matplotlib
    except ImportError:
        warn_once("matplotlib is not installed (pip install 'rlhfkit[plot]'): plots are left out")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------------------------
# plots: each writes one PNG and returns its file name (None when there is nothing to draw)


def plot_series(rows: list[dict], keys: list[tuple[str, str]], folder: Path, name: str, title: str) -> str | None:
    """Small panels of metric-over-step curves."""
    keys = [(k, label) for k, label in keys if any(k in r for r in rows)]
    if not keys:
        return None
    plt = pyplot()
    if plt is None:
        return None
    cols = min(3, len(keys))
    n_rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4 * cols, 2.6 * n_rows), squeeze=False)
    for ax, (key, label) in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], ".-", ms=3)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step", fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(folder / name, dpi=80)
    plt.close(fig)
    return name


def plot_frontier(rows: list[dict], held: dict | None, folder: Path, name: str) -> str | None:
    """Reward against KL: each training step's batch (coloured by step) and, from the held-out
    comparison, the reference (KL 0) and the final policy, for the proxy and the gold."""
    pts = [(r["kl"], r["score"], r.get("gold"), r["step"]) for r in rows if "kl" in r and "score" in r]
    if not pts:
        return None
    plt = pyplot()
    if plt is None:
        return None
    has_gold = any(p[2] is not None for p in pts)
    fig, axes = plt.subplots(1, 2 if has_gold else 1, figsize=(10 if has_gold else 5.5, 4), squeeze=False)
    for ax, (idx, label, key) in zip(axes.flat, [(1, "proxy reward", "reward"), (2, "gold", "gold")]):
        sc = ax.scatter([p[0] for p in pts], [p[idx] for p in pts], c=[p[3] for p in pts], cmap="viridis", s=14)
        if held and key in held.get("rewards", {}):
            r = held["rewards"][key]
            ax.errorbar([0, held["kl"]], [r["reference"], r["policy"]], xerr=[0, held.get("kl_se", 0)],
                        fmt="s-", color="tab:red", label="held-out: reference -> final policy")
            ax.legend(fontsize=7)
        ax.set(xlabel="KL(policy || reference) per response (nats)", ylabel=label, title=f"{label} vs KL")
        fig.colorbar(sc, ax=ax, label="step")
    fig.tight_layout()
    fig.savefig(folder / name, dpi=80)
    plt.close(fig)
    return name


# ---------------------------------------------------------------------------------------------
# sections: each returns HTML (possibly empty)


def section_heldout(result: dict | None) -> str:
    if not result:
        return ""
    head = "<tr><th>metric</th><th>reference</th><th>policy</th><th>difference ± SE</th><th>win rate</th></tr>"
    body = "".join(f"<tr><td>{esc(name)}</td><td>{fmt(r['reference'])}</td><td>{fmt(r['policy'])}</td>"
                   f"<td>{r['difference']:+.4f} ± {r['difference_se']:.4f} ({fmt(r['difference_in_se'], 1)} SE)</td>"
                   f"<td>{fmt(r['win_rate'], 3)}</td></tr>" for name, r in result.get("rewards", {}).items())
    stats = ""
    if "policy_stats" in result:
        keys = list(result["policy_stats"])
        stats = ("<table><tr><th></th>" + "".join(f"<th>{esc(k)}</th>" for k in keys) + "</tr>" +
                 "".join(f"<tr><td>{side}</td>" + "".join(f"<td>{fmt(result[f'{side}_stats'][k], 3)}</td>" for k in keys)
                         + "</tr>" for side in ("reference", "policy")) + "</table>")
    judge = ""
    if "judge" in result:
        j = result["judge"]
        judge = (f"<p>LLM judge (both orders): policy win rate {fmt(j['win_rate'], 3)}, position consistency "
                 f"{fmt(j['consistency'], 3)}, unparsable {j['unparsable']}</p>")
    return (f"<h2>Held-out evaluation</h2><p>{result['prompts']} held-out prompts, one sample each from the policy "
            f"and the reference with the same seed, temperature {result['temperature']}. KL to the reference: "
            f"<b>{fmt(result['kl'], 3)} ± {fmt(result.get('kl_se', 0.0), 3)}</b> nats per response.</p>"
            f"<table>{head}{body}</table>{judge}{stats}")


def section_agreement(stats: dict | None, title: str = "Agreement between people") -> str:
    """Agreement statistics of an annotation project (``agreement.json`` of human feedback, or the people
    of a human A/B evaluation)."""
    if not stats:
        return ""
    rows = []
    if stats.get("percent_agreement") is not None:
        ci = stats.get("percent_agreement_ci95") or [None, None]
        rows.append(("percent agreement", f"{fmt(stats['percent_agreement'], 3)} (95% interval {fmt(ci[0], 3)} to "
                                          f"{fmt(ci[1], 3)})"))
    if stats.get("fleiss_kappa") is not None:
        rows.append(("Fleiss' kappa", fmt(stats["fleiss_kappa"], 3)))
    for level, alpha in (stats.get("krippendorff_alpha") or {}).items():
        rows.append((f"Krippendorff's alpha ({level})", fmt(alpha, 3)))
    for key, what in (("position_bias_left_wins", "left response wins"), ("length_bias_longer_wins",
                                                                          "longer response wins")):
        b = stats.get(key)
        if b and b.get("n"):
            rows.append((what, f"{fmt(b['share'], 3)} of {b['n']} (binomial p {fmt(b['p_value'], 3)})"))
    for name, why in (stats.get("flagged_annotators") or {}).items():
        rows.append((f"flagged: {name}", "; ".join(why)))
    body = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in rows)
    return f"<h2>{esc(title)}</h2><table>{body}</table>"


def section_human(result: dict | None) -> str:
    """The blind human A/B evaluation (``annotate ab``) of a policy against its reference."""
    h = (result or {}).get("human")
    if not h:
        return ""
    ci = h.get("win_rate_ci95") or [None, None]
    vs = "".join(f"<tr><td>people's majority vs {esc(name)}</td><td>{fmt(x['agreement'], 3)} over {x['items']} items"
                 f"</td></tr>" for name, x in h.get("people_vs", {}).items())
    return (f"<h2>Human evaluation (blind A/B)</h2><p>{h['items']} held-out prompts, {h['judgements']} judgements; "
            f"the two answers in random order, unlabelled. Policy win rate (ties count half): "
            f"<b>{fmt(h['win_rate'], 3)}</b> (95% interval {fmt(ci[0], 3)} to {fmt(ci[1], 3)}); the policy's answer "
            f"was shown on the left in {fmt(h['policy_shown_left'], 3)} of the judgements.</p>"
            f"<table>{vs}</table>" + section_agreement(h.get("people"), "Agreement between the people"))


def section_samples(result: dict | None, n: int = 12) -> str:
    if not result or not result.get("samples"):
        return ""
    names = [k[: -len("_policy")] for k in result["samples"][0] if k.endswith("_policy")]
    def score(s: dict, side: str) -> str:
        return " ".join(f"{nm} {s[f'{nm}_{side}']:.3f}" for nm in names)

    rows = []
    for s in result["samples"][:n]:
        rows.append(f"<tr><td>{esc(s['prompt'])}</td><td>{esc(s['reference'])}<div class='small'>{score(s, 'reference')}"
                    f"</div></td><td>{esc(s['policy'])}<div class='small'>{score(s, 'policy')}</div></td></tr>")
    return ("<h2>Samples before and after</h2><table><tr><th>prompt</th><th>reference (before)</th>"
            "<th>policy (after)</th></tr>" + "".join(rows) + "</table>")


def section_alarms(path: Path) -> str:
    rows = rows_of(path)
    if not rows:
        return "<h2>Monitors</h2><p>No alarm was raised.</p>" if path.parent.joinpath("metrics.jsonl").is_file() else ""
    alarms = [r for r in rows if "alarm" in r]
    examples = [r for r in rows if "ood_example" in r][:8]
    out = "<h2>Monitors</h2>"
    out += "<ul>" + "".join(f"<li class='alarm'>step {r['step']}: {esc(r['alarm'])}</li>" for r in alarms[:30]) + "</ul>"
    if len(alarms) > 30:
        out += f"<p>... and {len(alarms) - 30} more in alarms.jsonl</p>"
    if examples:
        out += ("<p>Samples flagged off the reward model's training distribution (the detector's threshold is the 95% "
                "quantile of cross-fitted training responses, so about 5% of in-distribution samples are flagged too):</p><ul>") + "".join(
            f"<li>step {r['step']}: {esc(r['ood_example'])}</li>" for r in examples) + "</ul>"
    return out


def section_rm_eval(folder: Path, rel: str) -> tuple[str, list[str]]:
    """The RM's held-out accuracy and calibration from its eval/ folder."""
    result = json.loads((folder / "eval.json").read_text()) if (folder / "eval.json").is_file() else None
    if not result:
        return "", []
    images = [f"{rel}/{p}" for p in ("reliability.png", "margins.png") if (folder / p).is_file()]
    text = (f"<h2>Reward model</h2><p>Held-out accuracy <b>{fmt(result.get('accuracy', float('nan')), 3)}</b> "
            f"on {result.get('pairs', result.get('n', '?'))} pairs; expected calibration error "
            f"{fmt(result.get('ece', float('nan')), 3)}.</p>")
    return text + "".join(f"<img src='{esc(i)}' alt='{esc(i)}'>" for i in images), images


def section_config(run_dir: Path) -> str:
    out = ""
    manifest = run_dir / "manifest.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        inputs = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v.get('path', v.get('spec', '')))}</td>"
                         f"<td class='small'>{esc((v.get('sha256') or '')[:16])}</td></tr>"
                         for k, v in m.get("inputs", {}).items())
        parents = "".join(f"<li>{esc(p)}</li>" for p in m.get("parents", []))
        out += (f"<h2>Lineage</h2><p>stage <b>{esc(m.get('stage'))}</b>, status {esc(m.get('status'))}, created "
                f"{esc(m.get('created'))}</p><table><tr><th>input</th><th>path</th><th>sha256</th></tr>{inputs}</table>"
                + (f"<p>parent runs:</p><ul>{parents}</ul>" if parents else ""))
    config = run_dir / "config.yaml"
    if config.is_file():
        out += f"<h2>Config</h2><pre>{esc(config.read_text())}</pre>"
    return out


def page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{STYLE}</style>"
            f"</head><body><h1>{esc(title)}</h1><p id='image-check' class='small'></p>{body}{CHECK}</body></html>")


def run_sections(run_dir: Path, folder: Path, prefix: str = "") -> str:
    """Everything one run directory can show; plots go to ``folder`` (named with ``prefix``)."""
    rows = rows_of(run_dir / "metrics.jsonl")
    stage = json.loads((run_dir / "manifest.json").read_text()).get("stage") if (run_dir / "manifest.json").is_file() else ""
    held = None
    for name in ("heldout.json", "eval.json"):
        if (run_dir / name).is_file() and stage != "rm":
            held = json.loads((run_dir / name).read_text())
    rel = folder.name
    body = ""
    if stage == "rm":
        img = plot_series(rows, RM_PLOTS, folder, f"{prefix}rm-curves.png", f"{run_dir.name}: reward-model training")
        text, _ = section_rm_eval(run_dir / "eval", f"{run_dir.name}/eval" if prefix else "eval")
        body += text or "<h2>Reward model</h2>"
        if img:
            body += f"<img src='{rel}/{img}' alt='reward-model curves'>"
        return body
    img = plot_series(rows, RL_PLOTS, folder, f"{prefix}curves.png", f"{run_dir.name}: training curves")
    front = plot_frontier(rows, held, folder, f"{prefix}frontier.png")
    body += section_heldout(held) + section_human(held)
    if (run_dir / "agreement.json").is_file():  # human feedback: how far the people agreed
        body += section_agreement(json.loads((run_dir / "agreement.json").read_text()))
    if img:
        body += f"<h2>Training curves</h2><img src='{rel}/{img}' alt='training curves'>"
    if front:
        body += f"<h2>Reward versus KL</h2><img src='{rel}/{front}' alt='reward versus KL frontier'>"
    body += section_alarms(run_dir / "alarms.jsonl") + section_samples(held)
    return body


def write_report(run_dir: str | Path) -> Path:
    """report.html (and its report/ PNGs) for one run directory."""
    run_dir = Path(run_dir)
    folder = run_dir / "report"
    folder.mkdir(exist_ok=True)
    path = run_dir / "report.html"
    path.write_text(page(f"rlhfkit: {run_dir.name}", run_sections(run_dir, folder) + section_config(run_dir)))
    return path


def write_pipeline_report(pipe_dir: Path, stages: list[dict]) -> Path:
    """report.html for a pipeline: the stage table (linking each stage's run and report), then each
    round's reward model and RL/evaluation sections, then the pipeline config."""
    folder = pipe_dir / "report"
    folder.mkdir(exist_ok=True)
    table = "".join(f"<tr><td>{esc(s['name'])}</td><td>{esc(s['stage'])}</td><td>{esc(s['status'])}</td>"
                    f"<td><a href='{esc(s['path'])}/'>{esc(s['path'])}</a></td><td>{fmt(s.get('seconds', 0.0), 1)} s</td></tr>"
                    for s in stages)
    body = ("<h2>Stages</h2><table><tr><th>stage</th><th>kind</th><th>status</th><th>run directory</th><th>time</th>"
            f"</tr>{table}</table>")
    for s in stages:
        run_dir = pipe_dir / s["path"]
        if s["stage"] in ("rm", "ppo", "pg", "eval-policy", "dpo", "human-feedback") and run_dir.is_dir():
            body += f"<h2 style='border-top:2px solid #888;padding-top:.5em'>{esc(s['name'])}</h2>"
            body += run_sections(run_dir, folder, prefix=f"{s['name']}-")
    config = pipe_dir / "config.yaml"
    if config.is_file():
        body += f"<h2>Pipeline config</h2><pre>{esc(config.read_text())}</pre>"
    path = pipe_dir / "report.html"
    path.write_text(page(f"rlhfkit pipeline: {pipe_dir.name}", body))
    return path


__all__ = ["write_pipeline_report", "write_report"]
