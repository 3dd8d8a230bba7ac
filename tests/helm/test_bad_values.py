"""Bad values make helm fail at template (and so at install) time with the schema's message."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import run_helm, template_args

BAD_VALUES: list[tuple[list[str], str]] = [
    (["--set", "inferenceService.spec.replicas=-1"],
     "inferenceService.spec.replicas: Must be greater than or equal to 0"),
    (["--set", "image.pullPolicy=Sometimes"],
     'image.pullPolicy must be one of the following: "Always", "IfNotPresent", "Never"'),
    (["--set", "inferenceService.spec.imagePullPolicy=Sometimes"],
     "inferenceService.spec.imagePullPolicy must be one of"),
    (["--set-string", "inferenceService.enabled=yes"],
     "inferenceService.enabled: Invalid type. Expected: boolean, given: string"),
    (["--set-string", "inferenceService.spec.replicas=2"],
     "inferenceService.spec.replicas: Invalid type. Expected: integer, given: string"),
    (["--set", "operator.probeInterval=0"], "operator.probeInterval: Must be greater than 0"),
    (["--set", "operator.scope=everywhere"], 'operator.scope must be one of the following: "cluster", "namespace"'),
    (["--set-json", "tolerations={}"], "tolerations: Invalid type. Expected: array, given: object"),
    (["--set", "resources.limits.memory=lots"], "resources.limits.memory: Does not match pattern"),
    (["--set", "inferenceService.name=Llama_3"], "inferenceService.name: Does not match pattern"),
    (["--set", "replicaCount=2"], "Additional property replicaCount is not allowed"),
]


@pytest.mark.parametrize(("args", "message"), BAD_VALUES, ids=[a[-1] for a, _ in BAD_VALUES])
def test_bad_value_fails_with_the_schemas_message(helm: Path, args: list[str], message: str) -> None:
    result = run_helm(helm, *template_args(), *args, check=False)
    assert result.returncode != 0, f"helm accepted {args}"
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr


def test_existing_service_account_must_be_named(helm: Path) -> None:
    result = run_helm(helm, *template_args(sets=["serviceAccount.create=false"]), check=False)
    assert result.returncode != 0
    assert "serviceAccount.name: set it to an existing ServiceAccount" in result.stderr
