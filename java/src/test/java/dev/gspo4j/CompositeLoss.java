package dev.gspo4j;

import dev.gspo4j.internal.LossSettings;
import dev.gspo4j.internal.Objective;
import dev.gspo4j.internal.ObjectiveParams;
import dev.gspo4j.internal.RatioLevel;
import dev.gspo4j.internal.TokenWeights;
import org.bytedeco.pytorch.Scalar;
import org.bytedeco.pytorch.ScalarOptional;
import org.bytedeco.pytorch.Tensor;
import org.bytedeco.pytorch.global.torch;
import org.bytedeco.pytorch.global.torch.ScalarType;

/**
 * The plain libtorch composite a Java user would write: log_softmax + gather for the log-probs,
 * the docs/math.md formulas in tensor ops, differentiated by libtorch's autograd. Padded layout only
 * ([B, T, V] logits, [B, T] per-token tensors); the packed layout is checked against the padded one.
 */
public final class CompositeLoss {
    private CompositeLoss() {}

    public record Output(Tensor loss, Tensor logProbs, Tensor entropy) {}

    static ScalarOptional s(double v) {
        return new ScalarOptional(new Scalar(v));
    }

    static Scalar sc(double v) {
        return new Scalar(v);
    }

    /**
     * @param logits [B, T, V], any float dtype (the composite runs in it; pass float64 for a reference)
     * @param mask [B, T] float 0/1
     * @param oldLogProbs [B, T] or null (on-policy)
     * @param advantages [B] or [B, T]
     */
    public static Output compute(LossSettings st, double temperature, Tensor logits, Tensor targets, Tensor mask, Tensor oldLogProbs,
            Tensor refLogProbs, Tensor advantages, boolean tokenAdvantages) {
        return compute(st, temperature, logits, targets, mask, oldLogProbs, refLogProbs, advantages, tokenAdvantages, null);
    }

    /**
     * As above, with every stop-gradient factor (sg[.] of docs/math.md, and the on-policy olp = sg(lp))
     * evaluated at {@code frozenLogits} instead of {@code logits} (null: at {@code logits}). Central
     * differences in {@code logits} with the factors frozen at the base point then check the
     * autograd gradient of objectives whose value is not their gradient's integral (CISPO, VESPO,
     * DPPO, GSPO-token, K3_PLUS).
     */
    public static Output compute(LossSettings st, double temperature, Tensor logits, Tensor targets, Tensor mask, Tensor oldLogProbs,
            Tensor refLogProbs, Tensor advantages, boolean tokenAdvantages, Tensor frozenLogits) {
        return compute(st, temperature, logits, targets, mask, oldLogProbs, refLogProbs, advantages, tokenAdvantages, frozenLogits,
                null, null);
    }

