"""Read back what an offline W&B run recorded (wandb 0.31 keeps the run config, summary, history
and artifacts only inside run-<id>.wandb: no config.yaml beside it).

The .wandb file is a LevelDB-style log (32 KiB blocks; each chunk a 7-byte header: CRC32, length,
type FULL/FIRST/MIDDLE/LAST) after a 7-byte file header (":W&B", magic 0xBEE1, version), each
record a `wandb_internal_pb2.Record` protobuf. No wandb API reads it back in this version.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B transaction log")
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # zero padding up to the block end
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            buf = chunk
        elif kind == FIRST:
            buf = chunk
            continue
        elif kind == MIDDLE:
            buf += chunk
            continue
        else:
            buf += chunk
        rec = pb.Record()
        rec.ParseFromString(buf)
        yield rec
        buf = b""


def _nested(target: dict, keys: list[str], value) -> None:
    for k in keys[:-1]:
        target = target.setdefault(k, {})
    target[keys[-1]] = value


@dataclass
class OfflineRun:
    path: Path
    run_id: str = ""
    group: str = ""
    job_type: str = ""
    sweep_id: str = ""
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    artifacts: list[dict] = field(default_factory=list)  # {name, type, metadata, paths, references}


def read_run(wandb_file: str | Path, wait_s: float = 20.0) -> OfflineRun:
    """The run recorded in `wandb_file`. wandb-core may still be writing it after `run.finish()`
    returned (seen once in this suite): wait up to `wait_s` for its exit record."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            recs = list(records(wandb_file))
        except Exception:  # noqa: BLE001 - a chunk half written: read again
            if time.monotonic() > deadline:
                raise
            recs = []
        if any(r.WhichOneof("record_type") == "exit" for r in recs) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    run = OfflineRun(Path(wandb_file))
    for rec in recs:
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run  # a later run record (an update) may leave fields empty: keep the set ones
            run.run_id = r.run_id or run.run_id
            run.group, run.job_type = r.run_group or run.group, r.job_type or run.job_type
            run.sweep_id = r.sweep_id or run.sweep_id
            for item in r.config.update:
                run.config[item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in rec.config.update:
                if item.key:
                    run.config[item.key] = json.loads(item.value_json)
                else:
                    _nested(run.config, list(item.nested_key), json.loads(item.value_json))
        elif kind == "summary":
            for item in rec.summary.update:
                keys = [item.key] if item.key else list(item.nested_key)
                run.summary[keys[0] if len(keys) == 1 else "/".join(keys)] = json.loads(item.value_json)
        elif kind == "history":
            row = {}
            for item in rec.history.item:
                keys = [item.key] if item.key else list(item.nested_key)
                row["/".join(keys)] = json.loads(item.value_json)
            run.history.append(row)
        elif kind == "artifact":
            a = rec.artifact
            run.artifacts.append({
                "name": a.name, "type": a.type, "metadata": json.loads(a.metadata) if a.metadata else {},
                "paths": [c.path for c in a.manifest.contents],
                "references": [c.ref for c in a.manifest.contents if c.ref]})
    return run


def offline_runs(folder: str | Path) -> list[OfflineRun]:
    """Every offline run under folder/wandb/ (oldest first)."""
    return [read_run(f) for f in sorted(Path(folder).glob("wandb/offline-run-*/run-*.wandb"))]
