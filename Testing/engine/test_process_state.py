"""No process-wide state changed by library code (umask, ITK's warning switch, torch's
threads, the environment), and the small defects of issue 39 (items 4 and 6)."""

from __future__ import annotations

import argparse
import os
import threading

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from anomaly_localizer.errors import InputError

from phantoms import image_from, phantom_array


@pytest.fixture(scope="module")
def scored(tiny_package):
    from anomaly_localizer.core.pipeline import score_volume
    from anomaly_localizer.core.results import resolve_threshold
    arr = phantom_array(seed=3)
    image = image_from(arr)
    result = score_volume(image, tiny_package, ["rec"], mask=image_from((arr != 0).astype(np.uint8)), device="cpu")
    return image, result, resolve_threshold(tiny_package, result, "rec", raw=0.5)


def _no_umask(monkeypatch):
    def refuse(*a):
        raise AssertionError("os.umask called: it changes the mode of every thread's new files")
    monkeypatch.setattr(os, "umask", refuse)


# ------------------------------------------------------------------ process-wide state

def test_scoring_leaves_torch_threads_alone(tiny_package, monkeypatch):
    from anomaly_localizer.core.pipeline import score_volume
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    monkeypatch.setattr(torch, "get_num_threads", lambda: -1)  # as if another part of the program had set it
    arr = phantom_array(seed=4)
    score_volume(image_from(arr), tiny_package, ["rec"], mask=image_from((arr != 0).astype(np.uint8)), device="cpu")
    assert calls == []


def test_the_command_line_sets_the_threads_once(monkeypatch):
    from anomaly_localizer.cli import main
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    monkeypatch.setattr(torch, "get_num_threads", lambda: -1)
    main(["models"])
    assert len(calls) == 1


def test_results_and_worklists_are_written_without_touching_the_umask(scored, tmp_path, monkeypatch):
    from anomaly_localizer.core.results import write_results
    from anomaly_localizer.core.worklist import atomic_write
    image, result, threshold = scored
    _no_umask(monkeypatch)
    write_results(tmp_path / "r", image, result, threshold, {})
    atomic_write(tmp_path / "w.csv", "a,b\n")
    monkeypatch.undo()
    mask = os.umask(0o022)
    os.umask(mask)
    assert (tmp_path / "r").stat().st_mode & 0o777 == 0o777 & ~mask
    assert (tmp_path / "w.csv").stat().st_mode & 0o777 == 0o666 & ~mask


def test_itk_warnings_come_back_after_overlapping_quiet_blocks_in_threads():
    from anomaly_localizer.core.cstderr import itk_warnings_off, quiet_c_stderr
    sitk.ProcessObject.SetGlobalWarningDisplay(True)
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def a():
        with itk_warnings_off():
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def b():
        a_in.wait(5)
        with quiet_c_stderr():
            b_in.set()
            a_out.wait(5)
            assert not sitk.ProcessObject.GetGlobalWarningDisplay()  # a's end did not turn them back on

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    [t.start() for t in threads]
    [t.join(10) for t in threads]
    assert sitk.ProcessObject.GetGlobalWarningDisplay()


def test_screening_workers_get_their_threads_without_an_environment_variable(monkeypatch):
    from anomaly_localizer.tooling.screening.screen_cluster import worker_threads
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    monkeypatch.setattr(torch, "get_num_threads", lambda: -1)
    before = dict(os.environ)
    assert worker_threads(2) == 2 and calls == [2]
    assert worker_threads(None, dask_worker=type("W", (), {"nthreads": os.cpu_count() or 1})()) == 1
    assert dict(os.environ) == before


# --------------------------------------------------------------------------- small defects

def test_every_name_the_package_offers_imports():
    import anomaly_localizer
    from anomaly_localizer import resolve_package_for  # docs/screening.md
    assert callable(resolve_package_for)
    for name in anomaly_localizer.__all__:
        assert getattr(anomaly_localizer, name) is not None


def test_a_bug_while_writing_results_is_not_called_a_full_disk(scored, tmp_path, monkeypatch):
    import anomaly_localizer.core.results as results
    image, result, threshold = scored

    def broken(*a, **k):
        raise RuntimeError("a bug in the findings")
    monkeypatch.setattr(results, "find_findings", broken)
    with pytest.raises(RuntimeError, match="a bug in the findings"):
        results.write_results(tmp_path / "r", image, result, threshold, {})
    assert not (tmp_path / "r").exists() and not list(tmp_path.iterdir())


def test_an_itk_writer_error_is_still_said_as_a_write_failure(scored, tmp_path, monkeypatch):
    import anomaly_localizer.core.results as results
    image, result, threshold = scored

    def full(*a, **k):
        raise RuntimeError("Exception thrown in SimpleITK ImageFileWriter_Execute:\nNo space left on device")
    monkeypatch.setattr(results, "write_image", full)
    with pytest.raises(InputError, match="could not write .*No space left on device.*Free some space"):
        results.write_results(tmp_path / "r", image, result, threshold, {})
    assert not list(tmp_path.iterdir())


def test_an_empty_output_folder_is_replaced_where_rename_never_replaces_a_folder(scored, tmp_path, monkeypatch):
    """Windows: os.rename onto an existing folder fails, even an empty one."""
    import anomaly_localizer.core.results as results
    image, result, threshold = scored
    real = os.rename

    def windows_rename(src, dst):
        if os.path.exists(dst):
            raise FileExistsError(183, "Cannot create a file when that file already exists", str(dst))
        real(src, dst)
    monkeypatch.setattr(results.os, "rename", windows_rename)
    (tmp_path / "r").mkdir()
    results.write_results(tmp_path / "r", image, result, threshold, {})
    assert (tmp_path / "r" / "summary.json").is_file()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "theirs.txt").write_text("x")
    results.write_results(tmp_path / "full", image, result, threshold, {}, force=True)  # --force: moved aside
    assert not (tmp_path / "full" / "theirs.txt").exists() and (tmp_path / "full" / "summary.json").is_file()


def test_a_plugin_command_no_section_lists_is_shown_under_other():
    from anomaly_localizer.cli import _grouped_commands
    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    sub.add_parser("score", help="score scans")
    sub.add_parser("my-plugin-cmd", help="a plugin's own command")
    text = _grouped_commands(sub)
    assert "Other:" in text and "my-plugin-cmd" in text.split("Other:")[1]
    assert "score" in text.split("Other:")[0]
