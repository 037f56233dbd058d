"""Progress of long loops: plain lines on stderr when the output is not a terminal, a tqdm bar on one."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EXAMPLES
from diagnostics.experiments import Progress, console

LINE = re.compile(r"^(?P<desc>.+): step (?P<step>\d+)/(?P<total>\d+) \((?P<pct>\d+)%\)(, loss (?P<loss>\S+))?, "
                  r"elapsed [\d.:]+( s)?(, ETA [\d.:]+( s)?)?$")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(console.time, "perf_counter", fake)
    return fake


def test_a_line_every_tenth_of_the_steps_with_loss_elapsed_and_eta(clock: Clock) -> None:
    out = io.StringIO()
    bar = Progress(range(50), desc="run", stream=out, bar=False)
    for i in bar:
        clock.now += 0.5
        bar.report(loss=float(i))
    lines = out.getvalue().splitlines()
    assert len(lines) == 10
    assert lines[0] == "run: step 5/50 (10%), loss 4, elapsed 2.5 s, ETA 22.5 s"
    assert lines[-1] == "run: step 50/50 (100%), loss 49, elapsed 25.0 s"
    assert all(LINE.match(line) for line in lines), lines


def test_a_line_every_thirty_seconds_when_steps_are_slow(clock: Clock) -> None:
    out = io.StringIO()
    with Progress(total=1000, desc="slow", stream=out, bar=False) as bar:
        for _ in range(20):
            clock.now += 10.0
            bar.update()
    lines = out.getvalue().splitlines()
    # every 3rd step (30 s), and the last step at close
    assert [int(LINE.match(line)["step"]) for line in lines] == [3, 6, 9, 12, 15, 18, 20]
    assert lines[0] == "slow: step 3/1000 (0%), elapsed 30.0 s, ETA 2:46:10"  # 997 steps at 10 s


def test_resumed_run_counts_initial_steps_but_not_in_the_rate(clock: Clock) -> None:
    out = io.StringIO()
    bar = Progress(total=100, initial=50, desc="train", stream=out, bar=False)
    for _ in range(10):
        clock.now += 1.0
        bar.update()
    assert out.getvalue().splitlines()[0] == "train: step 60/100 (60%), elapsed 10.0 s, ETA 40.0 s"


def test_tqdm_bar_when_asked_and_lines_otherwise() -> None:
    pytest.importorskip("tqdm")
    out = io.StringIO()
    for _ in Progress(range(3), desc="bar", stream=out, bar=True):
        pass
    assert "bar:" in out.getvalue() and "3/3" in out.getvalue() and "step" not in out.getvalue()
    assert not console.interactive()  # pytest captures stdout: not a terminal, so lines by default
    assert Progress(range(3), stream=io.StringIO())._tqdm is None


@pytest.mark.parametrize("kwargs", [dict(every=0.0), dict(every=1.5), dict(seconds=0.0), dict(total=-1)])
def test_bad_cadence_is_an_error(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="Progress"):
        Progress(**{"total": 10, **kwargs})


def test_example_with_stdout_redirected_prints_progress_lines_on_stderr(tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    with open(log, "w", encoding="utf-8") as stdout:
        proc = subprocess.run(
            [sys.executable, str(EXAMPLES / "chain_monomial.py"), "--preset", "smoke", "--steps", "100",
             "--out", str(tmp_path / "out")],
            stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=600,
        )
    assert proc.returncode == 0, proc.stderr
    lines = [m for m in map(LINE.match, proc.stderr.splitlines()) if m]
    for run in ("sgd seed 0", "small_init seed 0", "slo seed 0"):
        steps = [int(m["step"]) for m in lines if m["desc"] == run]
        assert steps == list(range(10, 101, 10)), (run, proc.stderr)
    assert all(m["loss"] is not None and float(m["loss"]) >= 0 for m in lines)
    assert not any(map(LINE.match, log.read_text(encoding="utf-8").splitlines()))  # progress stays off stdout
