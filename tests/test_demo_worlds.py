"""benchmarks/demo_worlds.py: the worlds it builds, resuming, the gain distribution, one-line errors."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT
from test_train_cli import assert_one_line_error

sys.path.insert(0, str(ROOT / "benchmarks"))
import demo_worlds  # noqa: E402


def test_worlds_differ_in_seed_threads_or_instruction_set():
    worlds = demo_worlds.WORLDS
    assert len({(w.toy_seed, w.build_threads, w.cpu) for w in worlds.values()}) == len(worlds)
    assert {worlds[f"seed{seed}"].toy_seed for seed in range(5)} == set(range(5))
    assert worlds["two_threads"].build_threads == 2 and worlds["two_threads"].toy_seed == 0
    assert worlds["avx2"].environment()["ATEN_CPU_CAPABILITY"] == "avx2" and worlds["seed0"].environment() == {}
    assert set(demo_worlds.QUICK_WORLDS) <= set(worlds)


def fake_record(name: str, gain: float) -> dict:
    return {"world": name, "description": "", "model_hash": f"{abs(hash(name)) % 16**8:08x}", "before": 0.3, "after": 0.3 + gain,
            "gain": gain, "build_seconds": 100.0, "demo_seconds": 120.0, "steps": 80, "stages": []}  # fmt: skip


def test_finished_worlds_are_kept_and_rerun_when_the_settings_change(tmp_path, monkeypatch):
    measured = []
    gains = {"seed0": 0.12, "seed1": 0.10, "two_threads": 0.15}

    def measure(name, args, extra):
        measured.append(name)
        return fake_record(name, gains[name])

    monkeypatch.setattr(demo_worlds, "measure_world", measure)
    recipe = tmp_path / "demo.yaml"
    recipe.write_text((ROOT / "recipes" / "demo.yaml").read_text())

    def run(worlds, extra=()):
        args = demo_worlds.DemoWorldsArguments(worlds=list(worlds), recipe=str(recipe), output_dir=str(tmp_path / "out"))
        return demo_worlds.main(args, list(extra))

    run(["seed0", "seed1"])
    report = run(["seed0", "seed1", "two_threads"])
    assert measured == ["seed0", "seed1", "two_threads"]  # the finished two were not run again
    assert report["distribution"] == pytest.approx({"worlds": 3, "min": 0.10, "median": 0.12, "mean": 0.37 / 3, "at_least_target": 3})
    table = (tmp_path / "out" / "demo_worlds.md").read_text()
    assert table.count("\n| ") == 3 and "| two_threads | " in table and "+0.150" in table and "3 worlds: gain min +0.100, median +0.120" in table
    png = tmp_path / "out" / "demo_worlds.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "out" / demo_worlds.RESULTS_FILE).read_text())["worlds"].keys() == set(gains)

    recipe.write_text(recipe.read_text() + "\n# a comment changes no number\n")
    run(["seed0"])
    assert len(measured) == 3
    run(["seed0"], extra=["--learning_rate", "2e-4"])  # other training settings: other numbers
    recipe.write_text(recipe.read_text().replace("max_steps: 80", "max_steps: 81"))
    run(["seed0"])  # another setting in the recipe: other numbers
    assert measured == ["seed0", "seed1", "two_threads", "seed0", "seed0"]


def test_quick_runs_the_quick_worlds(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_worlds, "measure_world", lambda name, args, extra: fake_record(name, 0.1))
    report = demo_worlds.main(demo_worlds.DemoWorldsArguments(quick=True, output_dir=str(tmp_path)), [])
    assert list(report["worlds"]) == demo_worlds.QUICK_WORLDS


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--worlds", "seed9"], ["unknown world seed9", "did you mean seed"]),
        (["--max_steps", "0"], ["--max_steps must be at least 1"]),
        (["--recipe", "no/such.yaml"], ["no such recipe file"]),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, fragments, tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "demo_worlds.py"), "--output_dir", str(tmp_path), *args]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / demo_worlds.RESULTS_FILE).exists()
