#!/usr/bin/env python3
"""Reference trajectories of DeepSpeed's own dynamic loss scaler, for tests/train_fp16.rs.

Imports `deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler` (the class the ZeRO-1/2 optimizer
builds from the config's fp16 section) and feeds it fixed overflow patterns; writes, per case,
the scale each step runs with, whether the step is skipped (ZeRO-2's `step()` returns early on
an overflow), the hysteresis left after the update, and whether DeepSpeed would raise "Current
loss scale already at minimum" at that step (probed on a deep copy with
`raise_error_at_min_scale=True`; the trajectory itself continues with it False, which is
DeepSpeed's clamp-to-min_scale path).

Regenerate (a throwaway venv; the scaler needs no compiled ops, CPU torch is enough):

    python3 -m venv --system-site-packages /tmp/dsvenv   # reuses an installed torch, if any
    /tmp/dsvenv/bin/pip install wheel setuptools
    DS_BUILD_OPS=0 /tmp/dsvenv/bin/pip install --no-build-isolation deepspeed==0.18.9
    /tmp/dsvenv/bin/python tools/oracle/make_loss_scale_reference.py tests/fixtures/loss_scale_reference.json
"""

import copy
import json
import os
import sys

os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29533")
os.environ.setdefault("RANK", "0")
os.environ.setdefault("LOCAL_RANK", "0")
os.environ.setdefault("WORLD_SIZE", "1")

import logging

import deepspeed
import deepspeed.comm as dist
from deepspeed.runtime.config import DeepSpeedConfig
from deepspeed.runtime.fp16.loss_scaler import CreateLossScaler
from deepspeed.utils import logger

logger.setLevel(logging.WARNING)  # the scaler logs every overflow at INFO


def scaler_from_config(fp16):
    """The scaler exactly as ZeRO builds it: DeepSpeed's own config parsing of an fp16 section,
    then `CreateLossScaler` with the parsed `dynamic_loss_scale_args()`."""
    import torch

    min_scale = fp16.get("min_loss_scale", 1)
    if float(min_scale).is_integer():
        ds = DeepSpeedConfig({"train_batch_size": 1, "fp16": dict(fp16, enabled=True, loss_scale=0)})
        args = ds.float16_config.dynamic_loss_scale_args()
    else:
        # The recipe's ds_zero2_no_offload.json says "min_loss_scale": 1e-10, which the DeepSpeed
        # of its time (0.9) took as a float; today's pydantic config types it `int` and rejects
        # it. The scaler class itself takes any number: build its arguments as
        # `dynamic_loss_scale_args()` would, with the float.
        ds = DeepSpeedConfig({"train_batch_size": 1,
                              "fp16": dict(fp16, enabled=True, loss_scale=0, min_loss_scale=1)})
        args = dict(ds.float16_config.dynamic_loss_scale_args(), min_scale=float(min_scale))
    s = CreateLossScaler(dtype=torch.half, static_loss_scale=1.0, dynamic_scaling=True,
                         dynamic_loss_args=args)
    s.raise_error_at_min_scale = False
    return s


def pattern(n, overflow_iters):
    bad = set(overflow_iters)
    return [i in bad for i in range(n)]


RECIPE = {"initial_scale_power": 16, "loss_scale_window": 100, "hysteresis": 2}


