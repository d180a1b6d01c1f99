"""Head patterns: gate values per (layer, KV head), their files, and full/streaming selection.

Formats (never pickle):
- TSV / TXT: the published RLKV and DuoAttention layout, an L x H_kv grid of gate values.
- JSON: ``{"format": "rlkv-pattern", "version": 1, "gates": [[...], ...], "metadata": {...}}``.
- safetensors: a float32 tensor ``gates`` [L, H_kv]; metadata as string fields of the header.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .settings import ModelShape, RLKVConfigError, RLKVSettings, config_error

PATTERN_FORMAT = "rlkv-pattern"
PATTERN_VERSION = 1


@dataclass
class HeadPattern:
    """Gate values and what is known of where they came from.

    gates: float32 [num_layers, num_kv_heads]; larger means more important.
    metadata: model_id, num_layers, num_kv_heads, sink, recent, source, training config...
    path: the file it was loaded from (named in errors); None for a pattern made in memory.
    """

    gates: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    def __post_init__(self) -> None:
        self.gates = np.asarray(self.gates, dtype=np.float32)
        if self.gates.ndim != 2 or self.gates.size == 0:
            raise ValueError(f"gates must be a non-empty 2-D array, got shape {self.gates.shape}")
        self.metadata.setdefault("num_layers", int(self.gates.shape[0]))
        self.metadata.setdefault("num_kv_heads", int(self.gates.shape[1]))

    @property
    def num_layers(self) -> int:
        return int(self.gates.shape[0])

    @property
    def num_kv_heads(self) -> int:
        return int(self.gates.shape[1])

    @property
    def name(self) -> str:
        """How errors and warnings name this pattern."""
        return self.path or "pattern"

    # ---------------------------------------------------------------- files
    @classmethod
    def load(cls, path: str) -> "HeadPattern":
        """Read and check a pattern on its own (no model): readable, non-empty, finite,
        metadata agreeing with the gates. Raises RLKVConfigError naming the file."""
        pattern = cls._read(path)
        pattern.path = path
        pattern.check_consistent()
        return pattern

    @classmethod
    def _read(cls, path: str) -> "HeadPattern":
        if not os.path.isfile(path):
            raise config_error("heads", path, "no such file: give a readable pattern file")
        ext = os.path.splitext(path)[1].lower()
        try:
            if ext in (".tsv", ".txt", ".csv"):
                return cls._load_text(path, delimiter="," if ext == ".csv" else None)
            if ext == ".json":
                with open(path, encoding="utf-8") as f:
                    doc = json.load(f)
                return cls.from_json_dict(doc)
            if ext == ".safetensors":
                return cls._load_safetensors(path)
        except RLKVConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - turned into one readable line
            reason = " ".join(f"{type(e).__name__}: {e}".split())
            raise config_error("heads", path, f"could not be read as a head pattern ({reason})") from None
        raise config_error("heads", path, "unknown extension: use .tsv, .json or .safetensors")

    @classmethod
    def _load_text(cls, path: str, delimiter: str | None) -> "HeadPattern":
        with warnings.catch_warnings():
            # numpy warns on an empty file before returning an empty array; we refuse it below
            warnings.simplefilter("ignore", UserWarning)
            gates = np.loadtxt(path, dtype=np.float64, delimiter=delimiter, ndmin=2)
        if gates.size == 0:
            raise config_error("heads", path, "is empty: expected an L x H_kv grid of gate values "
                               "(one line per layer)")
        return cls(gates, {"source": f"file:{os.path.basename(path)}"})

    @classmethod
    def from_json_dict(cls, doc: Any) -> "HeadPattern":
        if not isinstance(doc, dict) or doc.get("format") != PATTERN_FORMAT:
            raise ValueError(f'not an RLKV pattern: expected "format": "{PATTERN_FORMAT}"')
        if int(doc.get("version", 0)) > PATTERN_VERSION:
            raise ValueError(f"pattern version {doc.get('version')} is newer than this package")
        meta = dict(doc.get("metadata", {}))
        return cls(np.asarray(doc["gates"], dtype=np.float64), meta)

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "format": PATTERN_FORMAT,
            "version": PATTERN_VERSION,
            "gates": self.gates.astype(float).tolist(),
            "metadata": self.metadata,
        }

    @classmethod
    def _load_safetensors(cls, path: str) -> "HeadPattern":
        from safetensors.numpy import safe_open

        with safe_open(path, framework="np") as f:
            if "gates" not in f.keys():
                raise ValueError('no tensor named "gates"')
            gates = f.get_tensor("gates")
            raw_meta = f.metadata() or {}
        meta: dict[str, Any] = {}
        for k, v in raw_meta.items():
            try:
                meta[k] = json.loads(v)
            except (json.JSONDecodeError, TypeError):
                meta[k] = v
        return cls(gates, meta)

    def save(self, path: str) -> None:
        """Write as JSON or safetensors (by extension)."""
        ext = os.path.splitext(path)[1].lower()
        if ext == ".json":
            with open(path, "w", encoding="utf-8") as f:
                json.dump(self.to_json_dict(), f, indent=1)
        elif ext == ".safetensors":
            from safetensors.numpy import save_file

            meta = {k: json.dumps(v) for k, v in self.metadata.items()}
            meta["format"] = json.dumps(PATTERN_FORMAT)
            save_file({"gates": np.ascontiguousarray(self.gates)}, path, metadata=meta)
        elif ext in (".tsv", ".txt"):
            np.savetxt(path, self.gates, delimiter="\t", fmt="%.18e")
        else:
            raise ValueError(f"unknown pattern extension {ext!r}: use .json, .safetensors or .tsv")

    # ----------------------------------------------------------- validation
    def check_consistent(self) -> None:
        """The pattern on its own: gate values finite, metadata shape equal to the gates' shape."""
        if not np.all(np.isfinite(self.gates)):
            raise config_error("heads", self.name, "holds NaN or inf: every gate must be a finite number")
        stated = []
        for key in ("num_layers", "num_kv_heads"):
            value = self.metadata[key]
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int):
                raise config_error("heads", self.name, f"has metadata {key} = {value!r}: must be a whole number")
            stated.append(value)
        if tuple(stated) != (self.num_layers, self.num_kv_heads):
            raise config_error(
                "heads",
                self.name,
                f"has metadata num_layers x num_kv_heads = {stated[0]} x {stated[1]} but its gates are "
                f"{self.num_layers} x {self.num_kv_heads}: fix the metadata or the gates",
            )

    def check_shape(self, shape: ModelShape) -> None:
        """The pattern against a model: one gate per (layer, KV head)."""
        if (self.num_layers, self.num_kv_heads) != (shape.num_layers, shape.num_kv_heads):
            raise config_error(
                "heads",
                self.name,
                f"has shape {self.num_layers} x {self.num_kv_heads} (layers x KV heads) but "
                f"the model has {shape.num_layers} x {shape.num_kv_heads}",
            )

    def model_warning(self, shape: ModelShape) -> str | None:
        """A one-line warning when the pattern's metadata names another model than the served one."""
        made_for = self.metadata.get("model_id")
        if not made_for or not shape.model_id or same_model_id(str(made_for), shape.model_id):
            return None
        return (
            f"rlkv.heads = {self.name!r} was made for model {made_for!r} (its metadata model_id), "
            f"not the served model {shape.model_id!r}: check that the pattern belongs to this model"
        )


