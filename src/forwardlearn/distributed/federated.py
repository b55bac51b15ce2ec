"""Federated learning without backprop (BAFFLE) against FedAvg with backprop, simulated in one process.

BAFFLE (Feng, Pang, Du, Chen, Yan & Lin 2023, "Does Federated Learning Really Need Backpropagation?",
Sec. 3 and Algorithm 1, the FedSGD form): each round the server broadcasts one round seed; every
client regenerates the same ``K`` perturbations from it, runs forward passes only on its local data and
uploads ``K`` finite differences ``s_{c,k} = (L_c(W + eps z_k) - L_c(W)) / eps`` (``zo_spsa`` with
``difference="forward"``; any seed-and-scalar rule works). The server averages them weighted by the
clients' example counts, ``s_k = sum_c n_c s_{c,k} / sum_c n_c`` (the secure-aggregation-friendly
sum of Sec. 3), forms ``g = (1/K) sum_k s_k z_k`` by regenerating ``z_k`` (Stein's identity, Eq. 3-4)
and takes an optimizer step. The downlink is the round seed and the ``K`` aggregated scalars: a
client that holds a replica of the model and optimizer applies the same update and stays
bit-identical to the server (``replicas=True`` checks this).

FedAvg (McMahan et al. 2017, Algorithm 1): every client starts from the global weights, runs
``local_epochs`` of mini-batch SGD with backprop and uploads its weights; the server averages them
weighted by example counts.

Messages are packed to bytes before the server reads them, so the uplink byte counts are exact.
Both run as step strategies of the one training loop (one round per epoch of
:class:`~forwardlearn.training.loop.Trainer`), which times the rounds and evaluates every ``eval_every``.

Flower was considered and not used: ``flwr`` 1.42 requires some 25 packages (grpcio, protobuf,
cryptography, sqlalchemy, alembic, fastapi, uvicorn, uv, typer, rich, httpx, ...) and its simulation
engine needs ray; the protocol here is a loop of a few lines.
"""

from __future__ import annotations

import copy
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..forward_only.directions import draw_seeds
from ..rules.base import Rule, SeedScalarRule, check_int, require_seed_scalar, trainable_parameters
from ..training.loop import Callback, Trainer, accuracy
from ..training.optim import make_optimizer
from ..training.strategies import Strategy
from .wire import checksum, stream_seed


def dirichlet_split(y: Tensor, clients: int, alpha: float, seed: int = 0, min_size: int = 2) -> list[Tensor]:
    """Non-IID shards: for every class, its examples are divided among clients in proportions drawn from
    ``Dirichlet(alpha)`` (Hsu, Qi & Brown 2019). Small ``alpha``: each client sees few classes; large:
    near IID. Redrawn (up to 100 times) until every client holds at least ``min_size`` examples."""
    if isinstance(clients, bool) or not isinstance(clients, int) or clients < 1:
        raise ValueError(f"clients must be a positive integer, got {clients!r}")
    if not (alpha > 0):
        raise ValueError(f"alpha must be positive, got {alpha!r}")
    if clients * min_size > len(y):
        raise ValueError(f"{clients} clients with at least {min_size} examples each need more than {len(y)} examples")
    rng = np.random.default_rng(seed)
    labels = y.cpu().numpy()
    for _ in range(100):
        shards: list[list[int]] = [[] for _ in range(clients)]
        for k in np.unique(labels):
            idx = np.flatnonzero(labels == k)
            rng.shuffle(idx)
            p = rng.dirichlet(np.full(clients, float(alpha)))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
            for c, part in enumerate(np.split(idx, cuts)):
                shards[c].extend(part.tolist())
        if min(len(s) for s in shards) >= min_size:
            return [torch.tensor(sorted(s), dtype=torch.long) for s in shards]
    raise ValueError(f"could not split {len(y)} examples into {clients} shards of at least {min_size} "
                     f"with alpha={alpha}; use fewer clients or a larger alpha")


# --- messages ---------------------------------------------------------------------------------------

_UPLINK_HEAD = struct.Struct("<iiq")  # client, round, examples


def pack_scalars_uplink(msg: dict[str, Any]) -> bytes:
    """BAFFLE uplink ``{"client", "round", "examples", "scalars" (float32 (K,))}`` -> ``16 + 4 K`` bytes."""
    s = msg["scalars"].detach().cpu().to(torch.float32).reshape(-1)
    return _UPLINK_HEAD.pack(msg["client"], msg["round"], msg["examples"]) + s.numpy().tobytes()


