"""The plumbing every stage shares, so that the stages hold only their lesson. A leaf: it imports
no stage, and every script may import it."""
import argparse
import contextlib
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

PROG = Path(sys.argv[0]).name  # replaced by the script's name once its parser is built


def die(message):
    """A user's mistake: one line naming the problem and the fix (rank 0's only), exit status 2."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


# --- the command line

def make_parser(stage, description, data, data_help, seed):
    """The flags every stage has; argparse's own complaints end through die() like any mistake."""
    global PROG
    PROG = f"{stage}.py"
    parser = argparse.ArgumentParser(prog=PROG, description=description)
    parser.error = die
    add = parser.add_argument
    add("--data", type=Path, default=Path(data), help=f"{data_help} (default: %(default)s)")
    add("--out-dir", type=Path, default=Path("out") / stage, help="where log.jsonl, metrics.json, "
        "the figure and any checkpoint go (default: %(default)s)")
    add("--device", default="auto",
        help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    add("--seed", type=int, default=seed,
        help="seed of everything random in the run (default: %(default)s)")
    return parser


# The flags of transformer.py and gpt2.py that mean the same in both: (group, flag, type, help).
GPT_FLAGS = (
    ("model", "--n-layer", int, "Transformer blocks"),
    ("model", "--n-head", int, "attention heads"),
    ("model", "--n-embd", int, "width of the residual stream"),
    ("model", "--block-size", int, "longest context the model can take"),
    ("training", "--max-steps", int, "optimizer steps; the cosine ends here"),
    ("training", "--warmup-steps", int, "steps of linear warmup to --lr"),
    ("training", "--lr", float, "peak learning rate"),
    ("evaluation and samples", "--eval-every", int, "steps between evaluations (0: off)"),
    ("evaluation and samples", "--eval-batches", int, "batches (per rank) in each loss estimate, "
                                                      "always the same ones"))


def add_gpt_flags(parser, presets, default, preset_help, batch_help):
    """--preset, GPT_FLAGS (the preset's values unless given), the optimizer's, the output
    folder's and --sample; returns the model, training and evaluation groups for the stage's own."""
    parser.add_argument("--preset", choices=list(presets), default=default,
                        help=f"{preset_help}; a flag overrides its value (default: {default})")
    groups = {name: parser.add_argument_group(f"{name} (default: the preset's value)")
              for name in ("model", "training", "evaluation and samples")}
    groups["training"].add_argument("--batch-size", type=int, help=batch_help)
    for group, flag, kind, text in GPT_FLAGS:
        groups[group].add_argument(flag, type=kind, help=text)
    group = groups["training"]
    group.add_argument("--min-lr-ratio", type=float, default=0.1,
                       help="the cosine ends at lr x this (default: %(default)s)")
    group.add_argument("--weight-decay", type=float, default=0.1,
                       help="AdamW weight decay of the matrices (default: %(default)s)")
    group.add_argument("--grad-clip", type=float, default=1.0,
                       help="clip the gradient's global norm to this (0: off; default: 1.0)")
    group.add_argument("--overwrite", action="store_true",
                       help="start afresh even though --out-dir holds a checkpoint, replacing it")
    parser.add_argument("--sample", action="store_true", help="do not train: generate text "
                        "from --init-from (default: <out-dir>/checkpoint.pt)")
    return groups.values()


def parse_gpt_args(parser, argv, presets, positive=(), non_negative=(), ranges=()):
    """The flags, unset ones from the preset, checked: GPT_FLAGS' and the stage's own."""
    args = parser.parse_args(argv)
    for key, value in presets[args.preset].items():  # flags left unset take the preset's value
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    check_args(args, ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "max_steps",
                      "eval_batches", "lr", *positive),
               ("warmup_steps", "eval_every", "sample_tokens", "top_k", *non_negative),
               (("lr", 0, 10), ("min_lr_ratio", 0, 1), ("weight_decay", 0, 10),
                ("grad_clip", 0, math.inf), ("temperature", 0, 100), *ranges))
    if args.n_embd % args.n_head:
        die(f"--n-embd {args.n_embd} must be a multiple of --n-head {args.n_head} "
            "(each head gets n_embd / n_head channels)")
    return args


def add_sampling_flags(group, prompt, tokens, top_k, names=("--sample-tokens",)):
    group.add_argument("--prompt", default=prompt,
                       help="text the samples start from (default: %(default)r)")
    group.add_argument(*names, dest="sample_tokens", type=int, default=tokens,
                       help="tokens to generate per sample (default: %(default)s)")
    group.add_argument("--temperature", type=float, default=1.0,
                       help="divide the logits by this before sampling; 0: greedy (default: 1.0)")
    group.add_argument("--top-k", type=int, default=top_k,
                       help="sample among the k likeliest tokens (0: all; default: %(default)s)")


