"""``autopar`` command line: ``plan``, ``run``, ``explain``, ``calibrate`` and ``clusters`` (a thin
layer over the API).

Example modules follow one convention: for a step function ``FOO`` the module defines
``FOO_args(**knobs) -> tuple`` returning example positional arguments (``abstract=True``,
if accepted, returns ShapeDtypeStructs). ``--arg key=value`` passes knobs.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path

from .cli_training import plan_training_from, progress_for_cli, run_training


def _parse_mesh(text: str | None):
    if not text:
        return None
    try:
        shape = tuple(int(x) for x in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"autopar: --mesh must look like 8 or 2x4, got {text!r}") from None
    return shape


def _parse_knobs(items) -> dict:
    knobs = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"autopar: --arg expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            knobs[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            knobs[k] = v
    return knobs


def load_target(target: str):
    """'pkg.module:fn' or 'path/file.py:fn' → (module, function, name)."""
    if ":" not in target:
        raise SystemExit(f"autopar: target must be MODULE_OR_FILE:FUNCTION, got {target!r}")
    where, name = target.rsplit(":", 1)
    if where.endswith(".py") or Path(where).exists():
        path = Path(where)
        if not path.exists():
            raise SystemExit(f"autopar: file {where!r} does not exist")
        # the file's own directory (its sibling modules), its parent, and the directory above
        # its outermost package (``examples/zoo/vit.py`` imports ``examples.zoo.common``)
        here = path.resolve().parent
        root = here
        while (root / "__init__.py").exists():
            root = root.parent
        sys.path[:0] = [str(here), str(here.parent), str(root)]
        try:
            if root != here:   # inside a package: imported under its dotted name
                rel = path.resolve().relative_to(root).with_suffix("")
                module = importlib.import_module(".".join(rel.parts))
            else:
                spec = importlib.util.spec_from_file_location(path.stem, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[path.stem] = module
                spec.loader.exec_module(module)
        except ImportError as err:
            raise SystemExit(f"autopar: cannot import {where!r}: {err}") from None
    else:
        sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(where)
        except ImportError as err:
            raise SystemExit(f"autopar: cannot import module {where!r}: {err}") from None
    fn = getattr(module, name, None)
    if fn is None or not callable(fn):
        raise SystemExit(f"autopar: {where!r} has no function {name!r}")
    return module, fn, name


def example_args(module, name: str, knobs: dict, abstract: bool):
    maker = getattr(module, f"{name}_args", None) or getattr(module, "example_args", None)
    if maker is None:
        raise SystemExit(
            f"autopar: {module.__name__} defines no {name}_args() (or example_args()) returning the example "
            f"arguments of {name}; add `def {name}_args(**knobs): return (arg0, arg1, ...)`")
    params = inspect.signature(maker).parameters
    if "abstract" in params and "abstract" not in knobs:
        knobs = {**knobs, "abstract": abstract}
    unknown = [k for k in knobs if k not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values())]
    if unknown:
        raise SystemExit(f"autopar: {maker.__name__} has no knob(s) {unknown}; it accepts {list(params)}")
    args = maker(**knobs)
    return tuple(args) if isinstance(args, (tuple, list)) else (args,)


def _plan_from_args(ns, fn, args):
    import autopar
    donate = tuple(int(x) for x in ns.donate.split(",") if x.strip()) if ns.donate else ()
    with progress_for_cli(ns) as progress:
        return autopar.plan(fn, *args, cluster=ns.cluster, nodes=ns.nodes, mesh_shape=_parse_mesh(ns.mesh),
                            memory_budget_bytes=ns.budget, solver=ns.solver, time_limit_s=ns.time_limit,
                            donate_argnums=donate, verbose=progress)


def cmd_clusters(ns) -> int:
    from autopar.cost import known_clusters, load_cluster
    for name in known_clusters():
        c = load_cluster(name)
        d = c.device
        print(f"{name:<16} {c.devices_per_node}× {d.name:<16} {d.memory_bytes / 2**30:6.0f} GiB  "
              f"intra {c.intra_node_link.bandwidth_bytes_per_s / 1e9:6.1f} GB/s  "
              f"network {c.inter_node_bandwidth_per_device() / 1e9:6.2f} GB/s per device  {c.description}")
    return 0


def cmd_calibrate(ns) -> int:
    """Microbenchmarks on the devices JAX sees → a fitted ClusterSpec JSON (``autopar.calibrate``)."""
    import jax

    from .calibrate import Timer, calibrate, report, write
    if Path(ns.out).suffix != ".json":
        raise ValueError(f"--out must name a .json file, got {ns.out!r}")
    if (ns.repeats is not None and ns.repeats < 1) or ns.warmup < 0:
        raise SystemExit(f"autopar: --repeats must be ≥ 1 and --warmup ≥ 0, got {ns.repeats} and {ns.warmup}")
    timer = Timer(ns.warmup, ns.repeats) if ns.repeats is not None else None  # None: --quick's
    spec, cal = calibrate(base=ns.base, name=ns.name or Path(ns.out).stem, quick=ns.quick, timer=timer,
                          log=print if jax.process_index() == 0 else lambda *_: None)
    if jax.process_index() != 0:
        return 0
    print(report(spec, cal))
    out, data = write(spec, cal, ns.out)
    print(f"\nspec written to {out} (samples and fits: {data}); plan with `autopar plan … --cluster {out}`")
    return 0


def cmd_plan(ns) -> int:
    from .report import format_report
    module, fn, name = load_target(ns.target)
    args = example_args(module, name, _parse_knobs(ns.arg), abstract=True)
    if ns.train:
        plan_training_from(ns, module, fn, args)
        return 0
    plan = _plan_from_args(ns, fn, args)
    print(format_report(plan, equations=ns.equations))
    if ns.json:
        Path(ns.json).write_text(plan.to_json())
        print(f"\nplan written to {ns.json}")
    return 0


def cmd_explain(ns) -> int:
    """Why input LEAF has its sharding in the plan (``Plan.explain``): plan (or load ``--plan``), explain."""
    import autopar
    if ns.train:
        raise SystemExit("autopar: explain works on intra-op plans; drop --train")
    module, fn, name = load_target(ns.target)
    args = example_args(module, name, _parse_knobs(ns.arg), abstract=True)
    plan = autopar.Plan.from_json(Path(ns.plan).read_text()) if ns.plan else _plan_from_args(ns, fn, args)
    print(plan.explain(ns.leaf, fn=fn, args=args, axis=ns.axis, top=ns.top, solver=ns.solver,
                       time_limit_s=ns.time_limit))
    return 0


def cmd_run(ns) -> int:
    import jax
    import numpy as np

    import autopar
    from .report import format_report
    module, fn, name = load_target(ns.target)
    args = example_args(module, name, _parse_knobs(ns.arg), abstract=False)
    if ns.train:
        return run_training(ns, module, fn, args)
    if ns.plan:
        plan = autopar.Plan.from_json(Path(ns.plan).read_text())
    else:
        plan = _plan_from_args(ns, fn, args)
        print(format_report(plan))
    from .pytree_json import leaf_paths
    from .verify import compare_loops, run_loop
    steps = ns.steps if plan.carried else 1  # a loop only where outputs feed back
    first = [np.asarray(x) for x in jax.tree_util.tree_leaves(args)]
    want = run_loop(jax.jit(fn), args, plan.carried, steps)  # first: the sharded call may donate its inputs
    sharded = plan.apply(fn)
    got = run_loop(sharded, args, plan.carried, steps)
    out_paths = leaf_paths(jax.tree_util.tree_structure(jax.eval_shape(fn, *args)))
    result = compare_loops(got, want, first, plan.carried, rtol=ns.rtol, atol=ns.atol, paths=out_paths)
    devs = sharded.mesh.devices.size
    print(f"\nran on {devs} {jax.devices()[0].platform} devices, mesh {tuple(plan.mesh_shape)}, "
          f"{result.summary()}")
    return 0 if result.ok else 1


def _common(p):
    p.add_argument("target", help="MODULE_OR_FILE:FUNCTION, e.g. examples/mlp.py:mlp_step")
    p.add_argument("--cluster", default="cpu-8", help="cluster spec name or JSON path (see `autopar clusters`)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--mesh", help="fix the logical mesh, e.g. 8 or 2x4 (default: search)")
    p.add_argument("--budget", type=float, default=None, help="memory budget in bytes per device")
    p.add_argument("--solver", default="auto", choices=["auto", "cbc", "highs", "heuristic", "brute"])
    p.add_argument("--time-limit", type=float, default=None, help="solver time limit, seconds")
    p.add_argument("--arg", action="append", metavar="KEY=VALUE", help="knob for FUNCTION_args()")
    p.add_argument("--quiet", action="store_true", help="no live progress display while planning")
    p.add_argument("--donate", metavar="0,1", help="donated argument positions (params, optimizer state of "
                   "a training step): they keep their sharding across the step and their buffers are reused")
    t = p.add_argument_group("training plans (--train: FUNCTION is loss_fn(params, batch))")
    t.add_argument("--train", action="store_true", help="plan a training step with pipeline stages")
    t.add_argument("--optimizer", help="sgd|momentum|adam|adamw[:LR] (default: the module's OPTIMIZER, else adam:1e-3)")
    t.add_argument("--clip-norm", type=float, default=None, metavar="MAX",
                   help="clip the gradients by their global norm first (optax.clip_by_global_norm; over all stages)")
    t.add_argument("--has-aux", action="store_true", help="the loss returns (loss, aux), as for "
                   "jax.value_and_grad(has_aux=True); run checks the aux too")
    t.add_argument("--coupled-rows", default="refuse", choices=["refuse", "per_microbatch"],
                   help="a loss whose batch rows meet (BatchNorm, a load-balancing loss over all tokens): refused "
                   "with more than one micro-batch, or run with each micro-batch's statistics over its own rows")
    t.add_argument("--grad-accum", default="params", choices=["params", "float32"],
                   help="sum the micro-batches' gradients in the parameters' dtype or in float32 (bfloat16 params)")
    t.add_argument("--microbatches", type=lambda s: int(s) if "," not in s else [int(x) for x in s.split(",")],
                   default=1, help="micro-batches per step; several, e.g. 8,16,32: each planned, the fastest kept")
    t.add_argument("--schedule", default="1f1b", choices=["1f1b", "gpipe"])
    t.add_argument("--virtual-stages", type=_virtual_stages, default=1,
                   help="model chunks per device group, interleaved 1F1B (Megatron's virtual pipeline): 1, a count, "
                   "or auto (the fastest of 1, 2, 4)")
    t.add_argument("--num-stages", type=int, default=None, help="force the number of stages")
    t.add_argument("--stages", help="fix the stages: layer ranges and sub-meshes, e.g. 0-2:1x4,2-4:1x4")
    t.add_argument("--layers", type=int, default=None, help="number of layers to cluster the forward into")
    t.add_argument("--remat", default="auto", choices=["auto", "none", "dots", "full"],
                   help="activation rematerialisation per stage: chosen by the search (auto) or forced")
    t.add_argument("--zero", default="auto", choices=["auto", "none", "1"],
                   help="optimizer-state sharding (ZeRO-1) per stage: chosen by the search (auto) or forced")
    t.add_argument("--timeline", help="draw the pipeline schedule to this .svg or .png")
    t.add_argument("--bound", action="store_true", help="also print the compute bound (autopar.step_lower_bound: "
                   "a step no plan beats) and the plan's step over it")


def _virtual_stages(text: str):
    """``--virtual-stages``: "auto" or a count ≥ 1."""
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected auto or a count ≥ 1, got {text!r}")
    return int(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="autopar", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("clusters", help="list the known cluster specs")
    p = sub.add_parser("plan", help="plan a function and print the strategy report")
    _common(p)
    p.add_argument("--json", help="write the plan as JSON")
    p.add_argument("--equations", action="store_true", help="also list every equation with its strategy")
    r = sub.add_parser("run", help="plan (or load) and execute on local devices; check vs unsharded")
    _common(r)
    r.add_argument("--plan", help="a plan JSON to run instead of planning")
    r.add_argument("--json", help="write the (training) plan as JSON")
    r.add_argument("--devices", type=int, default=None,
                   help="simulated CPU devices (default: nodes × devices per node; ignored on GPU)")
    r.add_argument("--steps", type=int, default=3, help="calls of a step whose outputs feed back (params, "
                   "optimizer state), each compared with the unsharded loop (default 3)")
    r.add_argument("--rtol", type=float, default=1e-5)
    r.add_argument("--atol", type=float, default=1e-6)
    r.add_argument("--processes", type=int, default=None, help="with --train: start N processes on 127.0.0.1 "
                   "(jax.distributed, the CPU devices split among them) that run the plan's stages, and check")
    r.add_argument("--timeout", type=int, default=60, help="multi-process: seconds for all processes to join, and "
                   "after which a silent (dead) process stops the job (default 60)")
    x = sub.add_parser("explain", help="why an input leaf is replicated / split: the cheapest plan that splits "
                       "it further and the operations that make it expensive")
    _common(x)
    x.add_argument("leaf", help="input leaf: its path as the plan report prints it (e.g. [0]['qkv']) or its "
                   "flat index")
    x.add_argument("--plan", help="a plan JSON to explain instead of planning (same TARGET and --arg)")
    x.add_argument("--axis", help="mesh axis the alternative must split the leaf over, e.g. y (default: any)")
    x.add_argument("--top", type=int, default=5, help="operations listed each way (default 5)")
    c = sub.add_parser("calibrate", help="measure matmul, memory bandwidth and collectives on the devices JAX sees "
                       "and fit a cluster spec JSON to them")
    c.add_argument("--out", default="my-cluster.json", help="spec JSON to write (default my-cluster.json)")
    c.add_argument("--base", default=None, help="spec giving what is not measured (inter-node link on one node, "
                   "memory size on CPU); default cpu-8 on CPU, dgx-h100 on GPU")
    c.add_argument("--name", help="the spec's name (default: the --out file's stem)")
    c.add_argument("--quick", action="store_true", help="fewer sizes and repeats (a rough spec in seconds)")
    c.add_argument("--repeats", type=int, default=7, help="timed calls per microbenchmark (median; default 7)")
    c.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    c.add_argument("--devices", type=int, default=None, help="simulated CPU devices (default 8; ignored on GPU)")
    c.add_argument("--processes", type=int, default=None, help="start N processes on 127.0.0.1 (jax.distributed, "
                   "the CPU devices split among them): the links between them are fitted as the inter-node link")
    c.add_argument("--timeout", type=int, default=60, help="multi-process: seconds for all processes to join")
    ns = parser.parse_args(argv)
    if ns.cmd == "calibrate":
        if ns.quick and "--repeats" not in (sys.argv[1:] if argv is None else argv):
            ns.repeats = None   # the quick default
        return _start_calibrate(ns, argv)
    if ns.cmd == "run":
        from autopar.cost import ClusterSpecError, load_cluster

        from . import launch
        try:
            want = ns.devices or ns.nodes * load_cluster(ns.cluster).devices_per_node
        except ClusterSpecError as err:
            print(f"autopar: {err}", file=sys.stderr)
            return 2
        in_job = launch.ENV_COORDINATOR in os.environ  # one process of a jax.distributed job
        if ns.processes is not None and not in_job:
            if not ns.train:
                raise SystemExit("autopar: --processes runs training (pipeline) plans: add --train")
            child = [sys.executable, "-m", "autopar"] + list(sys.argv[1:] if argv is None else argv)
            try:
                return launch.launch_local(child, ns.processes, want, timeout_s=ns.timeout)
            except ValueError as err:
                raise SystemExit(f"autopar: {err}") from None
        if in_job:
            want //= int(os.environ.get(launch.ENV_NUM, "1"))
        os.environ.setdefault("JAX_NUM_CPU_DEVICES", str(want))
        import jax
        try:  # only possible before the CPU backend starts; harmless on GPU machines
            jax.config.update("jax_num_cpu_devices", int(os.environ["JAX_NUM_CPU_DEVICES"]))
        except RuntimeError:
            pass
        if in_job:
            if not ns.train:
                raise SystemExit("autopar: in a multi-process job `autopar run` runs training (pipeline) plans: "
                                 "add --train")
            launch.initialize_from_env(default_timeout_s=ns.timeout)
            if ns.processes is not None and ns.processes != jax.process_count():
                raise SystemExit(f"autopar: --processes {ns.processes} but the job has {jax.process_count()}")
    from autopar.cost import ClusterSpecError

    from .planner import PlanError
    from .runtime import PlanMismatchError
    from .trace import TraceError
    try:
        return {"clusters": cmd_clusters, "plan": cmd_plan, "run": cmd_run, "explain": cmd_explain}[ns.cmd](ns)
    except (ClusterSpecError, PlanError, PlanMismatchError, TraceError, ValueError) as err:
        print(f"autopar: error: {err}", file=sys.stderr)
        return 2


def _start_calibrate(ns, argv) -> int:
    """``autopar calibrate``: the simulated CPU devices (or a local multi-process job) first."""
    from . import launch
    in_job = launch.ENV_COORDINATOR in os.environ
    want = ns.devices or 8
    if ns.processes is not None and not in_job:
        child = [sys.executable, "-m", "autopar"] + list(sys.argv[1:] if argv is None else argv)
        try:
            return launch.launch_local(child, ns.processes, want, timeout_s=ns.timeout)
        except ValueError as err:
            raise SystemExit(f"autopar: {err}") from None
    os.environ.setdefault("JAX_NUM_CPU_DEVICES", str(want // int(os.environ.get(launch.ENV_NUM, "1"))))
    import jax
    try:  # only possible before the CPU backend starts; harmless on GPU machines
        jax.config.update("jax_num_cpu_devices", int(os.environ["JAX_NUM_CPU_DEVICES"]))
    except RuntimeError:
        pass
    if in_job:
        launch.initialize_from_env(default_timeout_s=ns.timeout)
    from autopar.cost import ClusterSpecError
    try:
        return cmd_calibrate(ns)
    except (ClusterSpecError, ValueError) as err:
        print(f"autopar: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
