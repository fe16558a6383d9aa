"""Validated, all-or-nothing loading of optimizer state dicts.

``FusedGuardedAdamW.load_state_dict`` first builds a :class:`LoadPlan` here: every entry is
checked (shapes, dtypes, finite and non-negative moments, integral step counts, the guard's
section) and converted to the tensors the optimizer keeps. Only a complete, valid plan is
applied, so a bad checkpoint raises ``ValueError``/``TypeError`` naming the entry and leaves
the optimizer exactly as it was.
"""

from __future__ import annotations

import json
import math
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from . import validation

# Per-parameter keys of torch.optim.AdamW's state (and ours).
STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")

SECTION_KEY = "lbw_guard"
"""Key, in the first param group of a state dict, of the packed ``num_steps`` and guard state."""
SECTION_VERSION = 1


@dataclass
class LoadPlan:
    torch_state: dict
    """What torch.optim.Optimizer.load_state_dict receives (ours less the extra keys)."""
    states: dict
    """param -> the state the optimizer keeps (fp32/fp64 moments in the param's layout)."""
    num_steps: int
    guard_state: dict | None
    spike_floor: dict | None = None
    """parameter positions of a bucket layout -> its (sum of v, numel) rows (``check_spike_floor``)."""


def prepare_load(opt, state_dict) -> LoadPlan:
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    for key in ("state", "param_groups"):
        if key not in state_dict:
            raise ValueError(f"state_dict has no {key!r} entry; is this an optimizer state dict?")
    sd = dict(state_dict)
    guard_state = sd.pop("guard", None)
    num_steps = sd.pop("num_steps", None)
    spike_floor = sd.pop("spike_floor", None)
    saved_groups = sd["param_groups"]
    if not isinstance(saved_groups, (list, tuple)) or not all(isinstance(g, Mapping) for g in saved_groups):
        raise TypeError("state_dict['param_groups'] must be a list of dicts")
    saved_groups, section = _pop_section(saved_groups)
    sd["param_groups"] = saved_groups
    from_section = section is not None and num_steps is None and guard_state is None
    if from_section:
        # A state dict that went through torch.distributed.checkpoint: only the packed copy is left.
        num_steps, guard_state, spike_floor = unpack_section(section)
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(f"state_dict has {len(saved_groups)} param groups, the optimizer has "
                         f"{len(opt.param_groups)}")
    params = []
    saved_ids = []
    filled_groups = []
    for i, (saved, group) in enumerate(zip(saved_groups, opt.param_groups)):
        ids = saved.get("params")
        if not isinstance(ids, (list, tuple)) or len(ids) != len(group["params"]):
            raise ValueError(f"state_dict param group {i} has {len(ids) if isinstance(ids, (list, tuple)) else ids!r} "
                             f"params, the optimizer's group {i} has {len(group['params'])}")
        for j, pid in enumerate(ids):
            try:
                hash(pid)
            except TypeError:
                raise TypeError(f"state_dict param group {i} params[{j}] must be a parameter id (an int), "
                                f"got {type(pid).__name__} {pid!r}") from None
            if pid in saved_ids or pid in ids[:j]:
                raise ValueError(f"state_dict param group {i} params[{j}]: parameter id {pid!r} is listed more "
                                 "than once; each parameter id must appear once")
        # Keys a saved group lacks (a torch.optim.AdamW state dict of another torch version, a
        # pruned checkpoint) keep the optimizer's current values, so every group stays complete.
        # (not the constructor options ZeRO copies into the live groups: a process group cannot
        # be deep-copied by torch's load; the optimizer puts them back after it)
        filled = {**{k: v for k, v in group.items() if k != "params" and k not in OPTION_KEYS}, **saved}
        validation.check_hyperparameters(filled, f"state_dict param group {i}", between_steps=True)
        filled_groups.append(filled)
        params.extend(group["params"])
        saved_ids.extend(ids)
    sd["param_groups"] = filled_groups
    saved_state = sd["state"]
    if not isinstance(saved_state, Mapping):
        raise TypeError("state_dict['state'] must be a dict of per-parameter states")
    unknown = set(saved_state) - set(saved_ids)
    if unknown:
        raise ValueError(f"state_dict['state'] has entries for unknown parameter ids {sorted(map(str, unknown))[:5]}")
    states = {}
    max_step = 0.0
    refused = None
    try:
        for pid, p in zip(saved_ids, params):
            if pid not in saved_state:
                continue
            state, step = _convert_state(opt, saved_state[pid], p, f"state_dict['state'][{pid!r}]")
            states[p] = state
            max_step = max(max_step, step)
    except Exception as exc:  # noqa: BLE001 - every rank must hear of any failure (the next collective)
        refused = exc
    _agree_on_the_shards(params, refused)
    if from_section and isinstance(num_steps, int) and num_steps < max_step:
        # The packed copy rode along in a torch.optim.AdamW that went on training (it keeps
        # unknown group keys): its guard state and step count describe older weights.
        warnings.warn(f"state_dict: the packed lbw_guard section is of step {num_steps}, but the parameters "
                      f"were stepped {int(max_step)} times (the state dict went through another optimizer); "
                      "ignoring the section: the guard starts afresh", stacklevel=3)
        num_steps, guard_state, spike_floor = None, None, None
    if num_steps is None:  # a torch.optim.AdamW state dict: continue from its step counts
        num_steps = int(max_step)
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"state_dict['num_steps'] must be an int >= 0, got {num_steps!r}")
    if guard_state is not None:
        if not isinstance(guard_state, Mapping):
            raise TypeError(f"state_dict['guard'] must be a dict (a Guard.state_dict()), got "
                            f"{type(guard_state).__name__}")
        if opt.guard is not None:
            _check_guard_state(opt, guard_state, num_steps, params)
    floors = check_spike_floor(spike_floor, len(params)) if spike_floor is not None else None
    return LoadPlan(sd, states, num_steps, dict(guard_state) if guard_state is not None else None, floors)