def _model_key(model_id: str) -> str:
    return os.path.basename(model_id.strip().rstrip("/")).lower()


def same_model_id(a: str, b: str) -> bool:
    """Whether two model ids name the same model, leniently: a hub id, a local path and a
    path with a trailing '/' agree when their last parts agree, ignoring case."""
    return _model_key(a) == _model_key(b)


def select_full_heads(
    gates: np.ndarray,
    sparsity: float,
    selection: str = "global",
) -> np.ndarray:
    """Which KV heads keep a full cache.

    gates: [L, H_kv] gate values (clipped to [0, 1] first, as the paper does).
    Returns bool [L, H_kv], True = full head.

    - "global": one quantile over all heads (numpy's linear interpolation, as
      ``torch.quantile``); heads at or above it stay full. Gates tied at the quantile are kept
      only as far as the quantile's own count, n - ceil(s * (n - 1)), lowest index first.
    - "per_layer": each layer keeps its round((1 - s) * H_kv) highest heads (ties: lower index).
    - "explicit": gates must be 0/1; 1 = full.
    """
    g = np.clip(np.asarray(gates, dtype=np.float64), 0.0, 1.0)
    if selection == "explicit":
        raw = np.asarray(gates, dtype=np.float64)
        if not np.all((raw == 0.0) | (raw == 1.0)):
            raise config_error(
                "selection", "explicit", "needs a pattern of 0/1 values (1 = full head)"
            )
        return raw == 1.0
    if sparsity <= 0.0:
        return np.ones(g.shape, dtype=bool)
    if selection == "global":
        flat = g.reshape(-1)
        threshold = np.quantile(flat, sparsity, method="linear")
        # the paper keeps every head at or above the quantile; where gates tie at it (a learned pattern's
        # many exact zeros), that keeps them all and the sparsity asked is lost (s=0.5 of a pattern with 10
        # zero gates in 16 would keep all 16). Keep as many as the quantile does on distinct values,
        # n - ceil(s * (n - 1)), the tied ones by lowest index; without ties this is the paper's rule exactly
        keep = flat.size - int(np.ceil(sparsity * (flat.size - 1) - 1e-9))
        mask = flat > threshold
        tied = np.flatnonzero(flat == threshold)
        mask[tied[: max(0, keep - int(mask.sum()))]] = True
        return mask.reshape(g.shape)
    if selection == "per_layer":
        n_layers, n_heads = g.shape
        keep = int(np.floor((1.0 - sparsity) * n_heads + 0.5))
        mask = np.zeros(g.shape, dtype=bool)
        for layer in range(n_layers):
            order = np.argsort(-g[layer], kind="stable")
            mask[layer, order[:keep]] = True
        return mask
    raise config_error("selection", selection, "must be one of global, per_layer, explicit")


