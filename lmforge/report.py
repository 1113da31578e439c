"""The run report: OUTPUT_DIR/report.md with the command, the key flags, the data (records,
tokens, trained tokens, skips by reason, a length histogram), the loss / eval-loss /
learning-rate curves as PNG files (OUTPUT_DIR/report/), throughput, peak memory and wall time.

It is built from files only: the Trainer's trainer_state.json (of the output directory, or of
its newest checkpoint while the run is going or after it was stopped) and lmforge_run.json (the
command, the data statistics, timings). So the report written at each checkpoint and at the end
of a run is exactly what `lmforge report DIR` rebuilds from the directory later.

    lmforge report out/              # rebuild out/report.md (also for a run still going)
"""

from __future__ import annotations

import json
import math
import os
import shlex
import statistics
from dataclasses import dataclass, field
from typing import Optional, Sequence

from lmforge.errors import LmforgeError
from lmforge.flags import ReportArguments
from lmforge.training.checkpoint import last_complete_checkpoint
from lmforge.training.run_record import RUN_INFO, read_run_info

REPORT_NAME = "report.md"
PLOTS_DIR = "report"  # the PNGs, beside report.md
STATE_NAME = "trainer_state.json"  # transformers.trainer.TRAINER_STATE_NAME, without importing the Trainer
PLOT_PIXELS = (960, 540)  # every PNG has exactly this size (no tight bounding box)
PLOT_DPI = 100


# ---------------------------------------------------------------------------------------------
# Reading a run directory
# ---------------------------------------------------------------------------------------------


@dataclass
class StateSource:
    path: str
    """The trainer_state.json read."""
    final: bool
    """True for the output directory's own state (written by the final save), False for a checkpoint's."""
    state: dict


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def find_state(run_dir: str) -> StateSource:
    """The most advanced trainer_state.json of a run: the final one, or the newest checkpoint's
    when that is further on (a run continued into the same directory, or one still going)."""
    if not os.path.isdir(run_dir):
        raise LmforgeError(f"{run_dir}: no such directory")
    candidates: list[StateSource] = []
    final = os.path.join(run_dir, STATE_NAME)
    if os.path.isfile(final):
        candidates.append(StateSource(final, True, _read_json(final)))
    newest = last_complete_checkpoint(run_dir, quiet=True)
    if newest is not None:
        path = os.path.join(newest, STATE_NAME)
        candidates.append(StateSource(path, False, _read_json(path)))
    if not candidates:
        raise LmforgeError(f"{run_dir}: no {STATE_NAME} in it or in a checkpoint-* directory; nothing to report "
                           "yet (the first one is written at the first checkpoint)")
    # The furthest step wins; on a tie the final state (it has the run's summary).
    return max(candidates, key=lambda c: (c.state.get("global_step", 0), c.final))


# ---------------------------------------------------------------------------------------------
# Curves
# ---------------------------------------------------------------------------------------------


@dataclass
class Series:
    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def add(self, step: int, value: float) -> None:
        self.steps.append(step)
        self.values.append(value)

    def last(self) -> Optional[tuple[int, float]]:
        return (self.steps[-1], self.values[-1]) if self.steps else None


@dataclass
class Curves:
    loss: Series = field(default_factory=Series)
    eval_loss: Series = field(default_factory=Series)
    learning_rate: Series = field(default_factory=Series)
    tokens_per_second: Series = field(default_factory=Series)
    reward: Series = field(default_factory=Series)
    """GRPO: the mean reward of the completions each step trained on."""
    eval_reward: Series = field(default_factory=Series)
    """GRPO: the mean reward on the held-out prompts at each evaluation."""
    completion_length: Series = field(default_factory=Series)
    """GRPO: their mean length in tokens."""


def curves(log_history: list[dict]) -> Curves:
    """The logged series by optimizer step. Only finite values are kept: a logged NaN / inf
    would make the plot's axes meaningless (the NaN guard stops such a run anyway)."""
    out = Curves()
    for entry in log_history:
        step = entry.get("step")
        if step is None:
            continue
        for key, series in (("loss", out.loss), ("eval_loss", out.eval_loss),
                            ("learning_rate", out.learning_rate), ("tokens_per_second", out.tokens_per_second),
                            ("reward", out.reward), ("eval_reward", out.eval_reward),
                            ("completion_length", out.completion_length)):
            value = entry.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                series.add(step, float(value))
    return out


