"""The gateway's view of one model deployment: its handle and what it currently serves."""

from __future__ import annotations

import asyncio
import logging
import time

from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from serve_app.embeddings.contract import EmbeddingBatch, ModelInfo, ModelLoadError, RerankBatch
from serve_app.errors import ServiceUnavailableError

logger = logging.getLogger(__name__)


class ModelClient:
    """Calls a model deployment; keeps its info (version, dims) fresh for cache keys."""

    def __init__(
        self,
        name: str,
        handle: DeploymentHandle,
        *,
        refresh_s: float,
        timeout_s: float,
        info_timeout_s: float = 10.0,
        lane: str = "interactive",
    ) -> None:
        self.name = name
        self.lane = lane  # "background" for job chunks: the pinned replicas run them when no one waits
        self.handle = handle
        self.refresh_s = refresh_s
        self.timeout_s = timeout_s
        self.info_timeout_s = info_timeout_s  # an on-demand model loads on its first info call: longer
        self._info: ModelInfo | None = None
        self._last_info: ModelInfo | None = None  # kept through forget_info(), for listings
        self._info_at = 0.0
        self._refreshing = asyncio.Lock()

    async def info(self, *, refresh: bool = False) -> ModelInfo:
        """What the model serves now; cached for `refresh_s` unless refresh is asked.

        One call refreshes at a time; requests arriving meanwhile share its answer.
        """
        asked_at = time.monotonic()
        if not refresh and self._info is not None and asked_at - self._info_at <= self.refresh_s:
            return self._info
        async with self._refreshing:
            if self._info is None or self._info_at < asked_at:
                self._info = await self._call("info", timeout_s=min(self.timeout_s, self.info_timeout_s))
                self._info_at = time.monotonic()
            return self._info

    @property
    def last_info(self) -> ModelInfo | None:
        """The last answer to info(), however old (None before the first)."""
        return self._info or self._last_info

    def forget_info(self) -> None:
        self._last_info = self._info or self._last_info
        self._info = None

    async def embed(self, texts: list[str]) -> EmbeddingBatch:
        return await self._call("embed", texts, timeout_s=self.timeout_s, lane=self.lane)

    async def rerank(self, query: str, documents: list[str]) -> RerankBatch:
        return await self._call("rerank", query, documents, timeout_s=self.timeout_s, lane=self.lane)

    async def _call(self, method: str, *args: object, timeout_s: float, **kwargs: object):
        """Both methods are pure: a call whose replica died under it (its node lost or cut off) is made
        once more, within the same time budget, and Serve routes it to a replica that lives."""
        try:
            async with asyncio.timeout(timeout_s):
                try:
                    return await getattr(self.handle, method).remote(*args, **kwargs)
                except RayActorError as exc:
                    logger.warning("model %s.%s: its replica died (%s); trying another", self.name, method, exc)
                    return await getattr(self.handle, method).remote(*args, **kwargs)
        except TimeoutError as exc:
            raise ServiceUnavailableError(
                f"model {self.name!r} did not answer within {timeout_s:g}s", service="model"
            ) from exc
        except ModelLoadError as exc:  # the pool could not load the version (Ray re-raises it as its cause)
            reason = getattr(exc, "cause", None) or exc
            raise ServiceUnavailableError(str(reason.args[0]) if reason.args else str(reason), service="model") from exc
        except Exception as exc:  # any failure of the remote replica is the model being unavailable
            logger.warning("model %s.%s failed: %r", self.name, method, exc)
            raise ServiceUnavailableError(
                f"model {self.name!r} is unavailable: {type(exc).__name__}", service="model"
            ) from exc
