"""pyproject.toml builds a wheel whose modules import and whose console commands run, away
from the checkout (a temp venv over the system's packages, the wheel installed --no-deps)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("esd-run", "esd-worker", "esd-analyze", "esd-models", "esd-doctor", "gputracker")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv bin dir, a directory far from the checkout) with the project's wheel installed."""
    root = tmp_path_factory.mktemp("package")
    source = root / "source"      # a copy: building must not leave build/ in the checkout
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if name.startswith("tests/") or not (ROOT / name).is_file():
            continue
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    wheels = root / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "-w", str(wheels), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    wheel, = wheels.glob("esd_experiment-*.whl")
    env_dir = root / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    return env_dir / "bin", elsewhere


def clean_env() -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


@pytest.mark.parametrize("command", COMMANDS)
def test_console_command_runs_from_the_installed_wheel(installed, command):
    bin_dir, elsewhere = installed
    result = subprocess.run([str(bin_dir / command), "--help"], cwd=elsewhere, env=clean_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout


def test_modules_import_from_site_packages_not_the_checkout(installed):
    bin_dir, elsewhere = installed
    code = ("import esd_api, analyze_results, esd.analysis.report, esd.progress, gputracker, net_esd; "
            "print(esd_api.__file__); print(analyze_results.__file__)")
    result = subprocess.run([str(bin_dir / "python"), "-c", code], cwd=elsewhere, env=clean_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    for line in result.stdout.split():
        assert "site-packages" in line and not line.startswith(str(ROOT))


def test_editable_install_serves_the_checkout_and_its_commands(installed, tmp_path):
    bin_dir, elsewhere = installed
    source = bin_dir.parents[1] / "source"          # the fixture's copy of the checkout
    env_dir = tmp_path / "editable"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                              "--no-index", "-e", str(source)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    where = subprocess.run([str(python), "-c", "import esd_api; print(esd_api.__file__)"], cwd=elsewhere,
                           env=clean_env(), capture_output=True, text=True, timeout=120)
    assert where.stdout.strip() == str(source / "esd_api.py")
    models = subprocess.run([str(env_dir / "bin" / "esd-models"), "template"], cwd=elsewhere,
                            env=clean_env(), capture_output=True, text=True, timeout=120)
    assert models.returncode == 0 and models.stdout.startswith("model_id,")
