"""Model files that cannot carry code: weights as safetensors, everything else as JSON.

A saved model is a folder with ``{prefix}model.safetensors`` (the module's tensors) and
``{prefix}model.json`` (registry, setup and init arguments, vocabulary, fingerprint settings,
training history and split indices, the genes and the package versions), plus
``{prefix}adata.h5ad`` when the AnnData is saved with it. Neither file is read with pickle:
loading a folder someone sent you cannot run code on your machine.

The JSON keeps exact values: numpy arrays and scalars keep their dtype and shape, pandas
DataFrames (the training history) their index, columns and dtypes, tuples stay tuples.
Anything the codec does not know is an error at save time, naming where it sits, rather than
a value silently dropped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

FORMAT_NAME = "perturbx-model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "model.json"
LEGACY_FILE = "model.pt"  # scvi-tools' pickle-based file, written by perturbx < 0.2

_TAGS = ("__ndarray__", "__scalar__", "__tuple__", "__dict__", "__dataframe__", "__float__")


class UnsafeModelFileError(ValueError):
    """A model folder can only be read by unpickling (a legacy or foreign file)."""


# ------------------------------------------------------------------------- JSON codec
def to_plain(value: Any, where: str = "value") -> Any:
    """Encode ``value`` as JSON-compatible data that :func:`from_plain` restores exactly.

    Supported: ``None``, ``bool``, ``int``, ``float`` (also NaN / ±inf), ``str``, lists,
    tuples, dicts (any keys that are themselves supported), numpy arrays (numeric, bool or
    strings) and scalars, and pandas DataFrames. ``where`` names the value in errors.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int) and not isinstance(value, np.integer):
        return value
    if isinstance(value, float) and not isinstance(value, np.floating):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, np.generic):
        return {"__scalar__": {"dtype": value.dtype.str, "value": to_plain(value.item(), where)}}
    if isinstance(value, np.ndarray):
        return _array_to_plain(value, where)
    if isinstance(value, pd.DataFrame):
        return {
            "__dataframe__": {
                "columns": to_plain(list(value.columns), f"{where}.columns"),
                "index": _array_to_plain(np.asarray(value.index), f"{where}.index"),
                "index_name": to_plain(value.index.name, f"{where}.index.name"),
                "data": [
                    _array_to_plain(value[c].to_numpy(), f"{where}[{c!r}]") for c in value.columns
                ],
            }
        }
    if isinstance(value, tuple):
        return {"__tuple__": [to_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [to_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        plain_keys = all(isinstance(k, str) for k in value) and not any(k in _TAGS for k in value)
        if plain_keys:
            return {k: to_plain(v, f"{where}[{k!r}]") for k, v in value.items()}
        return {
            "__dict__": [
                [to_plain(k, f"{where} key"), to_plain(v, f"{where}[{k!r}]")]
                for k, v in value.items()
            ]
        }
    raise TypeError(
        f"Cannot write {where} ({type(value).__name__}) to a model file: only plain data "
        "(numbers, strings, lists, dicts, numpy arrays, DataFrames) is saved."
    )


def _array_to_plain(array: np.ndarray, where: str) -> dict:
    if array.dtype.kind in "biuf":
        flat = array.ravel().tolist()
        if array.dtype.kind == "f":
            flat = [v if math.isfinite(v) else {"__float__": repr(v)} for v in flat]
        dtype = array.dtype.str
    elif array.dtype.kind in "OUS":
        flat = [to_plain(v, f"{where} element") for v in array.ravel().tolist()]
        dtype = "object" if array.dtype.kind == "O" else array.dtype.str
    else:
        raise TypeError(f"Cannot write {where} (array of dtype {array.dtype}) to a model file.")
    return {"__ndarray__": {"dtype": dtype, "shape": list(array.shape), "data": flat}}


def from_plain(value: Any) -> Any:
    """Inverse of :func:`to_plain`."""
    if isinstance(value, list):
        return [from_plain(v) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((tag, body),) = value.items()
        if tag == "__float__":
            return float(body)
        if tag == "__scalar__":
            return np.dtype(body["dtype"]).type(from_plain(body["value"]))
        if tag == "__ndarray__":
            return _array_from_plain(body)
        if tag == "__tuple__":
            return tuple(from_plain(v) for v in body)
        if tag == "__dict__":
            return {_hashable(from_plain(k)): from_plain(v) for k, v in body}
        if tag == "__dataframe__":
            columns = from_plain(body["columns"])
            data = {
                c: _array_from_plain(d["__ndarray__"])
                for c, d in zip(columns, body["data"], strict=True)
            }
            index = pd.Index(
                _array_from_plain(body["index"]["__ndarray__"]), name=from_plain(body["index_name"])
            )
            return pd.DataFrame(data, index=index, columns=columns)
    return {k: from_plain(v) for k, v in value.items()}


def _array_from_plain(body: Mapping) -> np.ndarray:
    data = [from_plain(v) for v in body["data"]]
    if body["dtype"] == "object":
        array = np.empty(len(data), dtype=object)
        array[:] = data
    else:
        array = np.array(data, dtype=np.dtype(body["dtype"]))
    return array.reshape(body["shape"])


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


# ------------------------------------------------------------------------ the folder
def model_file_paths(dir_path: str | Path, prefix: str | None = None) -> dict[str, Path]:
    """Paths of a saved model's files: ``weights``, ``metadata``, ``legacy``, ``adata``."""
    dir_path, prefix = Path(dir_path), prefix or ""
    return {
        "weights": dir_path / f"{prefix}{WEIGHTS_FILE}",
        "metadata": dir_path / f"{prefix}{METADATA_FILE}",
        "legacy": dir_path / f"{prefix}{LEGACY_FILE}",
        "adata": dir_path / f"{prefix}adata.h5ad",
    }


def write_model_files(
    dir_path: str | Path, state_dict: Mapping, metadata: Mapping, prefix: str | None = None
) -> None:
    """Write ``state_dict`` (name → tensor) as safetensors and ``metadata`` as JSON."""
    from safetensors.torch import save_file

    paths = model_file_paths(dir_path, prefix)
    # safetensors refuses tensors that share storage; each is written as its own copy.
    tensors = {name: t.detach().cpu().contiguous().clone() for name, t in state_dict.items()}
    document = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        **to_plain(dict(metadata), "model"),
    }
    text = json.dumps(document, indent=1)  # encoding first: a failure writes nothing
    save_file(tensors, str(paths["weights"]))
    paths["metadata"].write_text(text)


def read_model_files(
    dir_path: str | Path, prefix: str | None = None, device: str = "cpu"
) -> tuple[dict, dict]:
    """Read a folder written by :func:`write_model_files`: ``(state_dict, metadata)``.

    Raises
    ------
    UnsafeModelFileError
        The folder holds only a pickle-based ``model.pt`` (saved by an earlier perturbx
        version, or by another tool).
    FileNotFoundError
        No model files at all.
    ValueError
        The JSON is not a perturbx model file of a version this package reads.
    """
    from safetensors.torch import load_file

    paths = model_file_paths(dir_path, prefix)
    if not paths["metadata"].is_file():
        if paths["legacy"].is_file():
            raise UnsafeModelFileError(
                f"{dir_path} holds a pickle-based model file ({paths['legacy'].name}, written by "
                "perturbx < 0.2 or by scvi-tools): reading it would run any code it contains. "
                "If you trust whoever wrote it, load it with PerturbX.load(..., "
                "trust_pickle=True) and save it again to convert it to the safe format."
            )
        raise FileNotFoundError(
            f"{dir_path} holds no {paths['metadata'].name}: not a folder written by PerturbX.save."
        )
    if paths["legacy"].is_file():
        # save() removes it: a pickle next to safe files was put there by someone else
        raise UnsafeModelFileError(
            f"{dir_path} holds a safe model ({paths['metadata'].name}) and also a pickle-based "
            f"{paths['legacy'].name}, which PerturbX.save never leaves there. It was not read; "
            "remove it (or find out who put it there) and load again."
        )
    try:
        document = json.loads(paths["metadata"].read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{paths['metadata']} is not valid JSON ({error}).") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise ValueError(f"{paths['metadata']} is not a perturbx model file.")
    if document.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{paths['metadata']} has format version {document.get('format_version')!r}; this "
            f"perturbx reads version {FORMAT_VERSION}. Load it with the perturbx that saved it."
        )
    if not paths["weights"].is_file():
        raise FileNotFoundError(f"{dir_path} holds no {paths['weights'].name} (the weights).")
    try:
        state_dict = load_file(str(paths["weights"]), device=device)
    except Exception as error:  # safetensors raises its own error types
        raise ValueError(
            f"{paths['weights']} is not a readable safetensors file ({error})."
        ) from None
    metadata = {
        k: from_plain(v) for k, v in document.items() if k not in ("format", "format_version")
    }
    return state_dict, metadata
