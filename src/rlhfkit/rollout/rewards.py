"""Reward sources: a reward model, rule functions, a remote HTTP scorer, and weighted sums of them.

Every source is a :class:`RewardSource` and is called the same way, on text:

    source.score(prompts: list[list[message]], responses: list[str], meta: list[dict]) -> list[float]

``meta`` carries each prompt record's other fields (a GSM8K reference answer, an id, ...). A reward
model with an OOD detector also leaves, in ``source.last_ood``, which of the last call's responses
lie off its training distribution (the RL monitors read it). Every source is built from its
command-line string in one place, :func:`parse_reward`.

On the command line a reward is one string, a sum of weighted terms::

    --reward runs/rm/final                          a saved reward model
    --reward rule:configs/rules/keywords.yaml       rule terms from a YAML file (see RuleReward)
    --reward http://host:8000/score                 a remote scorer (see RemoteReward)
    --reward "1.0*runs/rm/final + 0.5*rule:r.yaml"  a weighted composite
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import yaml

from rlhfkit.errors import ConfigError, RemoteError
from rlhfkit.models.ood import OODDetector
from rlhfkit.models.reward import load_reward_model, score, score_and_embed
from rlhfkit.platform.placement import place


class RewardSource:
    """The interface every reward implements: a ``name`` and ``score``. ``last_ood`` is None, or a bool
    per response of the last ``score`` call: True where the response lies off the reward model's
    training distribution."""

    name: str = "reward"
    last_ood: torch.Tensor | None = None

    def score(self, prompts: list[list[dict]], responses: list[str], meta: list[dict] | None = None) -> list[float]:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# rule terms: small pure functions of one response


def words(text: str) -> list[str]:
    return re.findall(r"[\w']+", text.lower())


def keyword_fraction(text: str, keywords: list[str]) -> float:
    """Fraction of the required keywords that appear (case-insensitive, whole words or phrases)."""
    if not keywords:
        return 0.0
    low = text.lower()
    return sum(bool(re.search(rf"\b{re.escape(k.lower())}\b", low)) for k in keywords) / len(keywords)


def banned_count(text: str, banned: list[str]) -> int:
    """How many of the banned words or phrases appear."""
    low = text.lower()
    return sum(bool(re.search(rf"\b{re.escape(b.lower())}\b", low)) for b in banned)


def length_penalty(text: str, min_words: int, max_words: int) -> float:
    """0 inside the window [min_words, max_words]; outside, the relative distance to it:
    (min - n) / min below, (n - max) / max above."""
    n = len(words(text))
    if min_words and n < min_words:
        return (min_words - n) / min_words
    if max_words and n > max_words:
        return (n - max_words) / max_words
    return 0.0


def repetition_rate(text: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier n-gram of the same text: 0 for no repetition,
    towards 1 for a loop."""
    w = words(text)
    grams = [tuple(w[i: i + n]) for i in range(len(w) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The answer of a GSM8K-style solution: the number after '####' (or 'A:' / 'answer is'), else
    the last number in the text; commas and a trailing '.0' dropped."""
    for marker in ("####", "answer is", "A:"):
        if marker in text:
            found = NUMBER.findall(text.rsplit(marker, 1)[1])
            if found:
                return _canonical(found[0])
    found = NUMBER.findall(text)
    return _canonical(found[-1]) if found else None


def _canonical(number: str) -> str:
    number = number.replace(",", "")
    return number[:-2] if number.endswith(".0") else number


def exact_answer(text: str, reference: str) -> float:
    """1 if the response's final number equals the reference answer's, else 0."""
    got, want = final_number(text), final_number(str(reference))
    return float(got is not None and got == want)


@dataclass
class RuleReward(RewardSource):
    """A rule reward: the weighted sum of the terms that are switched on. Seed 004's example
    (required keywords, no banned words, a length window) is the first three terms.

        r = w_keywords * keyword_fraction - w_banned * banned_count - w_length * length_penalty
            - w_repetition * repetition_rate + w_format * [regex matches] + w_answer * exact_answer
    """

    keywords: list[str] = field(default_factory=list)
    banned: list[str] = field(default_factory=list)
    min_words: int = 0
    max_words: int = 0
    regex: str = ""
    answer_field: str = ""  # meta field with the reference answer (exact match on the final number)
    w_keywords: float = 1.0
    w_banned: float = 1.0
    w_length: float = 1.0
    w_repetition: float = 0.0
    w_format: float = 1.0
    w_answer: float = 1.0
    name: str = "rule"

    def terms(self, text: str, meta: dict) -> dict[str, float]:
        """Each switched-on term's value for one response (before weights)."""
        out = {}
        if self.keywords:
            out["keywords"] = keyword_fraction(text, self.keywords)
        if self.banned:
            out["banned"] = -float(banned_count(text, self.banned))
        if self.min_words or self.max_words:
            out["length"] = -length_penalty(text, self.min_words, self.max_words)
        if self.w_repetition:
            out["repetition"] = -repetition_rate(text)
        if self.regex:
            out["format"] = float(re.search(self.regex, text, re.DOTALL) is not None)
        if self.answer_field:
            if self.answer_field not in meta:
                raise ValueError(f"rule reward: the prompt record has no field '{self.answer_field}' "
                                 f"(fields: {', '.join(meta) or 'none'})")
            out["answer"] = exact_answer(text, meta[self.answer_field])
        return out

    def score(self, prompts, responses, meta=None) -> list[float]:
        meta = meta or [{}] * len(responses)
        weights = {"keywords": self.w_keywords, "banned": self.w_banned, "length": self.w_length,
                   "repetition": self.w_repetition, "format": self.w_format, "answer": self.w_answer}
        return [sum(weights[k] * v for k, v in self.terms(r, m).items()) for r, m in zip(responses, meta)]

    @classmethod
    def from_file(cls, path: str | Path) -> RuleReward:
        """A rule from YAML: the fields above as keys. Unknown keys are an error naming the file."""
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"rule file {path} not found") from None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown rule field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data, **({} if "name" in data else {"name": f"rule:{Path(path).stem}"}))