    /**
     * As above, with the token weights of {@code st.weights()} (docs/math.md "Training-inference
     * mismatch", "Token selection"): {@code rolloutLogProbs} [B, T] (mu, or null) and {@code keep}
     * [B, T] 0/1 (top-entropy selection's kept tokens, or null: every token).
     */
    public static Output compute(LossSettings st, double temperature, Tensor logits, Tensor targets, Tensor mask, Tensor oldLogProbs,
            Tensor refLogProbs, Tensor advantages, boolean tokenAdvantages, Tensor frozenLogits, Tensor rolloutLogProbs, Tensor kept) {
        final ScalarType type = logits.scalar_type();
        final Tensor logSoftmax = logits.div(sc(temperature)).log_softmax(-1);
        final Tensor tokenLogProbs = logSoftmax.gather(-1, targets.unsqueeze(-1)).squeeze(-1);
        // A -Inf logit has p = 0 and adds 0 to the entropy: p * log p with log p's -Inf replaced by
        // the dtype's lowest finite value (nan_to_num, whose gradient there is 0), so 0 * -Inf never
        // makes a NaN in the value or the gradient.
        final Tensor entropy = logSoftmax.exp().mul(logSoftmax.nan_to_num()).sum(new long[] {-1}).neg();
        final Tensor m = mask.to(type);
        // Masked tokens take no part: a masked -Inf log-prob (its target logit -Inf) must not
        // reach 0 * -Inf below; masked_fill gives those positions no gradient either.
        final Tensor lp = tokenLogProbs.masked_fill(m.eq(sc(0)), sc(0));
        // sg(lp): the frozen point's log-probs (a constant)
        final Tensor lpFrozen = frozenLogits == null ? lp.detach()
                : frozenLogits.detach().div(sc(temperature)).log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                        .masked_fill(m.eq(sc(0)), sc(0));
        final Tensor olp = oldLogProbs == null ? lpFrozen : oldLogProbs.to(type);
        final Tensor adv = advantages.to(type);
        final Tensor lengths = m.sum(new long[] {1});
        final Tensor valid = lengths.gt(sc(0)).to(type);
        final Tensor responses = valid.sum();
        final double r = st.logRatioClamp();
        final long batch = logits.size(0);
        final long seq = logits.size(1);
        final Objective objective = st.objective().objective();
        // w[b, t] = R_b f_t k_t, no gradient; wMean[b] = its mean over the response's counted tokens.
        final Tensor tokenWeight = tokenWeights(st, m, olp.detach(), lpFrozen, rolloutLogProbs == null ? null : rolloutLogProbs.to(type),
                tokenAdvantages ? null : adv, kept == null ? null : kept.to(type), lengths);
        final Tensor wMean = m.mul(tokenWeight).sum(new long[] {1}).div(lengths.clamp(s(1), new ScalarOptional()));

        // weights w[b, t] of the aggregation (0 for empty responses)
        final double norm = st.normalizer();
        final Tensor responseDenominator = norm > 0 ? responses.mul(sc(0)).add(sc(norm)) : responses;
        final Tensor weight;
        switch (st.aggregation()) {
            case SEQ_MEAN_TOKEN_MEAN -> weight = m.div(lengths.clamp(s(1), new ScalarOptional()).unsqueeze(1)).div(responseDenominator.clamp(s(1e-30), new ScalarOptional()));
            case TOKEN_MEAN -> weight = m.div((norm > 0 ? m.sum().mul(sc(0)).add(sc(norm)) : m.sum()).clamp(s(1e-30), new ScalarOptional()));
            case SEQ_MEAN_TOKEN_SUM -> weight = m.div(responseDenominator.clamp(s(1e-30), new ScalarOptional()));
            default -> {
                final double lengthNorm = st.lengthNorm() > 0 ? st.lengthNorm() : seq;
                weight = m.div(sc((norm > 0 ? norm : batch) * lengthNorm));
            }
        }

        final Tensor surrogate;
        final Tensor safeLengths = lengths.clamp(s(1), new ScalarOptional());
        if (st.ratioLevel() == RatioLevel.SEQUENCE) {
            final Tensor j;
            if (objective == Objective.GMPO) {
                // l_t = a min(a x, a clip(x, -eps_low, eps_high)), a = sign(A_b); J_b = exp(mean l) A_b
                final Tensor x = lp.sub(olp).clamp(s(-r), s(r));
                final Tensor a = adv.sign().unsqueeze(1);
                final Tensor bounded = x.clamp(s(-st.epsLow()), s(st.epsHigh()));
                final Tensor l = a.mul(a.mul(x).minimum(a.mul(bounded)));
                j = m.mul(l).sum(new long[] {1}).div(safeLengths).exp().mul(adv);
            } else {
                final Tensor logS = m.mul(lp.sub(olp)).sum(new long[] {1}).div(safeLengths);
                final Tensor ratio = logS.clamp(s(-r), s(r)).exp();
                final Tensor clipped = objective(st, ratio, adv);
                j = objective == Objective.LUSPO ? clipped.mul(lengths) : clipped;
            }
            surrogate = j.mul(wMean).mul(valid).sum().div(responseDenominator.clamp(s(1e-30), new ScalarOptional()));
        } else {
            final Tensor ratio;
            final Tensor a = tokenAdvantages ? adv : adv.unsqueeze(1).expand(batch, seq);
            if (st.ratioLevel() == RatioLevel.TOKEN) {
                ratio = lp.sub(olp).clamp(s(-r), s(r)).exp();
            } else {
                final Tensor logS = m.mul(lpFrozen.sub(olp)).sum(new long[] {1}).div(safeLengths);
                // log s_bt = sg(log s_b) + lp - sg(lp), clamped as a whole (as verl clamps it): the
                // value is s_b's, and outside [-R, R] the token's gradient is 0 like any clamped ratio.
                ratio = logS.unsqueeze(1).add(lp.sub(lpFrozen)).clamp(s(-r), s(r)).exp();
            }
            // the ratio's value at the frozen point, for the sg[.] weights
            final Tensor frozenRatio = st.ratioLevel() == RatioLevel.TOKEN ? lpFrozen.sub(olp).clamp(s(-r), s(r)).exp()
                    : m.mul(lpFrozen.sub(olp)).sum(new long[] {1}).div(safeLengths).clamp(s(-r), s(r)).exp().unsqueeze(1)
                            .expand(batch, seq);
            final Tensor q = switch (objective) {
                case CISPO -> frozenRatio.clamp(s(1 - st.epsLow()), s(1 + st.epsHigh())).mul(a).mul(lp);
                case SAPO -> {
                    final Tensor tau = torch.where(a.gt(sc(0)), a.mul(sc(0)).add(sc(st.objective().sapoTauPos())),
                            a.mul(sc(0)).add(sc(st.objective().sapoTauNeg())));
                    yield tau.mul(ratio.sub(sc(1))).sigmoid().mul(sc(4)).div(tau).mul(a);
                }
                case VESPO -> {
                    final Tensor logW = m.mul(lpFrozen.sub(olp)).sum(new long[] {1}).unsqueeze(1).clamp(s(-r), s(r));
                    final Tensor w = logW.exp();
                    final ObjectiveParams p = st.objective();
                    final Tensor phiPos = logW.mul(sc(p.vespoKPos())).add(w.neg().add(sc(1)).mul(sc(p.vespoLambdaPos()))).exp();
                    final Tensor phiNeg = logW.mul(sc(p.vespoKNeg())).add(w.neg().add(sc(1)).mul(sc(p.vespoLambdaNeg()))).exp();
                    yield torch.where(a.ge(sc(0)), phiPos.expand(batch, seq), phiNeg.expand(batch, seq)).mul(a).mul(lp);
                }
                case DPPO_TV, DPPO_KL -> {
                    final ObjectiveParams p = st.objective();
                    final Tensor prob = lpFrozen.exp();
                    final Tensor oldProb = olp.exp();
                    final Tensor keep;
                    if (objective == Objective.DPPO_TV) {
                        keep = torch.where(a.gt(sc(0)), prob.sub(oldProb).le(sc(p.dppoDeltaHigh())),
                                prob.sub(oldProb).ge(sc(-p.dppoDeltaLow())));
                    } else {
                        final Tensor binaryKl = oldProb.mul(olp.sub(lpFrozen)).add(oldProb.neg().add(sc(1)).mul(
                                oldProb.neg().add(sc(1 + 1e-8)).div(prob.neg().add(sc(1 + 1e-8))).log()));
                        keep = torch.where(a.gt(sc(0)), binaryKl.le(sc(p.dppoDeltaHigh())).logical_or(prob.le(oldProb)),
                                binaryKl.le(sc(p.dppoDeltaLow())).logical_or(prob.ge(oldProb)));
                    }
                    yield frozenRatio.clamp(new ScalarOptional(), s(p.dppoRatioCap())).mul(keep.to(type)).mul(a).mul(lp);
                }
                default -> objective(st, ratio, a);
            };
            surrogate = weight.mul(q).mul(tokenWeight).sum();
        }
        Tensor loss = surrogate.neg();
        if (st.klCoef() != 0) {
            final Tensor ref = refLogProbs.to(type);
            final Tensor d = ref.sub(lp).clamp(s(-r), s(r));
            final Tensor k = switch (st.klEstimator()) {
                case K1 -> d.neg();
                case K2 -> d.mul(d).mul(sc(0.5));
                case K3 -> d.exp().sub(d).sub(sc(1));
                case K3_PLUS -> {
                    // value of k3, gradient of k2, both at the frozen point
                    final Tensor dFrozen = ref.sub(lpFrozen).clamp(s(-r), s(r));
                    yield d.mul(d).mul(sc(0.5)).sub(dFrozen.mul(dFrozen).mul(sc(0.5))).add(dFrozen.exp().sub(dFrozen).sub(sc(1)));
                }
                case K3_UNBIASED -> lp.sub(olp).clamp(s(-r), s(r)).exp().mul(d.exp().sub(d).sub(sc(1)));
                case ABS -> d.abs();
                case LOW_VAR_KL -> d.exp().sub(d).sub(sc(1)).clamp(s(-10), s(10));
            };
            loss = loss.add(weight.mul(k).sum().mul(sc(st.klCoef())));
        }
        if (st.entropyCoef() != 0) {
            loss = loss.sub(weight.mul(entropy).sum().mul(sc(st.entropyCoef())));
        }
        return new Output(loss, tokenLogProbs.detach(), entropy.detach());
    }

