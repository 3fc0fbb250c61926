"""Experiment configs: one YAML file per experiment (``train/configs/``), overridable from the command line.

A config is a nested mapping. Each stage's defaults are a YAML file of their own beside the experiment configs
(``train/configs/defaults/``, read by :func:`stage_defaults` into the stage module's ``DEFAULTS``); the
experiment's YAML file is merged over them and
``key.sub=value`` overrides are merged over that. An override must name an existing key (typos fail with the
closest names) and its value is parsed with the type of the value it replaces: ``true/false`` for bools,
ints, floats, strings as written, and lists / dicts / ``None`` through YAML (``mesh.data=-1``,
``optimizer.lr=3e-5``, ``model.base=/ckpt/sd15``, ``train.sample_prompts=["a", "b"]``). Keys under a mapping
whose default is an empty dict (free-form sections) may be added. The ``optimizer`` section builds the optax
optimizer every stage trains with (:func:`make_optimizer`).

    cfg = load_config("train/configs/stage1_sd15.yaml", ["optimizer.lr=5e-5"], defaults=stage1.DEFAULTS)
    cfg.optimizer.lr            # attribute access; cfg.to_dict() for JSON / checkpoints
"""
from __future__ import annotations

import copy
import difflib
import json
import math
import os
from typing import Any, Iterable, Mapping

import optax
import yaml


class ConfigError(ValueError):
    """A config file or an override that does not fit the defaults."""


class Config(dict):
    """A nested ``dict`` with attribute access (``cfg.optimizer.lr``). Values are plain Python / YAML types."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no entry {name!r} (entries: {sorted(self)})") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Config is read-only through attributes; build a new one with load_config / merge")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self))


def _wrap(value: Any) -> Any:
    if isinstance(value, Mapping):
        return Config({k: _wrap(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return [_wrap(v) for v in value]
    return value


def _merge(base: dict, update: Mapping, where: str, free: frozenset = frozenset()) -> dict:
    """``update`` merged into a copy of ``base``; ``free`` = paths of free-form sections (empty by default)."""
    out = copy.deepcopy(base)
    if not base and where:
        free = free | {where}
    for key, value in update.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in out:
            if where in free:  # free-form section: new keys allowed
                out[key] = copy.deepcopy(value)
                continue
            close = difflib.get_close_matches(str(key), [str(k) for k in out], n=3)
            raise ConfigError(f"unknown config key {path!r}" + (f"; did you mean {close}?" if close else
                                                                 f"; known keys here: {sorted(out)}"))
        current = out[key]
        if isinstance(current, dict) and isinstance(value, Mapping):
            out[key] = _merge(current, value, path, free)
        elif isinstance(current, dict) and current and value is not None:
            raise ConfigError(f"config key {path!r} is a section; give its sub-keys, not {value!r}")
        else:
            out[key] = _coerce(value, current, path)
    return out


REMAT_POLICIES = ("full", "dots", "dots_no_batch", "nothing", "everything")


def _nullable_number(low: float, high: float, what: str):
    def check(value: Any, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not low <= value < high:
            raise ConfigError(f"config key {path!r} expects null or {what}, got {value!r}")
        return float(value)
    return check


def _nullable_choice(choices: tuple[str, ...]):
    def check(value: Any, path: str) -> str:
        if value not in choices:
            raise ConfigError(f"config key {path!r} expects null or one of {list(choices)}, got {value!r}")
        return value
    return check


def _nullable_string(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"config key {path!r} expects null or a string (a path), got {value!r}")
    return value


def _nullable_positive_int(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"config key {path!r} expects null or a positive integer, got {value!r}")
    return value


#: the declared type of every key whose default is null (by its last name; every stage uses these names with
#: one meaning), so that an override on such a key is checked when the config is loaded, not minutes later
NULLABLE_TYPES: dict[str, Any] = {
    "ema_decay": _nullable_number(0.0, 1.0, "a number in [0, 1) (the EMA decay, e.g. 0.999)"),
    "remat": _nullable_choice(REMAT_POLICIES),
    "tokenizer": _nullable_string,
    "lora_rank": _nullable_positive_int,
}


def _coerce(value: Any, current: Any, path: str) -> Any:
    """``value`` checked against the type of the default ``current`` (a null default: the key's declared type in
    :data:`NULLABLE_TYPES`; keys without one accept anything)."""
    if value is None:
        return value
    if current is None:
        check = NULLABLE_TYPES.get(path.rsplit(".", 1)[-1])
        return check(value, path) if check is not None else value
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"config key {path!r} expects true/false, got {value!r}")
        return value
    if isinstance(current, int):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"config key {path!r} expects an integer, got {value!r}")
        return value
    if isinstance(current, float):
        if isinstance(value, str):  # YAML 1.1 reads an exponent without a dot ("1e-3") as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"config key {path!r} expects a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {path!r} expects a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"config key {path!r} expects a finite number, got {value!r}")
        return float(value)
    if isinstance(current, str):
        if not isinstance(value, str):
            raise ConfigError(f"config key {path!r} expects a string, got {value!r}")
        return value
    if isinstance(current, (list, tuple)):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {path!r} expects a list, got {value!r}")
        return list(value)
    return value


def parse_override(text: str, defaults: Mapping) -> dict:
    """``"a.b.c=value"`` → ``{"a": {"b": {"c": parsed}}}``; the value is parsed as YAML, except that a default
    string keeps the raw text (so ``model.base=1.5`` stays ``"1.5"``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key part")
    node: Any = defaults
    for p in parts:
        node = node.get(p) if isinstance(node, Mapping) else None
    if isinstance(node, str) and raw.strip().lower() not in ("null", "none", "~"):
        value: Any = raw
    else:
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {text!r}: cannot parse the value: {e}") from None
        if isinstance(value, str) and value.lower() == "none":
            value = None
    out: dict = {}
    cur = out
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def _free_sections(d: Mapping, where: str):
    for k, v in d.items():
        path = f"{where}.{k}" if where else str(k)
        if isinstance(v, Mapping):
            if not v:
                yield path
            yield from _free_sections(v, path)


def load_config(path: str | os.PathLike | None, overrides: Iterable[str] = (), *,
                defaults: Mapping) -> Config:
    """``defaults`` ← YAML file at ``path`` (optional) ← ``overrides`` (``key.sub=value`` strings)."""
    merged = copy.deepcopy(dict(defaults))
    free = frozenset(_free_sections(merged, ""))
    if path is not None:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file {path!r} does not exist")
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"config file {path!r} must hold a mapping at the top level, got {type(data).__name__}")
        merged = _merge(merged, data, "", free)
    for text in overrides:
        merged = _merge(merged, parse_override(text, merged), "", free)
    validate(merged)
    return _wrap(merged)


