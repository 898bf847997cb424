"""The Open Inference Protocol: bodies made by tritonclient's own encoder, answers read by its own decoder."""

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.http._utils import _get_inference_request

from serve_app.v2.protocol import HEADER_LENGTH, ProtocolError, encode_response, parse_request
from tests.unit.fakes import fake_vector


def triton_body(texts: list[str], *, binary: bool, binary_output: bool):
    text = triton.InferInput("text", [len(texts)], "BYTES")
    text.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_), binary_data=binary)
    outputs = [triton.InferRequestedOutput("embedding", binary_data=binary_output)]
    body, json_size = _get_inference_request(
        inputs=[text],
        request_id="req-1",
        outputs=outputs,
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=0,
        timeout=None,
        custom_parameters=None,
    )
    return body, json_size


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("binary_output", [True, False])
def test_what_tritonclient_sends_parses_and_what_we_answer_it_reads(binary, binary_output):
    texts = ["first text", "zweiter Text ü", "第三"]
    body, json_size = triton_body(texts, binary=binary, binary_output=binary_output)
    body = body if isinstance(body, bytes) else body.encode()
    request, inputs = parse_request(body, None if json_size is None else str(json_size))
    assert inputs == {"text": texts}
    vectors = np.stack([fake_vector(t, 8) for t in texts])
    answer, headers = encode_response(request, "m", "3", {"embedding": vectors})
    assert (HEADER_LENGTH in headers) == binary_output
    result = triton.InferResult.from_response_body(
        answer, header_length=headers.get(HEADER_LENGTH) and int(headers[HEADER_LENGTH])
    )
    np.testing.assert_array_equal(result.as_numpy("embedding"), vectors)
    assert result.get_response()["model_version"] == "3"
    assert result.get_response()["id"] == "req-1"


def test_json_data_may_be_nested_by_shape():
    body = b'{"inputs":[{"name":"text","shape":[2,2],"datatype":"BYTES","data":[["a","b"],["c","d"]]}]}'
    assert parse_request(body, None)[1] == {"text": ["a", "b", "c", "d"]}


@pytest.mark.parametrize(
    ("body", "header", "message"),
    [
        (b"{not json", None, "not valid JSON"),
        (b'{"inputs":[]}', None, "inputs"),
        (b'{"inputs":[{"name":"t","shape":[1],"datatype":"FP32","data":[1.0]}]}', None, "takes BYTES"),
        (b'{"inputs":[{"name":"t","shape":[3],"datatype":"BYTES","data":["a"]}]}', None, "has 1 elements"),
        (b'{"inputs":[{"name":"t","shape":[1],"datatype":"BYTES","data":[1]}]}', None, "strings, not int"),
        (b'{"inputs":[{"name":"t","shape":[1],"datatype":"BYTES"}]}', None, "neither data"),
        (
            b'{"inputs":[{"name":"t","shape":[1],"datatype":"BYTES","parameters":{"binary_data_size":9}}]}',
            "whole",
            "overruns",
        ),
        (b"{}", "x", "must be an integer"),
        (b"{}", "50", "the body has 2 bytes"),
    ],
)
def test_a_malformed_request_says_what_is_wrong(body, header, message):
    header = str(len(body)) if header == "whole" else header  # a JSON header with no binary after it
    with pytest.raises(ProtocolError, match=message):
        parse_request(body, header)


def test_an_output_the_model_lacks_is_refused():
    request, _ = parse_request(
        b'{"inputs":[{"name":"t","shape":[1],"datatype":"BYTES","data":["a"]}],"outputs":[{"name":"logits"}]}', None
    )
    with pytest.raises(ProtocolError, match="no output named 'logits'"):
        encode_response(request, "m", "1", {"embedding": np.zeros((1, 2))})


def test_the_gateway_speaks_v2_with_protocol_errors(client):
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2").json()["extensions"] == ["binary_tensor_data"]
    meta = client.get("/v2/models/fake-model").json()
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 8]}]
    assert client.get("/v2/models/fake-model/ready").json() == {"name": "fake-model", "ready": True}
    body = {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]}]}
    answer = client.post("/v2/models/fake-model/infer", json=body)
    assert answer.status_code == 200, answer.text
    [output] = answer.json()["outputs"]
    assert (output["name"], output["shape"], output["datatype"]) == ("embedding", [2, 8], "FP32")
    np.testing.assert_allclose(
        np.reshape(output["data"], (2, 8)), [fake_vector("1a", 8), fake_vector("1b", 8)], atol=1e-6
    )
    missing = client.get("/v2/models/nope")
    assert missing.status_code == 404
    assert missing.json() == {"error": "the model 'nope' does not exist; served models: fake-model"}
    too_many = client.post(
        "/v2/models/fake-model/infer",
        json={"inputs": [{"name": "text", "shape": [5], "datatype": "BYTES", "data": list("abcde")}]},
    )
    assert too_many.status_code == 400
    assert too_many.json() == {"error": "input 'text' has 5 texts; at most 4 are allowed"}
    assert client.post("/v2/models/fake-model/infer", content=b"{").json()["error"].startswith("the inference request")


def test_v2_asks_for_credentials_in_its_own_error_shape(anonymous):
    refused = anonymous.get("/v2/health/live")
    assert refused.status_code == 401
    assert isinstance(refused.json()["error"], str)
