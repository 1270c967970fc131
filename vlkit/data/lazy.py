"""Training data that does not fit in memory: records read on demand, images decoded in DataLoader workers.

`RecordFile` makes one validating pass over a JSONL of records (each parsed, checked and its images' files
found, then let go) and keeps only each kept record's byte offset and task: 12 bytes a record, so 558k LLaVA
records cost ~7 MB instead of every record in memory. `LazyVLDataset` reads, encodes (tokenises) and loads the
images of one record when the trainer's DataLoader asks for it; with `train.num_workers` that happens in worker
processes, ahead of the step. Length grouping (`train.length_groups`) acts per batch, so it is kept.

Compared with the eager path (`VLDataset` + `ImageBank`): no feature cache (the towers run on every step, or
train them), and a record cut to max_length before its first answer stays in its batch and teaches nothing
(no supervised token) rather than being dropped up front: a batch of only such records still runs the model, so
no rank of a data-parallel run waits for another in a collective.
"""

from __future__ import annotations

import json
import os
from array import array
from pathlib import Path

from vlkit.console import bar as progress_bar
from vlkit.data.features import as_batch, as_list
from vlkit.data.records import checked
from vlkit.errors import VlkitError


class RecordFile:
    """A JSONL of records as a sequence, read on demand: `[i]` parses record i (image paths made absolute,
    `instructions` applied). Records are validated and their images found when the file is indexed, so a bad
    record stops the run before its first step, naming the line."""

    def __init__(self, path: str | Path, tasks: list[str] | None = None, limit: int | None = None,
                 instructions=None, check_images: bool = True, progress: bool | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise VlkitError(f"{self.path}: file not found; check data.train")
        self.base = str(self.path.parent.resolve())
        self.instructions = instructions  # an `Instructions` set, or None
        self.offsets = array("q")
        self._task_ids = array("i")
        self.task_names: list = []
        codes: dict = {}
        with open(self.path, "rb") as f, progress_bar(total=self.path.stat().st_size, desc="index records",
                                                      unit="B", unit_scale=True, enabled=progress) as bar:
            lineno, offset = 0, 0
            for line in f:
                lineno += 1
                start, offset = offset, offset + len(line)
                bar.update(len(line))
                if not line.strip():
                    continue
                record = self._parse(line, lineno)
                if tasks is not None and record.get("task") not in tasks:
                    continue
                if check_images:
                    for p in record["images"]:
                        if not os.path.isfile(p):
                            raise VlkitError(f"{self.path}:{lineno}: record {record.get('id', '?')}: image {p} not "
                                             "found; check the record's images (paths are relative to its JSONL "
                                             "file)")
                task = record.get("task")
                if task not in codes:
                    codes[task] = len(self.task_names)
                    self.task_names.append(task)
                self.offsets.append(start)
                self._task_ids.append(codes[task])
                if limit is not None and len(self.offsets) >= limit:
                    break
        self._file = None
        self._pid = None

    def _parse(self, line: bytes, lineno: int | str) -> dict:
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise VlkitError(f"{self.path}:{lineno}: not valid JSON ({getattr(e, 'msg', e)}); fix that line") \
                from None
        if not isinstance(record, dict):
            raise VlkitError(f"{self.path}:{lineno}: expected a JSON object per line")
        return checked(record, f"{self.path}:{lineno}", self.base)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> dict:
        if self._pid != os.getpid():  # a DataLoader worker: its own file handle
            self._file, self._pid = open(self.path, "rb"), os.getpid()
        self._file.seek(self.offsets[i])
        record = self._parse(self._file.readline(), f"offset {self.offsets[i]}")
        if self.instructions is not None:
            from vlkit.data.instructions import apply

            record = apply([record], self.instructions)[0]
        return record

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def tasks(self) -> list:
        """Each record's task, in order (train.batch_by_task batches by it)."""
        return [self.task_names[c] for c in self._task_ids]

    def __getstate__(self):  # workers reopen the file themselves
        state = dict(self.__dict__)
        state["_file"], state["_pid"] = None, None
        return state


class LazyVLDataset:
    """Records of a `RecordFile` encoded and given their images when read: item i is (encoding, image inputs)."""

    def __init__(self, records: RecordFile, processor):
        self.records, self.processor = records, processor

    @property
    def tasks(self) -> list:
        return self.records.tasks

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        r = self.records[i]
        images = r["images"]
        enc = self.processor.encode(r["messages"], len(images), record_id=r.get("id", "?"),
                                    views=self.processor.view_counts(images) if images else None)
        kept = images[: enc["num_images"]]
        return enc, (self.processor.image_inputs(kept) if kept else None)

    def collate(self, items) -> dict:
        batch = self.processor.pad([e for e, _ in items])
        inputs = [x for _, x in items if x is not None]
        if inputs:
            import torch

            parts = [torch.cat(ps) for ps in zip(*(as_list(x["pixel_values"]) for x in inputs))]
            batch["pixel_values"] = as_batch(parts)
            if "view_mask" in inputs[0]:
                batch["view_mask"] = torch.cat([x["view_mask"] for x in inputs])
        return batch