def cases():
    c = []
    c.append(("isolated", dict(RECIPE), pattern(420, [5, 40, 150, 300, 302])))
    bursts = []
    start = 10
    for length in (1, 2, 3, 5, 2, 1, 3):
        bursts += range(start, start + length)
        start += length + 37
    c.append(("bursts_1_2_3_5", dict(RECIPE), pattern(start + 130, bursts)))
    c.append(("long_clean_runs", dict(RECIPE), pattern(760, [0, 1, 2, 350, 351, 352])))
    c.append(("window_edges", dict(RECIPE),
              pattern(520, [99, 100, 201, 301, 302, 403, 404, 405, 406])))
    c.append(("min_scale_1", dict(initial_scale_power=3, loss_scale_window=6, hysteresis=2,
                                  min_loss_scale=1), pattern(40, list(range(2, 16)) + [23, 24])))
    c.append(("recipe_min_1e-10", dict(RECIPE, min_loss_scale=1e-10),
              pattern(110, list(range(0, 60)) + [80, 81, 82])))
    c.append(("hysteresis_1", dict(initial_scale_power=16, loss_scale_window=10, hysteresis=1),
              pattern(60, [3, 4, 5, 20, 33, 34])))
    c.append(("hysteresis_3_window_1", dict(initial_scale_power=5, loss_scale_window=1, hysteresis=3),
              pattern(30, [2, 3, 5, 6, 7, 8, 9, 12, 20, 21, 22, 23])))
    c.append(("consecutive_hysteresis", dict(RECIPE, consecutive_hysteresis=True, loss_scale_window=20),
              pattern(90, [3, 5, 6, 8, 9, 10, 40, 41, 43, 44, 45])))
    c.append(("deepspeed_defaults", {}, pattern(1100, [0, 1, 2, 3, 500])))
    # The trainer test of tests/train_fp16.rs: overflow injected at steps 1, 2, 3 and 7.
    c.append(("trainer_run", dict(initial_scale_power=16, loss_scale_window=3, hysteresis=2),
              pattern(14, [1, 2, 3, 7])))
    return c


def run(fp16, overflow):
    s = scaler_from_config(fp16)
    out = {"scale_before": [], "skipped": [], "hysteresis_after": [], "would_raise": []}
    for o in overflow:
        out["scale_before"].append(repr(float(s.cur_scale)))
        probe = copy.deepcopy(s)
        probe.raise_error_at_min_scale = True
        try:
            probe.update_scale(o)
            raised = False
        except Exception as e:  # DeepSpeed raises a bare Exception at min scale
            assert "minimum" in str(e), e
            raised = True
        s.update_scale(o)
        out["skipped"].append(bool(o))  # ZeRO-2 step(): `if self.overflow: ... return`
        out["hysteresis_after"].append(int(s.cur_hysteresis))
        out["would_raise"].append(raised)
    # Floats are written as Python repr strings: they round-trip exactly through Rust's
    # `str::parse::<f64>` (correctly rounded), which JSON numbers do not through every parser.
    # Flags and small counts as strings of digits, one character a step (keeps the file small).
    for k in ("skipped", "would_raise"):
        out[k] = "".join("1" if x else "0" for x in out[k])
    assert all(h <= 9 for h in out["hysteresis_after"])
    out["hysteresis_after"] = "".join(str(h) for h in out["hysteresis_after"])
    out["final"] = {
        "cur_scale": repr(float(s.cur_scale)),
        "cur_iter": int(s.cur_iter),
        "last_overflow_iter": int(s.last_overflow_iter),
        "cur_hysteresis": int(s.cur_hysteresis),
    }
    return out


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/loss_scale_reference.json"
    # A one-process gloo group: the scaler asks `dist.get_rank()` when it logs an overflow.
    # DeepSpeed's optional shared-memory collective op would be JIT-compiled at init; the
    # scaler does not need it.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    defaults = DeepSpeedConfig({"train_batch_size": 1, "fp16": {"enabled": True}}).float16_config
    doc = {
        "generator": "tools/oracle/make_loss_scale_reference.py",
        "deepspeed_version": deepspeed.__version__,
        "class": "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "config_defaults": {
            "initial_scale_power": defaults.initial_scale_power,
            "loss_scale_window": defaults.loss_scale_window,
            "hysteresis": defaults.hysteresis,
            "min_loss_scale": repr(float(defaults.min_loss_scale)),
            "consecutive_hysteresis": defaults.consecutive_hysteresis,
        },
        "cases": [],
    }
    for name, fp16, overflow in cases():
        full = {k: doc["config_defaults"][k] for k in doc["config_defaults"]}
        full.update(fp16)
        full["min_loss_scale"] = repr(float(full["min_loss_scale"]))
        r = run(fp16, overflow)
        doc["cases"].append({"name": name, "config": full,
                             "overflow": "".join("1" if o else "0" for o in overflow), **r})
    dist.destroy_process_group()
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    os.replace(path + ".tmp", path)
    print(f"wrote {path}: {len(doc['cases'])} cases, "
          f"{sum(len(c['overflow']) for c in doc['cases'])} steps")


if __name__ == "__main__":
    main()
