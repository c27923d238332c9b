"""How far annotators agree, and with what: the statistics ``annotate stats`` reports.

A *unit* is one thing several annotators judged, as ``{annotator: value}`` (missing judgements are
simply absent). What the units and values are depends on the task, and so does the level of
measurement (``../shared/reference/annotation.md``):

=========== ======================================== ===============================================
task        unit: value                               statistics
=========== ======================================== ===============================================
pairwise    item: winner (a / b / tie)                percent agreement, Cohen's κ per pair, Fleiss'
                                                      κ, Krippendorff's α nominal
            item: signed strength (-S..S)             Krippendorff's α ordinal (with a scale)
likert      item: rating                              percent agreement, Cohen's κ (linear weights),
                                                      Fleiss' κ, Krippendorff's α ordinal
steps       (item, step): label -1/0/+1               the same, per step, α ordinal
ranking     (item, response): rank                    Krippendorff's α ordinal; each annotator's
                                                      Kendall τ against the others' mean ranks
=========== ======================================== ===============================================

* **Percent agreement**: of all pairs of annotators who judged the same unit, the share that gave the
  same value (what InstructGPT reports: 72.6 ± 1.5 %), with a 95 % percentile-bootstrap interval
  that resamples whole units (``scipy.stats.bootstrap``).
* **Cohen's κ** (two annotators, the units both judged): (p_o − p_e) / (1 − p_e), p_e from each one's
  own label frequencies (``sklearn.metrics.cohen_kappa_score``).
* **Fleiss' κ** (any number, the same number per unit): κ over the units judged by the most common
  number of annotators (``statsmodels.stats.inter_rater.fleiss_kappa``).
* **Krippendorff's α** = 1 − D_o / D_e, observed over expected disagreement; handles missing
  judgements and any level (``krippendorff.alpha``).
* **Against the majority**: each annotator's judgements compared with the majority of the *other*
  annotators of the unit (leave-one-out, so nobody agrees with themselves); units where the others
  tie are left out. **Against gold**: with the known answers of gold items.
* **Position bias**: how often the response shown on the left wins (ties left out), with a two-sided
  binomial test against 1/2. **Length bias**: how often the longer response wins.

Every statistic is None where it cannot be computed (too few units, or no variation at all).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, defaultdict

import krippendorff
import numpy as np
from scipy.stats import binomtest, bootstrap, kendalltau
from sklearn.metrics import cohen_kappa_score
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker
from statsmodels.stats.inter_rater import aggregate_raters, fleiss_kappa

from rlhfkit.people.db import Item, Judgement, User
from rlhfkit.people.store import get_project

Units = list[dict[str, object]]


def _round(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 6)


def _order(v):
    return (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))


def percent_agreement(units: Units) -> float | None:
    """Share of agreeing annotator pairs over all pairs who judged the same unit.

    >>> percent_agreement([{"x": "a", "y": "a", "z": "b"}, {"x": "b", "y": "b"}])
    0.5
    """
    agree = total = 0
    for u in units:
        for a, b in itertools.combinations(u.values(), 2):
            agree += a == b
            total += 1
    return agree / total if total else None


def bootstrap_interval(n_units: int, statistic, n_resamples: int = 2000, confidence: float = 0.95,
                       seed: int = 0) -> list[float]:
    """A percentile-bootstrap interval of ``statistic(unit indices)``, resampling whole units
    (``scipy.stats.bootstrap``)."""
    res = bootstrap((np.arange(n_units),), statistic, vectorized=False, n_resamples=n_resamples,
                    confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed))
    return [_round(res.confidence_interval.low), _round(res.confidence_interval.high)]


def percent_agreement_ci(units: Units, confidence: float = 0.95, seed: int = 0) -> list[float] | None:
    """A percentile bootstrap interval for :func:`percent_agreement`, resampling whole units (the pairs of
    one unit are not independent of each other)."""
    counts = [(sum(a == b for a, b in itertools.combinations(u.values(), 2)), len(u) * (len(u) - 1) // 2)
              for u in units if len(u) >= 2]
    if len(counts) < 2:
        return None
    agree, total = (np.array(x, dtype=float) for x in zip(*counts))
    return bootstrap_interval(len(counts), lambda idx: agree[idx].sum() / total[idx].sum(), confidence=confidence,
                              seed=seed)


def cohen_pairs(units: Units, weights: str | None = None, min_units: int = 2) -> dict[str, float | None]:
    """Cohen's κ for every pair of annotators, on the units both judged ("x|y" -> κ)."""
    coders = sorted({c for u in units for c in u})
    out = {}
    for a, b in itertools.combinations(coders, 2):
        both = [(u[a], u[b]) for u in units if a in u and b in u]
        if len(both) < min_units:
            continue
        y1, y2 = (list(y) for y in zip(*both))
        labels = sorted(set(y1) | set(y2), key=_order)  # numbers in numeric order (the weights need it)
        if len(labels) < 2:
            out[f"{a}|{b}"] = None  # no variation: κ is undefined
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            out[f"{a}|{b}"] = _round(cohen_kappa_score(y1, y2, weights=weights, labels=labels))
    return out


