"""KeAD prompts: a YAML knowledge base per category, prompt building, truncation checks, text embeddings.

Knowledge base (``agssp_pipeline/kead/prompts/*.yaml``; users add or override categories with
``kead.prompts_file``, a YAML file or a folder of them): each category names its object, aliases, and
defect types with their visual description. ``_generic.yaml`` holds the WinCLIP-style normal/anomalous
states and the template ensemble. Unknown categories fall back to ``metal_surface``.

Prompts for one category:

* normal: every normal state x every template ("a close-up photo of a flawless rolled steel strip.");
* anomalous, generic: every anomalous state x every template;
* anomalous, knowledge: one sentence per defect type, "A photo of {object} with {defect} defect, it
  appears as {features}." (KeAD's knowledge-enhanced prompt).

Text embedding of a class (choices where the paper is silent are marked *):

1. encode each prompt, L2-normalise, average, renormalise (CLIP prompt ensembling);
2. * the anomalous class averages the generic-ensemble embedding and the knowledge embedding with equal
   weight (then renormalises), so ~90 generic prompts do not drown the handful of knowledge sentences;
3. redundancy removal (CLIP Surgery): the "empty prompt" embedding r, i.e. the template ensemble with an
   empty object (step 1 over ``template.format(state="")``), is subtracted from every class embedding.
   CLIP Surgery scores ``f_img . (t - r)``; with only two classes that subtraction cancels inside the
   softmax (both logits lose ``f_img . r``), so * we renormalise ``t - r`` to unit length, which keeps
   the component that tells the classes apart and drops the part every prompt shares.

Embeddings are cached per (model identity, prompt-set hash) in memory and, when a cache folder is
given, on disk, so a category's text tower pass happens once per model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

logger = logging.getLogger(__name__)

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
GENERIC_FILE = "_generic.yaml"
FALLBACK_CATEGORY = "metal_surface"
PROMPT_METHOD_VERSION = "kead-prompts-v1"  # bump when the embedding recipe above changes


class PromptConfigError(ValueError):
    """A knowledge-base YAML is missing fields or malformed; the message names the file."""


def normalise_key(name: str) -> str:
    """'Steel Strip' / 'steel-strip' / 'steel_strip' -> 'steel_strip'."""
    return re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_")


@dataclass(frozen=True)
class DefectKnowledge:
    type: str
    features: str


@dataclass(frozen=True)
class CategoryKnowledge:
    category: str
    object: str
    defects: tuple[DefectKnowledge, ...]
    aliases: tuple[str, ...] = ()
    source: str = ""


@dataclass(frozen=True)
class GenericPrompts:
    normal_states: tuple[str, ...]
    anomalous_states: tuple[str, ...]
    templates: tuple[str, ...]
    knowledge_template: str


@dataclass(frozen=True)
class PromptSet:
    """All prompts of one category; ``hash`` changes whenever any prompt text or the recipe changes."""

    category: str
    object: str
    normal: tuple[str, ...]
    anomalous_generic: tuple[str, ...]
    anomalous_knowledge: tuple[str, ...]
    redundant: tuple[str, ...]

    @property
    def all_prompts(self) -> tuple[str, ...]:
        return self.normal + self.anomalous_generic + self.anomalous_knowledge + self.redundant

    @property
    def hash(self) -> str:
        payload = json.dumps([PROMPT_METHOD_VERSION, self.normal, self.anomalous_generic,
                              self.anomalous_knowledge, self.redundant])
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _require(data: dict[str, Any], key: str, origin: str) -> Any:
    if key not in data or data[key] in (None, "", []):
        raise PromptConfigError(f"{origin}: missing field '{key}'")
    return data[key]


def _parse_category(data: dict[str, Any], origin: str) -> CategoryKnowledge:
    if not isinstance(data, dict):
        raise PromptConfigError(f"{origin}: a category entry must be a mapping")
    defects = []
    for index, item in enumerate(_require(data, "defects", origin)):
        where = f"{origin}: defects[{index}]"
        if not isinstance(item, dict):
            raise PromptConfigError(f"{where} must be a mapping with 'type' and 'features'")
        defects.append(DefectKnowledge(str(_require(item, "type", where)), str(_require(item, "features", where))))
    return CategoryKnowledge(
        category=normalise_key(str(_require(data, "category", origin))),
        object=str(_require(data, "object", origin)),
        defects=tuple(defects),
        aliases=tuple(normalise_key(a) for a in data.get("aliases", []) or []),
        source=origin,
    )


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise PromptConfigError(f"{path}: not valid YAML: {error}") from None


def _categories_in_file(path: Path) -> list[CategoryKnowledge]:
    data = _read_yaml(path)
    if isinstance(data, dict) and "categories" in data:
        return [_parse_category(entry, f"{path}[{i}]") for i, entry in enumerate(data["categories"])]
    return [_parse_category(data, str(path))]


@dataclass
class KnowledgeBase:
    """Categories by key and alias, generic states/templates; look-ups never fail (fallback category)."""

    generic: GenericPrompts
    categories: dict[str, CategoryKnowledge] = field(default_factory=dict)
    _aliases: dict[str, str] = field(default_factory=dict)

    def add(self, knowledge: CategoryKnowledge) -> None:
        self.categories[knowledge.category] = knowledge
        for alias in (knowledge.category, *knowledge.aliases):
            self._aliases[alias] = knowledge.category

    def lookup(self, category: str) -> CategoryKnowledge:
        key = self._aliases.get(normalise_key(category))
        if key is None:
            logger.info("no prompt knowledge for category '%s': using '%s'", category, FALLBACK_CATEGORY)
            key = FALLBACK_CATEGORY
        return self.categories[key]

    def prompt_set(self, category: str) -> PromptSet:
        knowledge = self.lookup(category)
        generic = self.generic

        def ensemble(states: Sequence[str], obj: str) -> tuple[str, ...]:
            phrases = [re.sub(r"\s+", " ", s.format(object=obj)).strip() for s in states]
            return tuple(t.format(state=p) for p in phrases for t in generic.templates)

        knowledge_prompts = tuple(
            generic.knowledge_template.format(object=knowledge.object, defect=d.type, features=d.features)
            for d in knowledge.defects
        )
        return PromptSet(
            category=knowledge.category,
            object=knowledge.object,
            normal=ensemble(generic.normal_states, knowledge.object),
            anomalous_generic=ensemble(generic.anomalous_states, knowledge.object),
            anomalous_knowledge=knowledge_prompts,
            redundant=tuple(t.format(state="") for t in generic.templates),
        )

    @property
    def hash(self) -> str:
        """One hash over every category's prompts: goes into the encoder identity (store versioning)."""
        digest = hashlib.sha256()
        for key in sorted(self.categories):
            digest.update(key.encode())
            digest.update(self.prompt_set(key).hash.encode())
        return digest.hexdigest()[:16]


