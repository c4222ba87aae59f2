"""Training throughput: one Ray Train worker against a plain PyTorch loop, and time lost to data.

python benchmarks/bench_train.py [--quick] [--json FILE]     # prints a markdown table

Three measurements on the same random-weight U-Net, optimiser (SGD, momentum 0.9), loss (BCE) and
batch, all through one step function (``train_step``, the step of ``unet_ray.pipelines.train_loop``):

- plain: a PyTorch loop in this process on in-memory random tensors;
- Ray: one Ray Train worker (``TorchTrainer``, ``num_workers=1``, ``prepare_model``) running the
  same measurement on the same tensors (generated in the worker from the same seed). The two
  take turns, round by round (a small Ray actor holds the turn), so a change in other load on
  the machine hits both alike; ``train_ray_vs_plain`` is the Ray worker's images/s over the
  plain loop's;
- data wait: one Ray Train worker training on the real pipeline (a prepared synthetic dataset,
  ``unet_ray.pipelines.data.build_training_datasets``, ``iter_torch_batches`` as in ``train_one_epoch``);
  ``train_data_wait_fraction`` is the time blocked in ``next(batch)`` over the whole step time,
  every epoch after the first (the warm-up epoch) counted, epoch starts included. As in
  ``unet_ray.pipelines.train_loop``, one Ray Data execution streams all epochs (``stream_batches``); the
  pipeline's start-up, paid once per run, is reported apart (``train_pipeline_start_wait_s``).

Images/s is the batch over the fastest timed step: other work on a shared machine only ever
slows a step down, so the fastest one is the closest to the machine's own speed (as ``timeit``
reports). The typical figures, from the median step (``..._median``), are in the JSON too. Torch
runs with the same number of threads everywhere. On a GPU: bf16 autocast and channels_last.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# In memory: crop side, batch, untimed steps, timed steps per round, rounds. Real pipeline:
# epochs (the first untimed), synthetic images of synth_side^2 (each gives (synth_side/256)^2
# tiles), and copies of the training shards (more tiles per epoch without generating more).
from bench_common import standalone_main  # noqa: E402

SIZES = {
    ("cpu", "quick"): {
        "side": 64,
        "batch": 2,
        "warmup": 2,
        "steps": 4,
        "rounds": 5,
        "epochs": 3,
        "synth_count": 12,
        "synth_side": 256,
        "shard_copies": 4,
    },
    ("cpu", "full"): {
        "side": 128,
        "batch": 4,
        "warmup": 2,
        "steps": 8,
        "rounds": 3,
        "epochs": 3,
        "synth_count": 24,
        "synth_side": 256,
        "shard_copies": 4,
    },
    ("cuda", "quick"): {
        "side": 256,
        "batch": 16,
        "warmup": 10,
        "steps": 20,
        "rounds": 3,
        "epochs": 3,
        "synth_count": 48,
        "synth_side": 512,
        "shard_copies": 4,
    },
    ("cuda", "full"): {
        "side": 256,
        "batch": 16,
        "warmup": 20,
        "steps": 40,
        "rounds": 5,
        "epochs": 4,
        "synth_count": 96,
        "synth_side": 512,
        "shard_copies": 6,
    },
}
DATA_TILE = 256  # prepared tile side (the default of `unet-ray prepare`)
MODEL_SEED = 0
DATA_SEED = 1
DISTINCT_BATCHES = 2  # in-memory batches cycled through (fresh tensors, no caching effects)
MASK_FRACTION = 0.3  # fraction of foreground pixels in the random masks
LEARNING_RATE = 0.01  # small and constant: random data, only the speed matters
MIN_RAY_CPUS = 4  # logical CPUs for a local Ray started here (2-core machine: worker + data tasks)
TURN_POLL_S = 0.05  # how often a side waiting for its turn asks the baton
TURN_TIMEOUT_S = 1800.0  # a side waiting longer than this gives up (the other one is stuck)
WORKER_NICENESS_ENV = "RAY_worker_niceness"  # read by each Ray worker process when it starts
DATA_WORKER_CPUS = 1  # as `unet-ray train`: every other CPU is left to Ray Data


# ----------------------------------------------------------------------------- settings


def select_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def usable_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def size_key(quick: bool, use_gpu: bool) -> tuple[str, str]:
    return ("cuda" if use_gpu else "cpu", "quick" if quick else "full")


def benchmark_settings(quick: bool, use_gpu: bool) -> dict:
    """Sizes, step counts, threads and precision for this mode and device (a plain dict: it is
    passed to Ray workers as is)."""
    from unet_ray.core.config import TrainConfig

    train = TrainConfig()
    return {
        **SIZES[size_key(quick, use_gpu)],
        "use_gpu": use_gpu,
        "threads": usable_cpus(),
        "momentum": train.momentum,
        "weight_decay": train.weight_decay,
        "grad_clip": train.grad_clip,
        "shuffle_buffer_tiles": train.shuffle_buffer_tiles,
        "loss": train.loss,
        "channels_last": use_gpu,
        "bf16": use_gpu,
    }


# ----------------------------------------------------------------------------- the shared step


def autocast_context(device, bf16: bool):
    """bf16 autocast on a GPU when asked; otherwise a no-op context (fp32)."""
    import torch

    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronise(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_training_objects(settings: dict, device, prepare=None):
    """(model, optimiser, loss) as ``unet_ray.pipelines.train_loop`` builds them, on ``device``, seeded.

    ``prepare`` (e.g. ``ray.train.torch.prepare_model``) is applied to the model on a worker.
    """
    import torch

    from unet_ray.core.losses import build_loss
    from unet_ray.core.model import UNetVGG16BN

    torch.manual_seed(MODEL_SEED)
    model = UNetVGG16BN().to(device)
    if settings["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    if prepare is not None:
        model = prepare(model)
    model.train()
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=LEARNING_RATE,
        momentum=settings["momentum"],
        weight_decay=settings["weight_decay"],
    )
    return model, optimizer, build_loss(settings["loss"])


def make_random_batches(settings: dict, device) -> list[tuple]:
    """DISTINCT_BATCHES (images, masks) pairs in memory: images in [0, 1], binary masks."""
    import torch

    generator = torch.Generator().manual_seed(DATA_SEED)
    shape = (settings["batch"], 3, settings["side"], settings["side"])
    batches = []
    for _ in range(DISTINCT_BATCHES):
        images = torch.rand(shape, generator=generator)
        masks = (torch.rand((shape[0], 1, *shape[2:]), generator=generator) < MASK_FRACTION).float()
        batches.append((images.to(device), masks.to(device)))
    return batches


def train_step(model, optimizer, loss_function, images, masks, settings: dict) -> float:
    """One optimisation step, as in ``unet_ray.pipelines.train_loop.train_one_epoch``; returns the loss (the
    ``float`` waits for the device, so the step is complete when this returns)."""
    import torch

    if settings["channels_last"]:
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast_context(images.device, settings["bf16"]):
        logits = model(images)
        loss = loss_function(logits.float(), masks)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if settings["grad_clip"] > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings["grad_clip"])
    optimizer.step()
    return float(loss.detach())


def time_train_steps(
    model, optimizer, loss_function, batches, settings: dict, warmup: int, steps: int
) -> list[float]:
    """Seconds of each of ``steps`` timed steps, after ``warmup`` untimed ones."""
    device = batches[0][0].device
    step_seconds = []
    for step in range(warmup + steps):
        images, masks = batches[step % len(batches)]
        synchronise(device)
        started = time.perf_counter()
        train_step(model, optimizer, loss_function, images, masks, settings)
        if step >= warmup:
            step_seconds.append(time.perf_counter() - started)
    return step_seconds


def images_per_second(step_seconds: list[float], batch: int, statistic=min) -> float:
    """Batch size over the fastest step time (``statistic=statistics.median``: a typical one)."""
    if not step_seconds:
        raise ValueError("no timed steps: steps must be at least 1")
    return batch / statistic(step_seconds)


def configure_threads(settings: dict) -> int:
    """Use ``settings["threads"]`` torch threads (in the calling thread); returns the previous
    count."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(settings["threads"])
    return previous


