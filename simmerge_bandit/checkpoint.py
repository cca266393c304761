"""Reading Hugging Face checkpoint directories without loading tensors.

A checkpoint is ``config.json`` plus ``*.safetensors`` (one file, or shards with ``model.safetensors.index.json``).
Headers are parsed here directly (8-byte length + JSON) so that a corrupt file is reported precisely and a 100 GB
model is described in milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .errors import IncompatibleModels, InvalidCheckpoint

DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json")
_MAX_HEADER = 100 * 1024 * 1024
_SAMPLE = 4096


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str             # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    file: str              # file name inside the checkpoint directory
    start: int             # absolute byte offsets of the data in the file
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class Checkpoint:
    path: Path
    config: dict
    files: list[str]
    tensors: dict[str, TensorInfo] = field(repr=False)
    headers: dict[str, bytes] = field(repr=False)

    @property
    def architecture(self) -> str | None:
        archs = self.config.get("architectures") or []
        return archs[0] if archs else None

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    @property
    def dtype(self) -> str:
        """The dominant floating dtype of the weights, as a torch name ("bfloat16", ...)."""
        counts = Counter(t.dtype for t in self.tensors.values() if t.dtype in DTYPE_NAMES)
        if not counts:
            return "float32"
        return DTYPE_NAMES[counts.most_common(1)[0][0]]

    @property
    def n_params(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def size_bytes(self) -> int:
        return sum((self.path / f).stat().st_size for f in self.files)

    @property
    def vocab_size(self) -> int | None:
        v = self.config.get("vocab_size")
        if v is None and isinstance(self.config.get("text_config"), dict):
            v = self.config["text_config"].get("vocab_size")
        return v

    @property
    def has_tokenizer(self) -> bool:
        return any((self.path / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))

    def shapes(self) -> dict[str, list]:
        return {n: [t.dtype, list(t.shape)] for n, t in self.tensors.items()}

    def fingerprint(self, full: bool = False) -> str:
        """A content fingerprint that changes when the weights change.

        Default: hashes every file's size and header, and three 4 KiB samples (start, middle, end) of every
        tensor's bytes: a few MB read on a 100 GB model. ``full=True`` hashes every byte.
        """
        h = hashlib.blake2b(digest_size=16)
        for f in self.files:
            p = self.path / f
            h.update(f.encode() + b"\0" + str(p.stat().st_size).encode() + b"\0" + self.headers[f])
            with open(p, "rb") as fh:
                if full:
                    while chunk := fh.read(1 << 24):
                        h.update(chunk)
                    continue
                for t in sorted((t for t in self.tensors.values() if t.file == f), key=lambda t: t.start):
                    n = t.end - t.start
                    offsets = {t.start, t.start + max(0, n // 2 - _SAMPLE // 2), max(t.start, t.end - _SAMPLE)}
                    for off in sorted(offsets):
                        fh.seek(off)
                        h.update(fh.read(min(_SAMPLE, t.end - off)))
        return h.hexdigest()


def read_header(file: Path) -> tuple[dict, int, bytes]:
    """Parse one safetensors header; return (header dict, data start offset, raw header bytes)."""
    size = file.stat().st_size
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise InvalidCheckpoint(f"{file}: corrupt safetensors header (file is only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > _MAX_HEADER or 8 + n > size:
            raise InvalidCheckpoint(f"{file}: corrupt safetensors header (declared header length {n} does not fit "
                                    f"a {size}-byte file)")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidCheckpoint(f"{file}: corrupt safetensors header (not valid JSON: {e})") from None
    data_start = 8 + n
    data_len = size - data_start
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = info["dtype"], info["shape"], info["data_offsets"]
            numel = 1
            for s in shape:
                numel *= int(s)
            ok = dtype in DTYPE_BYTES and 0 <= a <= b <= data_len and b - a == numel * DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise InvalidCheckpoint(f"{file}: corrupt safetensors header (bad entry for tensor {name!r})")
    return header, data_start, raw


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Describe a checkpoint directory, validating it; raise :class:`InvalidCheckpoint` with the reason."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InvalidCheckpoint(f"{p}: no such file or directory")
    if not p.is_dir():
        raise InvalidCheckpoint(f"{p}: not a directory (a model is a Hugging Face checkpoint directory)")
    p = p.resolve()
    if not (p / "config.json").is_file():
        raise InvalidCheckpoint(f"{p}: no config.json (a model is a Hugging Face checkpoint directory)")
    try:
        config = json.loads((p / "config.json").read_text())
        if not isinstance(config, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidCheckpoint(f"{p}/config.json: not valid JSON ({e})") from None
    index = p / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise InvalidCheckpoint(f"{index}: malformed index (needs a 'weight_map' object)") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (p / f).is_file()]
        if missing:
            raise InvalidCheckpoint(f"{p}: shard {missing[0]} listed in {INDEX_FILE} is missing")
    else:
        files = sorted(f.name for f in p.glob("*.safetensors"))
        weight_map = None
    if not files:
        pickled = sorted(f.name for f in p.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickled:
            raise InvalidCheckpoint(
                f"{p}: has pickled weights ({pickled[0]}) but no safetensors; convert them with: python -c "
                f"\"from transformers import AutoModelForCausalLM as M; M.from_pretrained('{p}')"
                f".save_pretrained('{p}', safe_serialization=True)\"")
        raise InvalidCheckpoint(f"{p}: no *.safetensors weights")
    tensors: dict[str, TensorInfo] = {}
    headers: dict[str, bytes] = {}
    for f in files:
        header, start, raw = read_header(p / f)
        headers[f] = raw
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if name in tensors:
                raise InvalidCheckpoint(f"{p}: tensor {name!r} appears in both {tensors[name].file} and {f}")
            a, b = info["data_offsets"]
            tensors[name] = TensorInfo(name, info["dtype"], tuple(int(s) for s in info["shape"]), f,
                                       start + a, start + b)
    if weight_map is not None:
        for name, f in weight_map.items():
            if name not in tensors or tensors[name].file != f:
                raise InvalidCheckpoint(f"{p}: {INDEX_FILE} maps {name!r} to {f}, which does not hold it")
    if not tensors:
        raise InvalidCheckpoint(f"{p}: the safetensors files hold no tensors")
    return Checkpoint(path=p, config=config, files=files, tensors=tensors, headers=headers)


def check_compatible(shapes_a: dict[str, list], shapes_b: dict[str, list], name_a: str, name_b: str) -> None:
    """Raise :class:`IncompatibleModels` naming the first tensor that is missing or differs in shape."""
    for n in sorted(set(shapes_a) | set(shapes_b)):
        if n not in shapes_a:
            raise IncompatibleModels(f"tensor {n!r} is in {name_b} but not in {name_a}")
        if n not in shapes_b:
            raise IncompatibleModels(f"tensor {n!r} is in {name_a} but not in {name_b}")
        if list(shapes_a[n][1]) != list(shapes_b[n][1]):
            raise IncompatibleModels(f"tensor {n!r} has shape {list(shapes_a[n][1])} in {name_a} but "
                                     f"{list(shapes_b[n][1])} in {name_b}")
