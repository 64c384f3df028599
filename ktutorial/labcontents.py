"""JupyterLab's saves of the tutorial's notebooks: stored as the checkout keeps them, without outputs.

`ktutorial lab` runs JupyterLab with `StoredNotebooks` as its contents manager (this module is
imported by the Jupyter server, never by ktutorial itself). A reader who runs a notebook by hand
gets its records, figures and logs in the build folder (the notebooks' `out_dir`); JupyterLab's
autosave would otherwise write the outputs, execution counts and this machine's Python version
into notebooks/ every two minutes. Saved here, a notebook keeps only what a reader typed:
a save that changes no source writes nothing, and one that does is stored stripped.
"""

from __future__ import annotations

import os

import nbformat
from jupyter_server.services.contents.largefilemanager import AsyncLargeFileManager


def stripped(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The notebook as the checkout stores it: no outputs, no execution counts or timings, and
    only the language's name in its metadata (the kernel writes its own version there)."""
    nb = nbformat.from_dict(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        cell.metadata.pop("execution", None)
    language = nb.metadata.get("language_info")
    if isinstance(language, dict) and "name" in language:
        nb.metadata["language_info"] = {"name": language["name"]}
    return nb


def _as_stored(nb: nbformat.NotebookNode) -> str:
    return nbformat.writes(stripped(nb))


class StoredNotebooks(AsyncLargeFileManager):
    """JupyterLab's file manager, saving notebooks stripped (see the module's docstring)."""

    async def save(self, model, path=""):
        if model.get("type") == "notebook" and model.get("content") is not None:
            nb = stripped(nbformat.from_dict(model["content"]))
            model = {**model, "content": nb}
            os_path = self._get_os_path(path.strip("/"))
            if os.path.isfile(os_path):
                on_disk = nbformat.read(os_path, as_version=4)
                if _as_stored(on_disk) == nbformat.writes(nb):
                    # Nothing a reader typed changed: leave the file (bytes and time) as it is.
                    return await self.get(path, content=False)
        return await super().save(model, path)
