"""Start JupyterLab or Voila for the browser tests: 127.0.0.1, a free port, a random token, their own
config, runtime, settings and workspace folders (nothing read from or written to the user's), the
kernel importing this checkout (PYTHONPATH), and the whole process group stopped at the end."""
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]  # the repository: the kernels import its toolkit
BIN = Path(sys.executable).parent  # jupyter and voila beside the interpreter running pytest
# Off in the served kernels: the widgets must render, not fall back to static figures.
STATIC_SWITCHES = ("LEAKLAB_SMOKE", "LEAKLAB_STATIC")


@dataclass
class Server:
    """A running server: its base URL, token and log file."""
    url: str
    token: str
    log: Path

    def page(self, path: str = "") -> str:
        """The URL of ``path`` under the server, token included."""
        return f"{self.url}{path}?token={self.token}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in STATIC_SWITCHES}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    for name, sub in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_RUNTIME_DIR", "runtime"),
                      ("JUPYTER_DATA_DIR", "data"), ("JUPYTERLAB_SETTINGS_DIR", "settings"),
                      ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"), ("IPYTHONDIR", "ipython")):
        (home / sub).mkdir(parents=True, exist_ok=True)
        env[name] = str(home / sub)
    env["JUPYTER_PLATFORM_DIRS"] = "1"
    # No news or update toasts over the notebook (they would catch clicks meant for the widgets).
    notes = home / "settings" / "@jupyterlab" / "apputils-extension"
    notes.mkdir(parents=True, exist_ok=True)
    (notes / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    return env


def status(url: str) -> int | None:
    """The HTTP status ``url`` answers with (no redirects followed), None when nothing answers."""
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    try:
        with urllib.request.build_opener(NoRedirect).open(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, OSError):
        return None


@contextmanager
def serve(cmd: list, *, home: Path, cwd: Path, port: int, token: str, ready: str, timeout: float = 90):
    """Run ``cmd`` in its own process group until ``ready`` (a path under the server) answers 200;
    yield the Server; then stop the group (SIGTERM, SIGKILL after 10 s)."""
    home.mkdir(parents=True, exist_ok=True)
    log = home / "server.log"
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=_env(home), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while status(f"{url}{ready}?token={token}") != 200:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[0]} did not answer {ready} in {timeout:.0f} s:\n"
                                   f"{log.read_text()[-3000:]}")
            time.sleep(0.25)
        yield Server(url, token, log)
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's group (it shuts its kernels down), SIGKILL after 10 s; then kill any
    kernel it left (kernels run in sessions of their own, outside the group)."""
    try:
        kernels = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kernels = []
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
    _, alive = psutil.wait_procs(kernels, timeout=5)
    for child in alive:
        child.kill()
    psutil.wait_procs(alive, timeout=5)


def root_flags() -> list:
    """JupyterLab refuses to run as root without --allow-root."""
    return ["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []


@contextmanager
def jupyter_lab(notebooks: Path, home: Path):
    """JupyterLab serving the folder ``notebooks`` (a temporary copy: outputs never reach the repo)."""
    port, token = free_port(), secrets.token_hex(16)
    cmd = [str(BIN / "jupyter"), "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={notebooks}", "--LabApp.news_url=None",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", *root_flags()]
    with serve(cmd, home=home, cwd=notebooks, port=port, token=token, ready="/api/status") as server:
        yield server


@contextmanager
def voila(notebook: Path, home: Path):
    """Voila serving ``notebook`` as a web app (no code shown)."""
    port, token = free_port(), secrets.token_hex(16)
    cmd = [str(BIN / "voila"), str(notebook), f"--port={port}", "--no-browser", "--Voila.ip=127.0.0.1",
           "--Voila.port_retries=0", f"--Voila.token={token}",
           "--show_tracebacks=True"]  # a failing cell shows its traceback, which the tests look for
    # Voila has no /api/status; its front-end bundle answers once the server does.
    with serve(cmd, home=home, cwd=notebook.parent, port=port, token=token,
               ready="/voila/static/voila.js") as server:
        yield server
