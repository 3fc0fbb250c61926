"""Device mesh, the one logical-axis rules table, and helpers that place params and batches on the mesh.

Mesh axes: ``"data"`` (params replicated, batch split), ``"fsdp"`` (batch split *and* param storage split,
weights all-gathered just before use: ZeRO-3) and ``"tensor"`` (hidden / heads dims split, Megatron-style).
Params carry logical axis names (:mod:`.models.layers`); :data:`LOGICAL_AXIS_RULES` maps them and the
activation names onto the mesh, and every helper accepts ``rules=`` to override it. On several hosts call
``jax.distributed.initialize()`` first: ``jax.devices()`` is then global and every process builds the same
mesh, :func:`shard_batch` takes each process's local slice, and :func:`barrier` / :func:`host_value` /
:func:`replicated_to_host` synchronise the processes and read values back. Typical use::

    mesh = make_mesh(MeshConfig(data=-1, fsdp=2))            # -1 = all remaining devices
    variables = init_sharded(model, rng, x, mesh=mesh)       # created directly in its shards, or:
    abstract, shardings = param_shardings(model, x, mesh=mesh)
    variables = shard_params(loaded_numpy_variables, shardings)
    step = sharded_jit(train_step, in_shardings=(shardings, batch_sharding(mesh, 4)),
                       out_shardings=(shardings, replicated(mesh)), donate_argnums=(0,), mesh=mesh)
    variables, loss = step(variables, shard_batch(batch, mesh))
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import math
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")
BATCH_AXES: tuple[str, str] = ("data", "fsdp")  # the global batch is split over both

LogicalRules = Sequence[tuple[str, "str | tuple[str, ...] | None"]]

# (logical name, mesh axes). Order matters only when two names of one array ask for the same mesh axis:
# the earlier rule wins and the later dim stays replicated.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # Activations (nn.with_logical_constraint). The batch is split over data×fsdp; channels stay whole.
    # Constraining the UNet's channel dims to "tensor" (tensor > 1) gave wrong outputs on the XLA CPU
    # partitioner (tests/test_sharding.py::test_unet_sharded_forward_equals_unsharded_and_follows_rules
    # catches it), and GroupNorm would all-gather them anyway; weights are still split over tensor/fsdp.
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_heads", None),
    ("activation_mlp", None),
    ("activation_embed", None),
    # Dense kernels: [embed, mlp] -> P("fsdp", "tensor") and output projections [mlp|heads, embed] ->
    # P("tensor", "fsdp"): tensor parallelism on the hidden side, ZeRO-3 storage on the model-width side.
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    # Embedding tables stay whole along rows: the tables here are CLIP's 49408-token and 77-position
    # tables (77 divides by no mesh size); row-sharding them would turn each lookup into a cross-device
    # gather. Their width is "embed", so they are still split over fsdp.
    ("vocab", None),
    # Conv kernels HWIO -> P(None, None, None, "fsdp"). UNet/VAE convs feed GroupNorm (statistics over
    # channel groups), residual adds and skip concatenations along channels: splitting output channels over
    # "tensor" would leave every large spatial activation channel-split and force activation all-gathers
    # at each norm/concat. Splitting them over "fsdp" only shards storage; the kernel (at most
    # 3·3·2560·1280 floats) is all-gathered before the conv, far less traffic than the activations, which
    # stay batch-split. conv_in stays whole: one mesh axis can split one dim only, and splitting the
    # contracted dim would add partial-sum reductions.
    ("conv_out", "fsdp"),
    ("conv_in", None),
    ("conv_h", None),
    ("conv_w", None),
    ("norm", None),
)


# --------------------------------------------------------------------------------------------------------
# Mesh
# --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the ``("data", "fsdp", "tensor")`` mesh axes; at most one may be ``-1`` (= all the rest)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = self.requested()
        for name, size in zip(MESH_AXES, sizes):
            if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or (size < 1 and size != -1):
                raise ValueError(f"MeshConfig.{name} must be a positive int or -1, got {size!r}")
        if sum(s == -1 for s in sizes) > 1:
            raise ValueError(f"MeshConfig: at most one axis may be -1, got {self._describe(sizes)}")

    def requested(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)

    @staticmethod
    def _describe(sizes: Sequence[int]) -> str:
        return ", ".join(f"{n}={s}" for n, s in zip(MESH_AXES, sizes))

    def resolve(self, num_devices: int, devices_desc: str = "") -> tuple[int, int, int]:
        """The concrete axis sizes for ``num_devices`` devices (fills the ``-1``, checks the product)."""
        sizes = list(self.requested())
        fixed = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % fixed:
                raise ValueError(self._mismatch(num_devices, devices_desc))
            sizes[sizes.index(-1)] = num_devices // fixed
        if math.prod(sizes) != num_devices:
            raise ValueError(self._mismatch(num_devices, devices_desc))
        return tuple(sizes)  # type: ignore[return-value]

    def _mismatch(self, num_devices: int, devices_desc: str) -> str:
        return (f"mesh shape ({self._describe(self.requested())}) does not fit the {num_devices} available "
                f"device(s): the product of the axis sizes must equal the device count (one axis may be -1 "
                f"to take all remaining devices). Devices: {devices_desc}")


def _describe_devices(devices: Sequence[Any], limit: int = 8) -> str:
    shown = ", ".join(str(d) for d in devices[:limit])
    more = f", ... ({len(devices)} in total)" if len(devices) > limit else ""
    return f"[{shown}{more}]"


def _auto_axis_types(n: int) -> dict[str, Any]:
    """``axis_types=(Auto,)*n`` where this JAX has them (make_mesh defaults to Explicit on newer JAX)."""
    axis_type = getattr(jax.sharding, "AxisType", None)
    if axis_type is None or "axis_types" not in inspect.signature(jax.make_mesh).parameters:
        return {}
    return {"axis_types": (axis_type.Auto,) * n}


def make_mesh(config: MeshConfig | Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``("data", "fsdp", "tensor")`` mesh with Auto axes over ``devices`` (default: ``jax.devices()``).

    ``jax.make_mesh`` orders devices by physical topology (TPU ICI rings, NVLink islands). On several hosts
    ``jax.devices()`` lists the devices of all processes, so every process builds the same global mesh.
    """
    if config is None:
        config = MeshConfig()
    elif isinstance(config, Mapping):
        unknown = sorted(set(config) - set(MESH_AXES))
        if unknown:
            raise ValueError(f"mesh config has unknown axes {unknown}; expected a subset of {list(MESH_AXES)}")
        config = MeshConfig(**config)
    elif not isinstance(config, MeshConfig):
        raise TypeError(f"config must be a MeshConfig, a dict or None, got {type(config).__name__}")
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh: the device list is empty")
    shape = config.resolve(len(devices), _describe_devices(devices))
    # Positional shape / names: the first argument was renamed axis_shapes -> axis_sizes in JAX 0.11.
    return jax.make_mesh(shape, MESH_AXES, devices=devices, **_auto_axis_types(len(MESH_AXES)))


