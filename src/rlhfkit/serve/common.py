"""What the model servers share beyond :mod:`rlhfkit.web`: the chat message of a request body."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator

from rlhfkit.web import clean_text


class Message(BaseModel):
    """A chat message in a request body (other keys a client sends, such as OpenAI's ``name``, are ignored)."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str

    @field_validator("content")
    @classmethod
    def no_nul(cls, v: str) -> str:
        return clean_text(v)
