"""``rlhfkit serve reward --model RUN/final``: a reward model behind HTTP (FastAPI + uvicorn, the
``serve`` extra), for other processes and other frameworks.

* ``POST /get_reward``: OpenRLHF's remote reward-model contract. Request ``{"query": [full texts],
  "prompts": [...], "labels": [...]}``, reply ``{"rewards": [...], "scores": [...], "extra_logs": {}}``
  (``rewards`` and ``scores`` are the same numbers), so an OpenRLHF run points ``--remote_rm_url``
  here. A query is the whole conversation as the policy's tokenizer rendered it; it is tokenised as
  it is (no template added) and scored at its last token.
* ``POST /v1/score``: this project's shape, what ``--reward http://.../v1/score`` sends: ``{"prompts":
  [text or chat messages], "responses": [text], "meta": [...]}``, or one ``{"prompt", "response"}``;
  the reply has ``rewards`` and, when the model has an OOD detector, ``ood`` (a bool per response).
* ``GET /health``: the model and the limits (needs no token).

**Dynamic batching.** Requests that arrive within ``--batch-wait-ms`` of each other are scored
together: their texts are sorted by length and cut into forward passes of at most
``--batch-tokens`` padded tokens, so many small clients get the throughput of large batches. One
forward pass runs at a time, in a worker thread, so the server keeps accepting requests meanwhile.

**Limits.** At most ``--max-texts`` texts per request and ``--max-tokens`` tokens per text, no empty
lists, no NUL bytes, valid JSON of the right types: anything else is a 4xx with a message saying
what is wrong, and the server goes on serving. A request that cannot be scored within
``--request-timeout`` seconds gets a 503. ``--token`` (or ``$RLHFKIT_SERVE_TOKEN``) makes every
scoring route require ``Authorization: Bearer <token>``.

The server holds no state: a restart loses nothing a client was told.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from dataclasses import dataclass

from rlhfkit.data.batching import length_batches
from rlhfkit.errors import ConfigError
from rlhfkit.models.ood import OODDetector
from rlhfkit.models.reward import (
    encode_pair,
    load_reward_model,
    read_reward,
    read_reward_and_features,
    read_sequences,
)
from rlhfkit.platform.placement import make_accelerator, place
from rlhfkit.serve.args import ServerArgs

try:  # the serve extra
    from fastapi import Depends, FastAPI, HTTPException
    from pydantic import BaseModel, ConfigDict, Field, field_validator

    from rlhfkit.serve.common import Message
    from rlhfkit.web import bearer, clean_text, limit_body, reject_bad_values
except ImportError:  # pragma: no cover - exercised only without the extra
    FastAPI = None


@dataclass
class ServeRewardConfig(ServerArgs):
    """Serve a reward model over HTTP: OpenRLHF's POST /get_reward and rlhfkit's POST /v1/score."""

    model: str = ""
    """The reward model: a run's final/ folder (any AutoModelForSequenceClassification folder)."""
    max_texts: int = 512
    """Most texts in one request (a larger request gets 413)."""
    max_tokens: int = 4096
    """Most tokens in one text (a longer text gets 413)."""
    max_length: int = 1024
    """Scoring window: a (prompt, response) longer than this loses its oldest prompt tokens, a query its
    oldest tokens (the reward is read at the last token)."""
    batch_tokens: int = 16384
    """Most padded tokens in one forward pass."""
    batch_wait_ms: float = 5.0
    """How long a request waits for others to be batched with it (0: score each request alone)."""
    request_timeout: float = 120.0
    """Seconds a request may wait for its rewards before it gets a 503."""

    def resolve(self) -> ServeRewardConfig:
        if not self.model:
            raise ConfigError("serve reward: --model RUN/final is required")
        self.resolve_server("serve reward")
        return self


# ---------------------------------------------------------------------------------------------
# scoring: token sequences in, rewards out, in token-budgeted batches


