"""Every example in the README runs as written: the set-up commands are the ones CI runs, each `bash` line
(in order, in one scratch folder that sees the repository's profiles/, data/ and tests/) exits 0, and each
`python` block runs without an exception (a client of the server against the README's `moe-offload serve`
line, started on a free port); their outputs go under runs/, never into the repository root."""

import contextlib
import io
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from offload_engine.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text("utf-8")
BLOCKS = re.findall(r"^```(\w+)\n(.*?)^```$", README, flags=re.S | re.M)
COMMANDS = [line for lang, body in BLOCKS if lang == "bash" for line in body.splitlines()
            if line.strip() and not line.startswith("#")]
PYTHON = [body for lang, body in BLOCKS if lang == "python"]
SERVE = re.search(r"^moe-offload serve --.*$", README, flags=re.M).group(0)  # the server the client block calls
SERVER_URL = "http://127.0.0.1:8000"
OUTPUT_FLAGS = ("--out", "--plot", "--trace-out")
SCRATCH = "runs"  # in .gitignore


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Outputs land here; the paths the examples read are links to the repository's."""
    work = tmp_path_factory.mktemp("readme")
    for name in ("profiles", "data", "tests"):
        (work / name).symlink_to(ROOT / name)
    return work


def test_the_readme_has_its_examples():
    assert len(COMMANDS) >= 15 and len(PYTHON) == 3
    assert not re.search(r"\.\./shared|\{\{", README), "the README points outside the repository or has a hole"


def test_benchmarks_points_inside_the_repository():
    """A command a new user copies from BENCHMARKS.md reads the repository's files, not a folder beside it."""
    assert not re.search(r"\.\./shared", (ROOT / "BENCHMARKS.md").read_text("utf-8"))


def test_the_setup_commands_are_the_ones_ci_runs():
    setup = [body.strip() for lang, body in BLOCKS if lang == "sh"]
    assert len(setup) == 2
    demo, tests = setup
    assert demo.endswith("moe-offload generate --profile profiles/demo.toml")
    assert tests.endswith("-m pytest -q") and tests in (ROOT / ".ci" / "run").read_text("utf-8")


def outputs(argv: list[str]) -> list[str]:
    """The paths a README command writes."""
    written = [value for flag, value in zip(argv, argv[1:]) if flag in OUTPUT_FLAGS]
    if argv[:4] == ["python", "-m", "offload_engine.tracing.trace_file", "convert"]:
        written.append([a for a in argv[4:] if not a.startswith("-")][1])
    return written


def test_the_examples_write_under_the_scratch_folder():
    written = [path for command in COMMANDS for path in outputs(shlex.split(command))]
    assert len(written) >= 5
    assert all(path.startswith(f"{SCRATCH}/") for path in written), written
    assert f"mkdir -p {SCRATCH}" in COMMANDS
    assert f"/{SCRATCH}/" in (ROOT / ".gitignore").read_text("utf-8").splitlines()


@pytest.mark.parametrize("command", COMMANDS)
def test_command(command, workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    argv = shlex.split(command)
    if argv[:2] == ["mkdir", "-p"]:
        (workdir / argv[2]).mkdir(parents=True, exist_ok=True)
    elif argv[0] == "moe-offload":
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(argv[1:]) == 0, command
    else:
        assert argv[:2] == ["python", "-m"], command
        done = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert done.returncode == 0, done.stderr


@pytest.fixture
def server(workdir):
    """The README's `moe-offload serve` command on a free port; its URL once /health answers 200."""
    import httpx

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "offload_engine.cli.main", *shlex.split(SERVE)[1:],
                             "--port", "0", "--quiet"], cwd=workdir, env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = re.search(r"listening on (http://\S+)", proc.stderr.readline()).group(1)
        deadline = time.monotonic() + 120
        while httpx.get(f"{url}/health").status_code != 200:
            assert proc.poll() is None and time.monotonic() < deadline, "the README's server did not start"
            time.sleep(0.2)
        yield url
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("block", range(len(PYTHON)))
def test_python_example(block, workdir, monkeypatch, request):
    monkeypatch.chdir(workdir)
    code = PYTHON[block]
    if "OpenAI(" in code:
        assert SERVER_URL in code
        code = code.replace(SERVER_URL, request.getfixturevalue("server"))
    with contextlib.redirect_stdout(io.StringIO()) as out:
        exec(compile(code, f"README python example {block}", "exec"), {"__name__": "readme"})
    assert out.getvalue().strip()


def test_the_examples_left_nothing_beside_the_scratch_folder(workdir):
    """After the commands above (when run with them, in this module's order): the scratch folder holds every
    output, the folder they ran in nothing else."""
    assert {p.name for p in workdir.iterdir()} - {"data", "profiles", "tests"} <= {SCRATCH}