def _agree_on_the_shards(params: list, refused: Exception | None) -> None:
    """Each rank checks only its own shard of a sharded (FSDP2) moment: every rank refuses the
    checkpoint if any did (one all-reduce of a flag), so none goes on to a collective alone."""
    from . import distributed

    group = distributed.shard_group(params)
    if group is not None and distributed.is_distributed():
        flag = torch.tensor([0.0 if refused is None else 1.0], device=params[0].device)
        distributed.sum_over_group(flag, group)
        if refused is None and float(flag) > 0:
            raise ValueError("state_dict['state']: another rank refused its shard of the moments (its error names "
                             "the entry); refused on every rank")
    if refused is not None:
        raise refused


def check_spike_floor(layouts, num_params: int, where: str = "state_dict['spike_floor']") -> dict:
    """The saved floors of the spike bound (``FusedGuardedAdamW._spike_floor_state``) as
    {parameter positions: [[sum of v, numel], ...]}; a malformed entry is refused, named."""
    if not isinstance(layouts, (list, tuple)):
        raise TypeError(f"{where} must be a list of bucket layouts, got {type(layouts).__name__}")
    out = {}
    for i, layout in enumerate(layouts):
        at = f"{where}[{i}]"
        if not isinstance(layout, Mapping):
            raise TypeError(f"{at} must be a dict with 'params' and 'sums', got {type(layout).__name__}")
        positions, sums = layout.get("params"), layout.get("sums")
        if not isinstance(positions, (list, tuple)) or not positions or not all(
                isinstance(k, int) and not isinstance(k, bool) and 0 <= k < num_params for k in positions):
            raise ValueError(f"{at}['params'] must list parameter positions in [0, {num_params}), got {positions!r:.200}")
        if any(a >= b for a, b in zip(positions, positions[1:])):
            raise ValueError(f"{at}['params'] must be increasing (each parameter once), got {positions!r:.200}")
        if tuple(positions) in out:
            raise ValueError(f"{at}['params']: a second entry for the same parameters")
        if not isinstance(sums, (list, tuple)) or len(sums) != len(positions):
            raise ValueError(f"{at}['sums'] must hold one [sum of v, numel] pair per parameter "
                             f"({len(positions)}), got {sums!r:.200}")
        for j, pair in enumerate(sums):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0
                    for x in pair)):
                raise ValueError(f"{at}['sums'][{j}] must be [sum of v, numel], two finite numbers >= 0, "
                                 f"got {pair!r:.200}")
        out[tuple(positions)] = [[float(x) for x in pair] for pair in sums]
    return out


