"""The orchestrator, the analysis and the list tools start without torch: only the worker
(and the API's analysis) import it, when a model is analysed."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", ["run_esd_experiment", "analyze_results", "create_model_list",
                                    "esd_worker", "esd_api", "esd.settings", "esd.options",
                                    "esd.loading.resolve"])
def test_importing_a_command_loads_no_torch(module):
    code = (f"import sys, {module}; "
            "heavy = sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules); "
            "print(','.join(heavy))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "", f"import {module} loaded {result.stdout.strip()}"


def test_net_esd_still_exports_the_settings_users_import_from_it():
    import net_esd
    from esd.settings import ESDSettings
    assert net_esd.ESDSettings is ESDSettings
    assert net_esd.normalize_fix_fingers("none") == "DKS"