@contextlib.contextmanager
def use_mesh(mesh: Mesh) -> Iterator[Mesh]:
    """Make ``mesh`` the ambient mesh (needed by ``nn.with_logical_constraint`` on activations).

    ``jax.set_mesh`` where available (the deprecated ``with mesh:`` no longer sets the mesh that Flax's
    constraints look for), ``jax.sharding.use_mesh`` on older JAX. Use outside ``jax.jit`` only.
    """
    if hasattr(jax, "set_mesh"):
        ctx = jax.set_mesh(mesh)
    elif hasattr(jax.sharding, "use_mesh"):
        ctx = jax.sharding.use_mesh(mesh)
    else:  # pragma: no cover - very old JAX
        ctx = mesh
    with ctx:
        yield mesh


@contextlib.contextmanager
def axis_rules(rules: LogicalRules | None = None) -> Iterator[LogicalRules]:
    """Activate logical-axis ``rules`` (default :data:`LOGICAL_AXIS_RULES`) for ``nn.with_logical_constraint``.

    Rules are read when a function is *traced*; wrap the first call of a jitted function (or use
    :func:`sharded_jit` with ``mesh=``, which does this for you).
    """
    rules = LOGICAL_AXIS_RULES if rules is None else tuple(rules)
    with nn.logical_axis_rules(rules):
        yield rules


