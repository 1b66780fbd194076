"""Saving and loading ``PerturbX`` in files that cannot run code (see :mod:`._files`)."""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import anndata
import numpy as np
import scvi
import torch
from anndata import AnnData
from scvi import REGISTRY_KEYS

from perturbx import __version__ as perturbx_version
from perturbx.data._validation import align_genes, unchanged_on_error
from perturbx.model._files import model_file_paths, read_model_files, write_model_files

if TYPE_CHECKING:
    from perturbx.model._perturbx import PerturbX


class SaveLoadMixin:
    """:meth:`save` and :meth:`load` for :class:`perturbx.PerturbX`.

    Mixed into the model class; relies on its ``module``, ``registry``, ``adata``,
    :meth:`setup_anndata`, ``featurizer`` and the perturbation registry.
    """

    def save(
        self,
        dir_path: str | os.PathLike,
        prefix: str | None = None,
        overwrite: bool = False,
        save_anndata: bool = False,
        **anndata_write_kwargs,
    ) -> None:
        """Save the model to a folder, in files that cannot carry code.

        Writes ``{prefix}model.safetensors`` (the weights) and ``{prefix}model.json`` (the
        registry with the vocabulary and fingerprint settings, the setup and init arguments,
        the split indices, the training history and the package versions), and with
        ``save_anndata`` the AnnData as ``{prefix}adata.h5ad``. None of them is read with
        pickle by :meth:`load`; see :mod:`perturbx.model._files`.

        Parameters
        ----------
        dir_path
            Folder to write; created if needed.
        prefix
            Prefix of the file names (several models in one folder).
        overwrite
            Replace the files of an existing folder; otherwise an existing folder is an error.
        save_anndata
            Also write the model's AnnData (then :meth:`load` needs no ``adata``).
        **anndata_write_kwargs
            Passed to :meth:`anndata.AnnData.write_h5ad`.

        Notes
        -----
        After training on several processes (DDP) every process holds the same weights and
        runs the same script; only global rank 0 writes, the others return at once (call
        ``model.trainer.strategy.barrier()`` before another rank reads the folder).
        """
        trainer = getattr(self, "trainer", None)
        if trainer is not None and not trainer.is_global_zero:
            return
        dir_path = Path(dir_path)
        if dir_path.exists() and not overwrite:
            raise ValueError(
                f"{dir_path} already exists; pass overwrite=True or another directory."
            )
        metadata = {
            "model_class": type(self).__name__,
            "versions": {
                "perturbx": perturbx_version,
                "scvi-tools": scvi.__version__,
                "torch": torch.__version__,
            },
            # scvi's convention: the public attributes ending in "_" are the model's state
            "attributes": {
                k: v for k, v in vars(self).items() if k.endswith("_") and not k.startswith("_")
            },
        }
        dir_path.mkdir(parents=True, exist_ok=True)
        paths = model_file_paths(dir_path, prefix)
        if save_anndata:
            self.adata.write_h5ad(paths["adata"], **anndata_write_kwargs)
        write_model_files(dir_path, self.module.state_dict(), metadata, prefix)
        paths["legacy"].unlink(missing_ok=True)  # an older save's pickle must not linger

    @classmethod
    def load(
        cls,
        dir_path: str | os.PathLike,
        adata: AnnData | None = None,
        accelerator: str = "auto",
        device: int | str = "auto",
        prefix: str | None = None,
        trust_pickle: bool = False,
        **kwargs,
    ) -> PerturbX:
        """Load a model written by :meth:`save`.

        Parameters
        ----------
        dir_path
            The folder :meth:`save` wrote.
        adata
            AnnData to attach, with the training genes in any order: they are matched by
            name (if the order differs, or there are extra genes, the model attaches a copy
            with the training genes in the training order); missing genes are an error.
            ``None``: the AnnData saved with the model if there is one, else the model is
            loaded without data (it can still predict from new cells given to
            :meth:`predict`).
        accelerator, device
            Where to put the weights: ``"auto"`` (a GPU if there is one), ``"cpu"``,
            ``"gpu"``/``"cuda"``; ``device`` picks the GPU by index.
        prefix
            Prefix of the file names, as given to :meth:`save`.
        trust_pickle
            Read a model folder written by perturbx < 0.2 (or scvi-tools), whose ``model.pt``
            is a Python pickle: **unpickling runs any code the file contains**, so only do
            this for files you trust, and save the model again to convert it. Without it such
            a folder is an error that names this argument, raised before the file is read.
        **kwargs
            For ``trust_pickle`` only: passed to
            :meth:`scvi.model.base.BaseModelClass.load`.

        Raises
        ------
        ValueError
            The folder holds only a pickle-based model file (see ``trust_pickle``), its files
            are not valid, the saved registry comes from an incompatible perturbx version, or
            its fingerprint settings do not reproduce the saved fingerprints.
        """
        paths = model_file_paths(dir_path, prefix)
        if trust_pickle and not paths["metadata"].is_file():
            return cls._load_legacy(dir_path, adata, accelerator, device, prefix, **kwargs)
        if kwargs:
            raise TypeError(f"PerturbX.load got unexpected arguments {sorted(kwargs)}.")
        torch_device = _torch_device(accelerator, device)
        state_dict, metadata = read_model_files(dir_path, prefix)  # no pickle is read
        if metadata.get("model_class") != cls.__name__:
            raise ValueError(
                f"{dir_path} holds a {metadata.get('model_class')!r} model, not {cls.__name__}."
            )
        attributes = dict(metadata["attributes"])
        # Only scvi's public state attributes ("is_trained_", "history_", ...) are restored.
        odd = [
            k
            for k in attributes
            if not isinstance(k, str) or not k.endswith("_") or k.startswith("_")
        ]
        if odd:
            raise ValueError(f"{dir_path} lists attributes that a model file never holds: {odd}.")
        registry = attributes.pop("registry_")
        init_params = attributes.pop("init_params_")
        if adata is None and paths["adata"].is_file():
            adata = anndata.read_h5ad(paths["adata"])
        if adata is not None:  # genes matched by name: a reordered copy if the order differs
            adata = align_genes(
                adata,
                registry["field_registries"][REGISTRY_KEYS.X_KEY]["state_registry"]["column_names"],
            )
        with unchanged_on_error(adata) if adata is not None else contextlib.nullcontext():
            if adata is not None:
                cls.setup_anndata(adata, source_registry=registry, **registry["setup_args"])
            non_kwargs = dict(init_params["non_kwargs"])
            extra = {k: v for group in init_params["kwargs"].values() for k, v in group.items()}
            model = cls(adata, registry=registry, **non_kwargs, **extra)
            for name, value in attributes.items():
                setattr(model, name, value)
            try:
                model.module.load_state_dict(state_dict)
            except RuntimeError as error:
                raise ValueError(
                    f"The weights saved in {dir_path!s} do not fit the model described by its "
                    "saved registry (vocabulary, fingerprint bits or genes differ); the registry "
                    "was changed or written by another perturbx version."
                ) from error
            model._check_saved_fingerprints()
        model.to_device(torch_device)
        model.module.eval()
        return model

    @classmethod
    def _load_legacy(cls, dir_path, adata, accelerator, device, prefix, **kwargs) -> PerturbX:
        """scvi-tools' pickle-based loader, for folders saved by perturbx < 0.2."""
        warnings.warn(
            f"Loading {dir_path} with trust_pickle=True unpickles its model.pt, which runs any "
            "code the file contains; do this only for files you trust. Save the model again "
            "to convert it to the safe format.",
            UserWarning,
            stacklevel=3,
        )
        with unchanged_on_error(adata) if adata is not None else contextlib.nullcontext():
            try:
                model = super().load(
                    str(dir_path),
                    adata=adata,
                    accelerator=accelerator,
                    device=device,
                    prefix=prefix,
                    **kwargs,
                )
            except RuntimeError as error:
                if "size mismatch" not in str(error):
                    raise
                raise ValueError(
                    f"The weights saved in {dir_path!s} do not fit the model described by its "
                    "saved registry (vocabulary, fingerprint bits or genes differ); the registry "
                    "was changed or written by another perturbx version."
                ) from error
            model._check_saved_fingerprints()
        return model

    def _check_saved_fingerprints(self) -> None:
        """The registry's SMILES and fingerprint settings must reproduce the saved buffer."""
        state = self.perturbation_registry
        saved = self.module.perturbation_embedding.fingerprints.cpu().numpy()
        rows = [i for i, smi in enumerate(state["smiles"]) if smi is not None]
        if not rows:
            return
        recomputed = self.featurizer([state["smiles"][i] for i in rows])
        if not np.array_equal(recomputed, saved[rows]):
            raise ValueError(
                f"The saved fingerprint settings {state['fingerprint']} do not reproduce the "
                "fingerprints the model was trained with; the registry was changed or written "
                "by another perturbx version, and new molecules would be embedded wrongly."
            )


def _torch_device(accelerator: str, device: int | str) -> str:
    """``"cpu"`` or ``"cuda:<i>"`` for :meth:`PerturbX.load`'s ``accelerator`` / ``device``."""
    if accelerator not in ("auto", "cpu", "gpu", "cuda"):
        raise ValueError(f"accelerator={accelerator!r}: use 'auto', 'cpu', 'gpu' or 'cuda'.")
    if isinstance(device, str) and device not in ("auto",) and not device.startswith("cuda"):
        if device == "cpu":
            return "cpu"
        raise ValueError(f"device={device!r}: use 'auto', 'cpu', a GPU index or 'cuda:<i>'.")
    use_gpu = accelerator in ("gpu", "cuda") or (
        accelerator == "auto" and torch.cuda.is_available()
    )
    if not use_gpu:
        return "cpu"
    if not torch.cuda.is_available():
        raise ValueError(f"accelerator={accelerator!r}, but torch sees no GPU.")
    if isinstance(device, str) and device.startswith("cuda"):
        return device
    return f"cuda:{0 if device == 'auto' else int(device)}"