def load_knowledge_base(extra: str | Path | None = None) -> KnowledgeBase:
    """Built-in YAMLs plus the user's ``prompts_file`` (file or folder), whose categories override."""
    generic_data = _read_yaml(PROMPTS_DIR / GENERIC_FILE)
    generic = GenericPrompts(
        normal_states=tuple(generic_data["normal_states"]),
        anomalous_states=tuple(generic_data["anomalous_states"]),
        templates=tuple(generic_data["templates"]),
        knowledge_template=str(generic_data["knowledge_template"]),
    )
    base = KnowledgeBase(generic=generic)
    files = sorted(p for p in PROMPTS_DIR.glob("*.yaml") if p.name != GENERIC_FILE)
    if extra is not None:
        extra_path = Path(extra).expanduser()
        if extra_path.is_dir():
            files += sorted(extra_path.glob("*.y*ml"))
        elif extra_path.is_file():
            files.append(extra_path)
        else:
            raise PromptConfigError(f"prompts_file {extra_path} does not exist")
    for path in files:
        for knowledge in _categories_in_file(path):
            base.add(knowledge)
    if FALLBACK_CATEGORY not in base.categories:
        raise PromptConfigError(f"the fallback category '{FALLBACK_CATEGORY}' is missing from {PROMPTS_DIR}")
    return base