def fleiss(units: Units) -> tuple[float | None, int]:
    """(Fleiss' κ, units used): over the units with the most common number of judgements (at least 2)."""
    sizes = Counter(len(u) for u in units if len(u) >= 2)
    if not sizes:
        return None, 0
    n = max(sizes, key=lambda s: (sizes[s], s))
    rows = [list(u.values()) for u in units if len(u) == n]
    categories = sorted({v for r in rows for v in r}, key=str)
    if len(rows) < 2 or len(categories) < 2:
        return None, len(rows)
    codes = np.array([[categories.index(v) for v in r] for r in rows])
    table, _ = aggregate_raters(codes, n_cat=len(categories))
    with np.errstate(divide="ignore", invalid="ignore"):
        return _round(fleiss_kappa(table)), len(rows)


def kripp(units: Units, level: str, domain: list | None = None) -> float | None:
    """Krippendorff's α at ``level`` (nominal, ordinal, interval), missing judgements allowed."""
    coders = sorted({c for u in units for c in u})
    if len(coders) < 2 or sum(len(u) >= 2 for u in units) < 1:
        return None
    values = sorted({v for u in units for v in u.values()}, key=_order) if domain is None else list(domain)
    if len({v for u in units for v in u.values()}) < 2:
        return None
    code = {v: i for i, v in enumerate(values)} if level == "nominal" else None
    data = np.full((len(coders), len(units)), np.nan)
    for j, u in enumerate(units):
        for c, v in u.items():
            data[coders.index(c), j] = code[v] if code is not None else float(v)
    domain_codes = list(range(len(values))) if code is not None else [float(v) for v in values]
    return _round(krippendorff.alpha(reliability_data=data, level_of_measurement=level, value_domain=domain_codes))


def leave_one_out_majority(unit: dict, coder: str):
    """The value most of the *other* annotators gave, or None when they tie or there are none."""
    others = Counter(v for c, v in unit.items() if c != coder)
    if not others:
        return None
    (top, n), *rest = others.most_common()
    return None if rest and rest[0][1] == n else top


def majority_agreement(units: Units, close=lambda a, b: a == b) -> dict[str, float | None]:
    """Each annotator's share of judgements that match the leave-one-out majority (``close`` decides)."""
    hits, seen = Counter(), Counter()
    for u in units:
        for c, v in u.items():
            m = leave_one_out_majority(u, c)
            if m is not None:
                seen[c] += 1
                hits[c] += bool(close(v, m))
    coders = sorted({c for u in units for c in u})
    return {c: _round(hits[c] / seen[c]) if seen[c] else None for c in coders}


def kendall_vs_others(rankings: dict[int, dict[str, list[int]]]) -> dict[str, float | None]:
    """Each annotator's mean Kendall τ (τ-b, ties allowed) between their ranks of an item and the mean
    ranks the other annotators gave it."""
    taus = defaultdict(list)
    for per_coder in rankings.values():
        for c, ranks in per_coder.items():
            others = [r for o, r in per_coder.items() if o != c]
            if not others:
                continue
            mean = np.mean(np.array(others, dtype=float), axis=0)
            if len(set(ranks)) < 2 or len(set(mean.tolist())) < 2:
                continue
            taus[c].append(kendalltau(ranks, mean).statistic)
    coders = sorted({c for per in rankings.values() for c in per})
    return {c: _round(np.mean(taus[c])) if taus[c] else None for c in coders}