#: ranges of common keys (by dotted path; checked wherever a stage has the key) — the merged config is validated
#: as a whole when it is loaded, before any workdir is touched or any model is built
RANGES: dict[str, tuple[str, Any]] = {
    "train.steps": (">=", 0), "train.accum_steps": (">=", 1), "train.log_every": (">=", 1),
    "train.sample_every": (">=", 0), "data.batch_size": (">=", 1), "data.resolution": (">=", 8),
    "data.read_threads": (">=", 1), "data.corrupt_grace": (">=", 0), "data.worker_count": (">=", 0),
    "checkpoint.every": (">=", 0),
    "checkpoint.keep": (">=", 1), "optimizer.lr": (">", 0), "optimizer.warmup_steps": (">=", 0),
    "optimizer.clip_grad_norm": (">=", 0), "optimizer.weight_decay": (">=", 0),
    "data.max_corrupt_fraction": ("in", (0.0, 1.0)), "method.drop_id": ("in", (0.0, 1.0)),
    "method.drop_text": ("in", (0.0, 1.0)), "method.drop_both": ("in", (0.0, 1.0)),
    "data.grid_prompt_fraction": ("in", (0.0, 1.0)),
    "on_change": ("one of", ("error", "restart")),
    "model.dtype": ("one of", ("float32", "bfloat16", "float16")),
}


def validate(cfg: Mapping) -> None:
    """Check :data:`RANGES` on a merged config (keys a stage does not have are skipped)."""
    for path, (op, bound) in RANGES.items():
        node: Any = cfg
        for part in path.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is None:
            continue
        ok = {">=": lambda v: v >= bound, ">": lambda v: v > bound,
              "in": lambda v: bound[0] <= v <= bound[1], "one of": lambda v: v in bound}[op]
        try:
            good = ok(node)
        except TypeError:
            good = False
        if not good:
            want = {"in": f"in [{bound[0]}, {bound[1]}]" if op == "in" else "",
                    "one of": f"one of {list(bound)}" if op == "one of" else ""}.get(op) or f"{op} {bound}"
            raise ConfigError(f"config key {path!r} must be {want}, got {node!r}")


