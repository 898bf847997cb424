"""Schemathesis against the gateway's own OpenAPI schema, through NGINX, with a valid key.

Every operation gets a bounded number of generated requests, valid ones (positive) and invalid
ones (negative). No answer may be a 5xx, use a status the schema does not declare, or break the
declared response schema; an operation that answers 2xx with the key must refuse without it.
"""

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

MAX_EXAMPLES = 10
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    ignored_auth,
]


@pytest.fixture(scope="module")
def schema(settings, auth_headers):
    loaded = schemathesis.openapi.from_url(f"{settings.public_url}/openapi.json", wait_for_schema=30)
    loaded.config.update(headers=auth_headers)
    return loaded


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_no_operation_answers_5xx_or_off_schema(schema, auth_headers, mode):
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15, [op.label for op in operations]
    for operation in operations:

        @hypothesis_settings(
            max_examples=MAX_EXAMPLES,
            database=None,
            deadline=None,
            derandomize=True,  # the same cases every run: a failure here is reproducible
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case) -> None:
            case.call_and_validate(headers=auth_headers, checks=CHECKS)

        try:
            fuzz()
        except Unsatisfiable:  # negative mode, and the operation takes nothing that could be made invalid
            assert mode == GenerationMode.NEGATIVE, operation.label
        except Exception as exc:  # collect every operation's failure, not just the first
            failures.append(f"{operation.label}: {type(exc).__name__}: {str(exc)[:1500]}")
    assert not failures, "\n\n".join(failures)
