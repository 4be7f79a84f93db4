"""rewards.py from every kind of caller: a script with and without a main guard, a script on standard input,
`python -c`, a notebook kernel, a thread and a forked child. Each runs in its own process, gets the scores that a
guarded script run from a file gets, runs its top-level code once (workers never import the caller's `__main__`)
and ends well within its time limit, even beside another module named rewards in its working directory."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


CALLER_TIMEOUT_S = 120  # a hang is the failure looked for; the start-up takes a few seconds

# Answers that need math_verify (the worker pool) and ones the fast path decides, right and wrong.
COMPLETIONS = ["\\boxed{\\sqrt{12}}", "\\boxed{\\sqrt{3}}", "so $\\boxed{(x+1)^2}$", "\\boxed{0.75}", "\\boxed{7}"]
GOLDS = ["2\\sqrt{3}", "2\\sqrt{3}", "x^2+2x+1", "3/4", "8"]

PREAMBLE = """\
import json, os, sys, threading
sys.path.insert(0, {root!r})
with open({marker!r}, "a") as marker:  # top-level code: must run once, in the caller's own process
    marker.write(f"{{os.getpid()}}\\n")
import rewards

COMPLETIONS = {completions!r}
GOLDS = {golds!r}


def scores():
    return rewards.accuracy_reward(COMPLETIONS, answer=GOLDS) + [rewards.verify(c, g) for c, g in zip(COMPLETIONS, GOLDS)]


"""

CALLS = {
    "top_level": 'print("SCORES", json.dumps(scores()), flush=True)\n',
    "guarded": 'if __name__ == "__main__":\n    print("SCORES", json.dumps(scores()), flush=True)\n',
    "thread": (
        "result = {}\n"
        "thread = threading.Thread(target=lambda: result.update(scores=scores()))\n"
        "thread.start()\n"
        "thread.join()\n"
        'print("SCORES", json.dumps(result["scores"]), flush=True)\n'
    ),
    # The parent's pool is running when the child is forked; the child must start its own.
    "fork": (
        "scores()\n"
        "read_end, write_end = os.pipe()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os.close(read_end)\n"
        "    with os.fdopen(write_end, 'w') as out:\n"
        "        out.write(json.dumps(scores()))\n"
        "    os._exit(0)\n"
        "os.close(write_end)\n"
        "with os.fdopen(read_end) as child:\n"
        '    print("SCORES", child.read(), flush=True)\n'
        "os.waitpid(pid, 0)\n"
    ),
}

NOTEBOOK_RUNNER = """\
import sys
import nbformat
from nbclient import NotebookClient

notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(sys.stdin.read())])
NotebookClient(notebook, kernel_name="python3", timeout=600).execute()
for output in notebook.cells[0].outputs:
    print(output.get("text", ""), end="")
"""


def caller_code(marker, call: str) -> str:
    return PREAMBLE.format(root=str(ROOT), marker=str(marker), completions=COMPLETIONS, golds=GOLDS) + CALLS[call]


def start_caller(kind: str, tmp_path):
    """(process, marker file) for one kind of caller, started and not waited for."""
    marker = tmp_path / f"{kind}.marker"
    call = {"file_guarded": "guarded", "file_no_guard": "top_level", "stdin": "top_level", "command": "top_level",
            "notebook": "top_level", "thread": "thread", "fork": "fork"}[kind]  # fmt: skip
    code = caller_code(marker, call)
    script = tmp_path / f"{kind}.py"
    script.write_text(code)
    stdin = subprocess.DEVNULL
    if kind in ("file_guarded", "file_no_guard", "thread", "fork"):
        command = [sys.executable, str(script)]
    elif kind == "stdin":
        command, stdin = [sys.executable, "-"], script.open()
    elif kind == "command":
        command = [sys.executable, "-c", code]
    else:
        command, stdin = [sys.executable, "-c", NOTEBOOK_RUNNER], script.open()
    env = {**os.environ, "POLARIS_REWARD_WORKERS": "1"}  # one worker each: the callers run side by side
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    if stdin is not subprocess.DEVNULL:
        stdin.close()  # the child has its own copy
    return process, marker


def finish(process) -> tuple[list | None, str]:
    try:
        out, err = process.communicate(timeout=CALLER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"caller still running after {CALLER_TIMEOUT_S} s: {err[-2000:]}")
    lines = [line for line in out.splitlines() if line.startswith("SCORES ")]
    return (json.loads(lines[-1].split(" ", 1)[1]) if lines else None), err


KINDS = ["file_guarded", "file_no_guard", "stdin", "command", "notebook", "thread", "fork"]


def test_every_kind_of_caller_gets_the_guarded_scripts_scores_and_runs_once(tmp_path):
    pytest.importorskip("nbclient")
    # The callers run in tmp_path, beside another rewards.py: the workers must use the one the caller imported.
    (tmp_path / "rewards.py").write_text('"""Another copy, in the working directory: not the verifier."""\n')
    started = {kind: start_caller(kind, tmp_path) for kind in KINDS}  # side by side: each mostly waits on start-up
    results = {}
    for kind, (process, marker) in started.items():
        scores, err = finish(process)
        runs = marker.read_text().splitlines() if marker.exists() else []
        results[kind] = (scores, len(runs), process.returncode, err)
    reference = results["file_guarded"][0]
    assert reference == [1.0, 0.0, 1.0, 1.0, 0.0] * 2, results["file_guarded"][3][-2000:]
    for kind, (scores, runs, returncode, err) in results.items():
        assert returncode == 0 and "Traceback" not in err, f"{kind}: {err[-2000:]}"
        assert scores == reference, f"{kind}: {scores} != {reference}"
        assert runs == 1, f"{kind}: top-level code ran in {runs} processes"