def mask_from_full_heads(full_heads: tuple[tuple[int, int], ...], shape: ModelShape) -> np.ndarray:
    return _mask_from_pairs(full_heads, shape.num_layers, shape.num_kv_heads)


def _mask_from_pairs(full_heads: tuple[tuple[int, int], ...], num_layers: int, num_kv_heads: int) -> np.ndarray:
    mask = np.zeros((num_layers, num_kv_heads), dtype=bool)
    for layer, head in full_heads:
        if not (0 <= layer < num_layers and 0 <= head < num_kv_heads):
            raise config_error(
                "full_heads",
                [layer, head],
                f"layer must be in [0, {num_layers}) and KV head in [0, {num_kv_heads})",
            )
        mask[layer, head] = True
    return mask


def streaming_fraction(mask: np.ndarray) -> float:
    """The effective sparsity: the fraction of KV heads a full-head mask leaves streaming."""
    return float(1.0 - np.asarray(mask, dtype=bool).mean())


def layers_without_full_head(mask: np.ndarray) -> int:
    """Layers whose every KV head streams (they page a placeholder, see RLKVPlan)."""
    return int((~np.asarray(mask, dtype=bool).any(axis=1)).sum())


@dataclass(frozen=True)
class HeadSelection:
    """The heads the settings select, checked as a server start checks them.

    mask: bool [L, H_kv], True = full head; gates: float32 [L, H_kv] clipped to [0, 1].
    pattern: the loaded pattern file (None with explicit ``full_heads`` and no file).
    warnings: one-line problems that do not stop a start (a pattern made for another model).
    """

    mask: np.ndarray
    gates: np.ndarray
    pattern: HeadPattern | None
    warnings: tuple[str, ...] = ()


