"""gspo4j's device harness: checks every CUDA kernel against float64 references, then times the
token log-prob forward, its backward and a whole GSPO loss forward + backward against TRL-style
torch eager and torch.compile versions of the same loss, in the same run.

    python3 bench/gpu/harness.py --lib build/libgspo4j.so --out "$OUT"

(bench/gpu/run.sh builds the library and runs this.) The markdown table is printed last and
written to OUT/gpu-results.md, with every number in OUT/gpu-results.json. `--device cpu --quick`
runs the checks on the CPU kernels (a self-test of the harness where there is no GPU).
"""
import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import references as ref  # noqa: E402
from gspo4j_ctypes import (METRICS, NON_FINITE, OUT_OF_RANGE, INVALID_ARGUMENT, Gspo4jError, Library,  # noqa: E402
                           RATIO_SEQUENCE, RATIO_SEQUENCE_TOKEN, RATIO_TOKEN)

# Relative-error bounds of the targets, by logits dtype: the reference is float64 on the
# same (upcast) logits, so bf16/fp16 only widen the bound where the output itself is rounded to
# the logits dtype (the gradient).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 5e-3, torch.float16: 5e-3}
VALUE_TOLERANCE = 1e-5  # log-probs, lse, entropy, loss and coefficients are float32 whatever the logits
# Gradient rows whose every entry is tiny (one logit 40 above the rest: p_v ~ e^-40) are judged by
# their absolute RMS error below 1e-6 (in units of the coefficients g / tau): the entropy term of
# such a row inherits the forward's absolute entropy error (~1e-7 nats, the float32 sum of
# 1 + e^-40 + ...), a relative 1e-2 of values ~1e-12. The target's g_lp term stays relative.
GRAD_FLOOR = 1e-6


class Report:
    def __init__(self):
        self.checks = []
        self.failures = 0

    def check(self, name, error, bound, detail=""):
        ok = error <= bound and not math.isnan(error)
        self.checks.append({"check": name, "error": error, "bound": bound, "ok": ok, "detail": detail})
        if not ok:
            self.failures += 1
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {error:.3e} (bound {bound:.0e}) {detail}", flush=True)

    def truth(self, name, condition, detail=""):
        self.check(name, 0.0 if condition else 1.0, 0.0, detail)