def unpack_scalars_uplink(raw: bytes) -> dict[str, Any]:
    client, rnd, n = _UPLINK_HEAD.unpack_from(raw)
    scalars = torch.frombuffer(bytearray(raw[_UPLINK_HEAD.size :]), dtype=torch.float32)
    return {"client": client, "round": rnd, "examples": n, "scalars": scalars}


def pack_weights_uplink(msg: dict[str, Any]) -> bytes:
    """FedAvg uplink ``{"client", "round", "examples", "weights" (list of tensors)}`` -> bytes."""
    body = b"".join(t.detach().cpu().contiguous().numpy().tobytes() for t in msg["weights"])
    return _UPLINK_HEAD.pack(msg["client"], msg["round"], msg["examples"]) + body


def unpack_weights_uplink(raw: bytes, like: list[Tensor]) -> dict[str, Any]:
    client, rnd, n = _UPLINK_HEAD.unpack_from(raw)
    out, off = [], _UPLINK_HEAD.size
    for t in like:
        size = t.numel() * t.element_size()
        out.append(torch.frombuffer(bytearray(raw[off : off + size]), dtype=t.dtype).view_as(t))
        off += size
    if off != len(raw):
        raise ValueError(f"FedAvg uplink of client {client}: {len(raw)} bytes, expected {off}")
    return {"client": client, "round": rnd, "examples": n, "weights": out}


@dataclass
class FedResult:
    """Per-round records (``round, test_acc, train_loss, uplink_bytes_per_client, downlink_bytes_per_client``)
    and the last round's uplink messages (as the clients built them, before packing)."""

    method: str
    rounds: list[dict[str, float]] = field(default_factory=list)
    last_uplinks: list[dict[str, Any]] = field(default_factory=list)
    model_bytes: int = 0

    def column(self, key: str) -> list[float]:
        return [r[key] for r in self.rounds if key in r]

    @property
    def final(self) -> dict[str, float]:
        return self.rounds[-1] if self.rounds else {}


def _client_batch(X: Tensor, y: Tensor, batch_size: int | None, g: torch.Generator) -> tuple[Tensor, Tensor]:
    if batch_size is None or batch_size >= len(X):
        return X, y
    idx = torch.randperm(len(X), generator=g)[:batch_size]
    return X[idx], y[idx]


# --- rounds as steps of the one training loop --------------------------------------------------------


class Rounds(Strategy):
    """One federated round per epoch of :class:`~forwardlearn.training.loop.Trainer`: :meth:`round` does the
    protocol, the loop times it, evaluates every ``eval_every`` rounds and calls the callbacks; the records
    become the rounds of a :class:`FedResult`."""

    needs_optimizer = False

    def __init__(self, method: str, clients: list[tuple[Tensor, Tensor]], test: tuple[Tensor, Tensor] | None,
                 rounds: int, eval_every: int, eval_rule: Rule, model_bytes: int) -> None:
        self.clients = clients
        self.test = test
        self.rounds = rounds
        self.eval_every = check_int(eval_every, "eval_every")
        self.eval_rule = eval_rule
        self.result = FedResult(method, model_bytes=model_bytes)
        self.total_examples = sum(len(c[0]) for c in clients)
        self._fields: dict[str, float] = {}

    def round(self, trainer: Trainer, t: int) -> tuple[float, dict[str, float]]:
        """Round ``t``: returns the training loss and the record's fields (bytes, examples)."""
        raise NotImplementedError

    def steps_per_epoch(self, trainer: Trainer, n: int) -> int:
        return 1

    def batches(self, trainer: Trainer, n: int) -> list[None]:
        return [None]

    def gather(self, trainer: Trainer, X: Tensor, y: Tensor, item: None) -> None:
        return None

    def step(self, trainer: Trainer, batch: None) -> tuple[float, float]:
        loss, self._fields = self.round(trainer, trainer.global_step + 1)
        return loss, 1.0

    def evaluate(self, trainer: Trainer, X: Tensor, y: Tensor, Xt: object, yt: object) -> dict[str, float]:
        t = trainer.epoch
        if self.test is None or (t % self.eval_every and t != self.rounds):
            return {}
        return {"test_acc": accuracy(trainer.model, self.eval_rule, *self.test)}


class _ToRounds(Callback):
    """The loop's records as :class:`FedResult` rounds (and ``on_round`` per round)."""

    def __init__(self, on_round: Callable[[dict[str, float]], None] | None) -> None:
        self.on_round = on_round

    def on_epoch_end(self, trainer: Trainer, record: dict[str, float]) -> None:
        rounds: Rounds = trainer.strategy
        rec = {"round": int(record["epoch"]), "train_loss": record["loss"], **rounds._fields}
        if "test_acc" in record:
            rec["test_acc"] = record["test_acc"]
        rounds.result.rounds.append(rec)
        if self.on_round is not None:
            self.on_round(rec)


