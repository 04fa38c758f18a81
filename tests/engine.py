"""The project's container engine (scripts/engine.sh) for the tests that run containers
(tests/images, tests/compose): its environment and its docker client."""

import os
import pathlib
import subprocess

ENGINE = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "engine.sh"


def engine_env():
    """This process's environment with DOCKER_HOST set to the engine's socket."""
    line = subprocess.run(["bash", ENGINE, "env"], check=True, capture_output=True, text=True).stdout
    key, value = line.strip().removeprefix("export ").split("=", 1)
    return {**os.environ, key: value}


ENV = engine_env()


def docker(*args, check=True, timeout=120):
    """Debian's docker client against the engine; its stdout, stripped."""
    run = subprocess.run(["/usr/bin/docker", *args], env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and run.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: {run.stderr.strip()}")
    return run.stdout.strip()
