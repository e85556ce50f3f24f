"""The plumbing that three or more scripts share, so that each holds only its lesson: the common
flags and their checks, a user's mistake, the device, files written atomically, the run's
header, log.jsonl, figures; then what the GPT stages share (transformer.py, gpt2.py and chat.py:
presets, progress lines, step timing, checkpoints, stop signals). No numeric choice of a training
recipe lives here: precision, TF32, the schedule, clipping and MFU stay in the stage that teaches
them. A leaf: it imports no stage, and every script may import it."""
import argparse
import json
import math
import os
import pickle
import platform
import signal
import statistics
import sys
import time
import zipfile
from pathlib import Path

import torch


# --- every stage: the command line, a user's mistake, the device

def die(message):
    """A user's mistake: one line in the running script's name that says the problem and the fix,
    and exit status 2 (under torchrun every rank exits; rank 0, RANK=0, alone says why)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
    sys.exit(2)


def path_flag(text):
    """argparse's type for a file or folder flag: an empty string, which Path would read as the
    current folder (`--export-hf ""` writing a model there), is a mistake."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; give a file or folder")
    return Path(text)


def check_loss(loss, step):
    """A NaN or infinite training loss (a learning rate too high) ends the run in one line, exit
    status 1: what would follow (evaluations, a checkpoint, samples) would only carry the NaN."""
    if not math.isfinite(loss):
        print(f"{Path(sys.argv[0]).name}: error: the training loss is {loss} at step {step}: "
              "training diverged; run again with a lower --lr", file=sys.stderr)
        sys.exit(1)


