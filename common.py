"""What the stages share, so that each holds only its lesson. First what every stage needs (the
common flags and their checks, a user's mistake, the device, files and JSON, the log and the
figure); then what the two GPT stages share (transformer.py and gpt2.py: presets, sampling
flags, their figure, step timing, checkpoints, stop signals); last what only gpt2.py needs (its
flag groups, torchrun, mixed precision, GPU peaks for MFU, resumes, checks of the prompt and of
hub weights). A leaf: it imports no stage, and every script may import it."""
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
    and exit status 2 (under torchrun every rank exits, rank 0 alone says why)."""
    print0(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
    sys.exit(2)


def print0(*args, **kwargs):
    """print() on rank 0 alone: under torchrun every rank runs the same script (RANK says which;
    a plain run is rank 0)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs)


def make_parser(stage, description, data, data_help, seed):
    """The flags every stage has; argparse's own complaints end through die() like any mistake."""
    parser = argparse.ArgumentParser(prog=f"{stage}.py", description=description)
    parser.error = die
    add = parser.add_argument
    add("--data", type=Path, default=Path(data), help=f"{data_help} (default: %(default)s)")
    add("--out-dir", type=Path, default=Path("out") / stage, help="where log.jsonl, metrics.json, "
        "the figure and any checkpoint go (default: %(default)s)")
    add("--overwrite", action="store_true", help="start afresh in an --out-dir that holds a "
        "checkpoint, replacing it (a run never replaces one without this flag; stages that keep "
        "no checkpoint rewrite their outputs anyway)")
    add("--device", default="auto",
        help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
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


def pick_device(name="auto", local_rank=None):
    """auto: cuda, mps, cpu. A CUDA device always gets an index (cuda:LOCAL_RANK under torchrun,
    else the index given or the current GPU): torch.cuda.set_device and DDP need one."""
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
    print0("command:", " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print0(f"python {platform.python_version()}, torch {torch.__version__}, device {device} "
           f"({name or device.type}), {world_size} rank(s), {torch.get_num_threads()} CPU threads")


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


def plot_losses(ax, step_losses, evals):
    """Every step's batch loss (a moving mean over ~1% of the run) and each evaluation's losses."""
    window = max(1, len(step_losses) // 100)
    smooth = torch.tensor(step_losses[:len(step_losses) // window * window]).view(-1, window)
    ax.plot((torch.arange(len(smooth)) * window + window / 2).tolist(), smooth.mean(1).tolist(),
            label=f"train batch loss (mean of {window} steps)", alpha=0.6)
    for split in ("train", "val"):
        ax.plot([e["step"] for e in evals], [e[f"{split}_loss"] for e in evals], "o-",
                label=f"{split} split")
    ax.set(xlabel="step", ylabel="cross-entropy (nats)", title="loss")
    ax.legend()
    ax.grid(alpha=0.3)


def save_figure(fig, path, dpi=100):
    """The figure as a PNG, atomically; returns the path as a string for metrics.json."""
    import matplotlib.pyplot as plt
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))
    plt.close(fig)
    print(f"figure: {path}")
    return str(path)


# --- transformer.py and gpt2.py: presets, sampling flags, the figure, progress, checkpoints,
# stop signals

def by_preset(presets, key):
    """Each preset's value of a flag, for its --help: '(default: quick/cpu 4, gpu 6)'."""
    names = {}
    for name, preset in presets.items():
        names.setdefault(preset[key], []).append(name)
    return "(default: " + ", ".join(f"{'/'.join(n)} {value:g}" for value, n in names.items()) + ")"


def use_preset(args, presets):
    """Flags left unset (None) take the value of the chosen --preset."""
    for key, value in presets[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def add_sampling_flags(group, prompt, tokens, top_k, names=("--sample-tokens",), unit="tokens"):
    """The flags of the samples: where they start, how long, how random."""
    group.add_argument("--prompt", default=prompt,
                       help="text the samples start from (default: %(default)r)")
    group.add_argument(*names, dest="sample_tokens", type=int, default=tokens,
                       help=f"{unit} to generate per sample (default: %(default)s)")
    group.add_argument("--temperature", type=float, default=1.0,
                       help="divide the logits by this before sampling; 0: greedy (default: 1.0)")
    group.add_argument("--top-k", type=int, default=top_k, help=f"sample among the k likeliest "
                       f"{unit} (0: all; default: %(default)s)")


def draw_curves(path, records, title, panels):
    """The log's records against step, a panel per (ylabel, keys, references): each key a line
    (train_loss, logged every step, thin; the evaluations' with markers), each reference
    (label, value) a dashed line. Panels after the first are drawn only if the log has them."""
    plt = pyplot()
    if plt is None:
        return None
    panels = panels[:1] + [p for p in panels[1:] if any(k in r for r in records for k in p[1])]
    fig, axes = plt.subplots(1, len(panels), figsize=(2 + 5 * len(panels), 4), squeeze=False)
    for ax, (ylabel, keys, references) in zip(axes[0], panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                style = dict(lw=0.8) if key == "train_loss" else dict(marker="o")
                ax.plot(*zip(*points), label=key.removesuffix("_loss"), **style)
        for label, value in references:
            ax.axhline(value, color="red", ls="--", lw=1, label=label)
        ax.set(xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0][0].set_title(title)
    return save_figure(fig, path)


def print_step(step, *parts):
    """A line of the run's progress, `step    42 | part | part`, printed by rank 0."""
    print0(f"step {step:5d} | " + " | ".join(parts), flush=True)


def print_samples(texts, numbers, step=None):
    """Samples as the text they are, one after another, each under a line that names it."""
    for i, text in zip(numbers, texts):
        print(f"--- sample {i}" + (f", step {step}" if step is not None else "") + f":\n{text}",
              flush=True)


def summarize(records):
    """metrics.json's final and best train loss, val loss and HellaSwag over the log's records."""
    metrics = {}
    for key, best in (("train_loss", min), ("val_loss", min), ("hellaswag", max)):
        values = [r[key] for r in records if key in r]
        if values:
            metrics[f"final_{key}"], metrics[f"{best.__name__}_{key}"] = values[-1], best(values)
    return metrics


class StepTimer:
    """Each step's time (after a GPU sync: work, not queued launches), tokens/s and MFU."""

    def __init__(self, tokens, flops_per_token=None, peak_tflops=None):
        self.tokens, self.flops, self.peak = tokens, flops_per_token, peak_tflops
        self.rates, self.started, self.mfu, self.total = [], time.time(), None, 0.0

    def start(self):
        self.t0 = time.time()

    def stop(self, step):  # the step's timing fields for log.jsonl
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        self.ms = 1000 * (time.time() - self.t0)
        self.total += self.ms / 1000  # seconds of training alone, without evaluations
        self.rates.append(1000 * self.tokens / self.ms)
        record = {"ms": round(self.ms, 2), "tokens_per_s": round(self.rates[-1], 1),
                  "tokens": (step + 1) * self.tokens}
        if self.peak:
            record["mfu"] = self.mfu = self.flops * self.rates[-1] / (self.peak * 1e12)
        return record

    def __str__(self):
        return (f"{self.ms:8.1f} ms | {self.rates[-1]:9,.0f} tok/s"
                + (f" | MFU {100 * self.mfu:.1f}%" if self.mfu is not None else ""))

    def seconds(self):
        return round(time.time() - self.started, 3)

    def median(self):  # tokens/s of the median step: the first ones include compilation
        return float(statistics.median(self.rates)) if self.rates else None


def save_checkpoint(path, checkpoint):
    write_atomic(path, lambda tmp: torch.save(checkpoint, tmp))


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


# --- gpt2.py alone: its flag groups, torchrun's ranks, mixed precision, FLOPs and GPU peaks
# for MFU, resumes (RNG states included), a stop signal or a diverging loss, the prompt, and
# Hugging Face folders read and written with one-line errors

def add_resume_flags(group, every_help):
    """The flags of checkpoints a long run can stop at and continue from."""
    group.add_argument("--checkpoint-every", type=int,
                       help="steps between checkpoints, 0: only at the end " + every_help)
    group.add_argument("--stop-step", type=int, help="stop (and save) here; --resume goes on")
    group.add_argument("--resume", nargs="?", const="", metavar="CHECKPOINT",
                       help="continue from a checkpoint (default: <out-dir>/checkpoint.pt)")


def add_speed_flags(parser):
    """The flags that change how fast a step runs, not what it computes."""
    speed = parser.add_argument_group("speed")
    speed.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                       default="auto", help="autocast dtype; auto: bfloat16 on GPUs that have "
                       "it, float16 with a gradient scaler on older ones, float32 elsewhere")
    speed.add_argument("--compile", action=argparse.BooleanOptionalAction,
                       help="torch.compile the training step's model (default: on with CUDA)")
    speed.add_argument("--peak-tflops", type=float, help="GPU peak TFLOP/s for MFU")


def add_sample_every_flags(group, every_help):
    """The flags of the samples printed while training: how often, how many."""
    group.add_argument("--sample-every", type=int,
                       help="steps between samples, 0: off " + every_help)
    group.add_argument("--num-samples", type=int, default=4,
                       help="samples to generate, split over the ranks (default: %(default)s)")


def add_hellaswag_flags(group, every_help):
    """The flags of HellaSwag during training and of its mode without training."""
    group.add_argument("--hellaswag-every", type=int,
                       help="steps between HellaSwag evaluations, 0: off " + every_help)
    group.add_argument("--hellaswag-data", type=Path,
                       help="HellaSwag's val .jsonl (default: downloaded into data/hellaswag)")
    group.add_argument("--hellaswag-limit", type=int, help="score only its first N examples")


def torchrun_env():
    """(ddp, rank, world_size, local_rank): torchrun sets RANK, LOCAL_RANK and WORLD_SIZE;
    without them this is one process, rank 0 of 1 (local_rank None)."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return ddp, rank, world_size, int(os.environ["LOCAL_RANK"]) if ddp else None


def start_ranks(device, ddp):
    """Join torchrun's process group if `ddp` (NCCL moves gradients GPU to GPU; gloo is the CPU
    backend: tests, laptops); on a GPU, make `device` current and let float32 matmuls use TF32."""
    if ddp:
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")


def end_ranks():
    """Leave the process group, if one was joined. Gloo's worker threads let go of a collective's
    tensors a moment after it returns, and that needs Python's lock: a rank that went straight
    into interpreter teardown could abort there ("terminate called without an active
    exception"). So all ranks meet, leave, and then yield the lock to those threads briefly."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        time.sleep(0.05)


def pick_dtype(name, device):
    """bf16 on GPUs that have it (Ampere on), fp16 (with a gradient scaler) on older ones, fp32
    on CPU and MPS unless asked for."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    if name == "float16" and device.type != "cuda":
        die("--dtype float16 needs a CUDA GPU (it trains with a gradient scaler); "
            "use --dtype bfloat16 or float32")
    return getattr(torch, name)


# Dense bf16 (else fp16) tensor-core TFLOP/s from the vendors' data sheets; the first name found
# in the device's name wins, so the specific ones come first. Unknown cards: --peak-tflops.
GPU_PEAK_TFLOPS = [
    ("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
    ("H800", 989.0), ("B200", 2250.0), ("B100", 1750.0), ("A100", 312.0), ("A800", 312.0),
    ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0),
    ("A6000", 155.0), ("RTX 6000 Ada", 364.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0),
    ("V100", 125.0), ("T4", 65.0)]


def mixed_precision(device, dtype):
    """(the autocast dtype or None for none, the autocast context for the forward passes)."""
    half = dtype if dtype != torch.float32 else None
    return half, torch.autocast(device.type, dtype=dtype, enabled=half is not None)


def flops_per_token(config, seq_len):
    """Training FLOPs a token of a GPT with this config (for MFU): 6 per weight in a matmul plus
    attention's 12 * n_layer * n_embd * seq_len (PaLM, appendix B); 0.85 GFLOP for GPT-2 124M."""
    C, n_layer = config.n_embd, config.n_layer
    matmul_params = n_layer * (12 * C * C + 13 * C) + config.vocab_size * C + 2 * C
    return 6 * matmul_params + 12 * n_layer * C * seq_len


def peak_tflops(device, args):
    """The device's peak TFLOP/s for MFU: --peak-tflops, else the table's value for this GPU."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return args.peak_tflops or next((tflops for key, tflops in GPU_PEAK_TFLOPS if key in name),
                                    None)


def rng_state():
    """torch's RNG states, the only ones training draws from (its data order is the loader's own
    state), so that a resumed run draws what an uninterrupted one would have drawn."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):  # an older checkpoint's "python" and "numpy" states are not needed
    torch.set_rng_state(state["torch"])
    for index, cuda_state in enumerate(state.get("cuda", [])[:torch.cuda.device_count()]):
        torch.cuda.set_rng_state(cuda_state, index)


def stop_and_save(signals, save, step, out_dir):
    """A stop signal (on this rank or another) ends the run: save the checkpoint of `step` steps
    and say how to go on; returns the signal's name for metrics.json."""
    stopped = signals.received or "a signal on another rank"
    save(step)
    print0(f"received {stopped}: saved a checkpoint at step {step} in {out_dir}; the same "
           "command with --resume continues")
    return stopped


def stop_on_bad_loss(loss, step, checkpoint, log):
    """A NaN or infinite loss ends the run (exit status 1) unsaved: the last good one stays."""
    kept = (f"the last good checkpoint is kept at {checkpoint}" if Path(checkpoint).exists()
            else "no checkpoint was written")
    print0(f"{Path(sys.argv[0]).name}: error: the loss is {loss} at step {step}; stopping "
           f"without saving ({kept}); resume from it with a lower --lr or a longer "
           "--warmup-steps", file=sys.stderr)
    log.close()
    end_ranks()
    sys.exit(1)


def restore_training(checkpoint, flags, **parts):
    """A resume: each of `parts` (the model, optimizer, gradient scaler, data loader: anything
    with load_state_dict) as it was when `checkpoint` was written, and the RNG states; returns
    its step. A checkpoint that does not fit dies naming the run's own `flags` to repeat."""
    try:
        for key, part in parts.items():
            part.load_state_dict(checkpoint[key])
    except (KeyError, ValueError, RuntimeError) as err:
        reason = " ".join(str(err).split())  # load_state_dict's message runs over lines
        die(f"cannot resume: {reason}; resume with the run's own flags ({flags}) or drop --resume")
    set_rng_state(checkpoint["rng"])
    return checkpoint["step"]


def resume_checkpoint(args, stage):
    """--resume's checkpoint (default: <out-dir>/checkpoint.pt), or None without --resume."""
    if args.resume is None:
        return None
    return load_checkpoint(args.resume or Path(args.out_dir) / "checkpoint.pt", stage,
                           "cannot resume; drop --resume to start afresh")


def encode_prompt(encode, prompt, vocab_size, empty):
    """--prompt's tokens, checked at start-up rather than an hour into the run; an empty prompt
    is the tokens `empty`."""
    tokens = encode(prompt) if prompt else empty
    if max(tokens) >= vocab_size:
        die(f"--prompt has GPT-2 tokens beyond this model's --vocab-size {vocab_size}; "
            "use a model with GPT-2's vocabulary or another --prompt")
    return tokens


def hub_weights_or_die(load, source):
    """load() of Hugging Face weights; a missing package, or a ValueError (its message says what
    is wrong and how to fix it), is one line about --init-from `source`."""
    try:
        return load()
    except ImportError as err:
        die(f"Hugging Face weights need the {err.name} package: pip install {err.name}")
    except ValueError as err:
        die(f"cannot load --init-from {source}: {err}")


def load_every_weight(model, weights, what, tied=()):
    """model.load_state_dict(weights) when every weight is there (those `tied` to another come
    with it), known and of its shape; else a ValueError, `what` and the first problems: never a
    model left with random weights."""
    ours = model.state_dict()
    problems = [f"no {k}" for k in ours if k not in weights and k not in tied]
    problems += [f"unknown {k}" for k in weights if k not in ours]
    problems += [f"{k} of shape {tuple(w.shape)}, not {tuple(ours[k].shape)}"
                 for k, w in weights.items() if k in ours and w.shape != ours[k].shape]
    if problems:
        raise ValueError(f"{what}: " + ", ".join(problems[:3])
                         + ("..." if len(problems) > 3 else ""))
    model.load_state_dict(weights, strict=False)


def hub_download(repo):
    """The local folder of a Hugging Face hub repository's config.json and model.safetensors,
    downloaded once into the Hugging Face cache, which then serves offline runs."""
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo, allow_patterns=["config.json", "model.safetensors"]))
    except OSError:  # offline and not in the cache yet, or the hub's own HTTP error
        raise ValueError("the Hugging Face hub cannot be reached and this machine's cache has no "
                         "copy; connect once (the download is kept) or pass --init-from with a "
                         "local checkpoint or folder") from None


