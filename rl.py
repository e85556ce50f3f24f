"""Stage 10: reinforcement learning from a verifier (GRPO-style), rollouts on serve.py's engine.

chat.py taught the model from labelled answers: every target token was given. This stage teaches
it from a verifier alone: the model samples several replies to each question, a program scores
them, and the policy moves toward the replies that scored above their group's mean. That is GRPO
(Shao et al., 2024, "DeepSeekMath"; DeepSeek-R1, 2025) in the stripped form of nanochat's
chat_rl.py: REINFORCE with the group's mean reward as the baseline, the loss averaged over all
sampled reply tokens. One RL step is five moves, each explained where it happens in main:
  1. rollouts: G replies to each of P questions, sampled through serve.py's continuous-batching
     Engine in this process (each reply with a seed of its own), as verl or OpenRLHF sample
     theirs through vLLM: a trainer's sampling is a serving workload;
  2. rewards: verify() scores each reply, 1 for the right final answer, 0 otherwise;
  3. advantages: each reward minus its group's mean (divided by the group's standard deviation
     with --divide-std, GRPO's choice; Dr. GRPO, Liu et al., 2025, drops it);
  4. one policy-gradient step on the log-probabilities of the sampled reply tokens, weighted by
     their reply's advantage and divided by the number of reply tokens in the step;
  5. the engine's weights are the trained model's own tensors: the step refreshes them.

Left out of GRPO, and why: the importance ratio and its clipping (PPO's), because every batch of
rollouts is used for exactly one step, so the policy that sampled is the policy being trained
and the ratio is 1; the KL penalty toward the starting model, because runs this short stay near
it anyway (DAPO, Yu et al., 2025, drops it too); and a value network, which GRPO had already
replaced by the group's mean.

The task (`--data tasks`, generated from the seed like chat.py's task mix): "How many words:
lord king lord night crown blood love" -> "There are 7.", phrases of 6 to 10 of chat.py's words,
where chat.py taught 2 to 5. The verifier reads the reply's last number, as GSM8K's check does. A
short supervised cold start on a few hundred labelled examples (--sft-steps, as DeepSeek-R1 began
its RL from a small SFT set) teaches the reply's form and leaves the count unsure, the right one
among its neighbours: pass@1 well below pass@8, which is the room RL learns in. RL turns "right
sometimes" into "right most times"; it cannot find an answer the model never samples (a run
without the cold start never scores, so never learns). The RL questions carry no answers the
model sees; only the verifier compares.

Run (CPU quick start, after README's chat quick start made out/chat/checkpoint.pt):
    python rl.py --init-from out/chat/checkpoint.pt
    python rl.py --init-from out/chat/checkpoint.pt --method sft --max-steps N --out-dir out/rl-sft
        # the comparison: N more SFT steps in the minutes RL's steps took (README, Stage 10)
GPU (the `gpt2` preset: chat.py's gpt2 checkpoint on GSM8K, rewarded for the final number):
    python rl.py --preset gpt2
    torchrun --standalone --nproc_per_node=8 rl.py --preset gpt2

Measured (2-core Intel Xeon, torch 2.13, 2026-12-03), from chat.py's quick-start checkpoint: the
cold start leaves held-out pass@1 0.459, pass@8 0.970; 200 RL steps (102 s of steps, 2 min 4 s
in all) raise pass@1 to 0.981 (pass@8 1.000). The same minutes of more SFT on the 300 labels
reach 0.986 by their 50th step: where labels exist, they teach faster than a reward. More in
README.md (Stage 10).

Outputs in --out-dir (default out/rl): log.jsonl, metrics.json (heldout_pass1, heldout_passk and
their values before RL, k), rl.png (reward and held-out pass@1 against step), checkpoint.pt
(model, optimizer, step, the cold start's data position, RNG state, the chat format): chat.py
--chat and serve.py load it as they load chat.py's.
"""
import functools
import json
import math
import os
import random
import re
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import chat
import common
import fineweb
import gpt2
import serve
from common import die

STAGE = "rl"


# --- the task and its verifier

def make_question(rng):
    """(question, answer) of the bundled task: how many words a phrase of 6 to 10 of chat.py's
    words has (a word may repeat). chat.py taught its model to count phrases of 2 to 5 words, in
    its reply form "There are 4."; longer phrases are new to it."""
    words = [rng.choice(chat.WORDS) for _ in range(rng.randint(6, 10))]
    return f"How many words: {' '.join(words)}", f"There are {len(words)}."


