"""charlm.system.openmp: the OpenMP spin is bounded only where another task wants a CPU at start-up."""

from __future__ import annotations

from charlm.system import openmp
from charlm.cli import app

BUSY, QUIET = [1, 2, 1, 1, 3], [0, 0, 0, 0, 0]


def stat_file(tmp_path, running: int):
    path = tmp_path / "stat"
    path.write_text(f"cpu  1 2 3 4\nprocs_running {running}\nprocs_blocked 0\n")
    return str(path)


def test_others_running_reads_the_run_queue_less_this_process(tmp_path):
    assert openmp.others_running(3, 0.0, stat_file(tmp_path, 4)) == [3, 3, 3]
    assert openmp.others_running(2, 0.0, stat_file(tmp_path, 1)) == [0, 0]
    assert openmp.others_running(2, 0.0, str(tmp_path / "missing")) is None
    (tmp_path / "nostat").write_text("cpu  1 2 3 4\n")
    assert openmp.others_running(2, 0.0, str(tmp_path / "nostat")) is None


def test_quiet_means_an_empty_run_queue_at_every_read_and_a_load_within_the_cpus():
    assert openmp.machine_is_quiet(QUIET, 1.9, 2)
    assert openmp.machine_is_quiet(QUIET, 2.5, 2)
    assert not openmp.machine_is_quiet([0, 0, 1, 0, 0], 0.1, 2)
    assert not openmp.machine_is_quiet(BUSY, 0.1, 2)
    assert not openmp.machine_is_quiet(QUIET, 2.6, 2)  # tests between reads of the run queue
    assert not openmp.machine_is_quiet(None, 0.1, 2)
    assert not openmp.machine_is_quiet([], 0.1, 2)


def test_spin_count_long_when_quiet_bounded_when_busy_and_the_environment_first():
    assert openmp.spin_count({}, lambda: QUIET, 0.5, 2) is None  # libgomp's own 300,000
    assert openmp.spin_count({}, lambda: BUSY, 0.5, 2) == openmp.BUSY_SPINS == "1000"
    assert openmp.spin_count({}, lambda: QUIET, 9.0, 2) == "1000"
    assert openmp.spin_count({}, lambda: None, 0.5, 2) == "1000"
    for env in ({"GOMP_SPINCOUNT": "5"}, {"OMP_WAIT_POLICY": "passive"}):
        assert openmp.spin_count(env, lambda: BUSY, 9.0, 2) is None


def test_the_cli_leaves_libgomps_spin_on_a_quiet_machine(monkeypatch):
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(openmp, "others_running", lambda: QUIET)
    monkeypatch.setattr(openmp, "_load", lambda: 0.2)
    app._bounded_openmp_waits()
    assert "GOMP_SPINCOUNT" not in app.os.environ
    monkeypatch.setattr(openmp, "others_running", lambda: BUSY)
    app._bounded_openmp_waits()
    assert app.os.environ["GOMP_SPINCOUNT"] == "1000"
