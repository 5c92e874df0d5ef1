"""The installed package (a wheel, not the source checkout) carries what the engine reads at run time."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_the_shipped_zero_configs_and_model_configs(tmp_path):
    source = tmp_path / "src"  # a copy: a build/ folder left in the checkout would hide what the wheel misses
    for name in ("engine", "models", "zero_configs"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", str(source), "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist")], check=True, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(p.name for p in (ROOT / "zero_configs").glob("*.json"))
    assert sorted(Path(n).name for n in names if n.startswith("zero_configs/") and n.endswith(".json")) == shipped
    assert any(n.startswith("models/configs/") and n.endswith(".json") for n in names)
    # Every module of the engine ships: each subpackage (engine/config/, engine/backends/, ...) is found.
    modules = sorted(p.relative_to(source).as_posix() for p in (source / "engine").rglob("*.py"))
    assert [m for m in modules if m not in names] == []
    # Installed elsewhere, the engine finds the configs by name from any working directory.
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, cwd=tmp_path)
    probe = ("import engine; from engine.backends.zero_configs import resolve_zero_config; "
             "print(engine.__file__); print(resolve_zero_config('zero3_bf16'))")
    out = subprocess.run([sys.executable, "-c", probe], check=True, cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"}).stdout.split()
    assert out[0].startswith(str(tmp_path / "site"))
    assert out[1] == str(tmp_path / "site" / "zero_configs" / "zero3_bf16.json")
