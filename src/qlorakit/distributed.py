"""The processes of one training run, on torch.distributed: joined from the environment torchrun (or accelerate
launch) sets, gloo on a CPU and nccl on CUDA (launcher.py starts them).

A run on N processes trains exactly as one process with N times the batch: every rank holds the same adapters, takes
its share of each global micro-batch (data/batches.py), and the LoRA gradients alone are summed across ranks by
torch's DistributedDataParallel (frozen quantized weights do not require gradients, so they never enter its buckets).
Rank 0 alone touches the run directory; what it reads there (a resume's checkpoint) reaches the other ranks through
the process group, so on several nodes only rank 0's needs the files.
"""

from __future__ import annotations

import gc
import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta

import torch

from .errors import ConfigError, QLoraKitError, TrainingError
from .launcher import die_with_launcher, env_int, launched

# How long a rank waits in a collective for the others before it stops with an error (QLORAKIT_DIST_TIMEOUT,
# seconds). A rank that dies closes its connections and the others stop at once on gloo; the timeout bounds what
# cannot be seen that way (a hung rank, a node cut off, nccl).
DEFAULT_TIMEOUT_S = 600


@dataclass
class Processes:
    """This process's place in the run: rank, world size, local rank; one process when torch.distributed is not in
    use (the methods then do nothing)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this run set the process group up, and takes it down at the end

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world}"

    def sum(self, values: list[float], device: torch.device | None = None) -> list[float]:
        """Each value summed over the ranks (in precision.REDUCE_DTYPE, so token counts stay exact)."""
        from .precision import REDUCE_DTYPE

        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=REDUCE_DTYPE, device=self._device(device))
        self._collective(torch.distributed.all_reduce, tensor)
        return tensor.tolist()

    def on_main(self, fn, *args, send: bool = True, **kwargs):
        """fn(*args, **kwargs) run on rank 0 alone, its result sent to the others (objects: checkpoints, settings;
        with send=False the others get None). An exception on rank 0 is raised on every rank, so no rank goes on
        alone into a collective the others never reach; on the other ranks it is marked `from_main` (the CLI leaves
        saying it to rank 0)."""
        if not self.distributed:
            return fn(*args, **kwargs)
        box = [None]
        if self.is_main:
            try:
                result = fn(*args, **kwargs)
                box[0] = ("ok", result if send else None)
            except BaseException as e:
                try:
                    self._collective(torch.distributed.broadcast_object_list, [("error", _portable(e))], src=0)
                except TrainingError:  # the others are gone already: rank 0's own error is the one to say
                    pass
                raise
        self._collective(torch.distributed.broadcast_object_list, box, src=0)
        kind, value = box[0]
        if kind == "error":
            value.from_main = True
            raise value
        return result if self.is_main else value

    def gather(self, value) -> list | None:
        """Every rank's `value` on rank 0 (in rank order), None on the others."""
        if not self.distributed:
            return [value]
        out = [None] * self.world if self.is_main else None
        self._collective(torch.distributed.gather_object, value, out, dst=0)
        return out

    def agree(self, facts: dict) -> None:
        """Refuse to go on unless every rank has the same `facts` (settings, a fingerprint of the data): ranks
        started with other flags, or on a node with other files, would train on their own and give an adapter
        that is no one's. Rank 0 compares and names the first difference; every rank raises it."""
        if not self.distributed:
            return
        everyone = self.gather(facts)

        def compare():
            for rank, theirs in enumerate(everyone[1:], start=1):
                for key, mine in everyone[0].items():
                    if theirs.get(key) != mine:
                        raise ConfigError(
                            f"rank {rank} of {self.world} runs with {key}={_short(theirs.get(key))}, rank 0 with "
                            f"{key}={_short(mine)}: every process of a run needs the same settings and data; start "
                            "them with the same command (on several nodes, with the same files)"
                        )

        self.on_main(compare)

    def no_sync(self, ddp, last: bool):
        """The context a micro-batch's backward runs in: gradients are summed across ranks on the step's last
        micro-batch only (no_sync keeps the others local, as DDP intends for accumulation)."""
        return nullcontext() if ddp is None or last else ddp.no_sync()

    def _device(self, device):
        if torch.distributed.get_backend() == "nccl":
            return device or torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _collective(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, ConnectionError) as e:  # torch.distributed.DistError subclasses RuntimeError
            raise lost_contact(self, e) from None

    def close(self) -> None:
        if self.owns_group and torch.distributed.is_initialized():
            # DDP's reducer holds the group (and gloo's worker threads) from hooks in reference cycles: collected
            # first, so that the group's threads end here and not in the interpreter's teardown, where gloo aborts
            # the process ("terminate called without an active exception", seen 1 run in 6 before).
            gc.collect()
            torch.distributed.destroy_process_group()
            self.owns_group = False