def select_heads(settings: RLKVSettings, shape: ModelShape | None = None) -> HeadSelection:
    """Settings (+ model shape) -> the full heads, with every check a server start makes.

    Without a shape (``rlkv pattern`` with no ``--model``) the pattern is checked on its
    own and its grid is the model's. Raises RLKVConfigError for an unreadable, empty,
    non-finite or self-contradicting file, a shape mismatch, a non-binary explicit
    pattern, or a mask with no full head at all.
    """
    if shape is not None:
        shape.check()
    pattern = HeadPattern.load(settings.heads) if settings.heads is not None else None
    if pattern is not None and shape is not None:
        pattern.check_shape(shape)
    if settings.selection == "explicit" and settings.full_heads is not None:
        if shape is not None:
            grid = (shape.num_layers, shape.num_kv_heads)
        elif pattern is not None:
            grid = (pattern.num_layers, pattern.num_kv_heads)
        else:
            raise config_error("heads", None, "a head pattern file or a model is needed to place full_heads")
        mask = _mask_from_pairs(settings.full_heads, *grid)
    else:
        assert pattern is not None  # parse_settings requires a file unless full_heads are given
        mask = select_full_heads(pattern.gates, settings.sparsity, settings.selection)
    if not mask.any():
        raise config_error(
            "heads",
            settings.heads or "full_heads",
            "leaves the model with no full head at all; vLLM's scheduler needs at least one "
            "full KV head to page (lower rlkv.sparsity or mark a head full)",
        )
    gates = pattern.gates if pattern is not None else mask.astype(np.float32)
    warning = pattern.model_warning(shape) if pattern is not None and shape is not None else None
    return HeadSelection(
        mask=mask,
        gates=np.clip(gates, 0.0, 1.0).astype(np.float32),
        pattern=pattern,
        warnings=(warning,) if warning else (),
    )


def resolve_head_mask(settings: RLKVSettings, shape: ModelShape) -> tuple[np.ndarray, np.ndarray]:
    """Settings + model shape -> (full-head mask [L, H_kv] bool, gates [L, H_kv] float32)."""
    selection = select_heads(settings, shape)
    return selection.mask, selection.gates


def local_kv_heads(num_kv_heads: int, tp_size: int, tp_rank: int) -> list[int]:
    """Global KV-head indices held by one tensor-parallel rank (vLLM's split).

    With tp_size > num_kv_heads, vLLM replicates KV heads: each rank holds one.
    """
    if tp_size <= num_kv_heads:
        if num_kv_heads % tp_size:
            raise RLKVConfigError(
                f"tensor_parallel_size = {tp_size} does not divide the model's "
                f"{num_kv_heads} KV heads"
            )
        per = num_kv_heads // tp_size
        return list(range(tp_rank * per, (tp_rank + 1) * per))
    if tp_size % num_kv_heads:
        raise RLKVConfigError(
            f"tensor_parallel_size = {tp_size} is not a multiple of the model's "
            f"{num_kv_heads} KV heads"
        )
    return [tp_rank // (tp_size // num_kv_heads)]


@dataclass(frozen=True)
class LayerHeads:
    """One layer's split on this rank, in local KV-head indices.

    full / stream: local KV heads with a full / streaming cache.
    paged_slots: KV-head slots the paged cache reports for this layer (the max
        n_full over TP ranks, so every rank reports the same spec).
    """

    full: tuple[int, ...]
    stream: tuple[int, ...]
    paged_slots: int

    @property
    def n_full(self) -> int:
        return len(self.full)

    @property
    def n_stream(self) -> int:
        return len(self.stream)


def split_layers(mask: np.ndarray, tp_size: int = 1, tp_rank: int = 0) -> list[LayerHeads]:
    """Per-layer full/streaming split of the local KV heads of one TP rank."""
    n_layers, n_kv = mask.shape
    ranks = [local_kv_heads(n_kv, tp_size, r) for r in range(tp_size)]
    mine = ranks[tp_rank]
    out = []
    for layer in range(n_layers):
        full = tuple(i for i, h in enumerate(mine) if mask[layer, h])
        stream = tuple(i for i, h in enumerate(mine) if not mask[layer, h])
        slots = max(sum(bool(mask[layer, h]) for h in r) for r in ranks)
        out.append(LayerHeads(full=full, stream=stream, paged_slots=slots))
    return out
