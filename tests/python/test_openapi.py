"""The OpenAPI document is true to what the server answers: Schemathesis (from PyPI) generates
requests for every operation the document lists and checks each answer against it. Bounded:
five examples per operation and a fixed seed."""
import os
import subprocess
import sys

from conftest import PASSWORD

CHECKS = ",".join([
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "unsupported_method",
    "allow_header_conformance",
])


def test_every_answer_conforms_to_the_openapi_document(plain_controller, tmp_path):
    schemathesis = os.path.join(os.path.dirname(sys.executable), "schemathesis")
    result = subprocess.run(
        [
            schemathesis, "run", f"{plain_controller.url}/api/openapi.json",
            "--auth", f"admin:{PASSWORD}",
            "--checks", CHECKS,
            "--phases", "examples,coverage,fuzzing",
            "--max-examples", "5",
            "--seed", "1",
            "--workers", "2",
            "--request-timeout", "30",
            "--generation-database", "none",
            "--no-color",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