def _run_rounds(model: nn.Module, rounds: Rounds, optimizer: torch.optim.Optimizer | None, seed: int,
                on_round: Callable[[dict[str, float]], None] | None) -> FedResult:
    check_int(rounds.rounds, "rounds")
    data = (torch.cat([c[0] for c in rounds.clients]), torch.cat([c[1] for c in rounds.clients]))
    device = next(model.parameters()).device
    trainer = Trainer(model, rounds.eval_rule, optimizer, epochs=rounds.rounds, batch_size=1, strategy=rounds,
                      seed=seed, progress=False, device=device, eval_train=False, callbacks=[_ToRounds(on_round)])
    trainer.fit(data)
    return rounds.result


# --- BAFFLE -----------------------------------------------------------------------------------------------


class BaffleRounds(Rounds):
    """BAFFLE rounds (module doc): round seed down, ``K`` scalars per client up, one optimizer step."""

    def __init__(self, model: nn.Module, rule: SeedScalarRule, optimizer: torch.optim.Optimizer, make_opt:
                 Callable[[nn.Module], torch.optim.Optimizer], clients: list[tuple[Tensor, Tensor]],
                 test: tuple[Tensor, Tensor] | None, *, rounds: int, batch_size: int | None, seed: int,
                 replicas: bool, eval_every: int) -> None:
        params = trainable_parameters(model)
        super().__init__("baffle", clients, test, rounds, eval_every, rule,
                         sum(p.numel() * p.element_size() for p in params))
        self.rule, self.optimizer, self.batch_size, self.seed = rule, optimizer, batch_size, seed
        self.copies: list[tuple[nn.Module, torch.optim.Optimizer]] = []
        if replicas:
            for _ in clients:
                m = copy.deepcopy(model)
                self.copies.append((m, make_opt(m)))
        self.gens = [torch.Generator().manual_seed(stream_seed(seed, 0, c + 1)) for c in range(len(clients))]
        self.k = int(rule.directions)

    def round(self, trainer: Trainer, t: int) -> tuple[float, dict[str, float]]:
        rule, k = self.rule, self.k
        round_seed = stream_seed(self.seed, t, 0)  # the broadcast
        seeds = draw_seeds(torch.Generator().manual_seed(round_seed), k)
        uplinks, losses = [], []
        for c, (Xc, yc) in enumerate(self.clients):
            local = self.copies[c][0] if self.copies else trainer.model
            lparams = trainable_parameters(local)
            with torch.no_grad():
                snapshot = [p.detach().clone() for p in lparams]
            xb, yb = _client_batch(Xc, yc, self.batch_size, self.gens[c])
            rule.generator("cpu").manual_seed(round_seed)
            try:
                client_seeds, scalars, loss = rule.estimate(local, xb, yb)
            finally:
                with torch.no_grad():
                    for p, s in zip(lparams, snapshot):
                        p.copy_(s)
            if client_seeds != seeds:
                raise RuntimeError(f"client {c} drew other directions than the server's round seed gives")
            uplinks.append({"client": c, "round": t, "examples": len(xb), "scalars": scalars.to(torch.float32)})
            losses.append(loss * len(xb))
        wire = [pack_scalars_uplink(m) for m in uplinks]
        received = [unpack_scalars_uplink(raw) for raw in wire]
        n = sum(r["examples"] for r in received)
        agg = sum(r["scalars"].to(torch.float64) * r["examples"] for r in received) / n
        agg = agg.to(torch.float32)  # what the downlink carries
        for m, o in [(trainer.model, self.optimizer)] + self.copies:
            o.zero_grad(set_to_none=True)
            rule.apply(m, seeds, agg.to(torch.float64))
            o.step()
        self.result.last_uplinks = uplinks
        return sum(losses) / n, {"uplink_bytes_per_client": sum(len(w) for w in wire) / len(wire),
                                 "downlink_bytes_per_client": 8 + 4 * k, "examples_per_round": n,
                                 "total_examples": self.total_examples}

    def finish(self, trainer: Trainer) -> None:
        ref = checksum(trainer.model)
        for c, (m, _) in enumerate(self.copies):
            if not torch.equal(checksum(m), ref):
                raise RuntimeError(f"client {c}'s replica differs from the server's model after {self.rounds} rounds")


