"""In-job recovery: the controller's body runs as attempts; when a policy rank dies or hangs, the attempt's
workers are torn down and a new attempt starts them again and resumes from the last checkpoint, up to
`run.max_restarts` times. Engine-only failures never get here: the engine group replaces its own engines
(generation.max_failures).

Each restart is one console line and one row of <run>/restarts.jsonl; metrics rows after a restart carry
`fault/restarts` and `fault/steps_redone`. Rows past the checkpoint are dropped on resume (RunDir), so
metrics.jsonl reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from megatron_rl import console
from megatron_rl.faults import stacks
from megatron_rl.faults.preemption import REQUEUE_EXIT, Preempted, Preemption
from megatron_rl.faults.watchdog import Watchdog
from megatron_rl.ray_utils import WorkerError

ENGINE_PHASES = ("generate", "refit", "eval")  # phases a stuck engine can hold up


class RankFailure(WorkerError):
    """Policy ranks died or stopped answering (a crash, a lost node, a hang the watchdog ended): what a
    restart from the last checkpoint can fix. `summary` is one line naming the ranks, nodes and logs."""

    def __init__(self, summary: str, cause: BaseException | None) -> None:
        detail = f"\ncause: {cause}" if cause is not None and str(cause) else ""
        super().__init__(summary + detail)
        self.summary = summary


class Workers:
    """The workers of one attempt: the policy group and the engine group, shut down when it ends."""

    def __init__(self) -> None:
        self.policy: Any = None
        self.engine: Any = None
        self._closers: list[Callable[[], None]] = []

    def closing(self, thing: Any) -> Any:
        """`thing.close()` runs first when the attempt ends (what feeds on the engines: rollout sources)."""
        self._closers.append(thing.close)
        return thing

    def add_policy(self, policy: Any) -> Any:
        self.policy = policy
        return policy

    def add_engine(self, engine: Any) -> Any:
        self.engine = engine
        return engine

    def listed(self) -> list[stacks.Worker]:
        out = []
        if self.policy is not None:
            ranks = self.policy.ranks
            for r in range(len(ranks.actors)):
                out.append(
                    stacks.Worker(
                        f"policy_rank{r}", self.policy.log_file(r), ranks.node_ids[r], ranks.hosts[r]
                    )
                )
        if self.engine is not None:
            for i, client in enumerate(self.engine.engines):
                node_id = client.info.get("node_id")
                out.append(stacks.Worker(client.log_name, self.engine.log_file(i), node_id, _host(node_id)))
        return out

    def kill(self, phase: str) -> None:
        import ray

        actors = list(self.policy.ranks.actors) if self.policy is not None else []
        if self.engine is not None and phase in ENGINE_PHASES:
            actors += [c.actor for c in self.engine.engines]
        for actor in actors:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - gone already
                pass

    def shutdown(self) -> None:
        stops = [*self._closers, *(g.shutdown for g in (self.engine, self.policy) if g is not None)]
        self._closers = []
        for stop in stops:
            try:
                stop()
            except Exception as exc:  # noqa: BLE001 - the next attempt needs the rest torn down too
                print(f"warning: shutting down after a failure: {exc}", file=sys.stderr)
        self.policy = self.engine = None


def _host(node_id: str | None) -> str:
    from megatron_rl.rank_actors import host_names

    return host_names().get(node_id, "?") if node_id else "?"


class Faults:
    """The controller's fault handling around its attempts: preemption signals, the hang watchdog, restarts.

    with Faults(cfg, run_dir_path) as faults:
        return faults.run(attempt)   # attempt(faults, workers) -> exit status
    """

    def __init__(self, cfg: Any, run_path: str | Path) -> None:
        self.run_path = Path(run_path)
        self.max_restarts = int(cfg.run.max_restarts)
        self.preemption = Preemption(self.run_path)
        self.watchdog = Watchdog(cfg.run.watchdog, self._on_hang)
        self.restarts = 0
        self.steps_redone = 0
        self.last_step = 0  # last step completed (logged) in this process
        self._pending: dict[str, Any] | None = None  # the failure a restart is under way for
        self._workers: Workers | None = None
        # Now, not at `with`: a signal during the set-up (after Ray's own handlers) must not abort either.
        self.preemption.__enter__()

    def __enter__(self) -> Faults:
        return self

    def __exit__(self, *exc: object) -> None:
        self.watchdog.close()
        self.preemption.__exit__(*exc)

    # ------------------------------------------------------------------ attempts
    def run(self, attempt: Callable[[Faults, Workers], int]) -> int:
        while True:
            if self.preempted:  # before (or between) attempts: nothing new to checkpoint
                return self.requeue(self.last_step, saved=False)
            self.preemption.immediate = True  # until the attempt has resumed
            try:
                with self.workers() as workers:
                    return attempt(self, workers)
            except Preempted:
                return self.requeue(self.last_step, saved=False)
            except RankFailure as failure:
                if self.restarts >= self.max_restarts:
                    raise WorkerError(self._final_message(failure)) from None
                self.restarts += 1
                print(
                    f"restart {self.restarts}/{self.max_restarts}: {failure.summary}; starting the workers "
                    "again from the last checkpoint",
                    file=sys.stderr,
                    flush=True,
                )
                self._pending = {
                    "restart": self.restarts,
                    "time": time.time(),
                    "cause": failure.summary,
                    "failed_after_step": self.last_step,
                }

    def _final_message(self, failure: RankFailure) -> str:
        if self.max_restarts == 0:
            hint = "run.max_restarts=0: set run.max_restarts=N to restart from the last checkpoint instead"
        else:
            hint = f"run.max_restarts={self.max_restarts} restart(s) used up"
        return f"{failure.summary}; {hint}\n{str(failure)[len(failure.summary) :].lstrip()}".rstrip()

    @contextmanager
    def workers(self) -> Iterator[Workers]:
        """One attempt's workers: a policy rank that died or stopped answering turns the attempt's error into
        a RankFailure (restartable); the workers are shut down whatever happened."""
        workers = self._workers = Workers()
        try:
            yield workers
        except (WorkerError, KeyboardInterrupt) as exc:
            hang = self.watchdog.take_fired()
            if isinstance(exc, KeyboardInterrupt) and hang is None:
                raise  # the user's Ctrl-C
            failed = {} if hang or isinstance(exc, RankFailure) else _failed_ranks(workers)
            if hang is None and not failed:
                raise  # not the policy's ranks (an engine the group gave up on, a bug): a restart won't help
            summary = hang or _describe(workers, failed, str(exc).partition(":")[0], self.run_path)
            raise RankFailure(summary, None if hang and isinstance(exc, KeyboardInterrupt) else exc) from exc
        finally:
            self._workers = None
            workers.shutdown()

    def resumed(self, step: int) -> None:
        """The attempt resumed at `step` (its checkpoint; 0: from scratch)."""
        if self._pending is not None:
            redone = max(0, self.last_step - step)
            self.steps_redone += redone
            row = {**self._pending, "resumed_from_step": step, "steps_redone": redone}
            with (self.run_path / "restarts.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
            self._pending = None
        self.last_step = step
        self.preemption.immediate = (
            False  # steps run: a signal now waits for the step's end and its checkpoint
        )

    def step_done(self, step: int) -> None:
        self.last_step = step

    def metrics(self) -> dict[str, float]:
        if not self.restarts:
            return {}
        return {"fault/restarts": float(self.restarts), "fault/steps_redone": float(self.steps_redone)}

    # ------------------------------------------------------------------ phases and preemption
    def phase(self, name: str, step: int) -> Any:
        return self.watchdog.phase(name, step)

    @property
    def preempted(self) -> str | None:
        return self.preemption.requested

    def requeue(self, step: int, saved: bool = True) -> int:
        """The line and the exit status of a stop for preemption; `saved`: step `step` was just checkpointed
        (else the last checkpoint stands)."""
        what = "checkpointed" if saved else "no new step to checkpoint"
        print(
            f"stopped for preemption ({self.preemption.requested}) after step {step}, {what}; "
            f"exit {REQUEUE_EXIT}: run the same command again to resume",
            file=sys.stderr,
            flush=True,
        )
        return REQUEUE_EXIT

    # ------------------------------------------------------------------ hangs
    def _on_hang(self, phase: str, step: int, elapsed: float, deadline: float) -> None:
        workers = self._workers
        listed = workers.listed() if workers is not None else []
        with ThreadPoolExecutor(max(1, len(listed))) as pool:
            dumps = list(pool.map(stacks.dump, listed))
        head = (
            f"hang: {phase} of step {step} ran {elapsed:.0f} s, past its deadline of {deadline:.0f} s "
            "(run.watchdog: factor x its recent longest run, at least floor_s)"
        )
        where = [f"  {w.name} on {w.node}: {stacks.stuck_in(d)}" for w, d in zip(listed, dumps)]
        path = self.run_path / f"hang_report_{step}.txt"
        n = 1
        while path.exists():
            n += 1
            path = self.run_path / f"hang_report_{step}_{n}.txt"
        body = [head, *where, ""]
        for w, d in zip(listed, dumps):
            body += [f"==== {w.name} on {w.node} (log {w.log})", d, ""]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("\n".join(body))
        tmp.replace(path)
        self.watchdog.fired = f"hang in {phase} of step {step} (stacks: {path})"
        print("\n".join([head, *where, f"stacks of every worker: {path}"]), file=sys.stderr, flush=True)
        if workers is not None:
            workers.kill(phase)  # the controller's wait on them ends in an error: restart or stop


def _failed_ranks(workers: Workers, timeout_s: float = 10.0) -> dict[int, str]:
    if workers.policy is None:
        return {}
    try:
        return workers.policy.ranks.unresponsive(timeout_s)
    except Exception:  # noqa: BLE001 - Ray itself in trouble: nothing to tell apart
        return {}


def _describe(workers: Workers, failed: dict[int, str], phase: str, run_path: Path) -> str:
    parts = []
    for r, state in sorted(failed.items(), key=lambda kv: (kv[1] != "died", kv[0])):
        ranks = workers.policy.ranks
        log = workers.policy.log_file(r) or console.logs_of(run_path)
        what = "died" if state == "died" else "does not answer"
        parts.append(f"policy rank {r} on node {ranks.hosts[r]} {what} (log {log})")
    text = "; ".join(parts[:4]) + (f" and {len(parts) - 4} more" if len(parts) > 4 else "")
    return f"{text}, during {phase}" if phase else text
