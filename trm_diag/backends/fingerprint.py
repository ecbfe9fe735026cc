"""The weights fingerprint of a checkpoint: sha256 over the full bytes of every weight file a backend loads
(the safetensors shards its index names, else every *.safetensors; pickle weights only where there are none).

Unlike report/assemble.model_fingerprint (config and the first MiB of each file: fast, but blind to a tensor
changed further in), one changed bit anywhere in the weights changes it. A file's digest is cached by its path,
size and modification time (TRM_DIAG_CACHE/weights.json), so a checkpoint is read in full once per machine.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from trm_diag.kernels.native import cache_dir

BLOCK = 8 << 20  # bytes read at a time
_MEMO: dict[tuple[str, int, int], str] = {}


def weight_files(model: str | Path) -> list[Path]:
    """The weight files a backend loads from a checkpoint folder, in name order."""
    p = Path(model)
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        except (OSError, ValueError, AttributeError):
            names = []
        if names:
            return [p / n for n in names]
    files = sorted(p.glob("*.safetensors"))
    return files or sorted([*p.glob("*.bin"), *p.glob("*.pt")])


def _cache_file() -> Path:
    return cache_dir() / "weights.json"


def _load_cache() -> dict[str, str]:
    try:
        data = json.loads(_cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_cache(entries: dict[str, str]) -> None:
    """Merge entries into the on-disk cache (best effort: a cache that cannot be written only costs time)."""
    f = _cache_file()
    try:
        f.parent.mkdir(parents=True, exist_ok=True)
        data = {**_load_cache(), **entries}
        tmp = f.with_name(f"{f.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, f)
    except OSError:
        pass


def file_digest(f: Path, cache: dict[str, str] | None = None) -> str:
    """sha256 of a file's bytes, memoised by (real path, size, mtime_ns)."""
    st = f.stat()
    key = (str(f.resolve()), st.st_size, st.st_mtime_ns)
    text_key = "\0".join(map(str, key))
    if key in _MEMO:
        return _MEMO[key]
    if cache is not None and text_key in cache:
        _MEMO[key] = cache[text_key]
        return cache[text_key]
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        while block := fh.read(BLOCK):
            h.update(block)
    _MEMO[key] = h.hexdigest()
    return _MEMO[key]


def weights_fingerprint(model: str | Path) -> str | None:
    """sha256 over each weight file's name and full digest; None for a folder without weight files."""
    files = weight_files(model)
    if not files:
        return None
    cache = _load_cache()
    h = hashlib.sha256()
    fresh: dict[str, str] = {}
    for f in files:
        digest = file_digest(f, cache)
        st = f.stat()
        fresh["\0".join(map(str, (f.resolve(), st.st_size, st.st_mtime_ns)))] = digest
        h.update(f"{f.name}\0{digest}\n".encode())
    if any(k not in cache for k in fresh):
        _save_cache(fresh)
    return h.hexdigest()