def is_communication_error(error: BaseException) -> bool:
    """Whether an error raised inside a step (DDP's gradient sums, FSDP's gathers) is the process group failing —
    torch raises a DistError, or from gloo's transport a plain RuntimeError naming it — rather than the step's own."""
    if isinstance(error, (torch.distributed.DistError, ConnectionError)):
        return True
    text = str(error)
    return any(mark in text for mark in ("third_party/gloo", "ProcessGroupGloo", "ProcessGroupNCCL", "NCCL error",
                                         "Connection reset by peer", "Connection closed by peer"))


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


class LostContact(TrainingError):
    """A collective failed: another rank of the run stopped, or does not answer."""


def lost_contact(processes: Processes, error: BaseException) -> LostContact:
    return LostContact(
        f"{processes.describe()}: lost contact with the run's other processes ({str(error).splitlines()[0][:300]}); "
        "another rank stopped or hangs: its own message, or the launcher's summary, names it and why"
    )


def _portable(error: BaseException) -> BaseException:
    """The error as the other ranks raise it: qlorakit's errors as they are, others as a TrainingError in words
    (an arbitrary exception may not survive pickling)."""
    if isinstance(error, QLoraKitError):
        try:
            clone = type(error)(*error.args)
            clone.__dict__.update({k: v for k, v in error.__dict__.items() if _picklable(v)})
            return clone
        except Exception:  # an error class with another constructor
            pass
    return TrainingError(f"rank 0 stopped: {type(error).__name__}: {error}")


def _picklable(value) -> bool:
    import pickle

    try:
        pickle.dumps(value)
        return True
    except Exception:
        return False


def join_run(device: str) -> Processes:
    """This process's place in the run, from the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT); the process group is set up here when the caller has not done it. One process without a
    launcher. On CUDA each rank takes the GPU of its local rank."""
    if not launched():
        return Processes()
    dist = torch.distributed
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed, which a run on several processes needs")
    rank, world, local_rank = env_int("RANK", 0), env_int("WORLD_SIZE", 1), env_int("LOCAL_RANK", 0)
    if rank >= world:
        raise ConfigError(f"RANK={rank} with WORLD_SIZE={world}: a rank is below the world size; start the run with "
                          "torchrun, which sets both")
    timeout = timedelta(seconds=_timeout_s())
    cuda = _wants_cuda(device)
    if cuda:
        if torch.cuda.device_count() <= local_rank:
            raise ConfigError(
                f"rank {rank} has local rank {local_rank} but this machine shows {torch.cuda.device_count()} CUDA "
                "device(s): start at most one process per GPU (--nproc-per-node), or train on the CPU (--device cpu)"
            )
        torch.cuda.set_device(local_rank)
    die_with_launcher()
    owns = False
    if not dist.is_initialized():
        try:
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
        except (RuntimeError, ValueError, ConnectionError) as e:
            raise TrainingError(
                f"rank {rank} of {world}: could not join the run's other processes ({str(e).splitlines()[0][:300]}); "
                "check the launcher's rendezvous settings (--rdzv-endpoint, MASTER_ADDR/MASTER_PORT)"
            ) from None
        owns = True
    if rank:  # rank 0 speaks for the run: the others keep qlorakit's warnings (the same on every rank) to errors
        logging.getLogger("qlorakit").setLevel(logging.ERROR)
    return Processes(rank, world, local_rank, owns)


def _timeout_s() -> float:
    text = os.environ.get("QLORAKIT_DIST_TIMEOUT")
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not (1 <= seconds < 10**7):
        raise ConfigError(f"QLORAKIT_DIST_TIMEOUT={text!r}: how long a rank waits for the others, in seconds; give "
                          f"a number of at least 1 (default {DEFAULT_TIMEOUT_S}), or unset it")
    return seconds


