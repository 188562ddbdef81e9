"""What both sides of the throughput benchmark share: presets, the random-init model and its word
tokenizer, the synthetic preference pairs, and the FLOP, peak-rate and memory arithmetic.

Nothing here downloads: models are built from a transformers config with the public models' shapes
and initialised from one seed; every contender loads the same state dict (deep copies, CPU-held).
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

import numpy as np
import torch

from pipelines.world import toy_models

SPECIALS = len(toy_models.SPECIAL_TOKENS)  # <pad>=0, <unk>=1, <bos>=2, <eos>=3; words start here
GIB = float(1 << 30)
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


# [1] Presets ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogNormal:
    """Token counts exp(N(ln median, sigma^2)), rounded, clipped to [low, high]."""

    median: float  # tokens; the distribution's median exp(mu)
    sigma: float  # shape (std of the log); mean = median * exp(sigma^2 / 2)
    low: int  # tokens; shortest allowed

    def sample(self, rng: np.random.Generator, n: int, high: np.ndarray | int) -> np.ndarray:
        draws = np.rint(rng.lognormal(np.log(self.median), self.sigma, size=n)).astype(np.int64)
        return np.clip(draws, self.low, high)


# Anthropic HH-like lengths.  ASSUMED, not fitted: no HH token-length statistics were at hand when
# this was written (no network).  The parameters give a mean prompt of 96 e^{0.405} = 144 tokens
# (multi-turn context, long right tail) and a mean response of 64 e^{0.32} = 88 tokens, the rough
# scale of HH under Llama-family tokenizers.  Prompts are clipped to max_length / 2 and responses to
# max_length - prompt (DPO recipes' max_prompt_length = max_length / 2), so TRL's truncation is a
# no-op and both sides see identical tokens.  The run prints the realised means and padding share.
HH_PROMPT = LogNormal(median=96.0, sigma=0.9, low=8)
HH_RESPONSE = LogNormal(median=64.0, sigma=0.8, low=4)


@dataclass(frozen=True)
class Preset:
    """A model shape, a length distribution and the step layout of one benchmark configuration."""

    name: str
    architecture: str  # transformers model_type: "qwen2" | "llama"
    model: Mapping[str, Any]  # config kwargs: the public model's shape
    max_length: int  # tokens per row (prompt + response), TRL's max_length
    prompt: LogNormal
    response: LogNormal
    batch_size: int  # global pairs per optimizer step (both sides)
    micro_batch_size: int  # pairs per forward (TRL per_device_train_batch_size)
    warmup: int  # optimizer steps per contender before timing
    steps: int  # timed optimizer steps per contender
    lr: float = 1e-6  # both sides' peak LR (1e-6 is TRL's and our default); no effect on speed
    notes: str = ""


PRESETS: dict[str, Preset] = {
    # Qwen2.5-0.5B (config.json of Qwen/Qwen2.5-0.5B): 494.0M parameters with tied embeddings.
    "qwen0.5b": Preset(
        name="qwen0.5b", architecture="qwen2",
        model=dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                   num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                   max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6),
        max_length=1024, prompt=HH_PROMPT, response=HH_RESPONSE, batch_size=8, micro_batch_size=8,
        warmup=3, steps=12,
    ),
    # Llama-3.2-1B (config.json of meta-llama/Llama-3.2-1B): 1235.8M parameters, tied embeddings.
    "llama1b": Preset(
        name="llama1b", architecture="llama",
        model=dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                   max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500_000.0,
                   rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
        max_length=1024, prompt=HH_PROMPT, response=HH_RESPONSE, batch_size=8, micro_batch_size=8,
        warmup=3, steps=12,
    ),
    # A real-model shape that a 2-core CPU trains in seconds per step (issue 11): untied LM head of
    # 32000 x 512 = 16.4M of 55.0M parameters (30%, as in small public models), 8 layers, GQA 8/2,
    # HH-like lengths scaled by 1/4 to max_length 256, micro-batches of 4 pairs.
    "small": Preset(
        name="small", architecture="llama",
        model=dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                   num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False,
                   max_position_embeddings=1024, rms_norm_eps=1e-5),
        max_length=256, prompt=LogNormal(median=24.0, sigma=0.9, low=2),
        response=LogNormal(median=16.0, sigma=0.8, low=1), batch_size=8, micro_batch_size=4,
        warmup=1, steps=4, notes="CPU target of issue 11 (ratios in one run)", lr=1e-5,
    ),
    # CPU smoke size: the same code paths at a size that runs in seconds (lengths scaled by 1/4).
    # Two micro-batches per step, so both sides' gradient accumulation is exercised.
    "tiny": Preset(
        name="tiny", architecture="llama",
        model=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                   max_position_embeddings=256),
        max_length=128, prompt=LogNormal(median=24.0, sigma=0.9, low=4),
        response=LogNormal(median=16.0, sigma=0.8, low=2), batch_size=8, micro_batch_size=4,
        warmup=2, steps=6, notes="CPU smoke size, not a target configuration",
        # Large enough that step 0's AdamW update moves step 1's margins (~2e-2) far above the fp32
        # rounding of the summed log-probs (~1e-5 x beta), so the two sides' step-1 metrics compare
        # their step-0 gradients and updates, not rounding noise.
        lr=1e-2,
    ),
}


# [2] Tokenizer, model, data ------------------------------------------------------------------------


def build_tokenizer(vocab_size: int):
    """Word-level tokenizer with exactly `vocab_size` ids: the 4 specials, then words t0, t1, ...

    A random-init model gives every id the same standing, so a word vocabulary of the preset's size
    stands in for the real BPE tokenizer (the cost of a step depends on ids only through V).
    """
    return toy_models.build_word_tokenizer([f"t{i}" for i in range(vocab_size - SPECIALS)])


def build_model_config(preset: Preset, tokenizer):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        preset.architecture, **preset.model, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )


def build_base_state(config, *, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The one random initialisation every contender starts from (CPU copies of the state dict)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    del model
    return state


def instantiate_model(config, state: Mapping[str, torch.Tensor], *, device: torch.device, attn_implementation: str):
    """A fresh fp32 model on `device` holding `state` (what `from_pretrained(path)` gives the worker)."""
    import copy

    from transformers import AutoModelForCausalLM

    # A copy per model: from_config writes the attention kernel into the config it is given, and a
    # shared config would switch an eager (wdpo) model built earlier to the next model's sdpa.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=torch.float32,
                                                 attn_implementation=attn_implementation)
    model.load_state_dict(state, strict=True)
    return model


@dataclass(frozen=True)
class PreferencePairs:
    """Synthetic pairs: token ids per pair (each response ends with <eos>) and DoRA's calibration."""

    prompts: list[np.ndarray]
    chosen: list[np.ndarray]
    rejected: list[np.ndarray]
    calibration: np.ndarray  # (n,) h~ >= 0, only read by dora
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. precomputed reference columns

    def __len__(self) -> int:
        return len(self.prompts)

    def rows(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows [start, stop) as a Ray Data numpy batch of the dataset contract (pipelines/schema.py)."""

        def column(values):
            out = np.empty(stop - start, dtype=object)
            out[:] = values[start:stop]
            return out

        rows = {
            "prompt_input_ids": column(self.prompts),
            "chosen_input_ids": column(self.chosen),
            "rejected_input_ids": column(self.rejected),
            "calibration": self.calibration[start:stop].copy(),
        }
        rows.update({k: v[start:stop].copy() for k, v in self.extra.items()})
        return rows

    def row_lengths(self, start: int, stop: int) -> np.ndarray:
        """(2B,) non-pad lengths of the concatenated rows: chosen rows, then rejected rows."""
        prompts = [len(p) for p in self.prompts[start:stop]]
        chosen = [p + len(c) for p, c in zip(prompts, self.chosen[start:stop])]
        rejected = [p + len(r) for p, r in zip(prompts, self.rejected[start:stop])]
        return np.asarray(chosen + rejected, dtype=np.int64)

    def texts(self, tokenizer) -> dict[str, list[str]]:
        """prompt / chosen / rejected strings that `tokenizer` maps back to exactly these ids.

        Responses start with a space (prompt + response is split on whitespace) and end with the
        <eos> word, so TRL neither merges tokens across the boundary nor appends another <eos>.
        """

        def words(ids):
            return " ".join(tokenizer.convert_ids_to_tokens([int(i) for i in ids]))

        return {
            "prompt": [words(p) for p in self.prompts],
            "chosen": [" " + words(c) for c in self.chosen],
            "rejected": [" " + words(r) for r in self.rejected],
        }


def generate_pairs(preset: Preset, n: int, *, vocab_size: int, eos_token_id: int, seed: int) -> PreferencePairs:
    """`n` pairs with log-normal prompt and response lengths (chosen and rejected drawn independently)."""
    rng = np.random.default_rng(seed)
    prompt_lengths = preset.prompt.sample(rng, n, preset.max_length // 2)
    room = preset.max_length - prompt_lengths

    def ids(length: int, end: bool) -> np.ndarray:
        out = rng.integers(SPECIALS, vocab_size, size=int(length), dtype=np.int64)
        if end:
            out[-1] = eos_token_id
        return out

    chosen_lengths = preset.response.sample(rng, n, room)
    rejected_lengths = preset.response.sample(rng, n, room)
    return PreferencePairs(
        prompts=[ids(k, False) for k in prompt_lengths],
        chosen=[ids(k, True) for k in chosen_lengths],
        rejected=[ids(k, True) for k in rejected_lengths],
        calibration=rng.uniform(0.5, 1.5, size=n),
    )


def describe_pairs(pairs: PreferencePairs, batch_size: int) -> dict[str, float]:
    """Realised length statistics and the padding share of right-padded global batches."""
    steps = len(pairs) // batch_size
    padded = useful = 0
    for s in range(steps):
        lengths = pairs.row_lengths(s * batch_size, (s + 1) * batch_size)
        useful += int(lengths.sum())
        padded += int(lengths.max()) * len(lengths)
    return {
        "pairs": len(pairs),
        "mean_prompt_tokens": float(np.mean([len(p) for p in pairs.prompts])),
        "mean_response_tokens": float(np.mean([len(c) for c in pairs.chosen + pairs.rejected])),
        "max_row_tokens": int(max(pairs.row_lengths(0, len(pairs)))),
        "padding_fraction": 1.0 - useful / padded if padded else float("nan"),
    }


# [3] FLOPs, peak rate, memory ------------------------------------------------------------------------


@dataclass(frozen=True)
class FlopModel:
    """Matmul FLOPs of one forward of a decoder-only LM (model FLOPs: no recompute, no elementwise).

    forward(L) = 2 (body + head) L + 2 layers A L (L + 1), where body = weights of the decoder's
    linear layers, head = V d (the LM head, counted at every position), A = query heads x head_dim;
    the second term is causal attention: QK^T and AV each take A L (L + 1) / 2 multiply-adds.
    """

    body: int  # decoder linear-layer weights
    head: int  # LM head weights V x d
    layers: int
    attention_width: int  # query heads x head_dim

    def forward_flops(self, lengths: Iterable[int]) -> float:
        lengths = np.asarray(list(lengths), dtype=np.float64)
        linear = 2.0 * (self.body + self.head) * lengths
        attention = 2.0 * self.layers * self.attention_width * lengths * (lengths + 1.0)
        return float(np.sum(linear + attention))

    def step_flops(self, lengths: Iterable[int], *, live_reference: bool) -> float:
        """Policy forward + backward (3 forwards' worth) plus the reference forward when live."""
        return (3.0 + (1.0 if live_reference else 0.0)) * self.forward_flops(lengths)


def flop_model_of(model) -> FlopModel:
    """Count the weights of `model`'s nn.Linear layers (the LM head separately)."""
    head_module = model.get_output_embeddings()
    body = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head_module)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return FlopModel(body=int(body), head=int(head_module.weight.numel()), layers=int(config.num_hidden_layers),
                     attention_width=int(config.num_attention_heads * head_dim))


def measure_matmul_peak(device: torch.device, n: int = 8192, iters: int = 20, repeats: int = 5) -> Optional[dict]:
    """bf16 (n x n) @ (n x n) rate on `device`, timed with CUDA events; None off CUDA.

    Returns {"max_tflops", "median_tflops"} over `repeats` timings of `iters` products each; MFU
    is taken against the max (the best the device showed in this process).
    """
    if device.type != "cuda":
        return None
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=generator)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=generator)
    c = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        torch.mm(a, b, out=c)
    rates = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            torch.mm(a, b, out=c)
        end.record()
        end.synchronize()
        rates.append(2.0 * n**3 * iters / (start.elapsed_time(end) / 1e3) / 1e12)
    del a, b, c
    torch.cuda.empty_cache()
    return {"max_tflops": max(rates), "median_tflops": float(np.median(rates)), "n": n}


