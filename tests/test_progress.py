"""smfnet_jax.cli.Progress: a bar on a terminal, a few plain lines in a log."""
import io

from smfnet_jax.cli import Progress


def test_plain_lines_without_a_terminal_first_throttled_last(monkeypatch):
    clock = iter([0.0, 1.0, 2.0, 40.0, 41.0, 42.0])  # start, then one reading per update
    monkeypatch.setattr("smfnet_jax.cli.time.perf_counter", lambda: next(clock))
    log = io.StringIO()  # not a terminal
    bar = Progress(5, "train", "step", file=log)
    assert bar.plain
    for i in range(5):
        bar.update(1, f"loss {i}")
    bar.close()
    lines = log.getvalue().splitlines()
    # after the first, after 30 s had passed (at 40 s), after the last; no carriage returns
    assert lines == ["train: 1/5 steps (1 s), loss 0", "train: 3/5 steps (40 s), loss 2",
                     "train: 5/5 steps (42 s), loss 4"]
    assert "\r" not in log.getvalue()


def test_resumed_count_and_disabled_progress():
    log = io.StringIO()
    bar = Progress(10, "train", "step", initial=8, file=log)
    bar.update(1)
    assert log.getvalue().startswith("train: 9/10 steps (")
    quiet = io.StringIO()
    off = Progress(3, "pairs", "pair", file=quiet, enabled=False)
    off.update(3, "x")
    off.write("skipping pair x: reason")  # messages are still shown
    off.close()
    assert quiet.getvalue() == "skipping pair x: reason\n"
