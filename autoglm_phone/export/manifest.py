"""``manifest.json``: everything needed to run an exported folder, and the check that its files
are the ones written.

Keys: ``format_version``; ``format`` (``executorch`` / ``onnx``) and ``backend``; ``precision``
and ``quantization`` (scheme, weight bits, group size; ``null`` at fp32/fp16); ``model``
(``MultiModalConfig.to_dict()``); ``source`` (the checkpoint exported, or null); ``tokenizer``
(the folder the tokenizer files are copied to); ``shapes`` (the fixed text length and audio
clip, the generation prompt length and KV cache slots); ``methods`` (per method: its file and each
input's and output's name, shape and dtype); ``files`` (every file but the manifest: size in
bytes and sha256); ``export_seconds`` per method; ``versions`` of the libraries that wrote it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_table(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file under ``folder`` except the manifest: ``{relative path: {size, sha256}}``."""
    return {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }


def write_manifest(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write ``manifest`` with the format version and the file table; return what was written."""
    data = {"format_version": FORMAT_VERSION, **manifest, "files": file_table(folder)}
    (folder / MANIFEST_NAME).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return data


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of an exported folder, after checking every file it lists (size, sha256):
    a missing or changed file is refused by name."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {MANIFEST_NAME}; not an exported folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    version = data.get("format_version") if isinstance(data, dict) else None
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {version!r} is not one this library reads (1..{FORMAT_VERSION})"
        )
    for name, entry in data["files"].items():
        file = folder / name
        if not file.is_file():
            raise FileNotFoundError(f"{file}: listed in {MANIFEST_NAME} but missing")
        if file.stat().st_size != entry["size"] or sha256(file) != entry["sha256"]:
            raise ValueError(
                f"{file}: does not match {MANIFEST_NAME} (size or sha256 differ); the folder was "
                "changed after export, re-export it"
            )
    return data
