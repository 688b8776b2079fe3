"""From what the simulator counted to time and energy on the chip model.

Per token, the synaptic layers run in timesteps of the chip: a layer's step is one more
than the latest step of the layers its input depends on, so layers that read the same
input (q, k, v; gate and up) share a step, and dependent layers follow one another. On core ``c`` of a layer, with ``s`` synaptic
operations, ``u`` neuron updates (one per output neuron it holds), ``r`` events received
and ``i`` controller instructions (the non-synaptic ops that follow the step, shared by
all the cores of the step's layers)::

    compute cycles = s / lanes + u / lanes + r * cycles_per_event_received + i * cycles_per_instruction
    memory cycles  = bytes / sram_bytes_per_cycle
    bytes          = s * (weight_bits + index_bits) / 8 + 2 * u * state_bits / 8 + 2 * i * state_bits / 8
    core time      = max(compute, memory) / clock

    traffic time   = busiest link's packets * link_cycles_per_event / clock
    step latency   = max(busiest core time, traffic time) + longest route * hop_cycles / clock + barrier

(the busiest core and link over all the layers of the step)

so a step takes as long as its busiest core (or link), not the average. The step's
bottleneck is whichever of compute, memory and traffic set that maximum; the model's is
the class that accounts for most of the token's latency.

Energy, summed over every layer::

    synaptic       = synaptic ops * synaptic_op_pj
    neuron update  = neuron updates * neuron_update_pj
    events         = events generated * event_generated_pj + events received * event_received_pj
    noc            = hops * noc_hop_pj + chip crossings * interchip_hop_pj
    memory         = bytes (as above, every core) * sram_byte_pj
    controller     = controller instructions * controller_instruction_pj
    static         = static_power_w * chips * latency

The dense equivalent is the same mapping run without events: every weight, zeros
included, multiplied every token (no index bytes), every input value sent to every core
of the layer as bare values (``value_bits / event_bits`` of a packet, no address), and no
per-event costs; neuron updates, controllers and the barrier are the same.
"""

from __future__ import annotations

import numpy as np

PJ = 1e-12
COMPONENTS = ("synaptic", "neuron_update", "events", "noc", "memory", "controller", "static")


def _core_work(chip: dict, layer: dict, synaptic: np.ndarray, received: np.ndarray, rows: int,
               instructions_per_core: float) -> dict:
    """Per-core cycles and bytes of one layer, per token."""
    placement = layer["placement"]
    neurons = np.diff(np.asarray(placement["columns"], np.float64))
    cores = len(placement["cores"])
    instructions = np.full(cores, instructions_per_core / rows)
    synaptic = synaptic / rows
    received = received / rows
    state = chip["state_bits"] / 8
    memory_bytes = (synaptic * (chip["weight_bits"] + chip["index_bits"]) / 8
                    + 2 * neurons * state + 2 * instructions * state)
    compute = (synaptic / chip["lanes"] + neurons / chip["lanes"]
               + received * chip["cycles_per_event_received"] + instructions * chip["cycles_per_instruction"])
    return {"compute": compute, "memory": memory_bytes / chip["sram_bytes_per_cycle"], "bytes": memory_bytes,
            "neurons": neurons, "instructions": instructions}


def _times(chip: dict, work: dict, max_link_load: float, max_hops: float) -> dict:
    """Seconds of one layer: per core, at its busiest core (compute and memory), on its
    busiest link, and along its longest route."""
    clock = chip["clock_hz"]
    core_seconds = np.maximum(work["compute"], work["memory"]) / clock
    busiest = int(np.argmax(core_seconds))
    return {"cores": core_seconds, "compute": work["compute"][busiest] / clock, "memory": work["memory"][busiest] / clock,
            "traffic": max_link_load * chip["link_cycles_per_event"] / clock, "route": max_hops * chip["hop_cycles"] / clock}


def _steps(chip: dict, layers: list[dict], times: list[dict]) -> tuple[float, dict[str, float]]:
    """Token latency and its split by bottleneck class.

    Layers in the same step run at once on their own cores; the step lasts as long as
    its busiest core or link, plus its longest route and the barrier.
    """
    latency = 0.0
    by_class = {"compute": 0.0, "memory": 0.0, "traffic": 0.0}
    for step in sorted({layer["step"] for layer in layers}):
        members = [t for layer, t in zip(layers, times) if layer["step"] == step]
        busiest = max(members, key=lambda t: t["cores"].max())
        candidates = {"compute": busiest["compute"], "memory": busiest["memory"],
                      "traffic": max(t["traffic"] for t in members)}
        bottleneck = max(candidates, key=candidates.get)
        seconds = candidates[bottleneck] + max(t["route"] for t in members) + chip["barrier_s"]
        latency += seconds
        by_class[bottleneck] += seconds
    return latency, by_class


