"""Several ranks, one step: how the engine's steps become collective.

**Tensor parallelism** (:class:`Broadcast`): every rank holds a slice of every layer and must
run the *same* forward on the *same* batch, with identical cache operations.  Rank 0 serves
HTTP and decides each step's plan (rows kept, tokens fed, prompts admitted: a few hundred
bytes); ``broadcast_object_list`` sends it, every rank applies it (:meth:`KVBatch.apply`), and
only rank 0 samples — the tokens it chose go out with the next plan.  Idle, rank 0 sends an
empty plan every second: a heartbeat, so a dead rank is noticed (the collective fails) while no
request is running.  The other ranks run :func:`follow` until a ``stop`` plan.

**ZeRO-3** (:class:`Lockstep`): every rank serves its own requests (its own port), as ZeRO's
unique streams do, but each forward gathers every layer's parameters *collectively*, so all
ranks must run the same number of forwards.  Before each step the ranks exchange two bits
(will I decode? will I prefill?); a rank with nothing to do in a phase runs a one-token dummy
forward instead.
"""
from __future__ import annotations

from .. import dist

STOP = {"stop": True}


class PeerStopped(Exception):
    """Another rank is shutting down cleanly: this one stops too (not a failure)."""

    clean_stop = True
EMPTY = {"keep": [], "feed": [], "admit": []}


class Broadcast:
    """Rank 0 under tensor parallelism: broadcast the plan, then apply it like every rank."""

    idle_wait = 1.0      # seconds between heartbeats while idle

    def step(self, batch, plan: dict, early=None):
        dist.broadcast(plan)
        return batch.apply(plan, early)

    def close(self) -> None:
        dist.broadcast(STOP)


def follow(batch) -> None:
    """Ranks > 0 under tensor parallelism: apply rank 0's plans until it says stop."""
    while True:
        plan = dist.broadcast(None)
        if plan.get("stop"):
            return
        batch.apply(plan)


class Lockstep:
    """ZeRO-3: every rank plans its own rows; all run the same number of forwards."""

    def __init__(self):
        self._idle = 0

    @property
    def idle_wait(self) -> float:
        """Seconds every rank waits for requests while all are idle: 5 ms doubling to 200 ms,
        so an idle server does not spin on collectives, at the price of up to 200 ms before
        the first step after a quiet spell."""
        return min(0.2, 0.005 * 2 ** min(self._idle, 6))

    def step(self, batch, plan: dict, early=None):
        """Keep, then the prefill phase, then the decode phase — each a real forward on the
        ranks that have work in it and a dummy one on the others."""
        flags = dist.gather((bool(plan["feed"]), bool(plan["admit"]), False))
        if any(f[2] for f in flags):
            raise PeerStopped("another rank is shutting down")
        me = flags[dist.rank()]
        batch.keep(plan["keep"])
        group = out = None
        if me[1]:
            logits, group = batch.prefill(plan["admit"])
            if early is not None:
                early(logits)
        elif any(f[1] for f in flags):
            batch.dummy()
        if me[0]:
            out = batch.decode(plan["feed"])
        elif any(f[0] for f in flags):
            batch.dummy()
        if group is not None:
            batch.merge(group)
        self._idle = 0 if any(f[0] or f[1] for f in flags) else self._idle + 1
        return out

    def close(self) -> None:
        try:
            dist.gather((False, False, True))
        except Exception:  # noqa: BLE001 - the others may be gone already
            pass
