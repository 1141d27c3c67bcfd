"""The GPU machine's kit (benchmarks/device/prepare.sh) covers every runtime dependency of the package: each is
either carried as a wheel or named as the device image's own, so a dependency added to pyproject.toml without a
thought for the device fails here and not in the first GPU session's few minutes."""

from __future__ import annotations

import re
import tomllib

from tests.helpers import ROOT


def _names(script: str, variable: str) -> set[str]:
    value = re.search(rf'^{variable}="([^"]*)"', script, re.MULTILINE)
    assert value is not None, variable
    return {_normal(n) for n in value.group(1).split()}


def _normal(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0]).lower()


def test_every_runtime_dependency_is_carried_or_on_the_device_image() -> None:
    script = (ROOT / "benchmarks" / "device" / "prepare.sh").read_text()
    carried, on_device = _names(script, "PACKAGES"), _names(script, "ON_DEVICE")
    dependencies = {_normal(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    assert dependencies - carried - on_device == set()
    assert carried & on_device == set()
    # what dask[array,distributed] and pydantic bring that the image lacks, at the versions tested here
    assert {"distributed", "numcodecs", "pydantic-core", "partd", "zict", "tornado"} <= carried
