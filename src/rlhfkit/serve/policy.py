"""``rlhfkit serve policy --model RUN/final``: a policy behind the OpenAI chat API (FastAPI + uvicorn,
the ``serve`` extra), generating through the rollout engine.

* ``POST /v1/chat/completions`` with ``messages``, ``n``, ``temperature`` (0: greedy), ``top_p``,
  ``max_tokens``, ``stop``, ``logprobs``, ``seed`` and ``stream`` (server-sent events, one event per
  sampled token as the engine draws it, then ``data: [DONE]``);
* ``GET /v1/models``: the one model served.

The prompt is rendered with the model's chat template, as in training. ``logprobs`` are the engine's
logprobs of the sampled tokens at the request's temperature (what the RL stages train on);
``top_logprobs`` is not offered. A stop string ends its choice where it first appears (the text
before it is returned, ``finish_reason: stop``). Requests are generated one at a time, each with
its ``n`` choices as one batch. The OpenAI Python client, rlhfkit's ``--judge-url`` and ``eval
policy --judge-url`` work against it. On a GPU, ``vllm serve`` on an exported Hugging Face folder is
the faster path.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Literal

import torch

from rlhfkit.data.template import encode_prompt
from rlhfkit.platform.placement import make_accelerator
from rlhfkit.rollout.engine import SamplingParams, load_engine
from rlhfkit.serve.args import ServerArgs

try:  # the serve extra
    from fastapi import Depends, FastAPI, HTTPException
    from fastapi.responses import StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field

    from rlhfkit.serve.common import Message
    from rlhfkit.web import bearer, limit_body, reject_bad_values
except ImportError:  # pragma: no cover - exercised only without the extra
    FastAPI = None


@dataclass
class ServePolicyConfig(ServerArgs):
    """Serve a policy over the OpenAI chat-completions API (POST /v1/chat/completions, GET /v1/models)."""

    model: str = "smollm2-135m-instruct"
    """The policy: a run's final/ folder, the bundled model, or any folder rlhfkit loads."""
    name: str = ""
    """The model id clients see in /v1/models and send as "model" ('' : the folder's name)."""
    port: int = 8001
    """Port to listen on."""
    rollout: Literal["hf"] = "hf"
    """Rollout engine that generates."""
    max_tokens: int = 512
    """Most new tokens one request may ask for (and the default when it asks for none)."""
    max_n: int = 8
    """Most choices one request may ask for."""
    max_length: int = 2048
    """Prompt plus completion tokens; a longer prompt gets 413."""
    max_body_mb: float = 16.0
    """Largest request body in MB (a larger one gets 413 before it is read)."""

    def resolve(self) -> ServePolicyConfig:
        self.resolve_server("serve policy")
        self.name = self.name or self.model.rstrip("/").split("/")[-1]
        if self.name == "final":
            self.name = self.model.rstrip("/").split("/")[-2]
        return self


class Generator:
    """The policy on its rollout engine; one generation at a time."""

    def __init__(self, cfg: ServePolicyConfig):
        self.accelerator = make_accelerator(cfg)
        self.engine, self.tokenizer = load_engine(cfg.rollout, cfg.model, self.accelerator.device)
        self.lock = threading.Lock()

    def generate(self, prompt_ids: list[int], n: int, params: SamplingParams, seed: int | None, on_token=None):
        g = torch.Generator().manual_seed(seed if seed is not None else int(time.time_ns() % 2**62))
        with self.lock, self.accelerator.autocast():
            return self.engine.generate([prompt_ids] * n, params, g, on_token=on_token)


class Choice:
    """One choice's text as its tokens arrive: decoded whole each time (so multi-byte characters split
    over tokens come out right), cut at the first stop string."""

    def __init__(self, tokenizer, stop: list[str], eos_id: int):
        self.tokenizer, self.stop, self.eos_id = tokenizer, stop, eos_id
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.text, self.sent, self.finish = "", 0, None

    def add(self, token: int, logprob: float) -> str:
        """Take one token; returns the new text it makes final (maybe empty)."""
        if self.finish is not None:
            return ""
        if token == self.eos_id:
            self.finish = "stop"
            return self.flush()
        self.ids.append(token)
        self.logprobs.append(logprob)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.stop:
            at = self.text.find(s)
            if at >= 0:
                self.text, self.finish = self.text[:at], "stop"
                return self.flush()
        hold = max((len(s) - 1 for s in self.stop), default=0)  # a stop string may be starting
        safe = len(self.text) - hold
        if self.text.endswith("\ufffd"):  # an incomplete multi-byte character
            safe = min(safe, len(self.text) - 1)
        new, self.sent = self.text[self.sent: max(safe, self.sent)], max(safe, self.sent)
        return new

    def flush(self) -> str:
        new, self.sent = self.text[self.sent:], len(self.text)
        return new

    def end(self) -> str:
        """The sampler stopped (max tokens): what is left to send."""
        if self.finish is None:
            self.finish = "length"
        return self.flush()

    def token_logprobs(self, start: int = 0) -> list[dict]:
        """OpenAI's logprobs entries of the tokens from ``start`` on."""
        out = []
        for t, lp in zip(self.ids[start:], self.logprobs[start:]):
            piece = self.tokenizer.decode([t])
            out.append({"token": piece, "logprob": lp, "bytes": list(piece.encode()), "top_logprobs": []})
        return out


