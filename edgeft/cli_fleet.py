"""``edgeft fleet``: many devices learn one adapter through Flower (needs the ``[fleet]`` extra)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from edgeft.cli_common import Command
from edgeft.errors import EdgeftError


@click.group()
def fleet():
    """Many devices learn together through Flower; seeds and scalars on the wire (needs '.[fleet]')."""


@fleet.command("simulate", cls=Command)
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path), help="All clients' data; --partition splits it.")
@click.option("--clients", default=4, show_default=True)
@click.option("--partition", default="iid", show_default=True, help="iid, dirichlet:ALPHA or by-field:NAME.")
@click.option("--rounds", default=5, show_default=True)
@click.option("--local-steps", default=4, show_default=True, help="Zeroth-order steps per client per round.")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Run folder.")
@click.option("--eval-data", type=click.Path(path_type=Path), help="Held-out data the server scores each round.")
@click.option("--eval-every", default=1, show_default=True)
@click.option("--pool-size", default=1024, show_default=True, help="Shared seeds (K).")
@click.option("--clients-per-round", type=int, help="Clients sampled per round (default: all).")
@click.option("--lr", type=float, help="Step size of the shared update (default: fixed at the first round so "
                                       "that it moves each value by MeZO's default step).")
@click.option("--eps", default=1e-3, show_default=True)
@click.option("--batch-size", default=4, show_default=True)
@click.option("--clip", default=10.0, show_default=True, help="Each uploaded value is clipped to [-clip, clip].")
@click.option("--aggregate", type=click.Choice(["mean", "median", "trimmed"]), default="mean", show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--init-adapter", type=click.Path(path_type=Path), help="A start every client shares (e.g. a head).")
@click.option("--method", type=click.Choice(["seeds", "fedavg"]), default="seeds", show_default=True,
              help="seeds: seeds and scalars on the wire; fedavg: the usual baseline (whole adapters, Flower's FedAvg).")
@click.option("--resume", is_flag=True, help="Continue RUN from its saved state.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object at the end.")
def fleet_simulate(bundle, data, clients, partition, rounds, local_steps, out, eval_data, eval_every, pool_size,
                   clients_per_round, lr, eps, batch_size, clip, aggregate, seed, init_adapter, method, resume, as_json):
    """Simulate a fleet of CLIENTS devices with Flower's simulation engine."""
    try:
        from edgeft.fleet.apps import FleetSettings
        from edgeft.fleet.protocol import FleetConfig
        from edgeft.fleet.simulate import simulate
    except ImportError as err:
        raise EdgeftError(f"edgeft fleet needs Flower: pip install -e '.[fleet]' ({err})") from None
    config = FleetConfig(seed=seed, pool_size=pool_size, lr=lr, eps=eps, local_steps=local_steps, batch_size=batch_size,
                         clip=clip, aggregate=aggregate, clients_per_round=clients_per_round)
    settings = FleetSettings(bundle, data, out, clients, rounds, partition, config, eval_data, eval_every,
                             init_adapter=init_adapter, log=lambda m: click.echo(m, err=True))
    summary = simulate(settings, resume=resume, method=method)
    click.echo(json.dumps(summary, sort_keys=True) if as_json else
               f"{summary['rounds']} rounds, {clients} clients: upload ≤ {summary['upload_bytes_per_client_round_max']} B "
               f"and download ≤ {summary['download_bytes_per_client_round_max']} B per client per round; "
               f"adapter in {summary['adapter']}")
