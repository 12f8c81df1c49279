"""The tracker protocol the training loop talks to. MLflow lives behind it, in one module.

The loop only ever calls these methods, so tests run with :class:`NullTracker` and nothing in
the loop imports mlflow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

__all__ = ["NullTracker", "Tracker"]


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def log_image(self, key: str, image: Any, step: int) -> None:
        """An (H, W, 3) uint8 array as image ``key`` at ``step``; it may upload in the
        background, so the caller does not wait on the server."""
        ...


class NullTracker:
    """Records nothing; used where tracking is not the subject (and in most tests)."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_image(self, key: str, image: Any, step: int) -> None:
        pass