def _convert_state(opt, saved, p: Tensor, where: str) -> tuple[dict, float]:
    if not isinstance(saved, Mapping):
        raise TypeError(f"{where} must be a dict, got {type(saved).__name__}")
    if "max_exp_avg_sq" in saved:
        raise ValueError(f"{where} holds AMSGrad's max_exp_avg_sq; FusedGuardedAdamW does not support amsgrad")
    missing = [k for k in STATE_KEYS if k not in saved]
    if missing:
        raise ValueError(f"{where} lacks {missing}; expected the keys {STATE_KEYS}")
    step = saved["step"]
    if isinstance(step, Tensor):
        if step.numel() != 1:
            raise ValueError(f"{where}['step'] must be a scalar, got shape {tuple(step.shape)}")
        if step.device.type == "meta" or step.layout != torch.strided:
            raise ValueError(f"{where}['step'] must be a dense tensor with a value, got one on {step.device}")
        if not (step.is_floating_point() or step.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{where}['step'] must be a real number, got a {step.dtype} tensor")
        step = float(step.detach().cpu())
    elif isinstance(step, bool) or not isinstance(step, (int, float)):
        raise TypeError(f"{where}['step'] must be a number, got {type(step).__name__}")
    step = float(step)
    if not math.isfinite(step) or step < 0 or step != int(step):
        raise ValueError(f"{where}['step'] must be a whole number >= 0, got {step}")
    dtype = opt._state_dtype(p)
    out = {"step": torch.tensor(step, dtype=torch.float32, device=p.device)}
    for key in ("exp_avg", "exp_avg_sq"):
        value = saved[key]
        if not isinstance(value, Tensor):
            raise TypeError(f"{where}[{key!r}] must be a tensor, got {type(value).__name__}")
        if tuple(value.shape) != tuple(p.shape):
            raise ValueError(f"{where}[{key!r}] has shape {tuple(value.shape)}, its parameter {tuple(p.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{where}[{key!r}] has dtype {value.dtype}; expected a floating tensor")
        if value.device.type == "meta" or value.layout != torch.strided:
            raise ValueError(f"{where}[{key!r}] must be a dense tensor with values, got one on {value.device} "
                             f"with layout {value.layout}")
        local = value.detach()
        if not bool(torch.isfinite(local).all()):
            raise ValueError(f"{where}[{key!r}] holds NaN or inf values")
        if key == "exp_avg_sq" and bool((local < 0).any()):
            raise ValueError(f"{where}['exp_avg_sq'] holds negative values; a second moment is >= 0")
        moment = torch.empty_like(p, dtype=dtype, memory_format=torch.preserve_format)
        moment.copy_(local)
        out[key] = moment
    return out, step


def _check_guard_state(opt, guard_state: Mapping, num_steps: int, params: list) -> None:
    """The guard's dry run of its state (every error as a ValueError/TypeError naming
    ``state_dict['guard']``), and the snapshot ring checked against the tensors it would restore."""
    try:
        opt.guard.check_state_dict(guard_state, num_steps)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, OverflowError) as exc:
        message = str(exc)
        if not message.startswith("state_dict['guard']"):
            message = f"state_dict['guard'] is invalid: {type(exc).__name__}: {message}"
        raise (TypeError if isinstance(exc, TypeError) else ValueError)(message) from exc
    if guard_state.get("snapshots") is not None:
        _check_snapshots(guard_state["snapshots"], num_steps, _snapshot_layout(opt, params))


