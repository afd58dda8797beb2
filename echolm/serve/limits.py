"""`Limits`: what one request to the server may ask for. Apart from the pydantic schemas
(echolm/serve/schemas.py, which re-exports it) so that `echolm --help` and every other command
build their parser (`echolm serve`'s flags come from these fields) without importing pydantic."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Limits:
    """What one request may ask for, and how much the server takes on at once."""

    max_body_bytes: int = 1_000_000  # largest request body in bytes (413 above)
    max_messages: int = 64  # messages per chat request
    max_prompt_tokens: int = 8192  # prompt tokens (also capped by the model's context)
    max_tokens: int = 1024  # the most tokens a request may ask for (it also ends at the context)
    max_n: int = 8  # choices per request (and prompts x choices for /v1/completions)
    max_concurrent: int = 64  # requests in flight (429 above)
    max_batch: int = 64  # rows decoded together (more wait for a free row)

    def validate(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"limit {name} must be a positive integer, got {value!r}")
        if self.max_n > self.max_batch:
            raise ValueError(f"max_n ({self.max_n}) must not exceed max_batch "
                             f"({self.max_batch})")
