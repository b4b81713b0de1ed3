"""What the terminal shows: our stage lines, progress bars and warnings, not Ray's internal log lines.

Ray forwards every worker's stdout and stderr to the driver (core-worker lines, Ray Train's placement and
checkpoint lines) unless started with `log_to_driver=False`; we start it that way, so those lines stay
in Ray's log files (`RAY_LOGS` on each node), and `--verbose` brings them back. Code in Ray Train
workers reports its progress and its warnings to one `ProgressBoard` actor (by name, so nothing is
passed along), and a thread of the driver draws a bar per training run from it and prints the warnings.
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator

import ray
from tqdm import tqdm

BOARD_NAME = "edc-ray-progress"
RAY_LOGS = "/tmp/ray/session_latest/logs"  # on each node (Ray's default temp folder)
POLL_S = 0.5
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} epochs [{elapsed}<{remaining}{postfix}]"


@ray.remote(num_cpus=0)
class ProgressBoard:
    """The latest progress of every running training run, and warnings not yet shown."""

    def __init__(self) -> None:
        self.runs: dict[str, tuple[str, int, int, str]] = {}
        self.messages: list[str] = []

    def update(self, key: str, desc: str, done: int, total: int, text: str) -> None:
        self.runs[key] = (desc, done, total, text)

    def say(self, text: str) -> None:
        self.messages.append(text)

    def take(self) -> tuple[dict[str, tuple[str, int, int, str]], list[str]]:
        """Every run's progress, and the messages since the last call."""
        messages, self.messages = self.messages, []
        return dict(self.runs), messages


_last_sent: dict[str, float] = {}
_display_running = False


def _board():
    """The session's board (None outside a Ray session that shows progress). Looked up each time, not
    kept: a worker process may outlive the session whose board it saw."""
    if not ray.is_initialized():
        return None
    try:
        return ray.get_actor(BOARD_NAME)
    except ValueError:
        return None


def report_progress(key: str, desc: str, done: int, total: int, text: str = "") -> None:
    """Tell the driver that run `key` (shown as `desc`) is at `done` of `total` epochs, with `text` (e.g.
    the latest top-1). Sent at most every `POLL_S` per run, and always at the end; without a board
    (single process, a bare Ray instance) it does nothing."""
    now = time.monotonic()
    if done < total and now - _last_sent.get(key, float("-inf")) < POLL_S:
        return
    _last_sent[key] = now
    board = _board()
    if board is not None:
        board.update.remote(key, desc, done, total, text)


def warn(text: str) -> None:
    """A warning of ours from any process: on the driver printed above the bars; in a worker printed
    into Ray's log file and sent to the driver through the board."""
    line = f"[edc-ray] {text}"
    if _display_running:
        tqdm.write(line)
        return
    print(line, flush=True)
    board = _board()
    if board is not None:
        board.say.remote(text)


class _Display:
    """Draws the board's runs as tqdm bars until stopped (a daemon thread of the driver)."""

    def __init__(self, board) -> None:
        self.board = board
        self.bars: dict[str, tqdm] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="edc-ray-progress", daemon=True)

    def _loop(self) -> None:
        while not self.stop.wait(POLL_S):
            self.draw()
        self.draw()

    def draw(self) -> None:
        try:
            runs, messages = ray.get(self.board.take.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - the display must never take the run down (Ray shutting down)
            return
        for text in messages:
            tqdm.write(f"[edc-ray] {text}")
        for key, (desc, done, total, text) in runs.items():
            bar = self.bars.get(key)
            if bar is None:
                bar = self.bars[key] = tqdm(total=total, desc=desc, bar_format=BAR_FORMAT)
            if bar.disable:
                continue
            bar.update(done - bar.n)
            bar.set_postfix_str(text, refresh=False)
            bar.refresh()
            if done >= total:
                bar.close()
                bar.disable = True

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=15)
        for bar in self.bars.values():
            if not bar.disable:
                bar.close()


@contextlib.contextmanager
def progress_display() -> Iterator[None]:
    """While inside: a board actor collects the workers' progress, and the driver draws it."""
    global _display_running
    board = ProgressBoard.options(name=BOARD_NAME, get_if_exists=True).remote()
    display = _Display(board)
    display.thread.start()
    _display_running = True
    try:
        yield
    finally:
        _display_running = False
        display.close()
        ray.kill(board)
