""".ci/run installs chromium when it is missing (as root, apt-get) and then runs `make test`; with
chromium present it runs `make test` only; not root and no chromium, it stops and says why.
apt-get, make and id are stand-ins that log their arguments (id answers the uid the test picks)."""
import os
import subprocess

from browser_servers import ROOT

SCRIPT = ROOT / ".ci" / "run"


def _run(tmp_path, chromium, uid=0):
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    stubs = {"apt-get": f'echo "apt-get $*" >> "{log}"', "make": f'echo "make $*" >> "{log}"',
             "id": f"echo {uid}"}
    for tool, body in stubs.items():
        (bin_dir / tool).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "LEAKLAB_CHROMIUM": str(chromium)}
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    return done, log.read_text().splitlines() if log.exists() else []


def test_ci_run_installs_missing_chromium_then_runs_make_test(tmp_path):
    done, calls = _run(tmp_path, tmp_path / "no-chromium")
    assert done.returncode == 0, done.stderr
    assert calls == ["apt-get update -qq", "apt-get install -y -qq chromium", "make test"]


def test_ci_run_with_chromium_present_only_runs_make_test(tmp_path):
    chromium = tmp_path / "chromium"
    chromium.write_text("#!/bin/sh\n")
    chromium.chmod(0o755)
    done, calls = _run(tmp_path, chromium)
    assert done.returncode == 0, done.stderr
    assert calls == ["make test"]


def test_ci_run_without_chromium_or_root_stops_and_says_why(tmp_path):
    done, calls = _run(tmp_path, tmp_path / "no-chromium", uid=1000)
    assert done.returncode == 1 and calls == []
    assert "needs root (apt-get install -y chromium)" in done.stderr
