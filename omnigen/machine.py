"""This machine's fitted CPU profile, for the commands that run here (`omnigen plan`, `run`, `bench`).

A committed script must compile to the same bytes on every machine, so compiling never looks at the machine: a spec
naming the built-in `cpu` profile (placeholder figures, not measured) is planned, and its header priced, with those.
The commands that run here also price the compiled layout with a profile `omnigen calibrate` fitted on a machine like
this one: the same CPU model, core count and rank count (per-rank figures halve when twice the ranks share the
cores). They look in this machine's cache, which `omnigen calibrate --cache` writes ($OMNIGEN_CACHE_DIR, else
$XDG_CACHE_HOME/omnigen, else ~/.cache/omnigen; profiles/<key>.yaml), then among the fits omnigen ships
(omnigen/profiles/machines/: the 2-core cloud VM CI runs on, at 2 and 4 ranks). Without one they say the figure is
uncalibrated and how to calibrate.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from .calibrate_measure import cpu_cores, cpu_name
from .hardware import HardwareProfile, load_profile, provenance
from .plan import Plan, reprice
from .spec import Spec, spec_from_dict

PLACEHOLDER = "cpu"   # the built-in profile whose figures nobody measured


def machine_key(ranks: int) -> str:
    """What a CPU fit holds for: 'amd-epyc_2cores_2ranks'."""
    model = re.sub(r"[^a-z0-9]+", "-", cpu_name().lower()).strip("-") or "cpu"
    return f"{model}_{cpu_cores()}cores_{ranks}ranks"


def cache_dir() -> Path:
    if os.environ.get("OMNIGEN_CACHE_DIR"):
        return Path(os.environ["OMNIGEN_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "omnigen"


def cached_profile_path(ranks: int) -> Path:
    """Where `omnigen calibrate --cache` writes this machine's fit for `ranks` ranks."""
    return cache_dir() / "profiles" / f"{machine_key(ranks)}.yaml"


def shipped_profile_path(ranks: int) -> Path | None:
    shipped = resources.files("omnigen.profiles").joinpath("machines").joinpath(f"{machine_key(ranks)}.yaml")
    return Path(str(shipped)) if shipped.is_file() else None


def fitted_profile_path(ranks: int) -> Path | None:
    """This machine's own fit if cached, else one omnigen ships for a machine like it, else None."""
    cached = cached_profile_path(ranks)
    return cached if cached.is_file() else shipped_profile_path(ranks)


def uses_placeholder(spec: Spec) -> bool:
    """The spec runs CPU ranks priced with the bare built-in `cpu` profile (overrides are the user's own figures)."""
    return spec.cluster.device == "cpu" and spec.cluster.hardware == PLACEHOLDER


@dataclass(frozen=True)
class PricedHere:
    plan: Plan               # the compiled plan, its prediction (and cluster.hardware) from this machine's fit
    path: Path               # the fit
    hardware: HardwareProfile


def priced_here(spec: Spec, graph, plan: Plan) -> PricedHere | None:
    """The compiled layout priced with this machine's fit; None when the spec names another profile than the
    placeholder or no fit matches this machine."""
    if not uses_placeholder(spec):
        return None
    path = fitted_profile_path(spec.cluster.world_size)   # `omnigen run` puts every rank on this machine
    if path is None:
        return None
    raw = spec.to_dict()
    raw["cluster"] = {**raw["cluster"], "hardware": str(path)}
    fitted_spec = spec_from_dict(raw, source=spec.source, base_dir=spec.base_dir)
    hw = load_profile(fitted_spec)
    estimate = reprice(plan, fitted_spec, graph, hw)
    cluster = {**plan.cluster, "hardware": hw.name, "hardware_measured_on": hw.measured_on}
    return PricedHere(replace(plan, predicted=estimate.summary(), cluster=cluster), path, hw)


def describe(spec: Spec, here: PricedHere | None) -> str:
    """What `plan` and `run` print under the compiled prediction: the layout priced here, or how to fit this
    machine ("" when the spec names a profile of its own)."""
    if here is not None:
        p = here.plan.predicted
        return (f"on this machine: step {p['step_time_s']:.4g} s  {p['tokens_per_s_per_device']:.4g} "
                f"tokens/s/device  peak {p['peak_memory_bytes'] / 2**30:.2f} GiB  (this layout, priced with the fit "
                f"below)\n  {provenance(here.hardware.name, here.hardware.measured_on, 'cpu')} ({here.path})")
    if not uses_placeholder(spec):
        return ""
    ranks = spec.cluster.world_size
    return (f"on this machine: no fit of {machine_key(ranks)}; `omnigen calibrate --ranks {ranks} --cache` "
            f"(a few minutes; --quick about one) fits it for `omnigen plan`, `run` and `bench`")
