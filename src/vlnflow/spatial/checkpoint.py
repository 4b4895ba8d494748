"""Load aggregator weights from a local VGGT checkpoint, strictly, without pickle.

Accepts a directory holding model.safetensors or model.pt, or such a file. Keys
under `aggregator.` are kept (an unprefixed aggregator state dict works too);
the heads (camera, depth, point, track) are ignored with one log line. Every
aggregator key must be present with the right shape: a missing, unexpected or
mis-shaped key is an error naming it and the file. Tensors are read one at a
time (safetensors, straight onto the model's device) or memory-mapped (.pt), so
loading the 3.6 GB aggregator needs no second copy in memory, and a GPU model
casts each tensor to its dtype on the GPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from vlnflow.errors import UserError

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "model.pt")
PREFIX = "aggregator."


class CheckpointError(UserError):
    """The VGGT weights file is missing, unreadable or does not fit the aggregator."""


def find_weights_file(path: str | Path) -> Path:
    """The weights file for `path` (a file, or a directory holding model.safetensors / model.pt)."""
    path = Path(path)
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"spatial.weights: no {' or '.join(WEIGHT_FILES)} in directory {path}")
    if not path.is_file():
        raise CheckpointError(f"spatial.weights: {path} does not exist")
    return path


@contextlib.contextmanager
def open_tensors(file: Path, device: str | torch.device = "cpu") -> Iterator[tuple[dict[str, tuple[int, ...]], Callable[[str], torch.Tensor]]]:
    """(shapes by key, reader of one tensor) for a safetensors or torch.save file; safetensors reads onto `device`."""
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            fh = safe_open(str(file), framework="pt", device=str(torch.device(device)))
            shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
        except Exception as exc:  # a corrupt or foreign file: say which
            raise CheckpointError(f"cannot read VGGT weights {file}: {exc}") from exc
        with fh:
            yield shapes, fh.get_tensor
        return
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read VGGT weights {file}: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"VGGT weights {file} do not hold a flat state dict of tensors")
    yield {k: tuple(v.shape) for k, v in state.items()}, state.__getitem__


def aggregator_keys(keys: list[str], source: str) -> dict[str, str]:
    """Aggregator-relative name -> stored name; unprefixed files are taken as a bare aggregator."""
    if not any(k.startswith(PREFIX) for k in keys):
        return {k: k for k in keys}
    kept = {k[len(PREFIX) :]: k for k in keys if k.startswith(PREFIX)}
    ignored = [k for k in keys if not k.startswith(PREFIX)]
    if ignored:
        heads = sorted({k.split(".", 1)[0] for k in ignored})
        log.info("VGGT weights %s: ignoring %d non-aggregator tensors (%s)", source, len(ignored), ", ".join(heads))
    return kept


def check_shapes(model: nn.Module, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Raise CheckpointError naming the first missing, unexpected or mis-shaped aggregator key."""
    expected = model.state_dict()

    def first(keys: list[str]) -> str:
        more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
        return f"'{PREFIX}{keys[0]}'{more}"

    missing = [k for k in expected if k not in shapes]
    if missing:
        raise CheckpointError(f"VGGT weights {source}: missing aggregator key {first(missing)}")
    unexpected = [k for k in shapes if k not in expected]
    if unexpected:
        raise CheckpointError(f"VGGT weights {source}: unexpected aggregator key {first(unexpected)}")
    for key, tensor in expected.items():
        if shapes[key] != tuple(tensor.shape):
            raise CheckpointError(
                f"VGGT weights {source}: aggregator key '{PREFIX}{key}' has shape {shapes[key]}, "
                f"the model expects {tuple(tensor.shape)}"
            )


def load_aggregator_weights(model: nn.Module, path: str | Path, *, digest: bool = True) -> str | None:
    """Strictly load `path` into `model` (in place, one tensor at a time); return the content digest.

    With `digest=False` nothing is hashed (None is returned) and safetensors are read straight onto the
    model's device: the caller knows the digest already (`vlnflow.spatial.fingerprint.weights_digest`).
    """
    file = find_weights_file(path)
    device = next(model.parameters()).device if not digest else torch.device("cpu")
    with open_tensors(file, device) as (shapes, read):
        names = aggregator_keys(list(shapes), str(file))
        check_shapes(model, {k: shapes[v] for k, v in names.items()}, str(file))
        hasher = hashlib.sha256() if digest else None
        targets = model.state_dict()
        with torch.no_grad():
            for key in sorted(targets):
                tensor = read(names[key])
                if not tensor.is_floating_point():
                    raise CheckpointError(f"VGGT weights {file}: aggregator key '{PREFIX}{key}' is not a float tensor")
                if hasher is not None:
                    _digest_update(hasher, key, tensor)
                targets[key].copy_(tensor)
    return hasher.hexdigest() if hasher is not None else None


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in sorted key order.

    The same content digest `load_aggregator_weights` returns: equal weights give the
    same string whether they came from safetensors or a .pt file, with or without heads.
    """
    digest = hashlib.sha256()
    for key in sorted(state):
        _digest_update(digest, key, state[key])
    return digest.hexdigest()


def _digest_update(digest, key: str, tensor: torch.Tensor) -> None:
    t = tensor.detach().to("cpu").contiguous()
    digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
