"""The bench's arithmetic (its measurements are benchmarks, run by `finetune bench`, not tests)."""

from pipeline.bench import bracketed_pipeline_runs, summarize


def test_each_pipeline_run_is_compared_with_the_bare_loop_measured_around_it():
    again = iter([30.0, 20.0])  # the bare loop after run 1, after run 2
    runs = bracketed_pipeline_runs([1, 2], lambda w: {"workers": w, "steady_images_per_sec": 25.0},
                                   lambda: next(again), 24.0)
    assert [r["ceiling_bracket"] for r in runs] == [[24.0, 30.0], [30.0, 20.0]]
    assert [r["ceiling_images_per_sec"] for r in runs] == [27.0, 25.0]
    for r in runs:
        r.update(with_first_epoch_images_per_sec=24.0, test_acc=0.5, first_batch_s=1.0, first_step_s=2.0,
                 first_epoch_line_s=3.0)
    rows = summarize({"ceiling": {"images_per_sec": 24.0}, "pipeline": runs, "config": {"batch_size": 128}})
    steady = [c for name, _, c in rows if "steady" in name]
    assert steady[0].startswith("0.93 x ceiling (bare loop before / after: 24.0 / 30.0 img/s)")
    assert steady[1].startswith("1.00 x ceiling")


def test_without_a_ceiling_section_the_runs_are_not_bracketed():
    runs = bracketed_pipeline_runs([1], lambda w: {"workers": w}, None, None)
    assert runs == [{"workers": 1}]