# --------------------------------------------------------------------------------------------------------
# Params
# --------------------------------------------------------------------------------------------------------
def _path_str(path: Sequence[Any]) -> str:
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def _unbox(tree: Any) -> Any:
    """Strip Flax metadata boxes without applying sharding constraints."""
    def strip(x):
        if isinstance(x, nn.Partitioned):  # LogicallyPartitioned included
            return x.unbox(apply_constraint=False)
        return x.unbox() if _is_box(x) else x

    return jax.tree_util.tree_map(strip, tree, is_leaf=_is_box)


def _axes_tuple(entry: Any) -> tuple[str, ...]:
    if entry is None or entry is PartitionSpec.UNCONSTRAINED:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _check_rules(rules: LogicalRules, mesh: Mesh) -> None:
    for rule in rules:
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ValueError(f"each logical axis rule must be (logical_name, mesh_axes), got {rule!r}")
        unknown = [a for a in _axes_tuple(rule[1]) if a not in mesh.axis_names]
        if unknown:
            raise ValueError(f"rule {tuple(rule)!r} names mesh axes {unknown} that the mesh does not have "
                             f"(mesh axes: {list(mesh.axis_names)})")


def logical_to_sharding(abstract_or_boxed_tree: Any, mesh: Mesh, rules: LogicalRules | None = None, *,
                        allow_replicate_uneven: bool = False) -> Any:
    """A tree of ``NamedSharding`` from the ``LogicallyPartitioned`` boxes of ``abstract_or_boxed_tree``.

    The tree is the boxed output of ``jax.eval_shape(module.init, ...)`` (or real boxed params); unboxed
    leaves are replicated. A dim whose size does not divide by the size of its mesh axes raises a
    ``ValueError`` naming the param path, unless ``allow_replicate_uneven=True``, which replicates that dim
    (and logs it). Nothing is replicated silently.
    """
    rules = LOGICAL_AXIS_RULES if rules is None else tuple(rules)
    _check_rules(rules, mesh)
    mesh_specs = nn.logical_to_mesh(nn.get_partition_spec(abstract_or_boxed_tree), rules)
    values = _unbox(abstract_or_boxed_tree)
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731

    def one(path, spec, value):
        shape = tuple(np.shape(value))
        entries = list(spec)
        if len(entries) > len(shape):
            raise ValueError(f"{_path_str(path)}: partition spec {spec} has more entries than the array has "
                             f"dims (shape {shape})")
        for dim, entry in enumerate(entries):
            size = math.prod(mesh.shape[a] for a in _axes_tuple(entry))
            if size > 1 and shape[dim] % size:
                msg = (f"{_path_str(path)}: dim {dim} of shape {shape} is not divisible by {size} (mesh axes "
                       f"{entry!r} of spec {spec} on mesh {dict(mesh.shape)})")
                uneven.append(msg)
                if allow_replicate_uneven:
                    log.info("%s; replicating that dim", msg)
                entries[dim] = None
        return NamedSharding(mesh, PartitionSpec(*entries))

    uneven: list[str] = []
    shardings = jax.tree_util.tree_map_with_path(one, mesh_specs, values, is_leaf=is_spec)
    if uneven and not allow_replicate_uneven:
        listed = "\n  ".join(uneven[:20]) + (f"\n  ... ({len(uneven)} in total)" if len(uneven) > 20 else "")
        raise ValueError(f"{len(uneven)} param dim(s) do not divide by their mesh axes:\n  {listed}\n"
                         "pick mesh sizes that divide them, change the rules, or pass "
                         "allow_replicate_uneven=True to replicate those dims")
    return shardings


def _is_array_tree(x: Any) -> bool:
    leaves = jax.tree_util.tree_leaves(x)
    return bool(leaves) and all(isinstance(v, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)) for v in leaves)


def _split_init_args(init_args: tuple) -> tuple[list[int], Callable[[Sequence[Any]], tuple]]:
    """Positions of the array arguments and a function rebuilding the full tuple from those arrays.

    Other arguments (flags, ints, None) are closed over so that tracing leaves them Python values.
    """
    dynamic = [i for i, a in enumerate(init_args) if _is_array_tree(a)]

    def rebuild(arrays: Sequence[Any]) -> tuple:
        full = list(init_args)
        for i, a in zip(dynamic, arrays):
            full[i] = a
        return tuple(full)

    return dynamic, rebuild


