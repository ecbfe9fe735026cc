"""The budgeted row store: rows in RAM up to the budget, beyond it in files that vanish with their block."""

from __future__ import annotations

import gc
import os

import pytest
import torch

from trm_diag.errors import UsageError
from trm_diag.report.row_store import (
    DEFAULT_BUDGET,
    RowStore,
    check_disk,
    clear_spill,
    parse_bytes,
    resolve_budget,
)


def _rows(n: int, width: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, width, generator=g) * 30).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16, torch.float64])
def test_rows_come_back_bit_for_bit_from_ram_and_from_disk(tmp_path, dtype):
    """Pieces written at any offset read back identical, by any row range, whether the block is RAM or a file."""
    width = 1000
    full = _rows(37, width, dtype, seed=1)
    store = RowStore(budget=full.numel() * full.element_size(), spill_dir=tmp_path / "spill")
    ram, disk = store.allocate(37, width, dtype), store.allocate(37, width, dtype)  # the second exceeds the budget
    assert type(ram).__name__ == "RamBlock" and type(disk).__name__ == "FileBlock"
    for block in (ram, disk):
        for a, b in ((0, 5), (5, 6), (6, 30), (30, 37)):  # pieces as the engine's steps cut them
            block.write(a, full[a:b])
        for a, b in ((0, 37), (3, 11), (36, 37)):
            got = block.read(a, b)
            assert got.dtype == dtype and torch.equal(got.view(torch.uint8), full[a:b].contiguous().view(torch.uint8))
    assert store.spilled_bytes == full.numel() * full.element_size() and store.held_peak == store.budget


def test_budget_is_an_account_of_live_ram_blocks(tmp_path):
    """A dropped RAM block gives its bytes back to the budget; blocks beyond it go to disk."""
    store = RowStore(budget=2 * 10 * 100 * 4, spill_dir=tmp_path)
    a = store.allocate(10, 100, torch.float32)
    b = store.allocate(10, 100, torch.float32)
    c = store.allocate(10, 100, torch.float32)
    assert [type(x).__name__ for x in (a, b, c)] == ["RamBlock", "RamBlock", "FileBlock"]
    del a
    gc.collect()
    assert type(store.allocate(10, 100, torch.float32)).__name__ == "RamBlock"
    assert store.held_peak == 2 * 4000 and store.spilled_blocks == 1


def test_spilled_files_have_no_name_and_free_their_space_when_dropped(tmp_path):
    """The spill folder never lists a file (nothing for a killed run to leave); the open file goes with its block."""
    spill = tmp_path / "spill"
    store = RowStore(budget=0, spill_dir=spill)
    block = store.allocate(64, 4096, torch.float32)
    block.write(0, _rows(64, 4096, torch.float32, seed=2))
    fd = block.file.fileno()
    assert list(spill.iterdir()) == [] and os.fstat(fd).st_size == 64 * 4096 * 4
    assert os.readlink(f"/proc/self/fd/{fd}").endswith("(deleted)")  # unlinked (or O_TMPFILE) from the start
    del block
    gc.collect()
    with pytest.raises(OSError):
        os.fstat(fd)


def test_clear_spill_removes_what_a_killed_run_left(tmp_path):
    spill = tmp_path / "spill"
    (spill / "sub").mkdir(parents=True)
    (spill / "rows-abc").write_bytes(b"x" * 100)
    (spill / "sub" / "f").write_text("y")
    assert clear_spill(spill) == 2 and spill.is_dir() and list(spill.iterdir()) == []
    assert clear_spill(tmp_path / "new") == 0 and (tmp_path / "new").is_dir()


@pytest.mark.parametrize(
    ("text", "value"),
    [("4GiB", 4 << 30), ("4g", 4 << 30), ("512MiB", 512 << 20), ("1.5 GB", 3 << 29), ("0", 0), ("123", 123)],
)
def test_sizes_parse_in_binary_units(text, value):
    assert parse_bytes(text, "--memory-budget") == value


@pytest.mark.parametrize("text", ["", "lots", "-1GiB", "4XB", "nan", "inf"])
def test_bad_sizes_are_one_line_usage_errors(text):
    with pytest.raises(UsageError, match=r"--memory-budget '.*' is not a size"):
        parse_bytes(text, "--memory-budget")


def test_budget_comes_from_the_option_then_the_environment_then_the_default(monkeypatch):
    monkeypatch.delenv("TRM_DIAG_MEMORY_BUDGET", raising=False)
    assert resolve_budget(None) == (DEFAULT_BUDGET, "default")
    monkeypatch.setenv("TRM_DIAG_MEMORY_BUDGET", "3GiB")
    assert resolve_budget(None) == (3 << 30, "environment")
    assert resolve_budget(5) == (5, "option")
    monkeypatch.setenv("TRM_DIAG_MEMORY_BUDGET", "much")
    with pytest.raises(UsageError, match="TRM_DIAG_MEMORY_BUDGET 'much' is not a size"):
        resolve_budget(None)


def test_disk_check_names_the_need_and_the_free_space(tmp_path, monkeypatch):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=3 << 30))
    check_disk(1 << 30, tmp_path / "not" / "yet", "rows", "fix it")  # 1 GiB fits beside the 1 GiB margin
    with pytest.raises(UsageError, match=r"rows needs up to 2\.5 GiB on disk, but '.*' has 3\.0 GiB free"):
        check_disk(5 << 29, tmp_path / "not" / "yet", "rows", "fix it")
    check_disk(-5, tmp_path, "rows", "fix it")  # nothing beyond the budget: nothing to check
