"""Read an offline W&B run file (`run-ID.wandb`) without a server: its records, config, run id, sweep id.

The file is a LevelDB-style log (wandb's own format: a 7-byte header ':W&B' + magic + version, then
32 KiB blocks of records, each with a 7-byte header crc32/length/type) of `wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, raw, part = 7, [], b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # the rest of a block too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            raw.append(chunk)
        elif kind == FIRST:
            part = chunk
        elif kind == MIDDLE:
            part += chunk
        elif kind == LAST:
            raw.append(part + chunk)
    out = []
    for r in raw:
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(r)
        out.append(rec)
    return out


def summary(path: Path) -> dict:
    """{run_id, sweep_id, entity, project, group, job_type, tags, name, config (last value per key),
    artifacts [(name, type, files)], exit_code}."""
    info = {"config": {}, "artifacts": [], "exit_code": None, "run_id": None, "sweep_id": None}
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        updates = []
        if kind == "run":
            info["run_id"], info["sweep_id"] = rec.run.run_id, rec.run.sweep_id
            info.update(entity=rec.run.entity, project=rec.run.project, group=rec.run.run_group,
                        job_type=rec.run.job_type, tags=list(rec.run.tags), name=rec.run.display_name)
            updates = rec.run.config.update
        elif kind == "config":
            updates = rec.config.update
        elif kind == "artifact":
            info["artifacts"].append((rec.artifact.name, rec.artifact.type,
                                      sorted(e.path for e in rec.artifact.manifest.contents)))
        elif kind == "exit":
            info["exit_code"] = rec.exit.exit_code
        for item in updates:
            info["config"][item.key] = json.loads(item.value_json)
    return info


def run_files(run_dir: Path) -> list[Path]:
    return sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
