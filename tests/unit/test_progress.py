"""The one progress display: what the step bar shows as metrics arrive, and the byte and entry views."""

from __future__ import annotations

import io

from rich.console import Console

from megatron_rl.progress import byte_progress, entry_progress, step_progress


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=160, force_terminal=False, color_system=None), out


def test_step_bar_shows_fields_seconds_per_step_and_keeps_missing_metrics() -> None:
    console, out = _console()
    fields = [("reward", "reward/mean", ".3f"), ("loss", "train/loss", ".2e")]
    with step_progress("GRPO", 10, start=2, fields=fields, console=console) as bar:
        bar.update(3, {"reward/mean": 0.25, "train/loss": 0.5, "timing/step_s": 1.5})
        bar.update(4, {"reward/mean": 0.5})  # loss and s/step keep their last values
    last = out.getvalue().strip().splitlines()[-1]
    assert "GRPO" in last and "4/10" in last
    assert "reward 0.500" in last and "loss 5.00e-01" in last and "1.50 s/step" in last


def test_step_bar_before_any_metric_shows_dashes_and_disabled_bar_prints_nothing() -> None:
    console, out = _console()
    with step_progress("SFT", 5, fields=[("val", "val/loss", ".4g")], console=console):
        pass
    last = out.getvalue().strip().splitlines()[-1]
    assert "0/5" in last and "val -" in last and "- s/step" in last
    console, out = _console()
    with step_progress("SFT", 5, console=console, enabled=False) as bar:
        bar.update(1, {"timing/step_s": 1.0})
    assert out.getvalue() == ""


def test_byte_progress_counts_bytes_and_disabled_is_a_noop() -> None:
    with byte_progress("convert", 100, enabled=False) as advance:
        advance(50)  # no bar, no error
    with byte_progress("convert", 100) as advance:
        advance(100)


def test_entry_rows_show_state_and_steps() -> None:
    console, out = _console()
    with entry_progress(console) as rows:
        rows.add("tiny_grpo", 20)
        rows.add("tiny_sft", 30)
        rows.start("tiny_grpo")
        rows.update("tiny_grpo", "running", 5)
        rows.finish("tiny_grpo", "passed", 20)
    text = out.getvalue()
    assert "tiny_grpo" in text and "20/20" in text and "passed" in text
    assert "tiny_sft" in text and "0/30" in text and "waiting" in text
