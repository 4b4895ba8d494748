"""Read a safetensors file onto a GPU at the disk's sequential rate.

safetensors' own reader copies tensor by tensor from a memory map (page faults, then a pageable host-to-device
copy each); for VGGT-1B's 3.6 GB float32 checkpoint that is most of a precompute job's weight time. Here the
file's data section is read in large sequential chunks into two pinned buffers that alternate, each chunk copied
to one device byte buffer while the next is read, and every tensor is a view of that buffer. The format
(8-byte little-endian header length, a JSON header of dtype / shape / data_offsets, the data) is read by hand
because the library has no bulk reader; names, dtypes and values equal `safetensors.torch.load_file`'s.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from vlnflow.errors import UserError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
CHUNK_BYTES = 64 << 20


def read_header(fh, file: Path) -> tuple[int, dict]:
    """(bytes before the data, {name: {dtype, shape, data_offsets}}) of an open safetensors file."""
    raw = fh.read(8)
    if len(raw) != 8:
        raise UserError(f"{file}: not a safetensors file (shorter than its 8-byte header length)")
    n = int.from_bytes(raw, "little")
    try:
        header = json.loads(fh.read(n))
    except ValueError as exc:
        raise UserError(f"{file}: not a safetensors file (unreadable header: {exc})") from exc
    header.pop("__metadata__", None)
    return 8 + n, header


def load_to_device(file: str | Path, device: torch.device, chunk_bytes: int = CHUNK_BYTES) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on `device` (views of one byte buffer there)."""
    file = Path(file)
    pinned = device.type == "cuda"
    with open(file, "rb", buffering=0) as fh:
        start, header = read_header(fh, file)
        size = os.fstat(fh.fileno()).st_size - start
        end = max((info["data_offsets"][1] for info in header.values()), default=0)
        if end > size:
            raise UserError(f"{file}: truncated ({size} data bytes, its header names {end})")
        data = torch.empty(size, dtype=torch.uint8, device=device)
        buffers = [torch.empty(min(chunk_bytes, max(size, 1)), dtype=torch.uint8, pin_memory=pinned) for _ in range(2)]
        copied = [None, None]  # the event after the last copy out of each buffer
        offset, i = 0, 0
        while offset < size:
            buf, slot = buffers[i % 2], i % 2
            if copied[slot] is not None:
                copied[slot].synchronize()
            n = fh.readinto(memoryview(buf.numpy())[: min(len(buf), size - offset)])
            if not n:
                raise UserError(f"{file}: truncated while reading ({offset} of {size} data bytes)")
            data[offset : offset + n].copy_(buf[:n], non_blocking=pinned)
            if pinned:
                copied[slot] = torch.cuda.Event()
                copied[slot].record()
            offset, i = offset + n, i + 1
    if pinned:
        torch.cuda.current_stream(device).synchronize()
    tensors = {}
    for name, info in header.items():
        if info["dtype"] not in DTYPES:
            raise UserError(f"{file}: tensor {name!r} has dtype {info['dtype']}, which vlnflow does not read")
        dtype = DTYPES[info["dtype"]]
        b, e = info["data_offsets"]
        raw = data[b:e] if b % dtype.itemsize == 0 else data[b:e].clone()  # view() needs aligned storage
        tensors[name] = raw.view(dtype).view(info["shape"])
    return tensors
