"""auto picks the exact-tier kernel by measurement, once per machine: the choice is cached next to the
built library, read back by later processes, and recorded with its reason in summary.json."""

from __future__ import annotations

import json

import torch

from trm_diag.kernels import choice


def test_auto_measures_once_caches_and_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("TRM_DIAG_CACHE", str(tmp_path))
    monkeypatch.delenv("TRM_DIAG_KERNEL", raising=False)
    monkeypatch.setattr(choice, "_DECIDED", {})
    cpu = torch.device("cpu")
    first = choice.measured_choice(cpu)
    speeds = first["rows_per_s"]
    assert {"native", "inductor", "eager"} <= set(speeds) and all(v > 0 for v in speeds.values())
    assert first["kernel"] == max(speeds, key=speeds.get)  # the fastest measured, never a slower one
    cached = list((tmp_path / "kernels").glob("choice-*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["kernel"] == first["kernel"]
    assert first["kernel"] in first["why"] and "rows/s" in first["why"]
    # a new process reads the cache: nothing is timed again
    monkeypatch.setattr(choice, "_DECIDED", {})
    monkeypatch.setattr(choice, "measure", lambda device: (_ for _ in ()).throw(AssertionError("measured again")))
    again = choice.measured_choice(cpu)
    assert again == first  # the same reason word for word: a report's bytes do not depend on who measured
    name, _ = choice.kernel_for(151_936, cpu)
    assert name == first["kernel"] and choice.decisions()["cpu"]["kernel"] == name
    monkeypatch.setenv("TRM_DIAG_KERNEL", "eager")  # a named kernel is no measurement
    assert choice.decisions() == {"any": {"kernel": "eager", "why": "TRM_DIAG_KERNEL=eager"}}


def test_a_damaged_cache_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setenv("TRM_DIAG_CACHE", str(tmp_path))
    monkeypatch.setattr(choice, "_DECIDED", {})
    path = choice._cache_file(torch.device("cpu"))
    path.parent.mkdir(parents=True)
    path.write_text("{half a file")
    assert choice.measured_choice(torch.device("cpu"))["kernel"] in ("native", "inductor", "eager")
    assert json.loads(path.read_text())["kernel"] in ("native", "inductor", "eager")