def baffle(
    model: nn.Module,
    rule: Rule,
    clients: list[tuple[Tensor, Tensor]],
    test: tuple[Tensor, Tensor] | None,
    *,
    rounds: int,
    lr: float,
    optimizer: str = "adam",
    batch_size: int | None = None,
    seed: int = 0,
    replicas: bool = False,
    eval_every: int = 1,
    on_round: Callable[[dict[str, float]], None] | None = None,
) -> FedResult:
    """Train ``model`` by BAFFLE rounds (module doc); returns the per-round :class:`FedResult`.

    ``batch_size=None``: each client uses its whole shard every round; else a fresh random batch.
    ``replicas=True``: every client keeps its own model and optimizer, updated from the downlink
    (round seed + aggregated scalars) only, and is checked bit-identical to the server at the end.
    """
    require_seed_scalar(rule, "BAFFLE")
    check_int(rounds, "rounds")
    opt = make_optimizer(optimizer, trainable_parameters(model), lr)
    strategy = BaffleRounds(model, rule, opt, lambda m: make_optimizer(optimizer, trainable_parameters(m), lr),
                            clients, test, rounds=rounds, batch_size=batch_size, seed=seed, replicas=replicas,
                            eval_every=eval_every)
    return _run_rounds(model, strategy, opt, seed, on_round)


# --- FedAvg -----------------------------------------------------------------------------------------------


class FedAvgRounds(Rounds):
    """FedAvg rounds: every client trains the global weights locally with backprop, the server averages."""

    def __init__(self, model: nn.Module, clients: list[tuple[Tensor, Tensor]], test: tuple[Tensor, Tensor] | None,
                 *, rounds: int, lr: float, local_epochs: int, batch_size: int, optimizer: str, seed: int,
                 loss: Callable[[Tensor, Tensor], Tensor], eval_every: int) -> None:
        from ..rules import get_rule

        self.params = trainable_parameters(model)
        super().__init__("fedavg", clients, test, rounds, eval_every, get_rule("backprop", seed=seed),
                         sum(p.numel() * p.element_size() for p in self.params))
        self.lr, self.local_epochs, self.batch_size, self.optimizer = lr, local_epochs, batch_size, optimizer
        self.loss = loss
        self.g = torch.Generator().manual_seed(seed)

    def round(self, trainer: Trainer, t: int) -> tuple[float, dict[str, float]]:
        model, params = trainer.model, self.params
        global_state = [p.detach().clone() for p in params]
        uplinks, losses = [], []
        for c, (Xc, yc) in enumerate(self.clients):
            with torch.no_grad():
                for p, s in zip(params, global_state):
                    p.copy_(s)
            opt = make_optimizer(self.optimizer, params, self.lr)
            total = 0.0
            for _ in range(self.local_epochs):
                perm = torch.randperm(len(Xc), generator=self.g)
                for i in range(0, len(Xc), self.batch_size):
                    idx = perm[i : i + self.batch_size]
                    opt.zero_grad(set_to_none=True)
                    loss = self.loss(model(Xc[idx]), yc[idx])
                    loss.backward()
                    opt.step()
                    total += float(loss.detach()) * len(idx)
            losses.append(total / self.local_epochs)
            uplinks.append({"client": c, "round": t, "examples": len(Xc),
                            "weights": [p.detach().clone() for p in params]})
        wire = [pack_weights_uplink(m) for m in uplinks]
        received = [unpack_weights_uplink(raw, global_state) for raw in wire]
        n = sum(r["examples"] for r in received)
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(sum(r["weights"][i].to(torch.float64) * r["examples"] for r in received) / n)
        self.result.last_uplinks = uplinks
        return sum(losses) / n, {"uplink_bytes_per_client": sum(len(w) for w in wire) / len(wire),
                                 "downlink_bytes_per_client": self.result.model_bytes,
                                 "examples_per_round": n * self.local_epochs, "total_examples": self.total_examples}


def fedavg(
    model: nn.Module,
    clients: list[tuple[Tensor, Tensor]],
    test: tuple[Tensor, Tensor] | None,
    *,
    rounds: int,
    lr: float,
    local_epochs: int = 1,
    batch_size: int = 32,
    optimizer: str = "sgd",
    seed: int = 0,
    loss: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    eval_every: int = 1,
    on_round: Callable[[dict[str, float]], None] | None = None,
    loss_fn: None = None,
) -> FedResult:
    """FedAvg with backprop (McMahan et al. 2017, Algorithm 1), all clients every round; ``loss(outputs,
    targets)`` is the clients' training loss (``loss_fn`` is its old name and refused)."""
    if loss_fn is not None:
        raise ValueError("fedavg: the loss is passed as loss=..., not loss_fn=...")
    check_int(rounds, "rounds")
    strategy = FedAvgRounds(model, clients, test, rounds=rounds, lr=lr, local_epochs=local_epochs,
                            batch_size=batch_size, optimizer=optimizer, seed=seed, loss=loss,
                            eval_every=eval_every)
    return _run_rounds(model, strategy, None, seed, on_round)