def task_rows(seed, n):
    """n distinct (question, answer) rows of the bundled task, from the seed alone."""
    rng, rows, seen = random.Random(seed), [], set()
    while len(rows) < n:
        question, answer = make_question(rng)
        if question not in seen:
            seen.add(question)
            rows.append((question, answer))
    return rows


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text):
    """The last number in text (commas dropped), or None."""
    numbers = NUMBER.findall(text)
    return float(numbers[-1].replace(",", "")) if numbers else None


def verify(reply, answer):
    """The reward of a reply's text: 1.0 if its final answer is right, else 0.0. An answer with a
    number (GSM8K's, the bundled task's) is right when the reply's last number is the answer's
    last number, whatever the words around it; an answer without one, when the whole reply is
    the answer."""
    expected = final_number(answer)
    if expected is not None:
        return float(final_number(reply) == expected)
    return float(reply.strip() == answer.strip())


# --- rollouts through serve.py's engine

STOPS = frozenset({chat.ASSISTANT_END, fineweb.EOT})  # a reply ends at either


def rollouts(engine, prompts, group, max_tokens, temperature, top_k, seeds):
    """`group` replies to each prompt, sampled by the engine: [[tokens of each reply] for each
    prompt], a reply's ASSISTANT_END included where it came. seeds[i][j] seeds reply j of prompt
    i: the same seed gives the same reply, whatever else shares the engine's batch. All requests
    are queued first, then the engine steps in this thread until they are done: its slots fill
    with whichever replies are unfinished, so a short reply's slot goes to the next one at once
    (GPT.generate would run each group until its longest reply ends)."""
    requests = [[serve.Request(prompt, max_tokens, deliver=lambda event: None,
                               temperature=temperature, top_k=top_k, seed=seeds[i][j],
                               stop_tokens=STOPS) for j in range(group)]
                for i, prompt in enumerate(prompts)]
    for request in sum(requests, []):
        engine.submit(request)
    with torch.no_grad():
        while engine.active() or not engine.waiting.empty():
            engine.step()
    return [[request.output for request in row] for row in requests]


def rollout_seeds(seed, first, count, group):
    """Per-reply seeds for questions first..first+count-1 of a run: unique across the run, and a
    function of the question's place alone, so that a resumed run samples the same replies."""
    return [[(seed << 40) + (first + i) * group + j for j in range(group)] for i in range(count)]


def reply_text(reply):
    return chat.encoding().decode([t for t in reply if t < chat.BOS])


def score(replies, answers):
    """rewards (P, G) of each prompt's replies: verify() of a reply that ended (ASSISTANT_END);
    a reply cut at max_tokens scores 0."""
    return torch.tensor([[verify(reply_text(r), answer) if r[-1:] == [chat.ASSISTANT_END] else 0.0
                          for r in row] for row, answer in zip(replies, answers)])  # (P, G)


# --- the policy gradient

def group_advantages(rewards, divide_std=False):
    """(P, G) advantages of (P, G) rewards: each minus its group's mean, GRPO's baseline (no value
    network: the other replies to the same question say what is usual). A group whose replies all
    scored alike has advantage 0 everywhere and teaches nothing."""
    advantages = rewards - rewards.mean(dim=1, keepdim=True)  # (P, G)
    if divide_std:
        advantages = advantages / (rewards.std(dim=1, keepdim=True) + 1e-6)  # (P, G)
    return advantages


def policy_batch(prompts, replies, advantages):
    """(x, y, weight), each (B, T), of one micro-batch of replies: inputs, targets, and each
    target's weight: its reply's advantage on the reply's tokens, 0 on the prompt and padding."""
    examples = [(prompt + reply, [0] * len(prompt) + [1] * len(reply))
                for prompt, reply in zip(prompts, replies)]
    x, y, mask = chat.batch(examples)  # (B, T) each
    return x, y, mask.float() * advantages[:, None]  # (B, T)


