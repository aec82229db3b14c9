"""MetaSchedule autotuning of the decode step's weight matmuls (`kvc compile --tune-trials N`), on the
CPU (llvm) or on CUDA, where candidates are measured on this machine's GPU.

Tuned: the kernels `decode_b1` calls that multiply by a weight matrix (with their fused epilogues),
the decode step's hot loops. decode_b1 has static shapes (batch 1, one token), which MetaSchedule
needs; kvc's own attention kernels are already scheduled and are not tuned. The database (JSON,
MetaSchedule's format) goes into the artifact's tuning/ directory; `--tuning-db DIR` starts from
one (it is copied, never modified) and with `--tune-trials 0` only applies it: a database tuned on a
GPU machine can be applied by a CUDA build anywhere. On CUDA the tuned schedules replace dlight's for
those kernels.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import tvm
from tvm import tirx

from kvc.errors import KvcError

TUNING_DIR = "tuning"
DB_FILES = ("database_workload.json", "database_tuning_record.json")


@dataclass(frozen=True)
class TuningRequest:
    trials: int  # MetaSchedule's global trial budget over all tuned kernels
    reuse: Path | None  # a tuning/ directory of an earlier artifact


def hot_kernels(mod: tvm.IRModule, entry: str) -> tvm.IRModule:
    """The weight-matmul PrimFuncs ``entry`` calls (plain or ai.kvc PackedMatMul), with static shapes, as their
    own module."""
    from tvm import relax

    from kvc.compiler.tvm.schedules.cpu_matmul import is_weight_matmul
    from kvc.compiler.tvm.schedules.cpu_packed_matmul import is_packed_matmul

    found = {}
    for gv in relax.analysis.all_global_vars(mod[entry]):
        func = mod[gv]
        if isinstance(func, tirx.PrimFunc) and _static(func) and (is_weight_matmul(func) or is_packed_matmul(func)):
            found[gv.name_hint] = func
    return tvm.IRModule(found)


def _static(func: tirx.PrimFunc) -> bool:
    return all(isinstance(d, tirx.IntImm) for p in func.params if hasattr(p, "shape") and p.shape is not None
               for d in p.shape)


def open_database(staging: Path, request: TuningRequest):
    """The artifact's JSON database, seeded from ``request.reuse``."""
    from tvm.s_tir import meta_schedule as ms

    work = staging / TUNING_DIR
    work.mkdir()
    if request.reuse is not None:
        missing = [f for f in DB_FILES if not (request.reuse / f).is_file()]
        if missing:
            raise KvcError(f"--tuning-db {request.reuse} has no {', '.join(missing)}; pass an artifact's "
                           f"{TUNING_DIR}/ directory")
        for name in DB_FILES:
            shutil.copyfile(request.reuse / name, work / name)
    return ms.database.JSONDatabase(*(str(work / name) for name in DB_FILES), allow_missing=True)


def runner_for(target: tvm.target.Target):
    """How MetaSchedule measures candidates: in local processes on the target's device. CUDA needs a GPU."""
    if target.kind.name == "cuda" and not tvm.cuda(0).exist:
        raise KvcError("--tune-trials with --target cuda measures candidates on a GPU and this machine has none; "
                       "tune on a GPU machine and reuse its artifact's tuning/ with --tuning-db, or use "
                       "--tune-trials 0")
    return "local"


