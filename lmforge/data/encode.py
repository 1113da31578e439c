"""Stage 5 of the data chain, encode: the one prepare driver. Records of one kind go from the
sources through their check and render (in worker processes) and the length policy into a
token-cache entry (`store.py`), counted as they go:

    sources.read_records → records.to_conversation / to_pair → render.Renderer → rows → store
    sources.iter_documents → tokenizer → one token stream cut into blocks      → rows → store

Three kinds of record share it, each a `Kind` that says how its records are read, checked and
rendered and what rows it writes: `CHAT` (SFT conversations → (input_ids, labels) rows),
`PAIRS` (DPO pairs → one row holding both sides) and `TEXT` (pretraining documents →
fixed blocks). `prepare(kind, ...)` builds the entry or finds it in the cache.

Checking and rendering happen in the workers, so the main process only reads files and writes
rows; results come back in source order, so an entry does not depend on the worker count.
"""

from __future__ import annotations

import array
import collections
import contextlib
import multiprocessing
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator, Sequence

from lmforge.data.options import (
    ChatOptions,
    LongRecords,
    MaskingStrategy,
    OnBadRecord,
    PreferenceFormat,
    ReasoningTurns,
    Remainder,
    TextOptions,
)
from lmforge.data.records import detect_pair_format, iter_records, to_conversation, to_pair
from lmforge.data.render import IGNORE_INDEX, Rendered, Renderer, split_turns
from lmforge.data.sources import (
    TEXT_SUFFIXES,
    SkipCounter,
    iter_documents,
    llama_factory_columns,
    records_with_format,
    skip_summary,
)
from lmforge.data.store import INT32, SUPPORTED_SUFFIXES, Cached, RowWriter, build_or_load, cache_key, source_files
from lmforge.errors import DataError, LmforgeError, RecordError
from lmforge.logs import say
from lmforge.training.checkpoint import usable_cores

# ---------------------------------------------------------------------------------------------
# What an entry counts
# ---------------------------------------------------------------------------------------------


@dataclass
class RecordStats:
    """Chat records (or preference pairs): read, kept, truncated, skipped by reason."""

    records: int = 0
    kept: int = 0
    truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    skip_examples: dict[str, str] = field(default_factory=dict)
    samples: int = 0
    """Rows written: `kept` records, or more with `--reasoning_turns split` / `generated`."""
    prompts_cut: int = 0
    """Preference pairs whose prompt lost its first tokens to fit `model_max_length`."""
    answers_cut: int = 0
    """Preference pairs with an answer that lost its last tokens to fit `model_max_length`."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Parts of kept records left out under `--unrendered drop`, by part."""

    def summary(self) -> str:
        lines = [
            f"records: {self.records}  kept: {self.kept}  truncated: {self.truncated}",
            f"tokens: {self.tokens}  trained tokens: {self.trained_tokens}",
        ]
        if self.samples != self.kept:
            lines.append(f"samples: {self.samples} (one per assistant turn)")
        if self.prompts_cut or self.answers_cut:
            lines.append(f"pairs cut to model_max_length: {self.prompts_cut} prompts at their start, "
                         f"{self.answers_cut} with answers cut at their end")
        if self.dropped:
            lines.append("left out (--unrendered drop): " + ", ".join(f"{k}: {n}" for k, n in sorted(self.dropped.items())))
        return "\n".join(lines + skip_summary(self.skipped, self.skip_examples))


@dataclass
class TextStats:
    """Pretraining text: documents read, tokens, blocks, the tail that fills no block."""

    documents: int = 0
    tokens: int = 0
    blocks: int = 0
    trained_tokens: int = 0
    dropped_tail_tokens: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    skip_examples: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [
            f"documents: {self.documents}  tokens (with EOS): {self.tokens}",
            f"blocks: {self.blocks}  trained tokens: {self.trained_tokens}  "
            f"dropped tail tokens: {self.dropped_tail_tokens}",
        ]
        return "\n".join(lines + skip_summary(self.skipped, self.skip_examples))