class InMemoryTraining:
    """Model, optimiser, loss and random batches, built on first use in the calling thread;
    times rounds of training steps (the first round after ``settings["warmup"]`` steps)."""

    def __init__(self, settings: dict, device, prepare=None):
        self.settings, self.device, self.prepare = settings, device, prepare
        self.parts = None

    def time_round(self) -> list[float]:
        import torch

        warmup = 0
        if self.parts is None:
            if self.device.type == "cuda":
                torch.backends.cudnn.benchmark = True
            configure_threads(self.settings)
            model, optimizer, loss_function = build_training_objects(
                self.settings, self.device, self.prepare
            )
            self.parts = (
                model,
                optimizer,
                loss_function,
                make_random_batches(self.settings, self.device),
            )
            warmup = self.settings["warmup"]
        return time_train_steps(*self.parts, self.settings, warmup, self.settings["steps"])


def measure_in_memory_throughput(settings: dict, device=None) -> dict:
    """Training images/s on in-memory random tensors (one round) in this process."""
    import torch

    previous_threads = torch.get_num_threads()
    try:
        step_seconds = InMemoryTraining(settings, device or select_device()).time_round()
    finally:
        torch.set_num_threads(previous_threads)
    return {
        "images_per_s": images_per_second(step_seconds, settings["batch"]),
        "images_per_s_median": images_per_second(
            step_seconds, settings["batch"], statistics.median
        ),
    }