def pair_order_agreement(ranks: list[int], reference: list[float]) -> float | None:
    """Share of response pairs ordered as ``reference`` orders them (pairs it ties are left out)."""
    agree = total = 0
    for i, j in itertools.combinations(range(len(ranks)), 2):
        if reference[i] == reference[j]:
            continue
        total += 1
        agree += (ranks[i] - ranks[j]) * (reference[i] - reference[j]) > 0
    return agree / total if total else None


def share_test(wins: int, n: int) -> dict:
    """``wins`` of ``n``, with a two-sided binomial test against 1/2."""
    return {"share": _round(wins / n) if n else None, "n": n,
            "p_value": _round(binomtest(wins, n, 0.5).pvalue) if n else None}


# --------------------------------------------------------------------------------------- a project


def task_units(task: str, items: dict, votes: dict[int, dict[str, dict]]) -> dict:
    """The units of each statistic for a task, from ``votes[item][annotator] = value``."""
    if task == "pairwise":
        return {"winner": [{c: v["winner"] for c, v in per.items()} for per in votes.values()],
                "strength": [{c: v["preference"] for c, v in per.items()} for per in votes.values()]}
    if task == "likert":
        return {"rating": [{c: v["rating"] for c, v in per.items()} for per in votes.values()]}
    if task == "steps":
        units = []
        for item, per in votes.items():
            for s in range(len(items[item].responses)):
                u = {c: v["labels"][s] for c, v in per.items() if v["labels"][s] is not None}
                if u:
                    units.append(u)
        return {"labels": units}
    if task == "ranking":
        return {"ranks": [{c: v["ranks"][i] for c, v in per.items()} for per in votes.values()
                          for i in range(len(next(iter(per.values()))["ranks"]))]}
    return {}


def gold_score(task: str, value: dict, gold: dict) -> float | None:
    """1 when a judgement matches the gold answer (a rating within 1; for rankings and steps the share
    of pairs or steps that match)."""
    if task == "pairwise":
        return float(value["winner"] == gold["winner"])
    if task == "likert":
        return float(abs(value["rating"] - gold["rating"]) <= 1)
    if task == "ranking":
        return pair_order_agreement(value["ranks"], [float(r) for r in gold["ranks"]])
    if task == "steps":
        pairs = [(v, g) for v, g in zip(value["labels"], gold["labels"]) if g is not None and v is not None]
        return sum(v == g for v, g in pairs) / len(pairs) if pairs else None
    return None


