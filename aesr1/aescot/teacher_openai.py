"""The OpenAI-compatible teacher: any chat-completions endpoint critiques the image, given its score band.

The image goes inline (downscaled to ``max_image_side`` and the pixel budget), with bounded
retries with exponential backoff and jitter (or the server's ``Retry-After``), optional
requests- and tokens-per-minute pacing, a content-keyed on-disk cache and token/cost
accounting (failed attempts included). A refusal or a truncated answer fails the sample
with its reason instead of being retried. The API key comes from an environment variable
and is never logged or stored.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import hashlib
import io
import json
import os
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from PIL import Image

from aesr1.aescot.critique import Critique
from aesr1.config import config
from aesr1.errors import AesError
from aesr1.images import MAX_PIXELS, downscale, load_image
from aesr1.prompts import prompt_id, template

BAND_DESCRIPTIONS = {
    "bad": "weak: it is in the lower part of the range",
    "fair": "middling: it is in the middle of the range",
    "good": "strong: it is in the upper part of the range",
}


@config
class OpenAITeacherConfig:
    """Params ``distill.teacher`` with ``kind: openai``: any OpenAI-compatible chat-completions endpoint."""

    kind: Literal["openai"] = "openai"
    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4.1"
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    timeout_s: float = 60.0
    max_retries: int = 5
    backoff_base_s: float = 1.0
    backoff_max_s: float = 30.0
    max_tokens: int = 400
    temperature: float = 0.7
    price_input_per_mtok: float | None = None  # USD per million prompt tokens, for the cost metric
    price_output_per_mtok: float | None = None
    cache_dir: str = "data/teacher_cache"
    requests_per_minute: float | None = None  # the endpoint's rate tier, retries included; None: unlimited
    tokens_per_minute: float | None = None  # prompt + completion tokens; None: unlimited
    max_image_side: int | None = 1024  # longer images are downscaled before upload; None: no side limit


class _Retryable(Exception):
    def __init__(self, message: str, wait_s: float | None = None):
        super().__init__(message)
        self.wait_s = wait_s  # the server's Retry-After, if it sent one


class _Failed(Exception):
    """An answer that a retry would not fix (a refusal, a truncation): the sample fails with this reason."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


@dataclass
class _Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0
    retries: int = 0
    cache_hits: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)


class _Pace:
    """Starts at most ``per_minute`` units a minute, evenly spaced; ``None`` is unlimited.

    No burst, so an endpoint that enforces its limit per second is not tripped either.
    Reservations are taken before a request and corrected with what it used; the event
    loop is single-threaded, so no lock is needed.
    """

    def __init__(self, per_minute: float | None):
        self.seconds_per_unit = 60 / per_minute if per_minute else 0.0
        self.next_at = 0.0

    def reserve(self, units: float) -> float:
        """Reserve ``units``; return the seconds to wait before using them."""
        now = time.monotonic()
        start = max(now, self.next_at)
        self.next_at = start + units * self.seconds_per_unit
        return start - now

    def refund(self, units: float) -> None:
        """Return unused units (negative: charge units used beyond the reservation)."""
        self.next_at -= units * self.seconds_per_unit


def retry_after(headers) -> float | None:
    """Seconds the server asks to wait: ``retry-after-ms``, or ``retry-after`` in seconds or as an HTTP date."""
    try:
        return max(0.0, float(headers["retry-after-ms"]) / 1000)
    except (KeyError, ValueError):
        pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # HTTP dates are GMT
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def upload_bytes(data: bytes, max_side: int | None, max_pixels: int | None) -> bytes:
    """The image bytes to upload: as they are if within the budget, else an upright JPEG within it.

    A 12 MP photo overflows the context of a served VLM (a 400, not retried); EXIF rotation
    is applied first (:func:`aesr1.images.load_image`), since re-encoding drops it.
    """
    with Image.open(io.BytesIO(data)) as img:
        width, height = img.size
    if (max_side is None or max(width, height) <= max_side) and (max_pixels is None or width * height <= max_pixels):
        return data
    small = downscale(load_image(io.BytesIO(data)), max_pixels, max_side)
    out = io.BytesIO()
    small.save(out, "JPEG", quality=90)
    return out.getvalue()