def estimate(target: dict, counts: list[dict]) -> dict:
    """Time and energy per token of one simulated run.

    Args:
        target: the artifact manifest's ``target`` dict (chip numbers and layers).
        counts: ``LayerCounts.to_dict()`` of every layer, in order.
    """
    chip = target["chip"]
    layers = target["layers"]
    total_cores = chip["cores_per_chip"] * chip["chips"]
    busy = np.zeros(total_cores)
    energy = dict.fromkeys(COMPONENTS, 0.0)
    dense = dict.fromkeys(COMPONENTS, 0.0)
    times, dense_times = [], []
    synaptic_ops = events = packets = 0.0
    per_layer = []
    # The controller work after a step is elementwise over the neurons of that step's
    # layers, so it is shared by all of their cores.
    step_instructions, step_cores = {}, {}
    for layer in layers:
        step_instructions[layer["step"]] = step_instructions.get(layer["step"], 0) + layer["controller_instructions"]
        step_cores[layer["step"]] = step_cores.get(layer["step"], 0) + len(layer["placement"]["cores"])
    for layer, count in zip(layers, counts):
        instructions_per_core = step_instructions[layer["step"]] / step_cores[layer["step"]]
        rows = max(count["rows"], 1)
        k, n = layer["shape"]
        cores = layer["placement"]["cores"]
        synaptic = np.asarray(count["synaptic_ops"], np.float64)
        work = _core_work(chip, layer, synaptic, np.asarray(count["received"], np.float64), rows, instructions_per_core)
        times.append(_times(chip, work, count["max_link_load"], count["max_hops"]))
        busy[cores] += times[-1]["cores"]
        layer_synaptic = synaptic.sum() / rows
        synaptic_ops += layer_synaptic
        events += count["events"] / rows
        packets += count["packets"] / rows
        energy["synaptic"] += layer_synaptic * chip["synaptic_op_pj"] * PJ
        energy["neuron_update"] += n * chip["neuron_update_pj"] * PJ
        energy["events"] += (count["events"] * chip["event_generated_pj"]
                             + sum(count["received"]) * chip["event_received_pj"]) / rows * PJ
        energy["noc"] += (count["hops"] * chip["noc_hop_pj"] + count["chip_crossings"] * chip["interchip_hop_pj"]) / rows * PJ
        energy["memory"] += work["bytes"].sum() * chip["sram_byte_pj"] * PJ
        energy["controller"] += work["instructions"].sum() * chip["controller_instruction_pj"] * PJ

        # The dense equivalent: all K x N weights, every value sent to every core, no events.
        dense_per_core = np.diff(np.asarray(layer["placement"]["columns"], np.float64)) * k
        dense_work = _core_work(chip, layer, dense_per_core * rows, np.zeros(len(cores)), rows, instructions_per_core)
        dense_work["bytes"] -= dense_per_core * chip["index_bits"] / 8
        dense_work["memory"] = dense_work["bytes"] / chip["sram_bytes_per_cycle"]
        value_share = chip["value_bits"] / chip["event_bits"]
        dense_times.append(_times(chip, dense_work, count["dense_max_link_load"] * value_share, count["max_hops"]))
        dense["synaptic"] += k * n * chip["synaptic_op_pj"] * PJ
        dense["neuron_update"] += n * chip["neuron_update_pj"] * PJ
        dense["noc"] += (count["dense_hops"] * chip["noc_hop_pj"]
                         + count["dense_chip_crossings"] * chip["interchip_hop_pj"]) * value_share * PJ
        dense["memory"] += dense_work["bytes"].sum() * chip["sram_byte_pj"] * PJ
        dense["controller"] += dense_work["instructions"].sum() * chip["controller_instruction_pj"] * PJ
        per_layer.append({"name": layer["name"], "shape": [k, n], "cores": len(cores), "step": layer["step"],
                          "busiest_core_s": float(times[-1]["cores"].max()), "synaptic_ops": layer_synaptic,
                          "events": count["events"] / rows, "input_activity": count["events"] / rows / k})
    latency, time_by_class = _steps(chip, layers, times)
    dense_latency, _ = _steps(chip, layers, dense_times)
    static_power = chip["static_power_w"] * chip["chips"]
    energy["static"] = static_power * latency
    dense["static"] = static_power * dense_latency
    used = sorted({core for layer in layers for core in layer["placement"]["cores"]})
    utilisation = busy / latency if latency > 0 else busy
    return {
        "latency_s": latency,
        "energy_j": sum(energy.values()),
        "energy_by_component": energy,
        "synaptic_ops": synaptic_ops,
        "events": events,
        "packets": packets,
        "cores_used": len(used),
        "steps": len({layer["step"] for layer in layers}),
        "utilisation": utilisation.tolist(),
        "bottleneck": max(time_by_class, key=time_by_class.get),
        "time_by_bottleneck_s": time_by_class,
        "dense_equivalent": {"latency_s": dense_latency, "energy_j": sum(dense.values()), "energy_by_component": dense},
        "layers": per_layer,
    }
