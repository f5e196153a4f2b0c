"""Where the app reads and writes: a models folder (A1111 or ComfyUI layout) and an outputs folder.

Everything the app writes lands under these two roots (uploaded datasets, runs, generated images, LoRAs), and
only they are served to the browser. Tests point both at temporary folders, so they never touch the user's.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from app.errors import UserError

# A1111's name first, then ComfyUI's: an existing folder of either layout is used as it is.
# (Checkpoints are listed by trainer.models.list_checkpoints.)
LORA_DIR_NAMES = ("Lora", "loras")
LORA_SUFFIXES = (".safetensors",)


@dataclass(frozen=True)
class Folders:
    models_dir: Path
    outputs_dir: Path

    @classmethod
    def create(cls, models_dir: str | Path, outputs_dir: str | Path) -> "Folders":
        folders = cls(Path(models_dir).expanduser().resolve(), Path(outputs_dir).expanduser().resolve())
        if folders.models_dir.exists() and not folders.models_dir.is_dir():
            raise NotADirectoryError(f"--models-dir {folders.models_dir} is a file; give a folder "
                                     "(an AUTOMATIC1111 or ComfyUI `models` folder, or a new one)")
        for path in (folders.lora_dir, folders.datasets_dir, folders.runs_dir, folders.generated_dir):
            path.mkdir(parents=True, exist_ok=True)
        return folders

    def _first_existing(self, names: tuple[str, ...]) -> Path:
        for name in names:
            if (self.models_dir / name).is_dir():
                return self.models_dir / name
        return self.models_dir / names[0]

    @property
    def lora_dir(self) -> Path:
        return self._first_existing(LORA_DIR_NAMES)

    @property
    def datasets_dir(self) -> Path:
        return self.outputs_dir / "datasets"

    @property
    def runs_dir(self) -> Path:
        return self.outputs_dir / "runs"

    @property
    def generated_dir(self) -> Path:
        return self.outputs_dir / "generated"

    def served(self) -> list[str]:
        """The only folders the browser may fetch files from (gradio's allowed_paths)."""
        return [str(self.lora_dir), str(self.outputs_dir)]

    def dataset_path(self, name: str) -> Path:
        """outputs/datasets/<name>, refusing names that would point anywhere else."""
        return self.datasets_dir / safe_folder_name(name, "dataset name")

    def list_datasets(self) -> list[str]:
        return sorted(p.name for p in self.datasets_dir.iterdir() if p.is_dir())

    def latest_dataset(self) -> str | None:
        """The dataset changed last (an upload or a caption edit): what a reopened page shows."""
        folders = [p for p in self.datasets_dir.iterdir() if p.is_dir()]
        newest = lambda p: max((f.stat().st_mtime for f in p.iterdir()), default=p.stat().st_mtime)  # noqa: E731
        return max(folders, key=newest).name if folders else None

    def list_loras(self) -> list[Path]:
        """LoRA files in the LoRA folder, subfolders included (A1111 allows them), newest first."""
        files = [p for p in self.lora_dir.rglob("*") if p.suffix.lower() in LORA_SUFFIXES and p.is_file()]
        return sorted(files, key=lambda p: p.stat().st_mtime, reverse=True)

    def base_models(self) -> list[tuple[str, str]]:
        """(label, path) choices for the base-model pickers: the demo model, then the checkpoints found."""
        from trainer.models import DEMO_MODEL_DIR, list_checkpoints  # the engine's one listing of checkpoints

        demo = "Demo model (built in, tiny)" if DEMO_MODEL_DIR.exists() else "Demo model (missing: see README)"
        choices = [(demo, str(DEMO_MODEL_DIR))]
        for path in list_checkpoints(self.models_dir):
            choices.append((Path(path).name, str(path)))
        return choices


def safe_folder_name(name: str, what: str) -> str:
    """A single folder/file stem typed by the user: refused if it could leave its parent folder."""
    name = (name or "").strip()
    if not name:
        raise UserError(f"the {what} is empty: type a name such as my-style")
    if name in (".", "..") or re.search(r"[/\\:]", name) or name.startswith(".") or Path(name).is_absolute():
        raise UserError(f"the {what} {name!r} may not contain '/', '\\', ':' or start with '.': "
                         "use letters, digits, '-' and '_'")
    if not re.fullmatch(r"[\w\- .()+@&'\[\]]+", name):
        raise UserError(f"the {what} {name!r} has unusual characters: use letters, digits, '-' and '_'")
    return name