def storage_bytes(tensors: Iterable[Optional[torch.Tensor]]) -> int:
    """Bytes of the distinct CUDA storages behind `tensors` (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor) or t.device.type != "cuda":
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE_SIZE


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc malloc_trim), so RSS is close to live memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RssPeak:
    """The process's peak RSS between start() and stop(), sampled every `interval` seconds by a thread."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self.peak = current_rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, current_rss_bytes())

    def stop(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, current_rss_bytes())
        return self.peak


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Meter:
    """Wall time and own peak memory of one step.

    GPU: own peak = resident (this contender's weights, grads, optimizer state, reference) at step
    start + (torch.cuda.max_memory_allocated during the step - memory allocated at step start), i.e.
    the peak it would reach alone, with the other contenders' resident memory taken out.
    CPU: the same form from the process's RSS: resident + (peak RSS during the step, sampled every
    2 ms - RSS at step start), with freed heap pages handed back to the OS before each step
    (release_free_memory) so RSS tracks live memory.  An approximation (a sampled peak, allocator
    slack), unlike CUDA's exact allocator counters, but per contender.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.started = 0.0
        self.base = 0
        self.resident = 0

    def begin(self, resident_bytes: int = 0) -> None:
        synchronize(self.device)
        self.resident = resident_bytes
        if self.device.type == "cuda":
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            release_free_memory()
            self.base = current_rss_bytes()
            self.rss = RssPeak()
            self.rss.start()
        self.started = time.perf_counter()

    def end(self) -> tuple[float, int]:
        synchronize(self.device)
        seconds = time.perf_counter() - self.started
        if self.device.type == "cuda":
            return seconds, self.resident + torch.cuda.max_memory_allocated(self.device) - self.base
        return seconds, self.resident + max(0, self.rss.stop() - self.base)


def describe_environment(device: torch.device) -> dict[str, Any]:
    import importlib.metadata as md

    def version(name: str) -> Optional[str]:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        **{name: version(name) for name in ("torch", "transformers", "trl", "accelerate", "datasets", "peft")},
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=props.total_memory / GIB, cuda=torch.version.cuda)
    return env