def _abstract_boxed(module: nn.Module, rng: Any, init_args: tuple) -> Any:
    dynamic, rebuild = _split_init_args(init_args)

    def init(rng, *arrays):
        return module.init(rng, *rebuild(arrays))

    with nn.logical_axis_rules(()):  # layouts come from the returned boxes, not from in-trace constraints
        return jax.eval_shape(init, rng, *[init_args[i] for i in dynamic])


def param_shardings(module: nn.Module, *init_args: Any, mesh: Mesh, rules: LogicalRules | None = None,
                    allow_replicate_uneven: bool = False, rng: Any = None) -> tuple[Any, Any]:
    """``(abstract, shardings)`` for ``module.init(rng, *init_args)`` without materialising anything.

    Both trees have the structure ``module.init`` returns (``{"params": ...}``, unboxed); ``abstract``
    holds ``jax.ShapeDtypeStruct`` leaves carrying their sharding (usable as an Orbax restore target or
    as ``abstract_params`` for the weight loaders).
    """
    rng = jax.random.key(0) if rng is None else rng
    boxed = _abstract_boxed(module, rng, init_args)
    shardings = logical_to_sharding(boxed, mesh, rules, allow_replicate_uneven=allow_replicate_uneven)
    abstract = jax.tree_util.tree_map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                                      _unbox(boxed), shardings)
    return abstract, shardings


def _check_same_structure(tree: Any, shardings: Any, what: str) -> None:
    have = {_path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}
    want = {_path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(shardings)[0]}
    if have != want:
        missing, extra = sorted(want - have), sorted(have - want)
        raise ValueError(f"{what} do not match the shardings tree: missing {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''}, unexpected {extra[:10]}"
                         f"{' ...' if len(extra) > 10 else ''} (did you pass shardings['params'] for a "
                         f"params-only tree?)")


def shard_params(params: Any, shardings: Any) -> Any:
    """Place an existing param tree (numpy or JAX arrays, e.g. loaded from safetensors) onto ``shardings``.

    Host (numpy) arrays are placed with ``jax.make_array_from_callback``, which copies to each device
    only its own slice, and which also works with several processes (each holds the full host array).
    """
    params = _unbox(params)
    _check_same_structure(params, shardings, "params")

    def put(path, x, sharding):
        try:
            if isinstance(x, jax.Array):
                return jax.device_put(x, sharding)
            host = np.asarray(x)
            return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
        except ValueError as e:
            raise ValueError(f"{_path_str(path)} (shape {np.shape(x)}): {e}") from e

    return jax.tree_util.tree_map_with_path(put, params, shardings)


def init_sharded(module: nn.Module, rng: Any, *init_args: Any, mesh: Mesh, rules: LogicalRules | None = None,
                 allow_replicate_uneven: bool = False) -> Any:
    """``module.init(rng, *init_args)``, unboxed, created directly in its shards by one ``jax.jit``.

    Nothing is materialised whole on one device first. With JAX's partitionable threefry PRNG (the
    default) the values equal an unsharded ``module.init`` with the same ``rng``.
    """
    boxed = _abstract_boxed(module, rng, init_args)
    shardings = logical_to_sharding(boxed, mesh, rules, allow_replicate_uneven=allow_replicate_uneven)
    dynamic, rebuild = _split_init_args(init_args)

    def init(rng, *arrays):
        return _unbox(module.init(rng, *rebuild(arrays)))

    with nn.logical_axis_rules(()):
        return jax.jit(init, out_shardings=shardings)(rng, *[init_args[i] for i in dynamic])


# --------------------------------------------------------------------------------------------------------
# Batches, replication, jit
# --------------------------------------------------------------------------------------------------------
def _batch_axes(mesh: Mesh) -> tuple[str, ...]:
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading axis split over ``("data", "fsdp")``, the other ``ndim - 1`` axes whole."""
    if ndim < 1:
        raise ValueError(f"batch_sharding needs ndim >= 1 (a leading batch axis), got {ndim}")
    return NamedSharding(mesh, PartitionSpec(_batch_axes(mesh), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Put every leaf of ``batch`` on the mesh with its leading axis over ``("data", "fsdp")``.

    One process: ``batch`` is the global batch (``jax.device_put``). Several processes: each process
    passes *its own local slice* (leading dim = global batch / process count, e.g. from a per-process
    data loader); ``jax.make_array_from_process_local_data`` assembles the global array.
    """
    split = math.prod(mesh.shape[a] for a in _batch_axes(mesh))
    multi = jax.process_count() > 1

    def put(path, x):
        if np.ndim(x) < 1:
            raise ValueError(f"batch leaf {_path_str(path) or '<root>'} is a scalar; every batch leaf needs a "
                             f"leading batch axis")
        sharding = batch_sharding(mesh, np.ndim(x))
        if multi:
            return jax.make_array_from_process_local_data(sharding, np.asarray(x))
        if np.shape(x)[0] % split:
            raise ValueError(f"batch leaf {_path_str(path) or '<root>'} has leading dim {np.shape(x)[0]}, "
                             f"not divisible by data×fsdp = {split} (mesh {dict(mesh.shape)})")
        return jax.device_put(x, sharding)

    return jax.tree_util.tree_map_with_path(put, batch)


