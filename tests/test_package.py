"""pyproject.toml builds a wheel whose modules import and whose console commands run, away
from the checkout (a temp venv seeing the running interpreter's packages, the wheel installed
--no-deps), that ships one namespace, and whose `esd-run` runs the demo with no arguments."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("esd-run", "esd-worker", "esd-analyze", "esd-models", "esd-doctor", "gputracker")
# top-level modules the wheel may ship: `net_esd` (users write `from net_esd import …`) and
# the three commands not yet moved into esd/cli/
TOP_LEVEL_MODULES = {"net_esd.py"}


def make_venv(env_dir: Path) -> Path:
    """A venv that sees the packages of the interpreter running the tests, also when that
    interpreter is itself a venv (`system_site_packages` would show the base interpreter's
    packages instead): a .pth file naming its site-packages, after the venv's own."""
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    ours = [p for p in dict.fromkeys([*sys.path, sysconfig.get_paths()["purelib"],
                                      sysconfig.get_paths()["platlib"]])
            if p and Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]
    (Path(own) / "outer_packages.pth").write_text("".join(f"{p}\n" for p in ours))
    return python


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
    python = make_venv(env_dir)
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    (env_dir / "wheel").symlink_to(wheel)
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
    code = ("import esd.api, esd.cli.run, esd.cli.analyze, esd.analysis.report, esd.progress, gputracker, "
            "net_esd; print(esd.api.__file__); print(esd.cli.run.__file__); print(esd.cli.analyze.__file__)")
    result = subprocess.run([str(bin_dir / "python"), "-c", code], cwd=elsewhere, env=clean_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    for line in result.stdout.split():
        assert "site-packages" in line and not line.startswith(str(ROOT))


def test_editable_install_serves_the_checkout_and_its_commands(installed, tmp_path):
    bin_dir, elsewhere = installed
    source = bin_dir.parents[1] / "source"          # the fixture's copy of the checkout
    env_dir = tmp_path / "editable"
    python = make_venv(env_dir)
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                              "--no-index", "-e", str(source)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    where = subprocess.run([str(python), "-c", "import esd.api; print(esd.api.__file__)"], cwd=elsewhere,
                           env=clean_env(), capture_output=True, text=True, timeout=120)
    assert where.stdout.strip() == str(source / "esd" / "api.py")
    models = subprocess.run([str(env_dir / "bin" / "esd-models"), "template"], cwd=elsewhere,
                            env=clean_env(), capture_output=True, text=True, timeout=120)
    assert models.returncode == 0 and models.stdout.startswith("model_id,")


def test_the_wheel_ships_one_namespace_and_the_demos_files(installed):
    bin_dir, _ = installed
    names = zipfile.ZipFile((bin_dir.parent / "wheel").resolve()).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert {name for name in top if name.endswith(".py")} <= TOP_LEVEL_MODULES
    assert {name for name in top if not name.endswith(".py")} == {"esd", "gputracker"}
    for moved in ("run_esd_experiment.py", "esd_worker.py", "esd_api.py", "model_loader.py"):
        assert moved not in top
    assert {"esd/demo/examples/models.csv", "esd/demo/examples/minilm-lora-demo/adapter_config.json",
            "esd/demo/examples/minilm-lora-demo/adapter_model.safetensors"} <= set(names)


def test_esd_run_without_arguments_runs_the_demo_from_the_wheel(installed, tmp_path):
    bin_dir, _ = installed
    empty = tmp_path / "empty"
    empty.mkdir()
    env = dict(clean_env(), HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", MPLBACKEND="Agg")
    result = subprocess.run([str(bin_dir / "esd-run")], cwd=empty, env=env, capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = pd.read_csv(empty / "results" / "summary.csv")
    assert set(summary["model_id"]) == {"sentence-transformers/all-MiniLM-L6-v2", "examples/minilm-lora-demo"}
    assert (empty / "results" / "examples--minilm-lora-demo.csv").is_file()
