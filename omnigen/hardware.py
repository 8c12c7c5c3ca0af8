"""Hardware profiles: the figures the cost model needs, stored as data files, overridable from the spec."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import SpecError
from .spec import Spec

GIB = 1024**3


@dataclass(frozen=True)
class Link:
    bandwidth_gbps: float   # GB/s per device, one direction
    latency_us: float

    @property
    def bytes_per_s(self) -> float:
        return self.bandwidth_gbps * 1e9

    @property
    def latency_s(self) -> float:
        return self.latency_us * 1e-6


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    peak_flops: dict[str, float]   # per device, by precision ("fp32", "bf16")
    matmul_efficiency: float | dict[str, float]  # achieved / peak on transformer blocks; one figure or per precision
    memory_gib: float
    intra_node: Link
    inter_node: Link
    overhead_gib: float            # memory a process holds before the model: runtime, allocator, comm buffers
    source: str
    # Terms that matter for small blocks and optimizer steps; zero leaves them out of the prediction.
    overlap: float = 0.8           # share of compute time FSDP prefetching can hide its collectives behind
    memory_bandwidth_gbps: float = 0.0  # device memory GB/s: the optimizer step is bandwidth-bound
    layer_overhead_us: float = 0.0  # host time per layer forward (backward counts twice) beyond its FLOPs
    step_overhead_ms: float = 0.0   # host time per micro-batch beyond the layers: data, embeddings, loss
    # Per latency hop of a collective beyond alpha-beta (a ring all-gather over n ranks takes n - 1 hops, an
    # all-reduce 2(n - 1), an all-to-all n - 1): what a training step's collectives cost beyond the micro-benchmark's,
    # waking each rank in turn and waiting for the slowest.
    collective_hop_overhead_us: float = 0.0
    fsdp_call_overhead_us: float = 0.0   # more per collective FSDP2 launches (per call): its hooks, copy-in and -out
    all_to_all_hop_overhead_us: float = 0.0  # per hop of the bare Ulysses and EP all-to-alls (instead of the above)
    # More per local expert of a MoE layer forward under EP (backward counts twice): the expert loop's slice, two
    # matmuls and activation per expert, with the layer's routing, permutation and split sizes spread over them
    local_expert_overhead_us: float = 0.0
    optimizer_tensor_us: float = 0.0     # per local parameter tensor: clipping and AdamW dispatch (DTensor ops)
    # Per micro-batch that runs the tower, beyond its layers: patch or feature embedding, position, window and chunk
    # indices, the merger (vision), the per-chunk loop (audio)
    vision_tower_overhead_ms: float = 0.0
    audio_tower_overhead_ms: float = 0.0
    # Within a node, per collective, where calibration measured each apart (gloo's reduce-scatter is slower than its
    # all-gather, its all-to-all goes pairwise, not around a ring); a missing one is priced on intra_node.
    all_gather: Link | None = None
    reduce_scatter: Link | None = None
    all_reduce: Link | None = None
    all_to_all: Link | None = None
    # Attention (SDPA forward + backward) where calibration measured it: achieved / peak on FLOPs counted with the
    # whole score matrix (as FlopCounterMode and MFU count them); None prices attention like the matmuls. A causal
    # kernel skips the key blocks above the diagonal: with causal_block-wide blocks it computes (n + 1) / 2n of the
    # scores, n = ceil(context / causal_block); 0 models no skipping.
    attention_efficiency: float | dict[str, float] | None = None
    causal_block: int = 0
    # The machine `omnigen calibrate` fitted the figures on ("AMD EPYC, 2 cores, 2 CPU ranks"); empty for figures
    # nobody measured (datasheets, published MFU, placeholders). The plan and the script's header say which it is.
    measured_on: str = ""

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)

    def efficiency(self, precision: str) -> float:
        e = self.matmul_efficiency
        return e[precision] if isinstance(e, dict) else e

    def achieved_flops(self, precision: str) -> float:
        return self.peak_flops[precision] * self.efficiency(precision)

    def attention_flops(self, precision: str) -> float:
        """FLOP/s of attention, scores counted whole."""
        e = self.attention_efficiency
        if e is None:
            return self.achieved_flops(precision)
        return self.peak_flops[precision] * (e[precision] if isinstance(e, dict) else e)

    def causal_share(self, context: float) -> float:
        return causal_share(context, self.causal_block)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def link(self, collective: str, within_node: bool) -> Link:
        """The link one of COLLECTIVES runs on."""
        if not within_node:
            return self.inter_node
        return getattr(self, collective) or self.intra_node


COLLECTIVES = ("all_gather", "reduce_scatter", "all_reduce", "all_to_all")


def causal_share(context: float, block: int) -> float:
    """Share of the whole score matrix a causal kernel with block-wide key blocks computes over this context: the
    blocks on and below the diagonal, (n + 1) / 2n of n x n. No skipping when block is 0."""
    if block <= 0:
        return 1.0
    n = max(1, -(-int(context) // block))
    return (n + 1) / (2 * n)


def provenance(name: str, measured_on: str, device: str) -> str:
    """Where a profile's figures come from, in one line (`omnigen plan`, `run`, `bench`; the script's header)."""
    if measured_on:
        return f"cost profile {name}: fitted by `omnigen calibrate` on {measured_on}"
    calibrate = f"omnigen calibrate{' --device cuda' if device == 'cuda' else ''} --ranks N -o FILE.yaml"
    return (f"cost profile {name}: uncalibrated, not measured on any machine (`{calibrate}`, then "
            "cluster.hardware: FILE.yaml, fits one)")


TEXT_FIELDS = ("name", "source", "measured_on")


def builtin_profiles() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("omnigen.profiles").iterdir()
                  if p.name.endswith(".yaml"))


def _read_builtin(name: str, spec: Spec) -> dict[str, Any]:
    if name not in builtin_profiles():
        raise SpecError(f"{spec.source}: key 'cluster.hardware': unknown profile {name!r}; "
                        f"built-in profiles: {', '.join(builtin_profiles())}, or a path to a profile .yaml file")
    return yaml.safe_load(resources.files("omnigen.profiles").joinpath(f"{name}.yaml").read_text())


def _read_profile(ref: str, spec: Spec) -> dict[str, Any]:
    if not ref.endswith((".yaml", ".yml")):
        return _read_builtin(ref, spec)
    path = spec.resolve(ref)
    if not path.is_file():
        raise SpecError(f"{spec.source}: key 'cluster.hardware': profile file {path} not found")
    try:
        data = yaml.safe_load(Path(path).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise SpecError(f"{spec.source}: key 'cluster.hardware': {path} is not a readable YAML profile: "
                        f"{str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{spec.source}: key 'cluster.hardware': {path} must hold a mapping of profile fields "
                        f"({', '.join(sorted(HardwareProfile.__dataclass_fields__))})")
    return data


def _check_numbers(value: Any, key: str, where: str) -> None:
    """Every figure of a profile is a finite, non-negative number (nested in links and per-precision maps)."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_numbers(v, f"{key}.{k}", where)
    elif value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                or not math.isfinite(value) or value < 0):
        raise SpecError(f"{where}: '{key}' must be a finite, non-negative number, got {value!r}")