if FastAPI is not None:

    class ChatRequest(BaseModel):
        """The OpenAI chat-completions request (fields this server does not use are ignored)."""

        model_config = ConfigDict(extra="ignore")
        model: str | None = None
        messages: list[Message] = Field(min_length=1)
        temperature: float = Field(1.0, ge=0.0, le=2.0)
        top_p: float = Field(1.0, gt=0.0, le=1.0)
        max_tokens: int | None = Field(None, ge=1)
        max_completion_tokens: int | None = Field(None, ge=1)
        n: int = Field(1, ge=1)
        stop: str | list[str] | None = None
        stream: bool = False
        logprobs: bool = False
        top_logprobs: int | None = Field(None, ge=0)
        seed: int | None = None

        def stops(self) -> list[str]:
            stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
            if len(stops) > 4 or any(not s for s in stops):
                raise ValueError("stop: at most 4 non-empty strings")
            return stops


def create_app(cfg: ServePolicyConfig, generator: Generator | None = None) -> FastAPI:
    cfg.resolve()
    gen = generator or Generator(cfg)
    tok = gen.tokenizer
    app = FastAPI(title="rlhfkit policy server", description="The OpenAI chat-completions API on one policy.")
    reject_bad_values(app)
    limit_body(app, cfg.max_body_mb)
    authorised = [Depends(bearer(cfg.token))]

    @app.get("/v1/models", dependencies=authorised)
    async def models():
        return {"object": "list", "data": [{"id": cfg.name, "object": "model", "owned_by": "rlhfkit",
                                            "created": 0}]}

    @app.post("/v1/chat/completions", dependencies=authorised)
    async def chat(body: ChatRequest):
        if body.model not in (None, "", cfg.name):
            raise HTTPException(404, f"model {body.model!r} is not served here; this server serves {cfg.name!r}")
        if body.n > cfg.max_n:
            raise HTTPException(422, f"n = {body.n}; this server allows at most {cfg.max_n}")
        if body.top_logprobs:
            raise HTTPException(422, "top_logprobs is not offered: logprobs gives each sampled token's logprob")
        want = body.max_completion_tokens or body.max_tokens or cfg.max_tokens
        if want > cfg.max_tokens:
            raise HTTPException(422, f"max_tokens = {want}; this server allows at most {cfg.max_tokens}")
        stops = body.stops()
        prompt = encode_prompt(tok, [m.model_dump() for m in body.messages])
        if len(prompt) + want > cfg.max_length:
            raise HTTPException(413, f"the prompt has {len(prompt)} tokens; with max_tokens {want} that exceeds "
                                     f"the limit of {cfg.max_length}")
        params = SamplingParams(tok.pad_token_id, tok.eos_token_id, max_new_tokens=want, temperature=body.temperature,
                                top_p=body.top_p)
        choices = [Choice(tok, stops, tok.eos_token_id) for _ in range(body.n)]
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not body.stream:
            ro = await asyncio.to_thread(gen.generate, prompt, body.n, params, body.seed)
            for c, ids, lps, mask in zip(choices, ro.response_ids.tolist(), ro.logprobs.tolist(), ro.response_mask.tolist()):
                for t, lp, m in zip(ids, lps, mask):
                    if m:
                        c.add(t, lp)
                c.end()
            completion = sum(len(c.ids) for c in choices)
            return {"id": cid, "object": "chat.completion", "created": created, "model": cfg.name,
                    "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                                 "finish_reason": c.finish,
                                 "logprobs": {"content": c.token_logprobs()} if body.logprobs else None}
                                for i, c in enumerate(choices)],
                    "usage": {"prompt_tokens": len(prompt), "completion_tokens": completion,
                              "total_tokens": len(prompt) + completion}}
        return StreamingResponse(stream(cid, created, body, prompt, params, choices), media_type="text/event-stream")

    async def stream(cid, created, body, prompt, params, choices):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def on_token(tokens, logps, live):
            loop.call_soon_threadsafe(queue.put_nowait, (tokens.tolist(), logps.tolist(), live.tolist()))

        def chunk(index: int, delta: dict, finish=None, logprobs=None) -> str:
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
            return "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                          "model": cfg.name, "choices": [choice]}) + "\n\n"

        for i in range(len(choices)):
            yield chunk(i, {"role": "assistant", "content": ""})
        task = asyncio.ensure_future(asyncio.to_thread(gen.generate, prompt, body.n, params, body.seed, on_token))
        task.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, None))
        while (item := await queue.get()) is not None:
            for i, (t, lp, live) in enumerate(zip(*item)):
                if live:
                    before = len(choices[i].ids)
                    text = choices[i].add(t, lp)
                    logprobs = {"content": choices[i].token_logprobs(before)} if body.logprobs else None
                    if text or (logprobs and logprobs["content"]):
                        yield chunk(i, {"content": text}, logprobs=logprobs)
        await task  # raises here if generation failed
        for i, c in enumerate(choices):
            rest = c.end()
            if rest:
                yield chunk(i, {"content": rest})
            yield chunk(i, {}, finish=c.finish)
        yield "data: [DONE]\n\n"

    return app


def run(cfg: ServePolicyConfig) -> None:
    """Load the policy and serve until interrupted."""
    import uvicorn  # the serve extra

    app = create_app(cfg)
    print(f"serving {cfg.model} as {cfg.name!r} on http://{cfg.host}:{cfg.port}/v1 (POST /v1/chat/completions, "
          f"GET /v1/models)", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")


__all__ = ["Choice", "Generator", "ServePolicyConfig", "create_app", "run"]