# ---------------------------------------------------------------------------------------------
# The length policy (chat records and pairs)
# ---------------------------------------------------------------------------------------------

# Length skips are always counted, never errors: the user chose the policy.
LENGTH_SKIPS = ("too_long", "no_trained_tokens", "no_trained_tokens_after_truncation", "identical_after_truncation")


def apply_length_policy(r: Rendered, options: ChatOptions) -> Rendered | RecordError:
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


def _length_policy(samples: list[Rendered], options: ChatOptions) -> list[Rendered] | RecordError:
    """The length policy on each sample of a chat record (several with `--reasoning_turns
    split`): the samples that pass are kept; the record is skipped, under the first sample's
    reason, only when none does. Preference pairs take `cut_pair` instead."""
    kept = [apply_length_policy(r, options) for r in samples]
    good = [r for r in kept if not isinstance(r, RecordError)]
    return good or kept[0]


@dataclass(frozen=True)
class PairCut:
    """How a preference pair was fitted to `model_max_length` (`cut_pair`)."""

    prompt_tokens: int = 0
    """Tokens cut from the start of the prompt (both sides alike)."""
    answers: bool = False
    """Whether an answer lost its last tokens."""


def cut_pair(sides: list[Rendered], options: ChatOptions) -> tuple[list[Rendered], PairCut] | RecordError:
    """A preference pair fitted to `model_max_length`: cut, not dropped, as TRL's `keep_end`
    keeps the end of a pair's prompt.

    The prompt loses its first tokens until the longer answer fits after it, keeping at least
    half the window (TRL's defaults keep 512 prompt tokens of 1,024); answers still too long then
    lose their last tokens. Both sides lose the same prompt tokens, so their prompts stay
    identical. `--long_records drop` drops such a pair instead (counted)."""
    limit = options.model_max_length
    if any(r.num_trained == 0 for r in sides):
        return RecordError("no_trained_tokens", "an answer has no token that carries loss")
    if all(len(r.input_ids) <= limit for r in sides):
        return sides, PairCut()
    longest = max(len(r.input_ids) for r in sides)
    if options.long_records == LongRecords.DROP:
        return RecordError("too_long", f"{longest} tokens, longer than model_max_length={limit}")
    prompt = min(answer_start(r) for r in sides)
    answer = longest - prompt
    keep = max(limit - answer, min(prompt, limit // 2))
    drop = prompt - keep
    cut = [Rendered(r.input_ids[drop:drop + limit], r.labels[drop:drop + limit], r.dropped) for r in sides]
    if any(c.num_trained == 0 for c in cut):
        return RecordError("no_trained_tokens_after_truncation",
                           f"{longest} tokens; cut to model_max_length={limit}, an answer has no token left")
    if list(cut[0].input_ids) == list(cut[1].input_ids) and list(cut[0].labels) == list(cut[1].labels):
        return RecordError("identical_after_truncation",
                           f"{longest} tokens; cut to model_max_length={limit}, the two answers are the same")
    return cut, PairCut(drop, keep + answer > limit)


def _compact(result: Rendered) -> Rendered:
    """The record's tokens as int32 arrays (the length policy and the cache writer take any
    sequence of ints): records come back from worker processes pickled, and unpickling a list
    of ints cost the main process 25 times as much, more than all its other work together."""
    return Rendered(array.array(INT32, result.input_ids), array.array(INT32, result.labels), result.dropped)


def _write_rendered(tmp: str, kind: "Kind", results, options: ChatOptions, skips: SkipCounter) -> RecordStats:
    """Rows of rendered records: one per sample (chat), or one holding every side (pairs)."""
    stats = RecordStats()
    dropped: Counter = Counter()
    progress = PrepareProgress("tokenizing")
    with RowWriter(tmp, kind.columns) as writer:
        for path, location, result in results:
            progress.update(1, 0 if isinstance(result, RecordError) else sum(len(r.input_ids) for r in result))
            truncated, cut = False, PairCut()
            if not isinstance(result, RecordError):
                truncated = any(len(r.input_ids) > options.model_max_length for r in result)
                if kind.one_row:  # a pair's two sides
                    fitted = cut_pair(result, options)
                    result, cut = (fitted, cut) if isinstance(fitted, RecordError) else fitted
                else:
                    result = _length_policy(result, options)
            if isinstance(result, RecordError):
                if options.on_bad_record == OnBadRecord.SKIP or result.kind in LENGTH_SKIPS:
                    skips.add(result.kind, f"{path}, {location}: {result.reason}")
                    continue
                raise DataError(path, location, result.reason)
            stats.truncated += int(truncated)
            stats.prompts_cut += int(cut.prompt_tokens > 0)
            stats.answers_cut += int(cut.answers)
            stats.kept += 1
            dropped.update({part for sample in result for part in sample.dropped})  # once per record
            for row in ([result] if kind.one_row else [[sample] for sample in result]):
                stats.samples += 1
                stats.tokens += sum(len(r.input_ids) for r in row)
                stats.trained_tokens += sum(r.num_trained for r in row)
                writer.add(*(column for r in row for column in (r.input_ids, r.labels)))
    progress.done()
    # Every record read is either kept or counted under a skip reason.
    stats.records = stats.kept + skips.total
    stats.skipped = dict(skips.counts)
    stats.skip_examples = dict(skips.examples)
    stats.dropped = dict(dropped)
    return stats


def check_then_render(chunk: list[tuple[str, str, Any, Any]], check: Callable[[Any, Any], Any],
                      render_batch: Callable[[list], list]) -> list[tuple[str, str, Any]]:
    """`(path, location, rendered or RecordError)` for a chunk of `(path, location, raw record,
    format)`: each record checked (`check(record, format)`, raising RecordError), then the good
    ones rendered in one batch (one tokenizer call for all), in the chunk's order."""
    checked: list[Any] = []
    for _, _, record, fmt in chunk:
        try:
            checked.append(check(record, fmt))
        except RecordError as e:
            checked.append(e)
    rendered = iter(render_batch([c for c in checked if not isinstance(c, RecordError)]))
    return [(path, location, c if isinstance(c, RecordError) else next(rendered))
            for (path, location, _, _), c in zip(chunk, checked)]


# ---------------------------------------------------------------------------------------------
# The kinds of record
# ---------------------------------------------------------------------------------------------


class Kind:
    """One kind of record: how the main process reads it, what each worker holds, how a chunk
    is checked and rendered there, and how the results become rows and stats."""

    name: str  # the cache folder and key prefix
    columns: tuple[str, ...]
    chunk: int  # records per worker task
    one_row = False  # chat and pairs: whether a record's samples form one row (a pair's sides)
    unit = "record"  # what `read` yields, in messages
    suffixes: tuple[str, ...] = SUPPORTED_SUFFIXES
    stats: type = RecordStats

    def check_inputs(self, paths: Sequence[str], tokenizer, options) -> None:
        if not paths:
            raise LmforgeError("no data file given (--data_path)")

    def key_options(self, paths: Sequence[str], template: str | None, options) -> dict:
        return {"template": template, **asdict(options)}

    def read(self, path: str, options, skips: SkipCounter) -> Iterator:
        """The items of one data file the workers take, in file order."""
        raise NotImplementedError

    def worker_state(self, tokenizer, template: str | None, options) -> Any:
        return Renderer(tokenizer, template, options.masking, options.unrendered, options.tools)

    def work(self, state: Any, options, chunk: list) -> list:
        raise NotImplementedError

    def write(self, tmp: str, results: Iterator, options, skips: SkipCounter):
        return _write_rendered(tmp, self, results, options, skips)

    def empty(self, paths: Sequence[str], stats, options) -> str | None:
        """Why an entry with these stats is no use, or None."""
        return f"no usable record in {', '.join(paths)}:\n{stats.summary()}" if stats.kept == 0 else None


class ChatKind(Kind):
    """SFT conversations → (input_ids, labels) rows, one per sample."""

    name, columns, chunk = "sft", ("input_ids", "labels"), 256

    def key_options(self, paths, template, options):
        columns = [llama_factory_columns(p) for p in paths]  # dataset_info.json changes the records read
        return {"template": template, "columns": columns, **asdict(options)}

    def read(self, path, options, skips):
        for location, record, fmt in iter_records(path, options.data_format, options.on_bad_record, skips):
            yield path, location, record, fmt

    def work(self, renderer: Renderer, options, chunk):
        def render(conversations: list) -> list[list[Rendered] | RecordError]:
            if options.reasoning_turns == ReasoningTurns.RENDERED:
                return [r if isinstance(r, RecordError) else [r] for r in renderer.render_batch(conversations)]
            generated = options.reasoning_turns == ReasoningTurns.GENERATED
            groups = [split_turns(c, renderer, generated) for c in conversations]
            flat = iter(renderer.render_batch([s for group in groups for s in group]))
            out: list[list[Rendered] | RecordError] = []
            for group in groups:
                samples = [next(flat) for _ in group]
                out.append(next((s for s in samples if isinstance(s, RecordError)), None) or samples)
            return out

        return [(path, location, result if isinstance(result, RecordError) else [_compact(r) for r in result])
                for path, location, result in check_then_render(chunk, to_conversation, render)]


def answer_start(r: Rendered) -> int:
    """Index of the first labelled token: the prompt is everything before it."""
    return next(i for i, label in enumerate(r.labels) if label != IGNORE_INDEX)


def check_pair(chosen: Rendered, rejected: Rendered) -> tuple[Rendered, Rendered]:
    """The tokens before both answers must be identical, and the scored tokens must differ.
    The two answers may start one token apart: where an answer begins with whitespace, BPE
    merges the template's last characters before it into the answer's first token (a scored
    token), so the other side keeps that token unscored in its prompt."""
    start = min(answer_start(chosen), answer_start(rejected))
    if chosen.input_ids[:start] != rejected.input_ids[:start]:
        raise RecordError("prompt_tokens_differ", "the prompt renders to different tokens before the chosen and the "
                                                  "rejected answer; the template must render the prompt the same way")
    if chosen.input_ids[start:] == rejected.input_ids[start:] and chosen.labels == rejected.labels:
        raise RecordError("identical_answers", "'chosen' and 'rejected' render to the same scored tokens")
    return chosen, rejected


def render_pairs(renderer: Renderer, pairs: Sequence) -> list[list[Rendered] | RecordError]:
    """Each pair's two sides rendered in one batch (exact masks, last answer scored), checked:
    [chosen, rejected] or the RecordError."""
    rendered = renderer.render_batch([c for pair in pairs for c in pair.conversations()])
    results: list[list[Rendered] | RecordError] = []
    for chosen, rejected in zip(rendered[0::2], rendered[1::2]):
        error = next((r for r in (chosen, rejected) if isinstance(r, RecordError)), None)
        try:
            results.append(error or list(check_pair(chosen, rejected)))
        except RecordError as e:
            results.append(e)
    return results


class PairKind(Kind):
    """DPO preference pairs → one row holding both sides, each scored on its last answer; the
    stats count pairs as records and the tokens of both sides. Pass `prepare` the options
    through `fixed`."""

    name, chunk, one_row = "dpo", 128, True  # a chunk of pairs is twice as many conversations
    columns = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")

    @staticmethod
    def fixed(options: ChatOptions) -> ChatOptions:
        """A pair scores each side's last answer, as rendered in the whole conversation."""
        return replace(options, data_format=PreferenceFormat(options.data_format),
                       masking=MaskingStrategy.LAST_ASSISTANT, reasoning_turns=ReasoningTurns.RENDERED)

    def key_options(self, paths, template, options):
        return {"template": template, "format": options.data_format.value, **asdict(options)}

    def read(self, path, options, skips):
        for location, record, fmt in records_with_format(path, options.data_format, detect_pair_format,
                                                         options.on_bad_record, skips):
            yield path, location, record, fmt

    def work(self, renderer: Renderer, options, chunk):
        return [(path, location, result if isinstance(result, RecordError) else [_compact(r) for r in result])
                for path, location, result in check_then_render(chunk, to_pair,
                                                                lambda pairs: render_pairs(renderer, pairs))]

    def empty(self, paths, stats, options):
        return f"no usable preference pair in {', '.join(paths)}:\n{stats.summary()}" if stats.kept == 0 else None


class TextKind(Kind):
    """Pretraining documents → one token stream (each document followed by EOS, in file order)
    cut into `block_size` blocks whose labels are their inputs (the model shifts). Unlike the
    usual `group_texts` over batches of 1,000 rows, which drops a remainder at every batch, the
    whole corpus is one stream: only its final remainder, fewer than `block_size` tokens, is
    dropped (counted) or kept as a shorter, padded last block."""

    name, columns, chunk, suffixes, stats = "pretrain", ("input_ids",), 64, TEXT_SUFFIXES, TextStats
    unit = "document"

    def check_inputs(self, paths, tokenizer, options: TextOptions) -> None:
        if not paths:
            raise LmforgeError("no training text given (--train_files)")
        if tokenizer.eos_token_id is None:
            raise LmforgeError("the tokenizer has no EOS token to separate documents with")
        if options.block_size < 2:
            raise LmforgeError(f"--block_size must be at least 2, got {options.block_size}")

    def key_options(self, paths, template, options):
        return asdict(options)

    def read(self, path, options: TextOptions, skips):
        for _, text in iter_documents(path, options.text_field, options.text_split, options.on_bad_record, skips):
            yield text

    def worker_state(self, tokenizer, template, options):
        return tokenizer

    def work(self, tokenizer, options, texts: list[str]) -> list[list[int]]:
        """Each document's ids followed by EOS."""
        eos = tokenizer.eos_token_id
        return [ids + [eos] for ids in tokenizer(texts, verbose=False)["input_ids"]]

    def write(self, tmp, documents: Iterator[list[int]], options: TextOptions, skips) -> TextStats:
        stats = TextStats()
        size = options.block_size
        buffer: list[int] = []
        progress = PrepareProgress("tokenizing", unit=self.unit)
        with RowWriter(tmp, self.columns) as writer:
            for ids in documents:
                progress.update(1, len(ids))
                stats.documents += 1
                stats.tokens += len(ids)
                buffer.extend(ids)
                while len(buffer) >= size:
                    writer.add(buffer[:size])
                    del buffer[:size]
                    stats.blocks += 1
            if buffer and options.remainder == Remainder.PAD:
                writer.add(buffer)
                stats.blocks += 1
            else:
                stats.dropped_tail_tokens = len(buffer)
        progress.done()
        stats.trained_tokens = stats.tokens - stats.dropped_tail_tokens
        stats.skipped, stats.skip_examples = dict(skips.counts), dict(skips.examples)
        return stats

    def empty(self, paths, stats: TextStats, options: TextOptions):
        if stats.blocks:
            return None
        return (f"{', '.join(paths)}: {stats.tokens} tokens in all, fewer than one block of --block_size "
                f"{options.block_size}; lower --block_size or pass --remainder pad")


CHAT, PAIRS, TEXT = ChatKind(), PairKind(), TextKind()

# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------


# Input bytes per tokenizing process: a spawned worker costs about a second of start-up (its
# imports, the tokenizer unpickled), which a few MiB of records repay; smaller data is
# tokenized in the main process alone.
BYTES_PER_WORKER = 4 * 2**20


def worker_count(requested: int | None, data_bytes: int, cores: int | None = None) -> tuple[int, str]:
    """(tokenizing processes, the rule that chose them). `requested` (--preprocessing_num_workers)
    wins; by default one process per BYTES_PER_WORKER of input, at most one per usable core.
    The cache entry is the same whatever the count."""
    if requested is not None:
        return max(requested, 1), f"--preprocessing_num_workers {requested}"
    cores = cores if cores is not None else usable_cores()
    n = max(1, min(cores, data_bytes // BYTES_PER_WORKER))
    return n, (f"by default one per {BYTES_PER_WORKER >> 20} MiB of data ({data_bytes / 2**20:.1f} MiB), at most "
               f"the {cores} cores this process may use")


def prepare(kind: Kind, paths: Sequence[str], tokenizer, options, template: str | None = None,
            cache_dir: str | None = None, num_workers: int | None = 1) -> Cached:
    """The entry of `paths` as `kind` rows under `options` (and the chat `template`): found in
    the cache, or built there: read in this process, checked and rendered in `num_workers`
    worker processes (in this one when 1; None: `worker_count`'s rule), written in source order."""
    kind.check_inputs(paths, tokenizer, options)
    sources = source_files(paths, kind.suffixes)
    key = cache_key(kind.name, sources, tokenizer, kind.key_options(paths, template, options))

    reading = Reading(kind.unit, paths[0])

    def build(tmp: str) -> dict:
        workers, rule = worker_count(num_workers, sum(f.bytes for f in sources))
        print(f"lmforge: tokenizing {', '.join(paths)} in {workers} process{'es' if workers > 1 else ''} ({rule})")
        skips = SkipCounter(Counter(), {})
        chunks = chunked(reading.track(paths, lambda path: kind.read(path, options, skips)), kind.chunk)
        done = ordered_map(_work, chunks, workers, _init_worker,
                           (kind, kind.worker_state(tokenizer, template, options), options))
        # Closed on the way out, whatever stops the build: the worker pool is terminated then,
        # not when the generator happens to be collected.
        with contextlib.closing(done), reading.stopped_by_sigterm():
            stats = kind.write(tmp, (result for chunk in done for result in chunk), options, skips)
        why = kind.empty(paths, stats, options)
        if why:
            raise LmforgeError(why)
        return asdict(stats)

    try:
        entry = build_or_load(cache_dir, kind.name, key, build)
    except Terminated as e:  # the temporary directory is removed by now, the workers terminated
        raise TokenizingStopped(f"stopped by {signal.Signals(e.signum).name} while tokenizing {reading.where()}; "
                                "nothing was cached: the next run tokenizes again", e.signum) from None
    return Cached(entry, kind.stats(**entry.stats), sources)


@dataclass
class Reading:
    """Where the reader of a build is (the file, the records read from it), and the signal that
    asked the build to stop: what the command then says."""

    unit: str
    path: str
    count: int = 0
    signum: int | None = None

    def track(self, paths: Sequence[str], read: Callable[[str], Iterable]) -> Iterator:
        for path in paths:
            self.path, self.count = path, 0
            for item in read(path):
                self.stop_if_signalled()
                self.count += 1
                yield item

    def stop_if_signalled(self) -> None:
        if self.signum is not None:
            raise Terminated(self.signum)

    @contextlib.contextmanager
    def stopped_by_sigterm(self) -> Iterator[None]:
        """While the body runs, SIGTERM stops the build: the next record read raises
        `Terminated` (and so does the end of the body, where all was read), and the build unwinds:
        the store removes its temporary directory, the worker pool is terminated, the command says
        what stopped it. By default SIGTERM would kill the process silently, leaving both behind.
        The handler only records the signal: raised from inside it, the exception could cut a
        worker's start in half (it then prints a traceback). A second SIGTERM goes to the handler
        there before, at once. Elsewhere than in the main thread, where Python delivers no
        signal, or where SIGTERM is ignored, nothing changes."""
        if threading.current_thread() is not threading.main_thread() or \
                signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
            yield
            return

        def handle(signum: int, frame) -> None:
            if self.signum is not None:
                signal.signal(signum, previous)
                signal.raise_signal(signum)
                return
            self.signum = signum

        previous = signal.signal(signal.SIGTERM, handle)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)
        self.stop_if_signalled()

    def where(self) -> str:
        return f"{self.path} ({self.count:,} {self.unit}{'' if self.count == 1 else 's'} read)"


class Terminated(BaseException):
    """A signal stopped the build of a cache entry. A BaseException, as KeyboardInterrupt is, so
    that no `except Exception` on its way out swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class TokenizingStopped(LmforgeError):
    """A signal stopped the build of a cache entry; the exit status is 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


# Worker side: the kind, its state (a Renderer, or the tokenizer) and the options, per process.
_WORKER: tuple[Kind, Any, Any] | None = None


def _init_worker(kind: Kind, state: Any, options: Any) -> None:
    global _WORKER
    _WORKER = (kind, state, options)


def _work(chunk: list) -> list:
    assert _WORKER is not None
    kind, state, options = _WORKER
    return kind.work(state, options, chunk)


def ordered_map(fn: Callable, chunks: Iterable, num_workers: int, initializer: Callable, initargs: tuple) -> Iterator:
    """`fn` over `chunks` in `num_workers` processes (in this one when ≤ 1), results in order.

    spawn, not fork: forking a process that already runs torch / tokenizers threads can
    deadlock. `initargs` (the tokenizer, the template) is pickled once per worker. At most
    two chunks per worker are in flight (`Pool.imap` would read ahead through the whole
    input), so memory does not grow with the data."""
    if num_workers <= 1:
        initializer(*initargs)
        for chunk in chunks:
            yield fn(chunk)
        return
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(num_workers, initializer=_start_worker, initargs=(initializer, *initargs)) as pool:
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append(pool.apply_async(fn, (chunk,)))
            if len(pending) >= 2 * num_workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _start_worker(initializer: Callable, *initargs) -> None:
    # One core per worker: the tokenizer's own thread pool would oversubscribe the machine.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    initializer(*initargs)


def chunked(items: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class PrepareProgress:
    """Preparation's own progress: records (or, for pretraining text, documents: `unit`) read,
    tokens written, and both rates, printed every `every` seconds while the cache is built
    (lines, not a redrawn bar: they read the same in a log file and on a terminal), then a
    last line with the totals. A rate is given to three figures (a .txt file read as one
    document makes a fraction of a document a second, not 0), and left out under a second,
    where it would say little. Only the process that builds the cache prints."""

    def __init__(self, what: str, every: float = 10.0, clock=time.monotonic, unit: str = "record"):
        self.what, self.every, self.clock, self.unit = what, every, clock, unit
        self.started = self.last = clock()
        self.records = self.tokens = 0

    def update(self, records: int = 1, tokens: int = 0) -> None:
        self.records += records
        self.tokens += tokens
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            say(f"lmforge: {self.what}: {self._figures(now)}")

    def done(self) -> None:
        say(f"lmforge: {self.what}: done, {self._figures(self.clock())}")

    def _figures(self, now: float) -> str:
        seconds = max(now - self.started, 0.0)
        units = f"{self.unit}{'' if self.records == 1 else 's'}"
        took = f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
        figures = f"{self.records:,} {units}, {self.tokens:,} tokens in {took}"
        if seconds < 1:
            return figures
        return f"{figures} ({_rate(self.records / seconds)} {self.unit}s/s, {_rate(self.tokens / seconds)} tokens/s)"


def _rate(per_second: float) -> str:
    """A rate to three figures (0.25, 12.5, 1,667): never 0 where some work was done."""
    return f"{per_second:,.0f}" if per_second >= 100 else f"{per_second:.3g}"
