"""Float64 references of SPEC.md, written plainly in torch: what the kernels are checked against.

The policy-loss reference builds the loss of SPEC.md from per-token log-probs and entropies as
float64 leaves and lets autograd give dLoss/dlp and dLoss/dH: an independent route to the
coefficients the kernels write.
"""
import math

import torch


def _log_softmax(x, targets):
    """log p of every entry, float64, with the target's entry exact even as p_y -> 1: where y is
    the row's argmax, log p_y = -log1p(sum_{v != y} e^(x_v - x_y)) (x_y - lse would cancel to
    0 in float64 once 1 - p_y < 1e-16)."""
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    log_p = x - lse
    y = targets.unsqueeze(-1)
    x_y = x.gather(-1, y)
    others = torch.exp(x - x_y).scatter(-1, y, 0.0).sum(-1, keepdim=True)
    is_max = x_y >= x.max(dim=-1, keepdim=True).values
    exact = torch.where(is_max, -torch.log1p(torch.where(is_max, others, torch.zeros_like(others))), log_p.gather(-1, y))
    return log_p.scatter(-1, y, exact), lse


def token_logprob(logits, targets, temperature=1.0):
    """lse, lp, H of every row, in float64 (logits upcast exactly)."""
    x = logits.double() / temperature
    log_p, lse = _log_softmax(x, targets)
    lp = log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(torch.exp(log_p) * log_p).sum(-1)
    return lp, lse.squeeze(-1), entropy


def token_logprob_grad(logits, targets, grad_logprob, grad_entropy, temperature=1.0):
    """dz = (g_lp (1[v==y] - p) - g_H p (log p + H)) / tau, float64, the target's 1 - p_y taken
    as the sum of the other p_v (exact where 1 - p_y itself would cancel)."""
    x = logits.double() / temperature
    y = targets.unsqueeze(-1)
    log_p, _ = _log_softmax(x, targets)
    p = torch.exp(log_p)
    g_lp = grad_logprob.double().reshape(p.shape[:-1]).unsqueeze(-1)
    grad = -g_lp * p
    one_minus_p_y = p.scatter(-1, y, 0.0).sum(-1, keepdim=True)
    grad = grad.scatter(-1, y, g_lp * one_minus_p_y)
    if grad_entropy is not None:
        entropy = -(p * log_p).sum(-1, keepdim=True)
        grad = grad - grad_entropy.double().reshape(p.shape[:-1]).unsqueeze(-1) * p * (log_p + entropy)
    return grad / temperature


def ranges(batch, seq, offsets):
    if offsets is None:
        return [(b * seq, (b + 1) * seq) for b in range(batch)]
    o = offsets.tolist()
    return [(o[b], o[b + 1]) for b in range(batch)]


