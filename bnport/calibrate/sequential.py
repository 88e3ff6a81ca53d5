"""Sequential calibration: each BN layer's statistics measured on the activations the deployed model gives it.

ema and exact mode measure every layer in one forward with every BN normalising by batch statistics, but the exported
model normalises with the new running statistics, so from the second layer on the stored statistics describe inputs
the deployed model never sees (the gap grows with depth: bnport.calibrate.consistency measures it). Sequential mode
takes the layers one at a time, in the order the forward calls them: layer k's statistics are the exact pooled
mean and unbiased variance (float64 moments, bnport.calibrate.moments) of its input over every image of the run,
with layers 1..k-1 in eval mode holding their new statistics and layer k and the later ones not yet involved. The
images are the run's batches (noise mixed in), the same for every layer.

Cost. A pass per layer over every image, naively, is O(L^2) forward work (79 layers on iresnet50). Instead the
forward is traced with torch.fx (`GraphRunner`; BN layers kept as leaves), and for each batch the values that are
still needed at the cut before layer k (the "live set": the layer's input, plus a block's identity branch) are
kept, so pass k only runs the nodes between the two cuts: every node runs once per image, as in one forward. The
cache advances to a cut only when its live set for every image of this process fits in the memory budget (half the
memory available at the start, on the calibration device); until then a pass runs from the last cut that fitted, or
from the images (early layers of a large run at full resolution), stopping at the layer it measures. The images are
held on the host when they fit in the same budget, otherwise read again for each pass (the loader seeds each batch
by its global index, so a re-read gives the same images and noise). A model that torch.fx cannot trace faithfully
(data-dependent Python, a BN called at two sites of the forward, a trace whose output differs from the model's)
runs with `HookRunner` instead: the whole model from its input for every layer, stopped after that layer's last
call (correct, about L/2 forwards). Which runner ran, and why, is recorded in the snapshot's JSON.

Steps and snapshots. The run's steps choose its images (`--steps`/`--epochs` x the batch size) as in the other
modes, but the statistics exist only when every layer is done, so a run writes one snapshot, 0001, after the last
layer (beside the baseline 0000); `--snapshot-every` is refused. After a layer, at most every `PROGRESS_SECONDS`,
rank 0 writes the statistics so far to `RUN/sequential.progress.safetensors`; `--resume` continues from the layer
after the last one recorded (re-running the calibrated
layers on the same images) and reaches the same result as an uninterrupted run. Under torchrun each process holds
its own batches, the moments of each layer are summed over the processes, and every process applies the same
statistics before the next layer.
"""
from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
import torch.nn as nn

from bnport.calibrate.moments import channel_moments, pooled
from bnport.errors import BnportError
from bnport.model.snapshot import bn_modules
from bnport.runtime.distributed import Ranks

PROGRESS = "sequential.progress.safetensors"
PROGRESS_SECONDS = 10.0  # the progress file is written after a layer at most this often (each write costs ~10 ms)
BUDGET_SHARE = 0.5  # of the memory available at the start, for held images and cached activations
_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem}


def memory_budget(device: torch.device) -> int:
    """Bytes the sequential run may hold: half of the memory available now on `device` (CUDA: free device memory;
    CPU: MemAvailable of /proc/meminfo, 4 GiB where that cannot be read)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * BUDGET_SHARE)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(int(line.split()[1]) * 1024 * BUDGET_SHARE)
    except OSError:
        pass
    return 4 << 30


class BatchSet:
    """This process's batches of a sequential run. `first` yields them once, as the loader gives them, through `admit`
    (which counts them and deals with unreadable images as every mode does, returning the usable tensor or None); they
    are held on the host while their bytes stay within `budget`, else dropped and read again for each pass through
    `reread` (a fresh loader over the same batches) and the same filter, uncounted."""

    def __init__(self, first: Iterable, admit: Callable, reread: Callable[[], Iterable], budget: int):
        self.reread, self.held, self.bytes, self.images = reread, [], 0, 0
        for batch in first:
            x = admit(batch)
            if x is None:
                continue
            self.images += x.shape[0]
            self.bytes += x.numel() * x.element_size()
            if self.held is not None:
                self.held.append(x)
                if self.bytes > budget:
                    self.held = None

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.held is not None:
            return iter(self.held)
        return (b.images for b in self.reread() if b.images is not None and b.images.shape[0] >= 2)

    @property
    def held_bytes(self) -> int:
        return self.bytes if self.held is not None else 0


class _BnLeafTracer(torch.fx.Tracer):
    """torch.fx's tracer with every BatchNorm a leaf, a user's subclass included (it would be traced through)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, nn.modules.batchnorm._BatchNorm) or super().is_leaf_module(m, qualname)