def tune(kernels: tvm.IRModule, target: tvm.target.Target, database, trials: int, progress=print) -> None:
    """Run MetaSchedule on ``kernels``, recording the best schedules in ``database``."""
    from tvm.s_tir import meta_schedule as ms

    if trials <= 0 or not kernels.functions:
        return
    runner_for(target)  # refuses CUDA without a GPU
    _import_tensor_intrinsics()
    # one worker, for kvc's own schedules and the search, with the engine's thread count
    runner = ms.runner.LocalRunner(initializer=_threads_like_the_engine)
    names = sorted(gv.name_hint for gv in kernels.functions)
    progress(f"tvm: tuning {len(names)} decode kernels with MetaSchedule, {trials} trials in all "
             f"(MetaSchedule's per-task table follows)")
    with tempfile.TemporaryDirectory(prefix="kvc-tune-") as work:  # logs and builds stay out of the artifact
        _measure_own_schedules(kernels, target, database, runner, Path(work) / "own")
        per_iter = min(64, max(trials // len(names), 2))
        cost_model = _cost_model(progress)
        ms.tir_integration.tune_tir(kernels, target, work, max_trials_global=trials, num_trials_per_iter=per_iter,
                                    builder=_in_process_builder(), runner=runner, cost_model=cost_model,
                                    strategy=_search_strategy(cost_model, per_iter), database=database, seed=0)
    progress(f"tvm: tuning done: {len(database.get_all_tuning_records())} measured schedules in the database")


def _import_tensor_intrinsics() -> None:
    """Import tvm.s_tir.tensor_intrin, which MetaSchedule's TuneContext imports on first use, with importlib's
    frozen frames known to ``inspect``. Its ~250 TVMScript functions each call inspect.stack(), which looks up
    the module of every frame; importlib's frames (``<frozen importlib._bootstrap>``) belong to no file, so each
    lookup scanned all of sys.modules: 91 s with torch and transformers loaded, 11 s with the frames known
    (the mapping is the true one: those frames run importlib._bootstrap's code)."""
    import inspect
    import os
    import sys

    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    for name in ("importlib._bootstrap", "importlib._bootstrap_external"):
        if name in sys.modules:
            inspect.modulesbyfile.setdefault(os.path.normcase(os.path.abspath(f"<frozen {name}>")), name)
    import tvm.s_tir.tensor_intrin  # noqa: F401


def _threads_like_the_engine() -> None:
    """Size the measuring worker's TVM thread pool as the TVM engine sizes its own (one thread per usable
    core). TVM's default is half the logical CPUs, one thread on a 2-vCPU machine: candidates were then
    ranked single-threaded, and the search kept serial kernels that ran 1.6-1.85x slower in the engine."""
    from kvc.runtime.tvm_engine import configure_threads

    configure_threads(0)


def own_schedule_rules() -> list:
    """kvc's own llvm schedule rules for the tuned kernels, as the untuned build applies them."""
    from kvc.compiler.tvm.schedules import CpuPackedMatmul, CpuWeightMatmul

    return [CpuPackedMatmul(), CpuWeightMatmul()]


def _measure_own_schedules(kernels: tvm.IRModule, target: tvm.target.Target, database, runner, work: Path) -> None:
    """Measure kvc's own schedule of every kernel into ``database`` before the search, with the same builder
    and runner: the build then takes the faster of it and the search's best, so tuning never makes a kernel
    slower than the untuned build as measured. CPU only: on CUDA kvc's rules do not apply (dlight schedules)."""
    from tvm.s_tir import meta_schedule as ms

    if target.kind.name != "llvm":
        return
    rules = own_schedule_rules()

    def own(sch):
        for rule in rules:
            scheduled = rule.apply(sch.mod["main"], target, False)
            if scheduled is not None:
                return [scheduled]
        return []  # not one of kvc's kernels: nothing to measure

    space = ms.space_generator.ScheduleFn(own, sch_rules=[], postprocs=[], mutator_probs={})
    count = len(kernels.functions)
    # replay-trace: the space has one fixed schedule per kernel, nothing to search (the evolutionary default
    # spent ~15 s per kernel failing to mutate a trace that samples nothing)
    ms.tir_integration.tune_tir(kernels, target, str(work), max_trials_global=count, max_trials_per_task=1,
                                num_trials_per_iter=1, space=space, strategy="replay-trace",
                                builder=_in_process_builder(), runner=runner, cost_model="random",
                                database=database, seed=0)


def _cost_model(progress) -> str:
    """MetaSchedule's XGBoost cost model when xgboost is installed (`pip install xgboost`; no kvc extra installs it),
    else random ranking of candidates (the search still measures every candidate it keeps)."""
    import importlib.util

    if importlib.util.find_spec("xgboost") is not None:
        return "xgb"
    progress("tvm: xgboost is not installed: MetaSchedule ranks candidates at random "
             "(pip install xgboost for its learned cost model)")
    return "random"


def _search_strategy(cost_model: str, per_iter: int):
    """MetaSchedule's evolutionary search; ranked by the random cost model, with a population of a few
    iterations' worth of candidates instead of 512. Random scores make the measured candidates a uniform pick from
    the population either way, so the larger one only costs search time (mutating and checking 512 traces per
    task per iteration)."""
    from tvm.s_tir.meta_schedule.search_strategy import EvolutionarySearch

    if cost_model != "random":
        return "evolutionary"
    population = max(4 * per_iter, 64)
    return EvolutionarySearch(population_size=population, init_min_unmeasured=min(50, population))


def _in_process_builder():
    """MetaSchedule's LocalBuilder starts a fresh worker process for every batch of candidates, and
    each imports tvm.s_tir.tensor_intrin first: 30-60 s on a 2-core machine, over its 30 s build
    timeout, so every build failed. These kernels are small: build them in this process."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build, default_export

    @derived_object
    class InProcessBuilder(PyBuilder):
        def build(self, build_inputs):
            results = []
            for item in build_inputs:
                try:
                    results.append(BuilderResult(default_export(default_build(item.mod, item.target, None)), None))
                except Exception as error:  # noqa: BLE001 - a failed candidate is a result, not a crash
                    results.append(BuilderResult(None, f"{type(error).__name__}: {error}"))
            return results

    return InProcessBuilder()


def apply_database_pass(database):
    """A pass replacing every kernel the database has a schedule for by its best schedule (dlight
    then leaves those alone)."""
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name="KvcApplyTuning")
    def apply(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with database:
            return relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)

    return apply