def policy_loss(cfg, batch, seq, offsets, lp, olp, mask, adv, per_token, ref=None, entropy=None):
    """(loss, dLoss/dlp, dLoss/dH, metrics dict) of SPEC.md "Policy losses", float64 on the CPU."""
    lp = lp.detach().double().cpu().requires_grad_(True)
    h = entropy.detach().double().cpu().requires_grad_(True) if entropy is not None else None
    olp_v = olp.double().cpu() if olp is not None else lp.detach()
    m = mask.double().cpu() if mask is not None else torch.ones_like(lp)
    a = adv.double().cpu()
    ref_v = ref.double().cpu() if ref is not None else None
    spans = ranges(batch, seq, offsets)
    lengths = [float(m[s:e].sum()) for s, e in spans]
    responses = sum(1 for L in lengths if L > 0)
    tokens = sum(lengths)
    longest = max((e - s for s, e in spans), default=0)
    R = cfg.log_ratio_clamp
    low, high = 1.0 - cfg.eps_low, 1.0 + cfg.eps_high
    explicit = cfg.normalizer > 0
    response_den = cfg.normalizer if explicit else responses
    agg = cfg.aggregation
    if agg == 0:
        token_den, per_length = response_den, True
    elif agg == 1:
        token_den, per_length = (cfg.normalizer if explicit else tokens), False
    elif agg == 2:
        token_den, per_length = response_den, False
    else:
        lnorm = cfg.length_norm if cfg.length_norm > 0 else (longest if offsets is not None else seq)
        token_den, per_length = (cfg.normalizer if explicit else batch) * lnorm, False
    token_scale = 1.0 / token_den if token_den > 0 else 0.0
    response_scale = 1.0 / response_den if response_den > 0 else 0.0

    def weights():
        w = torch.zeros_like(lp)
        for (s, e), L in zip(spans, lengths):
            if L > 0:
                w[s:e] = m[s:e] * (token_scale / L if per_length else token_scale)
        return w

    w = weights()

    def clip_objective(r, A):
        j = torch.minimum(r * A, torch.clamp(r, low, high) * A)
        if cfg.dual_clip > 0:
            j = torch.where(A < 0, torch.maximum(j, cfg.dual_clip * A), j)
        return j

    metrics = {k: 0.0 for k in ["clip_fraction_low", "clip_fraction_high", "dual_clip_fraction"]}
    ratios = []
    clip_low = clip_high = dual = 0.0
    if cfg.ratio_level == 1:  # GSPO
        total = lp.new_zeros(())
        for b, ((s, e), L) in enumerate(zip(spans, lengths)):
            if L == 0:
                continue
            log_s = ((lp[s:e] - olp_v[s:e]) * m[s:e]).sum() / L
            sb = torch.exp(torch.clamp(log_s, -R, R))
            J = clip_objective(sb, a[b])
            total = total + J
            r = float(sb)
            ratios.append(r)
            clip_low += r < low and float(a[b]) < 0
            clip_high += r > high and float(a[b]) > 0
            dual += cfg.dual_clip > 0 and float(a[b]) < 0 and float(torch.minimum(sb * a[b], torch.clamp(sb, low, high) * a[b])) < cfg.dual_clip * float(a[b])
        policy = -response_scale * total
        decisions = responses
    else:
        A = a if per_token else torch.cat([a[b].expand(e - s) for b, (s, e) in enumerate(spans)]) if spans else a[:0]
        if cfg.ratio_level == 0:
            r = torch.exp(torch.clamp(lp - olp_v, -R, R))
        else:
            r = torch.zeros_like(lp)
            parts = []
            for (s, e), L in zip(spans, lengths):
                if L == 0:
                    parts.append(lp[s:e].detach() * 0 + 1)
                    continue
                log_s = float(((lp[s:e] - olp_v[s:e]) * m[s:e]).sum() / L)
                inside = -R <= log_s <= R
                sb = math.exp(min(max(log_s, -R), R))
                parts.append(sb * torch.exp(lp[s:e] - lp[s:e].detach()) if inside else lp[s:e].detach() * 0 + sb)
                ratios.append(sb)
            r = torch.cat(parts) if parts else lp[:0]
        J = clip_objective(r, A)
        policy = -(w * J).sum()
        counted = m > 0
        rv, Av = r.detach(), A
        clip_low = float(((rv < low) & (Av < 0) & counted).sum())
        clip_high = float(((rv > high) & (Av > 0) & counted).sum())
        if cfg.dual_clip > 0:
            plain = torch.minimum(rv * Av, torch.clamp(rv, low, high) * Av)
            dual = float(((Av < 0) & (plain < cfg.dual_clip * Av) & counted).sum())
        if cfg.ratio_level == 0:
            ratios = rv[counted].tolist()
        decisions = tokens
    loss = policy
    kl_term = lp.new_zeros(())
    if cfg.kl_coef != 0:
        raw = ref_v - lp
        d = torch.clamp(raw, -R, R)
        k = [-d, 0.5 * d * d, torch.exp(d) - d - 1][cfg.kl_estimator]
        kl_term = (w * k).sum()
        loss = loss + cfg.kl_coef * kl_term
    ent_term = lp.new_zeros(())
    if h is not None:
        ent_term = (w * h).sum()
        if cfg.entropy_coef != 0:
            loss = loss - cfg.entropy_coef * ent_term
    grads = torch.autograd.grad(loss, [lp] + ([h] if h is not None else []), allow_unused=True)
    g_lp = grads[0] if grads[0] is not None else torch.zeros_like(lp)
    g_h = (grads[1] if len(grads) > 1 and grads[1] is not None else torch.zeros_like(lp)) if h is not None else None

    def mean(x, n):
        return x / n if n > 0 else 0.0

    counted = m > 0
    metrics.update({
        "policy_loss": float(policy), "kl": float(kl_term), "entropy": float(ent_term),
        "clip_fraction_low": mean(clip_low, decisions), "clip_fraction_high": mean(clip_high, decisions),
        "dual_clip_fraction": mean(float(dual), decisions),
        "ratio_mean": mean(sum(ratios), len(ratios)), "ratio_min": min(ratios) if ratios else 0.0,
        "ratio_max": max(ratios) if ratios else 0.0,
        "approx_kl": mean(float(((olp_v - lp.detach()) * counted).sum()), tokens),
        "entropy_mean": mean(float((h.detach() * counted).sum()), tokens) if h is not None else 0.0,
        "sequences": float(responses), "tokens": float(tokens),
    })
    return float(loss), g_lp.detach(), g_h.detach() if g_h is not None else None, metrics


def group_advantages(rewards, group_size, group_ids, mode, eps=1e-6):
    r = rewards.double().cpu()
    out = torch.zeros_like(r)
    if group_ids is None:
        groups = [list(range(s, s + group_size)) for s in range(0, len(r), group_size)]
    else:
        ids = group_ids.cpu().tolist()
        groups = {}
        for i, g in enumerate(ids):
            groups.setdefault(g, []).append(i)
        groups = list(groups.values())
    for members in groups:
        values = r[members]
        if float(values.max()) == float(values.min()):
            continue
        mean = values.mean()
        if mode == 0:
            out[members] = (values - mean) / (values.std(unbiased=True) + eps)
        elif mode == 1:
            out[members] = values - mean
        else:
            n = len(members)
            out[members] = values - (values.sum() - values) / (n - 1)
    return out


def gae(spans, rewards, values, mask, gamma, lam):
    r, v = rewards.double().cpu(), values.double().cpu()
    m = mask.cpu() if mask is not None else torch.ones(len(r), dtype=torch.bool)
    adv = torch.zeros_like(r)
    ret = torch.zeros_like(r)
    for s, e in spans:
        next_value = next_adv = 0.0
        for i in range(e - 1, s - 1, -1):
            if not bool(m[i]):
                continue
            delta = float(r[i]) + gamma * next_value - float(v[i])
            a = delta + gamma * lam * next_adv
            adv[i] = a
            ret[i] = a + float(v[i])
            next_value, next_adv = float(v[i]), a
    return adv, ret