def _mutates(node: torch.fx.Node, module: nn.Module) -> bool:
    """Whether `node` may write into one of its inputs (in-place operators, methods and modules)."""
    name = getattr(node.target, "__name__", str(node.target))
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_function":
        return node.target in _INPLACE_FUNCTIONS or (name.endswith("_") and not name.endswith("__"))
    if node.op == "call_method":
        return name.endswith("_") and not name.endswith("__")
    if node.op == "call_module":
        return getattr(module.get_submodule(node.target), "inplace", False) is True
    return False


class GraphRunner:
    """The forward of `module` as a torch.fx graph, run a stretch of nodes at a time from the values live at a cut.

    `sites[k]` is the node index of the k-th BN call in forward order; the cut before it is that index. `run(env,
    start, stop)` runs nodes [start, stop) over `env` (node -> value, holding the values live at `start`) and leaves
    in it exactly the values live at `stop`. Raises BnportError (with the reason) when the graph cannot stand for the
    module: untraceable, a BN called at several sites, or an output that differs from the module's on `probe`."""

    kind = "fx"

    def __init__(self, module: nn.Module, names: dict[int, str], probe: torch.Tensor):
        try:
            graph = _BnLeafTracer().trace(module)
        except Exception as e:  # torch.fx raises many types for code it cannot trace
            raise BnportError(f"torch.fx cannot trace the model ({type(e).__name__}: {str(e)[:120]})") from None
        self.module, self.nodes = module, list(graph.nodes)
        index = {node: i for i, node in enumerate(self.nodes)}
        self.targets = {n: module.get_submodule(n.target) for n in self.nodes if n.op == "call_module"}
        self.constants = {n: _fetch(module, n.target) for n in self.nodes if n.op == "get_attr"}
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        self.input = placeholders[0]
        for n in placeholders[1:]:
            if not n.args:
                raise BnportError(f"the model's forward takes a second input ({n.target})")
            self.constants[n] = n.args[0]
        self.free: list[list[torch.fx.Node]] = [[] for _ in self.nodes]
        for i, n in enumerate(self.nodes):
            if n not in self.constants and n.op != "output":
                self.free[max([index[u] for u in n.users], default=i)].append(n)
        self.sites = [(i, names[id(self.targets[n])]) for i, n in enumerate(self.nodes)
                      if n.op == "call_module" and id(self.targets[n]) in names]
        called = [name for _, name in self.sites]
        if len(called) != len(set(called)):
            twice = next(name for name in called if called.count(name) > 1)
            raise BnportError(f"BN layer {twice} is called at several sites of the forward")
        self.mutates = any(_mutates(n, module) for n in self.nodes)
        self.live_bytes = self._check(probe)

    def _lookup(self, env: dict, node):
        return self.constants[node] if node in self.constants else env[node]

    def run(self, env: dict, start: int, stop: int) -> dict:
        for i in range(start, stop):
            node = self.nodes[i]
            if node.op in ("call_module", "call_function", "call_method"):
                args = torch.fx.node.map_arg(node.args, lambda n: self._lookup(env, n))
                kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: self._lookup(env, n))
                if node.op == "call_module":
                    env[node] = self.targets[node](*args, **kwargs)
                elif node.op == "call_function":
                    env[node] = node.target(*args, **kwargs)
                else:
                    env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
            elif node.op == "output":
                env[node] = torch.fx.node.map_arg(node.args[0], lambda n: self._lookup(env, n))
            for dead in self.free[i]:
                env.pop(dead, None)
        return env

    def bn_input(self, env: dict, site: int) -> torch.Tensor:
        return self._lookup(env, self.nodes[site].args[0])

    def _check(self, probe: torch.Tensor) -> list[int]:
        """Run the graph on `probe` cut by cut, comparing its output with the module's; the bytes per image of the
        values live at each BN cut."""
        with torch.no_grad():
            expected = self.module(probe.clone())
            env, cut, sizes = {self.input: probe.clone()}, 0, []
            try:
                for site, _ in self.sites:
                    env = self.run(env, cut, site)
                    cut = site
                    sizes.append(sum(v.numel() * v.element_size() for v in env.values() if torch.is_tensor(v))
                                 // probe.shape[0])
                got = self.run(env, cut, len(self.nodes))[self.nodes[-1]]
            except Exception as e:  # a graph that does not run stands for nothing: the hook runner takes over
                raise BnportError(f"the torch.fx trace of the model fails ({type(e).__name__}: {str(e)[:120]})") \
                    from None
        if not _same(got, expected):
            raise BnportError("the torch.fx trace of the model does not compute what the model does")
        return sizes


def _fetch(module: nn.Module, target: str):
    value = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _same(a, b) -> bool:
    if torch.is_tensor(a) and torch.is_tensor(b):
        return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5 * (float(b.abs().max()) + 1))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b):
        return all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return all(_same(a[k], b[k]) for k in a)
    return a == b


