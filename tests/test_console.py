"""The console: workers' progress and warnings reach the driver's bars through the board actor."""
import time

import ray

from edc_ray.pipeline import console


@ray.remote(num_cpus=0.1)
def _train_like(key: str, epochs: int) -> None:
    for epoch in range(1, epochs + 1):
        console.report_progress(key, f"eval {key}", epoch, epochs, f"top-1 {10.0 * epoch:.2f}%")
    console.warn(f"{key} saw something odd")


def test_workers_progress_and_warnings_reach_the_driver(ray_local, capsys):
    with console.progress_display():
        ray.get([_train_like.remote("a", 3), _train_like.remote("b", 2)])
    captured = capsys.readouterr()
    bars = captured.err
    assert "eval a: 100%" in bars and "3/3 epochs" in bars and "top-1 30.00%" in bars
    assert "eval b: 100%" in bars and "2/2 epochs" in bars and "top-1 20.00%" in bars
    assert "[edc-ray] a saw something odd" in captured.out and "[edc-ray] b saw something odd" in captured.out
    assert _gone(console.BOARD_NAME)  # the board goes with the display


def test_without_a_board_progress_is_a_no_op(ray_local):
    console.report_progress("x", "eval x", 1, 1)  # no display running: nothing to send to, no error


def _gone(name: str, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name)
        except ValueError:
            return True
        time.sleep(0.1)
    return False
