"""metrics.jsonl has one reader (`rundir.read_metrics`) with one damage policy, used by the
resumed run's cut and by `charlm plot`."""

import json

from charlm.artifacts.rundir import MetricsLog, read_metrics


def test_damaged_rows_are_skipped_with_one_warning_and_a_torn_last_line_quietly(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    rows = [{"kind": "train", "step": 1}, {"kind": "val", "step": 2}]
    path.write_bytes(b"not json\n" + json.dumps(rows[0]).encode() + b"\n[1, 2]\n\n"
                     + json.dumps(rows[1]).encode() + b'\n"text"\n{"kind": "tr')
    assert read_metrics(path) == rows
    assert capsys.readouterr().err == f"charlm: warning: skipped 3 damaged rows of {path}\n"


def test_a_clean_file_reads_without_a_word(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n')
    assert read_metrics(path) == [{"step": 1}, {"step": 2}]
    assert read_metrics(path, lambda row: None if row["step"] == 1 else row["step"]) == [2]
    assert capsys.readouterr().err == ""


def test_a_row_the_caller_refuses_counts_as_damaged(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": "x"}\n')

    def step(row):
        if not isinstance(row["step"], int):
            raise ValueError("not a step")
        return row["step"]

    assert read_metrics(path, step) == [1]
    assert capsys.readouterr().err == f"charlm: warning: skipped 1 damaged row of {path}\n"


def test_resuming_keeps_the_rows_up_to_the_checkpoint_under_the_same_policy(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 5}\n{"step": 9}\n{"step": 1')
    MetricsLog(path, keep_until_step=5).close()
    assert path.read_text() == '{"step": 1}\n{"step": 5}\n'
    assert capsys.readouterr().err == f"charlm: warning: skipped 1 damaged row of {path}\n"