    // The rollout weight times the selection, as docs/math.md writes it, in tensor ops.
    static Tensor tokenWeights(LossSettings st, Tensor m, Tensor olp, Tensor lp, Tensor mu, Tensor adv, Tensor keep, Tensor lengths) {
        final TokenWeights tw = st.weights();
        final double r = st.logRatioClamp();
        Tensor f = m.mul(sc(0)).add(sc(1));
        Tensor response = lengths.mul(sc(0)).add(sc(1));
        final Tensor safe = lengths.clamp(s(1), new ScalarOptional());
        if (mu != null) {
            final Tensor d = olp.sub(mu);
            if (tw.level() == Rollout.Level.TOKEN) {
                f = band(tw, d.clamp(s(-r), s(r)).exp());
            } else if (tw.level() != null) {
                Tensor logRho = m.mul(d).sum(new long[] {1});
                if (tw.level() == Rollout.Level.GEOMETRIC) {
                    logRho = logRho.div(safe);
                }
                response = band(tw, logRho.clamp(s(-r), s(r)).exp());
            }
            if (tw.divergence() != null) {
                final Tensor v = switch (tw.divergence()) {
                    case K1 -> d;
                    case K2 -> d.mul(d).mul(sc(0.5));
                    case K3 -> d.neg().exp().add(d).sub(sc(1));
                };
                if (tw.scope() == Rollout.Scope.TOKEN) {
                    f = f.mul(accepts(tw, v).to(f.scalar_type()));
                } else {
                    final Tensor stat = switch (tw.scope()) {
                        case MEAN -> m.mul(v).sum(new long[] {1}).div(safe);
                        case SUM -> m.mul(v).sum(new long[] {1});
                        default -> torch.where(m.gt(sc(0)), v, v.mul(sc(0)).add(sc(Double.NEGATIVE_INFINITY))).amax(new long[] {1}, false);
                    };
                    response = response.mul(accepts(tw, stat).to(f.scalar_type()));
                }
            }
        }
        if (tw.offPolicyMask()) {
            final Tensor beh = mu != null ? mu : olp;
            final Tensor gap = m.mul(beh.sub(lp)).sum(new long[] {1}).div(safe);
            response = response.mul(adv.lt(sc(0)).logical_and(gap.gt(sc(tw.offPolicyDelta()))).logical_not().to(f.scalar_type()));
        }
        Tensor w = f.mul(response.unsqueeze(1));
        if (keep != null) {
            w = w.mul(keep);
        }
        return w.detach();
    }