def _snapshot_layout(opt, params: list) -> list[tuple]:
    """Per parameter, the (shape, dtype) of the tensors a snapshot holds for it: the parameter,
    then, if it had a state when the snapshot was taken, its step, exp_avg and exp_avg_sq."""
    from .distributed import local_tensor

    out = []
    for p in params:
        shape = tuple(local_tensor(p).shape)
        moment = opt._state_dtype(p)
        out.append(((shape, p.dtype), (((), torch.float32), (shape, moment), (shape, moment))))
    return out


def _check_snapshots(snaps, num_steps: int, layout: list) -> None:
    """Every saved snapshot must be a snapshot of these parameters, tensor for tensor: a rollback
    copies each buffer into its tensor in place, so a wrong shape (a (1,)-shaped buffer would
    broadcast into a whole weight), dtype or count is refused here, naming the buffer."""
    where = "state_dict['guard']['snapshots']"
    if not isinstance(snaps, Mapping):
        raise TypeError(f"{where} must be a dict, got {type(snaps).__name__}")
    slots = snaps.get("slots", [])
    if not isinstance(slots, (list, tuple)):
        raise TypeError(f"{where}['slots'] must be a list, got {type(slots).__name__}")
    seen = set()
    for i, slot in enumerate(slots):
        at = f"{where}['slots'][{i}]"
        if not isinstance(slot, Mapping):
            raise TypeError(f"{at} must be a dict, got {type(slot).__name__}")
        step = slot.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= num_steps:
            raise ValueError(f"{at}['step'] must be an int in [0, num_steps={num_steps}], got {step!r}")
        if step in seen:
            raise ValueError(f"{at}['step']: two snapshots of step {step}")
        seen.add(step)
        buffers = slot.get("buffers")
        if not isinstance(buffers, (list, tuple)):
            raise TypeError(f"{at}['buffers'] must be a list of tensors, got {type(buffers).__name__}")
        for j, buf in enumerate(buffers):
            if not isinstance(buf, Tensor):
                raise TypeError(f"{at}['buffers'][{j}] must be a tensor, got {type(buf).__name__}")
            if buf.device.type == "meta" or buf.layout != torch.strided:
                raise ValueError(f"{at}['buffers'][{j}] must be a dense tensor with values, got one on "
                                 f"{buf.device} with layout {buf.layout}")
        _match_snapshot([(tuple(b.shape), b.dtype) for b in buffers], layout, at)
        _check_snapshot_layout(slot.get("layout"), len(layout), len(buffers), at)
        for j, buf in enumerate(buffers):
            if not bool(torch.isfinite(buf.detach()).all()):
                raise ValueError(f"{at}['buffers'][{j}] holds NaN or inf values; a snapshot is a healthy state")


def _check_snapshot_layout(keys, num_params: int, num_buffers: int, at: str) -> None:
    """The state keys each parameter had when the snapshot was taken (None: saved before they
    were kept), as the ring saves them: one list per parameter, the buffers they account for."""
    if keys is None:
        return
    from .guard.snapshots import STATE_KEYS

    if not isinstance(keys, (list, tuple)) or len(keys) != num_params or not all(
            isinstance(k, (list, tuple)) and all(x in STATE_KEYS for x in k) and len(set(k)) == len(k) for k in keys):
        raise ValueError(f"{at}['layout'] must list, for each of the {num_params} parameters, the state keys "
                         f"(of {STATE_KEYS}) it had; got {keys!r:.200}")
    if num_params + sum(len(k) for k in keys) != num_buffers:
        raise ValueError(f"{at}['layout'] accounts for {num_params + sum(len(k) for k in keys)} buffers, "
                         f"the snapshot holds {num_buffers}")