def check_args(args, positive=(), non_negative=(), ranges=()):
    """die() on the first flag out of range (positive and non_negative ones must be finite);
    `ranges` holds (name, low, high). A flag left unset (None) is not checked."""
    checks = [(positive, lambda v: 0 < v < math.inf, "a positive number"),
              (non_negative, lambda v: 0 <= v < math.inf, "0 (off) or a positive number")]
    checks += [((name,), lambda v, low=low, high=high: low <= v <= high,
                f"in [{low:g}, {high:g}]") for name, low, high in ranges]
    for names, test, wording in checks:
        for name in names:
            value = getattr(args, name)
            if value is not None and not test(value):  # NaN passes no test
                die(f"--{name.replace('_', '-')} must be {wording}, got {value}")
    return args


# --- device and dtype

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


def gpu_peak_tflops(device):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((tflops for key, tflops in GPU_PEAK_TFLOPS if key in name), None)


# --- files

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
    if int(os.environ.get("RANK", "0")) == 0:
        print("command:", " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        print(f"python {platform.python_version()}, torch {torch.__version__}, device {device} "
              f"({name or device.type}), {world_size} rank(s), {torch.get_num_threads()} CPU "
              "threads")


class Log:
    """log.jsonl (also kept in .records), flushed line by line so that a crash loses nothing. A
    resumed run keeps the steps before `keep_before`, dropping a line a crash cut short."""

    def __init__(self, path, keep_before=0, write=True):
        path, self.records, self.file = Path(path), [], None
        earlier = path.exists() and keep_before
        for line in path.read_text(encoding="utf-8").splitlines() if earlier else []:
            with contextlib.suppress(json.JSONDecodeError):
                self.records += [r for r in [json.loads(line)] if r["step"] < keep_before]
        if write:
            self.file = open(path.with_name(path.name + ".tmp"), "w", encoding="utf-8")
            self.file.writelines(json.dumps(r) + "\n" for r in self.records)
            self.file.flush()
            os.replace(self.file.name, path)  # renamed while open: it grows under its real name

    def __call__(self, record):
        self.records.append(record)
        if self.file is not None:
            print(json.dumps(record), file=self.file, flush=True)

    def close(self):
        if self.file is not None:
            self.file.close()


def summarize(records, out_dir, head):
    """metrics.json's final and best train loss, val loss and HellaSwag, printed after `head`."""
    metrics, line = {}, [head]
    for key, best in (("train_loss", min), ("val_loss", min), ("hellaswag", max)):
        values = [r[key] for r in records if key in r]
        if values:
            metrics[f"final_{key}"], metrics[f"{best.__name__}_{key}"] = values[-1], best(values)
            line.append(f"{key.replace('_', ' ')} {values[-1]:.4f}")
    if int(os.environ.get("RANK", "0")) == 0:
        print(", ".join(line) + f"; outputs in {out_dir}")
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


def stop_on_bad_loss(loss, step, checkpoint, log):
    """A NaN or infinite loss ends the run (exit status 1) unsaved: the last good one stays."""
    if int(os.environ.get("RANK", "0")) == 0:
        kept = (f"the last good checkpoint is kept at {checkpoint}" if Path(checkpoint).exists()
                else "no checkpoint was written")
        print(f"{PROG}: error: the loss is {loss} at step {step}; stopping without saving "
              f"({kept}); resume from it with a lower --lr or a longer --warmup-steps",
              file=sys.stderr)
    log.close()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.exit(1)


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


# --- checkpoints

def save_checkpoint(path, checkpoint):
    write_atomic(path, lambda tmp: torch.save(checkpoint, tmp))


def load_checkpoint(path, stage, hint):
    """A checkpoint `stage`.py wrote, else die(); weights_only=True never runs the file's code."""
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
    return checkpoint


def rng_state():
    """torch's RNG states, the only ones training draws from (its data order is the loader's own
    state), so that a resumed run draws what an uninterrupted one would have drawn."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):  # an older checkpoint's "python" and "numpy" states are not needed
    torch.set_rng_state(state["torch"])
    for index, cuda_state in enumerate(state.get("cuda", [])[:torch.cuda.device_count()]):
        torch.cuda.set_rng_state(cuda_state, index)


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
