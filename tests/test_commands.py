"""The `edc-ray` command: its subcommands, their --help (with the config keys), errors, and the demo."""
import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser

import pytest

from edc_ray.commands import COMMANDS, main
from edc_ray.pipeline.report_page import accuracy_rows

BIN = os.path.dirname(sys.executable)
# Lines Ray forwards from its workers ("(RayTrainWorker pid=...)"), its C++ core ("core_worker.cc:"), its
# Python loggers ("INFO worker.py:...") and Ray Train's own messages.
RAY_INTERNAL = re.compile(r"^\s*(\x1b\[\d+m)?\(\w+ pid=|\.cc:\d+|\b(INFO|DEBUG) \w+\.py:\d+|"
                          r"Checkpoint successfully created|Moving model to device")  # the venv's bin folder, where pip installed the edc-ray script


def edc_ray(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The installed `edc-ray` script, run as a user would."""
    return subprocess.run([os.path.join(BIN, "edc-ray"), *args], capture_output=True, text=True, timeout=timeout)


def test_the_command_lists_its_subcommands_and_refuses_others(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    assert main(["distil"]) == 2
    assert "unknown command 'distil'; choose one of condense, prepare" in capsys.readouterr().err
    assert main([]) == 2


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_subcommand_has_help(command):
    done = edc_ray(command, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: edc-ray {command}")
    takes_config = command in ("condense", "evaluate", "benchmark")
    assert ("synthesis.iterations = 200" in done.stdout) == takes_config  # every config key, with its default
    assert ("init.score_observers = None" in done.stdout) == takes_config


def test_report_of_a_folder_that_is_not_a_run(tmp_path):
    done = edc_ray("report", str(tmp_path))
    assert done.returncode == 2 and "is not a finished run folder" in done.stderr


@pytest.mark.slow
def test_the_demo_runs_through_the_command_and_reports(tmp_path):
    run = tmp_path / "run"
    small = ["observers.epochs=1", "synthesis.iterations=2", "evaluation.epochs=1", "evaluation.seeds=[0]",
             f"data.root={tmp_path / 'digits'}", f"output.run_dir={run}", "ray.synthesis_actors=1"]
    done = edc_ray("condense", *[arg for s in small for arg in ("--set", s)], timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"run folder: {run}" in done.stdout and "final top-1" in done.stdout
    console = done.stdout + done.stderr
    for stage in ("prepare", "observers", "statistics", "synthesis", "evaluation", "report"):
        assert f"[edc-ray] stage {stage} ..." in console and f"[edc-ray] stage {stage} done in" in console
    for bar in ("observer 0-convnet_d2: 100%", "statistics tasks: 100%", "synthesis units: 100%",
                "eval distilled-convnet_d2 seed 0: 100%", "eval random-convnet_d2 seed 0: 100%"):
        assert bar in console, bar
    assert "top-1" in console.split("eval distilled-convnet_d2 seed 0: 100%")[-1].splitlines()[0]
    ray_lines = [line for line in console.splitlines() if RAY_INTERNAL.search(line)]
    assert not ray_lines, ray_lines[:5]
    check_html_report(run)
    (run / "report.md").unlink()
    (run / "report.html").unlink()
    shown = edc_ray("report", str(run), "--write")
    assert shown.returncode == 0 and shown.stdout.startswith("# edc-ray report: digits / edc / IPC 2")
    assert (run / "report.md").read_text() == shown.stdout
    check_html_report(run)  # rebuilt from report.json and the shards
    # --verbose brings Ray's own lines back (one more student: only its Ray Train runs start)
    verbose = edc_ray("condense", "--verbose", *[arg for s in small + ["evaluation.students=[convnet_d1]",
                                                                       "evaluation.random_baseline=false"]
                                                 for arg in ("--set", s)], timeout=900)
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert any(RAY_INTERNAL.search(line) for line in (verbose.stdout + verbose.stderr).splitlines())


class _Page(HTMLParser):
    """The tables of a page (id -> rows of cell texts, with an image count per cell) and its images."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self.table, self.cell = {}, [], None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.table = self.tables.setdefault(attrs.get("id"), [])
        elif tag == "tr" and self.table is not None:
            self.table.append([])
        elif tag in ("td", "th") and self.table is not None:
            self.cell = {"text": "", "images": 0}
            self.table[-1].append(self.cell)
        elif tag == "img":
            self.images.append(attrs)
            if self.cell is not None:
                self.cell["images"] += 1

    def handle_endtag(self, tag):
        if tag == "table":
            self.table = None
        elif tag in ("td", "th"):
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell["text"] += data


def check_html_report(run):
    """report.html is self-contained and shows what report.json holds."""
    report = json.loads((run / "report.json").read_text())
    page = _Page()
    page.feed((run / "report.html").read_text())
    assert page.images and all(img["src"].startswith("data:image/png;base64,") for img in page.images)
    accuracy = [[c["text"] for c in row] for row in page.tables["accuracy"][1:]]
    assert accuracy == accuracy_rows(report) and len(accuracy) == 2  # distilled and random, one student
    assert any(img.get("id") == "curves" for img in page.images)  # the learning curves
    header, *rows = page.tables["images"]
    assert [c["text"] for c in header] == ["class", "real initial images", "distilled", "random real subset"]
    assert [row[0]["text"] for row in rows] == report["shown"]["classes"] == [str(k) for k in range(10)]
    assert all(cell["images"] == 1 for row in rows for cell in row[1:])  # every class, every set
    observers = [[c["text"] for c in row] for row in page.tables["observers"][1:]]
    assert [row[0] for row in observers] == [o["name"] for o in report["observers"]]
    assert sorted(row[0]["text"] for row in page.tables["stages"][1:]) == sorted(report["stage_seconds"])
