"""Typed records. A prompt is always a list of chat messages (a multi-turn conversation is a longer
list); a response is the text of the assistant turn that answers it.

Every record carries ``source`` ("file:line") so later errors can still name where it came from,
and ``meta`` with the input's other fields (ids, subsets, ...) so nothing the user had is lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Message = dict  # {"role": "system"|"user"|"assistant", "content": str}
# A response is the assistant's text, or, for dialogues that diverge before their last turn, the
# rest of the dialogue as messages (starting with an assistant turn and ending with one).
Response = str | list


@dataclass
class Record:
    prompt: list[Message]
    source: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def subset(self) -> str | None:
        return self.meta.get("subset")


@dataclass
class PromptRecord(Record):
    """A prompt to sample from (RL, labelling, evaluation)."""


@dataclass
class Demonstration(Record):
    """A prompt and a good response (SFT)."""

    response: Response = ""


@dataclass
class Preference(Record):
    """A pairwise judgement: ``chosen`` was preferred to ``rejected``. ``margin`` is an optional
    strength of preference (Llama 2 margin loss)."""

    chosen: Response = ""
    rejected: Response = ""
    margin: float | None = None


@dataclass
class Ranking(Record):
    """K responses ranked best first (InstructGPT K-way comparisons, Plackett-Luce)."""

    responses: list[str] = field(default_factory=list)


@dataclass
class Rating(Record):
    """One response with a Likert-style rating (higher is better)."""

    response: str = ""
    rating: float = 0.0


@dataclass
class StepSolution(Record):
    """A chain-of-thought solution split into steps, each labelled +1 (correct), 0 (neutral) or
    -1 (wrong); ``None`` marks an unlabelled step (after the first mistake supervision stops).
    ``correct`` is the outcome label of the whole solution when known (ORM)."""

    steps: list[str] = field(default_factory=list)
    labels: list[int | None] = field(default_factory=list)
    correct: bool | None = None

    @property
    def response(self) -> str:
        return "\n".join(self.steps)


KINDS: dict[str, type[Record]] = {
    "prompt": PromptRecord,
    "demonstration": Demonstration,
    "preference": Preference,
    "ranking": Ranking,
    "rating": Rating,
    "steps": StepSolution,
}
