"""Conversations → cached (input_ids, labels) records for SFT: render each conversation with
exact masks (`render.py`), apply the length policy, count every skip by reason."""

from __future__ import annotations

import array
import enum
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence

from lmforge.data.cache import (
    INT32,
    Cached,
    PrepareProgress,
    RowWriter,
    build_or_load,
    cache_key,
    chunked,
    ordered_map,
)
from lmforge.data.formats import (
    DataFormat,
    OnBadRecord,
    SkipCounter,
    check_then_render,
    iter_records,
    llama_factory_columns,
    skip_summary,
    to_conversation,
)
from lmforge.data.render import MaskingStrategy, Rendered, Renderer, Unrendered, split_turns
from lmforge.data.schema import parse_tools
from lmforge.errors import DataError, LmforgeError, RecordError

CHUNK = 256


class ReasoningTurns(str, enum.Enum):
    """Which samples a multi-turn conversation gives, for templates that render a turn
    differently once later turns follow (Qwen3 and DeepSeek-R1 drop earlier turns' thinking)."""

    RENDERED = "rendered"
    """One sample: each assistant turn trained as the whole conversation renders it (default)."""
    SPLIT = "split"
    """One sample per assistant turn, rendered as the last turn: every turn's thinking trained."""


class LongRecords(str, enum.Enum):
    """What to do with a record longer than `model_max_length`."""

    TRUNCATE = "truncate"
    """Keep its first `model_max_length` tokens (skipped if no trained token remains)."""
    DROP = "drop"
    """Leave it out, counted as a skip."""


@dataclass(frozen=True)
class PrepareOptions:
    """Everything besides the files and the tokenizer that changes the cached tokens."""

    data_format: DataFormat = DataFormat.AUTO
    masking: MaskingStrategy = MaskingStrategy.ASSISTANT
    model_max_length: int = 2048
    long_records: LongRecords = LongRecords.TRUNCATE
    on_bad_record: OnBadRecord = OnBadRecord.ERROR
    unrendered: Unrendered = Unrendered.ERROR
    reasoning_turns: ReasoningTurns = ReasoningTurns.RENDERED
    tools: tuple[dict, ...] | None = None
    """Tools offered to every record that names none of its own (`--tools FILE`)."""


@dataclass
class PrepareStats:
    records: int = 0
    kept: int = 0
    truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    skip_examples: dict[str, str] = field(default_factory=dict)
    samples: int = 0
    """Rows written: `kept` records, or more with `--reasoning_turns split`."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Parts of kept records left out under `--unrendered drop`, by part."""

    def summary(self) -> str:
        lines = [
            f"records: {self.records}  kept: {self.kept}  truncated: {self.truncated}",
            f"tokens: {self.tokens}  trained tokens: {self.trained_tokens}",
        ]
        if self.samples != self.kept:
            lines.append(f"samples: {self.samples} (one per assistant turn)")
        if self.dropped:
            lines.append("left out (--unrendered drop): " + ", ".join(f"{k}: {n}" for k, n in sorted(self.dropped.items())))
        return "\n".join(lines + skip_summary(self.skipped, self.skip_examples))


SftCache = Cached[PrepareStats]


