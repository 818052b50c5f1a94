"""Fixtures for the offline manifest tests: renders are cached for the whole session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.k8s.manifest_checks import K8S_DIR, OVERLAYS, Doc, render


class RenderCache:
    """Renders each kustomization of the real tree once per session."""

    def __init__(self) -> None:
        self._docs: dict[Path, list[Doc]] = {}

    def get(self, kustomization_dir: Path) -> list[Doc]:
        """The rendered documents of ``kustomization_dir`` (rendered on first use)."""
        if kustomization_dir not in self._docs:
            self._docs[kustomization_dir] = render(kustomization_dir)
        # A copy of the list, so a test that filters it cannot affect the others.
        return list(self._docs[kustomization_dir])


@pytest.fixture(scope="session")
def renders() -> RenderCache:
    return RenderCache()


@pytest.fixture(params=OVERLAYS)
def overlay_docs(request: pytest.FixtureRequest, renders: RenderCache) -> list[Doc]:
    """The rendered documents of one overlay (dev, production)."""
    return renders.get(K8S_DIR / "overlays" / request.param)