class _MeshJit:
    """A jitted function that is traced and run with the mesh and the logical rules active."""

    def __init__(self, fn: Callable, jitted: Any, mesh: Mesh | None, rules: LogicalRules | None):
        functools.update_wrapper(self, fn)
        self.jitted = jitted
        self.mesh = mesh
        self.rules = rules

    @contextlib.contextmanager
    def _context(self):
        with contextlib.ExitStack() as stack:
            if self.mesh is not None:
                stack.enter_context(use_mesh(self.mesh))
            stack.enter_context(axis_rules(self.rules))
            yield

    def __call__(self, *args, **kwargs):
        with self._context():
            return self.jitted(*args, **kwargs)

    def lower(self, *args, **kwargs):
        with self._context():
            return self.jitted.lower(*args, **kwargs)


def sharded_jit(fn: Callable, *, in_shardings: Any, out_shardings: Any, donate_argnums: int | Sequence[int] = (),
                static_argnums: int | Sequence[int] = (), mesh: Mesh | None = None,
                rules: LogicalRules | None = None) -> Callable:
    """``jax.jit(fn, in_shardings=..., out_shardings=..., donate_argnums=..., static_argnums=...)``.

    Activation constraints (``nn.with_logical_constraint``) need the mesh and the rules while ``fn`` is
    traced. Without ``mesh``/``rules`` this returns the plain ``jax.jit`` object: call it inside
    ``with use_mesh(mesh), axis_rules():``. With ``mesh=`` (rules default to :data:`LOGICAL_AXIS_RULES`)
    or ``rules=``, every call and ``.lower(...)`` enters those contexts for you.
    """
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                     donate_argnums=donate_argnums, static_argnums=static_argnums)
    if mesh is None and rules is None:
        return jitted
    return _MeshJit(fn, jitted, mesh, rules)


# ---------------------------------------------------------------------------------------------------------
# Several processes: a barrier, and reading replicated or sharded values on the host
# ---------------------------------------------------------------------------------------------------------
_BARRIER_TIMEOUT_S = 3600


def barrier(name: str) -> None:
    """Wait until every process got here (the coordination service's barrier, generous timeout); no-op with
    one process. ``name`` must be unique per call site and occurrence."""
    if jax.process_count() > 1:
        from orbax.checkpoint import multihost

        multihost.sync_global_processes(f"dynamicid_{name}", timeout=_BARRIER_TIMEOUT_S)


def host_value(tree: Any) -> Any:
    """Host numpy copy of a *replicated* tree (metrics, the step): every process reads its own first shard, so
    this works when the arrays span several processes (``jax.device_get`` needs fully addressable arrays)."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(jax.device_get(x))

    return jax.tree_util.tree_map(one, tree)


def replicated_to_host(tree: Any) -> Any:
    """Fully gather a (possibly multi-process, sharded) tree to host numpy arrays on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    leaves = jax.tree_util.tree_leaves(tree)
    mesh = leaves[0].sharding.mesh
    gather = jax.jit(lambda t: t, out_shardings=replicated(mesh)).lower(tree).compile()
    barrier("replicated_to_host")
    return host_value(gather(tree))


__all__ = ["barrier", "host_value", "replicated_to_host", 
    "BATCH_AXES", "LOGICAL_AXIS_RULES", "MESH_AXES", "MeshConfig", "axis_rules", "batch_sharding",
    "init_sharded", "logical_to_sharding", "make_mesh", "param_shardings", "replicated", "shard_batch",
    "shard_params", "sharded_jit", "use_mesh",
]