class OpenAITeacher:
    """Chat-completions teacher with retries, pacing, a content-keyed cache and usage accounting."""

    name = "openai"

    def __init__(self, cfg: OpenAITeacherConfig, max_pixels: int | None = MAX_PIXELS):
        self.cfg = cfg
        self.max_pixels = max_pixels  # the policy's pixel budget (backbone.max_pixels): the teacher sees what it sees
        self.api_key = os.environ.get(cfg.api_key_env)
        if not self.api_key:
            raise AesError(f"teacher.kind 'openai' needs an API key in the environment variable "
                           f"{cfg.api_key_env} (the variable's name is set by distill.teacher.api_key_env)")
        self.cache_dir = Path(cfg.cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.system = template("teacher_system.txt")
        self.user = template("teacher_user.txt")
        self.prompt_id = prompt_id("teacher_system.txt", "teacher_user.txt")
        self.teacher_id = f"openai:{cfg.model}"
        self.totals = _Usage()
        self.request_pace = _Pace(cfg.requests_per_minute)
        self.token_pace = _Pace(cfg.tokens_per_minute)
        self.prompt_tokens_seen = 0  # the largest prompt so far: the token reservation's estimate

    def cache_key(self, image_bytes: bytes, band: str) -> str:
        digest = hashlib.sha256()
        for part in (image_bytes, self.prompt_id.encode(), self.cfg.model.encode(), band.encode()):
            digest.update(hashlib.sha256(part).digest())
        return digest.hexdigest()

    def _messages(self, image_bytes: bytes, band: str) -> list[dict]:
        mime = "image/png" if image_bytes[:4] == b"\x89PNG" else "image/jpeg"
        url = f"data:{mime};base64,{base64.b64encode(image_bytes).decode()}"
        return [
            {"role": "system", "content": self.system},
            {"role": "user", "content": [
                {"type": "text", "text": self.user.format(band_description=BAND_DESCRIPTIONS[band])},
                {"type": "image_url", "image_url": {"url": url}},
            ]},
        ]

    def _backoff(self, attempt: int) -> float:
        # full jitter: uniform in [0, min(max, base * 2^attempt)]
        return random.uniform(0, min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * 2**attempt))

    def _count_error(self, kind: str) -> None:
        self.totals.errors_by_kind[kind] = self.totals.errors_by_kind.get(kind, 0) + 1

    def _charge(self, critique: Critique, payload) -> int:
        """Add an answer's token usage to the sample's and the run's totals (failed attempts too)."""
        usage = payload.get("usage") if isinstance(payload, dict) else None
        try:
            prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        except (AttributeError, TypeError, ValueError):  # no usage, or not numbers
            return 0
        critique.prompt_tokens += prompt
        critique.completion_tokens += completion
        self.totals.prompt_tokens += prompt
        self.totals.completion_tokens += completion
        self.prompt_tokens_seen = max(self.prompt_tokens_seen, prompt)
        return prompt + completion

    def _answer(self, payload) -> str:
        """The critique in a 200 answer; raises _Failed for a refusal or a truncation, _Retryable if malformed."""
        try:
            choice = payload["choices"][0]
            message = choice["message"]
        except (KeyError, IndexError, TypeError) as err:
            raise _Retryable(f"malformed response ({type(err).__name__})") from None
        if not isinstance(message, dict):
            raise _Retryable("malformed response (message is not an object)")
        finish = choice.get("finish_reason")
        if message.get("refusal") or ("content" in message and message["content"] is None) \
                or finish == "content_filter":
            raise _Failed("refused", f"refused: {message.get('refusal') or f'no content (finish_reason {finish})'}")
        if finish == "length":
            raise _Failed("truncated", f"truncated: the answer hit max_tokens={self.cfg.max_tokens}")
        text = message.get("content")
        if not isinstance(text, str) or not text.strip():
            raise _Retryable("malformed response (empty content)")
        return text.strip()

    async def _ask(self, client, key: str, image_path: str, band: str) -> Critique:
        import httpx

        try:
            image_bytes = await asyncio.to_thread(upload_bytes, Path(image_path).read_bytes(), self.cfg.max_image_side,
                                                    self.max_pixels)
        except OSError as err:  # missing or not an image (PIL's UnidentifiedImageError is an OSError)
            self._count_error("unreadable image")
            return Critique(key, error=f"unreadable image: {err}")
        cache_file = self.cache_dir / f"{self.cache_key(image_bytes, band)}.json"
        if cache_file.is_file():
            hit = json.loads(cache_file.read_text())
            self.totals.cache_hits += 1
            return Critique(key, hit["text"], cached=True)
        body = {"model": self.cfg.model, "messages": self._messages(image_bytes, band),
                "max_tokens": self.cfg.max_tokens, "temperature": self.cfg.temperature}
        critique = Critique(key)
        last_error, wait_s = "no attempt made", 0.0
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                self.totals.retries += 1
                await asyncio.sleep(wait_s)
            estimate = self.prompt_tokens_seen + self.cfg.max_tokens
            await asyncio.sleep(max(self.request_pace.reserve(1), self.token_pace.reserve(estimate)))
            critique.attempts = attempt + 1
            used = 0
            try:
                self.totals.requests += 1
                response = await client.post("/chat/completions", json=body)
                try:
                    payload = response.json()
                except ValueError:
                    payload = None
                used = self._charge(critique, payload)
                if response.status_code == 429 or response.status_code >= 500:
                    raise _Retryable(f"HTTP {response.status_code}", retry_after(response.headers))
                if response.status_code >= 400:  # a client error will not fix itself
                    self._count_error(f"HTTP {response.status_code}")
                    critique.error = f"HTTP {response.status_code}: {response.text[:200]}"
                    return critique
                if payload is None:
                    raise _Retryable("malformed response (JSONDecodeError)")
                critique.text = self._answer(payload)
                tmp = cache_file.with_suffix(".tmp")
                tmp.write_text(json.dumps({"text": critique.text, "model": self.cfg.model,
                                           "prompt": self.prompt_id, "usage": payload.get("usage") or {}}))
                tmp.replace(cache_file)  # atomic: a killed run never leaves half a cache entry
                return critique
            except _Failed as err:
                self._count_error(err.kind)
                critique.error = str(err)
                return critique
            except _Retryable as err:
                last_error = str(err)
                wait_s = err.wait_s if err.wait_s is not None else self._backoff(attempt)
            except httpx.TimeoutException:
                last_error, wait_s = "timeout", self._backoff(attempt)
            except httpx.TransportError as err:
                last_error, wait_s = f"connection error ({type(err).__name__})", self._backoff(attempt)
            finally:
                self.token_pace.refund(estimate - used)
            self._count_error(last_error.split(" (")[0])
        critique.error = f"gave up after {self.cfg.max_retries + 1} attempts: {last_error}"
        return critique

    async def _run(self, items: list[tuple[str, str, str]]) -> list[Critique]:
        import httpx

        semaphore = asyncio.Semaphore(max(1, self.cfg.concurrency))
        headers = {"Authorization": f"Bearer {self.api_key}"}
        limits = httpx.Limits(max_connections=max(1, self.cfg.concurrency))
        async with httpx.AsyncClient(base_url=self.cfg.base_url.rstrip("/"), headers=headers,
                                     timeout=self.cfg.timeout_s, limits=limits) as client:
            async def one(key, path, band):
                async with semaphore:
                    return await self._ask(client, key, path, band)
            return await asyncio.gather(*(one(*item) for item in items))

    def critique_many(self, items: list[tuple[str, str, str]]) -> list[Critique]:
        """Critique ``(key, image_path, band)`` items concurrently; failures come back with a reason."""
        return asyncio.run(self._run(items))

    def usage(self) -> dict:
        t = self.totals
        out = {"prompt_tokens": t.prompt_tokens, "completion_tokens": t.completion_tokens,
               "requests": t.requests, "retries": t.retries, "cache_hits": t.cache_hits,
               "errors_by_kind": dict(t.errors_by_kind)}
        if self.cfg.price_input_per_mtok is not None and self.cfg.price_output_per_mtok is not None:
            out["cost_usd"] = (t.prompt_tokens * self.cfg.price_input_per_mtok
                               + t.completion_tokens * self.cfg.price_output_per_mtok) / 1e6
        return out