class _Stop(Exception):
    """Raised by a hook to end a forward once the layer being measured has seen its last call."""


class HookRunner:
    """The fallback: for layer k, run the whole model from its input (a copy: a model may write into it), the layer
    measured through a forward pre-hook on all its calls, the forward stopped after its last call. `sites` lists
    (k, name) in the order of the first calls of `probe`'s forward; a layer never called is left out."""

    kind = "hooks"

    def __init__(self, module: nn.Module, bns: list[tuple[str, nn.Module]], probe: torch.Tensor):
        self.module, self.modules = module, dict(bns)
        order, calls = [], {}

        def counter(name):
            def hook(bn, inputs):
                calls[name] = calls.get(name, 0) + 1
                if name not in order:
                    order.append(name)
            return hook

        hooks = [bn.register_forward_pre_hook(counter(name)) for name, bn in bns]
        try:
            with torch.no_grad():
                module(probe.clone())
        finally:
            for h in hooks:
                h.remove()
        self.sites = list(enumerate(order))
        self.calls = calls

    def measure(self, name: str, x: torch.Tensor, record: Callable[[torch.Tensor], None]) -> None:
        bn, seen = self.modules[name], [0]

        def pre(m, inputs):
            record(inputs[0])

        def post(m, inputs, output):
            seen[0] += 1
            if seen[0] == self.calls[name]:
                raise _Stop

        hooks = [bn.register_forward_pre_hook(pre), bn.register_forward_hook(post)]
        try:
            self.module(x.clone())
        except _Stop:
            pass
        finally:
            for h in hooks:
                h.remove()


