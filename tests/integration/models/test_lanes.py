"""Job chunks reach the pinned model in the background lane, people's requests in the interactive one.

The replica's batcher (deployments/batcher.py) runs background batches only while no interactive
request waits; its queue-wait histogram, exported through Ray's metrics, says which lane each
request came in. The ordering itself is unit-tested (tests/unit/deployments/test_batcher.py).
"""

import re
import time
import urllib.request

from tests.integration.helpers import MODEL, submit, texts, wait_for


def requests_by_lane(settings) -> dict[str, float]:
    """Requests the default model's replicas have queued, by lane, from the head node's metrics."""
    url = f"http://127.0.0.1:{settings.ray_metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    counts: dict[str, float] = {}
    for match in re.finditer(r"^ray_embedding_queue_wait_seconds_count\{([^}]*)\} (\S+)$", text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        if labels.get("model") == MODEL:
            counts[labels["lane"]] = counts.get(labels["lane"], 0.0) + float(match.group(2))
    return counts


def test_job_chunks_go_in_the_background_lane_and_requests_in_the_interactive_one(settings, api):
    before = requests_by_lane(settings)
    response = api.post("/v1/embeddings", json={"model": MODEL, "input": texts(3, "interactive")})
    assert response.status_code == 200, response.text
    job = submit(api, input=texts(40, "background")).json()
    assert wait_for(api, job["id"])["status"] == "succeeded"

    def grew(lane: str, after: dict[str, float]) -> bool:
        return after.get(lane, 0.0) >= before.get(lane, 0.0) + 1

    deadline = time.monotonic() + 30  # Ray exports metrics every few seconds
    while not (grew("interactive", after := requests_by_lane(settings)) and grew("background", after)):
        assert time.monotonic() < deadline, f"lanes before {before}, after {after}"
        time.sleep(1)
