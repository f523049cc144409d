"""The performance model: calibrate this machine, predict any run's step, simulate thousands of ranks, plan.

- `cluster`: ranks, links and compute (published systems, inline specs, this calibrated machine);
- `workload`: a model's per-module FLOPs, bytes and parameters (from polytrain.cost);
- `profile` and `calibrate`: `polytrain calibrate` and the JSON profile it stores;
- `predict`: one step of rank 0 of an Experiment, split into compute, exposed communication, bubble and
  overhead, with bytes and memory per rank (`polytrain predict`);
- `simulate`: the same step at scale, with the asymmetric parts (stragglers, asynchronous servers)
  played event by event;
- `plan`: candidates ranked by predicted step within a memory limit (`polytrain plan`, `train --plan`).
"""
