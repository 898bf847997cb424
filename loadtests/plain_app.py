"""What a user might run instead of a cluster: FastAPI + uvicorn with the model in-process.

uvicorn loadtests.plain_app:app --port 8001
"""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel

from cluster.seed import default_model_dir
from deployments.encoder import SentenceEncoder

encoder = SentenceEncoder(default_model_dir())
app = FastAPI()


class Body(BaseModel):
    model: str
    input: str | list[str]


@app.post("/v1/embeddings")
def embeddings(body: Body) -> dict:
    texts = [body.input] if isinstance(body.input, str) else body.input
    encoded = encoder.encode(texts)
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(encoded.vectors.tolist())],
        "model": body.model,
        "usage": {"prompt_tokens": sum(encoded.token_counts), "total_tokens": sum(encoded.token_counts)},
    }
