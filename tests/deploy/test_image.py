"""deploy/Dockerfile: an official Ray image of the pinned version, the project with `gpu`."""

from __future__ import annotations

import re

from tests.deploy import support


def dockerfile() -> str:
    return support.DOCKERFILE.read_text()


def test_based_on_the_official_ray_image_of_the_pinned_version():
    text = dockerfile()
    match = re.search(r"^ARG RAY_IMAGE=(\S+)$", text, re.MULTILINE)
    assert match and re.search(r"^FROM \$\{RAY_IMAGE\}$", text, re.MULTILINE)
    image = match.group(1)
    assert image.startswith(f"rayproject/ray:{support.pinned_ray_version()}-"), image
    assert image.endswith("-gpu") or "-cu" in image, f"{image} is not a GPU image"


def test_installs_the_project_with_the_gpu_extra():
    text = dockerfile()
    source = re.search(r"^COPY (?:--\S+ )*\. (\S+)$", text, re.MULTILINE)
    assert source, "the repository is not copied into the image"
    assert re.search(rf'pip install [^\n]*"{re.escape(source.group(1))}\[gpu\]"', text)


def test_build_context_leaves_out_local_state():
    ignored = {line.strip() for line in (support.DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv"} <= ignored
    # What the install and the manifests need is not ignored.
    for needed in ("pyproject.toml", "cluster", "router", "proto", "deploy"):
        assert needed not in ignored
