"""The jobs client (`python -m serve_app.jobs`) against the real cluster: a CSV and a JSON-lines file
uploaded through the presigned form, submitted, watched to the end, and the result written next to
the input, in order, equal to what /v1/embeddings answers for the same texts."""

import json
import subprocess
import sys

import numpy as np
import pytest

from serve_app.jobs.client import JobsClient, main
from serve_app.settings import REPO_ROOT
from tests.integration.helpers import MODEL, texts


@pytest.fixture
def client_env(monkeypatch, api_key, settings):
    monkeypatch.setenv("INFER_API_KEY", api_key)
    return ["--url", settings.public_url]


def lines_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_csv_of_1100_texts_goes_up_runs_and_comes_back_as_an_object_in_order(tmp_path, client_env, api, capsys):
    rows = texts(1100)
    source = tmp_path / "reviews.csv"
    source.write_text("id,body\n" + "".join(f'{i},"{text}"\n' for i, text in enumerate(rows)))
    assert main([*client_env, "submit", str(source), "--model", MODEL, "--column", "body", "--wait"]) == 0
    out = tmp_path / "reviews.embeddings.jsonl"
    assert capsys.readouterr().out.strip() == str(out)
    results = lines_of(out)
    assert [r["index"] for r in results] == list(range(1100))
    assert all(len(r["embedding"]) == 384 for r in results)
    direct = api.post("/v1/embeddings", json={"model": MODEL, "input": [rows[0], rows[1099]]}).json()["data"]
    for got, want in zip((results[0], results[1099]), direct, strict=True):
        assert float(np.dot(got["embedding"], want["embedding"])) > 0.9999


def test_json_lines_come_back_inline_and_status_and_result_subcommands_work(tmp_path, client_env, api_key, capsys):
    source = tmp_path / "small.jsonl"
    rows = texts(20)
    source.write_text("".join(json.dumps({"text": t} if i % 2 else t) + "\n" for i, t in enumerate(rows)))
    assert main([*client_env, "submit", str(source), "--model", MODEL]) == 0
    job_id = capsys.readouterr().out.strip()
    assert len(job_id) >= 12
    client = JobsClient(client_env[1], api_key)
    try:
        assert client.wait(job_id, show=False)["status"] == "succeeded"
    finally:
        client.close()
    assert main([*client_env, "status", job_id]) == 0
    assert json.loads(capsys.readouterr().out)["progress"] == {"done": 20, "total": 20}
    out = tmp_path / "again.jsonl"
    assert main([*client_env, "result", job_id, "--out", str(out)]) == 0
    assert [r["index"] for r in lines_of(out)] == list(range(20))


def test_bad_input_is_refused_before_anything_is_sent_with_what_is_wrong(tmp_path, client_env, capsys):
    csv_file = tmp_path / "a.csv"
    csv_file.write_text("id,body\n1,hello\n")
    assert main([*client_env, "submit", str(csv_file), "--model", MODEL]) == 1
    assert "name its column of texts with --column" in capsys.readouterr().err
    assert main([*client_env, "submit", str(csv_file), "--model", MODEL, "--column", "text"]) == 1
    assert "has no column 'text'" in capsys.readouterr().err
    broken = tmp_path / "b.jsonl"
    broken.write_text('"fine"\n{"text": 3}\n')
    assert main([*client_env, "submit", str(broken), "--model", MODEL]) == 1
    assert "b.jsonl:2: expected a JSON string or an object with a 'text' string" in capsys.readouterr().err
    assert main([*client_env, "submit", str(tmp_path / "missing.jsonl"), "--model", MODEL]) == 1
    assert "missing.jsonl" in capsys.readouterr().err


def test_an_unknown_model_is_the_apis_own_4xx_message(tmp_path, client_env, capsys):
    source = tmp_path / "c.jsonl"
    source.write_text('"a text"\n')
    assert main([*client_env, "submit", str(source), "--model", "no-such-model"]) == 1
    err = capsys.readouterr().err
    assert "POST /v1/jobs: 404" in err or "POST /v1/jobs: 400" in err or "POST /v1/jobs: 422" in err, err


def test_the_module_runs_as_documented():
    shown = subprocess.run(
        [sys.executable, "-m", "serve_app.jobs", "--help"], capture_output=True, text=True, cwd=REPO_ROOT, check=False
    )
    assert shown.returncode == 0
    assert "submit" in shown.stdout
    assert "result" in shown.stdout
