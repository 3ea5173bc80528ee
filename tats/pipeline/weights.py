"""Model weight files: reading them (PyTorch or safetensors, tensors only) with one-line errors
that name the file and its problem, and their SHA-256, recorded in a store's provenance."""

from __future__ import annotations

import hashlib
import pickle
import re
import struct
from pathlib import Path

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format: a zip archive
PICKLE_MAGIC = b"\x80"  # torch.save's legacy format: a pickle (protocol 2 or later)
RELAYED = 160  # characters of a library's error relayed in a message


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def read_tensor_file(path: str | Path, what: str = "weights") -> object:
    """What a PyTorch file (`torch.load(weights_only=True)`: tensors and plain containers,
    never code) or a safetensors file (a dict of tensors) holds, on the CPU.

    Raises FileNotFoundError for a missing file and ValueError, one line starting with the
    path, for anything else: a folder, an empty file, text or other bytes that are neither
    format, a damaged file, or one holding objects that weights-only loading refuses. `what`
    names the file in messages ("weights", "checkpoint").
    """
    import torch

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, not a {what} file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} file not found")
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        raise ValueError(f"{path}: empty file (0 bytes), not a {what} file")
    if path.suffix == ".safetensors" or _is_safetensors(head):
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:  # noqa: BLE001 - safetensors raises several types
            raise ValueError(f"{path}: damaged safetensors file ({_short(error)})") from None
    if not head.startswith((ZIP_MAGIC, PICKLE_MAGIC)):
        raise ValueError(f"{path}: not a {what} file: {_describe(head)}, neither a PyTorch file "
                         "(torch.save) nor safetensors")  # fmt: skip
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = _weights_only_reason(str(error))
        raise ValueError(
            f"{path}: torch.load(weights_only=True) refuses it: {reason}; the file holds "
            f"objects other than tensors and plain containers (loading them would run code): "
            f"save the tensors alone (e.g. torch.save(model.state_dict(), path))"
        ) from None
    except Exception as error:  # noqa: BLE001 - torch raises many types for a damaged file
        raise ValueError(f"{path}: damaged PyTorch file ({_short(error)})") from None


def _is_safetensors(head: bytes) -> bool:
    """safetensors: an 8-byte little-endian header length, then the JSON header."""
    return len(head) > 9 and struct.unpack("<Q", head[:8])[0] < (1 << 28) and head[8:9] == b"{"


def _describe(head: bytes) -> str:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"it starts with the bytes {head[:8].hex(' ')}"
    if text.isprintable() or all(c.isprintable() or c.isspace() for c in text):
        return f"it holds text ({' '.join(text.split())[:40]!r})"
    return f"it starts with the bytes {head[:8].hex(' ')}"


def _weights_only_reason(message: str) -> str:
    """The useful part of torch's weights-only refusal (a paragraph of advice first)."""
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n|$)", message, re.S)
    reason = found.group(1) if found else message
    return " ".join(reason.split())[:RELAYED]


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= RELAYED else text[:RELAYED] + "..."
