"""LLM-as-judge (``rlhfkit judge``): pairwise judging in both orders, or single-answer grading on 1-10.

The prompts are MT-Bench's (Zheng et al. 2023, arXiv 2306.05685; FastChat, Apache-2.0): ``pair-v2``
for pairwise comparison and ``single-v1`` for grading. A judge is any local causal LM (the bundled
model by default), decoding greedily (temperature 0), or an OpenAI-compatible chat endpoint given by
``--judge-url``. Every answer is parsed without ever raising; unparsable answers are counted and
reported, and count as ties (pairwise) or are left out of the mean (grading).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Literal

from rlhfkit.config import RunArgs
from rlhfkit.data import load_records
from rlhfkit.data.template import encode_prompt
from rlhfkit.errors import ConfigError, RemoteError
from rlhfkit.feedback.verdicts import parse_pairwise, parse_rating, summarise_pairwise
from rlhfkit.rollout.engine import SamplingParams, load_engine
from rlhfkit.rollout.rewards import post_json
from rlhfkit.run import Run

# MT-Bench judge prompts (FastChat judge_prompts.jsonl, names pair-v2 and single-v1), verbatim.
PAIR_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to the "
    "user question displayed below. You should choose the assistant that follows the user's instructions and answers "
    "the user's question better. Your evaluation should consider factors such as the helpfulness, relevance, accuracy, "
    "depth, creativity, and level of detail of their responses. Begin your evaluation by comparing the two responses "
    "and provide a short explanation. Avoid any position biases and ensure that the order in which the responses were "
    "presented does not influence your decision. Do not allow the length of the responses to influence your "
    "evaluation. Do not favor certain names of the assistants. Be as objective as possible. After providing your "
    "explanation, output your final verdict by strictly following this format: \"[[A]]\" if assistant A is better, "
    "\"[[B]]\" if assistant B is better, and \"[[C]]\" for a tie."
)
PAIR_TEMPLATE = (
    "[User Question]\n{question}\n\n[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's "
    "Answer]\n\n[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]"
)
SINGLE_SYSTEM = "You are a helpful assistant."
SINGLE_TEMPLATE = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an AI "
    "assistant to the user question displayed below. Your evaluation should consider factors such as the helpfulness, "
    "relevance, accuracy, depth, creativity, and level of detail of the response. Begin your evaluation by providing a "
    "short explanation. Be as objective as possible. After providing your explanation, you must rate the response on a "
    "scale of 1 to 10 by strictly following this format: \"[[rating]]\", for example: \"Rating: [[5]]\".\n\n"
    "[Question]\n{question}\n\n[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"
)


def pairwise_messages(question: str, answer_a: str, answer_b: str) -> list[dict]:
    return [{"role": "system", "content": PAIR_SYSTEM},
            {"role": "user", "content": PAIR_TEMPLATE.format(question=question, answer_a=answer_a, answer_b=answer_b)}]


def single_messages(question: str, answer: str) -> list[dict]:
    return [{"role": "system", "content": SINGLE_SYSTEM},
            {"role": "user", "content": SINGLE_TEMPLATE.format(question=question, answer=answer)}]


def question_text(prompt: list[dict]) -> str:
    """The conversation a response answers, as the judge sees it: the last user turn, with earlier
    turns above it when there are several."""
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt)


# ---------------------------------------------------------------------------------------------
# judges: a list of conversations in, a list of answers out, at temperature 0


class LocalJudge:
    """A local causal LM decoding greedily, in batches."""

    def __init__(self, spec: str, max_new_tokens: int = 256, batch_size: int = 8, max_length: int = 2048,
                 rollout: str = "hf"):
        self.engine, self.tokenizer = load_engine(rollout, spec)
        self.params = SamplingParams(self.tokenizer.pad_token_id, self.tokenizer.eos_token_id,
                                     max_new_tokens=max_new_tokens, temperature=0)
        self.max_new_tokens, self.batch_size, self.max_length = max_new_tokens, batch_size, max_length
        self.name = spec

    def __call__(self, conversations: list[list[dict]]) -> list[str]:
        budget = self.max_length - self.max_new_tokens
        ids = [encode_prompt(self.tokenizer, c)[-budget:] for c in conversations]
        out = []
        for i in range(0, len(ids), self.batch_size):
            ro = self.engine.generate(ids[i: i + self.batch_size], self.params)
            out += [self.tokenizer.decode(r[m.bool()], skip_special_tokens=True)
                    for r, m in zip(ro.response_ids, ro.response_mask)]
        return out


class HTTPJudge:
    """An OpenAI-compatible ``/chat/completions`` endpoint (vLLM, TGI, llama.cpp server, a hosted API).
    The key, if any, comes from $OPENAI_API_KEY. Temperature 0; timeouts and retries as the remote reward."""

    def __init__(self, url: str, model: str = "", max_new_tokens: int = 256, timeout: float = 60.0, retries: int = 3):
        self.url = url.rstrip("/")
        if not self.url.endswith("/chat/completions"):
            self.url += "/chat/completions"
        self.model, self.max_new_tokens, self.timeout, self.retries = model, max_new_tokens, timeout, retries
        self.name = f"{model}@{url}" if model else url

    def one(self, messages: list[dict]) -> str:
        key = os.environ.get("OPENAI_API_KEY")
        answer = post_json(self.url, {"model": self.model, "messages": messages, "temperature": 0,
                                      "max_tokens": self.max_new_tokens}, self.timeout, self.retries,
                           headers={"Authorization": f"Bearer {key}"} if key else None)
        try:
            return answer["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise RemoteError(f"judge {self.url}: not a chat completion: {str(answer)[:200]}") from None

    def __call__(self, conversations: list[list[dict]]) -> list[str]:
        return [self.one(c) for c in conversations]


def make_judge(model: str, url: str = "", judge_model: str = "", max_new_tokens: int = 256, batch_size: int = 8,
               rollout: str = "hf"):
    """An OpenAI-compatible endpoint when ``url`` is given, else the local ``model`` on a rollout engine."""
    if url:
        return HTTPJudge(url, judge_model, max_new_tokens)
    return LocalJudge(model, max_new_tokens, batch_size, rollout=rollout)


# ---------------------------------------------------------------------------------------------


def judge_pairs(judge, prompts: list[list[dict]], xs: list[str], ys: list[str]) -> dict:
    """Judge each (x, y) in both orders: (A=x, B=y) and (A=y, B=x). Returns the summary of
    :func:`rlhfkit.feedback.verdicts.summarise_pairwise` plus the raw answers and verdicts."""
    questions = [question_text(p) for p in prompts]
    first = judge([pairwise_messages(q, x, y) for q, x, y in zip(questions, xs, ys)])
    second = judge([pairwise_messages(q, y, x) for q, x, y in zip(questions, xs, ys)])
    v1, v2 = [parse_pairwise(t) for t in first], [parse_pairwise(t) for t in second]
    return {**summarise_pairwise(v1, v2), "answers": list(zip(first, second)), "verdicts": list(zip(v1, v2))}


def grade(judge, prompts: list[list[dict]], answers: list[str]) -> dict:
    """Single-answer grading: a 1-10 score per answer (None when unparsable)."""
    raw = judge([single_messages(question_text(p), a) for p, a in zip(prompts, answers)])
    scores = [parse_rating(t) for t in raw]
    valid = [s for s in scores if s is not None]
    return {"n": len(scores), "scores": scores, "answers": raw, "unparsable": len(scores) - len(valid),
            "mean": sum(valid) / len(valid) if valid else None}


@dataclass
class JudgeConfig(RunArgs):
    """Judge preference pairs in both orders (pairwise), or grade single answers on 1-10."""

    data: str = ""
    """Pairwise: preference records (prompt/chosen/rejected, HH, ...): 'accuracy' is how often the judge
    consistently prefers 'chosen'. Single: prompt/response records."""
    mode: Literal["pairwise", "single"] = "pairwise"
    """Pairwise comparison (both orders) or single-answer grading."""
    model: str = "smollm2-135m-instruct"
    """Local judge model (any causal LM rlhfkit can load)."""
    judge_url: str = ""
    """An OpenAI-compatible endpoint (e.g. http://localhost:8000/v1) instead of a local model."""
    rollout: Literal["hf"] = "hf"
    """Rollout engine of a local judge model ('hf': in-process KV-cache decoding)."""
    judge_model: str = ""
    """Model name sent to --judge-url."""
    max_new_tokens: int = 256
    """Longest judge answer."""
    batch_size: int = 8
    """Conversations per local generation batch."""
    limit: int = 0
    """Judge only the first N records (0: all)."""
    fields: str = ""
    """Column mapping, e.g. 'prompt=question'."""


    def resolve(self) -> JudgeConfig:
        if not self.data:
            raise ConfigError("judge: --data FILE is required")
        return self


def run(cfg: JudgeConfig) -> Run:
    cfg.resolve()
    kind = "preference" if cfg.mode == "pairwise" else "demonstration"
    records = load_records(cfg.data, kind=kind, fields=cfg.fields).records
    records = records[: cfg.limit] if cfg.limit else records
    run = Run.open(cfg, "judge", inputs={"data": cfg.data, "model": cfg.judge_url or cfg.model})
    judge = make_judge(cfg.model, cfg.judge_url, cfg.judge_model, cfg.max_new_tokens, cfg.batch_size, cfg.rollout)
    prompts = [r.prompt for r in records]
    if cfg.mode == "pairwise":
        text = lambda r: r if isinstance(r, str) else "\n".join(m["content"] for m in r)  # noqa: E731
        out = judge_pairs(judge, prompts, [text(r.chosen) for r in records], [text(r.rejected) for r in records])
        summary = {"judge": judge.name, "n": out["n"], "accuracy": out["x_wins"] / max(out["n"], 1),
                   "rejected_preferred": out["y_wins"] / max(out["n"], 1), "ties": out["ties"],
                   "consistency": out["consistency"], "unparsable": out["unparsable"]}
        rows = [{"source": r.source, "result": {"x": "chosen", "y": "rejected", "tie": "tie"}[res],
                 "verdict_chosen_first": v[0], "verdict_rejected_first": v[1], "answer_chosen_first": a[0],
                 "answer_rejected_first": a[1]} for r, res, v, a in zip(records, out["results"], out["verdicts"], out["answers"])]
    else:
        out = grade(judge, prompts, [r.response for r in records])
        summary = {"judge": judge.name, "n": out["n"], "mean_score": out["mean"], "unparsable": out["unparsable"]}
        rows = [{"source": r.source, "score": s, "answer": a} for r, s, a in zip(records, out["scores"], out["answers"])]
    with open(run.path / "judgements.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    (run.path / "summary.json").write_text(json.dumps(summary, indent=2))
    run.finish(**summary)
    print(json.dumps(summary, indent=2))
    return run