    static Tensor band(TokenWeights tw, Tensor rho) {
        final Tensor lo = tw.cMin() > 0 ? rho.ge(sc(tw.cMin())) : rho.ge(sc(Double.NEGATIVE_INFINITY));
        final Tensor hi = tw.cMax() < Double.POSITIVE_INFINITY ? rho.le(sc(tw.cMax())) : rho.le(sc(Double.POSITIVE_INFINITY));
        if (tw.mode() == Rollout.Mode.MASK) {
            return rho.mul(lo.logical_and(hi).to(rho.scalar_type()));
        }
        if (tw.cMin() <= 0 && tw.cMax() == Double.POSITIVE_INFINITY) {
            return rho;
        }
        return rho.clamp(tw.cMin() > 0 ? s(tw.cMin()) : new ScalarOptional(),
                tw.cMax() < Double.POSITIVE_INFINITY ? s(tw.cMax()) : new ScalarOptional());
    }

    static Tensor accepts(TokenWeights tw, Tensor v) {
        return tw.divergence() == Rollout.Divergence.K1 ? v.ge(sc(tw.low())).logical_and(v.le(sc(tw.high()))) : v.le(sc(tw.high()));
    }

    static Tensor objective(LossSettings st, Tensor ratio, Tensor advantage) {
        final Tensor clipped = ratio.clamp(s(1 - st.epsLow()), s(1 + st.epsHigh()));
        Tensor j = ratio.mul(advantage).minimum(clipped.mul(advantage));
        if (st.dualClip() > 0) {
            final Tensor dual = j.maximum(advantage.mul(sc(st.dualClip())));
            j = torch.where(advantage.lt(sc(0)), dual, j);
        }
        return j;
    }
}