class Scorer:
    """The reward model and its tokenizer; scores encoded sequences one forward pass at a time."""

    def __init__(self, cfg: ServeRewardConfig):
        self.cfg = cfg
        self.model, self.tokenizer = load_reward_model(cfg.model)
        if self.model.num_labels != 1:
            raise ConfigError(f"serve reward: {cfg.model} has {self.model.num_labels} labels; a scalar reward model "
                              "(num_labels 1) is needed")
        self.accelerator = make_accelerator(cfg)
        place(self.model, self.accelerator.device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        path = os.path.join(cfg.model, "ood.pt")
        self.ood = OODDetector.load(path) if os.path.isfile(path) else None
        self.lock = threading.Lock()

    def encode_query(self, text: str) -> tuple[list[int], int, int]:
        """A full text as it is: (token ids in the scoring window, the count read as the response for
        OOD: all of them, the text's length in tokens)."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        kept = ids[-self.cfg.max_length:]
        return kept, len(kept), len(ids)

    def encode_pair(self, prompt: list[dict], response: str) -> tuple[list[int], int, int]:
        """(prompt, response) exactly as ``rm score`` encodes it: (ids, response tokens, total tokens)."""
        return encode_pair(self.tokenizer, prompt, response, self.cfg.max_length)

    def score(self, seqs: list[list[int]], n_response: list[int], features: bool) -> tuple[list[float], list | None]:
        """Rewards (and OOD flags when asked and the model has a detector) for encoded sequences."""
        batches = length_batches([len(s) for s in seqs], token_budget=self.cfg.batch_tokens)
        want = features and self.ood is not None
        with self.lock, self.accelerator.autocast():
            out = read_sequences(self.model, seqs, n_response, self.tokenizer.pad_token_id, batches,
                                 read_reward_and_features if want else read_reward)
        return out[0].tolist(), (self.ood.flag(out[1]).tolist() if want else None)


@dataclass
class Pending:
    seqs: list[list[int]]
    n_response: list[int]
    features: bool
    future: asyncio.Future


class Batcher:
    """Dynamic batching: when a request arrives, the requests that arrive within the next ``wait``
    seconds join it (up to ``budget`` tokens in all), and all their texts are scored together in a
    worker thread. ``wait = 0`` scores each request alone. (Draining the queue after a sleep, rather
    than ``wait_for(queue.get())``, cannot lose a request to a timeout race.)"""

    def __init__(self, scorer: Scorer, wait: float, budget: int):
        self.scorer, self.wait, self.budget = scorer, wait, budget
        self.queue: asyncio.Queue[Pending] = asyncio.Queue()
        self.batches = 0  # forward groups run, for /health

    async def submit(self, seqs, n_response, features: bool):
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(Pending(seqs, n_response, features, future))
        return await future

    async def run(self) -> None:
        while True:
            group = [await self.queue.get()]
            tokens = sum(map(len, group[0].seqs))
            if self.wait > 0:  # let the requests arriving meanwhile join, up to the token budget
                await asyncio.sleep(self.wait)
                while tokens < self.budget and not self.queue.empty():
                    group.append(self.queue.get_nowait())
                    tokens += sum(map(len, group[-1].seqs))
            group = [p for p in group if not p.future.done()]  # a request that timed out is not scored
            if not group:
                continue
            seqs = [s for p in group for s in p.seqs]
            n_response = [n for p in group for n in p.n_response]
            features = any(p.features for p in group)
            try:
                rewards, ood = await asyncio.to_thread(self.scorer.score, seqs, n_response, features)
            except Exception as e:  # noqa: BLE001 - every waiting client gets the error, the loop goes on
                for p in group:
                    if not p.future.done():
                        p.future.set_exception(e)
                continue
            self.batches += 1
            start = 0
            for p in group:
                end = start + len(p.seqs)
                if not p.future.done():
                    p.future.set_result((rewards[start:end], ood[start:end] if ood is not None and p.features else None))
                start = end


# ---------------------------------------------------------------------------------------------
# the app


if FastAPI is not None:

    class GetRewardRequest(BaseModel):
        """OpenRLHF's remote reward request."""

        query: list[str] = Field(min_length=1, description="full texts: prompt and response as one string each")
        prompts: list[str] | None = Field(default=None, description="the prompts (accepted, not needed)")
        labels: list | None = Field(default=None, description="labels (accepted, not needed)")

        @field_validator("query")
        @classmethod
        def no_nul(cls, v: list[str]) -> list[str]:
            if any(not t for t in v):
                raise ValueError("a query is empty: there is nothing to score")
            return [clean_text(t) for t in v]

    class ScoreRequest(BaseModel):
        """Prompts (text or chat messages) and responses, as a batch or as one pair."""

        model_config = ConfigDict(extra="forbid")
        prompts: list[str | list[Message]] | None = None
        responses: list[str] | None = None
        meta: list[dict] | None = None
        prompt: str | list[Message] | None = None
        response: str | None = None

        @field_validator("responses", "response")
        @classmethod
        def no_nul(cls, v):
            if v is None:
                return v
            return [clean_text(t) for t in v] if isinstance(v, list) else clean_text(v)

        @field_validator("prompts", "prompt")
        @classmethod
        def no_nul_prompt(cls, v):
            if isinstance(v, str):
                return clean_text(v)
            if isinstance(v, list):
                return [clean_text(p) if isinstance(p, str) else p for p in v]
            return v

        def pairs(self) -> tuple[list[list[dict]], list[str]]:
            if self.prompts is not None or self.responses is not None:
                if self.prompt is not None or self.response is not None:
                    raise ValueError("give either prompts/responses (a batch) or prompt/response (one pair), not both")
                if not self.prompts or not self.responses:
                    raise ValueError("prompts and responses must be non-empty lists")
                if len(self.prompts) != len(self.responses):
                    raise ValueError(f"{len(self.prompts)} prompts but {len(self.responses)} responses")
                prompts = self.prompts
                responses = self.responses
            elif self.prompt is not None and self.response is not None:
                prompts, responses = [self.prompt], [self.response]
            else:
                raise ValueError("expected prompts and responses (lists), or prompt and response")
            return [as_messages(p) for p in prompts], responses


def as_messages(prompt) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not prompt:
        raise ValueError("a prompt is an empty list of messages")
    return [m.model_dump() for m in prompt]


def create_app(cfg: ServeRewardConfig, scorer: Scorer | None = None) -> FastAPI:
    """The FastAPI app (the scorer is loaded here unless given)."""
    cfg.resolve()
    scorer = scorer or Scorer(cfg)
    batcher = Batcher(scorer, cfg.batch_wait_ms / 1000.0, cfg.batch_tokens)
    started = time.time()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()

    app = FastAPI(title="rlhfkit reward server", lifespan=lifespan,
                  description="OpenRLHF's /get_reward and rlhfkit's /v1/score on one reward model.")

    authorised = bearer(cfg.token)
    reject_bad_values(app)
    limit_body(app, cfg.max_body_mb)

    def check_limits(texts: list[str]) -> None:
        if len(texts) > cfg.max_texts:
            raise HTTPException(413, f"{len(texts)} texts in one request; the limit is {cfg.max_texts}")

    def check_tokens(encoded: list[tuple[list[int], int, int]]) -> None:
        for i, (_, _, n) in enumerate(encoded):
            if n > cfg.max_tokens:
                raise HTTPException(413, f"text {i} has {n} tokens; the limit is {cfg.max_tokens}")

    async def rewards_of(seqs, n_response, features: bool):
        try:
            return await asyncio.wait_for(batcher.submit(seqs, n_response, features), cfg.request_timeout)
        except TimeoutError:
            raise HTTPException(503, f"scoring took longer than {cfg.request_timeout} s; try again") from None

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": cfg.model, "ood_detector": scorer.ood is not None,
                "max_texts": cfg.max_texts, "max_tokens": cfg.max_tokens, "batches": batcher.batches,
                "uptime_s": round(time.time() - started, 1)}

    @app.post("/get_reward", dependencies=[Depends(authorised)])
    async def get_reward(body: GetRewardRequest):
        check_limits(body.query)
        encoded = await asyncio.to_thread(lambda: [scorer.encode_query(t) for t in body.query])
        check_tokens(encoded)
        rewards, _ = await rewards_of([e[0] for e in encoded], [e[1] for e in encoded], False)
        return {"rewards": rewards, "scores": rewards, "extra_logs": {}}

    @app.post("/v1/score", dependencies=[Depends(authorised)])
    async def v1_score(body: ScoreRequest):
        prompts, responses = body.pairs()
        check_limits(responses)
        encoded = await asyncio.to_thread(lambda: [scorer.encode_pair(p, r) for p, r in zip(prompts, responses)])
        check_tokens(encoded)
        rewards, ood = await rewards_of([e[0] for e in encoded], [e[1] for e in encoded], True)
        return {"rewards": rewards, **({"ood": ood} if ood is not None else {})}

    return app


def run(cfg: ServeRewardConfig) -> None:
    """Load the model and serve until interrupted."""
    import uvicorn  # the serve extra

    app = create_app(cfg)
    print(f"serving {cfg.model} on http://{cfg.host}:{cfg.port} (POST /get_reward, POST /v1/score, GET /health)",
          flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")


__all__ = ["Batcher", "Scorer", "ServeRewardConfig", "create_app", "run"]
