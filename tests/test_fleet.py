"""edgeft.fleet: the portable directions (test vectors), upload checks and robust aggregation, the
replay, partitions, and real Flower simulations (identical adapters everywhere, poisoned clients,
resume)."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from edgeft.cli import main
from edgeft.errors import EdgeftError
from edgeft.fleet import directions
from edgeft.fleet.partition import partition
from edgeft.fleet.protocol import (FleetConfig, FleetState, Upload, aggregate, apply_round, check_upload, replay,
                                   round_lr)

# SplitMix64's published outputs for seed 0 (the reference C code by Vigna), and this project's own
# vectors, also in docs/FLEET.md: a client in another language must reproduce these exactly.
SPLITMIX64_SEED0 = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
DIRECTION_12345 = "++++-++++-++---+"  # direction(12345, 16)
POOL_7 = [7191089600892374487, 309689372594955804, 16616101746815609346]  # pool(7, 3)


def test_directions_match_the_published_generator_and_the_documented_vectors():
    assert [directions.output(0, n) for n in (1, 2, 3)] == SPLITMIX64_SEED0
    assert [int(v) for v in directions.outputs(0, 3)] == SPLITMIX64_SEED0
    rng = np.random.default_rng(0)
    for seed in [int(s) for s in rng.integers(0, 2**63, size=5, dtype=np.int64)] + [2**64 - 1]:
        start = int(rng.integers(1, 10**6))
        assert [int(v) for v in directions.outputs(seed, 4, start)] == [directions.output(seed, n) for n in range(start, start + 4)]
    d = directions.direction(12345, 16)
    assert d.dtype == np.float32 and "".join("+" if v > 0 else "-" for v in d) == DIRECTION_12345
    assert directions.pool(7, 3) == POOL_7
    big = directions.direction(99, 100_000)
    assert set(np.unique(big)) == {-1.0, 1.0} and abs(big.mean()) < 0.02  # balanced signs


def _upload(**change):
    record = {"indices": [1, 5], "values": [0.5, -2.0], "examples": 10, "known_round": 0, "adapter": "x"}
    record.update(change)
    return record


@pytest.mark.parametrize("change, reason", [
    ({"values": [float("nan"), 1.0]}, "non-finite"),
    ({"values": [1e9, 1.0]}, "beyond"),
    ({"indices": [1, 4096]}, "unknown seed index 4096"),
    ({"indices": [-1, 2]}, "unknown seed index -1"),
    ({"indices": [3, 3]}, "twice"),
    ({"indices": [1]}, "1 seed indices but 2 values"),
    ({"values": ["a", 1.0]}, "numbers"),
    ({"examples": 0}, "positive integer"),
    ({"examples": "many"}, "positive integer"),
])
def test_garbage_uploads_are_rejected_with_a_reason(change, reason):
    with pytest.raises(ValueError, match=reason):
        check_upload(_upload(**change), FleetConfig(pool_size=1024))
    with pytest.raises(ValueError, match="malformed"):
        check_upload({"indices": [1]}, FleetConfig())
    with pytest.raises(ValueError, match="malformed"):
        check_upload("not a record", FleetConfig())


def test_aggregation_clips_weights_and_resists_outliers():
    config = FleetConfig(clip=10.0)
    clipped = check_upload(_upload(values=[50.0, -2.0]), config)
    assert clipped.values == [10.0, -2.0]
    a = Upload([1, 2], [1.0, 4.0], examples=30)
    b = Upload([2, 3], [2.0, 6.0], examples=10)
    mean = dict(aggregate([a, b], config))
    assert mean == pytest.approx({1: 0.75, 2: 3.5, 3: 1.5})  # examples-weighted, absent seeds count 0
    honest = [Upload([0], [1.0], 5), Upload([0], [1.2], 5), Upload([0], [0.8], 5)]
    liar = check_upload({"indices": [0], "values": [1e5], "examples": 10**6}, config)
    for how, bound in (("median", 1.2), ("trimmed", 1.2)):
        robust = dict(aggregate(honest + [liar], FleetConfig(aggregate=how, trim_fraction=0.25)))
        assert 0.8 <= robust[0] <= bound
    # the weighted mean is a convex combination: a liar moves a seed's value by at most the clip
    assert abs(dict(aggregate(honest + [liar], config))[0]) <= config.clip
    assert aggregate([], config) == []


def test_apply_round_is_the_documented_elementwise_rule_and_replay_chains_rounds():
    config = FleetConfig(seed=3, pool_size=8, lr=0.01)
    seeds = directions.pool(config.seed, config.pool_size)
    theta0 = np.linspace(-1, 1, 50).astype(np.float32)
    index = np.arange(5, 45)
    pairs = [(6, -0.3), (2, 1.7)]
    got = theta0.copy()
    apply_round(got, pairs, config.lr, seeds, index)
    want = theta0.copy()
    for j, g in sorted(pairs):  # the portable definition, one value at a time in float32
        step = np.float32(config.lr * g)
        d = directions.direction(seeds[j], len(index))
        for k, i in enumerate(index):
            want[i] = np.float32(want[i] - step * d[k])
    assert np.array_equal(got, want) and np.array_equal(got[:5], theta0[:5])
    history = [{"round": 0, "lr": 0.01, "pairs": [[6, -0.3], [2, 1.7]]}, {"round": 1, "lr": 0.01, "pairs": [[1, 0.25]]}]
    chained = replay(theta0, history[:1], config, index)
    apply_round(chained, [(1, 0.25)], config.lr, seeds, index)
    assert np.array_equal(replay(theta0, history, config, index), chained)


def test_the_default_lr_is_fixed_once_from_the_first_round_with_pairs():
    from edgeft.runtime.optimizers.zeroorder import auto_step

    config = FleetConfig()
    assert round_lr(config, [], [], 100) is None  # nothing to size it by yet
    first = round_lr(config, [{"round": 0, "lr": None, "pairs": []}], [(1, 3.0), (2, -4.0)], 100)
    assert first == pytest.approx(auto_step(100) / np.sqrt(12.5))
    assert round_lr(config, [{"round": 0, "lr": first, "pairs": [[1, 3.0]]}], [(5, 100.0)], 100) == first
    assert round_lr(FleetConfig(lr=0.2), [], [(1, 3.0)], 100) == 0.2


def test_class_mean_start_is_exact_under_any_split_and_bounds_a_liar():
    from edgeft.fleet.start import (check_losses, check_sums, class_sums, combine_means, head_from_means,
                                    pick_temperature, temperature_losses)

    rng = np.random.default_rng(0)
    features = rng.normal(size=(60, 5)).astype(np.float32)
    labels = rng.integers(0, 3, size=60)
    central = np.stack([features[labels == c].astype(np.float64).mean(0) for c in range(3)])
    for split in (np.array_split(np.arange(60), 4), [np.flatnonzero(labels == c) for c in range(3)]):  # iid, one label each
        uploads = [check_sums(class_sums(features[rows], labels[rows], 4), 4, 5, 1e6) for rows in split]
        means, counts = combine_means(uploads, 4, 5)
        assert np.allclose(means[:3], central) and counts.tolist() == [*np.bincount(labels, minlength=3).tolist(), 0]
        assert np.array_equal(means[3], np.zeros(5))  # a label no device holds: logit 0
    liar = class_sums(features[:1] * 1e4, labels[:1], 4)  # one device sends a class mean 10,000x too far
    honest = [class_sums(features[rows], labels[rows], 4) for rows in np.array_split(np.arange(1, 60), 4)]
    logged = []
    moved, _ = combine_means([check_sums(u, 4, 5, 1e6) for u in [liar, *honest]], 4, 5, logged.append)
    norms = [np.linalg.norm(features[rows][labels[rows] == c].mean(0)) for rows in np.array_split(np.arange(1, 60), 4)
             for c in range(3) if np.any(labels[rows] == c)]
    assert "twice the median" in logged[0]
    assert np.all(np.linalg.norm(moved, axis=1) <= 2 * np.median(norms + [1e4 * np.linalg.norm(features[0])]) + 1e-9)
    weight, bias = head_from_means(central, 5.0)  # logits rank labels by distance to their mean
    logits = features @ weight.T + bias
    distance = ((features[:, None, :] - central[None]) ** 2).sum(-1)
    assert np.array_equal(logits.argmax(1), distance.argmin(1)) and weight.dtype == np.float32
    losses = temperature_losses(features, labels, central, (0.1, 1.0, 1000.0))
    assert pick_temperature([check_losses({"losses": losses, "examples": 60}, 3)], (0.1, 1.0, 1000.0)) == float(
        (0.1, 1.0, 1000.0)[int(np.argmin(losses))])
    good = class_sums(features[:6], labels[:6], 4)
    for change, reason in [({"sums": [float("nan")] * len(good["sums"])}, "non-finite"),
                           ({"labels": [7] * len(good["labels"])}, "unknown or repeated label"),
                           ({"counts": [0] * len(good["counts"])}, "count outside"),
                           ({"sums": good["sums"][:-1]}, "expected one count and 5 sums per label"),
                           ({"labels": "all"}, "without labels")]:
        with pytest.raises(ValueError, match=reason):
            check_sums(good | change, 4, 5, 1e6)
    with pytest.raises(ValueError, match="finite number"):
        check_losses({"losses": [float("inf"), 1.0, 1.0], "examples": 3}, 3)


def test_classification_fleet_fits_one_class_mean_head_with_the_devices(bert_bundle, tmp_path):
    from edgeft.adapters import load_adapter
    from edgeft.fleet.apps import _bundle, start_and_index
    from edgeft.fleet.simulate import simulate
    from edgeft.fleet.start import head_from_means
    from edgeft.runtime.evaluate import pooled_features

    data = _fleet_data(tmp_path / "lines.jsonl")

    def poison_start(client, step, reply):  # client 1 sends NaN class sums: its rows take no part in the head
        return reply | {"sums": [float("nan")] * len(reply["sums"])} if client == 1 and step == "sums" else reply

    settings = _settings(bert_bundle, data, tmp_path / "run", 2)
    settings.partition = "dirichlet:0.3"
    summary = simulate(settings, tamper_start=poison_start)
    start = summary["start"]
    assert start["devices"] == 3 and "non-finite" in start["rejected"][0]["reason"]
    assert summary["clients_holding_the_adapter"] == 4 and summary["rejected_uploads"] == 0
    # the head is the class-mean head of the three honest devices' rows, as if they were pooled
    b = _bundle(bert_bundle)
    rows = partition("dirichlet:0.3", data, 4, 0, np.array([i % 2 for i in range(48)]))
    kept = np.concatenate([rows[c] for c in (0, 2, 3)])
    texts = [json.loads(l)["text"] for l in data.read_text().splitlines()]
    labels = np.array([i % 2 for i in range(48)])[kept]
    feats = pooled_features(b, b.layout.initial(0), b.encode([texts[i] for i in kept], labels), 32)
    weight, bias = head_from_means(np.stack([feats[labels == c].mean(0) for c in (0, 1)]), start["temperature"])
    state = FleetState.load(tmp_path / "run" / "state.json")
    assert np.allclose(np.array(state.start["weight"]).reshape(weight.shape), weight, rtol=1e-4, atol=1e-6)
    assert np.allclose(state.start["bias"], bias, rtol=1e-4, atol=1e-6)
    # the saved start and the final adapter are the shared start and its replay
    theta0, index = start_and_index(b, 0, None, (state.start["weight"], state.start["bias"]))
    assert np.array_equal(load_adapter(tmp_path / "run" / "start", b.layout), theta0)
    assert np.array_equal(load_adapter(tmp_path / "run" / "adapter", b.layout),
                          replay(theta0, state.history, state.config, index))
    assert summary["upload_bytes_per_client_round_max"] < 1024
    # RUN/best-adapter: the start or the round that scored best on the eval data, rebuilt by replay
    from edgeft.runtime.trainer import rank_key

    best, rounds = summary["best"], [json.loads(l) for l in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()]
    scores = [best["start_eval"]] + [r["eval"] for r in rounds]
    assert rank_key("classification", best["eval"], True) == max(rank_key("classification", m, True) for m in scores)
    kept = theta0 if best["round"] is None else replay(theta0, state.history[:best["round"] + 1], state.config, index)
    assert np.array_equal(load_adapter(tmp_path / "run" / "best-adapter", b.layout), kept)


def test_speeches_of_a_play():
    from edgeft.assets import speeches

    play = "# Act 1\n\n**FIRST WITCH**  \nWhen shall we three meet again  \nIn thunder?\n\n_Exeunt_\n\n**Macbeth**  \nSo foul.\n"
    assert speeches(play) == [("FIRST WITCH", "When shall we three meet again\nIn thunder?"), ("MACBETH", "So foul.")]


def test_state_saves_atomically_and_refuses_foreign_files(tmp_path):
    state = FleetState(FleetConfig(seed=4), [{"round": 0, "lr": 0.5, "pairs": [[1, 0.1 + 0.2]]}])
    state.save(tmp_path / "state.json")
    again = FleetState.load(tmp_path / "state.json")
    assert again.config == state.config and again.history == state.history and again.round == 1
    assert not (tmp_path / "state.json.tmp").exists()
    (tmp_path / "foreign.json").write_text('{"format": "something else"}')
    with pytest.raises(EdgeftError, match="not an edgeft fleet state"):
        FleetState.load(tmp_path / "foreign.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(EdgeftError, match="not a readable fleet state"):
        FleetState.load(tmp_path / "broken.json")


def _fleet_data(path, rows=48):
    from tests.models import CORPUS

    texts = (CORPUS * 4)[:rows]
    path.write_text("".join(json.dumps({"text": t, "speaker": "abcdef"[i % 6], "label": ["neg", "pos"][i % 2]}) + "\n"
                            for i, t in enumerate(texts)))
    return path


def test_partitions(tmp_path):
    data = _fleet_data(tmp_path / "d.jsonl")
    iid = partition("iid", data, 4, seed=0)
    assert sorted(np.concatenate(iid).tolist()) == list(range(48)) and all(len(p) == 12 for p in iid)
    by = partition("by-field:speaker", data, 6, seed=0)
    assert all(len(set(i % 6 for i in p)) == 1 for p in by)
    labels = np.array([i % 2 for i in range(48)])
    skew = partition("dirichlet:0.3", data, 3, seed=1, labels=labels)
    assert sorted(np.concatenate(skew).tolist()) == list(range(48))
    for spec, message in (("by-field:speaker", "fewer than --clients"), ("dirichlet:x", "expected dirichlet:ALPHA"),
                          ("round-robin", "expected iid")):
        with pytest.raises(EdgeftError, match=message):
            partition(spec, data, 7, seed=0, labels=labels)
    with pytest.raises(EdgeftError, match="has none"):
        partition("dirichlet:0.3", data, 3, seed=0)


# --- real Flower simulations (Ray) ---------------------------------------------------------


def _settings(bundle, data, run_dir, rounds, **config):
    from edgeft.fleet.apps import FleetSettings

    return FleetSettings(bundle, data, run_dir, clients=4, rounds=rounds, partition="by-field:speaker",
                         config=FleetConfig(pool_size=64, local_steps=2, batch_size=4, lr=1e-2, **config),
                         eval_data=data, log=lambda m: None)


def _poison(client: int, reply: dict) -> dict:
    """Clients 1-3 turn hostile in round 1: NaN, an absurd value, seed indices outside the pool."""
    if reply.get("skipped") or reply["known_round"] != 1 or client not in (1, 2, 3):
        return reply
    if client == 1:
        return reply | {"values": [float("nan")] * len(reply["values"])}
    if client == 2:
        return reply | {"values": [1e9] * len(reply["values"])}
    return reply | {"indices": [10_000 + i for i in range(len(reply["indices"]))]}


def test_simulation_holds_one_adapter_everywhere_rejects_poison_and_resumes(llama_lm_bundle, tmp_path):
    from edgeft.adapters import load_adapter
    from edgeft.fleet.apps import _bundle, start_and_index
    from edgeft.fleet.simulate import simulate

    data = _fleet_data(tmp_path / "lines.jsonl")
    # uninterrupted, 3 rounds, with three hostile clients from round 1 on
    full = simulate(_settings(llama_lm_bundle, data, tmp_path / "full", 3), tamper=_poison)
    rounds = [json.loads(l) for l in (tmp_path / "full" / "rounds.jsonl").read_text().splitlines()]
    assert [r["accepted"] for r in rounds] == [4, 1, 4]  # round 2: the clients are honest again
    reasons = " ".join(x["reason"] for x in rounds[1]["rejected"])
    assert "non-finite" in reasons and "beyond" in reasons and "unknown seed index" in reasons
    # every accepted upload was trained from the server's adapter (the digest check): clients and
    # server held the same adapter bit for bit in every round
    assert all("another adapter" not in x["reason"] for r in rounds for x in r["rejected"])
    assert full["upload_bytes_per_client_round_max"] < 1024 and full["rejected_uploads"] == 3
    assert full["clients_holding_the_adapter"] == 4  # after the closing sync, every device holds it
    b = _bundle(llama_lm_bundle)
    theta0, index = start_and_index(b, 0, None)
    state = FleetState.load(tmp_path / "full" / "state.json")
    saved = load_adapter(tmp_path / "full" / "adapter", b.layout)
    assert np.array_equal(saved, replay(theta0, state.history, state.config, index))
    assert not np.array_equal(saved, theta0)
    # stopped after 1 round, resumed to 3: the same history and adapter as the uninterrupted run
    simulate(_settings(llama_lm_bundle, data, tmp_path / "split", 1), tamper=_poison)
    resumed = simulate(_settings(llama_lm_bundle, data, tmp_path / "split", 3), resume=True, tamper=_poison)
    assert FleetState.load(tmp_path / "split" / "state.json").history == state.history
    assert np.array_equal(load_adapter(tmp_path / "split" / "adapter", b.layout), saved)
    assert resumed["eval"] == full["eval"]


def test_fleet_simulate_bad_input(llama_lm_bundle, bert_bundle, tmp_path):
    data = _fleet_data(tmp_path / "lines.jsonl")
    cases = [
        ([str(llama_lm_bundle), "--data", str(data), "--clients", "9", "--partition", "by-field:speaker"], "fewer than --clients"),
        ([str(llama_lm_bundle), "--data", str(data), "--rounds", "0"], "--rounds must be at least 1"),
        ([str(llama_lm_bundle), "--data", str(data), "--aggregate", "mean", "--pool-size", "0"], "at least 1"),
        ([str(bert_bundle), "--data", str(data), "--method", "fedavg"], "cannot start from zero on every device"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(main, ["fleet", "simulate", *args, "-o", str(tmp_path / "run")])
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "run").exists()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep")
    result = CliRunner().invoke(main, ["fleet", "simulate", str(llama_lm_bundle), "--data", str(data), "-o", str(taken)])
    assert result.exit_code == 2 and "already holds a run" in result.output and (taken / "mine.txt").read_text() == "keep"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_deployment_engine_superlink_and_two_supernodes(llama_lm_bundle, tmp_path):
    """``flwr run`` of the same apps against a SuperLink and two SuperNodes started here on 127.0.0.1,
    each SuperNode with its own data file: two rounds, every device ends holding the server's adapter."""
    import os
    import shutil
    import subprocess
    import sys
    import time

    from edgeft.adapters import load_adapter
    from edgeft.fleet.apps import _bundle, start_and_index
    from edgeft.fleet.flower_app import write_app

    bin_dir = os.path.dirname(sys.executable)
    tools = {name: shutil.which(name, path=bin_dir) or shutil.which(name) for name in
             ("flower-superlink", "flower-supernode", "flwr")}
    assert all(tools.values()), tools
    data = _fleet_data(tmp_path / "lines.jsonl")
    own = []
    rows = data.read_text().splitlines()
    for client in range(2):  # each device brings its own file
        own.append(tmp_path / f"device{client}.jsonl")
        own[-1].write_text("\n".join(rows[client::2]) + "\n")
    home = tmp_path / "flwr-home"
    home.mkdir()
    link = _free_port()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
                                      f'address = "127.0.0.1:{link}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home)}
    run_dir = tmp_path / "run"
    app = write_app(tmp_path / "app", {"bundle": str(llama_lm_bundle), "data": str(data), "run-dir": str(run_dir),
                                        "clients": 2, "rounds": 2, "pool-size": 64, "local-steps": 2, "lr": 0.01})
    logs = [open(tmp_path / f"{name}.log", "w") for name in ("superlink", "node0", "node1")]
    procs = [subprocess.Popen([tools["flower-superlink"], "--insecure", "--database", str(tmp_path / "link.db"),
                               "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(link)],
                              env=env, stdout=logs[0], stderr=subprocess.STDOUT)]
    try:
        time.sleep(5)
        for client in range(2):
            procs.append(subprocess.Popen(
                [tools["flower-supernode"], "--insecure", "--superlink", f"127.0.0.1:{link}", "--port", str(_free_port()),
                 "--node-config", f"partition-id={client} data='{own[client]}'"],
                env=env, stdout=logs[client + 1], stderr=subprocess.STDOUT))
        result = subprocess.run([tools["flwr"], "run", str(app), "local", "--stream"], env=env, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        summary = json.loads((run_dir / "summary.json").read_text())
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in logs:
            log.close()
    assert summary["rounds"] == 2 and summary["rejected_uploads"] == 0
    assert summary["clients_holding_the_adapter"] == 2
    b = _bundle(llama_lm_bundle)
    theta0, index = start_and_index(b, 0, None)
    state = FleetState.load(run_dir / "state.json")
    assert all(entry["pairs"] for entry in state.history)
    assert np.array_equal(load_adapter(run_dir / "adapter", b.layout), replay(theta0, state.history, state.config, index))


def test_server_resumes_after_sigkill_as_an_uninterrupted_run_ends(llama_lm_bundle, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    data = _fleet_data(tmp_path / "lines.jsonl")
    common = [str(llama_lm_bundle), "--data", str(data), "--clients", "2", "--rounds", "3", "--local-steps", "2",
              "--pool-size", "64", "--lr", "0.01"]
    whole = CliRunner().invoke(main, ["fleet", "simulate", *common, "-o", str(tmp_path / "whole"), "--json"])
    assert whole.exit_code == 0, whole.output
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "edgeft.cli", "fleet", "simulate", *common, "-o", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (killed / "state.json").is_file() and FleetState.load(killed / "state.json").round >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the server and its Ray workers, mid-run
    proc.wait()
    assert 1 <= FleetState.load(killed / "state.json").round < 3
    resumed = CliRunner().invoke(main, ["fleet", "simulate", *common, "-o", str(killed), "--resume", "--json"])
    assert resumed.exit_code == 0, resumed.output
    assert FleetState.load(killed / "state.json").history == FleetState.load(tmp_path / "whole" / "state.json").history
    assert (killed / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "whole" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert [json.loads(l)["round"] for l in (killed / "rounds.jsonl").read_text().splitlines()] == [0, 1, 2]


def test_fedavg_baseline_ships_whole_adapters(llama_lm_bundle, tmp_path):
    data = _fleet_data(tmp_path / "lines.jsonl")
    common = ["fleet", "simulate", str(llama_lm_bundle), "--data", str(data), "--clients", "2", "--rounds", "2",
              "--local-steps", "2", "--lr", "0.01", "--eval-data", str(data), "--json"]
    args = [*common, "--method", "fedavg"]
    result = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "fedavg")])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    seeds = CliRunner().invoke(main, [*common, "-o", str(tmp_path / "seeds")])
    assert seeds.exit_code == 0, seeds.output
    small = json.loads(seeds.output.strip().splitlines()[-1])
    from edgeft.runtime import Bundle

    adapter_bytes = Bundle(llama_lm_bundle).layout.size * 4
    assert summary["rounds"] == 2 and summary["upload_bytes_per_client_round_max"] >= adapter_bytes
    assert small["upload_bytes_per_client_round_max"] * 20 < summary["upload_bytes_per_client_round_max"]
    assert summary["eval"]["perplexity"] > 0 and (tmp_path / "fedavg" / "adapter" / "adapter_model.safetensors").is_file()
    again = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "fedavg"), "--resume"])
    assert again.exit_code == 2 and "keeps no state" in again.output
