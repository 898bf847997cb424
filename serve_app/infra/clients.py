"""The clients one process holds (Redis behind its guard, MongoDB), made once from settings.

The gateway (serve_app/http/container.py) and the job worker (serve_app/jobs/worker.py) build
everything else on top of one of these, the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from serve_app.infra.mongo import mongo_client
from serve_app.infra.redis import GuardedRedis
from serve_app.settings import Settings


@dataclass
class Clients:
    settings: Settings
    redis: GuardedRedis
    mongo: AsyncMongoClient

    @classmethod
    def from_settings(cls, settings: Settings) -> Clients:
        return cls(settings, GuardedRedis.from_settings(settings), mongo_client(settings))

    @property
    def db(self) -> AsyncDatabase:
        return self.mongo[self.settings.mongo_db]

    async def close(self) -> None:
        try:
            await self.redis.close()
        finally:
            await self.mongo.close()