# ----------------------------------------------------------------------------- taking turns

PLAIN, RAY, ABORT = "plain", "ray", "abort"


class Baton:
    """Whose turn it is to time a round: (RAY, round), then (PLAIN, round), then (RAY, round + 1);
    (ABORT, reason) when one side failed. Run as a Ray actor that both sides can reach."""

    def __init__(self):
        self.turn = (RAY, 0)

    def get(self) -> tuple:
        return self.turn

    def set(self, turn: tuple) -> None:
        self.turn = tuple(turn)


def next_turn(side: str, round_index: int) -> tuple[str, int]:
    """The turn after ``side``'s round ``round_index``: Ray goes first in every round."""
    return (PLAIN, round_index) if side == RAY else (RAY, round_index + 1)


def wait_for_turn(baton, wanted: tuple, stop=None, timeout_s: float = TURN_TIMEOUT_S) -> None:
    """Poll the baton actor until it says ``wanted``; raise if the other side aborted, ``stop``
    (a threading.Event) is set, or ``timeout_s`` passes."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        turn = tuple(ray.get(baton.get.remote()))
        if turn == tuple(wanted):
            return
        if turn[0] == ABORT:
            raise RuntimeError(f"the other side of the comparison failed: {turn[1]}")
        if stop is not None and stop.is_set():
            raise RuntimeError("stopped: the other side of the comparison ended")
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f} s for turn {wanted}; it is still {turn}")
        time.sleep(TURN_POLL_S)


def take_turns(baton, side: str, rounds: int, time_round, stop=None) -> list[list[float]]:
    """Run ``time_round()`` in each of ``side``'s turns; returns the step seconds per round."""
    import ray

    timed = []
    for round_index in range(rounds):
        wait_for_turn(baton, (side, round_index), stop)
        try:
            timed.append(time_round())
        except Exception as error:
            ray.get(baton.set.remote((ABORT, f"{side}: {type(error).__name__}: {error}")))
            raise
        ray.get(baton.set.remote(next_turn(side, round_index)))
    return timed


def ray_throughput_loop(settings: dict) -> dict:
    """Ray Train worker: its side of the in-memory comparison; reports and returns the step
    seconds of each round."""
    import ray.train
    import ray.train.torch

    training = InMemoryTraining(
        settings, ray.train.torch.get_device(), ray.train.torch.prepare_model
    )
    rounds = take_turns(settings["baton"], RAY, settings["rounds"], training.time_round)
    measured = {"round_seconds": rounds, "niceness": os.nice(0)}
    ray.train.report({"fastest_step_s": min(sum(rounds, []))})
    return measured


def compare_rounds(
    plain_rounds: list[list[float]], ray_rounds: list[list[float]], batch: int
) -> dict[str, float]:
    """Images/s of each side from its fastest and its median step, and the Ray / plain ratios
    (median-based: the median over rounds of the ratio within each round)."""
    if not plain_rounds or len(plain_rounds) != len(ray_rounds):
        raise ValueError(
            f"need the same, non-zero number of rounds on both sides, got {len(plain_rounds)} "
            f"plain and {len(ray_rounds)} Ray"
        )
    plain_steps, ray_steps = sum(plain_rounds, []), sum(ray_rounds, [])
    round_ratios = [
        images_per_second(ray, batch, statistics.median)
        / images_per_second(plain, batch, statistics.median)
        for plain, ray in zip(plain_rounds, ray_rounds, strict=True)
    ]
    plain_rate, ray_rate = (
        images_per_second(plain_steps, batch),
        images_per_second(ray_steps, batch),
    )
    return {
        "plain": plain_rate,
        "ray": ray_rate,
        "ratio": ray_rate / plain_rate,
        "plain_median": images_per_second(plain_steps, batch, statistics.median),
        "ray_median": images_per_second(ray_steps, batch, statistics.median),
        "ratio_median": statistics.median(round_ratios),
    }