def read_hf_weights(directory):
    """The state dict in a Hugging Face folder: model.safetensors, else pytorch_model.bin."""
    safetensors = directory / "model.safetensors"
    if safetensors.is_file():
        from safetensors.torch import load_file  # without the package: hub_weights_or_die says so
    try:
        return (load_file(safetensors) if safetensors.is_file()
                else torch.load(directory / "pytorch_model.bin", weights_only=True))
    except Exception as err:  # missing, truncated or foreign: each format raises its own kinds
        raise ValueError(f"cannot read the weights in {directory} ({type(err).__name__}: it "
                         "needs a whole model.safetensors or pytorch_model.bin)") from None


def write_hf_folder(directory, tensors, config, flag):
    """model.safetensors and config.json in `directory`, each written atomically; a folder that
    cannot be written ends the run with one line about `flag`."""
    from safetensors.torch import save_file
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        die(f"{flag} {directory} exists and is not a directory; choose another")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(directory / "model.safetensors",
                     lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
        write_json(directory / "config.json", config)
    except OSError as err:
        die(f"cannot write to {flag} {directory} ({err.strerror}); choose another folder")
    print(f"wrote {directory}: config.json and model.safetensors for "
          f"{config['architectures'][0]}")


def already_done(stage, out_dir, step, max_steps, stop_step):
    """--resume of a run that has already reached its end: say so, and change nothing."""
    end = (f"complete at step {step} (--max-steps {max_steps})" if step >= max_steps
           else f"at step {step}, its --stop-step {stop_step} (raise it or drop it to go on)")
    print0(f"the run in {out_dir} is already {end}: nothing was changed")
    return {"stage": stage, "steps_done": step}