def perplexity(loss: float) -> float:
    """exp(loss); inf rather than an OverflowError for a loss past what a float holds."""
    return math.exp(loss) if loss < 700 else math.inf


def _figure(title: str, ylabel: str):
    # The object API with the Agg canvas: no pyplot global state, no display, safe in a
    # training process that may have other threads.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(PLOT_PIXELS[0] / PLOT_DPI, PLOT_PIXELS[1] / PLOT_DPI), dpi=PLOT_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig, path: str) -> None:
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=PLOT_DPI, format="png")
    os.replace(tmp, path)  # a reader (or a report rebuilt meanwhile) never sees half a PNG


def plot_loss(c: Curves, path: str) -> None:
    fig, ax = _figure("Loss", "loss")
    if c.loss.steps:
        ax.plot(c.loss.steps, c.loss.values, label="training loss", color="tab:blue", linewidth=1.2)
    if c.eval_loss.steps:
        ax.plot(c.eval_loss.steps, c.eval_loss.values, "o-", label="evaluation loss", color="tab:orange",
                markersize=4)
    values = c.loss.values + c.eval_loss.values
    if values and min(values) > 0 and max(values) / min(values) > 20:
        from matplotlib.ticker import FormatStrFormatter, LogLocator

        ax.set_yscale("log")  # a loss falling from ~6 to ~0.05 reads only on a log axis
        ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 3.0, 5.0)))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))  # 0.3, not 3×10⁻¹
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.legend()
    _save(fig, path)


def plot_series(series: Series, title: str, ylabel: str, color: str, path: str,
                evaluated: Series | None = None) -> None:
    """One training series; `evaluated`: the same measure on held-out data, as marked points."""
    fig, ax = _figure(title, ylabel)
    ax.plot(series.steps, series.values, color=color, linewidth=1.2, label="training")
    if evaluated is not None and evaluated.steps:
        ax.plot(evaluated.steps, evaluated.values, "o-", color="tab:orange", linewidth=1.2, markersize=4,
                label="evaluation")
        ax.legend()
    _save(fig, path)


def plot_learning_rate(c: Curves, path: str) -> None:
    fig, ax = _figure("Learning rate", "learning rate")
    ax.plot(c.learning_rate.steps, c.learning_rate.values, color="tab:green", linewidth=1.2)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    _save(fig, path)


