"""The worker's check of an environment against a commit's requirements.lock."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest

from vae.environment import EnvironmentMismatch, check_environment, lock_differences, lock_pins
from vae.errors import exit_code

TORCH = metadata.version("torch")
NUMPY = metadata.version("numpy")


def _project(tmp_path: Path, lock: str, deps: tuple[str, ...] = ("torch", "numpy")) -> Path:
    listed = ", ".join(f'"{d}"' for d in deps)
    (tmp_path / "pyproject.toml").write_text(
        f'[project]\nname = "vae"\ndependencies = [{listed}]\n'
        '[project.optional-dependencies]\npipeline = ["not-a-real-package-xyz==1.0"]\n'
    )
    (tmp_path / "requirements.lock").write_text(lock)
    return tmp_path


def test_this_environment_matches_the_repository_lock() -> None:
    root = Path(__file__).resolve().parents[1]
    assert lock_differences(root, ("pipeline", "team", "dev")) == []


def test_a_pin_that_differs_is_named_with_both_versions(tmp_path: Path) -> None:
    root = _project(tmp_path, f"# pins\ntorch==0.0.1\nNumPy=={NUMPY}\nvae==9.9\n", ())
    assert lock_differences(root, ()) == [f"torch 0.0.1 (installed {TORCH})"]


def test_absent_pins_matter_only_for_what_the_project_declares(tmp_path: Path) -> None:
    lock = f"torch=={TORCH}\nnumpy=={NUMPY}\nnot-a-real-package-xyz==1.0\nanother-absent==2.0\n"
    root = _project(tmp_path, lock)
    assert lock_differences(root, ()) == []  # an extra's pins may be absent
    assert lock_differences(root, ("pipeline",)) == ["not-a-real-package-xyz 1.0 (not installed)"]


def test_a_declared_package_missing_from_the_lock_is_named(tmp_path: Path) -> None:
    root = _project(tmp_path, f"torch=={TORCH}\n")
    assert lock_differences(root, ()) == ["numpy (not in requirements.lock)"]


def test_a_local_version_label_matches_its_pin(tmp_path: Path) -> None:
    from vae.environment import _same

    assert _same("2.14.1", "2.14.1+cpu") and not _same("2.14.1", "2.14.10")


def test_the_mismatch_is_one_line_with_exit_1(tmp_path: Path) -> None:
    lock = "torch==0.0.1\nnumpy==0.0.2\nsafetensors==0.0.3\npyyaml==0.0.4\n"
    root = _project(tmp_path, lock, ("torch", "numpy", "safetensors", "pyyaml"))
    with pytest.raises(EnvironmentMismatch) as info:
        check_environment(root, "/opt/worker-venv", ())
    message = str(info.value)
    assert "\n" not in message and exit_code(info.value) == 1
    assert message.startswith("requirements.lock differs from the environment at /opt/worker")
    assert "numpy 0.0.2 (installed" in message and "and 1 more;" in message


def test_a_line_that_is_not_a_pin_is_refused(tmp_path: Path) -> None:
    (tmp_path / "requirements.lock").write_text("torch>=2\n")
    with pytest.raises(EnvironmentMismatch, match=r"'torch>=2' is not a name==version pin"):
        lock_pins(tmp_path / "requirements.lock")