def agreement(db: sessionmaker, name: str) -> dict:
    """Every agreement and quality statistic of a project (see the module's docstring)."""
    with db() as s:
        p = get_project(s, name)
        users = {u.id: u.name for u in s.scalars(select(User))}
        items = {i.id: i for i in s.scalars(select(Item).where(Item.project_id == p.id))}
        judgements = list(s.scalars(select(Judgement).where(Judgement.project_id == p.id).order_by(Judgement.id)))
    votes: dict[int, dict[str, dict]] = defaultdict(dict)
    gold = defaultdict(list)
    for j in judgements:
        item = items[j.item_id]
        if item.is_gold:
            score = gold_score(p.task, j.value, item.gold)
            if score is not None:
                gold[users[j.user_id]].append(score)
        else:
            votes[j.item_id][users[j.user_id]] = j.value
    out: dict = {"project": p.name, "task": p.task, "items_judged": len(votes),
                 "items_with_2_or_more": sum(len(v) >= 2 for v in votes.values())}
    units = task_units(p.task, items, votes)
    opts = p.options
    if p.task in ("pairwise", "likert", "steps"):
        main = units["winner" if p.task == "pairwise" else "rating" if p.task == "likert" else "labels"]
        level = "nominal" if p.task == "pairwise" else "ordinal"
        out["percent_agreement"] = _round(percent_agreement(main))
        out["percent_agreement_ci95"] = percent_agreement_ci(main)
        out["cohen_kappa"] = cohen_pairs(main, weights="linear" if p.task == "likert" else None)
        out["fleiss_kappa"], out["fleiss_units"] = fleiss(main)
        domain = {"pairwise": ["a", "b", "tie"], "likert": list(range(1, opts.get("scale", 7) + 1)),
                  "steps": [-1, 0, 1]}[p.task]
        out["krippendorff_alpha"] = {level: kripp(main, level, domain)}
        if p.task == "pairwise" and opts.get("strength", 1) > 1:
            s_ = opts["strength"]
            out["krippendorff_alpha"]["ordinal_strength"] = kripp(units["strength"], "ordinal", list(range(-s_, s_ + 1)))
        close = (lambda a, b: abs(a - b) <= 1) if p.task == "likert" else (lambda a, b: a == b)
        out["agreement_with_majority"] = majority_agreement(main, close)
    if p.task == "ranking":
        out["krippendorff_alpha"] = {"ordinal": kripp(units["ranks"], "ordinal")}
        ranked = {i: {c: v["ranks"] for c, v in per.items()} for i, per in votes.items()}
        out["kendall_tau_vs_others"] = kendall_vs_others(ranked)
        hits = defaultdict(list)
        for per in ranked.values():
            for c, r in per.items():
                others = [x for o, x in per.items() if o != c]
                if others:
                    a = pair_order_agreement(r, np.mean(np.array(others, dtype=float), axis=0).tolist())
                    if a is not None:
                        hits[c].append(a)
        out["agreement_with_majority"] = {c: _round(np.mean(hits[c])) if hits[c] else None
                                          for c in sorted({c for per in ranked.values() for c in per})}
    out["agreement_with_gold"] = {c: {"score": _round(np.mean(v)), "n": len(v)} for c, v in sorted(gold.items())}
    if p.task == "pairwise":
        decided = [j for j in judgements if not items[j.item_id].is_gold and j.answer["preference"] != 0]
        left = sum(j.answer["preference"] < 0 for j in decided)
        out["position_bias_left_wins"] = share_test(left, len(decided))
        longer = [(j, [len(t) for t in items[j.item_id].responses]) for j in decided]
        longer = [(j, ln) for j, ln in longer if ln[0] != ln[1]]
        wins = sum((j.value["winner"] == "a") == (ln[0] > ln[1]) for j, ln in longer)
        out["length_bias_longer_wins"] = share_test(wins, len(longer))
    low_m, low_g = opts.get("min_majority_agreement", 0.5), opts.get("min_gold_agreement", 0.6)
    flagged = {}
    for c, a in (out.get("agreement_with_majority") or {}).items():
        if a is not None and a < low_m:
            flagged.setdefault(c, []).append(f"agrees with the others' majority {a:.2f} < {low_m}")
    for c, g in out["agreement_with_gold"].items():
        if g["score"] is not None and g["score"] < low_g:
            flagged.setdefault(c, []).append(f"agrees with gold {g['score']:.2f} < {low_g}")
    out["flagged_annotators"] = flagged
    out["thresholds"] = {"min_majority_agreement": low_m, "min_gold_agreement": low_g}
    return out


def summary_lines(a: dict) -> list[str]:
    """The statistics as lines of text (``annotate stats`` and the admin page)."""
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    lines = [f"agreement over {a['items_with_2_or_more']} items with 2 or more judgements:"]
    if "percent_agreement" in a:
        ci = a.get("percent_agreement_ci95") or [None, None]
        lines.append(f"  percent agreement {fmt(a['percent_agreement'])} (95% interval {fmt(ci[0])} to {fmt(ci[1])}), "
                     f"Fleiss' kappa {fmt(a['fleiss_kappa'])} "
                     f"({a['fleiss_units']} items)")
    for level, alpha in (a.get("krippendorff_alpha") or {}).items():
        lines.append(f"  Krippendorff's alpha ({level}) {fmt(alpha)}")
    for pair, k in (a.get("cohen_kappa") or {}).items():
        lines.append(f"  Cohen's kappa {pair}: {fmt(k)}")
    for c, t in (a.get("kendall_tau_vs_others") or {}).items():
        lines.append(f"  Kendall's tau of {c} against the others: {fmt(t)}")
    for c, m in (a.get("agreement_with_majority") or {}).items():
        g = a["agreement_with_gold"].get(c, {})
        lines.append(f"  {c}: with the majority {fmt(m)}, with gold {fmt(g.get('score'))} ({g.get('n', 0)} gold)")
    for key, what in (("position_bias_left_wins", "the left response wins"),
                      ("length_bias_longer_wins", "the longer response wins")):
        if key in a:
            b = a[key]
            lines.append(f"  {what} {fmt(b['share'])} of {b['n']} (binomial p = {fmt(b['p_value'])})")
    for c, why in a["flagged_annotators"].items():
        lines.append(f"  FLAGGED {c}: {'; '.join(why)}")
    return lines