def read_tools(path: str) -> tuple[dict, ...]:
    """`--tools FILE`: a JSON list of tool schemas (OpenAI's, or LLaMA-Factory's flat ones)."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        raise DataError(path, None, "file does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(path, None, f"--tools: cannot read it as JSON: {e}") from None
    try:
        return parse_tools(value, "the file")
    except RecordError as e:
        raise DataError(path, None, f"--tools: {e.reason}") from None


# Worker side: one renderer and the options per process.
_RENDERER: Renderer | None = None
_OPTIONS = PrepareOptions()


def _init_worker(renderer: Renderer, options: PrepareOptions) -> None:
    global _RENDERER, _OPTIONS
    _RENDERER, _OPTIONS = renderer, options


def _render_chunk(chunk: list[tuple[str, str, Any, DataFormat]]) -> list[tuple[str, str, list[Rendered] | RecordError]]:
    """A chunk of raw records checked and rendered in one batch (one tokenizer call for all):
    each record's samples (one, or one per assistant turn when split) or its RecordError.
    Checking happens here, in the worker, so that the main process only reads and writes."""
    assert _RENDERER is not None
    return [(path, location, result if isinstance(result, RecordError) else [_compact(r) for r in result])
            for path, location, result in check_then_render(chunk, to_conversation, _render_samples)]


def _render_samples(conversations: list) -> list[list[Rendered] | RecordError]:
    assert _RENDERER is not None
    if _OPTIONS.reasoning_turns != ReasoningTurns.SPLIT:
        return [r if isinstance(r, RecordError) else [r] for r in _RENDERER.render_batch(conversations)]
    groups = [split_turns(c, _RENDERER) for c in conversations]
    flat = iter(_RENDERER.render_batch([s for group in groups for s in group]))
    out: list[list[Rendered] | RecordError] = []
    for group in groups:
        samples = [next(flat) for _ in group]
        error = next((s for s in samples if isinstance(s, RecordError)), None)
        out.append(error or samples)
    return out


def _compact(result: Rendered) -> Rendered:
    """The record's tokens as int32 arrays (the length policy and the cache writer take any
    sequence of ints): records come back from worker processes pickled, and unpickling a list
    of ints cost the main process 25 times as much, more than all its other work together."""
    return Rendered(array.array(INT32, result.input_ids), array.array(INT32, result.labels), result.dropped)


def _records(paths: Sequence[str], options: PrepareOptions, skips: SkipCounter):
    """(path, location, raw record, format) over all files; records whose format cannot be told
    are raised or counted here, the others are checked by `_render_chunk` (a bad one comes
    back as its RecordError, which `_write` raises or counts the same way)."""
    for path in paths:
        for location, record, fmt in iter_records(path, options.data_format, options.on_bad_record, skips):
            yield path, location, record, fmt


def _rendered_records(paths, renderer: Renderer, options: PrepareOptions, skips: SkipCounter,
                      num_workers: int) -> Iterator[tuple[str, str, list[Rendered] | RecordError]]:
    """(path, location, the record's samples or its RecordError) in source order."""
    chunks = chunked(_records(paths, options, skips), CHUNK)
    for results in ordered_map(_render_chunk, chunks, num_workers, _init_worker, (renderer, options)):
        yield from results


def apply_length_policy(r: Rendered, options: PrepareOptions) -> Rendered | RecordError:
    limit = options.model_max_length
    if len(r.input_ids) <= limit:
        if r.num_trained == 0:
            return RecordError("no_trained_tokens", "no token carries loss under this masking strategy")
        return r
    if options.long_records == LongRecords.DROP:
        return RecordError("too_long", f"{len(r.input_ids)} tokens, longer than model_max_length={limit}")
    cut = Rendered(r.input_ids[:limit], r.labels[:limit])
    if cut.num_trained == 0:
        return RecordError(
            "no_trained_tokens_after_truncation",
            f"{len(r.input_ids)} tokens; truncated to model_max_length={limit}, no trained token is left",
        )
    return cut


# Length skips are always counted, never errors: the user chose the policy.
LENGTH_SKIPS = ("too_long", "no_trained_tokens", "no_trained_tokens_after_truncation")


def _write(tmp: str, records, options: PrepareOptions, skips: SkipCounter) -> PrepareStats:
    stats = PrepareStats()
    dropped: Counter = Counter()
    progress = PrepareProgress("tokenizing")
    with RowWriter(tmp, ("input_ids", "labels")) as writer:
        for path, location, result in records:
            progress.update(1, 0 if isinstance(result, RecordError) else sum(len(r.input_ids) for r in result))
            truncated = False
            if not isinstance(result, RecordError):
                truncated = any(len(r.input_ids) > options.model_max_length for r in result)
                result = _length_policy(result, options)
            if isinstance(result, RecordError):
                if options.on_bad_record == OnBadRecord.SKIP or result.kind in LENGTH_SKIPS:
                    skips.add(result.kind, f"{path}, {location}: {result.reason}")
                    continue
                raise DataError(path, location, result.reason)
            stats.truncated += int(truncated)
            stats.kept += 1
            dropped.update({part for sample in result for part in sample.dropped})  # once per record
            for sample in result:
                stats.samples += 1
                stats.tokens += len(sample.input_ids)
                stats.trained_tokens += sample.num_trained
                writer.add(sample.input_ids, sample.labels)
    progress.done()
    # Every record read is either kept or counted under a skip reason.
    stats.records = stats.kept + skips.total
    stats.skipped = dict(skips.counts)
    stats.skip_examples = dict(skips.examples)
    stats.dropped = dict(dropped)
    return stats


def _length_policy(samples: list[Rendered], options: PrepareOptions) -> list[Rendered] | RecordError:
    """The length policy on each sample of a record. A split record keeps the samples that
    pass; it is skipped (under the first sample's reason) only when none does."""
    kept = [apply_length_policy(r, options) for r in samples]
    good = [r for r in kept if not isinstance(r, RecordError)]
    return good or kept[0]


def prepare(
    paths: Sequence[str],
    tokenizer,
    chat_template: str,
    options: PrepareOptions,
    cache_dir: str | None = None,
    num_workers: int = 1,
) -> SftCache:
    """Render `paths` into the cache (or find them there)."""
    if not paths:
        raise LmforgeError("no data file given (--data_path)")
    columns = [llama_factory_columns(p) for p in paths]  # dataset_info.json changes the records read
    key = cache_key("sft", paths, tokenizer, {"template": chat_template, "columns": columns, **asdict(options)})

    def build(tmp: str) -> dict:
        skips = SkipCounter(Counter(), {})
        renderer = Renderer(tokenizer, chat_template, options.masking, options.unrendered, options.tools)
        stats = _write(tmp, _rendered_records(paths, renderer, options, skips, num_workers), options, skips)
        if stats.kept == 0:
            raise LmforgeError(f"no usable record in {', '.join(paths)}:\n{stats.summary()}")
        return asdict(stats)

    entry = build_or_load(cache_dir, "sft", key, build)
    return SftCache(entry, PrepareStats(**entry.stats))


def dump_records(cache: SftCache, path: str, n: int) -> int:
    """Write the first `n` cached records, in source order, as JSONL {input_ids, labels}.

    Written to a temporary file renamed into place, so a failed write (a full disk) leaves no
    truncated dump that looks complete."""
    ds = cache.dataset()
    n = min(n, len(ds))
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w") as f:
            for row in ds.select(range(n)):
                f.write(json.dumps({"input_ids": row["input_ids"], "labels": row["labels"]}) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise LmforgeError(f"--dump {path}: cannot write it: {e.strerror or e}") from None
    return n