def _match_snapshot(found: list[tuple], layout: list, at: str) -> None:
    """``found`` must read as, per parameter, its tensor optionally followed by its state's three."""
    reachable = {0}  # buffer offsets at which the next parameter's tensor may start
    for i, (param, state) in enumerate(layout):
        nxt = set()
        for j in reachable:
            if j < len(found) and found[j] == param:
                nxt.add(j + 1)
                if tuple(found[j + 1:j + 4]) == state:
                    nxt.add(j + 4)
        if not nxt:
            j = max(reachable)
            got = f"{found[j][1]} of shape {found[j][0]}" if j < len(found) else "nothing"
            raise ValueError(f"{at}['buffers'][{j}] is {got}; parameter {i} of this optimizer is "
                             f"{param[1]} of shape {param[0]} (the snapshot is of other parameters)")
        reachable = nxt
    if len(found) not in reachable:
        raise ValueError(f"{at}['buffers'] holds {len(found)} tensors, which do not form a snapshot of this "
                         f"optimizer's {len(layout)} parameters and their states (another model?)")


# ---------------------------------------------------------------------------- DCP support
# torch.distributed.checkpoint (``get_optimizer_state_dict`` / ``set_optimizer_state_dict``, the
# FSDP2 checkpoints of Accelerate and the HF Trainer) keeps only "state" and "param_groups" of an
# optimizer state dict, with every non-"params" key of each group. So ``state_dict()`` also packs
# ``num_steps``, the guard state (its snapshots and start excepted: per-rank tensors) and the
# spike bound's floors (whole-tensor sums, alike on every rank) into one
# opaque bytes value of the first group: DCP saves a bytes value as one item, and loads it into a
# template whatever its length. Loading prefers the top-level entries when they are there.


def pack_section(num_steps: int, guard_state: dict | None, spike_floor: list | None = None) -> bytes | None:
    """``num_steps``, the guard state and the spike bound's floors as compressed JSON (None if
    the state is not JSON)."""
    guard = None
    if guard_state is not None:
        guard = {k: v for k, v in guard_state.items() if k not in ("snapshots", "start")}
    try:
        text = json.dumps({"version": SECTION_VERSION, "num_steps": num_steps, "guard": guard,
                           "spike_floor": spike_floor})
    except (TypeError, ValueError):  # a guard state that is not JSON: carried top-level only
        return None
    return zlib.compress(text.encode("utf-8"), 6)


