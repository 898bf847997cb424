"""A client for big inputs: `python -m serve_app.jobs submit FILE --model M --wait`.

    python -m serve_app.jobs submit texts.jsonl --model all-minilm-l6-v2 --wait
    python -m serve_app.jobs submit reviews.csv --column body --model all-minilm-l6-v2 --wait
    python -m serve_app.jobs status JOB_ID
    python -m serve_app.jobs cancel JOB_ID
    python -m serve_app.jobs result JOB_ID [--out FILE]

`submit` uploads the file through the presigned form of POST /v1/uploads (straight to the object
store, not through the API), submits the job with an Idempotency-Key (a retried submit never makes
two jobs), and with `--wait` shows a progress bar fed by the job's progress, then writes the result
next to the input (`texts.embeddings.jsonl`: one JSON object per line, in input order).

Input: JSON lines (a JSON string, or an object with a "text" field, per line; `--column NAME` reads
that field instead), or CSV with a header (`--column NAME` names the column of texts).

Where and who: `--url` (default $INFER_API_URL, else http://127.0.0.1:8080); the API key from
$INFER_API_KEY, else `--key-file` (default: the local cluster's development key, .cluster/api-key).
The key is never taken on the command line, where other users of the machine could read it.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
import uuid
from pathlib import Path

import httpx
from tqdm import tqdm

from serve_app.settings import REPO_ROOT

TERMINAL = {"succeeded", "failed", "cancelled"}
POLL_S = 0.5


class ClientError(Exception):
    """Something the user can act on: the message says what went wrong."""


def api_error(response: httpx.Response) -> ClientError:
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:300]
    return ClientError(f"{response.request.method} {response.request.url.path}: {response.status_code}: {message}")


def read_texts(path: Path, column: str | None) -> bytes:
    """The file as the JSON lines /v1/uploads takes: a JSON string per line."""
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ClientError(f"{path}: {exc}") from exc
    texts: list[str] = []
    if path.suffix.lower() == ".csv":
        if not column:
            raise ClientError(f"{path} is CSV: name its column of texts with --column")
        reader = csv.DictReader(io.StringIO(raw))
        if column not in (reader.fieldnames or []):
            raise ClientError(f"{path} has no column {column!r}; it has {reader.fieldnames}")
        texts = [row[column] or "" for row in reader]
    else:
        # Lines end at "\n" only: JSON strings may hold U+2028 and the like, which str.splitlines() splits at.
        for number, line in enumerate(raw.split("\n"), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError as exc:
                raise ClientError(f"{path}:{number}: not JSON ({exc})") from exc
            field = column or "text"
            if isinstance(item, dict) and isinstance(item.get(field), str):
                texts.append(item[field])
            elif isinstance(item, str) and column is None:
                texts.append(item)
            else:
                raise ClientError(f"{path}:{number}: expected a JSON string or an object with a {field!r} string")
    if not texts:
        raise ClientError(f"{path} holds no texts")
    return "".join(json.dumps(text) + "\n" for text in texts).encode()


def api_key(key_file: Path | None) -> str:
    if key := os.environ.get("INFER_API_KEY"):
        return key
    path = key_file or Path(os.environ.get("INFER_STATE_DIR") or REPO_ROOT / ".cluster") / "api-key"
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise ClientError(f"no API key: set INFER_API_KEY or give --key-file ({path}: {exc.strerror})") from exc


class JobsClient:
    def __init__(self, url: str, key: str, timeout_s: float = 60.0) -> None:
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout_s)

    def close(self) -> None:
        self.http.close()

    def _json(self, response: httpx.Response) -> dict:
        if response.status_code >= 400:
            raise api_error(response)
        return response.json()

    def upload(self, payload: bytes, name: str) -> str:
        """Upload the texts through a presigned form; returns its upload id."""
        ticket = self._json(self.http.post("/v1/uploads"))
        if len(payload) > ticket["max_bytes"]:
            raise ClientError(f"{name}: {len(payload)} bytes of texts, over the store's limit of {ticket['max_bytes']}")
        # The store's own URL, signed: no API key goes there. httpx sends the fields before the file.
        stored = httpx.post(
            ticket["url"],
            data=ticket["fields"],
            files={ticket["file_field"]: (name, payload, "application/x-ndjson")},
            timeout=600,
        )
        if stored.status_code >= 300:
            raise ClientError(f"the object store refused the upload: {stored.status_code}: {stored.text[:300]}")
        return ticket["upload_id"]

    def submit(self, model: str, upload_id: str) -> dict:
        headers = {"Idempotency-Key": uuid.uuid4().hex}
        body = {"model": model, "upload_id": upload_id}
        for attempt in range(3):  # the same key: a retry after a lost answer gets the same job
            try:
                return self._json(self.http.post("/v1/jobs", json=body, headers=headers))
            except httpx.TransportError:
                if attempt == 2:
                    raise
                time.sleep(1 + attempt)
        raise AssertionError("unreachable")

    def status(self, job_id: str) -> dict:
        return self._json(self.http.get(f"/v1/jobs/{job_id}"))

    def cancel(self, job_id: str) -> dict:
        return self._json(self.http.delete(f"/v1/jobs/{job_id}"))

    def wait(self, job_id: str, show: bool = True) -> dict:
        """Poll the job until it ends, with a progress bar of its texts done."""
        job = self.status(job_id)
        with tqdm(total=job["progress"]["total"], unit="text", desc=job_id[:12], disable=not show) as bar:
            while True:
                bar.total = job["progress"]["total"]
                bar.update(job["progress"]["done"] - bar.n)
                bar.set_postfix_str(job["status"])
                if job["status"] in TERMINAL:
                    return job
                time.sleep(POLL_S)
                job = self.status(job_id)

    def save_result(self, job_id: str, out: Path) -> int:
        """The result as JSON lines at `out` (written to a temporary name, then moved); returns its lines."""
        result = self._json(self.http.get(f"/v1/jobs/{job_id}/result"))
        partial = out.with_name(out.name + ".partial")
        lines = 0
        if "url" in result:  # a large result: a presigned object, streamed
            with httpx.stream("GET", result["url"], timeout=600) as download, partial.open("wb") as file:
                if download.status_code != 200:
                    raise ClientError(f"the result's download failed: {download.status_code}")
                for chunk in download.iter_bytes():
                    file.write(chunk)
                    lines += chunk.count(b"\n")
        else:
            with partial.open("w") as file:
                for item in result["data"]:
                    file.write(json.dumps(item) + "\n")
                    lines += 1
        partial.replace(out)
        return lines


def result_path(source: Path) -> Path:
    return source.with_name(f"{source.stem}.embeddings.jsonl")


def describe(job: dict) -> str:
    progress = job["progress"]
    text = f"{job['id']} {job['status']} {progress['done']}/{progress['total']}"
    if job.get("error"):
        text += f": {job['error']['type']}: {job['error']['message']}"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app.jobs", description=__doc__.split("\n\n")[1])
    parser.add_argument("--url", default=os.environ.get("INFER_API_URL", "http://127.0.0.1:8080"))
    parser.add_argument("--key-file", type=Path, help="a file holding the API key (INFER_API_KEY wins)")
    commands = parser.add_subparsers(dest="command", required=True)
    submit = commands.add_parser("submit", help="upload a file of texts and submit it as a job")
    submit.add_argument("file", type=Path)
    submit.add_argument("--model", required=True)
    submit.add_argument("--column", help="the CSV column, or the JSON lines' field, holding the texts")
    submit.add_argument("--wait", action="store_true", help="show its progress and write the result next to FILE")
    submit.add_argument("--out", type=Path, help="where to write the result (default FILE.embeddings.jsonl)")
    for name, help_text in (("status", "a job's status and progress"), ("cancel", "cancel a job")):
        commands.add_parser(name, help=help_text).add_argument("job_id")
    result = commands.add_parser("result", help="download a finished job's result")
    result.add_argument("job_id")
    result.add_argument("--out", type=Path, help="default: <job id>.embeddings.jsonl")
    args = parser.parse_args(argv)

    try:
        client = JobsClient(args.url, api_key(args.key_file))
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "submit":
            payload = read_texts(args.file, args.column)
            upload_id = client.upload(payload, args.file.name)
            job = client.submit(args.model, upload_id)
            print(f"submitted {job['id']} ({job['progress']['total']} texts)", file=sys.stderr)
            if not args.wait:
                print(job["id"])
                return 0
            try:
                job = client.wait(job["id"])
            except KeyboardInterrupt:
                print(f"\nthe job goes on: python -m serve_app.jobs status {job['id']}", file=sys.stderr)
                return 130
            print(describe(job), file=sys.stderr)
            if job["status"] != "succeeded":
                return 1
            out = args.out or result_path(args.file)
            lines = client.save_result(job["id"], out)
            print(f"wrote {lines} results to {out}", file=sys.stderr)
            print(out)
        elif args.command == "status":
            job = client.status(args.job_id)
            print(json.dumps(job, indent=2))
            return 0 if job["status"] != "failed" else 1
        elif args.command == "cancel":
            print(describe(client.cancel(args.job_id)))
        elif args.command == "result":
            out = args.out or Path(f"{args.job_id}.embeddings.jsonl")
            lines = client.save_result(args.job_id, out)
            print(f"wrote {lines} results to {out}", file=sys.stderr)
            print(out)
        return 0
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"error: {args.url} could not be reached: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