def _wants_cuda(device: str) -> bool:
    name = str(device or "auto").lower()
    if name.startswith("cuda"):
        if ":" in name:
            raise ConfigError(
                f"--device {device} on several processes: each process takes the GPU of its local rank; use "
                "--device cuda (or auto), and choose the GPUs with CUDA_VISIBLE_DEVICES"
            )
        return True
    return name == "auto" and torch.cuda.is_available()


def device_of(processes: Processes, device: str) -> str:
    """The device a rank loads its model on: its own GPU on CUDA, else as asked."""
    if processes.distributed and _wants_cuda(device):
        return f"cuda:{processes.local_rank}"
    return device


def wrap(model: torch.nn.Module, processes: Processes, compute=None):
    """The run's loss computation in DistributedDataParallel: None for one process. The adapters start equal on
    every rank (rank 0's, sent to the others); only trainable parameters (the adapters) are registered — frozen
    quantized weights never enter DDP's buckets — and DDP does not send the frozen base at start (init_sync off:
    every rank loaded the same)."""
    if not processes.distributed:
        return None
    from torch.nn.parallel import DistributedDataParallel

    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                processes._collective(torch.distributed.broadcast, p.data, src=0)
    device = next(p for p in model.parameters() if p.requires_grad).device
    return DistributedDataParallel(LossOf(model, compute),
                                   device_ids=[device.index] if device.type == "cuda" else None,
                                   init_sync=False, forward_sync_buffers=False)


class LossOf(torch.nn.Module):
    """The training objective's forward (`compute(model, inputs, labels, sequences)`: train.LanguageModeling's
    batch_loss by default, or a preference objective's per-sequence log-probabilities) as a module, for
    DistributedDataParallel and FSDP to wrap: they start their gradient hooks (and gathers) in its forward, and
    qlorakit computes from the decoder and the output head, not the model's own forward."""

    def __init__(self, model, compute=None):
        super().__init__()
        self.model = model
        self.compute = compute

    def forward(self, inputs: dict, labels: torch.Tensor, sequences: torch.Tensor | None = None):
        if self.compute is None:
            from .loss import batch_loss

            return batch_loss(self.model, inputs, labels)
        return self.compute(self.model, inputs, labels, sequences)


# ---- FSDP2
# `--fsdp`: the frozen quantized base sharded across the ranks (torch's fully_shard, one unit per decoder layer, the
# rest — embeddings, final norm, output head — in the root unit) instead of a whole copy on each. A layer's weights
# are gathered for its forward and again for its backward, then freed: a rank holds 1/N of the base plus one
# layer's whole. The LoRA parameters are sharded too, each rank's part in the policy's dtype as it was: no
# MixedPrecisionPolicy (the policy set every dtype already, and a cast of packed 4-bit codes would ruin them).


def check_shardable(processes: Processes, quant: str | None = None) -> None:
    """--fsdp needs several processes and a 4-bit (or unquantized) base: checked before the model loads (the
    model's own checks are shard's)."""
    if not processes.distributed:
        raise ConfigError(
            "--fsdp shards the model across the run's processes, and this run has one: start several "
            "(--nproc-per-node N, or torchrun), or leave --fsdp off"
        )
    if quant == "int8":
        raise _int8_not_shardable()


def _int8_not_shardable() -> ConfigError:
    return ConfigError(
        "--fsdp with quant=int8: LLM.int8 weights cannot be sharded (bitsandbytes keeps their row scales beside "
        "the int8 codes, where FSDP does not reach them): use DDP (leave --fsdp off), or quant=nf4 / fp4"
    )


def check_launch(config, nproc: int) -> None:
    """What `--nproc-per-node` can refuse before torchrun starts any process, once instead of once per rank: the
    timeout, the device, --fsdp's needs."""
    _timeout_s()
    _wants_cuda(config.device)
    if config.fsdp:
        check_shardable(Processes(world=nproc), config.quant)