def config_from_dict(data: Mapping, *, defaults: Mapping) -> Config:
    """A config from a mapping (e.g. the ``config`` item of a checkpoint) merged over ``defaults``."""
    return _wrap(_merge(copy.deepcopy(dict(defaults)), data, "", frozenset(_free_sections(defaults, ""))))


__all__ = ["Config", "ConfigError", "NULLABLE_TYPES", "RANGES", "config_from_dict", "learning_rate_schedule",
           "load_config", "make_optimizer", "parse_override", "validate"]


# ---------------------------------------------------------------------------------------------------------
# Sections the stages share
# ---------------------------------------------------------------------------------------------------------
def loader_config(cls, d: Mapping, **extra: Any):
    """A ``data_pipelines.loaders`` config from a ``data`` config section (+ stage-specific fields)."""
    return cls(seed=int(d["seed"]), resolution=int(d["resolution"]), latents=d["latents"], clip=d["clip"],
               clip_size=int(d["clip_size"]), tokenizer=d.get("tokenizer"), worker_count=int(d["worker_count"]),
               read_threads=int(d["read_threads"]),
               max_corrupt_fraction=float(d.get("max_corrupt_fraction", 0.01)),
               corrupt_grace=int(d.get("corrupt_grace", 100)), **extra)


#: the folder of the default configs, beside the experiment configs: ``training.yaml`` (the sections every stage
#: shares) and one file per stage (``stage1.yaml``, ``stage2.yaml``, ``infinite_id.yaml``)
DEFAULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "defaults")


def _read_yaml_mapping(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"default config {path} is missing (the package is incomplete; reinstall it)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"default config {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"default config {path} must be a mapping, got {type(data).__name__}")
    return data


def training_defaults() -> dict[str, Any]:
    """The sections every stage shares — ``train``, ``optimizer``, ``checkpoint``, ``mesh`` — from
    ``train/configs/defaults/training.yaml``."""
    return _read_yaml_mapping(os.path.join(DEFAULTS_DIR, "training.yaml"))


def stage_defaults(name: str) -> dict[str, Any]:
    """A stage's defaults: ``train/configs/defaults/{name}.yaml`` plus the shared sections of ``training.yaml``
    (a stage file may not redefine them)."""
    data = _read_yaml_mapping(os.path.join(DEFAULTS_DIR, f"{name}.yaml"))
    shared = training_defaults()
    clash = sorted(set(data) & set(shared))
    if clash:
        raise ConfigError(f"default config {name}.yaml redefines the shared sections {clash} of training.yaml")
    return {**data, **shared}


# ---------------------------------------------------------------------------------------------------------
# The optimizer the ``optimizer`` section describes
# ---------------------------------------------------------------------------------------------------------
def learning_rate_schedule(opt: Mapping) -> optax.Schedule:
    """``lr`` with linear warm-up over ``warmup_steps``, then ``"constant"`` or ``"cosine"`` decay to
    ``lr · final_lr_fraction`` at ``decay_steps``."""
    lr, warmup = float(opt["lr"]), int(opt.get("warmup_steps", 0))
    kind = opt.get("schedule", "constant")
    if kind == "constant":
        after = optax.constant_schedule(lr)
    elif kind == "cosine":
        decay = int(opt.get("decay_steps", 0))
        if decay <= warmup:
            raise ValueError(f"optimizer.decay_steps ({decay}) must exceed warmup_steps ({warmup}) for 'cosine'")
        after = optax.cosine_decay_schedule(lr, decay - warmup, alpha=float(opt.get("final_lr_fraction", 0.0)))
    else:
        raise ValueError(f"optimizer.schedule must be 'constant' or 'cosine', got {kind!r}")
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(opt: Mapping) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (``lr, b1, b2, eps, weight_decay``) after a global-norm clip (``clip_grad_norm``; ≤ 0 = off)."""
    schedule = learning_rate_schedule(opt)
    parts = []
    clip = float(opt.get("clip_grad_norm", 0.0) or 0.0)
    if clip > 0:
        parts.append(optax.clip_by_global_norm(clip))
    parts.append(optax.adamw(schedule, b1=float(opt.get("b1", 0.9)), b2=float(opt.get("b2", 0.999)),
                             eps=float(opt.get("eps", 1e-8)), weight_decay=float(opt.get("weight_decay", 1e-2))))
    return optax.chain(*parts), schedule
