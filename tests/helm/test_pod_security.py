"""Every pod the chart renders (the operator's Deployment, the cleanup hook's Job, the `helm test`
pod) passes the "restricted" Pod Security Standard, with the default values and with all of them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.pod_security import pod_specs, restricted_violations

from .conftest import VALUES_ALL, Render


@pytest.mark.parametrize("values", [[], [VALUES_ALL]], ids=["defaults", "values-all"])
def test_every_rendered_pod_is_restricted(render: Render, values: list[Path]) -> None:
    pods = dict(pod_specs(render(values=values)))
    assert any(name.startswith("Deployment/") for name in pods), sorted(pods)
    for name, spec in pods.items():
        assert restricted_violations(spec) == [], name


def test_a_chart_user_who_loosens_the_security_context_is_caught(render: Render) -> None:
    pods = dict(pod_specs(render(sets=["securityContext.allowPrivilegeEscalation=true"])))
    deployment = next(spec for name, spec in pods.items() if name.startswith("Deployment/"))
    assert any("privilege escalation" in problem for problem in restricted_violations(deployment))