def shard(model: torch.nn.Module, processes: Processes, optimizer: torch.optim.Optimizer | None = None,
          compute=None):
    """The model's decoder layers and then its loss computation (LossOf, the root unit: qlorakit's loss reads the
    decoder and the head, not the model's forward, so the root's gather must run around batch_loss) sharded
    across the ranks with FSDP2; returns the root, which the training step calls as DDP's wrapper. The adapters
    start equal everywhere (rank 0's); `optimizer`, made before sharding and not yet stepped, is pointed at the
    sharded parameters (fully_shard replaces them). Outside the root's forward (evaluation), the root's weights are
    gathered when the decoder runs, and stay gathered until the next step's backward frees them."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from .upstream import bitsandbytes as bnb
    from .upstream.transformers import plain_output_head

    check_shardable(processes)
    if any(True for _ in bnb.quantized_layers(model, "int8")):
        raise _int8_not_shardable()
    for name, module, _ in bnb.quantized_layers(model, "4bit"):
        if module.weight.dtype != torch.uint8:
            raise ConfigError(
                f"--fsdp: the 4-bit layer {name} packs its codes in {module.weight.dtype} (bnb_4bit_quant_storage "
                "of a pre-quantized checkpoint); qlorakit shards 4-bit codes stored as uint8, as qlorakit.load "
                "quantizes: load the unquantized model, or leave --fsdp off (DDP)"
            )
    parts = plain_output_head(model)
    decoder = parts[0] if not isinstance(parts, str) else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise ConfigError(
            "--fsdp shards a decoder whose logits are lm_head(decoder(...)) layer by layer; this model's are not "
            f"({parts if isinstance(parts, str) else 'no decoder layers found'}): leave --fsdp off (DDP)"
        )
    trainable = [p for p in model.parameters() if p.requires_grad]
    device = trainable[0].device
    names = {id(p): name for name, p in model.named_parameters()}
    if optimizer is not None and (optimizer.state or any(id(p) not in names for g in optimizer.param_groups
                                                         for p in g["params"])):
        raise ConfigError("shard(optimizer=...): the optimizer must be made for this model's parameters and "
                          "must not have taken a step yet (sharding replaces the parameters)")
    with torch.no_grad():
        for p in trainable:
            processes._collective(torch.distributed.broadcast, p.data, src=0)
    for _, module, _ in bnb.quantized_layers(model, "4bit"):
        bnb.keep_quant_state_on_layer(module)
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))  # the run's process group
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    root = fully_shard(LossOf(model, compute), mesh=mesh)

    def gather_root(module, args, kwargs):  # a no-op inside the root's forward, where its weights are gathered
        root.unshard()

    decoder.register_forward_pre_hook(gather_root, with_kwargs=True)
    if optimizer is not None:
        sharded = dict(model.named_parameters())
        for group in optimizer.param_groups:
            group["params"] = [sharded[names[id(p)]] for p in group["params"]]
    return root


def full_trainable_state(root) -> dict[str, torch.Tensor]:
    """The trainable parameters of a sharded model, whole, by name (as a one-process model names them); every rank
    must call it (it gathers), every rank gets them."""
    from .upstream.bitsandbytes import is_dtensor

    root.reshard()  # parameters gathered for an evaluation are the sharded ones again
    return {name: (p.full_tensor() if is_dtensor(p) else p).detach().clone()
            for name, p in root.model.named_parameters() if p.requires_grad}


def _state_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_optimizer_state(root, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state of a sharded model, whole, in the format of optimizer.state_dict() on one process
    (parameters numbered in the order of the optimizer's groups), so that a checkpoint resumes with or without
    --fsdp. Every rank must call it (it gathers); rank 0 gets the state, the others an empty dict."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    root.reshard()
    state = get_optimizer_state_dict(root.model, optimizer, options=_state_options(cpu_offload=True))
    if not state:  # ranks other than 0 (cpu_offload keeps the whole state on rank 0 alone)
        return {}
    order = {name: i for i, name in enumerate(n for group in state["param_groups"] for n in group["params"])}
    return {"state": {order[name]: value for name, value in state["state"].items()},
            "param_groups": [group | {"params": [order[n] for n in group["params"]]}
                             for group in state["param_groups"]]}


def load_full_optimizer_state(root, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Restore a whole optimizer state (optimizer.state_dict()'s format, as a one-process run or
    full_optimizer_state saved it) into the optimizer of a sharded model; every rank calls it with the same state."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    root.reshard()
    names = {id(p): name for name, p in root.model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    if len(order) != sum(len(group["params"]) for group in state["param_groups"]):
        raise ValueError(f"the saved optimizer state has {sum(len(g['params']) for g in state['param_groups'])} "
                         f"parameters, this optimizer {len(order)}")
    named = {"state": {order[int(i)]: value for i, value in state["state"].items()},
             "param_groups": [group | {"params": [order[int(i)] for i in group["params"]]}
                              for group in state["param_groups"]]}
    set_optimizer_state_dict(root.model, optimizer, named, options=_state_options())