def write_plots(c: Curves, run_dir: str) -> tuple[list[tuple[str, str]], Optional[str]]:
    """The PNGs (file name relative to run_dir, alt text) and, when none could be drawn, why."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return [], "matplotlib is not installed (pip install matplotlib), so the curves are not drawn"
    directory = os.path.join(run_dir, PLOTS_DIR)
    os.makedirs(directory, exist_ok=True)
    plots = []
    if c.loss.steps or c.eval_loss.steps:
        plot_loss(c, os.path.join(directory, "loss.png"))
        plots.append((f"{PLOTS_DIR}/loss.png", "training and evaluation loss"))
    if c.learning_rate.steps:
        plot_learning_rate(c, os.path.join(directory, "learning_rate.png"))
        plots.append((f"{PLOTS_DIR}/learning_rate.png", "learning rate"))
    for series, name, title, color, evaluated in (
            (c.reward, "reward", "Reward (mean of the step's completions)", "tab:purple", c.eval_reward),
            (c.completion_length, "completion_length", "Completion length (tokens)", "tab:brown", None)):
        if series.steps:
            plot_series(series, title, name.replace("_", " "), color, os.path.join(directory, f"{name}.png"),
                        evaluated)
            plots.append((f"{PLOTS_DIR}/{name}.png", name.replace("_", " ")))
    return plots, None if plots else "no training step has been logged yet"


# ---------------------------------------------------------------------------------------------
# The markdown
# ---------------------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _count(n: float) -> str:
    return f"{n:,.0f}"


def _rate(n: float) -> str:
    return f"{n / 1e3:,.1f}k" if n >= 1e4 else f"{n:,.0f}"


def _table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _command_section(info: dict) -> list[str]:
    lines = ["## Command", ""]
    flags = info.get("flags")
    argv = info.get("argv") or []
    if flags is not None:
        lines += ["```", shlex.join(["lmforge", info.get("command", "?"), *flags]), "```"]
        if argv and argv[len(argv) - len(flags):] != list(flags):
            # Called from another command (lmforge demo) rather than run as itself.
            lines += ["", f"run by: `{shlex.join(argv)}`"]
    elif argv:
        lines += ["```", shlex.join(argv), "```"]
    else:
        lines += ["(not recorded: no lmforge_run.json)"]
    config = info.get("config") or {}
    if config:
        lines += ["", "## Configuration", ""]
        lines += _table([(f"`{k}`", _value(v)) for k, v in config.items()], ("flag", "value"))
    return lines + [""]


def _value(v: object) -> str:
    if isinstance(v, (list, tuple)):
        return " ".join(str(x) for x in v) or "—"
    return "—" if v is None or v == "" else str(v)


def _skips(stats: dict) -> list[str]:
    skipped = stats.get("skipped") or {}
    examples = stats.get("skip_examples") or {}
    return [f"- {reason}: {n} (first: {examples.get(reason, '?')})" for reason, n in sorted(skipped.items())]


def _histogram(hist: dict, width: int = 40) -> list[str]:
    edges, counts = hist.get("edges") or [], hist.get("counts") or []
    if not counts:
        return []
    top = max(counts) or 1
    lines = ["```", "tokens per record    records"]
    for k, n in enumerate(counts):
        bar = "█" * max(1 if n else 0, round(width * n / top))
        lines.append(f"{edges[k] + 1:>6} – {edges[k + 1]:<6} {bar} {n}")
    return lines + ["```"]


def _data_section(info: dict) -> list[str]:
    train = info.get("train_data")
    if not train:
        return []
    lines = ["## Data", ""]
    sft = "records" in train
    if sft:
        rows = [("read from --data_path", _count(train["records"]), _count(train["kept"]),
                 _count(train["tokens"]), _count(train["trained_tokens"]))]
    else:
        rows = [("read from --train_files", f"{_count(train['documents'])} documents", f"{_count(train['blocks'])} blocks",
                 _count(train["tokens"]), _count(train["trained_tokens"]))]
    split = info.get("val_split")
    if split:
        rows.append((f"held out by --val_split {split['fraction']} (seed {split['seed']})", "", _count(split["records"]),
                     _count(split["tokens"]), _count(split["trained_tokens"])))
    training = info.get("training")
    if training:
        rows.append(("trained on", "", _count(training["records"]), _count(training["tokens"]),
                     _count(training["trained_tokens"])))
    eval_data = info.get("eval_data")
    if eval_data:
        flag = "--eval_data_path" if sft else "--validation_files"
        kept = eval_data.get("kept", eval_data.get("blocks", 0))
        read = eval_data.get("records", eval_data.get("documents", 0))
        rows.append((f"evaluation data ({flag})", _count(read), _count(kept), _count(eval_data["tokens"]),
                     _count(eval_data["trained_tokens"])))
    lines += _table(rows, ("", "read", "kept" if sft else "blocks", "tokens", "trained tokens"))
    notes = []
    if sft and train.get("truncated"):
        notes.append(f"- truncated to --model_max_length: {train['truncated']}")
    if train.get("prompts_cut") or train.get("answers_cut"):
        notes.append(f"- pairs cut to --model_max_length: {train.get('prompts_cut', 0)} prompts at their start, "
                     f"{train.get('answers_cut', 0)} with answers cut at their end")
    for change in info.get("resumed_on_changed_data") or []:
        notes.append(f"- resumed on changed data (--resume_changed_data True): {change}; the position in the epoch "
                     "was recomputed from the new data's size")
    if not sft and train.get("dropped_tail_tokens"):
        notes.append(f"- tokens at the end of the corpus that fill no block (dropped): {train['dropped_tail_tokens']}")
    skips = _skips(train)
    if skips:
        notes += ["- skipped records, by reason:"] + ["  " + s for s in skips]
    if info.get("rows") and sft:
        notes.append(f"- packed into {info['rows']:,} rows" if info.get("packing", True) else
                     f"- {info['rows']:,} rows, one record each")
    if notes:
        lines += [""] + notes
    hist = info.get("length_histogram")
    if hist and hist.get("counts"):
        lines += ["", "Record lengths (training records):", ""] + _histogram(hist)
    return lines + [""]


def _status(source: StateSource, info: dict) -> str:
    state = source.state
    step, total = state.get("global_step", 0), state.get("max_steps", 0)
    if source.final:
        done = "finished" if step >= total else f"finished early (at step {step} of {total})"
        return f"**{done}**: {step} optimizer steps, epoch {state.get('epoch') or 0:.2f}"
    where = os.path.basename(os.path.dirname(source.path))
    return (f"**not finished**: step {step} of {total} ({100 * step / max(total, 1):.0f} %), epoch "
            f"{state.get('epoch') or 0:.2f}, from the newest checkpoint ({where}); the run may still be going")


def _last_with(history: list[dict], key: str) -> Optional[dict]:
    return next((h for h in reversed(history) if key in h), None)


def _curves_section(c: Curves, plots: list[tuple[str, str]], why_no_plots: Optional[str]) -> list[str]:
    lines = ["## Curves", ""]
    lines += [f"![{alt}]({name})" for name, alt in plots]
    if why_no_plots:
        lines.append(f"(no plots: {why_no_plots})")
    rows = []
    if c.loss.steps:
        step, value = c.loss.last()
        rows.append(("final training loss", step, f"{value:.4f}"))
        rows.append(("lowest training loss", c.loss.steps[c.loss.values.index(min(c.loss.values))],
                     f"{min(c.loss.values):.4f}"))
    if c.eval_loss.steps:
        step, value = c.eval_loss.last()
        rows.append(("last evaluation loss", step, f"{value:.4f} (perplexity {perplexity(value):.3f})"))
        best = min(c.eval_loss.values)
        rows.append(("best evaluation loss", c.eval_loss.steps[c.eval_loss.values.index(best)],
                     f"{best:.4f} (perplexity {perplexity(best):.3f})"))
    if c.learning_rate.steps:
        step, value = c.learning_rate.last()
        rows.append(("learning rate", step, f"{value:.3g} (peak {max(c.learning_rate.values):.3g})"))
    if c.reward.steps:
        step, value = c.reward.last()
        rows.append(("last reward", step, f"{value:.4g} (first {c.reward.values[0]:.4g}, best {max(c.reward.values):.4g})"))
    if c.eval_reward.steps:
        step, value = c.eval_reward.last()
        rows.append(("last evaluation reward", step, f"{value:.4g} (first {c.eval_reward.values[0]:.4g}, best "
                                                     f"{max(c.eval_reward.values):.4g})"))
    if rows:
        lines += [""] + _table(rows, ("", "step", "value"))
    return lines + [""]


def _memory(history: list[dict], info: dict, source: StateSource) -> Optional[str]:
    for key, what in (("peak_gpu_memory_gib", "GPU memory allocated by PyTorch, rank 0"),
                      ("peak_rss_gib", "peak resident memory (max RSS) of rank 0")):
        values = [h[key] for h in history if key in h]
        final = (info.get("end") or {}).get(key)
        if final is not None and source.final:
            values.append(final)
        if values:
            return f"{max(values):.2f} GiB ({what})"
    return None


def _resources_section(source: StateSource, info: dict, c: Curves) -> list[str]:
    history = source.state.get("log_history", [])
    rows = []
    summary = _last_with(history, "train_runtime") if source.final else None
    if c.tokens_per_second.steps:
        values = c.tokens_per_second.values
        rows.append(("useful (non-padding) tokens/s", f"{_rate(statistics.median(values))} median of "
                     f"{len(values)} logging intervals, {_rate(values[-1])} in the last"))
    if summary and summary.get("useful_tokens_per_second"):
        rows.append(("useful tokens/s over all training steps", _rate(summary["useful_tokens_per_second"])))
    last = _last_with(history, "tokens")
    if last:
        rows.append(("tokens trained on (useful / with loss)", f"{_count(last['tokens'])} / "
                     f"{_count(last.get('trained_tokens', 0))} by step {last['step']}"))
    if summary:
        rows.append(("optimizer steps/s", f"{summary.get('train_steps_per_second', 0):.3g}"))
        rows.append(("training time (the Trainer's train_runtime)", _duration(summary["train_runtime"])))
    memory = _memory(history, info, source)
    if memory:
        rows.append(("peak memory", memory))
    end = info.get("end") or {}
    if source.final and end.get("wall_seconds") is not None:
        rows.append(("wall time (command start to the final save)", _duration(end["wall_seconds"])))
    elif info.get("started"):
        # A run without its final save: up to the newest state the report reads.
        rows.append(("wall time to this state", _duration(os.path.getmtime(source.path) - info["started"])))
    preflight = info.get("preflight") or {}
    if preflight.get("memory_estimate_gib") is not None:
        rows.append(("estimated memory for weights, gradients and optimizer",
                     f"{preflight['memory_estimate_gib']:.2f} GiB (an estimate; activations not included)"))
    if info.get("device"):
        rows.append(("device", f"{info['device']} × {info.get('world_size', 1)} process(es)"))
    if not rows:
        return []
    return ["## Throughput and resources", ""] + _table(rows, ("", "value")) + [""]


def render(run_dir: str, source: StateSource, info: dict, plots: list[tuple[str, str]],
           why_no_plots: Optional[str]) -> str:
    c = curves(source.state.get("log_history", []))
    name = os.path.basename(os.path.abspath(run_dir))
    lines = [f"# Run report: {name}", "", _status(source, info), "",
             f"Built from `{os.path.relpath(source.path, run_dir)}` and `{RUN_INFO}`; "
             f"`lmforge report {run_dir}` rebuilds it.", ""]
    lines += _command_section(info)
    lines += _data_section(info)
    lines += _curves_section(c, plots, why_no_plots)
    lines += _resources_section(source, info, c)
    from lmforge.training.samples import read_samples

    lines += _samples_section(read_samples(run_dir))
    return "\n".join(lines).rstrip() + "\n"


def _samples_section(samples: list[dict]) -> list[str]:
    """The newest evaluation's sample generations (`--eval_samples`), beside their references."""
    if not samples:
        return []
    lines = [f"## Sample generations (step {samples[0].get('step', '?')})", ""]
    for i, s in enumerate(samples, 1):
        stopped = "stopped at the end of its turn" if s.get("stopped") else "did not stop"
        lines += [f"{i}. Prompt (end): `{_one_line(s.get('prompt', ''))[-160:]}`",
                  f"   - generated ({stopped}): `{_one_line(s.get('generation', ''))}`",
                  f"   - reference: `{_one_line(s.get('reference', ''))}`"]
    return lines + [""]


