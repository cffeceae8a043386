#!/usr/bin/env python3
"""TRL's `RLOOTrainer` on the run of an r2m RL config: the counterpart of `r2m bench rl-step`.

Same policy weights (an f32 HF dir that `r2m export` wrote from the GGUF), same reward-model
architecture, same HH prompts and the same sizes as the TOML (`--config`, `--set KEY=VALUE` as in
r2m): K = `rollout.samples_per_prompt` (`num_generations`), `prompts_per_step * K` rows generated per
RL step in one batch, `optim.micro_batch_size` rows per forward/backward, `mini_batch_size` rows per
optimizer step, `optim.epochs` passes (`num_iterations`), `max_new_tokens` new tokens with EOS
banned before that (`min_new_tokens`, as `r2m bench rl-step`), temperature, beta = `algo.kl_coef`,
constant lr, `model.trainable = "top:N"` (only the top N blocks and the final norm train), f32,
no gradient checkpointing, no vLLM. One RL step = prompts_per_step * K * epochs / mini_batch_size
optimizer steps of TRL.

  # once: the policy as an HF dir (r2m's own GGUF dequantization) and an untrained RM
  target/release/r2m export --device cpu --model smollm2 --out runs/bench-rl-step/policy-smollm2
  python3 scripts/reference/trl_rloo_step.py --make-rm runs/bench-rl-step/rm-random-smollm2 \
      --policy runs/bench-rl-step/policy-smollm2
  # 1 warm-up + 3 timed RL steps
  python3 scripts/reference/trl_rloo_step.py --config configs/r2m-smollm2-hh.toml \
      --policy runs/bench-rl-step/policy-smollm2 --rm runs/bench-rl-step/rm-random-smollm2

Prints a `step N: ...` line per RL step on stderr, a summary line, and as the last stdout line one
JSON object in the shape of `r2m bench rl-step`'s (means over the steps after the warm-up ones).
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import os
import sys
import time
import tomllib
import warnings
from pathlib import Path

# The TRL release this script was written against (its hooks are private methods of RLOOTrainer).
TRL_VERSION = "1.16.0"

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "r2m-smollm2-hh.toml"
DEFAULT_POLICY = REPO_ROOT / "runs" / "bench-rl-step" / "policy-smollm2"
DEFAULT_RM = REPO_ROOT / "runs" / "bench-rl-step" / "rm-random-smollm2"

# r2m's defaults (r2m-rl/src/config.rs) for keys a TOML may leave out.
R2M_DEFAULTS = {
    "model": {"policy": "smollm2", "trainable": "all"},
    "data": {"prompts": None, "max_prompt_len": 256, "skip_bad": True, "limit": None},
    "rollout": {"prompts_per_step": 8, "samples_per_prompt": 4, "max_new_tokens": 64,
                "min_new_tokens": 0, "temperature": 0.7, "top_k": None, "top_p": None,
                "generation_batch_size": 64},
    "reward": {"kind": "model", "model": None},
    "algo": {"advantage": "rloo", "kl_estimator": "k3", "kl_mode": None, "kl_coef": 0.01,
             "clip_eps": 0.2, "clip_eps_high": None, "loss_agg": "token-mean"},
    "optim": {"lr": 1e-6, "warmup_ratio": 0.0, "min_lr_ratio": 1.0, "weight_decay": 0.0,
              "max_grad_norm": 1.0, "epochs": 2, "mini_batch_size": 16, "micro_batch_size": 4},
    "run": {"seed": 0},
}

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"


# ----------------------------------------------------------------------------------------------
# config


def load_config(path: Path, sets: list[str]) -> dict:
    """The TOML with r2m's defaults filled in and `--set section.key=value` applied (the value is
    read as a TOML value, else taken as a string, as `r2m --set` does)."""
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    for s in sets:
        if "=" not in s:
            sys.exit(f"--set {s}: expected section.key=value")
        key, val = (x.strip() for x in s.split("=", 1))
        try:
            v = tomllib.loads(f"v = {val}")["v"]
        except tomllib.TOMLDecodeError:
            v = val
        *parents, last = key.split(".")
        t = raw
        for p in parents:
            t = t.setdefault(p, {})
            if not isinstance(t, dict):
                sys.exit(f"--set {s}: `{p}` is not a section")
        t[last] = v
    cfg = copy.deepcopy(R2M_DEFAULTS)
    for sec, vals in raw.items():
        if isinstance(vals, dict):
            cfg.setdefault(sec, {}).update(vals)
    return cfg


def top_blocks(trainable: str, num_layers: int) -> int:
    """How many top blocks train: `top:N` -> N, `all` -> every block."""
    if trainable == "all":
        return num_layers
    if trainable.startswith("top:"):
        n = int(trainable[4:])
        if not 0 < n <= num_layers:
            sys.exit(f"model.trainable = {trainable!r}: N must be in 1..{num_layers}")
        return n
    sys.exit(f"model.trainable = {trainable!r}: only `all` and `top:N` are supported here")


# ----------------------------------------------------------------------------------------------
# prompts: as r2m reads them (r2m-data/src/records.rs read_prompts, r2m-rl/src/prompt.rs)


def parse_hh_dialogue(text: str) -> list[dict]:
    """`"\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c"` -> user a, assistant b, user c."""
    msgs, rest = [], text
    while rest:
        if rest.startswith(HUMAN):
            role, body = "user", rest[len(HUMAN):]
        elif rest.startswith(ASSISTANT):
            role, body = "assistant", rest[len(ASSISTANT):]
        else:
            raise ValueError('conversation does not start with "\\n\\nHuman:"')
        ends = [i for i in (body.find(HUMAN), body.find(ASSISTANT)) if i >= 0]
        end = min(ends) if ends else len(body)
        msgs.append({"role": role, "content": body[:end].strip()})
        rest = body[end:]
    if not msgs or msgs[0]["role"] != "user":
        raise ValueError("conversation does not start with a human turn")
    return msgs


def split_hh(chosen: str, rejected: str) -> list[dict]:
    """The conversation before the last assistant turn that `chosen` and `rejected` share."""
    common = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b),
                  min(len(chosen), len(rejected)))
    cut = chosen[:common].rfind(ASSISTANT)
    if cut < 0:
        raise ValueError("no shared conversation ending in \\n\\nAssistant:")
    if not rejected[cut:].startswith(ASSISTANT):
        raise ValueError("chosen and rejected do not share the conversation before their last turn")
    return parse_hh_dialogue(chosen[:cut])


def messages_of(v) -> list[dict]:
    if isinstance(v, str):
        return [{"role": "user", "content": v}]
    return [{"role": m["role"], "content": m["content"]} for m in v]


def read_prompts(path: Path, skip_bad: bool, limit: int | None) -> list[list[dict]]:
    opener = gzip.open if path.suffix == ".gz" else open
    out, bad = [], 0
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                v = json.loads(line)
                if "prompt" in v:
                    msgs = messages_of(v["prompt"])
                    if all(not m["content"].strip() for m in msgs):
                        raise ValueError("empty prompt")
                else:
                    msgs = split_hh(v["chosen"], v["rejected"])
            except (ValueError, KeyError, TypeError) as e:
                if not skip_bad:
                    sys.exit(f"{path}:{n}: {e}")
                bad += 1
                continue
            out.append(msgs)
            if limit is not None and len(out) >= limit:
                break
    print(f"{path}: {len(out)} records read, {bad} bad lines skipped", file=sys.stderr)
    return out


def load_prompts(cfg: dict, tok) -> list[list[dict]]:
    """The conversations whose rendered prompt (chat template + generation prompt) fits
    `data.max_prompt_len` tokens."""
    d = cfg["data"]
    if not d.get("prompts"):
        sys.exit("data.prompts is required")
    path = Path(d["prompts"])
    if not path.is_absolute() and not path.exists():
        path = REPO_ROOT / path
    convs = read_prompts(path, d["skip_bad"], d["limit"])
    kept, too_long = [], 0
    for msgs in convs:
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        if len(tok(text, add_special_tokens=False)["input_ids"]) > d["max_prompt_len"]:
            too_long += 1
            continue
        kept.append(msgs)
    print(f"{len(kept)} prompts kept, {too_long} longer than data.max_prompt_len = "
          f"{d['max_prompt_len']} skipped", file=sys.stderr)
    if not kept:
        sys.exit("no prompt fits data.max_prompt_len")
    return kept


# ----------------------------------------------------------------------------------------------
# the reward model


def make_rm(policy: Path, out: Path, seed: int = 0) -> None:
    """An RM of the policy's architecture: its body, a seeded random `score` head (1 label), the
    pad token set, saved with the tokenizer (r2m loads it as `reward.model = OUT`)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(policy)
    rm = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1, dtype=torch.float32)
    rm.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out.mkdir(parents=True, exist_ok=True)
    rm.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"wrote {out} (score head seeded {seed}, untrained)", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# timing