# ---------------------------------------------------------------------------------------------


class ModelReward(RewardSource):
    """A saved reward model (``AutoModelForSequenceClassification``) scoring the whole dialogue. When its
    folder holds an ``ood.pt`` detector (written by ``rm train``), each call also flags the responses
    that lie off the RM's training distribution (``last_ood``): one forward pass gives both."""

    def __init__(self, path: str, batch_size: int = 16, max_length: int = 1024, device=None):
        self.model, self.tokenizer = load_reward_model(path)
        place(self.model, device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.batch_size, self.max_length, self.name = batch_size, max_length, f"rm:{Path(path).name}"
        detector = Path(path) / "ood.pt"
        self.ood = OODDetector.load(detector) if detector.is_file() else None
        self.last_ood = None

    def score(self, prompts, responses, meta=None) -> list[float]:
        if self.ood is None or self.model.num_labels != 1:
            return score(self.model, self.tokenizer, prompts, responses, batch_size=self.batch_size,
                         max_length=self.max_length)
        rewards, features = score_and_embed(self.model, self.tokenizer, prompts, responses, self.batch_size,
                                            self.max_length)
        self.last_ood = self.ood.flag(features)
        return rewards.tolist()


def post_json(url: str, payload: dict, timeout: float = 30.0, retries: int = 3, backoff: float = 0.5,
              headers: dict | None = None) -> dict:
    """POST JSON and return the decoded answer. Connection errors, timeouts, 5xx and 429 are retried
    with exponential backoff; other client errors are not. The last error is raised naming the URL."""
    body = json.dumps(payload).encode()
    error = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            error = f"HTTP {e.code}"
            if e.code < 500 and e.code != 429:
                detail = e.read()[:300].decode(errors="replace").strip()
                error += f": {detail}" if detail else ""
                break  # a client error will not go away on retry
        except (urllib.error.URLError, TimeoutError, OSError, ValueError) as e:
            error = f"{type(e).__name__}: {e}"
    raise RemoteError(f"{url}: {error} (after {attempt + 1} attempt(s))")


class RemoteReward(RewardSource):
    """An HTTP scorer. POSTs ``{"prompts": [[messages]], "responses": [str], "meta": [{}]}`` and expects
    ``{"rewards": [float, ...]}`` back, one per response (:func:`post_json`: timeouts and retries)."""

    def __init__(self, url: str, timeout: float = 30.0, retries: int = 3, backoff: float = 0.5):
        self.url, self.timeout, self.retries, self.backoff = url, timeout, retries, backoff
        self.name = url

    def score(self, prompts, responses, meta=None) -> list[float]:
        meta = meta or [{}] * len(responses)
        answer = post_json(self.url, {"prompts": prompts, "responses": responses, "meta": meta}, self.timeout,
                           self.retries, self.backoff)
        rewards = answer.get("rewards") if isinstance(answer, dict) else None
        if not isinstance(rewards, list) or len(rewards) != len(responses):
            raise RemoteError(f"remote reward {self.url}: expected {{'rewards': [{len(responses)} numbers]}}, "
                               f"got {str(answer)[:200]}")
        return [float(r) for r in rewards]


@dataclass
class CompositeReward(RewardSource):
    """sum_i w_i * source_i. ``last_terms`` keeps the latest per-source means for logging."""

    parts: list[tuple[float, object]]
    last_terms: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return " + ".join(f"{w:g}*{s.name}" for w, s in self.parts)

    @property
    def last_ood(self):
        """OOD flags of the last call from the first reward model with a detector (None if there is none)."""
        return next((s.last_ood for _, s in self.parts if getattr(s, "ood", None) is not None), None)

    def score(self, prompts, responses, meta=None) -> list[float]:
        total = [0.0] * len(responses)
        for w, source in self.parts:
            values = source.score(prompts, responses, meta)
            self.last_terms[source.name] = sum(values) / max(len(values), 1)
            total = [t + w * v for t, v in zip(total, values)]
        return total


def reward_terms(spec: str) -> list[tuple[float, str, str]]:
    """The terms of a ``--reward`` string: (weight, kind, target) with kind 'http', 'rule' or 'rm'.

    >>> reward_terms("2*rule:r.yaml + runs/rm/final")
    [(2.0, 'rule', 'r.yaml'), (1.0, 'rm', 'runs/rm/final')]
    """
    out = []
    for term in (t.strip() for t in spec.split("+")):
        if not term:
            raise ConfigError(f"--reward {spec!r}: empty term")
        weight = 1.0
        head, star, rest = term.partition("*")
        if star:
            try:
                weight, term = float(head), rest.strip()
            except ValueError:
                raise ConfigError(f"--reward {spec!r}: '{head}' is not a weight") from None
        if term.startswith(("http://", "https://")):
            out.append((weight, "http", term))
        elif term.startswith("rule:") or term.endswith((".yaml", ".yml")):
            out.append((weight, "rule", term.removeprefix("rule:")))
        else:
            out.append((weight, "rm", term.removeprefix("rm:")))
    return out


def single_reward_model(spec: str) -> str | None:
    """The folder when ``spec`` is one reward model with weight 1 (PPO's critic starts from it), else None."""
    terms = reward_terms(spec)
    return terms[0][2] if len(terms) == 1 and terms[0][:2] == (1.0, "rm") else None


def parse_reward(spec: str, batch_size: int = 16, max_length: int = 1024, device=None, timeout: float = 30.0,
                 retries: int = 3) -> CompositeReward:
    """A reward from its command-line string (see the module docstring). Reward models go to ``device``;
    http(s) scorers get ``timeout`` seconds per request and ``retries`` retries."""
    parts = []
    for weight, kind, target in reward_terms(spec):
        if kind == "http":
            source = RemoteReward(target, timeout, retries)
        elif kind == "rule":
            source = RuleReward.from_file(target)
        else:
            if not Path(target).exists():
                raise ConfigError(f"--reward: reward model {target} not found (expected a saved reward model "
                                  f"folder, rule:FILE.yaml or an http(s) URL)")
            source = ModelReward(target, batch_size, max_length, device)
        parts.append((weight, source))
    return CompositeReward(parts)


def reward_from(cfg, spec: str, device=None) -> CompositeReward:
    """:func:`parse_reward` with a sampling stage's reward flags (``SamplingArgs``)."""
    return parse_reward(spec, cfg.reward_batch_size, cfg.max_length, device, cfg.reward_timeout, cfg.reward_retries)