def compare_ray_with_plain(settings: dict, storage: str, device, worker_cpus: int) -> dict:
    """Time the plain loop (in a thread of this process) and one Ray Train worker in turns."""
    import threading

    import ray

    ship_module_to_workers()
    baton = ray.remote(num_cpus=0)(Baton).remote()
    plain = InMemoryTraining(settings, device)
    stop, plain_rounds, plain_errors = threading.Event(), [], []

    def run_plain_side() -> None:
        try:
            plain_rounds.extend(
                take_turns(baton, PLAIN, settings["rounds"], plain.time_round, stop)
            )
        except Exception as error:  # re-raised below, in the caller's thread
            plain_errors.append(error)

    thread = threading.Thread(target=run_plain_side, name="plain-loop", daemon=True)
    thread.start()
    try:
        on_ray = run_one_worker(
            ray_throughput_loop, {**settings, "baton": baton}, storage, "throughput", worker_cpus
        )
    except Exception:
        stop.set()
        thread.join()
        if plain_errors:
            raise plain_errors[0] from None
        raise
    thread.join()
    if plain_errors:
        raise plain_errors[0]
    return {
        **compare_rounds(plain_rounds, on_ray["round_seconds"], settings["batch"]),
        "plain_niceness": os.nice(0),
        "ray_niceness": on_ray["niceness"],
    }


def summarise_data_wait(
    wait_seconds: list[float], compute_seconds: list[float], first_of_epoch: list[bool], batch: int
) -> dict:
    """Wait fraction over all timed steps and over steps that do not start an epoch, and the
    mean wait for an epoch's first batch (one Ray Data execution runs through the epochs, so an
    epoch's first batch should wait no longer than any other)."""
    if not wait_seconds or len(wait_seconds) != len(compute_seconds):
        raise ValueError(
            f"need matching, non-empty wait and compute times, got {len(wait_seconds)} "
            f"and {len(compute_seconds)}: add epochs or synthetic images"
        )
    total = sum(wait_seconds) + sum(compute_seconds)
    steady = [
        (wait, compute)
        for wait, compute, first in zip(wait_seconds, compute_seconds, first_of_epoch, strict=True)
        if not first
    ]
    steady_total = sum(wait + compute for wait, compute in steady)
    epoch_starts = [wait for wait, first in zip(wait_seconds, first_of_epoch, strict=True) if first]
    return {
        "wait_fraction": sum(wait_seconds) / total,
        "steady_wait_fraction": (
            sum(wait for wait, _ in steady) / steady_total if steady_total else float("nan")
        ),
        "epoch_start_wait_s": statistics.mean(epoch_starts) if epoch_starts else float("nan"),
        "images_per_s": batch * len(wait_seconds) / total,
        "timed_steps": len(wait_seconds),
    }


def data_wait_loop(settings: dict) -> dict:
    """Ray Train worker: train on the real augmentation pipeline as ``unet_ray.pipelines.train_loop`` does
    (``stream_batches``, ``steps_per_worker_epoch``), timing ``next(batch)``; reports and returns
    ``summarise_data_wait``'s figures and the wait for the run's very first batch."""
    import ray.train
    import ray.train.torch

    from unet_ray.pipelines.train_loop import stream_batches

    device = ray.train.torch.get_device()
    configure_threads(settings)
    model, optimizer, loss_function = build_training_objects(
        settings, device, ray.train.torch.prepare_model
    )
    batches = stream_batches(
        ray.train.get_dataset_shard("train"),
        settings["batch"],
        device,
        settings["shuffle_buffer_tiles"],  # the training default: its cost is part of the wait
    )
    wait_seconds, compute_seconds, first_of_epoch = [], [], []
    for epoch in range(settings["epochs"]):
        for step in range(settings["steps_per_epoch"]):
            started = time.perf_counter()
            batch = next(batches)
            fetched = time.perf_counter()
            train_step(model, optimizer, loss_function, batch["image"], batch["mask"], settings)
            if epoch == 0 and step == 0:
                run_start_wait = fetched - started
            if epoch > 0:  # the first epoch warms up the pipeline and the model
                wait_seconds.append(fetched - started)
                compute_seconds.append(time.perf_counter() - fetched)
                first_of_epoch.append(step == 0)
    batches.close()
    measured = summarise_data_wait(wait_seconds, compute_seconds, first_of_epoch, settings["batch"])
    measured["run_start_wait_s"] = run_start_wait
    ray.train.report(measured)
    return measured


