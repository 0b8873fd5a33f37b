"""Which models the page can answer with, loaded once each: the base alone, the adapter given at
start, every adapter archive under outputs/, and uploaded archives.

Each choice is an InstructModel (the Predictor's own: same prompting, sampling, stops). The base
is loaded once; an adapter is merged into its own copy on first use, and the last few used are
kept (MAX_LOADED), so switching back and forth stays instant.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

from ..adapter_files import ARCHIVE_NAME
from ..base_model import PROJECT_ROOT
from ..serving.instruct import InstructModel

BASE = "base model alone"
MAX_LOADED = 4


class ModelChoices:
    def __init__(self, base_model: str = "", start_weights: str | None = None,
                 outputs_dir: Path = PROJECT_ROOT / "outputs"):
        self.base_model, self.outputs_dir = base_model, Path(outputs_dir)
        self.extra: dict[str, str] = {}  # label -> archive (the start adapter, uploads)
        if start_weights:
            self.extra[f"{Path(start_weights).name} (given at start)"] = str(start_weights)
        self.loaded: OrderedDict[str, InstructModel] = OrderedDict()
        self.lock = threading.Lock()

    def labels(self) -> list[str]:
        found = {}
        if self.outputs_dir.is_dir():
            for archive in sorted(self.outputs_dir.glob(f"*/{ARCHIVE_NAME}")):
                found[f"{archive.parent.name} (outputs/)"] = str(archive)
        return [*self.extra, *found, BASE]

    def path_of(self, label: str) -> str | None:
        if label == BASE:
            return None
        if label in self.extra:
            return self.extra[label]
        archive = self.outputs_dir / label.removesuffix(" (outputs/)") / ARCHIVE_NAME
        return str(archive) if archive.is_file() else None

    def add_upload(self, path: str) -> str:
        label = f"{Path(path).name} (uploaded)"
        self.extra[label] = path
        return label

    def default(self) -> str:
        return self.labels()[0]

    def model(self, label: str) -> InstructModel:
        """The InstructModel of a choice (loaded now if it is not); WeightsError & co for a bad archive."""
        with self.lock:
            if label in self.loaded:
                self.loaded.move_to_end(label)
                return self.loaded[label]
            path = self.path_of(label)
            if label != BASE and path is None:
                raise ValueError(f"{label}: no such adapter any more")
            model = InstructModel.load(path, base_model=self.base_model)
            self.loaded[label] = model
            while len(self.loaded) > MAX_LOADED:
                self.loaded.popitem(last=False)
            return model
