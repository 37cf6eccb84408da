"""The start-up clock: the line a run prints reads back, stage by stage, as the bench reads it."""

from pipeline.bench import startup_stages
from pipeline.start import STARTUP_LINE, StartupClock


def test_the_startup_line_reads_back_as_its_stages_in_order():
    clock = StartupClock(origin=1000.0)
    clock.mark("Ray + imports", 1004.5)
    clock.mark("first batch", 1017.3)
    clock.mark("data decoded", 1009.0)
    clock.mark("first step", 0.0)  # not reached: left out
    clock.mark("model built", 990.0)  # before this command started (a resumed run's earlier attempt): left out
    line = clock.line()
    assert line == STARTUP_LINE + "Ray + imports 4.5, data decoded 9.0, first batch 17.3"
    assert startup_stages(f"noise\n{line}\nwall time 3.0 s") == {"Ray + imports": 4.5, "data decoded": 9.0,
                                                                 "first batch": 17.3}
    assert startup_stages("no such line") == {}
