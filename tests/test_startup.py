"""Start-up: settings are checked before torch, transformers or httpx load, so a bad one fails in well under 1 s."""

import os
import subprocess
import sys

import pytest
from helpers import ROOT

HEAVY = ("torch", "transformers", "peft", "httpx")


def loaded_after(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", f"import sys\n{code}\nprint(' '.join(sorted(sys.modules)))"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [m for m in HEAVY if m in out]


def test_config_imports_nothing_heavy():
    assert loaded_after("import promptbake.config, promptbake.cli, promptbake.distributed") == []


def test_package_exports_resolve_on_first_use():
    assert loaded_after("import promptbake; assert 'Config' in dir(promptbake)") == []
    assert loaded_after("from promptbake import Config; Config()") == []
    import promptbake
    from promptbake.stages import bake  # the bake as bake.py runs it: answers prompts-only data, writes the report

    assert promptbake.bake is bake


def test_redaction_still_importable_from_api_client():
    from promptbake import api_client, redact

    assert api_client.redact is redact.redact and api_client.redact_url is redact.redact_url
    assert redact.redact_url("https://u:pw@host/v1?key=sk-1") == "https://host/v1"


@pytest.mark.parametrize("script", ["bake.py", "generate_data.py", "evaluate.py", "demo.py", "pursue.py"])
def test_bad_setting_fails_before_torch_loads(tmp_path, script):
    """A script with a bad setting: the one error line, and torch never imported (its import alone takes seconds)."""
    probe = (f"import runpy, sys\nsys.argv = [{script!r}, '--num_epochs', '0']\n"
             f"try:\n    runpy.run_path({str(ROOT / script)!r}, run_name='__main__')\n"
             "except SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's package, wherever the editable install points
    r = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert r.stderr.strip() == "error: command line: `num_epochs` is 0; it must be in [1, 10000]"
    assert r.stdout.split()[-3:] == ["exit", "1", "False"]


def test_evaluate_does_not_import_the_training_stage():
    """A module reaches down, never sideways: evaluate needs the held-out file name, which lives with the other
    checkpoint file names (lineage), not the trainer."""
    out = subprocess.run([sys.executable, "-c", "import sys, promptbake.evaluate; print('promptbake.train' in sys.modules)"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert out[-1] == "False"