class SequentialCalibrator:
    """Calibrates the BN layers of `module` (eval mode, parameters frozen: bnport.calibrate.engine.BnCalibrator) one
    at a time, in forward order, over a `BatchSet`; each layer's new statistics go into its buffers before the next
    layer is measured. `probe` is a seeded input every process shares (it decides the runner and the live-set
    sizes, so every process takes the same decisions where they matter); `budget` is the bytes the cache may take
    on the calibration device (on a CPU, less what the held images take). `report` says what ran."""

    def __init__(self, module: nn.Module, ranks: Ranks, probe: torch.Tensor, *, budget: int):
        self.module, self.ranks, self.budget = module, ranks, budget
        self.bns = dict(bn_modules(module))
        probe = probe.to(ranks.device)
        try:
            with torch.no_grad():
                self.runner = GraphRunner(module, {id(bn): name for name, bn in self.bns.items()}, probe)
            why = None
        except BnportError as e:
            self.runner, why = HookRunner(module, list(self.bns.items()), probe), e.message
        self.layers = [name for _, name in self.runner.sites]
        # the baseline means: every process shares them, and they sit near the data's means (bnport.calibrate.moments)
        self.shifts = {name: bn.running_mean.detach().clone() for name, bn in self.bns.items()}
        self.report = {"runner": self.runner.kind, "layers": len(self.layers), "passes_from_cache": 0,
                       "passes_from_images": 0, "cache_peak_bytes": 0}
        if why is not None:
            self.report["why_hooks"] = why

    @torch.no_grad()
    def run(self, batches: BatchSet, *, total_batches: int, done: int = 0,
            after_layer: Callable[[int], None] | None = None) -> None:
        """Calibrate layers `done`.. (those before are already in the buffers: a resumed run) over `batches`;
        `total_batches` (over every process) becomes each layer's num_batches_tracked; `after_layer(k)` is called
        once k layers are done."""
        self.report["images_held"] = batches.held is not None
        passes = self._graph_passes(batches, done) if isinstance(self.runner, GraphRunner) else \
            self._hook_passes(batches, done)
        for k, moments in passes:
            self._finish(self.layers[k], moments, total_batches)
            if after_layer is not None:
                after_layer(k + 1)

    def _zeros(self, name: str) -> torch.Tensor:
        return torch.zeros(3, self.bns[name].num_features, dtype=torch.float64, device=self.ranks.device)

    def _graph_passes(self, batches: BatchSet, done: int):
        """Pass k runs each batch from the cached cut (or its image) to layer k's cut, measures the layer's input and
        keeps the live values there when they fit in the budget."""
        runner, device = self.runner, self.ranks.device
        room = self.budget - (batches.held_bytes if device.type == "cpu" else 0)
        cache, cut = None, 0
        for k in range(done, len(self.layers)):
            site, name = runner.sites[k]
            advance = runner.live_bytes[k] * batches.images <= room
            moments, kept = self._zeros(name), []
            if cache is None:
                self.report["passes_from_images"] += 1
                source = ({runner.input: x.to(device, non_blocking=True)} for x in batches)
            else:
                self.report["passes_from_cache"] += 1
                source = _entries(cache, consume=advance)
            for env in source:
                if runner.mutates and (cache is None or not advance):  # the held images or the kept cache
                    env = {n: v.clone() if torch.is_tensor(v) else v for n, v in env.items()}
                elif not advance:
                    env = dict(env)
                env = runner.run(env, cut, site)
                moments += channel_moments(runner.bn_input(env, site), self.shifts[name])
                if advance:
                    kept.append(env)
            if advance:
                cache, cut = kept, site
                self.report["cache_peak_bytes"] = max(self.report["cache_peak_bytes"],
                                                      runner.live_bytes[k] * batches.images)
            yield k, moments

    def _hook_passes(self, batches: BatchSet, done: int):
        device = self.ranks.device
        for k in range(done, len(self.layers)):
            name = self.layers[k]
            moments = self._zeros(name)

            def record(x, name=name, moments=moments):
                moments.add_(channel_moments(x, self.shifts[name]))

            self.report["passes_from_images"] += 1
            for x in batches:
                self.runner.measure(name, x.to(device, non_blocking=True), record)
            yield k, moments

    def _finish(self, name: str, moments: torch.Tensor, total_batches: int) -> None:
        """Layer `name`'s moments summed over the processes become its statistics (a layer that saw fewer than two
        values keeps its own, as in exact mode)."""
        self.ranks.sum(moments)
        if float(moments[0, 0]) < 2:
            return
        bn = self.bns[name]
        mean, var = pooled(moments, self.shifts[name])
        bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
        bn.running_var.copy_(var.to(bn.running_var.dtype))
        bn.num_batches_tracked.fill_(total_batches)


def _entries(cache: list, *, consume: bool):
    """The cache's entries in order; with `consume`, each is dropped from the cache as it is handed out, so the old
    cut's values are freed while the new cut's are made."""
    for b in range(len(cache)):
        env = cache[b]
        if consume:
            cache[b] = None
        yield env


def save_progress(run_dir: Path, state: dict[str, torch.Tensor], done: int) -> None:
    """Record that the first `done` layers of a sequential run are calibrated (their statistics in `state`, the BN
    buffers of every layer), atomically, for --resume."""
    from safetensors.torch import save

    from bnport.atomic import atomic_write_bytes

    atomic_write_bytes(Path(run_dir) / PROGRESS, save({k: v.contiguous() for k, v in state.items()}, metadata={
        "format": "bnport-sequential-progress", "layers_done": str(done)}))


def load_progress(run_dir: Path) -> tuple[dict[str, torch.Tensor], int] | None:
    """(BN state, layers done) of a sequential run's progress file; None when there is none or it cannot be read
    (a half-written file: the run starts its layers again)."""
    from safetensors import safe_open

    path = Path(run_dir) / PROGRESS
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            done = int((f.metadata() or {})["layers_done"])
            return {k: f.get_tensor(k) for k in f.keys()}, done  # noqa: SIM118 (a safe_open handle, not a dict)
    except Exception:  # safetensors raises its own types for a truncated file
        return None
