"""``agssp init FOLDER...``: recognise each folder's layout and write a commented ``agssp.yaml``.

The config carries production-sized settings (not the demo's one-epoch, 160 px ones) and marks every
guess (format, role, normal folders) with ``CONFIRM`` so the user reviews them before a long run.
Roles: folders whose layout gives boxes or masks are downstream (finetuning and evaluation) sets;
unlabelled, image-label-only or normal-heavy folders are pretraining sources.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from agssp_pipeline import artifact_io
from agssp_pipeline.sources.detect import Claim, recognise

PRODUCTION_SETTINGS = """\
# Production-sized settings (GPU). On a CPU-only machine lower epochs and image sizes first.
kead:
  encoder: cnn_fewshot      # or a CLIP encoder (see README "KeAD encoders")
  mode: fewshot
  k_shot: 4
  # cnn_fewshot input (measured: agssp_pipeline/kead/cnn_encoder.py); image_size unset = 320 for cnn_fewshot
  input: aspect             # keep each image's aspect ratio (squash: stretch to a square, faster)
  cnn_layers: [2, 3]        # [2, 3, 4] for large diffuse defects (uneven finish)
  batch_size: 16
  num_workers: auto
  device: auto

boxes:
  method: measured          # or paper: the paper's exact rule (agssp_pipeline/boxes/__init__.py)
  delta: 0.1
  top_k: 10

backbone:
  backbones: [yolov8n]
  epochs: 50
  batch_size: 32
  image_size: 320           # multiple of 32
  num_workers: 4
  device: auto

detector:
  model: yolov8n
  epochs: 50
  image_size: 640           # multiple of 32
  batch_size: 16
  workers: 8
  device: auto

finetune:
  epochs: 100
  image_size: 640           # multiple of 32
  batch_size: 16
  val_fraction: 0.2
  workers: 8
  device: auto
"""


@dataclass
class FolderGuess:
    """What ``agssp init`` decided about one folder."""

    root: Path
    name: str
    claim: Claim
    role: str
    role_reason: str


def slug(text: str) -> str:
    """A source name (``^[a-z0-9_]+$``) from a folder name."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "source"


def guess_role(claim: Claim) -> tuple[str, str]:
    """(role, why): labelled by boxes/masks -> downstream unless it is mostly normal images."""
    if claim.labels in ("boxes", "masks") and not claim.normal_subfolders:
        return "downstream", f"{claim.labels} present: a finetuning / evaluation set"
    if claim.labels in ("boxes", "masks"):
        return "both", f"{claim.labels} and normal folders: pretraining with references, and evaluation"
    if claim.labels == "image":
        return "pretrain", "image-level labels only (no boxes): a pretraining source"
    return "pretrain", "no labels: a pretraining source"


def inspect_folders(folders: list[str | os.PathLike[str]]) -> list[FolderGuess]:
    """One guess per folder; ValueError naming the folder when it is missing or holds no images."""
    guesses: list[FolderGuess] = []
    names: set[str] = set()
    for folder in folders:
        root = Path(folder).expanduser().resolve()
        if not root.is_dir():
            raise ValueError(f"{folder}: not a folder")
        claim = recognise(root)
        if claim is None:
            raise ValueError(f"{folder}: no images found (supported: .jpg .png .bmp .tif ...)")
        name = slug(root.name)
        while name in names:
            name += "_2"
        names.add(name)
        guesses.append(FolderGuess(root, name, claim, *guess_role(claim)))
    return guesses


def _yaml_value(value) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    if isinstance(value, str) and (not re.fullmatch(r"[A-Za-z0-9_./-]+", value) or value.lower() in ("yes", "no", "on", "off", "true", "false", "null")):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value).lower() if isinstance(value, bool) else str(value)


def source_block(guess: FolderGuess, base: Path) -> str:
    """The commented YAML of one source."""
    claim = guess.claim
    # relative when the data lies below the config's folder (the pair can move together), else absolute
    root = os.path.relpath(guess.root, base) if guess.root.is_relative_to(base) else str(guess.root)
    lines = [f"  # {guess.root}: recognised as '{claim.format}' (score {claim.score:.2f}). CONFIRM the format."]
    lines += [f"  # {note}" for note in claim.notes]
    lines += [
        f"  - name: {guess.name}",
        "    kind: public",
        f"    format: {claim.format}",
        f"    root: {_yaml_value(root)}",
        f"    category: {guess.name}          # product / surface type; CONFIRM",
        f"    role: {guess.role}          # guessed: {guess.role_reason}. CONFIRM",
    ]
    if claim.normal_subfolders:
        lines.append(f"    normal_subfolders: {_yaml_value(claim.normal_subfolders)}   # defect-free folders; CONFIRM")
    if claim.options:
        lines.append("    options:")
        lines += [f"      {key}: {_yaml_value(value)}" for key, value in claim.options.items()]
    return "\n".join(lines)


def render_config(guesses: list[FolderGuess], base: Path) -> str:
    """The whole agssp.yaml text: header, sources, production settings."""
    header = ("# AGSSP pipeline config written by `agssp init` (production-sized settings).\n"
              "# Review every line marked CONFIRM, then: agssp validate --config <this file>\n"
              "# Relative paths resolve against this file's folder.\n")
    if not any(g.role in ("pretrain", "both") for g in guesses):
        header += "# NOTE: no pretraining source was recognised: set role: both on a source or add an unlabelled folder.\n"
    if not any(g.role in ("downstream", "both") for g in guesses):
        header += "# NOTE: no downstream (box- or mask-labelled) source: finetune_evaluation will have nothing to run on.\n"
    sources = "\n\n".join(source_block(g, base) for g in guesses)
    return f"{header}storage_root: ./agssp_data\n\nsources:\n{sources}\n\n{PRODUCTION_SETTINGS}"


def write_init_config(folders: list[str | os.PathLike[str]], out: str | os.PathLike[str],
                      force: bool = False) -> tuple[Path, list[FolderGuess]]:
    """Write the config at ``out`` (FileExistsError unless ``force``); returns its path and the guesses."""
    target = Path(out).expanduser().resolve()
    if target.exists() and not force:
        raise FileExistsError(f"{target} exists; pass --force to overwrite it")
    guesses = inspect_folders(folders)
    target.parent.mkdir(parents=True, exist_ok=True)
    artifact_io.write_text(str(target), render_config(guesses, target.parent))
    return target, guesses
