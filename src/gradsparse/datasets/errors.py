"""The error every data reader raises when a file is not on disk."""

from __future__ import annotations

import os
from typing import Sequence


class DataMissingError(FileNotFoundError):
    """A data file is not on disk.

    The message names the file(s), the directories searched and the command that fetches them
    (``gradsparse data download NAME``). Attributes: ``dataset`` (registry name or None),
    ``files`` (the names looked for) and ``searched`` (the directories looked in)."""

    def __init__(self, dataset: str | None, files: Sequence[str | os.PathLike],
                 searched: Sequence[str | os.PathLike] = (), hint: str = ""):
        self.dataset = dataset
        self.files = [os.fspath(f) for f in files]
        self.searched = [os.fspath(d) for d in searched]
        self.hint = hint
        what = ", ".join(self.files)
        where = f"; looked in {', '.join(self.searched)}" if self.searched else ""
        label = f"{dataset}: " if dataset else ""
        fetch = (f"; get it with: gradsparse data download {dataset} (or pass data_dir=... / set GRADSPARSE_DATA)"
                 if dataset else "")
        super().__init__(f"{label}not found: {what}{hint}{where}{fetch}")

    def __reduce__(self):  # picklable across processes (the sweep runs tasks in workers)
        return (type(self), (self.dataset, self.files, self.searched, self.hint))