def make_parser(stage, description, data, data_help, seed):
    """The flags every stage has; argparse's own complaints end through die() like any mistake."""
    parser = argparse.ArgumentParser(prog=f"{stage}.py", description=description)
    parser.error = die
    add = parser.add_argument
    add("--data", type=path_flag, default=data and Path(data),  # None: the --preset's
        help=data_help + (" (default: %(default)s)" if data else ""))
    add("--out-dir", type=path_flag, default=Path("out") / stage, help="where log.jsonl, "
        "metrics.json, the figure and any checkpoint go (default: %(default)s)")
    add("--overwrite", action="store_true", help="start afresh in an --out-dir that holds a "
        "checkpoint, replacing it (a run never replaces one without this flag; stages that keep "
        "no checkpoint rewrite their outputs anyway)")
    add("--device", default="auto",
        help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps (default: %(default)s)")
    add("--threads", type=int, default=0, help="torch's CPU threads (default: %(default)s, one "
        "per core; on a machine that other jobs keep busy, fewer threads can run much faster)")
    add("--seed", type=int, default=seed,
        help="seed of everything random in the run (default: %(default)s)")
    return parser


def check_args(args, positive=(), non_negative=(), ranges=()):
    """die() on the first flag out of its range: `positive` flags are above 0, `non_negative`
    ones 0 (off) or above, both finite; `ranges` holds (name, low, high), both ends allowed.
    A flag left unset (None) is not checked; NaN is in no range."""
    def refuse(name, value, wording):
        die(f"--{name.replace('_', '-')} must be {wording}, got {value}")

    for name in positive:
        value = getattr(args, name)
        if value is not None and not 0 < value < math.inf:
            refuse(name, value, "a positive number")
    for name in non_negative:
        value = getattr(args, name)
        if value is not None and not 0 <= value < math.inf:
            refuse(name, value, "0 (off) or a positive number")
    for name, low, high in ranges:
        value = getattr(args, name)
        if value is not None and not low <= value <= high:
            refuse(name, value, f"in [{low:g}, {high:g}]")
    return args


def pick_device(name="auto", local_rank=None, threads=0):
    """auto: cuda, mps, cpu. A CUDA device always gets an index (cuda:LOCAL_RANK under torchrun,
    else the index given or the current GPU): torch.cuda.set_device and DDP need one. `threads`
    (--threads) sets torch's CPU threads; 0 leaves torch's own choice, one per core."""
    if threads < 0:
        die(f"--threads must be 0 (one per core) or a positive number, got {threads}")
    if threads:
        torch.set_num_threads(threads)
    if name == "auto":
        name = ("cuda" if torch.cuda.is_available() else
                "mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        die(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if device.type not in ("cpu", "cuda", "mps"):
        die(f"unsupported --device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "mps" and not torch.backends.mps.is_available():
        die("--device mps was asked for but MPS is not available; use --device cpu")
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        die(f"--device {name} was asked for but CUDA is not available; use --device cpu")
    index = local_rank if local_rank is not None else device.index
    index = torch.cuda.current_device() if index is None else index
    if index >= torch.cuda.device_count():
        die(f"--device {name}: GPU {index} does not exist, this machine has "
            f"{torch.cuda.device_count()}; use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return torch.device("cuda", index)


# --- every stage: files, the log, the figure

def read_text(path, what="a UTF-8 text file"):
    """The whole file; a missing, unreadable, non-UTF-8 or empty one ends the run via die()."""
    path = Path(path)
    if not path.is_file():
        die(f"data {'path' if path.exists() else 'file'} {path} "
            f"{'is not a file' if path.exists() else 'does not exist'}; pass --data with {what}")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:  # permission denied, an I/O error
        die(f"cannot read data file {path} ({err.strerror}); fix it or pass another --data")
    except UnicodeDecodeError as err:
        die(f"data file {path} is not UTF-8 text (bad byte at offset {err.start}); "
            "re-encode it as UTF-8")
    if not text.strip():
        die(f"data file {path} is empty; pass --data with {what}")
    return text


def warn_unless_names(names, path):
    """The names stages' data check: a text of sentences (lines with spaces, digits or
    punctuation, or long ones) is not a list of names. Say so once, in one line, and go on (the
    model learns whatever the lines hold)."""
    odd = sum(len(name) > 30 or not name.replace("-", "").replace("'", "").isalpha()
              for name in names)
    if 100 * odd > len(names):
        print(f"{Path(sys.argv[0]).name}: warning: {path} does not look like one name per line "
              f"({odd:,} of {len(names):,} lines hold spaces, digits or punctuation, or over 30 "
              "characters); training on it anyway", file=sys.stderr)


def write_atomic(path, write):
    """write(tmp) beside `path`, then rename (atomic): a crash leaves the old file whole."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(path, obj):
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n",
                                                  encoding="utf-8"))


def prepare_out_dir(path, checkpoint=None, overwrite=False, resume_flag=False):
    """Create --out-dir. A `checkpoint` in it may be hours of somebody's run: it needs --overwrite
    (or --resume, where the stage has it), else the run stops before touching it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        die(f"--out-dir {path} exists and is not a directory; choose another --out-dir")
    if checkpoint is not None and (path / checkpoint).exists() and not overwrite:
        die(f"--out-dir {path} already holds {checkpoint} from an earlier run; "
            + ("continue it with --resume, or " if resume_flag else "choose another --out-dir, or ")
            + "pass --overwrite to start afresh and replace it")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        die(f"cannot create --out-dir {path} ({err.strerror}); choose another --out-dir")


def print_header(device, world_size=1):
    """The first lines of a run (rank 0's): the command line, the versions and the device."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    print("command:", " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    threads = torch.get_num_threads()
    print(f"python {platform.python_version()}, torch {torch.__version__}, device {device} "
          f"({name or device.type}), {world_size} rank(s), {threads} CPU threads")
    if device.type == "cpu" and world_size == 1 and threads > 1 and Path("/proc/stat").exists():
        # Other jobs already holding cores: torch's threads then wait for one another at every
        # matmul, and a step can take several times as long as with fewer threads. Measured
        # now, not as the load average (which still holds the run before this one): the cores'
        # busy time over a tenth of a second while this process waits (Linux's /proc/stat).
        def busy_and_all():  # the first line sums all cores: user nice system idle iowait ...
            jiffies = [int(n) for n in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
            return sum(jiffies) - jiffies[3] - jiffies[4], sum(jiffies)

        busy, total = busy_and_all()
        time.sleep(0.1)
        busy_after, total_after = busy_and_all()
        cores = os.cpu_count() or 1
        taken = cores * (busy_after - busy) / max(1, total_after - total)  # cores in use now
        free = max(1, round(cores - taken))  # the cores the other jobs leave
        if taken >= 0.75 and threads > free:
            print(f"note: other jobs keep {taken:.1f} of this machine's {cores} cores busy and "
                  f"this run uses {threads} CPU threads; if steps are slow, try --threads {free}")


class Log:
    """log.jsonl (also kept in .records), flushed line by line so that a crash loses nothing. A
    resumed run keeps the records of the steps before `keep_before` (a line that a crash cut
    short is dropped) and appends to them; `write=False` (the other ranks) keeps records only."""

    def __init__(self, path, keep_before=0, write=True):
        path = Path(path)
        self.records, self.file = [], None
        if keep_before and path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record["step"] < keep_before:
                    self.records.append(record)
        if write:
            self.file = open(path.with_name(path.name + ".tmp"), "w", encoding="utf-8")
            self.file.writelines(json.dumps(record) + "\n" for record in self.records)
            self.file.flush()
            os.replace(self.file.name, path)  # renamed while open: it grows under its real name

    def __call__(self, record):
        self.records.append(record)
        if self.file is not None:
            print(json.dumps(record), file=self.file, flush=True)

    def close(self):
        if self.file is not None:
            self.file.close()


def pyplot():
    """matplotlib.pyplot drawing to files (no window); without matplotlib, a line saying so and
    None (no figure, the run goes on)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figure was drawn (pip install matplotlib)")
        return None
    return plt


def plot_curves(ax, records, keys, references=(), ylabel="loss (nats)"):
    """The log's records against step on one axis: a line for each of `keys` that the records
    hold, and a dashed one for each (label, value) of `references`. train_loss, logged every
    step, is a thin line (over a long run, a moving mean of ~1% of the steps, or the noise
    hides the trend); the evaluations' keys get markers."""
    for key in keys:
        points = [(r["step"], r[key]) for r in records if key in r]
        if not points:
            continue
        steps, values = zip(*points)
        if key != "train_loss":
            ax.plot(steps, values, "o-", label=key.removesuffix("_loss").replace("_", " "))
            continue
        window = max(1, len(values) // 100)
        if window > 1:  # (n, window) -> n means, each drawn at its window's middle step
            values = torch.tensor(values[:len(values) // window * window]).view(-1, window)
            steps, values = steps[window // 2::window][:len(values)], values.mean(1).tolist()
        ax.plot(steps, values, lw=0.8, alpha=0.8,
                label="train" + (f" (mean of {window} steps)" if window > 1 else ""))
    for label, value in references:
        ax.axhline(value, color="red", ls="--", lw=1, label=label)
    ax.set(xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend()


def save_figure(fig, path, dpi=100):
    """The figure as a PNG, atomically; returns the path as a string for metrics.json."""
    import matplotlib.pyplot as plt
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))
    plt.close(fig)
    print(f"figure: {path}")
    return str(path)


# --- the GPT stages (transformer.py, gpt2.py, chat.py): presets, progress, step timing,
# checkpoints, stop signals

def by_preset(presets, key):
    """Each preset's value of a flag, for its --help: '(default: quick/cpu 4, gpu 6)'."""
    names = {}
    for name, preset in presets.items():
        names.setdefault(preset[key], []).append(name)
    shown = [f"{'/'.join(n)} {value if isinstance(value, str) else format(value, 'g')}"
             for value, n in names.items()]
    return "(default: " + ", ".join(shown) + ")"


def use_preset(args, presets):
    """Flags left unset (None) take the value of the chosen --preset."""
    for key, value in presets[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def print_step(step, *parts):
    """A line of the run's progress, `step    42 | part | part`, printed by rank 0."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"step {step:5d} | " + " | ".join(parts), flush=True)


def summarize(records):
    """metrics.json's final and best train loss, val loss and HellaSwag over the log's records."""
    metrics = {}
    for key, best in (("train_loss", min), ("val_loss", min), ("hellaswag", max)):
        values = [r[key] for r in records if key in r]
        if values:
            metrics[f"final_{key}"], metrics[f"{best.__name__}_{key}"] = values[-1], best(values)
    return metrics


class StepTimer:
    """Each step's time (after a GPU sync: work done, not launches queued) and tokens/s."""

    def __init__(self, tokens):
        self.tokens, self.rates, self.started, self.total = tokens, [], time.time(), 0.0

    def start(self):
        self.t0 = time.time()

    def stop(self, step):  # the step's timing fields for log.jsonl
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        self.ms = 1000 * (time.time() - self.t0)
        self.total += self.ms / 1000  # seconds of training alone, without evaluations
        self.rates.append(1000 * self.tokens / self.ms)
        return {"ms": round(self.ms, 2), "tokens_per_s": round(self.rates[-1], 1),
                "tokens": (step + 1) * self.tokens}

    def __str__(self):
        return f"{self.ms:8.1f} ms | {self.rates[-1]:9,.0f} tok/s"

    def seconds(self):
        return round(time.time() - self.started, 3)

    def median(self):  # tokens/s of the median step: the first ones include compilation
        return float(statistics.median(self.rates)) if self.rates else None


def load_checkpoint(path, stage, hint, needs=()):
    """A checkpoint `stage`.py wrote, holding the keys `needs`, else die(); weights_only=True
    never runs the file's code."""
    path = Path(path)
    if not path.is_file():
        die(f"checkpoint {path} {'is not a file' if path.exists() else 'does not exist'}; {hint}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError,
            zipfile.BadZipFile) as err:
        die(f"checkpoint {path} is not a readable PyTorch checkpoint ({type(err).__name__}); "
            f"it may be truncated or corrupt; {hint}")
    written_by = checkpoint.get("stage") if isinstance(checkpoint, dict) else None
    if written_by != stage:
        die(f"checkpoint {path} was not written by {stage}.py"
            + (f" but by {written_by}.py" if written_by else "") + f"; {hint}")
    missing = set(needs) - set(checkpoint)
    if missing:
        die(f"checkpoint {path} is incomplete (no {', '.join(sorted(missing))}); {hint}")
    return checkpoint


class StopSignals:
    """SIGTERM (a spot instance going away) or SIGINT (Ctrl-C) only set a flag: the loop ends
    its step, saves a checkpoint and exits. A second signal acts at once."""

    def __enter__(self):
        self.received, self.previous = None, {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        signal.signal(signum, self.previous[signum])

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
