"""One command: make the environment if it is missing, then start LoRA Studio (or, with --test, run the tests).

    python launch.py [--port 7860] [--listen --auth user:pass] [--models-dir DIR] [--outputs-dir DIR]
    python launch.py --test [pytest arguments]

Like AUTOMATIC1111's launcher: a .venv beside this file, torch installed first (torch==2.13.0 unless torch is
already there or TORCH_COMMAND says otherwise, e.g. TORCH_COMMAND="pip install torch --index-url
https://download.pytorch.org/whl/cu128"), then the project. A stamp of pyproject.toml skips all of that when
nothing changed, so a second start takes seconds. Only the standard library is used here.
"""
from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("LORA_STUDIO_VENV", ROOT / ".venv"))
DEFAULT_TORCH = "pip install torch==2.13.0"


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def run(cmd: list[str]) -> None:
    print("launch:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def has_module(python: Path, module: str) -> bool:
    return subprocess.run([str(python), "-c", f"import {module}"], capture_output=True).returncode == 0


def ensure_environment(extras: str) -> Path:
    if sys.version_info < (3, 10):
        sys.exit(f"launch: Python 3.10 or newer is needed; this is {sys.version.split()[0]}")
    python = venv_python()
    if not python.exists():
        print(f"launch: creating the environment in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    stamp = VENV / f".lora-studio-{extras or 'app'}"
    # The folder is in the stamp: the project is installed editable, so a venv another clone installed (a linked
    # .venv) would import that clone's code until it is installed from here again.
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + sys.version.encode()
                          + str(ROOT).encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == want:
        return python
    # torch first, so the user's build (CPU, CUDA, ROCm) is chosen here and never replaced by a dependency.
    torch_command = os.environ.get("TORCH_COMMAND")
    if torch_command or not has_module(python, "torch"):
        run([str(python), "-m", *shlex.split(torch_command or DEFAULT_TORCH)])
    target = f".[{extras}]" if extras else "."
    run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-e", target])
    stamp.write_text(want)
    return python


def main(argv: list[str]) -> int:
    if argv[:1] == ["--test"]:
        python = ensure_environment("test")
        return subprocess.run([str(python), "-m", "pytest", *argv[1:]], cwd=ROOT).returncode
    python = ensure_environment("")
    code = "import sys; from app.main import main; sys.exit(main(sys.argv[1:]))"
    os.chdir(ROOT)
    os.execv(str(python), [str(python), "-c", code, *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