def _one_line(text: str) -> str:
    return text.replace("`", "'").replace("\n", "\\n")


def write_report(run_dir: str) -> str:
    """Build OUTPUT_DIR/report.md and its PNGs from the files of `run_dir`; returns the path."""
    source = find_state(run_dir)
    info = read_run_info(run_dir)
    plots, why = write_plots(curves(source.state.get("log_history", [])), run_dir)
    text = render(run_dir, source, info, plots, why)
    path = os.path.join(run_dir, REPORT_NAME)
    tmp = os.path.join(run_dir, PLOTS_DIR, f".{REPORT_NAME}.tmp")  # temporary files stay inside report/
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def try_write_report(run_dir: str) -> Optional[str]:
    """write_report, for the training process: a report that cannot be written is a warning,
    never the end of a training run."""
    try:
        return write_report(run_dir)
    except Exception as e:  # noqa: BLE001 - any failure here must not stop training
        print(f"lmforge: warning: could not write the run report in {run_dir}: {type(e).__name__}: {e}")
        return None


# ---------------------------------------------------------------------------------------------
# lmforge report DIR
# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str]) -> str:
    from lmforge.config import parse

    argv = list(argv)
    if argv and not argv[0].startswith("-"):
        argv = ["--run_dir", argv[0]] + argv[1:]
    (args,) = parse((ReportArguments,), argv)
    path = write_report(args.run_dir)
    print(f"lmforge: wrote {path}")
    return path