def unpack_section(section) -> tuple[int, dict | None, list | None]:
    """Inverse of :func:`pack_section`; ValueError names what is wrong."""
    where = f"state_dict['param_groups'][0][{SECTION_KEY!r}]"
    if not isinstance(section, (bytes, bytearray, str)):
        raise TypeError(f"{where} must be bytes (packed by FusedGuardedAdamW.state_dict), "
                        f"got {type(section).__name__}")
    try:
        raw = zlib.decompress(bytes(section)) if not isinstance(section, str) else section.encode("utf-8")
        payload = json.loads(raw.decode("utf-8"))
    except (zlib.error, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{where} is malformed: {exc}") from None
    if not isinstance(payload, dict) or payload.get("version") != SECTION_VERSION:
        raise ValueError(f"{where} is not a version-{SECTION_VERSION} lbw-guard section")
    guard = payload.get("guard")
    if guard is not None and not isinstance(guard, dict):
        raise TypeError(f"{where}: the guard state must be a dict")
    return payload.get("num_steps"), guard, payload.get("spike_floor")  # no floors: an older section


OPTION_KEYS = ("guard", "backend", "max_grad_norm", "telemetry_group")
"""FusedGuardedAdamW's constructor options that are not per-group hyperparameters.
``ZeroRedundancyOptimizer(params, optimizer_class=FusedGuardedAdamW, **kwargs)`` keeps its
kwargs as defaults of its own param groups and copies them into every group it hands to the
local optimizer, so they show up there."""


def finish_state_dict(state_dict: dict, num_steps: int, guard_state: dict | None,
                      spike_floor: list | None = None) -> None:
    """Drop :data:`OPTION_KEYS` from the saved param groups (copies made by
    ``torch.optim.Optimizer.state_dict``) and put the packed section into the first one."""
    groups = state_dict.get("param_groups")
    if not groups:
        return
    for group in groups:
        for key in OPTION_KEYS:
            group.pop(key, None)
    section = pack_section(num_steps, guard_state, spike_floor)
    if section is not None:
        groups[0][SECTION_KEY] = section


def _pop_section(groups) -> tuple[list, object]:
    """The groups without the section key, and the first section found (or None)."""
    out, section = [], None
    for g in groups:
        if SECTION_KEY in g:
            g = {k: v for k, v in g.items() if k != SECTION_KEY}
            section = section if section is not None else groups[len(out)][SECTION_KEY]
        out.append(g)
    return out, section


def check_section(opt, section) -> tuple:
    """A packed section, unpacked and checked against ``opt`` (raises before anything changes):
    (num_steps, guard state, spike floors) for :func:`apply_section`."""
    num_steps, guard_state, spike_floor = unpack_section(section)
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"the packed num_steps must be an int >= 0, got {num_steps!r}")
    if guard_state is not None and opt.guard is not None:
        opt.guard.check_state_dict(guard_state, num_steps)
    num_params = sum(len(g["params"]) for g in opt.param_groups)
    floors = check_spike_floor(spike_floor, num_params, "the packed spike_floor") if spike_floor is not None else None
    return num_steps, guard_state, floors


def apply_section(opt, checked: tuple) -> None:
    """Restore ``num_steps``, the guard state and the spike bound's floors from a packed section
    (used where a loader dropped the param-group key, e.g. DCP's ``flatten_optimizer_state_dict``);
    ``checked``: what :func:`check_section` returned for it."""
    num_steps, guard_state, floors = checked
    opt.num_steps = num_steps
    opt._load_spike_floor(floors)
    if opt.guard is not None:
        opt.guard.bind(opt)
        if guard_state is not None:
            opt.guard.load_state_dict(guard_state)
        else:  # an unguarded run's section: what the guard learnt was about other weights
            opt.guard.reset()


@torch.no_grad()
def dcp_initialising_step(opt) -> bool:
    """Whether this ``step()`` is torch.distributed.checkpoint's initialising step; if so, create
    the missing states (zero moments, step 0) and nothing else.

    ``torch.distributed.checkpoint.state_dict._init_optim_state`` creates the states of an
    optimizer that has none by setting every ``lr`` to 0 and every gradient to zeros and calling
    ``step()``. Called only while the optimizer has no state: every lr is then read (a 0-d lr
    tensor once on the host) and, only if all are 0, whether every gradient is all zeros (one
    sync, summed over the shard or telemetry group so every rank decides alike).
    """
    from . import distributed

    params = [p for g in opt.param_groups for p in g["params"]]
    if not params or any(p.requires_grad and p.grad is None for p in params):
        return False
    for group in opt.param_groups:
        lr = group["lr"]
        if (float(lr.detach().reshape(())) if isinstance(lr, Tensor) else float(lr)) != 0.0:
            return False
    with_grads = [p for p in params if p.grad is not None]
    if not with_grads:
        return False
    device = with_grads[0].device
    nonzero = torch.zeros((), dtype=torch.float64, device=device)
    for p in with_grads:
        nonzero += distributed.local_tensor(p.grad).count_nonzero().to(device)
    group = distributed.shard_group(with_grads) or opt.telemetry_group
    distributed.sum_over_group(nonzero, group)
    if float(nonzero) != 0.0:
        return False
    for p in with_grads:
        if not opt.state[p]:
            opt.state[p].update(opt._init_state(p))
    return True