def find_truncated(prompts: Sequence[str], tokenizer: Any, context_length: int | None = None) -> list[str]:
    """Prompts longer than the text context (77 for CLIP): CLIP silently cuts them, losing the features.

    Counts BPE tokens plus start/end tokens with the tokenizer's own ``encode`` when it has one, else
    checks whether the tokenized row is full to its last position.
    """
    length = int(context_length or getattr(tokenizer, "context_length", 77))
    truncated: list[str] = []
    if hasattr(tokenizer, "encode"):
        for prompt in prompts:
            if len(tokenizer.encode(prompt)) + 2 > length:
                truncated.append(prompt)
        return truncated
    tokens = tokenizer(list(prompts))
    for prompt, row in zip(prompts, tokens, strict=True):
        if int(row[-1]) != 0:
            truncated.append(prompt)
    return truncated


def warn_truncated(prompt_set: PromptSet, tokenizer: Any) -> list[str]:
    truncated = find_truncated(prompt_set.all_prompts, tokenizer)
    for prompt in truncated:
        logger.warning("prompt for category '%s' exceeds the text context and is truncated: %r",
                       prompt_set.category, prompt)
    return truncated


def encode_ensemble(encode_text: Callable[[list[str]], torch.Tensor], prompts: Sequence[str]) -> torch.Tensor:
    """Normalise each prompt embedding, average, renormalise -> (D,)."""
    features = F.normalize(encode_text(list(prompts)).float(), dim=-1)
    return F.normalize(features.mean(dim=0), dim=-1)


def class_text_embeddings(
    encode_text: Callable[[list[str]], torch.Tensor], prompt_set: PromptSet
) -> torch.Tensor:
    """(2, D): row 0 normal, row 1 anomalous, redundancy-removed and unit length (recipe in module doc)."""
    normal = encode_ensemble(encode_text, prompt_set.normal)
    anomalous = encode_ensemble(encode_text, prompt_set.anomalous_generic)
    if prompt_set.anomalous_knowledge:
        knowledge = encode_ensemble(encode_text, prompt_set.anomalous_knowledge)
        anomalous = F.normalize(anomalous + knowledge, dim=-1)
    redundant = encode_ensemble(encode_text, prompt_set.redundant)
    classes = torch.stack([normal, anomalous]) - redundant
    return F.normalize(classes, dim=-1)


class TextEmbeddingCache:
    """Class embeddings per (model identity, prompt hash): memory first, then ``cache_dir`` on disk."""

    def __init__(self, cache_dir: str | Path | None = None) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._memory: dict[str, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(model_identity: str, prompt_hash: str) -> str:
        return hashlib.sha256(f"{model_identity}|{prompt_hash}".encode()).hexdigest()[:24]

    def get_or_compute(
        self, model_identity: str, prompt_set: PromptSet, compute: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        key = self.key(model_identity, prompt_set.hash)
        if key in self._memory:
            self.hits += 1
            return self._memory[key]
        path = self.cache_dir / f"{key}.pt" if self.cache_dir else None
        if path is not None and path.is_file():
            try:
                stored = torch.load(path, map_location="cpu", weights_only=True)
                if stored.get("model") == model_identity and stored.get("prompt_hash") == prompt_set.hash:
                    self.hits += 1
                    self._memory[key] = stored["embeddings"]
                    return self._memory[key]
            except Exception as error:  # corrupt or foreign file: recompute and overwrite
                logger.warning("ignoring unreadable text-embedding cache %s: %s", path, error)
        self.misses += 1
        embeddings = compute().detach().float().cpu()
        self._memory[key] = embeddings
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save({"model": model_identity, "prompt_hash": prompt_set.hash, "embeddings": embeddings}, tmp)
            tmp.replace(path)
        return embeddings