def rel(out, expected, floor=0.0):
    """||out - expected|| / max(||expected||, floor * sqrt(n)): relative, or absolute (RMS) where the
    values are below `floor` (log-probs of p -> 1 are ~1e-13 nats: no float32 sum resolves them
    relatively, and 1e-7 nats off is exact enough)."""
    out, expected = out.double().cpu(), expected.double().cpu()
    if torch.isnan(out).any():
        return float("nan")
    denominator = max(expected.norm().item(), floor * math.sqrt(max(1, expected.numel())))
    difference = (out - expected).norm().item()
    return difference / denominator if denominator > 0 else difference


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def empty_cache(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


def poisoned(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------

def logits_case(kind, rows, vocab, dtype, device, generator):
    """Random logits of a kind: normal, all negative, one dominant entry per row, +-1e4."""
    z = torch.randn(rows, vocab, generator=generator, device="cpu") * 3
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    if kind == "negative":
        z = z - 1e4 if dtype != torch.float16 else z - 6e4 / 2
    elif kind == "dominant":
        z[torch.arange(rows), targets] = 40.0
    elif kind == "huge":
        z = torch.sign(z) * 1e4 + z
        if dtype == torch.float16:
            z = z.clamp(-6e4, 6e4)
    return z.to(dtype).to(device), targets.to(device)


def check_token_logprob(lib, report, device, quick):
    generator = torch.Generator().manual_seed(1)
    shapes = [(1, 7), (33, 1000), (7, 32001), (5, 151936), (3, 262144), (300, 4099)]
    if quick:
        shapes = [(1, 7), (9, 1000), (3, 32001), (2, 4099)]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for rows, vocab in shapes:
            for kind in ("normal", "negative", "dominant", "huge"):
                if kind != "normal" and vocab > 40000:
                    continue
                for temperature in (1.0, 0.7) if kind == "normal" else (1.0,):
                    z, y = logits_case(kind, rows, vocab, dtype, device, generator)
                    name = f"token_logprob {str(dtype)[6:]} [{rows},{vocab}] {kind} tau={temperature}"
                    _check_rows(lib, report, name, z, y, temperature, dtype, generator)
    # Every CTA size the GSPO4J_CUDA_THREADS knob can force (the plan picks 128 or 512).
    for threads in (128, 256, 512, 1024):
        os.environ["GSPO4J_CUDA_THREADS"] = str(threads)
        try:
            for dtype, rows, vocab in ((torch.bfloat16, 7, 32001), (torch.float32, 300, 4099), (torch.float16, 2, 151936)):
                z, y = logits_case("normal", rows, vocab, dtype, device, generator)
                _check_rows(lib, report, f"token_logprob {str(dtype)[6:]} [{rows},{vocab}] threads={threads}", z, y, 1.0, dtype,
                            generator)
        finally:
            del os.environ["GSPO4J_CUDA_THREADS"]
    # A strided view (logits[:, :-1, :]) read in place, packed [N, V] and padded [B, T, V].
    for dtype in (torch.bfloat16, torch.float32):
        full = (torch.randn(3, 9, 5003, generator=generator) * 2).to(dtype).to(device)
        view = full[:, :-1, :]
        y = torch.randint(0, 5003, (3, 8), generator=generator).to(device)
        _check_rows(lib, report, f"token_logprob {str(dtype)[6:]} strided view [3,8 of 9,5003]", view, y, 1.0, dtype,
                    generator)


def _check_rows(lib, report, name, z, y, temperature, dtype, generator):
    device = z.device
    rows = y.numel()
    lp, lse, h = (poisoned((rows,), torch.float32, device), poisoned((rows,), torch.float64, device),
                  poisoned((rows,), torch.float32, device))
    lib.token_logprob_forward(z, y, temperature, True, lp, lse, h)
    sync(device)
    if device.type == "cuda":
        lib.check_error(device)
    r_lp, r_lse, r_h = ref.token_logprob(z.reshape(-1, z.size(-1)), y.reshape(-1), temperature)
    report.check(name + " lp", rel(lp, r_lp, 1.0), VALUE_TOLERANCE)
    report.check(name + " lse", rel(lse, r_lse, 1.0), VALUE_TOLERANCE)
    report.check(name + " entropy", rel(h, r_h, 1.0), VALUE_TOLERANCE)
    # Backward from random coefficients, with and without the entropy term, out of place and in place.
    g_lp = torch.randn(rows, generator=generator).to(device)
    g_h = torch.randn(rows, generator=generator).to(device)
    for with_entropy in (False, True):
        grad = torch.full(z.shape, float("nan"), dtype=dtype, device=device)
        lib.token_logprob_backward(z, y, lse, h, g_lp, g_h if with_entropy else None, temperature, grad)
        sync(device)
        expected = ref.token_logprob_grad(z, y.reshape(z.shape[:-1]), g_lp, g_h if with_entropy else None, temperature)
        # Against the reference rounded to the gradient's dtype: entries below its range (p_v ~ e^-40
        # in fp16) are 0 in both.
        expected = expected.to(dtype).double()
        report.check(f"{name} grad{' +H' if with_entropy else ''}", rel(grad, expected, GRAD_FLOOR), TOLERANCE[dtype])
        if "dominant" in name and not with_entropy:
            # The target's entry, g_lp (1 - p_y) / tau, with 1 - p_y ~ 1e-10: exact in fp32, 0 from a rounded p.
            flat_grad = grad.reshape(-1, z.size(-1)).double().cpu()
            flat_expected = expected.reshape(-1, z.size(-1))
            yy = y.reshape(-1).cpu()
            idx = torch.arange(rows)
            report.check(name + " target entry", rel(flat_grad[idx, yy], flat_expected[idx, yy]), TOLERANCE[dtype])
    if z.is_contiguous():
        work = z.clone()
        lib.token_logprob_backward(work, y, lse, h, g_lp, g_h, temperature, work)
        sync(device)
        expected = ref.token_logprob_grad(z, y.reshape(z.shape[:-1]), g_lp, g_h, temperature).to(dtype).double()
        report.check(name + " grad in place", rel(work, expected, GRAD_FLOOR), TOLERANCE[dtype])


def check_large(lib, report, device, rows, vocab, dtype):
    """N * V > 2^31: every row checked, in float64 chunks, forward and backward."""
    generator = torch.Generator(device=device).manual_seed(2)
    z = torch.randn(rows, vocab, generator=generator, device=device, dtype=torch.float32).mul_(2).to(dtype)
    y = torch.randint(0, vocab, (rows,), generator=generator, device=device)
    lp, lse, h = lib.token_logprob_forward(z, y)
    g_lp = torch.randn(rows, generator=generator, device=device)
    grad = lib.token_logprob_backward(z, y, lse, h, g_lp, None)
    sync(device)
    lib.check_error(device)
    worst = {"lp": 0.0, "grad": 0.0}
    chunk = max(1, (1 << 27) // vocab)
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        r_lp, _, _ = ref.token_logprob(z[start:stop], y[start:stop])
        worst["lp"] = max(worst["lp"], rel(lp[start:stop], r_lp, 1.0))
        expected = ref.token_logprob_grad(z[start:stop], y[start:stop], g_lp[start:stop], None).to(dtype)
        worst["grad"] = max(worst["grad"], rel(grad[start:stop], expected))
    name = f"token_logprob {str(dtype)[6:]} [{rows},{vocab}] (N*V = {rows * vocab / 2**31:.2f} * 2^31)"
    report.check(name + " lp (worst chunk)", worst["lp"], VALUE_TOLERANCE)
    report.check(name + " grad (worst chunk)", worst["grad"], TOLERANCE[dtype])
    del z, grad


def random_layout(batch, max_length, packed, generator, device, empty_every=5):
    if packed:
        lengths = torch.randint(0, max_length + 1, (batch,), generator=generator)
        lengths[::empty_every] = 0
        offsets = torch.zeros(batch + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(lengths, 0)
        return batch, int(offsets[-1]), int(offsets[-1]), offsets.to(device)
    return batch, max_length, batch * max_length, None


def check_policy_loss(lib, report, device, quick):
    generator = torch.Generator().manual_seed(3)
    levels = {RATIO_TOKEN: "token", RATIO_SEQUENCE: "sequence", RATIO_SEQUENCE_TOKEN: "sequence-token"}
    cases = 0
    for packed in (False, True):
        for level, level_name in levels.items():
            for aggregation in range(4):
                for extras in ("plain", "kl+entropy", "dual+normalizer"):
                    if level == RATIO_SEQUENCE and aggregation != 0 and extras == "plain":
                        continue
                    batch, seq, tokens, offsets = random_layout(13, 37, packed, generator, device)
                    lp = (-torch.rand(tokens, generator=generator) * 5).to(device)
                    olp = (lp.cpu() + torch.randn(tokens, generator=generator) * 0.05).to(device)
                    mask = (torch.rand(tokens, generator=generator) > 0.2).to(torch.uint8)
                    if not packed:
                        mask.view(batch, seq)[2] = 0  # an empty response
                    mask = mask.to(device)
                    per_token = level != RATIO_SEQUENCE and extras == "kl+entropy"
                    adv = torch.randn(tokens if per_token else batch, generator=generator).to(device)
                    ref_lp = (lp.cpu() + torch.randn(tokens, generator=generator) * 0.1).to(device)
                    entropy = (torch.rand(tokens, generator=generator) * 3).to(device)
                    options = dict(ratio_level=level, aggregation=aggregation, eps_low=0.2, eps_high=0.28)
                    if level != RATIO_TOKEN:
                        options.update(eps_low=3e-3, eps_high=4e-3)
                    if extras == "kl+entropy":
                        options.update(kl_coef=0.05, kl_estimator=aggregation % 3, entropy_coef=0.01)
                    if extras == "dual+normalizer":
                        options.update(dual_clip=3.0, normalizer=17.0, length_norm=40.0)
                    cfg = lib.config(**options)
                    use_ref = extras == "kl+entropy"
                    on_policy = extras == "dual+normalizer" and level == RATIO_SEQUENCE
                    loss, g_lp, g_h, metrics = lib.policy_loss(cfg, batch, seq, tokens, offsets, lp,
                                                               None if on_policy else olp, mask, adv, per_token,
                                                               ref_lp if use_ref else None, entropy)
                    sync(device)
                    lib.check_error(device) if device.type == "cuda" else None
                    e_loss, e_glp, e_gh, e_metrics = ref.policy_loss(cfg, batch, seq, offsets.cpu() if offsets is not None else None,
                                                                     lp, None if on_policy else olp, mask, adv, per_token,
                                                                     ref_lp if use_ref else None, entropy)
                    name = (f"policy_loss {level_name} agg={aggregation} {extras} {'packed' if packed else 'padded'}"
                            f"{' on-policy' if on_policy else ''}")
                    report.check(name + " loss", abs(float(loss) - e_loss) / max(1.0, abs(e_loss)), VALUE_TOLERANCE)
                    report.check(name + " dloss/dlp", rel(g_lp, e_glp), VALUE_TOLERANCE)
                    report.check(name + " dloss/dH", rel(g_h, e_gh), VALUE_TOLERANCE)
                    got = metrics.cpu().tolist()
                    worst = max(abs(got[i] - e_metrics[k]) / max(1.0, abs(e_metrics[k])) for i, k in enumerate(METRICS))
                    report.check(name + " metrics", worst, VALUE_TOLERANCE,
                                 "" if worst <= VALUE_TOLERANCE else str({k: (got[i], e_metrics[k]) for i, k in enumerate(METRICS)}))
                    cases += 1
                    if quick and cases > 12:
                        return
    # GSPO-token with A_bt = A_b equals GSPO in value and gradient (SPEC.md).
    batch, seq, tokens, offsets = random_layout(9, 21, True, generator, device)
    lp = (-torch.rand(tokens, generator=generator) * 5).to(device)
    olp = (lp.cpu() + torch.randn(tokens, generator=generator) * 0.01).to(device)
    adv = torch.randn(batch, generator=generator).to(device)
    spans = ref.ranges(batch, seq, offsets.cpu())
    token_adv = torch.cat([adv[b].expand(e - s) for b, (s, e) in enumerate(spans)]).contiguous()
    a = lib.policy_loss(lib.config(ratio_level=RATIO_SEQUENCE), batch, seq, tokens, offsets, lp, olp, None, adv, False)
    b = lib.policy_loss(lib.config(ratio_level=RATIO_SEQUENCE_TOKEN), batch, seq, tokens, offsets, lp, olp, None, token_adv, True)
    sync(device)
    report.check("gspo-token with A_bt = A_b equals gspo: loss", abs(float(a[0]) - float(b[0])), 1e-6)
    report.check("gspo-token with A_bt = A_b equals gspo: dloss/dlp", rel(b[1], a[1]), 1e-6)


def check_sequence_log_ratio(lib, report, device):
    generator = torch.Generator().manual_seed(4)
    for packed in (False, True):
        batch, seq, tokens, offsets = random_layout(11, 50, packed, generator, device)
        lp = torch.randn(tokens, generator=generator).to(device)
        olp = torch.randn(tokens, generator=generator).to(device)
        mask = (torch.rand(tokens, generator=generator) > 0.3).to(torch.uint8).to(device)
        log_ratio, lengths = lib.sequence_log_ratio(batch, seq, tokens, offsets, lp, olp, mask)
        sync(device)
        spans = ref.ranges(batch, seq, offsets.cpu() if offsets is not None else None)
        m = mask.cpu().double()
        d = (lp.cpu().double() - olp.cpu().double()) * m
        e_len = torch.tensor([float(m[s:e].sum()) for s, e in spans])
        e_ratio = torch.tensor([float(d[s:e].sum()) / L if L > 0 else 0.0 for (s, e), L in zip(spans, e_len.tolist())])
        name = f"sequence_log_ratio {'packed' if packed else 'padded'}"
        report.check(name, rel(log_ratio, e_ratio), VALUE_TOLERANCE)
        report.check(name + " lengths", rel(lengths, e_len), 0.0)


def check_advantages(lib, report, device):
    generator = torch.Generator().manual_seed(5)
    for mode, mode_name in ((0, "mean_std"), (1, "mean"), (2, "rloo")):
        rewards = torch.randn(64, generator=generator)
        rewards[8:16] = 0.5  # a group of equal rewards: exactly 0
        got = lib.group_advantages(rewards.to(device), 8, None, mode)
        sync(device)
        expected = ref.group_advantages(rewards, 8, None, mode)
        report.check(f"group_advantages {mode_name} contiguous", rel(got, expected), VALUE_TOLERANCE)
        report.truth(f"group_advantages {mode_name} equal group is exactly 0", bool((got[8:16].cpu() == 0).all()))
        ids = torch.randint(0, 9, (70,), generator=generator)
        ids[ids == 3] = 4  # every id used at least twice in practice; RLOO needs groups of >= 2
        counts = torch.bincount(ids, minlength=9)
        if mode == 2 and (counts == 1).any():
            ids[ids == int(torch.nonzero(counts == 1)[0])] = 5
        rewards = torch.randn(70, generator=generator)
        got = lib.group_advantages(rewards.to(device), 0, ids.to(device), mode)
        sync(device)
        expected = ref.group_advantages(rewards, 0, ids, mode)
        report.check(f"group_advantages {mode_name} by id", rel(got, expected), VALUE_TOLERANCE)


def check_gae(lib, report, device):
    generator = torch.Generator().manual_seed(6)
    for packed in (False, True):
        batch, seq, tokens, offsets = random_layout(7, 40, packed, generator, device)
        rewards = torch.randn(tokens, generator=generator)
        values = torch.randn(tokens, generator=generator)
        mask = (torch.rand(tokens, generator=generator) > 0.2).to(torch.uint8)
        adv, ret = lib.gae(batch, seq, tokens, offsets, rewards.to(device), values.to(device), mask.to(device), 0.99, 0.95)
        sync(device)
        spans = ref.ranges(batch, seq, offsets.cpu() if offsets is not None else None)
        e_adv, e_ret = ref.gae(spans, rewards, values, mask, 0.99, 0.95)
        name = f"gae {'packed' if packed else 'padded'}"
        report.check(name + " advantages", rel(adv, e_adv), VALUE_TOLERANCE)
        report.check(name + " returns", rel(ret, e_ret), VALUE_TOLERANCE)


def expect_error(lib, report, name, status, call, device):
    try:
        call()
        if device.type == "cuda":
            sync(device)
            lib.check_error(device)
        report.truth(name, False, "no error raised")
    except Gspo4jError as e:
        report.truth(name, e.status == status, str(e))


def check_errors_and_determinism(lib, report, device):
    generator = torch.Generator().manual_seed(7)
    z = (torch.randn(6, 3001, generator=generator) * 2).to(torch.bfloat16).to(device)
    y = torch.randint(0, 3001, (6,), generator=generator).to(device)
    bad = y.clone()
    bad[4] = 3001
    expect_error(lib, report, "error: token id out of range", OUT_OF_RANGE, lambda: lib.token_logprob_forward(z, bad), device)
    nan = z.clone()
    nan[2, 17] = float("nan")
    expect_error(lib, report, "error: NaN logit", NON_FINITE, lambda: lib.token_logprob_forward(nan, y), device)
    inf = z.clone()
    inf[3, 5] = float("inf")
    expect_error(lib, report, "error: Inf logit", NON_FINITE, lambda: lib.token_logprob_forward(inf, y), device)
    # In place with a bad id: that row of the caller's logits survives.
    lp, lse, h = lib.token_logprob_forward(z, y)
    work = z.clone()
    expect_error(lib, report, "error: backward with a bad id", OUT_OF_RANGE,
                 lambda: lib.token_logprob_backward(work, bad, lse, h, torch.ones(6, device=device), None, 1.0, work), device)
    report.truth("error: an in-place backward with a bad id writes nothing", bool(torch.equal(work, z)))
    offsets = torch.tensor([0, 5, 3, 9], device=device)
    lp9 = torch.zeros(9, device=device) - 1
    expect_error(lib, report, "error: decreasing offsets", OUT_OF_RANGE,
                 lambda: lib.policy_loss(lib.config(), 3, 9, 9, offsets, lp9, lp9, None, torch.ones(3, device=device), False),
                 device)
    lpn = lp9.clone()
    lpn[4] = float("nan")
    good_offsets = torch.tensor([0, 5, 5, 9], device=device)
    expect_error(lib, report, "error: NaN log-prob", NON_FINITE,
                 lambda: lib.policy_loss(lib.config(), 3, 9, 9, good_offsets, lpn, lp9, None, torch.ones(3, device=device), False),
                 device)
    expect_error(lib, report, "error: RLOO group of one", INVALID_ARGUMENT,
                 lambda: lib.group_advantages(torch.randn(3, device=device), 0, torch.tensor([0, 0, 1], device=device), 2), device)
    # Bitwise reproducible.
    z = (torch.randn(64, 50000, generator=generator) * 2).to(torch.bfloat16).to(device)
    y = torch.randint(0, 50000, (64,), generator=generator).to(device)
    g = torch.randn(64, generator=generator).to(device)
    first = lib.token_logprob_forward(z, y)
    second = lib.token_logprob_forward(z, y)
    grad_a = lib.token_logprob_backward(z, y, first[1], first[2], g, g)
    grad_b = lib.token_logprob_backward(z, y, second[1], second[2], g, g)
    sync(device)
    report.truth("deterministic: forward twice", all(torch.equal(a, b) for a, b in zip(first, second)))
    report.truth("deterministic: backward twice", bool(torch.equal(grad_a, grad_b)))
    batch, seq, tokens, offsets = random_layout(200, 300, True, torch.Generator().manual_seed(8), device)
    lp = -torch.rand(tokens, device=device)
    olp = lp + 0.01 * torch.randn(tokens, device=device)
    adv = torch.randn(batch, device=device)
    runs = [lib.policy_loss(lib.config(), batch, seq, tokens, offsets, lp, olp, None, adv, False) for _ in range(2)]
    sync(device)
    report.truth("deterministic: policy loss twice", all(torch.equal(a, b) for a, b in zip(runs[0][:2], runs[1][:2])))


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------

class Timer:
    """Median of CUDA-event timings, each run after writing a buffer larger than L2 (flush). On the
    CPU (the harness's self-test) a host clock stands in."""

    def __init__(self, device, warmup=3, repeat=20):
        self.device = device
        self.warmup = warmup
        self.repeat = repeat
        self.flush = torch.empty((256 if device.type == "cuda" else 8) << 20, dtype=torch.uint8, device=device)

    def __call__(self, fn):
        for _ in range(self.warmup):
            fn()
        sync(self.device)
        times = []
        for _ in range(self.repeat):
            self.flush.zero_()
            if self.device.type != "cuda":
                started = time.perf_counter()
                fn()
                times.append((time.perf_counter() - started) * 1e3)
                continue
            start = torch.cuda.Event(enable_timing=True)
            stop = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        return statistics.median(times), (min(times), max(times))


def peak_beyond(device, fn, resident_bytes):
    """Peak memory of fn() beyond what was allocated before it and `resident_bytes` it must keep (the gradient)."""
    if device.type != "cuda":
        fn()
        return float("nan")
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base - resident_bytes
    del out
    return peak


def selective_log_softmax(logits, index):
    """TRL's way to gather per-token log-probs: logsumexp for fp32, row by row for bf16/fp16 (to
    bound memory), never a full fp32 copy of the logits."""
    if logits.dtype in (torch.float32, torch.float64):
        selected = torch.gather(logits, dim=-1, index=index.unsqueeze(-1)).squeeze(-1)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return selected - lse
    rows = []
    for row_logits, row_index in zip(logits, index):
        row_logps = torch.log_softmax(row_logits, dim=-1)
        rows.append(row_logps.gather(dim=-1, index=row_index.unsqueeze(-1)).squeeze(-1))
    return torch.stack(rows)


def entropy_rows(logits, chunk=128):
    """Per-token entropy the way TRL logs it: log_softmax in chunks of rows, no gradient."""
    flat = logits.reshape(-1, logits.size(-1))
    out = []
    for start in range(0, flat.size(0), chunk):
        logps = torch.log_softmax(flat[start:start + chunk], dim=-1)
        out.append(-(torch.exp(logps) * logps).sum(-1))
    return torch.cat(out).view(logits.shape[:-1])


def torch_gspo_loss(logits, targets, mask, old_logprob, advantages, eps_low=3e-4, eps_high=4e-4, temperature=1.0,
                    with_entropy=True):
    """GSPO as TRL's GRPOTrainer computes it with importance_sampling_level="sequence": logits divided
    by the temperature (always, even 1.0), selective_log_softmax, the entropy it logs (no gradient),
    the sequence-level clipped surrogate. gspo4j's fused forward computes the same entropy."""
    logits = logits / temperature
    if with_entropy:
        with torch.no_grad():
            entropy_rows(logits)
    logps = selective_log_softmax(logits, targets)
    log_ratio = logps - old_logprob
    lengths = mask.sum(-1).clamp(min=1.0)
    log_weights = ((log_ratio * mask).sum(-1) / lengths).unsqueeze(-1)
    coef_1 = torch.exp(log_weights)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    adv = advantages.unsqueeze(-1)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
    return ((per_token_loss * mask).sum(-1) / lengths).mean()


def time_case(lib, device, batch, seq, vocab, dtype, timer, baselines, log, variants=()):
    rows = batch * seq
    generator = torch.Generator(device=device).manual_seed(9)
    logits = torch.randn(batch, seq, vocab, generator=generator, device=device, dtype=torch.float32).mul_(2).to(dtype)
    targets = torch.randint(0, vocab, (batch, seq), generator=generator, device=device)
    mask = torch.ones(batch, seq, device=device)
    advantages = torch.randn(batch, generator=generator, device=device)
    lp, lse, h = lib.token_logprob_forward(logits, targets)
    old = (lp + 0.001 * torch.randn(rows, generator=generator, device=device)).view(batch, seq).contiguous()
    mask_u8 = mask.to(torch.uint8).view(-1)
    g_lp = torch.randn(rows, generator=generator, device=device)
    cfg = lib.config()
    logits_bytes = logits.numel() * logits.element_size()
    result = {"shape": f"{rows} x {vocab}", "dtype": str(dtype)[6:], "logits_GB": logits_bytes / 1e9}

    forward = lambda: lib.token_logprob_forward(logits, targets, 1.0, True, lp, lse, h)
    grad = torch.empty_like(logits)
    backward = lambda: lib.token_logprob_backward(logits, targets, lse, h, g_lp, None, 1.0, grad)

    def ours_loss():
        return fused_gspo_loss(lib, cfg, logits, targets, mask_u8, old, advantages)

    result["forward_ms"], _ = timer(forward)
    result["forward_GBps"] = logits_bytes / result["forward_ms"] / 1e6
    result["backward_ms"], _ = timer(backward)
    result["backward_GBps"] = 2 * logits_bytes / result["backward_ms"] / 1e6
    # The CTA-size knob of cuda/token_logprob.cu, for tuning: the same ops with each size forced.
    for threads in variants:
        os.environ["GSPO4J_CUDA_THREADS"] = str(threads)
        try:
            result[f"forward_ms@{threads}"], _ = timer(forward)
            result[f"backward_ms@{threads}"], _ = timer(backward)
        finally:
            del os.environ["GSPO4J_CUDA_THREADS"]
    result["gspo4j_loss_ms"], _ = timer(ours_loss)
    del grad
    result["gspo4j_peak_MiB"] = peak_beyond(device, ours_loss, logits_bytes) / 2**20
    # Against float64 on the first two responses (the whole batch in float64 would not fit):
    # GSPO's loss through the same TRL-style code on upcast logits, its gradient by autograd.
    sub = slice(0, min(2, batch))
    sub_logits = logits[sub].contiguous()
    fused_loss, fused_grad, fused_lp = fused_gspo_loss(lib, cfg, sub_logits, targets[sub].contiguous(),
                                                       mask[sub].to(torch.uint8).reshape(-1).contiguous(),
                                                       old[sub].contiguous(), advantages[sub].contiguous())
    leaf = sub_logits.detach().double().requires_grad_(True)
    reference_loss = torch_gspo_loss(leaf, targets[sub], mask[sub].double(), old[sub].double(), advantages[sub].double(),
                                     with_entropy=False)
    reference_loss.backward()
    reference_lp, _, _ = ref.token_logprob(sub_logits.reshape(-1, vocab), targets[sub].reshape(-1))
    sync(device)
    result["lp_rel_err"] = rel(fused_lp, reference_lp, 1.0)
    result["loss_rel_err"] = abs(float(fused_loss) - float(reference_loss)) / max(1e-12, abs(float(reference_loss)))
    result["grad_rel_err"] = rel(fused_grad, leaf.grad.to(dtype), GRAD_FLOOR)
    del leaf, reference_loss, fused_grad, sub_logits
    empty_cache(device)

    for name in baselines:
        leaf = logits.detach().requires_grad_(True)
        try:
            fn = torch_gspo_loss if name == "eager" else torch.compile(torch_gspo_loss)

            def step():
                leaf.grad = None
                loss = fn(leaf, targets, mask, old, advantages)
                loss.backward()
                return loss

            started = time.time()
            step()  # compiles for torch.compile
            log(f"  {name}: first call {time.time() - started:.1f} s")
            result[f"{name}_loss_ms"], _ = timer(step)
            leaf.grad = None
            empty_cache(device)
            result[f"{name}_peak_MiB"] = peak_beyond(device, step, logits_bytes) / 2**20
        except Exception as e:  # an OOM or a compile failure is a result too
            result[f"{name}_loss_ms"] = float("nan")
            result[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            log(f"  {name} failed: {result[f'{name}_error']}")
        leaf.grad = None
        del leaf
        empty_cache(device)
    del logits
    empty_cache(device)
    return result


def fused_gspo_loss(lib, cfg, logits, targets, mask_u8, old, advantages):
    """GSPO forward + backward through gspo4j: (loss, d loss / d logits, log-probs)."""
    batch, seq = targets.shape
    lp, lse, h = lib.token_logprob_forward(logits, targets)
    loss, g, _, _ = lib.policy_loss(cfg, batch, seq, batch * seq, None, lp, old.reshape(-1), mask_u8, advantages, False,
                                    None, h, want_grad_entropy=False)
    grad = torch.empty_like(logits)
    lib.token_logprob_backward(logits, targets, lse, h, g, None, 1.0, grad)
    return loss, grad, lp


def copy_bandwidth(device, timer):
    src = torch.empty((2 << 30) if device.type == "cuda" else (64 << 20), dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    ms, _ = timer(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6  # bytes read + written, GB/s


def markdown(meta, results, report):
    lines = [f"### gspo4j CUDA kernels on {meta['gpu']}",
             "",
             f"Date {meta['date']}, commit {meta['commit']}, CUDA runtime {meta['cuda_runtime']}, torch {meta['torch']}. "
             f"Device-to-device copy: {meta['copy_GBps']:.0f} GB/s (read + write). Medians of {meta['repeat']} runs, "
             f"L2 flushed before each. Checks: {len(report.checks) - report.failures}/{len(report.checks)} passed.",
             "",
             "| logits | dtype | forward ms | GB/s | % copy | backward ms | GB/s | % copy | GSPO fwd+bwd ms | eager ms | compile ms "
             "| vs eager | vs compile | peak MiB (ours / eager / compile) | rel. err. vs float64 (lp, loss, grad) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        copy = meta["copy_GBps"]
        eager = r.get("eager_loss_ms", float("nan"))
        compiled = r.get("compile_loss_ms", float("nan"))
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {r['forward_ms']:.3f} | {r['forward_GBps']:.0f} | {100 * r['forward_GBps'] / copy:.0f}% "
            f"| {r['backward_ms']:.3f} | {r['backward_GBps']:.0f} | {100 * r['backward_GBps'] / copy:.0f}% "
            f"| {r['gspo4j_loss_ms']:.3f} | {eager:.2f} | {compiled:.2f} | {eager / r['gspo4j_loss_ms']:.1f}x "
            f"| {compiled / r['gspo4j_loss_ms']:.1f}x | {r['gspo4j_peak_MiB']:.0f} / {r.get('eager_peak_MiB', float('nan')):.0f} / "
            f"{r.get('compile_peak_MiB', float('nan')):.0f} | {r['lp_rel_err']:.1e}, {r['loss_rel_err']:.1e}, {r['grad_rel_err']:.1e} |")
    sizes = sorted({int(k.split("@")[1]) for r in results for k in r if k.startswith("forward_ms@")})
    if sizes:
        lines += ["", "CTA size (GSPO4J_CUDA_THREADS), forward / backward ms:", "",
                  "| logits | dtype | " + " | ".join(str(t) for t in sizes) + " |",
                  "|---|---|" + "---|" * len(sizes)]
        for r in results:
            cells = [f"{r.get(f'forward_ms@{t}', float('nan')):.3f} / {r.get(f'backward_ms@{t}', float('nan')):.3f}" for t in sizes]
            lines.append(f"| {r['shape']} | {r['dtype']} | " + " | ".join(cells) + " |")
    lines += ["",
              "GB/s counts the fewest bytes the op must move: the logits once (forward), the logits read once and "
              "the gradient written once (backward). Peak memory is beyond the logits and their gradient. "
              "Eager and compile are TRL's GSPO loss (logits / temperature, selective_log_softmax, the logged "
              "entropy without gradient, sequence-level importance weights) with autograd to the logits. Errors: gspo4j against the same loss in float64 on the first two "
              "responses (the gradient in the logits' dtype)."]
    if report.failures:
        lines += ["", f"**{report.failures} checks FAILED** (see gpu-results.json)."]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lib", required=True, help="path of libgspo4j.so")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for gpu-results.md/json")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="smaller checks, no timing (self-test)")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--no-checks", action="store_true", help="timing only (a second device call)")
    parser.add_argument("--cases", default="16x1024x151936:bf16,16x1024x151936:fp32,4x1024x32000:bf16,1x256x151936:bf16",
                        help="timed shapes BxTxV:dtype, comma-separated")
    parser.add_argument("--baselines", default="eager,compile")
    parser.add_argument("--threads", default="128,256,512,1024",
                        help="CTA sizes to compare for the forward and backward (GSPO4J_CUDA_THREADS); empty: none")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--cpu-timing", action="store_true",
                        help="with --device cpu: run the timing code on small --cases (a self-test of it, not a benchmark)")
    parser.add_argument("--commit", default=os.environ.get("GSPO4J_COMMIT", "unknown"))
    args = parser.parse_args()

    device = torch.device(args.device)
    lib = Library(args.lib)
    report = Report()
    os.makedirs(args.out, exist_ok=True)
    log_file = open(os.path.join(args.out, "gpu-harness.log"), "w")

    def log(message):
        print(message, flush=True)
        log_file.write(message + "\n")
        log_file.flush()

    log(f"gspo4j {lib.version()}, CUDA runtime {lib.cuda_runtime_version()}, torch {torch.__version__}, device {device}")
    results = []
    meta = {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "date": datetime.date.today().isoformat(), "commit": args.commit,
            "cuda_runtime": lib.cuda_runtime_version(), "torch": torch.__version__, "repeat": args.repeat}

    def save():
        # After every section and case: a run cut off by its time limit still leaves its numbers.
        with open(os.path.join(args.out, "gpu-results.json"), "w") as f:
            json.dump({"meta": meta, "timings": results, "checks": report.checks}, f, indent=1)

    sections = [("token_logprob", lambda: check_token_logprob(lib, report, device, args.quick)),
                ("sequence_log_ratio", lambda: check_sequence_log_ratio(lib, report, device)),
                ("policy_loss", lambda: check_policy_loss(lib, report, device, args.quick)),
                ("advantages", lambda: check_advantages(lib, report, device)),
                ("gae", lambda: check_gae(lib, report, device)),
                ("errors and determinism", lambda: check_errors_and_determinism(lib, report, device))]
    if device.type == "cuda" and not args.quick:
        sections.append(("N*V > 2^31", lambda: check_large(lib, report, device, 16384, 151936, torch.bfloat16)))
    if args.no_checks:
        sections = []
    for name, section in sections:
        started = time.time()
        try:
            section()
        except Exception:
            report.truth(f"{name}: ran without an exception", False, traceback.format_exc())
        log(f"== {name}: {time.time() - started:.1f} s")
        empty_cache(device)
        save()

    if not args.no_timing and (device.type == "cuda" and not args.quick or device.type == "cpu" and args.cpu_timing):
        timer = Timer(device, repeat=args.repeat)
        meta["copy_GBps"] = copy_bandwidth(device, timer)
        log(f"copy bandwidth {meta['copy_GBps']:.0f} GB/s")
        baselines = [b for b in args.baselines.split(",") if b]
        dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
        for case in args.cases.split(","):
            shape, dtype = case.split(":")
            b, t, v = (int(x) for x in shape.split("x"))
            started = time.time()
            try:
                results.append(time_case(lib, device, b, t, v, dtypes[dtype], timer, baselines, log,
                                         [int(x) for x in args.threads.split(",") if x]))
                log(f"== timed {case}: {time.time() - started:.1f} s {json.dumps(results[-1])}")
            except Exception:
                log(f"== timed {case} failed:\n{traceback.format_exc()}")
            empty_cache(device)
            save()
    save()
    failed = [c for c in report.checks if not c["ok"]]
    log(f"\n{len(report.checks) - len(failed)}/{len(report.checks)} checks passed")
    for c in failed[:30]:
        log(f"FAILED {c['check']}: {c['error']:.3e} > {c['bound']:.0e} {c['detail'][:300]}")
    if results:
        table = markdown(meta, results, report)
        with open(os.path.join(args.out, "gpu-results.md"), "w") as f:
            f.write(table + "\n")
        log("\n" + table)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
