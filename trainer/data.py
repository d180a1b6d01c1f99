"""Prompts for training and evaluation: loading, chat formatting, a resumable epoch iterator, and the
self-distillation filter's bookkeeping.

Loading (:func:`load_prompts`) reads, never downloading:

- JSONL: one JSON object per line with ``prompt`` and an optional ``answer`` (and optional ``id``, ``kind``);
  the public formats are read as they are: GSM8K (``question``, ``answer`` ending in ``#### N``; the answer
  becomes N, kind ``gsm8k``), MATH-500 (``problem``, ``answer``, ``unique_id``), AIME24 (``id``,
  ``problem``, ``answer``), DeepScaleR-style ``problem`` / ``answer``;
- a ``.json`` file holding a list of such objects (DeepScaleR's training file has that shape);
- a ``.parquet`` file (the Hugging Face hub's format, MMLU-Pro's for one), read with pyarrow;
- a folder written by ``datasets.Dataset.save_to_disk`` (or a ``DatasetDict``'s; pick ``split``).

Every input problem is a :class:`DataError` (a ``ValueError``) with one line: the file, the line (or row)
and field, and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from rlkv_trainer.grading import KINDS, extract_gsm8k_gold

logger = logging.getLogger(__name__)

# DeepSeek-R1's model card (usage recommendations): "For mathematical problems, it is advisable to include
# a directive in your prompt such as: ..."; its card also says to put every instruction in the user turn
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

# a record's prompt comes from the first of these present; the others are the public formats' names
PROMPT_FIELDS = ("prompt", "problem", "question")
_ALLOWED = "a record needs 'prompt' (or 'problem' as in MATH-500 / AIME24, or 'question' as in GSM8K)"


class DataError(ValueError):
    """Bad input data; the message is one line naming the file, the line or field, and what is allowed."""


@dataclass(frozen=True)
class PromptRecord:
    """One prompt.

    Fields:
        id: stable and unique within its data set: the record's ``id`` / ``unique_id``, else
            ``"<file name>:<line>"`` (``"<folder>:<row>"`` for a dataset folder).
        prompt: the user's text, without any chat template or instruction.
        answer: the gold answer, ``None`` for unlabelled data (GSM8K: the number after ``####``).
        kind: the grading kind (:data:`rlkv_trainer.grading.KINDS`).
        reference_answer: the final answer the uncompressed model (all gates 1) gave to this prompt, for the
            label-free agreement reward; filled by the caller (``rewards.reference_answers`` extracts them,
            :func:`with_reference_answers` attaches them), ``None`` until then or when the model gave no
            extractable answer.
        source: where it came from, ``"path:line"``, for messages.
        meta: the record's other fields (``solution``, ``subject``, ``level``, ...).
    """

    id: str
    prompt: str
    answer: str | None = None
    kind: str = "math"
    reference_answer: str | None = None
    source: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)


# ---------------------------------------------------------------------------------------------------------
# loading


def record_from_dict(obj: Any, where: str, default_id: str, kind: str | None = None) -> PromptRecord:
    """One raw record (a JSON object or a dataset row) as a :class:`PromptRecord`; ``where`` prefixes errors.

    The kind is the record's ``kind`` field, else the ``kind`` argument, else ``gsm8k`` for GSM8K's format
    and ``math`` otherwise.
    """
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}; {_ALLOWED}")
    name = next((f for f in PROMPT_FIELDS if f in obj), None)
    if name is None:
        found = ", ".join(sorted(map(str, obj))) or "none"
        raise DataError(f"{where}: no prompt field; {_ALLOWED}; found fields: {found}")
    prompt = obj[name]
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: field {name!r} must be a non-empty string, got {_short(prompt)}")
    raw_answer = obj.get("answer")
    if raw_answer is not None and (isinstance(raw_answer, bool) or not isinstance(raw_answer, (str, int, float))):
        raise DataError(f"{where}: field 'answer' must be a string or a number, got {_short(raw_answer)}")
    answer = None if raw_answer is None else str(raw_answer)
    gsm8k = name == "question" and answer is not None and "####" in answer
    if gsm8k:
        answer = extract_gsm8k_gold(answer)
        if answer is None:
            raise DataError(f"{where}: field 'answer' has '####' but no number after it (GSM8K format)")
    record_kind = obj.get("kind", kind or ("gsm8k" if gsm8k else "math"))
    if record_kind not in KINDS:
        raise DataError(f"{where}: field 'kind' is {record_kind!r}; allowed: {', '.join(KINDS)}")
    id_field = next((f for f in ("id", "unique_id") if obj.get(f) is not None), None)
    rid = obj[id_field] if id_field else default_id
    meta = {k: v for k, v in obj.items() if k not in (name, "answer", "kind", id_field)}
    if gsm8k:
        meta["solution"] = obj["answer"]  # the worked answer; `answer` holds the number
    return PromptRecord(id=str(rid), prompt=prompt, answer=answer, kind=record_kind, source=where, meta=meta)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def read_rows(path: str, split: str | None = None) -> Iterator[tuple[Any, str, str]]:
    """Yield ``(raw record, where, default id)`` from a JSONL file, a JSON list, a parquet file or a dataset
    folder, as they are (``rlkv eval`` builds its benchmark items from them); :class:`DataError` for an
    unreadable file or line."""
    base = os.path.basename(os.path.normpath(path))
    if os.path.isdir(path):
        for i, row in enumerate(_dataset_rows(path, split)):
            yield row, f"{path}: row {i}", f"{base}:{i}"
        return
    if path.endswith(".parquet"):
        for i, row in enumerate(_parquet_rows(path)):
            yield row, f"{path}: row {i}", f"{base}:{i}"
        return
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror}); expected a .jsonl file, a .json list, a .parquet "
                        "file or a Hugging Face dataset folder (save_to_disk)") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); expected JSON lines") from None
    if path.endswith(".json") and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
        for i, row in enumerate(rows):
            yield row, f"{path}: record {i}", f"{base}:{i}"
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}, column {e.colno}); each line must be one "
                            "JSON object") from None
        yield row, f"{path}:{lineno}", f"{base}:{lineno}"


def _parquet_rows(path: str) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow, or rlkv-vllm[train])") from None
    try:
        return pq.read_table(path).to_pylist()
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{path}: not a readable parquet file ({' '.join(str(e).split())[:200]})") from None


def _dataset_rows(path: str, split: str | None) -> Iterable[Mapping[str, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(path)  # local files only: it has no download path
    except FileNotFoundError as e:
        raise DataError(f"{path}: a folder, but not a Hugging Face dataset saved with save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = sorted(ds)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in ds:
            asked = "no split given" if split is None else f"split {split!r} not found"
            raise DataError(f"{path}: {asked}; the dataset has splits: {', '.join(splits)}")
        ds = ds[split]
    elif split is not None:
        logger.info("%s holds one split; split=%r ignored", path, split)
    return ds


def load_prompts(path: str, *, kind: str | None = None, split: str | None = None) -> list[PromptRecord]:
    """Read every record of ``path`` (JSONL, a JSON list, or a dataset folder), in file order.

    ``kind`` sets the grading kind of records without a ``kind`` field; ``split`` picks a ``DatasetDict``'s
    split. Raises :class:`DataError` for a missing or unreadable file, a bad line, a record without a prompt,
    a duplicate id, or an empty file.
    """
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or directory; expected a .jsonl file, a .json list or a Hugging "
                        "Face dataset folder (save_to_disk)")
    if kind is not None and kind not in KINDS:
        raise DataError(f"{path}: kind {kind!r} is not a grading kind; allowed: {', '.join(KINDS)}")
    records: list[PromptRecord] = []
    seen: dict[str, str] = {}
    for raw, where, default_id in read_rows(path, split):
        record = record_from_dict(raw, where, default_id, kind)
        if record.id in seen:
            raise DataError(f"{where}: id {record.id!r} already used at {seen[record.id]}; ids must be unique")
        seen[record.id] = where
        records.append(record)
    if not records:
        raise DataError(f"{path}: no records")
    return records


# ---------------------------------------------------------------------------------------------------------
# chat formatting


@dataclass(frozen=True)
class PromptFormat:
    """How a record becomes a chat.

    Fields:
        system_prompt: a system turn, or ``None`` for none (DeepSeek-R1's card advises none).
        instruction: appended to the user turn after ``separator`` (e.g. :data:`MATH_INSTRUCTION`), or ``None``.
        separator: between the prompt and the instruction.
    """

    system_prompt: str | None = None
    instruction: str | None = None
    separator: str = "\n"


def chat_messages(record: PromptRecord, fmt: PromptFormat = PromptFormat()) -> list[dict[str, str]]:
    """The messages for ``tokenizer.apply_chat_template``: ``[{"role": ..., "content": ...}, ...]``."""
    user = record.prompt if not fmt.instruction else f"{record.prompt}{fmt.separator}{fmt.instruction}"
    messages = [{"role": "system", "content": fmt.system_prompt}] if fmt.system_prompt else []
    return messages + [{"role": "user", "content": user}]


@dataclass(frozen=True)
class RenderedPrompt:
    """A record through the chat template: ``text`` and its ``token_ids`` (``[num_tokens]``), tokenised with
    ``add_special_tokens=False`` since the template already wrote BOS where the model wants one (tokenising
    the text again with special tokens would double it)."""

    record: PromptRecord
    text: str
    token_ids: list[int]


def render_prompts(tokenizer: Any, records: Sequence[PromptRecord],
                   fmt: PromptFormat = PromptFormat()) -> list[RenderedPrompt]:
    """Apply the model's chat template (``add_generation_prompt=True``) to each record."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(f"tokenizer {name}: no chat template; set tokenizer.chat_template (a Jinja string) or use "
                        "the model's instruct / chat tokenizer")
    out = []
    for record in records:
        text = tokenizer.apply_chat_template(chat_messages(record, fmt), tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        out.append(RenderedPrompt(record, text, list(ids)))
    return out


# ---------------------------------------------------------------------------------------------------------
# the epoch iterator


def records_fingerprint(records: Sequence[PromptRecord]) -> str:
    """A short hash of the records' ids, in order: a checkpoint's iterator state only fits the same prompts."""
    h = hashlib.sha256()
    for r in records:
        h.update(r.id.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


class PromptIterator:
    """Batches of prompts over epochs, shuffled per epoch from ``seed``; deterministic and resumable.

    Epoch ``e`` visits the records in ``random.Random(f"rlkv-data:{seed}:{e}")``'s shuffle (string seeds
    hash the same in every process and Python version), in batches of ``batch_size``; with ``drop_last``
    the epoch's tail that does not fill a batch is skipped (every step sees ``batch_size`` prompts, and the
    skipped ones differ between epochs). ``num_epochs=None`` runs forever.

    ``state_dict()`` after a batch and ``load_state_dict()`` on a fresh iterator over the same records continue
    with the next batch.
    """

    VERSION = 1

    def __init__(self, records: Sequence[PromptRecord], batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True, num_epochs: int | None = None) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if not records:
            raise DataError("no prompts to iterate over")
        if drop_last and batch_size > len(records):
            raise DataError(f"batch_size {batch_size} > {len(records)} prompts, and drop_last leaves no batch")
        self.records = list(records)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.num_epochs = num_epochs
        self.epoch = 0
        self.position = 0  # index into this epoch's order of the next record to hand out
        self.step = 0  # batches handed out so far, over all epochs
        self._order = self._epoch_order(0)

    @property
    def steps_per_epoch(self) -> int:
        n, b = len(self.records), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.records)))
        if self.shuffle:
            random.Random(f"rlkv-data:{self.seed}:{epoch}").shuffle(order)
        return order

    def __iter__(self) -> "PromptIterator":
        return self

    def __next__(self) -> list[PromptRecord]:
        end = self.position + self.batch_size
        if self.position >= len(self._order) or (self.drop_last and end > len(self._order)):
            if self.num_epochs is not None and self.epoch + 1 >= self.num_epochs:
                raise StopIteration
            self.epoch += 1
            self.position, end = 0, self.batch_size
            self._order = self._epoch_order(self.epoch)
        batch = [self.records[i] for i in self._order[self.position:end]]
        self.position = min(end, len(self._order))
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """JSON-able position: ``{"version", "seed", "epoch", "position", "step", "batch_size", "shuffle",
        "drop_last", "num_records", "fingerprint"}``."""
        return {"version": self.VERSION, "seed": self.seed, "epoch": self.epoch, "position": self.position,
                "step": self.step, "batch_size": self.batch_size, "shuffle": self.shuffle,
                "drop_last": self.drop_last, "num_records": len(self.records),
                "fingerprint": records_fingerprint(self.records)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state``; :class:`DataError` if it was saved for other prompts or another order."""
        if state.get("version") != self.VERSION:
            raise DataError(f"data iterator state: version {state.get('version')!r}, this code reads {self.VERSION}")
        mine = self.state_dict()
        for key in ("seed", "batch_size", "shuffle", "drop_last", "num_records", "fingerprint"):
            if state.get(key) != mine[key]:
                raise DataError(f"data iterator state: saved with {key}={state.get(key)!r}, this run has "
                                f"{key}={mine[key]!r}; the prompts, the filter or the data settings changed")
        self.epoch, self.position, self.step = int(state["epoch"]), int(state["position"]), int(state["step"])
        self._order = self._epoch_order(self.epoch)


# ---------------------------------------------------------------------------------------------------------
# self-distillation filter


def data_fingerprint(path: str) -> str:
    """sha256 of a data file's bytes; for a dataset folder, of its files' relative paths and bytes."""
    h = hashlib.sha256()
    if os.path.isdir(path):
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                h.update(os.path.relpath(full, path).encode() + b"\0")
                _hash_file(h, full)
    else:
        _hash_file(h, path)
    return h.hexdigest()


def _hash_file(h: Any, path: str) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


@dataclass(frozen=True)
class FilterKey:
    """What a self-distillation filter result depends on; its digest names the cache file.

    Fields: ``data_hash`` (:func:`data_fingerprint`), ``model_id``, ``k`` (solved at least k times) of ``n``
    samples, ``sampling`` (the sampling parameters, JSON-able: temperature, top_p, max_tokens, seed, ...).
    """

    data_hash: str
    model_id: str
    k: int
    n: int
    sampling: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not 1 <= self.k <= self.n:
            raise DataError(f"self-distillation filter: need 1 <= k <= n, got k={self.k}, n={self.n}")

    def to_json(self) -> dict[str, Any]:
        return {"data_hash": self.data_hash, "model_id": self.model_id, "k": self.k, "n": self.n,
                "sampling": json.loads(json.dumps(dict(self.sampling), sort_keys=True, default=str))}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:20]


def select_solved(records: Sequence[PromptRecord], correct: Mapping[str, Sequence[bool]], k: int,
                  n: int) -> tuple[list[PromptRecord], dict[str, int]]:
    """Keep the records solved in at least ``k`` of their ``n`` samples.

    ``correct[record.id]`` holds the ``n`` per-sample correctness flags of the uncompressed model. Returns
    the kept records (input order) and every record's solved count. :class:`DataError` if a record has no
    results or not exactly ``n``.
    """
    counts: dict[str, int] = {}
    for r in records:
        flags = correct.get(r.id)
        if flags is None or len(flags) != n:
            got = "no" if flags is None else str(len(flags))
            raise DataError(f"self-distillation filter: prompt {r.id!r} ({r.source}) has {got} sample results, "
                            f"n = {n}")
        counts[r.id] = sum(bool(x) for x in flags)
    return [r for r in records if counts[r.id] >= k], counts


class FilterCache:
    """JSON files ``<cache_dir>/selfdistill-<digest>.json`` holding the key, the kept ids and the solved counts."""

    def __init__(self, cache_dir: str) -> None:
        self.cache_dir = cache_dir

    def path(self, key: FilterKey) -> str:
        return os.path.join(self.cache_dir, f"selfdistill-{key.digest()}.json")

    def load(self, key: FilterKey) -> dict[str, Any] | None:
        """``{"key", "kept", "solved"}`` when a result for exactly ``key`` is cached, else ``None``."""
        path = self.path(key)
        try:
            with open(path) as f:
                entry = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as e:
            logger.warning("self-distillation cache %s unreadable (%s); recomputing", path, e)
            return None
        if entry.get("key") != key.to_json():  # a digest collision or a hand-edited file
            return None
        return entry

    def save(self, key: FilterKey, kept: Sequence[str], solved: Mapping[str, int]) -> str:
        """Write atomically (temp file, then rename); returns the path."""
        os.makedirs(self.cache_dir, exist_ok=True)
        path = self.path(key)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"key": key.to_json(), "kept": list(kept), "solved": dict(solved)}, f, indent=1)
        os.replace(tmp, path)
        return path


def self_distill_filter(records: Sequence[PromptRecord], key: FilterKey, cache_dir: str,
                        sample_correctness: Callable[[Sequence[PromptRecord]], Mapping[str, Sequence[bool]]]
                        ) -> tuple[list[PromptRecord], bool]:
    """The prompts the uncompressed model solves in >= k of n samples, cached under ``key``.

    ``sample_correctness(records)`` (the rollout worker: n samples per prompt at all gates 1, graded) runs
    only on a cache miss. Returns ``(kept records, cache_hit)``. A cached entry naming an id that is not in
    ``records`` is ignored and recomputed.
    """
    cache = FilterCache(cache_dir)
    entry = cache.load(key)
    by_id = {r.id: r for r in records}
    if entry is not None:
        if all(i in by_id for i in entry["kept"]):
            return [by_id[i] for i in entry["kept"]], True
        logger.warning("self-distillation cache %s names prompts not in the data; recomputing", cache.path(key))
    kept, solved = select_solved(records, sample_correctness(records), key.k, key.n)
    cache.save(key, [r.id for r in kept], solved)
    return kept, False


def with_reference_answers(records: Sequence[PromptRecord],
                           answers: Sequence[str | None]) -> list[PromptRecord]:
    """Copies of ``records`` with ``reference_answer`` set (``answers[i]`` for ``records[i]``)."""
    if len(answers) != len(records):
        raise DataError(f"reference answers: {len(answers)} answers for {len(records)} prompts")
    return [replace(r, reference_answer=a) for r, a in zip(records, answers)]