def peak_rss_mib() -> float | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


class StepTimer:
    """Per-RL-step wall time and its phases. RL step g covers optimizer steps [g*S, (g+1)*S); the
    phase wrappers file their time under `global_step // S` (generation happens at the first
    micro-step of each RL step, before any optimizer step of it)."""

    PHASES = ("generate", "logprobs", "reward", "score_other")

    def __init__(self, opt_steps_per_rl_step: int, sync=None):
        self.S = opt_steps_per_rl_step
        self.sync = sync or (lambda: None)  # cuda: wait for the device before reading a clock
        self.trainer = None
        self.t_begin = None
        self.ends: list[float] = []  # wall time at the end of each optimizer step
        self.phase: dict[int, dict[str, float]] = {}
        self.info: dict[int, dict] = {}

    def group(self) -> int:
        return self.trainer.state.global_step // self.S

    def add(self, name: str, dt: float) -> None:
        g = self.phase.setdefault(self.group(), dict.fromkeys(self.PHASES, 0.0))
        g[name] += dt

    def install(self, trainer) -> None:
        """Wrap the RLOOTrainer methods that do each phase (TRL 1.16 rloo_trainer.py)."""
        self.trainer = trainer
        timer = self

        def wrap(name, phase, only_no_grad=False):
            orig = getattr(trainer, name)

            def wrapped(*a, **kw):
                import torch

                if only_no_grad and torch.is_grad_enabled():
                    return orig(*a, **kw)  # the policy forward of the loss: part of the update
                timer.sync()
                t = time.perf_counter()
                out = orig(*a, **kw)
                timer.sync()
                timer.add(phase, time.perf_counter() - t)
                if name == "_generate":
                    _, completion_ids, _ = out
                    lens = [len(c) for c in completion_ids]
                    timer.info.setdefault(timer.group(), {})["response_len"] = sum(lens) / max(len(lens), 1)
                return out

            setattr(trainer, name, wrapped)

        wrap("_generate", "generate")  # tokenize prompts + HF generate + decode
        wrap("_get_per_token_logps_and_entropies", "logprobs", only_no_grad=True)  # old + ref
        wrap("_calculate_rewards", "reward")  # chat template + RM tokenize + RM forward
        # The whole rollout scoring; what the three above leave is bookkeeping (padding, advantages).
        orig_score = trainer._generate_and_score_completions

        def score(*a, **kw):
            g0 = dict(self.phase.get(self.group(), dict.fromkeys(self.PHASES, 0.0)))
            t = time.perf_counter()
            out = orig_score(*a, **kw)
            dt = time.perf_counter() - t
            g1 = self.phase[self.group()]
            inner = sum(g1[p] - g0[p] for p in ("generate", "logprobs", "reward"))
            self.add("score_other", dt - inner)
            return out

        trainer._generate_and_score_completions = score

    def callback(self):
        from transformers import TrainerCallback

        timer = self

        class Cb(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                timer.sync()
                timer.t_begin = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                timer.sync()
                timer.ends.append(time.perf_counter())
                if len(timer.ends) % timer.S == 0:
                    timer.report(len(timer.ends) // timer.S - 1)

            def on_log(self, args, state, control, logs=None, **kw):
                if logs:
                    g = (state.global_step - 1) // timer.S
                    i = timer.info.setdefault(g, {})
                    for k in ("reward", "kl", "loss", "entropy"):
                        if k in logs:
                            i[k] = logs[k]

        return Cb()

    def step(self, g: int) -> dict:
        start = self.t_begin if g == 0 else self.ends[g * self.S - 1]
        total = self.ends[(g + 1) * self.S - 1] - start
        ph = self.phase.get(g, dict.fromkeys(self.PHASES, 0.0))
        update = total - sum(ph.values())
        return {"step": g + 1, "step_s": total, "generate_s": ph["generate"],
                "logprobs_s": ph["logprobs"], "reward_s": ph["reward"],
                "score_other_s": ph["score_other"], "update_s": update, **self.info.get(g, {})}

    def report(self, g: int) -> None:
        s = self.step(g)
        print(f"step {g + 1}: trl {s['step_s']:.1f}s (generate {s['generate_s']:.1f}, "
              f"log-probs {s['logprobs_s']:.1f}, reward {s['reward_s']:.2f}, "
              f"update {s['update_s']:.1f}, other {s['score_other_s']:.2f}) "
              f"len {s.get('response_len', float('nan')):.1f}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="r2m RL config (TOML)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, as `r2m --set` (repeatable)")
    ap.add_argument("--rl-steps", type=int, default=3, help="timed RL steps (after the warm-up ones)")
    ap.add_argument("--warmup-steps", type=int, default=1, help="untimed RL steps first")
    ap.add_argument("--policy", type=Path, default=DEFAULT_POLICY,
                    help="policy HF dir (`r2m export --device cpu --model smollm2 --out DIR`)")
    ap.add_argument("--rm", type=Path, default=DEFAULT_RM,
                    help="reward model HF dir (sequence classification, 1 label); see --make-rm")
    ap.add_argument("--make-rm", type=Path, default=None, metavar="OUT",
                    help="write an RM with the --policy body and a seeded random head to OUT and exit "
                         "(nothing is done when OUT/config.json exists)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="auto: cuda when available, else cpu")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"],
                    help="dtype of all three models (bf16: pure bf16 weights, no autocast)")
    ap.add_argument("--omp-wait-policy", default="passive", choices=["passive", "active", "env"],
                    help="OMP_WAIT_POLICY for torch's OpenMP threads. passive (default): on a machine whose "
                         "cores are shared with other work, spinning OpenMP threads made a 2-thread forward ~8x "
                         "slower than 1 thread; env: leave the environment as it is")
    ap.add_argument("--attn", default="sdpa", help="attn_implementation")
    ap.add_argument("--seed", type=int, default=None, help="default: run.seed of the config")
    a = ap.parse_args()

    # Before torch loads (OpenMP reads these at start).
    for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[v] = str(a.threads)
    if a.omp_wait_policy != "env":
        os.environ["OMP_WAIT_POLICY"] = a.omp_wait_policy.upper()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(a.threads)

    if a.make_rm is not None:
        if (a.make_rm / "config.json").exists():
            print(f"{a.make_rm} exists; kept", file=sys.stderr)
        else:
            make_rm(a.policy, a.make_rm)
        return

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renames (gradient_checkpointing)
    import transformers
    import trl
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                              AutoTokenizer, PrinterCallback)

    if trl.__version__ != TRL_VERSION:
        warnings.warn(f"trl {trl.__version__} installed, this script was written for {TRL_VERSION}: "
                      "the timing hooks wrap RLOOTrainer internals and may have moved")
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    for p, what in ((a.policy, "--policy"), (a.rm, "--rm")):
        if not (p / "config.json").exists():
            sys.exit(f"{what} {p}: no config.json (see --help for how to make it)")

    cuda = a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    cfg = load_config(a.config, a.set)
    ro, al, op = cfg["rollout"], cfg["algo"], cfg["optim"]
    n, K = ro["prompts_per_step"], ro["samples_per_prompt"]
    mini, micro, epochs = op["mini_batch_size"], op["micro_batch_size"], op["epochs"]
    rows = n * K
    if mini % micro or rows % micro or (rows * epochs) % mini:
        sys.exit(f"sizes: need micro_batch_size ({micro}) | mini_batch_size ({mini}), "
                 f"micro | prompts_per_step*K ({rows}) and mini | rows*epochs ({rows * epochs})")
    if mini % K:
        sys.exit(f"TRL needs the rows per optimizer step (mini_batch_size {mini}) to be a multiple of K ({K})")
    S = rows * epochs // mini  # optimizer steps per RL step
    steps = a.warmup_steps + a.rl_steps
    seed = cfg["run"]["seed"] if a.seed is None else a.seed
    if ro["min_new_tokens"] and ro["min_new_tokens"] != ro["max_new_tokens"]:
        print("note: rollout.min_new_tokens ignored: every response runs to max_new_tokens, as in "
              "`r2m bench rl-step`", file=sys.stderr)

    tok = AutoTokenizer.from_pretrained(a.policy, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    prompts = load_prompts(cfg, tok)
    dataset = Dataset.from_list([{"prompt": m} for m in prompts])

    policy = AutoModelForCausalLM.from_pretrained(a.policy, dtype=dtype, attn_implementation=a.attn)
    layers = policy.model.layers
    top = top_blocks(cfg["model"]["trainable"], len(layers))
    policy.requires_grad_(False)
    for blk in layers[len(layers) - top:]:
        blk.requires_grad_(True)
    policy.model.norm.requires_grad_(True)
    n_train = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    rm = AutoModelForSequenceClassification.from_pretrained(a.rm, dtype=dtype, attn_implementation=a.attn)
    rm_tok = AutoTokenizer.from_pretrained(a.rm)
    if rm.config.pad_token_id is None:
        rm.config.pad_token_id = rm_tok.pad_token_id

    out_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"trl-rloo-step-{os.getpid()}"
    args = RLOOConfig(
        output_dir=str(out_dir),
        use_cpu=not cuda,
        bf16=False, fp16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=mini // micro,
        generation_batch_size=rows,
        num_generations=K,
        num_iterations=epochs,
        max_completion_length=ro["max_new_tokens"],
        # EOS banned until max_new_tokens: every response runs to full length, as r2m bench rl-step.
        generation_kwargs={"min_new_tokens": ro["max_new_tokens"]},
        temperature=ro["temperature"],
        top_k=ro["top_k"] or 0,
        top_p=ro["top_p"] if ro["top_p"] is not None else 1.0,
        beta=al["kl_coef"],
        epsilon=al["clip_eps"],
        epsilon_high=al["clip_eps_high"],
        learning_rate=op["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=op["weight_decay"],
        max_grad_norm=op["max_grad_norm"],
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        optim="adamw_torch",
        max_steps=steps * S,
        logging_steps=S,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=seed,
        use_vllm=False,
    )
    timer = StepTimer(S, sync=torch.cuda.synchronize if cuda else None)
    trainer = RLOOTrainer(
        model=policy,
        reward_funcs=rm,
        args=args,
        train_dataset=dataset,
        processing_class=tok,
        reward_processing_classes=rm_tok,
        callbacks=[timer.callback()],
    )
    trainer.remove_callback(PrinterCallback)
    timer.install(trainer)
    opt_params = sum(p.numel() for g in trainer.create_optimizer().param_groups for p in g["params"])
    print(f"trl {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; trainable {cfg['model']['trainable']}: {n_train} params "
          f"({opt_params} in the optimizer); {n} prompts x {K} samples, {ro['max_new_tokens']} new tokens, "
          f"micro {micro}, mini {mini}, epochs {epochs}: {S} optimizer steps per RL step; "
          f"{a.warmup_steps} warm-up + {a.rl_steps} timed RL steps", file=sys.stderr, flush=True)

    load_before = os.getloadavg()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    trainer.train()
    cpu_util = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    load_after = os.getloadavg()

    per_step = [timer.step(g) for g in range(steps)]
    timed = per_step[a.warmup_steps:] or per_step
    keys = ("step_s", "generate_s", "logprobs_s", "reward_s", "update_s", "score_other_s")
    mean = {k: round(sum(s[k] for s in timed) / len(timed), 3) for k in keys}
    lens = [s["response_len"] for s in timed if "response_len" in s]
    mean["response_len"] = round(sum(lens) / len(lens), 2) if lens else None
    print(f"trl rl-step trainable={cfg['model']['trainable']} steps={len(timed)} (after "
          f"{a.warmup_steps} warm-up) rows={rows}: {mean['step_s']:.2f}s/step (generate "
          f"{mean['generate_s']:.2f}, log-probs {mean['logprobs_s']:.2f}, reward {mean['reward_s']:.2f}, "
          f"update {mean['update_s']:.2f}, other {mean['score_other_s']:.2f})")
    rnd = lambda d: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}  # noqa: E731
    print(json.dumps({
        "impl": "trl", "trl_version": trl.__version__, "transformers_version": transformers.__version__,
        "torch_version": torch.__version__, "backend": "cuda" if cuda else "cpu", "dtype": a.dtype,
        "threads": torch.get_num_threads(), "scenario": "rl-step",
        "trainable": cfg["model"]["trainable"], "lora": None,
        "methods": {"vanilla": mean},
        "mean_over": f"steps {a.warmup_steps + 1}..{steps} ({a.warmup_steps} warm-up step(s) excluded)",
        "warmup_steps": a.warmup_steps, "rl_steps": len(timed),
        "optimizer_steps_per_rl_step": S, "rows": rows,
        "steps": [rnd(s) for s in per_step],
        "peak_rss_mib": peak_rss_mib(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        # process CPU s per wall s during training (about --threads when the cores are not shared) and
        # the 1-minute load average before and after: a loaded machine shows here
        "cpu_util": round(cpu_util, 2),
        "loadavg_1m": [round(load_before[0], 2), round(load_after[0], 2)],
    }))


if __name__ == "__main__":
    main()
