"""Task vectors and other tensor sets on disk: safetensors plus a JSON sidecar with a sha256."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import (
    CorruptFileError,
    FamilyMismatchError,
    HashMismatchError,
    NonFiniteError,
    OutputExistsError,
    OutputPathError,
)

SIDECAR_FORMAT = "theseus-task-vector/1"
TENSOR_SUFFIX = ".safetensors"


def sidecar_path(path: str | os.PathLike) -> Path:
    """Return the JSON sidecar path that belongs to a safetensors file."""
    return Path(path).with_suffix(".json")


def check_tensor_path(path: str | os.PathLike) -> Path:
    """Refuse a tensor output not named `<name>.safetensors` (its sidecar is `<name>.json`)."""
    path = Path(path)
    if path.suffix != TENSOR_SUFFIX:
        # any other suffix is replaced by the sidecar's: `run.rte` and `run.mnli` would share `run.json`,
        # and `run.json` would be overwritten by its own sidecar
        raise OutputPathError(
            f"{path}: tensor files are written as <name>{TENSOR_SUFFIX} with the sidecar <name>.json beside "
            f"them; name it {path.with_name(path.name + TENSOR_SUFFIX).name!r} or similar"
        )
    return path


def check_finite(tensors: Mapping[str, torch.Tensor], what: str = "task vector") -> None:
    """Raise NonFiniteError naming the keys whose values include NaN or Inf."""
    bad = [key for key, value in tensors.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise NonFiniteError(
            f"the {what} has NaN or Inf in {len(bad)} of {len(tensors)} tensors (e.g. {bad[:3]}); a diverged "
            "fine-tune? Nothing was written"
        )


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """Return a sha256 over keys, dtypes, shapes and bytes, independent of insertion order."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        # view as bytes so that bfloat16 and friends hash without a numpy round trip
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_writable(*paths: str | os.PathLike, overwrite: bool = False, how: str = "overwrite=True (CLI: --overwrite)") -> None:
    """Raise OutputExistsError if any path exists and overwriting was not asked for (OutputPathError if it cannot be a file).

    `how` says how the caller's user asks for overwriting (a Lightning module's setting is not a CLI flag).
    """
    for path in map(Path, paths):
        if path.is_dir():
            raise OutputPathError(f"{path} is a directory; give a file name")
        blocking = next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)
        if blocking is not None:
            raise OutputPathError(f"cannot write {path}: {blocking} is a file, not a directory")
        if path.exists() and not overwrite:
            raise OutputExistsError(f"{path} exists; pass {how} to replace it")


@contextlib.contextmanager
def staged_writes(*finals: str | os.PathLike) -> Iterator[Callable[[str | os.PathLike], Path]]:
    """Write a set of outputs under temporary names; move them into place only once all were written.

    Yields `stage(final) -> path to write instead`. If anything fails before the end of the block, no
    final path is touched, so files an `overwrite` would have replaced are still there.
    """
    staging: dict[Path, Path] = {}

    def stage(final: str | os.PathLike) -> Path:
        parent = Path(final).parent
        if parent not in staging:
            parent.mkdir(parents=True, exist_ok=True)
            staging[parent] = Path(tempfile.mkdtemp(dir=parent, prefix=".theseus-staging-"))
        return staging[parent] / Path(final).name

    try:
        yield stage
        for final in map(Path, finals):
            folder = staging.get(final.parent)
            if folder is not None and (folder / final.name).exists():
                os.replace(folder / final.name, final)
    finally:
        for folder in staging.values():
            shutil.rmtree(folder, ignore_errors=True)


def _file_mode() -> int:
    """The mode a plain open() would give a new file (0o666 less the umask); mkstemp's is 0o600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _atomic_write_bytes(path: Path, write) -> None:
    # write beside the target and rename, so an error never leaves a partial file behind
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(tmp)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, payload: Mapping[str, Any], overwrite: bool = False) -> Path:
    """Write a JSON file atomically, refusing to replace an existing one unless told."""
    path = Path(path)
    check_writable(path, overwrite=overwrite)

    def write(tmp: str) -> None:
        with open(tmp, "w") as handle:
            json.dump(payload, handle, indent=2, sort_keys=True, default=str)
            handle.write("\n")

    _atomic_write_bytes(path, write)
    return path


def save_task_vector(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save a task vector as safetensors with a JSON sidecar (family, model, task, dtype, count, sha256)."""
    path = check_tensor_path(path)
    sidecar = sidecar_path(path)
    check_writable(path, sidecar, overwrite=overwrite)
    clean = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
    check_finite(clean)
    dtypes = sorted({str(value.dtype).replace("torch.", "") for value in clean.values()})
    info: dict[str, Any] = dict(metadata or {})
    info.setdefault("format", SIDECAR_FORMAT)
    info.update(
        file=path.name,
        sha256=tensors_sha256(clean),
        dtype=dtypes[0] if len(dtypes) == 1 else dtypes,
        num_tensors=len(clean),
        num_parameters=int(sum(value.numel() for value in clean.values())),
    )
    _atomic_write_bytes(path, lambda tmp: save_file(clean, tmp, metadata={"sha256": info["sha256"]}))
    try:
        write_json(sidecar, info, overwrite=overwrite)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def check_task_vector_source(info: Mapping[str, Any], model: str, pretrained: str | None, path: str | os.PathLike) -> None:
    """Raise FamilyMismatchError when a task vector's sidecar names another source model or weights."""
    if info.get("model") not in (None, model):
        raise FamilyMismatchError(f"{path} was made from {info.get('model')!r}, but the source model is {model!r}")
    recorded = info.get("pretrained")
    if recorded is None or pretrained is None or recorded == pretrained:
        return
    # the same checkpoint file named two ways is the same weights
    if Path(str(recorded)).is_file() and Path(str(pretrained)).is_file() and Path(str(recorded)).samefile(pretrained):
        return
    raise FamilyMismatchError(
        f"{path} was fine-tuned from {model!r} weights {recorded!r}, but the source is given as {pretrained!r}: "
        "the maps must be computed on the weights the task vector is relative to"
    )


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning a corrupt or truncated file into CorruptFileError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CorruptFileError(f"{path} is not a readable safetensors file (corrupt or truncated): {error}") from error


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    """Read the JSON sidecar of a tensor file (without loading the tensors); FileNotFoundError if the file is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        raise CorruptFileError(f"{path} has no sidecar {sidecar}; task vectors are saved with save_task_vector")
    try:
        info = json.loads(sidecar.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CorruptFileError(f"sidecar {sidecar} is not valid JSON: {error}") from error
    if not isinstance(info, dict):
        raise CorruptFileError(f"sidecar {sidecar} holds a JSON {type(info).__name__}, not the object save_task_vector writes")
    return info


def load_task_vector(path: str | os.PathLike, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a task vector and its sidecar, checking the sidecar's sha256 against the tensors."""
    path = Path(path)
    tensors = load_tensors(path)
    info = read_sidecar(path)
    if verify:
        actual = tensors_sha256(tensors)
        if info.get("sha256") != actual:
            raise HashMismatchError(
                f"{path}: tensors hash to {actual} but sidecar {sidecar_path(path).name} records {info.get('sha256')}"
            )
    return tensors, info
