import pytest
from pydantic import ValidationError

from serve_app.http.schemas import EmbeddingRequest
from serve_app.settings import get_settings


def test_single_text_and_list_are_both_texts():
    assert EmbeddingRequest(model="m", input="hello").texts == ["hello"]
    assert EmbeddingRequest(model="m", input=["a", "b"]).texts == ["a", "b"]


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"model": "m", "input": []}, "at least one text"),
        ({"model": "m", "input": ""}, "input[0] is empty"),
        ({"model": "m", "input": ["ok", ""]}, "input[1] is empty"),
        ({"model": "m", "input": "\ud800"}, "not valid Unicode"),
        ({"model": "m", "input": [1, 2]}, "valid string"),
        ({"model": "m", "input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"model": "m", "input": "x", "extra": 1}, "Extra inputs"),
        ({"model": "", "input": "x"}, "model"),
        ({"input": "x"}, "model"),
        ({"model": "m", "input": "x", "dimensions": 0}, "dimensions"),
    ],
)
def test_bad_requests_say_what_is_wrong(payload, fragment):
    with pytest.raises(ValidationError) as info:
        EmbeddingRequest.model_validate(payload)
    assert fragment in str(info.value)


def test_limits_come_from_settings():
    settings = get_settings()
    too_many = ["x"] * (settings.max_items_per_request + 1)
    with pytest.raises(ValidationError, match=f"at most {settings.max_items_per_request}"):
        EmbeddingRequest(model="m", input=too_many)
    too_long = "x" * (settings.max_text_chars + 1)
    with pytest.raises(ValidationError, match=f"the limit is {settings.max_text_chars}"):
        EmbeddingRequest(model="m", input=too_long)
    EmbeddingRequest(model="m", input=["x" * settings.max_text_chars] * settings.max_items_per_request)