def ship_module_to_workers() -> None:
    """Pickle this module's functions and classes by value: Ray workers cannot import it (it
    lives in benchmarks/, not in the package)."""
    import ray.cloudpickle

    if __name__ != "__main__":  # __main__ is pickled by value anyway
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def ensure_ray(settings: dict) -> bool:
    """Start a local Ray unless one is running; returns whether this call started it.

    Ray runs its workers at niceness 15 by default: on a machine busy with other work they get
    a small share of the CPUs, which is no framework overhead. A Ray started here runs them at
    this process's niceness, like the plain loop; each side's niceness is reported. It runs the
    dashboard: Ray Train frees a finished run's placement group through the state API it serves
    (without it, every run logs "Failed to query Ray Train Controller actor state" until exit).
    """
    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if ray.is_initialized():
        return False
    ray.init(
        num_cpus=max(MIN_RAY_CPUS, settings["threads"] + 2),
        include_dashboard=True,
        configure_logging=False,
        runtime_env={"env_vars": {WORKER_NICENESS_ENV: str(os.nice(0))}},
    )
    return True


def run_one_worker(loop, settings: dict, storage: str, name: str, cpus: int, datasets=None) -> dict:
    """Fit a one-worker TorchTrainer running ``loop(settings)``; returns what the loop returned
    (Train V2 keeps ``Result.metrics`` only for reports that carry a checkpoint)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from unet_ray.pipelines.train import build_data_config

    data_config = {"dataset_config": build_data_config(workers=1)}  # as `unet-ray train`
    ship_module_to_workers()
    trainer = TorchTrainer(
        loop,
        train_loop_config=settings,
        scaling_config=ScalingConfig(
            num_workers=1,
            use_gpu=settings["use_gpu"],
            resources_per_worker={"CPU": cpus, **({"GPU": 1} if settings["use_gpu"] else {})},
        ),
        run_config=RunConfig(name=name, storage_path=storage),
        datasets=datasets,
        **(data_config if datasets else {}),
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"benchmark worker {name} failed: {result.error}")
    if not isinstance(result.return_value, dict):
        raise RuntimeError(f"benchmark worker {name} returned {result.return_value!r}, not figures")
    return result.return_value


def prepare_benchmark_dataset(root: str, settings: dict) -> str:
    """A synthetic DSB2018 dataset prepared into Parquet tiles under ``root``, its training
    shards copied ``settings["shard_copies"]`` times in all; its URI."""
    import shutil

    from unet_ray.io.prepared import TRAIN_SPLIT
    from unet_ray.io.synth import write_synthetic_dataset
    from unet_ray.pipelines.data import prepare_dataset

    source, prepared = os.path.join(root, "synth"), os.path.join(root, "prepared")
    side = settings["synth_side"]
    write_synthetic_dataset(
        source, count=settings["synth_count"], seed=DATA_SEED, min_side=side, max_side=side
    )
    prepare_dataset(source, prepared, tile_size=DATA_TILE)
    shards = sorted(Path(prepared, TRAIN_SPLIT).glob("*.parquet"))
    for copy in range(1, settings["shard_copies"]):
        for shard in shards:
            shutil.copyfile(shard, shard.with_name(f"copy{copy}_{shard.name}"))
    return prepared


def run(quick: bool = True) -> dict[str, float]:
    """All training figures; ``quick`` uses 64 px crops and a few steps on a CPU."""
    import ray

    from unet_ray.core.config import DataConfig
    from unet_ray.io.prepared import TRAIN_SPLIT, count_rows
    from unet_ray.pipelines.data import build_training_datasets
    from unet_ray.pipelines.train_loop import steps_per_worker_epoch, training_passes

    device = select_device()
    settings = benchmark_settings(quick, device.type == "cuda")
    started_ray = ensure_ray(settings)
    try:
        with tempfile.TemporaryDirectory(prefix="bench_train_") as root:
            worker_cpus = DATA_WORKER_CPUS if settings["use_gpu"] else settings["threads"]
            compared = compare_ray_with_plain(settings, root, device, worker_cpus)
            prepared = prepare_benchmark_dataset(root, settings)
            # the worker's Ray Data progress bars would print into the results table
            ray.data.DataContext.get_current().enable_progress_bars = False
            data = DataConfig(image_size=settings["side"])
            train_tiles = count_rows(os.path.join(prepared, TRAIN_SPLIT))
            batch, epochs = settings["batch"], settings["epochs"]
            passes = training_passes(epochs, train_tiles, world_size=1, batch_size=batch)
            datasets = {"train": build_training_datasets(prepared, data, passes=passes)["train"]}
            steps = steps_per_worker_epoch(train_tiles, world_size=1, batch_size=batch)
            waiting = run_one_worker(
                data_wait_loop,
                {**settings, "steps_per_epoch": steps},
                root,
                "data_wait",
                DATA_WORKER_CPUS,
                datasets,
            )
    finally:
        if started_ray:
            ray.shutdown()
    return {
        "train_images_per_s_plain": compared["plain"],
        "train_images_per_s_ray": compared["ray"],
        "train_ray_vs_plain": compared["ratio"],
        "train_images_per_s_plain_median": compared["plain_median"],
        "train_images_per_s_ray_median": compared["ray_median"],
        "train_ray_vs_plain_median": compared["ratio_median"],
        "train_niceness_plain": compared["plain_niceness"],
        "train_niceness_ray_worker": compared["ray_niceness"],
        "train_data_wait_fraction": waiting["wait_fraction"],
        "train_data_wait_fraction_steady": waiting["steady_wait_fraction"],
        "train_epoch_start_wait_s": waiting["epoch_start_wait_s"],
        "train_images_per_s_pipeline": waiting["images_per_s"],
        "train_pipeline_start_wait_s": waiting["run_start_wait_s"],
        "train_pipeline_timed_steps": waiting["timed_steps"],
        "train_pipeline_steps_per_epoch": steps,
        "train_elastic_probability": data.elastic_probability,
        "train_side": settings["side"],
        "train_batch": settings["batch"],
        "train_timed_steps": settings["steps"] * settings["rounds"],
        "train_threads": settings["threads"],
        "train_device": str(device),
        "train_precision": "bf16 autocast, channels_last" if settings["bf16"] else "fp32",
    }


def format_table(results: dict) -> str:
    side, batch = results["train_side"], results["train_batch"]
    return "\n".join(
        [
            f"Training {side}x{side}, batch {batch}, on {results['train_device']} "
            f"({results['train_precision']}, {results['train_threads']} torch threads, niceness "
            f"{results['train_niceness_plain']} plain / {results['train_niceness_ray_worker']} Ray)",
            "",
            "| measurement | fastest step | median step |",
            "| --- | --- | --- |",
            f"| plain PyTorch loop, images/s | {results['train_images_per_s_plain']:.3f} "
            f"| {results['train_images_per_s_plain_median']:.3f} |",
            f"| one Ray Train worker, images/s | {results['train_images_per_s_ray']:.3f} "
            f"| {results['train_images_per_s_ray_median']:.3f} |",
            f"| Ray / plain | {results['train_ray_vs_plain']:.3f} "
            f"| {results['train_ray_vs_plain_median']:.3f} |",
            "",
            "| real pipeline | value |",
            "| --- | --- |",
            f"| images/s | {results['train_images_per_s_pipeline']:.3f} |",
            f"| data wait fraction (epoch starts included) "
            f"| {results['train_data_wait_fraction']:.4f} |",
            f"| data wait fraction (within epochs) "
            f"| {results['train_data_wait_fraction_steady']:.4f} |",
            f"| wait for an epoch's first batch, s | {results['train_epoch_start_wait_s']:.3f} |",
            f"| steps per epoch | {results['train_pipeline_steps_per_epoch']:.0f} |",
            f"| wait for the run's first batch (pipeline start, untimed epoch), s "
            f"| {results['train_pipeline_start_wait_s']:.3f} |",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    return standalone_main(
        __doc__.splitlines()[0], run, format_table, "small crops, few steps", argv
    )


if __name__ == "__main__":
    sys.exit(main())