class PolicyLoss(nn.Module):
    """-sum(advantage x log p(token)) over the weighted targets: its gradient is REINFORCE's,
    pushing up the tokens of replies that beat their group, down those that fell short. Only
    targets with a weight reach the output layer (chat.py's trick): the prompts and padding, and
    the replies of groups that scored alike, add nothing. No weights of its own: DDP wraps it."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt

    def forward(self, x, y, weight):
        keep = weight != 0  # (B, T)
        logits = F.linear(self.gpt.hidden_states(x)[keep], self.gpt.lm_head.weight)  # (N, V)
        log_probs = -F.cross_entropy(logits.float(), y[keep], reduction="none")  # (N,)
        return -(weight[keep] * log_probs).sum()


def rl_step(step_on, engine, batch, prompts, first, stop, args, device):
    """One RL step on this rank's `batch` of (question, answer) and their prompts; `first` is the
    first question's place in the run (it picks the seeds). step_on is chat.train_step on
    PolicyLoss. Returns (loss, gradient norm, stop on any rank, the step's record for the log)."""
    # 1. rollouts: G replies to each question, sampled by the engine, each with its own seed.
    replies = rollouts(engine, prompts, args.group, args.max_new_tokens, args.temperature,
                       args.top_k, rollout_seeds(args.seed, first, len(prompts), args.group))
    # 2. rewards: the verifier alone sees the answers.
    rewards = score(replies, [answer for _, answer in batch])  # (P, G)
    # 3. advantages: how much better than the other replies to the same question.
    advantages = group_advantages(rewards, args.divide_std)  # (P, G)
    # 4. the policy gradient: every sampled reply token weighted by its reply's advantage, the
    # sum divided by the reply tokens of all ranks (a long reply counts by its tokens, as in
    # DAPO, not as one sample). Micro-batches of --batch-size replies; DDP sums the ranks'.
    flat_prompts = [p for p in prompts for _ in range(args.group)]
    flat_replies, flat_advantages = sum(replies, []), advantages.flatten()  # (P*G,)
    stats = torch.tensor([sum(map(len, flat_replies)), rewards.sum(), rewards.numel()],
                         dtype=torch.float64, device=device)  # reply tokens, reward, replies
    if dist.is_initialized():
        dist.all_reduce(stats)
    micro_batches = [policy_batch(flat_prompts[i:i + args.batch_size],
                                  flat_replies[i:i + args.batch_size],
                                  flat_advantages[i:i + args.batch_size])
                     for i in range(0, len(flat_replies), args.batch_size)]
    loss, norm, stop = step_on(micro_batches, stats[0].item(), stop=stop)
    # 5. the engine's weights: nothing to send, it reads the tensors this step just updated.
    reward = stats[1].item() / stats[2].item()
    # With a 0/1 reward the mean reward is the batch's pass@1.
    return loss, norm, stop, {"reward": reward, "pass1": reward,
                              "reply_tokens": stats[0].item() / stats[2].item()}


def cold_start(sft, optimizer, args):
    """--sft-steps of chat.py's supervised step on the few labelled examples, at a constant
    --sft-lr, so that the model answers in the task's form before RL; returns their seconds."""
    timer = common.StepTimer(args.batch_size)
    for group in optimizer.param_groups:
        group["lr"] = args.sft_lr
    for step in range(args.sft_steps):
        timer.start()
        loss, _, _ = sft(stop=False)
        timer.stop(step)
        if step % 20 == 0 or step == args.sft_steps - 1:
            common.print_step(step, f"cold start (SFT) loss {loss:.4f}")
    gpt2.print0(f"cold start: {args.sft_steps} SFT steps in {timer.total:.1f} s")
    return round(timer.total, 1)


def evaluate(engine, heldout, prompts, k, args):
    """(pass@1, pass@k) on the held-out questions: k replies each at the training temperature,
    always with the same seeds (before and after RL alike); pass@1 is the mean reward, pass@k the
    share of questions with a right reply among the k. The questions are dealt to the ranks."""
    rank, world_size = dist_rank()
    mine = list(range(len(heldout)))[rank::world_size]
    replies = rollouts(engine, [prompts[i] for i in mine], k, args.max_new_tokens,
                       args.temperature, args.top_k, [rollout_seeds(args.seed + 1, i, 1, k)[0]
                                                      for i in mine])
    rewards = score(replies, [heldout[i][1] for i in mine])  # (n, k)
    total = torch.tensor([rewards.mean(1).sum(), rewards.amax(1).sum(), len(mine)],
                         dtype=torch.float64, device=engine.k.device)
    if world_size > 1:
        dist.all_reduce(total)
    return (total[0] / total[2]).item(), (total[1] / total[2]).item()


def dist_rank():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


# --- main: cold start, then RL

def main(args):
    # torchrun's environment, as in gpt2.py and chat.py.
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    master = rank == 0
    device = common.pick_device(args.device, int(os.environ["LOCAL_RANK"]) if ddp else None,
                                args.threads)
    dtype = gpt2.pick_dtype(args.dtype, device)

    # Every input is checked before anything is written or any process group is joined.
    for flag in ("questions_per_step", "batch_size"):  # each rank takes an equal share
        if getattr(args, flag) % world_size:
            die(f"--{flag.replace('_', '-')} {getattr(args, flag)} is not a multiple of the "
                f"{world_size} ranks; change it")
    torch.manual_seed(args.seed)
    rows = read_rows(args)  # first: a mistake in --data is one line before a model loads
    checkpoint, model = start_from(args)
    end_step = gpt2.last_step(args)
    if checkpoint is not None and checkpoint["step"] >= end_step:
        return {**gpt2.already_done(args, checkpoint["step"], STAGE), "complete": True}
    labelled, questions, heldout = open_data(args, rows, model.config.block_size)
    serve.kv_cache_or_die(model.config, args.rollout_batch, device, torch.float32,
                          "--rollout-batch")  # the rollouts' cache holds the float32 weights'
    gpt2.prepare_run_dir(args, checkpoint)
    if ddp:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32, as in gpt2.py
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    common.print_header(device, world_size)
    gpt2.print0(f"data {args.data}: {len(labelled):,} labelled examples for the cold start, "
                f"{len(questions):,} RL questions (no answers shown), {len(heldout):,} held out")

    model.to(device)
    optimizer = model.configure_optimizer(args.lr, 0.0, device)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    sft_loader = chat.ConversationLoader(labelled, args.batch_size, args.batch_size // world_size,
                                         rank, world_size, args.seed)
    start_step = gpt2.restore_training(
        checkpoint, "--data, --seed, --batch-size, --sft-examples", optimizer=optimizer,
        scaler=scaler, loader=sft_loader) if checkpoint else 0
    loss_model = PolicyLoss(model)
    train_model = (DDP(loss_model, device_ids=[device.index] if device.type == "cuda" else None)
                   if ddp else loss_model)
    step_on = functools.partial(chat.train_step, train_model, optimizer, scaler, device=device,
                                autocast=autocast, grad_clip=args.grad_clip)

    def sft(stop):
        # Supervised fine-tuning is the policy loss with weight 1 on every labelled reply token:
        # chat.py's masked loss, the labelled reply standing in for a sampled one.
        micro_batches, n_targets = sft_loader.next_step()
        return step_on([(x, y, mask.float()) for x, y, mask in micro_batches], n_targets,
                       stop=stop)
    # The engine samples with the trained model itself (its slots' KV cache is its own): every
    # optimizer step updates the weights it reads in place. vLLM beside a trainer holds a copy
    # and is sent the new weights after each step; in one process there is nothing to send.
    engine = serve.Engine(model, args.rollout_batch, max_queue=0, log=lambda *a, **k: None,
                          step_tokens=args.rollout_batch * 64)
    prompt_of = {}  # question -> render_prompt's tokens, rendered once

    def prompt(question):
        if question not in prompt_of:
            prompt_of[question] = chat.render_prompt([{"role": "user", "content": question}])
        return prompt_of[question]
    heldout_prompts = [prompt(q) for q, _ in heldout]
    measure = functools.partial(evaluate, engine, heldout, heldout_prompts, args.k, args)

    # The cold start (not on a resume: the checkpoint holds its result).
    cold_seconds = (cold_start(sft, optimizer, args) if checkpoint is None and args.sft_steps
                    else None)
    before = checkpoint["before"] if checkpoint else dict(zip(("pass1", "passk"), measure()))
    gpt2.print0(f"held-out before {args.method.upper()}: pass@1 {before['pass1']:.3f}, "
                f"pass@{args.k} {before['passk']:.3f} (temperature {args.temperature})")

    model.train()
    log = common.Log(args.out_dir / "log.jsonl", keep_before=start_step, write=master)
    save = (functools.partial(save_checkpoint, args, model, optimizer, scaler, sft_loader, before)
            if master else lambda step: None)
    timer, stopped = common.StepTimer(args.questions_per_step * args.group), None
    per_rank = args.questions_per_step // world_size
    with common.StopSignals() as signals:
        for step in range(start_step, end_step + 1):
            last = step == end_step
            if step > start_step and (last or args.checkpoint_every and
                                      step % args.checkpoint_every == 0):
                save(step)
            if (last or args.eval_every and step % args.eval_every == 0) and step > 0:
                pass1, passk = measure()
                log({"step": step, "heldout_pass1": pass1, "heldout_passk": passk})
                common.print_step(step, f"held-out pass@1 {pass1:.3f}",
                                  f"pass@{args.k} {passk:.3f}")
            if last:
                break

            timer.start()
            lr = args.sft_lr if args.method == "sft" else gpt2.learning_rate(
                step, args.lr, args.warmup_steps, args.max_steps, args.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            stop = signals.received is not None
            if args.method == "sft":  # the comparison: the same loop, chat.py's step instead
                loss, norm, stop = sft(stop=stop)
                record = {"loss": loss}  # printed: the supervised loss means something
            else:
                first = step * args.questions_per_step + rank * per_rank  # this rank's share
                batch = [questions[i % len(questions)] for i in range(first, first + per_rank)]
                loss, norm, stop, record = rl_step(step_on, engine, batch,
                                                   [prompt(q) for q, _ in batch], first, stop,
                                                   args, device)
            if not math.isfinite(loss):
                gpt2.stop_on_bad_loss(loss, step, args.out_dir / "checkpoint.pt", log)
            timing = timer.stop(step)
            log({"step": step, **record, "loss": loss, "lr": lr, "grad_norm": norm,
                 "ms": timing["ms"]})
            common.print_step(step, *(f"{key} {value:.3f}" for key, value in record.items()
                                      if key != "pass1"), f"lr {lr:.2e}",
                              f"{timing['ms']:.0f} ms")
            if stop:
                stopped = gpt2.stop_and_save(signals, save, step + 1, args.out_dir)
                break
    log.close()
    steps_done = start_step + len(timer.rates)
    stopped = stopped or gpt2.paused(args, steps_done)
    evals = [r for r in log.records if "heldout_pass1" in r]
    final = evals[-1] if evals and evals[-1]["step"] == args.max_steps else None
    metrics = {"stage": STAGE, "method": args.method, "preset": args.preset,
               "init_from": str(args.init_from), "data": str(args.data), "stopped": stopped,
               "steps_done": steps_done, "world_size": world_size, "device": str(device),
               "dtype": str(dtype)[6:], "seconds": timer.seconds(),
               "train_seconds": round(timer.total, 1), "cold_start_seconds": cold_seconds,
               "k": args.k,
               "temperature": args.temperature,
               "heldout_pass1_before": before["pass1"], "heldout_passk_before": before["passk"],
               "heldout_pass1": final and final["heldout_pass1"],
               "heldout_passk": final and final["heldout_passk"]}
    gpt2.print0(f"{steps_done} steps in {metrics['seconds']} s ({metrics['train_seconds']} s of "
                "training steps)" + (f"; held-out pass@1 {before['pass1']:.3f} -> "
                                     f"{final['heldout_pass1']:.3f}, pass@{args.k} "
                                     f"{before['passk']:.3f} -> {final['heldout_passk']:.3f}"
                                     if final else "") + f"; outputs in {args.out_dir}")
    if master:
        metrics["figure"] = draw_figure(args.out_dir / "rl.png", log.records, before, args)
        common.write_json(args.out_dir / "metrics.json", metrics)
    gpt2.end_ranks()
    return metrics


# --- plumbing: the model, the data, checkpoints, the figure

def start_from(args):
    """(resume checkpoint or None, model on the CPU in training mode): a chat model only."""
    if args.resume is not None:
        checkpoint = common.load_checkpoint(args.resume or args.out_dir / "checkpoint.pt", STAGE,
                                            "cannot resume; drop --resume to start afresh",
                                            needs=("config", "model", "step", "rng"))
        return checkpoint, chat.model_from_checkpoint(checkpoint, args.resume).train()
    fix = ("rl.py starts from a chat model: fine-tune one with `python chat.py` (it writes "
           "out/chat/checkpoint.pt) or pass --init-from with a chat.py or rl.py checkpoint")
    model, chat_format = chat.load_chat_model(args.init_from, fix=fix)
    if chat_format is None:
        die(f"--init-from {args.init_from} is not a chat model (a checkpoint written by "
            "chat.py); fine-tune it with chat.py first")
    chat.check_format(args.init_from, chat_format)  # a chat model in another format
    return None, model.train()


def read_rows(args):
    """(question, answer) rows of --data: the bundled task, a .jsonl of {"question", "answer"}
    rows (GSM8K's layout: the answer's final value after "####"), or a hub dataset."""
    if str(args.data) == "tasks":
        return task_rows(args.seed, args.task_n + args.sft_examples + args.train_questions)
    path = Path(args.data)
    if path.suffix == ".jsonl" or path.exists() or str(args.data).count("/") != 1:
        if not path.is_file():
            die(f"--data {path} {'is not a file' if path.exists() else 'does not exist'}; pass "
                "tasks, a .jsonl of question/answer rows or a hub dataset name")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            die(f"cannot read --data {path} as UTF-8 text ({type(err).__name__}); fix the file")
        raw = []
        for number, line in enumerate(lines, 1):
            if line.strip():
                try:
                    raw.append((f"{path} row {number}", json.loads(line)))
                except json.JSONDecodeError as err:
                    die(f"{path} row {number} is not valid JSON ({err.msg}); fix or remove it")
    else:
        offline = fineweb.hub_offline()  # unreachable: datasets reads its cache, no retries
        try:
            import datasets
            config = args.config or ("main" if str(args.data) == GSM8K else None)
            hub = datasets.load_dataset(str(args.data), config, split=args.split)
        except ImportError:
            die(f"--data {args.data} needs the datasets package (pip install datasets)")
        except Exception as err:  # datasets raises many kinds: offline, not found, bad split
            if offline:
                die(f"cannot load --data {args.data}: the Hugging Face hub cannot be reached "
                    f"({offline}) and this machine's cache has no copy; connect once (the "
                    "download is kept) or pass a .jsonl")
            die(f"cannot load --data {args.data} split {args.split} through datasets "
                f"({type(err).__name__}); check the name, --config and --split, or pass a .jsonl")
        raw = [(f"{args.data} row {i + 1}", row) for i, row in enumerate(hub)]
    rows = []
    for where, row in raw:
        if not (isinstance(row, dict) and isinstance(row.get("question"), str)
                and isinstance(row.get("answer"), str) and row["question"].strip()):
            die(f"{where} is not an object with a question and an answer (strings); fix it")
        rows.append((row["question"], row["answer"]))
    return rows


def open_data(args, rows, block_size):
    """(labelled examples for the cold start, RL questions as (question, final answer), held-out
    ones) of read_rows' rows: --task-n held out first, then --sft-examples labelled, the rest RL
    questions."""
    if str(args.data) != "tasks":
        random.Random(args.seed).shuffle(rows)
    need = args.task_n + args.sft_examples + 1
    if len(rows) < need:
        die(f"--data {args.data} holds {len(rows)} rows; --task-n {args.task_n} held out, "
            f"--sft-examples {args.sft_examples} and at least one RL question need {need}")
    finals = []
    for question, answer in rows:
        final = answer.rsplit("####", 1)[-1].strip()  # GSM8K's "... #### 72"; a word is itself
        if not final:
            die(f"--data {args.data}: the answer to {question[:40]!r} has no final value after "
                "####; fix that row")
        finals.append((question, final))
    # A labelled reply is the answer's text, GSM8K's calculator notes <<...>> dropped.
    labelled = [[{"role": "user", "content": q},
                 {"role": "assistant", "content": re.sub(r"<<[^>]*>>", "", a)}]
                for q, a in rows[args.task_n:args.task_n + args.sft_examples]]
    examples, _, _ = chat.fit_to_context(labelled, block_size)
    room = block_size - args.max_new_tokens
    if room < len(chat.render_prompt([{"role": "user", "content": "?"}])):  # the shortest question
        die(f"--max-new-tokens {args.max_new_tokens} leaves {max(room, 0)} of the model's context "
            f"of {block_size} tokens for a question; lower it")
    fits = [(q, a) for q, a in finals if len(chat.render_prompt(
        [{"role": "user", "content": q}])) <= room]
    if len(fits) < len(finals):
        gpt2.print0(f"note: {len(finals) - len(fits)} questions leave less than --max-new-tokens "
                    f"{args.max_new_tokens} of the context of {block_size}: left out")
    heldout = [r for r in finals[:args.task_n] if r in fits]
    questions = [r for r in finals[args.task_n + args.sft_examples:] if r in fits]
    if not questions or not heldout or (args.sft_examples and not examples):
        die(f"--data {args.data} leaves no question that fits the context of {block_size} "
            "tokens with --max-new-tokens; use shorter questions")
    return examples, questions, heldout


def save_checkpoint(args, model, optimizer, scaler, loader, before, step):
    checkpoint = {
        "stage": STAGE, "chat_format": chat.FORMAT, "model": model.state_dict(),
        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "step": step,
        "max_steps": args.max_steps, "config": vars(model.config), "loader": loader.state_dict(),
        "rng": gpt2.rng_state(), "before": before,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    common.write_atomic(args.out_dir / "checkpoint.pt", lambda tmp: torch.save(checkpoint, tmp))


def draw_figure(path, records, before, args):
    """The training reward (the share of right replies) and held-out pass@1 and pass@k against
    step, the values before the first step as dashed lines."""
    plt = common.pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, label, style in (("reward", "training reward (batch pass@1)", dict(lw=0.6)),
                              ("heldout_pass1", "held-out pass@1", dict(marker="o")),
                              ("heldout_passk", f"held-out pass@{args.k}", dict(marker="s"))):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points and key != "reward":  # held-out values start from the ones before RL
            points = [(0, before[key.replace("heldout_", "")])] + points
        if points:
            ax.plot(*zip(*points), label=label, **style)
    ax.axhline(before["pass1"], ls="--", c="gray", lw=0.8, label="pass@1 before")
    ax.axhline(before["passk"], ls=":", c="gray", lw=0.8, label=f"pass@{args.k} before")
    ax.set(xlabel="step", ylabel="share right", ylim=(0, 1.02),
           title=f"rl.py --method {args.method} --preset {args.preset} on {args.data}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return common.save_figure(fig, path)


# --- command line

GSM8K = "openai/gsm8k"  # its configuration "main" has the worked solutions, "socratic" others
PRESETS = {
    # chat.py's cpu checkpoint on the bundled task: a cold start, then RL; minutes on 2 cores.
    "cpu": dict(init_from="out/chat/checkpoint.pt", data="tasks", sft_examples=300,
                sft_steps=40, sft_lr=1e-3, train_questions=5000, task_n=100,
                questions_per_step=8, group=8, batch_size=32, max_steps=200, lr=5e-4,
                warmup_steps=10, max_new_tokens=8, rollout_batch=64, eval_every=50,
                checkpoint_every=0),
    # chat.py's gpt2 checkpoint on GSM8K (openai/gsm8k, config main), rewarded for the final
    # number: a cold start on 1,000 worked solutions, then RL on the remaining questions.
    "gpt2": dict(init_from="out/chat/checkpoint.pt", data=GSM8K, sft_examples=1000,
                 sft_steps=200, sft_lr=2e-5, train_questions=0, task_n=400,
                 questions_per_step=16, group=16, batch_size=16, max_steps=500, lr=1e-5,
                 warmup_steps=10, max_new_tokens=256, rollout_batch=128, eval_every=50,
                 checkpoint_every=50),
}


def parse_args(argv=None):
    parser = common.make_parser(STAGE, "Reinforcement learning from a verifier (GRPO-style) on a "
                                "chat model, rollouts through serve.py's engine.", None,
                                "tasks (the bundled task), a .jsonl of {\"question\", "
                                "\"answer\"} rows or a hub dataset name "
                                + common.by_preset(PRESETS, "data"), seed=1337)
    preset = functools.partial(common.by_preset, PRESETS)
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu",
                        help="defaults: cpu (chat.py's cpu checkpoint, the bundled task) or gpt2 "
                        "(chat.py's gpt2 checkpoint, GSM8K; a GPU) (default: cpu)")
    parser.add_argument("--init-from", help="the chat model to train: a chat.py (or rl.py) "
                        "checkpoint " + preset("init_from"))
    parser.add_argument("--method", choices=("rl", "sft"), default="rl",
                        help="rl, or sft: the comparison, more supervised steps on the labelled "
                        "examples in the same loop (default: rl)")
    train = parser.add_argument_group("training")
    train.add_argument("--max-steps", type=int, help="RL steps " + preset("max_steps"))
    train.add_argument("--questions-per-step", type=int,
                       help="questions per step, over ranks (P) " + preset("questions_per_step"))
    train.add_argument("--group", type=int, help="replies sampled per question (G) "
                       + preset("group"))
    train.add_argument("--batch-size", type=int, help="sequences per micro-batch of the "
                       "gradient step, and of the cold start's steps " + preset("batch_size"))
    train.add_argument("--lr", type=float, help="peak learning rate of RL " + preset("lr"))
    train.add_argument("--warmup-steps", type=int, help="steps of linear warmup to --lr "
                       + preset("warmup_steps"))
    train.add_argument("--min-lr-ratio", type=float, default=0.1,
                       help="the cosine ends at lr x this (default: %(default)s)")
    train.add_argument("--divide-std", action="store_true",
                       help="divide advantages by their group's standard deviation (GRPO)")
    train.add_argument("--grad-clip", type=float, default=1.0,
                       help="clip the gradient's global norm to this (0: off; default: 1.0)")
    train.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of "
                       "rollouts and held-out pass@k (default: %(default)s)")
    train.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (0: "
                       "all, the policy's own distribution; default: %(default)s)")
    train.add_argument("--max-new-tokens", type=int, help="longest reply; a longer one is cut "
                       "and scores 0 " + preset("max_new_tokens"))
    train.add_argument("--rollout-batch", type=int, help="the engine's slots (replies sampled "
                       "at once) " + preset("rollout_batch"))
    train.add_argument("--eval-every", type=int, help="steps between held-out pass@1/pass@k, 0: "
                       "only at the end " + preset("eval_every"))
    train.add_argument("--checkpoint-every", type=int, help="steps between checkpoints, 0: only "
                       "at the end " + preset("checkpoint_every"))
    train.add_argument("--stop-step", type=int, help="stop (and save) after this step; --resume "
                       "goes on")
    train.add_argument("--resume", nargs="?", const="", metavar="CHECKPOINT",
                       help="continue from a checkpoint (default: <out-dir>/checkpoint.pt)")
    train.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                       default="auto", help="autocast dtype of the gradient step; auto: "
                       "bfloat16 on GPUs that have it, float32 elsewhere")
    data = parser.add_argument_group("data and the cold start")
    data.add_argument("--k", type=int, default=8,
                      help="held-out replies per question for pass@k (default: %(default)s)")
    data.add_argument("--task-n", type=int, help="held-out questions " + preset("task_n"))
    data.add_argument("--sft-examples", type=int, help="labelled examples of the cold start "
                      + preset("sft_examples"))
    data.add_argument("--sft-steps", type=int, help="supervised steps before RL (0: none) "
                      + preset("sft_steps"))
    data.add_argument("--sft-lr", type=float, help="learning rate of the cold start and of "
                      "--method sft " + preset("sft_lr"))
    data.add_argument("--train-questions", type=int, help="bundled task: RL questions "
                      + preset("train_questions"))
    data.add_argument("--config", help=f"hub dataset: its configuration (default: main for "
                      f"{GSM8K}, none for others)")
    data.add_argument("--split", default="train", help="hub dataset: the split (default: "
                      "%(default)s)")
    args = common.use_preset(parser.parse_args(argv), PRESETS)
    common.check_args(args, positive=("max_steps", "questions_per_step", "group", "batch_size",
                                      "lr", "sft_lr", "max_new_tokens", "rollout_batch", "k",
                                      "task_n"),
                      non_negative=("warmup_steps", "eval_every", "checkpoint_every", "top_k",
                                    "stop_step", "sft_examples", "sft_steps", "train_questions"),
                      ranges=(("lr", 0, 10), ("sft_lr", 0, 10), ("min_lr_ratio", 0, 1),
                              ("grad_clip", 0, math.inf), ("temperature", 0, 100)))
    if args.sft_steps and not args.sft_examples:
        die("--sft-steps needs labelled examples; give --sft-examples or --sft-steps 0")
    if args.group < 2 and args.method == "rl":
        die("--group must be at least 2: the advantage compares replies within a group")
    if args.method == "rl" and (args.temperature == 0 or args.top_k == 1):
        die(f"--{'temperature 0' if args.temperature == 0 else 'top-k 1'} gives every reply of "
            "a group the same tokens, so every advantage is 0 and nothing is learned; sample "
            "(--temperature above 0, --top-k 0 or above 1)")
    if args.method == "sft" and not args.sft_examples:
        die("--method sft trains on labelled examples; give --sft-examples")
    return args


if __name__ == "__main__":
    main(parse_args())