def load_profile(spec: Spec) -> HardwareProfile:
    """`hardware: h100`, `hardware: my_profile.yaml`, or `hardware: {profile: h100, memory_gib: 96, ...}`."""
    hw = spec.cluster.hardware
    overrides: dict[str, Any] = {}
    if isinstance(hw, dict):
        overrides = {k: v for k, v in hw.items() if k != "profile"}
        hw = hw.get("profile", "cpu")
    data = _read_profile(str(hw), spec)
    allowed = set(HardwareProfile.__dataclass_fields__)
    for key, value in overrides.items():
        if key not in allowed:
            raise SpecError(f"{spec.source}: unknown key 'cluster.hardware.{key}'; "
                            f"allowed: profile, {', '.join(sorted(allowed))}")
        data[key] = {**data[key], **value} if isinstance(data.get(key), dict) and isinstance(value, dict) else value
    for key, value in data.items():
        if key not in TEXT_FIELDS:
            _check_numbers(value, f"cluster.hardware.{key}", f"{spec.source}: profile {hw!r}")
        elif not isinstance(value, str):
            raise SpecError(f"{spec.source}: profile {hw!r}: 'cluster.hardware.{key}' must be text, got {value!r}")
    try:
        links = {k: Link(**data[k]) for k in ("intra_node", "inter_node", *COLLECTIVES) if data.get(k) is not None}
        return HardwareProfile(**{**data, **links})
    except (TypeError, KeyError) as e:
        raise SpecError(f"{spec.source}: key 'cluster.hardware': incomplete or malformed profile {hw!r}: {e}") from None
